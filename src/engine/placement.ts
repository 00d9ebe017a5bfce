/**
 * Placement of egress IPs on gateway nodes.
 *
 * A *unit* is what must sit on one node: policies linked by a shared explicit address, or a single
 * policy. Its candidates are the nodes its gateway selects that are usable (a live agent and an
 * identity), and for `interface` policies only those that report that interface.
 *
 *  - Without failback a unit stays on its node while that node remains a candidate (the node the
 *    oldest member had in the last outcome); a unit none of whose members had a node (a new
 *    one) goes to the least loaded candidate (fewest units), units in key order, ties to the
 *    first node by name; a unit whose node was lost goes to its rendezvous winner (below).
 *  - With `failback: true` a unit goes to its rendezvous winner (highest `rendezvousScore` of
 *    unit key and node), so it returns to its preferred node when that node recovers.
 *
 * Every unit has a *rendezvous order*: its candidates by descending `rendezvousScore`, ties by
 * name. Its **standby nodes** are the first `STANDBY_NODES` of that order without its holder:
 * the nodes that take over, in this order, when the holder is lost. The controller publishes them
 * in each policy's status so that an agent can decide a takeover locally; the controller decides
 * the same way:
 *
 *  - A unit whose node stopped being a candidate (lease lost, label or interface gone) goes to
 *    its rendezvous winner among the candidates left: the first live node of the standby list it
 *    had, whatever its failback setting. Only a unit that had no node at all (new, or no
 *    candidate until now) is placed by load.
 *
 * The lists are short so that a node joining or leaving changes few of them (rendezvous hashing:
 * a node enters or leaves the lists where it ranks among the first STANDBY_NODES + 1, a share of
 * about (STANDBY_NODES + 1) / candidates) and spreads standby duty evenly over the nodes.
 *
 * Units placed without choice (sticky or rendezvous) count before any unit is placed by load, so
 * the load a newcomer sees is the real one whatever the key order.
 *
 * `Placement` does this incrementally: inputs mark the units they concern (a node lost: the units
 * on it, and those listing it as standby; a node gained: the gateway's unplaced units, the
 * failback units it now wins and the units whose standby list it enters), and `place()` places
 * only those and recomputes only their lists.
 */

import { getOrInsert } from "../lib/maps.ts";
import {
  type CompiledSelector,
  compileSelector,
  type LabelSelector,
  type Labels,
} from "../lib/selector.ts";
import { sameValue } from "./equality.ts";

/** An accepted policy, as placement sees it. */
export interface Member {
  readonly key: string;
  readonly createdAt: string;
  readonly gateway: string;
  /** `interface` mode: only nodes that report this interface qualify. */
  readonly iface: string | undefined;
  /** Floating addresses (explicit or from the pool). */
  readonly addresses: readonly string[];
  /** Explicit addresses: policies naming the same address share a unit. */
  readonly shared: boolean;
}

export interface GatewayNodes {
  readonly nodeSelector: LabelSelector;
  readonly failback: boolean;
}

interface Unit {
  /** The unit's addresses sorted and joined, or its policy's key when it has none. */
  readonly key: string;
  /** Oldest first. */
  readonly members: Member[];
  readonly gateway: string;
  readonly iface: string | undefined;
  node: string | undefined;
  /** Rendezvous score of `node` (failback units). */
  score: number;
  /** fnv1a state after `${key}|`: scores cost the node's name only. */
  readonly seed: number;
  /** The first STANDBY_NODES candidates of the rendezvous order without `node`. */
  standby: readonly string[];
  /** Score of standby's last entry. */
  standbyFloor: number;
}

interface Candidates {
  readonly list: readonly string[];
  readonly set: ReadonlySet<string>;
}

interface Gateway {
  readonly spec: GatewayNodes;
  readonly selector: CompiledSelector;
  /** Nodes the selector matches, usable or not. */
  readonly nodes: Set<string>;
  sorted: readonly string[] | undefined;
  /** By interface ("" for none). */
  readonly candidates: Map<string, Candidates>;
}

