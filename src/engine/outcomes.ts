/**
 * What the engine decided, per policy and per gateway, with the conditions that explain it: the
 * statuses the controller writes and the views agents program. Builders are pure; the `same*`
 * comparisons let the engine hand back the previous object when a rebuilt outcome says the same,
 * so that consumers find what changed by reference.
 */
import type { AnyPolicy, EgressGateway } from "../api/types.ts";
import { FAMILIES, type Family, familyOfText, formatAddress, parseAddress } from "../lib/ip.ts";
import { formatSelector } from "../lib/selector.ts";
import { type Pool, poolSize, type Shortfall } from "./allocation.ts";
import { sameItems } from "./equality.ts";
import type { PreparedPolicy } from "./policies.ts";
import type { NodeIdentity } from "./snapshot.ts";
import {
  type EndpointView,
  type PeerView,
  type PolicyView,
  policyRevision,
  withStandbyNodes,
} from "./view.ts";

export interface EngineCondition {
  readonly type: "Accepted" | "GatewayAssigned" | "Conflicted";
  readonly status: "True" | "False";
  readonly reason: string;
  readonly message: string;
}

export interface Shadow {
  readonly policy: string;
  readonly pods: number;
}

export interface PolicyOutcome {
  readonly key: string;
  readonly kind: "EgressPolicy" | "ClusterEgressPolicy";
  readonly namespace?: string | undefined;
  readonly name: string;
  readonly generation: number;
  readonly gateway: string;
  readonly accepted: boolean;
  readonly gatewayNode?: string | undefined;
  /** The nodes that take over when gatewayNode is lost, in order (PolicyView.standbyNodes). */
  readonly standbyNodes: readonly string[];
  /** Accepted policies: PolicyView.tunnelClass. */
  readonly tunnelClass?: number | undefined;
  /** The source addresses the outside sees: IPv4 first, each family in address order. */
  readonly egressIPs: readonly string[];
  readonly endpoints: readonly EndpointView[];
  readonly shadowedBy: readonly Shadow[];
  readonly conditions: readonly EngineCondition[];
  /** Present when accepted: what nodes program, and its revision. */
  readonly view?: PolicyView | undefined;
  readonly revision?: string | undefined;
  /** Nodes whose datapath carries rules of this policy. */
  readonly targetNodes: readonly string[];
}

export interface GatewayNodeOutcome {
  readonly name: string;
  readonly ready: boolean;
  readonly egressIPs: readonly string[];
  readonly policies: number;
}

export interface PoolUsage {
  readonly size: bigint;
  readonly allocated: number;
}

export interface GatewayOutcome {
  readonly name: string;
  readonly nodes: readonly GatewayNodeOutcome[];
  readonly pool: Readonly<Partial<Record<Family, PoolUsage>>>;
  readonly conditions: readonly EngineCondition[];
}

/**
 * The engine's result. Maps and outcome objects that did not change are the same objects as in
 * the previous result; iteration order is not meaningful.
 */
export interface ClusterOutcome {
  readonly families: readonly Family[];
  readonly identities: ReadonlyMap<string, NodeIdentity>;
  /** Nodes that could not get an identity, with the reason. */
  readonly identityErrors: ReadonlyMap<string, string>;
  readonly peers: ReadonlyMap<string, PeerView>;
  readonly policies: ReadonlyMap<string, PolicyOutcome>;
  readonly gateways: ReadonlyMap<string, GatewayOutcome>;
  readonly ignoreCIDRs: readonly string[];
}

export function cond(
  type: EngineCondition["type"],
  status: "True" | "False",
  reason: string,
  message: string,
): EngineCondition {
  return { type, status, reason, message };
}

export function rejectedOutcome(
  policy: AnyPolicy,
  key: string,
  condition: EngineCondition,
): PolicyOutcome {
  return {
    key,
    kind: policy.kind,
    namespace: policy.kind === "EgressPolicy" ? policy.metadata.namespace : undefined,
    name: policy.metadata.name ?? "",
    generation: policy.metadata.generation ?? 0,
    gateway: policy.spec.gateway,
    accepted: false,
    standbyNodes: [],
    egressIPs: [],
    endpoints: [],
    shadowedBy: [],
    conditions: [condition],
    targetNodes: [],
  };
}

