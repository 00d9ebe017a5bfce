/**
 * The cluster engine: from a Snapshot, compute
 *  - an identity per node (node id → NODE_MARK, tunnel addresses, tunnel MAC),
 *  - per policy: accepted or not and why, egress IPs, the gateway node, matched endpoints,
 *    which higher-precedence policies shadow it, and its revision,
 *  - per gateway: nodes, their health and egress IPs, pool usage,
 *  - the cluster's ignore CIDRs.
 *
 * Pure and deterministic. Allocation is stable: what the previous state held is kept while it is
 * still valid, so an unrelated change never moves an egress IP. `ClusterEngine` keeps indexes so
 * that a pod change costs only the policies that select that pod; `computeCluster` is the same
 * computation from scratch, and the tests hold the two equal.
 */

import {
  type AnyPolicy,
  type EgressGateway,
  MAX_PRIORITY,
  type PortSpec,
  policyKey,
} from "../api/types.ts";
import { parsePool, validateObject } from "../api/validate.ts";
import {
  type Address,
  bits,
  cidrToRange,
  FAMILIES,
  type Family,
  familyOfText,
  formatAddress,
  hostCidr,
  normalizeCidrList,
  parseAddress,
  parseCidr,
  type Range,
  rangeSize,
  tryParseCidr,
} from "../lib/ip.ts";
import { getOrInsert } from "../lib/maps.ts";
import { RangeSet } from "../lib/rangeset.ts";
import {
  type CompiledSelector,
  compileSelector,
  formatSelector,
  type Labels,
  sameLabels,
} from "../lib/selector.ts";
import { MAX_NODE_ID, tunnelMac } from "./marks.ts";
import { policySetName } from "./names.ts";
import { comparePrecedence } from "./precedence.ts";
import {
  isEligiblePod,
  type NodeIdentity,
  type NodeInfo,
  type PodInfo,
  podKey,
  type Snapshot,
  selectsPod,
} from "./snapshot.ts";
import { type EndpointView, type PeerView, type PolicyView, policyRevision } from "./view.ts";

export interface EngineCondition {
  readonly type: "Accepted" | "GatewayAssigned" | "Conflicted";
  readonly status: "True" | "False";
  readonly reason: string;
  readonly message: string;
}

export interface Shadow {
  readonly policy: string;
  readonly pods: number;
}

export interface PolicyOutcome {
  readonly key: string;
  readonly kind: "EgressPolicy" | "ClusterEgressPolicy";
  readonly namespace?: string | undefined;
  readonly name: string;
  readonly generation: number;
  readonly gateway: string;
  readonly accepted: boolean;
  readonly gatewayNode?: string | undefined;
  /** The source addresses the outside sees, one per family. */
  readonly egressIPs: readonly string[];
  readonly endpoints: readonly EndpointView[];
  readonly shadowedBy: readonly Shadow[];
  readonly conditions: readonly EngineCondition[];
  /** Present when accepted: what nodes program, and its revision. */
  readonly view?: PolicyView | undefined;
  readonly revision?: string | undefined;
  /** Nodes whose datapath carries rules of this policy. */
  readonly targetNodes: readonly string[];
}

export interface GatewayNodeOutcome {
  readonly name: string;
  readonly ready: boolean;
  readonly egressIPs: readonly string[];
  readonly policies: number;
}

export interface PoolUsage {
  readonly size: bigint;
  readonly allocated: number;
}

export interface GatewayOutcome {
  readonly name: string;
  readonly nodes: readonly GatewayNodeOutcome[];
  readonly pool: Readonly<Partial<Record<Family, PoolUsage>>>;
  readonly conditions: readonly EngineCondition[];
}

export interface ClusterOutcome {
  readonly families: readonly Family[];
  readonly identities: ReadonlyMap<string, NodeIdentity>;
  /** Nodes that could not get an identity, with the reason. */
  readonly identityErrors: ReadonlyMap<string, string>;
  readonly peers: ReadonlyMap<string, PeerView>;
  readonly policies: ReadonlyMap<string, PolicyOutcome>;
  readonly gateways: ReadonlyMap<string, GatewayOutcome>;
  readonly ignoreCIDRs: readonly string[];
}

type Mode = "explicit" | "pool" | "nodeIP" | "interface";

interface PreparedPolicy {
  readonly policy: AnyPolicy;
  readonly key: string;
  readonly rank: number;
  readonly priority: number;
  readonly createdAt: string;
  readonly namespace: string | undefined;
  readonly podSelector: CompiledSelector;
  readonly nodeSelector: CompiledSelector | undefined;
  readonly namespaceSelector: CompiledSelector | undefined;
  readonly destinations: readonly string[];
  readonly excluded: readonly string[];
  readonly ports: readonly PortSpec[];
  readonly mode: Mode;
  /** Destination set minus exclusions, for overlap tests. */
  readonly reach: RangeSet;
}

interface Static {
  readonly families: readonly Family[];
  readonly identities: Map<string, NodeIdentity>;
  readonly identityErrors: Map<string, string>;
  readonly peers: Map<string, PeerView>;
  readonly nodes: Map<string, NodeInfo>;
  /** Policies the datapath carries, in precedence order. */
  readonly active: PreparedPolicy[];
  readonly rejected: Map<string, { policy: AnyPolicy; conditions: EngineCondition[] }>;
  readonly placement: Map<string, Placement>;
  readonly gateways: Map<string, GatewayOutcome>;
  readonly ignoreCIDRs: string[];
  readonly namespaceLabels: Map<string, Labels>;
}