const NONE: ReadonlySet<string> = new Set();
const NO_NODES: readonly string[] = [];

/**
 * How many standby nodes a unit lists: two cover the holder and its first standby dying
 * together; beyond that the controller still places the unit (by lease), only later.
 */
export const STANDBY_NODES = 2;

/** Scratch space of `#updateStandby` (one computation at a time). */
const TOP: string[] = new Array<string>(STANDBY_NODES).fill("");
const TOP_SCORES: number[] = new Array<number>(STANDBY_NODES).fill(0);

export function fnv1a(text: string): number {
  return fnv1aFrom(0x811c9dc5, text);
}

/** FNV-1a continued from the state `h` after a prefix: fnv1aFrom(fnv1a(a), b) === fnv1a(a + b). */
function fnv1aFrom(h: number, text: string): number {
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/**
 * MurmurHash3's finalizer. FNV-1a alone mixes the last characters poorly: node names differing
 * in their last digit ranked the nodes in only 32 of the 40,320 orders of 8 nodes, and 97 % of
 * the units whose winner was node-0 had node-1 second (so one node took over nearly all of a
 * dead node's units). Mixed, every order occurs and each node is second about equally often.
 */
function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** The rendezvous score of a unit on a node: higher ranks first. */
export function rendezvousScore(unitKey: string, node: string): number {
  return fmix32(fnv1a(`${unitKey}|${node}`));
}

/** rendezvousScore(unit.key, node), from the unit's seed: it costs the node's name only. */
function scoreOf(unit: Unit, node: string): number {
  return fmix32(fnv1aFrom(unit.seed, node));
}

/** Whether (score a, node a) ranks before (score b, node b) in a rendezvous order. */
function ranksBefore(sa: number, a: string, sb: number, b: string): boolean {
  return sa > sb || (sa === sb && a < b);
}

function byAge(a: Member, b: Member): number {
  if (a.createdAt !== b.createdAt) return a.createdAt < b.createdAt ? -1 : 1;
  return a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
}

function sameMember(a: Member, b: Member): boolean {
  return (
    a.key === b.key &&
    a.createdAt === b.createdAt &&
    a.gateway === b.gateway &&
    a.iface === b.iface &&
    a.shared === b.shared &&
    a.addresses.length === b.addresses.length &&
    a.addresses.every((x) => b.addresses.includes(x))
  );
}

export class Placement {
  readonly #gateways = new Map<string, Gateway>();
  readonly #labels = new Map<string, Labels>();
  readonly #usable = new Set<string>();
  readonly #interfaces = new Map<string, ReadonlySet<string>>();
  readonly #members = new Map<string, Member>();
  readonly #unitOf = new Map<string, Unit>();
  /** Shared (explicit) members by address. */
  readonly #sharing = new Map<string, Set<string>>();
  readonly #byGateway = new Map<string, Set<Unit>>();
  readonly #onNode = new Map<string, Set<Unit>>();
  readonly #load = new Map<string, number>();
  readonly #dirty = new Set<Unit>();
  /** Units whose standby list must be recomputed (placed units always are). */
  readonly #standbyDirty = new Set<Unit>();
  /** Units whose standby list the last place() changed. */
  readonly #standbyChanged = new Set<Unit>();
  /** Members that joined a placed unit in place: place() reports them. */
  readonly #joined = new Set<string>();
  readonly #changedGateways = new Set<string>();

  // --- inputs

  setGateway(name: string, spec: GatewayNodes | undefined): void {
    const current = this.#gateways.get(name);
    if (
      current === undefined
        ? spec === undefined
        : spec !== undefined &&
          current.spec.failback === spec.failback &&
          sameValue(current.spec.nodeSelector, spec.nodeSelector)
    )
      return;
    if (spec === undefined) this.#gateways.delete(name);
    else {
      const selector = compileSelector(spec.nodeSelector);
      const nodes = new Set<string>();
      for (const [node, labels] of this.#labels) if (selector.matches(labels)) nodes.add(node);
      this.#gateways.set(name, {
        spec,
        selector,
        nodes,
        sorted: undefined,
        candidates: new Map(),
      });
    }
    for (const u of this.#byGateway.get(name) ?? []) this.#dirty.add(u);
    this.#changedGateways.add(name);
  }

  /** A node's labels; undefined when the node is gone. */
  setNode(name: string, labels: Labels | undefined): void {
    if (labels === undefined) {
      this.setUsable(name, false);
      this.setInterfaces(name, NONE);
      this.#labels.delete(name);
    } else this.#labels.set(name, labels);
    for (const [gwName, gw] of this.#gateways) {
      const was = gw.nodes.has(name);
      const now = labels !== undefined && gw.selector.matches(labels);
      if (was === now) continue;
      if (now) gw.nodes.add(name);
      else gw.nodes.delete(name);
      gw.sorted = undefined;
      this.#changedGateways.add(gwName);
      if (this.#usable.has(name)) this.#candidateChanged(gwName, gw, name, now, undefined);
    }
  }

  /** A node may hold egress IPs: its agent is alive and it has an identity. */
  setUsable(name: string, usable: boolean): void {
    if (usable === this.#usable.has(name)) return;
    if (usable) this.#usable.add(name);
    else this.#usable.delete(name);
    for (const [gwName, gw] of this.#gateways) {
      if (gw.nodes.has(name)) this.#candidateChanged(gwName, gw, name, usable, undefined);
    }
  }

  /** Interfaces the node's agent reports with at least one address. */
  setInterfaces(name: string, interfaces: ReadonlySet<string>): void {
    const before = this.#interfaces.get(name) ?? NONE;
    if (before.size === interfaces.size && [...before].every((i) => interfaces.has(i))) return;
    if (interfaces.size === 0) this.#interfaces.delete(name);
    else this.#interfaces.set(name, interfaces);
    if (!this.#usable.has(name)) return;
    for (const [gwName, gw] of this.#gateways) {
      if (!gw.nodes.has(name)) continue;
      for (const i of new Set([...before, ...interfaces])) {
        if (before.has(i) !== interfaces.has(i))
          this.#candidateChanged(gwName, gw, name, interfaces.has(i), i);
      }
    }
  }

  /** An accepted policy; undefined when it is gone or no longer accepted. */
  setMember(key: string, member: Member | undefined): void {
    const current = this.#members.get(key);
    if (
      current === undefined
        ? member === undefined
        : member !== undefined && sameMember(current, member)
    )
      return;
    if (current === undefined && member !== undefined && this.#join(member)) return;
    if (current !== undefined && member === undefined && this.#leave(current)) return;
    // Every policy whose unit may split or merge: the old unit's, and those sharing an address.
    const affected = new Set<string>();
    const drop = (k: string) => {
      const unit = this.#unitOf.get(k);
      if (unit === undefined) return;
      for (const m of unit.members) {
        affected.add(m.key);
        this.#unitOf.delete(m.key);
      }
      this.#removeUnit(unit);
    };
    drop(key);
    if (current?.shared) {
      for (const a of current.addresses) {
        const set = this.#sharing.get(a)!;
        set.delete(key);
        if (set.size === 0) this.#sharing.delete(a);
      }
    }
    if (member === undefined) this.#members.delete(key);
    else {
      this.#members.set(key, member);
      affected.add(key);
      if (member.shared) {
        for (const a of member.addresses) {
          const set = getOrInsert(this.#sharing, a, () => new Set());
          for (const k of set) drop(k);
          set.add(key);
        }
      }
    }
    affected.delete(member === undefined ? key : "");
    for (const k of affected) if (!this.#unitOf.has(k)) this.#buildUnit(k);
  }

  /**
   * A new member whose addresses all belong to one unit already, and which is not older than that
   * unit's oldest member, joins it without rebuilding it: the unit's key, gateway, interface and
   * node stay what they are. A thousand policies naming one address cost a thousand binary
   * searches instead of a thousand rebuilds of a growing unit (measured: 5.8 s of the controller's
   * 9.8 s while 1,000 such policies were created).
   */
  #join(member: Member): boolean {
    if (!member.shared || member.addresses.length === 0) return false;
    let unit: Unit | undefined;
    for (const a of member.addresses) {
      // Policies sharing an address are in one unit: the first one names it.
      const first = this.#sharing.get(a)?.values().next().value;
      const u = first === undefined ? undefined : this.#unitOf.get(first);
      if (u === undefined || (unit !== undefined && u !== unit)) return false;
      unit = u;
    }
    const members = unit!.members;
    if (byAge(member, members[0]!) < 0) return false;
    let lo = 1;
    let hi = members.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (byAge(members[mid]!, member) < 0) lo = mid + 1;
      else hi = mid;
    }
    members.splice(lo, 0, member);
    this.#members.set(member.key, member);
    for (const a of member.addresses) this.#sharing.get(a)!.add(member.key);
    this.#unitOf.set(member.key, unit!);
    this.#joined.add(member.key);
    return true;
  }

  /**
   * A member that is not its unit's oldest leaves a unit whose members all share one address: the
   * rest stays one unit, where it is.
   */
  #leave(current: Member): boolean {
    const unit = this.#unitOf.get(current.key);
    if (
      unit === undefined ||
      !current.shared ||
      current.addresses.length !== 1 ||
      unit.key !== current.addresses[0] ||
      unit.members[0] === current
    )
      return false;
    unit.members.splice(unit.members.indexOf(current), 1);
    this.#members.delete(current.key);
    const set = this.#sharing.get(unit.key)!;
    set.delete(current.key);
    this.#unitOf.delete(current.key);
    this.#joined.delete(current.key);
    return true;
  }

  #buildUnit(start: string): void {
    const first = this.#members.get(start)!;
    const members: Member[] = [first];
    if (first.shared) {
      // The component of `start` in the graph of policies and the addresses they share.
      const seen = new Set([start]);
      for (let i = 0; i < members.length; i++) {
        for (const a of members[i]!.addresses) {
          for (const k of this.#sharing.get(a) ?? []) {
            if (seen.has(k)) continue;
            seen.add(k);
            members.push(this.#members.get(k)!);
          }
        }
      }
      members.sort(byAge);
    }
    const oldest = members[0]!;
    let key: string;
    if (members.length === 1 && oldest.addresses.length <= 1) {
      key = oldest.addresses[0] ?? oldest.key;
    } else {
      const addresses = new Set<string>();
      for (const m of members) for (const a of m.addresses) addresses.add(a);
      key = addresses.size > 0 ? [...addresses].sort().join(",") : oldest.key;
    }
    const unit: Unit = {
      key,
      members,
      gateway: oldest.gateway,
      iface: oldest.iface,
      node: undefined,
      score: -1,
      seed: fnv1aFrom(0x811c9dc5, `${key}|`),
      standby: NO_NODES,
      standbyFloor: -1,
    };
    for (const m of members) this.#unitOf.set(m.key, unit);
    getOrInsert(this.#byGateway, unit.gateway, () => new Set()).add(unit);
    this.#dirty.add(unit);
  }

  #removeUnit(unit: Unit): void {
    this.#unplace(unit);
    this.#dirty.delete(unit);
    this.#standbyDirty.delete(unit);
    const set = this.#byGateway.get(unit.gateway);
    set?.delete(unit);
    if (set?.size === 0) this.#byGateway.delete(unit.gateway);
  }

  #unplace(unit: Unit): void {
    const node = unit.node;
    if (node === undefined) return;
    const n = this.#load.get(node)! - 1;
    if (n === 0) this.#load.delete(node);
    else this.#load.set(node, n);
    const set = this.#onNode.get(node)!;
    set.delete(unit);
    if (set.size === 0) this.#onNode.delete(node);
    unit.node = undefined;
    unit.score = -1;
  }

  #put(unit: Unit, node: string | undefined, score: number): void {
    unit.node = node;
    unit.score = score;
    if (node === undefined) return;
    this.#load.set(node, (this.#load.get(node) ?? 0) + 1);
    getOrInsert(this.#onNode, node, () => new Set()).add(unit);
  }

  /** `iface` undefined: the node became (or stopped being) a candidate for every unit. */
  #candidateChanged(
    name: string,
    gw: Gateway,
    node: string,
    gained: boolean,
    iface: string | undefined,
  ): void {
    if (iface === undefined) gw.candidates.clear();
    else gw.candidates.delete(iface);
    this.#changedGateways.add(name);
    if (!gained) {
      for (const u of this.#onNode.get(node) ?? []) {
        if (u.gateway === name && (iface === undefined || u.iface === iface)) this.#dirty.add(u);
      }
      // A scan of short lists costs less than keeping an index of them (measured).
      for (const u of this.#byGateway.get(name) ?? []) {
        if (u.standby.includes(node) && (iface === undefined || u.iface === iface))
          this.#standbyDirty.add(u);
      }
      return;
    }
    const interfaces = this.#interfaces.get(node) ?? NONE;
    for (const u of this.#byGateway.get(name) ?? []) {
      if (
        iface !== undefined ? u.iface !== iface : u.iface !== undefined && !interfaces.has(u.iface)
      )
        continue;
      if (u.node === undefined) {
        this.#dirty.add(u);
        continue;
      }
      const score = scoreOf(u, node);
      if (gw.spec.failback && ranksBefore(score, node, u.score, u.node)) this.#dirty.add(u);
      else if (
        u.standby.length < STANDBY_NODES ||
        ranksBefore(score, node, u.standbyFloor, u.standby[u.standby.length - 1]!)
      )
        this.#standbyDirty.add(u);
    }
  }

  /**
   * Recomputes a placed unit's standby list: the first STANDBY_NODES of its candidates by
   * rendezvous order, its holder left out. @returns whether the list changed
   */
  #updateStandby(unit: Unit): boolean {
    // The first STANDBY_NODES by insertion into scratch arrays: candidates come in name order, so
    // a tie keeps the earlier name first. A list is allocated only when it changed.
    const top = TOP;
    const scores = TOP_SCORES;
    let count = 0;
    if (unit.node !== undefined) {
      for (const n of this.#candidates(unit.gateway, unit.iface).list) {
        if (n === unit.node) continue;
        const s = scoreOf(unit, n);
        let i = count;
        while (i > 0 && s > scores[i - 1]!) i--;
        if (i >= STANDBY_NODES) continue;
        for (let j = Math.min(count, STANDBY_NODES - 1); j > i; j--) {
          top[j] = top[j - 1]!;
          scores[j] = scores[j - 1]!;
        }
        top[i] = n;
        scores[i] = s;
        if (count < STANDBY_NODES) count++;
      }
    }
    const floor = count === 0 ? -1 : scores[count - 1]!;
    const before = unit.standby;
    let same = before.length === count;
    for (let i = 0; same && i < count; i++) same = before[i] === top[i];
    if (same) {
      unit.standbyFloor = floor;
      return false;
    }
    unit.standby = count === 0 ? NO_NODES : top.slice(0, count);
    unit.standbyFloor = floor;
    return true;
  }

  #candidates(gateway: string, iface: string | undefined): Candidates {
    const gw = this.#gateways.get(gateway);
    if (gw === undefined) return { list: [], set: NONE };
    let c = gw.candidates.get(iface ?? "");
    if (c === undefined) {
      const list = [...gw.nodes]
        .filter(
          (n) =>
            this.#usable.has(n) &&
            (iface === undefined || (this.#interfaces.get(n)?.has(iface) ?? false)),
        )
        .sort();
      c = { list, set: new Set(list) };
      gw.candidates.set(iface ?? "", c);
    }
    return c;
  }

  // --- placing

  /**
   * Places the units whose inputs changed.
   * @param lastNode the node each policy had in the last outcome
   * @returns the policies of the units placed (their node may be the same as before; their
   *   standby list is recomputed too)
   */
  place(lastNode: (key: string) => string | undefined): Set<string> {
    const placed = new Set<string>(this.#joined);
    this.#joined.clear();
    this.#standbyChanged.clear();
    if (this.#dirty.size === 0 && this.#standbyDirty.size === 0) return placed;
    const units = [...this.#dirty];
    this.#dirty.clear();
    for (const u of units) this.#unplace(u);
    const byLoad: Unit[] = [];
    for (const u of units) {
      for (const m of u.members) placed.add(m.key);
      const c = this.#candidates(u.gateway, u.iface);
      let previous: string | undefined;
      let hadNode = false;
      if (this.#gateways.get(u.gateway)?.spec.failback !== true) {
        for (const m of u.members) {
          const n = lastNode(m.key);
          if (n === undefined) continue;
          hadNode = true;
          if (c.set.has(n)) {
            previous = n;
            break;
          }
        }
        if (previous !== undefined) {
          this.#put(u, previous, -1);
          continue;
        }
        if (!hadNode) {
          byLoad.push(u);
          continue;
        }
      }
      // Failback, or its node was lost: the rendezvous winner, the first of its standby order.
      let best: string | undefined;
      let score = -1;
      for (const n of c.list) {
        const s = scoreOf(u, n);
        if (s > score) {
          score = s;
          best = n;
        }
      }
      this.#put(u, best, score);
    }
    byLoad.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    for (const u of byLoad) {
      let chosen: string | undefined;
      let least = Number.POSITIVE_INFINITY;
      for (const n of this.#candidates(u.gateway, u.iface).list) {
        const load = this.#load.get(n) ?? 0;
        if (load < least) {
          least = load;
          chosen = n;
        }
      }
      this.#put(u, chosen, -1);
    }
    for (const u of units) {
      this.#standbyDirty.delete(u);
      this.#updateStandby(u);
    }
    for (const u of this.#standbyDirty) if (this.#updateStandby(u)) this.#standbyChanged.add(u);
    this.#standbyDirty.clear();
    return placed;
  }

  /**
   * Policies whose standby list the last `place()` changed without placing their unit: for them
   * only that list differs from their last outcome. (Those it placed it returned.)
   */
  *standbyChanged(): Iterable<string> {
    for (const u of this.#standbyChanged) for (const m of u.members) yield m.key;
  }

  // --- results

  nodeOf(key: string): string | undefined {
    return this.#unitOf.get(key)?.node;
  }

  /**
   * The nodes that take over the policy's unit, in order, when its node is lost: the next
   * candidates of its rendezvous order (at most STANDBY_NODES).
   */
  standbyOf(key: string): readonly string[] {
    return this.#unitOf.get(key)?.standby ?? NO_NODES;
  }

  /** The gateway whose nodes the policy's unit is placed on (its oldest member's). */
  gatewayOf(key: string): string | undefined {
    return this.#unitOf.get(key)?.gateway;
  }

  /** Policies placed on a node. */
  *placedOn(node: string): Iterable<string> {
    for (const u of this.#onNode.get(node) ?? []) for (const m of u.members) yield m.key;
  }

  /** Policies whose unit is placed by a gateway (its oldest member's). */
  *placedBy(gateway: string): Iterable<string> {
    for (const u of this.#byGateway.get(gateway) ?? []) for (const m of u.members) yield m.key;
  }

  /** Nodes a gateway's selector matches, usable or not, by name. */
  gatewayNodes(gateway: string): readonly string[] {
    const gw = this.#gateways.get(gateway);
    if (gw === undefined) return [];
    gw.sorted ??= [...gw.nodes].sort();
    return gw.sorted;
  }

  /** Gateways whose selector matches a node. */
  *gatewaysOf(node: string): Iterable<string> {
    for (const [name, gw] of this.#gateways) if (gw.nodes.has(node)) yield name;
  }

  /** Gateways whose nodes or candidates changed since the last call. */
  takeChangedGateways(): Set<string> {
    const out = new Set(this.#changedGateways);
    this.#changedGateways.clear();
    return out;
  }
}
