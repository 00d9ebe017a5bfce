/**
 * What this node must carry, kept per key from the objects the agent watches: a PolicyView per
 * policy (spec + the controller's status + its endpoint slices + this node's pods it selects),
 * a PeerView per EgressNode, and the cluster's ignore CIDRs. No Pod of another node and no Node
 * is read. A policy is programmed once the controller accepted it; one whose egress IP has no
 * live node fails closed (its traffic is dropped).
 *
 * Each watch event updates its own key and marks dirty only the keys whose view changed: a
 * status write the agent does not read (another node's EgressNode status, a policy's matched-pod
 * count) marks nothing, so it costs no planning and no kernel work. The agent's planner takes
 * the dirty keys (`takeChanges()`); `buildAgentView` is the same computation from scratch, which
 * the tests hold equal to the keyed one and to the controller's view of the same policies.
 */
import type {
  AnyPolicy,
  EgressClusterInfo,
  EgressEndpointSlice,
  EgressGateway,
  EgressNode,
} from "../api/types.ts";
import { policyKey } from "../api/types.ts";
import { sameItems } from "../engine/equality.ts";
import { type PodInfo, type PolicySelection, podKey, selectsPod } from "../engine/snapshot.ts";
import { isTunnelClass } from "../engine/tunnel_classes.ts";
import type {
  EndpointView,
  LocalFacts,
  NodeConfig,
  NodeView,
  PeerView,
  PolicyView,
} from "../engine/view.ts";
import { reportedRevision } from "../engine/view.ts";
import { deepEqual } from "../lib/equal.ts";
import {
  type Family,
  familyOfText,
  formatAddress,
  normalizeAddressList,
  normalizeCidrList,
  parseAddress,
} from "../lib/ip.ts";
import { getOrInsert } from "../lib/maps.ts";
import { compileSelector, type Labels, sameLabels } from "../lib/selector.ts";

export function peerOf(n: EgressNode): PeerView {
  const tunnel: Partial<Record<Family, string>> = {};
  if (n.spec.tunnel.ipv4 !== undefined) tunnel[4] = n.spec.tunnel.ipv4;
  if (n.spec.tunnel.ipv6 !== undefined) tunnel[6] = n.spec.tunnel.ipv6;
  return {
    name: n.metadata.name ?? "",
    nodeID: n.spec.nodeID,
    mac: n.spec.tunnel.mac,
    tunnel,
    underlay:
      n.status?.underlay?.ipv4 ??
      n.spec.addresses?.ipv4 ??
      n.status?.underlay?.ipv6 ??
      n.spec.addresses?.ipv6,
    podCIDRs: n.spec.podCIDRs ?? [],
    ...(n.status?.tunnelClasses === true ? { tunnelClasses: true } : {}),
  };
}

/** What the datapath reads of a policy object and its gateway, without its endpoints. */
interface PolicyHeader {
  readonly key: string;
  readonly accepted: boolean;
  readonly priority: number;
  readonly createdAt: string;
  readonly destinationCIDRs: readonly string[];
  readonly excludedCIDRs: readonly string[];
  readonly ports: PolicyView["ports"];
  readonly gatewayNode: string | undefined;
  readonly snat: Readonly<Partial<Record<Family, readonly string[]>>>;
  readonly floating: readonly string[];
  readonly announceInterface: string | undefined;
  readonly standbyNodes: readonly string[];
  readonly gatewayNodes: readonly string[];
  readonly tunnelClass: number | undefined;
  /** The policy's selectors for this node's pods; undefined when it has a nodeSelector. */
  readonly selection: PolicySelection | undefined;
  readonly selectionSpec: unknown;
  /** The revision the controller published in the policy's status. */
  readonly revision: string | undefined;
}

const nodeNames = new WeakMap<EgressGateway, readonly string[]>();
/** The nodes a gateway's status lists (its selector's, ready or not), once per object. */
function gatewayNodesOf(gateway: EgressGateway | undefined): readonly string[] {
  if (gateway === undefined) return [];
  let names = nodeNames.get(gateway);
  if (names === undefined) {
    names = (gateway.status?.nodes ?? []).map((n) => n.name).sort();
    nodeNames.set(gateway, names);
  }
  return names;
}