interface Placement {
  readonly gatewayNode?: string | undefined;
  readonly snat: Partial<Record<Family, string>>;
  readonly floating: readonly string[];
  readonly announceInterface?: string | undefined;
  readonly conditions: EngineCondition[];
}

const cond = (
  type: EngineCondition["type"],
  status: "True" | "False",
  reason: string,
  message: string,
): EngineCondition => ({ type, status, reason, message });

function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

// ------------------------------------------------------------------------------------------------
// Identities

function computeIdentities(snapshot: Snapshot, families: readonly Family[]) {
  const identities = new Map<string, NodeIdentity>();
  const errors = new Map<string, string>();
  const names = snapshot.nodes.map((n) => n.name).sort();
  const usedIDs = new Set<number>();
  for (const name of names) {
    const prev = snapshot.previousNodes.get(name);
    if (
      prev !== undefined &&
      prev.nodeID >= 0 &&
      prev.nodeID <= MAX_NODE_ID &&
      !usedIDs.has(prev.nodeID)
    ) {
      usedIDs.add(prev.nodeID);
      identities.set(name, { nodeID: prev.nodeID, mac: "", tunnel: {} });
    }
  }
  let next = 0;
  for (const name of names) {
    if (identities.has(name)) continue;
    while (usedIDs.has(next)) next++;
    if (next > MAX_NODE_ID) {
      errors.set(
        name,
        `Cannot give node ${name} an id: all ${MAX_NODE_ID + 1} node ids are in use`,
      );
      continue;
    }
    usedIDs.add(next);
    identities.set(name, { nodeID: next, mac: "", tunnel: {} });
  }
  const bases = new Map<Family, { first: bigint; last: bigint }>();
  for (const family of families) {
    const text = snapshot.config.tunnelCIDRs[family];
    if (text === undefined) continue;
    const range = cidrToRange(parseCidr(text));
    bases.set(family, { first: range.first, last: range.last });
  }
  for (const [name, id] of identities) {
    const tunnel: Partial<Record<Family, string>> = {};
    for (const [family, range] of bases) {
      const value = range.first + 1n + BigInt(id.nodeID);
      if (value < range.last) tunnel[family] = formatAddress({ family, value });
      else {
        errors.set(
          name,
          `Cannot give node ${name} an IPv${family} tunnel address: node id ${id.nodeID} does not fit in ${snapshot.config.tunnelCIDRs[family]}; use a larger tunnel CIDR`,
        );
      }
    }
    identities.set(name, { nodeID: id.nodeID, mac: tunnelMac(id.nodeID), tunnel });
  }
  return { identities, errors };
}

function computePeers(
  snapshot: Snapshot,
  identities: Map<string, NodeIdentity>,
): Map<string, PeerView> {
  const peers = new Map<string, PeerView>();
  const nodes = new Map(snapshot.nodes.map((n) => [n.name, n]));
  for (const [name, id] of identities) {
    const report = snapshot.reports.get(name);
    const node = nodes.get(name);
    const underlay =
      report?.underlay?.ipv4 ?? node?.addresses[4] ?? report?.underlay?.ipv6 ?? node?.addresses[6];
    peers.set(name, {
      name,
      nodeID: id.nodeID,
      mac: id.mac,
      tunnel: id.tunnel,
      underlay,
      podCIDRs: normalizeCidrList(node?.podCIDRs ?? []),
    });
  }
  return peers;
}

// ------------------------------------------------------------------------------------------------
// Policies: validation and preparation

function policyMode(policy: AnyPolicy, gateway: EgressGateway | undefined): Mode {
  if (policy.spec.egressIP !== undefined) return "explicit";
  if (policy.spec.interface !== undefined) return "interface";
  if (policy.spec.useNodeIP === true) return "nodeIP";
  return (gateway?.spec.pool ?? []).length > 0 ? "pool" : "nodeIP";
}

function reachOf(
  destinations: readonly string[],
  excluded: readonly string[],
  families: readonly Family[],
) {
  const set = new RangeSet();
  if (destinations.length === 0) {
    for (const family of families)
      set.add({ family, first: 0n, last: (1n << BigInt(bits(family))) - 1n });
  } else {
    for (const d of destinations) set.add(cidrToRange(parseCidr(d)));
  }
  for (const e of excluded) set.subtract(cidrToRange(parseCidr(e)));
  return set;
}

function portsOverlap(a: readonly PortSpec[], b: readonly PortSpec[]): boolean {
  if (a.length === 0 || b.length === 0) return true;
  for (const x of a) {
    for (const y of b) {
      if ((x.protocol ?? "TCP") !== (y.protocol ?? "TCP")) continue;
      const [x1, x2] = x.port === undefined ? [1, 65535] : [x.port, x.endPort ?? x.port];
      const [y1, y2] = y.port === undefined ? [1, 65535] : [y.port, y.endPort ?? y.port];
      if (x1 <= y2 && y1 <= x2) return true;
    }
  }
  return false;
}

// ------------------------------------------------------------------------------------------------
// Egress IPs and gateway placement

interface Pool {
  readonly ranges: Range[];
}

function poolOf(gateway: EgressGateway): Pool {
  return { ranges: parsePool(gateway.spec.pool).ranges.map((r) => r.range) };
}

function inPool(pool: Pool, a: Address): boolean {
  return pool.ranges.some((r) => r.family === a.family && r.first <= a.value && a.value <= r.last);
}

