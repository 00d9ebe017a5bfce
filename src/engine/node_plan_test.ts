/**
 * Per-node datapath: golden files of what each node's kernel receives, and packet traces that
 * read like a packet's journey. Address plan: see ./testing.ts.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, it } from "node:test";
import { renderPlan } from "../render/plan.ts";
import { assertGolden } from "../testing/golden.ts";
import { computeCluster } from "./cluster.ts";
import { groupChain } from "./names.ts";
import { NodePlanner, planNode } from "./node_plan.ts";
import { nodeViewFromOutcome } from "./node_view.ts";
import type { NodePlan } from "./plan.ts";
import type { Snapshot } from "./snapshot.ts";
import { gateway, localFacts, node, pod, policy, snapshot } from "./testing.ts";
import { tracePacket } from "./trace.ts";
import type { PolicyView } from "./view.ts";

const GOLDEN = join(import.meta.dirname, "testdata");
/** As the agent renders with its default lease timing (egress IPs leased for 1 s). */
const OPTS = { rulePref: 5900, tunnelDevice: "sallyport", eipLeaseSeconds: 1 };

function planFor(s: Snapshot, name: string, underlay: { ipv4?: string; ipv6?: string }) {
  const outcome = computeCluster(s);
  return planNode(nodeViewFromOutcome(outcome, name, { local: localFacts(underlay) }));
}

/** Seed 000's example (src 172.29.234.173, dst 10.6.105.150) with seed 003's egress IP. */
const seed = snapshot({
  nodes: [
    node("node-1", { ipv4: "192.168.0.11", podCIDRs: ["172.29.234.0/24"] }),
    node("node-2", {
      ipv4: "192.168.0.12",
      labels: { egress: "true" },
      podCIDRs: ["172.29.2.0/24"],
    }),
  ],
  pods: [
    pod("default", "mediabot", "node-1", ["172.29.234.173"], { org: "empire", class: "mediabot" }),
    pod("default", "other", "node-1", ["172.29.234.174"], { org: "rebels" }),
    pod("default", "gw-local", "node-2", ["172.29.2.9"], { org: "empire", class: "mediabot" }),
  ],
  gateways: [gateway("edge", { pool: ["10.168.60.100-10.168.60.110"] })],
  policies: [
    policy("default", "egress-sample", {
      podSelector: { matchLabels: { org: "empire", class: "mediabot" } },
      destinationCIDRs: ["10.6.105.150/32"],
      egressIP: ["10.168.60.100"],
    }),
  ],
  serviceCIDRs: ["10.96.0.0/16"],
});

