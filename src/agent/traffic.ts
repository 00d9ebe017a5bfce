/**
 * What this node's datapath carries, per policy and per egress IP: packets and bytes from the
 * rules' counters, SNATed connections and source ports per destination from conntrack, and the
 * destinations toward which an egress IP is running out of source ports.
 *
 * Nothing here runs on the sync path. The kernel is read by a `TrafficReader`: in the agent a
 * worker thread (src/agent/traffic_worker.ts: the ~15 MB a table of 100,000 connections prints
 * is parsed there, measured by bench/traffic.ts), in tests the inline reader below. The counters
 * are read when Prometheus (or `sallyport top`) scrapes, at most once per `countersMaxAgeMs`, and a
 * scrape waits at most `countersWaitMs` for them: a read that takes longer (a busy node, tens of
 * thousands of elements) goes on, and meanwhile scrapes are answered from the last read; the
 * connection tracking table every `periodMs`, and only on nodes whose rules SNAT to an egress IP.
 *
 * The iptables rules name their policy (their comment); the nftables class maps' elements do
 * not: the collector asks the plan the kernel holds which policy decided each element
 * (`nftPolicyOf`, with the plan `syncedPlanOf` keeps), on the agent's thread, where the plan is.
 *
 * Saturation is reported with hysteresis: a destination enters the list at `saturatedAt` of the
 * source ports and leaves it below `clearedBelow`, and an entry keeps the percentage it entered
 * with, so that the list (and the EgressNode status it is written to) changes only when a
 * destination crosses a threshold, never per measurement: a steady cluster writes nothing.
 */

import type { ClassEntry } from "../engine/classify.ts";
import type { NftPlan, NodePlan } from "../engine/plan.ts";
import {
  KERNEL_SNAT_PORTS,
  listSnatConnections,
  type PortRange,
  type SnatEgress,
  SnatTally,
  summarizeSnat,
} from "../kernel/conntrack.ts";
import {
  type CounterKind,
  type CounterSource,
  IptablesCounters,
  NftCounters,
  type NftElement,
  type RuleCounter,
} from "../kernel/counters.ts";
import type { Datapath } from "../kernel/datapath.ts";
import type { Runner } from "../kernel/runner.ts";
import type { Clock, Timer } from "../lib/clock.ts";
import type { Family } from "../lib/ip.ts";
import type { Logger } from "../lib/log.ts";
import { PERIODIC_MAX_SHARE, SyncLoop } from "../lib/sync_loop.ts";
import { entryKey, entryValue } from "../render/nftables.ts";

/** Which counter source to build (serializable: a worker thread builds it from this). */
export type CounterSourceConfig =
  | {
      readonly kind: "iptables";
      readonly backend: "nft" | "legacy";
      readonly families: readonly Family[];
    }
  | { readonly kind: "nftables"; readonly families: readonly Family[] };

export interface TrafficReaderConfig {
  readonly counters: CounterSourceConfig;
  /** The source ports SNAT uses when its rule names none. @default KERNEL_SNAT_PORTS */
  readonly snatPortRange?: PortRange;
  /** Destinations named per egress IP; the rest are one `other` aggregate. @default 10 */
  readonly topDestinations?: number;
}

export function counterSourceFor(runner: Runner, config: CounterSourceConfig): CounterSource {
  switch (config.kind) {
    case "iptables":
      return new IptablesCounters(runner, config);
    case "nftables":
      return new NftCounters(runner, config);
  }
}

/**
 * The plan the kernel holds: `datapath.sync` wrapped to keep each plan it applied. (The agent's
 * DatapathSync keeps the plan it applied to itself; the nftables counters need it to name the
 * policy of each class map element.) A failed sync keeps the previous plan: the elements it
 * wrote are then unknown for a while, the others still named.
 */
export function syncedPlanOf(datapath: Datapath): () => NodePlan | undefined {
  let held: NodePlan | undefined;
  const sync = datapath.sync.bind(datapath);
  datapath.sync = async (plan, options) => {
    const report = await sync(plan, options);
    held = plan;
    return report;
  };
  return () => held;
}

