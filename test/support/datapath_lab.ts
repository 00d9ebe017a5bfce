/**
 * The node datapath's lab, shared by the kernel tests of both packet filters (iptables and
 * nftables): two nodes on one segment with an external server; node-2 is the gateway and holds
 * the egress IP 192.168.77.100 / fd00:77::100 (address plan: src/sandbox/topology.ts).
 *
 *   web-1 (node-1, selected)  web-2 (node-2 = gateway, selected)  other (node-1, not selected)
 *   target (node-2, a pod running a server, for pod-to-pod traffic)
 *
 * Foreign state on node-2 the agent must never touch: an ipset, a route in table 100 and its
 * ip rule, and (for nftables) another table with a chain and a set.
 */
import assert from "node:assert/strict";
import { it } from "node:test";
import { computeCluster } from "../../src/engine/cluster.ts";
import { planNode } from "../../src/engine/node_plan.ts";
import { nodeViewFromOutcome } from "../../src/engine/node_view.ts";
import type { NodePlan } from "../../src/engine/plan.ts";
import type { Snapshot } from "../../src/engine/snapshot.ts";
import { gateway, node, pod, policy, snapshot } from "../../src/engine/testing.ts";
import type { Datapath, KernelState } from "../../src/kernel/datapath.ts";
import { localFactsFrom } from "../../src/kernel/facts.ts";
import { openDatapath, type PacketFilter } from "../../src/kernel/open.ts";
import { mustRun } from "../../src/kernel/runner.ts";
import {
  EIP_POOL,
  EXTERNAL,
  nodeAddress,
  nsRunner,
  type PodHandle,
  podCIDR,
  Topology,
} from "../../src/sandbox/topology.ts";
import { type HostState, hostState, probe, startEcho, uniquePrefix } from "./lab.ts";

export const EIP4 = "192.168.77.100";
export const EIP6 = "fd00:77::100";
export const EXCLUDED4 = "192.168.77.201";
export const EXCLUDED6 = "fd00:77::201";
export const ext4 = `${EXTERNAL[4]}:8080`;
export const ext6 = `[${EXTERNAL[6]}]:8080`;
const ipsOf = (p: PodHandle) => [p.ips[4]!, p.ips[6]!];

export class DatapathLab {
  readonly filter: PacketFilter;
  readonly prefix: string;
  readonly topo: Topology;
  readonly datapaths = new Map<number, Datapath>();
  readonly baseline = new Map<number, HostState>();
  snap!: Snapshot;

  constructor(filter: PacketFilter, tag: string) {
    this.filter = filter;
    this.prefix = uniquePrefix(tag);
    this.topo = new Topology({ prefix: this.prefix, nodes: 2, families: [4, 6] });
  }

