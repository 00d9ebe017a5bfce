/**
 * Liveness in the data plane: which gateway nodes are dead, and whether this node may answer for
 * its egress IPs, decided by the nodes among themselves over the underlay, without the API server
 * (issue 12; docs/operations.md "Failover").
 *
 * Every agent sends an authenticated probe (HMAC-SHA256 with the key of a Secret) every
 * `intervalMs` to every gateway-capable node; gateway-capable nodes send theirs to every node. A
 * probe says which gateway nodes its sender hears (heard within D = intervalMs × multiplier),
 * which it judges down, and whether its last API call succeeded.
 *
 * The rule (a majority of the voters, so that two sides of a partition never both decide):
 * - The **voters** are the gateway-capable nodes plus the first two other nodes by name (every
 *   node derives the same list from the EgressNodes it watches). m = ⌊voters / 2⌋ + 1.
 * - A gateway-capable node judges gateway G **down** when, for `intervalMs` without a break, at
 *   least m voters vote "down": itself when it does not hear G, and every voter whose fresh probe
 *   (within D) does not list G. A voter it has not heard from within D does not vote. G stays down
 *   until m voters hear it again for `holdDownMs` (the controller has moved its egress IPs by
 *   then; a node that flickers is not taken back and forth).
 * - Nodes that are not gateway-capable take the down set announced by the gateway nodes they hear.
 * - A node **holds** (answers for) its egress IPs only while m voters, itself included, listed it
 *   in a probe received within D − intervalMs, and no gateway it hears announces it down.
 * Why no two nodes hold one egress IP at once: a standby takes over only after m voters said
 * "down" for `intervalMs`; the holder counts a voter's support only until D − intervalMs after
 * that voter's last probe listing it, and a voter stops listing it before it votes "down". Any two
 * majorities share a voter, so by the time the standby acts the holder has lost the majority it
 * needs, `intervalMs` earlier (the margin, also for the holder's own release). A holder whose
 * agent is frozen cannot release anything: the kernel does it (src/kernel/neighbour_fence.ts,
 * entries that lapse D − intervalMs after the agent last renewed them).
 * - Fewer than three voters: no majority can survive a death, so the data plane decides nothing
 *   (nobody is judged down here, and a node holds as long as the API-side rule lets it); liveness
 *   falls back on the node leases (src/kube/node_lease.ts).
 *
 * The API-side rule stays on top (as before): a gateway whose node lease expired while some peer
 * still reaches the API server releases its egress IPs (the controller would move them). After
 * such a cut, it stays released until its caches were relisted.
 */
import { createHmac, timingSafeEqual } from "node:crypto";
import { createSocket, type Socket } from "node:dgram";
import type { Clock, Timer } from "../lib/clock.ts";
import type { Logger } from "../lib/log.ts";

export interface LivenessTiming {
  /** Time between probes. @default 50 */
  readonly intervalMs: number;
  /** Probes missed before a node is not heard. @default 4 */
  readonly multiplier: number;
  /** Time a node judged down must be heard again before it is live. @default 5000 */
  readonly holdDownMs: number;
}

export const DEFAULT_LIVENESS_TIMING: LivenessTiming = {
  intervalMs: 50,
  multiplier: 4,
  holdDownMs: 5000,
};

/** How many voters a node that is not gateway-capable adds. */
export const EXTRA_VOTERS = 2;

export interface Member {
  readonly name: string;
  readonly gatewayCapable: boolean;
  /** Underlay address probes are sent to. */
  readonly address: string;
}

/** The voters: every gateway-capable node and the first EXTRA_VOTERS others by name. */
export function votersOf(members: Iterable<Member>): string[] {
  const all = [...members].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const gateways = all.filter((m) => m.gatewayCapable).map((m) => m.name);
  const others = all
    .filter((m) => !m.gatewayCapable)
    .slice(0, EXTRA_VOTERS)
    .map((m) => m.name);
  return [...gateways, ...others];
}

/** What the last authenticated probe of a node said, and when it arrived (clock ms). */
export interface Report {
  readonly at: number;
  /** Gateways its sender hears, each with the time since it last heard it (ms, when it sent). */
  readonly hears: ReadonlyMap<string, number>;
  readonly down: ReadonlySet<string>;
  readonly apiOk: boolean;
}