/**
 * Which policy decided an nftables class map element, from a plan (`plan.nft.classes[family][i]
 * .entries[j].policy`, rendered to elements as src/render/nftables.ts renders them): undefined
 * when the plan has no such element with that verdict (not synced yet, or synced away). Each
 * class's entries are indexed once (the planner keeps unchanged ones by identity).
 */
export function nftPolicyOf(
  plan: () => NodePlan | undefined,
): (element: NftElement) => string | undefined {
  let named: { readonly nft: NftPlan; readonly classes: Map<string, NftClassIndex> } | undefined;
  const indexes = new WeakMap<readonly ClassEntry[], NftClassIndex>();
  return (element) => {
    const nft = plan()?.nft;
    if (nft === undefined) return undefined;
    if (named?.nft !== nft) {
      const classes = new Map<string, NftClassIndex>();
      for (const family of [4, 6] as const) {
        const snat = nft.snat[family] ?? [];
        for (const c of nft.classes[family] ?? []) {
          let index = indexes.get(c.entries);
          if (index === undefined || index.snat !== snat.join()) {
            index = {
              snat: snat.join(),
              byKey: new Map(
                c.entries.map((e) => [
                  entryKey(e),
                  { verdict: entryValue(e, family, snat), policy: e.policy },
                ]),
              ),
            };
            indexes.set(c.entries, index);
          }
          classes.set(c.name, index);
        }
      }
      named = { nft, classes };
    }
    const entry = named.classes.get(element.map)?.byKey.get(element.key);
    return entry?.verdict === element.verdict ? entry.policy : undefined;
  };
}

interface NftClassIndex {
  /** The egress IPs the verdicts were rendered with (`snatF-N` is the N-th). */
  readonly snat: string;
  readonly byKey: ReadonlyMap<string, { readonly verdict: string; readonly policy: string }>;
}

export interface TrafficReading {
  readonly counters: readonly RuleCounter[];
  readonly countersMs: number;
  /** Read when asked for and some rule SNATs to an egress IP on this node. */
  readonly snat?: {
    readonly egress: readonly SnatEgress[];
    /** Lines conntrack listed (all SNATed connections of the node, ours or not). */
    readonly entries: number;
    readonly ms: number;
  };
  /** Why conntrack could not be read (the counters are still good). */
  readonly snatError?: string;
}

export interface TrafficReader {
  read(options: { readonly conntrack: boolean }): Promise<TrafficReading>;
  close(): void;
}

/** The egress IPs this node's rules SNAT to, each with the port range its rule names. */
function snatTargets(
  counters: readonly RuleCounter[],
  fallback: PortRange,
): Map<string, PortRange> {
  const out = new Map<string, PortRange>();
  for (const c of counters) {
    if (c.kind !== "snat" && c.kind !== "snat_new") continue;
    for (const ip of c.egressIP === undefined ? (c.egressIPs ?? []) : [c.egressIP])
      if (!out.has(ip) || c.ports !== undefined) out.set(ip, c.ports ?? fallback);
  }
  return out;
}

/** Reads the kernel on the calling thread: for tests, benchmarks and the worker itself. */
export class InlineTrafficReader implements TrafficReader {
  readonly #runner: Runner;
  readonly #counters: CounterSource;
  readonly #range: PortRange;
  readonly #top: number;

  constructor(runner: Runner, config: TrafficReaderConfig, counters?: CounterSource) {
    this.#runner = runner;
    this.#counters = counters ?? counterSourceFor(runner, config.counters);
    this.#range = config.snatPortRange ?? KERNEL_SNAT_PORTS;
    this.#top = config.topDestinations ?? 10;
  }

