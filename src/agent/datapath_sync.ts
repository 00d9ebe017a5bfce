/**
 * Keeps a node's kernel equal to its plan: one serialized loop that syncs on change (coalesced)
 * and every period, and tells desired changes apart from drift. A sync of an unchanged plan that
 * still changes the kernel repaired something someone else removed: that is logged with what
 * was changed, and counted.
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
import { SyncLoop } from "../lib/sync_loop.ts";

export interface DatapathSyncOptions {
  readonly datapath: Datapath;
  /**
   * Computes the plan from the latest inputs, at the start of every sync. On a full sync `state`
   * is the kernel as just read (host facts come from it); on an event-driven one it is undefined.
   */
  readonly plan: (state: KernelState | undefined) => NodePlan;
  readonly clock: Clock;
  readonly log: Logger;
  readonly metrics: DatapathMetrics;
  /** @default 10000 */
  readonly periodMs?: number;
  /** Called after every successful sync with the plan the kernel now holds. */
  readonly onSynced?: (plan: NodePlan, report: SyncReport) => void;
}

export class DatapathSync {
  readonly #o: DatapathSyncOptions;
  readonly #loop: SyncLoop;
  /** The plan of the last successful sync: the kernel held it then. */
  #applied: NodePlan | undefined;
  #lastReport: SyncReport | undefined;
  #repairs = 0;
  /** The first sync and any after a failure read the kernel. */
  #needFull = true;

  constructor(options: DatapathSyncOptions) {
    this.#o = options;
    this.#loop = new SyncLoop({
      clock: options.clock,
      periodMs: options.periodMs ?? 10_000,
      retryMs: 1000,
      // Events: diff against what was applied (fast); the period: re-read the kernel (repairs
      // drift). After a failure the datapath has no mirror and reads the kernel anyway.
      sync: ({ periodic }) => this.#sync(!periodic && !this.#needFull),
      onError: (e) => {
        this.#needFull = true;
        options.metrics.syncs.inc({ result: "error" });
        options.log.error(
          {
            err: e instanceof Error ? e.message : String(e),
            step: e instanceof DatapathError ? e.step : undefined,
            input: e instanceof DatapathError ? e.input : undefined,
          },
          "datapath sync failed; retrying",
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
  /** Something the plan depends on changed. */
  trigger(): void {
    this.#loop.trigger();
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

  async #sync(partial: boolean): Promise<void> {
    const state = partial ? undefined : await this.#o.datapath.read();
    const plan = this.#o.plan(state);
    const report = await this.#o.datapath.sync(
      plan,
      state === undefined ? { partial: true } : { state },
    );
    const m = this.#o.metrics;
    m.syncs.inc({ result: "ok" });
    m.duration.observe(report.durationMs / 1000);
    m.changes.inc(report.changes);
    m.lastSuccess.setToCurrentTime();
    // Only a sync that re-read the kernel can find drift (a partial one diffs against what the
    // last sync applied); it is drift when the plan is the one the kernel held already. The plans
    // are compared here, once a period, rather than fingerprinted on every event.
    const drift =
      report.changes > 0 &&
      state !== undefined &&
      this.#applied !== undefined &&
      planToJSON(plan) === planToJSON(this.#applied);
    if (drift) {
      this.#repairs += report.changes;
      m.repairs.inc(report.changes);
      this.#o.log.warn(
        { repaired: report.detail, changes: report.changes },
        "repaired datapath drift: kernel objects were changed behind the agent's back",
      );
    } else if (report.changes > 0) {
      this.#o.log.info(
        { changes: report.changes, detail: report.detail, ms: Math.round(report.durationMs) },
        "datapath updated",
      );
    }
    for (const e of plan.errors)
      this.#o.log.error({ problem: e }, "part of the plan cannot be programmed");
    this.#applied = plan;
    this.#lastReport = report;
    this.#needFull = false;
    this.#o.onSynced?.(plan, report);
  }
}
