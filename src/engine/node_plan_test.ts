/**
 * Per-node datapath: golden files of what each node's kernel receives, and packet traces that
 * read like a packet's journey. Address plan: see ./testing.ts.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, it } from "node:test";
import { renderPlan } from "../render/plan.ts";
import { assertGolden } from "../testing/golden.ts";
import { computeCluster } from "./cluster.ts";
import { nodeViewFromOutcome } from "./node_view.ts";
import { planNode } from "./node_plan.ts";
import type { Snapshot } from "./snapshot.ts";
import { gateway, localFacts, node, pod, policy, snapshot } from "./testing.ts";
import { tracePacket } from "./trace.ts";

const GOLDEN = join(import.meta.dirname, "testdata");
const OPTS = { rulePref: 5900, tunnelDevice: "sallyport" };

function planFor(s: Snapshot, name: string, underlay: { ipv4?: string; ipv6?: string }) {
  const outcome = computeCluster(s);
  return planNode(nodeViewFromOutcome(outcome, name, { local: localFacts(underlay) }));
}

/** Seed 000's example (src 172.29.234.173, dst 10.6.105.150) with seed 003's egress IP. */
const seed = snapshot({
  nodes: [
    node("node-1", { ipv4: "192.168.0.11", podCIDRs: ["172.29.234.0/24"] }),
    node("node-2", { ipv4: "192.168.0.12", labels: { egress: "true" }, podCIDRs: ["172.29.2.0/24"] }),
  ],
  pods: [
    pod("default", "mediabot", "node-1", ["172.29.234.173"], { org: "empire", class: "mediabot" }),
    pod("default", "other", "node-1", ["172.29.234.174"], { org: "rebels" }),
    pod("default", "gw-local", "node-2", ["172.29.2.9"], { org: "empire", class: "mediabot" }),
  ],
  gateways: [gateway("edge", { pool: ["10.168.60.100-10.168.60.110"] })],
  policies: [
    policy("default", "egress-sample", {
      podSelector: { matchLabels: { org: "empire", class: "mediabot" } },
      destinationCIDRs: ["10.6.105.150/32"],
      egressIP: ["10.168.60.100"],
    }),
  ],
  serviceCIDRs: ["10.96.0.0/16"],
});

describe("planNode() on seed 000's example", () => {
  const nonGateway = planFor(seed, "node-1", { ipv4: "192.168.0.11" });
  const gatewayNode = planFor(seed, "node-2", { ipv4: "192.168.0.12" });

  it("renders what the kernel of each node receives", () => {
    assertGolden(join(GOLDEN, "seed-node-1.golden"), renderPlan(nonGateway, OPTS));
    assertGolden(join(GOLDEN, "seed-node-2.golden"), renderPlan(gatewayNode, OPTS));
  });

  it("steers the selected pod's traffic on the non-gateway node into the tunnel to node-2", () => {
    const t = tracePacket(nonGateway, { src: "172.29.234.173", dst: "10.6.105.150", protocol: "tcp", dport: 80 });
    assert.equal(t.verdict, "tunnel");
    assert.equal(t.via, "100.127.0.2", "node-2 has node id 1: tunnel address base + 1 + 1");
    assert.equal(t.mark, 0x12000000, "the node mark is reset to the keep mark in mangle FORWARD");
    assert.equal(t.snat, undefined, "no SNAT before the tunnel");
    assert.ok(t.steps.some((s) => s.startsWith("nat/SALLYPORT-NO-SNAT")), "CNI masquerade is skipped");
  });

  it("leaves other destinations, other pods and pod-to-pod traffic on their usual path", () => {
    for (const packet of [
      { src: "172.29.234.173", dst: "8.8.8.8" },
      { src: "172.29.234.174", dst: "10.6.105.150" },
      { src: "172.29.234.173", dst: "172.29.2.9" },
    ]) {
      const t = tracePacket(nonGateway, { ...packet, protocol: "tcp" as const, dport: 80 });
      assert.equal(t.verdict, "usual", `${packet.src} → ${packet.dst}`);
      assert.equal(t.snat, undefined);
    }
  });

  it("keeps connections that were never steered on their path", () => {
    const t = tracePacket(nonGateway, {
      src: "172.29.234.173",
      dst: "10.6.105.150",
      ctstate: "ESTABLISHED",
      connmark: 0,
    });
    assert.equal(t.verdict, "usual");
  });

  it("SNATs to the egress IP on the gateway for traffic arriving through the tunnel", () => {
    const t = tracePacket(gatewayNode, {
      src: "172.29.234.173",
      dst: "10.6.105.150",
      inInterface: "sallyport",
    });
    assert.equal(t.verdict, "usual");
    assert.equal(t.snat, "10.168.60.100");
    assert.equal(t.connmark, 0x27000000, "the flow is remembered so that replies go back through the tunnel");
  });

  it("SNATs a selected pod on the gateway node itself", () => {
    const t = tracePacket(gatewayNode, { src: "172.29.2.9", dst: "10.6.105.150" });
    assert.equal(t.snat, "10.168.60.100");
  });

  it("sends replies back through the tunnel to the pod's node", () => {
    const t = tracePacket(gatewayNode, {
      src: "10.6.105.150",
      dst: "172.29.234.173",
      ctstate: "ESTABLISHED",
      ctdir: "REPLY",
      connmark: 0x27000000,
    });
    assert.equal(t.verdict, "tunnel");
    assert.equal(t.via, "100.127.0.1", "node-1's tunnel address");
  });

  it("drops new connections to the egress IP: it exposes no service of the node", () => {
    const t = tracePacket(gatewayNode, { src: "10.6.105.150", dst: "10.168.60.100", protocol: "tcp", dport: 22 });
    assert.equal(t.verdict, "drop");
  });

  it("holds the egress IP on the gateway only", () => {
    assert.deepEqual(
      gatewayNode.eips.map((e) => e.address),
      ["10.168.60.100"],
    );
    assert.deepEqual(nonGateway.eips, []);
  });

  it("drops tunnel traffic that no policy of the gateway claims instead of leaking it", () => {
    const t = tracePacket(gatewayNode, { src: "172.29.234.174", dst: "10.6.105.150", inInterface: "sallyport" });
    assert.equal(t.verdict, "drop");
  });
});