/** Everything an accepted policy's outcome is made of. */
export interface AcceptedParts {
  readonly policy: PreparedPolicy;
  /** Floating addresses: explicit or from the pool (IPv4 first, in address order). */
  readonly addresses: readonly string[];
  /** Families of which the pool gave fewer addresses than spec.egressIPCount. */
  readonly short?: readonly Shortfall[] | undefined;
  /** The gateway whose nodes the policy's unit is placed on. */
  readonly gateway: EgressGateway;
  readonly node: string | undefined;
  /** The nodes that take over from `node`, in order. */
  readonly standbyNodes: readonly string[];
  readonly tunnelClass: number | undefined;
  /** The gateway node's InternalIPs (nodeIP mode). */
  readonly nodeAddresses: Readonly<Partial<Record<Family, string>>> | undefined;
  /** Addresses of the policy's interface on the gateway node (interface mode). */
  readonly interfaceAddresses: readonly string[] | undefined;
  readonly endpoints: readonly EndpointView[];
  /** Nodes of the endpoints, by name. */
  readonly endpointNodes: readonly string[];
  /** winner → pods */
  readonly shadows: ReadonlyMap<string, number>;
}

export function acceptedOutcome(x: AcceptedParts): PolicyOutcome {
  const p = x.policy;
  const node = x.node;
  const snat: Partial<Record<Family, readonly string[]>> = {};
  const floating: string[] = [];
  if (p.mode === "explicit" || p.mode === "pool") {
    // Already in address order, IPv4 first.
    for (const a of x.addresses) {
      const f = familyOfText(a)!;
      snat[f] = [...(snat[f] ?? []), a];
      floating.push(a);
    }
  } else if (node !== undefined && p.mode === "nodeIP") {
    for (const f of p.families) {
      const a = x.nodeAddresses?.[f];
      if (a !== undefined) snat[f] = [formatAddress(parseAddress(a))];
    }
  } else if (node !== undefined && p.mode === "interface") {
    const list = x.interfaceAddresses ?? [];
    for (const f of p.families) {
      const a = list.find((y) => familyOfText(y) === f);
      if (a !== undefined) snat[f] = [formatAddress(parseAddress(a))];
    }
  }
  floating.sort();
  const unserved = p.families.filter((f) => snat[f] === undefined);
  const notes: string[] = [];
  for (const s of x.short ?? []) {
    if (s.got === 0) continue;
    notes.push(
      `${s.got} of ${s.wanted} IPv${s.family} egress IPs: the pool of EgressGateway ${p.gateway} is exhausted (${s.usage}); the next address freed there goes to this policy`,
    );
  }
  if (p.mode === "nodeIP" && p.policy.spec.egressIPCount !== undefined)
    notes.push(
      `spec.egressIPCount has no effect: EgressGateway ${p.gateway} has no pool, so the gateway node's own address is used`,
    );
  if (unserved.length > 0 && (p.mode === "pool" || p.mode === "explicit"))
    notes.push(
      `IPv${unserved.join("/IPv")} traffic keeps its usual path: no egress IP of that family`,
    );
  const conditions: EngineCondition[] = [
    cond("Accepted", "True", "Accepted", ["Accepted", ...notes].join("; ")),
    node === undefined
      ? cond(
          "GatewayAssigned",
          "False",
          "NoReadyGatewayNode",
          `no node matching ${formatSelector(x.gateway.spec.nodeSelector)}${p.mode === "interface" ? ` with interface ${p.policy.spec.interface}` : ""} of EgressGateway ${x.gateway.metadata.name} has a live agent; matching traffic is dropped until one is ready`,
        )
      : cond(
          "GatewayAssigned",
          "True",
          "Assigned",
          `egress IP${floating.length > 1 ? "s" : ""} held by node ${node}`,
        ),
  ];

  const endpoints = x.endpoints;
  const shadowedBy: Shadow[] = [];
  for (const [policy, pods] of x.shadows) if (pods > 0) shadowedBy.push({ policy, pods });
  shadowedBy.sort((a, b) => b.pods - a.pods || (a.policy < b.policy ? -1 : 1));
  if (shadowedBy.length > 0) {
    const total = endpoints.length;
    const names = shadowedBy
      .slice(0, 3)
      .map((s) => `${s.policy} (${s.pods} of ${total} pods)`)
      .join(", ");
    conditions.push(
      cond(
        "Conflicted",
        "True",
        "ShadowedBy",
        `higher-precedence ${shadowedBy.length === 1 ? "policy" : "policies"} ${names}${shadowedBy.length > 3 ? ` and ${shadowedBy.length - 3} more` : ""} decide for shared pods and destinations; raise spec.priority to take them over`,
      ),
    );
  } else {
    conditions.push(
      cond("Conflicted", "False", "NoConflict", "no other policy takes over any of its pods"),
    );
  }

  const view: PolicyView = {
    key: p.key,
    priority: p.priority,
    createdAt: p.createdAt,
    destinationCIDRs: p.destinations,
    excludedCIDRs: p.excluded,
    ports: p.ports,
    gatewayNode: node,
    snat,
    floating,
    announceInterface: x.gateway.spec.interface,
    endpoints,
    standbyNodes: x.standbyNodes,
    ...(x.tunnelClass === undefined ? {} : { tunnelClass: x.tunnelClass }),
  };
  let targetNodes = x.endpointNodes;
  if (node !== undefined && !targetNodes.includes(node))
    targetNodes = [...targetNodes, node].sort();
  return {
    key: p.key,
    kind: p.policy.kind,
    namespace: p.namespace,
    name: p.policy.metadata.name ?? "",
    generation: p.policy.metadata.generation ?? 0,
    gateway: p.gateway,
    accepted: true,
    gatewayNode: node,
    standbyNodes: x.standbyNodes,
    ...(x.tunnelClass === undefined ? {} : { tunnelClass: x.tunnelClass }),
    egressIPs: FAMILIES.flatMap((f) => snat[f] ?? []),
    endpoints,
    shadowedBy: shadowedBy.slice(0, 16),
    conditions,
    view,
    revision: policyRevision(view),
    targetNodes,
  };
}