/**
 * Hands out the lowest free addresses of a pool in order. Allocation only adds to `taken`, so a
 * cursor that never moves back finds each next free address without rescanning the pool.
 */
class PoolCursor {
  readonly #ranges: Range[];
  readonly #family: Family;
  #range = 0;
  #value: bigint | undefined;
  constructor(pool: Pool, family: Family) {
    this.#ranges = pool.ranges.filter((r) => r.family === family);
    this.#family = family;
  }
  next(taken: Set<string>): string | undefined {
    while (this.#range < this.#ranges.length) {
      const r = this.#ranges[this.#range]!;
      let v = this.#value ?? r.first;
      while (v <= r.last) {
        const text = formatAddress({ family: this.#family, value: v });
        v++;
        if (!taken.has(text)) {
          this.#value = v;
          return text;
        }
      }
      this.#range++;
      this.#value = undefined;
    }
    return undefined;
  }
}

class UnionFind {
  readonly #parent = new Map<string, string>();
  find(x: string): string {
    let root = x;
    while (this.#parent.has(root) && this.#parent.get(root) !== root)
      root = this.#parent.get(root)!;
    this.#parent.set(x, root);
    return root;
  }
  union(a: string, b: string): void {
    const ra = this.find(a);
    const rb = this.find(b);
    // The smaller key becomes the root, so roots do not depend on union order.
    if (ra < rb) this.#parent.set(rb, ra);
    else if (rb < ra) this.#parent.set(ra, rb);
  }
}

// ------------------------------------------------------------------------------------------------

export class ClusterEngine {
  #snapshot: Snapshot;
  #static: Static | undefined;
  readonly #pods = new Map<string, PodInfo>();
  /** Endpoint of each eligible pod, canonicalized once and shared by every policy selecting it. */
  readonly #endpoints = new Map<string, EndpointView>();
  /** namespace → pod keys */
  readonly #podsByNamespace = new Map<string, Set<string>>();
  /** labelIndex(namespace, label, value) → pod keys */
  readonly #podsByLabel = new Map<string, Set<string>>();
  /** policy key → endpoints by pod key */
  #members = new Map<string, Map<string, EndpointView>>();
  /** pod key → keys of active policies that select it */
  #podPolicies = new Map<string, string[]>();
  /** loser key → winner key → shared pods */
  #shadows = new Map<string, Map<string, number>>();
  #outcomes = new Map<string, PolicyOutcome>();
  readonly #dirty = new Set<string>();

  constructor(snapshot: Snapshot) {
    this.#snapshot = snapshot;
    for (const pod of snapshot.pods) this.#indexPod(pod);
  }

  /** Replaces everything but the pods (policies, gateways, nodes, health…). */
  setInputs(snapshot: Omit<Snapshot, "pods">): void {
    this.#snapshot = { ...snapshot, pods: [] };
    this.#static = undefined;
  }

  /**
   * A pod added or changed. A change the engine does not read (most Pod updates) costs nothing.
   * @returns whether anything the engine reads changed
   */
  setPod(pod: PodInfo): boolean {
    const key = podKey(pod);
    const before = this.#pods.get(key);
    if (before !== undefined && samePodInfo(before, pod)) return false;
    if (before !== undefined) this.#unindexPod(before);
    this.#indexPod(pod);
    if (this.#static !== undefined) {
      this.#removeMemberships(key);
      this.#addMemberships(pod);
    }
    return true;
  }

  /** @returns whether the engine knew the pod */
  deletePod(key: string): boolean {
    const before = this.#pods.get(key);
    if (before === undefined) return false;
    this.#unindexPod(before);
    if (this.#static !== undefined) this.#removeMemberships(key);
    return true;
  }

  #indexPod(pod: PodInfo): void {
    const key = podKey(pod);
    this.#pods.set(key, pod);
    if (isEligiblePod(pod)) this.#endpoints.set(key, endpointOf(pod));
    getOrInsert(this.#podsByNamespace, pod.namespace, () => new Set()).add(key);
    for (const k in pod.labels) {
      getOrInsert(
        this.#podsByLabel,
        labelIndex(pod.namespace, k, pod.labels[k]!),
        () => new Set(),
      ).add(key);
    }
  }

  #unindexPod(pod: PodInfo): void {
    const key = podKey(pod);
    this.#pods.delete(key);
    this.#endpoints.delete(key);
    this.#podsByNamespace.get(pod.namespace)?.delete(key);
    for (const k in pod.labels)
      this.#podsByLabel.get(labelIndex(pod.namespace, k, pod.labels[k]!))?.delete(key);
  }

  compute(): ClusterOutcome {
    if (this.#static === undefined) {
      this.#static = this.#computeStatic();
      this.#recomputeMemberships();
    }
    const st = this.#static;
    for (const key of this.#dirty) this.#outcomes.delete(key);
    this.#dirty.clear();
    const policies = new Map<string, PolicyOutcome>();
    for (const p of st.active) {
      let outcome = this.#outcomes.get(p.key);
      if (outcome === undefined) {
        outcome = this.#activeOutcome(p, st);
        this.#outcomes.set(p.key, outcome);
      }
      policies.set(p.key, outcome);
    }
    for (const [key, r] of st.rejected) policies.set(key, rejectedOutcome(r.policy, r.conditions));
    return {
      families: st.families,
      identities: st.identities,
      identityErrors: st.identityErrors,
      peers: st.peers,
      policies,
      gateways: st.gateways,
      ignoreCIDRs: st.ignoreCIDRs,
    };
  }

  // --- static part: everything that does not depend on pods

  #computeStatic(): Static {
    const snapshot = this.#snapshot;
    const families = FAMILIES.filter((f) =>
      snapshot.nodes.some((n) => n.addresses[f] !== undefined),
    );
    const clusterFamilies: Family[] = families.length > 0 ? families : [4];
    const { identities, errors: identityErrors } = computeIdentities(snapshot, clusterFamilies);
    const peers = computePeers(snapshot, identities);
    const nodes = new Map(snapshot.nodes.map((n) => [n.name, n]));
    const namespaceLabels = new Map(snapshot.namespaces.map((n) => [n.name, n.labels]));
    const gatewaysByName = new Map(snapshot.gateways.map((g) => [g.metadata.name ?? "", g]));

    const rejected = new Map<string, { policy: AnyPolicy; conditions: EngineCondition[] }>();
    const prepared: PreparedPolicy[] = [];
    const setNames = new Map<string, string>();
    for (const policy of snapshot.policies) {
      const key = policyKey(policy);
      const errors = validateObject(policy);
      if (errors.length > 0) {
        rejected.set(key, {
          policy,
          conditions: [
            cond(
              "Accepted",
              "False",
              "InvalidSpec",
              errors.map((e) => `${e.field}: ${e.message}`).join("; "),
            ),
          ],
        });
        continue;
      }
      const gateway = gatewaysByName.get(policy.spec.gateway);
      if (gateway === undefined) {
        rejected.set(key, {
          policy,
          conditions: [
            cond(
              "Accepted",
              "False",
              "GatewayNotFound",
              `EgressGateway ${policy.spec.gateway} does not exist: create it or fix spec.gateway`,
            ),
          ],
        });
        continue;
      }
      if (policy.kind === "EgressPolicy" && gateway.spec.namespaceSelector !== undefined) {
        const ns = policy.metadata.namespace ?? "";
        if (!compileSelector(gateway.spec.namespaceSelector).matches(namespaceLabels.get(ns))) {
          rejected.set(key, {
            policy,
            conditions: [
              cond(
                "Accepted",
                "False",
                "NamespaceNotAllowed",
                `EgressGateway ${policy.spec.gateway} only serves namespaces matching ${formatSelector(gateway.spec.namespaceSelector)}; namespace ${ns} does not`,
              ),
            ],
          });
          continue;
        }
      }
      const destinations = normalizeCidrList(policy.spec.destinationCIDRs ?? []);
      const excluded = normalizeCidrList(policy.spec.excludedCIDRs ?? []);
      // The engine checks the promise that set names never collide.
      for (const f of FAMILIES) {
        const name = policySetName("src", f, key);
        const owner = setNames.get(name);
        if (owner !== undefined)
          throw new Error(`ipset name collision between ${owner} and ${key}`);
        setNames.set(name, key);
      }
      prepared.push({
        policy,
        key,
        rank: 0,
        priority: Math.min(MAX_PRIORITY, policy.spec.priority ?? 0),
        createdAt: policy.metadata.creationTimestamp ?? "",
        namespace: policy.kind === "EgressPolicy" ? (policy.metadata.namespace ?? "") : undefined,
        podSelector: compileSelector(policy.spec.podSelector),
        nodeSelector:
          policy.spec.nodeSelector === undefined
            ? undefined
            : compileSelector(policy.spec.nodeSelector),
        namespaceSelector:
          policy.kind === "ClusterEgressPolicy"
            ? compileSelector(policy.spec.namespaceSelector)
            : undefined,
        destinations,
        excluded,
        ports: policy.spec.ports ?? [],
        mode: policyMode(policy, gateway),
        reach: reachOf(destinations, excluded, clusterFamilies),
      });
    }

    const placement = this.#place(
      prepared,
      gatewaysByName,
      clusterFamilies,
      nodes,
      identities,
      rejected,
    );
    const active = prepared
      .filter((p) => !rejected.has(p.key))
      .sort(comparePrecedence)
      .map((p, rank) => ({ ...p, rank }));

    const ignore = new RangeSet();
    const addCidr = (text: string) => {
      const c = tryParseCidr(text);
      if (c !== undefined) ignore.add(cidrToRange(c));
    };
    for (const node of snapshot.nodes) {
      for (const f of FAMILIES) {
        const a = node.addresses[f];
        if (a !== undefined) addCidr(hostCidr(parseAddress(a)));
      }
      node.podCIDRs.forEach(addCidr);
    }
    snapshot.serviceCIDRs.forEach(addCidr);
    snapshot.extraCIDRs.forEach(addCidr);
    snapshot.config.extraIgnoreCIDRs.forEach(addCidr);
    for (const f of clusterFamilies) {
      const t = snapshot.config.tunnelCIDRs[f];
      if (t !== undefined) addCidr(t);
    }

    const gateways = this.#gatewayOutcomes(snapshot.gateways, placement, active, nodes);
    return {
      families: clusterFamilies,
      identities,
      identityErrors,
      peers,
      nodes,
      active,
      rejected,
      placement,
      gateways,
      ignoreCIDRs: ignore.toCidrs(),
      namespaceLabels,
    };
  }

  #place(
    prepared: PreparedPolicy[],
    gateways: Map<string, EgressGateway>,
    families: readonly Family[],
    nodes: Map<string, NodeInfo>,
    identities: ReadonlyMap<string, NodeIdentity>,
    rejected: Map<string, { policy: AnyPolicy; conditions: EngineCondition[] }>,
  ): Map<string, Placement> {
    const snapshot = this.#snapshot;
    const byAge = [...prepared].sort((a, b) =>
      a.createdAt < b.createdAt
        ? -1
        : a.createdAt > b.createdAt
          ? 1
          : a.key < b.key
            ? -1
            : a.key > b.key
              ? 1
              : 0,
    );
    const pools = new Map<string, Pool>();
    const poolFor = (g: EgressGateway) => {
      const name = g.metadata.name ?? "";
      return getOrInsert(pools, name, () => poolOf(g));
    };
    const familiesOf = (p: PreparedPolicy) =>
      p.destinations.length === 0
        ? families
        : families.filter((f) => p.destinations.some((d) => familyOfText(d) === f));

    // Pass 1: explicit addresses, and pool addresses the previous state held that are still valid.
    const explicitOwners = new Map<string, string[]>();
    const dynamicOwner = new Map<string, string>();
    const addresses = new Map<string, string[]>();
    const reject = (p: PreparedPolicy, reason: string, message: string) =>
      rejected.set(p.key, {
        policy: p.policy,
        conditions: [cond("Accepted", "False", reason, message)],
      });

    for (const p of byAge) {
      if (p.mode !== "explicit") continue;
      const gw = gateways.get(p.policy.spec.gateway)!;
      const pool = poolFor(gw);
      const list: string[] = [];
      for (const text of p.policy.spec.egressIP ?? []) {
        const a = parseAddress(text);
        if (!inPool(pool, a)) {
          reject(
            p,
            "EgressIPNotInPool",
            `${text} is not in the pool of EgressGateway ${gw.metadata.name} (${(gw.spec.pool ?? []).join(", ") || "empty"}): pick an address from the pool or add it there`,
          );
          break;
        }
        list.push(formatAddress(a));
      }
      if (rejected.has(p.key)) continue;
      addresses.set(p.key, list);
      for (const a of list) explicitOwners.set(a, [...(explicitOwners.get(a) ?? []), p.key]);
    }
    for (const p of byAge) {
      if (p.mode !== "pool") continue;
      const gw = gateways.get(p.policy.spec.gateway)!;
      const pool = poolFor(gw);
      const prev = snapshot.previousPolicies.get(p.key)?.egressIPs ?? [];
      const kept: string[] = [];
      for (const text of prev) {
        const a = parseAddress(text);
        const canonical = formatAddress(a);
        if (!familiesOf(p).includes(a.family) || !inPool(pool, a)) continue;
        if (explicitOwners.has(canonical) || dynamicOwner.has(canonical)) continue;
        if (kept.some((k) => familyOfText(k) === a.family)) continue;
        kept.push(canonical);
        dynamicOwner.set(canonical, p.key);
      }
      addresses.set(p.key, kept);
    }
    // Explicit claims on an address a pool policy already holds wait until it is free.
    for (const [address, owners] of explicitOwners) {
      const holder = dynamicOwner.get(address);
      if (holder === undefined) continue;
      for (const key of owners) {
        const p = prepared.find((x) => x.key === key)!;
        reject(
          p,
          "EgressIPInUse",
          `${address} is already allocated to ${holder} from the pool; pick another address or delete that policy`,
        );
      }
    }
    // Pass 2: new pool allocations, oldest policy first.
    const taken = new Set<string>([...explicitOwners.keys(), ...dynamicOwner.keys()]);
    const cursors = new Map<string, PoolCursor>();
    const cursorFor = (gw: EgressGateway, family: Family) => {
      const key = `${gw.metadata.name}/${family}`;
      return getOrInsert(cursors, key, () => new PoolCursor(poolFor(gw), family));
    };
    for (const p of byAge) {
      if (p.mode !== "pool" || rejected.has(p.key)) continue;
      const gw = gateways.get(p.policy.spec.gateway)!;
      const pool = poolFor(gw);
      const list = addresses.get(p.key) ?? [];
      const wanted = familiesOf(p).filter((f) => pool.ranges.some((r) => r.family === f));
      const missing: Family[] = [];
      for (const family of wanted) {
        if (list.some((a) => familyOfText(a) === family)) continue;
        const free = cursorFor(gw, family).next(taken);
        if (free === undefined) {
          missing.push(family);
          continue;
        }
        taken.add(free);
        list.push(free);
      }
      addresses.set(p.key, list);
      if (list.length === 0) {
        const usage = familiesOf(p)
          .map((f) => {
            const size = pool.ranges
              .filter((r) => r.family === f)
              .reduce((s, r) => s + rangeSize(r), 0n);
            const used = [...taken].filter(
              (a) => familyOfText(a) === f && inPool(pool, parseAddress(a)),
            ).length;
            return `IPv${f} ${used}/${size} in use`;
          })
          .join(", ");
        reject(
          p,
          wanted.length === 0 ? "NoPoolForFamily" : "PoolExhausted",
          wanted.length === 0
            ? `the pool of EgressGateway ${gw.metadata.name} has no address of the families this policy needs (IPv${familiesOf(p).join(", IPv")})`
            : `Cannot allocate an egress IP for ${p.key}: the pool of EgressGateway ${gw.metadata.name} is exhausted (${usage}); add addresses to the pool or delete unused policies`,
        );
      }
    }

    // Placement units: policies linked through shared addresses must sit on one node.
    const uf = new UnionFind();
    for (const p of byAge) {
      if (rejected.has(p.key)) continue;
      const list = addresses.get(p.key) ?? [];
      uf.find(`policy:${p.key}`);
      for (const a of list) uf.union(`policy:${p.key}`, `ip:${a}`);
    }
    const units = new Map<string, PreparedPolicy[]>();
    for (const p of byAge) {
      if (rejected.has(p.key)) continue;
      const root = uf.find(`policy:${p.key}`);
      units.set(root, [...(units.get(root) ?? []), p]);
    }

    const load = new Map<string, number>();
    const placed = new Map<string, string | undefined>();
    const candidateCache = new Map<string, string[]>();
    const candidatesFor = (gw: EgressGateway, iface: string | undefined) => {
      const cacheKey = `${gw.metadata.name}\0${iface ?? ""}`;
      let list = candidateCache.get(cacheKey);
      if (list === undefined) {
        const selector = compileSelector(gw.spec.nodeSelector);
        list = [...nodes.values()]
          .filter(
            (n) =>
              selector.matches(n.labels) && snapshot.healthy.has(n.name) && identities.has(n.name),
          )
          .filter(
            (n) =>
              iface === undefined ||
              (snapshot.reports.get(n.name)?.interfaces.get(iface) ?? []).length > 0,
          )
          .map((n) => n.name)
          .sort();
        candidateCache.set(cacheKey, list);
      }
      return list;
    };
    const unitList = [...units.entries()].map(([root, members]) => {
      const unitKey =
        [...new Set(members.flatMap((m) => addresses.get(m.key) ?? []))].sort().join(",") ||
        members[0]!.key;
      const gw = gateways.get(members[0]!.policy.spec.gateway)!;
      const iface =
        members[0]!.mode === "interface" ? members[0]!.policy.spec.interface : undefined;
      const candidates = candidatesFor(gw, iface);
      const previous = members
        .map((m) => snapshot.previousPolicies.get(m.key)?.gatewayNode)
        .find((n) => n !== undefined && candidates.includes(n));
      return { root, unitKey, members, gw, candidates, previous };
    });
    unitList.sort((a, b) => (a.unitKey < b.unitKey ? -1 : a.unitKey > b.unitKey ? 1 : 0));
    // Sticky units keep their node first, so that the load the others see is the real one.
    for (const u of unitList) {
      if (u.gw.spec.failback === true || u.previous === undefined) continue;
      placed.set(u.root, u.previous);
      load.set(u.previous, (load.get(u.previous) ?? 0) + 1);
    }
    for (const u of unitList) {
      if (placed.has(u.root)) continue;
      let chosen: string | undefined;
      if (u.gw.spec.failback === true) {
        let best = -1;
        for (const c of u.candidates) {
          const score = fnv1a(`${u.unitKey}|${c}`);
          if (score > best) {
            best = score;
            chosen = c;
          }
        }
      } else {
        for (const c of u.candidates) {
          if (chosen === undefined || (load.get(c) ?? 0) < (load.get(chosen) ?? 0)) chosen = c;
        }
      }
      placed.set(u.root, chosen);
      if (chosen !== undefined) load.set(chosen, (load.get(chosen) ?? 0) + 1);
    }

    const result = new Map<string, Placement>();
    for (const u of unitList) {
      const node = placed.get(u.root);
      for (const p of u.members) {
        const snat: Partial<Record<Family, string>> = {};
        const floating: string[] = [];
        const conditions: EngineCondition[] = [];
        if (p.mode === "explicit" || p.mode === "pool") {
          for (const a of addresses.get(p.key) ?? []) {
            snat[familyOfText(a)!] = a;
            floating.push(a);
          }
        } else if (node !== undefined && p.mode === "nodeIP") {
          for (const f of familiesOf(p)) {
            const a = nodes.get(node)?.addresses[f];
            if (a !== undefined) snat[f] = formatAddress(parseAddress(a));
          }
        } else if (node !== undefined && p.mode === "interface") {
          const list =
            this.#snapshot.reports.get(node)?.interfaces.get(p.policy.spec.interface ?? "") ?? [];
          for (const f of familiesOf(p)) {
            const a = list.find((x) => familyOfText(x) === f);
            if (a !== undefined) snat[f] = formatAddress(parseAddress(a));
          }
        }
        const unserved = familiesOf(p).filter((f) => snat[f] === undefined);
        const accepted =
          unserved.length > 0 && (p.mode === "pool" || p.mode === "explicit")
            ? `Accepted; IPv${unserved.join("/IPv")} traffic keeps its usual path: no egress IP of that family`
            : "Accepted";
        conditions.push(cond("Accepted", "True", "Accepted", accepted));
        if (node === undefined) {
          const sel = formatSelector(u.gw.spec.nodeSelector);
          conditions.push(
            cond(
              "GatewayAssigned",
              "False",
              "NoReadyGatewayNode",
              `no node matching ${sel}${p.mode === "interface" ? ` with interface ${p.policy.spec.interface}` : ""} of EgressGateway ${u.gw.metadata.name} has a live agent; matching traffic is dropped until one is ready`,
            ),
          );
        } else {
          conditions.push(
            cond("GatewayAssigned", "True", "Assigned", `egress IP held by node ${node}`),
          );
        }
        result.set(p.key, {
          gatewayNode: node,
          snat,
          floating: floating.sort(),
          announceInterface: u.gw.spec.interface,
          conditions,
        });
      }
    }
    return result;
  }

  #gatewayOutcomes(
    gateways: readonly EgressGateway[],
    placement: Map<string, Placement>,
    active: PreparedPolicy[],
    nodes: Map<string, NodeInfo>,
  ): Map<string, GatewayOutcome> {
    const out = new Map<string, GatewayOutcome>();
    for (const gw of gateways) {
      const name = gw.metadata.name ?? "";
      const selector = compileSelector(gw.spec.nodeSelector);
      const members = [...nodes.values()]
        .filter((n) => selector.matches(n.labels))
        .map((n) => n.name)
        .sort();
      const mine = active.filter((p) => p.policy.spec.gateway === name);
      const perNode = new Map<string, { ips: Set<string>; policies: number }>();
      const allocated = new Set<string>();
      for (const p of mine) {
        const pl = placement.get(p.key);
        for (const a of pl?.floating ?? []) allocated.add(a);
        if (pl?.gatewayNode === undefined) continue;
        const entry = perNode.get(pl.gatewayNode) ?? { ips: new Set<string>(), policies: 0 };
        for (const a of pl.floating) entry.ips.add(a);
        entry.policies++;
        perNode.set(pl.gatewayNode, entry);
      }
      const pool = poolOf(gw);
      const usage: Partial<Record<Family, PoolUsage>> = {};
      for (const f of FAMILIES) {
        const ranges = pool.ranges.filter((r) => r.family === f);
        if (ranges.length === 0) continue;
        usage[f] = {
          size: ranges.reduce((s, r) => s + rangeSize(r), 0n),
          allocated: [...allocated].filter((a) => familyOfText(a) === f).length,
        };
      }
      const nodeOutcomes = members.map((n) => ({
        name: n,
        ready: this.#snapshot.healthy.has(n),
        egressIPs: [...(perNode.get(n)?.ips ?? [])].sort(),
        policies: perNode.get(n)?.policies ?? 0,
      }));
      const ready = nodeOutcomes.filter((n) => n.ready).length;
      const conditions: EngineCondition[] = [
        ready > 0
          ? cond(
              "GatewayAssigned",
              "True",
              "NodesReady",
              `${ready} of ${members.length} gateway nodes are ready`,
            )
          : cond(
              "GatewayAssigned",
              "False",
              members.length === 0 ? "NoMatchingNodes" : "NoReadyNodes",
              members.length === 0
                ? `no node matches ${formatSelector(gw.spec.nodeSelector)}: label the nodes that should hold egress IPs`
                : `none of the ${members.length} matching nodes has a live agent`,
            ),
      ];
      out.set(name, { name, nodes: nodeOutcomes, pool: usage, conditions });
    }
    return out;
  }