/** Cut off from the API server while others reach it (or cut off from everything). */
export function cutOff(i: {
  readonly leaseValid: boolean;
  readonly peers: number;
  readonly heard: readonly boolean[];
}): boolean {
  const apiDownForAll = i.heard.length > 0 && i.heard.every((ok) => !ok);
  return !i.leaseValid && i.peers > 0 && !apiDownForAll;
}

export interface JudgeInput {
  readonly self: string;
  readonly now: number;
  readonly timing: LivenessTiming;
  readonly members: ReadonlyMap<string, Member>;
  readonly reports: ReadonlyMap<string, Report>;
  /** When this node last heard each node (clock ms). */
  readonly heardAt: ReadonlyMap<string, number>;
  /** Per gateway, kept between calls (judge advances it). */
  readonly state: Map<string, DownState>;
}

export interface DownState {
  /** Since when m voters say down (a decision waits `intervalMs` on it). */
  suspectSince?: number | undefined;
  down: boolean;
  /** Since when m voters hear it again (judged down: it waits `holdDownMs` on it). */
  upSince?: number | undefined;
}

export interface Judgement {
  /** Gateways this node hears, with the time since it last heard each (what its probes say). */
  readonly hears: ReadonlyMap<string, number>;
  /** Gateways judged down (by this node if gateway-capable, else as announced). */
  readonly down: ReadonlySet<string>;
  /**
   * Until when (clock ms) this node may hold its egress IPs: the time at which, at the earliest,
   * the m-th voter (itself included) may stop hearing it. +Infinity with fewer than 3 voters.
   */
  readonly supportedUntil: number;
  /** A gateway we hear announces this node down. */
  readonly announcedDown: boolean;
  /** The data plane decides (three voters or more). */
  readonly decides: boolean;
  /** When a pending decision matures (a suspected gateway, a hold-down): judge again then. */
  readonly nextCheck: number | undefined;
}

/** The rule above, on the probes received so far. Pure but for `state`, which it advances. */
export function judge(i: JudgeInput): Judgement {
  const { self, now, timing, members, reports, heardAt, state } = i;
  const detect = timing.intervalMs * timing.multiplier;
  const fresh = (n: string) => {
    const r = reports.get(n);
    return r !== undefined && now - r.at < detect ? r : undefined;
  };
  const gateways = [...members.values()].filter((m) => m.gatewayCapable).map((m) => m.name);
  const hears = new Map<string, number>();
  for (const g of gateways) {
    const at = heardAt.get(g);
    if (g !== self && at !== undefined && now - at < detect) hears.set(g, Math.round(now - at));
  }
  const voters = votersOf(members.values());
  const decides = voters.length >= 3;
  const m = Math.floor(voters.length / 2) + 1;
  const announcers = gateways.filter((g) => g !== self && fresh(g) !== undefined);
  const announcedDown = announcers.some((g) => fresh(g)!.down.has(self));
  if (!decides) {
    state.clear();
    return {
      hears,
      down: new Set(),
      supportedUntil: Number.POSITIVE_INFINITY,
      announcedDown: false,
      decides,
      nextCheck: undefined,
    };
  }
  const down = new Set<string>();
  let nextCheck: number | undefined;
  const check = (t: number) => {
    nextCheck = nextCheck === undefined ? t : Math.min(nextCheck, t);
  };
  if (members.get(self)?.gatewayCapable === true) {
    for (const g of gateways) {
      if (g === self) continue;
      // Votes as the voters said them (a voter's report is never extrapolated: it may have
      // heard g again since).
      let upVotes = 0;
      let downVotes = 0;
      for (const v of voters) {
        if (v === self) {
          if (hears.has(g)) upVotes++;
          else downVotes++;
          continue;
        }
        const r = fresh(v);
        if (r === undefined) continue;
        if (v === g || r.hears.has(g)) upVotes++;
        else downVotes++;
      }
      const s = state.get(g) ?? { down: false };
      if (!s.down) {
        s.upSince = undefined;
        if (downVotes < m) s.suspectSince = undefined;
        else {
          s.suspectSince ??= now;
          if (now - s.suspectSince >= timing.intervalMs) s.down = true;
          else check(s.suspectSince + timing.intervalMs);
        }
      } else if (upVotes >= m) {
        s.upSince ??= now;
        if (now - s.upSince >= timing.holdDownMs) {
          s.down = false;
          s.suspectSince = undefined;
          s.upSince = undefined;
        } else check(s.upSince + timing.holdDownMs);
      } else s.upSince = undefined;
      if (s.down || s.suspectSince !== undefined) state.set(g, s);
      else state.delete(g);
      if (s.down) down.add(g);
    }
  } else {
    for (const g of announcers) for (const d of fresh(g)!.down) down.add(d);
  }
  // Support: each other voter hears this node until (at the earliest) it last heard it plus D.
  // Estimated from the report's arrival, so the transit is taken off (half an interval).
  const until: number[] = [];
  for (const v of voters) {
    if (v === self) continue;
    const r = reports.get(v);
    const age = r?.hears.get(self);
    if (r !== undefined && age !== undefined)
      until.push(r.at - age + detect - timing.intervalMs / 2);
  }
  until.sort((a, b) => b - a);
  // Itself is one supporter; m − 1 others are needed.
  const supportedUntil = until[m - 2] ?? Number.NEGATIVE_INFINITY;
  return { hears, down, supportedUntil, announcedDown, decides, nextCheck };
}

