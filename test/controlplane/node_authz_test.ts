/**
 * An agent writes only its own node's objects (issue 12: "liveness that nobody can fake"), on a
 * real kube-apiserver with the manifests we ship (deploy/rbac.yaml: the agent's RBAC and the
 * ValidatingAdmissionPolicy sallyport-agent-own-node).
 *
 * The agent's credentials are what a node really gives it: a ServiceAccount token that the API
 * server issued for the agent's pod (TokenRequest bound to the Pod, as kubelet asks for projected
 * tokens), into which the API server itself wrote the pod's node. A token for node A is refused
 * when it writes node B's EgressNode status, node B's Lease, a Lease of its own name labelled for
 * another node, or the controller's leader Lease; a token bound to no pod writes nothing.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { API_VERSION } from "../../src/api/types.ts";
import { CORE, KubeClient, type KubeObject, kubeConfigFor, ours } from "../../src/kube/client.ts";
import { type Lease, microTime } from "../../src/kube/lease.ts";
import { NODE_LEASE_LABEL, nodeLeaseName } from "../../src/kube/node_lease.ts";
import { ControlPlane, SALLYPORT_NAMESPACE } from "../../src/sandbox/controlplane.ts";
import { createNode } from "../support/kube.ts";

const NODES = ["node-a", "node-b"];

/** A token the API server issues for the agent's pod on `node` (what kubelet projects). */
async function agentToken(admin: KubeClient, node: string | undefined): Promise<string> {
  let boundObjectRef: object | undefined;
  if (node !== undefined) {
    const pod = await admin.create<KubeObject>(CORE.pods, {
      apiVersion: "v1",
      kind: "Pod",
      metadata: { name: `sallyport-agent-${node}`, namespace: SALLYPORT_NAMESPACE },
      spec: {
        nodeName: node,
        serviceAccountName: "sallyport-agent",
        automountServiceAccountToken: false,
        containers: [{ name: "agent", image: "registry.invalid/sallyport" }],
      },
    });
    boundObjectRef = {
      kind: "Pod",
      apiVersion: "v1",
      name: pod.metadata.name,
      uid: pod.metadata.uid,
    };
  }
  const review = await admin.request<{ status: { token: string } }>(
    "POST",
    `/api/v1/namespaces/${SALLYPORT_NAMESPACE}/serviceaccounts/sallyport-agent/token`,
    {
      body: {
        apiVersion: "authentication.k8s.io/v1",
        kind: "TokenRequest",
        spec: {
          expirationSeconds: 3600,
          ...(boundObjectRef === undefined ? {} : { boundObjectRef }),
        },
      },
    },
  );
  return review.status.token;
}

function leaseOf(node: string, name = nodeLeaseName(node)): Lease {
  return {
    apiVersion: "coordination.k8s.io/v1",
    kind: "Lease",
    metadata: {
      name,
      namespace: SALLYPORT_NAMESPACE,
      labels: { [NODE_LEASE_LABEL]: "true", "sallyport.dev/node": node },
    },
    spec: { holderIdentity: node, leaseDurationSeconds: 1, renewTime: microTime() },
  } as Lease;
}

