/**
 * Builders for snapshots in tests and benchmarks. Address plan used throughout the tests:
 *
 *   node underlay     192.168.0.0/24, fd00:192:168::/64   (node-N = .N+10 / ::N+10)
 *   pods              172.29.0.0/16 (seed 000's pod 172.29.234.173), fd00:172:29::/64
 *   pod CIDR of node  172.29.N.0/24, fd00:172:29:N::/64
 *   services          10.96.0.0/16, fd00:10:96::/112
 *   destinations      10.6.105.150 (seed 000), 203.0.113.0/24, 2001:db8::/64
 *   egress IPs        10.168.60.100-10.168.60.110 (seed 003), fd00:a::100-fd00:a::110
 */
import type { ClusterEgressPolicy, EgressGateway, EgressPolicy } from "../api/types.ts";
import type { Family } from "../lib/ip.ts";
import type { Labels } from "../lib/selector.ts";
import { DEFAULT_CLUSTER_CONFIG, type NodeInfo, type PodInfo, type Snapshot } from "./snapshot.ts";
import type { LocalFacts } from "./view.ts";

export function node(
  name: string,
  options: { ipv4?: string; ipv6?: string; labels?: Labels; podCIDRs?: string[] } = {},
): NodeInfo {
  const addresses: Partial<Record<Family, string>> = {};
  if (options.ipv4 !== undefined) addresses[4] = options.ipv4;
  if (options.ipv6 !== undefined) addresses[6] = options.ipv6;
  return {
    name,
    labels: { "kubernetes.io/hostname": name, ...options.labels },
    addresses,
    podCIDRs: options.podCIDRs ?? [],
  };
}

export function pod(
  namespace: string,
  name: string,
  nodeName: string,
  ips: string[],
  labels: Labels = {},
): PodInfo {
  return { namespace, name, labels, nodeName, ips, hostNetwork: false, phase: "Running" };
}

export function gateway(
  name: string,
  options: {
    selector?: Labels;
    pool?: string[];
    failback?: boolean;
    namespaces?: Labels;
    /** Where egress IPs are announced. */
    interface?: string;
  } = {},
): EgressGateway {
  return {
    apiVersion: "sallyport.dev/v1alpha1",
    kind: "EgressGateway",
    metadata: { name, generation: 1, creationTimestamp: "2026-01-01T00:00:00Z" },
    spec: {
      nodeSelector: { matchLabels: options.selector ?? { egress: "true" } },
      ...(options.pool === undefined ? {} : { pool: options.pool }),
      ...(options.failback === undefined ? {} : { failback: options.failback }),
      ...(options.interface === undefined ? {} : { interface: options.interface }),
      ...(options.namespaces === undefined
        ? {}
        : { namespaceSelector: { matchLabels: options.namespaces } }),
    },
  };
}

type PolicySpec = EgressPolicy["spec"];

export function policy(
  namespace: string,
  name: string,
  spec: Partial<PolicySpec> & { gateway?: string },
  meta: { created?: string; generation?: number } = {},
): EgressPolicy {
  return {
    apiVersion: "sallyport.dev/v1alpha1",
    kind: "EgressPolicy",
    metadata: {
      name,
      namespace,
      generation: meta.generation ?? 1,
      creationTimestamp: meta.created ?? "2026-01-01T00:00:00Z",
    },
    spec: { podSelector: {}, gateway: "edge", ...spec },
  };
}

export function clusterPolicy(
  name: string,
  spec: Partial<ClusterEgressPolicy["spec"]>,
  meta: { created?: string; generation?: number } = {},
): ClusterEgressPolicy {
  return {
    apiVersion: "sallyport.dev/v1alpha1",
    kind: "ClusterEgressPolicy",
    metadata: {
      name,
      generation: meta.generation ?? 1,
      creationTimestamp: meta.created ?? "2026-01-01T00:00:00Z",
    },
    spec: { podSelector: {}, namespaceSelector: {}, gateway: "edge", ...spec },
  };
}

export function snapshot(parts: Partial<Snapshot> & { nodes: NodeInfo[] }): Snapshot {
  return {
    pods: [],
    namespaces: [],
    gateways: [],
    policies: [],
    serviceCIDRs: [],
    extraCIDRs: [],
    healthy: new Set(parts.nodes.map((n) => n.name)),
    // Agents of this version: their tunnels take tunnel classes.
    reports: new Map(
      parts.nodes.map((n) => [n.name, { interfaces: new Map(), tunnelClasses: true }]),
    ),
    previousNodes: new Map(),
    previousPolicies: new Map(),
    config: DEFAULT_CLUSTER_CONFIG,
    ...parts,
  };
}

export function localFacts(
  options: Partial<LocalFacts["underlay"]> & { usedTables?: number[]; seed?: number } = {},
): LocalFacts {
  let state = options.seed ?? 1;
  return {
    underlay: {
      device: options.device ?? "eth0",
      mtu: options.mtu ?? 1500,
      ipv4: options.ipv4,
      ipv6: options.ipv6,
    },
    usedTables: new Set(options.usedTables ?? []),
    existingTables: new Map(),
    // A small deterministic generator: tests must not depend on Math.random.
    random: () => {
      state = (state * 1103515245 + 12345) % 2147483648;
      return state / 2147483648;
    },
  };
}
