/**
 * Datapath benchmark, for each packet filter in a fresh network namespace: a gateway node
 * carrying 1,000 policies whose 100,000 pods run on 100 other nodes (100,000 set members or map
 * elements, and the reply routes per pod CIDR), sharing 10 egress IPs. Driven as the agent drives
 * it: the keyed planner, commands from the helper process (src/kernel/spawner.ts).
 *
 *   fromScratchMs   the first sync on an empty kernel
 *   podAddMs        one pod added to one policy: plan and partial sync
 *   policyAddMs     one policy of 100 pods added: plan and partial sync
 *   resyncMs        the periodic sync with nothing to change (re-reads the kernel as the agent does
 *                   between member listings: each ipset's header and number of entries, the
 *                   nftables table's structure)
 *   elementsResyncMs the periodic sync that also lists every set member or element (the agent's
 *                   --set-elements-period-ms, once a minute)
 *   perMemberUs     fromScratchMs per member
 *   naivePerMemberUs one `ipset add` process per member, as upstream programs its sets, through
 *                   the same runner, on 2,000 members (iptables only)
 */

import { NodePlanner } from "../src/engine/node_plan.ts";
import type { NodePlan } from "../src/engine/plan.ts";
import {
  DEFAULT_NODE_CONFIG,
  type NodeView,
  type PeerView,
  type PolicyView,
} from "../src/engine/view.ts";
import { openDatapath, type PacketFilter } from "../src/kernel/open.ts";
import { ExecRunner, mustRun } from "../src/kernel/runner.ts";
import { SpawnerRunner } from "../src/kernel/spawner.ts";
import { nsRunner } from "../src/sandbox/topology.ts";

const POLICIES = 1000;
const PODS_PER_POLICY = 100;
const PEERS = 100;
const NAIVE = 2000;

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
      snat: { 4: [eip] },
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

/** Elements of every set and map the plan asks the kernel for (the members it programs). */
function members(plan: NodePlan): number {
  if (plan.nft !== undefined) {
    let n = 0;
    for (const classes of Object.values(plan.nft.classes))
      for (const c of classes ?? []) n += c.sources.length + c.entries.length;
    return n;
  }
  return plan.ipsets.reduce((n, s) => n + s.members.length + s.nomatch.length, 0);
}

/** One packet filter, in a fresh namespace, as the agent drives it (planner, helper runner). */
async function measure(filter: PacketFilter) {
  const ns = `spb${process.pid}dp${filter[0]}`;
  const root = new ExecRunner();
  await root.run(["ip", "netns", "del", ns]);
  await mustRun(root, ["ip", "netns", "add", ns]);
  const runner = new SpawnerRunner({ within: ["nsenter", `--net=/run/netns/${ns}`] });
  try {
    const r = nsRunner(ns);
    await mustRun(r, ["ip", "link", "set", "lo", "up"]);
    await mustRun(r, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
    await mustRun(r, ["ip", "addr", "add", "10.1.0.1/16", "dev", "eth0"]);
    await mustRun(r, ["ip", "link", "set", "eth0", "up"]);
    await mustRun(r, ["ip", "link", "set", "eth1", "up"]);
    // The agent's element listing period, on a clock of our own to make the listing due.
    let now = 0;
    const d = await openDatapath({
      runner,
      families: [4],
      datapath: filter,
      setElementsEveryMs: 60_000,
      clock: { now: () => now },
    });
    const base = view(0, 0);
    const config = { ...base.config, datapath: filter };
    const planner = new NodePlanner(base.node, config);
    planner.setLocal(base.local);
    planner.setPeers(base.peers);
    planner.setIgnoreCIDRs(base.ignoreCIDRs);
    for (const p of base.policies) planner.setPolicy(p);

    let t = performance.now();
    const plan0 = planner.plan();
    await d.sync(plan0);
    const fromScratchMs = performance.now() - t;
    const total = members(plan0);

    // Event-driven syncs, as a running agent does them: the plan of one changed policy (keyed),
    // then a partial sync. Median of twenty single-pod additions and five policy additions.
    const podAdds: number[] = [];
    for (let i = 0; i < 20; i++) {
      const next = view(i + 1, 0).policies[i]!;
      t = performance.now();
      planner.setPolicy(next);
      await d.sync(planner.plan(), { partial: true });
      podAdds.push(performance.now() - t);
    }
    const policyAdds: number[] = [];
    for (let i = 0; i < 5; i++) {
      const added = view(20, i + 1).policies.at(-1)!;
      t = performance.now();
      planner.setPolicy(added);
      await d.sync(planner.plan(), { partial: true });
      policyAdds.push(performance.now() - t);
    }
    const last = planner.plan();
    const resyncs: number[] = [];
    for (let i = 0; i < 3; i++) {
      t = performance.now();
      const resync = await d.sync(last);
      resyncs.push(performance.now() - t);
      if (resync.changes !== 0)
        throw new Error(`the no-change resync changed ${resync.changes} objects`);
    }
    const elementResyncs: number[] = [];
    for (let i = 0; i < 3; i++) {
      now += 60_000;
      t = performance.now();
      const resync = await d.sync(last);
      elementResyncs.push(performance.now() - t);
      if (resync.changes !== 0)
        throw new Error(`the no-change resync changed ${resync.changes} objects`);
    }

    // Upstream's way, through the same runner: one ipset process per member.
    let naivePerMemberUs: number | undefined;
    if (filter === "iptables") {
      await mustRun(runner, ["ipset", "create", "naive", "hash:net", "maxelem", "1048576"]);
      t = performance.now();
      for (let i = 0; i < NAIVE; i++)
        await mustRun(runner, ["ipset", "add", "naive", `10.201.${(i >> 8) & 255}.${i & 255}`]);
      naivePerMemberUs = ((performance.now() - t) * 1000) / NAIVE;
      const listed = (await mustRun(runner, ["ipset", "list", "naive"])).split("\n").length;
      if (listed < NAIVE)
        throw new Error(`the naive comparison did not add its ${NAIVE} members (${listed} lines)`);
    }
    return {
      members: total,
      fromScratchMs: Math.round(fromScratchMs),
      podAddMs: Number(median(podAdds).toFixed(1)),
      policyAddMs: Number(median(policyAdds).toFixed(1)),
      resyncMs: Math.round(median(resyncs)),
      elementsResyncMs: Math.round(median(elementResyncs)),
      perMemberUs: Number(((fromScratchMs * 1000) / total).toFixed(2)),
      ...(naivePerMemberUs === undefined
        ? {}
        : { naivePerMemberUs: Number(naivePerMemberUs.toFixed(1)) }),
    };
  } finally {
    runner.close();
    await root.run(["ip", "netns", "del", ns]);
  }
}

export async function run() {
  const iptables = await measure("iptables");
  const nftables = await measure("nftables");
  return { bench: "datapath", policies: POLICIES, iptables, nftables };
}
