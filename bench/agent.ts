/**
 * Agent benchmark: the real agent code path — watch events from a real kube-apiserver in, kernel
 * commands out in a fresh network namespace — on a gateway node carrying 1,000 policies whose
 * 100,000 endpoints (in 1,000 endpoint slices) run on 100 other nodes.
 *
 *   podAddP99Ms            a pod of this node becomes Running with an IP: from its watch event
 *                          to the kernel command returning, planning included (goal ≤ 20)
 *   foreignStatusMs        another node's EgressNode status write: time to handle its watch
 *                          event (p99; goal ≤ 1)
 *   foreignStatusCommands  kernel commands those events caused (goal 0); foreignStatusPlans the
 *                          plans they caused
 *   initialSyncMs          from the agent's start to the kernel holding all 1,000 policies
 *
 * The agent's full sync (re-read the kernel, ~0.2 s at this size) runs every `PERIOD_MS`; it is
 * set beyond the measurement so that the figures are those of the event path (an event that
 * arrives during a full sync waits for it; that case is the datapath benchmark's resyncMs).
 */
import { Agent } from "../src/agent/agent.ts";
import { API_VERSION } from "../src/api/types.ts";
import { DEFAULT_NODE_CONFIG } from "../src/engine/view.ts";
import { openDatapath } from "../src/kernel/open.ts";
import { ExecRunner, mustRun, type Runner, type RunOptions } from "../src/kernel/runner.ts";
import { SpawnerRunner } from "../src/kernel/spawner.ts";
import { CORE, type KubeClient, ours } from "../src/kube/client.ts";
import { realClock } from "../src/lib/clock.ts";
import { silentLogger } from "../src/lib/log.ts";
import { datapathMetrics, Registry } from "../src/lib/metrics.ts";
import { ControlPlane, SALLYPORT_NAMESPACE } from "../src/sandbox/controlplane.ts";
import { nsRunner } from "../src/sandbox/topology.ts";
import { ensureNamespace } from "../test/support/kube.ts";

const NAMESPACES = 10;
const POLICIES_PER_NS = 100;
const ENDPOINTS_PER_POLICY = 100;
const PEERS = 100;
const POD_ADDS = 200;
const FOREIGN = 100;
const PERIOD_MS = 600_000;

/** Counts the commands an agent sends. */
class CountingRunner implements Runner {
  readonly #inner: Runner;
  count = 0;
  constructor(inner: Runner) {
    this.#inner = inner;
  }
  run(argv: readonly string[], options?: RunOptions) {
    this.count++;
    return this.#inner.run(argv, options);
  }
}

