/**
 * Policies and gateways as the engine uses them. A policy is validated and compiled once per
 * change of what the engine reads of it (`parsePolicy`); admitting it against its gateway and its
 * namespace (`admitPolicy`) is cheap, so a gateway change re-admits all of that gateway's
 * policies, and a re-admission that changes nothing returns the very same object, which tells the
 * later stages (allocation, placement, membership) that they have nothing to redo.
 */
import { type AnyPolicy, type EgressGateway, MAX_PRIORITY, type PortSpec } from "../api/types.ts";
import { validateObject } from "../api/validate.ts";
import {
  bits,
  cidrToRange,
  type Family,
  familyOfText,
  formatAddress,
  normalizeCidrList,
  parseAddress,
  parseCidr,
} from "../lib/ip.ts";
import { RangeSet } from "../lib/rangeset.ts";
import {
  type CompiledSelector,
  compileSelector,
  formatSelector,
  type LabelSelector,
  type Labels,
} from "../lib/selector.ts";
import { type Pool, parseGatewayPool } from "./allocation.ts";
import { readPartOfPolicy } from "./equality.ts";
import { cond, type EngineCondition } from "./outcomes.ts";
import type { Ranked } from "./precedence.ts";
import type { PolicySelection } from "./snapshot.ts";

/** Where a policy's egress IP comes from. */
export type Mode = "explicit" | "pool" | "nodeIP" | "interface";

export interface GatewayInfo {
  readonly object: EgressGateway;
  readonly name: string;
  readonly nodeSelector: LabelSelector;
  readonly namespaceSelector: CompiledSelector | undefined;
  readonly pool: Pool;
  readonly failback: boolean;
}

export function compileGateway(gateway: EgressGateway): GatewayInfo {
  return {
    object: gateway,
    name: gateway.metadata.name ?? "",
    nodeSelector: gateway.spec.nodeSelector,
    namespaceSelector:
      gateway.spec.namespaceSelector === undefined
        ? undefined
        : compileSelector(gateway.spec.namespaceSelector),
    pool: parseGatewayPool(gateway.spec.pool),
    failback: gateway.spec.failback === true,
  };
}

/** What depends on the policy object alone. */
export interface ParsedPolicy extends PolicySelection, Ranked {
  readonly policy: AnyPolicy;
  readonly gateway: string;
  readonly destinations: readonly string[];
  readonly excluded: readonly string[];
  readonly ports: readonly PortSpec[];
  /** spec.egressIP as written (for messages) and canonical. */
  readonly explicit: readonly { readonly text: string; readonly address: string }[];
  /** Pool addresses wanted per family (spec.egressIPCount, default 1). */
  readonly egressIPCount: number;
}

/** An admitted policy: it passed validation, its gateway exists and serves its namespace. */
export interface PreparedPolicy extends ParsedPolicy {
  readonly parsed: ParsedPolicy;
  readonly mode: Mode;
  /** Address families the policy steers (its destinations', or the cluster's). */
  readonly families: readonly Family[];
  /** Destination set minus exclusions, for overlap tests. */
  readonly reach: RangeSet;
  /** The cluster families it was admitted with; a change of them re-admits everything. */
  readonly clusterFamilies: readonly Family[];
}

/** Validates and compiles a policy; an invalid one is rejected with the fields to fix. */
export function parsePolicy(policy: AnyPolicy, key: string): ParsedPolicy | EngineCondition {
  const errors = validateObject(readPartOfPolicy(policy));
  if (errors.length > 0) {
    return cond(
      "Accepted",
      "False",
      "InvalidSpec",
      errors.map((e) => `${e.field}: ${e.message}`).join("; "),
    );
  }
  const spec = policy.spec;
  return {
    policy,
    key,
    priority: Math.min(MAX_PRIORITY, spec.priority ?? 0),
    createdAt: policy.metadata.creationTimestamp ?? "",
    namespace: policy.kind === "EgressPolicy" ? (policy.metadata.namespace ?? "") : undefined,
    podSelector: compileSelector(spec.podSelector),
    nodeSelector: spec.nodeSelector === undefined ? undefined : compileSelector(spec.nodeSelector),
    namespaceSelector:
      policy.kind === "ClusterEgressPolicy"
        ? compileSelector(policy.spec.namespaceSelector)
        : undefined,
    gateway: spec.gateway,
    destinations: normalizeCidrList(spec.destinationCIDRs ?? []),
    excluded: normalizeCidrList(spec.excludedCIDRs ?? []),
    ports: spec.ports ?? [],
    explicit: (spec.egressIP ?? []).map((text) => ({
      text,
      address: formatAddress(parseAddress(text)),
    })),
    egressIPCount: spec.egressIPCount ?? 1,
  };
}