describe("planNode() on seed 000's example", () => {
  const nonGateway = planFor(seed, "node-1", { ipv4: "192.168.0.11" });
  const gatewayNode = planFor(seed, "node-2", { ipv4: "192.168.0.12" });
  const nftOf = (name: string, ipv4: string) =>
    planNode(
      nodeViewFromOutcome(computeCluster(seed), name, {
        local: localFacts({ ipv4 }),
        config: { datapath: "nftables" },
      }),
    );
  const nftGateway = nftOf("node-2", "192.168.0.12");
  const nftNonGateway = nftOf("node-1", "192.168.0.11");

  it("renders what the kernel of each node receives", () => {
    assertGolden(join(GOLDEN, "seed-node-1.golden"), renderPlan(nonGateway, OPTS));
    assertGolden(join(GOLDEN, "seed-node-2.golden"), renderPlan(gatewayNode, OPTS));
  });

  it("renders the same with nftables: one table, classes instead of a rule per policy", () => {
    assertGolden(join(GOLDEN, "seed-node-1-nft.golden"), renderPlan(nftNonGateway, OPTS));
    assertGolden(join(GOLDEN, "seed-node-2-nft.golden"), renderPlan(nftGateway, OPTS));
  });

  it("steers the selected pod's traffic on the non-gateway node into the tunnel to node-2", () => {
    const t = tracePacket(nonGateway, {
      src: "172.29.234.173",
      dst: "10.6.105.150",
      protocol: "tcp",
      dport: 80,
    });
    assert.equal(t.verdict, "tunnel");
    assert.equal(t.via, "100.127.0.2", "node-2 has node id 1: tunnel address base + 1 + 1");
    assert.equal(
      t.mark,
      0x12000001,
      "the node mark is reset to the keep mark in mangle FORWARD, the policy's tunnel class (1) is added as it enters the tunnel",
    );
    assert.equal(t.connmark, 0x26000001, "the connection remembers steering and the tunnel class");
    assert.equal(t.snat, undefined, "no SNAT before the tunnel");
    assert.ok(
      t.steps.some((s) => s.startsWith("nat/SALLYPORT-NO-SNAT")),
      "CNI masquerade is skipped",
    );
  });

  it("leaves other destinations, other pods and pod-to-pod traffic on their usual path", () => {
    for (const packet of [
      { src: "172.29.234.173", dst: "8.8.8.8" },
      { src: "172.29.234.174", dst: "10.6.105.150" },
      { src: "172.29.234.173", dst: "172.29.2.9" },
    ]) {
      const t = tracePacket(nonGateway, { ...packet, protocol: "tcp" as const, dport: 80 });
      assert.equal(t.verdict, "usual", `${packet.src} → ${packet.dst}`);
      assert.equal(t.snat, undefined);
    }
  });

  it("keeps connections that were never steered on their path", () => {
    const t = tracePacket(nonGateway, {
      src: "172.29.234.173",
      dst: "10.6.105.150",
      ctstate: "ESTABLISHED",
      connmark: 0,
    });
    assert.equal(t.verdict, "usual");
  });

  it("SNATs to the egress IP on the gateway for traffic arriving through the tunnel", () => {
    const t = tracePacket(gatewayNode, {
      src: "172.29.234.173",
      dst: "10.6.105.150",
      inInterface: "sallyport",
    });
    assert.equal(t.verdict, "usual");
    assert.deepEqual(t.snat, ["10.168.60.100"]);
    assert.equal(
      t.connmark,
      0x27000000,
      "the flow is remembered so that replies go back through the tunnel",
    );
  });

  it("SNATs a selected pod on the gateway node itself", () => {
    const t = tracePacket(gatewayNode, { src: "172.29.2.9", dst: "10.6.105.150" });
    assert.deepEqual(t.snat, ["10.168.60.100"]);
  });

  it("sends replies back through the tunnel to the pod's node", () => {
    const t = tracePacket(gatewayNode, {
      src: "10.6.105.150",
      dst: "172.29.234.173",
      ctstate: "ESTABLISHED",
      ctdir: "REPLY",
      connmark: 0x27000000,
    });
    assert.equal(t.verdict, "tunnel");
    assert.equal(t.via, "100.127.0.1", "node-1's tunnel address");
  });

  it("drops new connections to the egress IP: it exposes no service of the node", () => {
    const t = tracePacket(gatewayNode, {
      src: "10.6.105.150",
      dst: "10.168.60.100",
      protocol: "tcp",
      dport: 22,
    });
    assert.equal(t.verdict, "drop");
  });

  it("holds the egress IP on the gateway only", () => {
    assert.deepEqual(
      gatewayNode.eips.map((e) => e.address),
      ["10.168.60.100"],
    );
    assert.deepEqual(nonGateway.eips, []);
  });

  it("drops tunnel traffic that no policy of the gateway claims instead of leaking it", () => {
    const t = tracePacket(gatewayNode, {
      src: "172.29.234.174",
      dst: "10.6.105.150",
      inInterface: "sallyport",
    });
    assert.equal(t.verdict, "drop");
  });

  it("SNATs a pod it has not heard of yet when its node names the policy's tunnel class", () => {
    for (const plan of [gatewayNode, nftGateway]) {
      const packet = { src: "172.29.234.174", dst: "10.6.105.150", inInterface: "sallyport" };
      const t = tracePacket(plan, { ...packet, mark: 1 });
      assert.deepEqual(
        t.snat,
        ["10.168.60.100"],
        "leaves with the egress IP from the first packet",
      );
      assert.equal(t.policy, "EgressPolicy/default/egress-sample");
      assert.equal(t.connmark >>> 24, 0x27, "its replies go back through the tunnel");
      assert.equal(
        tracePacket(plan, { ...packet, mark: 2 }).verdict,
        "drop",
        "a class not held here",
      );
      assert.equal(
        tracePacket(plan, { ...packet, inInterface: "veth-pod", mark: 1 }).snat,
        undefined,
        "a mark from anywhere but the tunnel is no tunnel class",
      );
    }
  });

  it("names no tunnel class toward a gateway whose agent has not reported taking them (a rolling upgrade)", () => {
    const old = {
      ...seed,
      reports: new Map([...seed.reports].map(([n, r]) => [n, { ...r, tunnelClasses: false }])),
    };
    const packet = {
      src: "172.29.234.173",
      dst: "10.6.105.150",
      protocol: "tcp" as const,
      dport: 80,
    };
    for (const datapath of ["iptables", "nftables"] as const) {
      const plan = planNode(
        nodeViewFromOutcome(computeCluster(old), "node-1", {
          local: localFacts({ ipv4: "192.168.0.11" }),
          config: { datapath },
        }),
      );
      const t = tracePacket(plan, packet);
      assert.equal(t.verdict, "tunnel", datapath);
      assert.equal(t.mark, 0x12000000, `${datapath}: no class in the VXLAN header`);
      assert.equal(t.connmark, 0x26000000, datapath);
    }
  });

  it("drops a pod's packet to a peer's tunnel port: no pod writes into the tunnel", () => {
    for (const plan of [nonGateway, nftNonGateway]) {
      const t = tracePacket(plan, {
        src: "172.29.234.173",
        dst: "192.168.0.12",
        protocol: "udp",
        dport: 7799,
      });
      assert.equal(t.verdict, "drop");
    }
  });
});

