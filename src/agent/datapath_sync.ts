/**
 * Keeps a node's kernel equal to its plan, in one serialized loop (src/lib/sync_loop.ts):
 *
 *  - events ask for a *partial* sync: the plan is recomputed for the keys that changed and
 *    diffed against what the last sync applied; a plan identical to the applied one costs no
 *    kernel command at all;
 *  - a *full* sync re-reads the kernel every `periodMs` since the last one, whatever the event
 *    rate, and at once after a failure: it repairs drift. A full sync of an unchanged plan that
 *    still changes the kernel repaired something someone else removed: that is logged with what
 *    was changed, and counted.
 */

import { type NodePlan, planToJSON } from "../engine/plan.ts";
import {
  type Datapath,
  DatapathError,
  type KernelState,
  type SyncReport,
} from "../kernel/datapath.ts";
import type { Clock } from "../lib/clock.ts";
import type { Logger } from "../lib/log.ts";
import type { DatapathMetrics } from "../lib/metrics.ts";
import { PERIODIC_MAX_SHARE, SyncLoop } from "../lib/sync_loop.ts";

/**
 * Syncs that start back to back before the minimum interval applies: a pod's ADD, its status and
 * its policy's slice, or a failover's takeover and the statuses that follow it, each go to the
 * kernel at once; a stream of policy writes is taken a batch per interval.
 */
const SYNC_BURST = 3;

export interface DatapathSyncOptions {
  readonly datapath: Datapath;
  /**
   * Computes the plan from the latest inputs, at the start of every sync. On a full sync `state`
   * is the kernel as just read (host facts come from it); on a partial one it is undefined.
   */
  readonly plan: (state: KernelState | undefined) => NodePlan;
  readonly clock: Clock;
  readonly log: Logger;
  readonly metrics: DatapathMetrics;
  /** @default 10000 */
  readonly periodMs?: number;
  /**
   * While events keep coming, at most one partial sync per this interval, after a burst of
   * `SYNC_BURST` at once (see SyncLoop). @default 0
   */
  readonly minIntervalMs?: number;
  /** The largest share of the time full syncs may take. @default PERIODIC_MAX_SHARE */
  readonly maxShare?: number | undefined;
  /** Called after every successful sync with the plan the kernel now holds. */
  readonly onSynced?: (plan: NodePlan, report: SyncReport | undefined) => void;
}

export class DatapathSync {
  readonly #o: DatapathSyncOptions;
  readonly #loop: SyncLoop;
  /** The plan of the last successful sync: the kernel held it then. */
  #applied: NodePlan | undefined;
  #lastReport: SyncReport | undefined;
  #lastFullAt: number | undefined;
  #repairs = 0;
  /** When the oldest event not yet in the kernel arrived. */
  #pendingSince: number | undefined;
  #lastLatencyMs: number | undefined;
  /** Time the last sync spent planning (the rest is reading and writing the kernel). */
  lastPlanMs = 0;
  /** Time the first event of the last sync waited for it to start. */
  lastWaitMs = 0;
  /** Triggers so far, and how many of them the kernel holds (-1: no sync succeeded yet). */
  #requested = 0;
  #appliedUpTo = -1;
  #waiters: { readonly generation: number; readonly resolve: () => void }[] = [];

