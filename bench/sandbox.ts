/**
 * End-to-end benchmarks in the sandbox (3 nodes, IPv4, default agent and lease settings).
 *
 *   failover  the gateway node holding the egress IP is cut off (uplink down, agent killed) while
 *             a pod sends a TCP request every 20 ms; the gap is from the last request answered
 *             from the egress IP before the cut to the first one after it; a long-lived TCP
 *             connection and a UDP flow cross it too. The node is revived between trials, so
 *             successive trials alternate between the two gateway nodes (see failover()).
 *   new-pod   pods created through CNI ADD join a selected set one by one; each sends UDP every
 *             20 ms from the moment ADD returns. Time from ADD returning to the first datagram
 *             the external server sees from the egress IP; leaks are datagrams of the new pods
 *             the server saw from any other address.
 *   policy    100 pods already sending; a policy selecting them is created; time until the
 *             server has seen every one of them from the egress IP. Then 1,000 more policies
 *             over the same pods (policies1000Ms, below). On each packet filter, one sandbox
 *             each: the top-level figures are iptables', `nftables` holds the same for nftables.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { mustRun } from "../src/kernel/runner.ts";
import { ours } from "../src/kube/client.ts";
import type { Family } from "../src/lib/ip.ts";
import { FailoverProbe, stream, udpStream } from "../src/sandbox/probe.ts";
import { Sandbox, type SandboxPod } from "../src/sandbox/sandbox.ts";
import { EXTERNAL, nsRunner } from "../src/sandbox/topology.ts";
import { EDGE_GATEWAY_YAML } from "../test/fixtures/manifests.ts";
import { reportedDown } from "../test/support/kube.ts";
import { settle } from "./quiet.ts";

const EIP = "192.168.77.100";
const EIP6 = "fd00:77::100";
const EIP_POOL = `pool: ["192.168.77.100-192.168.77.120"]`;
const EIP6_POOL = `pool: ["fd00:77::100-fd00:77::120"]`;
const TARGET = `${EXTERNAL[4]}:8080`;

function policy(name: string, app: string, eip = EIP, family: Family = 4): string {
  return `apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: ${name}, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {app: ${app}}}
  destinationCIDRs: ["${EXTERNAL[family]}/${family === 4 ? 32 : 128}"]
  egressIP: ["${eip}"]
`;
}

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!;
}

type Filter = "iptables" | "nftables";

async function sandbox(name: string, filter?: Filter): Promise<Sandbox> {
  return Sandbox.up({
    prefix: `spb${name}`,
    nodes: 3,
    families: [4],
    dir: mkdtempSync(join(tmpdir(), "sallyport-bench-")),
    // SALLYPORT_BENCH_CNI=0: without sallyport-cni, for comparison.
    sallyportCni: process.env.SALLYPORT_BENCH_CNI !== "0",
    ...(filter === undefined ? {} : { agentArgs: ["--datapath", filter] }),
  });
}

async function status(sb: Sandbox, name: string) {
  return (
    await sb.admin().get<{
      metadata: object;
      status?: {
        gatewayNode?: string;
        programmed?: string;
        conditions?: { type: string; status: string }[];
      };
    }>(ours("EgressPolicy"), name, "default")
  ).status;
}

/** How many of the EgressPolicies in "default" list `node` as the first standby. */
async function standbyCount(sb: Sandbox, node: string): Promise<number> {
  const list = await sb
    .admin()
    .listAll<{ metadata: object; status?: { standbyNodes?: string[] } }>(ours("EgressPolicy"), {
      namespace: "default",
    });
  return list.items.filter((p) => p.status?.standbyNodes?.[0] === node).length;
}

async function until<T>(
  get: () => Promise<T>,
  ok: (v: T) => boolean,
  ms: number,
  everyMs = 50,
): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await get().catch(() => undefined as T);
    if (ok(v) || Date.now() > end) return v;
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A UDP sender in a pod: its name, every 20 ms, to the external server (a test tool). */
function sender(pod: SandboxPod): ChildProcess {
  const [host, port] = TARGET.split(":");
  const script = `while :; do echo ${pod.name} > /dev/udp/${host}/${port}; sleep 0.02; done`;
  return spawn("ip", ["netns", "exec", pod.netns, "bash", "-c", script], { stdio: "ignore" });
}