async function parallel<T>(items: readonly T[], limit: number, fn: (t: T) => Promise<unknown>) {
  let next = 0;
  await Promise.all(
    Array.from({ length: limit }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

async function until(ok: () => boolean | Promise<boolean>, ms: number, what: string) {
  const end = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > end) throw new Error(`Timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return Number((s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? Number.NaN).toFixed(2));
}

async function objects(admin: KubeClient): Promise<void> {
  const peers = Array.from({ length: PEERS }, (_, i) => i + 1);
  const egressNode = (name: string, id: number, address: string, podCIDR: string) =>
    admin.create(ours("EgressNode"), {
      apiVersion: API_VERSION,
      kind: "EgressNode",
      metadata: { name },
      spec: {
        nodeID: id,
        mark: `0x26${id.toString(16).padStart(4, "0")}00`,
        tunnel: {
          mac: `02:53:50:00:${(id >> 8).toString(16).padStart(2, "0")}:${(id & 255).toString(16).padStart(2, "0")}`,
          ipv4: `100.127.${id >> 8}.${(id & 255) + 1}`,
        },
        addresses: { ipv4: address },
        podCIDRs: [podCIDR],
        gatewayCapable: false,
      },
    });
  await egressNode("gw", 0, "10.1.0.1", "10.100.0.0/16");
  await parallel(peers, 16, (i) =>
    egressNode(`n${i}`, i, `10.1.0.${i + 1}`, `10.${100 + i}.0.0/16`),
  );
  await admin.create(ours("EgressGateway"), {
    apiVersion: API_VERSION,
    kind: "EgressGateway",
    metadata: { name: "edge" },
    spec: { nodeSelector: { matchLabels: { egress: "true" } }, pool: ["192.168.100.0/24"] },
  });
  await admin.create(ours("EgressClusterInfo"), {
    apiVersion: API_VERSION,
    kind: "EgressClusterInfo",
    metadata: { name: "default" },
    spec: {},
  });
  await admin.mergePatch(
    ours("EgressClusterInfo"),
    "default",
    { status: { ignoredCIDRs: ["10.0.0.0/8", "100.127.0.0/16"] } },
    { subresource: "status" },
  );
  const policies: { ns: string; k: number; p: number }[] = [];
  for (let n = 0; n < NAMESPACES; n++) {
    await ensureNamespace(admin, `ns-${n}`);
    for (let k = 0; k < POLICIES_PER_NS; k++)
      policies.push({ ns: `ns-${n}`, k, p: n * POLICIES_PER_NS + k });
  }
  await parallel(policies, 16, async ({ ns, k, p }) => {
    const eip = `192.168.100.${(p % 10) + 10}`;
    await admin.create(ours("EgressPolicy"), {
      apiVersion: API_VERSION,
      kind: "EgressPolicy",
      metadata: { name: `p${k}`, namespace: ns },
      spec: {
        podSelector: { matchLabels: { app: `p${k}` } },
        gateway: "edge",
        destinationCIDRs: [`203.0.${p % 256}.0/24`],
      },
    });
    // What the controller would publish: accepted, its egress IP on this node.
    await admin.mergePatch(
      ours("EgressPolicy"),
      `p${k}`,
      {
        status: {
          egressIPs: [eip],
          gatewayNode: "gw",
          revision: "bench",
          conditions: [
            {
              type: "Accepted",
              status: "True",
              reason: "Accepted",
              message: "",
              lastTransitionTime: new Date().toISOString(),
            },
          ],
        },
      },
      { namespace: ns, subresource: "status" },
    );
    const endpoints = Array.from({ length: ENDPOINTS_PER_POLICY }, (_, e) => {
      const v = p * ENDPOINTS_PER_POLICY + e;
      const node = (v % PEERS) + 1;
      const local = Math.floor(v / PEERS);
      return {
        pod: `${ns}/pod-${k}-${e}`,
        node: `n${node}`,
        ips: [`10.${100 + node}.${(local >> 8) & 255}.${local & 255}`],
      };
    });
    await admin.create(ours("EgressEndpointSlice"), {
      apiVersion: API_VERSION,
      kind: "EgressEndpointSlice",
      metadata: { name: `slice-${p}` },
      policy: `EgressPolicy/${ns}/p${k}`,
      endpoints,
    });
  });
}

export async function run(): Promise<Record<string, unknown>> {
  const ns = `spb${process.pid}ag`;
  const root = new ExecRunner();
  await root.run(["ip", "netns", "del", ns]);
  await mustRun(root, ["ip", "netns", "add", ns]);
  const cp = await ControlPlane.start({
    tag: "bench-agent",
    users: { agent: ["sallyport:agents"] },
  });
  let agent: Agent | undefined;
  try {
    const r = nsRunner(ns);
    await mustRun(r, ["ip", "link", "set", "lo", "up"]);
    await mustRun(r, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
    await mustRun(r, ["ip", "addr", "add", "10.1.0.1/16", "dev", "eth0"]);
    await mustRun(r, ["ip", "link", "set", "eth0", "up"]);
    await mustRun(r, ["ip", "link", "set", "eth1", "up"]);
    const admin = cp.client();
    const setupStart = Date.now();
    await objects(admin);
    const setupMs = Date.now() - setupStart;

    // As the agent process runs them (src/agent/main.ts): from the small helper process, which
    // here runs inside the node's network namespace, as an agent runs on its host.
    const runner = new CountingRunner(
      new SpawnerRunner({ within: ["nsenter", `--net=/run/netns/${ns}`] }),
    );
    agent = new Agent({
      client: cp.client("agent"),
      node: "gw",
      namespace: SALLYPORT_NAMESPACE,
      datapath: await openDatapath({ runner, families: [4] }),
      config: { ...DEFAULT_NODE_CONFIG, families: [4] },
      clock: realClock,
      log: silentLogger,
      metrics: datapathMetrics(new Registry()),
      periodMs: PERIOD_MS,
    });
    const a = agent;
    const started = performance.now();
    await a.start();
    const policies = NAMESPACES * POLICIES_PER_NS;
    await until(
      async () => {
        if ([...a.state.views()].length < policies) return false;
        await a.sync.idle();
        return a.sync.lastReport !== undefined && !a.state.planDirty;
      },
      300_000,
      "the initial sync",
    );
    await a.sync.idle();
    const initialSyncMs = Math.round(performance.now() - started);
    const sets = (await mustRun(r, ["ipset", "list", "-n"])).split("\n").length;

    {
      const { monitorEventLoopDelay } = await import("node:perf_hooks");
      const { readFileSync } = await import("node:fs");
      const h = monitorEventLoopDelay({ resolution: 1 });
      h.enable();
      const cpu0 = process.cpuUsage();
      const w0 = performance.now();
      await new Promise((r) => setTimeout(r, 3000));
      const cpu = process.cpuUsage(cpu0);
      const w = performance.now() - w0;
      h.disable();
      console.error(
        "DEBUG self cpu %",
        ((cpu.user + cpu.system) / 10 / w).toFixed(1),
        "loadavg",
        readFileSync("/proc/loadavg", "utf8").trim(),
        "loop p50",
        h.percentile(50) / 1e6,
      );
    }
    // Pods of this node, one at a time, each selected by one policy.
    const latencies: number[] = [];
    const planning: number[] = [];
    const waiting: number[] = [];
    const kernel: number[] = [];
    for (let i = 0; i < POD_ADDS; i++) {
      const n = i % NAMESPACES;
      const k = (i * 7) % POLICIES_PER_NS;
      const key = `EgressPolicy/ns-${n}/p${k}`;
      const name = `local-${i}`;
      const ip = `10.100.${i >> 8}.${(i & 255) + 1}`;
      await admin.create(CORE.pods, {
        apiVersion: "v1",
        kind: "Pod",
        metadata: { name, namespace: `ns-${n}`, labels: { app: `p${k}` } },
        spec: { nodeName: "gw", containers: [{ name: "app", image: "registry.invalid/app" }] },
      });
      await a.sync.idle();
      await admin.mergePatch(
        CORE.pods,
        name,
        { status: { phase: "Running", podIP: ip, podIPs: [{ ip }] } },
        { namespace: `ns-${n}`, subresource: "status" },
      );
      await until(
        () => a.state.view(key)?.endpoints.some((e) => e.pod === `ns-${n}/${name}`) === true,
        10_000,
        `pod ${name} in ${key}`,
      );
      await a.sync.idle();
      latencies.push(a.sync.lastLatencyMs ?? Number.NaN);
      planning.push(a.sync.lastPlanMs);
      waiting.push(a.sync.lastWaitMs);
      kernel.push(a.sync.lastReport?.durationMs ?? Number.NaN);
    }

    // Another node's status, written as agents do after each of their syncs.
    const handle: number[] = [];
    const commandsBefore = runner.count;
    const plansBefore = a.plans;
    for (let i = 0; i < FOREIGN; i++) {
      const peer = `n${(i % PEERS) + 1}`;
      await admin.mergePatch(
        ours("EgressNode"),
        peer,
        {
          status: {
            lastSync: new Date().toISOString(),
            repairs: i,
            programmed: { [`EgressPolicy/ns-0/p${i % 100}`]: `r${i}` },
          },
        },
        { subresource: "status" },
      );
      await until(() => a.egressNodes.get(peer)?.status?.repairs === i, 10_000, `${peer}'s status`);
      handle.push(a.lastEventMs);
    }
    await a.sync.idle();
    return {
      policies,
      endpoints: policies * ENDPOINTS_PER_POLICY,
      sets,
      setupMs,
      initialSyncMs,
      podAdds: POD_ADDS,
      podAddP50Ms: quantile(latencies, 0.5),
      podAddP99Ms: quantile(latencies, 0.99),
      podAddMaxMs: quantile(latencies, 1),
      podAddPlanP50Ms: quantile(planning, 0.5),
      podAddPlanP99Ms: quantile(planning, 0.99),
      podAddWaitP50Ms: quantile(waiting, 0.5),
      podAddWaitP99Ms: quantile(waiting, 0.99),
      podAddKernelP50Ms: quantile(kernel, 0.5),
      podAddKernelP99Ms: quantile(kernel, 0.99),
      foreignStatusWrites: FOREIGN,
      foreignStatusMs: quantile(handle, 0.99),
      foreignStatusMaxMs: quantile(handle, 1),
      foreignStatusCommands: runner.count - commandsBefore,
      foreignStatusPlans: a.plans - plansBefore,
    };
  } finally {
    await agent?.stop();
    await cp.stop();
    await root.run(["ip", "netns", "del", ns]);
  }
}
