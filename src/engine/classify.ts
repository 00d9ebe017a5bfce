/**
 * Classification in O(1) of the number of policies (the nftables datapath).
 *
 * The iptables datapath walks one rule per policy for every steered packet, each with two or
 * three set lookups: 1,000 policies in front of a pod cost its traffic 20–100× (issue 8). Here
 * the precedence between policies (priority, age, name), their excluded CIDRs, the cluster's own
 * CIDRs and their ports are resolved ahead of time into **disjoint** entries, so that a packet is
 * classified by two lookups whatever the number of policies:
 *
 *   1. its source address → its *class*: the ordered list of policies that select that source on
 *      this node (pods selected by the same policies share a class);
 *   2. (destination, protocol, port) in that class's map → the verdict of the first policy, in
 *      precedence order, whose destinations and ports hold the packet: steer it to a gateway node,
 *      SNAT it to an egress IP here, or drop it (fail closed). No entry: no policy decides.
 *
 * The destination axis is split with range sets, the (protocol, port) axis into atoms: the
 * coarsest partition in which every policy's ports are a union of atoms. A class of policies
 * without ports has one atom (every protocol, every port) and so one entry per destination range.
 *
 * `ClassTable` keeps classes per key (incremental): a pod added to a class is one source; a
 * policy change recomputes the entries of the classes it belongs to.
 */
import { createHash } from "node:crypto";
import type { PortSpec } from "../api/types.ts";
import { hashName } from "../lib/hash.ts";
import {
  bits,
  cidrToRange,
  type Family,
  formatAddress,
  formatCidr,
  parseCidr,
  type Range,
  rangeToCidrs,
} from "../lib/ip.ts";
import { getOrInsert } from "../lib/maps.ts";
import { RangeSet } from "../lib/rangeset.ts";
import { sameItems } from "./equality.ts";
import { compareHostCidrs, hostOfCidr, sortedHosts } from "./hosts.ts";

/** An inclusive (protocol, port) box: protocol 0–255, port 0–65535. */
export interface L4Box {
  readonly proto: readonly [number, number];
  readonly port: readonly [number, number];
}

export type ClassVerdict =
  /** Steer to the gateway node `nodeID`, naming the policy's tunnel class (when it has one). */
  | { readonly kind: "steer"; readonly nodeID: number; readonly tunnelClass?: number | undefined }
  /**
   * SNAT here to the egress IP `eip`; when the policy has several of this family, `eips` holds
   * them all, in address order (`eip` is the first), and new connections go round-robin over them.
   */
  | { readonly kind: "snat"; readonly eip: string; readonly eips?: readonly string[] | undefined }
  | { readonly kind: "drop" };

/** The egress IPs a SNAT verdict spreads new connections over (one, mostly). */
export function snatAddresses(v: {
  readonly eip: string;
  readonly eips?: readonly string[] | undefined;
}): readonly string[] {
  return v.eips ?? [v.eip];
}

/** One disjoint entry of a class: destination × (protocol, port) → verdict. */
export interface ClassEntry {
  /** A canonical CIDR, or "first-last" when the range is not one CIDR. */
  readonly dst: string;
  readonly l4: L4Box;
  readonly verdict: ClassVerdict;
  /** The policy that decides here (for per-policy counters). */
  readonly policy: string;
}

/** A class of sources and its entries, as the datapath holds them. */
export interface TrafficClass {
  /** Stable: a hash of its anchor source (see className). Names the class's chain and map. */
  readonly name: string;
  /** The source that names it (a host CIDR of `sources`): unique among the family's classes. */
  readonly anchor: string;
  readonly family: Family;
  /** Policy keys in precedence order. */
  readonly policies: readonly string[];
  /** Host CIDRs of the sources in this class, sorted. */
  readonly sources: readonly string[];
  readonly entries: readonly ClassEntry[];
}

/** What one policy contributes to classification in one family on this node. */
export interface ClassPolicy {
  readonly key: string;
  /** Canonical CIDRs: the destinations minus its excluded CIDRs (the ignore set comes later). */
  readonly destinations: readonly string[];
  readonly excluded: readonly string[];
  readonly ports: readonly PortSpec[];
  readonly verdict: ClassVerdict;
}

const PROTOCOLS: Readonly<Record<string, number>> = { TCP: 6, UDP: 17, SCTP: 132 };
const ANY: L4Box = { proto: [0, 255], port: [0, 65535] };

