/**
 * Which pods each accepted policy selects, and which policies shadow others.
 *
 * Pods that a policy can steer (eligible pods) are indexed by namespace, by label value within a
 * namespace, and by node; policies by namespace (EgressPolicy), cluster-wide (ClusterEgressPolicy)
 * and by whether they have a node selector. Every change re-evaluates only the pairs it can
 * affect: a pod against the policies of its namespace and the cluster policies; a policy against
 * the pods its selector's index entries list; a namespace's labels against the cluster policies
 * whose namespace selector flips; a node's labels against the node-selector policies that flip.
 *
 * Overlaps: when two policies select one pod and compete for some destination and port, the one
 * that comes first in precedence order (see precedence.ts) decides; the other is *shadowed* by it
 * for that pod. `shadows(loser)` counts the pods per winner.
 */

import { formatAddress, parseAddress } from "../lib/ip.ts";
import { getOrInsert } from "../lib/maps.ts";
import type { Labels } from "../lib/selector.ts";
import { samePodInfo } from "./equality.ts";
import { conflicts, type PreparedPolicy } from "./policies.ts";
import { comparePrecedence } from "./precedence.ts";
import { isEligiblePod, type PodInfo, podKey, selectsPod } from "./snapshot.ts";
import type { EndpointView } from "./view.ts";

interface PodEntry {
  readonly key: string;
  readonly pod: PodInfo;
  readonly endpoint: EndpointView;
  /** Accepted policies selecting the pod, in precedence order. */
  readonly policies: PreparedPolicy[];
}

interface PolicyEntry {
  readonly policy: PreparedPolicy;
  readonly pods: Set<PodEntry>;
  /** Caches, dropped when `pods` changes. */
  endpoints: readonly EndpointView[] | undefined;
  nodes: readonly string[] | undefined;
}

const NO_PODS: ReadonlySet<PodEntry> = new Set();
const NO_SHADOWS: ReadonlyMap<string, number> = new Map();

/** label key → value → pods */
type LabelIndex = Map<string, Map<string, Set<PodEntry>>>;

function endpointOf(pod: PodInfo): EndpointView {
  return {
    pod: podKey(pod),
    node: pod.nodeName,
    ips: pod.ips.map((ip) => formatAddress(parseAddress(ip))),
  };
}

export class Memberships {
  readonly #pods = new Map<string, PodInfo>();
  readonly #entries = new Map<string, PodEntry>();
  readonly #byNamespace = new Map<string, Set<PodEntry>>();
  readonly #byLabel = new Map<string, LabelIndex>();
  readonly #byNode = new Map<string, Set<PodEntry>>();
  readonly #namespaceLabels = new Map<string, Labels>();
  readonly #nodeLabels = new Map<string, Labels>();

  readonly #policies = new Map<string, PolicyEntry>();
  readonly #policiesByNamespace = new Map<string, Set<PolicyEntry>>();
  readonly #clusterPolicies = new Set<PolicyEntry>();
  readonly #nodeSelecting = new Set<PolicyEntry>();
  /** loser → winner → pods */
  readonly #shadows = new Map<string, Map<string, number>>();
  readonly #dirty = new Set<string>();

  // --- pods

