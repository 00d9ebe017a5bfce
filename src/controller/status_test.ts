import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { computeCluster } from "../engine/cluster.ts";
import { gateway, node, pod, policy, snapshot } from "../engine/testing.ts";
import { onlyProgressDiffers, policyStatus } from "./status.ts";

const NOW = "2026-02-01T00:00:00Z";

/** A policy whose pods run on node-1 and node-3, held by gateway node-2: three nodes to report. */
function outcomeWith(pool: string) {
  const s = snapshot({
    nodes: [
      node("node-1", { ipv4: "192.168.0.11", podCIDRs: ["172.29.1.0/24"] }),
      node("node-2", { ipv4: "192.168.0.12", labels: { egress: "true" }, podCIDRs: [] }),
      node("node-3", { ipv4: "192.168.0.13", podCIDRs: ["172.29.3.0/24"] }),
    ],
    pods: [
      pod("team-a", "web-1", "node-1", ["172.29.1.5"], { app: "web" }),
      pod("team-a", "web-2", "node-3", ["172.29.3.5"], { app: "web" }),
    ],
    gateways: [gateway("edge", { pool: [pool] })],
    policies: [policy("team-a", "web", { podSelector: { matchLabels: { app: "web" } } })],
  });
  const o = computeCluster(s).policies.get("EgressPolicy/team-a/web");
  assert.ok(o?.accepted && o.revision !== undefined, "the policy is accepted");
  return o;
}

/** Its status while `done` of its nodes report its revision. */
function statusOn(o: ReturnType<typeof outcomeWith>, done: readonly string[]) {
  return policyStatus(
    o,
    undefined,
    { programmedOn: (_k, _r, targets) => targets.filter((n) => done.includes(n)) },
    NOW,
  );
}

describe("onlyProgressDiffers: the status writes the controller may hold back", () => {
  const o = outcomeWith("10.168.60.100-10.168.60.101");

  it("more nodes report the revision, some still wait: progress only", () => {
    const none = statusOn(o, []);
    const one = statusOn(o, ["node-1"]);
    assert.equal(none.programmed, "0/3");
    assert.equal(one.programmed, "1/3");
    assert.ok(onlyProgressDiffers(none, one));
    assert.ok(onlyProgressDiffers(one, statusOn(o, ["node-1", "node-2"])));
  });

  it("the last node reports: Programmed and Ready turn True, which is written at once", () => {
    const all = statusOn(o, ["node-1", "node-2", "node-3"]);
    assert.equal(all.programmed, "3/3");
    assert.ok(!onlyProgressDiffers(statusOn(o, ["node-1", "node-2"]), all));
    assert.ok(!onlyProgressDiffers(all, statusOn(o, ["node-1"])), "nor losing a node");
  });

  it("anything else that changed is no mere progress", () => {
    const other = outcomeWith("10.168.60.200-10.168.60.201");
    assert.notDeepEqual(other.egressIPs, o.egressIPs);
    assert.ok(!onlyProgressDiffers(statusOn(o, []), statusOn(other, ["node-1"])));
  });
});