  constructor(options: DatapathSyncOptions) {
    this.#o = options;
    this.#loop = new SyncLoop({
      clock: options.clock,
      periodMs: options.periodMs ?? 10_000,
      minIntervalMs: options.minIntervalMs ?? 0,
      maxShare: options.maxShare ?? PERIODIC_MAX_SHARE,
      burst: SYNC_BURST,
      retryMs: 1000,
      sync: ({ full }) => this.#sync(full),
      onError: (e) => {
        options.log.error(
          {
            err: e instanceof Error ? e.message : String(e),
            step: e instanceof DatapathError ? e.step : undefined,
            input: e instanceof DatapathError ? e.input : undefined,
          },
          "datapath sync failed; retrying with a full sync",
        );
      },
    });
  }

  start(): void {
    this.#loop.start();
  }
  stop(): void {
    this.#loop.stop();
  }
  /**
   * Something the plan depends on changed. Returns the change's generation: `applied(g)`
   * resolves once a sync that started after it succeeded. `urgent`: a change someone waits for
   * (a pod's CNI ADD, a failover the data plane decided), synced as soon as no sync runs,
   * outside the minimum interval that batches a stream of API changes.
   */
  trigger(urgent = false): number {
    this.#pendingSince ??= this.#o.clock.now();
    this.#loop.trigger({ urgent });
    return ++this.#requested;
  }
  /** The generation of the last trigger (0 before any). */
  get requested(): number {
    return this.#requested;
  }
  /**
   * Resolves once the kernel holds every change up to `generation` (and, for 0, once the first
   * sync succeeded). A failed sync resolves nothing: the retry does.
   */
  applied(generation: number): Promise<void> {
    if (this.#appliedUpTo >= generation) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push({ generation, resolve }));
  }
  idle(): Promise<void> {
    return this.#loop.idle();
  }
  get repairs(): number {
    return this.#repairs;
  }
  get lastReport(): SyncReport | undefined {
    return this.#lastReport;
  }
  /** Clock time the last full sync (the one that re-reads the kernel) succeeded. */
  get lastFullAt(): number | undefined {
    return this.#lastFullAt;
  }
  /** From the first event of the last sync to the kernel holding it. */
  get lastLatencyMs(): number | undefined {
    return this.#lastLatencyMs;
  }

  async #sync(full: boolean): Promise<void> {
    // The plan below takes every change triggered so far.
    const generation = this.#requested;
    const since = this.#pendingSince;
    this.#pendingSince = undefined;
    this.lastWaitMs = since === undefined ? 0 : this.#o.clock.now() - since;
    const m = this.#o.metrics;
    const kind = full ? "full" : "partial";
    try {
      const readStart = performance.now();
      const state = full ? await this.#o.datapath.read() : undefined;
      const planStart = performance.now();
      const plan = this.#o.plan(state);
      this.lastPlanMs = performance.now() - planStart;
      if (!full && plan === this.#applied) {
        // Nothing this node carries changed: no kernel work.
        this.#observe(since);
        this.#held(generation);
        return;
      }
      const report = await this.#o.datapath.sync(
        plan,
        state !== undefined ? { state } : { partial: true },
      );
      m.syncs.inc({ kind, result: "ok" });
      m.duration.observe(report.durationMs / 1000);
      m.changes.inc(report.changes);
      m.lastSuccess.setToCurrentTime();
      if (full) this.#lastFullAt = this.#o.clock.now();
      // Only a sync that re-read the kernel can find drift (a partial one diffs against what the
      // last sync applied); it is drift when the plan is the one the kernel held already.
      const drift =
        report.changes > 0 &&
        full &&
        this.#applied !== undefined &&
        (plan === this.#applied || planToJSON(plan) === planToJSON(this.#applied));
      if (drift) {
        this.#repairs += report.changes;
        m.repairs.inc(report.changes);
        this.#o.log.warn(
          { repaired: report.detail, changes: report.changes },
          "repaired datapath drift: kernel objects were changed behind the agent's back",
        );
      } else if (report.changes > 0) {
        this.#o.log.info(
          {
            changes: report.changes,
            detail: report.detail,
            ms: Math.round(report.durationMs),
            planMs: Math.round(this.lastPlanMs),
            ...(full ? { readMs: Math.round(planStart - readStart) } : {}),
            waitMs: Math.round(this.lastWaitMs),
          },
          "datapath updated",
        );
      }
      if (plan.errors.join("\n") !== (this.#applied?.errors ?? []).join("\n"))
        for (const e of plan.errors)
          this.#o.log.error({ problem: e }, "part of the plan cannot be programmed");
      this.#applied = plan;
      this.#lastReport = report;
      this.#observe(since);
      this.#held(generation);
      this.#o.onSynced?.(plan, report);
    } catch (e) {
      m.syncs.inc({ kind, result: "error" });
      // The events are still not in the kernel.
      if (since !== undefined) this.#pendingSince = Math.min(since, this.#pendingSince ?? since);
      throw e;
    }
  }

  #held(generation: number): void {
    this.#appliedUpTo = Math.max(this.#appliedUpTo, generation);
    if (this.#waiters.length === 0) return;
    const done = this.#waiters.filter((w) => w.generation <= this.#appliedUpTo);
    this.#waiters = this.#waiters.filter((w) => w.generation > this.#appliedUpTo);
    for (const w of done) w.resolve();
  }

  #observe(since: number | undefined): void {
    if (since === undefined) return;
    this.#lastLatencyMs = this.#o.clock.now() - since;
    this.#o.metrics.eventLatency.observe(this.#lastLatencyMs / 1000);
  }
}