  /** @returns whether anything the engine reads of the pod changed */
  setPod(pod: PodInfo): boolean {
    const key = podKey(pod);
    const before = this.#pods.get(key);
    if (before !== undefined && samePodInfo(before, pod)) return false;
    this.#pods.set(key, pod);
    this.#removeEntry(key);
    if (!isEligiblePod(pod)) return true;
    const entry: PodEntry = { key, pod, endpoint: endpointOf(pod), policies: [] };
    this.#entries.set(key, entry);
    getOrInsert(this.#byNamespace, pod.namespace, () => new Set()).add(entry);
    getOrInsert(this.#byNode, pod.nodeName, () => new Set()).add(entry);
    const index = getOrInsert(this.#byLabel, pod.namespace, () => new Map());
    for (const k in pod.labels) {
      const values = getOrInsert(index, k, () => new Map());
      getOrInsert(values, pod.labels[k]!, () => new Set()).add(entry);
    }
    for (const p of this.#policiesByNamespace.get(pod.namespace) ?? []) this.#consider(p, entry);
    for (const p of this.#clusterPolicies) this.#consider(p, entry);
    return true;
  }

  /** @returns whether the pod was known */
  deletePod(key: string): boolean {
    if (!this.#pods.delete(key)) return false;
    this.#removeEntry(key);
    return true;
  }

  #removeEntry(key: string): void {
    const entry = this.#entries.get(key);
    if (entry === undefined) return;
    this.#entries.delete(key);
    const { pod } = entry;
    for (const p of [...entry.policies]) this.#unlink(this.#policies.get(p.key)!, entry);
    deleteFrom(this.#byNamespace, pod.namespace, entry);
    deleteFrom(this.#byNode, pod.nodeName, entry);
    const index = this.#byLabel.get(pod.namespace)!;
    for (const k in pod.labels) {
      const values = index.get(k)!;
      deleteFrom(values, pod.labels[k]!, entry);
      if (values.size === 0) index.delete(k);
    }
    if (index.size === 0) this.#byLabel.delete(pod.namespace);
  }

  // --- namespaces and nodes

  setNamespace(name: string, labels: Labels | undefined): void {
    const before = this.#namespaceLabels.get(name);
    if (labels === undefined) this.#namespaceLabels.delete(name);
    else this.#namespaceLabels.set(name, labels);
    for (const p of this.#clusterPolicies) {
      const selector = p.policy.namespaceSelector!;
      if (selector.matches(before) === selector.matches(labels)) continue;
      for (const entry of this.#byNamespace.get(name) ?? NO_PODS) this.#consider(p, entry);
    }
  }

  setNode(name: string, labels: Labels | undefined): void {
    const before = this.#nodeLabels.get(name);
    if (labels === undefined) this.#nodeLabels.delete(name);
    else this.#nodeLabels.set(name, labels);
    for (const p of this.#nodeSelecting) {
      const selector = p.policy.nodeSelector!;
      if (selector.matches(before) === selector.matches(labels)) continue;
      for (const entry of this.#byNode.get(name) ?? NO_PODS) this.#consider(p, entry);
    }
  }

  // --- policies

  /** An accepted policy, or undefined when it is gone or not accepted. Same object: no-op. */
  setPolicy(key: string, policy: PreparedPolicy | undefined): void {
    const current = this.#policies.get(key);
    if (current?.policy === policy) return;
    if (current !== undefined) {
      for (const entry of current.pods) this.#unlink(current, entry);
      this.#policies.delete(key);
      if (current.policy.namespace !== undefined)
        deleteFrom(this.#policiesByNamespace, current.policy.namespace, current);
      else this.#clusterPolicies.delete(current);
      this.#nodeSelecting.delete(current);
      this.#dirty.add(key);
    }
    if (policy === undefined) return;
    const p: PolicyEntry = { policy, pods: new Set(), endpoints: undefined, nodes: undefined };
    this.#policies.set(key, p);
    if (policy.namespace !== undefined)
      getOrInsert(this.#policiesByNamespace, policy.namespace, () => new Set()).add(p);
    else this.#clusterPolicies.add(p);
    if (policy.nodeSelector !== undefined) this.#nodeSelecting.add(p);
    this.#dirty.add(key);
    for (const entry of this.#candidates(policy)) {
      if (this.#selects(policy, entry)) this.#link(p, entry);
    }
  }

  /** Forgets every policy (pods stay indexed); for a recomputation from scratch. */
  clearPolicies(): void {
    for (const key of this.#policies.keys()) this.#dirty.add(key);
    for (const key of this.#shadows.keys()) this.#dirty.add(key);
    this.#policies.clear();
    this.#policiesByNamespace.clear();
    this.#clusterPolicies.clear();
    this.#nodeSelecting.clear();
    this.#shadows.clear();
    for (const entry of this.#entries.values()) entry.policies.length = 0;
  }

  /** Pods that may match: the index entry of the selector's most selective label, or all. */
  *#candidates(p: PreparedPolicy): Iterable<PodEntry> {
    const namespaces =
      p.namespace !== undefined
        ? [p.namespace]
        : [...this.#byNamespace.keys()].filter((ns) =>
            p.namespaceSelector!.matches(this.#namespaceLabels.get(ns)),
          );
    const eq = p.podSelector.equalities;
    for (const ns of namespaces) {
      if (eq.length === 0) {
        yield* this.#byNamespace.get(ns) ?? NO_PODS;
        continue;
      }
      const index = this.#byLabel.get(ns);
      if (index === undefined) continue;
      let best: Set<PodEntry>[] | undefined;
      let bestSize = Number.POSITIVE_INFINITY;
      for (const { key, values } of eq) {
        const byValue = index.get(key);
        const lists: Set<PodEntry>[] = [];
        let size = 0;
        for (const v of values) {
          const list = byValue?.get(v);
          if (list === undefined) continue;
          lists.push(list);
          size += list.size;
        }
        if (size < bestSize) {
          best = lists;
          bestSize = size;
        }
      }
      for (const list of best ?? []) yield* list;
    }
  }

  #selects(p: PreparedPolicy, entry: PodEntry): boolean {
    return selectsPod(
      p,
      entry.pod,
      this.#namespaceLabels.get(entry.pod.namespace),
      this.#nodeLabels.get(entry.pod.nodeName),
    );
  }

  #consider(p: PolicyEntry, entry: PodEntry): void {
    const selects = this.#selects(p.policy, entry);
    if (selects === p.pods.has(entry)) return;
    if (selects) this.#link(p, entry);
    else this.#unlink(p, entry);
  }

  #link(p: PolicyEntry, entry: PodEntry): void {
    const list = entry.policies;
    const policy = p.policy;
    let at = list.length;
    for (let i = 0; i < list.length; i++) {
      const other = list[i]!;
      const first = comparePrecedence(policy, other) < 0;
      if (first && at === list.length) at = i;
      if (conflicts(policy, other)) {
        if (first) this.#shadow(other.key, policy.key, 1);
        else this.#shadow(policy.key, other.key, 1);
      }
    }
    list.splice(at, 0, policy);
    p.pods.add(entry);
    p.endpoints = undefined;
    p.nodes = undefined;
    this.#dirty.add(policy.key);
  }

  #unlink(p: PolicyEntry, entry: PodEntry): void {
    const list = entry.policies;
    const policy = p.policy;
    list.splice(list.indexOf(policy), 1);
    for (const other of list) {
      if (!conflicts(policy, other)) continue;
      if (comparePrecedence(policy, other) < 0) this.#shadow(other.key, policy.key, -1);
      else this.#shadow(policy.key, other.key, -1);
    }
    p.pods.delete(entry);
    p.endpoints = undefined;
    p.nodes = undefined;
    this.#dirty.add(policy.key);
  }

  #shadow(loser: string, winner: string, delta: number): void {
    const m = getOrInsert(this.#shadows, loser, () => new Map<string, number>());
    const n = (m.get(winner) ?? 0) + delta;
    if (n === 0) m.delete(winner);
    else m.set(winner, n);
    if (m.size === 0) this.#shadows.delete(loser);
    this.#dirty.add(loser);
  }

  // --- results

  /** The endpoints a policy selects, by pod key. */
  endpoints(key: string): readonly EndpointView[] {
    const p = this.#policies.get(key);
    if (p === undefined) return [];
    p.endpoints ??= [...p.pods]
      .map((e) => e.endpoint)
      .sort((a, b) => (a.pod < b.pod ? -1 : a.pod > b.pod ? 1 : 0));
    return p.endpoints;
  }

  /** Nodes running a pod the policy selects, by name. */
  endpointNodes(key: string): readonly string[] {
    const p = this.#policies.get(key);
    if (p === undefined) return [];
    p.nodes ??= [...new Set(this.endpoints(key).map((e) => e.node))].sort();
    return p.nodes;
  }

  /** Higher-precedence policies that decide for some of this policy's pods: winner → pods. */
  shadows(key: string): ReadonlyMap<string, number> {
    return this.#shadows.get(key) ?? NO_SHADOWS;
  }

  /** Policies whose endpoints or shadows changed since the last call. */
  takeDirty(): Set<string> {
    const out = new Set(this.#dirty);
    this.#dirty.clear();
    return out;
  }
}

function deleteFrom<K, V>(map: Map<K, Set<V>>, key: K, value: V): void {
  const set = map.get(key);
  if (set === undefined) return;
  set.delete(value);
  if (set.size === 0) map.delete(key);
}
