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

import { canonicalAddress } from "../lib/ip.ts";
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
  /** NO_ENDPOINT for a pod no policy can steer. */
  readonly endpoint: EndpointView;
  /**
   * Accepted policies selecting the pod, in precedence order. Replaced, never grown in place: an
   * exact-size array per pod instead of a growable one (a first push reserves 17 slots, ×100,000).
   */
  policies: readonly PreparedPolicy[];
}

interface PolicyEntry {
  readonly policy: PreparedPolicy;
  readonly pods: Set<PodEntry>;
  /** Caches, dropped when `pods` changes. */
  endpoints: readonly EndpointView[] | undefined;
  nodes: readonly string[] | undefined;
}

const NO_PODS: ReadonlySet<PodEntry> = new Set();
const NO_POLICIES: readonly PreparedPolicy[] = [];
/** The endpoint of a pod no policy can steer (not indexed). */
const NO_ENDPOINT: EndpointView = { pod: "", node: "", ips: [] };
const NO_SHADOWS: ReadonlyMap<string, number> = new Map();

/** label key → value → pods */
type LabelIndex = Map<string, Map<string, Set<PodEntry>>>;

function endpointOf(key: string, pod: PodInfo): EndpointView {
  let ips = pod.ips;
  for (let i = 0; i < ips.length; i++) {
    const ip = ips[i]!;
    // The API's strings are canonical nearly always: keep them, and skip the bigint round trip
    // for plain dotted quads (one per pod, 100,000 pods).
    if (isDottedQuad(ip)) continue;
    const canonical = canonicalAddress(ip);
    if (canonical === ip) continue;
    if (ips === pod.ips) ips = [...pod.ips];
    (ips as string[])[i] = canonical;
  }
  return { pod: key, node: pod.nodeName, ips };
}

/** Four decimal octets of at most 255 without leading zeros: canonical IPv4 text. */
function isDottedQuad(text: string): boolean {
  let octet = 0;
  let digits = 0;
  let dots = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 46) {
      if (digits === 0) return false;
      octet = 0;
      digits = 0;
      dots++;
    } else if (c >= 48 && c <= 57 && !(digits > 0 && octet === 0)) {
      octet = octet * 10 + (c - 48);
      digits++;
      if (octet > 255) return false;
    } else return false;
  }
  return dots === 3 && digits > 0;
}

