/**
 * The traffic metrics end to end: a pod of the sandbox sends known traffic through a policy, the
 * test scrapes the agents' metrics endpoints as Prometheus would, and compares the figures with
 * what it sent; then `sallyport top --sandbox` prints the same.
 *
 * Sandbox: IPv4, node-1 (the pod "bot"), node-2 and node-3 (egress=true); the policy "bot" sends
 * bot's traffic to the external host through the egress IP 192.168.77.100.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { parseMetrics, SandboxSource, type Scrape } from "../../src/cli/top.ts";
import { ours } from "../../src/kube/client.ts";
import { Sandbox } from "../../src/sandbox/sandbox.ts";
import { EXTERNAL } from "../../src/sandbox/topology.ts";
import { EDGE_GATEWAY_YAML } from "../fixtures/manifests.ts";
import { condition, eventually, type WithStatus } from "../support/kube.ts";
import { topOfSandbox } from "../support/lab.ts";
import { TEST_PREFIX, TMP_PREFIX } from "../support/leaks.ts";
import { clientArgv, clientReady, NEEDS_ROOT, type TrafficPlan } from "../support/snat_lab.ts";

const EIP = "192.168.77.100";
const POLICY = "EgressPolicy/default/bot";

const MANIFESTS = `${EDGE_GATEWAY_YAML}---
apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: bot, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {app: bot}}
  destinationCIDRs: ["${EXTERNAL[4]}/32"]
  egressIP: ["${EIP}"]
`;

/** The sum of a metric's samples on one node whose labels include `labels`. */
function value(
  scrapes: readonly Scrape[],
  node: string,
  name: string,
  labels: Record<string, string>,
): number {
  let sum = 0;
  for (const s of scrapes.filter((x) => x.node === node))
    for (const sample of parseMetrics(s.text ?? ""))
      if (sample.name === name && Object.entries(labels).every(([k, v]) => sample.labels[k] === v))
        sum += sample.value;
  return sum;
}

describe("traffic metrics against traffic sent, in the sandbox", { skip: NEEDS_ROOT }, () => {
  let sb: Sandbox;
  let cache: string;
  let gateway: string;
  const clients: ChildProcess[] = [];

  const scrape = () =>
    new SandboxSource(
      Array.from({ length: sb.nodeCount }, (_, i) => ({
        name: sb.nodeName(i + 1),
        netns: sb.nodeNs(i + 1),
      })),
    ).scrape();

  /** Starts bot's client with `plan`; it keeps its connections open until the test ends. */
  async function send(plan: TrafficPlan): Promise<void> {
    const child = spawn("ip", ["netns", "exec", sb.pod("bot").netns, ...clientArgv(plan)], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    clients.push(child);
    await clientReady(child);
  }

  before(async () => {
    cache = mkdtempSync(join(tmpdir(), `${TMP_PREFIX}traffic-`));
    const prefix = `${TEST_PREFIX}${process.pid % 100000}m`;
    sb = await Sandbox.up({
      prefix,
      nodes: 3,
      families: [4],
      dir: join(cache, "sandbox", prefix),
      agentArgs: [
        "--period-ms",
        "3000",
        "--traffic-period-ms",
        "1000",
        "--periodic-max-share",
        "1",
      ],
    });
    await sb.addPod("bot", { node: 1, labels: { app: "bot" } });
    await sb.apply(MANIFESTS);
    const s = await eventually(
      async () => (await sb.admin().get<WithStatus>(ours("EgressPolicy"), "bot", "default")).status,
      (x) => condition(x, "Ready")?.status === "True",
      60_000,
      250,
    );
    assert.equal(condition(s, "Ready")?.status, "True", JSON.stringify(s));
    gateway = s!.gatewayNode!;
  });

  after(async () => {
    for (const c of clients) c.kill("SIGKILL");
    await sb?.destroy();
    if (cache !== undefined) rmSync(cache, { recursive: true, force: true });
  });

  it("counts every steered datagram on the pod's node and each new flow on the gateway", async () => {
    const before = await scrape();
    // 3 flows of 10 datagrams of 100 bytes to the external host's echo server (UDP 8080).
    await send({
      udp: [{ host: EXTERNAL[4], port: 8080, count: 10, size: 100, fromPorts: 3 }],
    });
    const delta = (
      s: readonly Scrape[],
      node: string,
      name: string,
      labels: Record<string, string>,
    ) => value(s, node, name, labels) - value(before, node, name, labels);
    const steered = { policy: POLICY, egress_ip: EIP, direction: "steered" };
    const now = await eventually(
      scrape,
      (s) =>
        delta(s, "node-1", "sallyport_policy_packets_total", steered) >= 30 &&
        delta(s, gateway, "sallyport_policy_snat_connections_total", { policy: POLICY }) >= 3,
      15_000,
      500,
    );
    assert.equal(delta(now, "node-1", "sallyport_policy_packets_total", steered), 30);
    // 20 bytes of IPv4 header, 8 of UDP, 100 of payload
    assert.equal(delta(now, "node-1", "sallyport_policy_bytes_total", steered), 30 * 128);
    assert.equal(
      delta(now, gateway, "sallyport_policy_snat_connections_total", {
        policy: POLICY,
        egress_ip: EIP,
      }),
      3,
    );
  });

  it("shows the connections open through the egress IP and their ports on the gateway", async () => {
    await send({ tcp: [{ host: EXTERNAL[4], port: 8080, count: 4 }] });
    const tcp = { egress_ip: EIP, destination: EXTERNAL[4], port: "8080", protocol: "tcp" };
    const s = await eventually(
      scrape,
      (x) => value(x, gateway, "sallyport_snat_connections", tcp) === 4,
      15_000,
      500,
    );
    assert.equal(value(s, gateway, "sallyport_snat_connections", tcp), 4);
    assert.equal(value(s, gateway, "sallyport_snat_ports_in_use", tcp), 4);
    assert.equal(value(s, gateway, "sallyport_snat_port_saturation", tcp), 4 / 64512);
    const udp = { ...tcp, protocol: "udp" };
    assert.equal(
      value(s, gateway, "sallyport_snat_connections", udp),
      3,
      "the UDP flows are tracked too",
    );
    for (const node of ["node-1", "node-2", "node-3"].filter((n) => n !== gateway))
      assert.equal(value(s, node, "sallyport_snat_connections", { egress_ip: EIP }), 0, node);
  });

  it("sallyport top --sandbox prints the same per policy and egress IP", async () => {
    const r = await topOfSandbox(sb.prefix, cache);
    assert.equal(r.code, 0, r.stderr);
    const row = r.stdout.split("\n").find((l) => l.startsWith("egp/default/bot "));
    assert.ok(row, r.stdout);
    const cells = row.split(/ {2,}/);
    assert.deepEqual(
      [cells[0], cells[1], cells[2], cells[7], cells[9]],
      ["egp/default/bot", EIP, gateway, "7", `${EXTERNAL[4]}:8080/tcp`],
    );
  });
});
