/**
 * Datapath benchmark, in a fresh network namespace: a gateway node carrying 1,000 policies whose
 * 100,000 pods run on 100 other nodes (so 100,000 ipset members and, for the replies, 100,000
 * routes), sharing 10 egress IPs.
 *
 *   fromScratchMs   the first sync on an empty kernel
 *   podAddMs        one pod added to one policy (event-driven sync)
 *   policyAddMs     one policy of 100 pods added (event-driven sync)
 *   resyncMs        the periodic sync with nothing to change (re-reads the whole kernel)
 *   perMemberUs     fromScratchMs per ipset member
 *   naivePerMemberUs one `ipset add` process per member, as upstream does, on 5,000 members
 */

import { planNode } from "../src/engine/node_plan.ts";
import type { NodePlan } from "../src/engine/plan.ts";
import {
  DEFAULT_NODE_CONFIG,
  type NodeView,
  type PeerView,
  type PolicyView,
} from "../src/engine/view.ts";
import { openDatapath } from "../src/kernel/open.ts";
import { ExecRunner, mustRun } from "../src/kernel/runner.ts";
import { nsRunner } from "../src/sandbox/topology.ts";

const POLICIES = 1000;
const PODS_PER_POLICY = 100;
const PEERS = 100;
const NAIVE = 5000;

export function view(extraPods: number, extraPolicies: number): NodeView {
  const peers = new Map<string, PeerView>();
  peers.set("gw", {
    name: "gw",
    nodeID: 0,
    mac: "02:53:50:00:00:00",
    tunnel: { 4: "100.127.0.1" },
    underlay: "10.1.0.1",
  });
  for (let i = 1; i <= PEERS; i++) {
    peers.set(`n${i}`, {
      name: `n${i}`,
      nodeID: i,
      mac: `02:53:50:00:00:${i.toString(16).padStart(2, "0")}`,
      tunnel: { 4: `100.127.0.${i + 1}` },
      underlay: `10.1.0.${i + 1}`,
      podCIDRs: [`10.${100 + i}.0.0/16`],
    });
  }
  const policies: PolicyView[] = [];
  const count = POLICIES + extraPolicies;
  for (let p = 0; p < count; p++) {
    const endpoints = [];
    const n = PODS_PER_POLICY + (p < extraPods ? 1 : 0);
    for (let k = 0; k < n; k++) {
      // Each pod keeps its address whatever else is added; it comes from its node's pod CIDR,
      // as with every CNI that uses node IPAM.
      const v = k < PODS_PER_POLICY ? p * PODS_PER_POLICY + k : 200_000 + p;
      const nodeIndex = (v % PEERS) + 1;
      const local = Math.floor(v / PEERS);
      endpoints.push({
        pod: `ns-${p}/pod-${k}`,
        node: `n${nodeIndex}`,
        ips: [`10.${100 + nodeIndex}.${(local >> 8) & 255}.${local & 255}`],
      });
    }
    const eip = `192.168.100.${(p % 10) + 10}`;
    policies.push({
      key: `EgressPolicy/ns-${p}/policy`,
      priority: 0,
      createdAt: "2026-01-01T00:00:00Z",
      destinationCIDRs: [`203.0.${p % 256}.0/24`],
      excludedCIDRs: [],
      ports: [],
      gatewayNode: "gw",
      snat: { 4: eip },
      floating: [eip],
      endpoints,
    });
  }
  return {
    node: "gw",
    peers,
    policies,
    ignoreCIDRs: ["10.0.0.0/8"],
    config: { ...DEFAULT_NODE_CONFIG, families: [4] },
    local: {
      underlay: { device: "eth0", mtu: 1500, ipv4: "10.1.0.1" },
      usedTables: new Set([0, 253, 254, 255]),
      existingTables: new Map(),
      random: () => 0.5,
    },
  };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function members(plan: NodePlan): number {
  return plan.ipsets.reduce((n, s) => n + s.members.length + s.nomatch.length, 0);
}

export async function run() {
  const ns = `spb${process.pid}dp`;
  const root = new ExecRunner();
  await root.run(["ip", "netns", "del", ns]);
  await mustRun(root, ["ip", "netns", "add", ns]);
  try {
    const r = nsRunner(ns);
    await mustRun(r, ["ip", "link", "set", "lo", "up"]);
    await mustRun(r, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
    await mustRun(r, ["ip", "addr", "add", "10.1.0.1/16", "dev", "eth0"]);
    await mustRun(r, ["ip", "link", "set", "eth0", "up"]);
    await mustRun(r, ["ip", "link", "set", "eth1", "up"]);
    const d = await openDatapath({ runner: r, families: [4] });

    const plan0 = planNode(view(0, 0));
    const total = members(plan0);
    let t = performance.now();
    await d.sync(plan0);
    const fromScratchMs = performance.now() - t;

    // Event-driven syncs, as a running agent does them one after another: the median of twenty
    // single-pod additions (each to another policy) and of five policy additions.
    const podAdds: number[] = [];
    let podChanges = 0;
    for (let i = 0; i < 20; i++) {
      const plan = planNode(view(i + 1, 0));
      t = performance.now();
      podChanges = (await d.sync(plan, { partial: true })).changes;
      podAdds.push(performance.now() - t);
    }
    const policyAdds: number[] = [];
    let policyChanges = 0;
    for (let i = 0; i < 5; i++) {
      const plan = planNode(view(20, i + 1));
      t = performance.now();
      policyChanges = (await d.sync(plan, { partial: true })).changes;
      policyAdds.push(performance.now() - t);
    }
    const last = planNode(view(20, 5));
    const resyncs: number[] = [];
    for (let i = 0; i < 3; i++) {
      t = performance.now();
      const resync = await d.sync(last);
      resyncs.push(performance.now() - t);
      if (resync.changes !== 0)
        throw new Error(`the no-change resync changed ${resync.changes} objects`);
    }
    const podAddMs = median(podAdds);
    const policyAddMs = median(policyAdds);
    const resyncMs = median(resyncs);

    // Upstream's way: one ipset process per member.
    await mustRun(r, ["ipset", "create", "naive", "hash:net", "maxelem", "1048576"]);
    t = performance.now();
    for (let i = 0; i < NAIVE; i++) {
      await mustRun(r, ["ipset", "add", "naive", `10.201.${(i >> 8) & 255}.${i & 255}`]);
    }
    const naiveMs = performance.now() - t;
    console.error(
      `members ${total}; a pod add changed ${podChanges} object(s), a policy add ${policyChanges}`,
    );
    return {
      bench: "datapath",
      policies: POLICIES,
      members: total,
      fromScratchMs: Math.round(fromScratchMs),
      podAddMs: Number(podAddMs.toFixed(1)),
      policyAddMs: Number(policyAddMs.toFixed(1)),
      resyncMs: Math.round(resyncMs),
      perMemberUs: Number(((fromScratchMs * 1000) / total).toFixed(2)),
      naivePerMemberUs: Number(((naiveMs * 1000) / NAIVE).toFixed(1)),
    };
  } finally {
    await root.run(["ip", "netns", "del", ns]);
  }
}
