/**
 * The input of the cluster engine: everything the controller knows, as plain data. Adapters
 * (src/kube) build it from API objects; tests and benchmarks build it directly.
 */
import type { AnyPolicy, EgressGateway } from "../api/types.ts";
import type { Family } from "../lib/ip.ts";
import type { Labels } from "../lib/selector.ts";

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
}

export interface NodeIdentity {
  readonly nodeID: number;
  readonly mac: string;
  readonly tunnel: Readonly<Partial<Record<Family, string>>>;
}

export interface PreviousPolicy {
  readonly egressIPs: readonly string[];
  readonly gatewayNode?: string | undefined;
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
