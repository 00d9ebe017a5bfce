/**
 * Statuses users read with `kubectl get`: built from the engine's outcome and the agents'
 * realization reports, written only when they change.
 *
 * Policy conditions:
 *   Accepted         the spec is valid, its gateway exists and serves the namespace, it has an
 *                    egress IP (reasons: InvalidSpec, GatewayNotFound, NamespaceNotAllowed,
 *                    EgressIPNotInPool, EgressIPInUse, PoolExhausted, NoPoolForFamily)
 *   GatewayAssigned  a live node holds the egress IP (NoReadyGatewayNode: traffic is dropped)
 *   Conflicted       higher-precedence policies take some of its pods and destinations
 *   Programmed       every node that must carry its rules reports the current revision
 *   Ready            Accepted, GatewayAssigned and Programmed
 *   SNATPortsSaturated  the gateway node reports that an egress IP of the policy uses 80 % or
 *                    more of its source ports toward a destination of the policy (reported by
 *                    the agent with hysteresis, src/agent/traffic.ts); present while the policy
 *                    has egress IPs. Informational: it does not change Ready.
 */
import type {
  Condition,
  EgressGatewayStatus,
  EgressPolicyStatus,
  SnatSaturationReport,
} from "../api/types.ts";
import type { EngineCondition, GatewayOutcome, PolicyOutcome } from "../engine/cluster.ts";
import { type PolicyView, policyTargets } from "../engine/view.ts";
import { deepEqual } from "../lib/equal.ts";
import { cidrContainsAddress, tryParseAddress, tryParseCidr } from "../lib/ip.ts";

type WantedCondition = Pick<Condition, "type" | "status" | "reason" | "message">;

/** Keeps lastTransitionTime of conditions whose status did not change. */
export function mergeConditions(
  existing: readonly Condition[] | undefined,
  wanted: readonly WantedCondition[],
  generation: number,
  now: string,
): Condition[] {
  return wanted.map((w) => {
    const prior = existing?.find((c) => c.type === w.type);
    return {
      type: w.type,
      status: w.status,
      reason: w.reason,
      message: w.message,
      lastTransitionTime:
        prior !== undefined && prior.status === w.status ? prior.lastTransitionTime : now,
      observedGeneration: generation,
    };
  });
}

export interface Realization {
  /** Nodes among `targets` that report `revision` for `key`. */
  programmedOn(key: string, revision: string, targets: readonly string[]): string[];
  /** What a node reports in EgressNode status.snatSaturation. */
  snatSaturation?(node: string): readonly SnatSaturationReport[] | undefined;
}

/** Whether the policy sends traffic to this destination, port and protocol through its egress IP. */
function policySends(view: PolicyView | undefined, s: SnatSaturationReport): boolean {
  if (view === undefined) return true;
  const address = tryParseAddress(s.destination);
  if (address === undefined) return false;
  const within = (cidrs: readonly string[]) =>
    cidrs.some((c) => {
      const cidr = tryParseCidr(c);
      return cidr !== undefined && cidrContainsAddress(cidr, address);
    });
  if (view.destinationCIDRs.length > 0 && !within(view.destinationCIDRs)) return false;
  if (within(view.excludedCIDRs)) return false;
  if (view.ports.length === 0) return true;
  return view.ports.some(
    (p) =>
      (p.protocol ?? "TCP").toLowerCase() === s.protocol &&
      (p.port === undefined || (s.port >= p.port && s.port <= (p.endPort ?? p.port))),
  );
}

/**
 * SNATPortsSaturated from the report of the node holding the policy's egress IPs: only its
 * entries for those egress IPs and for destinations the policy sends there count (a shared
 * egress IP's other policies may saturate destinations this one never reaches).
 */
export function snatSaturationCondition(
  outcome: PolicyOutcome,
  reported: readonly SnatSaturationReport[] | undefined,
): WantedCondition | undefined {
  if (outcome.egressIPs.length === 0 || outcome.gatewayNode === undefined) return undefined;
  const mine = (reported ?? []).filter(
    (s) => outcome.egressIPs.includes(s.egressIP) && policySends(outcome.view, s),
  );
  if (mine.length === 0)
    return {
      type: "SNATPortsSaturated",
      status: "False",
      reason: "SourcePortsAvailable",
      message: "no destination uses 80% or more of an egress IP's source ports",
    };
  const shown = mine
    .slice(0, 3)
    .map(
      (s) =>
        `egress IP ${s.egressIP} uses ${s.percent}% of its source ports toward ${s.destination}${s.port === 0 ? "" : `:${s.port}`}/${s.protocol}`,
    );
  return {
    type: "SNATPortsSaturated",
    status: "True",
    reason: "HighSourcePortUse",
    message: `${shown.join("; ")}${mine.length > 3 ? ` and ${mine.length - 3} more destinations` : ""} (reported by ${outcome.gatewayNode}): new connections to a destination fail when no port is left; reuse connections (keep-alive, pools) or spread the traffic over more egress IPs`,
  };
}

