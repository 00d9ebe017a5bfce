/**
 * first-connection: a running pod that a re-applied policy starts selecting opens TCP
 * connections to the external host at once; how long until the first connection is established
 * through the egress IP, and whether it took a SYN retransmission to get there.
 *
 * Sandbox: 3 nodes, IPv4, default agent and controller settings. The pods run on node-1, which
 * is never a gateway (nodes 2 and 3 are). Per trial: a pod `fc-N` (label trial=N) is running
 * with its client ready (bench/first_connection_client.ts, started beforehand so that node's own
 * start-up is not measured); the policy `fc` is re-applied with `podSelector: trial=N` (it
 * selected the previous trial's pod); when `apply` returns the client starts connecting, one
 * connection after another, until one is answered from the egress IP.
 *
 * Reported: `p50Ms`/`p99Ms`/`maxMs` of the time from `apply` returning to that connection being
 * established; `withSynRetransmission`, the trials in which the pod's namespace counted a SYN
 * retransmission (TCPSynRetrans; RetransSegs per trial on stderr); `fromNodeAddressTotal`, the
 * connections answered from node-1's address before it (node-1 had not steered the pod yet);
 * `underHundredMs`, the trials done within 100 ms without a retransmission. Where the time went,
 * from `apply` returning (p50; per trial on stderr): node-1's agent holding the pod in its
 * kernel ("datapath updated" with a set member added), the policy's EgressEndpointSlice naming
 * the pod (polled every 10 ms: an upper bound), the gateway's agent holding it; with
 * SALLYPORT_LOG_LEVEL=debug also the controller's computation ("computed"). SALLYPORT_BENCH_LOGS=DIR
 * keeps the components' logs; SALLYPORT_BENCH_TRIALS sets the number of trials (12).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import type { EgressEndpointSlice } from "../src/api/types.ts";
import { ours } from "../src/kube/client.ts";
import { Sandbox, type SandboxPod } from "../src/sandbox/sandbox.ts";
import { EXTERNAL, nodeAddress } from "../src/sandbox/topology.ts";
import { EDGE_GATEWAY_YAML } from "../test/fixtures/manifests.ts";

const EIP = "192.168.77.100";
const TARGET = `${EXTERNAL[4]}:8080`;
const CLIENT = join(import.meta.dirname, "first_connection_client.ts");

function policy(trial: string): string {
  return `apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: fc, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {trial: "${trial}"}}
  destinationCIDRs: ["${EXTERNAL[4]}/32"]
  egressIP: ["${EIP}"]
`;
}

function percentile(xs: readonly number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!;
}

const relative = (t: number | undefined, t0: number) => (t === undefined ? undefined : t - t0);
const percentileOf = (xs: readonly (number | undefined)[], p = 50) => {
  const known = xs.filter((x) => x !== undefined);
  return known.length === 0 ? undefined : percentile(known, p);
};

interface ClientResult {
  go: number;
  connections: { start: number; established?: number; saw?: string; error?: string }[];
  before: { retransSegs: number; synRetrans: number };
  after: { retransSegs: number; synRetrans: number };
}

/** The client in the pod, ready: `go()` starts it and resolves with its result line. */
async function readyClient(pod: SandboxPod): Promise<{ go: () => Promise<ClientResult> }> {
  const child: ChildProcess = spawn(
    "ip",
    [
      "netns",
      "exec",
      pod.netns,
      process.execPath,
      CLIENT,
      "--target",
      TARGET,
      "--want",
      EIP,
      "--max-ms",
      "15000",
    ],
    { stdio: ["pipe", "pipe", "inherit"] },
  );
  const lines = createInterface({ input: child.stdout! });
  const next = () =>
    new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error(`${pod.name}: the client said nothing for 30 s`));
      }, 30_000);
      lines.once("line", (l) => {
        clearTimeout(timer);
        resolve(l);
      });
    });
  await next();
  return {
    go: async () => {
      const result = next();
      child.stdin!.write("go\n");
      return JSON.parse(await result) as ClientResult;
    },
  };
}

async function until<T>(get: () => Promise<T>, ok: (v: T) => boolean, ms: number): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await get().catch(() => undefined as T);
    if (ok(v) || Date.now() > end) return v;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * When a component first logged `msg` at or after `since` (epoch ms), among the lines `ok` keeps:
 * "datapath updated" (info) for the agents, "computed" (debug: SALLYPORT_LOG_LEVEL=debug) for
 * the controller.
 */
function firstLog(
  sb: Sandbox,
  component: string,
  msg: string,
  since: number,
  ok: (e: { detail?: { setMembersAdded?: number } }) => boolean = () => true,
): number | undefined {
  for (const line of sb.log(component).split("\n")) {
    if (!line.includes(`"msg":"${msg}"`)) continue;
    const e = JSON.parse(line) as { time: number; detail?: { setMembersAdded?: number } };
    if (e.time >= since && ok(e)) return e.time;
  }
  return undefined;
}

const addedMembers = (e: { detail?: { setMembersAdded?: number } }) =>
  (e.detail?.setMembersAdded ?? 0) > 0;

/**
 * Polls the policy's EgressEndpointSlices every 10 ms until one names `ip`; resolves with the
 * moment it was first seen (the controller's write, as a reader of the API sees it), or
 * undefined after `ms`.
 */
