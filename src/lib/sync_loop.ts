/**
 * One serialized sync loop with two kinds of sync, as kube-proxy's nftables proxier runs them:
 *
 *  - a *partial* sync when something changed (`trigger()`): requests are coalesced, one sync runs
 *    at a time; `burst` of them may start back to back, then one each `minIntervalMs`
 *    (BoundedFrequencyRunner's minimum interval and burst: a token bucket), so that a stream of
 *    events costs a sync per interval, each taking what arrived meanwhile, while a lone event
 *    is synced at once;
 *  - a *full* sync (the one that re-reads the world and so repairs drift) every `periodMs` since
 *    the last full sync started, and at once after any failure (kube-proxy's `needFullSync`).
 *
 * Time decides when a full sync is due, never the absence of events: a trigger never moves the
 * full sync's deadline, and a sync that starts after the deadline is a full one whatever asked
 * for it. (The previous loop ran its periodic sync only when no event was pending and re-armed
 * the period on every trigger, so a pod relabelled every 2 s postponed drift repair for ever.)
 *
 * Failures are retried with exponential backoff (`retryMs` doubling up to `maxRetryMs`); the
 * retry is full. Time comes from an injected clock so that tests never sleep.
 *
 * The world to re-read grows with the cluster: with `maxShare`, full syncs take at most that
 * share of the time, the period stretching (up to `MAX_STRETCH` times) after a long one, so
 * that re-reading a large world does not become all a process does.
 */
import type { Clock, Timer } from "./clock.ts";

const TIMER_SLACK_MS = 2;
/** The longest a period stretches (see `maxShare`), as a multiple of `periodMs`. */
export const MAX_STRETCH = 6;
/**
 * The share of the time the agent's periodic re-reads (full syncs, traffic reads) each take at
 * most by default (`--periodic-max-share`): at 10,000 policies a node's full read took 0.5–2.4 s
 * and its counters 2–4 s, every 10 s.
 */
export const PERIODIC_MAX_SHARE = 0.05;

export interface SyncRequest {
  /** Re-read the world: the period elapsed, nothing was synced yet, or the last sync failed. */
  readonly full: boolean;
}

export interface SyncLoopOptions {
  readonly sync: (request: SyncRequest) => Promise<void>;
  readonly clock: Clock;
  /** Time between the starts of two full syncs. @default 10000 */
  readonly periodMs?: number;
  /**
   * Once `burst` syncs started close together, the shortest time between the starts of two
   * syncs (one token comes back each interval). @default 0
   */
  readonly minIntervalMs?: number;
  /** Syncs that may start back to back before `minIntervalMs` applies. @default 1 */
  readonly burst?: number;
  /** First retry delay after a failure; doubles per consecutive failure. @default 1000 */
  readonly retryMs?: number;
  /** @default periodMs */
  readonly maxRetryMs?: number;
  /**
   * The largest share of the time full syncs may take: after one that took `d`, the next full
   * sync starts `max(periodMs, d / maxShare)` after it started, at most `MAX_STRETCH` periods.
   * @default 1 (the period never stretches)
   */
  readonly maxShare?: number;
  readonly onError?: (error: unknown) => void;
}

export class SyncLoop {
  readonly #sync: SyncLoopOptions["sync"];
  readonly #clock: Clock;
  readonly #periodMs: number;
  readonly #maxShare: number;
  /** The time from the start of the last full sync to the next one (periodMs, or stretched). */
  #fullEveryMs: number;
  readonly #minIntervalMs: number;
  readonly #burst: number;
  /** Sync starts allowed now, as of `#tokensAt` (refilled one per `minIntervalMs`). */
  #tokens: number;
  #tokensAt = Number.NEGATIVE_INFINITY;
  readonly #retryMs: number;
  readonly #maxRetryMs: number;
  readonly #onError: SyncLoopOptions["onError"];
  #running = false;
  #pending = false;
  /** A pending request that does not wait for a token (see trigger). */
  #urgent = false;
  #needFull = true;
  #stopped = true;
  #timer: Timer | undefined;
  #dueAt = Number.POSITIVE_INFINITY;
  #lastFullStart = Number.NEGATIVE_INFINITY;
  #retryAt = Number.NEGATIVE_INFINITY;
  #failures = 0;
  #idle: (() => void)[] = [];

