/**
 * planNode(view) → NodePlan: the datapath one node must carry. Pure: no clock, kernel or API.
 *
 * Layout (per family, see docs/datapath.md for the packet walk):
 *
 *   mangle PREROUTING  1 → SALLYPORT-MARK-REQUEST   steer: first matching policy wins (-g)
 *   mangle FORWARD     1 → SALLYPORT-RESET-MARK     steered → keep mark (+ MSS clamp)
 *   mangle POSTROUTING 1 → SALLYPORT-KEEP-MARK      keep mark → ACCEPT
 *   filter FORWARD     1 → SALLYPORT-FORWARD        keep mark / from tunnel → ACCEPT
 *   filter OUTPUT      1 → SALLYPORT-KEEP-MARK      keep mark → ACCEPT (the VXLAN outer packet)
 *   nat    POSTROUTING 1 → SALLYPORT-NO-SNAT        keep mark → ACCEPT (no CNI masquerade)
 *   nat    POSTROUTING 2 → SALLYPORT-SNAT-EIP       gateway: SNAT --to-source EIP (a policy with
 *                                                  several egress IPs of a family: one rule each,
 *                                                  `-m statistic --mode nth` spreading connections
 *                                                  round-robin)
 *
 * NO-SNAT comes before SNAT-EIP (the seed has them the other way round): a packet that this node
 * steers to another gateway must never be rewritten by a local SNAT rule of a lower-precedence
 * policy whose gateway happens to be this node.
 */

import type { PortSpec } from "../api/types.ts";
import { sameSet } from "../lib/equal.ts";
import {
  type Cidr,
  cidrContainsAddress,
  cidrToRange,
  FAMILIES,
  type Family,
  familyOfText,
  formatCidr,
  hostCidr,
  normalizeCidrList,
  parseAddress,
  parseCidr,
} from "../lib/ip.ts";
import { getOrInsert } from "../lib/maps.ts";
import { RangeSet } from "../lib/rangeset.ts";
import {
  type ClassPolicy,
  ClassTable,
  type ClassVerdict,
  forClassChanges,
  snatAddresses,
  type TrafficClass,
} from "./classify.ts";
import { sameItems } from "./equality.ts";
import { type Host, hostOf, hostsOfFamily, sortedHosts } from "./hosts.ts";
import {
  KEEP_MARK,
  KEEP_MATCH_MASK,
  MARK_WRITE_MASK,
  nodeMark,
  PREFIX_MASK,
  REPLY_PREFIX,
  STEER_PREFIX,
  STEERED_MATCH_MASK,
  TUNNEL_CLASS_MASK,
} from "./marks.ts";
import {
  CHAIN_GATEWAY,
  CHAIN_KEEP_MARK,
  CHAIN_MARK_REQUEST,
  CHAIN_NO_SNAT,
  CHAIN_REPLY,
  CHAIN_RESET_MARK,
  CHAIN_SNAT_EIP,
  CHAIN_TUNNEL_IN,
  classChain,
  eipDeviceName,
  eipMac,
  eipSetName,
  groupChain,
  ignoreSetName,
  peersSetName,
  policySetName,
} from "./names.ts";
import type {
  EipPlan,
  FamilyRules,
  FdbPlan,
  Hook,
  IpRulePlan,
  IpSetPlan,
  NeighborPlan,
  NftPlan,
  NodePlan,
  RoutePlan,
  Rule,
  SetMatch,
  SteerTarget,
  SysctlPlan,
  TableName,
  TunnelClassSnat,
  TunnelPeers,
  TunnelPlan,
} from "./plan.ts";
import { comparePrecedence } from "./precedence.ts";
import { assignTables, type TableChoice } from "./tables.ts";
import type { LocalFacts, NodeConfig, NodeView, PeerView, PolicyView } from "./view.ts";

export const CHAIN_FORWARD = "SALLYPORT-FORWARD";
export const REPLY_TABLE_KEY = "reply";

const ANY: Record<Family, readonly string[]> = {
  4: ["0.0.0.0/1", "128.0.0.0/1"],
  6: ["::/1", "8000::/1"],
};

const VXLAN_OVERHEAD: Record<Family, number> = { 4: 50, 6: 70 };

/** Families a policy carries traffic for: those of its destinations (all when none). */
export function policyFamilies(policy: PolicyView, families: readonly Family[]): Family[] {
  if (policy.destinationCIDRs.length === 0) return [...families];
  const present = new Set(policy.destinationCIDRs.map((c) => familyOfText(c)));
  return families.filter((f) => present.has(f));
}

/** multiport takes at most 15 ports, a range counting as two. */
function portRules(
  ports: readonly PortSpec[],
): { protocol: "tcp" | "udp" | "sctp"; dports?: string }[] {
  if (ports.length === 0) return [];
  const byProtocol = new Map<"tcp" | "udp" | "sctp", string[] | "all">();
  for (const p of ports) {
    const protocol = (p.protocol ?? "TCP").toLowerCase() as "tcp" | "udp" | "sctp";
    if (p.port === undefined) {
      byProtocol.set(protocol, "all");
      continue;
    }
    const current = byProtocol.get(protocol);
    if (current === "all") continue;
    const entry =
      p.endPort !== undefined && p.endPort !== p.port ? `${p.port}:${p.endPort}` : `${p.port}`;
    byProtocol.set(protocol, [...(current ?? []), entry]);
  }
  const out: { protocol: "tcp" | "udp" | "sctp"; dports?: string }[] = [];
  for (const protocol of ["tcp", "udp", "sctp"] as const) {
    const entries = byProtocol.get(protocol);
    if (entries === undefined) continue;
    if (entries === "all") {
      out.push({ protocol });
      continue;
    }
    let chunk: string[] = [];
    let weight = 0;
    for (const e of [...new Set(entries)]) {
      const w = e.includes(":") ? 2 : 1;
      if (weight + w > 15) {
        out.push({ protocol, dports: chunk.join(",") });
        chunk = [];
        weight = 0;
      }
      chunk.push(e);
      weight += w;
    }
    if (chunk.length > 0) out.push({ protocol, dports: chunk.join(",") });
  }
  return out;
}

function mark(value: number, mask: number, invert = false) {
  return invert ? { value, mask, invert } : { value, mask };
}

class FamilyBuilder {
  readonly chains = new Map<TableName, Map<string, Rule[]>>([
    ["filter", new Map()],
    ["nat", new Map()],
    ["mangle", new Map()],
  ]);
  readonly hooks: Hook[] = [];

  chain(table: TableName, name: string): Rule[] {
    const chains = this.chains.get(table)!;
    let rules = chains.get(name);
    if (rules === undefined) {
      rules = [];
      chains.set(name, rules);
    }
    return rules;
  }

  hook(table: TableName, builtin: string, chain: string, comment: string): void {
    const position =
      this.hooks.filter((h) => h.table === table && h.builtin === builtin).length + 1;
    this.hooks.push({
      table,
      builtin,
      position,
      rule: { comment, target: { kind: "JUMP", chain } },
    });
  }

  build(): FamilyRules {
    return { chains: this.chains, hooks: this.hooks };
  }
}

/**
 * Where replies to a pod go back through the tunnel: its node's pod CIDR when it lies inside one
 * (pod CIDRs of different nodes never overlap, so one route per node is exact and the reply table
 * grows with nodes, not pods), else the pod's own address.
 */
const PEER_CIDRS = new WeakMap<PeerView, { cidr: Cidr; text: string }[]>();
function replyDestination(host: Host, peer: PeerView): string {
  let cidrs = PEER_CIDRS.get(peer);
  if (cidrs === undefined) {
    cidrs = (peer.podCIDRs ?? []).map((text) => {
      const cidr = parseCidr(text);
      return { cidr, text: formatCidr(cidr) };
    });
    PEER_CIDRS.set(peer, cidrs);
  }
  const covering = cidrs.find((c) => cidrContainsAddress(c.cidr, host.address));
  return covering === undefined ? host.cidr : covering.text;
}

type Reply = { dst: string; peer: PeerView };

/**
 * What a node does with a policy's traffic of one family. `replies` (where replies to its
 * remote pods go back through the tunnel) on its gateway node, and on the other nodes of its
 * gateway, which carry them in advance (see policyPart).
 */
type Decision =
  | { readonly kind: "gateway"; readonly sources: string[]; readonly replies: Reply[] }
  | {
      readonly kind: "steer";
      readonly sources: string[];
      readonly gateway: PeerView;
      readonly replies?: Reply[];
    }
  | { readonly kind: "drop"; readonly sources: string[]; readonly replies?: Reply[] };

/** What `node` does with `policy`'s traffic of one family; undefined: nothing at all. */
function decide(
  node: string,
  peers: ReadonlyMap<string, PeerView>,
  policy: PolicyView,
  family: Family,
  families: readonly Family[],
  hasTunnel: boolean,
  standby: boolean,
): Decision | undefined {
  if (!policyFamilies(policy, families).includes(family)) return undefined;
  if (policy.gatewayNode !== undefined && (policy.snat[family]?.length ?? 0) === 0)
    return undefined;
  const isGateway = policy.gatewayNode === node;
  const everyPod = isGateway || standby;
  const sources: Host[] = [];
  // Replies: one per destination (a node's pod CIDR, mostly): a pod joining a node the policy
  // already has pods on changes no route.
  const byDst = everyPod ? new Map<string, PeerView>() : undefined;
  for (const ep of policy.endpoints) {
    const here = ep.node === node;
    if (!everyPod && !here) continue;
    const hosts = hostsOfFamily(ep.ips, family);
    for (const h of hosts) sources.push(h);
    if (byDst === undefined || here) continue;
    const peer = peers.get(ep.node);
    if (peer === undefined || peer.underlay === undefined || peer.tunnel[family] === undefined)
      continue;
    for (const h of hosts) {
      const dst = replyDestination(h, peer);
      if (!byDst.has(dst)) byDst.set(dst, peer);
    }
  }
  const sorted = sortedHosts(sources);
  const replies =
    byDst === undefined
      ? undefined
      : [...byDst].sort(([a], [b]) => byText(a, b)).map(([dst, peer]) => ({ dst, peer }));
  if (isGateway) return { kind: "gateway", sources: sorted, replies: replies! };
  if (sorted.length === 0) return undefined;
  const carried = replies === undefined ? {} : { replies };
  const gateway = policy.gatewayNode === undefined ? undefined : peers.get(policy.gatewayNode);
  if (
    !hasTunnel ||
    gateway === undefined ||
    gateway.underlay === undefined ||
    gateway.tunnel[family] === undefined
  ) {
    return { kind: "drop", sources: sorted, ...carried };
  }
  return { kind: "steer", sources: sorted, gateway, ...carried };
}

