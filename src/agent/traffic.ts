/**
 * What this node's datapath carries, per policy and per egress IP: packets and bytes from the
 * rules' counters, SNATed connections and source ports per destination from conntrack, and the
 * destinations toward which an egress IP is running out of source ports.
 *
 * Nothing here runs on the sync path. The kernel is read by a `TrafficReader`: in the agent a
 * worker thread (src/agent/traffic_worker.ts: the ~15 MB a table of 100,000 connections prints
 * is parsed there, measured by bench/traffic.ts), in tests the inline reader below. The counters
 * are read when Prometheus (or `sallyport top`) scrapes, at most once per `countersMaxAgeMs`; the
 * connection tracking table every `periodMs`, and only on nodes whose rules SNAT to an egress IP.
 *
 * Saturation is reported with hysteresis: a destination enters the list at `saturatedAt` of the
 * source ports and leaves it below `clearedBelow`, and an entry keeps the percentage it entered
 * with, so that the list (and the EgressNode status it is written to) changes only when a
 * destination crosses a threshold, never per measurement: a steady cluster writes nothing.
 */

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
  type RuleCounter,
} from "../kernel/counters.ts";
import type { Runner } from "../kernel/runner.ts";
import type { Clock } from "../lib/clock.ts";
import type { Family } from "../lib/ip.ts";
import type { Logger } from "../lib/log.ts";
import { SyncLoop } from "../lib/sync_loop.ts";

/**
 * Which counter source to build (serializable: a worker thread builds it from this). `none`:
 * the datapath has no counter source yet (the nftables one is to come); no figures then.
 */
export type CounterSourceConfig =
  | {
      readonly kind: "iptables";
      readonly backend: "nft" | "legacy";
      readonly families: readonly Family[];
    }
  | { readonly kind: "none" };

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
    case "none":
      return { read: async () => [] };
  }
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
    if ((c.kind !== "snat" && c.kind !== "snat_new") || c.egressIP === undefined) continue;
    if (!out.has(c.egressIP) || c.ports !== undefined) out.set(c.egressIP, c.ports ?? fallback);
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
  readonly kind: PolicyTraffic["kind"];
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
  /** Counters read for one scrape serve the next ones this long. @default 1000 */
  readonly countersMaxAgeMs?: number;
  /** Fraction of the source ports at which a destination is reported saturated. @default 0.8 */
  readonly saturatedAt?: number;
  /** ...and below which it no longer is. @default 0.7 */
  readonly clearedBelow?: number;
  /** The egress IP of a policy's family, for counters whose rule names none (steered). */
  readonly egressIPOf?: (policy: string, family: Family) => string | undefined;
  /** Called when the list of saturated destinations changes (not per measurement). */
  readonly onSaturation?: (list: readonly SnatSaturation[]) => void;
  readonly metrics?: TrafficReadMetrics;
}

function kindOf(kind: CounterKind): PolicyTraffic["kind"] {
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
      await this.#countersRead;
    }
    const totals = new Map<string, { packets: number; bytes: number }>();
    for (const [key, s] of this.#series)
      totals.set(key, { packets: s.retiredPackets, bytes: s.retiredBytes });
    for (const r of this.#rules.values()) {
      const t = totals.get(r.series)!;
      t.packets += r.basePackets + r.packets;
      t.bytes += r.baseBytes + r.bytes;
    }
    return [...this.#series].map(([key, s]) => ({
      policy: s.policy,
      egressIP: s.egressIP,
      kind: s.kind,
      ...totals.get(key)!,
    }));
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
      const egressIP = c.egressIP ?? this.#o.egressIPOf?.(c.policy, c.family) ?? "";
      const kind = kindOf(c.kind);
      const series = `${c.policy}\n${egressIP}\n${kind}`;
      if (!this.#series.has(series))
        this.#series.set(series, {
          policy: c.policy,
          egressIP,
          kind,
          retiredPackets: 0,
          retiredBytes: 0,
        });
      live.add(series);
      seen.add(c.id);
      const known = this.#rules.get(c.id);
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
      if (known !== undefined) this.#retire(known);
      this.#rules.set(c.id, {
        series,
        packets: c.packets,
        bytes: c.bytes,
        basePackets: 0,
        baseBytes: 0,
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