// --- the wire: JSON, then (with a key) 32 bytes of HMAC-SHA256 over it.

interface Wire {
  v: 1;
  /** Sender. */
  n: string;
  /** Sender's wall clock, ms: replays (older than the last one, or off by more than the skew) are dropped. */
  t: number;
  ok: boolean;
  /** Gateways heard → ms since. */
  h: Record<string, number>;
  d: string[];
}

const MAC_BYTES = 32;

export function encodeProbe(w: Omit<Wire, "v">, key: Buffer | undefined): Buffer {
  const body = Buffer.from(JSON.stringify({ v: 1, ...w }));
  if (key === undefined) return body;
  return Buffer.concat([body, createHmac("sha256", key).update(body).digest()]);
}

/** The probe, or undefined when it is malformed or (with a key) not authentic. */
export function decodeProbe(msg: Buffer, key: Buffer | undefined): Wire | undefined {
  let body = msg;
  if (key !== undefined) {
    if (msg.length <= MAC_BYTES) return undefined;
    body = msg.subarray(0, msg.length - MAC_BYTES);
    const mac = createHmac("sha256", key).update(body).digest();
    if (!timingSafeEqual(mac, msg.subarray(msg.length - MAC_BYTES))) return undefined;
  }
  try {
    const w = JSON.parse(body.toString("utf8")) as Partial<Wire>;
    const strings = (x: unknown): x is string[] =>
      Array.isArray(x) && x.every((s) => typeof s === "string");
    if (
      w.v !== 1 ||
      typeof w.n !== "string" ||
      typeof w.t !== "number" ||
      typeof w.ok !== "boolean" ||
      typeof w.h !== "object" ||
      w.h === null ||
      Array.isArray(w.h) ||
      !Object.values(w.h).every((a) => typeof a === "number" && a >= 0) ||
      !strings(w.d)
    )
      return undefined;
    return w as Wire;
  } catch {
    return undefined;
  }
}

/** Where probes go: UDP over the underlay in processes; a fake in tests. */
export interface ProbeTransport {
  start(onMessage: (msg: Buffer) => void): void;
  send(msg: Buffer, address: string): void;
  stop(): void;
}

export function udpTransport(port: number, log: Logger): ProbeTransport {
  let s4: Socket | undefined;
  let s6: Socket | undefined;
  return {
    start(onMessage) {
      s4 = createSocket({ type: "udp4", reuseAddr: true });
      s4.on("message", onMessage);
      s4.on("error", (e) => log.warn({ err: e.message }, "probe socket error"));
      s4.bind(port);
      s6 = createSocket({ type: "udp6", ipv6Only: true, reuseAddr: true });
      s6.on("message", onMessage);
      s6.on("error", () => {});
      s6.bind(port);
    },
    send(msg, address) {
      (address.includes(":") ? s6 : s4)?.send(msg, port, address, () => {});
    },
    stop() {
      s4?.close();
      s6?.close();
    },
  };
}

