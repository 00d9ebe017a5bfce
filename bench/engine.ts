/**
 * Engine benchmark: the controller's full computation for 10,000 policies × 100,000 pods ×
 * 1,000 nodes; then, incrementally, one pod added, one gateway node holding egress IPs losing its
 * lease (new placements and statuses: the failover path), one policy added; and the datapath plan
 * of the busiest gateway node. Each incremental figure is the median of several runs.
 *
 * Shape: 1,000 namespaces × 100 pods; 10 policies per namespace, 9 selecting one app each and one
 * selecting the whole namespace (so every pod is in two overlapping policies); 8 gateway nodes;
 * pool, explicit and node-address policies mixed.
 */
import { ClusterEngine } from "../src/engine/cluster.ts";
import { planNode } from "../src/engine/node_plan.ts";
import { nodeViewFromOutcome } from "../src/engine/node_view.ts";
import type { PodInfo, Snapshot } from "../src/engine/snapshot.ts";
import { gateway, localFacts, node, pod, policy, snapshot } from "../src/engine/testing.ts";

const NODES = 1000;
const NAMESPACES = 1000;
const PODS_PER_NS = 100;
const POLICIES_PER_NS = 10;
const GATEWAY_NODES = 8;

function ip4(n: number, base: number): string {
  return `${base}.${(n >> 16) & 255}.${(n >> 8) & 255}.${n & 255}`;
}

export function buildSnapshot(): Snapshot {
  const nodes = Array.from({ length: NODES }, (_, i) =>
    node(`node-${i}`, {
      ipv4: ip4(i + 10, 192),
      labels: i < GATEWAY_NODES ? { egress: "true" } : {},
      podCIDRs: [`${ip4(i << 8, 10)}/24`],
    }),
  );
  const pods: PodInfo[] = [];
  const policies = [];
  let podSeq = 0;
  for (let n = 0; n < NAMESPACES; n++) {
    const ns = `ns-${n}`;
    for (let p = 0; p < PODS_PER_NS; p++) {
      const nodeIndex = (podSeq * 7919) % NODES;
      pods.push(
        pod(ns, `pod-${p}`, `node-${nodeIndex}`, [ip4((nodeIndex << 8) | (podSeq % 250), 10)], {
          app: `app-${p % 9}`,
        }),
      );
      podSeq++;
    }
    for (let k = 0; k < POLICIES_PER_NS; k++) {
      const whole = k === 9;
      const mode = k % 5;
      policies.push(
        policy(
          ns,
          `policy-${k}`,
          {
            ...(whole ? {} : { podSelector: { matchLabels: { app: `app-${k}` } } }),
            destinationCIDRs: [`203.0.${k}.0/24`, ...(whole ? ["198.51.100.0/24"] : [])],
            priority: whole ? 0 : 10,
            ...(mode === 1 ? { egressIP: [`10.200.${n % 200}.${k}`] } : {}),
            ...(mode === 2 ? { useNodeIP: true } : {}),
          },
          { created: `2026-01-01T00:00:${String(k).padStart(2, "0")}Z` },
        ),
      );
    }
  }
  return snapshot({
    nodes,
    pods,
    policies,
    gateways: [gateway("edge", { pool: ["10.128.0.0/16", "10.200.0.0/16"] })],
    serviceCIDRs: ["10.96.0.0/16"],
  });
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function heapMB(): number {
  return process.memoryUsage().heapUsed / 1024 / 1024;
}

export async function run() {
  const s = buildSnapshot();
  let peakHeap = heapMB();
  const fulls: number[] = [];
  let engine: ClusterEngine | undefined;
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    engine = new ClusterEngine(s);
    const outcome = engine.compute();
    fulls.push(performance.now() - t0);
    peakHeap = Math.max(peakHeap, heapMB());
    if (i === 0) {
      const accepted = [...outcome.policies.values()].filter((p) => p.accepted).length;
      console.error(`policies accepted: ${accepted}/${outcome.policies.size}`);
    }
  }
  const onePod: number[] = [];
  for (let i = 0; i < 50; i++) {
    const p = pod(`ns-${i}`, `new-${i}`, `node-${i}`, [ip4((i << 8) | 251, 10)], { app: "app-3" });
    const t0 = performance.now();
    engine!.setPod(p);
    engine!.compute();
    onePod.push(performance.now() - t0);
  }
  // Lease loss: the gateway node holding the most egress IPs goes; it comes back untimed (without
  // failback nothing moves back, so the next victim is again the busiest node).
  const leaseLoss: number[] = [];
  const moved: number[] = [];
  for (let i = 0; i < 7; i++) {
    const before = engine!.compute();
    const load = new Map<string, number>();
    for (const p of before.policies.values())
      if (p.gatewayNode !== undefined) load.set(p.gatewayNode, (load.get(p.gatewayNode) ?? 0) + 1);
    const victim = [...load].sort((a, b) => b[1] - a[1])[0]![0];
    const healthy = new Set(s.healthy);
    healthy.delete(victim);
    const t0 = performance.now();
    engine!.setHealthy(healthy);
    const after = engine!.compute();
    leaseLoss.push(performance.now() - t0);
    let n = 0;
    for (const [key, p] of after.policies)
      if (before.policies.get(key)?.gatewayNode !== p.gatewayNode) n++;
    moved.push(n);
    engine!.setHealthy(s.healthy);
    engine!.compute();
  }
  const policyAdd: number[] = [];
  for (let i = 0; i < 9; i++) {
    const p = policy(
      `ns-${i * 7}`,
      "added",
      { podSelector: { matchLabels: { app: "app-4" } }, destinationCIDRs: ["203.0.113.0/24"] },
      { created: "2026-02-01T00:00:00Z" },
    );
    const t0 = performance.now();
    engine!.setPolicy(p);
    engine!.compute();
    policyAdd.push(performance.now() - t0);
  }
  const outcome = engine!.compute();
  peakHeap = Math.max(peakHeap, heapMB());
  console.error(`lease loss moved ${median(moved)} policies (median)`);
  const local = localFacts({ ipv4: "192.0.0.10" });
  const t0 = performance.now();
  const gwPlan = planNode(
    nodeViewFromOutcome(outcome, "node-0", { local, config: { families: [4] } }),
  );
  const gatewayPlanMs = performance.now() - t0;
  const t1 = performance.now();
  planNode(nodeViewFromOutcome(outcome, "node-500", { local, config: { families: [4] } }));
  const nodePlanMs = performance.now() - t1;
  peakHeap = Math.max(peakHeap, heapMB());
  const members = gwPlan.ipsets.reduce((n, set) => n + set.members.length, 0);
  console.error(`gateway node-0 plan: ${gwPlan.ipsets.length} sets, ${members} members`);
  return {
    bench: "engine",
    policies: s.policies.length,
    pods: s.pods.length,
    nodes: s.nodes.length,
    fullMs: Math.round(median(fulls)),
    onePodMs: Number(median(onePod).toFixed(3)),
    leaseLossMs: Number(median(leaseLoss).toFixed(1)),
    leaseLossMoved: median(moved),
    policyAddMs: Number(median(policyAdd).toFixed(2)),
    gatewayPlanMs: Math.round(gatewayPlanMs),
    nodePlanMs: Math.round(nodePlanMs),
    heapMB: Math.round(peakHeap),
    rssMB: Math.round(process.resourceUsage().maxRSS / 1024),
  };
}