interface FailoverOptions {
  readonly trials: number;
  readonly family: Family;
  /** Kill the controller (the sandbox's only one, so its leader) at the same moment. */
  readonly killLeader: boolean;
  /** Policies held by the gateway nodes besides the measured one. */
  readonly policies: number;
}

function failoverOptions(argv: readonly string[]): FailoverOptions {
  const value = (flag: string) => {
    const i = argv.indexOf(flag);
    return i < 0 ? undefined : argv[i + 1];
  };
  return {
    trials: Number(value("--trials") ?? 20),
    family: argv.includes("--ipv6") ? 6 : 4,
    killLeader: argv.includes("--kill-leader"),
    policies: Number(value("--policies") ?? 0),
  };
}

/**
 * failover: per trial, three clients in a pod of node-1 through the egress IP while the holder is
 * cut off (uplink down, agent killed): a new TCP request every 20 ms, each waiting 100 ms at most
 * (`p50Ms`/`p99Ms`: last answer before the cut to the first after it), one long-lived TCP
 * connection sending a line every 20 ms (`resets`: connections that broke) and one UDP flow
 * sending a datagram every 20 ms (`udpLost`: datagrams never answered; `udpGap…`: the longest
 * time between two answers). Flags: --ipv6, --kill-leader (the controller dies at the
 * same moment), --policies N (N more policies held by the gateway nodes), --trials N.
 */
