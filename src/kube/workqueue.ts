/**
 * A keyed, de-duplicating, rate-limited work queue, after client-go's `util/workqueue`
 * (`queue.go`, `delaying_queue.go`, `rate_limiting_queue.go`, `default_rate_limiters.go`).
 *
 * Why: reconcilers are keyed (a policy, a node, a slice). Watch events only add keys; a worker
 * takes a key, reads the current state from the caches and makes the world match. So:
 * - a key waiting in the queue is there once, however many events named it;
 * - a key is never handed to two workers at once; added again while it is processed, it is
 *   queued again when the worker calls `done()`, so the last event is never lost;
 * - a key that failed comes back after a delay from a rate limiter: per-key exponential backoff
 *   so one broken object does not spin, and an overall token bucket so that a thousand failing
 *   keys do not hammer the API server together.
 *
 * `runWorkers()` is the wrapper that owns retries: the handler is business logic and only returns
 * or throws ("retry logic is not business logic").
 *
 * Where this differs from client-go: keys are strings (`namespace/name`), not any comparable
 * value; `get()` is a promise instead of a blocking call; after `shutDown()` no key is handed
 * out any more, even one still queued (client-go drains them), because the caller that shuts down
 * is a replica losing leadership, which must stop writing at once; and a key is added with a
 * priority (`"high"`, the default, or `"low"`): every high key waiting is handed out before any
 * low one, so that under a backlog what the data plane waits for goes before what only people
 * read. A key added at both is high. Time comes from an injected clock so that tests never sleep.
 */
import type { Clock, Timer } from "../lib/clock.ts";

/** Decides how long a key waits before it is tried again. */
export interface RateLimiter {
  /** The delay in ms before `key`'s next try; each call counts one more failure of `key`. */
  when(key: string): number;
  /** Clears `key`'s failures: it succeeded, or it is gone. */
  forget(key: string): void;
  numRequeues(key: string): number;
}

/** `baseMs · 2^failures`, at most `maxMs` (client-go's ItemExponentialFailureRateLimiter). */
export class ExponentialBackoff implements RateLimiter {
  readonly #baseMs: number;
  readonly #maxMs: number;
  readonly #failures = new Map<string, number>();

  constructor(options: { readonly baseMs: number; readonly maxMs: number }) {
    this.#baseMs = options.baseMs;
    this.#maxMs = options.maxMs;
  }

  when(key: string): number {
    const failures = this.#failures.get(key) ?? 0;
    this.#failures.set(key, failures + 1);
    // 2 ** 1100 is Infinity, which min() turns into the cap: no overflow to guard against.
    return Math.min(this.#baseMs * 2 ** failures, this.#maxMs);
  }

  forget(key: string): void {
    this.#failures.delete(key);
  }

  numRequeues(key: string): number {
    return this.#failures.get(key) ?? 0;
  }
}

/**
 * A token bucket shared by all keys (client-go's BucketRateLimiter over `rate.Limiter`): `burst`
 * retries at once, then `perSecond`. Each `when()` reserves a token, possibly one not yet earned,
 * so the hundred-and-first retry of a burst waits 1/perSecond, the next twice that, and so on.
 */
export class TokenBucket implements RateLimiter {
  readonly #clock: Clock;
  readonly #perMs: number;
  readonly #burst: number;
  #tokens: number;
  #last: number;

  constructor(clock: Clock, options: { readonly perSecond: number; readonly burst: number }) {
    if (!(options.perSecond > 0) || !(options.burst >= 1))
      throw new RangeError(
        `Cannot create a token bucket of ${options.perSecond} per second, burst ${options.burst}: ` +
          "both must be positive (the burst at least 1)",
      );
    this.#clock = clock;
    this.#perMs = options.perSecond / 1000;
    this.#burst = options.burst;
    this.#tokens = options.burst;
    this.#last = clock.now();
  }