  async up(): Promise<void> {
    const topo = this.topo;
    await Topology.down(this.prefix);
    await topo.up();
    const web1 = await topo.addPod("web-1", 1);
    const other = await topo.addPod("other", 1);
    const web2 = await topo.addPod("web-2", 2);
    const target = await topo.addPod("target", 2);
    const ext = nsRunner(topo.externalNs);
    await mustRun(ext, ["ip", "addr", "add", `${EXCLUDED4}/24`, "dev", "eth0"]);
    await mustRun(ext, ["ip", "addr", "add", `${EXCLUDED6}/64`, "dev", "eth0", "nodad"]);
    await startEcho(topo.externalNs);
    await startEcho(target.netns);
    const n2 = nsRunner(topo.nodeNs(2));
    await mustRun(n2, ["ipset", "create", "KUBE-TEST-SET", "hash:ip"]);
    await mustRun(n2, ["ipset", "add", "KUBE-TEST-SET", "10.96.0.1"]);
    await mustRun(n2, ["ip", "route", "add", "10.99.0.0/16", "dev", "eth0", "table", "100"]);
    await mustRun(n2, ["ip", "rule", "add", "pref", "100", "fwmark", "0x1", "table", "100"]);
    if (this.filter === "nftables") {
      // As kube-proxy's nftables mode leaves it: a table of its own, chains at our hooks.
      await mustRun(n2, ["nft", "-f", "-"], {
        stdin: `table ip kube-proxy {
  set cluster-ips { type ipv4_addr; elements = { 10.96.0.1 } }
  chain filter-forward {
    type filter hook forward priority -110; policy accept;
    ct state invalid drop
  }
  chain nat-postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x4000 == 0x4000 masquerade
  }
}
`,
      });
    }
    for (const i of [1, 2]) this.baseline.set(i, await hostState(topo.nodeNs(i)));
    const labels = { app: "web" };
    this.snap = snapshot({
      nodes: [
        node("node-1", {
          ipv4: nodeAddress(1, 4),
          ipv6: nodeAddress(1, 6),
          podCIDRs: [podCIDR(1, 4), podCIDR(1, 6)],
        }),
        node("node-2", {
          ipv4: nodeAddress(2, 4),
          ipv6: nodeAddress(2, 6),
          podCIDRs: [podCIDR(2, 4), podCIDR(2, 6)],
          labels: { egress: "true" },
        }),
      ],
      pods: [
        pod("default", "web-1", "node-1", ipsOf(web1), labels),
        pod("default", "web-2", "node-2", ipsOf(web2), labels),
        pod("default", "other", "node-1", ipsOf(other)),
        pod("default", "target", "node-2", ipsOf(target)),
      ],
      gateways: [gateway("edge", { pool: EIP_POOL })],
      policies: [
        policy("default", "web", {
          podSelector: { matchLabels: labels },
          destinationCIDRs: ["192.168.77.192/26", "fd00:77::200/120"],
          excludedCIDRs: [`${EXCLUDED4}/32`, `${EXCLUDED6}/128`],
          egressIP: [EIP4, EIP6],
        }),
      ],
    });
    for (const i of [1, 2])
      this.datapaths.set(
        i,
        await openDatapath({ runner: nsRunner(topo.nodeNs(i)), datapath: this.filter }),
      );
  }

  planWith(index: number, state: KernelState, s: Snapshot = this.snap): NodePlan {
    const outcome = computeCluster(s);
    const local = localFactsFrom(state, {
      nodeAddresses: { 4: nodeAddress(index, 4), 6: nodeAddress(index, 6) },
      peers: outcome.peers,
      rulePref: 5900,
      random: () => 0.5,
    });
    return planNode(
      nodeViewFromOutcome(outcome, this.topo.nodeName(index), {
        local,
        config: { datapath: this.filter },
      }),
    );
  }

  /**
   * The lab's snapshot where the policy also selects `other` (on node-1): what node-1 sees the
   * moment the pod is labelled, before the gateway hears of it. With `shiftClasses`, an older
   * policy that selects nothing takes tunnel class 1, so `web` gets another class than the
   * lab's snapshot gives it.
   */
  otherSelected(options: { shiftClasses?: boolean } = {}): Snapshot {
    const s = this.snap;
    return {
      ...s,
      pods: s.pods.map((p) => (p.name === "other" ? { ...p, labels: { app: "web" } } : p)),
      policies: options.shiftClasses
        ? [
            ...s.policies,
            policy(
              "default",
              "older",
              { podSelector: { matchLabels: { app: "none" } }, destinationCIDRs: ["192.0.2.0/24"] },
              { created: "2025-01-01T00:00:00Z" },
            ),
          ]
        : s.policies,
    };
  }

  /**
   * A pod the gateway has not heard of yet: node-1 steers `other` (the policy has just started
   * selecting it) while node-2 keeps the plan in which it is selected by nothing.
   * @returns the source addresses the external server saw (undefined: no answer) per family
   */
  async unheardPod(options: { shiftClasses?: boolean } = {}): Promise<{
    4: string | undefined;
    6: string | undefined;
  }> {
    const other = this.topo.pod("other").netns;
    await this.datapaths.get(1)!.sync(await this.planFor(1, this.otherSelected(options)));
    try {
      const seen = async (target: string) => {
        const r = await probe(other, target, { timeoutMs: 1500 });
        return r.ok ? r.saw : undefined;
      };
      return { 4: await seen(ext4), 6: await seen(ext6) };
    } finally {
      await this.syncNode(1);
    }
  }