describe("planNode() scenarios", () => {
  const nodes = [
    node("node-1", {
      ipv4: "192.168.0.11",
      ipv6: "fd00:192:168::11",
      podCIDRs: ["172.29.1.0/24", "fd00:172:29:1::/64"],
    }),
    node("node-2", {
      ipv4: "192.168.0.12",
      ipv6: "fd00:192:168::12",
      labels: { egress: "true" },
      podCIDRs: ["172.29.2.0/24", "fd00:172:29:2::/64"],
    }),
  ];
  const pods = [
    pod("team-a", "web-1", "node-1", ["172.29.1.5", "fd00:172:29:1::5"], { app: "web" }),
    pod("team-a", "web-2", "node-2", ["172.29.2.5", "fd00:172:29:2::5"], { app: "web" }),
  ];
  const dual = { ipv4: "192.168.0.11", ipv6: "fd00:192:168::11" };

  it("empty destinationCIDRs: everything outside the cluster, minus excludedCIDRs", () => {
    const s = snapshot({
      nodes,
      pods,
      serviceCIDRs: ["10.96.0.0/16", "fd00:10:96::/112"],
      gateways: [gateway("edge", { pool: ["10.168.60.100-10.168.60.110"] })],
      policies: [
        policy("team-a", "web", {
          podSelector: { matchLabels: { app: "web" } },
          excludedCIDRs: ["192.0.2.0/24"],
        }),
      ],
    });
    const plan = planFor(s, "node-1", dual);
    assertGolden(join(GOLDEN, "empty-destination-node-1.golden"), renderPlan(plan, OPTS));
    const go = (dst: string) => tracePacket(plan, { src: "172.29.1.5", dst }).verdict;
    assert.equal(go("8.8.8.8"), "tunnel", "the internet goes through the gateway");
    assert.equal(go("172.29.2.5"), "usual", "pod to pod across nodes keeps its path");
    assert.equal(go("192.168.0.12"), "usual", "pod to node keeps its path");
    assert.equal(go("10.96.0.10"), "usual", "pod to service CIDR keeps its path");
    assert.equal(go("192.0.2.7"), "usual", "excludedCIDRs keep their path");
    assert.equal(
      tracePacket(plan, { src: "fd00:172:29:1::5", dst: "2001:db8::1" }).verdict,
      "usual",
      "no IPv6 egress IP in the pool: IPv6 keeps its path",
    );
  });

  it("one destination CIDR is matched by the rule (-d), several or exceptions by a dst set, none by nothing", () => {
    const withDestinations = (spec: { destinationCIDRs?: string[]; excludedCIDRs?: string[] }) =>
      planFor(
        snapshot({
          nodes,
          pods,
          gateways: [gateway("edge", { pool: ["10.168.60.100-10.168.60.110"] })],
          policies: [
            policy("team-a", "web", { podSelector: { matchLabels: { app: "web" } }, ...spec }),
          ],
        }),
        "node-1",
        dual,
      );
    const policyRule = (plan: NodePlan) =>
      [...plan.rules[4].chains.get("mangle")!.values()]
        .flat()
        .find((r) => r.comment === "EgressPolicy/team-a/web")!;
    const dstSets = (plan: NodePlan) =>
      plan.ipsets
        .filter((x) => x.name.startsWith("sallyport-dst4-"))
        .map((x) => [x.members, x.nomatch]);
    const go = (plan: NodePlan, dst: string) =>
      tracePacket(plan, { src: "172.29.1.5", dst }).verdict;

    const one = withDestinations({ destinationCIDRs: ["203.0.113.0/24"] });
    assert.equal(policyRule(one).destination, "203.0.113.0/24");
    assert.deepEqual(dstSets(one), []);
    assert.equal(go(one, "203.0.113.9"), "tunnel");
    assert.equal(go(one, "198.51.100.9"), "usual");

    const two = withDestinations({ destinationCIDRs: ["203.0.113.0/24", "198.51.100.0/24"] });
    assert.equal(policyRule(two).destination, undefined);
    assert.deepEqual(dstSets(two), [[["198.51.100.0/24", "203.0.113.0/24"], []]]);
    assert.equal(go(two, "198.51.100.9"), "tunnel");
    assert.equal(go(two, "192.0.2.9"), "usual");

    const excepted = withDestinations({
      destinationCIDRs: ["203.0.113.0/24"],
      excludedCIDRs: ["203.0.113.128/25"],
    });
    assert.deepEqual(dstSets(excepted), [[["203.0.113.0/24"], ["203.0.113.128/25"]]]);
    assert.equal(go(excepted, "203.0.113.9"), "tunnel");
    assert.equal(go(excepted, "203.0.113.200"), "usual");

    const any = withDestinations({});
    assert.equal(policyRule(any).destination, undefined);
    assert.deepEqual(dstSets(any), []);
    assert.equal(go(any, "8.8.8.8"), "tunnel");
    assert.equal(go(any, "172.29.2.5"), "usual", "the cluster's own addresses are still ignored");
  });

  it("dual stack: one policy, an egress IP per family, IPv4 and IPv6 rules", () => {
    const s = snapshot({
      nodes,
      pods,
      gateways: [
        gateway("edge", { pool: ["10.168.60.100-10.168.60.110", "fd00:a::100-fd00:a::110"] }),
      ],
      policies: [
        policy("team-a", "web", {
          podSelector: { matchLabels: { app: "web" } },
          destinationCIDRs: ["203.0.113.0/24", "2001:db8::/64"],
          ports: [
            { protocol: "TCP", port: 443 },
            { protocol: "UDP", port: 53 },
          ],
        }),
      ],
    });
    const plan1 = planFor(s, "node-1", dual);
    const plan2 = planFor(s, "node-2", { ipv4: "192.168.0.12", ipv6: "fd00:192:168::12" });
    assertGolden(join(GOLDEN, "dual-stack-node-1.golden"), renderPlan(plan1, OPTS));
    assertGolden(join(GOLDEN, "dual-stack-node-2.golden"), renderPlan(plan2, OPTS));
    const v6 = tracePacket(plan1, {
      src: "fd00:172:29:1::5",
      dst: "2001:db8::7",
      protocol: "tcp",
      dport: 443,
    });
    assert.equal(v6.verdict, "tunnel");
    assert.equal(v6.via, "fd5a:11::2");
    const v6gw = tracePacket(plan2, {
      src: "fd00:172:29:1::5",
      dst: "2001:db8::7",
      protocol: "tcp",
      dport: 443,
      inInterface: "sallyport",
    });
    assert.deepEqual(v6gw.snat, ["fd00:a::100"]);
    assert.equal(
      tracePacket(plan1, { src: "172.29.1.5", dst: "203.0.113.7", protocol: "tcp", dport: 80 })
        .verdict,
      "usual",
      "port 80 is not selected",
    );
    assert.equal(
      tracePacket(plan1, { src: "172.29.1.5", dst: "203.0.113.7", protocol: "udp", dport: 53 })
        .verdict,
      "tunnel",
    );
  });

  it("two overlapping policies: the higher priority's rule comes first on every node", () => {
    const s = snapshot({
      nodes,
      pods,
      gateways: [gateway("edge", { pool: ["10.168.60.100-10.168.60.110"] })],
      policies: [
        policy("team-a", "all", {
          podSelector: { matchLabels: { app: "web" } },
          egressIP: ["10.168.60.101"],
        }),
        policy(
          "team-a",
          "partner",
          {
            podSelector: { matchLabels: { app: "web" } },
            destinationCIDRs: ["203.0.113.0/24"],
            egressIP: ["10.168.60.102"],
            priority: 100,
          },
          { created: "2026-06-01T00:00:00Z" },
        ),
      ],
    });
    const plan2 = planFor(s, "node-2", { ipv4: "192.168.0.12" });
    assertGolden(join(GOLDEN, "overlap-node-2.golden"), renderPlan(plan2, OPTS));
    assert.deepEqual(tracePacket(plan2, { src: "172.29.2.5", dst: "203.0.113.9" }).snat, [
      "10.168.60.102",
    ]);
    assert.deepEqual(tracePacket(plan2, { src: "172.29.2.5", dst: "198.51.100.9" }).snat, [
      "10.168.60.101",
    ]);
  });
});

