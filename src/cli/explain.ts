/**
 * `sallyport explain <namespace/pod> <destination>`: what happens to a packet from this pod to
 * that destination, and why. It reads what the agents read (policies with their status,
 * gateways, EgressNodes, endpoint slices, cluster info) plus the Pod, plans the source node and
 * the gateway node exactly as their agents do, walks the packet through both plans with the
 * tracer, and says which policy decided, which egress IP the outside will see, and whether the
 * nodes report that their kernel holds it.
 */

import { buildAgentView } from "../agent/view.ts";
import {
  type AnyPolicy,
  type Condition,
  type EgressClusterInfo,
  type EgressEndpointSlice,
  type EgressGateway,
  type EgressNode,
  policyKey,
} from "../api/types.ts";
import { planNode } from "../engine/node_plan.ts";
import { type Packet, type Trace, tracePacket } from "../engine/trace.ts";
import { DEFAULT_NODE_CONFIG, type LocalFacts } from "../engine/view.ts";
import { CORE, isNotFound, type KubeClient, type KubeObject, ours } from "../kube/client.ts";
import {
  cidrContainsAddress,
  type Family,
  familyOfText,
  parseAddress,
  parseCidr,
} from "../lib/ip.ts";

export interface ExplainInputs {
  readonly pod: {
    readonly namespace: string;
    readonly name: string;
    readonly node: string;
    readonly ips: readonly string[];
  };
  readonly destination: string;
  readonly protocol?: "tcp" | "udp" | "sctp";
  readonly port?: number;
  readonly policies: readonly AnyPolicy[];
  readonly gateways: readonly EgressGateway[];
  readonly egressNodes: readonly EgressNode[];
  readonly slices: readonly EgressEndpointSlice[];
  readonly clusterInfo: EgressClusterInfo | undefined;
}

export interface Hop {
  readonly node: string;
  readonly trace: Trace;
}

export interface Explanation {
  readonly source: string;
  readonly destination: string;
  /** What the destination sees as the source address, when known. */
  readonly seenAs: string;
  readonly summary: string;
  readonly policy?: {
    readonly key: string;
    readonly ready?: Condition | undefined;
    readonly programmed?: string | undefined;
    /** The policy's gateway node, and who takes over from it, in order. */
    readonly gatewayNode?: string | undefined;
    readonly standbyNodes?: readonly string[] | undefined;
  };
  readonly hops: readonly Hop[];
  /** Nodes on the path whose agent does not report the policy's current revision. */
  readonly notProgrammedOn: readonly string[];
}

/** Plans `node` as its agent does; only tables differ (chosen as on an empty host). */
function traceOn(node: string, inputs: ExplainInputs, families: Family[], packet: Packet): Trace {
  const self = inputs.egressNodes.find((n) => n.metadata.name === node);
  const underlay = self?.status?.underlay;
  const local: LocalFacts = {
    underlay: {
      device: underlay?.interface ?? "eth0",
      mtu: underlay?.mtu ?? 1500,
      ipv4: underlay?.ipv4 ?? self?.spec.addresses?.ipv4,
      ipv6: underlay?.ipv6 ?? self?.spec.addresses?.ipv6,
    },
    usedTables: new Set(),
    existingTables: new Map(),
    random: () => 0,
  };
  const { view } = buildAgentView({
    node,
    policies: inputs.policies,
    gateways: inputs.gateways,
    egressNodes: inputs.egressNodes,
    slices: inputs.slices,
    clusterInfo: inputs.clusterInfo,
    // Each node is planned for the packet filter its agent reports.
    config: { ...DEFAULT_NODE_CONFIG, families, datapath: self?.status?.datapath ?? "iptables" },
    local,
  });
  return tracePacket(planNode(view), packet);
}