export class Memberships {
  /** Every pod the engine knows; only eligible ones (with an endpoint) are indexed. */
  readonly #pods = new Map<string, PodEntry>();
  readonly #byNamespace = new Map<string, Set<PodEntry>>();
  readonly #byLabel = new Map<string, LabelIndex>();
  /**
   * Built on first need (a node's labels change while a policy has a node selector), then kept:
   * most clusters never need it, and it costs a set entry per pod.
   */
  #byNode: Map<string, Set<PodEntry>> | undefined;
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
    if (before !== undefined) {
      if (samePodInfo(before.pod, pod)) return false;
      this.#unindex(before);
    }
    const eligible = isEligiblePod(pod);
    const entry: PodEntry = {
      key,
      pod,
      endpoint: eligible ? endpointOf(key, pod) : NO_ENDPOINT,
      policies: NO_POLICIES,
    };
    this.#pods.set(key, entry);
    if (!eligible) return true;
    const ns = pod.namespace;
    setIn(this.#byNamespace, ns).add(entry);
    if (this.#byNode !== undefined) setIn(this.#byNode, pod.nodeName).add(entry);
    let index = this.#byLabel.get(ns);
    if (index === undefined) {
      index = new Map();
      this.#byLabel.set(ns, index);
    }
    for (const k in pod.labels) {
      let values = index.get(k);
      if (values === undefined) {
        values = new Map();
        index.set(k, values);
      }
      setIn(values, pod.labels[k]!).add(entry);
    }
    const namespaced = this.#policiesByNamespace.get(ns);
    if (namespaced !== undefined) for (const p of namespaced) this.#consider(p, entry);
    for (const p of this.#clusterPolicies) this.#consider(p, entry);
    return true;
  }

  /** @returns whether the pod was known */
  deletePod(key: string): boolean {
    const entry = this.#pods.get(key);
    if (entry === undefined) return false;
    this.#pods.delete(key);
    this.#unindex(entry);
    return true;
  }

  #unindex(entry: PodEntry): void {
    if (entry.endpoint === NO_ENDPOINT) return;
    const { pod } = entry;
    for (const p of entry.policies) this.#unlink(this.#policies.get(p.key)!, entry);
    deleteFrom(this.#byNamespace, pod.namespace, entry);
    if (this.#byNode !== undefined) deleteFrom(this.#byNode, pod.nodeName, entry);
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
      for (const entry of this.#podsOn(name)) this.#consider(p, entry);
    }
  }

  #podsOn(node: string): ReadonlySet<PodEntry> {
    if (this.#byNode === undefined) {
      this.#byNode = new Map();
      for (const entry of this.#pods.values())
        if (entry.endpoint !== NO_ENDPOINT) setIn(this.#byNode, entry.pod.nodeName).add(entry);
    }
    return this.#byNode.get(node) ?? NO_PODS;
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
    // Whether two policies conflict does not depend on the pod: asked once per other policy, not
    // once per shared pod (1,000 policies over the same 30 pods: 30× fewer range intersections).
    const conflicting = new Map<PreparedPolicy, boolean>();
    for (const list of this.#candidates(policy)) {
      for (const entry of list) if (this.#selects(policy, entry)) this.#link(p, entry, conflicting);
    }
  }

  /** Forgets every policy (pods stay indexed); for a recomputation from scratch. */
  clearPolicies(): void {
    if (this.#policies.size === 0 && this.#shadows.size === 0) return;
    for (const key of this.#policies.keys()) this.#dirty.add(key);
    for (const key of this.#shadows.keys()) this.#dirty.add(key);
    this.#policies.clear();
    this.#policiesByNamespace.clear();
    this.#clusterPolicies.clear();
    this.#nodeSelecting.clear();
    this.#shadows.clear();
    for (const entry of this.#pods.values()) entry.policies = NO_POLICIES;
  }

  /**
   * Pods that may match, as posting lists: per namespace, the index entries of the selector's
   * most selective label, or all of the namespace's pods.
   */
  #candidates(p: PreparedPolicy): ReadonlySet<PodEntry>[] {
    const out: ReadonlySet<PodEntry>[] = [];
    const eq = p.podSelector.equalities;
    const add = (ns: string) => {
      if (eq.length === 0) {
        const all = this.#byNamespace.get(ns);
        if (all !== undefined) out.push(all);
        return;
      }
      const index = this.#byLabel.get(ns);
      if (index === undefined) return;
      let best: ReadonlySet<PodEntry>[] = [];
      let bestSize = Number.POSITIVE_INFINITY;
      for (const { key, values } of eq) {
        const byValue = index.get(key);
        const lists: ReadonlySet<PodEntry>[] = [];
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
      for (const list of best) out.push(list);
    };
    if (p.namespace !== undefined) add(p.namespace);
    else {
      for (const ns of this.#byNamespace.keys())
        if (p.namespaceSelector!.matches(this.#namespaceLabels.get(ns))) add(ns);
    }
    return out;
  }

  #selects(p: PreparedPolicy, entry: PodEntry): boolean {
    const pod = entry.pod;
    // Labels looked up only for the selectors that read them.
    return selectsPod(
      p,
      pod,
      p.namespaceSelector === undefined ? undefined : this.#namespaceLabels.get(pod.namespace),
      p.nodeSelector === undefined ? undefined : this.#nodeLabels.get(pod.nodeName),
    );
  }

  #consider(p: PolicyEntry, entry: PodEntry): void {
    const selects = this.#selects(p.policy, entry);
    if (selects === p.pods.has(entry)) return;
    if (selects) this.#link(p, entry);
    else this.#unlink(p, entry);
  }

  #link(p: PolicyEntry, entry: PodEntry, conflicting?: Map<PreparedPolicy, boolean>): void {
    const list = entry.policies;
    const policy = p.policy;
    p.pods.add(entry);
    p.endpoints = undefined;
    p.nodes = undefined;
    this.#dirty.add(policy.key);
    // The list is in precedence order: the first policy that loses to this one is found by halving.
    let lo = 0;
    let hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (comparePrecedence(policy, list[mid]!) < 0) hi = mid;
      else lo = mid + 1;
    }
    const at = lo;
    for (let i = 0; i < list.length; i++) {
      const other = list[i]!;
      let c = conflicting?.get(other);
      if (c === undefined) {
        c = conflicts(policy, other);
        conflicting?.set(other, c);
      }
      if (c) {
        if (i >= at) this.#shadow(other.key, policy.key, 1);
        else this.#shadow(policy.key, other.key, 1);
      }
    }
    const next: PreparedPolicy[] = new Array(list.length + 1);
    for (let i = 0; i < at; i++) next[i] = list[i]!;
    next[at] = policy;
    for (let i = at; i < list.length; i++) next[i + 1] = list[i]!;
    entry.policies = next;
  }

  #unlink(p: PolicyEntry, entry: PodEntry): void {
    const policy = p.policy;
    const list = entry.policies.filter((x) => x !== policy);
    entry.policies = list.length === 0 ? NO_POLICIES : list;
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
    if (p.endpoints === undefined) {
      const list: EndpointView[] = new Array(p.pods.size);
      let i = 0;
      for (const e of p.pods) list[i++] = e.endpoint;
      p.endpoints = list.sort(byPod);
    }
    return p.endpoints;
  }

  /** Nodes running a pod the policy selects, by name. */
  endpointNodes(key: string): readonly string[] {
    const p = this.#policies.get(key);
    if (p === undefined) return [];
    if (p.nodes === undefined) {
      // Sort, then drop repeats: cheaper than a Set for lists that rarely repeat.
      const nodes: string[] = new Array(p.pods.size);
      let i = 0;
      for (const e of p.pods) nodes[i++] = e.pod.nodeName;
      nodes.sort();
      let kept = 0;
      for (const n of nodes) if (kept === 0 || nodes[kept - 1] !== n) nodes[kept++] = n;
      nodes.length = kept;
      p.nodes = nodes;
    }
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

function byPod(a: EndpointView, b: EndpointView): number {
  return a.pod < b.pod ? -1 : a.pod > b.pod ? 1 : 0;
}

/** The set at `key`, created when absent (no closure to allocate: this runs per pod). */
function setIn<K, V>(map: Map<K, Set<V>>, key: K): Set<V> {
  let set = map.get(key);
  if (set === undefined) {
    set = new Set();
    map.set(key, set);
  }
  return set;
}

function deleteFrom<K, V>(map: Map<K, Set<V>>, key: K, value: V): void {
  const set = map.get(key);
  if (set === undefined) return;
  set.delete(value);
  if (set.size === 0) map.delete(key);
}