/** A policy's ports as boxes; no ports: every protocol and port. */
export function l4Boxes(ports: readonly PortSpec[]): L4Box[] {
  if (ports.length === 0) return [ANY];
  return ports.map((p) => {
    const proto = PROTOCOLS[p.protocol ?? "TCP"]!;
    const port: [number, number] =
      p.port === undefined ? [0, 65535] : [p.port, p.endPort ?? p.port];
    return { proto: [proto, proto], port };
  });
}

/** The coarsest partition of the (protocol, port) space in which each box set is a union. */
function atoms(boxSets: readonly (readonly L4Box[])[]): L4Box[] {
  const protoCuts = new Set<number>([0, 256]);
  const portCuts = new Map<number, Set<number>>();
  for (const boxes of boxSets) {
    for (const b of boxes) {
      protoCuts.add(b.proto[0]);
      protoCuts.add(b.proto[1] + 1);
      if (b.proto[0] === b.proto[1] && (b.port[0] !== 0 || b.port[1] !== 65535)) {
        const cuts = getOrInsert(portCuts, b.proto[0], () => new Set([0, 65536]));
        cuts.add(b.port[0]);
        cuts.add(b.port[1] + 1);
      }
    }
  }
  const protos = [...protoCuts].sort((a, b) => a - b);
  const out: L4Box[] = [];
  for (let i = 0; i + 1 < protos.length; i++) {
    const lo = protos[i]!;
    const hi = protos[i + 1]! - 1;
    const cuts = lo === hi ? portCuts.get(lo) : undefined;
    if (cuts === undefined) {
      out.push({ proto: [lo, hi], port: [0, 65535] });
      continue;
    }
    const ports = [...cuts].sort((a, b) => a - b);
    for (let j = 0; j + 1 < ports.length; j++)
      out.push({ proto: [lo, hi], port: [ports[j]!, ports[j + 1]! - 1] });
  }
  return out;
}

function contains(box: L4Box, atom: L4Box): boolean {
  return (
    box.proto[0] <= atom.proto[0] &&
    atom.proto[1] <= box.proto[1] &&
    box.port[0] <= atom.port[0] &&
    atom.port[1] <= box.port[1]
  );
}

function rangeText(r: Range): string {
  const cidrs = rangeToCidrs(r);
  if (cidrs.length === 1) return formatCidr(cidrs[0]!);
  return `${formatAddress({ family: r.family, value: r.first })}-${formatAddress({ family: r.family, value: r.last })}`;
}

/** A policy's destinations in one family, minus its excluded CIDRs and the ignore set. */
function regionOf(p: ClassPolicy, family: Family, ignore: RangeSet): RangeSet {
  const set = new RangeSet();
  const mine = p.destinations.filter((d) => (d.includes(":") ? 6 : 4) === family);
  if (p.destinations.length === 0)
    set.add({ family, first: 0n, last: (1n << BigInt(bits(family))) - 1n });
  for (const d of mine) set.add(cidrToRange(parseCidr(d)));
  for (const e of p.excluded) {
    const c = parseCidr(e);
    if (c.family === family) set.subtract(cidrToRange(c));
  }
  for (const r of ignore.ranges(family)) set.subtract(r);
  return set;
}

/**
 * The disjoint entries of one class: its policies, in precedence order, each taking what the
 * ones before it left. Pure.
 */
export function classEntries(
  policies: readonly ClassPolicy[],
  family: Family,
  ignore: RangeSet,
  reachOf: (p: ClassPolicy) => readonly Range[] = (p) => regionOf(p, family, ignore).ranges(family),
): ClassEntry[] {
  const boxes = policies.map((p) => l4Boxes(p.ports));
  const reach = policies.map(reachOf);
  const out: ClassEntry[] = [];
  for (const atom of atoms(boxes)) {
    const active: number[] = [];
    for (let i = 0; i < policies.length; i++)
      if (boxes[i]!.some((b) => contains(b, atom))) active.push(i);
    for (const { range, winner } of firstCovering(active, reach, family)) {
      const p = policies[winner]!;
      out.push({ dst: rangeText(range), l4: atom, verdict: p.verdict, policy: p.key });
    }
  }
  return out.sort(compareEntries);
}

