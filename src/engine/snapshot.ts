/**
 * The input of the cluster engine: everything the controller knows, as plain data. Adapters
 * (src/kube) build it from API objects; tests and benchmarks build it directly.
 */
import type { AnyPolicy, EgressGateway } from "../api/types.ts";
import type { Family } from "../lib/ip.ts";
import type { CompiledSelector, Labels } from "../lib/selector.ts";

export interface NodeInfo {
  readonly name: string;
  readonly labels: Labels;
  /** InternalIP addresses, at most one per family. */
  readonly addresses: Readonly<Partial<Record<Family, string>>>;
  readonly podCIDRs: readonly string[];
}

export interface PodInfo {
  readonly namespace: string;
  readonly name: string;
  readonly labels: Labels;
  readonly nodeName: string;
  readonly ips: readonly string[];
  readonly hostNetwork: boolean;
  readonly phase: string;
}

export interface NamespaceInfo {
  readonly name: string;
  readonly labels: Labels;
}

/** What an agent reports about its node (EgressNode status). */
export interface NodeReport {
  readonly underlay?:
    | { readonly ipv4?: string | undefined; readonly ipv6?: string | undefined }
    | undefined;
  readonly interfaces: ReadonlyMap<string, readonly string[]>;
  /** Its tunnel takes tunnel classes (EgressNode status.tunnelClasses). */
  readonly tunnelClasses?: boolean | undefined;
}

export interface NodeIdentity {
  readonly nodeID: number;
  readonly mac: string;
  readonly tunnel: Readonly<Partial<Record<Family, string>>>;
}

export interface PreviousPolicy {
  readonly egressIPs: readonly string[];
  readonly gatewayNode?: string | undefined;
  readonly tunnelClass?: number | undefined;
}

export interface ClusterConfig {
  /** Tunnel addresses are the tunnel CIDR's base + 1 + node id. */
  readonly tunnelCIDRs: Readonly<Partial<Record<Family, string>>>;
  /** Extra CIDRs from the command line, on top of EgressClusterInfo.spec.extraCIDRs. */
  readonly extraIgnoreCIDRs: readonly string[];
}

export const DEFAULT_CLUSTER_CONFIG: ClusterConfig = {
  tunnelCIDRs: { 4: "100.127.0.0/16", 6: "fd5a:11::/112" },
  extraIgnoreCIDRs: [],
};

export interface Snapshot {
  readonly nodes: readonly NodeInfo[];
  readonly pods: readonly PodInfo[];
  readonly namespaces: readonly NamespaceInfo[];
  readonly gateways: readonly EgressGateway[];
  readonly policies: readonly AnyPolicy[];
  /** Service CIDRs (ServiceCIDR objects or EgressClusterInfo.spec.serviceCIDRs). */
  readonly serviceCIDRs: readonly string[];
  readonly extraCIDRs: readonly string[];
  /** Nodes whose agent is alive (its Lease was observed renewing). */
  readonly healthy: ReadonlySet<string>;
  readonly reports: ReadonlyMap<string, NodeReport>;
  readonly previousNodes: ReadonlyMap<string, NodeIdentity>;
  readonly previousPolicies: ReadonlyMap<string, PreviousPolicy>;
  readonly config: ClusterConfig;
}

export function podKey(pod: { namespace: string; name: string }): string {
  return `${pod.namespace}/${pod.name}`;
}

/** Pods whose traffic a policy can steer: they have an IP of their own and are not finished. */
export function isEligiblePod(pod: PodInfo): boolean {
  return (
    !pod.hostNetwork &&
    pod.nodeName !== "" &&
    pod.ips.length > 0 &&
    pod.phase !== "Succeeded" &&
    pod.phase !== "Failed"
  );
}

/** The selectors of a policy, compiled. */
export interface PolicySelection {
  /** An EgressPolicy's own namespace; undefined for a ClusterEgressPolicy. */
  readonly namespace: string | undefined;
  readonly namespaceSelector: CompiledSelector | undefined;
  readonly podSelector: CompiledSelector;
  readonly nodeSelector: CompiledSelector | undefined;
}

/**
 * Does a policy select a pod? The one definition, used by the controller for every pod and by an
 * agent for the pods of its own node.
 */
export function selectsPod(
  p: PolicySelection,
  pod: PodInfo,
  namespaceLabels: Labels | undefined,
  nodeLabels: Labels | undefined,
): boolean {
  if (!isEligiblePod(pod)) return false;
  if (p.namespace !== undefined && pod.namespace !== p.namespace) return false;
  if (p.namespaceSelector !== undefined && !p.namespaceSelector.matches(namespaceLabels))
    return false;
  if (!p.podSelector.matches(pod.labels)) return false;
  if (p.nodeSelector !== undefined && !p.nodeSelector.matches(nodeLabels)) return false;
  return true;
}

/** A Pod as the API serves it, as far as Sallyport reads it. */
export interface PodObject {
  readonly metadata: {
    readonly namespace?: string;
    readonly name?: string;
    readonly labels?: Labels;
  };
  readonly spec?: { readonly nodeName?: string; readonly hostNetwork?: boolean };
  readonly status?: {
    readonly phase?: string;
    readonly podIP?: string;
    readonly podIPs?: readonly { readonly ip: string }[];
  };
}

export function podInfo(pod: PodObject): PodInfo {
  const ips =
    pod.status?.podIPs?.map((p) => p.ip) ??
    (pod.status?.podIP === undefined ? [] : [pod.status.podIP]);
  return {
    namespace: pod.metadata.namespace ?? "",
    name: pod.metadata.name ?? "",
    labels: pod.metadata.labels ?? {},
    nodeName: pod.spec?.nodeName ?? "",
    ips,
    hostNetwork: pod.spec?.hostNetwork === true,
    phase: pod.status?.phase ?? "Pending",
  };
}