/** What one policy contributes to this node's datapath in one family. */
interface FamilyPart {
  readonly decision: Decision;
  /** The policy's sets, when this node matches sources of it (else it has no rules here). */
  readonly src?: IpSetPlan | undefined;
  /** Its destinations, when they are more than one CIDR or have exceptions. */
  readonly dst?: IpSetPlan | undefined;
  /**
   * Its one destination CIDR without exceptions, matched by the rule itself (`-d`): the kernel
   * compares it in the rule's header before any set lookup, and `ipset restore` costs ~0.35 ms
   * per set whatever its size. Neither this nor `dst`: any destination.
   */
  readonly destination?: string | undefined;
}

/** What one policy contributes to this node's datapath: the per-key unit of planning. */
interface PolicyPart {
  readonly view: PolicyView;
  readonly families: ReadonlyMap<Family, FamilyPart>;
  /** Its gateway group (groupOf); iptables only: its rules go to the group's chain. */
  readonly group: string;
  /** That group's chain (names.ts groupChain), named once per part. */
  readonly groupChain: string;
  /** This node may take its egress IPs over and carries its sets and SNAT rules in advance. */
  readonly standby: boolean;
  /** A peer that may take its egress IPs over, whose routing table this node keeps ready. */
  readonly next?: string | undefined;
  /** Peers its decisions read (its gateway node, the nodes replies go back to). */
  readonly peers: ReadonlySet<string>;
  /** Everything its rules, routing tables and routes depend on, except set members. */
  readonly ruleSig: string;
  /** Its reply destinations (its gateway and the standbys), and the standby kept ready (next). */
  readonly replySig: string;
  /** The egress IPs it makes this node hold. */
  readonly eipSig: string;
}

/** Peers counted by name: how many decisions name each, and the latest view of it. */
class PeerCounts {
  readonly #by = new Map<string, { peer: PeerView; n: number }>();

  add(peer: PeerView, sign: 1 | -1): void {
    const c = this.#by.get(peer.name);
    if (c === undefined) {
      if (sign > 0) this.#by.set(peer.name, { peer, n: 1 });
      return;
    }
    c.n += sign;
    if (c.n <= 0) this.#by.delete(peer.name);
    else if (sign > 0) c.peer = peer;
  }

