/**
 * Liveness in the data plane: which gateway nodes are dead, and whether this node may answer for
 * its egress IPs, decided by the nodes among themselves over the underlay, without the API server
 * (issue 12; docs/operations.md "Failover").
 *
 * Every agent sends an authenticated probe (HMAC-SHA256 with the key of a Secret, a timestamp
 * against replays) every `intervalMs` to every gateway-capable node; gateway-capable nodes send
 * theirs to every node. A probe says which gateway nodes its sender heard within D = intervalMs ×
 * multiplier (its votes), which of them it supports and how long ago it last heard each, which
 * gateways it judged down (at once) and which its datapath holds down, and whether its last API
 * call succeeded.
 *
 * The rule (a majority of the voters, so that two sides of a partition never both decide):
 * - The **voters** are the gateway-capable nodes plus the first two other nodes by name (every
 *   node derives the same list from the EgressNodes it watches). m = ⌊voters / 2⌋ + 1.
 * - A gateway-capable node judges gateway G **down** when, for half an interval without a break,
 *   at least m voters vote "down": itself when it does not hear G, and every voter whose last
 *   probe (younger than D) does not list G as heard. A voter that never heard G since it started
 *   does not vote (as BFD: a session must have been up to go down), nor does one it has not heard
 *   from within D. It says so in its next probe, sent at once. G stays down until m voters hear
 *   it again for `holdDownMs` (the controller has moved its egress IPs by then; a node that
 *   flickers is not taken back and forth).
 * - Nodes that are not gateway-capable hold down what the gateways they hear announce.
 * - A voter **supports** G while it hears G, nobody it hears holds G down (judged or announced),
 *   and it has listed G without a break since 2 D after it last did not: a voter that changed its
 *   mind is never counted both ways, its "down" vote (counted for D after it was sent) and its
 *   support.
 * - A node **holds** (answers for) its egress IPs until its support ends: each other voter whose
 *   probe lists it as supported supports it until that voter's last hearing of it plus D
 *   (counted from the probe's send time, minus half an interval); the support ends when fewer
 *   than m − 1 of them are left. It releases at once when any node judges or holds it down.
 * Why no two nodes answer for one egress IP at once: a standby takes over only after m voters
 * voted "down" for half an interval. A voter votes "down" only once its D has run out since it
 * last heard the holder, which is when the holder stops counting it, and it does not support the
 * holder again while its vote may still be counted; any two majorities share a voter, so the
 * holder's support (counted to half an interval less) has ended before the standby acts, with
 * an interval to spare (half of it lets the kernel fence below lapse late, the standby's sync
 * comes on top). The kernel enforces that end even for a holder whose agent is frozen or dead:
 * its ARP/NDP answers are gated by set elements that lapse when the support does
 * (src/kernel/neighbour_fence.ts). A holder that comes back is held down by the voters until the
 * standby's hold-down has passed, so it cannot gather support meanwhile.
 * - Fewer than three voters: no majority can survive a death, so the data plane decides nothing
 *   (nobody is judged down, and a node holds as long as the API-side rule lets it); liveness
 *   falls back on the node leases (src/kube/node_lease.ts).
 *
 * The API-side rule stays on top: a gateway whose node lease expired while some peer still
 * reaches the API server releases its egress IPs (the controller would move them); after such a
 * cut it stays released until its caches were relisted.
 */
import { createHmac, timingSafeEqual } from "node:crypto";
import { createSocket, type Socket } from "node:dgram";
import type { Clock, Timer } from "../lib/clock.ts";
import { sameSet } from "../lib/equal.ts";
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