describe("planNode() with no free routing table", () => {
  it("fails closed and says why", () => {
    const outcome = computeCluster(seed);
    const used = Array.from({ length: 101 }, (_, i) => 3000 + i);
    const plan = planNode(
      nodeViewFromOutcome(outcome, "node-1", {
        local: localFacts({ ipv4: "192.168.0.11", usedTables: used }),
      }),
    );
    assert.match(
      plan.errors.join("\n"),
      /Cannot choose a routing table for node\/node-2: every table in \[3000, 3100\] is in use/,
    );
    assert.deepEqual(plan.ipRules, []);
    const t = tracePacket(plan, { src: "172.29.234.173", dst: "10.6.105.150" });
    assert.equal(t.verdict, "drop", "rather than leave with the pod's own address");
  });
});

describe("planNode() with several egress IPs per family", () => {
  const s = snapshot({
    nodes: [
      node("node-1", { ipv4: "192.168.0.11", podCIDRs: ["172.29.1.0/24"] }),
      node("node-2", {
        ipv4: "192.168.0.12",
        labels: { egress: "true" },
        podCIDRs: ["172.29.2.0/24"],
      }),
    ],
    pods: [
      pod("team-a", "web-1", "node-1", ["172.29.1.5"], { app: "web" }),
      pod("team-a", "web-2", "node-2", ["172.29.2.5"], { app: "web" }),
      pod("team-a", "db-1", "node-1", ["172.29.1.6"], { app: "db" }),
    ],
    gateways: [gateway("edge", { pool: ["10.168.60.100-10.168.60.110"] })],
    policies: [
      // Three explicit addresses, HTTPS only: a rule per address, round-robin.
      policy("team-a", "web", {
        podSelector: { matchLabels: { app: "web" } },
        destinationCIDRs: ["203.0.113.0/24"],
        ports: [{ protocol: "TCP", port: 443 }],
        egressIP: ["10.168.60.102", "10.168.60.100", "10.168.60.101"],
      }),
      // Two from the pool, every protocol.
      policy(
        "team-a",
        "db",
        {
          podSelector: { matchLabels: { app: "db" } },
          destinationCIDRs: ["198.51.100.0/24"],
          egressIPCount: 2,
        },
        { created: "2026-01-02T00:00:00Z" },
      ),
    ],
  });
  const outcome = computeCluster(s);
  const plan = (
    name: string,
    config: { datapath?: "iptables" | "nftables"; snatPorts?: { first: number; last: number } },
  ) =>
    planNode(
      nodeViewFromOutcome(outcome, name, {
        local: localFacts({ ipv4: name === "node-1" ? "192.168.0.11" : "192.168.0.12" }),
        config,
      }),
    );

  it("puts every address of a policy on its gateway node", () => {
    const web = outcome.policies.get("EgressPolicy/team-a/web")!;
    const db = outcome.policies.get("EgressPolicy/team-a/db")!;
    assert.deepEqual(web.egressIPs, ["10.168.60.100", "10.168.60.101", "10.168.60.102"]);
    assert.deepEqual(db.egressIPs, ["10.168.60.103", "10.168.60.104"]);
    assert.equal(web.gatewayNode, "node-2");
    const gw = plan("node-2", {});
    assert.deepEqual(gw.eips.map((e) => e.address).sort(), [
      "10.168.60.100",
      "10.168.60.101",
      "10.168.60.102",
      "10.168.60.103",
      "10.168.60.104",
    ]);
  });

  for (const datapath of ["iptables", "nftables"] as const) {
    const suffix = datapath === "nftables" ? "-nft" : "";
    it(`spreads new connections round-robin over them (${datapath})`, () => {
      const gw = plan("node-2", { datapath });
      assertGolden(join(GOLDEN, `several-eips-node-2${suffix}.golden`), renderPlan(gw, OPTS));
      const web = { src: "172.29.1.5", dst: "203.0.113.9", protocol: "tcp" as const, dport: 443 };
      const fromTunnel = tracePacket(gw, { ...web, inInterface: "sallyport" });
      assert.deepEqual(fromTunnel.snat, ["10.168.60.100", "10.168.60.101", "10.168.60.102"]);
      assert.equal(fromTunnel.policy, "EgressPolicy/team-a/web");
      const local = tracePacket(gw, { ...web, src: "172.29.2.5" });
      assert.deepEqual(local.snat, ["10.168.60.100", "10.168.60.101", "10.168.60.102"]);
      const db = tracePacket(gw, {
        src: "172.29.1.6",
        dst: "198.51.100.7",
        protocol: "udp",
        dport: 53,
        inInterface: "sallyport",
      });
      assert.deepEqual(db.snat, ["10.168.60.103", "10.168.60.104"]);
      // On the pods' node nothing changes: the traffic goes to the gateway.
      const steered = tracePacket(plan("node-1", { datapath }), web);
      assert.equal(steered.verdict, "tunnel");
      assert.equal(steered.snat, undefined);
    });

    it(`names the source ports --snat-ports gives on every SNAT (${datapath})`, () => {
      const gw = plan("node-2", { datapath, snatPorts: { first: 5000, last: 5009 } });
      assertGolden(join(GOLDEN, `snat-ports-node-2${suffix}.golden`), renderPlan(gw, OPTS));
      const icmp = tracePacket(gw, {
        src: "172.29.1.6",
        dst: "198.51.100.7",
        inInterface: "sallyport",
      });
      assert.deepEqual(icmp.snat, ["10.168.60.103", "10.168.60.104"], "other protocols too");
    });
  }
});

