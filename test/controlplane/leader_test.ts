/**
 * Two controller processes (a Deployment with two replicas) against a real kube-apiserver: the
 * leader is killed without a chance to release its lease, the other takes over once the lease
 * expires by its own observation, and every allocation stays where it was.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { openSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { API_VERSION } from "../../src/api/types.ts";
import { CORE, type KubeClient, type KubeObject, ours } from "../../src/kube/client.ts";
import type { Lease } from "../../src/kube/lease.ts";
import type { NodeLeaseRenewer } from "../../src/kube/node_lease.ts";
import { ControlPlane, SALLYPORT_NAMESPACE } from "../../src/sandbox/controlplane.ts";
import {
  createGateway,
  createNode,
  createPod,
  ensureNamespace,
  eventually,
  renewNodeLeases,
  type WithStatus,
} from "../support/kube.ts";
import { REPO } from "../support/lab.ts";

const TIMING = { renewMs: 200, durationMs: 1000, graceMs: 250 };

describe("two controller processes", () => {
  let cp: ControlPlane;
  let admin: KubeClient;
  let renewers = new Map<string, NodeLeaseRenewer>();
  const controllers = new Map<string, ChildProcess>();

  function startController(identity: string): void {
    const log = openSync(join(cp.dir, `${identity}.log`), "a");
    const child = spawn(
      process.execPath,
      [
        join(REPO, "src", "cli", "main.ts"),
        "controller",
        "--kubeconfig",
        cp.kubeconfig("controller"),
        "--identity",
        identity,
        "--metrics-port",
        "0",
        "--bind-address",
        "127.0.0.1",
        "--leader-lease-ms",
        "3000",
        "--leader-renew-deadline-ms",
        "2000",
        "--leader-retry-ms",
        "500",
        "--lease-renew-ms",
        String(TIMING.renewMs),
        "--lease-duration-ms",
        String(TIMING.durationMs),
        "--lease-grace-ms",
        String(TIMING.graceMs),
      ],
      { stdio: ["ignore", log, log] },
    );
    controllers.set(identity, child);
  }

  const holder = async () =>
    (await admin.get<Lease>(CORE.leases, "sallyport-controller", SALLYPORT_NAMESPACE)).spec
      .holderIdentity;
  const statuses = async () =>
    (await admin.listAll<WithStatus>(ours("EgressPolicy"), { namespace: "team-a" })).items.map(
      (p) => ({
        name: p.metadata.name,
        ips: p.status?.egressIPs,
        node: p.status?.gatewayNode,
      }),
    );

  before(async () => {
    cp = await ControlPlane.start({
      tag: "leader",
      users: { controller: ["sallyport:controllers"], agent: ["sallyport:agents"] },
    });
    admin = cp.client();
    await ensureNamespace(admin, "team-a");
    await createNode(admin, "node-1", { addresses: ["192.168.77.11"] });
    await createNode(admin, "node-2", { addresses: ["192.168.77.12"], labels: { egress: "true" } });
    await createNode(admin, "node-3", { addresses: ["192.168.77.13"], labels: { egress: "true" } });
    await createPod(admin, "team-a", "web-1", {
      node: "node-1",
      ips: ["10.244.1.5"],
      labels: { app: "web" },
    });
    await createGateway(admin, ["192.168.77.100-192.168.77.110"]);
    for (const n of ["a", "b", "c"]) {
      await admin.create(ours("EgressPolicy"), {
        apiVersion: API_VERSION,
        kind: "EgressPolicy",
        metadata: { name: n, namespace: "team-a" },
        spec: {
          podSelector: { matchLabels: { app: "web" } },
          gateway: "edge",
          destinationCIDRs: [`203.0.113.${n.charCodeAt(0)}/32`],
        },
      } as KubeObject);
    }
    renewers = renewNodeLeases(cp.client("agent"), ["node-2", "node-3"], TIMING);
    startController("replica-1");
    startController("replica-2");
  });

  after(async () => {
    for (const r of renewers.values()) r.stop();
    for (const c of controllers.values()) c.kill("SIGKILL");
    await cp?.stop();
  });

  it("one replica leads and allocates", async () => {
    const s = await eventually(
      statuses,
      (l) => l.every((p) => p.node !== undefined && p.ips !== undefined),
      30_000,
    );
    assert.ok(
      s.every((p) => p.node !== undefined),
      JSON.stringify(s),
    );
    assert.ok(["replica-1", "replica-2"].includes((await holder()) ?? ""));
  });

  it("when the leader is killed the other takes over, and no allocation moves", async () => {
    const before = await statuses();
    const leader = (await holder())!;
    const other = leader === "replica-1" ? "replica-2" : "replica-1";
    controllers.get(leader)!.kill("SIGKILL");
    const next = await eventually(holder, (h) => h === other, 20_000);
    assert.equal(next, other);
    // The new leader reconciles (its writes would show here) and keeps everything in place.
    await admin.create(ours("EgressPolicy"), {
      apiVersion: API_VERSION,
      kind: "EgressPolicy",
      metadata: { name: "d", namespace: "team-a" },
      spec: {
        podSelector: { matchLabels: { app: "web" } },
        gateway: "edge",
        destinationCIDRs: ["198.51.100.0/24"],
      },
    } as KubeObject);
    const after = await eventually(
      statuses,
      (l) => l.find((p) => p.name === "d")?.ips !== undefined,
      20_000,
    );
    for (const p of before)
      assert.deepEqual(
        after.find((x) => x.name === p.name),
        p,
        `${p.name} stays where it was`,
      );
    assert.ok(
      after.find((p) => p.name === "d")?.ips !== undefined,
      "the new leader allocates new policies",
    );
  });
});