/** The API server's refusal, or undefined when the write went through. */
async function refusal(write: Promise<unknown>): Promise<string | undefined> {
  try {
    await write;
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
}

describe("an agent writes only its own node's objects (pod-bound token, ValidatingAdmissionPolicy)", () => {
  let cp: ControlPlane;
  let admin: KubeClient;
  let agentA: KubeClient;
  let unbound: KubeClient;

  before(async () => {
    cp = await ControlPlane.start({ tag: "nodeauthz" });
    admin = cp.client();
    for (const [i, node] of NODES.entries()) {
      await createNode(admin, node, { addresses: [`192.168.77.1${i + 1}`] });
      await admin.create(ours("EgressNode"), {
        apiVersion: API_VERSION,
        kind: "EgressNode",
        metadata: { name: node },
        spec: {
          nodeID: i + 1,
          mark: `0x0000000${i + 1}`,
          tunnel: { mac: `02:00:00:00:00:0${i + 1}` },
        },
      });
    }
    const client = (token: string) =>
      new KubeClient(kubeConfigFor({ server: cp.url, token, insecure: true }));
    agentA = client(await agentToken(admin, "node-a"));
    unbound = client(await agentToken(admin, undefined));
    // The policy is enforced once the API server has loaded it: wait for a first refusal.
    for (let i = 0; i < 100; i++) {
      const refused = await refusal(
        agentA.mergePatch(
          ours("EgressNode"),
          "node-b",
          { status: { datapath: "nftables" } },
          { subresource: "status" },
        ),
      );
      if (refused !== undefined) break;
      await new Promise((r) => setTimeout(r, 100));
    }
  });

  after(async () => {
    await cp?.stop();
  });

  it("node A's agent reports its own EgressNode status and renews its own Lease", async () => {
    await agentA.mergePatch(
      ours("EgressNode"),
      "node-a",
      { status: { datapath: "iptables" } },
      { subresource: "status" },
    );
    const got = await admin.get<KubeObject & { status?: { datapath?: string } }>(
      ours("EgressNode"),
      "node-a",
    );
    assert.equal(got.status?.datapath, "iptables");
    await agentA.create(CORE.leases, leaseOf("node-a"));
    await agentA.mergePatch(
      CORE.leases,
      nodeLeaseName("node-a"),
      { spec: { renewTime: microTime() } },
      { namespace: SALLYPORT_NAMESPACE },
    );
  });

  it("node A's agent cannot write node B's EgressNode status", async () => {
    const refused = await refusal(
      agentA.mergePatch(
        ours("EgressNode"),
        "node-b",
        { status: { datapath: "iptables" } },
        { subresource: "status" },
      ),
    );
    assert.match(
      refused ?? "written",
      /403.*only its own node's EgressNode: node-a may not write node-b/,
    );
    const b = await admin.get<KubeObject & { status?: unknown }>(ours("EgressNode"), "node-b");
    assert.equal(b.status, undefined, "node-b's status is untouched");
  });

  it("node A's agent cannot create or renew node B's Lease, nor label its own for node B", async () => {
    const create = await refusal(agentA.create(CORE.leases, leaseOf("node-b")));
    assert.match(create ?? "written", /403.*only its own node's Lease, sallyport-node-node-a/);
    await admin.create(CORE.leases, leaseOf("node-b"));
    const renew = await refusal(
      agentA.mergePatch(
        CORE.leases,
        nodeLeaseName("node-b"),
        { spec: { renewTime: microTime() } },
        { namespace: SALLYPORT_NAMESPACE },
      ),
    );
    assert.match(renew ?? "written", /403.*only its own node's Lease/);
    const relabel = await refusal(
      agentA.mergePatch(
        CORE.leases,
        nodeLeaseName("node-a"),
        {
          metadata: { labels: { "sallyport.dev/node": "node-b" } },
          spec: { holderIdentity: "node-b" },
        },
        { namespace: SALLYPORT_NAMESPACE },
      ),
    );
    assert.match(relabel ?? "written", /403.*only its own node's Lease/);
  });

  it("node A's agent cannot take or renew the controller's leader Lease", async () => {
    const lease = leaseOf("node-a", "sallyport-controller");
    const take = await refusal(agentA.create(CORE.leases, lease));
    assert.match(take ?? "written", /403.*only its own node's Lease/);
    await admin.create(CORE.leases, {
      ...lease,
      metadata: { name: "sallyport-controller", namespace: SALLYPORT_NAMESPACE },
    });
    const renew = await refusal(
      agentA.mergePatch(
        CORE.leases,
        "sallyport-controller",
        { spec: { holderIdentity: "node-a" } },
        { namespace: SALLYPORT_NAMESPACE },
      ),
    );
    assert.match(renew ?? "written", /403.*only its own node's Lease/);
  });

  it("a token bound to no pod (so naming no node) writes nothing, and says why", async () => {
    const refused = await refusal(
      unbound.mergePatch(
        ours("EgressNode"),
        "node-a",
        { status: { datapath: "nftables" } },
        { subresource: "status" },
      ),
    );
    assert.match(
      refused ?? "written",
      /403.*names no node \(authentication\.kubernetes\.io\/node-name\)/,
    );
  });
});
