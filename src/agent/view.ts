/**
 * The agent's NodeView, from the objects it watches: policies (spec + the controller's status),
 * gateways, EgressNodes (identities, addresses, pod CIDRs), endpoint slices and cluster info. No
 * Pod or Node is read. A policy is programmed once the controller accepted it; one whose egress
 * IP has no live node fails closed (its traffic is dropped).
 */
import type {
  AnyPolicy,
  EgressClusterInfo,
  EgressEndpointSlice,
  EgressGateway,
  EgressNode,
} from "../api/types.ts";
import { policyKey } from "../api/types.ts";
import { type PodInfo, type PolicySelection, podKey, selectsPod } from "../engine/snapshot.ts";
import type {
  EndpointView,
  LocalFacts,
  NodeConfig,
  NodeView,
  PeerView,
  PolicyView,
} from "../engine/view.ts";
import { policyRevision } from "../engine/view.ts";
import {
  type Family,
  familyOfText,
  formatAddress,
  normalizeCidrList,
  parseAddress,
} from "../lib/ip.ts";
import { compileSelector, type Labels } from "../lib/selector.ts";

const compiled = new WeakMap<AnyPolicy, PolicySelection>();

/** The policy's selectors, for this node's pods; undefined when the agent cannot evaluate them. */
function localSelection(p: AnyPolicy): PolicySelection | undefined {
  // The agent does not read Node objects, so it cannot evaluate a nodeSelector: such policies
  // wait for the controller's endpoint slices.
  if (p.spec.nodeSelector !== undefined) return undefined;
  let s = compiled.get(p);
  if (s === undefined) {
    s = {
      namespace: p.kind === "EgressPolicy" ? (p.metadata.namespace ?? "") : undefined,
      namespaceSelector:
        p.kind === "ClusterEgressPolicy" ? compileSelector(p.spec.namespaceSelector) : undefined,
      podSelector: compileSelector(p.spec.podSelector),
      nodeSelector: undefined,
    };
    compiled.set(p, s);
  }
  return s;
}

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

export interface AgentView {
  readonly view: NodeView;
  /** Per policy relevant to this node: the revision the view describes and the controller's. */
  readonly revisions: ReadonlyMap<
    string,
    { readonly local: string; readonly controller: string | undefined }
  >;
}

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
  };
}

export function buildAgentView(inputs: AgentInputs): AgentView {
  const peers = new Map<string, PeerView>();
  for (const n of inputs.egressNodes) peers.set(n.metadata.name ?? "", peerOf(n));
  const gateways = new Map([...inputs.gateways].map((g) => [g.metadata.name ?? "", g]));
  const endpoints = new Map<string, EndpointView[]>();
  for (const s of inputs.slices) {
    const list = endpoints.get(s.policy) ?? [];
    for (const e of s.endpoints) list.push({ pod: e.pod, node: e.node, ips: e.ips });
    endpoints.set(s.policy, list);
  }
  const localPods = [...(inputs.localPods ?? [])];
  const policies: PolicyView[] = [];
  const revisions = new Map<string, { local: string; controller: string | undefined }>();
  for (const p of inputs.policies) {
    const accepted = p.status?.conditions?.find((c) => c.type === "Accepted");
    if (accepted?.status !== "True") continue;
    const key = policyKey(p);
    const selection = localPods.length === 0 ? undefined : localSelection(p);
    const selected =
      selection === undefined
        ? []
        : localPods.filter((pod) =>
            selectsPod(selection, pod, inputs.namespaceLabels?.get(pod.namespace), undefined),
          );
    if (selected.length > 0) {
      const list = endpoints.get(key) ?? [];
      // Only this node's entries of the slices can name the same pods.
      const known = new Set(list.filter((e) => e.node === inputs.node).map((e) => e.pod));
      for (const pod of selected) {
        if (known.has(podKey(pod))) continue;
        list.push({
          pod: podKey(pod),
          node: inputs.node,
          ips: pod.ips.map((ip) => formatAddress(parseAddress(ip))),
        });
      }
      endpoints.set(key, list);
    }
    const snat: Partial<Record<Family, string>> = {};
    for (const a of p.status?.egressIPs ?? []) {
      const f = familyOfText(a);
      if (f !== undefined) snat[f] = a;
    }
    // Pool and explicit addresses float between nodes; a node's own address or an interface's
    // address does not.
    const floats =
      p.spec.useNodeIP !== true &&
      p.spec.interface === undefined &&
      (p.spec.egressIP !== undefined || (gateways.get(p.spec.gateway)?.spec.pool ?? []).length > 0);
    const view: PolicyView = {
      key,
      priority: p.spec.priority ?? 0,
      createdAt: p.metadata.creationTimestamp ?? "",
      destinationCIDRs: normalizeCidrList(p.spec.destinationCIDRs ?? []),
      excludedCIDRs: normalizeCidrList(p.spec.excludedCIDRs ?? []),
      ports: p.spec.ports ?? [],
      gatewayNode: p.status?.gatewayNode,
      snat,
      floating: floats ? Object.values(snat).sort() : [],
      announceInterface: gateways.get(p.spec.gateway)?.spec.interface,
      endpoints: (endpoints.get(key) ?? []).sort((a, b) =>
        a.pod < b.pod ? -1 : a.pod > b.pod ? 1 : 0,
      ),
    };
    policies.push(view);
    const relevant =
      view.gatewayNode === inputs.node || view.endpoints.some((e) => e.node === inputs.node);
    if (relevant)
      revisions.set(key, { local: policyRevision(view), controller: p.status?.revision });
  }
  return {
    view: {
      node: inputs.node,
      peers,
      policies,
      ignoreCIDRs: inputs.clusterInfo?.status?.ignoredCIDRs ?? [],
      config: inputs.config,
      local: inputs.local,
    },
    revisions,
  };
}
