/**
 * Churn benchmark: the controller (its own process, as deployed) against the real kube-apiserver
 * with 1,000 policies and 10,000 Pods on 100 nodes, while 50 pod changes per second arrive for
 * 60 s. Each change moves one pod out of, or back into, the one policy that selects it (its
 * `app` label), so each one should cost the controller exactly one slice write and one status
 * write. Measured:
 *
 *   writesPerChange      writes to sallyport.dev objects during the churn (from the API
 *                        server's apiserver_request_total) per change; goal ≤ 2
 *   changeToSliceP99Ms   from the pod PATCH returning to the slice showing the change (seen by a
 *                        watch in this process); goal ≤ 250
 *   cpuMsPerChange       the controller process's CPU time per change
 *   steadyWrites         writes in a quiet minute before the churn (goal 0)
 *
 * Shape: 100 namespaces × 10 policies (app a0…a9) × 100 pods (10 per policy); 3 gateway nodes
 * whose leases are renewed; one gateway with a /22 pool.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { API_VERSION } from "../src/api/types.ts";
import { CORE, type KubeObject, ours } from "../src/kube/client.ts";
import type { NodeLeaseRenewer } from "../src/kube/node_lease.ts";
import { Reflector } from "../src/kube/reflector.ts";
import { realClock } from "../src/lib/clock.ts";
import { silentLogger } from "../src/lib/log.ts";
import { ControlPlane, REPO } from "../src/sandbox/controlplane.ts";
import {
  apiWrites,
  createGateway,
  ensureNamespace,
  renewNodeLeases,
} from "../test/support/kube.ts";

const NODES = 100;
const NAMESPACES = 100;
const POLICIES_PER_NS = 10;
const PODS_PER_POLICY = 10;
const RATE = 50;
const SECONDS = 60;
const TIMING = { renewMs: 1000, durationMs: 5000, graceMs: 1000 };

async function parallel<T>(items: readonly T[], limit: number, fn: (t: T) => Promise<unknown>) {
  let next = 0;
  await Promise.all(
    Array.from({ length: limit }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

/** CPU time (user + system) of a process, in ms, from /proc. */
function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
}

interface Slice extends KubeObject {
  policy: string;
  endpoints: { pod: string }[];
}

