/**
 * SNAT port saturation from an agent's report to a policy condition and an Event, on a real
 * kube-apiserver with the real controller and the real agents of the two gateway nodes (their
 * kernel is the FakeKernel; what their traffic collector would report is handed to them as the
 * collector hands it, src/agent/traffic.ts).
 *
 * Nodes: node-1 (workloads, no agent), node-2 and node-3 (egress=true). Policies "web" (to
 * 203.0.113.0/24) and "other" (to 198.51.100.0/24) share the egress IP 192.168.77.100.
 */

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import type { Agent } from "../../src/agent/agent.ts";
import { API_VERSION, type EgressNode } from "../../src/api/types.ts";
import type { Controller } from "../../src/controller/controller.ts";
import { CORE, type KubeClient, type KubeObject, ours } from "../../src/kube/client.ts";
import { ControlPlane } from "../../src/sandbox/controlplane.ts";
import { fakeNodeHost } from "../../src/testing/fake_host.ts";
import {
  apiWrites,
  condition,
  createGateway,
  createNode,
  createPod,
  ensureNamespace,
  eventually,
  type WithStatus,
} from "../support/kube.ts";
import { fakeHostAgent, startController } from "../support/processes.ts";

const NS = "team-a";
const EIP = "192.168.77.100";
const SATURATED = {
  egressIP: EIP,
  destination: "203.0.113.7",
  port: 443,
  protocol: "tcp",
  percent: 85,
};

describe("SNAT port saturation: agent report → policy condition and Event", () => {
  let cp: ControlPlane;
  let admin: KubeClient;
  let controller: Controller;
  const agents = new Map<string, Agent>();

  const status = async (name: string) =>
    (await admin.get<WithStatus>(ours("EgressPolicy"), name, NS)).status;
  const saturation = async (name: string) => condition(await status(name), "SNATPortsSaturated");
  const events = async (name: string) =>
    (
      await admin.list<KubeObject & { reason: string; message: string; type: string }>(
        CORE.events,
        { namespace: NS, fieldSelector: `involvedObject.name=${name}` },
      )
    ).items.filter((e) => e.reason === "SNATPortsSaturated");
  const writes = async () => ({
    policies: await apiWrites(admin, "sallyport.dev", "egresspolicies"),
    nodes: await apiWrites(admin, "sallyport.dev", "egressnodes"),
  });

  /** The write counts once the first reports have landed: unchanged over three full passes. */
  const quiet = async () => {
    let last = await writes();
    for (let still = 0, i = 0; still < 3000 && i < 60; i++) {
      await new Promise((r) => setTimeout(r, 500));
      const now = await writes();
      still = now.policies === last.policies && now.nodes === last.nodes ? still + 500 : 0;
      last = now;
    }
    return last;
  };

  before(async () => {
    cp = await ControlPlane.start({
      tag: "saturation",
      users: { controller: ["sallyport:controllers"], agent: ["sallyport:agents"] },
    });
    admin = cp.client();
    await ensureNamespace(admin, NS);
    for (const [i, name] of ["node-1", "node-2", "node-3"].entries())
      await createNode(admin, name, {
        addresses: [`192.168.77.1${i + 1}`],
        podCIDRs: [`10.244.${i + 1}.0/24`],
        ...(i > 0 ? { labels: { egress: "true" } } : {}),
      });
    await createGateway(admin, ["192.168.77.100-192.168.77.110"]);
    await createPod(admin, NS, "web-1", {
      node: "node-1",
      ips: ["10.244.1.5"],
      labels: { app: "web" },
    });
    for (const [name, destination] of [
      ["web", "203.0.113.0/24"],
      ["other", "198.51.100.0/24"],
    ] as const)
      await admin.create(ours("EgressPolicy"), {
        apiVersion: API_VERSION,
        kind: "EgressPolicy",
        metadata: { name, namespace: NS },
        spec: {
          gateway: "edge",
          podSelector: { matchLabels: { app: "web" } },
          destinationCIDRs: [destination],
          egressIP: [EIP],
        },
      });
    // A full pass every second: the Event must still be recorded once.
    controller = startController(cp, "saturation", { periodMs: 1000 });
    for (const [i, node] of ["node-2", "node-3"].entries()) {
      const agent = await fakeHostAgent(cp, node, fakeNodeHost(`192.168.77.1${i + 2}`), {
        periodMs: 1000,
        probePort: 17_900 + i,
      });
      agents.set(node, agent);
      void agent.start();
    }
    for (const name of ["web", "other"]) {
      const c = await eventually(
        () => saturation(name),
        (x) => x !== undefined,
        30_000,
        250,
      );
      assert.equal(c?.status, "False", `${name} starts with source ports to spare`);
    }
  });

  after(async () => {
    for (const agent of agents.values()) await agent.stop();
    await controller?.stop();
    await cp?.stop();
  });

  it("sets SNATPortsSaturated on the policies that send to the destination, with one Warning Event", async () => {
    const gateway = (await status("web"))?.gatewayNode;
    assert.ok(gateway === "node-2" || gateway === "node-3");
    const before = await quiet();
    agents.get(gateway!)!.setSnatSaturation([SATURATED]);
    const c = await eventually(
      () => saturation("web"),
      (x) => x?.status === "True",
      15_000,
    );
    assert.equal(c?.reason, "HighSourcePortUse");
    assert.match(
      c?.message ?? "",
      new RegExp(
        `^egress IP ${EIP} uses 85% of its source ports toward 203\\.0\\.113\\.7:443/tcp \\(reported by ${gateway}\\): .*spread the traffic over more egress IPs$`,
      ),
    );
    const node = await admin.get<EgressNode & KubeObject>(ours("EgressNode"), gateway!);
    assert.deepEqual(node.status?.snatSaturation, [SATURATED]);
    // Several full passes later: still one Event, and "other" (which never sends there) unaffected.
    await new Promise((r) => setTimeout(r, 3500));
    const warned = await events("web");
    assert.equal(warned.length, 1, JSON.stringify(warned));
    assert.equal(warned[0]?.type, "Warning");
    assert.equal(warned[0]?.message, c?.message);
    assert.equal((await saturation("other"))?.status, "False");
    assert.deepEqual(await events("other"), []);
    const after = await writes();
    assert.deepEqual(
      { policies: after.policies - before.policies, nodes: after.nodes - before.nodes },
      { policies: 1, nodes: 1 },
      "one report, one policy status",
    );
  });

  it("writes nothing while the list stays the same", async () => {
    const gateway = (await status("web"))!.gatewayNode!;
    const before = await quiet();
    for (let i = 0; i < 5; i++) agents.get(gateway)!.setSnatSaturation([{ ...SATURATED }]);
    await new Promise((r) => setTimeout(r, 3000));
    assert.deepEqual(await writes(), before);
  });

  it("clears the condition when the report clears, without another Event", async () => {
    const gateway = (await status("web"))!.gatewayNode!;
    agents.get(gateway)!.setSnatSaturation([]);
    const c = await eventually(
      () => saturation("web"),
      (x) => x?.status === "False",
      15_000,
    );
    assert.equal(c?.reason, "SourcePortsAvailable");
    const node = await admin.get<EgressNode & KubeObject>(ours("EgressNode"), gateway);
    assert.equal(node.status?.snatSaturation, undefined);
    assert.equal((await events("web")).length, 1);
  });
});