function headerOf(p: AnyPolicy, gateway: EgressGateway | undefined): PolicyHeader {
  const accepted = p.status?.conditions?.find((c) => c.type === "Accepted")?.status === "True";
  const snat: Partial<Record<Family, readonly string[]>> = {};
  // In address order per family, as the controller's view has them.
  for (const a of normalizeAddressList(
    (p.status?.egressIPs ?? []).filter((x) => familyOfText(x) !== undefined),
  )) {
    const f = familyOfText(a)!;
    snat[f] = [...(snat[f] ?? []), a];
  }
  // Pool and explicit addresses float between nodes; a node's own address or an interface's
  // address does not.
  const floats =
    p.spec.useNodeIP !== true &&
    p.spec.interface === undefined &&
    (p.spec.egressIP !== undefined || (gateway?.spec.pool ?? []).length > 0);
  const selectionSpec = [
    p.kind,
    p.metadata.namespace,
    p.spec.podSelector,
    p.kind === "ClusterEgressPolicy" ? p.spec.namespaceSelector : undefined,
    p.spec.nodeSelector,
  ];
  return {
    key: policyKey(p),
    accepted,
    priority: p.spec.priority ?? 0,
    createdAt: p.metadata.creationTimestamp ?? "",
    destinationCIDRs: normalizeCidrList(p.spec.destinationCIDRs ?? []),
    excludedCIDRs: normalizeCidrList(p.spec.excludedCIDRs ?? []),
    ports: p.spec.ports ?? [],
    gatewayNode: p.status?.gatewayNode,
    snat,
    floating: floats ? Object.values(snat).flat().sort() : [],
    announceInterface: gateway?.spec.interface,
    standbyNodes: p.status?.standbyNodes ?? [],
    gatewayNodes: gatewayNodesOf(gateway),
    tunnelClass: isTunnelClass(p.status?.tunnelClass) ? p.status.tunnelClass : undefined,
    // The agent does not read Node objects, so it cannot evaluate a nodeSelector: such policies
    // wait for the controller's endpoint slices.
    selection:
      p.spec.nodeSelector !== undefined
        ? undefined
        : {
            namespace: p.kind === "EgressPolicy" ? (p.metadata.namespace ?? "") : undefined,
            namespaceSelector:
              p.kind === "ClusterEgressPolicy"
                ? compileSelector(p.spec.namespaceSelector)
                : undefined,
            podSelector: compileSelector(p.spec.podSelector),
            nodeSelector: undefined,
          },
    selectionSpec,
    revision: p.status?.revision,
  };
}

/** The fields of two headers that feed the view (the revision and selectors do not). */
function sameViewFields(a: PolicyHeader, b: PolicyHeader): boolean {
  return (
    a.accepted === b.accepted &&
    a.priority === b.priority &&
    a.createdAt === b.createdAt &&
    a.gatewayNode === b.gatewayNode &&
    a.tunnelClass === b.tunnelClass &&
    a.announceInterface === b.announceInterface &&
    deepEqual(a.destinationCIDRs, b.destinationCIDRs) &&
    deepEqual(a.excludedCIDRs, b.excludedCIDRs) &&
    deepEqual(a.ports, b.ports) &&
    deepEqual(a.snat, b.snat) &&
    deepEqual(a.floating, b.floating)
  );
}

function sameEndpoints(a: readonly EndpointView[], b: readonly EndpointView[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    const y = b[i]!;
    if (x.pod !== y.pod || x.node !== y.node || !deepEqual(x.ips, y.ips)) return false;
  }
  return true;
}

function localEndpoint(pod: PodInfo): EndpointView {
  return {
    pod: podKey(pod),
    node: pod.nodeName,
    ips: pod.ips.map((ip) => formatAddress(parseAddress(ip))),
  };
}

