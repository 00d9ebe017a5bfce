/** API objects → the engine's snapshot types. */
import type { EgressClusterInfo, EgressNode, EgressPolicyStatus } from "../api/types.ts";
import type {
  NodeIdentity,
  NodeInfo,
  NodeReport,
  PodObject as PodFields,
  PreviousPolicy,
} from "../engine/snapshot.ts";
import type { KubeObject } from "../kube/client.ts";

export { podInfo } from "../engine/snapshot.ts";

export type PodObject = PodFields & KubeObject;

import { hex, nodeMark } from "../engine/marks.ts";
import { type Family, normalizeCidrList, tryParseAddress } from "../lib/ip.ts";

export interface NodeObject extends KubeObject {
  spec?: { podCIDR?: string; podCIDRs?: string[] };
  status?: { addresses?: { type: string; address: string }[] };
}

export function nodeInfo(node: NodeObject): NodeInfo {
  const addresses: Partial<Record<Family, string>> = {};
  for (const a of node.status?.addresses ?? []) {
    if (a.type !== "InternalIP") continue;
    const parsed = tryParseAddress(a.address);
    if (parsed !== undefined && addresses[parsed.family] === undefined)
      addresses[parsed.family] = a.address;
  }
  return {
    name: node.metadata.name ?? "",
    labels: node.metadata.labels ?? {},
    addresses,
    podCIDRs: node.spec?.podCIDRs ?? (node.spec?.podCIDR === undefined ? [] : [node.spec.podCIDR]),
  };
}

export function identityOf(node: EgressNode): NodeIdentity {
  const tunnel: Partial<Record<Family, string>> = {};
  if (node.spec.tunnel.ipv4 !== undefined) tunnel[4] = node.spec.tunnel.ipv4;
  if (node.spec.tunnel.ipv6 !== undefined) tunnel[6] = node.spec.tunnel.ipv6;
  return { nodeID: node.spec.nodeID, mac: node.spec.tunnel.mac, tunnel };
}

export function reportOf(node: EgressNode): NodeReport {
  return {
    underlay:
      node.status?.underlay === undefined
        ? undefined
        : { ipv4: node.status.underlay.ipv4, ipv6: node.status.underlay.ipv6 },
    interfaces: new Map((node.status?.interfaces ?? []).map((i) => [i.name, i.addresses])),
    ...(node.status?.tunnelClasses === true ? { tunnelClasses: true } : {}),
  };
}

export function previousOf(status: EgressPolicyStatus | undefined): PreviousPolicy | undefined {
  if (status === undefined) return undefined;
  return {
    egressIPs: status.egressIPs ?? [],
    gatewayNode: status.gatewayNode,
    tunnelClass: status.tunnelClass,
  };
}

/** The EgressNode spec the controller publishes for a node: its identity and addresses. */
export function egressNodeSpec(
  id: NodeIdentity,
  info: NodeInfo,
  gatewayCapable: boolean,
): EgressNode["spec"] {
  return {
    nodeID: id.nodeID,
    mark: hex(nodeMark(id.nodeID)),
    tunnel: {
      mac: id.mac,
      ...(id.tunnel[4] === undefined ? {} : { ipv4: id.tunnel[4] }),
      ...(id.tunnel[6] === undefined ? {} : { ipv6: id.tunnel[6] }),
    },
    addresses: {
      ...(info.addresses[4] === undefined ? {} : { ipv4: info.addresses[4] }),
      ...(info.addresses[6] === undefined ? {} : { ipv6: info.addresses[6] }),
    },
    podCIDRs: normalizeCidrList(info.podCIDRs),
    gatewayCapable,
  };
}

/** EgressClusterInfo's status: the cluster's own CIDRs, and what policies never capture. */
export function clusterInfoStatus(
  nodes: readonly NodeInfo[],
  serviceCIDRs: readonly string[],
  ignoredCIDRs: readonly string[],
): NonNullable<EgressClusterInfo["status"]> {
  return {
    nodeIPs: normalizeCidrList(
      nodes.flatMap((n) => Object.values(n.addresses).filter((a): a is string => a !== undefined)),
    ),
    podCIDRs: normalizeCidrList(nodes.flatMap((n) => n.podCIDRs)),
    serviceCIDRs: normalizeCidrList(serviceCIDRs),
    ignoredCIDRs: [...ignoredCIDRs],
  };
}