export interface LivenessOptions {
  readonly node: string;
  readonly clock: Clock;
  /** Wall clock (ms since the epoch) for the probes' timestamps. @default Date.now */
  readonly wallNow?: () => number;
  /** Probes older than this (by the sender's wall clock) are replays. @default 2000 */
  readonly maxSkewMs?: number;
  readonly log: Logger;
  readonly transport: ProbeTransport;
  /** The shared key (a Secret); undefined: probes are not authenticated (warned at start). */
  readonly key: Buffer | undefined;
  readonly timing: LivenessTiming;
  /** Every node running an agent, this one included. */
  readonly members: () => ReadonlyMap<string, Member>;
  /** API-side rule: is our node lease valid; did our last API call succeed. */
  readonly leaseValid: () => boolean;
  readonly apiReachable: () => boolean;
  /** Holding or the down set changed. */
  readonly onChange: () => void;
  /**
   * Every probe period while this node holds: renew what lapses by itself (the kernel fence),
   * for `forMs` (until the support ends; the detection time when the data plane decides nothing).
   */
  readonly onHolding?: (forMs: number) => void;
  /** Called at once when this node stops holding, before anything else (the kernel fence). */
  readonly onRelease?: () => void;
  /** See the API-side rule: relist the caches; stay released until they were relisted after t. */
  readonly refresh: () => void;
  readonly freshSince: (t: number) => boolean;
}

export class Liveness {
  readonly #o: LivenessOptions;
  readonly #reports = new Map<string, Report>();
  readonly #lastStamp = new Map<string, number>();
  readonly #state = new Map<string, DownState>();
  readonly #heardAt = new Map<string, number>();
  #timer: Timer | undefined;
  #checkTimer: Timer | undefined;
  #checkAt: number | undefined;
  #judgement: Judgement | undefined;
  #holding = false;
  #apiFenced = false;
  #recoveringSince: number | undefined;
  /** Probes dropped: not authentic, malformed or replayed. */
  rejected = 0;

  constructor(options: LivenessOptions) {
    this.#o = options;
  }

  start(): void {
    if (this.#o.key === undefined)
      this.#o.log.warn(
        "liveness probes are not authenticated: a host on the underlay could fake them (give the agent --probe-key-file)",
      );
    this.#o.transport.start((msg) => this.receive(msg));
    const tick = () => {
      try {
        this.#send();
        this.#evaluate();
      } catch (e) {
        this.#o.log.error({ err: (e as Error).message }, "liveness tick failed");
      }
      this.#timer = this.#o.clock.after(this.#o.timing.intervalMs, tick);
    };
    tick();
  }

  stop(): void {
    this.#timer?.cancel();
    this.#checkTimer?.cancel();
    this.#o.transport.stop();
  }