describe("planNode() across a takeover (many policies on one egress IP)", () => {
  // node-1 runs the pods; node-2 holds the egress IP, node-3 (the gateway's other node) is its
  // first standby.
  const POLICIES = 50;
  const cluster = snapshot({
    nodes: [
      node("node-1", { ipv4: "192.168.0.11", podCIDRs: ["172.29.1.0/24"] }),
      node("node-2", {
        ipv4: "192.168.0.12",
        labels: { egress: "true" },
        podCIDRs: ["172.29.2.0/24"],
      }),
      node("node-3", {
        ipv4: "192.168.0.13",
        labels: { egress: "true" },
        podCIDRs: ["172.29.3.0/24"],
      }),
    ],
    pods: [
      ...Array.from({ length: POLICIES }, (_, i) =>
        pod("default", `app-${i}`, "node-1", [`172.29.1.${10 + i}`], { app: `a${i}` }),
      ),
      pod("default", "on-standby", "node-3", ["172.29.3.9"], { app: "a0" }),
    ],
    gateways: [gateway("edge", { pool: ["10.168.60.100-10.168.60.110"] })],
    policies: Array.from({ length: POLICIES }, (_, i) =>
      policy("default", `p${i}`, {
        podSelector: { matchLabels: { app: `a${i}` } },
        destinationCIDRs: ["10.6.105.150/32"],
        egressIP: ["10.168.60.100"],
      }),
    ),
    serviceCIDRs: ["10.96.0.0/16"],
  });
  const outcome = computeCluster(cluster);
  const planner = (name: string, ipv4: string, standbyDatapath = true) => {
    const view = nodeViewFromOutcome(outcome, name, {
      local: localFacts({ ipv4 }),
      config: { standbyDatapath },
    });
    const p = new NodePlanner(name, view.config);
    p.setLocal(view.local);
    p.setPeers(view.peers);
    p.setIgnoreCIDRs(view.ignoreCIDRs);
    for (const v of view.policies) p.setPolicy(v);
    return { p, views: view.policies };
  };
  /** What the agents do when node-2 is found dead: every policy of it to its first standby. */
  const takeOver = (n: { p: NodePlanner; views: readonly PolicyView[] }) => {
    for (const v of n.views) {
      assert.equal(v.gatewayNode, "node-2");
      assert.equal(v.standbyNodes?.[0], "node-3");
      n.p.setPolicy({ ...v, gatewayNode: "node-3" });
    }
    return n.p.plan();
  };
  /** The chains whose rules differ between two plans, per family. */
  const changedChains = (a: NodePlan, b: NodePlan) => {
    const out: string[] = [];
    for (const family of [4, 6] as const)
      for (const table of ["filter", "nat", "mangle"] as const) {
        const ca = a.rules[family]?.chains.get(table) ?? new Map();
        const cb = b.rules[family]?.chains.get(table) ?? new Map();
        for (const name of new Set([...ca.keys(), ...cb.keys()]))
          if (JSON.stringify(ca.get(name)) !== JSON.stringify(cb.get(name)))
            out.push(`${family} ${table} ${name}`);
      }
    return out;
  };

  it("a steering node rewrites one group chain and no set or policy rule; its route to the standby was ready", () => {
    const n1 = planner("node-1", "192.168.0.11");
    const before = n1.p.plan();
    const ready = before.ipRules.map((r) => r.fwmark);
    assert.equal(ready.length, 2, "a routing table toward the holder, and one toward its standby");
    const after = takeOver(n1);
    assert.deepEqual(changedChains(before, after), [
      `4 mangle ${groupChain("eips:10.168.60.100")}`,
    ]);
    assert.equal(after.ipsets, before.ipsets, "the same sets");
    const mangle = (plan: NodePlan) => plan.rules[4]!.chains.get("mangle")!;
    assert.equal(
      mangle(after).get("SALLYPORT-MARK-REQUEST"),
      mangle(before).get("SALLYPORT-MARK-REQUEST"),
      "an unchanged chain is the same object: the datapath's diff skips it unread",
    );
    // The standby's table was ready; only the lost holder's goes.
    const has = (list: readonly object[], x: object) =>
      list.some((y) => JSON.stringify(y) === JSON.stringify(x));
    assert.ok(after.ipRules.every((r) => has(before.ipRules, r)));
    assert.ok(after.routes.every((r) => has(before.routes, r)));
    assert.equal(after.ipRules.length, 1);
    const t = tracePacket(after, { src: "172.29.1.10", dst: "10.6.105.150" });
    assert.equal(t.verdict, "tunnel");
    assert.equal(t.via, "100.127.0.3", "to node-3 now");
  });

  it("the policies of one egress IP share a tunnel class: one steering chain for them all, one class at the gateway", () => {
    const other = policy("default", "other", {
      podSelector: { matchLabels: { app: "a1" } },
      destinationCIDRs: ["10.6.105.151/32"],
      egressIP: ["10.168.60.101"],
    });
    const more = computeCluster({ ...cluster, policies: [...cluster.policies, other] });
    const classOf = (name: string) =>
      more.policies.get(`EgressPolicy/default/${name}`)?.tunnelClass;
    const shared = classOf("p0");
    assert.ok(shared !== undefined);
    assert.deepEqual(
      Array.from({ length: POLICIES }, (_, i) => classOf(`p${i}`)).filter((c) => c !== shared),
      [],
      "every policy of 10.168.60.100 has its class",
    );
    assert.ok(classOf("other") !== undefined && classOf("other") !== shared, "another egress IP");
    const nftOf = (name: string, ipv4: string) =>
      planNode(
        nodeViewFromOutcome(more, name, {
          local: localFacts({ ipv4 }),
          config: { datapath: "nftables" },
        }),
      ).nft!;
    assert.deepEqual(
      nftOf("node-1", "192.168.0.11")
        .steerTo.map((s) => s.tunnelClass)
        .sort(),
      [shared, classOf("other")].sort(),
      "one steering chain per class, not per policy",
    );
    const held = more.policies.get("EgressPolicy/default/p0")!.gatewayNode!;
    const gateway = nftOf(held, held === "node-2" ? "192.168.0.12" : "192.168.0.13");
    assert.deepEqual(
      gateway.tunnelClasses?.[4]?.filter((c) => c.tunnelClass === shared),
      [{ tunnelClass: shared, policy: "EgressPolicy/default/p0", eips: ["10.168.60.100"] }],
    );
  });

  it("the first policy by name stands for a shared tunnel class on both packet filters (what explain names)", () => {
    // Last in precedence (the newest), first by name.
    const late = policy(
      "default",
      "a-late",
      {
        podSelector: { matchLabels: { app: "a1" } },
        destinationCIDRs: ["10.6.105.151/32"],
        egressIP: ["10.168.60.100"],
      },
      { created: "2026-02-01T00:00:00Z" },
    );
    const more = computeCluster({ ...cluster, policies: [...cluster.policies, late] });
    const shared = more.policies.get("EgressPolicy/default/p0")!.tunnelClass!;
    assert.equal(more.policies.get("EgressPolicy/default/a-late")?.tunnelClass, shared);
    const held = more.policies.get("EgressPolicy/default/p0")!.gatewayNode!;
    const planOf = (datapath: "iptables" | "nftables") =>
      planNode(
        nodeViewFromOutcome(more, held, {
          local: localFacts({ ipv4: held === "node-2" ? "192.168.0.12" : "192.168.0.13" }),
          config: { datapath },
        }),
      );
    const iptables = planOf("iptables")
      .rules[4]!.chains.get("nat")!
      .get("SALLYPORT-SNAT-EIP")!
      .filter((r) => r.mark?.value === shared)
      .map((r) => r.comment);
    assert.deepEqual(iptables, ["EgressPolicy/default/a-late"]);
    assert.deepEqual(
      planOf("nftables")
        .nft!.tunnelClasses?.[4]?.filter((c) => c.tunnelClass === shared)
        .map((c) => c.policy),
      ["EgressPolicy/default/a-late"],
    );
  });

  it("with --no-standby-datapath a node of the gateway carries nothing in advance: a takeover programs every policy", () => {
    const n3 = planner("node-3", "192.168.0.13", false);
    const before = n3.p.plan();
    assert.equal(before.rules[4]?.chains.get("nat")?.get("SALLYPORT-SNAT-EIP")?.length ?? 0, 0);
    const after = takeOver(n3);
    assert.equal(
      after.rules[4]?.chains.get("nat")?.get("SALLYPORT-SNAT-EIP")?.length,
      POLICIES + 1,
      "one per policy, and one for the tunnel class they share (one egress IP)",
    );
  });

  it("says which holders' policies it carries in advance: all those it stands by for", () => {
    const n3 = planner("node-3", "192.168.0.13");
    n3.p.plan();
    assert.deepEqual([...n3.p.preparedFor()], ["node-2"]);
    const off = planner("node-3", "192.168.0.13", false);
    off.p.plan();
    assert.deepEqual([...off.p.preparedFor()], []);
    // One policy it stands by for that it does not carry (its gateway's status does not list
    // node-3 yet) makes it say nothing of node-2.
    n3.p.setPolicy({ ...n3.views[0]!, gatewayNodes: ["node-2"] });
    n3.p.plan();
    assert.deepEqual([...n3.p.preparedFor()], []);
    const n1 = planner("node-1", "192.168.0.11");
    n1.p.plan();
    assert.deepEqual([...n1.p.preparedFor()], [], "no node lists node-1 as standby");
  });

  it("what a node of the gateway carries in advance does not depend on the standby lists; a node outside the gateway carries no SNAT rule", () => {
    const n3 = planner("node-3", "192.168.0.13");
    const listed = n3.p.plan();
    // node-3 dies and comes back: for a while no policy lists it as standby.
    for (const v of n3.views) n3.p.setPolicy({ ...v, standbyNodes: [] });
    const unlisted = n3.p.plan();
    assert.deepEqual(changedChains(listed, unlisted), []);
    assert.equal(unlisted.ipsets, listed.ipsets);
    const n1 = planner("node-1", "192.168.0.11").p.plan();
    assert.equal(n1.rules[4]?.chains.get("nat")?.get("SALLYPORT-SNAT-EIP")?.length ?? 0, 0);
  });

  it("a node of the gateway carries the sets, SNAT rules and reply routes in advance; a takeover rewrites one chain and adds the egress IP", () => {
    const n3 = planner("node-3", "192.168.0.13");
    const before = n3.p.plan();
    assert.deepEqual(before.eips, [], "it holds nothing yet");
    // Its own pod goes to the holder, exempt from SNAT like any steered packet.
    const own = tracePacket(before, { src: "172.29.3.9", dst: "10.6.105.150" });
    assert.equal(own.verdict, "tunnel");
    assert.equal(own.via, "100.127.0.2");
    assert.equal(own.snat, undefined);
    // A peer that still thinks it holds them: dropped, never sent back into the tunnel.
    const stray = tracePacket(before, {
      src: "172.29.1.10",
      dst: "10.6.105.150",
      inInterface: "sallyport",
    });
    assert.equal(stray.verdict, "drop");

    const after = takeOver(n3);
    assert.deepEqual(changedChains(before, after), [
      `4 mangle ${groupChain("eips:10.168.60.100")}`,
    ]);
    assert.deepEqual(
      after.ipsets.filter((s) => !s.name.includes("eip")),
      before.ipsets.filter((s) => !s.name.includes("eip")),
      "every pod of every policy was in its sets already",
    );
    assert.deepEqual(
      after.routes,
      before.routes.filter((r) => r.dst !== "default"),
      "the reply routes were there (the route toward the lost holder goes)",
    );
    assert.deepEqual(
      after.eips.map((e) => e.address),
      ["10.168.60.100"],
    );
    const t = tracePacket(after, {
      src: "172.29.1.10",
      dst: "10.6.105.150",
      inInterface: "sallyport",
    });
    assert.equal(t.verdict, "usual");
    assert.deepEqual(t.snat, ["10.168.60.100"]);
  });
});
