/**
 * `sallyport top` and `kubectl sallyport top` against a real kube-apiserver: the agents' metrics
 * through the API server's pod proxy, with the chart's Role sallyport-metrics-reader bound as
 * docs/operations.md says, and the messages (and exit codes) when that is not possible.
 *
 * The "agent" is an HTTP server of this test serving the agent's own traffic metrics
 * (src/lib/metrics.ts) on this host's first non-loopback IPv4 address (the API server does not
 * proxy to loopback addresses); its Pod object points there.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer, type Server } from "node:http";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { CORE, type KubeClient } from "../../src/kube/client.ts";
import { Registry, trafficMetrics } from "../../src/lib/metrics.ts";
import { ControlPlane, REPO, SALLYPORT_NAMESPACE } from "../../src/sandbox/controlplane.ts";
import { ensureNamespace } from "../support/kube.ts";

const MAIN = join(REPO, "src", "cli", "main.ts");
const PLUGIN = join(REPO, "bin", "kubectl-sallyport");
const STACK = /^\s+at .+:\d+:\d+\)?$/m;

const hostAddress = Object.values(networkInterfaces())
  .flat()
  .find((a) => a !== undefined && a.family === "IPv4" && !a.internal)?.address;

/** An agent's metrics: 1,000 steered packets a second since it started, one busy destination. */
function agentMetrics(): Registry {
  const registry = new Registry();
  const started = Date.now();
  trafficMetrics(registry, () => ({
    policyTraffic: async () => {
      const packets = Math.round(Date.now() - started);
      return [
        {
          policy: "EgressPolicy/team-a/web",
          egressIP: "192.0.2.1",
          kind: "steered",
          packets,
          bytes: packets * 100,
        },
      ];
    },
    snatEgress: [
      {
        egressIP: "192.0.2.1",
        top: [
          {
            destination: "203.0.113.7",
            port: 443,
            protocol: "tcp",
            connections: 52_000,
            ports: 52_000,
            saturation: 52_000 / 64_512,
          },
        ],
      },
    ],
    conntrackEntries: 52_000,
  }));
  return registry;
}

async function agentPod(
  client: KubeClient,
  namespace: string,
  name: string,
  options: { ip: string; port: number; node: string },
): Promise<void> {
  await client.create(CORE.pods, {
    apiVersion: "v1",
    kind: "Pod",
    metadata: { name, namespace, labels: { "app.kubernetes.io/name": "sallyport-agent" } },
    spec: {
      nodeName: options.node,
      containers: [
        {
          name: "agent",
          image: "registry.invalid/sallyport",
          ports: [{ name: "metrics", containerPort: options.port }],
        },
      ],
    },
  });
  await client.mergePatch(
    CORE.pods,
    name,
    { status: { phase: "Running", podIP: options.ip, podIPs: [{ ip: options.ip }] } },
    { namespace, subresource: "status" },
  );
}

