/**
 * What a node needs to know to plan its datapath: the policies as the controller resolved them
 * (egress IP, gateway node, matched endpoints), the identities of the other nodes, the cluster's
 * ignore CIDRs, and facts about this host. An agent builds it from the API objects it watches; the
 * controller builds the same view from its own results to compute each policy's revision. Nothing
 * here depends on which node computes it except `node` and `local`.
 */

import { hash } from "node:crypto";
import type { PortSpec } from "../api/types.ts";
import type { Family } from "../lib/ip.ts";
import type { TableRange } from "./tables.ts";

export interface PeerView {
  readonly name: string;
  readonly nodeID: number;
  readonly mac: string;
  readonly tunnel: Readonly<Partial<Record<Family, string>>>;
  /** Underlay address VXLAN packets to this node are sent to (IPv4 when the node has one). */
  readonly underlay?: string | undefined;
  /** The node's pod CIDRs (node.spec.podCIDRs): replies to its pods need one route per CIDR. */
  readonly podCIDRs?: readonly string[] | undefined;
  /**
   * Its tunnel takes tunnel classes (its agent reported so): only then does a node name policies
   * in the packets it steers there. An agent of an earlier version has a tunnel without VXLAN
   * GBP, which drops them (a rolling upgrade must not cut steered traffic off).
   */
  readonly tunnelClasses?: true | undefined;
}

export interface EndpointView {
  readonly pod: string;
  readonly node: string;
  readonly ips: readonly string[];
}

export interface PolicyView {
  readonly key: string;
  readonly priority: number;
  readonly createdAt: string;
  /** Canonical; empty means "everything outside the cluster's CIDRs". */
  readonly destinationCIDRs: readonly string[];
  readonly excludedCIDRs: readonly string[];
  readonly ports: readonly PortSpec[];
  /** Node holding the egress IP; undefined when none is available (traffic is dropped). */
  readonly gatewayNode?: string | undefined;
  /**
   * Source addresses the gateway rewrites to, per family, in address order: new connections are
   * spread over them (one, mostly). A family without any is not handled.
   */
  readonly snat: Readonly<Partial<Record<Family, readonly string[]>>>;
  /** Which of the snat addresses float between nodes (pool or explicit EIPs) and must be held. */
  readonly floating: readonly string[];
  /** Interface on which floating addresses are announced; default: the node's underlay device. */
  readonly announceInterface?: string | undefined;
  readonly endpoints: readonly EndpointView[];
  /**
   * The nodes that take the egress IPs over, in this order, when `gatewayNode` is lost: the
   * controller moves them to the first of these that is still live (src/engine/placement.ts),
   * and publishes them in advance (status.standbyNodes) so that a node can decide the same
   * without the API server. Not part of the revision: nothing a node programs depends on it, and
   * a list that changes because a node joined or left must not make every target node program
   * and report the policy again.
   */
  readonly standbyNodes?: readonly string[] | undefined;
  /**
   * The nodes of the policy's gateway (its EgressGateway's `status.nodes`, ready or not), any of
   * which may take its egress IPs over one day: with the standby datapath (NodeConfig) they carry
   * its sets and SNAT rules in advance. Not part of the revision, like `standbyNodes`; unlike
   * those, a node that dies and comes back stays in this list, so a revival changes nothing here.
   */
  readonly gatewayNodes?: readonly string[] | undefined;
  /**
   * The policy's tunnel class (src/engine/tunnel_classes.ts): steering nodes carry it in the
   * VXLAN header, and the gateway SNATs packets carrying it even from pods it does not know yet.
   * Undefined: none (all 16,383 taken, or a status written before classes existed).
   */
  readonly tunnelClass?: number | undefined;
}

export interface NodeConfig {
  readonly families: readonly Family[];
  /** @default "sallyport" */
  readonly tunnelDevice: string;
  /** @default 7799 */
  readonly vni: number;
  /** @default 7799 */
  readonly port: number;
  /** ip rule preference Sallyport owns. @default 5900 */
  readonly rulePref: number;
  readonly tableRange: TableRange;
  /** Exempt steered traffic from SNAT by its sets too (for CNIs like Weave that clear marks). */
  readonly noSnatBySets: boolean;
  /**
   * Every node of a policy's gateway (PolicyView.gatewayNodes) carries its sets, SNAT rules and
   * reply routes in advance, so that a takeover changes one chain per family and the egress IPs,
   * not a rule per policy (`sallyport agent --no-standby-datapath` turns it off). Decided by the
   * gateway's nodes, not by the published standby lists: those change for every policy when a
   * node dies or comes back, and a standby that programmed its policies batch by batch as their
   * lists were rewritten kept its agent busy for minutes at 1,000 policies (BENCHMARKS.md,
   * 2026-12-01). @default true
   */
  readonly standbyDatapath?: boolean | undefined;
  /**
   * Which packet filter carries the rules: iptables + ipset (a rule per policy) or nftables (one
   * table, O(1) classification: src/engine/classify.ts). @default "iptables"
   */
  readonly datapath: "iptables" | "nftables";
  /**
   * Source ports the SNAT to egress IPs chooses from, for TCP, UDP and SCTP (`sallyport agent
   * --snat-ports`): `--to-source EIP:first-last`, nftables `snat … : first-last`. Undefined (the
   * default): no range is named, the kernel's choice (1024–65535).
   */
  readonly snatPorts?: { readonly first: number; readonly last: number } | undefined;
}