  // --- membership

  #candidates(p: PreparedPolicy, st: Static): Iterable<string> {
    const namespaces =
      p.namespace !== undefined
        ? [p.namespace]
        : [...this.#podsByNamespace.keys()].filter((ns) =>
            p.namespaceSelector!.matches(st.namespaceLabels.get(ns)),
          );
    const eq = p.podSelector.equalities;
    // The common case (one namespace, one label value): the posting list itself, no copy.
    if (namespaces.length === 1 && eq.length === 1 && eq[0]!.values.length === 1) {
      return this.#podsByLabel.get(labelIndex(namespaces[0]!, eq[0]!.key, eq[0]!.values[0]!)) ?? [];
    }
    const out: string[] = [];
    for (const ns of namespaces) {
      if (eq.length === 0) {
        for (const k of this.#podsByNamespace.get(ns) ?? []) out.push(k);
        continue;
      }
      // Look the smallest posting list up, then check the whole selector on each candidate.
      let best: string[] | undefined;
      for (const { key, values } of eq) {
        const list: string[] = [];
        for (const v of values) {
          for (const k of this.#podsByLabel.get(labelIndex(ns, key, v)) ?? []) list.push(k);
        }
        if (best === undefined || list.length < best.length) best = list;
      }
      for (const k of best ?? []) out.push(k);
    }
    return out;
  }

  #selects(p: PreparedPolicy, pod: PodInfo, st: Static): boolean {
    return selectsPod(
      p,
      pod,
      st.namespaceLabels.get(pod.namespace),
      st.nodes.get(pod.nodeName)?.labels,
    );
  }