export function isParsed(p: ParsedPolicy | EngineCondition): p is ParsedPolicy {
  return "key" in p;
}

export function isPrepared(p: PreparedPolicy | EngineCondition | undefined): p is PreparedPolicy {
  return p !== undefined && "key" in p;
}

function modeOf(policy: AnyPolicy, gateway: GatewayInfo): Mode {
  if (policy.spec.egressIP !== undefined) return "explicit";
  if (policy.spec.interface !== undefined) return "interface";
  if (policy.spec.useNodeIP === true) return "nodeIP";
  return (gateway.object.spec.pool ?? []).length > 0 ? "pool" : "nodeIP";
}

/**
 * Admits a parsed policy against its gateway and namespace. Returns `previous` itself when
 * nothing it was made of changed.
 */
export function admitPolicy(
  parsed: ParsedPolicy | EngineCondition,
  gateway: GatewayInfo | undefined,
  namespaceLabels: Labels | undefined,
  clusterFamilies: readonly Family[],
  previous: PreparedPolicy | EngineCondition | undefined,
): PreparedPolicy | EngineCondition {
  if (!isParsed(parsed)) return parsed;
  if (gateway === undefined) {
    return cond(
      "Accepted",
      "False",
      "GatewayNotFound",
      `EgressGateway ${parsed.gateway} does not exist: create it or fix spec.gateway`,
    );
  }
  if (
    parsed.namespace !== undefined &&
    gateway.namespaceSelector !== undefined &&
    !gateway.namespaceSelector.matches(namespaceLabels)
  ) {
    return cond(
      "Accepted",
      "False",
      "NamespaceNotAllowed",
      `EgressGateway ${parsed.gateway} only serves namespaces matching ${formatSelector(gateway.object.spec.namespaceSelector)}; namespace ${parsed.namespace} does not`,
    );
  }
  const mode = modeOf(parsed.policy, gateway);
  if (
    isPrepared(previous) &&
    previous.parsed === parsed &&
    previous.mode === mode &&
    previous.clusterFamilies === clusterFamilies
  ) {
    return previous;
  }
  return {
    ...parsed,
    parsed,
    mode,
    families:
      parsed.destinations.length === 0
        ? clusterFamilies
        : clusterFamilies.filter((f) => parsed.destinations.some((d) => familyOfText(d) === f)),
    reach: reachOf(parsed.destinations, parsed.excluded, clusterFamilies),
    clusterFamilies,
  };
}

function reachOf(
  destinations: readonly string[],
  excluded: readonly string[],
  families: readonly Family[],
): RangeSet {
  const set = new RangeSet();
  if (destinations.length === 0) {
    for (const family of families)
      set.add({ family, first: 0n, last: (1n << BigInt(bits(family))) - 1n });
  } else {
    for (const d of destinations) set.add(cidrToRange(parseCidr(d)));
  }
  for (const e of excluded) set.subtract(cidrToRange(parseCidr(e)));
  return set;
}

function portsOverlap(a: readonly PortSpec[], b: readonly PortSpec[]): boolean {
  if (a.length === 0 || b.length === 0) return true;
  for (const x of a) {
    for (const y of b) {
      if ((x.protocol ?? "TCP") !== (y.protocol ?? "TCP")) continue;
      const [x1, x2] = x.port === undefined ? [1, 65535] : [x.port, x.endPort ?? x.port];
      const [y1, y2] = y.port === undefined ? [1, 65535] : [y.port, y.endPort ?? y.port];
      if (x1 <= y2 && y1 <= x2) return true;
    }
  }
  return false;
}

/** Do two policies compete for some packet (a shared destination and port)? */
export function conflicts(a: PreparedPolicy, b: PreparedPolicy): boolean {
  return a.reach.intersects(b.reach) && portsOverlap(a.ports, b.ports);
}

/** Allocation order: oldest first, then by key. */
export function compareAge(
  a: { readonly createdAt: string; readonly key: string },
  b: { readonly createdAt: string; readonly key: string },
): number {
  if (a.createdAt !== b.createdAt) return a.createdAt < b.createdAt ? -1 : 1;
  return a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
}
