/**
 * Several egress IPs per policy: how new connections spread over them and whether the SNAT
 * source-port range is used to the last port. In the sandbox (2 nodes, IPv4, node-2 the gateway),
 * on each packet filter, the agents SNAT from `PORTS` source ports (`--snat-ports`, default 500);
 * the policy `double` (egressIPCount: 2) selects one pod on node-1.
 *
 *   fill       2 × PORTS + 20 connections to one destination (the external server), at most
 *              `IN_FLIGHT` (100) being opened at a time, each given 10 s (the SYN is sent again
 *              after 1, 3 and 7 s): how many opened, through which egress IP, how many distinct
 *              source ports the server saw from each, and how many opened only after a
 *              retransmitted SYN (a port another SYN took at the same moment, or none free yet).
 *   alternate  200 connections opened one after the other, alternating between two destinations
 *              (two more addresses of the external host): which egress IP each destination got.
 *              New connections go round-robin over the policy's addresses whatever their
 *              destination, so a client that alternates strictly gets one address per destination.
 *
 *   npm run bench -- capacity     (PORTS=… to change the range)
 */
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { mustRun } from "../src/kernel/runner.ts";
import { ours } from "../src/kube/client.ts";
import { Sandbox } from "../src/sandbox/sandbox.ts";
import { EXTERNAL, nsRunner } from "../src/sandbox/topology.ts";
import { EDGE_GATEWAY_YAML } from "../test/fixtures/manifests.ts";
import { connectMany } from "../test/support/capacity.ts";

const PORTS = Number(process.env.PORTS ?? 500);
const FIRST_PORT = 30000;
const IN_FLIGHT = 100;
const MORE = ["192.168.77.202", "192.168.77.203"] as const;

const MANIFESTS = `${EDGE_GATEWAY_YAML}---
apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: double, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {app: double}}
  destinationCIDRs: ["${EXTERNAL[4]}/32", "${MORE[0]}/32", "${MORE[1]}/32"]
  egressIPCount: 2
`;

interface PolicyStatus {
  egressIPs?: string[];
  conditions?: { type: string; status: string }[];
}

async function one(datapath: "iptables" | "nftables") {
  const sb = await Sandbox.up({
    prefix: `spbc${datapath === "iptables" ? "i" : "n"}`,
    nodes: 2,
    gatewayNodes: [2],
    families: [4],
    dir: mkdtempSync(join(tmpdir(), "sallyport-bench-")),
    agentArgs: ["--datapath", datapath, "--snat-ports", `${FIRST_PORT}-${FIRST_PORT + PORTS - 1}`],
  });
  const held: { stop(): void }[] = [];
  try {
    for (const a of MORE)
      await mustRun(nsRunner(sb.externalNs), ["ip", "addr", "add", `${a}/24`, "dev", "eth0"]);
    await sb.addPod("double", { node: 1, labels: { app: "double" } });
    await sb.apply(MANIFESTS);
    let status: PolicyStatus | undefined;
    for (const end = Date.now() + 60_000; Date.now() < end; ) {
      status = (
        await sb
          .admin()
          .get<{ metadata: object; status?: PolicyStatus }>(
            ours("EgressPolicy"),
            "double",
            "default",
          )
      ).status;
      if (status?.conditions?.some((c) => c.type === "Ready" && c.status === "True")) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    const eips = status?.egressIPs ?? [];
    if (eips.length !== 2) throw new Error(`expected 2 egress IPs: ${JSON.stringify(status)}`);
    const pod = sb.pod("double").netns;

    const alternate = await connectMany(
      pod,
      MORE.map((host) => ({ host, port: 8080 })),
      { count: 200, timeoutMs: 3000, inFlight: 1 },
    );
    held.push(alternate);

    const t0 = performance.now();
    const fill = await connectMany(
      pod,
      { host: EXTERNAL[4], port: 8080 },
      { count: 2 * PORTS + 20, timeoutMs: 10_000, inFlight: IN_FLIGHT },
    );
    const fillMs = Math.round(performance.now() - t0);
    held.push(fill);
    const seen = readFileSync(join(sb.dir, "external-requests.log"), "utf8")
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { proto: string; src: string; port: number });
    const portsFrom = (a: string) =>
      new Set(
        seen
          .filter((r) => r.proto === "tcp" && r.src === a)
          .map((r) => r.port)
          .filter((p) => p >= FIRST_PORT && p < FIRST_PORT + PORTS),
      ).size;
    return {
      fill: {
        tried: 2 * PORTS + 20,
        open: fill.result.open,
        failed: fill.result.failed,
        retried: fill.result.retried,
        ms: fillMs,
        perEgressIP: Object.fromEntries(
          eips.map((a) => [a, { open: fill.result.saw[a] ?? 0, distinctPorts: portsFrom(a) }]),
        ),
      },
      alternate: { open: alternate.result.open, byDestination: alternate.result.byTarget },
    };
  } finally {
    for (const h of held) h.stop();
    await sb.destroy();
  }
}

export async function run() {
  const iptables = await one("iptables");
  console.error(`iptables: ${JSON.stringify(iptables)}`);
  const nftables = await one("nftables");
  return { bench: "capacity", snatPorts: PORTS, egressIPs: 2, iptables, nftables };
}