/** How long m "down" votes must hold before a gateway is judged down: half an interval. */
export function confirmMs(timing: LivenessTiming): number {
  return timing.intervalMs / 2;
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

/** What the last authenticated probe of a node said, and when it was sent (our clock, ms). */
export interface Report {
  readonly at: number;
  /**
   * Gateways its sender supports (hears, holds down nobody says is down, and has not just changed
   * its mind about), each with the time since it last heard it (ms, when it sent).
   */
  readonly hears: ReadonlyMap<string, number>;
  /** Gateways its sender heard within D: its votes. */
  readonly raw: ReadonlySet<string>;
  /** Gateways its sender has heard at least once since it started (its vote counts for those). */
  readonly ever: ReadonlySet<string>;
  /** What its sender holds down: as its datapath has it (gateways: their verdicts, once synced). */
  readonly down: ReadonlySet<string>;
  /** Gateways its sender judged down, said the moment it decided (gateways only). */
  readonly judged: ReadonlySet<string>;
  /** The egress IPs its sender answers for (a gateway's, in probes to gateways). */
  readonly claims: ReadonlySet<string>;
  /** Gateways whose policies its sender's datapath carries in advance (see Liveness.announce). */
  readonly prepared: ReadonlySet<string>;
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
  /**
   * Per gateway this node has heard, the last time it did not list it (kept between calls): it
   * lists a gateway again only 2 D after that, when no node still counts its "down" vote.
   */
  readonly unlistedAt: Map<string, number>;
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
  /** Gateways this node supports, with the time since it last heard each (its probes' `h`). */
  readonly hears: ReadonlyMap<string, number>;
  /** Gateways this node heard within D (its probes' `a`: its votes). */
  readonly raw: ReadonlySet<string>;
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
  const { self, now, timing, members, reports, heardAt, unlistedAt, state } = i;
  const detect = timing.intervalMs * timing.multiplier;
  const fresh = (n: string) => {
    const r = reports.get(n);
    return r !== undefined && now - r.at < detect ? r : undefined;
  };
  const gateways = [...members.values()].filter((m) => m.gatewayCapable).map((m) => m.name);
  // Held down by anyone (a verdict said at once, or a synced one): no support from us.
  const heldDown = new Set<string>();
  for (const n of reports.keys()) {
    const r = fresh(n);
    if (r === undefined) continue;
    for (const g of r.judged) heldDown.add(g);
    for (const g of r.down) heldDown.add(g);
  }
  for (const [g, s] of state) if (s.down) heldDown.add(g);
  // What this node lists as heard (its probes' support and votes). A voter that changes its mind
  // must not be counted both ways at once: once it stopped listing a gateway (its "down" vote
  // counts at the others for D after it was sent), it lists it again only after 2 D.
  const hears = new Map<string, number>();
  // Heard within D, whatever else: what this node votes (the votes decide who is down and who is
  // back; only support is withheld above).
  const raw = new Set<string>();
  for (const g of gateways) {
    if (g === self) continue;
    const at = heardAt.get(g);
    if (at === undefined) continue;
    const heard = now - at < detect;
    if (heard) raw.add(g);
    // (Only a reason of its own restarts the wait, not the wait itself.)
    if (!heard || heldDown.has(g)) unlistedAt.set(g, now);
    const unlisted = unlistedAt.get(g);
    if (heard && !heldDown.has(g) && (unlisted === undefined || now - unlisted >= 2 * detect))
      hears.set(g, Math.round(now - at));
  }
  const voters = votersOf(members.values());
  const decides = voters.length >= 3;
  const m = Math.floor(voters.length / 2) + 1;
  const announcers = gateways.filter((g) => g !== self && fresh(g) !== undefined);
  const announcedDown = [...reports.keys()].some((n) => {
    const r = fresh(n);
    return r !== undefined && (r.down.has(self) || r.judged.has(self));
  });
  if (!decides) {
    state.clear();
    return {
      hears,
      raw,
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
        // As BFD: a voter that never heard g since it started does not vote (a node that just
        // started, or was just cut off, has no say on who else is dead).
        if (v === self) {
          if (raw.has(g)) upVotes++;
          else if (heardAt.has(g)) downVotes++;
          continue;
        }
        const r = fresh(v);
        if (r === undefined) continue;
        if (v === g || r.raw.has(g)) upVotes++;
        else if (r.ever.has(g)) downVotes++;
      }
      const s = state.get(g) ?? { down: false };
      if (!s.down) {
        s.upSince = undefined;
        if (downVotes < m) s.suspectSince = undefined;
        else {
          s.suspectSince ??= now;
          if (now - s.suspectSince >= confirmMs(timing)) s.down = true;
          else check(s.suspectSince + confirmMs(timing));
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
    for (const g of announcers) {
      const r = fresh(g)!;
      for (const d of r.down) down.add(d);
      for (const d of takingOver(r)) down.add(d);
    }
  }
  // Support: each other voter hears this node until (at the earliest) it last heard it plus D.
  // Counted from when the report was sent, less half an interval for the clocks' disagreement.
  const until: number[] = [];
  for (const v of voters) {
    if (v === self) continue;
    const r = reports.get(v);
    const age = r?.hears.get(self);
    // A voter that holds us down (judged or announced) does not support us, even hearing us.
    if (r !== undefined && age !== undefined && !r.down.has(self))
      until.push(r.at - age + detect - timing.intervalMs / 2);
  }
  until.sort((a, b) => b - a);
  // Itself is one supporter; m − 1 others are needed.
  const supportedUntil = until[m - 2] ?? Number.NEGATIVE_INFINITY;
  // A node we hear is lost the moment its D runs out: judge (and tell the others) then.
  for (const [, age] of hears) check(now - age + detect);
  return { hears, raw, down, supportedUntil, announcedDown, decides, nextCheck };
}

/**
 * The gateways a report's sender is taking over now: those it judged down and whose policies its
 * datapath carries in advance. What is steered to it before its own sync is dropped by its group
 * chains, never sent on un-NATed, so a steering node need not wait for it to announce them.
 */
export function takingOver(r: Report): ReadonlySet<string> {
  if (r.prepared.size === 0 || r.judged.size === 0) return EMPTY;
  const out = new Set<string>();
  for (const g of r.judged) if (r.prepared.has(g)) out.add(g);
  return out;
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
  /** Gateways heard within D (votes). */
  a: string[];
  /** Gateways heard at least once since the sender started. */
  u: string[];
  d: string[];
  /** Gateways the sender judged down (its verdicts, before its datapath holds them). */
  j: string[];
  /** A planned restart: count the sender as heard for this long (ms). */
  r?: number;
  /**
   * The egress IPs the sender answers for now (its datapath holds them and liveness lets it):
   * sent by gateway-capable nodes to gateway-capable nodes, the ones that may take them over.
   */
  e?: string[];
  /**
   * Gateways whose policies the sender's datapath carries in advance, every one it stands by
   * for: a steering node may send it their traffic the moment it takes them over.
   */
  p?: string[];
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
      !strings(w.d) ||
      !strings(w.u) ||
      !strings(w.a) ||
      !strings(w.j) ||
      (w.r !== undefined && (typeof w.r !== "number" || w.r < 0)) ||
      (w.e !== undefined && !strings(w.e)) ||
      (w.p !== undefined && !strings(w.p))
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
      // A last probe may still be on its way out (a hand-over's): close once it has left.
      const [a, b] = [s4, s6];
      setTimeout(() => {
        a?.close();
        b?.close();
      }, 100);
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
  /**
   * A peer counts as reaching the API server once its probes have said so for this long (half the
   * controller's grace, src/kube/node_lease.ts): when the API server comes back after an outage
   * for all, every lease has expired and the first peer to renew must not fence the others before
   * they had their own chance (the controller waits a lease duration from its relist anyway).
   * @default 5000
   */
  readonly apiSettleMs?: number | undefined;
  /** Holding or the down set changed. */
  readonly onChange: () => void;
  /**
   * Every probe period while this node holds: renew what lapses by itself (the kernel fence),
   * for `forMs` (until the support ends; the detection time when the data plane decides nothing).
   */
  readonly onHolding?: (forMs: number) => void;
  /** Called at once when this node stops holding, before anything else (the kernel fence). */
  readonly onRelease?: () => void;
  /**
   * The egress IPs this node's datapath holds: said in its probes to the gateway-capable nodes
   * while it holds, so that a node given one of them (a planned move) takes it only once this
   * node has stopped answering for it (see claimedBy).
   */
  readonly claims?: () => readonly string[];
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
  readonly #unlistedAt = new Map<string, number>();
  #evaluatedAt: number | undefined;
  /** Nodes restarting their agent (a last probe said so): heard until then. */
  readonly #restartUntil = new Map<string, number>();
  /** Per peer, since when its probes have said without a break that it reaches the API server. */
  readonly #apiOkSince = new Map<string, number>();
  #timer: Timer | undefined;
  #checkTimer: Timer | undefined;
  #checkAt: number | undefined;
  #judgement: Judgement | undefined;
  /** What our probes say we hold down: what our datapath has been synced with. */
  #announced: ReadonlySet<string> = new Set();
  #prepared: ReadonlySet<string> = EMPTY;
  /** Moves whenever something the planner reads changes (down set, announcements, holding). */
  version = 0;
  #holding = false;
  #apiFenced = false;
  #recoveringSince: number | undefined;
  /** Probes dropped: not authentic, malformed or replayed. */
  rejected = 0;
  /** Peers whose fresh probes claim egress IPs; moves whenever what they claim changes. */
  readonly #claimants = new Set<string>();
  claimsVersion = 0;
  /** What our last probes claimed (to send a new claim at once). */
  #sentClaims = "";

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
        this.#evaluate();
        this.#send();
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
    const why =
      w === undefined
        ? "not authentic or malformed"
        : w.n === this.#o.node
          ? undefined
          : Math.abs(wall - w.t) > (this.#o.maxSkewMs ?? 2000)
            ? `its clock is ${Math.round(wall - w.t)} ms off ours`
            : w.t <= (this.#lastStamp.get(w.n) ?? Number.NEGATIVE_INFINITY)
              ? "replayed (not newer than the last one)"
              : "";
    if (w === undefined || why !== "") {
      this.rejected++;
      if (why !== undefined && this.rejected % 1000 === 1)
        this.#o.log.warn({ from: w?.n, why, rejected: this.rejected }, "liveness probe dropped");
      return;
    }
    this.#lastStamp.set(w.n, w.t);
    // When it was sent, by our clock: its timestamp says how long it took to get here and be
    // read, an event loop busy meanwhile included (the earlier of the two, should the clocks
    // disagree). Support must never be counted from a late reading.
    const now = this.#o.clock.now() - Math.max(0, wall - w.t);
    this.#heardAt.set(w.n, now);
    if (w.r !== undefined) this.#restartUntil.set(w.n, now + Math.min(w.r, 60_000));
    else this.#restartUntil.delete(w.n);
    const before = this.#reports.get(w.n);
    const lapsed =
      before === undefined ||
      now - before.at >= this.#o.timing.intervalMs * this.#o.timing.multiplier;
    if (!w.ok || lapsed) this.#apiOkSince.delete(w.n);
    if (w.ok && !this.#apiOkSince.has(w.n)) this.#apiOkSince.set(w.n, now);
    const hears = new Map(Object.entries(w.h));
    const claims = w.e === undefined || w.e.length === 0 ? EMPTY : new Set(w.e);
    const report: Report = {
      at: now,
      hears,
      ever: new Set(w.u),
      raw: new Set(w.a),
      down: new Set(w.d),
      judged: new Set(w.j),
      claims,
      prepared: w.p === undefined || w.p.length === 0 ? EMPTY : new Set(w.p),
    };
    this.#reports.set(w.n, report);
    if (!sameSet(before?.claims ?? EMPTY, claims) || (claims.size > 0 && !this.#claimants.has(w.n)))
      this.#claimsChanged(w.n, claims.size > 0);
    // What could change a decision at once: a voter that stopped hearing us or a gateway (a
    // vote), a new down set, a node heard again.
    const announcing = before === undefined || !sameSet(before.down, new Set(w.d));
    const judging = before === undefined || !sameSet(before.judged, new Set(w.j));
    if (
      announcing ||
      judging ||
      // Our support: while holding, each report that lists us moves the kernel fence's deadline.
      (this.#holding && hears.has(this.#o.node)) ||
      now - before.at >= this.#o.timing.intervalMs * this.#o.timing.multiplier ||
      before.hears.size !== hears.size ||
      [...hears.keys()].some((g) => !before.hears.has(g)) ||
      !sameSet(before.raw, new Set(w.a))
    )
      this.#evaluate();
    // The planner reads what others announce and what they are taking over (Agent#effective).
    const taking = !sameSet(before === undefined ? EMPTY : takingOver(before), takingOver(report));
    if ((announcing && w.d.length + (before?.down.size ?? 0) > 0) || taking) {
      this.version++;
      this.#o.onChange();
    }
  }

  /**
   * A planned restart of this agent: one last probe asks every node to count this one as heard
   * for `holdMs` (so a rolling update moves no egress IP; the kernel keeps forwarding), and the
   * kernel fence is told to keep answering as long. Then stops.
   */
  handOver(holdMs: number): void {
    this.#evaluate();
    if (this.#holding) this.#o.onHolding?.(holdMs);
    this.#send(holdMs);
    this.stop();
  }

  /**
   * Judge now; while holding, renew (onHolding) at once: a sync made us hold new egress IPs. What
   * we answer for changed (a sync let one go): say so at once, a node waits for it.
   */
  renew(): void {
    this.#evaluate();
    const claims = this.#holding ? (this.#o.claims?.() ?? []) : [];
    if (claims.join(",") !== this.#sentClaims) this.#send();
  }

  /** Gateways judged down: their egress IPs go to their first standby that is not. */
  get down(): ReadonlySet<string> {
    return this.#judgement?.down ?? new Set();
  }

  /**
   * Our datapath now holds `down` as down (a sync with it finished): say so in our probes at
   * once. A steering node moves a policy to a standby only when that standby says so, so that
   * nothing is steered to a node before it holds the egress IP (its SNAT rules included). Only
   * what liveness judges down as the sync ends is said: a sync planned before this thread
   * started over (a frozen agent thawed) must not hold down a node that is live (seen in the
   * sandbox: such a sync ended after the thaw and announced the node that had taken over as
   * down; it released its egress IPs for 0.6 s).
   */
  announce(planned: ReadonlySet<string>, prepared: ReadonlySet<string> = EMPTY): void {
    // (What the datapath carries in advance goes with the next probe: it matters only when a
    // gateway is lost, long after.)
    this.#prepared = prepared;
    const judged = this.down;
    const down = new Set([...planned].filter((g) => judged.has(g)));
    if (sameSet(down, this.#announced)) return;
    this.#announced = down;
    // Judged now, so that the ages it sends are today's.
    this.#evaluate();
    this.#send();
  }

  /** What `node`'s last fresh probe says it holds down (its datapath is synced with it). */
  announcedBy(node: string): ReadonlySet<string> {
    return this.#fresh(node)?.down ?? EMPTY;
  }

  /**
   * The gateways `node`'s last fresh probe says it is taking over now (see takingOver).
   */
  takingBy(node: string): ReadonlySet<string> {
    const r = this.#fresh(node);
    return r === undefined ? EMPTY : takingOver(r);
  }

  #fresh(node: string): Report | undefined {
    const r = this.#reports.get(node);
    const detect = this.#o.timing.intervalMs * this.#o.timing.multiplier;
    return r !== undefined && this.#o.clock.now() - r.at < detect ? r : undefined;
  }

  /**
   * The node whose fresh probe says it answers for `address`, if any but this one. A node given
   * an egress IP that another still answers for (a failback or a rebalance: the controller moved
   * it, and the two datapaths sync each at their own pace) waits until that node's probes stop
   * claiming it: never two nodes answering for one egress IP. A dead holder's claim goes with
   * its last probe, after D, before a failover can happen.
   */
  claimedBy(address: string): string | undefined {
    for (const [n, claims] of this.#freshClaims()) if (claims.has(address)) return n;
    return undefined;
  }

  /** Every fresh claim of the other nodes, by node (the liveness thread posts it). */
  claims(): Record<string, readonly string[]> {
    return Object.fromEntries([...this.#freshClaims()].map(([n, c]) => [n, [...c]]));
  }

  /** The claims of the claimants whose last probe is younger than D. */
  *#freshClaims(): Generator<[string, ReadonlySet<string>]> {
    const detect = this.#o.timing.intervalMs * this.#o.timing.multiplier;
    const now = this.#o.clock.now();
    for (const n of this.#claimants) {
      const r = this.#reports.get(n);
      if (r !== undefined && now - r.at < detect) yield [n, r.claims];
    }
  }

  #claimsChanged(node: string, claiming: boolean): void {
    if (claiming) this.#claimants.add(node);
    else this.#claimants.delete(node);
    this.claimsVersion++;
    this.#o.onChange();
  }

  /** What the last evaluation said of holding (see LivenessHandle). */
  lastSaidHolding(): boolean {
    return this.#holding;
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

  #lastSent = 0;

  /** Our probes' timestamps, strictly increasing (two probes in one ms would look replayed). */
  #stamp(): number {
    this.#lastSent = Math.max((this.#o.wallNow ?? Date.now)(), this.#lastSent + 1);
    return this.#lastSent;
  }

  #send(restartHoldMs?: number): void {
    const members = this.#o.members();
    const self = members.get(this.#o.node);
    const gateway = self?.gatewayCapable === true;
    const j = this.#judgement;
    const probe: Omit<Wire, "v"> = {
      n: this.#o.node,
      t: this.#stamp(),
      ok: this.#o.apiReachable(),
      h: Object.fromEntries(j?.hears ?? []),
      a: [...(j?.raw ?? [])],
      u: [...this.#heardAt.keys()].filter((n) => members.get(n)?.gatewayCapable === true),
      d: [...this.#announced],
      j: gateway ? [...(j?.down ?? [])] : [],
      ...(gateway && this.#prepared.size > 0 ? { p: [...this.#prepared] } : {}),
      ...(restartHoldMs === undefined ? {} : { r: restartHoldMs }),
    };
    const claims = gateway && this.#holding ? (this.#o.claims?.() ?? []) : [];
    this.#sentClaims = claims.join(",");
    const msg = encodeProbe(probe, this.#o.key);
    // The claims only to the nodes that may take an egress IP over (a gateway may hold hundreds).
    const toGateways =
      claims.length === 0 ? msg : encodeProbe({ ...probe, e: [...claims] }, this.#o.key);
    for (const m of members.values()) {
      if (m.name === this.#o.node) continue;
      if (m.gatewayCapable) this.#o.transport.send(toGateways, m.address);
      else if (gateway) this.#o.transport.send(msg, m.address);
    }
  }

  #evaluate(): void {
    const now = this.#o.clock.now();
    const members = this.#o.members();
    // Away for longer than D (the process was frozen, or this thread starved): what we knew is
    // stale and nobody counts what we said before any more. Start over as a node that just
    // started (as a BFD session that went down): no verdict of ours, no report of others, nobody
    // heard. A verdict kept from before would knock out the node that took over meanwhile.
    const detectMs = this.#o.timing.intervalMs * this.#o.timing.multiplier;
    if (this.#evaluatedAt !== undefined && now - this.#evaluatedAt > detectMs) {
      this.#o.log.warn(
        { awayMs: Math.round(now - this.#evaluatedAt) },
        "liveness was not evaluated for longer than the detection time: starting over",
      );
      this.#state.clear();
      this.#reports.clear();
      if (this.#claimants.size > 0) {
        this.#claimants.clear();
        this.claimsVersion++;
      }
      this.#heardAt.clear();
      this.#unlistedAt.clear();
      this.#announced = new Set();
    }
    this.#evaluatedAt = now;
    // A claim lasts as long as its probe is fresh.
    for (const n of this.#claimants) {
      const r = this.#reports.get(n);
      if (r === undefined || now - r.at >= detectMs) this.#claimsChanged(n, false);
    }
    // A node restarting its agent counts as heard until its hold ends.
    let heardAt: ReadonlyMap<string, number> = this.#heardAt;
    for (const [n, until] of this.#restartUntil) {
      if (until <= now) this.#restartUntil.delete(n);
      else heardAt = new Map([...heardAt, [n, now]]);
    }
    const j = judge({
      self: this.#o.node,
      now,
      timing: this.#o.timing,
      members,
      reports: this.#reports,
      heardAt,
      unlistedAt: this.#unlistedAt,
      state: this.#state,
    });
    // The API-side rule, with the peers' word on whether they reach the API server.
    const detect = this.#o.timing.intervalMs * this.#o.timing.multiplier;
    const settle = this.#o.apiSettleMs ?? 5000;
    const heardOk = [...this.#reports.entries()]
      .filter(
        ([n, r]) => n !== this.#o.node && members.get(n)?.gatewayCapable && now - r.at < detect,
      )
      .map(([n]) => {
        const since = this.#apiOkSince.get(n);
        return since !== undefined && now - since >= settle;
      });
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
    // Lost or found a gateway: tell the others now, not at the next probe (their votes wait on it).
    const hearsChanged =
      before !== undefined &&
      (before.hears.size !== j.hears.size ||
        [...j.hears.keys()].some((g) => !before.hears.has(g)) ||
        !sameSet(before.raw, j.raw));
    this.#judgement = j;
    this.#apiFenced = apiFenced;
    this.#holding = holding;
    // A new verdict goes out at once too (its `j`).
    if (!hearsChanged && downChanged && before !== undefined) this.#send();
    if (hearsChanged) {
      this.#send();
      this.#o.log.info(
        {
          hears: [...j.raw],
          supports: [...j.hears.keys()],
          lost: [...before.raw].filter((g) => !j.raw.has(g)),
          found: [...j.raw].filter((g) => !before.raw.has(g)),
        },
        "the gateways this node hears or supports changed",
      );
    }
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
      this.version++;
      this.#o.onChange();
    }
    // The kernel may answer half an interval past the support: a standby answers only after it
    // confirmed the verdict for that long and synced its datapath.
    if (holding)
      this.#o.onHolding?.(Math.min(j.supportedUntil - now, detect) + confirmMs(this.#o.timing));
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

const EMPTY: ReadonlySet<string> = new Set();