  /** The peers named, in name order. */
  peers(): PeerView[] {
    return [...this.#by.values()]
      .map((c) => c.peer)
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  get size(): number {
    return this.#by.size;
  }
}

/**
 * What the policies' parts ask of the routing, counted: a part adds its demand when it is made
 * and takes it away when it is replaced, so a plan reads the demand in O(peers + reply
 * destinations) instead of walking every reply of every policy (on a gateway, a policy lists
 * one per node its pods run on: 1,000 policies over 100 nodes are 100,000 to walk per plan).
 */
class RouteDemand {
  /** Gateway peers steered to, by the decisions of every family. */
  readonly steer = new PeerCounts();
  /** Standbys kept ready (parts' `next`): all parts, and the parts with decisions here. */
  readonly next = new Map<string, { all: number; deciding: number }>();
  /** Decisions that need the reply table. */
  replyTable = 0;
  /** Reply destination → the peers replies to it go back through (one, but for a moment). */
  readonly replies = new Map<string, { family: Family; peers: PeerCounts }>();
  /** Per family, decisions with sources and replies of policies with a tunnel class. */
  readonly classFamilies = new Map<Family, number>();

  count(part: PolicyPart, sign: 1 | -1): void {
    if (part.next !== undefined) {
      const c = getOrInsert(this.next, part.next, () => ({ all: 0, deciding: 0 }));
      c.all += sign;
      if (part.families.size > 0) c.deciding += sign;
      if (c.all === 0) this.next.delete(part.next);
    }
    const tunnelClass = part.view.tunnelClass !== undefined;
    for (const [family, { decision: d }] of part.families) {
      if (d.kind === "steer") this.steer.add(d.gateway, sign);
      if (d.replies === undefined) continue;
      if (d.replies.length > 0 || tunnelClass) this.replyTable += sign;
      if (d.sources.length === 0) continue;
      if (tunnelClass) {
        const n = (this.classFamilies.get(family) ?? 0) + sign;
        if (n > 0) this.classFamilies.set(family, n);
        else this.classFamilies.delete(family);
      }
      for (const r of d.replies) {
        const c = getOrInsert(this.replies, r.dst, () => ({ family, peers: new PeerCounts() }));
        c.peers.add(r.peer, sign);
        if (c.peers.size === 0) this.replies.delete(r.dst);
      }
    }
  }
}

function peerSig(p: PeerView | undefined): string {
  if (p === undefined) return "-";
  return `${p.name}|${p.nodeID}|${p.mac}|${p.tunnel[4] ?? ""}|${p.tunnel[6] ?? ""}|${p.underlay ?? ""}|${p.tunnelClasses === true}`;
}

/** `next`, or `prev` when it has the same content: unchanged sets keep their identity. */
function keepSet(prev: IpSetPlan | undefined, next: IpSetPlan): IpSetPlan {
  if (
    prev !== undefined &&
    prev.name === next.name &&
    prev.family === next.family &&
    sameItems(prev.members, next.members) &&
    sameItems(prev.nomatch, next.nomatch)
  )
    return prev;
  return next;
}

function policyPart(
  view: PolicyView,
  node: NodeView["node"],
  config: NodeConfig,
  peers: ReadonlyMap<string, PeerView>,
  hasTunnel: boolean,
  prev: PolicyPart | undefined,
): PolicyPart {
  const families = new Map<Family, FamilyPart>();
  const used = new Set<string>();
  // (What depends on the policy's key and addresses alone is taken from its last part.)
  const same =
    prev !== undefined && prev.view.snat === view.snat && prev.view.floating === view.floating;
  const group = same ? prev.group : groupOf(view);
  const chain = same ? prev.groupChain : groupChain(group);
  const standby = carriesInAdvance(view, node, config, group);
  const first = view.standbyNodes?.[0];
  const next =
    first !== undefined && first !== node && first !== view.gatewayNode ? first : undefined;
  const sig: string[] = [view.key, String(view.priority), view.createdAt, `${group}|${standby}`];
  // (The standby's routing table is routing only.)
  const replies: string[] = next === undefined ? [] : [`next>${next}`];
  for (const family of config.families) {
    const d = decide(node, peers, view, family, config.families, hasTunnel, standby);
    if (d === undefined) continue;
    let src: IpSetPlan | undefined;
    let dst: IpSetPlan | undefined;
    let destination: string | undefined;
    if (d.sources.length > 0) {
      const old = prev?.families.get(family);
      const srcName = old?.src?.name ?? policySetName("src", family, view.key);
      const destinations = view.destinationCIDRs.filter((c) => familyOfText(c) === family);
      const excluded = view.excludedCIDRs.filter((c) => familyOfText(c) === family);
      src = keepSet(old?.src, { name: srcName, family, members: d.sources, nomatch: [] });
      if (destinations.length <= 1 && excluded.length === 0) destination = destinations[0];
      else
        dst = keepSet(old?.dst, {
          name: old?.dst?.name ?? policySetName("dst", family, view.key),
          family,
          members: destinations.length > 0 ? destinations : [...ANY[family]],
          nomatch: excluded,
        });
    }
    families.set(family, { decision: d, src, dst, destination });
    sig.push(
      `${family}:${d.kind}:${d.sources.length > 0}:${d.kind === "steer" ? peerSig(d.gateway) : ""}:${d.kind === "gateway" || standby ? (view.snat[family]?.join(",") ?? "") : ""}:${dst === undefined ? (destination ?? "any") : "set"}`,
    );
    for (const r of d.replies ?? []) replies.push(`${family}>${r.dst}>${peerSig(r.peer)}`);
  }
  if (families.size > 0) sig.push(JSON.stringify(view.ports), String(view.tunnelClass ?? ""));
  const holds = view.gatewayNode === node;
  // The peers its decisions read, whether or not they are reachable now: one that appears or
  // changes must replan this policy.
  if (view.gatewayNode !== undefined) used.add(view.gatewayNode);
  if (holds || standby) for (const ep of view.endpoints) if (ep.node !== node) used.add(ep.node);
  return {
    view,
    families,
    group,
    groupChain: chain,
    standby,
    next,
    peers: used,
    ruleSig: families.size === 0 ? "" : sig.join("\n"),
    replySig: replies.join("\n"),
    // Its addresses go into the egress-IP sets; a device each only for the families it decides.
    eipSig: holds
      ? `${view.floating.join(",")}|${view.announceInterface ?? ""}|${[...families]
          .filter(([, f]) => f.decision.kind === "gateway")
          .map(([family]) => family)
          .join(",")}`
      : "",
  };
}

/**
 * Whether `node` carries `view`'s sets and SNAT rules before it holds its egress IPs: every
 * other node of its gateway does, so that a takeover changes its group chain and egress IPs, not
 * a rule per policy (iptables; the nftables classes carry its sources, and a takeover changes
 * their verdicts). Only for egress IPs that move (a node's own address does not), and not with
 * SNAT exemptions by sets: they depend on the holder.
 */
export function carriesInAdvance(
  view: PolicyView,
  node: string,
  config: NodeConfig,
  group = groupOf(view),
): boolean {
  return (
    config.standbyDatapath !== false &&
    !config.noSnatBySets &&
    view.gatewayNode !== undefined &&
    view.gatewayNode !== node &&
    group.startsWith(EIPS_GROUP) &&
    (view.gatewayNodes?.includes(node) ?? false)
  );
}

const EIPS_GROUP = "eips:";

/**
 * The gateway group of a policy: the policies whose egress IPs are the same, which one node holds
 * and which move together. A policy that SNATs to an address that does not float (a node's own)
 * is a group of its own.
 */
function groupOf(view: PolicyView): string {
  const snat = FAMILIES.flatMap((f) => view.snat[f] ?? []);
  if (view.floating.length > 0 && snat.every((a) => view.floating.includes(a)))
    return `${EIPS_GROUP}${[...view.floating].sort().join(",")}`;
  return `policy:${view.key}`;
}

/**
 * The datapath of one node, planned per key: each policy's part (its decisions and sets) is
 * recomputed only when its view or a peer it reads changes, and the plan reuses every unchanged
 * section (sets, chains, routing) by identity, so the datapath's diff skips them by reference.
 * An update that changes nothing this node carries returns the very same plan object.
 *
 * `planNode(view)` is this planner fed from scratch; the tests hold the incremental plan equal to
 * it after any sequence of updates.
 */
export class NodePlanner {
  readonly #node: string;
  readonly #config: NodeConfig;
  #local: LocalFacts | undefined;
  #peers: ReadonlyMap<string, PeerView> = new Map();
  #ignore: readonly string[] = [];
  #holdEgressIPs = true;
  #withheld: ReadonlySet<string> = new Set();
  readonly #views = new Map<string, PolicyView>();
  readonly #parts = new Map<string, PolicyPart>();
  readonly #dirty = new Set<string>();
  /** peer name → keys of the policies whose parts read it */
  readonly #readers = new Map<string, Set<string>>();
  readonly #demand = new RouteDemand();
  #order: string[] = [];
  #orderDirty = true;
  #hasTunnel: boolean | undefined;
  // Sections of the last plan, and which must be rebuilt.
  #plan: NodePlan | undefined;
  #staticDirty = true;
  #rulesDirty = true;
  #routesDirty = true;
  #eipsDirty = true;
  #setsDirty = true;
  #setNamesDirty = true;
  #choiceKey = "";
  #choice: TableChoice = { tables: new Map(), errors: [] };
  /** The table choice the classes were last computed with. */
  #classesTables: TableChoice["tables"] | undefined;
  #tunnel: TunnelPlan | undefined;
  #tunnelErrors: string[] = [];
  #rules: Record<Family, FamilyRules> | undefined;
  #routing: Pick<NodePlan, "ipRules" | "routes" | "neighbors" | "fdb"> | undefined;
  /** `#routing` as text, to compare a new one with. */
  #routingText = "";
  #eips: readonly EipPlan[] = [];
  #eipSets = new Map<string, IpSetPlan>();
  #ignoreSets = new Map<string, IpSetPlan>();
  /** Per family, the peers' underlay addresses (host CIDRs, sorted): the tunnel's only sources. */
  #peerUnderlays: Record<Family, readonly string[]> = { 4: [], 6: [] };
  #peerSets = new Map<string, IpSetPlan>();
  #tunnelPeers: TunnelPeers | undefined;
  #setList: IpSetPlan[] = [];
  // The nftables classification, per family.
  readonly #classTables = new Map<Family, ClassTable>();
  readonly #classPolicies = new Map<string, { sig: string; policy: ClassPolicy }>();
  /** Policies whose parts were replanned since the classes were last fed. */
  readonly #replanned = new Set<string>();
  /** preparedFor()'s answer, until a part changes. */
  #prepared: ReadonlySet<string> | undefined;
  #ignoreChanged = true;
  #rankOrder: readonly string[] = [];
  #nft: NftPlan | undefined;
  /** What the classes of each family name (nftables), counted as classes change. */
  readonly #uses = new Map<Family, FamilyUses>();
  /** The steering targets the classes of every family name. */
  readonly #steer = new Tally<SteerTarget>(
    (a, b) => a.nodeID - b.nodeID || (a.tunnelClass ?? 0) - (b.tunnelClass ?? 0),
  );
  /** set name → its index in #setList */
  #setIndex = new Map<string, number>();
  /** Sets made since the last plan, to put in place when no set name changed. */
  #changedSets: IpSetPlan[] = [];

  constructor(node: string, config: NodeConfig) {
    this.#node = node;
    this.#config = config;
  }

  get node(): string {
    return this.#node;
  }

  /** Host facts, from the last full read of the kernel. */
  setLocal(local: LocalFacts): void {
    if (local === this.#local) return;
    const before = this.#local;
    this.#local = local;
    this.#staticDirty = true;
    this.#eipsDirty = true;
    if (
      before === undefined ||
      before.usedTables !== local.usedTables ||
      before.existingTables !== local.existingTables
    )
      this.#rulesDirty = true;
  }

  /** All peers (this node included). Only the policies that read a changed peer are replanned. */
  setPeers(peers: ReadonlyMap<string, PeerView>): void {
    if (peers === this.#peers) return;
    const before = this.#peers;
    this.#peers = peers;
    const names = new Set([...before.keys(), ...peers.keys()]);
    for (const name of names) {
      const a = before.get(name);
      const b = peers.get(name);
      if (a === b) continue;
      // Pod CIDRs feed the reply table of a gateway with tunnel classes.
      if (!sameItems(a?.podCIDRs ?? [], b?.podCIDRs ?? [])) this.#routesDirty = true;
      if (peerSig(a) === peerSig(b)) continue;
      this.#routesDirty = true;
      if (name === this.#node) this.#staticDirty = true;
      for (const key of this.#readers.get(name) ?? []) this.#dirty.add(key);
    }
    // The tunnel accepts packets from these addresses only: one set per family, made again
    // only when a peer's underlay address comes, goes or changes.
    const underlays: Record<Family, string[]> = { 4: [], 6: [] };
    for (const peer of peers.values()) {
      if (peer.name === this.#node || peer.underlay === undefined) continue;
      const a = parseAddress(peer.underlay);
      underlays[a.family].push(hostCidr(a));
    }
    for (const family of FAMILIES) {
      const now = underlays[family].sort();
      if (sameItems(now, this.#peerUnderlays[family])) continue;
      this.#peerUnderlays = { ...this.#peerUnderlays, [family]: now };
      this.#peerSets.delete(peersSetName(family));
      this.#tunnelPeers = undefined;
      this.#setsDirty = true;
    }
  }

  setPolicy(view: PolicyView): void {
    const before = this.#views.get(view.key);
    if (before === view) return;
    this.#views.set(view.key, view);
    this.#dirty.add(view.key);
    if (
      before === undefined ||
      before.priority !== view.priority ||
      before.createdAt !== view.createdAt
    )
      this.#orderDirty = true;
  }

  deletePolicy(key: string): void {
    if (!this.#views.delete(key)) return;
    this.#dirty.add(key);
    this.#orderDirty = true;
  }

  /** The cluster's own CIDRs (both families, canonical). */
  setIgnoreCIDRs(cidrs: readonly string[]): void {
    if (sameItems(cidrs, this.#ignore)) return;
    this.#ignore = cidrs;
    this.#ignoreSets.clear();
    this.#setsDirty = true;
    this.#ignoreChanged = true;
  }

  /** A fenced gateway keeps every rule (SNAT included) but stops holding its egress IPs. */
  setHoldEgressIPs(hold: boolean): void {
    if (hold === this.#holdEgressIPs) return;
    this.#holdEgressIPs = hold;
    this.#eipsDirty = true;
  }

  /**
   * Egress IPs this node is given but must not hold yet (another node still answers for them):
   * like a fenced gateway's, every rule stays and only these addresses are not held.
   */
  setWithheldEgressIPs(addresses: ReadonlySet<string>): void {
    if (sameSet(addresses, this.#withheld)) return;
    this.#withheld = addresses;
    this.#eipsDirty = true;
  }

  /**
   * The gateway nodes whose policies the last plan carries in advance, every one that lists this
   * node as a standby (carriesInAdvance): when this node takes one of them over, the traffic
   * steered here before its own sync is dropped by its group chains, never sent on un-NATed, so
   * the steering nodes need not wait for it (src/agent/liveness.ts, takingOver).
   */
  preparedFor(): ReadonlySet<string> {
    if (this.#prepared !== undefined) return this.#prepared;
    const ready = new Map<string, boolean>();
    for (const part of this.#parts.values()) {
      const holder = part.view.gatewayNode;
      if (holder === undefined || holder === this.#node) continue;
      if (!(part.view.standbyNodes?.includes(this.#node) ?? false)) continue;
      ready.set(holder, (ready.get(holder) ?? true) && part.standby);
    }
    this.#prepared = new Set([...ready].filter(([, yes]) => yes).map(([holder]) => holder));
    return this.#prepared;
  }

  plan(): NodePlan {
    const local = this.#local;
    if (local === undefined)
      throw new Error(`Cannot plan node ${this.#node}: its host facts are not known yet`);
    const fresh =
      this.#plan === undefined ||
      this.#dirty.size > 0 ||
      this.#orderDirty ||
      this.#staticDirty ||
      this.#rulesDirty ||
      this.#routesDirty ||
      this.#eipsDirty ||
      this.#setsDirty;
    if (!fresh) return this.#plan!;
    const { families } = this.#config;

    if (this.#staticDirty) this.#planTunnel(local);
    const hasTunnel = this.#tunnel !== undefined;
    if (hasTunnel !== this.#hasTunnel) {
      this.#hasTunnel = hasTunnel;
      for (const key of this.#views.keys()) this.#dirty.add(key);
      for (const key of this.#parts.keys()) this.#dirty.add(key);
    }

    // 1. Parts of the policies that changed, or whose peers did.
    for (const key of this.#dirty) {
      this.#replanned.add(key);
      const before = this.#parts.get(key);
      const view = this.#views.get(key);
      if (before !== undefined) {
        for (const p of before.peers) this.#readers.get(p)?.delete(key);
        this.#demand.count(before, -1);
      }
      if (view === undefined) {
        if (before === undefined) continue;
        this.#parts.delete(key);
        this.#rulesDirty ||= before.families.size > 0;
        this.#routesDirty ||= before.replySig !== "";
        this.#eipsDirty ||= before.eipSig !== "";
        this.#setNamesDirty = true;
        continue;
      }
      const part = policyPart(view, this.#node, this.#config, this.#peers, hasTunnel, before);
      this.#parts.set(key, part);
      this.#demand.count(part, 1);
      for (const p of part.peers) getOrInsert(this.#readers, p, () => new Set()).add(key);
      if ((before?.ruleSig ?? "") !== part.ruleSig) this.#rulesDirty = true;
      if (before === undefined || before.replySig !== part.replySig) this.#routesDirty = true;
      if ((before?.eipSig ?? "") !== part.eipSig) this.#eipsDirty = true;
      if (part.families.size > 0 || (before?.families.size ?? 0) > 0) this.#setsDirty = true;
      for (const fp of part.families.values()) {
        if (fp.src !== undefined) this.#changedSets.push(fp.src);
        if (fp.dst !== undefined) this.#changedSets.push(fp.dst);
      }
      if (!sameSetNames(before, part)) this.#setNamesDirty = true;
    }
    if (this.#dirty.size > 0) this.#prepared = undefined;
    this.#dirty.clear();
    if (this.#orderDirty || this.#rulesDirty) {
      // Only policies with a part here have rules here: the others' order does not matter.
      const order = [...this.#views.values()]
        .filter((v) => (this.#parts.get(v.key)?.families.size ?? 0) > 0)
        .sort(comparePrecedence)
        .map((v) => v.key);
      if (!sameItems(order, this.#order)) this.#rulesDirty = true;
      this.#order = order;
      this.#orderDirty = false;
    }

    // 2. Routing tables (TABLE_NUM): one per gateway peer steered to or that may take over,
    // one for replies.
    if (this.#rulesDirty || this.#routesDirty || this.#staticDirty) {
      const demand = this.#demand;
      const keys = new Set<string>();
      for (const [name, c] of demand.next) if (c.deciding > 0) keys.add(`node/${name}`);
      for (const peer of demand.steer.peers()) keys.add(`node/${peer.name}`);
      if (demand.replyTable > 0) keys.add(REPLY_TABLE_KEY);
      const choiceKey = [...keys].sort().join(",");
      if (choiceKey !== this.#choiceKey || this.#staticDirty) {
        // Tables chosen earlier stay (the kernel may not have been re-read since): a new peer
        // must never move another peer's routes to another table.
        const existing = new Map(local.existingTables);
        for (const [k, t] of this.#choice.tables) existing.set(k, t);
        const choice = assignTables([...keys], {
          range: this.#config.tableRange,
          used: local.usedTables,
          existing,
          random: local.random,
        });
        if (!sameTables(choice, this.#choice)) {
          this.#choice = choice;
          this.#rulesDirty = true;
          this.#routesDirty = true;
        }
        this.#choiceKey = choiceKey;
      }
    }

    // 3. Rules, in precedence order: the first rule that matches a packet decides. The nftables
    // datapath classifies instead (one lookup per stage whatever the number of policies).
    const nftables = this.#config.datapath === "nftables";
    if (nftables) {
      this.#rules ??= NO_RULES(families);
    } else if (this.#rulesDirty || this.#staticDirty || this.#rules === undefined) {
      const rules = {} as Record<Family, FamilyRules>;
      let same = this.#rules !== undefined;
      for (const family of families) {
        const before = this.#rules?.[family];
        const after = keepChains(before, this.#familyRules(family));
        rules[family] = after;
        same &&= after === before;
      }
      if (!same) this.#rules = rules;
    }
    if (this.#rulesDirty || this.#routesDirty || this.#staticDirty || this.#routing === undefined) {
      const routing = this.#planRouting();
      const text = JSON.stringify(routing);
      if (text !== this.#routingText) {
        this.#routing = routing;
        this.#routingText = text;
      }
    }
    if (this.#eipsDirty || this.#staticDirty) this.#planEips(local);
    if (nftables) this.#planClasses();
    else if (this.#setsDirty || this.#eipsDirty || this.#setNamesDirty) this.#planSets();

    const sysctls: SysctlPlan[] = [];
    if (families.includes(4)) sysctls.push({ path: "net/ipv4/ip_forward", value: "1" });
    if (families.includes(6)) sysctls.push({ path: "net/ipv6/conf/all/forwarding", value: "1" });
    if (this.#tunnel !== undefined && families.includes(4)) {
      // Requests reach a gateway, and replies reach the source node, on the tunnel while the
      // reverse path of their source is elsewhere: strict rp_filter would drop them
      // (spidernet-io/egressgateway#1797 on Rocky Linux, where the default is 1).
      sysctls.push({ path: `net/ipv4/conf/${this.#tunnel.name}/rp_filter`, value: "2" });
    }
    const prev = this.#plan;
    const errors = [...this.#tunnelErrors, ...this.#choice.errors];
    this.#staticDirty = false;
    this.#rulesDirty = false;
    this.#routesDirty = false;
    this.#eipsDirty = false;
    this.#setsDirty = false;
    this.#setNamesDirty = false;
    if (
      prev !== undefined &&
      sameItems(prev.ipsets, this.#setList) &&
      prev.rules === this.#rules &&
      prev.ipRules === this.#routing!.ipRules &&
      prev.tunnel === this.#tunnel &&
      prev.eips === this.#eips &&
      prev.tables === this.#choice.tables &&
      prev.nft === this.#nft &&
      sameItems(prev.errors, errors)
    )
      return prev;
    this.#plan = {
      node: this.#node,
      ipsets:
        prev !== undefined && sameItems(prev.ipsets, this.#setList) ? prev.ipsets : this.#setList,
      rules: this.#rules!,
      ...this.#routing!,
      tunnel: this.#tunnel,
      eips: this.#eips,
      sysctls:
        prev !== undefined &&
        sysctls.length === prev.sysctls.length &&
        sysctls.every(
          (s, i) => s.path === prev.sysctls[i]!.path && s.value === prev.sysctls[i]!.value,
        )
          ? prev.sysctls
          : sysctls,
      tables: this.#choice.tables,
      errors,
      ...(this.#nft === undefined ? {} : { nft: this.#nft }),
    };
    return this.#plan;
  }

  #planTunnel(local: LocalFacts): void {
    const self = this.#peers.get(this.#node);
    const config = this.#config;
    this.#tunnelErrors = [];
    const underlayAddress = local.underlay.ipv4 ?? local.underlay.ipv6;
    let tunnel: TunnelPlan | undefined;
    if (self !== undefined && underlayAddress !== undefined) {
      const outer = parseAddress(underlayAddress).family;
      tunnel = {
        name: config.tunnelDevice,
        vni: config.vni,
        port: config.port,
        local: underlayAddress,
        parent: local.underlay.device,
        mtu: local.underlay.mtu - VXLAN_OVERHEAD[outer],
        mac: self.mac,
        gbp: true,
        addresses: FAMILIES.filter(
          (f) => config.families.includes(f) && self.tunnel[f] !== undefined,
        ).map((f) => hostCidr(parseAddress(self.tunnel[f]!))),
      };
    } else if (self === undefined) {
      this.#tunnelErrors.push(
        `Cannot build the tunnel: node ${this.#node} has no identity yet (no EgressNode)`,
      );
    } else {
      this.#tunnelErrors.push(
        `Cannot build the tunnel: node ${this.#node} has no underlay address`,
      );
    }
    const before = this.#tunnel;
    this.#tunnel =
      before !== undefined && tunnel !== undefined && sameTunnel(before, tunnel) ? before : tunnel;
  }

  /** Every chain and hook of one family. Rebuilt whole when any policy's rules change. */
  #familyRules(family: Family): FamilyRules {
    const config = this.#config;
    const tunnel = config.tunnelDevice;
    const fb = new FamilyBuilder();
    const ignore = ignoreSetName(family);
    const eipSet = eipSetName(family);

    // --- static chains
    fb.hook("mangle", "PREROUTING", CHAIN_MARK_REQUEST, "sallyport: steer egress traffic");
    fb.hook("mangle", "FORWARD", CHAIN_RESET_MARK, "sallyport: keep steered traffic");
    fb.hook("mangle", "POSTROUTING", CHAIN_KEEP_MARK, "sallyport: keep steered traffic");
    fb.hook("filter", "FORWARD", CHAIN_FORWARD, "sallyport: accept steered traffic");
    fb.hook("filter", "OUTPUT", CHAIN_KEEP_MARK, "sallyport: accept steered traffic");
    fb.hook("nat", "POSTROUTING", CHAIN_NO_SNAT, "sallyport: no snat for steered traffic");
    fb.hook("nat", "POSTROUTING", CHAIN_SNAT_EIP, "sallyport: snat to egress IPs");
    fb.hook("filter", "INPUT", CHAIN_TUNNEL_IN, "sallyport: tunnel packets from peer nodes only");
    // Before the VXLAN socket decapsulates it (it reads what INPUT lets through): a host that is
    // no peer node could otherwise send any inner packet, a selected pod's source included,
    // into this node's tunnel and out with an egress IP.
    fb.chain("filter", CHAIN_TUNNEL_IN).push({
      protocol: "udp",
      sets: [{ name: peersSetName(family), dir: "src", invert: true }],
      dports: String(config.port),
      comment: "sallyport: tunnel packets from a host that is no peer node",
      target: { kind: "DROP" },
    });

    const markRequest = fb.chain("mangle", CHAIN_MARK_REQUEST);
    // Neighbour discovery is not a connection (conntrack calls it INVALID): a unicast
    // solicitation of the egress IP, or the advertisement answering one it sent, must pass.
    if (family === 6)
      for (const icmpv6Type of [135, 136] as const)
        markRequest.push({
          protocol: "ipv6-icmp",
          icmpv6Type,
          sets: [{ name: eipSet, dir: "dst" }],
          comment: "sallyport: neighbour discovery of egress IPs",
          target: { kind: "RETURN" },
        });
    markRequest.push(
      {
        sets: [{ name: eipSet, dir: "dst" }],
        ctstate: ["INVALID", "NEW", "UNTRACKED"],
        comment: "sallyport: egress IPs expose no service",
        target: { kind: "DROP" },
      },
      {
        ctdir: "REPLY",
        connmark: mark(REPLY_PREFIX, PREFIX_MASK),
        comment: "sallyport: replies go back through the tunnel",
        target: { kind: "GOTO", chain: CHAIN_REPLY },
      },
      { ctdir: "REPLY", target: { kind: "RETURN" } },
      {
        ctstate: ["RELATED", "ESTABLISHED"],
        connmark: mark(STEER_PREFIX, PREFIX_MASK, true),
        comment: "sallyport: connections we never steered keep their path",
        target: { kind: "RETURN" },
      },
    );
    fb.chain("mangle", CHAIN_REPLY).push(
      { target: { kind: "MARK", value: REPLY_PREFIX, mask: MARK_WRITE_MASK } },
      { target: { kind: "ACCEPT" } },
    );
    fb.chain("mangle", CHAIN_GATEWAY).push({
      inInterface: tunnel,
      ctstate: ["NEW"],
      comment: "sallyport: remember flows that came through the tunnel",
      target: { kind: "CONNMARK", value: REPLY_PREFIX, mask: PREFIX_MASK },
    });
    const resetMark = fb.chain("mangle", CHAIN_RESET_MARK);
    resetMark.push(
      {
        protocol: "tcp",
        mark: mark(STEER_PREFIX, STEERED_MATCH_MASK),
        tcpSyn: true,
        comment: "sallyport: fit the tunnel MTU",
        target: { kind: "TCPMSS" },
      },
      {
        mark: mark(STEER_PREFIX, STEERED_MATCH_MASK),
        target: { kind: "MARK", value: KEEP_MARK, mask: MARK_WRITE_MASK },
      },
    );
    const keep: Rule = { mark: mark(KEEP_MARK, KEEP_MATCH_MASK), target: { kind: "ACCEPT" } };
    fb.chain("mangle", CHAIN_KEEP_MARK).push(
      {
        outInterface: tunnel,
        mark: mark(KEEP_MARK, KEEP_MATCH_MASK),
        connmark: mark(0, TUNNEL_CLASS_MASK, true),
        comment: "sallyport: tunnel class of the connection into the VXLAN header",
        target: { kind: "RESTORE_MARK", nfmask: TUNNEL_CLASS_MASK, ctmask: TUNNEL_CLASS_MASK },
      },
      keep,
    );
    fb.chain("filter", CHAIN_KEEP_MARK).push(keep);
    fb.chain("filter", CHAIN_FORWARD).push(
      {
        // Only a node writes into the tunnel (and the tunnel class in its header): a pod's
        // packet to a peer's tunnel port, which the CNI would masquerade to this node's own
        // address and the peer's tunnel filter would take for ours, goes no further.
        protocol: "udp",
        sets: [{ name: peersSetName(family), dir: "dst" }],
        dports: String(config.port),
        comment: "sallyport: no pod sends into the tunnel",
        target: { kind: "DROP" },
      },
      keep,
      {
        inInterface: tunnel,
        comment: "sallyport: traffic from the tunnel",
        target: { kind: "ACCEPT" },
      },
    );
    const noSnat = fb.chain("nat", CHAIN_NO_SNAT);
    noSnat.push(keep);
    const snat = fb.chain("nat", CHAIN_SNAT_EIP);

    // --- policies, in precedence order: the first rule that matches a packet decides. Each
    // goes to its group's chain (through its tunnel class's chain when it has one), which says
    // where the group's traffic goes now: a takeover rewrites that chain, not the policies' rules.
    const tables = this.#choice.tables;
    const groups = this.#groupTargets(family);
    const groupChainOf = (part: PolicyPart): string => {
      const name = part.groupChain;
      const chain = fb.chain("mangle", name);
      if (chain.length === 0) chain.push(...groupRules(groups.get(part.group), tunnel));
      return name;
    };
    for (const key of this.#order) {
      const part = this.#parts.get(key);
      const fp = part?.families.get(family);
      if (part === undefined || fp === undefined || fp.src === undefined) continue;
      const policy = part.view;
      const decision = fp.decision;
      const isGateway = decision.kind === "gateway";
      const snatTo = policy.snat[family] ?? [];
      const own: SetMatch[] = [
        { name: fp.src.name, dir: "src" },
        ...(fp.dst === undefined ? [] : [{ name: fp.dst.name, dir: "dst" } as const]),
      ];
      const sets: SetMatch[] = [...own, { name: ignore, dir: "dst", invert: true }];
      const to = fp.destination === undefined ? {} : { destination: fp.destination };
      const matches = portRules(policy.ports);
      const variants = matches.length === 0 ? [{}] : matches;
      const group = groupChainOf(part);
      let action: Rule["target"] = { kind: "GOTO", chain: group };
      if (policy.tunnelClass !== undefined) {
        // The connection mark carries the policy's tunnel class (the group chain clears it for
        // a gateway whose tunnel takes none), which SALLYPORT-KEEP-MARK puts into the packet as
        // it enters the tunnel.
        const name = classChain(policy.tunnelClass);
        const chain = fb.chain("mangle", name);
        if (chain.length === 0)
          chain.push(
            {
              target: { kind: "CONNMARK", value: policy.tunnelClass, mask: TUNNEL_CLASS_MASK },
            },
            { target: { kind: "GOTO", chain: group } },
          );
        action = { kind: "GOTO", chain: name };
      }
      const steers = decision.kind === "steer" && tables.has(`node/${decision.gateway.name}`);
      for (const v of variants) {
        markRequest.push({ ...to, ...v, sets, comment: policy.key, target: action });
        if (config.noSnatBySets && steers) {
          noSnat.push({ ...to, ...v, sets: own, comment: policy.key, target: { kind: "ACCEPT" } });
        } else if (config.noSnatBySets && isGateway) {
          noSnat.push({ ...to, ...v, sets: own, comment: policy.key, target: { kind: "RETURN" } });
        }
        if (isGateway || part.standby)
          for (const rule of snatRules(v, snatTo, family, config.snatPorts))
            snat.push({ ...to, ...rule, sets, comment: policy.key });
      }
    }
    // A pod this gateway has not heard of yet (a new pod, or one a changed policy just started
    // selecting): its steering node named the policy's tunnel class in the VXLAN header, which
    // only a peer node can write (the tunnel takes packets from peers only, and no pod can send
    // into it: SALLYPORT-FORWARD). SNAT it from the first packet rather than drop it until the
    // controller's endpoint slice arrives. For the policies this node holds egress IPs of, and
    // those it stands by for (their group chain drops tunnel traffic until this node holds them).
    // Policies with the same egress IPs share a class: the first by name stands for them all (as
    // in the nftables plan, FamilyUses.tunnelClasses, so explain names the same policy on both).
    const first = new Map<number, PolicyPart>();
    for (const part of this.#parts.values()) {
      const d = part.families.get(family)?.decision;
      const tunnelClass = part.view.tunnelClass;
      if (d === undefined || tunnelClass === undefined || !(part.view.snat[family]?.length ?? 0))
        continue;
      if (d.kind !== "gateway" && !part.standby) continue;
      const had = first.get(tunnelClass);
      if (had === undefined || byText(part.view.key, had.view.key) < 0)
        first.set(tunnelClass, part);
    }
    for (const key of this.#order) {
      const part = this.#parts.get(key);
      const tunnelClass = part?.view.tunnelClass;
      if (part === undefined || tunnelClass === undefined || first.get(tunnelClass) !== part)
        continue;
      markRequest.push({
        inInterface: tunnel,
        mark: mark(tunnelClass, TUNNEL_CLASS_MASK),
        comment: part.view.key,
        target: { kind: "GOTO", chain: groupChainOf(part) },
      });
      for (const rule of snatRules({}, part.view.snat[family]!, family, config.snatPorts))
        snat.push({
          ...rule,
          mark: mark(tunnelClass, TUNNEL_CLASS_MASK),
          connmark: mark(REPLY_PREFIX, PREFIX_MASK),
          comment: part.view.key,
        });
    }
    markRequest.push({
      inInterface: tunnel,
      comment: "sallyport: tunnel traffic no policy here claims",
      target: { kind: "DROP" },
    });
    return fb.build();
  }

  /**
   * Where each gateway group's traffic of one family goes from this node: here when it holds
   * the group's egress IPs (any of its policies says so), else to the gateway the first of its
   * policies in precedence order steers to (all say the same but for a moment in a move).
   */
  #groupTargets(family: Family): Map<string, GroupTarget> {
    const tables = this.#choice.tables;
    const out = new Map<string, GroupTarget>();
    for (const key of this.#order) {
      const part = this.#parts.get(key)!;
      const d = part.families.get(family)?.decision;
      if (d === undefined || d.sources.length === 0) continue;
      if (d.kind === "gateway") out.set(part.group, { kind: "gateway" });
      else if (out.has(part.group)) continue;
      else if (d.kind === "steer" && tables.has(`node/${d.gateway.name}`))
        out.set(part.group, { kind: "steer", gateway: d.gateway });
      else out.set(part.group, { kind: "drop" });
    }
    return out;
  }

  /** Policy routing: one table per gateway peer (TABLE_NUM), one for replies. */
  #planRouting(): Pick<NodePlan, "ipRules" | "routes" | "neighbors" | "fdb"> {
    const { families, tunnelDevice: tunnel, rulePref } = this.#config;
    const demand = this.#demand;
    const tables = this.#choice.tables;
    const steerTargets = new Map<string, PeerView>();
    for (const peer of demand.steer.peers())
      if (tables.has(`node/${peer.name}`)) steerTargets.set(peer.name, peer);
    const replyTargets = new Map<string, PeerView>();
    const replyRoutes: { family: Family; dst: string; peer: PeerView }[] = [];
    const replyTable = tables.get(REPLY_TABLE_KEY);
    if (replyTable !== undefined) {
      // A destination two peers claim (a pod seen on two nodes, for a moment): the first by name.
      for (const [dst, { family, peers }] of demand.replies) {
        const peer = peers.peers()[0]!;
        replyTargets.set(peer.name, peer);
        replyRoutes.push({ family, dst, peer });
      }
      // Tunnel classes let pods this node has not heard of yet through (see #familyRules): their
      // replies need a way back too, so every peer's pod CIDRs are in the reply table.
      for (const family of demand.classFamilies.keys()) {
        for (const peer of this.#peers.values()) {
          if (peer.name === this.#node || peer.underlay === undefined) continue;
          if (peer.tunnel[family] === undefined) continue;
          for (const dst of peer.podCIDRs ?? []) {
            if (familyOfText(dst) !== family) continue;
            replyTargets.set(peer.name, peer);
            replyRoutes.push({ family, dst: formatCidr(parseCidr(dst)), peer });
          }
        }
      }
    }
    // The first standbys, ready before they take over: the routing toward them.
    for (const name of demand.next.keys()) {
      const peer = this.#peers.get(name);
      if (peer?.underlay !== undefined && tables.has(`node/${peer.name}`))
        steerTargets.set(peer.name, peer);
    }
    const ipRules: IpRulePlan[] = [];
    const routes: RoutePlan[] = [];
    const neighbors = new Map<string, NeighborPlan>();
    const fdb = new Map<string, FdbPlan>();
    const addPeer = (peer: PeerView) => {
      for (const family of families) {
        const address = peer.tunnel[family];
        if (address === undefined) continue;
        neighbors.set(`${family}/${address}`, { family, dev: tunnel, address, mac: peer.mac });
      }
      if (peer.underlay !== undefined)
        fdb.set(peer.mac, { dev: tunnel, mac: peer.mac, dst: peer.underlay });
    };
    // Peers in name order, whatever order the counts were built in: two peers with one MAC or
    // tunnel address (one node id given twice) resolve the same way however the plan was reached.
    const byName = (a: PeerView, b: PeerView) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    for (const peer of [...steerTargets.values()].sort(byName)) {
      const table = tables.get(`node/${peer.name}`);
      if (table === undefined) continue;
      addPeer(peer);
      for (const family of families) {
        const via = peer.tunnel[family];
        if (via === undefined) continue;
        ipRules.push({
          family,
          pref: rulePref,
          fwmark: nodeMark(peer.nodeID),
          mask: MARK_WRITE_MASK,
          table,
        });
        routes.push({ family, table, dst: "default", via, dev: tunnel });
      }
    }
    if (replyTable !== undefined) {
      for (const peer of [...replyTargets.values()].sort(byName)) addPeer(peer);
      const seen = new Set<string>();
      for (const { family, dst, peer } of replyRoutes) {
        if (seen.has(dst)) continue;
        seen.add(dst);
        routes.push({ family, table: replyTable, dst, via: peer.tunnel[family]!, dev: tunnel });
      }
      for (const family of families) {
        if (replyRoutes.some((r) => r.family === family)) {
          ipRules.push({
            family,
            pref: rulePref,
            fwmark: REPLY_PREFIX,
            mask: PREFIX_MASK,
            table: replyTable,
          });
        }
      }
    }
    return {
      ipRules: ipRules.sort((a, b) => a.family - b.family || a.fwmark - b.fwmark),
      routes: routes.sort(
        (a, b) => a.family - b.family || a.table - b.table || compareDst(a.dst, b.dst),
      ),
      neighbors: [...neighbors.values()].sort(
        (a, b) => a.family - b.family || (a.address < b.address ? -1 : 1),
      ),
      fdb: [...fdb.values()].sort((a, b) => (a.mac < b.mac ? -1 : 1)),
    };
  }

  /** The egress IPs this node holds: a device each, and the sets that protect them. */
  #planEips(local: LocalFacts): void {
    const { families } = this.#config;
    const eips = new Map<string, EipPlan>();
    this.#eipSets = new Map();
    for (const family of families) {
      const held = new Set<string>();
      for (const view of this.#views.values()) {
        if (view.gatewayNode !== this.#node) continue;
        for (const address of view.floating)
          if (familyOfText(address) === family && !this.#withheld.has(address))
            held.add(hostOf(address).cidr);
      }
      const name = eipSetName(family);
      const set: IpSetPlan = {
        name,
        family,
        members: this.#holdEgressIPs ? normalizeCidrList(held) : [],
        nomatch: [],
      };
      this.#eipSets.set(name, set);
      this.#changedSets.push(set);
      if (!this.#holdEgressIPs) continue;
      for (const key of this.#order) {
        const part = this.#parts.get(key);
        if (part?.families.get(family)?.decision.kind !== "gateway") continue;
        for (const address of part.view.floating) {
          if (familyOfText(address) !== family || eips.has(address)) continue;
          if (this.#withheld.has(address)) continue;
          eips.set(address, {
            device: eipDeviceName(address),
            parent: part.view.announceInterface ?? local.underlay.device,
            mac: eipMac(address),
            address,
            family,
          });
        }
      }
    }
    const list = [...eips.values()].sort((a, b) => (a.device < b.device ? -1 : 1));
    this.#eips = sameEips(this.#eips, list) ? this.#eips : list;
  }

  /** The classes of sources (nftables): what changed since the last plan is fed to the tables. */
  #planClasses(): void {
    const { families } = this.#config;
    const tables = this.#choice.tables;
    const orderChanged = this.#rankOrder !== this.#order;
    // A new routing table choice can turn steering into dropping: re-feed every policy (the
    // tables ignore what did not change). A new order is the tables' own business (setOrder),
    // and a policy that changed is replanned: with 10,000 policies, re-feeding them all for
    // each one added cost ~35 ms a plan.
    const all = this.#classesTables !== tables || this.#staticDirty || this.#nft === undefined;
    this.#classesTables = tables;
    const keys = all ? new Set([...this.#parts.keys(), ...this.#replanned]) : this.#replanned;
    const rank = orderChanged ? new Map(this.#order.map((k, i) => [k, i])) : undefined;
    const classes: Partial<Record<Family, readonly TrafficClass[]>> = {};
    const snat: Partial<Record<Family, readonly string[]>> = {};
    const snatGroups: Partial<Record<Family, readonly (readonly string[])[]>> = {};
    const held: Partial<Record<Family, readonly string[]>> = {};
    const tunnelClasses: Partial<Record<Family, readonly TunnelClassSnat[]>> = {};
    for (const family of families) {
      const table = getOrInsert(this.#classTables, family, () => new ClassTable(family));
      if (this.#ignoreChanged) {
        const ignore = new RangeSet();
        for (const c of this.#ignore) {
          const cidr = parseCidr(c);
          if (cidr.family === family) ignore.add(cidrToRange(cidr));
        }
        table.setIgnore(ignore);
      }
      if (rank !== undefined) table.setOrder(rank);
      for (const key of keys) {
        const part = this.#parts.get(key);
        const fp = part?.families.get(family);
        if (part === undefined || fp === undefined || fp.decision.sources.length === 0) {
          table.set(key, undefined, []);
          this.#classPolicies.delete(`${family}/${key}`);
          continue;
        }
        const d = fp.decision;
        const eips = d.kind === "gateway" ? part.view.snat[family]! : [];
        const verdict: ClassVerdict =
          d.kind === "gateway"
            ? { kind: "snat", eip: eips[0]!, ...(eips.length > 1 ? { eips } : {}) }
            : d.kind === "steer" && tables.has(`node/${d.gateway.name}`)
              ? {
                  kind: "steer",
                  nodeID: d.gateway.nodeID,
                  ...(classToward(part.view, d.gateway) === undefined
                    ? {}
                    : { tunnelClass: part.view.tunnelClass }),
                }
              : { kind: "drop" };
        const v = part.view;
        const target =
          verdict.kind === "steer"
            ? steerKey(verdict)
            : verdict.kind === "snat"
              ? snatAddresses(verdict).join(",")
              : "";
        const sig = `${v.destinationCIDRs.join(",")}|${v.excludedCIDRs.join(",")}|${JSON.stringify(v.ports)}|${verdict.kind}:${target}`;
        const memo = `${family}/${key}`;
        let cached = this.#classPolicies.get(memo);
        if (cached?.sig !== sig) {
          cached = {
            sig,
            policy: {
              key,
              destinations: v.destinationCIDRs,
              excluded: v.excludedCIDRs,
              ports: v.ports,
              verdict,
            },
          };
          this.#classPolicies.set(memo, cached);
        }
        table.set(key, cached.policy, d.sources);
      }
      const list = table.classes();
      classes[family] = list;
      // What the classes and tunnel classes name, counted as they change: a pod added changes
      // one class of 1,000, and walking all of them cost ~1 ms a plan.
      const uses = getOrInsert(this.#uses, family, () => new FamilyUses());
      uses.setClasses(list, this.#steer);
      // The gateway side of tunnel classes (see #familyRules): every policy held here.
      for (const key of keys) {
        const part = this.#parts.get(key);
        const tunnelClass = part?.view.tunnelClass;
        const eips = part?.view.snat[family] ?? [];
        uses.setTunnel(
          key,
          part?.families.get(family)?.decision.kind === "gateway" &&
            tunnelClass !== undefined &&
            eips.length > 0
            ? { tunnelClass, policy: key, eips }
            : undefined,
        );
      }
      const tunnelList = uses.tunnelClasses();
      if (tunnelList.length > 0) tunnelClasses[family] = tunnelList;
      snat[family] = uses.eips.list();
      const groups = uses.groups.list();
      if (groups.length > 0) snatGroups[family] = groups;
      held[family] = this.#eipSets.get(eipSetName(family))?.members ?? [];
    }
    this.#replanned.clear();
    this.#ignoreChanged = false;
    this.#rankOrder = this.#order;
    this.#tunnelPeers ??= {
      port: this.#config.port,
      peers: Object.fromEntries(
        families.map((f) => [f, this.#peerUnderlays[f].map((c) => c.split("/")[0]!)]),
      ),
    };
    const next: NftPlan = {
      tunnelPeers: this.#tunnelPeers,
      classes,
      steerTo: this.#steer.list(),
      ...(Object.keys(tunnelClasses).length === 0 ? {} : { tunnelClasses }),
      snat,
      ...(Object.keys(snatGroups).length === 0 ? {} : { snatGroups }),
      held,
      noSnatBySets: this.#config.noSnatBySets,
      ...(this.#config.snatPorts === undefined ? {} : { snatPorts: this.#config.snatPorts }),
    };
    const prev = this.#nft;
    this.#nft =
      prev !== undefined &&
      prev.tunnelPeers === next.tunnelPeers &&
      families.every(
        (f) =>
          prev.classes[f] === next.classes[f] &&
          // Counted lists keep their identity while they hold the same addresses (Tally.list).
          prev.snat[f] === next.snat[f] &&
          prev.snatGroups?.[f] === next.snatGroups?.[f] &&
          sameItems(prev.held[f] ?? [], next.held[f] ?? []) &&
          prev.tunnelClasses?.[f] === next.tunnelClasses?.[f],
      ) &&
      prev.steerTo === next.steerTo
        ? prev
        : next;
  }

  /** The peers' underlay addresses of one family, made once per list. */
  #peerSet(family: Family): IpSetPlan {
    const name = peersSetName(family);
    let set = this.#peerSets.get(name);
    if (set === undefined) {
      set = { name, family, members: this.#peerUnderlays[family], nomatch: [] };
      this.#peerSets.set(name, set);
      this.#changedSets.push(set);
    }
    return set;
  }

  /** The ignore set of one family, made once per list of ignore CIDRs. */
  #ignoreSet(family: Family): IpSetPlan {
    const name = ignoreSetName(family);
    let set = this.#ignoreSets.get(name);
    if (set === undefined) {
      set = {
        name,
        family,
        members: this.#ignore.filter((c) => familyOfText(c) === family),
        nomatch: [],
      };
      this.#ignoreSets.set(name, set);
      this.#changedSets.push(set);
    }
    return set;
  }

  /**
   * Every set, sorted by name; unchanged sets keep their identity. When no set appeared or went
   * (a pod added or removed), only the sets that changed are put in place of the old ones.
   */
  #planSets(): void {
    const prev = this.#setList;
    for (const family of this.#config.families) {
      this.#ignoreSet(family);
      this.#peerSet(family);
    }
    if (!this.#setNamesDirty && prev.length > 0 && this.#setIndex.size === prev.length) {
      let list: IpSetPlan[] | undefined;
      let complete = true;
      for (const set of this.#changedSets) {
        const i = this.#setIndex.get(set.name);
        if (i === undefined) {
          complete = false;
          break;
        }
        const kept = keepSet(prev[i], set);
        if (kept !== (list ?? prev)[i]) {
          list ??= prev.slice();
          list[i] = kept;
        }
      }
      if (complete) {
        this.#changedSets = [];
        if (list !== undefined) this.#setList = list;
        return;
      }
    }
    const byName = new Map<string, IpSetPlan>();
    for (const family of this.#config.families) {
      byName.set(ignoreSetName(family), this.#ignoreSet(family));
      byName.set(peersSetName(family), this.#peerSet(family));
      const eip = this.#eipSets.get(eipSetName(family));
      if (eip !== undefined) byName.set(eip.name, eip);
    }
    for (const part of this.#parts.values()) {
      for (const fp of part.families.values()) {
        if (fp.src !== undefined) byName.set(fp.src.name, fp.src);
        if (fp.dst !== undefined) byName.set(fp.dst.name, fp.dst);
      }
    }
    const previous = prev.map((s) => byName.get(s.name));
    const list =
      previous.length === byName.size && previous.every((s) => s !== undefined)
        ? (previous as IpSetPlan[])
        : [...byName.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (let i = 0; i < list.length; i++) {
      const before = prev[i];
      if (before !== undefined) list[i] = keepSet(before, list[i]!);
    }
    this.#setList = sameItems(prev, list) ? prev : list;
    this.#setIndex = new Map(this.#setList.map((set, i) => [set.name, i]));
    this.#changedSets = [];
  }
}

const NO_RULES = (families: readonly Family[]): Record<Family, FamilyRules> => {
  const rules = {} as Record<Family, FamilyRules>;
  for (const f of families) rules[f] = { chains: new Map(), hooks: [] };
  return rules;
};

const chainTexts = new WeakMap<readonly Rule[], string>();
/** A chain's rules as comparable text, once per chain object. */
function chainText(rules: readonly Rule[]): string {
  let text = chainTexts.get(rules);
  if (text === undefined) {
    text = JSON.stringify(rules);
    chainTexts.set(rules, text);
  }
  return text;
}

/**
 * `next` with each chain whose rules did not change replaced by the same chain of `prev`, and
 * `prev` itself when nothing changed: a takeover that rewrites one chain of a thousand leaves the
 * others as they were, and the datapath's diff skips them by reference.
 */
function keepChains(prev: FamilyRules | undefined, next: FamilyRules): FamilyRules {
  if (prev === undefined) return next;
  let same = prev.chains.size === next.chains.size && sameHooks(prev.hooks, next.hooks);
  const chains = new Map<TableName, ReadonlyMap<string, readonly Rule[]>>();
  for (const [table, tableChains] of next.chains) {
    const before = prev.chains.get(table);
    let sameTable = before !== undefined && before.size === tableChains.size;
    const kept = new Map<string, readonly Rule[]>();
    for (const [name, rules] of tableChains) {
      const old = before?.get(name);
      const keep = old !== undefined && chainText(old) === chainText(rules);
      kept.set(name, keep ? old : rules);
      sameTable &&= keep;
    }
    chains.set(table, sameTable ? before! : kept);
    same &&= sameTable;
  }
  return same ? prev : { chains, hooks: next.hooks };
}

function sameHooks(a: readonly Hook[], b: readonly Hook[]): boolean {
  return a.length === b.length && JSON.stringify(a) === JSON.stringify(b);
}

function sameSetNames(a: PolicyPart | undefined, b: PolicyPart): boolean {
  if (a === undefined) return b.families.size === 0;
  for (const family of [4, 6] as const) {
    const x = a.families.get(family);
    const y = b.families.get(family);
    if ((x?.src === undefined) !== (y?.src === undefined)) return false;
    if ((x?.dst === undefined) !== (y?.dst === undefined)) return false;
  }
  return true;
}

/**
 * The SNAT rules of one of a policy's rules (`variant`: its protocol and ports) on its gateway:
 * one per egress IP of the family, the first n−1 taking every (n−i)-th new connection that
 * reaches them (`-m statistic --mode nth --every n-i --packet 0`), the last the rest, so that
 * new connections go round-robin over the addresses (measured against a random choice and the
 * kernel's own per-address hash in docs/datapath.md: round-robin fills every address's ports
 * first time). With `ports`, a rule without protocol becomes one per TCP, UDP and SCTP naming the
 * ports, and one for the other protocols without them (iptables names ports only with a
 * protocol).
 */
function snatRules(
  variant: Pick<Rule, "protocol" | "dports">,
  addresses: readonly string[],
  family: Family,
  ports: NodeConfig["snatPorts"],
): Rule[] {
  const protocols: Pick<Rule, "protocol" | "dports">[] =
    ports === undefined || variant.protocol !== undefined
      ? [variant]
      : [{ protocol: "tcp" }, { protocol: "udp" }, { protocol: "sctp" }, {}];
  const out: Rule[] = [];
  for (const p of protocols) {
    const range =
      ports !== undefined && p.protocol !== undefined ? `:${ports.first}-${ports.last}` : "";
    addresses.forEach((a, i) => {
      const n = addresses.length - i;
      out.push({
        ...variant,
        ...p,
        ...(n > 1 ? { statistic: { every: n, packet: 0 } } : {}),
        target: { kind: "SNAT", to: `${family === 6 && range !== "" ? `[${a}]` : a}${range}` },
      });
    });
  }
  return out;
}

function sameTables(a: TableChoice, b: TableChoice): boolean {
  if (a.tables.size !== b.tables.size || a.errors.length !== b.errors.length) return false;
  for (const [k, v] of a.tables) if (b.tables.get(k) !== v) return false;
  return a.errors.every((e, i) => e === b.errors[i]);
}

type GroupTarget =
  | { readonly kind: "gateway" }
  | { readonly kind: "steer"; readonly gateway: PeerView }
  | { readonly kind: "drop" };

/** The rules of a group chain (see #familyRules). */
function groupRules(target: GroupTarget | undefined, tunnel: string): Rule[] {
  if (target?.kind === "gateway")
    return [
      // The tunnel class is for steered connections only (their packets carry it into the
      // tunnel): a connection SNATed here keeps none, nor do its replies.
      { target: { kind: "CONNMARK", value: 0, mask: TUNNEL_CLASS_MASK } },
      {
        comment: "sallyport: this node holds the egress IPs",
        target: { kind: "GOTO", chain: CHAIN_GATEWAY },
      },
    ];
  if (target?.kind !== "steer")
    // No node holds the egress IPs, it cannot be reached, or no routing table is free for it:
    // fail closed rather than let the traffic out with another address.
    return [{ comment: "sallyport: no gateway to steer to", target: { kind: "DROP" } }];
  const gateway = target.gateway;
  return [
    {
      // Another node holds the egress IPs: what came through the tunnel (a peer that thinks
      // this node holds them) goes no further, and never back into the tunnel.
      inInterface: tunnel,
      comment: "sallyport: another node holds the egress IPs",
      target: { kind: "DROP" },
    },
    {
      // The steer prefix; the tunnel class stays for a gateway whose tunnel takes them.
      target: {
        kind: "CONNMARK",
        value: STEER_PREFIX,
        mask: (PREFIX_MASK | (gateway.tunnelClasses === true ? 0 : TUNNEL_CLASS_MASK)) >>> 0,
      },
    },
    { target: { kind: "MARK", value: nodeMark(gateway.nodeID), mask: MARK_WRITE_MASK } },
    { target: { kind: "ACCEPT" } },
  ];
}

/** The tunnel class a node names in the packets of `policy` it steers to `gateway`, if any. */
function classToward(policy: PolicyView, gateway: PeerView): number | undefined {
  return gateway.tunnelClasses === true ? policy.tunnelClass : undefined;
}

function byText(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Values counted by key: kept while at least one user names them. */
class Tally<T> {
  readonly #counts = new Map<string, { value: T; n: number }>();
  readonly #compare: (a: T, b: T) => number;
  #changed = true;
  #list: readonly T[] = [];
  #listKeys: readonly string[] = [];

  /** @param compare the order of `list()` */
  constructor(compare: (a: T, b: T) => number) {
    this.#compare = compare;
  }

  add(key: string, value: T, by: 1 | -1): void {
    const c = this.#counts.get(key);
    if (c === undefined) {
      if (by < 0) throw new Error(`Cannot uncount ${key}: it was not counted`);
      this.#counts.set(key, { value, n: 1 });
      this.#changed = true;
    } else {
      c.n += by;
      if (c.n > 0) return;
      this.#counts.delete(key);
      this.#changed = true;
    }
  }

  /**
   * The values counted, sorted; the same list while the same keys are counted (the datapath
   * compares plan lists by reference).
   */
  list(): readonly T[] {
    if (this.#changed) {
      const sorted = [...this.#counts].sort(([, a], [, b]) => this.#compare(a.value, b.value));
      const keys = sorted.map(([k]) => k);
      if (!sameItems(keys, this.#listKeys)) {
        this.#list = sorted.map(([, c]) => c.value);
        this.#listKeys = keys;
      }
      this.#changed = false;
    }
    return this.#list;
  }
}

/** What one family's classes and tunnel classes name: the egress IPs and groups to SNAT to. */
class FamilyUses {
  /** The class list counted. */
  #classes: readonly TrafficClass[] = [];
  readonly eips = new Tally<string>(byText);
  readonly groups = new Tally<readonly string[]>((a, b) => byText(a.join(","), b.join(",")));
  /** Tunnel classes by policy key. */
  readonly #tunnel = new Map<string, TunnelClassSnat>();
  /** Policies by tunnel class (those of one egress IP share it). */
  readonly #byClass = new Map<number, Set<string>>();
  /** The policy that stands for each class: the first by name. */
  readonly #first = new Map<number, TunnelClassSnat>();
  #tunnelList: readonly TunnelClassSnat[] = [];
  #tunnelChanged = false;

  /** Counts the classes that came, and uncounts those that went, since the last list. */
  setClasses(list: readonly TrafficClass[], steer: Tally<SteerTarget>): void {
    if (list === this.#classes) return;
    const count = (c: TrafficClass, by: 1 | -1) => {
      const u = usesOf(c);
      for (const eips of u.snat) this.#count(eips, by);
      for (const [k, target] of u.steer) steer.add(k, target, by);
    };
    forClassChanges(this.#classes, list, false, (o, c) => {
      if (o !== undefined) count(o, -1);
      if (c !== undefined) count(c, 1);
      return false;
    });
    this.#classes = list;
  }

  /** A policy's tunnel class on this gateway node, or undefined when it has none here. */
  setTunnel(key: string, now: TunnelClassSnat | undefined): void {
    const before = this.#tunnel.get(key);
    if (
      before === undefined
        ? now === undefined
        : now !== undefined &&
          before.tunnelClass === now.tunnelClass &&
          sameItems(before.eips, now.eips)
    )
      return;
    if (before !== undefined) {
      this.#count(before.eips, -1);
      this.#tunnel.delete(key);
      const members = this.#byClass.get(before.tunnelClass)!;
      members.delete(key);
      if (members.size === 0) this.#byClass.delete(before.tunnelClass);
      // The first by name left: the next one stands for the class (a walk of that class only).
      if (this.#first.get(before.tunnelClass)?.policy === key) {
        let next: TunnelClassSnat | undefined;
        for (const k of members) {
          const t = this.#tunnel.get(k)!;
          if (next === undefined || byText(t.policy, next.policy) < 0) next = t;
        }
        if (next === undefined) this.#first.delete(before.tunnelClass);
        else this.#first.set(before.tunnelClass, next);
        this.#tunnelChanged = true;
      }
    }
    if (now !== undefined) {
      this.#count(now.eips, 1);
      this.#tunnel.set(key, now);
      getOrInsert(this.#byClass, now.tunnelClass, () => new Set()).add(key);
      const had = this.#first.get(now.tunnelClass);
      if (had === undefined || byText(now.policy, had.policy) < 0) {
        this.#first.set(now.tunnelClass, now);
        this.#tunnelChanged = true;
      }
    }
  }

  /**
   * The tunnel classes by number, each once (policies with the same egress IPs share one: the
   * first by name stands for them); the same list while they stay the same.
   */
  tunnelClasses(): readonly TunnelClassSnat[] {
    if (this.#tunnelChanged) {
      const now = [...this.#first.values()].sort((a, b) => a.tunnelClass - b.tunnelClass);
      if (!sameTunnelClasses(this.#tunnelList, now)) this.#tunnelList = now;
      this.#tunnelChanged = false;
    }
    return this.#tunnelList;
  }

  #count(eips: readonly string[], by: 1 | -1): void {
    for (const a of eips) this.eips.add(a, a, by);
    if (eips.length > 1) this.groups.add(eips.join(","), eips, by);
  }
}

/** The egress IP lists and steering targets a class's entries name, once per class object. */
interface ClassUses {
  readonly snat: readonly (readonly string[])[];
  readonly steer: ReadonlyMap<string, SteerTarget>;
}
const CLASS_USES = new WeakMap<TrafficClass, ClassUses>();
function usesOf(c: TrafficClass): ClassUses {
  let uses = CLASS_USES.get(c);
  if (uses === undefined) {
    const snat = new Map<string, readonly string[]>();
    const steer = new Map<string, SteerTarget>();
    for (const e of c.entries) {
      if (e.verdict.kind === "snat") {
        const eips = snatAddresses(e.verdict);
        snat.set(eips.join(","), eips);
      } else if (e.verdict.kind === "steer") {
        const { nodeID, tunnelClass } = e.verdict;
        const target: SteerTarget =
          tunnelClass === undefined ? { nodeID } : { nodeID, tunnelClass };
        steer.set(steerKey(target), target);
      }
    }
    uses = { snat: [...snat.values()], steer };
    CLASS_USES.set(c, uses);
  }
  return uses;
}

function steerKey(t: SteerTarget): string {
  return `${t.nodeID}/${t.tunnelClass ?? 0}`;
}

function sameTunnelClasses(a: readonly TunnelClassSnat[], b: readonly TunnelClassSnat[]): boolean {
  return (
    a.length === b.length &&
    a.every(
      (x, i) =>
        x.tunnelClass === b[i]!.tunnelClass &&
        x.policy === b[i]!.policy &&
        sameItems(x.eips, b[i]!.eips),
    )
  );
}

function sameTunnel(a: TunnelPlan, b: TunnelPlan): boolean {
  return (
    a.name === b.name &&
    a.vni === b.vni &&
    a.port === b.port &&
    a.local === b.local &&
    a.parent === b.parent &&
    a.mtu === b.mtu &&
    a.mac === b.mac &&
    a.gbp === b.gbp &&
    sameItems(a.addresses, b.addresses)
  );
}

function sameEips(a: readonly EipPlan[], b: readonly EipPlan[]): boolean {
  return (
    a.length === b.length &&
    a.every((x, i) => {
      const y = b[i]!;
      return x.device === y.device && x.parent === y.parent && x.address === y.address;
    })
  );
}

/** The datapath `view.node` must carry: the planner fed from scratch. */
export function planNode(view: NodeView): NodePlan {
  const planner = new NodePlanner(view.node, view.config);
  planner.setLocal(view.local);
  planner.setPeers(view.peers);
  for (const p of view.policies) planner.setPolicy(p);
  planner.setIgnoreCIDRs(view.ignoreCIDRs);
  return planner.plan();
}

function compareDst(a: string, b: string): number {
  if (a === b) return 0;
  if (a === "default") return -1;
  if (b === "default") return 1;
  const ca = parseCidr(a);
  const cb = parseCidr(b);
  return ca.base < cb.base ? -1 : ca.base > cb.base ? 1 : ca.prefix - cb.prefix;
}