/**
 * For the policies `indices` (in precedence order), the maximal ranges each one is the first to
 * cover: a sweep over the range boundaries with a min-heap of the policies covering the current
 * point, O(n log n) in the number of ranges (a class of 10,000 policies is one sweep, not
 * 10,000 subtractions).
 */
function firstCovering(
  indices: readonly number[],
  reach: readonly (readonly Range[])[],
  family: Family,
): { range: Range; winner: number }[] {
  const events: { at: bigint; policy: number; start: boolean }[] = [];
  for (const i of indices) {
    for (const r of reach[i]!) {
      events.push({ at: r.first, policy: i, start: true });
      events.push({ at: r.last + 1n, policy: i, start: false });
    }
  }
  events.sort((a, b) => (a.at < b.at ? -1 : a.at > b.at ? 1 : 0));
  const heap = new MinHeap();
  const ended = new Map<number, number>();
  const out: { range: Range; winner: number }[] = [];
  let k = 0;
  while (k < events.length) {
    const at = events[k]!.at;
    for (; k < events.length && events[k]!.at === at; k++) {
      const e = events[k]!;
      if (e.start) heap.push(e.policy);
      else ended.set(e.policy, (ended.get(e.policy) ?? 0) + 1);
    }
    // Lazy deletion: drop ended policies from the top.
    for (let top = heap.peek(); top !== undefined && (ended.get(top) ?? 0) > 0; top = heap.peek()) {
      heap.pop();
      ended.set(top, ended.get(top)! - 1);
    }
    const winner = heap.peek();
    if (winner === undefined || k >= events.length) continue;
    const last = events[k]!.at - 1n;
    const prev = out[out.length - 1];
    if (prev !== undefined && prev.winner === winner && prev.range.last + 1n === at)
      out[out.length - 1] = { winner, range: { family, first: prev.range.first, last } };
    else out.push({ winner, range: { family, first: at, last } });
  }
  return out;
}

/** A binary min-heap of policy indices (smaller index = higher precedence). */
class MinHeap {
  readonly #a: number[] = [];
  push(v: number): void {
    const a = this.#a;
    a.push(v);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (a[p]! <= a[i]!) break;
      [a[p], a[i]] = [a[i]!, a[p]!];
      i = p;
    }
  }
  peek(): number | undefined {
    return this.#a[0];
  }
  pop(): void {
    const a = this.#a;
    const last = a.pop();
    if (last === undefined || a.length === 0) return;
    a[0] = last;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < a.length && a[l]! < a[m]!) m = l;
      if (r < a.length && a[r]! < a[m]!) m = r;
      if (m === i) break;
      [a[m], a[i]] = [a[i]!, a[m]!];
      i = m;
    }
  }
}

function compareEntries(a: ClassEntry, b: ClassEntry): number {
  return (
    a.l4.proto[0] - b.l4.proto[0] ||
    a.l4.port[0] - b.l4.port[0] ||
    (a.dst < b.dst ? -1 : a.dst > b.dst ? 1 : 0)
  );
}

/**
 * The name of a class, from its anchor: the one of its sources whose `anchorHash` is smallest
 * (ties by text). Every source is in one class of its family, so names are unique, and the same
 * sources give the same name after a restart. A class keeps its name when policies come or go
 * over the same sources (at scale the common change: a policy added for pods that other policies
 * select already costs the nftables datapath its entries, not a new map of every entry and a new
 * verdict for every source, as a name made of the policies did), and a source joining or leaving
 * renames it only when it is, or beats, the anchor: one chance in the class's size, in whatever
 * order IPAM hands out the addresses.
 */
export function className(family: Family, anchor: string): string {
  return `c${family}-${hashName(`${family} ${anchor}`, 12)}`;
}