  constructor(options: SyncLoopOptions) {
    this.#sync = options.sync;
    this.#clock = options.clock;
    this.#periodMs = options.periodMs ?? 10_000;
    this.#maxShare = options.maxShare ?? 1;
    this.#fullEveryMs = this.#periodMs;
    this.#minIntervalMs = options.minIntervalMs ?? 0;
    this.#burst = Math.max(1, options.burst ?? 1);
    this.#tokens = this.#burst;
    this.#retryMs = options.retryMs ?? 1000;
    this.#maxRetryMs = options.maxRetryMs ?? this.#periodMs;
    this.#onError = options.onError;
  }

  start(): void {
    this.#stopped = false;
    this.#needFull = true;
    this.#pending = true;
    this.#reschedule();
  }

  stop(): void {
    this.#stopped = true;
    this.#pending = false;
    this.#urgent = false;
    this.#timer?.cancel();
    this.#timer = undefined;
    this.#dueAt = Number.POSITIVE_INFINITY;
    for (const r of this.#idle.splice(0)) r();
  }

  /**
   * Asks for a partial sync soon; many requests before it starts make one sync. An `urgent` one
   * starts as soon as no sync runs, whatever the tokens (it still uses one).
   */
  trigger(options?: { readonly urgent?: boolean }): void {
    if (this.#stopped) return;
    this.#pending = true;
    if (options?.urgent === true) this.#urgent = true;
    if (!this.#running) this.#reschedule();
  }

  /** Asks for a full sync soon (e.g. after the world was found to differ from what we hold). */
  requestFull(): void {
    this.#needFull = true;
    this.trigger();
  }

  /** The time between two full syncs now: `periodMs`, or longer after a long one (`maxShare`). */
  get fullEveryMs(): number {
    return this.#fullEveryMs;
  }

  /** Consecutive failed syncs (0 after a success). */
  get failures(): number {
    return this.#failures;
  }

  /** Resolves when no sync is running or pending. */
  idle(): Promise<void> {
    if (!this.#running && !this.#pending) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }

  /** When the next sync may start: the earlier of a pending request and the full-sync deadline. */
  #nextAt(now: number): number {
    const fullAt = this.#needFull ? this.#retryAt : this.#lastFullStart + this.#fullEveryMs;
    if (!this.#pending) return Math.max(fullAt, this.#retryAt);
    const tokens = this.#urgent ? this.#burst : this.#available(now);
    const tokenAt = tokens >= 1 ? now : now + (1 - tokens) * this.#minIntervalMs;
    const partialAt = Math.max(tokenAt, this.#retryAt);
    return Math.min(partialAt, Math.max(fullAt, this.#retryAt));
  }

  /** The tokens there are at `now`. */
  #available(now: number): number {
    if (this.#minIntervalMs <= 0) return this.#burst;
    return Math.min(this.#burst, this.#tokens + (now - this.#tokensAt) / this.#minIntervalMs);
  }

  #reschedule(): void {
    if (this.#stopped) return;
    const now = this.#clock.now();
    const at = Math.max(now, this.#nextAt(now));
    if (this.#timer !== undefined && this.#dueAt === at) return;
    this.#timer?.cancel();
    this.#dueAt = at;
    this.#timer = this.#clock.after(at - now, () => {
      this.#timer = undefined;
      this.#dueAt = Number.POSITIVE_INFINITY;
      void this.#run();
    });
  }

  async #run(): Promise<void> {
    if (this.#stopped || this.#running) return;
    const started = this.#clock.now();
    // Timers fire on libuv's millisecond loop clock, which can run up to a millisecond behind
    // performance.now(): a timer set for the full sync's deadline may see "not yet" here.
    const full =
      this.#needFull || started >= this.#lastFullStart + this.#fullEveryMs - TIMER_SLACK_MS;
    this.#running = true;
    this.#pending = false;
    this.#urgent = false;
    this.#tokens = Math.max(0, this.#available(started) - 1);
    this.#tokensAt = started;
    try {
      await this.#sync({ full });
      this.#failures = 0;
      this.#retryAt = Number.NEGATIVE_INFINITY;
      if (full) {
        this.#needFull = false;
        this.#lastFullStart = started;
        const took = this.#clock.now() - started;
        this.#fullEveryMs = Math.min(
          this.#periodMs * MAX_STRETCH,
          Math.max(this.#periodMs, took / this.#maxShare),
        );
      }
    } catch (e) {
      this.#failures++;
      this.#needFull = true;
      const delay = Math.min(this.#maxRetryMs, this.#retryMs * 2 ** (this.#failures - 1));
      this.#retryAt = this.#clock.now() + delay;
      this.#onError?.(e);
    } finally {
      this.#running = false;
    }
    if (this.#stopped) return;
    this.#reschedule();
    if (!this.#pending) for (const r of this.#idle.splice(0)) r();
  }
}