export async function failover(argv: readonly string[] = process.argv.slice(3)) {
  const o = failoverOptions(argv);
  const eip = o.family === 4 ? EIP : EIP6;
  const target = o.family === 4 ? TARGET : `[${EXTERNAL[6]}]:8080`;
  const sb = await Sandbox.up({
    prefix: "spbfo",
    nodes: 3,
    families: [o.family],
    dir: mkdtempSync(join(tmpdir(), "sallyport-bench-")),
    sallyportCni: process.env.SALLYPORT_BENCH_CNI !== "0",
  });
  try {
    const pod = await sb.addPod("client", { node: 1, labels: { app: "web" } });
    await sb.apply(
      (o.family === 4 ? EDGE_GATEWAY_YAML : EDGE_GATEWAY_YAML.replace(EIP_POOL, EIP6_POOL)) +
        "---\n" +
        policy("web", "web", eip, o.family),
    );
    if (o.policies > 0) await manyPolicies(sb, o.policies, "web", eip, o.family);
    // Every policy programmed on every node it targets, then a quiet machine: a failover measured
    // while the agents still program the policies that were just created measures that backlog.
    const total = o.policies + 1;
    const ready = await until(
      async () =>
        (
          await sb.admin().listAll<{
            metadata: object;
            status?: { conditions?: { type: string; status: string }[] };
          }>(ours("EgressPolicy"), { namespace: "default" })
        ).items.filter(
          (p) => p.status?.conditions?.find((c) => c.type === "Ready")?.status === "True",
        ).length,
      (n) => n >= total,
      600_000,
    );
    if (ready < total) throw new Error(`after 600 s only ${ready} of ${total} policies are Ready`);
    // (A sandbox with one policy is as quiet as it gets at once: its three agents, API server and
    // controller keep 2 cores over the threshold; waiting would only cost 180 s.)
    if (o.policies > 0) {
      const quiet = await settle();
      console.error(
        `${total} policies Ready; quiet after ${quiet.settledMs} ms (${quiet.settled})`,
      );
    }
    const gaps: number[] = [];
    const udpGaps: number[] = [];
    let resets = 0;
    let udpLost = 0;
    for (let i = 0; i < o.trials; i++) {
      const holder = Number((await status(sb, "web"))!.gatewayNode!.split("-")[1]);
      // A request waits 100 ms for its answer: the gap is measured to ~120 ms (the UDP flow's
      // gap to 20 ms).
      const probe = new FailoverProbe(pod.netns, target, eip, 20, 100);
      await probe.start();
      const tcp = stream(pod.netns, target, 4, 20);
      const udp = udpStream(pod.netns, target, 4, 20);
      await new Promise((r) => setTimeout(r, 1000));
      const cut = Date.now();
      await Promise.all([sb.killNode(holder), o.killLeader ? sb.stopController("SIGKILL") : 0]);
      const gap = await probe.gapAfter(cut, 30_000);
      await probe.stop();
      const [t, u] = await Promise.all([tcp, udp]);
      if (gap === undefined) throw new Error(`trial ${i}: traffic did not come back`);
      gaps.push(gap);
      if (t.reset || t.echoed === 0) resets++;
      udpLost += u.lost;
      udpGaps.push(u.maxGapMs);
      console.error(
        `trial ${i + 1}: node-${holder} cut, gap ${gap} ms, tcp ${t.reset ? "reset" : `${t.echoed}/${t.sent} echoed`}, udp lost ${u.lost}/${u.sent} (gap ${u.maxGapMs} ms)`,
      );
      await sb.reviveNode(holder);
      if (o.killLeader) await sb.startController();
      // Wait until the revived node is a live gateway candidate again, for the controller and for
      // the data plane (no node holds it down any more: its hold-down has passed).
      await until(
        () =>
          sb
            .admin()
            .get<{ metadata: object; status?: { readyNodes?: number } }>(
              ours("EgressGateway"),
              "edge",
            ),
        (g) => g?.status?.readyNodes === 2,
        60_000,
      );
      await until(
        () => reportedDown(sb.admin()),
        // (undefined: the API server did not answer)
        (down) => down?.length === 0,
        60_000,
      );
      // Every policy lists the revived node as its standby again (the controller re-publishes
      // the lists 1 s after the node is back, one status write per policy): the next trial's
      // takeover is decided by those lists.
      const revived = `node-${holder}`;
      const since = Date.now();
      const listed = await until(
        () => standbyCount(sb, revived),
        (n) => n === total,
        180_000,
      );
      console.error(
        `node-${holder} back: standby of ${listed ?? "?"}/${total} policies after ${Date.now() - since} ms`,
      );
      if (listed !== total) {
        // What the controller decided, and the reports it decided on.
        const web = await status(sb, "web");
        const egressNodes = await sb
          .admin()
          .listAll<{ metadata: { name?: string }; status?: { downNodes?: string[] } }>(
            ours("EgressNode"),
          );
        const down = egressNodes.items.map(
          (n) => `${n.metadata.name}: [${n.status?.downNodes?.join(",") ?? ""}]`,
        );
        throw new Error(
          `trial ${i}: ${revived} is not every policy's standby (web: ${JSON.stringify(web)}; downNodes ${down.join("; ")})`,
        );
      }
      // and the revived node has programmed what it carries again
      if (o.policies > 0) await settle(60_000);
      else await new Promise((r) => setTimeout(r, 1000));
    }
    return {
      bench: "failover",
      family: o.family,
      killLeader: o.killLeader,
      policies: o.policies + 1,
      trials: o.trials,
      p50Ms: percentile(gaps, 50),
      p99Ms: percentile(gaps, 99),
      maxMs: Math.max(...gaps),
      udpGapP50Ms: percentile(udpGaps, 50),
      udpGapP99Ms: percentile(udpGaps, 99),
      resets,
      udpLost,
    };
  } finally {
    await sb.destroy();
  }
}

/**
 * `count` policies on the gateway `edge` (16 created at a time, as a deployment tool would), each
 * selecting the pods labelled app=`app` with its own destination and the shared egress IP.
 */