  async read(options: { readonly conntrack: boolean }): Promise<TrafficReading> {
    const started = performance.now();
    const counters = await this.#counters.read();
    const countersMs = performance.now() - started;
    const targets = snatTargets(counters, this.#range);
    if (!options.conntrack || targets.size === 0) return { counters, countersMs };
    const t0 = performance.now();
    try {
      const text = await listSnatConnections(this.#runner);
      const tally = new SnatTally(targets.keys());
      tally.add(text);
      return {
        counters,
        countersMs,
        snat: {
          egress: summarizeSnat(tally.result(), targets, this.#top),
          entries: tally.lines,
          ms: performance.now() - t0,
        },
      };
    } catch (e) {
      return { counters, countersMs, snatError: (e as Error).message };
    }
  }

  close(): void {}
}

/** A destination toward which an egress IP uses at least the threshold of its source ports. */
export interface SnatSaturation {
  readonly egressIP: string;
  readonly destination: string;
  /** 0 for ICMP. */
  readonly port: number;
  readonly protocol: string;
  /** The percentage when it crossed the threshold (whole percent, rounded down). */
  readonly percent: number;
}

/** At most this many saturated destinations are reported (the highest). */
export const MAX_REPORTED_SATURATIONS = 16;

export type TrafficDirection = "steered" | "snat" | "dropped";

/** One series of the policy counters, monotonic while the agent runs. */
export interface PolicyTraffic {
  readonly policy: string;
  /** "" when unknown (a policy without an egress IP of that family fails closed). */
  readonly egressIP: string;
  /** `connections`: new connections SNATed (the nat rule's first packets). */
  readonly kind: TrafficDirection | "connections";
  readonly packets: number;
  readonly bytes: number;
}

interface RuleState {
  readonly policy: string;
  readonly series: string;
  packets: number;
  bytes: number;
  /** What the rule counted before its counter was last reset. */
  basePackets: number;
  baseBytes: number;
}

interface SeriesState {
  readonly policy: string;
  readonly egressIP: string;
  /** `held`: a rule whose packets the nat rules count here; tracked, never reported. */
  readonly kind: PolicyTraffic["kind"] | "held";
  /** What rules of this series that no longer exist had counted. */
  retiredPackets: number;
  retiredBytes: number;
}

/** Read-side instruments the collector feeds (src/lib/metrics.ts trafficMetrics). */
export interface TrafficReadMetrics {
  readonly readDuration: { observe(labels: { source: string }, seconds: number): void };
  readonly readErrors: { inc(labels: { source: string }): void };
}

export interface TrafficCollectorOptions {
  readonly reader: TrafficReader;
  readonly clock: Clock;
  readonly log: Logger;
  /** Time between reads of the connection tracking table. @default 10000 */
  readonly periodMs?: number;
  /** The largest share of the time those reads may take. @default PERIODIC_MAX_SHARE */
  readonly maxShare?: number;
  /** Counters read for one scrape serve the next ones this long. @default 1000 */
  readonly countersMaxAgeMs?: number;
  /**
   * How long a scrape waits for a fresh read of the counters before it is answered from the last
   * one (never when there is none yet). @default 2000
   */
  readonly countersWaitMs?: number;
  /** Fraction of the source ports at which a destination is reported saturated. @default 0.8 */
  readonly saturatedAt?: number;
  /** ...and below which it no longer is. @default 0.7 */
  readonly clearedBelow?: number;
  /** The egress IP of a policy's family, for counters whose rule names none (steered). */
  readonly egressIPOf?: (policy: string, family: Family) => string | undefined;
  /**
   * The policy that decided an nftables class map element (`nftPolicyOf`): counters with an
   * `element` name none themselves.
   */
  readonly policyOf?: (element: NftElement) => string | undefined;
  /** Called when the list of saturated destinations changes (not per measurement). */
  readonly onSaturation?: (list: readonly SnatSaturation[]) => void;
  readonly metrics?: TrafficReadMetrics;
}

function kindOf(kind: CounterKind): SeriesState["kind"] {
  return kind === "snat_new" ? "connections" : kind;
}

function saturationKey(s: {
  egressIP: string;
  destination: string;
  port: number;
  protocol: string;
}) {
  return `${s.egressIP} ${s.destination} ${s.port} ${s.protocol}`;
}

export class TrafficCollector {
  readonly #o: TrafficCollectorOptions;
  readonly #loop: SyncLoop;
  readonly #rules = new Map<string, RuleState>();
  readonly #series = new Map<string, SeriesState>();
  #countersAt = Number.NEGATIVE_INFINITY;
  #countersRead: Promise<void> | undefined;
  #egress: readonly SnatEgress[] = [];
  #entries = 0;
  #saturated = new Map<string, SnatSaturation>();
  #lastError: string | undefined;

  constructor(options: TrafficCollectorOptions) {
    this.#o = options;
    this.#loop = new SyncLoop({
      clock: options.clock,
      periodMs: options.periodMs ?? 10_000,
      maxShare: options.maxShare ?? PERIODIC_MAX_SHARE,
      retryMs: 1000,
      sync: () => this.collect(),
      onError: (e) => this.#failed("counters", e),
    });
  }

  start(): void {
    this.#loop.start();
  }

  stop(): void {
    this.#loop.stop();
    this.#o.reader.close();
  }

  /** One read of counters and conntrack (the loop's work; tests call it directly). */
  async collect(): Promise<void> {
    const reading = await this.#o.reader.read({ conntrack: true });
    this.#takeCounters(reading);
    const metrics = this.#o.metrics;
    if (reading.snat !== undefined) {
      metrics?.readDuration.observe({ source: "conntrack" }, reading.snat.ms / 1000);
      this.#egress = reading.snat.egress;
      this.#entries = reading.snat.entries;
      this.#lastError = undefined;
      this.#updateSaturation();
    } else if (reading.snatError !== undefined) {
      this.#failed("conntrack", new Error(reading.snatError));
    } else {
      // No rule SNATs here (any more): no egress IP, nothing saturated.
      this.#egress = [];
      this.#entries = 0;
      this.#updateSaturation();
    }
  }

  /** The policy counters, read again if the last read is older than countersMaxAgeMs. */
  async policyTraffic(): Promise<PolicyTraffic[]> {
    const maxAge = this.#o.countersMaxAgeMs ?? 1000;
    if (this.#o.clock.now() - this.#countersAt > maxAge) {
      this.#countersRead ??= this.#o.reader
        .read({ conntrack: false })
        .then((r) => this.#takeCounters(r))
        .catch((e) => this.#failed("counters", e))
        .finally(() => {
          this.#countersRead = undefined;
        });
      await this.#readWithin(this.#countersRead);
    }
    const totals = new Map<string, { packets: number; bytes: number }>();
    for (const [key, s] of this.#series)
      totals.set(key, { packets: s.retiredPackets, bytes: s.retiredBytes });
    for (const r of this.#rules.values()) {
      const t = totals.get(r.series)!;
      t.packets += r.basePackets + r.packets;
      t.bytes += r.baseBytes + r.bytes;
    }
    const out: PolicyTraffic[] = [];
    for (const [key, s] of this.#series)
      if (s.kind !== "held")
        out.push({ policy: s.policy, egressIP: s.egressIP, kind: s.kind, ...totals.get(key)! });
    return out;
  }

  /** Waits for `read`, at most `countersWaitMs` once some read has succeeded. */
  async #readWithin(read: Promise<void>): Promise<void> {
    if (this.#countersAt === Number.NEGATIVE_INFINITY) return read;
    let timer: Timer | undefined;
    const waited = new Promise<void>((resolve) => {
      timer = this.#o.clock.after(this.#o.countersWaitMs ?? 2000, resolve);
    });
    await Promise.race([read, waited]);
    timer?.cancel();
  }

  /** Per egress IP this node SNATs to: connections and ports by destination (last read). */
  get snatEgress(): readonly SnatEgress[] {
    return this.#egress;
  }

  /** SNATed connections the last conntrack read listed (ours and other NAT of the node). */
  get conntrackEntries(): number {
    return this.#entries;
  }

  /**
   * Starts from the list a previous agent reported (its EgressNode status): those destinations
   * stay reported, with the percentage they entered with, until they fall below clearedBelow.
   * A restart then writes nothing and sets no condition twice.
   */
  adopt(list: readonly SnatSaturation[]): void {
    this.#saturated = new Map(list.map((s) => [saturationKey(s), { ...s }]));
  }

  get saturated(): readonly SnatSaturation[] {
    return this.#list();
  }

  #takeCounters(reading: TrafficReading): void {
    this.#countersAt = this.#o.clock.now();
    this.#o.metrics?.readDuration.observe({ source: "counters" }, reading.countersMs / 1000);
    const seen = new Set<string>();
    const live = new Set<string>();
    for (const c of reading.counters) {
      const known = this.#rules.get(c.id);
      // nftables: the plan the kernel holds names the element's policy. An element it no longer
      // names keeps the policy it had (the kernel still holds it: the sync that rewrites it has
      // not finished, or failed); one it does not name yet waits for a later read, which then
      // takes all it counted since it was made.
      const policy =
        c.element === undefined ? c.policy : (this.#o.policyOf?.(c.element) ?? known?.policy);
      if (policy === undefined) continue;
      const egressIP = c.egressIP ?? this.#o.egressIPOf?.(policy, c.family) ?? "";
      const kind = kindOf(c.kind);
      const series = `${policy}\n${egressIP}\n${kind}`;
      if (!this.#series.has(series))
        this.#series.set(series, {
          policy,
          egressIP,
          kind,
          retiredPackets: 0,
          retiredBytes: 0,
        });
      live.add(series);
      seen.add(c.id);
      if (known !== undefined && known.series === series) {
        // A chain the datapath rewrote starts its rules' counters from zero again.
        if (c.packets < known.packets || c.bytes < known.bytes) {
          known.basePackets += known.packets;
          known.baseBytes += known.bytes;
        }
        known.packets = c.packets;
        known.bytes = c.bytes;
        continue;
      }
      // A counter that changed series (its policy's egress IP changed, another policy decides
      // its element now) leaves what it counted to the old series and counts for the new one
      // from here on; a new counter brings all it counted since it was made.
      if (known !== undefined) this.#retire(known);
      this.#rules.set(c.id, {
        policy,
        series,
        packets: c.packets,
        bytes: c.bytes,
        basePackets: known === undefined ? 0 : -c.packets,
        baseBytes: known === undefined ? 0 : -c.bytes,
      });
    }
    for (const [id, r] of this.#rules) {
      if (seen.has(id)) continue;
      this.#retire(r);
      this.#rules.delete(id);
    }
    // A policy this node no longer carries: its series end.
    for (const key of this.#series.keys()) if (!live.has(key)) this.#series.delete(key);
  }

  #retire(r: RuleState): void {
    const s = this.#series.get(r.series);
    if (s === undefined) return;
    s.retiredPackets += r.basePackets + r.packets;
    s.retiredBytes += r.baseBytes + r.bytes;
  }

  #updateSaturation(): void {
    const high = this.#o.saturatedAt ?? 0.8;
    const low = this.#o.clearedBelow ?? 0.7;
    const next = new Map<string, SnatSaturation>();
    for (const e of this.#egress) {
      for (const d of e.top) {
        const key = saturationKey(d);
        const was = this.#saturated.get(key);
        if (d.saturation >= high || (was !== undefined && d.saturation >= low)) {
          next.set(
            key,
            was ?? {
              egressIP: d.egressIP,
              destination: d.destination,
              port: d.port,
              protocol: d.protocol,
              percent: Math.floor(d.saturation * 100),
            },
          );
        }
      }
    }
    const changed =
      next.size !== this.#saturated.size || [...next.keys()].some((k) => !this.#saturated.has(k));
    if (!changed) return;
    for (const [key, s] of next)
      if (!this.#saturated.has(key))
        this.#o.log.warn(
          { ...s },
          `egress IP ${s.egressIP} uses ${s.percent}% of its source ports toward ${s.destination}${s.port === 0 ? "" : `:${s.port}`}/${s.protocol}`,
        );
    for (const [key, s] of this.#saturated)
      if (!next.has(key))
        this.#o.log.info({ ...s }, `egress IP ${s.egressIP} has source ports to spare again`);
    this.#saturated = next;
    this.#o.onSaturation?.(this.#list());
  }

  #list(): SnatSaturation[] {
    return [...this.#saturated.values()]
      .sort(
        (a, b) =>
          b.percent - a.percent ||
          (saturationKey(a) < saturationKey(b) ? -1 : saturationKey(a) > saturationKey(b) ? 1 : 0),
      )
      .slice(0, MAX_REPORTED_SATURATIONS);
  }

  #failed(source: "counters" | "conntrack", e: unknown): void {
    this.#o.metrics?.readErrors.inc({ source });
    const message = (e as Error).message;
    // Once per distinct error: the loop retries every period.
    if (message !== this.#lastError)
      this.#o.log.warn({ err: message, source }, "cannot read traffic figures; retrying");
    this.#lastError = message;
  }
}