  when(): number {
    const now = this.#clock.now();
    this.#tokens = Math.min(this.#burst, this.#tokens + (now - this.#last) * this.#perMs);
    this.#last = now;
    this.#tokens -= 1;
    return this.#tokens >= 0 ? 0 : -this.#tokens / this.#perMs;
  }

  forget(): void {}

  numRequeues(): number {
    return 0;
  }
}

/** The longest delay of several limiters; every one of them counts every failure. */
export class MaxOf implements RateLimiter {
  readonly #limiters: readonly RateLimiter[];

  constructor(...limiters: RateLimiter[]) {
    this.#limiters = limiters;
  }

  when(key: string): number {
    let delay = 0;
    for (const l of this.#limiters) delay = Math.max(delay, l.when(key));
    return delay;
  }

  forget(key: string): void {
    for (const l of this.#limiters) l.forget(key);
  }

  numRequeues(key: string): number {
    let n = 0;
    for (const l of this.#limiters) n = Math.max(n, l.numRequeues(key));
    return n;
  }
}

export interface DefaultRateLimiterOptions {
  /** @default 5 */
  readonly baseMs?: number;
  /** @default 1_000_000 (1000 s) */
  readonly maxMs?: number;
  /** @default 10 */
  readonly perSecond?: number;
  /** @default 100 */
  readonly burst?: number;
}

/** client-go's DefaultControllerRateLimiter: per-key backoff 5 ms → 1000 s, overall 10/s, burst 100. */
export function defaultRateLimiter(
  clock: Clock,
  options: DefaultRateLimiterOptions = {},
): RateLimiter {
  const o = { baseMs: 5, maxMs: 1_000_000, perSecond: 10, burst: 100, ...options };
  return new MaxOf(
    new ExponentialBackoff({ baseMs: o.baseMs, maxMs: o.maxMs }),
    new TokenBucket(clock, { perSecond: o.perSecond, burst: o.burst }),
  );
}

export interface WorkQueueOptions {
  readonly clock: Clock;
  /** @default defaultRateLimiter(clock) */
  readonly rateLimiter?: RateLimiter;
}

/** Every high key waiting is handed out before any low one. */
export type Priority = "high" | "low";

const higher = (a: Priority, b: Priority): Priority =>
  a === "high" || b === "high" ? "high" : "low";

/** A key waiting for its time; superseded entries stay in the heap and are skipped. */
interface Delayed {
  readonly key: string;
  readonly at: number;
  readonly seq: number;
  priority: Priority;
}

/**
 * Keys ready to hand out at one priority, oldest first, from `head` on (no O(n) shift per get).
 * A key raised to high leaves a stale entry in the low lane, skipped when reached.
 */
interface Lane {
  keys: string[];
  head: number;
}

export class WorkQueue {
  readonly #clock: Clock;
  readonly #limiter: RateLimiter;
  readonly #lanes: Record<Priority, Lane> = {
    high: { keys: [], head: 0 },
    low: { keys: [], head: 0 },
  };
  /** Keys ready to hand out: in a lane, not processing. */
  #ready = 0;
  /**
   * Keys that need processing, with their priority: those in a lane, and those processing that
   * were added again.
   */
  readonly #dirty = new Map<string, Priority>();
  /** Keys being processed, with the priority they were handed out at (kept by a retry). */
  readonly #processing = new Map<string, Priority>();
  readonly #getters: ((key: string | undefined) => void)[] = [];
  #shuttingDown = false;
  /** addAfter(): a min-heap by time, then order of arrival; `#delayed` holds each key's live entry. */
  #heap: Delayed[] = [];
  readonly #delayed = new Map<string, Delayed>();
  #seq = 0;
  #timer: Timer | undefined;
  #timerAt = Number.POSITIVE_INFINITY;

  constructor(options: WorkQueueOptions) {
    this.#clock = options.clock;
    this.#limiter = options.rateLimiter ?? defaultRateLimiter(options.clock);
  }

  /** Keys ready to hand out (not those processing or waiting for a delay). */
  get len(): number {
    return this.#ready;
  }

  get shuttingDown(): boolean {
    return this.#shuttingDown;
  }

  add(key: string, priority: Priority = "high"): void {
    if (this.#shuttingDown) return;
    const had = this.#dirty.get(key);
    if (had === undefined) {
      this.#dirty.set(key, priority);
      if (this.#processing.has(key)) return; // done() queues it
      this.#push(key, priority);
    } else if (had === "low" && priority === "high") {
      this.#dirty.set(key, "high");
      if (this.#processing.has(key)) return;
      this.#lanes.high.keys.push(key); // still one key ready: `#ready` stays
    } else return;
    this.#handOut();
  }

  /** Adds `key` in `ms`; a key already waiting keeps the earlier of its two times. */
  addAfter(key: string, ms: number, priority: Priority = "high"): void {
    if (this.#shuttingDown) return;
    if (!(ms > 0)) {
      this.add(key, priority);
      return;
    }
    const at = this.#clock.now() + ms;
    const live = this.#delayed.get(key);
    if (live !== undefined && live.at <= at) {
      live.priority = higher(live.priority, priority);
      return;
    }
    const entry = {
      key,
      at,
      seq: this.#seq++,
      priority: live === undefined ? priority : higher(live.priority, priority),
    };
    this.#delayed.set(key, entry);
    heapPush(this.#heap, entry);
    this.#arm();
  }

  /** Adds `key` when the rate limiter says so: after a failure, at the priority it failed at. */
  addRateLimited(key: string): void {
    if (this.#shuttingDown) return;
    this.addAfter(key, this.#limiter.when(key), this.#processing.get(key) ?? "high");
  }

  /** Resets `key`'s backoff (it succeeded); does not take it out of the queue. */
  forget(key: string): void {
    this.#limiter.forget(key);
  }

  /** How many times `key` failed since it was last forgotten. */
  numRequeues(key: string): number {
    return this.#limiter.numRequeues(key);
  }

  /** The next key to process, once one is ready; `undefined` once the queue is shut down. */
  get(): Promise<string | undefined> {
    if (this.#shuttingDown) return Promise.resolve(undefined);
    if (this.len > 0) return Promise.resolve(this.#take());
    return new Promise((resolve) => this.#getters.push(resolve));
  }

  /** Ends the processing of `key`: if it was added meanwhile it is queued again now. */
  done(key: string): void {
    if (!this.#processing.delete(key)) return;
    const priority = this.#dirty.get(key);
    if (this.#shuttingDown || priority === undefined) return;
    this.#push(key, priority);
    this.#handOut();
  }

  /** Stops at once: nothing more is handed out or added; pending `get()`s resolve `undefined`. */
  shutDown(): void {
    if (this.#shuttingDown) return;
    this.#shuttingDown = true;
    this.#timer?.cancel();
    this.#timer = undefined;
    this.#heap = [];
    this.#delayed.clear();
    for (const lane of Object.values(this.#lanes)) {
      lane.keys = [];
      lane.head = 0;
    }
    this.#ready = 0;
    this.#dirty.clear();
    for (const resolve of this.#getters.splice(0)) resolve(undefined);
  }

  #push(key: string, priority: Priority): void {
    this.#lanes[priority].keys.push(key);
    this.#ready++;
  }

  /** The oldest ready key of the highest lane; only while `len > 0`. */
  #take(): string {
    for (const priority of ["high", "low"] as const) {
      const lane = this.#lanes[priority];
      while (lane.head < lane.keys.length) {
        const key = lane.keys[lane.head++]!;
        if (lane.head > 1024 && lane.head * 2 > lane.keys.length) {
          lane.keys = lane.keys.slice(lane.head);
          lane.head = 0;
        }
        // An entry left behind by a raise, or by a key handed out from the other lane.
        if (this.#dirty.get(key) !== priority || this.#processing.has(key)) continue;
        this.#dirty.delete(key);
        this.#processing.set(key, priority);
        this.#ready--;
        return key;
      }
    }
    throw new Error("WorkQueue: no key ready although len > 0");
  }

  #handOut(): void {
    while (this.len > 0 && this.#getters.length > 0) this.#getters.shift()!(this.#take());
  }

  /** Keeps one clock timer, for the earliest delayed key. */
  #arm(): void {
    const next = this.#peek();
    if (next === undefined || next.at >= this.#timerAt) return;
    this.#timer?.cancel();
    this.#timerAt = next.at;
    this.#timer = this.#clock.after(next.at - this.#clock.now(), () => {
      this.#timer = undefined;
      this.#timerAt = Number.POSITIVE_INFINITY;
      const now = this.#clock.now();
      for (let e = this.#peek(); e !== undefined && e.at <= now; e = this.#peek()) {
        heapPop(this.#heap);
        this.#delayed.delete(e.key);
        this.add(e.key, e.priority);
      }
      this.#arm();
    });
  }

  /** The earliest live entry, dropping superseded ones on the way. */
  #peek(): Delayed | undefined {
    for (let top = this.#heap[0]; top !== undefined; top = this.#heap[0]) {
      if (this.#delayed.get(top.key) === top) return top;
      heapPop(this.#heap);
    }
    return undefined;
  }
}

const before = (a: Delayed, b: Delayed) => a.at < b.at || (a.at === b.at && a.seq < b.seq);

function heapPush(heap: Delayed[], entry: Delayed): void {
  let i = heap.push(entry) - 1;
  while (i > 0) {
    const parent = (i - 1) >> 1;
    if (!before(heap[i]!, heap[parent]!)) break;
    [heap[i], heap[parent]] = [heap[parent]!, heap[i]!];
    i = parent;
  }
}

function heapPop(heap: Delayed[]): void {
  const last = heap.pop()!;
  if (heap.length === 0) return;
  heap[0] = last;
  for (let i = 0; ; ) {
    const l = 2 * i + 1;
    const r = l + 1;
    let min = i;
    if (l < heap.length && before(heap[l]!, heap[min]!)) min = l;
    if (r < heap.length && before(heap[r]!, heap[min]!)) min = r;
    if (min === i) return;
    [heap[i], heap[min]] = [heap[min]!, heap[i]!];
    i = min;
  }
}

export interface RunWorkersOptions {
  /** How many keys are processed at once. */
  readonly workers: number;
  /** The business logic for one key: returns when the world matches, throws to be retried. */
  readonly handle: (key: string) => Promise<void> | void;
  /** After a failure; `key` is already scheduled again. `requeues`: its failures so far. Must not throw. */
  readonly onError?: (key: string, error: unknown, requeues: number) => void;
}

/**
 * Starts `workers` loops taking keys from `queue`: success forgets the key's backoff, a throw
 * adds it back rate-limited. Resolves when every loop has ended, that is after `shutDown()` and
 * once the keys being processed then are done.
 */
export function runWorkers(queue: WorkQueue, options: RunWorkersOptions): Promise<void> {
  const { workers, handle, onError } = options;
  if (!Number.isInteger(workers) || workers < 1)
    throw new RangeError(
      `Cannot run ${workers} workers: workers must be a whole number, at least 1`,
    );
  const loop = async () => {
    for (let key = await queue.get(); key !== undefined; key = await queue.get()) {
      try {
        await handle(key);
        queue.forget(key);
      } catch (error) {
        queue.addRateLimited(key);
        onError?.(key, error, queue.numRequeues(key));
      } finally {
        queue.done(key);
      }
    }
  };
  return Promise.all(Array.from({ length: workers }, loop)).then(() => undefined);
}
