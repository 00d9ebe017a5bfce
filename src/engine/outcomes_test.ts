/** Outcomes and what a gateway counts of them. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { parseGatewayPool } from "./allocation.ts";
import { GatewayTally, type PolicyOutcome } from "./outcomes.ts";
import { gateway } from "./testing.ts";

function accepted(key: string, node: string | undefined, floating: string[]): PolicyOutcome {
  return {
    key,
    kind: "EgressPolicy",
    name: key,
    generation: 1,
    gateway: "edge",
    accepted: true,
    gatewayNode: node,
    standbyNodes: [],
    egressIPs: floating,
    endpoints: [],
    shadowedBy: [],
    conditions: [],
    view: {
      key,
      priority: 0,
      createdAt: "",
      destinationCIDRs: [],
      excludedCIDRs: [],
      ports: [],
      gatewayNode: node,
      snat: {},
      floating,
      endpoints: [],
    },
    targetNodes: [],
  };
}

describe("GatewayTally", () => {
  it("counts what a recount of the accepted policies counts, however they come and go", () => {
    const edge = gateway("edge", { pool: ["10.0.0.1-10.0.0.9", "fd00::1-fd00::9"] });
    const pool = parseGatewayPool(edge.spec.pool);
    const arbOutcome = fc.record({
      key: fc.constantFrom("a", "b", "c", "d"),
      node: fc.constantFrom(undefined, "n1", "n2", "n3"),
      floating: fc.subarray(["10.0.0.1", "10.0.0.2", "fd00::1"]),
      remove: fc.boolean(),
    });
    fc.assert(
      fc.property(fc.array(arbOutcome, { maxLength: 25 }), (steps) => {
        const tally = new GatewayTally();
        const current = new Map<string, PolicyOutcome>();
        for (const s of steps) {
          const before = current.get(s.key);
          if (before !== undefined) tally.count(before, -1);
          if (s.remove) current.delete(s.key);
          else {
            const after = accepted(s.key, s.node, s.floating);
            current.set(s.key, after);
            tally.count(after, 1);
          }
        }
        const nodes = ["n1", "n2", "n3"];
        const got = tally.outcome(edge, pool, nodes, new Set(["n1"]));
        const all = [...current.values()];
        const ips = (n: string) =>
          [
            ...new Set(all.filter((p) => p.gatewayNode === n).flatMap((p) => p.view!.floating)),
          ].sort();
        assert.deepEqual(
          got.nodes.map((n) => [n.name, n.ready, n.egressIPs, n.policies]),
          nodes.map((n) => [n, n === "n1", ips(n), all.filter((p) => p.gatewayNode === n).length]),
        );
        const allocated = new Set(all.flatMap((p) => p.view!.floating));
        assert.equal(got.pool[4]?.allocated, [...allocated].filter((a) => !a.includes(":")).length);
        assert.equal(got.pool[6]?.allocated, [...allocated].filter((a) => a.includes(":")).length);
        assert.equal(got.pool[4]?.size, 9n);
      }),
    );
  });

  it("says why a gateway has no ready node", () => {
    const edge = gateway("edge");
    const tally = new GatewayTally();
    const none = tally.outcome(edge, parseGatewayPool(undefined), [], new Set());
    assert.equal(none.conditions[0]?.reason, "NoMatchingNodes");
    assert.match(none.conditions[0]!.message, /no node matches egress=true: label the nodes/);
    const dead = tally.outcome(edge, parseGatewayPool(undefined), ["n1"], new Set());
    assert.equal(dead.conditions[0]?.reason, "NoReadyNodes");
  });
});