  #recomputeMemberships(): void {
    const st = this.#static!;
    this.#members = new Map();
    this.#podPolicies = new Map();
    this.#shadows = new Map();
    this.#outcomes = new Map();
    for (const p of st.active) {
      const members = new Map<string, EndpointView>();
      for (const key of this.#candidates(p, st)) {
        const pod = this.#pods.get(key);
        if (pod === undefined || !this.#selects(p, pod, st)) continue;
        members.set(key, this.#endpoints.get(key)!);
        const list = this.#podPolicies.get(key);
        if (list === undefined) this.#podPolicies.set(key, [p.key]);
        else list.push(p.key);
      }
      this.#members.set(p.key, members);
    }
    for (const list of this.#podPolicies.values()) this.#countShadows(list, 1);
  }

  #addMemberships(pod: PodInfo): void {
    const st = this.#static!;
    const key = podKey(pod);
    const list: string[] = [];
    for (const p of st.active) {
      if (!this.#selects(p, pod, st)) continue;
      this.#members.get(p.key)!.set(key, this.#endpoints.get(key)!);
      list.push(p.key);
      this.#dirty.add(p.key);
    }
    if (list.length > 0) {
      this.#podPolicies.set(key, list);
      this.#countShadows(list, 1);
    }
  }

  #removeMemberships(key: string): void {
    const list = this.#podPolicies.get(key);
    if (list === undefined) return;
    for (const policy of list) {
      this.#members.get(policy)?.delete(key);
      this.#dirty.add(policy);
    }
    this.#countShadows(list, -1);
    this.#podPolicies.delete(key);
  }

  /** `list` is in precedence order (active policies are iterated in that order). */
  #countShadows(list: readonly string[], delta: number): void {
    if (list.length < 2) return;
    const st = this.#static!;
    const byKey = this.#preparedByKey(st);
    for (let j = 1; j < list.length; j++) {
      const loser = byKey.get(list[j]!)!;
      for (let i = 0; i < j; i++) {
        const winner = byKey.get(list[i]!)!;
        if (!winner.reach.intersects(loser.reach) || !portsOverlap(winner.ports, loser.ports))
          continue;
        const m = getOrInsert(this.#shadows, loser.key, () => new Map<string, number>());
        const n = (m.get(winner.key) ?? 0) + delta;
        if (n === 0) m.delete(winner.key);
        else m.set(winner.key, n);
        this.#dirty.add(loser.key);
      }
    }
  }

  #byKey: { st: Static; map: Map<string, PreparedPolicy> } | undefined;
  #preparedByKey(st: Static): Map<string, PreparedPolicy> {
    if (this.#byKey?.st !== st)
      this.#byKey = { st, map: new Map(st.active.map((p) => [p.key, p])) };
    return this.#byKey.map;
  }

  #activeOutcome(p: PreparedPolicy, st: Static): PolicyOutcome {
    const placement = st.placement.get(p.key)!;
    const endpoints = [...this.#members.get(p.key)!.values()].sort((a, b) =>
      a.pod < b.pod ? -1 : a.pod > b.pod ? 1 : 0,
    );
    const view: PolicyView = {
      key: p.key,
      priority: p.priority,
      createdAt: p.createdAt,
      destinationCIDRs: p.destinations,
      excludedCIDRs: p.excluded,
      ports: p.ports,
      gatewayNode: placement.gatewayNode,
      snat: placement.snat,
      floating: placement.floating,
      announceInterface: placement.announceInterface,
      endpoints,
    };
    const shadowMap = this.#shadows.get(p.key);
    const shadowedBy = [...(shadowMap ?? new Map<string, number>()).entries()]
      .filter(([, n]) => n > 0)
      .map(([policy, pods]) => ({ policy, pods }))
      .sort((a, b) => b.pods - a.pods || (a.policy < b.policy ? -1 : 1));
    const conditions = [...placement.conditions];
    if (shadowedBy.length > 0) {
      const total = endpoints.length;
      const names = shadowedBy
        .slice(0, 3)
        .map((s) => `${s.policy} (${s.pods} of ${total} pods)`)
        .join(", ");
      conditions.push(
        cond(
          "Conflicted",
          "True",
          "ShadowedBy",
          `higher-precedence ${shadowedBy.length === 1 ? "policy" : "policies"} ${names}${shadowedBy.length > 3 ? ` and ${shadowedBy.length - 3} more` : ""} decide for shared pods and destinations; raise spec.priority to take them over`,
        ),
      );
    } else {
      conditions.push(
        cond("Conflicted", "False", "NoConflict", "no other policy takes over any of its pods"),
      );
    }
    const target = new Set(endpoints.map((e) => e.node));
    if (placement.gatewayNode !== undefined) target.add(placement.gatewayNode);
    return {
      key: p.key,
      kind: p.policy.kind,
      namespace: p.namespace,
      name: p.policy.metadata.name ?? "",
      generation: p.policy.metadata.generation ?? 0,
      gateway: p.policy.spec.gateway,
      accepted: true,
      gatewayNode: placement.gatewayNode,
      egressIPs: FAMILIES.flatMap((f) =>
        placement.snat[f] === undefined ? [] : [placement.snat[f]!],
      ),
      endpoints,
      shadowedBy: shadowedBy.slice(0, 16),
      conditions,
      view,
      revision: policyRevision(view),
      targetNodes: [...target].sort(),
    };
  }
}

