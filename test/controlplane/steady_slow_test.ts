/**
 * A whole control plane at rest and under churn: the real kube-apiserver, the controller, and one
 * real agent per node whose kernel is the FakeKernel (src/kernel/fake_kernel.ts), so that every
 * command an agent sends is observed without root. Writes are counted by the API server itself
 * (apiserver_request_total), whoever sent them.
 *
 * Nodes: node-1 (workloads), node-2 and node-3 (egress=true), underlay 192.168.77.1N/24.
 * Gateway "edge": pool 192.168.77.100-110. Policies: web (pool), db (explicit egress IP), and a
 * ClusterEgressPolicy for every namespace labelled tier=batch.
 *
 * The five-minute test runs beside the rest of the suite (scripts/test.ts starts it in its own
 * process): it only waits.
 */

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import type { Agent } from "../../src/agent/agent.ts";
import { API_VERSION } from "../../src/api/types.ts";
import type { Controller } from "../../src/controller/controller.ts";
import { type FakeKernel, isWriteCommand } from "../../src/kernel/fake_kernel.ts";
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
const NODES = ["node-1", "node-2", "node-3"];
const STEADY_MS = Number(process.env.SALLYPORT_STEADY_MS ?? 300_000);
const PERIOD_MS = 1000;

const RESOURCES = [
  "egresspolicies",
  "clusteregresspolicies",
  "egressgateways",
  "egressnodes",
  "egressendpointslices",
  "egressclusterinfos",
] as const;

async function writesByResource(admin: KubeClient): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const r of RESOURCES) out[r] = await apiWrites(admin, "sallyport.dev", r);
  return out;
}

function delta(a: Record<string, number>, b: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of RESOURCES) if ((b[k] ?? 0) !== (a[k] ?? 0)) out[k] = (b[k] ?? 0) - (a[k] ?? 0);
  return out;
}