export async function churn(): Promise<Record<string, unknown>> {
  const cp = await ControlPlane.start({
    tag: "churn",
    users: { controller: ["sallyport:controllers"], agent: ["sallyport:agents"] },
  });
  let controller: ChildProcess | undefined;
  let renewers = new Map<string, NodeLeaseRenewer>();
  let slices: Reflector<Slice> | undefined;
  try {
    const admin = cp.client();
    const t0 = Date.now();
    const nodes = Array.from({ length: NODES }, (_, i) => i);
    await parallel(nodes, 16, (i) =>
      admin.create(CORE.nodes, {
        apiVersion: "v1",
        kind: "Node",
        metadata: {
          name: `node-${i}`,
          labels: { "kubernetes.io/hostname": `node-${i}`, ...(i < 3 ? { egress: "true" } : {}) },
        },
        spec: { podCIDR: `10.${100 + (i >> 8)}.${i & 255}.0/24` },
      }),
    );
    await parallel(nodes, 16, (i) =>
      admin.mergePatch(
        CORE.nodes,
        `node-${i}`,
        {
          status: {
            addresses: [{ type: "InternalIP", address: `192.168.${i >> 8}.${(i & 255) + 1}` }],
          },
        },
        { subresource: "status" },
      ),
    );
    await createGateway(admin, ["10.200.0.0/22"]);
    renewers = renewNodeLeases(cp.client("agent"), ["node-0", "node-1", "node-2"], TIMING);
    const namespaces = Array.from({ length: NAMESPACES }, (_, n) => `ns-${n}`);
    await parallel(namespaces, 16, (ns) => ensureNamespace(admin, ns));
    const policies = namespaces.flatMap((ns) =>
      Array.from({ length: POLICIES_PER_NS }, (_, k) => ({ ns, k })),
    );
    await parallel(policies, 16, ({ ns, k }) =>
      admin.create(ours("EgressPolicy"), {
        apiVersion: API_VERSION,
        kind: "EgressPolicy",
        metadata: { name: `p${k}`, namespace: ns },
        spec: {
          podSelector: { matchLabels: { app: `a${k}` } },
          gateway: "edge",
          destinationCIDRs: [`203.0.${k}.0/24`],
        },
      }),
    );
    const pods: { ns: string; name: string; app: string; node: string; ip: string }[] = [];
    let seq = 0;
    for (const ns of namespaces) {
      for (let k = 0; k < POLICIES_PER_NS; k++) {
        for (let j = 0; j < PODS_PER_POLICY; j++) {
          const node = seq % NODES;
          pods.push({
            ns,
            name: `pod-${k}-${j}`,
            app: `a${k}`,
            node: `node-${node}`,
            ip: `10.${100 + (node >> 8)}.${node & 255}.${(seq >> 7) + 2}`,
          });
          seq++;
        }
      }
    }
    await parallel(pods, 32, async (p) => {
      await admin.create(CORE.pods, {
        apiVersion: "v1",
        kind: "Pod",
        metadata: { name: p.name, namespace: p.ns, labels: { app: p.app } },
        spec: { nodeName: p.node, containers: [{ name: "app", image: "registry.invalid/app" }] },
      });
      await admin.mergePatch(
        CORE.pods,
        p.name,
        { status: { phase: "Running", podIP: p.ip, podIPs: [{ ip: p.ip }] } },
        { namespace: p.ns, subresource: "status" },
      );
    });
    const setupMs = Date.now() - t0;

    // The controller, as deployed: its own process.
    controller = spawn(
      join(REPO, "node_modules", ".bin", "node"),
      [
        join(REPO, "src", "cli", "main.ts"),
        "controller",
        "--kubeconfig",
        cp.kubeconfig("controller"),
        "--identity",
        "bench",
        "--metrics-port",
        "0",
        "--lease-renew-ms",
        String(TIMING.renewMs),
        "--lease-duration-ms",
        String(TIMING.durationMs),
        "--lease-grace-ms",
        String(TIMING.graceMs),
      ],
      { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, LOG_LEVEL: "warn" } },
    );
    const pid = controller.pid!;

    slices = new Reflector<Slice>({
      client: admin,
      resource: ours("EgressEndpointSlice"),
      clock: realClock,
      log: silentLogger,
      onChange: (_type, s) => onSlice(s),
    });
    const members = new Map<string, Set<string>>();
    const waiting = new Map<string, { pod: string; present: boolean; sentAt: number }[]>();
    const latencies: number[] = [];
    const onSlice = (s: Slice) => {
      const set = new Set(s.endpoints.map((e) => e.pod));
      members.set(s.policy, set);
      const list = waiting.get(s.policy);
      if (list === undefined) return;
      const now = performance.now();
      waiting.set(
        s.policy,
        list.filter((w) => {
          if (set.has(w.pod) !== w.present) return true;
          latencies.push(now - w.sentAt);
          return false;
        }),
      );
    };
    slices.start();
    await slices.synced;
    // Settled: every policy has its slice with its 10 pods.
    const settleStart = Date.now();
    while (
      [...members.values()].filter((m) => m.size === PODS_PER_POLICY).length < policies.length
    ) {
      if (Date.now() - settleStart > 300_000)
        throw new Error(`the controller did not write all slices within 300 s (${members.size})`);
      await new Promise((r) => setTimeout(r, 500));
    }
    const settleMs = Date.now() - settleStart;

    // A quiet minute: nothing changes, nothing should be written.
    await new Promise((r) => setTimeout(r, 5000));
    const quietFrom = await apiWrites(admin);
    await new Promise((r) => setTimeout(r, 60_000));
    const steadyWrites = (await apiWrites(admin)) - quietFrom;

    // The churn.
    const writesBefore = await apiWrites(admin);
    const cpuBefore = cpuMs(pid);
    const out = new Set<number>();
    let changes = 0;
    const start = performance.now();
    const total = RATE * SECONDS;
    let failedPatches = 0;
    const inFlight: Promise<void>[] = [];
    for (let i = 0; i < total; i++) {
      const due = start + (i * 1000) / RATE;
      const wait = due - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      // Pods move out, and later back in, one at a time: every change touches one policy.
      const index = (i * 7919) % pods.length;
      const p = pods[index]!;
      const leaving = !out.has(index);
      if (leaving) out.add(index);
      else out.delete(index);
      const key = `EgressPolicy/${p.ns}/p${p.app.slice(1)}`;
      inFlight.push(
        admin
          .mergePatch(
            CORE.pods,
            p.name,
            { metadata: { labels: { app: leaving ? "idle" : p.app } } },
            { namespace: p.ns },
          )
          .then(() => {
            changes++;
            const list = waiting.get(key) ?? [];
            list.push({ pod: `${p.ns}/${p.name}`, present: !leaving, sentAt: performance.now() });
            waiting.set(key, list);
            // The watch may have delivered the slice before we got here.
            const now = members.get(key);
            if (now !== undefined)
              onSlice({ policy: key, endpoints: [...now].map((pod) => ({ pod })) } as Slice);
          })
          .catch(() => {
            failedPatches++;
          }),
      );
    }
    await Promise.all(inFlight);
    const churnMs = performance.now() - start;
    const drainStart = Date.now();
    while ([...waiting.values()].some((l) => l.length > 0) && Date.now() - drainStart < 30_000)
      await new Promise((r) => setTimeout(r, 200));
    const unresolved = [...waiting.values()].reduce((n, l) => n + l.length, 0);
    // Let the last writes land before counting them.
    await new Promise((r) => setTimeout(r, 3000));
    const writes = (await apiWrites(admin)) - writesBefore;
    const cpu = cpuMs(pid) - cpuBefore;
    latencies.sort((a, b) => a - b);
    const q = (f: number) =>
      Math.round(
        latencies[Math.min(latencies.length - 1, Math.floor(f * latencies.length))] ?? Number.NaN,
      );
    return {
      policies: policies.length,
      pods: pods.length,
      nodes: NODES,
      ratePerSecond: RATE,
      seconds: SECONDS,
      changes,
      failedPatches,
      achievedRate: Math.round((changes / churnMs) * 1000),
      setupMs,
      settleMs,
      steadyWrites,
      writes,
      writesPerChange: Number((writes / changes).toFixed(3)),
      changeToSliceP50Ms: q(0.5),
      changeToSliceP99Ms: q(0.99),
      changeToSliceMaxMs: Math.round(latencies.at(-1) ?? Number.NaN),
      unresolved,
      cpuMsPerChange: Number((cpu / changes).toFixed(2)),
    };
  } finally {
    slices?.stop();
    for (const r of renewers.values()) r.stop();
    if (controller !== undefined && controller.exitCode === null) {
      controller.kill("SIGKILL");
      await new Promise((r) => controller!.once("exit", r));
    }
    await cp.stop();
  }
}