export interface AgentChanges {
  /** Policies whose view changed (deleted ones included: `view()` is then undefined). */
  readonly policies: ReadonlySet<string>;
  readonly peers: boolean;
  readonly ignoreCIDRs: boolean;
}

/**
 * The keyed desired state of one node's agent. Setters take watch events; `takeChanges()` hands
 * the planner what changed since the last call.
 */
export class AgentState {
  readonly node: string;
  readonly #headers = new Map<string, PolicyHeader>();
  readonly #views = new Map<string, PolicyView>();
  readonly #gateways = new Map<string, EgressGateway>();
  /** gateway name → policy keys naming it */
  readonly #byGateway = new Map<string, Set<string>>();
  readonly #policyObjects = new Map<string, AnyPolicy>();
  /** slice name → its policy and endpoints */
  readonly #slices = new Map<string, { policy: string; endpoints: readonly EndpointView[] }>();
  /** policy key → slice names */
  readonly #policySlices = new Map<string, Set<string>>();
  readonly #localPods = new Map<string, PodInfo>();
  /** This node's pods as the watch shows them; `#localPods` holds them with CNI's addresses. */
  readonly #watchedPods = new Map<string, PodInfo>();
  /**
   * Addresses the CNI plugin reported at ADD (src/agent/cni_server.ts), by pod: they win over
   * the Pod's status, which has none yet at ADD and may still name an older sandbox's after.
   */
  readonly #cniAddresses = new Map<
    string,
    { readonly containerId: string; readonly ips: readonly string[] }
  >();
  /**
   * Pods of this node whose network CNI DEL removed: no address of theirs stays in a set, not
   * even from a slice the controller has not rewritten yet, since IPAM may give it to a new pod.
   */
  readonly #released = new Set<string>();
  /** pod key → the slices naming it as an endpoint of this node */
  readonly #localSliceRefs = new Map<string, Set<string>>();
  /** policy key → keys of this node's pods it selects */
  readonly #selected = new Map<string, Set<string>>();
  readonly #namespaceLabels = new Map<string, Labels>();
  #peers = new Map<string, PeerView>();
  #ignore: readonly string[] = [];
  #dirty = new Set<string>();
  #peersDirty = false;
  #ignoreDirty = false;
  #revisionsDirty = false;

  constructor(node: string) {
    this.node = node;
  }

  // --- inputs

  setPolicy(obj: AnyPolicy): void {
    const key = policyKey(obj);
    this.#policyObjects.set(key, obj);
    this.#refreshHeader(key);
  }