describe("a steady cluster: controller and agents on a real kube-apiserver", () => {
  let cp: ControlPlane;
  let admin: KubeClient;
  let controller: Controller;
  const agents = new Map<string, { agent: Agent; kernel: FakeKernel }>();

  const policyStatus = async (name: string) =>
    (await admin.get<WithStatus>(ours("EgressPolicy"), name, NS)).status;
  const allReady = async () => {
    const list = await admin.listAll<WithStatus>(ours("EgressPolicy"), { namespace: NS });
    const cluster = await admin.listAll<WithStatus>(ours("ClusterEgressPolicy"));
    return [...list.items, ...cluster.items].every(
      (p) => condition(p.status, "Ready")?.status === "True",
    );
  };

  before(async () => {
    cp = await ControlPlane.start({
      tag: "steady",
      users: { controller: ["sallyport:controllers"], agent: ["sallyport:agents"] },
    });
    admin = cp.client();
    await ensureNamespace(admin, NS);
    await ensureNamespace(admin, "batch", { tier: "batch" });
    for (const [i, name] of NODES.entries()) {
      await createNode(admin, name, {
        addresses: [`192.168.77.1${i + 1}`],
        podCIDRs: [`10.244.${i + 1}.0/24`],
        ...(i > 0 ? { labels: { egress: "true" } } : {}),
      });
    }
    await createGateway(admin, ["192.168.77.100-192.168.77.110"]);
    await createPod(admin, NS, "web-1", {
      node: "node-1",
      ips: ["10.244.1.5"],
      labels: { app: "web" },
    });
    await createPod(admin, NS, "db-1", {
      node: "node-2",
      ips: ["10.244.2.5"],
      labels: { app: "db" },
    });
    await createPod(admin, "batch", "job-1", { node: "node-3", ips: ["10.244.3.5"], labels: {} });
    for (const [name, spec] of [
      ["web", { podSelector: { matchLabels: { app: "web" } } }],
      ["db", { podSelector: { matchLabels: { app: "db" } }, egressIP: ["192.168.77.110"] }],
    ] as const) {
      await admin.create(ours("EgressPolicy"), {
        apiVersion: API_VERSION,
        kind: "EgressPolicy",
        metadata: { name, namespace: NS },
        spec: { gateway: "edge", destinationCIDRs: ["203.0.113.0/24"], ...spec },
      });
    }
    await admin.create(ours("ClusterEgressPolicy"), {
      apiVersion: API_VERSION,
      kind: "ClusterEgressPolicy",
      metadata: { name: "batch" },
      spec: {
        gateway: "edge",
        namespaceSelector: { matchLabels: { tier: "batch" } },
        podSelector: {},
        destinationCIDRs: ["198.51.100.0/24"],
      },
    });
    controller = startController(cp, "steady");
    for (const [i, node] of NODES.entries()) {
      const kernel = fakeNodeHost(`192.168.77.1${i + 1}`);
      const agent = await fakeHostAgent(cp, node, kernel, {
        periodMs: PERIOD_MS,
        // Heartbeats go nowhere here (the underlay addresses are the fake's); one port each.
        probePort: 17_800 + i,
      });
      agents.set(node, { agent, kernel });
      void agent.start();
    }
    const ready = await eventually(allReady, (ok) => ok, 60_000, 250);
    assert.ok(ready, "every policy becomes Ready: allocated, and programmed on its nodes");
  });

  after(async () => {
    for (const { agent } of agents.values()) await agent.stop();
    await controller?.stop();
    await cp?.stop();
  });

  it(`writes nothing to Sallyport objects while nothing changes (${STEADY_MS / 1000} s)`, async () => {
    // Let in-flight reports land, then count.
    await new Promise((r) => setTimeout(r, 3000));
    const before = await writesByResource(admin);
    await new Promise((r) => setTimeout(r, STEADY_MS));
    const after = await writesByResource(admin);
    assert.deepEqual(delta(before, after), {}, "writes per resource while nothing changed");
    assert.ok(await allReady(), "and everything is still Ready");
  });

  it("one pod added: one slice write, its policy's status, and the reports of the nodes it changed", async () => {
    const before = await writesByResource(admin);
    const kernelBefore = new Map([...agents].map(([n, a]) => [n, a.kernel.calls.length]));
    await createPod(admin, NS, "web-2", {
      node: "node-1",
      ips: ["10.244.1.6"],
      labels: { app: "web" },
    });
    const s = await eventually(
      () => policyStatus("web"),
      (x) => x?.matchedPods === 2 && condition(x, "Programmed")?.status === "True",
      20_000,
    );
    assert.equal(s?.matchedPods, 2);
    await new Promise((r) => setTimeout(r, 3000));
    const d = delta(before, await writesByResource(admin));
    if (process.env.SALLYPORT_DEBUG_WRITES) console.log(JSON.stringify(d));
    assert.equal(d.egressendpointslices, 1, `one slice write: ${JSON.stringify(d)}`);
    // The new revision with the new count (Programmed pending), then Programmed again.
    assert.ok((d.egresspolicies ?? 0) <= 2, `the policy's status: ${JSON.stringify(d)}`);
    // node-1 (the pod's node) and the gateway node hold the policy's new revision.
    assert.ok(
      (d.egressnodes ?? 0) <= 2,
      `the reports of the nodes that changed: ${JSON.stringify(d)}`,
    );
    assert.equal(d.egressgateways, undefined);
    assert.equal(d.clusteregresspolicies, undefined);
    assert.equal(d.egressclusterinfos, undefined);
    // The pod's node, the holder, and the gateway's other nodes (they carry the policy in
    // advance): the pod joins the policy's set there, and no rule is rewritten.
    const edge = await admin.get<KubeObject & { status?: { nodes?: { name: string }[] } }>(
      ours("EgressGateway"),
      "edge",
    );
    const gatewayNodes = (edge?.status?.nodes ?? []).map((n) => n.name);
    assert.ok(gatewayNodes.includes(s?.gatewayNode ?? ""), "the holder is a node of the gateway");
    for (const [node, { kernel }] of agents) {
      const writes = kernel.calls
        .slice(kernelBefore.get(node))
        .filter((c) => isWriteCommand(c.argv));
      if (node === "node-1" || gatewayNodes.includes(node))
        assert.ok(writes.length > 0, `${node} programs the new pod`);
      else assert.deepEqual(writes, [], `${node} carries nothing of it: no kernel write`);
      if (node !== "node-1")
        for (const w of writes)
          assert.deepEqual(w.argv, ["ipset", "restore", "-exist"], `${node}: a set, no rule`);
    }
  });

  it("another node's status and a policy's status cost an agent no planning and no kernel write", async () => {
    const { agent, kernel } = agents.get("node-1")!;
    await agent.sync.idle();
    const plans = agent.plans;
    const calls = kernel.calls.length;
    // What the other agents and the controller write all day long.
    // (lastSync: node-3's own agent would put any other field of its status back at once.)
    const lastSync = new Date(Date.now() + 86_400_000).toISOString();
    await admin.mergePatch(
      ours("EgressNode"),
      "node-3",
      { status: { lastSync } },
      { subresource: "status" },
    );
    // (The controller puts the count back at once: wait for the agent to have seen a new version.)
    const version = agent.policies.get(`${NS}/db`)?.metadata.resourceVersion;
    await admin.mergePatch(
      ours("EgressPolicy"),
      "db",
      { status: { matchedPods: 7 } },
      { namespace: NS, subresource: "status" },
    );
    const seen = await eventually(
      async () => agent.egressNodes.get("node-3")?.status?.lastSync,
      (t) => t === lastSync,
    );
    assert.equal(seen, lastSync, "node-1's agent saw the write");
    await eventually(
      async () => agent.policies.get(`${NS}/db`)?.metadata.resourceVersion,
      (v) => v !== version,
    );
    await agent.sync.idle();
    assert.equal(agent.plans, plans, "no planning for them (full syncs aside)");
    const writes = kernel.calls.slice(calls).filter((c) => isWriteCommand(c.argv));
    assert.deepEqual(writes, [], "no kernel write");
  });

  it("repairs drift on its own clock while a selected pod is relabelled every 100 ms", async () => {
    const { agent, kernel } = agents.get("node-1")!;
    const repairsBefore = agent.sync.repairs;
    let stop = false;
    let relabels = 0;
    const churn = (async () => {
      for (let i = 0; !stop && i < 200; i++) {
        await admin.mergePatch(
          CORE.pods,
          "web-1",
          { metadata: { labels: { app: "web", churn: String(i) } } },
          { namespace: NS },
        );
        relabels++;
        await new Promise((r) => setTimeout(r, 100));
      }
    })();
    try {
      await new Promise((r) => setTimeout(r, 500));
      kernel.seed(
        ["iptables-nft-restore", "--noflush"],
        "*mangle\n-F SALLYPORT-MARK-REQUEST\nCOMMIT\n",
      );
      const repaired = await eventually(
        async () => agent.sync.repairs,
        (n) => n > repairsBefore,
        10 * PERIOD_MS,
      );
      assert.ok(repaired > repairsBefore, "the flushed chain is put back");
      assert.ok(!stop && relabels < 200, "while the churn was still going on");
    } finally {
      stop = true;
      await churn;
    }
  });
});