  /** A probe arrived. */
  receive(msg: Buffer): void {
    const w = decodeProbe(msg, this.#o.key);
    const wall = (this.#o.wallNow ?? Date.now)();
    if (
      w === undefined ||
      w.n === this.#o.node ||
      Math.abs(wall - w.t) > (this.#o.maxSkewMs ?? 2000) ||
      w.t <= (this.#lastStamp.get(w.n) ?? Number.NEGATIVE_INFINITY)
    ) {
      this.rejected++;
      return;
    }
    this.#lastStamp.set(w.n, w.t);
    const now = this.#o.clock.now();
    this.#heardAt.set(w.n, now);
    const before = this.#reports.get(w.n);
    const hears = new Map(Object.entries(w.h));
    this.#reports.set(w.n, { at: now, hears, down: new Set(w.d), apiOk: w.ok });
    // What could change a decision at once: a voter that stopped hearing us or a gateway (a
    // vote), a new down set, a node heard again.
    if (
      before === undefined ||
      now - before.at >= this.#o.timing.intervalMs * this.#o.timing.multiplier ||
      before.hears.size !== hears.size ||
      [...hears.keys()].some((g) => !before.hears.has(g)) ||
      before.down.size !== w.d.length ||
      w.d.some((d) => !before.down.has(d))
    )
      this.#evaluate();
  }

  /** Judge now; while holding, renew (onHolding) at once: a sync made us hold new egress IPs. */
  renew(): void {
    this.#evaluate();
  }

  /** Gateways judged down: their egress IPs go to their first standby that is not. */
  get down(): ReadonlySet<string> {
    return this.#judgement?.down ?? new Set();
  }

  /** Fenced by either rule (the metric `sallyport_agent_fenced`). */
  get fenced(): boolean {
    return !this.#holding;
  }

  /**
   * Whether this node may hold its egress IPs now, evaluated now rather than at the last tick: an
   * agent that was frozen or starved must not act on a verdict it reached before.
   */
  holding(): boolean {
    this.#evaluate();
    return this.#holding;
  }

  #send(): void {
    const members = this.#o.members();
    const self = members.get(this.#o.node);
    const j = this.#judgement;
    const msg = encodeProbe(
      {
        n: this.#o.node,
        t: (this.#o.wallNow ?? Date.now)(),
        ok: this.#o.apiReachable(),
        h: Object.fromEntries(j?.hears ?? []),
        d: self?.gatewayCapable === true ? [...(j?.down ?? [])] : [],
      },
      this.#o.key,
    );
    for (const m of members.values()) {
      if (m.name === this.#o.node) continue;
      if (m.gatewayCapable || self?.gatewayCapable === true) this.#o.transport.send(msg, m.address);
    }
  }

  #evaluate(): void {
    const now = this.#o.clock.now();
    const members = this.#o.members();
    const j = judge({
      self: this.#o.node,
      now,
      timing: this.#o.timing,
      members,
      reports: this.#reports,
      heardAt: this.#heardAt,
      state: this.#state,
    });
    // The API-side rule, with the peers' word on whether they reach the API server.
    const detect = this.#o.timing.intervalMs * this.#o.timing.multiplier;
    const heardOk = [...this.#reports.entries()]
      .filter(
        ([n, r]) => n !== this.#o.node && members.get(n)?.gatewayCapable && now - r.at < detect,
      )
      .map(([, r]) => r.apiOk);
    const peers = [...members.values()].filter(
      (m) => m.gatewayCapable && m.name !== this.#o.node,
    ).length;
    const isCutOff = cutOff({ leaseValid: this.#o.leaseValid(), peers, heard: heardOk });
    let apiFenced = isCutOff;
    if (this.#apiFenced && !isCutOff) {
      if (this.#recoveringSince === undefined) {
        this.#recoveringSince = now;
        this.#o.refresh();
      }
      apiFenced = !this.#o.freshSince(this.#recoveringSince);
    }
    if (!apiFenced || isCutOff) this.#recoveringSince = undefined;
    const holding = !apiFenced && now < j.supportedUntil && !j.announcedDown;
    const before = this.#judgement;
    const downChanged =
      before === undefined ||
      before.down.size !== j.down.size ||
      [...j.down].some((d) => !before.down.has(d));
    const holdingChanged = holding !== this.#holding;
    this.#judgement = j;
    this.#apiFenced = apiFenced;
    this.#holding = holding;
    if (holdingChanged && !holding) this.#o.onRelease?.();
    if (holdingChanged || (downChanged && before !== undefined)) {
      this.#o.log.warn(
        {
          holding,
          apiFenced,
          supportedForMs: Math.round(Math.max(0, j.supportedUntil - now)),
          announcedDown: j.announcedDown,
          down: [...j.down],
          hears: [...j.hears.keys()],
        },
        holdingChanged
          ? holding
            ? "holding: a majority of the voters hears this node"
            : "released the egress IPs: no majority of the voters hears this node, a gateway judged it down, or its node lease expired while others reach the API server"
          : "the gateways judged down changed",
      );
      this.#o.onChange();
    }
    if (holding) this.#o.onHolding?.(Math.min(j.supportedUntil - now, detect));
    // Judge again when the support ends or a pending decision matures, not at the next tick.
    const next = Math.min(
      j.nextCheck ?? Number.POSITIVE_INFINITY,
      holding && Number.isFinite(j.supportedUntil) ? j.supportedUntil : Number.POSITIVE_INFINITY,
    );
    if (Number.isFinite(next) && next !== this.#checkAt) {
      this.#checkTimer?.cancel();
      this.#checkAt = next;
      this.#checkTimer = this.#o.clock.after(Math.max(0, next - now), () => {
        this.#checkAt = undefined;
        this.#evaluate();
      });
    }
  }
}