async function manyPolicies(
  sb: Sandbox,
  count: number,
  app: string,
  eip: string,
  family: Family = 4,
): Promise<void> {
  const admin = sb.admin();
  let next = 0;
  await Promise.all(
    Array.from({ length: 16 }, async () => {
      while (next < count) {
        const i = next++;
        await admin.create(ours("EgressPolicy"), {
          apiVersion: "sallyport.dev/v1alpha1",
          kind: "EgressPolicy",
          metadata: { name: `many-${i}`, namespace: "default" },
          spec: {
            gateway: "edge",
            podSelector: { matchLabels: { app } },
            destinationCIDRs: [
              family === 4
                ? `10.${200 + (i >> 16)}.${(i >> 8) & 255}.${i & 255}/32`
                : `fd00:200::${i.toString(16)}/128`,
            ],
            egressIP: [eip],
          },
        });
      }
    }),
  );
}

/**
 * new-pod: pods created through CNI ADD (sallyport-cni last in every node's list), each sending
 * from its first moment: its sender starts as soon as ADD returns, and the Pod's status is
 * reported Running at once. `p99Ms`: from ADD returning to the first datagram the server saw
 * from the egress IP; `leaks`: datagrams of the new pods seen from any other address (the
 * node's); `addMs`: how long ADD took (the agent's partial sync included).
 */
export async function newPod(trials = Number(process.env.SALLYPORT_BENCH_PODS ?? 60)) {
  const sb = await sandbox("np");
  const senders: ChildProcess[] = [];
  try {
    await sb.addPod("seed", { node: 1, labels: { app: "web" } });
    await sb.apply(EDGE_GATEWAY_YAML + "---\n" + policy("web", "web"));
    await until(
      () => status(sb, "web"),
      (s) => s?.conditions?.find((c) => c.type === "Ready")?.status === "True",
      30_000,
    );
    const gateway = (await status(sb, "web"))?.gatewayNode;
    const times: number[] = [];
    const onGateway: number[] = [];
    const adds: number[] = [];
    let leaks = 0;
    for (let i = 0; i < trials; i++) {
      const addStart = Date.now();
      const pod = await sb.addPodNetwork(`new-${i}`, { node: 1 + (i % 3), labels: { app: "web" } });
      const added = Date.now();
      adds.push(added - addStart);
      const s = sender(pod);
      senders.push(s);
      await sb.registerPod(pod);
      const seen = await until(
        async () => sb.externalRequests().filter((r) => r.data === pod.name),
        (rs) => rs.some((r) => r.src === EIP),
        15_000,
      );
      const first = seen.find((r) => r.src === EIP);
      if (first === undefined) throw new Error(`${pod.name}: never seen from the egress IP`);
      (sb.nodeName(pod.node) === gateway ? onGateway : times).push(first.t - added);
      await new Promise((r) => setTimeout(r, 300));
      s.kill("SIGKILL");
      const leaked = sb.externalRequests().filter((r) => r.data === pod.name && r.src !== EIP);
      leaks += leaked.length;
      console.error(
        `${pod.name} on node-${pod.node}${sb.nodeName(pod.node) === gateway ? " (the gateway)" : ""}: ADD ${added - addStart} ms, first from the egress IP ${first.t - added} ms after; ${leaked.length} leaked`,
      );
    }
    const all = [...times, ...onGateway];
    // The agents' own share of ADD: from the plugin's request to the kernel holding the sets.
    const agentAdds: number[] = [];
    for (let i = 1; i <= 3; i++)
      for (const line of sb.log(`agent-${i}`).split("\n"))
        if (line.includes("CNI ADD: the kernel holds"))
          agentAdds.push((JSON.parse(line) as { ms: number }).ms);
    return {
      bench: "new-pod",
      sallyportCni: process.env.SALLYPORT_BENCH_CNI !== "0",
      trials,
      p50Ms: percentile(all, 50),
      p99Ms: percentile(all, 99),
      maxMs: Math.max(...all),
      otherNodesP50Ms: percentile(times, 50),
      otherNodesP99Ms: percentile(times, 99),
      gatewayNodeP99Ms: percentile(onGateway, 99),
      addP50Ms: percentile(adds, 50),
      addP99Ms: percentile(adds, 99),
      agentAddP50Ms: percentile(agentAdds, 50),
      agentAddP99Ms: percentile(agentAdds, 99),
      leaks,
    };
  } finally {
    for (const s of senders) s.kill("SIGKILL");
    await sb.destroy();
  }
}

