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
 */
import type { Condition, EgressGatewayStatus, EgressPolicyStatus } from "../api/types.ts";
import type { EngineCondition, GatewayOutcome, PolicyOutcome } from "../engine/cluster.ts";
import { policyTargets } from "../engine/view.ts";

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
  const status: EgressPolicyStatus = {
    observedGeneration: outcome.generation,
    matchedPods: outcome.endpoints.length,
    programmedNodes,
    targetNodes: targets.length,
    programmed: `${programmedNodes}/${targets.length}`,
    conditions: mergeConditions(current?.conditions, wanted, outcome.generation, now),
  };
  if (outcome.gatewayNode !== undefined) status.gatewayNode = outcome.gatewayNode;
  if (outcome.egressIPs.length > 0) status.egressIPs = [...outcome.egressIPs];
  if (outcome.revision !== undefined) status.revision = outcome.revision;
  if (outcome.shadowedBy.length > 0) status.shadowedBy = outcome.shadowedBy.map((s) => ({ ...s }));
  return status;
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
