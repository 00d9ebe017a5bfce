/**
 * Per-packet cost against the number of policies, on each packet filter (`npm run bench --
 * perpacket`): in the sandbox (2 nodes; node-2 is the gateway), iperf3 from a selected pod on
 * node-1 through the tunnel and the gateway to the external host, TCP (Gbit/s) and 64-byte UDP
 * (packets per second received), with 1, 1,000 and 10,000 policies in front of the measured one
 * (the same pod, other destinations, higher priority), for iptables and nftables side by side in
 * one run; plus two references on the same machine in the same run: a pod no policy selects (its
 * usual, masqueraded path, once) and node-1 itself (node to node, no pod, no tunnel, in every
 * row).
 *
 * Each figure is taken once the machine is quiet again (`settle`): right after the policies are in
 * the kernel the controller still writes their programmed statuses and the agents their reports,
 * and on a 2-core machine that work takes the CPU the forwarding needs, which is not what a
 * packet costs. Quiet means back to what the running sandbox with one policy costs
 * (`references.steadyBusy`, the machine's busy share measured before the first row) plus 5
 * points: the agents' liveness probes and fence renewals alone keep a 2-core machine 9–15 % busy
 * (it varies with the VM), above any fixed threshold low enough to mean idle. `settledMs` says how long that took (at
 * most 3 minutes, or 90 ms per policy in front); `settled: false` that it never got quiet (the
 * policies' own steady cost, or another load on the machine) and the figure was taken anyway.
 *
 * Figures taken minutes apart compare two machines: at 10,000 policies the control plane's
 * backlog (minutes of API server time after they are created) comes and goes during a
 * measurement. So each row also measures, alternately and `PERPACKET_ROUNDS` times each, a
 * second pod on node-1 that only the measured policy selects ("solo"): the same path through
 * the tunnel and the gateway at the same moment, but in a class of one policy.
 * `tcpVsSolo`/`udpVsSolo` (medians) are what the policies in front cost a packet of the pod
 * they select, side by side. On nftables the solo pod's packets meet its own class map only; on
 * iptables they walk the same rule per policy as the measured pod's (its policy comes last), so
 * there the ratio says nothing and `tcpVs1` is the figure.
 *
 * Each row also measures node to node in the same rotation (`nodeToNode`, so `tcpVsNode` is
 * against the machine's speed at that moment, and `tcpVs1ByNode` the sequential ratio with the
 * drift between rows taken out), says how busy the machine stays with those policies and nothing
 * measured (`steadyBusy`), and the last row ("again") measures the 1-policy figure once more
 * after the policies in front are deleted: its `tcpVs1`/`udpVs1` are the machine's own drift
 * over the run.
 *
 *   PERPACKET_COUNTS=1,1000,10000  PERPACKET_SECONDS=5  PERPACKET_ROUNDS=3
 *   PERPACKET_FILTERS=iptables,nftables  PERPACKET_AGAIN=1 (0: no "again" row)
 */
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { API_VERSION } from "../src/api/types.ts";
import { mustRun } from "../src/kernel/runner.ts";
import { ours } from "../src/kube/client.ts";
import { Sandbox } from "../src/sandbox/sandbox.ts";
import { EXTERNAL, nsRunner } from "../src/sandbox/topology.ts";
import { EDGE_GATEWAY_YAML } from "../test/fixtures/manifests.ts";
import { probeUntil, startIn, stopAll } from "../test/support/lab.ts";
import { settle, steadyShare } from "./quiet.ts";

const EIP = "192.168.77.100";
const COUNTS = (process.env.PERPACKET_COUNTS ?? "1,1000,10000").split(",").map(Number);
const SECONDS = Number(process.env.PERPACKET_SECONDS ?? 5);
const ROUNDS = Number(process.env.PERPACKET_ROUNDS ?? 3);
const AGAIN = process.env.PERPACKET_AGAIN !== "0";
const FILTERS = (process.env.PERPACKET_FILTERS ?? "iptables,nftables").split(",") as (
  | "iptables"
  | "nftables"
)[];

interface Figures {
  readonly tcpGbps: number;
  readonly udpKpps: number;
}

async function iperf(netns: string, udp: boolean): Promise<number> {
  const args = udp ? ["-u", "-l", "64", "-b", "0", "-t", String(SECONDS)] : ["-t", String(SECONDS)];
  const out = await mustRun(nsRunner(netns), ["iperf3", "-c", EXTERNAL[4], "-J", ...args], {
    timeoutMs: (SECONDS + 20) * 1000,
  });
  const j = JSON.parse(out) as {
    end: {
      sum_received?: { bits_per_second: number };
      sum?: { packets: number; lost_packets: number; seconds: number };
    };
  };
  if (udp) {
    const s = j.end.sum!;
    return (s.packets - s.lost_packets) / s.seconds / 1000;
  }
  return j.end.sum_received!.bits_per_second / 1e9;
}