/** `POLICY_FILTERS=nftables` measures one packet filter only (default: both). */
export async function policyBench(pods = 100) {
  const filters = (process.env.POLICY_FILTERS ?? "iptables,nftables").split(",");
  const iptables = filters.includes("iptables") ? await policyOn("iptables", pods) : {};
  const nftables = filters.includes("nftables")
    ? { nftables: await policyOn("nftables", pods) }
    : {};
  return { bench: "policy", pods, ...iptables, ...nftables };
}

async function policyOn(filter: Filter, pods: number) {
  const sb = await sandbox(`po${filter[0]}`, filter);
  const senders: ChildProcess[] = [];
  try {
    await sb.apply(EDGE_GATEWAY_YAML);
    const all: SandboxPod[] = [];
    for (let i = 0; i < pods; i++) {
      const pod = await sb.addPod(`p-${i}`, { node: 1 + (i % 3), labels: { app: "fleet" } });
      all.push(pod);
      senders.push(sender(pod));
    }
    await new Promise((r) => setTimeout(r, 2000));
    const t0 = Date.now();
    await sb.apply(policy("fleet", "fleet"));
    const names = new Set(all.map((p) => p.name));
    const done = await until(
      async () => {
        const via = new Set(
          sb
            .externalRequests()
            .filter((r) => r.t >= t0 && r.src === EIP && names.has(r.data ?? ""))
            .map((r) => r.data),
        );
        return via.size;
      },
      (n) => n === pods,
      60_000,
    );
    if (done !== pods) throw new Error(`only ${done} of ${pods} pods reached the egress IP`);
    const via = sb
      .externalRequests()
      .filter((r) => r.t >= t0 && r.src === EIP && names.has(r.data ?? ""));
    const firstPerPod = new Map<string, number>();
    for (const r of via) if (!firstPerPod.has(r.data!)) firstPerPod.set(r.data!, r.t);
    const ms = Math.max(...firstPerPod.values()) - t0;
    for (const s of senders) s.kill("SIGKILL");
    return { ms, policies1000Ms: await thousandPolicies(sb, all, filter) };
  } finally {
    for (const s of senders) s.kill("SIGKILL");
    await sb.destroy();
  }
}

/**
 * 1,000 policies created through the API (16 at a time, as a deployment tool would), each
 * selecting the fleet's pods with its own destination and the shared egress IP: the time until
 * every node's kernel holds all of them (iptables: each node's mangle table has a rule per
 * policy; nftables: each node's table holds every policy's destination).
 */
async function thousandPolicies(
  sb: Sandbox,
  pods: readonly SandboxPod[],
  filter: Filter,
): Promise<number> {
  const count = 1000;
  const t0 = Date.now();
  await manyPolicies(sb, count, "fleet", EIP);
  const nodes = [...new Set(pods.map((p) => p.node))];
  const heldOn = async (n: number) => {
    const r = nsRunner(sb.nodeNs(n));
    if (filter === "iptables") {
      const save = await mustRun(r, ["iptables-save", "-t", "mangle"]);
      return new Set(save.match(/EgressPolicy\/default\/many-\d+/g) ?? []).size;
    }
    const json = await mustRun(r, ["nft", "-j", "list", "table", "inet", "sallyport"]);
    return new Set(json.match(/"10\.200\.\d+\.\d+"/g) ?? []).size;
  };
  const held = async () => {
    let min = Number.POSITIVE_INFINITY;
    for (const n of nodes) min = Math.min(min, await heldOn(n));
    return min;
  };
  // Three nodes' listings every 50 ms (`iptables-save` of 3,000 rules: ~30 ms each on an idle
  // machine, more on a busy one) kept most of a core from the agents they measure: the same code
  // measured 64 s on iptables polled every 50 ms, 34 s polled once a second. Once a second.
  const got = await until(held, (n) => n >= count, 300_000, 1000);
  if (got < count) throw new Error(`after 300 s only ${got} of ${count} policies are programmed`);
  return Date.now() - t0;
}