/** Index key of a label value within a namespace. */
function labelIndex(namespace: string, key: string, value: string): string {
  return `${namespace}\0${key}\0${value}`;
}

function samePodInfo(a: PodInfo, b: PodInfo): boolean {
  return (
    a.nodeName === b.nodeName &&
    a.phase === b.phase &&
    a.hostNetwork === b.hostNetwork &&
    a.ips.length === b.ips.length &&
    a.ips.every((ip, i) => ip === b.ips[i]) &&
    sameLabels(a.labels, b.labels)
  );
}

function endpointOf(pod: PodInfo): EndpointView {
  return {
    pod: podKey(pod),
    node: pod.nodeName,
    ips: pod.ips.map((ip) => formatAddress(parseAddress(ip))),
  };
}

function rejectedOutcome(policy: AnyPolicy, conditions: EngineCondition[]): PolicyOutcome {
  return {
    key: policyKey(policy),
    kind: policy.kind,
    namespace: policy.kind === "EgressPolicy" ? policy.metadata.namespace : undefined,
    name: policy.metadata.name ?? "",
    generation: policy.metadata.generation ?? 0,
    gateway: policy.spec.gateway,
    accepted: false,
    egressIPs: [],
    endpoints: [],
    shadowedBy: [],
    conditions,
    targetNodes: [],
  };
}

/** The whole computation from scratch. */
export function computeCluster(snapshot: Snapshot): ClusterOutcome {
  return new ClusterEngine(snapshot).compute();
}
