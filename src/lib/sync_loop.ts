/**
 * One serialized sync loop (kube-proxy's BoundedFrequencyRunner, simplified): requests are
 * coalesced, one sync runs at a time, a sync runs at least every `periodMs` even when nothing
 * changed (that is what repairs drift), and a failed sync is retried after `retryMs`. Time comes
 * from an injected clock so that tests never sleep.
 */
import type { Clock, Timer } from "./clock.ts";

export interface SyncLoopOptions {
  /** `periodic`: nothing asked for this sync, the period elapsed (a full check is due). */
  readonly sync: (reason: { readonly periodic: boolean }) => Promise<void>;
  readonly clock: Clock;
  /** @default 10000 */
  readonly periodMs?: number;
  /** Shortest gap between the end of one sync and the start of the next. @default 0 */
  readonly minIntervalMs?: number;
  /** @default 1000 */
  readonly retryMs?: number;
  readonly onError?: (error: unknown) => void;
}

export class SyncLoop {
  readonly #o: Required<Omit<SyncLoopOptions, "onError">> & Pick<SyncLoopOptions, "onError">;
  #running = false;
  #pending = false;
  #stopped = true;
  #timer: Timer | undefined;
  #dueAt = Number.POSITIVE_INFINITY;
  #lastEnd = Number.NEGATIVE_INFINITY;
  #idle: (() => void)[] = [];

  constructor(options: SyncLoopOptions) {
    this.#o = { periodMs: 10_000, minIntervalMs: 0, retryMs: 1000, ...options };
  }

  start(): void {
    this.#stopped = false;
    this.trigger();
  }

  stop(): void {
    this.#stopped = true;
    this.#pending = false;
    this.#timer?.cancel();
    this.#timer = undefined;
    for (const r of this.#idle.splice(0)) r();
  }

  /** Asks for a sync soon; many requests before it starts make one sync. */
  trigger(): void {
    if (this.#stopped) return;
    this.#pending = true;
    if (this.#running) return;
    this.#schedule(Math.max(0, this.#lastEnd + this.#o.minIntervalMs - this.#o.clock.now()));
  }

  /** Resolves when no sync is running or pending. */
  idle(): Promise<void> {
    if (!this.#running && !this.#pending) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }

  #schedule(delay: number): void {
    const at = this.#o.clock.now() + delay;
    if (this.#timer !== undefined && this.#dueAt <= at) return;
    this.#timer?.cancel();
    this.#dueAt = at;
    this.#timer = this.#o.clock.after(delay, () => {
      this.#timer = undefined;
      this.#dueAt = Number.POSITIVE_INFINITY;
      void this.#run();
    });
  }

  async #run(): Promise<void> {
    if (this.#stopped || this.#running) return;
    const periodic = !this.#pending;
    this.#running = true;
    this.#pending = false;
    let next = this.#o.periodMs;
    try {
      await this.#o.sync({ periodic });
    } catch (e) {
      next = this.#o.retryMs;
      this.#o.onError?.(e);
    } finally {
      this.#running = false;
      this.#lastEnd = this.#o.clock.now();
    }
    if (this.#stopped) return;
    if (this.#pending) this.#schedule(Math.min(next, this.#o.minIntervalMs));
    else this.#schedule(next);
    if (!this.#pending) for (const r of this.#idle.splice(0)) r();
  }
}
