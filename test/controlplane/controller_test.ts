/**
 * The controller against a real kube-apiserver. Gateway agents are stood in for by the real
 * lease renewer (the agent's own code) so that failure detection can be exercised without
 * kernels; the datapath side is tested in test/controlplane/agent_test.ts and the sandbox.
 *
 * Nodes: node-1 (workloads), node-2 and node-3 (egress=true). Gateway "edge" pool: two IPv4
 * addresses, 192.168.77.100-101.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { API_VERSION } from "../../src/api/types.ts";
import { Controller } from "../../src/controller/controller.ts";
import { CORE, type KubeClient, type KubeObject, ours } from "../../src/kube/client.ts";
import type { NodeLeaseRenewer } from "../../src/kube/node_lease.ts";
import { Reflector } from "../../src/kube/reflector.ts";
import { realClock } from "../../src/lib/clock.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { controllerMetrics, Registry } from "../../src/lib/metrics.ts";
import { ControlPlane, SALLYPORT_NAMESPACE } from "../../src/sandbox/controlplane.ts";
import {
  condition,
  createGateway,
  createNode,
  createPod,
  ensureNamespace,
  eventually,
  renewNodeLeases,
  type Status,
  type WithStatus,
} from "../support/kube.ts";

const NS = "team-a";
const TIMING = { renewMs: 200, durationMs: 1000, graceMs: 250 };

function policyObject(name: string, spec: Record<string, unknown>): KubeObject {
  return {
    apiVersion: API_VERSION,
    kind: "EgressPolicy",
    metadata: { name, namespace: NS },
    spec: {
      podSelector: { matchLabels: { app: "web" } },
      gateway: "edge",
      destinationCIDRs: ["203.0.113.0/24"],
      ...spec,
    },
  };
}

describe("controller on a real kube-apiserver", () => {
  let cp: ControlPlane;
  let admin: KubeClient;
  let controller: Controller;
  let renewers = new Map<string, NodeLeaseRenewer>();
  const registry = new Registry();

  const status = async (name: string) =>
    (await admin.get<WithStatus>(ours("EgressPolicy"), name, NS)).status;
  const waitStatus = (name: string, ok: (s: Status | undefined) => boolean, ms = 15_000) =>
    eventually(() => status(name), ok, ms);

  function startController(): Controller {
    const c = new Controller({
      client: cp.client("controller"),
      namespace: SALLYPORT_NAMESPACE,
      identity: "controller-test",
      clock: realClock,
      log: silentLogger,
      cluster: { tunnelCIDRs: { 4: "100.127.0.0/16" }, extraIgnoreCIDRs: [] },
      leaseTiming: TIMING,
      leaderElection: { leaseDurationMs: 3000, renewDeadlineMs: 2000, retryPeriodMs: 500 },
      progressSettleMs: 2000,
      metrics: controllerMetrics(registry),
    });
    void c.start();
    return c;
  }

  before(async () => {
    cp = await ControlPlane.start({
      tag: "controller",
      users: { controller: ["sallyport:controllers"], agent: ["sallyport:agents"] },
    });
    admin = cp.client();
    await ensureNamespace(admin, NS);
    await createNode(admin, "node-1", {
      addresses: ["192.168.77.11"],
      podCIDRs: ["10.244.1.0/24"],
    });
    await createNode(admin, "node-2", {
      addresses: ["192.168.77.12"],
      podCIDRs: ["10.244.2.0/24"],
      labels: { egress: "true" },
    });
    await createNode(admin, "node-3", {
      addresses: ["192.168.77.13"],
      podCIDRs: ["10.244.3.0/24"],
      labels: { egress: "true" },
    });
    await createPod(admin, NS, "web-1", {
      node: "node-1",
      ips: ["10.244.1.5"],
      labels: { app: "web" },
    });
    await createPod(admin, NS, "web-2", {
      node: "node-1",
      ips: ["10.244.1.6"],
      labels: { app: "web" },
    });
    await createGateway(admin, ["192.168.77.100-192.168.77.101"]);
    renewers = renewNodeLeases(cp.client("agent"), ["node-2", "node-3"], TIMING);
    controller = startController();
  });

  after(async () => {
    for (const r of renewers.values()) r.stop();
    await controller?.stop();
    await cp?.stop();
  });

  it("gives each node an identity the agents can read", async () => {
    const nodes = await eventually(
      () =>
        admin.listAll<
          KubeObject & {
            spec: { nodeID: number; mark: string; gatewayCapable?: boolean; podCIDRs?: string[] };
          }
        >(ours("EgressNode")),
      (l) => l.items.length === 3,
    );
    const byName = new Map(nodes.items.map((n) => [n.metadata.name, n.spec]));
    assert.deepEqual([...byName.values()].map((s) => s.nodeID).sort(), [0, 1, 2]);
    assert.equal(byName.get("node-2")?.mark, "0x26000100");
    assert.equal(byName.get("node-2")?.gatewayCapable, true);
    assert.equal(byName.get("node-1")?.gatewayCapable, false);
    assert.deepEqual(byName.get("node-1")?.podCIDRs, ["10.244.1.0/24"]);
  });

  it("allocates an egress IP and a gateway node and says so in the status", async () => {
    await admin.create(ours("EgressPolicy"), policyObject("web", {}));
    const s = await waitStatus("web", (x) => x?.gatewayNode !== undefined && x.matchedPods === 2);
    assert.deepEqual(s?.egressIPs, ["192.168.77.100"]);
    assert.ok(s?.gatewayNode === "node-2" || s?.gatewayNode === "node-3");
    assert.equal(condition(s, "Accepted")?.status, "True");
    assert.equal(condition(s, "GatewayAssigned")?.status, "True");
    assert.equal(s?.matchedPods, 2);
    assert.equal(condition(s, "Programmed")?.reason, "Pending", "no agent reported it yet");
    assert.match(condition(s, "Programmed")?.message ?? "", /programmed on 0 of 2 nodes/);
    const slices = await admin.listAll<
      KubeObject & { policy: string; endpoints: { pod: string }[] }
    >(ours("EgressEndpointSlice"));
    assert.deepEqual(slices.items.flatMap((x) => x.endpoints.map((e) => e.pod)).sort(), [
      `${NS}/web-1`,
      `${NS}/web-2`,
    ]);
  });

  it("counts the nodes that report the policy's revision, and turns Ready once all of them do", async () => {
    const published = await status("web");
    const report = (node: string) =>
      admin.mergePatch(
        ours("EgressNode"),
        node,
        { status: { programmed: { [`EgressPolicy/${NS}/web`]: published?.revision } } },
        { subresource: "status" },
      );
    await report("node-1");
    // Progress alone is written after a wait (progressSettleMs), but it is written.
    const one = await waitStatus("web", (x) => x?.programmed === "1/2");
    assert.equal(condition(one, "Programmed")?.reason, "Pending");
    assert.match(
      condition(one, "Programmed")?.message ?? "",
      new RegExp(`programmed on 1 of 2 nodes; waiting for ${published?.gatewayNode}`),
    );
    await report(published?.gatewayNode ?? "");
    const all = await waitStatus("web", (x) => condition(x, "Ready")?.status === "True");
    assert.equal(all?.programmed, "2/2");
    assert.equal(condition(all, "Programmed")?.message, "programmed on all 2 nodes");
  });

  it("publishes the cluster's own CIDRs for the ignore set", async () => {
    const info = await eventually(
      () =>
        admin.get<KubeObject & { status?: { ignoredCIDRs?: string[] } }>(
          ours("EgressClusterInfo"),
          "default",
        ),
      (i) => (i.status?.ignoredCIDRs ?? []).length > 0,
    );
    const ignored = info.status?.ignoredCIDRs ?? [];
    for (const c of ["10.96.0.0/16", "10.244.1.0/24", "192.168.77.11/32", "100.127.0.0/16"]) {
      assert.ok(
        ignored.some((x) => x === c || (c.startsWith("10.244") && x.startsWith("10.244"))),
        `${c} in ${ignored}`,
      );
    }
  });

  it("reports an exhausted pool as a condition and an Event, not a crash", async () => {
    await admin.create(ours("EgressPolicy"), policyObject("second", {}));
    await admin.create(ours("EgressPolicy"), policyObject("third", {}));
    const third = await waitStatus(
      "third",
      (x) => condition(x, "Accepted")?.reason === "PoolExhausted",
    );
    assert.match(
      condition(third, "Accepted")?.message ?? "",
      /pool of EgressGateway edge is exhausted \(IPv4 2\/2 in use\)/,
    );
    assert.equal(condition(third, "Ready")?.status, "False");
    const events = await eventually(
      () =>
        admin.list<KubeObject & { reason: string; message: string }>(CORE.events, {
          namespace: NS,
          fieldSelector: "involvedObject.name=third",
        }),
      (l) => l.items.some((e) => e.reason === "PoolExhausted"),
    );
    assert.ok(
      events.items.some((e) => e.reason === "PoolExhausted"),
      "a Warning Event explains it",
    );
  });

  it("frees the egress IP of a deleted policy for the next one", async () => {
    const second = await status("second");
    await admin.delete(ours("EgressPolicy"), "second", NS);
    const third = await waitStatus("third", (x) => condition(x, "Accepted")?.status === "True");
    assert.deepEqual(third?.egressIPs, second?.egressIPs, "the freed address");
  });

  it("moves egress IPs off a gateway whose agent stopped renewing, and back nowhere when it returns", async () => {
    const before = await status("web");
    const victim = before!.gatewayNode!;
    const survivor = victim === "node-2" ? "node-3" : "node-2";
    const started = Date.now();
    renewers.get(victim)!.stop();
    const moved = await waitStatus("web", (x) => x?.gatewayNode === survivor, 10_000);
    const elapsed = Date.now() - started;
    assert.equal(moved?.gatewayNode, survivor);
    assert.deepEqual(moved?.egressIPs, before?.egressIPs, "same egress IP");
    console.log(`# failover decided in ${elapsed} ms after the lease stopped`);
    const events = await eventually(
      () =>
        admin.list<KubeObject & { reason: string; message: string }>(CORE.events, {
          namespace: NS,
          fieldSelector: "involvedObject.name=web",
        }),
      (l) => l.items.some((e) => e.reason === "EgressIPMoved"),
    );
    assert.match(
      events.items.find((e) => e.reason === "EgressIPMoved")?.message ?? "",
      new RegExp(`moved from ${victim} to ${survivor}: ${victim} is not alive`),
    );
    const moves = await registry.getSingleMetric("sallyport_egress_ip_moves_total")?.get();
    assert.ok(
      moves?.values.some((v) => v.labels.reason === "node_not_alive" && v.value >= 1),
      `the move is counted: ${JSON.stringify(moves?.values)}`,
    );
    renewers.get(victim)!.start({ create: true });
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal((await status("web"))?.gatewayNode, survivor, "no failback by default");
  });

  it("counts a watch from when the server answers it: a quiet resource is watched before its first event", async () => {
    // The node lease tracker judges no node dead for time it did not watch; counting from the
    // first event after a reconnection moved a lost gateway a renewal period (10 s) late.
    const quiet = new Reflector<KubeObject>({
      client: admin,
      resource: CORE.leases,
      namespace: SALLYPORT_NAMESPACE,
      labelSelector: "sallyport.dev/quiet=true",
      clock: realClock,
      log: silentLogger,
    });
    quiet.start();
    try {
      await quiet.synced;
      const since = await eventually(
        async () => quiet.connectedAt,
        (t) => Number.isFinite(t),
        5000,
      );
      assert.ok(Number.isFinite(since), "watching, though no event came");
    } finally {
      quiet.stop();
    }
  });

  it("recovers from an API server restart and misses no change made meanwhile", async () => {
    await cp.stopApiServer();
    await new Promise((r) => setTimeout(r, 1000));
    await cp.startApiServer();
    // Right after the restart, while the controller's watches are still reconnecting.
    await admin.create(ours("EgressPolicy"), policyObject("after-restart", { useNodeIP: true }));
    await createPod(admin, NS, "web-3", {
      node: "node-1",
      ips: ["10.244.1.7"],
      labels: { app: "web" },
    });
    const s = await waitStatus(
      "after-restart",
      (x) => x?.gatewayNode !== undefined && x.matchedPods === 3,
      30_000,
    );
    assert.equal(s?.matchedPods, 3);
    assert.ok(s?.egressIPs?.[0]?.startsWith("192.168.77.1"), "the gateway node's own address");
    const web = await waitStatus("web", (x) => x?.matchedPods === 3, 15_000);
    assert.equal(web?.matchedPods, 3);
  });

  it("publishes a policy's standby nodes in advance, and moves a lost holder's egress IP to the first of them", async () => {
    await createNode(admin, "node-4", {
      addresses: ["192.168.77.14"],
      podCIDRs: ["10.244.4.0/24"],
      labels: { egress: "true" },
    });
    for (const [n, r] of renewNodeLeases(cp.client("agent"), ["node-4"], TIMING))
      renewers.set(n, r);
    // Three live gateway nodes: the holder and two standby nodes, in the order they take over.
    const before = await waitStatus("web", (x) => x?.standbyNodes?.length === 2, 15_000);
    const holder = before!.gatewayNode!;
    const [first, second] = before!.standbyNodes!;
    assert.ok(
      holder !== first && holder !== second && first !== second,
      `${holder}: ${first}, ${second}`,
    );
    renewers.get(holder)!.stop();
    const moved = await waitStatus(
      "web",
      (x) => x?.gatewayNode !== undefined && x.gatewayNode !== holder,
      10_000,
    );
    assert.equal(moved?.gatewayNode, first, "the first published standby takes over");
    assert.deepEqual(moved?.egressIPs, before?.egressIPs, "same egress IP");
    // The list follows (a second after the move): the dead holder is no standby.
    const after = await waitStatus("web", (x) => x?.standbyNodes?.join() === second, 10_000);
    assert.deepEqual(after?.standbyNodes, [second]);
    renewers.get(holder)!.start({ create: true });
    const back = await waitStatus("web", (x) => x?.standbyNodes?.length === 2, 10_000);
    assert.equal(back?.gatewayNode, first, "no failback by default");
    assert.ok(back?.standbyNodes?.includes(holder), "the node that came back is a standby again");
  });
});