/** FNV-1a (32 bits) of a source: the order sources compete in to anchor their class. */
function anchorHash(host: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < host.length; i++) h = Math.imul(h ^ host.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

// ------------------------------------------------------------------------------------------------

interface Member {
  readonly policy: ClassPolicy;
  readonly sources: readonly string[];
}

/** A source: the policies that select it, and their key hashes XORed (its class key). */
interface Host {
  readonly policies: Set<string>;
  a: number;
  b: number;
}

/** A class: the policies that select its sources (the same for every one of them). */
interface Class {
  readonly policies: ReadonlySet<string>;
  readonly hosts: Set<string>;
}

/**
 * The classes of one family, kept per key. Feed it each policy's classification and sources
 * (in any order) and the precedence order; `classes()` returns them sorted by name, unchanged
 * classes by identity.
 *
 * A source's class is the set of its policies, keyed by the XOR of their 64-bit key hashes and
 * their number, updated as a policy comes or goes: a policy added over 1,000 sources costs each
 * one a hash, not a sort of its 1,000 policies (at 1,000 policies over the same pods that sort
 * was a large part of an agent's work). Two different sets with one key would need a 64-bit collision
 * among a node's few classes. The order of a class's policies is applied when it is built, so a
 * new precedence order rebuilds only the classes whose policies it reorders.
 */
export class ClassTable {
  readonly #family: Family;
  readonly #members = new Map<string, Member>();
  readonly #hosts = new Map<string, Host>();
  /** policy key → its two 32-bit hashes */
  readonly #keyHashes = new Map<string, readonly [number, number]>();
  /** source host → its class key */
  readonly #hostClass = new Map<string, string>();
  /** class key → its policies and hosts */
  readonly #classes = new Map<string, Class>();
  /** policy key → class keys it is part of */
  readonly #policyClasses = new Map<string, Set<string>>();
  readonly #built = new Map<string, TrafficClass>();
  /** class key → the source that names it (see className) */
  readonly #anchors = new Map<string, string>();
  /** source host → anchorHash, kept while the host is in a class */
  readonly #anchorHashes = new Map<string, number>();
  readonly #dirtyHosts = new Set<string>();
  readonly #dirtyClasses = new Set<string>();
  /** class key → hosts that joined it / left it since it was last built */
  readonly #joined = new Map<string, string[]>();
  readonly #left = new Map<string, Set<string>>();
  #rank = new Map<string, number>();
  #ignore = new RangeSet();
  /** A policy's reach in this family minus the ignore set, while both stay the same. */
  #reach = new WeakMap<ClassPolicy, readonly Range[]>();
  #list: readonly TrafficClass[] = [];
  #listDirty = true;

  constructor(family: Family) {
    this.#family = family;
  }

  /** A policy that classifies here with these sources; `undefined`: it does not (any more). */
  set(key: string, policy: ClassPolicy | undefined, sources: readonly string[]): void {
    const before = this.#members.get(key);
    if (policy === undefined) {
      if (before === undefined) return;
      this.#members.delete(key);
      for (const h of before.sources) this.#unlink(h, key);
      this.#keyHashes.delete(key);
      this.#markPolicy(key);
      return;
    }
    this.#members.set(key, { policy, sources });
    if (before === undefined || before.policy !== policy) this.#markPolicy(key);
    if (before?.sources === sources) return;
    const old = new Set(before?.sources ?? []);
    const now = new Set(sources);
    for (const h of old) if (!now.has(h)) this.#unlink(h, key);
    for (const h of now) if (!old.has(h)) this.#link(h, key);
  }

  /** Precedence: policy key → rank (0 decides first). Rebuilds the classes it reorders. */
  setOrder(rank: ReadonlyMap<string, number>): void {
    let same = rank.size === this.#rank.size;
    if (same) for (const [k, r] of rank) if (this.#rank.get(k) !== r) same = false;
    if (same) return;
    this.#rank = new Map(rank);
    for (const [key, built] of this.#built) {
      const p = built.policies;
      for (let i = 1; i < p.length; i++)
        if (this.#compare(p[i - 1]!, p[i]!) > 0) {
          this.#dirtyClasses.add(key);
          break;
        }
    }
  }

  setIgnore(ignore: RangeSet): void {
    this.#ignore = ignore;
    this.#reach = new WeakMap();
    for (const c of this.#classes.keys()) this.#dirtyClasses.add(c);
  }

  #compare(a: string, b: string): number {
    return (this.#rank.get(a) ?? 0) - (this.#rank.get(b) ?? 0) || (a < b ? -1 : a > b ? 1 : 0);
  }

  #hashOf(key: string): readonly [number, number] {
    return getOrInsert(this.#keyHashes, key, () => {
      const d = createHash("sha256").update(key).digest();
      return [d.readUInt32LE(0), d.readUInt32LE(4)] as const;
    });
  }

  /** Whether source `a` anchors a class before source `b`. */
  #beats(a: string, b: string): boolean {
    const ha = getOrInsert(this.#anchorHashes, a, () => anchorHash(a));
    const hb = getOrInsert(this.#anchorHashes, b, () => anchorHash(b));
    return ha < hb || (ha === hb && a < b);
  }

  #link(host: string, key: string): void {
    const h = getOrInsert(this.#hosts, host, () => ({ policies: new Set<string>(), a: 0, b: 0 }));
    if (h.policies.has(key)) return;
    h.policies.add(key);
    const [a, b] = this.#hashOf(key);
    h.a ^= a;
    h.b ^= b;
    this.#dirtyHosts.add(host);
  }

  #unlink(host: string, key: string): void {
    const h = this.#hosts.get(host);
    if (h === undefined || !h.policies.delete(key)) return;
    const [a, b] = this.#hashOf(key);
    h.a ^= a;
    h.b ^= b;
    if (h.policies.size === 0) this.#hosts.delete(host);
    this.#dirtyHosts.add(host);
  }

  #markPolicy(key: string): void {
    for (const c of this.#policyClasses.get(key) ?? []) this.#dirtyClasses.add(c);
  }

  #reachOf = (p: ClassPolicy): readonly Range[] =>
    getOrInsert(this.#reach, p, () => regionOf(p, this.#family, this.#ignore).ranges(this.#family));

  classes(): readonly TrafficClass[] {
    // Sources whose set of policies changed move between classes.
    for (const h of this.#dirtyHosts) {
      const host = this.#hosts.get(h);
      const key =
        host === undefined
          ? ""
          : `${host.policies.size}.${host.a.toString(36)}.${host.b.toString(36)}`;
      const before = this.#hostClass.get(h);
      if (before === key) continue;
      if (before !== undefined) {
        this.#classes.get(before)!.hosts.delete(h);
        getOrInsert(this.#left, before, () => new Set()).add(h);
        this.#dirtyClasses.add(before);
      }
      if (host === undefined) {
        this.#hostClass.delete(h);
        this.#anchorHashes.delete(h);
        continue;
      }
      this.#hostClass.set(h, key);
      const c = getOrInsert(this.#classes, key, () => {
        for (const p of host.policies)
          getOrInsert(this.#policyClasses, p, () => new Set()).add(key);
        return { policies: new Set(host.policies), hosts: new Set<string>() };
      });
      c.hosts.add(h);
      getOrInsert(this.#joined, key, () => []).push(h);
      this.#dirtyClasses.add(key);
    }
    this.#dirtyHosts.clear();
    /** Classes rebuilt under the name they had. */
    const replaced: TrafficClass[] = [];
    for (const key of this.#dirtyClasses) {
      const c = this.#classes.get(key);
      const before = this.#built.get(key);
      if (c === undefined || c.hosts.size === 0) {
        this.#classes.delete(key);
        this.#left.delete(key);
        this.#joined.delete(key);
        this.#anchors.delete(key);
        for (const p of c?.policies ?? []) {
          const classes = this.#policyClasses.get(p);
          classes?.delete(key);
          if (classes?.size === 0) this.#policyClasses.delete(p);
        }
        if (before !== undefined) {
          this.#built.delete(key);
          this.#listDirty = true;
        }
        continue;
      }
      const hosts = c.hosts;
      const ordered = [...c.policies].sort((a, b) => this.#compare(a, b));
      const policies =
        before !== undefined && sameItems(before.policies, ordered) ? before.policies : ordered;
      // Sorted sources: the last ones, minus those that left, plus those that joined (a merge,
      // not a sort of the whole class: a gateway's class may hold 100,000 pods).
      const left = this.#left.get(key);
      // Each looked up once, not twice per comparison.
      const joined = sortedHosts(
        (this.#joined.get(key) ?? []).filter((h) => hosts.has(h)).map(hostOfCidr),
      );
      const kept = (before?.sources ?? []).filter(
        (h) => left === undefined || !left.has(h) || hosts.has(h),
      );
      const sources = mergeSorted(kept, joined);
      this.#left.delete(key);
      this.#joined.delete(key);
      // The anchor: kept unless it left (then every source competes again), else the best of it
      // and the sources that joined.
      let anchor = this.#anchors.get(key);
      for (const h of anchor === undefined || !hosts.has(anchor) ? sources : joined)
        if (anchor === undefined || !hosts.has(anchor) || this.#beats(h, anchor)) anchor = h;
      const entries = classEntries(
        policies.map((p) => this.#members.get(p)!.policy),
        this.#family,
        this.#ignore,
        this.#reachOf,
      );
      this.#anchors.set(key, anchor!);
      const built: TrafficClass = {
        name: className(this.#family, anchor!),
        anchor: anchor!,
        family: this.#family,
        policies,
        sources:
          before !== undefined && sameItems(before.sources, sources) ? before.sources : sources,
        entries:
          before !== undefined && sameEntries(before.entries, entries) ? before.entries : entries,
      };
      if (before === undefined || before.name !== built.name) {
        this.#built.set(key, built);
        this.#listDirty = true;
      } else if (
        before.policies !== built.policies ||
        before.sources !== built.sources ||
        before.entries !== built.entries
      ) {
        this.#built.set(key, built);
        replaced.push(built);
      }
    }
    this.#dirtyClasses.clear();
    if (this.#listDirty) {
      this.#list = [...this.#built.values()].sort((a, b) =>
        a.name < b.name ? -1 : a.name > b.name ? 1 : 0,
      );
      this.#listDirty = false;
    } else if (replaced.length > 0) {
      // Same names (a pod added to a class): the new classes in the old places, no sort of 1,000.
      const list = this.#list.slice();
      for (const c of replaced) list[indexByName(list, c.name)] = c;
      this.#list = list;
    }
    return this.#list;
  }
}

/**
 * Walks two class lists sorted by name (as `ClassTable.classes()` returns them): `fn(old,
 * undefined)` for a class gone, `fn(undefined, new)` for a class added, `fn(old, new)` for a
 * class rebuilt under its name (and, with `all`, for an unchanged one too). Stops at the first
 * call that returns true, and returns true then.
 */
export function forClassChanges(
  before: readonly TrafficClass[],
  after: readonly TrafficClass[],
  all: boolean,
  fn: (o: TrafficClass | undefined, c: TrafficClass | undefined) => boolean | undefined,
): boolean {
  let i = 0;
  let j = 0;
  while (i < before.length || j < after.length) {
    const o = before[i];
    const c = after[j];
    if (o !== undefined && c !== undefined && o.name === c.name) {
      i++;
      j++;
      if ((o !== c || all) && fn(o, c) === true) return true;
    } else if (c === undefined || (o !== undefined && o.name < c.name)) {
      i++;
      if (fn(o, undefined) === true) return true;
    } else {
      j++;
      if (fn(undefined, c) === true) return true;
    }
  }
  return false;
}

/** Where the class named `name` is in a list sorted by name (it must be there). */
function indexByName(list: readonly TrafficClass[], name: string): number {
  let lo = 0;
  let hi = list.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (list[mid]!.name < name) lo = mid + 1;
    else hi = mid;
  }
  if (list[lo]?.name !== name) throw new Error(`class ${name} is not in the list`);
  return lo;
}

/** Two sorted lists of host CIDRs as one, without duplicates. */
function mergeSorted(a: readonly string[], b: readonly string[]): string[] {
  if (b.length === 0) return a as string[];
  const out: string[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    if (j >= b.length) out.push(a[i++]!);
    else if (i >= a.length) out.push(b[j++]!);
    else {
      const c = compareHostCidrs(a[i]!, b[j]!);
      if (c < 0) out.push(a[i++]!);
      else if (c > 0) out.push(b[j++]!);
      else {
        out.push(a[i++]!);
        j++;
      }
    }
  }
  return out;
}

function sameVerdict(a: ClassVerdict, b: ClassVerdict): boolean {
  if (a.kind !== b.kind) return false;
  if (a.kind === "steer")
    return a.nodeID === (b as typeof a).nodeID && a.tunnelClass === (b as typeof a).tunnelClass;
  if (a.kind === "snat") return sameItems(snatAddresses(a), snatAddresses(b as typeof a));
  return true;
}

export function sameEntries(a: readonly ClassEntry[], b: readonly ClassEntry[]): boolean {
  return (
    a.length === b.length &&
    a.every((x, i) => {
      const y = b[i]!;
      return (
        x.dst === y.dst &&
        x.policy === y.policy &&
        x.l4.proto[0] === y.l4.proto[0] &&
        x.l4.proto[1] === y.l4.proto[1] &&
        x.l4.port[0] === y.l4.port[0] &&
        x.l4.port[1] === y.l4.port[1] &&
        sameVerdict(x.verdict, y.verdict)
      );
    })
  );
}