/**
 * An accepted outcome whose standby list alone changed (a node joined or left elsewhere in its
 * rendezvous order): the same outcome and revision, no rebuild.
 */
export function withStandby(
  outcome: PolicyOutcome,
  standbyNodes: readonly string[],
): PolicyOutcome {
  return {
    ...outcome,
    standbyNodes,
    view: outcome.view === undefined ? undefined : withStandbyNodes(outcome.view, standbyNodes),
  };
}

/**
 * Whether `b` is `a` with another standby list only (what `withStandby` makes): every other field
 * is the very same value. False when unsure.
 */
export function onlyStandbyDiffers(a: PolicyOutcome, b: PolicyOutcome): boolean {
  const differ = <T extends object>(x: T, y: T, skip: string) => {
    const keys = Object.keys(y) as (keyof T)[];
    if (keys.length !== Object.keys(x).length) return true;
    return keys.some((k) => k !== skip && k !== "view" && x[k] !== y[k]);
  };
  if (differ(a, b, "standbyNodes")) return false;
  if (a.view === b.view) return true;
  return a.view !== undefined && b.view !== undefined && !differ(a.view, b.view, "standbyNodes");
}

function sameConditions(a: readonly EngineCondition[], b: readonly EngineCondition[]): boolean {
  return (
    a.length === b.length &&
    a.every(
      (c, i) =>
        c.type === b[i]!.type &&
        c.status === b[i]!.status &&
        c.reason === b[i]!.reason &&
        c.message === b[i]!.message,
    )
  );
}

/**
 * Same content. The revision stands for the view (a hash of all of it, endpoints included), so
 * the view is compared through it.
 */
export function samePolicyOutcome(a: PolicyOutcome, b: PolicyOutcome): boolean {
  return (
    a.key === b.key &&
    a.kind === b.kind &&
    a.namespace === b.namespace &&
    a.name === b.name &&
    a.generation === b.generation &&
    a.gateway === b.gateway &&
    a.accepted === b.accepted &&
    a.gatewayNode === b.gatewayNode &&
    sameItems(a.standbyNodes, b.standbyNodes) &&
    a.revision === b.revision &&
    (a.view === undefined) === (b.view === undefined) &&
    a.endpoints.length === b.endpoints.length &&
    sameItems(a.egressIPs, b.egressIPs) &&
    sameItems(a.targetNodes, b.targetNodes) &&
    a.shadowedBy.length === b.shadowedBy.length &&
    a.shadowedBy.every(
      (s, i) => s.policy === b.shadowedBy[i]!.policy && s.pods === b.shadowedBy[i]!.pods,
    ) &&
    sameConditions(a.conditions, b.conditions)
  );
}