describe("top through the API server's pod proxy", {
  skip: hostAddress === undefined ? "no non-loopback IPv4 address" : false,
}, () => {
  let cp: ControlPlane;
  let server: Server;

  /** Runs the CLI as a process; asynchronously, as the "agent" answers from this one. */
  const run = (
    argv: string[],
    user: string,
    entry: string[] = [process.execPath, MAIN],
  ): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    new Promise((resolve) => {
      const child = spawn(entry[0]!, [...entry.slice(1), ...argv], {
        env: { ...process.env, KUBECONFIG: cp.kubeconfig(user), SALLYPORT_DEBUG: "" },
        timeout: 60_000,
      });
      let stdout = "";
      let stderr = "";
      child.stdout.on("data", (d) => (stdout += d));
      child.stderr.on("data", (d) => (stderr += d));
      child.on("close", (code) => resolve({ code, stdout, stderr }));
    });

  before(async () => {
    cp = await ControlPlane.start({
      tag: "top",
      users: { reader: ["readers"], viewer: ["viewers"] },
    });
    const admin = cp.client();
    const registry = agentMetrics();
    server = createServer((req, res) => {
      if (req.url !== "/metrics") return void res.writeHead(404).end();
      void registry
        .metrics()
        .then((t) => res.writeHead(200, { "content-type": registry.contentType }).end(t));
    });
    await new Promise<void>((r) => server.listen(0, "0.0.0.0", r));
    const port = (server.address() as { port: number }).port;
    await ensureNamespace(admin, SALLYPORT_NAMESPACE);
    await agentPod(admin, SALLYPORT_NAMESPACE, "sallyport-agent-x1", {
      ip: hostAddress!,
      port,
      node: "node-2",
    });
    // As docs/operations.md tells: bind the chart's Role to who may run top.
    await admin.create(
      {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        namespaced: true,
      },
      {
        apiVersion: "rbac.authorization.k8s.io/v1",
        kind: "RoleBinding",
        metadata: { name: "readers-top", namespace: SALLYPORT_NAMESPACE },
        roleRef: {
          apiGroup: "rbac.authorization.k8s.io",
          kind: "Role",
          name: "sallyport-metrics-reader",
        },
        subjects: [{ kind: "Group", apiGroup: "rbac.authorization.k8s.io", name: "readers" }],
      } as never,
    );
    // Agents that cannot be reached: a closed port.
    await ensureNamespace(admin, "sallyport-down");
    await agentPod(admin, "sallyport-down", "sallyport-agent-y1", {
      ip: hostAddress!,
      port: 1,
      node: "node-3",
    });
  });

  after(async () => {
    server?.close();
    await cp?.stop();
  });

  it("prints rates, connections and port use per policy and egress IP for a reader of the Role", async () => {
    const r = await run(["top", "--interval", "1"], "reader");
    assert.equal(r.code, 0, r.stderr);
    const [header, row] = r.stdout.trim().split("\n");
    assert.match(
      header ?? "",
      /^POLICY +EGRESS-IP +GATEWAY +STEERED\(PKT\/S\) +STEERED\(B\/S\) +SNAT\(PKT\/S\) +SNAT\(CONN\/S\) +CONNS +PORT-USE +DESTINATION$/,
    );
    const cells = (row ?? "").split(/ {2,}/);
    assert.deepEqual(
      [cells[0], cells[1], cells[2], cells[5], cells[7], cells[8], cells[9]],
      ["egp/team-a/web", "192.0.2.1", "node-2", "-", "52k", "80.6%", "203.0.113.7:443/tcp"],
    );
    // 1,000 packets a second, give or take the scrapes' own timing.
    assert.match(cells[3] ?? "", /^(9\d\d|1\.\dk)$/, row);
  });

  it("works the same as a kubectl plugin", async () => {
    const r = await run(["top", "--interval", "0.5"], "reader", [PLUGIN]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^egp\/team-a\/web +192\.0\.2\.1 +node-2 /m);
  });

  it("tells a user without the Role what to bind (exit 1, no stack trace)", async () => {
    const r = await run(["top"], "viewer");
    assert.equal(r.code, 1);
    const lines = r.stderr.trim().split("\n");
    assert.match(
      lines[0] ?? "",
      /^error: Cannot read the agents' metrics: .*forbidden: User "viewer" cannot list resource "pods"/,
    );
    assert.deepEqual(lines.slice(1), [
      `  your user needs get/list on pods and get on pods/proxy in namespace ${SALLYPORT_NAMESPACE}:`,
      `  kubectl -n ${SALLYPORT_NAMESPACE} create rolebinding <name> --role sallyport-metrics-reader --user <you>`,
      "  (or set metrics.readers in the chart's values)",
    ]);
    assert.doesNotMatch(r.stderr, STACK);
  });

  it("says where it looked when no agent runs there, and which agents it could not read", async () => {
    const none = await run(["top", "--sallyport-namespace", "elsewhere"], "admin");
    assert.equal(none.code, 1);
    assert.equal(
      none.stderr,
      "error: Cannot find a running Sallyport agent: no pod labelled app.kubernetes.io/name=sallyport-agent runs in namespace elsewhere\n  pass --sallyport-namespace if Sallyport is installed in another namespace\n",
    );
    const down = await run(
      ["top", "--sallyport-namespace", "sallyport-down", "--interval", "0.2"],
      "admin",
    );
    assert.equal(down.code, 1);
    assert.match(
      down.stderr,
      /^error: Cannot read the metrics of any Sallyport agent \(1 tried\)\n {2}node-3: /,
    );
    assert.doesNotMatch(down.stderr, STACK);
  });
});