  async planFor(index: number, s: Snapshot = this.snap): Promise<NodePlan> {
    return this.planWith(index, await this.datapaths.get(index)!.read(), s);
  }

  /**
   * Another datapath of node-`index`, as the agent's: it lists set members and elements once a
   * minute (of a clock `advance` moves), and `fullSync` is the agent's full sync (one read,
   * planned from and synced against); returns the changes.
   */
  async listingOnceAMinute(index: number): Promise<{
    readonly dp: Datapath;
    readonly advance: (ms: number) => void;
    readonly fullSync: () => Promise<number>;
  }> {
    let now = 0;
    const dp = await openDatapath({
      runner: nsRunner(this.topo.nodeNs(index)),
      datapath: this.filter,
      setElementsEveryMs: 60_000,
      clock: { now: () => now },
    });
    return {
      dp,
      advance: (ms) => {
        now += ms;
      },
      fullSync: async () => {
        const state = await dp.read();
        return (await dp.sync(this.planWith(index, state), { state })).changes;
      },
    };
  }

  async syncNode(index: number): Promise<number> {
    const report = await this.datapaths.get(index)!.sync(await this.planFor(index));
    if (process.env.DEBUG_SYNC === "1")
      console.error(`node-${index}`, JSON.stringify(report.detail));
    return report.changes;
  }

  /**
   * The external host confirms that the egress IP is still there the way routers do: its
   * neighbour entry goes stale, the next packet to it starts a probe, and the probe is a
   * *unicast* neighbour solicitation to the egress IP. Returns the entry's state once it settles:
   * REACHABLE when the gateway answered, FAILED when something dropped the solicitation.
   */
  async probeEgressNeighbour(): Promise<string> {
    const ext = nsRunner(this.topo.externalNs);
    await mustRun(ext, ["sysctl", "-qw", "net.ipv6.neigh.eth0.delay_first_probe_time=1"]);
    const show = async () =>
      (await mustRun(ext, ["ip", "-6", "neigh", "show", EIP6, "dev", "eth0"])).trim();
    // Resolve it first (multicast, as on first contact), then let it go stale.
    await ext.run(["ping", "-6", "-c", "1", "-W", "1", EIP6]);
    const lladdr = /lladdr (\S+)/.exec(await show())?.[1];
    if (lladdr === undefined) throw new Error(`the external host cannot resolve ${EIP6}`);
    await mustRun(ext, [
      "ip",
      "-6",
      "neigh",
      "replace",
      EIP6,
      "lladdr",
      lladdr,
      "dev",
      "eth0",
      "nud",
      "stale",
    ]);
    await ext.run(["ping", "-6", "-c", "1", "-W", "1", EIP6]);
    const deadline = Date.now() + 15_000;
    for (;;) {
      const state = /(REACHABLE|FAILED|STALE|DELAY|PROBE|INCOMPLETE)/.exec(await show())?.[1];
      if (state === "REACHABLE" || state === "FAILED" || Date.now() > deadline)
        return state ?? "none";
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  async down(): Promise<void> {
    await Topology.down(this.prefix);
  }
}

/**
 * The test both packet filters share: a pod the gateway has not heard of yet leaves with the
 * egress IP from its first connection, because its node names the policy's tunnel class.
 */
export function itSteersPodsTheGatewayHasNotHeardOf(lab: DatapathLab): void {
  it("a pod the gateway has not heard of yet leaves with the egress IP from its first connection: its node names the policy's tunnel class", async () => {
    assert.deepEqual(
      await lab.unheardPod(),
      { 4: EIP4, 6: EIP6 },
      "node-2 holds no set naming the pod, yet SNATs it by its tunnel class",
    );
    assert.deepEqual(
      await lab.unheardPod({ shiftClasses: true }),
      { 4: undefined, 6: undefined },
      "a tunnel class the gateway holds no policy of is dropped, never SNATed to some egress IP",
    );
  });
}