export function explainPacket(inputs: ExplainInputs): Explanation {
  const family = familyOfText(inputs.destination);
  if (family === undefined)
    throw new Error(
      `Cannot explain: the destination must be an IP address: current value is "${inputs.destination}"`,
    );
  const src = inputs.pod.ips.find((ip) => familyOfText(ip) === family);
  const source = `${inputs.pod.namespace}/${inputs.pod.name}`;
  if (src === undefined)
    throw new Error(
      `Cannot explain: pod ${source} has no IPv${family} address (it has ${inputs.pod.ips.join(", ") || "none"})`,
    );
  const families: Family[] = [family];
  const packet: Packet = {
    src,
    dst: inputs.destination,
    ...(inputs.protocol === undefined ? {} : { protocol: inputs.protocol }),
    ...(inputs.port === undefined ? {} : { dport: inputs.port }),
    ctstate: "NEW",
    syn: true,
  };
  const hops: Hop[] = [
    { node: inputs.pod.node, trace: traceOn(inputs.pod.node, inputs, families, packet) },
  ];
  const first = hops[0]!.trace;
  let gatewayNode: string | undefined;
  if (first.verdict === "tunnel") {
    gatewayNode = inputs.egressNodes.find(
      (n) => (family === 4 ? n.spec.tunnel.ipv4 : n.spec.tunnel.ipv6) === first.via,
    )?.metadata.name;
    if (gatewayNode !== undefined)
      hops.push({
        node: gatewayNode,
        trace: traceOn(gatewayNode, inputs, families, {
          ...packet,
          inInterface: DEFAULT_NODE_CONFIG.tunnelDevice,
        }),
      });
  } else if (first.snat !== undefined) {
    gatewayNode = inputs.pod.node;
  }

  const key = hops.map((h) => h.trace.policy).find((k) => k !== undefined);
  const policy = key === undefined ? undefined : inputs.policies.find((p) => policyKey(p) === key);
  const notProgrammedOn: string[] = [];
  if (key !== undefined && policy?.status?.revision !== undefined) {
    for (const h of hops) {
      const n = inputs.egressNodes.find((x) => x.metadata.name === h.node);
      if (n?.status?.programmed?.[key] !== policy.status.revision) notProgrammedOn.push(h.node);
    }
  }

  const last = hops[hops.length - 1]!.trace;
  let seenAs: string;
  let summary: string;
  if (last.verdict === "drop") {
    seenAs = "nothing: the packet is dropped";
    summary =
      key === undefined
        ? `dropped on ${hops[hops.length - 1]!.node}`
        : `dropped by ${key}: it fails closed while its egress IP has no ready gateway node (${policy?.status?.conditions?.find((c) => c.type === "GatewayAssigned")?.message ?? "see its status"})`;
  } else if (last.snat !== undefined && last.snat.length > 0) {
    const several = last.snat.length > 1;
    seenAs = several
      ? `one of ${last.snat.join(", ")} (new connections take them in turn)`
      : last.snat[0]!;
    summary = `${key ?? "a policy"} sends it ${gatewayNode === inputs.pod.node ? "out of" : `through the tunnel to`} ${gatewayNode}, which SNATs it to ${several ? `one of its ${last.snat.length} egress IPs, ${last.snat.join(", ")}: each new connection takes the next, round-robin` : `the egress IP ${last.snat[0]}`}`;
  } else if (first.verdict === "tunnel") {
    seenAs = "unknown: the gateway node does not SNAT it";
    summary = `${key ?? "a policy"} sends it to ${gatewayNode ?? first.via}, whose plan does not SNAT it: the gateway's agent has not caught up, or the policy just changed`;
  } else if (
    (inputs.clusterInfo?.status?.ignoredCIDRs ?? []).some((c) => {
      const cidr = parseCidr(c);
      return cidr.family === family && cidrContainsAddress(cidr, parseAddress(inputs.destination));
    })
  ) {
    seenAs = "what it sees without Sallyport: in-cluster traffic keeps its usual path";
    summary =
      "the destination is inside the cluster (EgressClusterInfo status.ignoredCIDRs): Sallyport never captures it";
  } else {
    seenAs = "the node's own address (the CNI's masquerade), as without Sallyport";
    summary = "no policy selects this pod and destination: it takes the usual path";
  }
  return {
    source: `${source} (${src} on ${inputs.pod.node})`,
    destination: `${inputs.destination}${inputs.port === undefined ? "" : `:${inputs.port}`}`,
    seenAs,
    summary,
    ...(key === undefined
      ? {}
      : {
          policy: {
            key,
            ready: policy?.status?.conditions?.find((c) => c.type === "Ready"),
            programmed: policy?.status?.programmed,
            gatewayNode: policy?.status?.gatewayNode,
            standbyNodes: policy?.status?.standbyNodes,
          },
        }),
    hops,
    notProgrammedOn,
  };
}