export const DEFAULT_NODE_CONFIG: NodeConfig = {
  families: [4, 6],
  tunnelDevice: "sallyport",
  vni: 7799,
  port: 7799,
  rulePref: 5900,
  tableRange: { start: 3000, count: 100 },
  noSnatBySets: false,
  datapath: "iptables",
};

export interface LocalFacts {
  /** The interface and addresses that carry node-to-node traffic. */
  readonly underlay: {
    readonly device: string;
    readonly mtu: number;
    readonly ipv4?: string | undefined;
    readonly ipv6?: string | undefined;
  };
  /** Routing tables in use on this host by anything other than Sallyport. */
  readonly usedTables: ReadonlySet<number>;
  /** Tables Sallyport assigned earlier on this host (peer key → table), found in the kernel. */
  readonly existingTables: ReadonlyMap<string, number>;
  readonly random: () => number;
}

export interface NodeView {
  readonly node: string;
  readonly peers: ReadonlyMap<string, PeerView>;
  readonly policies: readonly PolicyView[];
  /** Canonical CIDRs of both families. */
  readonly ignoreCIDRs: readonly string[];
  readonly config: NodeConfig;
  readonly local: LocalFacts;
}

/**
 * Revision of a policy: a hash of everything any node's datapath depends on for it. The
 * controller writes it to the policy's status; an agent reports it as programmed once its
 * kernel holds what that revision describes.
 */
const revisions = new WeakMap<PolicyView, string>();

export function policyRevision(policy: PolicyView): string {
  let revision = revisions.get(policy);
  if (revision === undefined) {
    revision = computeRevision(policy);
    revisions.set(policy, revision);
  }
  return revision;
}

/**
 * The nodes whose datapath carries a policy: where its pods run, and the node holding its egress
 * IP. The controller waits for these to report the policy's revision; an agent reports it only
 * when it is one of them. One definition for both, so that "programmed" means one thing.
 */
export function policyTargets(policy: PolicyView): string[] {
  const target = new Set(policy.endpoints.map((e) => e.node));
  if (policy.gatewayNode !== undefined) target.add(policy.gatewayNode);
  return [...target].sort();
}

/**
 * What `node` reports for a policy once its kernel holds `policy`: the revision, when the node
 * is a target and the revision is the one the controller published (the same view). Undefined:
 * nothing to report.
 */
export function reportedRevision(
  policy: PolicyView,
  node: string,
  controllerRevision: string | undefined,
): string | undefined {
  if (controllerRevision === undefined) return undefined;
  if (policy.gatewayNode !== node && !policy.endpoints.some((e) => e.node === node))
    return undefined;
  const local = policyRevision(policy);
  return local === controllerRevision ? local : undefined;
}

/**
 * The same view with another standby list: the same revision (it does not count there), which the
 * copy inherits instead of hashing it again.
 */
export function withStandbyNodes(policy: PolicyView, standbyNodes: readonly string[]): PolicyView {
  const copy = { ...policy, standbyNodes };
  const revision = revisions.get(policy);
  if (revision !== undefined) revisions.set(copy, revision);
  return copy;
}

/**
 * The same view held by another node (or none): what every node programs when the data plane
 * judged the holder down, before the controller moves the policy (src/agent/liveness.ts).
 */
export function withGateway(policy: PolicyView, gatewayNode: string | undefined): PolicyView {
  return { ...policy, gatewayNode };
}

function computeRevision(policy: PolicyView): string {
  // One-shot hash of the two parts (the same digest as two updates of one hash object, at a third
  // of the cost: a lost gateway node rehashes every policy it held).
  const fields = JSON.stringify([
    policy.key,
    policy.priority,
    policy.createdAt,
    policy.destinationCIDRs,
    policy.excludedCIDRs,
    policy.ports.map((p) => [p.protocol ?? "TCP", p.port ?? 0, p.endPort ?? 0]),
    policy.gatewayNode ?? "",
    // (joined: a policy with one address per family hashes as before several were possible)
    [policy.snat[4]?.join(",") ?? "", policy.snat[6]?.join(",") ?? ""],
    [...policy.floating].sort(),
    policy.announceInterface ?? "",
    // Not standbyNodes nor gatewayNodes: see PolicyView. A policy without a tunnel class hashes as before.
    ...(policy.tunnelClass === undefined ? [] : [policy.tunnelClass]),
  ]);
  return hash("sha256", fields + endpointsDigest(policy.endpoints), "hex").slice(0, 16);
}

const endpointDigests = new WeakMap<readonly EndpointView[], string>();

/**
 * The endpoints' part of a revision, kept per endpoints list: a change that only moves a policy
 * to another gateway (a failover) does not hash its pods again.
 */
function endpointsDigest(list: readonly EndpointView[]): string {
  let digest = endpointDigests.get(list);
  if (digest !== undefined) return digest;
  // Endpoints in pod order, as one string: no copy of the list, one hash update.
  let endpoints = list;
  for (let i = 1; i < endpoints.length; i++) {
    if (endpoints[i - 1]!.pod > endpoints[i]!.pod) {
      endpoints = [...endpoints].sort((a, b) => (a.pod < b.pod ? -1 : 1));
      break;
    }
  }
  let text = "";
  for (const e of endpoints) {
    text += `\n${e.pod}\t${e.node}\t${e.ips.length === 1 ? e.ips[0] : [...e.ips].sort().join(",")}`;
  }
  digest = hash("sha256", text, "hex");
  endpointDigests.set(list, digest);
  return digest;
}