  deletePolicy(obj: AnyPolicy): void {
    const key = policyKey(obj);
    const header = this.#headers.get(key);
    this.#policyObjects.delete(key);
    this.#headers.delete(key);
    if (header !== undefined) this.#byGateway.get(obj.spec.gateway)?.delete(key);
    this.#selected.delete(key);
    if (this.#views.delete(key)) this.#dirty.add(key);
    this.#revisionsDirty = true;
  }

  setGateway(gw: EgressGateway): void {
    const name = gw.metadata.name ?? "";
    const before = this.#gateways.get(name);
    this.#gateways.set(name, gw);
    if (
      before !== undefined &&
      before.spec.interface === gw.spec.interface &&
      (before.spec.pool ?? []).length > 0 === (gw.spec.pool ?? []).length > 0 &&
      sameItems(gatewayNodesOf(before), gatewayNodesOf(gw))
    )
      return;
    for (const key of this.#byGateway.get(name) ?? []) this.#refreshHeader(key);
  }

  deleteGateway(name: string): void {
    if (!this.#gateways.delete(name)) return;
    for (const key of this.#byGateway.get(name) ?? []) this.#refreshHeader(key);
  }

  setSlice(slice: EgressEndpointSlice): void {
    const name = slice.metadata.name ?? "";
    const before = this.#slices.get(name);
    const endpoints = slice.endpoints.map((e) => ({ pod: e.pod, node: e.node, ips: e.ips }));
    if (
      before !== undefined &&
      before.policy === slice.policy &&
      sameEndpoints(before.endpoints, endpoints)
    )
      return;
    if (before !== undefined && before.policy !== slice.policy) {
      this.#policySlices.get(before.policy)?.delete(name);
      this.#refreshView(before.policy);
    }
    this.#slices.set(name, { policy: slice.policy, endpoints });
    getOrInsert(this.#policySlices, slice.policy, () => new Set()).add(name);
    this.#indexLocalEndpoints(name, before?.endpoints ?? [], endpoints);
    this.#refreshView(slice.policy);
  }

  deleteSlice(name: string): void {
    const before = this.#slices.get(name);
    if (before === undefined) return;
    this.#slices.delete(name);
    this.#policySlices.get(before.policy)?.delete(name);
    this.#indexLocalEndpoints(name, before.endpoints, []);
    this.#refreshView(before.policy);
  }

  #indexLocalEndpoints(
    slice: string,
    before: readonly EndpointView[],
    after: readonly EndpointView[],
  ): void {
    for (const e of before) {
      if (e.node !== this.node) continue;
      const refs = this.#localSliceRefs.get(e.pod);
      refs?.delete(slice);
      if (refs?.size === 0) {
        this.#localSliceRefs.delete(e.pod);
        this.#forgetReleased(e.pod);
      }
    }
    for (const e of after)
      if (e.node === this.node)
        getOrInsert(this.#localSliceRefs, e.pod, () => new Set()).add(slice);
  }

  /** A released pod is forgotten once neither its Pod object nor a slice names it. */
  #forgetReleased(key: string): void {
    if (!this.#watchedPods.has(key) && !this.#localSliceRefs.has(key)) this.#released.delete(key);
  }

  /** A pod of this node (the agent's node-scoped watch): steered before its slice arrives. */
  setLocalPod(pod: PodInfo): void {
    const key = podKey(pod);
    this.#watchedPods.set(key, pod);
    this.#applyLocalPod(key);
  }

  deleteLocalPod(key: string): void {
    this.#watchedPods.delete(key);
    this.#cniAddresses.delete(key);
    this.#forgetReleased(key);
    if (!this.#localPods.delete(key)) return;
    this.#reselect(key, undefined, false);
  }

  /**
   * CNI ADD on this node: the pod's network exists with these addresses. They count at once,
   * before the Pod's status names them. Returns false when the watch has not shown the Pod yet
   * (the addresses are kept for when it does).
   */
  attachPodNetwork(key: string, containerId: string, ips: readonly string[]): boolean {
    this.#cniAddresses.set(key, { containerId, ips: [...ips] });
    if (this.#released.delete(key)) this.#refreshSlicePolicies(key);
    this.#applyLocalPod(key);
    return this.#watchedPods.has(key);
  }

  /**
   * CNI DEL on this node: the pod's addresses leave every set now, whatever the Pod's status
   * and the slices still say. A DEL for another sandbox of the pod than the one ADD reported
   * last changes nothing (returns false).
   */
  detachPodNetwork(key: string, containerId: string): boolean {
    const current = this.#cniAddresses.get(key);
    if (current !== undefined && current.containerId !== containerId) return false;
    this.#cniAddresses.delete(key);
    if (!this.#released.has(key)) {
      this.#released.add(key);
      this.#refreshSlicePolicies(key);
    }
    this.#applyLocalPod(key);
    this.#forgetReleased(key);
    return true;
  }

  /** Whether the node's pod watch has shown this pod. */
  hasLocalPod(key: string): boolean {
    return this.#watchedPods.has(key);
  }

  /** The addresses this node's sets hold for one of its pods ([] when none). */
  localPodAddresses(key: string): readonly string[] {
    return this.#localPods.get(key)?.ips ?? [];
  }

  /** The policies whose sets on this node hold the pod (by its own node's knowledge). */
  selecting(key: string): string[] {
    const out: string[] = [];
    for (const [policy, pods] of this.#selected)
      if (pods.has(key) && this.#views.has(policy)) out.push(policy);
    return out.sort();
  }

  #applyLocalPod(key: string): void {
    const watched = this.#watchedPods.get(key);
    if (watched === undefined) return;
    const cni = this.#cniAddresses.get(key);
    const pod: PodInfo = this.#released.has(key)
      ? { ...watched, ips: [] }
      : cni !== undefined
        ? { ...watched, ips: cni.ips }
        : watched;
    const before = this.#localPods.get(key);
    if (before !== undefined && samePod(before, pod)) return;
    this.#localPods.set(key, pod);
    this.#reselect(key, pod, before !== undefined && !deepEqual(before.ips, pod.ips));
  }

  #refreshSlicePolicies(key: string): void {
    for (const slice of this.#localSliceRefs.get(key) ?? []) {
      const policy = this.#slices.get(slice)?.policy;
      if (policy !== undefined) this.#refreshView(policy);
    }
  }

  setNamespace(name: string, labels: Labels): void {
    const before = this.#namespaceLabels.get(name);
    this.#namespaceLabels.set(name, labels);
    if (before !== undefined && sameLabels(before, labels)) return;
    for (const [key, pod] of this.#localPods)
      if (pod.namespace === name) this.#reselect(key, pod, false);
  }

  deleteNamespace(name: string): void {
    if (!this.#namespaceLabels.delete(name)) return;
    for (const [key, pod] of this.#localPods)
      if (pod.namespace === name) this.#reselect(key, pod, false);
  }

  setEgressNode(n: EgressNode): void {
    const peer = peerOf(n);
    const before = this.#peers.get(peer.name);
    if (before !== undefined && deepEqual(before, peer)) return;
    this.#peers = new Map(this.#peers).set(peer.name, peer);
    this.#peersDirty = true;
  }

  deleteEgressNode(name: string): void {
    if (!this.#peers.has(name)) return;
    this.#peers = new Map(this.#peers);
    this.#peers.delete(name);
    this.#peersDirty = true;
  }

  setClusterInfo(info: EgressClusterInfo | undefined): void {
    const cidrs = info?.status?.ignoredCIDRs ?? [];
    if (deepEqual(cidrs, this.#ignore)) return;
    this.#ignore = cidrs;
    this.#ignoreDirty = true;
  }

  // --- outputs

  /** True when something the datapath depends on changed since the last `takeChanges()`. */
  get planDirty(): boolean {
    return this.#dirty.size > 0 || this.#peersDirty || this.#ignoreDirty;
  }

  /** True when what this node must report may have changed (a revision the controller published). */
  get reportDirty(): boolean {
    return this.#revisionsDirty;
  }

  takeChanges(): AgentChanges {
    const changes = {
      policies: this.#dirty,
      peers: this.#peersDirty,
      ignoreCIDRs: this.#ignoreDirty,
    };
    this.#dirty = new Set();
    this.#peersDirty = false;
    this.#ignoreDirty = false;
    return changes;
  }

  view(key: string): PolicyView | undefined {
    return this.#views.get(key);
  }

  views(): IterableIterator<PolicyView> {
    return this.#views.values();
  }

  get peers(): ReadonlyMap<string, PeerView> {
    return this.#peers;
  }

  get ignoreCIDRs(): readonly string[] {
    return this.#ignore;
  }

  /** The revision the controller published for a policy (its status), if any. */
  publishedRevision(key: string): string | undefined {
    return this.#headers.get(key)?.revision;
  }

  /**
   * Policy → revision for every policy this node carries whose current view is the one the
   * controller published: what the node reports once its kernel holds the views.
   */
  programmed(): Record<string, string> {
    this.#revisionsDirty = false;
    const out: Record<string, string> = {};
    for (const [key, view] of this.#views) {
      const r = reportedRevision(view, this.node, this.#headers.get(key)?.revision);
      if (r !== undefined) out[key] = r;
    }
    return out;
  }

  // --- keyed recomputation

  #refreshHeader(key: string): void {
    const obj = this.#policyObjects.get(key);
    if (obj === undefined) return;
    const before = this.#headers.get(key);
    const header = headerOf(obj, this.#gateways.get(obj.spec.gateway));
    if (before !== undefined && before.revision !== header.revision) this.#revisionsDirty = true;
    const selectionChanged =
      before === undefined || !deepEqual(before.selectionSpec, header.selectionSpec);
    if (before !== undefined && !selectionChanged && sameViewFields(before, header)) {
      // Only fields the datapath does not read (status counters, conditions, the revision), or
      // the standby list and the gateway's nodes (read by the planner, not by the revision,
      // through the view refreshed below).
      this.#headers.set(key, {
        ...before,
        revision: header.revision,
        standbyNodes: header.standbyNodes,
        gatewayNodes: header.gatewayNodes,
      });
      if (
        !sameItems(before.standbyNodes, header.standbyNodes) ||
        !sameItems(before.gatewayNodes, header.gatewayNodes)
      )
        this.#refreshView(key);
      return;
    }
    this.#headers.set(key, header);
    getOrInsert(this.#byGateway, obj.spec.gateway, () => new Set()).add(key);
    if (selectionChanged) {
      const mine = new Set<string>();
      if (header.selection !== undefined) {
        for (const [podName, pod] of this.#localPods)
          if (
            selectsPod(header.selection, pod, this.#namespaceLabels.get(pod.namespace), undefined)
          )
            mine.add(podName);
      }
      this.#selected.set(key, mine);
    }
    this.#refreshView(key);
  }

  /** Re-evaluates which policies select a local pod; `ipsChanged` dirties those that keep it. */
  #reselect(podName: string, pod: PodInfo | undefined, ipsChanged: boolean): void {
    for (const [key, header] of this.#headers) {
      const set = getOrInsert(this.#selected, key, () => new Set());
      const was = set.has(podName);
      const is =
        pod !== undefined &&
        header.selection !== undefined &&
        selectsPod(header.selection, pod, this.#namespaceLabels.get(pod.namespace), undefined);
      if (is) set.add(podName);
      else set.delete(podName);
      if (was !== is || (is && ipsChanged)) this.#refreshView(key);
    }
  }

  /** Rebuilds one policy's view; marks it dirty only when its content changed. */
  #refreshView(key: string): void {
    const header = this.#headers.get(key);
    const before = this.#views.get(key);
    if (header === undefined || !header.accepted) {
      if (before !== undefined) {
        this.#views.delete(key);
        this.#dirty.add(key);
        this.#revisionsDirty = true;
      }
      return;
    }
    const byPod = new Map<string, EndpointView>();
    // A pod in two slices (one written, the other not yet): the first slice by name decides,
    // whatever order the events came in.
    for (const name of [...(this.#policySlices.get(key) ?? [])].sort()) {
      for (const e of this.#slices.get(name)?.endpoints ?? []) {
        if (e.node === this.node && this.#released.has(e.pod)) continue;
        if (!byPod.has(e.pod)) byPod.set(e.pod, e);
      }
    }
    // This node's own pods are known here first; a slice may still be behind.
    for (const podName of this.#selected.get(key) ?? []) {
      const pod = this.#localPods.get(podName);
      if (pod === undefined) continue;
      const e = byPod.get(podName);
      // What CNI reported for a pod of this node is newer than any slice (a new sandbox).
      if (e === undefined || e.node !== this.node || this.#cniAddresses.has(podName))
        byPod.set(podName, localEndpoint(pod));
    }
    const endpoints = [...byPod.values()].sort((a, b) =>
      a.pod < b.pod ? -1 : a.pod > b.pod ? 1 : 0,
    );
    const view: PolicyView = {
      key,
      priority: header.priority,
      createdAt: header.createdAt,
      destinationCIDRs: header.destinationCIDRs,
      excludedCIDRs: header.excludedCIDRs,
      ports: header.ports,
      gatewayNode: header.gatewayNode,
      snat: header.snat,
      floating: header.floating,
      announceInterface: header.announceInterface,
      endpoints,
      standbyNodes: header.standbyNodes,
      gatewayNodes: header.gatewayNodes,
      ...(header.tunnelClass === undefined ? {} : { tunnelClass: header.tunnelClass }),
    };
    if (before !== undefined && sameView(before, view)) {
      // The standby list or the gateway's nodes alone: the planner reads them (the gateway's
      // nodes carry the policy in advance, steering nodes keep a route toward the first standby
      // ready), the revision does not, so the report has nothing new to say.
      if (
        !sameItems(before.standbyNodes ?? [], view.standbyNodes ?? []) ||
        !sameItems(before.gatewayNodes ?? [], view.gatewayNodes ?? [])
      ) {
        this.#views.set(key, view);
        this.#dirty.add(key);
      }
      return;
    }
    this.#views.set(key, view);
    this.#dirty.add(key);
    this.#revisionsDirty = true;
  }
}

function sameView(a: PolicyView, b: PolicyView): boolean {
  return (
    a.priority === b.priority &&
    a.createdAt === b.createdAt &&
    a.gatewayNode === b.gatewayNode &&
    a.tunnelClass === b.tunnelClass &&
    a.announceInterface === b.announceInterface &&
    deepEqual(a.destinationCIDRs, b.destinationCIDRs) &&
    deepEqual(a.excludedCIDRs, b.excludedCIDRs) &&
    deepEqual(a.ports, b.ports) &&
    deepEqual(a.snat, b.snat) &&
    deepEqual(a.floating, b.floating) &&
    sameEndpoints(a.endpoints, b.endpoints)
  );
}

function samePod(a: PodInfo, b: PodInfo): boolean {
  return (
    a.nodeName === b.nodeName &&
    a.phase === b.phase &&
    a.hostNetwork === b.hostNetwork &&
    deepEqual(a.ips, b.ips) &&
    sameLabels(a.labels, b.labels)
  );
}

// ------------------------------------------------------------------------------------------------
// From scratch

export interface AgentInputs {
  readonly node: string;
  /**
   * Pods of this node, from the agent's own node-scoped watch: a new pod is steered as soon as
   * its IP is known here, before the controller has put it into an endpoint slice. Its gateway
   * drops its packets until the slice reaches it (fail closed) instead of them leaving with the
   * node's address.
   */
  readonly localPods?: Iterable<PodInfo>;
  readonly namespaceLabels?: ReadonlyMap<string, Labels>;
  readonly policies: Iterable<AnyPolicy>;
  readonly gateways: Iterable<EgressGateway>;
  readonly egressNodes: Iterable<EgressNode>;
  readonly slices: Iterable<EgressEndpointSlice>;
  readonly clusterInfo: EgressClusterInfo | undefined;
  readonly config: NodeConfig;
  readonly local: LocalFacts;
}

/** The whole AgentState of one node at once, from its inputs. */
export function agentStateOf(inputs: Omit<AgentInputs, "config" | "local">): AgentState {
  const state = new AgentState(inputs.node);
  for (const [name, labels] of inputs.namespaceLabels ?? []) state.setNamespace(name, labels);
  for (const pod of inputs.localPods ?? []) state.setLocalPod(pod);
  for (const g of inputs.gateways) state.setGateway(g);
  for (const s of inputs.slices) state.setSlice(s);
  for (const p of inputs.policies) state.setPolicy(p);
  for (const n of inputs.egressNodes) state.setEgressNode(n);
  state.setClusterInfo(inputs.clusterInfo);
  return state;
}

/** The NodeView of one node from the objects its agent watches (explain, tests). */
export function buildAgentView(inputs: AgentInputs): { readonly view: NodeView } {
  const state = agentStateOf(inputs);
  return {
    view: {
      node: inputs.node,
      peers: state.peers,
      policies: [...state.views()],
      ignoreCIDRs: state.ignoreCIDRs,
      config: inputs.config,
      local: inputs.local,
    },
  };
}