export function formatExplanation(e: Explanation): string {
  const lines = [
    `from ${e.source} to ${e.destination}`,
    `  ${e.summary}`,
    `  the destination sees: ${e.seenAs}`,
  ];
  if (e.policy !== undefined) {
    const r = e.policy.ready;
    lines.push(
      `  ${e.policy.key}: Ready=${r?.status ?? "?"}${r === undefined ? "" : ` (${r.reason}: ${r.message})`}, programmed ${e.policy.programmed ?? "?"}`,
    );
    const standby = e.policy.standbyNodes ?? [];
    if (e.policy.gatewayNode !== undefined)
      lines.push(
        standby.length === 0
          ? `  if ${e.policy.gatewayNode} is lost: no other node of its gateway qualifies to take over`
          : `  if ${e.policy.gatewayNode} is lost: the first live of ${standby.join(", ")} takes over (status.standbyNodes)`,
      );
  }
  if (e.notProgrammedOn.length > 0)
    lines.push(
      `  WARNING: ${e.notProgrammedOn.join(", ")} do(es) not report this revision in its kernel yet (kubectl get egn -o yaml: status.programmed)`,
    );
  if (e.hops.some((h) => h.trace.steps.some((s) => s.startsWith("route:"))))
    lines.push(
      "  (routing table numbers are the ones an empty host would choose; `ip rule` on the node shows its own)",
    );
  for (const h of e.hops) {
    lines.push(`on ${h.node}:`);
    for (const s of h.trace.steps) lines.push(`  ${s}`);
    for (const err of h.trace.errors) lines.push(`  (tracer: ${err})`);
  }
  return lines.join("\n");
}

/** Reads what explainPacket needs from the API. */
export async function explain(
  client: KubeClient,
  options: {
    pod: string;
    destination: string;
    protocol?: "tcp" | "udp" | "sctp";
    port?: number;
  },
): Promise<Explanation> {
  const [namespace, name] = options.pod.includes("/")
    ? (options.pod.split("/", 2) as [string, string])
    : ["default", options.pod];
  let pod: KubeObject & {
    spec?: { nodeName?: string };
    status?: { podIPs?: { ip: string }[]; podIP?: string };
  };
  try {
    pod = await client.get(CORE.pods, name, namespace);
  } catch (e) {
    if (isNotFound(e)) throw new Error(`Cannot explain: pod ${namespace}/${name} does not exist`);
    throw e;
  }
  const node = pod.spec?.nodeName;
  if (node === undefined)
    throw new Error(`Cannot explain: pod ${namespace}/${name} is not scheduled on a node yet`);
  const ips = pod.status?.podIPs?.map((p) => p.ip) ?? (pod.status?.podIP ? [pod.status.podIP] : []);
  const [policies, clusterPolicies, gateways, egressNodes, slices, clusterInfo] = await Promise.all(
    [
      client.listAll<AnyPolicy & KubeObject>(ours("EgressPolicy")),
      client.listAll<AnyPolicy & KubeObject>(ours("ClusterEgressPolicy")),
      client.listAll<EgressGateway & KubeObject>(ours("EgressGateway")),
      client.listAll<EgressNode & KubeObject>(ours("EgressNode")),
      client.listAll<EgressEndpointSlice & KubeObject>(ours("EgressEndpointSlice")),
      client
        .get<EgressClusterInfo & KubeObject>(ours("EgressClusterInfo"), "default")
        .catch(() => undefined),
    ],
  );
  return explainPacket({
    pod: { namespace, name, node, ips },
    destination: options.destination,
    ...(options.protocol === undefined ? {} : { protocol: options.protocol }),
    ...(options.port === undefined ? {} : { port: options.port }),
    policies: [...policies.items, ...clusterPolicies.items],
    gateways: gateways.items,
    egressNodes: egressNodes.items,
    slices: slices.items,
    clusterInfo,
  });
}
