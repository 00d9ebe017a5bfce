/** API objects → the engine's snapshot types. */
import type { EgressNode, EgressPolicyStatus } from "../api/types.ts";
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

import { type Family, tryParseAddress } from "../lib/ip.ts";

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
  };
}

export function previousOf(status: EgressPolicyStatus | undefined): PreviousPolicy | undefined {
  if (status === undefined) return undefined;
  return { egressIPs: status.egressIPs ?? [], gatewayNode: status.gatewayNode };
}