async function measure(netns: string): Promise<Figures> {
  return { tcpGbps: round(await iperf(netns, false)), udpKpps: round(await iperf(netns, true)) };
}

/**
 * Each of `netns` measured in turn, the order rotated every round (a b c, b c a, c a b, …),
 * `ROUNDS` times each: the medians.
 */
async function sideBySide(netns: readonly string[]): Promise<Figures[]> {
  const runs: Figures[][] = netns.map(() => []);
  for (let i = 0; i < ROUNDS; i++)
    for (let j = 0; j < netns.length; j++) {
      const k = (i + j) % netns.length;
      runs[k]!.push(await measure(netns[k]!));
    }
  const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
  return runs.map((fs) => ({
    tcpGbps: median(fs.map((f) => f.tcpGbps)),
    udpKpps: median(fs.map((f) => f.udpKpps)),
  }));
}

function round(x: number): number {
  return Math.round(x * 1000) / 1000;
}

async function parallel<T>(items: readonly T[], limit: number, fn: (t: T) => Promise<unknown>) {
  let next = 0;
  await Promise.all(
    Array.from({ length: limit }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

const policyObject = (
  name: string,
  priority: number,
  destination: string,
  matchLabels: Record<string, string>,
) => ({
  apiVersion: API_VERSION,
  kind: "EgressPolicy",
  metadata: { name, namespace: "default" },
  spec: {
    gateway: "edge",
    podSelector: { matchLabels },
    destinationCIDRs: [destination],
    egressIP: [EIP],
    priority,
  },
});

/** What node-1's kernel holds of the policies in front: rules (iptables) or entries (nftables). */
async function programmed(sb: Sandbox, filter: string): Promise<number> {
  const r = nsRunner(sb.nodeNs(1));
  if (filter === "iptables") {
    const save = await mustRun(r, ["iptables-save", "-t", "mangle"]);
    return save
      .split("\n")
      .filter(
        (l) =>
          l.startsWith("-A SALLYPORT-MARK-REQUEST") && l.includes("EgressPolicy/default/front-"),
      ).length;
  }
  const json = await mustRun(r, ["nft", "-j", "list", "table", "inet", "sallyport"]);
  // The policies in front name 10.200.0.0/14 (the pods' own addresses, 10.244.x.y, do not count).
  return (
    (json.match(/"range": \["10\.20[0-3]\./g) ?? []).length +
    (json.match(/"10\.20[0-3]\.\d+\.\d+"/g) ?? []).length
  );
}

/** Polls `programmed` every second until node-1 holds `want` policies in front (at most 30 min). */
async function programmedUntil(sb: Sandbox, filter: string, want: number): Promise<number> {
  let held: number | undefined;
  for (let t = 0; t < 1800 && held !== want; t++) {
    if (t > 0) await new Promise((r) => setTimeout(r, 1000));
    held = await programmed(sb, filter).catch(() => held);
  }
  return held ?? -1;
}

/**
 * One row: the machine's steady busy share (20 s, nothing measured: what the agents, controller
 * and API server keep doing with these policies), then the measured pod and the solo pod side
 * by side.
 */
async function row(sb: Sandbox): Promise<Record<string, unknown>> {
  const steadyBusy = await steadyShare();
  const [figures, solo, nodeToNode] = await sideBySide([
    sb.pod("perf").netns,
    sb.pod("solo").netns,
    sb.nodeNs(1),
  ]);
  return {
    ...figures!,
    solo,
    nodeToNode,
    tcpVsSolo: round(figures!.tcpGbps / solo!.tcpGbps),
    udpVsSolo: round(figures!.udpKpps / solo!.udpKpps),
    steadyBusy,
  };
}

export async function perpacket(): Promise<Record<string, unknown>> {
  const result: Record<string, unknown> = { seconds: SECONDS, counts: COUNTS };
  for (const filter of FILTERS) {
    const sb = await Sandbox.up({
      prefix: `spbpp${filter[0]}`,
      nodes: 2,
      families: [4],
      dir: mkdtempSync(join(tmpdir(), "sallyport-bench-")),
      agentArgs: ["--datapath", filter],
    });
    try {
      // The measured policy selects both pods; the policies in front, "perf" only.
      await sb.addPod("perf", { node: 1, labels: { app: "perf", egress: "measured" } });
      await sb.addPod("solo", { node: 1, labels: { app: "solo", egress: "measured" } });
      await sb.addPod("plain", { node: 1, labels: { app: "none" } });
      startIn(sb.externalNs, ["iperf3", "-s"]);
      await sb.apply(EDGE_GATEWAY_YAML);
      const admin = sb.admin();
      await admin.create(
        ours("EgressPolicy"),
        policyObject("measured", 0, `${EXTERNAL[4]}/32`, { egress: "measured" }),
      );
      for (const pod of ["perf", "solo"]) {
        const seen = await probeUntil(
          sb.pod(pod).netns,
          `${EXTERNAL[4]}:8080`,
          (x) => x.saw === EIP,
          60_000,
        );
        if (seen.saw !== EIP)
          throw new Error(
            `Cannot measure: pod ${pod}'s traffic does not leave with ${EIP} (${seen.saw})`,
          );
      }
      await settle(30_000);
      const steadyBusy = await steadyShare();
      const quietBelow = Math.max(0.1, steadyBusy + 0.05);
      // Node to node is measured in every row (`row`), beside the pods.
      const references = {
        steadyBusy,
        unselectedPod: await measure(sb.pod("plain").netns),
      };
      const rows: Record<string, unknown> = { references };
      let created = 0;
      for (const count of COUNTS) {
        const want = count - 1;
        const names = Array.from({ length: want - created }, (_, k) => created + k);
        const started = performance.now();
        await parallel(names, 16, (i) =>
          admin.create(
            ours("EgressPolicy"),
            policyObject(
              `front-${i}`,
              10,
              `10.${200 + (i >> 16)}.${(i >> 8) & 255}.${i & 255}/32`,
              { app: "perf" },
            ),
          ),
        );
        created = want;
        const held = await programmedUntil(sb, filter, want);
        const programMs = Math.round(performance.now() - started);
        // The controller writes every policy's programmed status after its rules are in: at
        // 10,000 that takes minutes of API server time (3 min were not enough twice).
        const quiet = await settle(Math.max(180_000, count * 90), quietBelow);
        rows[String(count)] = {
          ...(await row(sb)),
          programmedInFront: held,
          programMs,
          ...quiet,
        };
        console.error(`${filter} ${count}: ${JSON.stringify(rows[String(count)])}`);
      }
      // The 1-policy figure once more, the policies in front deleted: what the machine itself
      // drifted by while the rows were measured (a VM's neighbours, its clock), which the
      // sequential ratios (tcpVs1) include and the side-by-side ones (tcpVsSolo) do not.
      if (AGAIN && created > 0) {
        const started = performance.now();
        await parallel(
          Array.from({ length: created }, (_, i) => i),
          16,
          (i) => admin.delete(ours("EgressPolicy"), `front-${i}`, "default"),
        );
        const held = await programmedUntil(sb, filter, 0);
        const quiet = await settle(Math.max(180_000, created * 90), quietBelow);
        rows.again = {
          ...(await row(sb)),
          programmedInFront: held,
          deleteMs: Math.round(performance.now() - started),
          ...quiet,
        };
        console.error(`${filter} 1 again: ${JSON.stringify(rows.again)}`);
      }
      type Row = Figures & { nodeToNode: Figures } & Record<string, unknown>;
      const base = rows["1"] as Row | undefined;
      for (const key of [...COUNTS.map(String), ...(rows.again === undefined ? [] : ["again"])]) {
        const r = rows[key] as Row;
        // Against node to node measured in the same row: the machine's speed at that moment.
        r.tcpVsNode = round(r.tcpGbps / r.nodeToNode.tcpGbps);
        r.udpVsNode = round(r.udpKpps / r.nodeToNode.udpKpps);
        if (base !== undefined) {
          r.tcpVs1 = round(r.tcpGbps / base.tcpGbps);
          r.udpVs1 = round(r.udpKpps / base.udpKpps);
          // The same, each row taken relative to its own node-to-node figure: the sequential
          // ratio without what the machine drifted by between the rows.
          r.tcpVs1ByNode = round(
            r.tcpGbps / r.nodeToNode.tcpGbps / (base.tcpGbps / base.nodeToNode.tcpGbps),
          );
          r.udpVs1ByNode = round(
            r.udpKpps / r.nodeToNode.udpKpps / (base.udpKpps / base.nodeToNode.udpKpps),
          );
        }
      }
      result[filter] = rows;
    } finally {
      await stopAll();
      await sb.destroy();
    }
  }
  return result;
}