export function policyStatus(
  outcome: PolicyOutcome,
  current: EgressPolicyStatus | undefined,
  realization: Realization,
  now: string,
): EgressPolicyStatus {
  const wanted: WantedCondition[] = outcome.conditions.map((c: EngineCondition) => ({ ...c }));
  // One definition of the nodes that must report a policy, shared with the agents.
  const targets = outcome.view === undefined ? [] : policyTargets(outcome.view);
  const accepted = wanted.find((c) => c.type === "Accepted");
  let programmed: WantedCondition;
  let programmedNodes = 0;
  if (!outcome.accepted || outcome.revision === undefined) {
    programmed = {
      type: "Programmed",
      status: "False",
      reason: "NotAccepted",
      message: "not programmed: the policy is not accepted",
    };
  } else {
    const done = realization.programmedOn(outcome.key, outcome.revision, targets);
    programmedNodes = done.length;
    const waiting = targets.filter((n) => !done.includes(n));
    programmed =
      waiting.length === 0
        ? {
            type: "Programmed",
            status: "True",
            reason: "Programmed",
            message:
              targets.length === 0
                ? "no pod selected yet: nothing to program"
                : `programmed on all ${targets.length} nodes`,
          }
        : {
            type: "Programmed",
            status: "False",
            reason: "Pending",
            message: `programmed on ${done.length} of ${targets.length} nodes; waiting for ${waiting.slice(0, 5).join(", ")}${waiting.length > 5 ? ` and ${waiting.length - 5} more` : ""}`,
          };
  }
  wanted.push(programmed);
  const failing = [accepted, wanted.find((c) => c.type === "GatewayAssigned"), programmed].find(
    (c) => c !== undefined && c.status !== "True",
  );
  wanted.push(
    failing === undefined
      ? {
          type: "Ready",
          status: "True",
          reason: "Ready",
          message: `egress through ${outcome.egressIPs.join(", ")} on ${outcome.gatewayNode}`,
        }
      : { type: "Ready", status: "False", reason: failing.reason, message: failing.message },
  );
  const saturated = snatSaturationCondition(
    outcome,
    outcome.gatewayNode === undefined
      ? undefined
      : realization.snatSaturation?.(outcome.gatewayNode),
  );
  if (saturated !== undefined) wanted.push(saturated);
  const status: EgressPolicyStatus = {
    observedGeneration: outcome.generation,
    matchedPods: outcome.endpoints.length,
    programmedNodes,
    targetNodes: targets.length,
    programmed: `${programmedNodes}/${targets.length}`,
    conditions: mergeConditions(current?.conditions, wanted, outcome.generation, now),
  };
  if (outcome.gatewayNode !== undefined) status.gatewayNode = outcome.gatewayNode;
  if (outcome.standbyNodes.length > 0) status.standbyNodes = [...outcome.standbyNodes];
  if (outcome.tunnelClass !== undefined) status.tunnelClass = outcome.tunnelClass;
  if (outcome.egressIPs.length > 0) status.egressIPs = [...outcome.egressIPs];
  if (outcome.revision !== undefined) status.revision = outcome.revision;
  if (outcome.shadowedBy.length > 0) status.shadowedBy = outcome.shadowedBy.map((s) => ({ ...s }));
  return status;
}

/**
 * Whether `b` differs from `a` only in how many of the policy's nodes report its revision, with
 * some still waiting in both (Programmed Pending): progress people read, which no one acts on.
 */
export function onlyProgressDiffers(a: EgressPolicyStatus, b: EgressPolicyStatus): boolean {
  const pending = (s: EgressPolicyStatus) =>
    s.conditions?.find((c) => c.type === "Programmed")?.reason === "Pending";
  if (!pending(a) || !pending(b)) return false;
  // Ready, failing on Programmed, repeats its message.
  const strip = (s: EgressPolicyStatus): EgressPolicyStatus => ({
    ...s,
    programmedNodes: 0,
    programmed: "",
    conditions: (s.conditions ?? []).map((c) =>
      c.type === "Programmed" || c.type === "Ready" ? { ...c, message: "" } : c,
    ),
  });
  return deepEqual(strip(a), strip(b));
}

export function gatewayStatus(
  outcome: GatewayOutcome,
  current: EgressGatewayStatus | undefined,
  generation: number,
  now: string,
): EgressGatewayStatus {
  const ready = outcome.nodes.filter((n) => n.ready).length;
  const pool: NonNullable<EgressGatewayStatus["pool"]> = {};
  const usage: string[] = [];
  for (const f of [4, 6] as const) {
    const u = outcome.pool[f];
    if (u === undefined) continue;
    pool[f === 4 ? "ipv4" : "ipv6"] = { size: u.size.toString(), allocated: u.allocated };
    usage.push(`${u.allocated}/${u.size}`);
  }
  const status: EgressGatewayStatus = {
    observedGeneration: generation,
    readyNodes: ready,
    totalNodes: outcome.nodes.length,
    nodes: outcome.nodes.map((n) => ({
      name: n.name,
      ready: n.ready,
      egressIPs: [...n.egressIPs],
      policies: n.policies,
    })),
    conditions: mergeConditions(
      current?.conditions,
      outcome.conditions.map((c) => ({ ...c, type: "Ready" })),
      generation,
      now,
    ),
  };
  if (usage.length > 0) {
    status.pool = pool;
    status.poolUsage = usage.join(", ");
  }
  return status;
}