/** Whether a policy outcome changed in something its gateway's outcome shows. */
export function gatewaySeesChange(
  a: PolicyOutcome | undefined,
  b: PolicyOutcome | undefined,
): boolean {
  if (a === undefined || b === undefined) return a !== b;
  return (
    a.accepted !== b.accepted ||
    a.gateway !== b.gateway ||
    a.gatewayNode !== b.gatewayNode ||
    !sameItems(a.view?.floating ?? [], b.view?.floating ?? [])
  );
}

/**
 * What a gateway's outcome counts of its accepted policies (egress IPs per node, pool usage),
 * kept up to date policy by policy, so that a gateway of 10,000 policies is not recounted when a
 * few of them move.
 */
export class GatewayTally {
  /** address → accepted policies using it */
  readonly #allocated = new Map<string, number>();
  readonly #perFamily = { 4: 0, 6: 0 };
  readonly #nodes = new Map<
    string,
    { ips: Map<string, number>; policies: number; sorted: readonly string[] | undefined }
  >();

  /** Counts an accepted policy of this gateway in (1) or out (-1). */
  count(p: PolicyOutcome, sign: 1 | -1): void {
    const floating = p.view?.floating ?? [];
    for (const a of floating) {
      const n = (this.#allocated.get(a) ?? 0) + sign;
      if (n === 0) this.#allocated.delete(a);
      else this.#allocated.set(a, n);
      if (n === 0 || (n === 1 && sign === 1)) this.#perFamily[a.includes(":") ? 6 : 4] += sign;
    }
    if (p.gatewayNode === undefined) return;
    let entry = this.#nodes.get(p.gatewayNode);
    if (entry === undefined) {
      entry = { ips: new Map(), policies: 0, sorted: undefined };
      this.#nodes.set(p.gatewayNode, entry);
    }
    entry.policies += sign;
    entry.sorted = undefined;
    for (const a of floating) {
      const n = (entry.ips.get(a) ?? 0) + sign;
      if (n === 0) entry.ips.delete(a);
      else entry.ips.set(a, n);
    }
    if (entry.policies === 0) this.#nodes.delete(p.gatewayNode);
  }

  /** @param nodes the nodes the gateway's selector matches, by name */
  outcome(
    gateway: EgressGateway,
    pool: Pool,
    nodes: readonly string[],
    healthy: ReadonlySet<string>,
  ): GatewayOutcome {
    const usage: Partial<Record<Family, PoolUsage>> = {};
    for (const f of FAMILIES) {
      if (!pool.ranges.some((r) => r.family === f)) continue;
      usage[f] = { size: poolSize(pool, f), allocated: this.#perFamily[f] };
    }
    const nodeOutcomes = nodes.map((name) => {
      const entry = this.#nodes.get(name);
      if (entry !== undefined) entry.sorted ??= [...entry.ips.keys()].sort();
      return {
        name,
        ready: healthy.has(name),
        egressIPs: entry?.sorted ?? [],
        policies: entry?.policies ?? 0,
      };
    });
    const ready = nodeOutcomes.filter((n) => n.ready).length;
    const conditions: EngineCondition[] = [
      ready > 0
        ? cond(
            "GatewayAssigned",
            "True",
            "NodesReady",
            `${ready} of ${nodes.length} gateway nodes are ready`,
          )
        : cond(
            "GatewayAssigned",
            "False",
            nodes.length === 0 ? "NoMatchingNodes" : "NoReadyNodes",
            nodes.length === 0
              ? `no node matches ${formatSelector(gateway.spec.nodeSelector)}: label the nodes that should hold egress IPs`
              : `none of the ${nodes.length} matching nodes has a live agent`,
          ),
    ];
    return { name: gateway.metadata.name ?? "", nodes: nodeOutcomes, pool: usage, conditions };
  }
}

export function sameGatewayOutcome(a: GatewayOutcome, b: GatewayOutcome): boolean {
  const fam = (f: Family) =>
    a.pool[f]?.size === b.pool[f]?.size && a.pool[f]?.allocated === b.pool[f]?.allocated;
  return (
    a.name === b.name &&
    fam(4) &&
    fam(6) &&
    sameConditions(a.conditions, b.conditions) &&
    a.nodes.length === b.nodes.length &&
    a.nodes.every((n, i) => {
      const m = b.nodes[i]!;
      return (
        n.name === m.name &&
        n.ready === m.ready &&
        n.policies === m.policies &&
        sameItems(n.egressIPs, m.egressIPs)
      );
    })
  );
}