async function sliceNames(sb: Sandbox, ip: string, ms: number): Promise<number | undefined> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const list = await sb
      .admin()
      .list<EgressEndpointSlice>(ours("EgressEndpointSlice"), { namespace: "default" })
      .catch(() => undefined);
    const named = list?.items.some(
      (s) => s.policy === "EgressPolicy/default/fc" && s.endpoints.some((e) => e.ips.includes(ip)),
    );
    if (named === true) return Date.now();
    await new Promise((r) => setTimeout(r, 10));
  }
  return undefined;
}

export async function firstConnection(trials = Number(process.env.SALLYPORT_BENCH_TRIALS ?? 12)) {
  const sb = await Sandbox.up({
    prefix: "spbfc",
    nodes: 3,
    families: [4],
    dir: mkdtempSync(join(tmpdir(), "sallyport-bench-")),
  });
  try {
    const pods: SandboxPod[] = [];
    for (let i = 0; i < trials; i++)
      pods.push(await sb.addPod(`fc-${i}`, { node: 1, labels: { trial: String(i) } }));
    await sb.apply(EDGE_GATEWAY_YAML);
    await sb.apply(policy("none"));
    const ready = await until(
      () =>
        sb
          .admin()
          .get<{ metadata: object; status?: { gatewayNode?: string } }>(
            ours("EgressPolicy"),
            "fc",
            "default",
          ),
      (p) => p?.status?.gatewayNode !== undefined,
      60_000,
    );
    const gateway = ready?.status?.gatewayNode;
    if (gateway === undefined) throw new Error("the policy fc was never placed on a gateway node");
    const gatewayIndex = Number(gateway.split("-")[1]);
    const node1 = nodeAddress(1, 4);
    const rows = [];
    for (let i = 0; i < trials; i++) {
      const client = await readyClient(pods[i]!);
      await new Promise((r) => setTimeout(r, 1000));
      const applyStart = Date.now();
      await sb.apply(policy(String(i)));
      const t0 = Date.now();
      const [r, slice] = await Promise.all([client.go(), sliceNames(sb, pods[i]!.ips[4]!, 15_000)]);
      const via = r.connections.find((c) => c.saw === EIP);
      if (via?.established === undefined)
        throw new Error(`trial ${i}: no connection through the egress IP: ${JSON.stringify(r)}`);
      // Let the components log what they did for this trial before reading their logs.
      await new Promise((r) => setTimeout(r, 1500));
      const row = {
        trial: i,
        applyMs: t0 - applyStart,
        firstMs: via.established - t0,
        connectMs: via.established - via.start,
        synRetrans: r.after.synRetrans - r.before.synRetrans,
        retransSegs: r.after.retransSegs - r.before.retransSegs,
        fromNode: r.connections.filter((c) => c.saw === node1).length,
        failed: r.connections.filter((c) => c.saw === undefined).length,
        // Where the time went, from apply returning: node-1's agent steering the pod (its
        // kernel holds the pod in the policy's set), the controller's slice naming the pod (as
        // the API serves it), the gateway's agent holding the pod in its set.
        node1SyncedMs: relative(
          firstLog(sb, "agent-1", "datapath updated", applyStart, addedMembers),
          t0,
        ),
        controllerComputedMs: relative(firstLog(sb, "controller", "computed", applyStart), t0),
        sliceMs: relative(slice, t0),
        gatewaySyncedMs: relative(
          firstLog(sb, `agent-${gatewayIndex}`, "datapath updated", applyStart, addedMembers),
          t0,
        ),
        steeredFromMs: via.start - t0,
      };
      console.error(
        `trial ${i}: node-1 synced +${row.node1SyncedMs} ms, controller computed ${row.controllerComputedMs === undefined ? "(debug log only)" : `+${row.controllerComputedMs} ms`}, slice +${row.sliceMs} ms, gateway synced +${row.gatewaySyncedMs} ms`,
      );
      console.error(
        `trial ${i}: first connection through the egress IP ${row.firstMs} ms after apply returned (apply ${row.applyMs} ms; that connect ${row.connectMs} ms), SYN retransmissions ${row.synRetrans}, ${row.fromNode} connections from node-1's address before it, ${row.failed} failed`,
      );
      rows.push(row);
    }
    const firsts = rows.map((r) => r.firstMs);
    return {
      bench: "first-connection",
      trials,
      gateway,
      p50Ms: percentile(firsts, 50),
      p99Ms: percentile(firsts, 99),
      maxMs: Math.max(...firsts),
      withSynRetransmission: rows.filter((r) => r.synRetrans > 0).length,
      synRetransTotal: rows.reduce((a, r) => a + r.synRetrans, 0),
      fromNodeAddressTotal: rows.reduce((a, r) => a + r.fromNode, 0),
      applyP50Ms: percentile(
        rows.map((r) => r.applyMs),
        50,
      ),
      node1SyncedP50Ms: percentileOf(rows.map((r) => r.node1SyncedMs)),
      controllerComputedP50Ms: percentileOf(rows.map((r) => r.controllerComputedMs)),
      sliceP50Ms: percentileOf(rows.map((r) => r.sliceMs)),
      gatewaySyncedP50Ms: percentileOf(rows.map((r) => r.gatewaySyncedMs)),
      underHundredMs: rows.filter((r) => r.firstMs <= 100 && r.synRetrans === 0).length,
    };
  } finally {
    // SALLYPORT_BENCH_LOGS=DIR keeps the components' logs (the sandbox's directory goes).
    const keep = process.env.SALLYPORT_BENCH_LOGS;
    if (keep !== undefined) {
      mkdirSync(keep, { recursive: true });
      for (const c of ["controller", "agent-1", "agent-2", "agent-3"])
        writeFileSync(join(keep, `${c}.log`), sb.log(c));
    }
    await sb.destroy();
  }
}
