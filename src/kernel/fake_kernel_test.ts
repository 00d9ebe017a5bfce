/**
 * The fake kernel against the real tools, then `Datapath` on top of it: the datapath tests that
 * would otherwise need root and network namespaces.
 *
 * Every exit code and message asserted in the first half was observed with the real tools in a
 * throwaway network namespace (Linux 6.18, iptables 1.8.9 nf_tables, ipset 7.17, nftables 1.0.6,
 * iproute2 6.1.0).
 *
 * Address plan (src/engine/testing.ts): node-N holds 192.168.0.(10+N)/24 and
 * fd00:192:168::(10+N)/64 on eth0 (MTU 1500); its pods are in 172.29.N.0/24 and
 * fd00:172:29:N::/64; egress IPs come from 10.168.60.100-110 and fd00:a::100-110; services are
 * 10.96.0.0/16. Foreign state on every host: kubelet's chains, a flannel-style masquerade, a
 * kube-proxy set, table 100 with its rule, a cni0 bridge stand-in.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import type { EgressPolicy } from "../api/types.ts";
import { computeCluster } from "../engine/cluster.ts";
import { NodePlanner, planNode } from "../engine/node_plan.ts";
import { nodeViewFromOutcome } from "../engine/node_view.ts";
import type { NodePlan } from "../engine/plan.ts";
import type { Snapshot } from "../engine/snapshot.ts";
import { gateway, node, pod, policy, snapshot } from "../engine/testing.ts";
import type { NodeConfig } from "../engine/view.ts";
import { FakeClock } from "../lib/clock.ts";
import type { Family } from "../lib/ip.ts";
import {
  parseFdb,
  parseLinks,
  parseNeighbors,
  parseRoutes,
  parseRules,
} from "../render/iproute.ts";
import { parseIpsetSave } from "../render/ipset.ts";
import { desiredTable, parseNftTable, renderNftTable } from "../render/nftables.ts";
import { Datapath, DatapathError, type KernelState, stateOfPlan } from "./datapath.ts";
import { localFactsFrom } from "./facts.ts";
import { FakeKernel, isWriteCommand } from "./fake_kernel.ts";
import { Iptables } from "./iptables.ts";
import { detectFilter, openDatapath } from "./open.ts";
import type { Runner, RunOptions, RunResult } from "./runner.ts";

const RULE_PREF = 5900;
const TUNNEL = "sallyport";

function run(fake: FakeKernel, argv: string[], stdin?: string): Promise<RunResult> {
  return fake.run(argv, stdin === undefined ? {} : { stdin });
}

async function ok(fake: FakeKernel, argv: string[], stdin?: string): Promise<string> {
  const r = await run(fake, argv, stdin);
  assert.equal(r.code, 0, `${argv.join(" ")} failed: ${r.stderr}`);
  return r.stdout;
}

const IPT = ["iptables-nft-restore", "--noflush", "-w", "5", "-W", "100000"];
const IP6T = ["ip6tables-nft-restore", "--noflush", "-w", "5", "-W", "100000"];

/** A host as the agent finds it: an underlay, kubelet's and a CNI's rules, others' routes. */
function host(index: number): FakeKernel {
  const fake = new FakeKernel();
  fake.seed(
    ["ip", "-batch", "-"],
    [
      "link add eth0 type dummy",
      "link set eth0 up",
      `addr add 192.168.0.${10 + index}/24 dev eth0`,
      `addr add fd00:192:168::${10 + index}/64 dev eth0 nodad`,
      "link add cni0 type dummy",
      "link set cni0 up",
      `addr add 10.244.${index}.1/24 dev cni0`,
      "route add 10.99.0.0/16 dev eth0 table 100",
      "rule add pref 100 fwmark 0x1 table 100",
      "",
    ].join("\n"),
  );
  fake.seed(["ip", "-6", "rule", "add", "pref", "100", "fwmark", "0x1", "table", "100"]);
  fake.seed(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
  fake.seed(
    ["ipset", "restore"],
    [
      "create KUBE-TEST-SET hash:ip family inet hashsize 1024 maxelem 65536",
      "add KUBE-TEST-SET 10.96.0.1",
      "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536",
      "add KUBE-CLUSTER-IP 10.96.0.1,tcp:443",
      "",
    ].join("\n"),
  );
  for (const [family, restore] of [
    [4, IPT],
    [6, IP6T],
  ] as const) {
    fake.seed(
      restore,
      [
        "*mangle",
        ":KUBE-IPTABLES-HINT - [0:0]",
        ":KUBE-KUBELET-CANARY - [0:0]",
        "COMMIT",
        "*filter",
        ":KUBE-FIREWALL - [0:0]",
        ":KUBE-KUBELET-CANARY - [0:0]",
        "-A INPUT -j KUBE-FIREWALL",
        `-A KUBE-FIREWALL ! -s ${family === 4 ? "127.0.0.0/8" : "::1/128"} -m comment --comment "block incoming localnet connections" -j DROP`,
        "COMMIT",
        "*nat",
        ":KUBE-KUBELET-CANARY - [0:0]",
        ":KUBE-SERVICES - [0:0]",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        family === 4
          ? "-A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE"
          : "-A POSTROUTING -s fd00:244::/56 -j MASQUERADE",
        ...(family === 4
          ? ["-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT"]
          : []),
        "COMMIT",
        "",
      ].join("\n"),
    );
  }
  return fake;
}

/** Datapath exactly as src/kernel/open.ts builds it, on the fake. */
function datapathOn(runner: Runner): Datapath {
  return new Datapath({
    runner,
    iptables: new Iptables(runner, "nft"),
    families: [4, 6],
    rulePref: RULE_PREF,
    tunnelDevice: TUNNEL,
  });
}

/** What the agent does: facts from the kernel, then the plan of node-`index`. */
function planWith(
  index: number,
  state: KernelState,
  s: Snapshot,
  random = 0.5,
  config: Partial<NodeConfig> = {},
): NodePlan {
  const outcome = computeCluster(s);
  const self = s.nodes.find((n) => n.name === `node-${index}`)!;
  const local = localFactsFrom(state, {
    nodeAddresses: self.addresses,
    peers: outcome.peers,
    rulePref: RULE_PREF,
    random: () => random,
  });
  return planNode(nodeViewFromOutcome(outcome, `node-${index}`, { local, config }));
}

/** `sallyport agent --snat-ports` now and then. */
const SNAT_PORTS = { first: 20000, last: 29999 };

/** Lines of the fake's dump that are not Sallyport's. */
function foreign(dump: string): string {
  return dump
    .split("\n")
    .filter((l) => !/SALLYPORT|sallyport|spe-|pref 5900 /.test(l))
    .join("\n");
}

/** The part of a kernel state Sallyport owns, in a form that compares with deepEqual. */
function owned(state: KernelState) {
  const rules: Record<string, readonly string[]> = {};
  for (const family of [4, 6] as const) {
    for (const [table, t] of state.rules[family] ?? new Map()) {
      for (const [chain, c] of t.chains) {
        const ours = chain.startsWith("SALLYPORT-");
        const lines = ours ? c.rules : c.rules.filter((r) => /-[jg] SALLYPORT-/.test(r));
        if (ours || lines.length > 0) rules[`v${family} ${table} ${chain}`] = lines;
      }
    }
  }
  const ipsets = Object.fromEntries(
    [...state.ipsets.values()]
      .filter((s) => s.name.startsWith("sallyport-"))
      .map((s) => [
        s.name,
        {
          type: s.type,
          family: s.family,
          members: [...s.members].sort(),
          nomatch: [...s.nomatch].sort(),
        },
      ])
      .sort(([a], [b]) => (String(a) < String(b) ? -1 : 1)),
  );
  const r = state.routing;
  const ipRules = r.rules
    .filter((x) => x.pref === RULE_PREF)
    .map((x) => `v${x.family} fwmark ${x.fwmark}/${x.mask} table ${x.table}`)
    .sort();
  const tables = new Set(r.rules.filter((x) => x.pref === RULE_PREF).map((x) => x.table));
  const routes = r.routes
    .filter((x) => tables.has(x.table))
    .map((x) => `v${x.family} table ${x.table} ${x.dst} via ${x.via} dev ${x.dev}`)
    .sort();
  const links = r.links
    .filter((l) => l.name === TUNNEL || l.name.startsWith("spe-"))
    .map((l) => ({
      name: l.name,
      kind: l.kind,
      parent: l.parent,
      mac: l.mac,
      up: l.up,
      addresses: [...l.addresses].sort(),
      ...(l.kind === "vxlan" ? { mtu: l.mtu, vxlan: l.vxlan } : { macvlanMode: l.macvlanMode }),
    }))
    .sort((a, b) => (a.name < b.name ? -1 : 1));
  const neighbors = r.neighbors.map((n) => `${n.dev} ${n.address} ${n.mac}`).sort();
  const fdb = r.fdb.map((f) => `${f.dev} ${f.mac} ${f.dst}`).sort();
  return { rules, ipsets, ipRules, routes, links, neighbors, fdb };
}

async function assertHolds(dp: Datapath, plan: NodePlan, message?: string): Promise<void> {
  assert.deepEqual(owned(await dp.read()), owned(stateOfPlan(plan)), message);
}

function writes(fake: FakeKernel): string[] {
  return fake.calls.filter((c) => isWriteCommand(c.argv)).map((c) => c.argv.join(" "));
}

// ------------------------------------------------------------------------------------------------
// Scenarios: those of the golden files (src/engine/testdata), on hosts that match them.

const NODES = [1, 2, 3].map((i) =>
  node(`node-${i}`, {
    ipv4: `192.168.0.${10 + i}`,
    ipv6: `fd00:192:168::${10 + i}`,
    podCIDRs: [`172.29.${i}.0/24`, `fd00:172:29:${i}::/64`],
    ...(i === 2 ? { labels: { egress: "true" } } : {}),
  }),
);
const WEB = { app: "web" };
const PODS = [
  pod("team-a", "web-1", "node-1", ["172.29.1.5", "fd00:172:29:1::5"], WEB),
  pod("team-a", "web-2", "node-2", ["172.29.2.5", "fd00:172:29:2::5"], WEB),
  pod("team-a", "other", "node-1", ["172.29.1.6", "fd00:172:29:1::6"]),
];
const POOL = ["10.168.60.100-10.168.60.110", "fd00:a::100-fd00:a::110"];

const SCENARIOS: Record<string, Snapshot> = {
  "one policy, explicit egress IP (seed 000/003)": snapshot({
    nodes: NODES.slice(0, 2),
    pods: PODS,
    gateways: [gateway("edge", { pool: POOL })],
    policies: [
      policy("team-a", "web", {
        podSelector: { matchLabels: WEB },
        destinationCIDRs: ["10.6.105.150/32"],
        egressIP: ["10.168.60.100"],
      }),
    ],
    serviceCIDRs: ["10.96.0.0/16"],
  }),
  "empty destinationCIDRs with an exclusion": snapshot({
    nodes: NODES.slice(0, 2),
    pods: PODS,
    serviceCIDRs: ["10.96.0.0/16", "fd00:10:96::/112"],
    gateways: [gateway("edge", { pool: POOL })],
    policies: [
      policy("team-a", "web", {
        podSelector: { matchLabels: WEB },
        excludedCIDRs: ["192.0.2.0/24"],
      }),
    ],
  }),
  "dual stack with ports": snapshot({
    nodes: NODES.slice(0, 2),
    pods: PODS,
    gateways: [gateway("edge", { pool: POOL })],
    policies: [
      policy("team-a", "web", {
        podSelector: { matchLabels: WEB },
        destinationCIDRs: ["203.0.113.0/24", "2001:db8::/64"],
        ports: [
          { protocol: "TCP", port: 443 },
          { protocol: "UDP", port: 53 },
        ],
      }),
    ],
  }),
  "two overlapping policies": snapshot({
    nodes: NODES.slice(0, 2),
    pods: PODS,
    gateways: [gateway("edge", { pool: POOL })],
    policies: [
      policy("team-a", "all", { podSelector: { matchLabels: WEB }, egressIP: ["10.168.60.101"] }),
      policy(
        "team-a",
        "partner",
        {
          podSelector: { matchLabels: WEB },
          destinationCIDRs: ["203.0.113.0/24"],
          egressIP: ["10.168.60.102"],
          priority: 100,
        },
        { created: "2026-06-01T00:00:00Z" },
      ),
    ],
  }),
  "several egress IPs per family": snapshot({
    nodes: NODES.slice(0, 2),
    pods: PODS,
    gateways: [gateway("edge", { pool: POOL })],
    policies: [
      policy("team-a", "web", {
        podSelector: { matchLabels: WEB },
        destinationCIDRs: ["203.0.113.0/24", "2001:db8::/64"],
        ports: [{ protocol: "TCP", port: 443 }],
        egressIP: ["10.168.60.103", "10.168.60.104", "10.168.60.105", "fd00:a::103", "fd00:a::104"],
      }),
      policy(
        "team-a",
        "all",
        { podSelector: { matchLabels: WEB }, egressIPCount: 2 },
        { created: "2026-06-01T00:00:00Z" },
      ),
    ],
    serviceCIDRs: ["10.96.0.0/16", "fd00:10:96::/112"],
  }),
};

// ================================================================================================
// The fake itself

describe("FakeKernel: iptables-nft", () => {
  it("prints nothing for a host without tables, and the empty skeleton for -t (backend detection)", async () => {
    const fake = new FakeKernel();
    assert.equal(await ok(fake, ["iptables-nft-save"]), "");
    assert.equal(await ok(fake, ["iptables-legacy-save"]), "");
    const mangle = await ok(fake, ["iptables-nft-save", "-t", "mangle"]);
    assert.match(mangle, /^\*mangle\n:PREROUTING ACCEPT \[0:0\]\n:INPUT ACCEPT/m);
    assert.equal(await ok(fake, ["iptables-nft-save"]), "", "-t does not create the table");
    const dp = await openDatapath({ runner: host(1) });
    assert.equal(dp.options.iptables.backend, "nft", "kubelet's hint chain is in nft's mangle");
  });

  it("prints rules as iptables-save canonicalises them, whatever form they were written in", async () => {
    const fake = new FakeKernel();
    fake.seed(["ipset", "create", "s4", "hash:net"]);
    await ok(
      fake,
      IPT,
      [
        "*mangle",
        ":K - [0:0]",
        ":A - [0:0]",
        "-A K -m conntrack --ctstate NEW,INVALID,UNTRACKED -j ACCEPT",
        "-A K -m mark --mark 0x1/0xffffffff -j ACCEPT",
        "-A K -m mark --mark 0x0012/0xFF -j ACCEPT",
        '-A K -m comment --comment plain -m comment --comment "it\'s" -j A',
        "-A K -j MARK --set-xmark 0x1",
        "-A K -m set ! --match-set s4 dst -p TCP -m multiport --dports 80,443:445 -j ACCEPT",
        "COMMIT",
        "",
      ].join("\n"),
    );
    // Captured from iptables-nft-save v1.8.9 for the same input.
    assert.equal(
      (await ok(fake, ["iptables-nft-save", "-t", "mangle"])).split("\n").slice(6, -3).join("\n"),
      [
        ":POSTROUTING ACCEPT [0:0]",
        ":A - [0:0]",
        ":K - [0:0]",
        "-A K -m conntrack --ctstate INVALID,NEW,UNTRACKED -j ACCEPT",
        "-A K -m mark --mark 0x1 -j ACCEPT",
        "-A K -m mark --mark 0x12/0xff -j ACCEPT",
        '-A K -m comment --comment plain -m comment --comment "it\\\'s" -j A',
        "-A K -j MARK --set-xmark 0x1/0xffffffff",
        "-A K -p tcp -m set ! --match-set s4 dst -m multiport --dports 80,443:445 -j ACCEPT",
      ].join("\n"),
    );
  });

  it("rejects a rule that names a missing ipset, at its line, and applies nothing of the table", async () => {
    const fake = new FakeKernel();
    const r = await run(
      fake,
      IPT,
      "*mangle\n:SALLYPORT-A - [0:0]\n-A SALLYPORT-A -m set --match-set nope src -j ACCEPT\nCOMMIT\n",
    );
    assert.equal(r.code, 2);
    assert.match(
      r.stderr,
      /^iptables-nft-restore v1\.8\.9 \(nf_tables\): Set nope doesn't exist\.\n\nError occurred at line: 3\n/,
    );
    assert.equal(await ok(fake, ["iptables-nft-save"]), "");
  });

  it("rejects a set of the other family", async () => {
    const fake = new FakeKernel();
    fake.seed(["ipset", "create", "s6", "hash:net", "family", "inet6"]);
    const r = await run(
      fake,
      IPT,
      "*nat\n:N - [0:0]\n-A N -m set --match-set s6 src -j ACCEPT\nCOMMIT\n",
    );
    assert.equal(r.code, 2);
    assert.match(r.stderr, /The protocol family of set s6 is IPv6, which is not applicable\./);
  });

  it("rejects a jump or goto to a missing chain at COMMIT, even one declared later in the table", async () => {
    const fake = new FakeKernel();
    for (const [how, at] of [
      ["-j", 4],
      ["-g", 4],
    ] as const) {
      const r = await run(
        fake,
        IPT,
        `*mangle\n:SALLYPORT-A - [0:0]\n-A SALLYPORT-A ${how} SALLYPORT-NOPE\nCOMMIT\n`,
      );
      assert.equal(r.code, 2);
      assert.match(
        r.stderr,
        new RegExp(`Chain 'SALLYPORT-NOPE' does not exist\nError occurred at line: ${at}\n`),
      );
    }
    const later = await run(fake, IPT, "*filter\n:LA - [0:0]\n-A LA -j LB\n:LB - [0:0]\nCOMMIT\n");
    assert.equal(later.code, 2, "nft resolves jumps in input order");
    assert.equal(await ok(fake, ["iptables-nft-save"]), "");
  });

  it("refuses to delete a chain that is referenced or not empty, and rolls the whole table back", async () => {
    const fake = new FakeKernel();
    await ok(
      fake,
      IPT,
      '*mangle\n:SALLYPORT-ZED - [0:0]\n:SALLYPORT-ALPHA - [0:0]\n-I PREROUTING 1 -m comment --comment "sallyport: x" -j SALLYPORT-ZED\n-A SALLYPORT-ZED -j SALLYPORT-ALPHA\nCOMMIT\n',
    );
    const before = fake.dump();
    const referenced = await run(fake, IPT, "*mangle\n-X SALLYPORT-ALPHA\nCOMMIT\n");
    assert.equal(referenced.code, 4);
    assert.equal(
      referenced.stderr,
      "iptables-nft-restore v1.8.9 (nf_tables): \nline 2: CHAIN_DEL failed (Device or resource busy): chain SALLYPORT-ALPHA\n",
    );
    const notEmpty = await run(
      fake,
      IPT,
      '*mangle\n-D PREROUTING -m comment --comment "sallyport: x" -j SALLYPORT-ZED\n-X SALLYPORT-ZED\nCOMMIT\n',
    );
    assert.equal(notEmpty.code, 4);
    assert.match(
      notEmpty.stderr,
      /line 3: CHAIN_DEL failed \(Device or resource busy\): chain SALLYPORT-ZED/,
    );
    assert.equal(fake.dump(), before, "the -D before the failing -X is rolled back too");
    await ok(
      fake,
      IPT,
      '*mangle\n-D PREROUTING -m comment --comment "sallyport: x" -j SALLYPORT-ZED\n:SALLYPORT-ZED - [0:0]\n-X SALLYPORT-ZED\n-X SALLYPORT-ALPHA\nCOMMIT\n',
    );
    assert.doesNotMatch(
      fake.dump(),
      /SALLYPORT/,
      "unhooked, flushed, then deleted: as Datapath does it",
    );
  });

  it("commits each table on its own: an earlier table stays when a later one fails", async () => {
    const fake = new FakeKernel();
    const r = await run(
      fake,
      IPT,
      "*filter\n:SALLYPORT-T1 - [0:0]\nCOMMIT\n*mangle\n:SALLYPORT-T2 - [0:0]\n-A SALLYPORT-T2 -j SALLYPORT-NOPE\nCOMMIT\n",
    );
    assert.equal(r.code, 2);
    assert.match(r.stderr, /Error occurred at line: 7/);
    assert.match(fake.dump(), /iptables4 filter :SALLYPORT-T1/);
    assert.doesNotMatch(fake.dump(), /SALLYPORT-T2/);
  });

  it("answers the cache's refusals with exit 1 and the line", async () => {
    const fake = new FakeKernel();
    await ok(fake, IPT, "*mangle\n:SALLYPORT-A - [0:0]\n-A PREROUTING -j SALLYPORT-A\nCOMMIT\n");
    const cases: [string, string][] = [
      ["-D PREROUTING -j ACCEPT", "Bad rule (does a matching rule exist in that chain?)"],
      ["-I PREROUTING 3 -j ACCEPT", "Index of insertion too big"],
      ["-A SALLYPORT-NEW -j ACCEPT", "No chain/target/match by that name"],
      ["-X SALLYPORT-NEW", "No chain/target/match by that name"],
      ["-F SALLYPORT-NEW", "No chain/target/match by that name"],
    ];
    for (const [line, message] of cases) {
      const r = await run(fake, IPT, `*mangle\n${line}\nCOMMIT\n`);
      assert.equal(r.code, 1, line);
      assert.equal(r.stderr, `iptables-nft-restore: line 2 failed: ${message}.\n`, line);
    }
    const noCommit = await run(fake, IPT, "*mangle\n:SALLYPORT-B - [0:0]\n");
    assert.equal(noCommit.code, 1);
    assert.equal(noCommit.stderr, "iptables-nft-restore: COMMIT expected at line 3\n");
    const long = await run(fake, IPT, "*mangle\n:SALLYPORT-0123456789012345678 - [0:0]\nCOMMIT\n");
    assert.equal(long.code, 2);
    assert.match(
      long.stderr,
      /chain name `SALLYPORT-0123456789012345678' too long \(must be under 29 chars\)/,
    );
  });

  it("refuses targets where the kernel's checkentry does: SNAT outside nat, TCPMSS without -p tcp", async () => {
    const fake = new FakeKernel();
    const cases: [string, number, string][] = [
      [
        "-A K -j SNAT --to-source 10.0.0.1",
        4,
        "line 3: RULE_APPEND failed (Invalid argument): rule in chain K",
      ],
      [
        "-A K -j TCPMSS --clamp-mss-to-pmtu",
        4,
        "line 3: RULE_APPEND failed (Invalid argument): rule in chain K",
      ],
      ["-A K -m tcp --tcp-flags SYN,RST SYN -j ACCEPT", 2, "TCP match requires '-p tcp'"],
    ];
    for (const [rule, code, message] of cases) {
      const r = await run(fake, IPT, `*mangle\n:K - [0:0]\n${rule}\nCOMMIT\n`);
      assert.equal(r.code, code, rule);
      assert.ok(r.stderr.includes(message), r.stderr);
    }
    const prerouting = await run(
      fake,
      IPT,
      "*mangle\n-A PREROUTING -p tcp -j TCPMSS --clamp-mss-to-pmtu\nCOMMIT\n",
    );
    assert.equal(prerouting.code, 4, "path-MTU clamping only in FORWARD, OUTPUT and POSTROUTING");
    await ok(fake, IPT, "*mangle\n:K - [0:0]\n-A K -p tcp -j TCPMSS --clamp-mss-to-pmtu\nCOMMIT\n");
  });

  it("matches neighbour discovery as ip6tables does: names or numbers, saved as numbers, only with -p ipv6-icmp", async () => {
    const fake = new FakeKernel();
    const ip6 = ["ip6tables-nft-restore", "--noflush"];
    await ok(
      fake,
      ip6,
      "*mangle\n:K - [0:0]\n-A K -p icmpv6 -m icmp6 --icmpv6-type neighbour-solicitation -j RETURN\n-A K -p ipv6-icmp -m icmp6 --icmpv6-type 136 -j RETURN\nCOMMIT\n",
    );
    const saved = await ok(fake, ["ip6tables-nft-save", "-t", "mangle"]);
    assert.match(saved, /^-A K -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j RETURN$/m);
    assert.match(saved, /^-A K -p ipv6-icmp -m icmp6 --icmpv6-type 136 -j RETURN$/m);
    const bare = await run(
      fake,
      ip6,
      "*mangle\n:L - [0:0]\n-A L -m icmp6 --icmpv6-type 135 -j RETURN\nCOMMIT\n",
    );
    assert.equal(bare.code, 4, "the kernel refuses icmp6 without -p ipv6-icmp");
    const unknown = await run(
      fake,
      ip6,
      "*mangle\n:L - [0:0]\n-A L -p ipv6-icmp -m icmp6 --icmpv6-type foo -j RETURN\nCOMMIT\n",
    );
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /Unknown ICMPv6 type `foo'/);
  });

  it("spreads with -m statistic --mode nth and SNATs to port ranges as iptables 1.8.9 does: saved in canonical order, its refusals word for word", async () => {
    const fake = new FakeKernel();
    await ok(
      fake,
      IPT,
      '*nat\n:X - [0:0]\n-A X -p tcp -m statistic --mode nth --packet 1 --every 3 -m comment --comment "c" -j SNAT --to-source 10.0.0.1:5000-5009\n-A X -p udp -j SNAT --to-source 10.0.0.1:5000-5000\n-A X -m statistic --every 2 --mode nth --packet 0 -j SNAT --to-source 10.0.0.2\nCOMMIT\n',
    );
    assert.match(
      await ok(fake, ["iptables-nft-save", "-t", "nat"]),
      /^-A X -p tcp -m statistic --mode nth --every 3 --packet 1 -m comment --comment c -j SNAT --to-source 10\.0\.0\.1:5000-5009\n-A X -p udp -j SNAT --to-source 10\.0\.0\.1:5000\n-A X -m statistic --mode nth --every 2 --packet 0 -j SNAT --to-source 10\.0\.0\.2$/m,
    );
    await ok(
      fake,
      IP6T,
      "*nat\n:X - [0:0]\n-A X -p sctp -m statistic --mode nth --every 2 --packet 0 -j SNAT --to-source [fd00::1]:5000-5009\nCOMMIT\n",
    );
    assert.match(
      await ok(fake, ["ip6tables-nft-save", "-t", "nat"]),
      /^-A X -p sctp -m statistic --mode nth --every 2 --packet 0 -j SNAT --to-source \[fd00::1\]:5000-5009$/m,
    );
    const refused: [string, string][] = [
      [
        "-m statistic --mode nth --every 0 --packet 0 -j ACCEPT",
        'statistic: bad value for option "--every", or out of range (1-4294967295).\n',
      ],
      [
        "-m statistic --mode nth --every 2 --packet x -j ACCEPT",
        'statistic: bad value for option "--packet", or out of range (0-4294967295).\n',
      ],
      [
        "-m statistic --mode nth --every 2 --packet 2 -j ACCEPT",
        "the --packet p must be 0 <= p <= n-1",
      ],
      [
        "-m statistic --mode nth --every 2 -j ACCEPT",
        'statistic: option "--every" also requires "--packet".\n',
      ],
      [
        "-m statistic --mode nth --packet 0 -j ACCEPT",
        'statistic: option "--packet" also requires "--every".\n',
      ],
      ["-m statistic --mode foo -j ACCEPT", 'Bad mode "foo"'],
      [
        "-m statistic --every 2 --packet 0 -j ACCEPT",
        "--probability must be specified when using random mode",
      ],
      [
        "-m statistic --mode nth -j ACCEPT",
        "--every and --packet must be specified when using nth mode",
      ],
      [
        "-m statistic --mode nth --every 3 --packet 1 --mode nth -j ACCEPT",
        'statistic: option "--mode" can only be used once.\n',
      ],
      [
        "-j SNAT --to-source 10.0.0.1:5000-5009",
        "Need TCP, UDP, SCTP or DCCP with port specification",
      ],
      ["-p tcp -j SNAT --to-source 10.0.0.1:5009-5000", "Port range `5000' funky"],
      ["-p tcp -j SNAT --to-source 10.0.0.1:5000-70000", "Port `70000' not valid"],
      ["-p tcp -j SNAT --to-source 10.0.0.300:5000", 'Bad IP address "10.0.0.300"'],
    ];
    for (const [rule, message] of refused) {
      const r = await run(fake, IPT, `*nat\n:X - [0:0]\n-A X ${rule}\nCOMMIT\n`);
      assert.equal(r.code, 2, rule);
      assert.equal(
        r.stderr,
        `iptables-nft-restore v1.8.9 (nf_tables): ${message}\nError occurred at line: 3\nTry \`iptables-nft-restore -h' or 'iptables-nft-restore --help' for more information.\n`,
        rule,
      );
    }
  });

  it("says so, with a non-zero exit, for everything it does not model", async () => {
    const fake = new FakeKernel();
    for (const [argv, stdin] of [
      [IPT, "*nat\n:N - [0:0]\n-A N -j MASQUERADE\nCOMMIT\n"],
      [IPT, "*nat\n:N - [0:0]\n-A N -m addrtype --dst-type LOCAL -j ACCEPT\nCOMMIT\n"],
      [["iptables-nft-restore"], "*nat\nCOMMIT\n"],
      [["iptables-legacy-restore", "--noflush"], "*nat\nCOMMIT\n"],
      [["ipset", "restore"], "create x hash:ip,port\n"],
      [["ip", "-batch", "-"], "link add v0 type veth peer name v1\n"],
      [["nft", "monitor"], ""],
    ] as const) {
      const r = await run(fake, [...argv], stdin);
      assert.notEqual(r.code, 0, argv.join(" "));
      assert.match(r.stderr, /FakeKernel does not model/, argv.join(" "));
    }
  });
});

describe("FakeKernel: ipset", () => {
  it("saves as ipset 7.17 does: parameters, bucketsize and initval, host entries without prefix", async () => {
    const fake = new FakeKernel();
    await ok(
      fake,
      ["ipset", "restore", "-exist"],
      "create sallyport-a hash:net family inet hashsize 1024 maxelem 1048576\nadd sallyport-a 10.0.0.5/8\nadd sallyport-a 10.1.0.0/16 nomatch\nadd sallyport-a 192.168.0.1/32\ncreate sallyport-b hash:net family inet6 hashsize 1024 maxelem 1048576\nadd sallyport-b FD00:0:0:1::/64\nadd sallyport-b fd00::1/128\n",
    );
    const text = await ok(fake, ["ipset", "save"]);
    assert.match(
      text,
      /^create sallyport-a hash:net family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x[0-9a-f]{8}$/m,
    );
    for (const line of [
      "add sallyport-a 10.0.0.0/8",
      "add sallyport-a 10.1.0.0/16 nomatch",
      "add sallyport-a 192.168.0.1",
      "add sallyport-b fd00:0:0:1::/64",
      "add sallyport-b fd00::1",
    ])
      assert.ok(text.split("\n").includes(line), line);
    const parsed = parseIpsetSave(text);
    assert.deepEqual([...parsed.get("sallyport-a")!.members].sort(), [
      "10.0.0.0/8",
      "192.168.0.1/32",
    ]);
    assert.deepEqual([...parsed.get("sallyport-a")!.nomatch], ["10.1.0.0/16"]);
  });

  it("refuses to destroy a set an iptables rule uses, and lets a swap keep the references by name", async () => {
    const fake = new FakeKernel();
    await ok(
      fake,
      ["ipset", "restore", "-exist"],
      "create s4 hash:net family inet hashsize 1024 maxelem 1048576\ncreate t4 hash:net family inet hashsize 1024 maxelem 1048576\nadd t4 1.2.3.0/24\n",
    );
    await ok(fake, IPT, "*mangle\n:K - [0:0]\n-A K -m set --match-set s4 src -j ACCEPT\nCOMMIT\n");
    const r = await run(fake, ["ipset", "restore", "-exist"], "destroy s4\n");
    assert.equal(r.code, 1);
    assert.equal(
      r.stderr,
      "ipset v7.17: Error in line 1: Set cannot be destroyed: it is in use by a kernel component\n",
    );
    await ok(fake, ["ipset", "restore", "-exist"], "swap t4 s4\ndestroy t4\n");
    assert.equal(
      await ok(fake, ["ipset", "save", "s4"]).then((t) => t.split("\n")[1]),
      "add s4 1.2.3.0/24",
    );
  });

  it("stops at the first error: earlier lines stay, unsent adds of the same set are lost", async () => {
    const fake = new FakeKernel();
    const userspace = await run(
      fake,
      ["ipset", "restore", "-exist"],
      "create c hash:net family inet hashsize 1024 maxelem 1048576\nadd c 1.2.3.0/24\nadd nope 1.2.3.4\nadd c 5.6.7.0/24\n",
    );
    assert.equal(userspace.code, 1);
    assert.equal(
      userspace.stderr,
      "ipset v7.17: Error in line 3: The set with the given name does not exist\n",
    );
    assert.doesNotMatch(
      await ok(fake, ["ipset", "save"]),
      /^add/m,
      "the set exists, its pending add was never sent",
    );
    const kernel = await run(
      fake,
      ["ipset", "restore"],
      "add c 4.0.0.0/8\nadd c 4.0.0.0/8\nadd c 5.0.0.0/8\n",
    );
    assert.equal(
      kernel.stderr,
      "ipset v7.17: Error in line 2: Element cannot be added to the set: it's already added\n",
    );
    assert.deepEqual(
      (await ok(fake, ["ipset", "save", "c"])).split("\n").filter((l) => l.startsWith("add")),
      ["add c 4.0.0.0/8"],
      "the kernel kept what came before the duplicate",
    );
  });

  it("-exist accepts an identical create only, and checks elements like the tool", async () => {
    const fake = new FakeKernel();
    fake.seed(["ipset", "create", "s4", "hash:net"]);
    const same = await run(
      fake,
      ["ipset", "restore", "-exist"],
      "create s4 hash:net family inet hashsize 4096 maxelem 65536\n",
    );
    assert.equal(same.code, 0, "hashsize is ignored: the kernel resizes");
    const cases: [string, string][] = [
      [
        "create s4 hash:net family inet hashsize 1024 maxelem 1048576",
        "Set cannot be created: set with the same name already exists",
      ],
      [
        "create sallyport-abcdefghijklmnopqrstuvwxyz hash:net",
        "Syntax error: setname 'sallyport-abcdefghijklmnopqrstuvwxyz' is longer than 31 characters",
      ],
      ["add s4 1.2.3.4/33", "Syntax error: '33' is out of range 0-32"],
      ["add s4 fd00::1", "Syntax error: cannot parse fd00::1: resolving to IPv4 address failed"],
      ["add s4 0.0.0.0/0", "The value of the CIDR parameter of the IP address is invalid"],
      ["swap s4 nope", "Sets cannot be swapped: the second set does not exist"],
      ["flush nope", "The set with the given name does not exist"],
    ];
    for (const [line, message] of cases) {
      const r = await run(fake, ["ipset", "restore", "-exist"], `${line}\n`);
      assert.equal(r.stderr, `ipset v7.17: Error in line 1: ${message}\n`, line);
    }
    assert.equal(
      (await run(fake, ["ipset", "restore", "-exist"], "destroy nope\ndel s4 9.0.0.0/8\n")).code,
      0,
    );
    const full = await run(
      fake,
      ["ipset", "restore"],
      "create tiny hash:net family inet hashsize 64 maxelem 2\nadd tiny 1.0.0.0/8\nadd tiny 2.0.0.0/8\nadd tiny 3.0.0.0/8\n",
    );
    assert.equal(
      full.stderr,
      "ipset v7.17: Error in line 4: Hash is full, cannot add more elements\n",
    );
  });
});

describe("FakeKernel: ip and bridge", () => {
  it("stops an ip -batch at the first failing line; the lines before it stay applied", async () => {
    const fake = host(1);
    const r = await run(
      fake,
      ["ip", "-batch", "-"],
      "link add t0 type dummy\naddr replace 1.2.3.4/32 dev nope\nlink set t0 up\n",
    );
    assert.equal(r.code, 1);
    assert.equal(r.stderr, 'Cannot find device "nope"\nCommand failed -:2\n');
    assert.match(fake.dump(), /^link t0 dummy mtu 1500 address \S+ down$/m);
    const again = await run(fake, ["ip", "-batch", "-"], "link add t0 type dummy\n");
    assert.equal(again.stderr, "RTNETLINK answers: File exists\nCommand failed -:1\n");
  });

  it("refuses routes through a missing or down device and gateways it cannot reach", async () => {
    const fake = host(1);
    await ok(fake, ["ip", "-batch", "-"], "link add t0 type dummy\n");
    const cases: [string[], string, number][] = [
      [["-4"], "route replace default via 100.127.0.2 dev nope onlink table 3051", 1],
      [["-4"], "route replace default via 100.127.0.2 dev t0 onlink table 3051", 1],
      [["-6"], "route replace default via fd5a:11::2 dev t0 onlink table 3051", 1],
      [["-4"], "route replace 10.9.0.0/16 dev t0 table 3051", 1],
      [["-4"], "route replace 10.9.0.0/16 via 10.1.1.1 dev eth0 table 3051", 1],
      [["-4"], "route replace 10.9.0.0/16 via 192.168.0.11 dev eth0 onlink table 3051", 1],
      [["-6"], "route replace fd99::/64 via fd77::1 dev eth0 table 3051", 1],
      [["-4"], "route del 10.9.0.0/16 table 3051", 1],
      [["-6"], "neigh replace 100.127.0.2 lladdr 02:53:50:00:00:01 dev t0 nud permanent", 1],
      [["-4"], "neigh del 100.127.0.9 dev t0", 2],
      [
        [],
        "link add sp3 type vxlan id 7798 dstport 7799 local 192.168.0.11 dev eth7 nolearning",
        255,
      ],
    ];
    const messages = [
      'Cannot find device "nope"\nCommand failed -:1\n',
      "Error: Nexthop device is not up.\nCommand failed -:1\n",
      "Error: Nexthop device is not up.\nCommand failed -:1\n",
      "Error: Device for nexthop is not up.\nCommand failed -:1\n",
      "Error: Nexthop has invalid gateway.\nCommand failed -:1\n",
      "Error: Nexthop has invalid gateway.\nCommand failed -:1\n",
      "RTNETLINK answers: No route to host\nCommand failed -:1\n",
      "RTNETLINK answers: No such process\nCommand failed -:1\n",
      'Error: inet6 address is expected rather than "100.127.0.2".\n',
      "RTNETLINK answers: No such file or directory\n",
      'Cannot find device "eth7"\n',
    ];
    for (const [i, [options, line, code]] of cases.entries()) {
      const r = await run(fake, ["ip", ...options, "-batch", "-"], `${line}\n`);
      assert.equal(r.code, code, line);
      assert.equal(r.stderr, messages[i], line);
    }
    await ok(
      fake,
      ["ip", "-4", "-batch", "-"],
      "route replace 10.9.0.0/16 via 192.168.0.1 dev eth0 table 3051\n",
    );
  });

  it("refuses a second VXLAN with the same VNI, a link over 15 characters and an MTU above the underlay's", async () => {
    const fake = host(1);
    await ok(
      fake,
      ["ip", "-batch", "-"],
      "link add sallyport type vxlan id 7799 dstport 7799 local 192.168.0.11 dev eth0 nolearning\n",
    );
    const cases: [string, string][] = [
      [
        "link add sp2 type vxlan id 7799 dstport 7799 local 192.168.0.11 dev eth0 nolearning",
        "Error: A VXLAN device with the specified VNI already exists.",
      ],
      [
        "link add spe-0123456789abc link eth0 type macvlan mode bridge",
        "Error: Attribute failed policy validation.",
      ],
      ["link set sallyport mtu 1460", "RTNETLINK answers: Invalid argument"],
      ["addr add 192.168.0.11/24 dev eth0", "Error: ipv4: Address already assigned."],
      ["addr del fd00::1/128 dev eth0", "Error: ipv6: address not found."],
    ];
    for (const [line, message] of cases) {
      const r = await run(fake, ["ip", "-batch", "-"], `${line}\n`);
      assert.equal(r.stderr, `${message}\nCommand failed -:1\n`, line);
    }
    await ok(fake, ["ip", "-batch", "-"], "link set sallyport mtu 1450\n");
  });

  it("models VXLAN gbp as measured on Linux 6.18: printed only when set, fixed at creation, a port's socket shared only by equal flags", async () => {
    const fake = host(1);
    await ok(
      fake,
      ["ip", "-batch", "-"],
      [
        "link add vx type vxlan id 7799 dstport 7799 local 192.168.0.11 dev eth0 nolearning",
        "link add vg type vxlan id 7798 dstport 7799 local 192.168.0.11 dev eth0 nolearning gbp",
        "",
      ].join("\n"),
    );
    const infoData = async (dev: string) => {
      const links = JSON.parse(await ok(fake, ["ip", "-json", "-details", "address", "show"]));
      return links.find((l: { ifname: string }) => l.ifname === dev).linkinfo.info_data;
    };
    // As `ip -d -j link show` printed them (iproute2 6.1.0): gbp last, and only when set.
    assert.deepEqual(Object.keys(await infoData("vx")).slice(-2), [
      "udp_zero_csum6_tx",
      "udp_zero_csum6_rx",
    ]);
    assert.equal((await infoData("vx")).gbp, undefined);
    assert.deepEqual(Object.entries(await infoData("vg")).slice(-2), [
      ["udp_zero_csum6_rx", false],
      ["gbp", true],
    ]);
    assert.match(
      fake.dump(),
      /^link vg vxlan id 7798 dstport 7799 local 192.168.0.11 dev eth0 nolearning gbp /m,
    );
    const cases: [string, number, string][] = [
      ["ip link set dev vx type vxlan gbp", 2, "Error: vxlan: cannot change GBP flag.\n"],
      ["ip link set dev vg type vxlan gbp", 2, "Error: vxlan: cannot change GBP flag.\n"],
      [
        "ip link add vx4 type vxlan id 7797 dstport 7799 local 192.168.0.11 dev eth0 gbp gbp",
        255,
        'Error: either "gbp" is duplicate, or "gbp" is a garbage.\n',
      ],
      [
        "ip link add vx3 type vxlan id 7799 dstport 7799 local 192.168.0.11 dev eth0 nolearning",
        2,
        "Error: A VXLAN device with the specified VNI already exists.\n",
      ],
    ];
    for (const [line, code, stderr] of cases) {
      const r = await run(fake, line.split(" "));
      assert.deepEqual([r.code, r.stderr], [code, stderr], line);
    }
    assert.equal((await infoData("vx")).gbp, undefined, "unchanged");
    // The VNI is taken only for devices of the same flags and family.
    await ok(
      fake,
      "ip link add vx2 type vxlan id 7799 dstport 7799 local 192.168.0.11 dev eth0 nolearning gbp".split(
        " ",
      ),
    );
    await ok(
      fake,
      "ip link add vx6 type vxlan id 7799 dstport 7799 local fd00:192:168::11 dev eth0 nolearning".split(
        " ",
      ),
    );
    // Up, a device binds its port's UDP socket of its family and flags.
    await ok(fake, ["ip", "link", "set", "vx", "up"]);
    await ok(fake, ["ip", "link", "set", "vx6", "up"]);
    for (const dev of ["vx2", "vg"]) {
      const r = await run(fake, ["ip", "link", "set", dev, "up"]);
      assert.deepEqual([r.code, r.stderr], [2, "RTNETLINK answers: Address already in use\n"], dev);
    }
    await ok(fake, ["ip", "link", "set", "vx", "down"]);
    await ok(fake, ["ip", "link", "set", "vg", "up"]);
    await ok(fake, ["ip", "link", "set", "vx2", "up"]);
    const r = await run(fake, ["ip", "link", "set", "vx", "up"]);
    assert.deepEqual([r.code, r.stderr], [2, "RTNETLINK answers: Address already in use\n"]);
  });

  it("takes routes, neighbours and IPv6 addresses away from a device that goes down, and keeps the FDB", async () => {
    const fake = host(1);
    await ok(
      fake,
      ["ip", "-batch", "-"],
      "link add sallyport type vxlan id 7799 dstport 7799 local 192.168.0.11 dev eth0 nolearning\naddr replace 100.127.0.1/32 dev sallyport\naddr replace fd5a:11::1/128 dev sallyport nodad\nlink set sallyport up\n",
    );
    await ok(
      fake,
      ["ip", "-4", "-batch", "-"],
      "neigh replace 100.127.0.2 lladdr 02:53:50:00:00:01 dev sallyport nud permanent\nroute replace default via 100.127.0.2 dev sallyport onlink table 3051\nrule add pref 5900 fwmark 0x26000100/0xffffff00 table 3051\n",
    );
    await ok(
      fake,
      ["bridge", "-batch", "-"],
      "fdb append 02:53:50:00:00:01 dev sallyport dst 192.168.0.12 self permanent\n",
    );
    await ok(fake, ["ip", "link", "set", "sallyport", "down"]);
    const links = parseLinks(await ok(fake, ["ip", "-json", "-details", "address", "show"]));
    assert.deepEqual(links.find((l) => l.name === "sallyport")?.addresses, ["100.127.0.1/32"]);
    assert.deepEqual(
      parseRoutes(await ok(fake, ["ip", "-4", "-json", "route", "show", "table", "all"]), 4).filter(
        (r) => r.table === 3051,
      ),
      [],
    );
    assert.deepEqual(
      parseNeighbors(
        await ok(fake, ["ip", "-json", "neigh", "show", "dev", "sallyport"]),
        "sallyport",
      ),
      [],
    );
    assert.deepEqual(
      parseFdb(await ok(fake, ["bridge", "-json", "fdb", "show", "dev", "sallyport"]), "sallyport"),
      [{ dev: "sallyport", mac: "02:53:50:00:00:01", dst: "192.168.0.12" }],
    );
    assert.equal(
      parseRules(await ok(fake, ["ip", "-4", "-json", "rule", "show"]), 4).filter(
        (r) => r.pref === 5900,
      ).length,
      1,
      "rules stay",
    );
  });

  it("prints the shapes our parsers read, with the routes the kernel derives from addresses", async () => {
    const fake = host(1);
    const links = parseLinks(await ok(fake, ["ip", "-json", "-details", "address", "show"]));
    const eth0 = links.find((l) => l.name === "eth0")!;
    assert.deepEqual(
      eth0.addresses,
      ["192.168.0.11/24", "fd00:192:168::11/64"],
      "link-local addresses are filtered",
    );
    assert.equal(eth0.mtu, 1500);
    const routes = parseRoutes(
      await ok(fake, ["ip", "-4", "-json", "route", "show", "table", "all"]),
      4,
    );
    assert.ok(
      routes.some((r) => r.table === 254 && r.dst === "192.168.0.0/24" && r.dev === "eth0"),
    );
    assert.ok(routes.some((r) => r.table === 255 && r.dst === "192.168.0.11/32"));
    assert.ok(routes.some((r) => r.table === 100 && r.dst === "10.99.0.0/16"));
    const rules = parseRules(await ok(fake, ["ip", "-4", "-json", "rule", "show"]), 4);
    assert.deepEqual(
      rules.map((r) => [r.pref, r.fwmark, r.mask, r.table]),
      [
        [0, 0, 0xffffffff, 255],
        [100, 1, 0xffffffff, 100],
        [32766, 0, 0xffffffff, 254],
        [32767, 0, 0xffffffff, 253],
      ],
    );
  });

  it("models the VXLAN FDB: append never changes a unicast entry's remote, replace does", async () => {
    const fake = host(1);
    await ok(
      fake,
      ["ip", "-batch", "-"],
      "link add sallyport type vxlan id 7799 dstport 7799 local 192.168.0.11 dev eth0 nolearning\n",
    );
    const fdb = async () =>
      parseFdb(
        await ok(fake, ["bridge", "-json", "fdb", "show", "dev", "sallyport"]),
        "sallyport",
      ).map((f) => `${f.mac} ${f.dst}`);
    await ok(
      fake,
      ["bridge", "-batch", "-"],
      "fdb append 02:53:50:00:00:01 dev sallyport dst 192.168.0.12 self permanent\nfdb append 02:53:50:00:00:01 dev sallyport dst 192.168.0.22 self permanent\n",
    );
    assert.deepEqual(await fdb(), ["02:53:50:00:00:01 192.168.0.12"]);
    await ok(
      fake,
      ["bridge", "-batch", "-"],
      "fdb del 02:53:50:00:00:01 dev sallyport dst 192.168.0.99 self\n",
    );
    assert.deepEqual(
      await fdb(),
      ["02:53:50:00:00:01 192.168.0.12"],
      "deleting another remote succeeds and changes nothing",
    );
    await ok(
      fake,
      ["bridge", "-batch", "-"],
      "fdb replace 02:53:50:00:00:01 dev sallyport dst 192.168.0.22 self permanent\n",
    );
    assert.deepEqual(await fdb(), ["02:53:50:00:00:01 192.168.0.22"]);
    const r = await run(
      fake,
      ["bridge", "-batch", "-"],
      "fdb del 02:53:50:00:00:09 dev sallyport dst 192.168.0.14 self\n",
    );
    assert.equal(r.stderr, "RTNETLINK answers: No such file or directory\nCommand failed -:1\n");
  });
});

describe("FakeKernel: sysctl, faults, calls and dump", () => {
  it("reads and writes sysctls as procps does; device keys come and go with the device", async () => {
    const fake = host(1);
    assert.equal(
      await ok(fake, ["sysctl", "-e", "net/ipv4/ip_forward", "net/ipv4/conf/sallyport/rp_filter"]),
      "net.ipv4.ip_forward = 1\n",
    );
    const r = await run(fake, [
      "sysctl",
      "-q",
      "-w",
      "net/ipv4/conf/nope/rp_filter=2",
      "net/ipv4/conf/eth0/arp_notify=1",
    ]);
    assert.equal(r.code, 1);
    assert.equal(
      r.stderr,
      "sysctl: cannot stat /proc/sys/net/ipv4/conf/nope/rp_filter: No such file or directory\n",
    );
    assert.equal(
      await ok(fake, ["sysctl", "net.ipv4.conf.eth0.arp_notify"]),
      "net.ipv4.conf.eth0.arp_notify = 1\n",
    );
    await ok(fake, ["ip", "link", "add", "t0", "type", "dummy"]);
    assert.equal(
      await ok(fake, ["sysctl", "net/ipv4/conf/t0/rp_filter"]),
      "net.ipv4.conf.t0.rp_filter = 0\n",
    );
    await ok(fake, ["ip", "link", "del", "t0"]);
    assert.equal(await ok(fake, ["sysctl", "-e", "net/ipv4/conf/t0/rp_filter"]), "");
  });

  it("fails the next matching command once, changing nothing, and logs every call", async () => {
    const fake = host(1);
    const before = fake.dump();
    fake.failNext(["ip", "-batch"], {
      code: 2,
      stderr: "RTNETLINK answers: Operation not permitted\n",
    });
    const r = await run(fake, ["ip", "-batch", "-"], "link add t0 type dummy\n");
    assert.deepEqual(r, {
      code: 2,
      stdout: "",
      stderr: "RTNETLINK answers: Operation not permitted\n",
    });
    assert.equal(fake.dump(), before);
    await ok(fake, ["ip", "-batch", "-"], "link add t0 type dummy\n");
    assert.deepEqual(
      fake.calls.map((c) => [c.argv.join(" "), c.stdin]),
      [
        ["ip -batch -", "link add t0 type dummy\n"],
        ["ip -batch -", "link add t0 type dummy\n"],
      ],
    );
    assert.deepEqual(writes(fake).length, 2);
  });

  it("dumps the whole model as canonical text: seeded foreign state included", () => {
    const dump = host(2).dump();
    for (const line of [
      "iptables4 nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE",
      "iptables4 mangle :KUBE-IPTABLES-HINT -",
      "ipset KUBE-CLUSTER-IP add 10.96.0.1,tcp:443",
      "link eth0 addr 192.168.0.12/24",
      "rule4 pref 100 fwmark 0x1/0xffffffff table 100",
      "route4 table 100 10.99.0.0/16 dev eth0",
      "sysctl net/ipv4/ip_forward = 1",
    ])
      assert.ok(dump.split("\n").includes(line), line);
    assert.equal(host(2).dump(), dump, "deterministic");
  });
});

// ================================================================================================
// nft: every exit code and message asserted below is nft 1.0.6's on Linux 6.18, each transaction
// run in a fresh network namespace after NFT_SETUP.

const NFT = ["nft", "-f", "-"];

/** One table with one object of each kind, and what uses what. */
const NFT_SETUP = `add table inet t
add map inet t m { type ipv4_addr . inet_proto . inet_service : verdict; flags interval; counter; }
add map inet t v { type ipv4_addr : verdict; }
add set inet t s { type ipv4_addr; }
add map inet t k { type mark : ipv4_addr; }
add chain inet t c1
add chain inet t c2
add chain inet t c3
add chain inet t b { type filter hook prerouting priority -150; policy accept; }
add chain inet t post { type nat hook postrouting priority 100; policy accept; }
add element inet t v { 1.1.1.1 : goto c1 }
add element inet t s { 1.1.1.1 }
add element inet t k { 0x28000000 : 10.0.0.1 }
add element inet t m { 10.0.0.0/8 . 6 . 80 : goto c1 }
add rule inet t c3 jump c2
add rule inet t c3 ip daddr @s accept
`;

/** [transaction, exit code, stderr] as nft 1.0.6 answers it after NFT_SETUP. */
type NftCase = readonly [string, number, string];

async function assertNftCases(cases: readonly NftCase[]): Promise<void> {
  for (const [input, code, stderr] of cases) {
    const fake = new FakeKernel();
    fake.seed(NFT, NFT_SETUP);
    const before = fake.dump();
    const r = await run(fake, NFT, input);
    assert.equal(r.stderr, stderr, input);
    assert.equal(r.code, code, input);
    if (code !== 0) assert.equal(fake.dump(), before, `nothing of a refused batch stays: ${input}`);
  }
}

/** The lines of the fake's dump about one nftables table. */
function nftSection(dump: string, family: string, name: string): string {
  return dump
    .split("\n")
    .filter((l) => l === `nft table ${family} ${name}` || l.startsWith(`nft ${family} ${name} `))
    .join("\n");
}

/** kube-proxy in nftables mode, as test/support/datapath_lab.ts leaves it on real kernels. */
const KUBE_PROXY_NFT = `table ip kube-proxy {
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
`;

/** What the renderer writes (src/render/nftables.ts), elements in no particular order. */
const RENDERED = `add table inet sallyport
add set inet sallyport eip4 { type ipv4_addr; }
add map inet sallyport src4 { type ipv4_addr : verdict; }
add map inet sallyport snat4 { type mark : ipv4_addr; }
add map inet sallyport c4-a { type ipv4_addr . inet_proto . inet_service : verdict; flags interval; counter; }
add map inet sallyport c6-a { type ipv6_addr . inet_proto . inet_service : verdict; flags interval; }
add chain inet sallyport c4-a
add chain inet sallyport snat4-0
add chain inet sallyport prerouting { type filter hook prerouting priority -150; policy accept; }
add chain inet sallyport postrouting { type nat hook postrouting priority 90; policy accept; }
add element inet sallyport eip4 { 10.168.60.101, 10.168.60.100 }
add element inet sallyport src4 { 172.29.2.5 : jump c4-a, 172.29.1.5 : jump c4-a }
add element inet sallyport snat4 { 0x28000000 : 10.168.60.101 }
add element inet sallyport c4-a { 100.128.0.0-172.29.0.255 . 0-5 . 0-65535 : goto snat4-0, 10.0.0.0/8 . 6 . 443 : drop, 10.6.105.150 . 17 . 53 : goto snat4-0 }
add element inet sallyport c6-a { 2001:db8::/64 . 132 . 443 : accept }
add rule inet sallyport snat4-0 meta mark set meta mark & 0x000000ff | 0x28000000 accept comment "#g3wkhq4gif"
add rule inet sallyport c4-a ip daddr . meta l4proto . th dport vmap @c4-a comment "2 policies #bckveefawm"
add rule inet sallyport prerouting meta nfproto ipv4 ip saddr vmap @src4 comment "classify #6xzmmwjahk"
add rule inet sallyport postrouting meta nfproto ipv4 meta mark & 0xff000000 == 0x28000000 snat ip to meta mark & 0xffffff00 map @snat4 comment "SNAT #3e2na6yty4"
`;

describe("FakeKernel: nft", () => {
  it("applies the renderer's transaction and lists it as nft -j list table does", async () => {
    const fake = new FakeKernel();
    await ok(fake, NFT, RENDERED);
    const listed = JSON.parse(
      await ok(fake, ["nft", "-j", "list", "table", "inet", "sallyport"]),
    ) as {
      nftables: Record<string, Record<string, unknown>>[];
    };
    assert.deepEqual(listed.nftables[0], {
      metainfo: { version: "1.0.6", release_name: "Lester Gooch #5", json_schema_version: 1 },
    });
    // A rule's expr is a placeholder (the datapath reads only comments); the rest is nft's output.
    const rules = listed.nftables.filter((item) => item.rule !== undefined);
    assert.deepEqual(
      rules.map((item) => item.rule!.expr),
      [
        [{ fake: "ip daddr . meta l4proto . th dport vmap @c4-a" }],
        [{ fake: "meta mark set meta mark & 0x000000ff | 0x28000000 accept" }],
        [{ fake: "meta nfproto ipv4 ip saddr vmap @src4" }],
        [
          {
            fake: "meta nfproto ipv4 meta mark & 0xff000000 == 0x28000000 snat ip to meta mark & 0xffffff00 map @snat4",
          },
        ],
      ],
    );
    for (const item of rules) delete item.rule!.expr;
    assert.deepEqual(listed.nftables.slice(1), [
      { table: { family: "inet", name: "sallyport", handle: 1 } },
      {
        set: {
          family: "inet",
          name: "eip4",
          table: "sallyport",
          type: "ipv4_addr",
          handle: 1,
          elem: ["10.168.60.100", "10.168.60.101"],
        },
      },
      {
        map: {
          family: "inet",
          name: "src4",
          table: "sallyport",
          type: "ipv4_addr",
          handle: 2,
          map: "verdict",
          elem: [
            ["172.29.1.5", { jump: { target: "c4-a" } }],
            ["172.29.2.5", { jump: { target: "c4-a" } }],
          ],
        },
      },
      {
        map: {
          family: "inet",
          name: "snat4",
          table: "sallyport",
          type: "mark",
          handle: 3,
          map: "ipv4_addr",
          elem: [[671088640, "10.168.60.101"]],
        },
      },
      {
        map: {
          family: "inet",
          name: "c4-a",
          table: "sallyport",
          type: ["ipv4_addr", "inet_proto", "inet_service"],
          handle: 4,
          map: "verdict",
          flags: ["interval"],
          elem: [
            [
              {
                elem: {
                  val: {
                    concat: [
                      { range: ["100.128.0.0", "172.29.0.255"] },
                      { range: [0, 5] },
                      { range: [0, 65535] },
                    ],
                  },
                  counter: { packets: 0, bytes: 0 },
                },
              },
              { goto: { target: "snat4-0" } },
            ],
            [
              {
                elem: {
                  val: { concat: [{ prefix: { addr: "10.0.0.0", len: 8 } }, "tcp", 443] },
                  counter: { packets: 0, bytes: 0 },
                },
              },
              { drop: null },
            ],
            [
              {
                elem: {
                  val: { concat: ["10.6.105.150", "udp", 53] },
                  counter: { packets: 0, bytes: 0 },
                },
              },
              { goto: { target: "snat4-0" } },
            ],
          ],
          stmt: [{ counter: null }],
        },
      },
      {
        map: {
          family: "inet",
          name: "c6-a",
          table: "sallyport",
          type: ["ipv6_addr", "inet_proto", "inet_service"],
          handle: 5,
          map: "verdict",
          flags: ["interval"],
          elem: [
            [
              { concat: [{ prefix: { addr: "2001:db8::", len: 64 } }, "sctp", 443] },
              { accept: null },
            ],
          ],
        },
      },
      { chain: { family: "inet", table: "sallyport", name: "c4-a", handle: 6 } },
      { chain: { family: "inet", table: "sallyport", name: "snat4-0", handle: 7 } },
      {
        chain: {
          family: "inet",
          table: "sallyport",
          name: "prerouting",
          handle: 8,
          type: "filter",
          hook: "prerouting",
          prio: -150,
          policy: "accept",
        },
      },
      {
        chain: {
          family: "inet",
          table: "sallyport",
          name: "postrouting",
          handle: 9,
          type: "nat",
          hook: "postrouting",
          prio: 90,
          policy: "accept",
        },
      },
      {
        rule: {
          family: "inet",
          table: "sallyport",
          chain: "c4-a",
          handle: 11,
          comment: "2 policies #bckveefawm",
        },
      },
      {
        rule: {
          family: "inet",
          table: "sallyport",
          chain: "snat4-0",
          handle: 10,
          comment: "#g3wkhq4gif",
        },
      },
      {
        rule: {
          family: "inet",
          table: "sallyport",
          chain: "prerouting",
          handle: 12,
          comment: "classify #6xzmmwjahk",
        },
      },
      {
        rule: {
          family: "inet",
          table: "sallyport",
          chain: "postrouting",
          handle: 13,
          comment: "SNAT #3e2na6yty4",
        },
      },
    ]);
    const table = parseNftTable(JSON.stringify(listed))!;
    assert.deepEqual(
      [...table.sets.get("c4-a")!.elements!],
      [
        ["100.128.0.0-172.29.0.255 . 0-5 . 0-65535", "goto snat4-0"],
        ["10.0.0.0/8 . 6 . 443", "drop"],
        ["10.6.105.150 . 17 . 53", "goto snat4-0"],
      ],
      "the renderer's parser reads back what it wrote",
    );
    assert.deepEqual(table.chains.get("prerouting"), {
      base: { type: "filter", hook: "prerouting", priority: -150 },
      ids: ["6xzmmwjahk"],
    });
  });

  it("lists as text as nft does: elements sorted, so many a line by type, priorities by name", async () => {
    const fake = new FakeKernel();
    await ok(
      fake,
      NFT,
      [
        "add table inet t",
        "add set inet t marks { type mark; }",
        "add element inet t marks { 0x10, 5, 6, 7, 8, 9, 10 }",
        "add set inet t a4 { type ipv4_addr; }",
        "add element inet t a4 { 1.1.1.3, 1.1.1.2, 1.1.1.1 }",
        "add set inet t a6 { type ipv6_addr; }",
        "add element inet t a6 { ::2, ::1 }",
        "add chain inet t post { type nat hook postrouting priority srcnat - 10; policy accept; }",
        "",
      ].join("\n"),
    );
    assert.equal(
      await ok(fake, ["nft", "list", "table", "inet", "t"]),
      [
        "table inet t {",
        "\tset marks {",
        "\t\ttype mark",
        "\t\telements = { 0x00000005, 0x00000006, 0x00000007, 0x00000008, 0x00000009,",
        "\t\t\t     0x0000000a, 0x00000010 }",
        "\t}",
        "",
        "\tset a4 {",
        "\t\ttype ipv4_addr",
        "\t\telements = { 1.1.1.1, 1.1.1.2,",
        "\t\t\t     1.1.1.3 }",
        "\t}",
        "",
        "\tset a6 {",
        "\t\ttype ipv6_addr",
        "\t\telements = { ::1,",
        "\t\t\t     ::2 }",
        "\t}",
        "",
        "\tchain post {",
        "\t\ttype nat hook postrouting priority srcnat - 10; policy accept;",
        "\t}",
        "}",
        "",
      ].join("\n"),
    );
  });

  it("is atomic: one refused command rejects the batch; nft prints each command the kernel refused, or only its own errors", async () => {
    await assertNftCases([
      [
        "add chain inet t ok1\ndelete chain inet t missing-chain\nadd rule inet t c1 goto missing-chain\nadd chain inet t ok2\n",
        1,
        "/dev/stdin:2:21-33: Error: Could not process rule: No such file or directory\ndelete chain inet t missing-chain\n                    ^^^^^^^^^^^^^\n/dev/stdin:3:25-37: Error: Could not process rule: No such file or directory\nadd rule inet t c1 goto missing-chain\n                        ^^^^^^^^^^^^^\n",
      ],
      [
        "add chain inet t ok1\nadd rule inet t c1 ip daddr @missing-set drop\nadd element inet t missing-set { 1.2.3.4 }\n",
        1,
        "/dev/stdin:2:29-40: Error: No such file or directory\nadd rule inet t c1 ip daddr @missing-set drop\n                            ^^^^^^^^^^^^\n/dev/stdin:3:20-30: Error: No such file or directory\nadd element inet t missing-set { 1.2.3.4 }\n                   ^^^^^^^^^^^\n",
      ],
      [
        "delete chain inet t missing-chain\nadd rule inet t c1 ip daddr @missing-set drop\n",
        1,
        "/dev/stdin:2:29-40: Error: No such file or directory\nadd rule inet t c1 ip daddr @missing-set drop\n                            ^^^^^^^^^^^^\n",
      ],
      [
        "add element inet t s { 2.2.2.2 }\nadd element inet t v { 2.2.2.2 : goto c2 }\nadd element inet t v { 1.1.1.1 : goto c2 }\n",
        1,
        "/dev/stdin:3:24-30: Error: Could not process rule: File exists\nadd element inet t v { 1.1.1.1 : goto c2 }\n                       ^^^^^^^\n",
      ],
    ]);
  });

  it("refuses what does not exist: a set, map, chain or table (nft itself or the kernel, as nft decides)", async () => {
    await assertNftCases([
      [
        "add rule inet t c1 ip daddr @missing-set drop\n",
        1,
        "/dev/stdin:1:29-40: Error: No such file or directory\nadd rule inet t c1 ip daddr @missing-set drop\n                            ^^^^^^^^^^^^\n",
      ],
      [
        "add rule inet t c1 ip saddr vmap @missing-set\n",
        1,
        "/dev/stdin:1:34-45: Error: No such file or directory\nadd rule inet t c1 ip saddr vmap @missing-set\n                                 ^^^^^^^^^^^^\n",
      ],
      [
        "add rule inet t c1 goto missing-chain\n",
        1,
        "/dev/stdin:1:25-37: Error: Could not process rule: No such file or directory\nadd rule inet t c1 goto missing-chain\n                        ^^^^^^^^^^^^^\n",
      ],
      [
        "add rule inet t c1 jump missing-chain\n",
        1,
        "/dev/stdin:1:25-37: Error: Could not process rule: No such file or directory\nadd rule inet t c1 jump missing-chain\n                        ^^^^^^^^^^^^^\n",
      ],
      [
        "add rule inet t missing-chain accept\n",
        1,
        "/dev/stdin:1:17-29: Error: Could not process rule: No such file or directory\nadd rule inet t missing-chain accept\n                ^^^^^^^^^^^^^\n",
      ],
      [
        "add element inet t v { 1.2.3.4 : goto missing-chain }\n",
        1,
        "/dev/stdin:1:24-30: Error: Could not process rule: No such file or directory\nadd element inet t v { 1.2.3.4 : goto missing-chain }\n                       ^^^^^^^\n",
      ],
      [
        "add element inet t missing-set { 1.2.3.4 }\n",
        1,
        "/dev/stdin:1:20-30: Error: No such file or directory\nadd element inet t missing-set { 1.2.3.4 }\n                   ^^^^^^^^^^^\n",
      ],
      [
        "add element inet missing-table s { 1.2.3.4 }\n",
        1,
        "/dev/stdin:1:18-30: Error: No such file or directory\nadd element inet missing-table s { 1.2.3.4 }\n                 ^^^^^^^^^^^^^\n",
      ],
      [
        "add set inet missing-table s { type ipv4_addr; }\n",
        1,
        "/dev/stdin:1:14-26: Error: No such file or directory\nadd set inet missing-table s { type ipv4_addr; }\n             ^^^^^^^^^^^^^\n",
      ],
      [
        "add chain inet missing-table x\n",
        1,
        "/dev/stdin:1:16-28: Error: No such file or directory\nadd chain inet missing-table x\n               ^^^^^^^^^^^^^\n",
      ],
      [
        "flush chain inet t missing-chain\n",
        1,
        "/dev/stdin:1:20-32: Error: Could not process rule: No such file or directory\nflush chain inet t missing-chain\n                   ^^^^^^^^^^^^^\n",
      ],
      [
        "flush map inet t missing-set\n",
        1,
        "/dev/stdin:1:18-28: Error: No such file or directory\nflush map inet t missing-set\n                 ^^^^^^^^^^^\n",
      ],
      [
        "delete chain inet t missing-chain\n",
        1,
        "/dev/stdin:1:21-33: Error: Could not process rule: No such file or directory\ndelete chain inet t missing-chain\n                    ^^^^^^^^^^^^^\n",
      ],
      [
        "delete set inet t missing-set\n",
        1,
        "/dev/stdin:1:19-29: Error: Could not process rule: No such file or directory\ndelete set inet t missing-set\n                  ^^^^^^^^^^^\n",
      ],
      [
        "delete table inet nope\n",
        1,
        "/dev/stdin:1:19-22: Error: Could not process rule: No such file or directory\ndelete table inet nope\n                  ^^^^\n",
      ],
      [
        "add chain inet t c9\nadd rule inet t c1 goto c8\nadd chain inet t c8\n",
        1,
        "/dev/stdin:2:25-26: Error: Could not process rule: No such file or directory\nadd rule inet t c1 goto c8\n                        ^^\n",
      ],
    ]);
  });

  it("refuses to delete a chain or set still in use; a chain's own rules go with it", async () => {
    await assertNftCases([
      [
        "delete chain inet t c2\n",
        1,
        "/dev/stdin:1:21-22: Error: Could not process rule: Device or resource busy\ndelete chain inet t c2\n                    ^^\n",
      ],
      [
        "delete chain inet t c1\n",
        1,
        "/dev/stdin:1:21-22: Error: Could not process rule: Device or resource busy\ndelete chain inet t c1\n                    ^^\n",
      ],
      [
        "delete set inet t s\n",
        1,
        "/dev/stdin:1:19-19: Error: Could not process rule: Device or resource busy\ndelete set inet t s\n                  ^\n",
      ],
      [
        "delete map inet t v\nadd rule inet t c1 ip saddr vmap @v\n",
        1,
        "/dev/stdin:2:34-35: Error: No such file or directory\nadd rule inet t c1 ip saddr vmap @v\n                                 ^^\n",
      ],
      ["flush chain inet t c3\ndelete chain inet t c2\ndelete set inet t s\n", 0, ""],
      ["delete map inet t v\ndelete map inet t m\ndelete chain inet t c1\n", 0, ""],
      ["delete chain inet t c3\ndelete chain inet t c2\n", 0, ""],
    ]);
    const fake = new FakeKernel();
    fake.seed(NFT, NFT_SETUP);
    await ok(fake, NFT, "flush chain inet t c3\ndelete chain inet t c2\ndelete set inet t s\n");
    assert.doesNotMatch(
      nftSection(fake.dump(), "inet", "t"),
      /chain c2|set s /,
      "flushed, then deleted: as the renderer does it",
    );
  });

  it("a set statement fed by a data map, and a verdict map keyed by its value (TC classids)", async () => {
    const classes =
      "add map inet t p { type ipv4_addr : classid; }\nadd map inet t q { type classid : verdict; }\n";
    await assertNftCases([
      [
        "add map inet t p { type ipv4_addr : mark; }\nadd rule inet t c1 meta priority set ip saddr map @p\n",
        1,
        "/dev/stdin:2:38-52: Error: datatype mismatch: expected TC classid, expression has type packet mark\nadd rule inet t c1 meta priority set ip saddr map @p\n                   ~~~~~~~~~~~~~~~~~~^^^^^^^^^^^^^^^\n",
      ],
      [
        "add rule inet t c1 meta priority set ip saddr map @v\n",
        1,
        "/dev/stdin:1:38-52: Error: datatype mismatch: expected TC classid, expression has type netfilter verdict\nadd rule inet t c1 meta priority set ip saddr map @v\n                   ~~~~~~~~~~~~~~~~~~^^^^^^^^^^^^^^^\n",
      ],
      [
        `${classes}add element inet t p { 10.0.0.5 : a00:5 }\nadd element inet t q { a00:5 : jump c2 }\nadd rule inet t c1 meta priority set ip saddr map @p meta priority vmap @q\n`,
        0,
        "",
      ],
    ]);
    const fake = new FakeKernel();
    fake.seed(NFT, NFT_SETUP);
    await ok(
      fake,
      NFT,
      `${classes}add element inet t p { 10.0.0.5 : 0a00:0005 }\nadd element inet t q { a00:5 : jump c2 }\n`,
    );
    const maps = JSON.parse(await ok(fake, ["nft", "-j", "list", "table", "inet", "t"]))
      .nftables.filter(
        (x: { map?: { name: string } }) => x.map?.name === "p" || x.map?.name === "q",
      )
      .map((x: { map: { name: string; elem: unknown } }) => [x.map.name, x.map.elem]);
    assert.deepEqual(maps, [
      ["p", [["10.0.0.5", "a00:5"]]],
      ["q", [["a00:5", { jump: { target: "c2" } }]]],
    ]);
  });

  it("add element: a key already there with another value, an interval whose first or last point is taken; delete element: what is not there", async () => {
    await assertNftCases([
      [
        "add element inet t v { 1.1.1.1 : goto c2 }\n",
        1,
        "/dev/stdin:1:24-30: Error: Could not process rule: File exists\nadd element inet t v { 1.1.1.1 : goto c2 }\n                       ^^^^^^^\n",
      ],
      [
        "add element inet t k { 0x28000000 : 10.0.0.2 }\n",
        1,
        "/dev/stdin:1:24-33: Error: Could not process rule: File exists\nadd element inet t k { 0x28000000 : 10.0.0.2 }\n                       ^^^^^^^^^^\n",
      ],
      [
        "add element inet t m { 10.0.0.0/8 . 6 . 80 : goto c2 }\n",
        1,
        "/dev/stdin:1:24-42: Error: Could not process rule: File exists\nadd element inet t m { 10.0.0.0/8 . 6 . 80 : goto c2 }\n                       ^^^^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add element inet t m { 10.1.0.0/16 . 6 . 80 : drop }\n",
        1,
        "/dev/stdin:1:24-43: Error: Could not process rule: File exists\nadd element inet t m { 10.1.0.0/16 . 6 . 80 : drop }\n                       ^^^^^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add element inet t m { 9.0.0.0-10.0.0.0 . 6 . 80 : drop }\n",
        1,
        "/dev/stdin:1:24-48: Error: Could not process rule: File exists\nadd element inet t m { 9.0.0.0-10.0.0.0 . 6 . 80 : drop }\n                       ^^^^^^^^^^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add element inet t m { 12.0.0.0/8 . 6 . 80 : drop, 12.0.0.0/16 . 6 . 80 : drop }\n",
        1,
        "/dev/stdin:1:52-71: Error: Could not process rule: File exists\nadd element inet t m { 12.0.0.0/8 . 6 . 80 : drop, 12.0.0.0/16 . 6 . 80 : drop }\n                                                   ^^^^^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add element inet t v { 2.2.2.2 : drop, 2.2.2.2 : accept }\n",
        1,
        "/dev/stdin:1:40-46: Error: Could not process rule: File exists\nadd element inet t v { 2.2.2.2 : drop, 2.2.2.2 : accept }\n                                       ^^^^^^^\n",
      ],
      [
        "add element inet t s { 1.1.1.1 }\nadd element inet t v { 1.1.1.1 : goto c1 }\nadd element inet t m { 10.0.0.0/8 . tcp . 80 : goto c1 }\n",
        0,
        "",
      ],
      ["add element inet t m { 10.0.0.0/8 . 6 . 70-90 : drop }\n", 0, ""],
      [
        "delete element inet t s { 2.2.2.2 }\n",
        1,
        "/dev/stdin:1:27-33: Error: Could not process rule: No such file or directory\ndelete element inet t s { 2.2.2.2 }\n                          ^^^^^^^\n",
      ],
      [
        "delete element inet t v { 1.1.1.1, 1.1.1.1 }\n",
        1,
        "/dev/stdin:1:36-42: Error: Could not process rule: No such file or directory\ndelete element inet t v { 1.1.1.1, 1.1.1.1 }\n                                   ^^^^^^^\n",
      ],
      [
        "delete element inet t m { 11.0.0.0/8 . 6 . 80 }\n",
        1,
        "/dev/stdin:1:27-45: Error: Could not process rule: No such file or directory\ndelete element inet t m { 11.0.0.0/8 . 6 . 80 }\n                          ^^^^^^^^^^^^^^^^^^^\n",
      ],
    ]);
  });

  it("interval maps as the kernel's pipapo: an element holding another one whole is accepted; delete removes what holds the key's first point", async () => {
    const fake = new FakeKernel();
    fake.seed(NFT, NFT_SETUP);
    // 10.0.0.0/8 . 6 . 80 is there; neither corner of this one lies in it.
    await ok(fake, NFT, "add element inet t m { 10.0.0.0/8 . 6 . 70-90 : drop }\n");
    const elements = () =>
      nftSection(fake.dump(), "inet", "t")
        .split("\n")
        .filter((l) => l.includes(" map m element "));
    assert.deepEqual(elements(), [
      "nft inet t map m element 10.0.0.0/8 . tcp . 70-90 : drop",
      "nft inet t map m element 10.0.0.0/8 . tcp . 80 : goto c1",
    ]);
    // No such element, but a point both hold: the one added first goes, then the other.
    await ok(fake, NFT, "delete element inet t m { 10.0.0.0/24 . 6 . 80 }\n");
    assert.deepEqual(elements(), ["nft inet t map m element 10.0.0.0/8 . tcp . 70-90 : drop"]);
    await ok(fake, NFT, "delete element inet t m { 10.0.0.0/24 . 6 . 80 }\n");
    assert.deepEqual(elements(), []);
  });

  it("elements and lookups of the wrong type or arity, values a map does not take, a comment over 128 characters", async () => {
    await assertNftCases([
      [
        "add element inet t m { 10.0.0.0/8 . 6 : goto c1 }\n",
        1,
        "/dev/stdin:1:24-37: Error: datatype mismatch, expected concatenation of (IPv4 address, Internet protocol, internet network service), expression has type concatenation of (IPv4 address, Internet protocol)\nadd element inet t m { 10.0.0.0/8 . 6 : goto c1 }\n                       ^^^^^^^^^^^^^^\n",
      ],
      [
        "add element inet t m { 10.0.0.0/8 . 6 . 80 . 5 : goto c1 }\n",
        1,
        "/dev/stdin:1:44-46: Error: Can't parse symbolic invalid expressions\nadd element inet t m { 10.0.0.0/8 . 6 . 80 . 5 : goto c1 }\n                                           ^^^\n",
      ],
      [
        "add element inet t s { fd00::1 }\n",
        1,
        "/dev/stdin:1:24-30: Error: Could not resolve hostname: Address family for hostname not supported\nadd element inet t s { fd00::1 }\n                       ^^^^^^^\n",
      ],
      [
        "add element inet t m { fd00::/64 . 6 . 80 : goto c1 }\n",
        1,
        "/dev/stdin:1:24-29: Error: Could not resolve hostname: Address family for hostname not supported\nadd element inet t m { fd00::/64 . 6 . 80 : goto c1 }\n                       ^^^^^^\n",
      ],
      [
        "add element inet t m { 10.0.0.0/33 . 6 . 443 : drop }\n",
        1,
        "/dev/stdin:1:24-34: Error: Prefix length 33 is invalid for type of 32 bits width\nadd element inet t m { 10.0.0.0/33 . 6 . 443 : drop }\n                       ^^^^^^^^^^^\n",
      ],
      [
        "add element inet t m { 10.0.0.0/8 . bogus . 80 : goto c1 }\n",
        1,
        "/dev/stdin:1:37-41: Error: Could not resolve protocol name\nadd element inet t m { 10.0.0.0/8 . bogus . 80 : goto c1 }\n                                    ^^^^^\n",
      ],
      [
        "add element inet t m { 10.0.0.0/8 . 256 . 80 : goto c1 }\n",
        1,
        "/dev/stdin:1:37-39: Error: Protocol out of range\nadd element inet t m { 10.0.0.0/8 . 256 . 80 : goto c1 }\n                                    ^^^\n",
      ],
      [
        "add element inet t m { 10.0.0.0/8 . 6 . 70000 : goto c1 }\n",
        1,
        "/dev/stdin:1:39-45: Error: Service out of range\nadd element inet t m { 10.0.0.0/8 . 6 . 70000 : goto c1 }\n                                      ^^^^^^^\n",
      ],
      [
        "add element inet t m { 10.0.0.0/8 . 6 . 90-80 : goto c1 }\n",
        1,
        "/dev/stdin:1:39-45: Error: Range has zero or negative size\nadd element inet t m { 10.0.0.0/8 . 6 . 90-80 : goto c1 }\n                                      ^^^^^^^\n",
      ],
      [
        "add element inet t s { 10.0.0.0/8 }\n",
        1,
        "/dev/stdin:1:24-33: Error: You must add 'flags interval' to your set declaration if you want to add prefix elements\nadd element inet t s { 10.0.0.0/8 }\n                       ^^^^^^^^^^\n",
      ],
      [
        "add element inet t s { 10.0.0.1-10.0.0.3 }\n",
        1,
        "/dev/stdin:1:24-40: Error: You must add 'flags interval' to your set declaration if you want to add range elements\nadd element inet t s { 10.0.0.1-10.0.0.3 }\n                       ^^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add element inet t v { 5.5.5.5 : 10.0.0.1 }\n",
        1,
        "/dev/stdin:1:34-41: Error: Can't parse symbolic netfilter verdict expressions\nadd element inet t v { 5.5.5.5 : 10.0.0.1 }\n                                 ^^^^^^^^\n",
      ],
      [
        "add element inet t v { 6.6.6.6 }\n",
        1,
        "/dev/stdin:1:24-30: Error: Could not process rule: Invalid argument\nadd element inet t v { 6.6.6.6 }\n                       ^^^^^^^\n",
      ],
      ["add element inet t s { 6.6.6.6 : drop }\n", 1, "netlink: Error: set is not a map\n"],
      [
        "add element inet t k { foo : 10.0.0.1 }\n",
        1,
        "/dev/stdin:1:24-26: Error: Could not parse packet mark\nadd element inet t k { foo : 10.0.0.1 }\n                       ^^^\n",
      ],
      [
        "add element inet t k { 0x100000000 : 1.2.3.4 }\n",
        1,
        "/dev/stdin:1:24-34: Error: Value 4294967296 exceeds valid range 0-4294967295\nadd element inet t k { 0x100000000 : 1.2.3.4 }\n                       ^^^^^^^^^^^\n",
      ],
      [
        "add element inet t k { 7 : 1.2.3.0/24 }\n",
        1,
        "/dev/stdin:1:28-37: Error: Value must be a singleton\nadd element inet t k { 7 : 1.2.3.0/24 }\n                           ^^^^^^^^^^\n",
      ],
      [
        "add element inet t k { 7 : drop }\n",
        1,
        "/dev/stdin:1:24-24: Error: Could not process rule: Invalid argument\nadd element inet t k { 7 : drop }\n                       ^\n",
      ],
      [
        "add rule inet t c1 ip6 saddr vmap @v\n",
        1,
        "/dev/stdin:1:35-36: Error: datatype mismatch, map expects IPv4 address, mapping expression has type IPv6 address\nadd rule inet t c1 ip6 saddr vmap @v\n                   ~~~~~~~~~      ^^\n",
      ],
      [
        "add rule inet t c1 ip daddr . meta l4proto vmap @m\n",
        1,
        "/dev/stdin:1:49-50: Error: datatype mismatch, map expects concatenation of (IPv4 address, Internet protocol, internet network service), mapping expression has type concatenation of (IPv4 address, Internet protocol)\nadd rule inet t c1 ip daddr . meta l4proto vmap @m\n                   ~~~~~~~~~~~~~~~~~~~~~~~      ^^\n",
      ],
      [
        "add rule inet t c1 ip6 daddr @s accept\n",
        1,
        "/dev/stdin:1:30-31: Error: datatype mismatch, expected IPv6 address, expression has type IPv4 address\nadd rule inet t c1 ip6 daddr @s accept\n                   ~~~~~~~~~ ^^\n",
      ],
      [
        "add rule inet t c1 ip saddr vmap @s\n",
        1,
        "/dev/stdin:1:34-35: Error: Expression is not a map\nadd rule inet t c1 ip saddr vmap @s\n                                 ^^\n",
      ],
      [
        "add rule inet t c1 meta mark vmap @k\n",
        1,
        "/dev/stdin:1:20-36: Error: datatype mismatch: expected netfilter verdict, expression has type IPv4 address\nadd rule inet t c1 meta mark vmap @k\n                   ^^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add rule inet t post snat ip6 to meta mark map @k\n",
        1,
        "/dev/stdin:1:34-49: Error: datatype mismatch: expected IPv6 address, expression has type IPv4 address\nadd rule inet t post snat ip6 to meta mark map @k\n                     ~~~~        ^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add set inet t z { type ipv9_addr; }\n",
        1,
        "/dev/stdin:1:25-33: Error: unknown datatype ipv9_addr\nadd set inet t z { type ipv9_addr; }\n                        ^^^^^^^^^\n/dev/stdin:1:18-34: Error: set definition does not specify key\nadd set inet t z { type ipv9_addr; }\n                 ^^^^^^^^^^^^^^^^^\n",
      ],
      [
        'add rule inet t c1 accept comment "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"\n',
        1,
        '/dev/stdin:1:35-165: Error: comment too long, 128 characters maximum allowed\nadd rule inet t c1 accept comment "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"\n                                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n',
      ],
    ]);
  });

  it("chains and sets: what the kernel will not change in place; snat and rt mtu checked against every hook that reaches them", async () => {
    await assertNftCases([
      [
        "add chain inet t b { type filter hook prerouting priority -100; policy accept; }\n",
        1,
        "/dev/stdin:1:1-81: Error: Could not process rule: Operation not supported\nadd chain inet t b { type filter hook prerouting priority -100; policy accept; }\n^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add chain inet t b { type filter hook forward priority -150; policy accept; }\n",
        1,
        "/dev/stdin:1:1-78: Error: Could not process rule: Operation not supported\nadd chain inet t b { type filter hook forward priority -150; policy accept; }\n^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add chain inet t b { type nat hook prerouting priority -150; policy accept; }\n",
        1,
        "/dev/stdin:1:18-18: Error: Could not process rule: File exists\nadd chain inet t b { type nat hook prerouting priority -150; policy accept; }\n                 ^\n",
      ],
      [
        "add chain inet t c1 { type filter hook prerouting priority -150; policy accept; }\n",
        1,
        "/dev/stdin:1:66-78: Error: Could not process rule: Operation not supported\nadd chain inet t c1 { type filter hook prerouting priority -150; policy accept; }\n                                                                 ^^^^^^^^^^^^^\n",
      ],
      [
        "add chain inet t n { type nat hook forward priority 100; policy accept; }\n",
        1,
        "/dev/stdin:1:1-74: Error: Could not process rule: Operation not supported\nadd chain inet t n { type nat hook forward priority 100; policy accept; }\n^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add set inet t s { type ipv4_addr; counter; }\n",
        1,
        "/dev/stdin:1:16-16: Error: Could not process rule: File exists\nadd set inet t s { type ipv4_addr; counter; }\n               ^\n",
      ],
      [
        "add map inet t m { type ipv4_addr . inet_proto . inet_service : verdict; flags interval; }\n",
        1,
        "/dev/stdin:1:16-16: Error: Could not process rule: File exists\nadd map inet t m { type ipv4_addr . inet_proto . inet_service : verdict; flags interval; }\n               ^\n",
      ],
      [
        "add rule inet t c1 jump b\n",
        1,
        "/dev/stdin:1:25-25: Error: Could not process rule: Operation not supported\nadd rule inet t c1 jump b\n                        ^\n",
      ],
      [
        "add rule inet t b snat ip to 1.2.3.4\n",
        1,
        "/dev/stdin:1:1-37: Error: Could not process rule: Operation not supported\nadd rule inet t b snat ip to 1.2.3.4\n^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
      ],
      ["add rule inet t c2 snat ip to 1.2.3.4\n", 0, ""],
      [
        "add rule inet t b tcp flags syn / syn,rst tcp option maxseg size set rt mtu\n",
        1,
        "/dev/stdin:1:1-76: Error: Could not process rule: Operation not supported\nadd rule inet t b tcp flags syn / syn,rst tcp option maxseg size set rt mtu\n^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add rule inet t c1 tcp flags syn / syn,rst tcp option maxseg size set rt mtu\nadd rule inet t b ip saddr vmap @v\n",
        1,
        "/dev/stdin:2:1-35: Error: Could not process rule: Operation not supported\nadd rule inet t b ip saddr vmap @v\n^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
      ],
    ]);
    const fake = new FakeKernel();
    fake.seed(NFT, NFT_SETUP);
    await ok(
      fake,
      NFT,
      "add chain inet t b { type filter hook prerouting priority -150; policy drop; }\n",
    );
    assert.match(
      fake.dump(),
      /^nft inet t chain b type filter hook prerouting priority -150 policy drop$/m,
      "a base chain's policy changes in place",
    );
  });

  it("lists tables, iptables-nft's too; a missing table exits 1 with nft's message; a command in argv is located in argv", async () => {
    const fake = host(1);
    await ok(fake, NFT, "add table inet sallyport\n");
    assert.deepEqual(
      (await ok(fake, ["nft", "list", "tables"])).split("\n").filter(Boolean).sort(),
      [
        "table inet sallyport",
        "table ip filter",
        "table ip mangle",
        "table ip nat",
        "table ip6 filter",
        "table ip6 mangle",
        "table ip6 nat",
      ],
    );
    for (const json of [[], ["-j"]]) {
      const r = await run(fake, ["nft", ...json, "list", "table", "inet", "nope"]);
      assert.deepEqual(r, {
        code: 1,
        stdout: "",
        stderr: "Error: No such file or directory\nlist table inet nope\n                ^^^^\n",
      });
    }
    assert.equal(
      (await run(fake, ["nft", "flush", "chain", "inet", "sallyport", "nope"])).stderr,
      "Error: Could not process rule: No such file or directory\nflush chain inet sallyport nope\n                           ^^^^\n",
    );
  });

  it("seeds foreign tables in nft's block syntax, keeps rules it does not know as written, and dumps them canonically", async () => {
    const fake = new FakeKernel();
    fake.seed(NFT, KUBE_PROXY_NFT);
    fake.seed(
      NFT,
      'table ip kube-proxy {\n  chain services {\n    tcp dport { 80, 443 } log prefix "svc " accept\n  }\n}\n',
    );
    assert.deepEqual(
      fake
        .dump()
        .split("\n")
        .filter((l) => l.startsWith("nft ")),
      [
        "nft table ip kube-proxy",
        "nft ip kube-proxy set cluster-ips type ipv4_addr",
        "nft ip kube-proxy set cluster-ips element 10.96.0.1",
        "nft ip kube-proxy chain filter-forward type filter hook forward priority -110 policy accept",
        "nft ip kube-proxy chain filter-forward rule ct state invalid drop",
        "nft ip kube-proxy chain nat-postrouting type nat hook postrouting priority 100 policy accept",
        "nft ip kube-proxy chain nat-postrouting rule meta mark & 0x4000 == 0x4000 masquerade",
        "nft ip kube-proxy chain services",
        'nft ip kube-proxy chain services rule tcp dport { 80, 443 } log prefix "svc " accept',
      ],
    );
    assert.equal(
      (await detectFilter(fake, "nft")).reason,
      "kube-proxy runs in nftables mode",
      "--datapath auto sees kube-proxy's table",
    );
    const r = await run(
      fake,
      NFT,
      "add chain ip kube-proxy c\nadd rule ip kube-proxy c log accept\n",
    );
    assert.equal(r.code, 2, "outside seeding, a statement it does not know is not modeled");
    assert.match(r.stderr, /^FakeKernel does not model the nft rule syntax "log"/);
  });

  it("spreads over chains with numgen and an anonymous verdict map, matches protocol sets, and SNATs to ports only after a protocol match, as nft 1.0.6 does", async () => {
    const fake = new FakeKernel();
    await ok(
      fake,
      NFT,
      [
        "add table inet t",
        "add map inet t snat4 { type mark : ipv4_addr; }",
        "add chain inet t a",
        "add chain inet t b",
        "add chain inet t post { type nat hook postrouting priority 90; policy accept; }",
        "add chain inet t pre { type filter hook prerouting priority -150; policy accept; }",
        "",
      ].join("\n"),
    );
    const refused: [string, string][] = [
      [
        "add rule inet t a numgen inc mod 2 vmap { 0 : goto b, 1 : goto nope }",
        "/dev/stdin:1:55-55: Error: Could not process rule: No such file or directory\nadd rule inet t a numgen inc mod 2 vmap { 0 : goto b, 1 : goto nope }\n                                                      ^\n",
      ],
      [
        "add rule inet t a numgen inc mod 2 vmap { 0 : goto post, 1 : goto b }",
        "/dev/stdin:1:43-43: Error: Could not process rule: Operation not supported\nadd rule inet t a numgen inc mod 2 vmap { 0 : goto post, 1 : goto b }\n                                          ^\n",
      ],
      [
        "add rule inet t a numgen inc mod 2 vmap { x : goto a, 1 : goto b }",
        "/dev/stdin:1:43-43: Error: Could not parse integer\nadd rule inet t a numgen inc mod 2 vmap { x : goto a, 1 : goto b }\n                                          ^\n",
      ],
      [
        "add rule inet t a numgen inc mod 0 vmap { 0 : goto b }",
        "/dev/stdin:1:19-34: Error: Could not process rule: Numerical result out of range\nadd rule inet t a numgen inc mod 0 vmap { 0 : goto b }\n                  ^^^^^^^^^^^^^^^^\n",
      ],
      [
        "add rule inet t a numgen inc mod 2 vmap { 0 : goto b, 1 : 5 }",
        "/dev/stdin:1:59-59: Error: syntax error, unexpected number\nadd rule inet t a numgen inc mod 2 vmap { 0 : goto b, 1 : 5 }\n                                                          ^\n",
      ],
      [
        "add rule inet t a numgen foo mod 2 vmap { 0 : goto b }",
        "/dev/stdin:1:26-28: Error: syntax error, unexpected string, expecting random or inc\nadd rule inet t a numgen foo mod 2 vmap { 0 : goto b }\n                         ^^^\n",
      ],
      [
        "add rule inet t post meta l4proto { tcp, bogus } snat ip to meta mark & 0xffffff00 map @snat4 : 5000-5009",
        "/dev/stdin:1:42-46: Error: Could not resolve protocol name\nadd rule inet t post meta l4proto { tcp, bogus } snat ip to meta mark & 0xffffff00 map @snat4 : 5000-5009\n                                         ^^^^^\n",
      ],
      [
        "add rule inet t post meta l4proto { } snat ip to meta mark & 0xffffff00 map @snat4 : 5000",
        "/dev/stdin:1:37-37: Error: syntax error, unexpected '}'\nadd rule inet t post meta l4proto { } snat ip to meta mark & 0xffffff00 map @snat4 : 5000\n                                    ^\n",
      ],
      [
        "add rule inet t post meta l4proto { tcp, udp } snat ip to meta mark & 0xffffff00 map @snat4 : 5009-5000",
        "/dev/stdin:1:95-103: Error: Range has zero or negative size\nadd rule inet t post meta l4proto { tcp, udp } snat ip to meta mark & 0xffffff00 map @snat4 : 5009-5000\n                                                                                              ^^^^^^^^^\n",
      ],
      [
        "add rule inet t post meta l4proto { tcp, udp } snat ip to meta mark & 0xffffff00 map @snat4 : 5000-70000",
        "/dev/stdin:1:100-104: Error: Service out of range\nadd rule inet t post meta l4proto { tcp, udp } snat ip to meta mark & 0xffffff00 map @snat4 : 5000-70000\n                                                                                                   ^^^^^\n",
      ],
      [
        "add rule inet t post meta nfproto ipv4 meta mark & 0xff000000 == 0x28000000 snat ip to meta mark & 0xffffff00 map @snat4 : 5000-5009",
        "/dev/stdin:1:124-132: Error: transport protocol mapping is only valid after transport protocol match\nadd rule inet t post meta nfproto ipv4 meta mark & 0xff000000 == 0x28000000 snat ip to meta mark & 0xffffff00 map @snat4 : 5000-5009\n                                                                            ~~~~                                           ^^^^^^^^^\n",
      ],
      [
        "add rule inet t pre meta l4proto { tcp, udp, sctp } snat ip to meta mark & 0xffffff00 map @snat4 : 5000-5009",
        "/dev/stdin:1:1-109: Error: Could not process rule: Operation not supported\nadd rule inet t pre meta l4proto { tcp, udp, sctp } snat ip to meta mark & 0xffffff00 map @snat4 : 5000-5009\n^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
      ],
    ];
    for (const [rule, stderr] of refused) {
      const r = await run(fake, NFT, `${rule}\n`);
      assert.equal(r.code, 1, rule);
      assert.equal(r.stderr, stderr, rule);
    }
    await ok(
      fake,
      NFT,
      [
        'add rule inet t a numgen inc mod 2 vmap { 0 : goto b, 1 : goto b } comment "rr #x"',
        "add rule inet t post meta nfproto ipv4 meta mark & 0xff000000 == 0x28000000 meta l4proto { tcp, udp, sctp } snat ip to meta mark & 0xffffff00 map @snat4 : 5000-5009",
        "add rule inet t post meta l4proto tcp snat ip to meta mark & 0xffffff00 map @snat4 : 5000",
        "add rule inet t post tcp dport 80 snat ip to meta mark & 0xffffff00 map @snat4 : 5000-5001",
        "",
      ].join("\n"),
    );
    // The chains an anonymous verdict map goes to are in use, as those of a goto.
    const busy = await run(fake, NFT, "delete chain inet t b\n");
    assert.equal(
      busy.stderr,
      "/dev/stdin:1:21-21: Error: Could not process rule: Device or resource busy\ndelete chain inet t b\n                    ^\n",
    );
    // ...and a base chain reaching snat through one is checked like any other path.
    const reached = await run(fake, NFT, "add rule inet t pre ip saddr 10.0.0.1 goto a\n");
    assert.equal(reached.code, 0, "a and b hold nothing a prerouting chain may not run");
  });

  it("says so, with a non-zero exit, for everything it does not model", async () => {
    const inTable = (lines: string) => `add table inet t\nadd chain inet t c\n${lines}\n`;
    for (const [argv, stdin] of [
      [NFT, "add table bridge b\n"],
      [NFT, "add table inet t\nadd set inet t s { type ipv4_addr; flags interval; }\n"],
      [NFT, "add table inet t\nadd set inet t s { type ipv4_addr; timeout 10s; }\n"],
      [NFT, "add table inet t\nadd set inet t s { type ether_addr; }\n"],
      [
        NFT,
        "add table inet t\nadd set inet t s { type ipv4_addr; }\nadd element inet t s { example.com }\n",
      ],
      [NFT, inTable("add rule inet t c tcp dport { 80, 443 } accept")],
      [NFT, inTable("insert rule inet t c accept")],
      [NFT, inTable("delete rule inet t c handle 3")],
      [NFT, inTable("flush table inet t")],
      [["nft", "-f", "/etc/nftables.conf"], ""],
      [["nft", "monitor"], ""],
      [["nft", "-a", "list", "ruleset"], ""],
    ] as const) {
      const fake = new FakeKernel();
      const r = await run(fake, [...argv], stdin);
      assert.equal(r.code, 2, `${argv.join(" ")} ${stdin}`);
      assert.match(r.stderr, /^FakeKernel does not model /, `${argv.join(" ")} ${stdin}`);
      assert.equal(fake.dump(), new FakeKernel().dump(), "and changes nothing");
    }
    const r = await run(host(1), ["nft", "list", "ruleset"]);
    assert.match(r.stderr, /does not model nft list ruleset on a host with iptables-nft tables/);
  });
});

// ================================================================================================
// Datapath on the fake

describe("Datapath on the fake kernel", () => {
  for (const [name, s] of Object.entries(SCENARIOS)) {
    for (const index of [1, 2]) {
      it(`${name}, node-${index}: synced from empty, read() holds the plan; a second sync writes nothing`, async () => {
        const fake = host(index);
        const seeded = fake.dump();
        const dp = datapathOn(fake);
        const plan = planWith(index, await dp.read(), s);
        assert.deepEqual(plan.errors, []);
        const first = await dp.sync(plan);
        assert.ok(first.changes > 0);
        await assertHolds(dp, plan);
        assert.equal(
          foreign(fake.dump()),
          foreign(seeded),
          "foreign state is untouched, byte for byte",
        );
        fake.calls.length = 0;
        const second = await dp.sync(planWith(index, await dp.read(), s));
        assert.equal(second.changes, 0, JSON.stringify(second.detail));
        assert.deepEqual(writes(fake), [], "the second sync ran no write command");
        await dp.cleanup(`node-${index}`);
        assert.equal(fake.dump(), seeded, "cleanup leaves the host exactly as it was seeded");
      });
    }
  }

  it("a new agent adopts the state without writing (the same tables found again)", async () => {
    const s = SCENARIOS["two overlapping policies"]!;
    const fake = host(1);
    await datapathOn(fake).sync(planWith(1, await datapathOn(fake).read(), s, 0.1));
    fake.calls.length = 0;
    const restarted = datapathOn(fake);
    const report = await restarted.sync(planWith(1, await restarted.read(), s, 0.9));
    assert.equal(report.changes, 0, "a different random start finds our tables through our rules");
    assert.deepEqual(writes(fake), []);
  });

  const drifts: [string, number, string[], string?][] = [
    ["a flushed chain", 1, IPT, "*mangle\n-F SALLYPORT-MARK-REQUEST\nCOMMIT\n"],
    [
      "a deleted hook",
      1,
      IPT,
      '*nat\n-D POSTROUTING -m comment --comment "sallyport: no snat for steered traffic" -j SALLYPORT-NO-SNAT\nCOMMIT\n',
    ],
    [
      "a foreign rule inserted above our hook",
      1,
      IPT,
      "*mangle\n-I PREROUTING 1 -j ACCEPT\nCOMMIT\n",
    ],
    ["a removed set member", 1, ["ipset", "del", "sallyport-ignore4", "100.127.0.0/16"]],
    ["a flushed set", 2, ["ipset", "flush", "sallyport-eip4"]],
    ["a deleted route", 1, ["ip", "-4", "route", "del", "default", "table", "3050"]],
    ["a deleted ip rule", 2, ["ip", "-4", "rule", "del", "pref", "5900"]],
    ["a downed tunnel", 1, ["ip", "link", "set", "sallyport", "down"]],
    ["a deleted tunnel", 2, ["ip", "link", "del", "sallyport"]],
    ["a downed egress-IP device", 2, ["ip", "link", "set", "$EIP", "down"]],
    [
      "a deleted FDB entry",
      1,
      ["bridge", "-batch", "-"],
      "fdb del 02:53:50:00:00:01 dev sallyport self\n",
    ],
    ["a changed sysctl", 2, ["sysctl", "-w", "net/ipv4/conf/sallyport/rp_filter=1"]],
  ];
  for (const [what, index, argv, stdin] of drifts) {
    it(`repairs ${what} with one full sync`, async () => {
      const s = SCENARIOS["dual stack with ports"]!;
      const fake = host(index);
      const dp = datapathOn(fake);
      const plan = planWith(index, await dp.read(), s);
      await dp.sync(plan);
      const eip = plan.eips[0]?.device ?? "";
      if (argv.includes("3050"))
        assert.ok(
          plan.ipRules.some((r) => r.table === 3050),
          "the table the drift deletes from",
        );
      await ok(
        fake,
        argv.map((a) => (a === "$EIP" ? eip : a)),
        stdin,
      );
      assert.ok((await dp.sync(plan)).changes > 0, "the full sync found the drift");
      await assertHolds(dp, plan);
      assert.equal((await dp.sync(plan)).changes, 0, "and then holds the plan");
    });
  }

  // The agent lists every set member once a minute; its other full syncs read each set's header
  // and number of entries (`ipset list -t`).
  for (const [what, index, argv, when] of [
    [
      "a removed set member",
      1,
      ["ipset", "del", "sallyport-ignore4", "100.127.0.0/16"],
      "with the next full sync: the number of entries changed",
    ],
    ["a flushed set", 2, ["ipset", "flush", "sallyport-eip4"], "with the next full sync"],
    [
      "a member replaced by another",
      1,
      ["ipset", "restore", "-exist"],
      "once the members are due again: the number of entries is the same",
    ],
  ] as const) {
    it(`members listed once a minute: repairs ${what} ${when}`, async () => {
      const s = SCENARIOS["dual stack with ports"]!;
      const fake = host(index);
      const clock = new FakeClock();
      const dp = new Datapath({
        runner: fake,
        iptables: new Iptables(fake, "nft"),
        families: [4, 6],
        rulePref: RULE_PREF,
        tunnelDevice: TUNNEL,
        setElementsEveryMs: 60_000,
        clock,
      });
      const plan = planWith(index, await dp.read(), s);
      await dp.sync(plan);
      await ok(
        fake,
        [...argv],
        "del sallyport-ignore4 100.127.0.0/16\nadd sallyport-ignore4 192.0.2.0/24\n",
      );
      await clock.advance(59_000);
      fake.calls.length = 0;
      const next = await dp.sync(plan);
      assert.ok(
        !fake.calls.some((c) => c.argv.join(" ") === "ipset save"),
        "no listing of every member",
      );
      if (what === "a member replaced by another") {
        assert.equal(next.changes, 0, "the header cannot tell");
        await clock.advance(1000);
        assert.ok((await dp.sync(plan)).changes > 0, "the listing found it");
      } else assert.ok(next.changes > 0, "the header told");
      await assertHolds(dp, plan);
      assert.equal((await dp.sync(plan)).changes, 0, "and then holds the plan");
    });
  }

  it("a failing command stops the sync with a DatapathError naming the step; the next full sync converges", async () => {
    const s = SCENARIOS["dual stack with ports"]!;
    const steps: [string[], string][] = [
      [["ipset", "restore"], "update ipsets"],
      [["ip", "-batch", "-"], "set up the tunnel"],
      [["sysctl", "-q", "-w"], "write sysctls"],
      [["ip", "-4", "-batch", "-"], "program IPv4 neighbours, routes and rules"],
      [["ip", "-6", "-batch", "-"], "program IPv6 neighbours, routes and rules"],
      [["bridge", "-batch", "-"], "program the tunnel FDB"],
      [["iptables-nft-restore"], "restore iptables rules"],
      [["ip6tables-nft-restore"], "restore ip6tables rules"],
    ];
    for (const [prefix, step] of steps) {
      const fake = host(2);
      const dp = datapathOn(fake);
      const plan = planWith(2, await dp.read(), s);
      fake.failNext(prefix, { code: 2, stderr: "RTNETLINK answers: Operation not permitted\n" });
      await assert.rejects(dp.sync(plan), (e: unknown) => {
        assert.ok(e instanceof DatapathError, String(e));
        assert.equal(e.step, step);
        assert.match(
          e.message,
          new RegExp(`^Cannot ${step}: Cannot run ${prefix.join(" ")}.*Operation not permitted`),
        );
        return true;
      });
      await dp.sync(plan, { partial: true });
      await assertHolds(
        dp,
        plan,
        `after a failure in "${step}", even a partial sync is a full one`,
      );
    }
  });

  it("a sync the kernel refuses (a foreign VXLAN holds our VNI) fails with the kernel's message and recovers", async () => {
    const s = SCENARIOS["one policy, explicit egress IP (seed 000/003)"]!;
    const fake = host(1);
    fake.seed(
      "ip link add flannel.1 type vxlan id 7799 dstport 7799 local 192.168.0.11 dev eth0 nolearning gbp".split(
        " ",
      ),
    );
    const dp = datapathOn(fake);
    const plan = planWith(1, await dp.read(), s);
    await assert.rejects(
      dp.sync(plan),
      /^DatapathError: Cannot set up the tunnel: .*A VXLAN device with the specified VNI already exists/,
    );
    fake.seed(["ip", "link", "del", "flannel.1"]);
    await dp.sync(plan);
    await assertHolds(dp, plan);
  });

  it("a tunnel without gbp (an agent of an earlier version) is made again with it; then a sync writes nothing", async () => {
    const s = SCENARIOS["one policy, explicit egress IP (seed 000/003)"]!;
    const fake = host(1);
    const dp = datapathOn(fake);
    const plan = planWith(1, await dp.read(), s);
    assert.equal(plan.tunnel?.gbp, true);
    const before: NodePlan = { ...plan, tunnel: { ...plan.tunnel!, gbp: false } };
    await dp.sync(before);
    await assertHolds(dp, before);
    const tunnelOf = async () => (await dp.read()).routing.links.find((l) => l.name === TUNNEL)!;
    assert.equal((await tunnelOf()).vxlan?.gbp, false);
    fake.calls.length = 0;
    const upgraded = planWith(1, await dp.read(), s);
    assert.ok((await dp.sync(upgraded)).changes > 0);
    assert.match(
      fake.calls.find((c) => c.argv.join(" ") === "ip -batch -")?.stdin ?? "",
      /^link del sallyport\nlink add sallyport type vxlan id \d+ dstport \d+ local 192\.168\.0\.11 dev eth0 nolearning gbp$/m,
    );
    assert.equal((await tunnelOf()).vxlan?.gbp, true);
    await assertHolds(
      dp,
      upgraded,
      "routes, neighbours and FDB entries are back on the new device",
    );
    fake.calls.length = 0;
    assert.equal((await dp.sync(planWith(1, await dp.read(), s))).changes, 0);
    assert.deepEqual(writes(fake), []);
  });

  it("a foreign VXLAN up on the tunnel's port without gbp: the tunnel cannot come up, with the kernel's message; it recovers", async () => {
    const s = SCENARIOS["one policy, explicit egress IP (seed 000/003)"]!;
    const fake = host(1);
    fake.seed(
      "ip link add vx0 type vxlan id 7000 dstport 7799 local 192.168.0.11 dev eth0".split(" "),
    );
    fake.seed(["ip", "link", "set", "vx0", "up"]);
    const dp = datapathOn(fake);
    const plan = planWith(1, await dp.read(), s);
    assert.equal(plan.tunnel?.port, 7799);
    await assert.rejects(
      dp.sync(plan),
      /^DatapathError: Cannot bring the tunnel up: .*RTNETLINK answers: Address already in use/,
    );
    fake.seed(["ip", "link", "del", "vx0"]);
    await dp.sync(plan);
    await assertHolds(dp, plan);
  });

  it("when a peer's underlay address changes, one sync leaves its FDB entry pointing at the new address", async () => {
    const s = SCENARIOS["one policy, explicit egress IP (seed 000/003)"]!;
    const fake = host(1);
    const dp = datapathOn(fake);
    await dp.sync(planWith(1, await dp.read(), s));
    const moved = {
      ...s,
      nodes: s.nodes.map((n) =>
        n.name === "node-2" ? { ...n, addresses: { 4: "192.168.0.22", 6: "fd00:192:168::22" } } : n,
      ),
    };
    const plan = planWith(1, await dp.read(), moved);
    const report = await dp.sync(plan);
    assert.ok(report.changes > 0);
    await assertHolds(dp, plan, "the sync reported success: the kernel should hold the plan");
  });

  it("a failing read names its step too", async () => {
    const fake = host(1);
    const dp = datapathOn(fake);
    const plan = planWith(1, await dp.read(), SCENARIOS["dual stack with ports"]!);
    fake.failNext(["ipset", "save"], {
      code: 1,
      stderr: "ipset v7.17: Kernel error received: Operation not permitted\n",
    });
    await assert.rejects(
      dp.sync(plan),
      (e) => e instanceof DatapathError && e.step === "read the kernel",
    );
  });
});

describe("Datapath on the fake kernel: egress IPs leased from the kernel (issue 12)", () => {
  const leasing = (fake: FakeKernel) =>
    new Datapath({
      runner: fake,
      iptables: new Iptables(fake, "nft"),
      families: [4, 6],
      rulePref: RULE_PREF,
      tunnelDevice: TUNNEL,
      eipLeaseSeconds: 1,
    });
  const eipLinks = async (dp: Datapath) =>
    (await dp.read()).routing.links.filter((l) => l.name.startsWith("spe-"));

  it("renewed while held, gone when the renewals stop (devices silent), made again and announced by the next sync", async () => {
    const s = SCENARIOS["dual stack with ports"]!;
    const fake = host(2);
    const dp = leasing(fake);
    const plan = planWith(2, await dp.read(), s);
    assert.deepEqual(
      plan.eips.map((e) => e.family).sort(),
      [4, 6],
      "node-2 holds an egress IP per family",
    );
    await dp.sync(plan);
    for (const l of await eipLinks(dp))
      assert.deepEqual(l.leases, { [l.addresses[0]!]: 1 }, `${l.name} holds a 1 s lease`);
    const [v4, v6] = [4, 6].map((f) => plan.eips.find((e) => e.family === f)!.device);
    const sysctl = async (key: string) => (await ok(fake, ["sysctl", key])).trim();
    // The devices send nothing but answers for their egress IP (see Datapath's device sysctls).
    assert.equal(
      await sysctl(`net/ipv4/conf/${v4}/arp_ignore`),
      `net.ipv4.conf.${v4}.arp_ignore = 1`,
    );
    assert.equal(
      await sysctl(`net/ipv6/conf/${v4}/disable_ipv6`),
      `net.ipv6.conf.${v4}.disable_ipv6 = 1`,
    );
    assert.equal(
      await sysctl(`net/ipv6/conf/${v6}/addr_gen_mode`),
      `net.ipv6.conf.${v6}.addr_gen_mode = 1`,
    );
    assert.equal(
      await sysctl(`net/ipv6/conf/${v6}/forwarding`),
      `net.ipv6.conf.${v6}.forwarding = 0`,
    );
    assert.ok(
      !fake.dump().includes("fe80::"),
      "no link-local address (the same on every node) on an egress-IP device",
    );

    // A full sync reads the leases back and leaves them alone: the lifetime left is no drift.
    fake.advance(600);
    assert.equal((await dp.sync(plan)).changes, 0);
    // Renewed every 600 ms, the addresses outlive their 1 s lease many times over.
    for (let i = 0; i < 5; i++) {
      assert.equal(await dp.refreshEgressIPs(), 2);
      fake.advance(600);
    }
    assert.deepEqual(
      (await eipLinks(dp)).map((l) => l.addresses.length),
      [1, 1],
      "renewed: still held",
    );
    // No renewal (the agent dead, frozen or fenced): the kernel deletes the addresses.
    fake.advance(1000);
    assert.deepEqual(
      (await eipLinks(dp)).map((l) => l.addresses.length),
      [0, 0],
      "the leases ended: nothing left to answer for",
    );
    // Still the plan (this node holds them): the next sync makes the devices again, down, then
    // up, so that the kernel announces the addresses again.
    const before = fake.calls.length;
    assert.ok((await dp.sync(plan)).changes > 0);
    const batch = fake.calls
      .slice(before)
      .filter((c) => c.argv.join(" ") === "ip -batch -")
      .map((c) => c.stdin ?? "")
      .join("");
    for (const d of [v4, v6]) {
      assert.match(batch, new RegExp(`link del ${d}\n`));
      assert.match(
        batch,
        new RegExp(`addr replace \\S+ dev ${d}( nodad)? valid_lft 1 preferred_lft 1\n`),
      );
      assert.match(batch, new RegExp(`link set ${d} up\n`));
    }
    await assertHolds(dp, plan);
  });

  it("forgets the connections it tracked for an egress IP before it takes it (again), and only then", async () => {
    const s = SCENARIOS["dual stack with ports"]!;
    const fake = host(2);
    const dp = leasing(fake);
    const plan = planWith(2, await dp.read(), s);
    // The conntrack deletes and the device creations, in the order they ran.
    const deletes = (from: number) =>
      fake.calls
        .slice(from)
        .flatMap((c) =>
          c.argv[0] === "conntrack"
            ? [c.argv.join(" ")]
            : [...(c.stdin ?? "").matchAll(/link add \S+/g)].map((m) => m[0]),
        );
    let from = fake.calls.length;
    await dp.sync(plan);
    const taken = deletes(from);
    for (const e of plan.eips) {
      const forget = `conntrack -D -f ipv${e.family} --reply-dst ${e.address}`;
      assert.ok(taken.includes(forget), `${forget} in ${taken.join("; ")}`);
      // Before its device exists: nothing of a connection that comes back meets the old state.
      assert.ok(taken.indexOf(forget) < taken.indexOf(`link add ${e.device}`), taken.join("; "));
    }
    from = fake.calls.length;
    await dp.sync(plan);
    assert.deepEqual(
      deletes(from).filter((c) => c.startsWith("conntrack")),
      [],
      "held already: its connections are today's",
    );
  });

  it("an IPv4 egress IP's device has no IPv6, also on a node that plans IPv4 only", async () => {
    const s = SCENARIOS["one policy, explicit egress IP (seed 000/003)"]!;
    const fake = host(2);
    const dp = new Datapath({
      runner: fake,
      iptables: new Iptables(fake, "nft"),
      families: [4],
      rulePref: RULE_PREF,
      tunnelDevice: TUNNEL,
      eipLeaseSeconds: 1,
    });
    const plan = planWith(2, await dp.read(), s, 0.5, { families: [4] });
    await dp.sync(plan);
    const device = plan.eips[0]!.device;
    assert.equal(
      (await ok(fake, ["sysctl", `net/ipv6/conf/${device}/disable_ipv6`])).trim(),
      `net.ipv6.conf.${device}.disable_ipv6 = 1`,
    );
  });

  it("renews only what the last sync holds: after a sync that gives the egress IPs up, nothing", async () => {
    const s = SCENARIOS["dual stack with ports"]!;
    const fake = host(2);
    const dp = leasing(fake);
    const plan = planWith(2, await dp.read(), s);
    await dp.sync(plan);
    await dp.sync({ ...plan, eips: [] });
    assert.deepEqual(await eipLinks(dp), [], "released");
    const before = fake.calls.length;
    assert.equal(await dp.refreshEgressIPs(), 0);
    assert.equal(fake.calls.length, before, "and no command");
  });

  it("a sync that fails renews, meanwhile, only what both the old and the new plan hold", async () => {
    const s = SCENARIOS["dual stack with ports"]!;
    const fake = host(2);
    const dp = leasing(fake);
    const plan = planWith(2, await dp.read(), s);
    await dp.sync(plan);
    const v6Only = { ...plan, eips: plan.eips.filter((e) => e.family === 6) };
    // The release of the IPv4 egress IP fails: its device is still there, but no longer ours.
    fake.failNext(["ip", "-batch", "-"], { code: 2, stderr: "RTNETLINK answers: Busy\n" });
    await assert.rejects(dp.sync(v6Only), DatapathError);
    assert.equal((await eipLinks(dp)).length, 2);
    assert.equal(await dp.refreshEgressIPs(), 1, "the IPv6 one alone");
  });

  it("a permanent egress-IP address (an agent of an earlier version) becomes a lease, and back", async () => {
    const s = SCENARIOS["dual stack with ports"]!;
    const fake = host(2);
    const permanent = datapathOn(fake);
    const plan = planWith(2, await permanent.read(), s);
    await permanent.sync(plan);
    for (const l of await eipLinks(permanent)) assert.equal(l.leases, undefined);
    const dp = leasing(fake);
    assert.equal((await dp.sync(plan)).changes, 2, "one addr replace per egress IP");
    for (const l of await eipLinks(dp)) assert.deepEqual(l.leases, { [l.addresses[0]!]: 1 });
    assert.equal((await dp.sync(plan)).changes, 0);
    assert.equal((await permanent.sync(plan)).changes, 2);
    fake.advance(5000);
    assert.deepEqual(
      (await eipLinks(dp)).map((l) => l.addresses.length),
      [1, 1],
      "permanent again",
    );
  });
});

// ------------------------------------------------------------------------------------------------
// Random plans: every sync succeeds on a kernel that refuses a rule naming a missing set, a set
// destroyed while in use, a route through a missing or down device; and the kernel holds the plan.

const POLICY_DESTINATIONS = [
  "203.0.113.0/24",
  "10.6.105.150/32",
  "198.51.100.7/32",
  "2001:db8::/64",
];

const policyArb = fc.record({
  app: fc.constantFrom("web", "db"),
  destinations: fc.subarray(POLICY_DESTINATIONS),
  /**
   * An address from the pool, several, the pool's lowest free address(es), or the gateway node's
   * own.
   */
  egress: fc.constantFrom(
    "10.168.60.101",
    "10.168.60.102",
    "fd00:a::101",
    "10.168.60.102,10.168.60.103",
    "10.168.60.104,10.168.60.105,fd00:a::104,fd00:a::105",
    "pool",
    "pool2",
    "nodeIP",
  ),
  excluded: fc.subarray(["203.0.113.128/25", "192.0.2.0/24"]),
  priority: fc.option(fc.integer({ min: 0, max: 100 }), { nil: undefined }),
  ports: fc.option(
    fc.constantFrom<EgressPolicy["spec"]["ports"]>(
      [{ protocol: "TCP", port: 443 }],
      [
        { protocol: "UDP", port: 53 },
        { protocol: "TCP", port: 80 },
      ],
    ),
    { nil: undefined },
  ),
});

const snapshotArb = fc.record({
  dual: fc.boolean(),
  gateways: fc.subarray([1, 2, 3]),
  unhealthy: fc.subarray([2, 3]),
  pods: fc.array(fc.record({ node: fc.constantFrom(1, 2, 3), app: fc.constantFrom("web", "db") }), {
    minLength: 1,
    maxLength: 8,
  }),
  policies: fc.array(policyArb, { maxLength: 3 }),
  snatPorts: fc.boolean(),
});

type RandomCluster = typeof snapshotArb extends fc.Arbitrary<infer T> ? T : never;

function randomSnapshot(r: RandomCluster): Snapshot {
  const families: Family[] = r.dual ? [4, 6] : [4];
  const nodes = [1, 2, 3].map((i) =>
    node(`node-${i}`, {
      ipv4: `192.168.0.${10 + i}`,
      ...(r.dual ? { ipv6: `fd00:192:168::${10 + i}` } : {}),
      podCIDRs: [`172.29.${i}.0/24`, ...(r.dual ? [`fd00:172:29:${i}::/64`] : [])],
      ...(r.gateways.includes(i) ? { labels: { egress: "true" } } : {}),
    }),
  );
  return snapshot({
    nodes,
    healthy: new Set(
      nodes.map((n) => n.name).filter((n) => !r.unhealthy.some((u) => n === `node-${u}`)),
    ),
    pods: r.pods.map((p, i) =>
      pod(
        "team-a",
        `p${i}`,
        `node-${p.node}`,
        families.map((f) =>
          f === 4 ? `172.29.${p.node}.${i + 2}` : `fd00:172:29:${p.node}::${i + 2}`,
        ),
        { app: p.app },
      ),
    ),
    gateways: [gateway("edge", { pool: POOL })],
    policies: r.policies.map((p, i) =>
      policy("team-a", `pol-${i}`, {
        podSelector: { matchLabels: { app: p.app } },
        destinationCIDRs: p.destinations,
        excludedCIDRs: p.excluded,
        ...(p.egress === "nodeIP" ? { useNodeIP: true } : {}),
        ...(p.egress === "pool2" ? { egressIPCount: 2 } : {}),
        ...(p.egress.startsWith("pool") || p.egress === "nodeIP"
          ? {}
          : { egressIP: p.egress.split(",") }),
        ...(p.priority === undefined ? {} : { priority: p.priority }),
        ...(p.ports === undefined ? {} : { ports: p.ports }),
      }),
    ),
    serviceCIDRs: ["10.96.0.0/16", "fd00:10:96::/112"],
  });
}

describe("Datapath between random plans (property)", () => {
  it("every sync succeeds, the kernel holds each plan, foreign state never changes, cleanup restores the host", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(1, 2, 3),
        fc.array(
          fc.tuple(snapshotArb, fc.boolean(), fc.double({ min: 0, max: 0.999, noNaN: true })),
          { minLength: 1, maxLength: 4 },
        ),
        async (index, steps) => {
          const fake = host(index);
          const seeded = fake.dump();
          const dp = datapathOn(fake);
          let plan: NodePlan | undefined;
          for (const [r, partial, random] of steps) {
            plan = planWith(index, await dp.read(), randomSnapshot(r), random, {
              snatPorts: r.snatPorts ? SNAT_PORTS : undefined,
            });
            await dp.sync(plan, { partial });
            await assertHolds(dp, plan);
            assert.equal(foreign(fake.dump()), foreign(seeded));
          }
          fake.calls.length = 0;
          assert.equal((await dp.sync(plan!)).changes, 0);
          assert.deepEqual(writes(fake), []);
          await dp.cleanup(`node-${index}`);
          assert.equal(fake.dump(), seeded);
        },
      ),
      { numRuns: 100 },
    );
  });

  it("a failure at any write of a sync is named, and the next full sync converges", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(1, 2),
        snapshotArb,
        snapshotArb,
        fc.nat(10),
        async (index, a, b, k) => {
          const fake = host(index);
          const dp = datapathOn(fake);
          await dp.sync(planWith(index, await dp.read(), randomSnapshot(a)));
          const plan = planWith(index, await dp.read(), randomSnapshot(b));
          let n = 0;
          const failing: Runner = {
            run(argv: readonly string[], options?: RunOptions) {
              if (isWriteCommand(argv) && n++ === k)
                return Promise.resolve({ code: 1, stdout: "", stderr: "injected\n" });
              return fake.run(argv, options);
            },
          };
          const flaky = datapathOn(failing);
          try {
            await flaky.sync(plan);
          } catch (e) {
            assert.ok(e instanceof DatapathError, String(e));
            assert.match(
              e.message,
              new RegExp(`^Cannot ${e.step}: Cannot run .*: exit 1: injected$`),
            );
          }
          await flaky.sync(plan, { partial: true });
          await assertHolds(flaky, plan);
        },
      ),
      { numRuns: 100 },
    );
  });
});

// ------------------------------------------------------------------------------------------------
// The agent's path: plans from the keyed planner (unchanged sections shared by identity) applied
// by partial syncs, which diff only what changed; the kernel must end up holding each plan.

describe("partial syncs of keyed plans on the fake kernel", () => {
  it("hold every plan of a sequence of pod and policy changes, as a full sync confirms", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.record({
            policy: fc.integer({ min: 0, max: 3 }),
            pods: fc.integer({ min: 0, max: 4 }),
            remove: fc.boolean(),
            // Another SNAT address list: every class map's verdicts name their index.
            eips: fc.constantFrom(undefined, ["10.168.60.105"], ["10.168.60.100", "10.168.60.105"]),
          }),
          { minLength: 1, maxLength: 8 },
        ),
        async (steps) => {
          const fake = host(2);
          const dp = datapathOn(fake);
          const s = SCENARIOS["dual stack with ports"]!;
          const outcome = computeCluster(s);
          const local = localFactsFrom(await dp.read(), {
            nodeAddresses: s.nodes.find((n) => n.name === "node-2")!.addresses,
            peers: outcome.peers,
            rulePref: RULE_PREF,
            random: () => 0.5,
          });
          const view = nodeViewFromOutcome(outcome, "node-2", { local });
          const planner = new NodePlanner("node-2", view.config);
          planner.setLocal(local);
          planner.setPeers(view.peers);
          planner.setIgnoreCIDRs(view.ignoreCIDRs);
          const base = view.policies[0]!;
          for (const [i, step] of steps.entries()) {
            const key = `${base.key}-${step.policy}`;
            if (step.remove) planner.deletePolicy(key);
            else
              planner.setPolicy({
                ...base,
                key,
                ...(step.eips === undefined ? {} : { snat: { ...base.snat, 4: step.eips } }),
                // Overlapping pods: sources share classes, which split and merge.
                endpoints: Array.from({ length: step.pods }, (_, k) => ({
                  pod: `team-a/p${2 * step.policy + k}`,
                  node: "node-1",
                  ips: [`172.29.1.${2 * step.policy + k + 2}`],
                })),
              });
            const plan = planner.plan();
            await dp.sync(plan, { partial: i > 0 });
            await assertHolds(dp, plan, `step ${i}`);
          }
          assert.equal((await dp.sync(planner.plan())).changes, 0, "a full sync finds nothing");
        },
      ),
      { numRuns: 40 },
    );
  });
});

// ================================================================================================
// The nftables datapath on the fake: the promises of test/kernel/datapath_nft_test.ts without root.

/** host(index), where kube-proxy also runs in nftables mode. */
function nftHost(index: number): FakeKernel {
  const fake = host(index);
  fake.seed(NFT, KUBE_PROXY_NFT);
  return fake;
}

/** Datapath exactly as src/kernel/open.ts builds it for --datapath nftables. */
function nftDatapathOn(runner: Runner): Promise<Datapath> {
  return openDatapath({ runner, datapath: "nftables", backend: "nft" });
}

/** As nftDatapathOn, listing the elements once a minute as the agent does, on `clock`. */
function minuteDatapathOn(runner: Runner, clock: FakeClock): Promise<Datapath> {
  return openDatapath({
    runner,
    datapath: "nftables",
    backend: "nft",
    setElementsEveryMs: 60_000,
    clock,
  });
}

/** On host 1, a minute-listing datapath that synced scenario `s` once. */
async function minuteSynced(s: Snapshot) {
  const fake = nftHost(1);
  const clock = new FakeClock();
  const dp = await minuteDatapathOn(fake, clock);
  const plan = nftPlanWith(1, await dp.read(), s);
  await dp.sync(plan);
  return { fake, clock, dp, plan };
}

/** The nft listings `fake` ran, as command lines. */
function nftListings(fake: FakeKernel): string[] {
  return fake.calls
    .filter((c) => c.argv[0] === "nft" && c.argv.includes("list"))
    .map((c) => c.argv.join(" "));
}

/** What the agent does with `datapath: "nftables"`: facts from the kernel, then the plan. */
function nftPlanWith(
  index: number,
  state: KernelState,
  s: Snapshot,
  random = 0.5,
  config: Partial<NodeConfig> = {},
): NodePlan {
  const outcome = computeCluster(s);
  const self = s.nodes.find((n) => n.name === `node-${index}`)!;
  const local = localFactsFrom(state, {
    nodeAddresses: self.addresses,
    peers: outcome.peers,
    rulePref: RULE_PREF,
    random: () => random,
  });
  return planNode(
    nodeViewFromOutcome(outcome, `node-${index}`, {
      local,
      config: { ...config, datapath: "nftables" },
    }),
  );
}

/** Our table as a fresh kernel holds it after the whole table is rendered from `plan`. */
async function freshTable(plan: NodePlan): Promise<string> {
  const fresh = new FakeKernel();
  const payload = renderNftTable(desiredTable(plan, { families: [4, 6], tunnelDevice: TUNNEL }));
  await ok(fresh, NFT, payload);
  return nftSection(fresh.dump(), "inet", "sallyport");
}

/** The kernel holds the plan: routing and devices as with iptables, and exactly the table. */
async function assertHoldsNft(
  fake: FakeKernel,
  dp: Datapath,
  plan: NodePlan,
  message?: string,
): Promise<void> {
  await assertHolds(dp, plan, message);
  assert.equal(nftSection(fake.dump(), "inet", "sallyport"), await freshTable(plan), message);
}

/** Names in our table the drifts below act on: a class map, a verdict chain, a source. */
async function ourNames(fake: FakeKernel): Promise<Record<string, string>> {
  const table = parseNftTable(await ok(fake, ["nft", "-j", "list", "table", "inet", "sallyport"]))!;
  const classMap = [...table.sets.keys()].find((n) => /^c[46]-/.test(n)) ?? "";
  const verdict = [...table.chains.keys()].find((n) => /^(to-|snat[46]-)/.test(n)) ?? "";
  const source = [...(table.sets.get("src4")?.elements?.keys() ?? [])][0] ?? "";
  return { $CLASS: classMap, $VERDICT: verdict, $SOURCE: `{ ${source} }` };
}

/** Syncs node-`index`'s plan of "dual stack with ports" through `dp`, then runs `drift`. */
async function syncThenDrift(
  fake: FakeKernel,
  dp: Datapath,
  index: number,
  drift: readonly string[],
): Promise<NodePlan> {
  const plan = nftPlanWith(index, await dp.read(), SCENARIOS["dual stack with ports"]!);
  await dp.sync(plan);
  const names = await ourNames(fake);
  await ok(
    fake,
    drift.map((a) => names[a] ?? a),
  );
  return plan;
}

describe("Datapath on the fake kernel: nftables", () => {
  for (const [name, s] of Object.entries(SCENARIOS)) {
    for (const index of [1, 2]) {
      it(`${name}, node-${index}: synced from empty, the table holds the plan, nothing else changed; a second sync writes nothing`, async () => {
        const fake = nftHost(index);
        const seeded = fake.dump();
        const dp = await nftDatapathOn(fake);
        const plan = nftPlanWith(index, await dp.read(), s);
        assert.deepEqual(plan.errors, []);
        assert.ok((await dp.sync(plan)).changes > 0);
        await assertHoldsNft(fake, dp, plan);
        assert.equal(
          foreign(fake.dump()),
          foreign(seeded),
          "kube-proxy's table, iptables-nft's rules and every other object, byte for byte",
        );
        assert.doesNotMatch(
          fake.dump(),
          /SALLYPORT|ipset sallyport/,
          "no iptables rule or ipset of ours",
        );
        fake.calls.length = 0;
        const second = await dp.sync(nftPlanWith(index, await dp.read(), s));
        assert.equal(second.changes, 0, JSON.stringify(second.detail));
        assert.deepEqual(writes(fake), [], "the second sync ran no write command");
      });
    }
  }

  it("an agent of the previous version left IPv4 sources in a verdict map: one full sync moves them to class ids", async () => {
    const fake = nftHost(2);
    const dp = await nftDatapathOn(fake);
    const plan = nftPlanWith(2, await dp.read(), SCENARIOS["dual stack with ports"]!);
    const table = desiredTable(plan, { families: [4, 6], tunnelDevice: TUNNEL });
    // The layout before class ids: `ip saddr vmap @src4`, each source jumping to its class.
    const lines = renderNftTable(table).split("\n");
    const jumps = new Map<string, string>();
    const old = lines
      .filter((l) => !/ cls4 /.test(l))
      .map((l) => {
        if (l.startsWith("add map inet sallyport src4 "))
          return "add map inet sallyport src4 { type ipv4_addr : verdict; }";
        if (l.includes("meta priority set ip saddr map @src4"))
          return 'add rule inet sallyport prerouting meta nfproto ipv4 ip saddr vmap @src4 comment "classify #oldlayout0"';
        return l;
      });
    for (const l of lines) {
      const m = /^add element inet sallyport cls4 \{ (.*) \}$/.exec(l);
      for (const e of m?.[1]?.split(", ") ?? []) {
        const [id, verdict] = e.split(" : ");
        jumps.set(id!, verdict!);
      }
    }
    const previous = old
      .map((l) =>
        l.startsWith("add element inet sallyport src4 ")
          ? l.replace(/ : ([0-9a-f]+:[0-9a-f]+)/g, (_, id: string) => ` : ${jumps.get(id)}`)
          : l,
      )
      .join("\n");
    assert.match(previous, /src4 \{ [^}]* : jump c4-/, "the old layout is what we seed");
    await ok(fake, NFT, previous);
    assert.ok((await dp.sync(plan)).changes > 0);
    await assertHoldsNft(fake, dp, plan);
    assert.equal((await dp.sync(plan)).changes, 0, "and then holds the plan");
  });

  const drifts: [string, number, string[]][] = [
    ["a flushed base chain", 1, ["nft", "flush", "chain", "inet", "sallyport", "prerouting"]],
    ["a flushed verdict chain", 1, ["nft", "flush", "chain", "inet", "sallyport", "$VERDICT"]],
    ["a flushed SNAT chain", 2, ["nft", "flush", "chain", "inet", "sallyport", "$VERDICT"]],
    [
      "a deleted source element",
      1,
      ["nft", "delete", "element", "inet", "sallyport", "src4", "$SOURCE"],
    ],
    ["a flushed class map", 1, ["nft", "flush", "map", "inet", "sallyport", "$CLASS"]],
    [
      "a foreign rule in our chain",
      2,
      ["nft", "add", "rule", "inet", "sallyport", "forward", "accept"],
    ],
    ["a deleted table", 2, ["nft", "delete", "table", "inet", "sallyport"]],
  ];
  for (const [what, index, argv] of drifts) {
    it(`repairs ${what} with one full sync`, async () => {
      const fake = nftHost(index);
      const dp = await nftDatapathOn(fake);
      const plan = await syncThenDrift(fake, dp, index, argv);
      assert.notEqual(
        nftSection(fake.dump(), "inet", "sallyport"),
        await freshTable(plan),
        "the drift happened",
      );
      assert.ok((await dp.sync(plan)).changes > 0, "the full sync found the drift");
      await assertHoldsNft(fake, dp, plan);
      assert.equal((await dp.sync(plan)).changes, 0, "and then holds the plan");
    });
  }

  // The agent lists the elements once a minute (nft 1.0.6 takes ~1.4 s for 100,000); its
  // other full syncs read the table's structure tersely.
  const ofElements = new Set(["a deleted source element", "a flushed class map"]);
  for (const [what, index, argv] of drifts) {
    const when = ofElements.has(what)
      ? "at the first full sync once the elements are due again"
      : "with the next full sync, elements not listed";
    it(`elements listed once a minute: repairs ${what} ${when}`, async () => {
      const fake = nftHost(index);
      const clock = new FakeClock();
      const dp = await minuteDatapathOn(fake, clock);
      const plan = await syncThenDrift(fake, dp, index, argv);
      await clock.advance(59_000);
      fake.calls.length = 0;
      const next = await dp.sync(plan);
      assert.deepEqual(nftListings(fake), ["nft -t -j list ruleset inet"], "a terse read only");
      if (ofElements.has(what)) {
        assert.equal(next.changes, 0, "a terse read cannot see it");
        await clock.advance(1000);
        fake.calls.length = 0;
        assert.ok((await dp.sync(plan)).changes > 0, "the read listing the elements found it");
        assert.ok(fake.calls.some((c) => c.argv.join(" ") === "nft -j list table inet sallyport"));
      } else {
        assert.ok(next.changes > 0, "the terse read found the drift");
      }
      await assertHoldsNft(fake, dp, plan);
      assert.equal((await dp.sync(plan)).changes, 0, "and then holds the plan");
    });
  }

  it("elements listed once a minute: a read without them after a failed sync lists them", async () => {
    const { fake, dp, plan } = await minuteSynced(SCENARIOS["dual stack with ports"]!);
    // A chain and a class map flushed; nft refuses the sync that repairs the chain, so what the
    // kernel holds is no longer known: the next read lists the elements and finds the map.
    const names = await ourNames(fake);
    await ok(fake, ["nft", "flush", "chain", "inet", "sallyport", "prerouting"]);
    await ok(fake, ["nft", "flush", "map", "inet", "sallyport", names.$CLASS!]);
    const state = await dp.read();
    assert.ok(
      [...(state.nft?.sets.values() ?? [])].every((x) => x.elements === undefined),
      "read tersely",
    );
    fake.failNext(["nft", "-f", "-"], {
      code: 1,
      stderr: "Error: Could not process rule: Device or resource busy\n",
    });
    await assert.rejects(dp.sync(plan, { state }));
    fake.calls.length = 0;
    assert.ok((await dp.sync(plan)).changes > 0, "the table repaired");
    assert.ok(fake.calls.some((c) => c.argv.join(" ") === "nft -j list table inet sallyport"));
    await assertHoldsNft(fake, dp, plan);
  });

  it("a listing of the elements that fails is not repeated by every retry: the next reads are terse until a minute later", async () => {
    const { fake, clock, dp, plan } = await minuteSynced(SCENARIOS["dual stack with ports"]!);
    await clock.advance(60_000);
    // Due, and it times out (it did on a gateway node at 10,000 policies, 30 s each time).
    fake.failNext(["nft", "-j", "list", "table"], {
      code: 1,
      stderr: "Cannot run nft -j list table inet sallyport: The operation was aborted\n",
    });
    await assert.rejects(dp.sync(plan));
    fake.calls.length = 0;
    assert.equal((await dp.sync(plan)).changes, 0, "the retry holds the plan");
    assert.deepEqual(nftListings(fake), ["nft -t -j list ruleset inet"], "read tersely");
    await clock.advance(60_000);
    fake.calls.length = 0;
    await dp.sync(plan);
    assert.deepEqual(
      nftListings(fake),
      ["nft -j list table inet sallyport"],
      "a minute later, due again",
    );
  });

  it("a new agent adopts the table without writing", async () => {
    const s = SCENARIOS["two overlapping policies"]!;
    const fake = nftHost(1);
    const first = await nftDatapathOn(fake);
    await first.sync(nftPlanWith(1, await first.read(), s, 0.1));
    fake.calls.length = 0;
    const restarted = await nftDatapathOn(fake);
    const report = await restarted.sync(nftPlanWith(1, await restarted.read(), s, 0.9));
    assert.equal(report.changes, 0, JSON.stringify(report.detail));
    assert.deepEqual(writes(fake), []);
  });

  it("`sallyport cleanup` (its --datapath default, iptables) removes our table and leaves the host exactly as seeded", async () => {
    for (const index of [1, 2]) {
      const fake = nftHost(index);
      const seeded = fake.dump();
      const dp = await nftDatapathOn(fake);
      await dp.sync(nftPlanWith(index, await dp.read(), SCENARIOS["dual stack with ports"]!));
      const cleanup = await openDatapath({ runner: fake, backend: "nft" });
      await cleanup.cleanup("(cleanup)");
      assert.equal(fake.dump(), seeded, `node-${index}`);
    }
  });

  it("Datapath.cleanup() with the nftables filter leaves the host exactly as seeded", async () => {
    for (const index of [1, 2]) {
      const fake = nftHost(index);
      const seeded = fake.dump();
      const dp = await nftDatapathOn(fake);
      await dp.sync(nftPlanWith(index, await dp.read(), SCENARIOS["dual stack with ports"]!));
      await dp.cleanup(`node-${index}`);
      assert.equal(fake.dump(), seeded, `node-${index}`);
    }
  });

  it("a transaction nft refuses throws a DatapathError naming the step, with nft's message; the table is as before; the next full sync converges", async () => {
    const s = SCENARIOS["dual stack with ports"]!;
    const fake = nftHost(2);
    const dp = await nftDatapathOn(fake);
    await dp.sync(nftPlanWith(2, await dp.read(), s));
    // A pod more: elements to add, nothing to delete.
    const more = {
      ...s,
      pods: [...s.pods, pod("team-a", "web-3", "node-1", ["172.29.1.7", "fd00:172:29:1::7"], WEB)],
    };
    const plan = nftPlanWith(2, await dp.read(), more);
    // The kernel refuses the last command: every command before it must be undone too.
    const refusing: Runner = {
      run(argv: readonly string[], options?: RunOptions) {
        const stdin =
          argv[0] === "nft" && argv[1] === "-f"
            ? `${options?.stdin ?? ""}delete chain inet sallyport no-such-chain\n`
            : options?.stdin;
        return fake.run(argv, stdin === undefined ? {} : { stdin });
      },
    };
    const flaky = await nftDatapathOn(refusing);
    const before = nftSection(fake.dump(), "inet", "sallyport");
    await assert.rejects(flaky.sync(plan), (e: unknown) => {
      assert.ok(e instanceof DatapathError, String(e));
      assert.equal(e.step, "apply the nftables table");
      assert.match(
        e.message,
        /^Cannot apply the nftables table: Cannot run nft -f -: exit 1: \/dev\/stdin:\d+:29-41: Error: Could not process rule: No such file or directory \| delete chain inet sallyport no-such-chain \| {29}\^{13}$/,
      );
      assert.ok(e.input?.includes("add element"), "the error carries the transaction");
      return true;
    });
    assert.equal(nftSection(fake.dump(), "inet", "sallyport"), before, "all or nothing");
    fake.failNext(["nft", "-f", "-"], {
      code: 1,
      stderr: "Error: Could not process rule: Operation not permitted\n",
    });
    await assert.rejects(
      dp.sync(plan),
      (e) => e instanceof DatapathError && e.step === "apply the nftables table",
    );
    await dp.sync(plan, { partial: true });
    await assertHoldsNft(fake, dp, plan, "after a failure, even a partial sync is a full one");
  });

  it("syncs a policy with a long name", async () => {
    const s = SCENARIOS["one policy, explicit egress IP (seed 000/003)"]!;
    const long = {
      ...s,
      policies: s.policies.map((p) => ({
        ...p,
        metadata: { ...p.metadata, name: "a".repeat(110) },
      })),
    };
    const fake = nftHost(1);
    const dp = await nftDatapathOn(fake);
    const plan = nftPlanWith(1, await dp.read(), long);
    await dp.sync(plan);
    await assertHoldsNft(fake, dp, plan);
  });

  it("repairs a base chain of ours at another priority (drift, or an upgrade that moves it)", async () => {
    const s = SCENARIOS["dual stack with ports"]!;
    const fake = nftHost(1);
    const dp = await nftDatapathOn(fake);
    const plan = nftPlanWith(1, await dp.read(), s);
    await dp.sync(plan);
    await ok(
      fake,
      NFT,
      "delete chain inet sallyport postrouting\nadd chain inet sallyport postrouting { type nat hook postrouting priority 100; policy accept; }\n",
    );
    await dp.sync(plan);
    await assertHoldsNft(fake, dp, plan);
  });

  it("recreates a class map of ours whose definition changed while its chain still uses it (an upgrade)", async () => {
    const s = SCENARIOS["dual stack with ports"]!;
    const fake = nftHost(1);
    const dp = await nftDatapathOn(fake);
    const plan = nftPlanWith(1, await dp.read(), s);
    await dp.sync(plan);
    const { $CLASS: c } = await ourNames(fake);
    // As an older version without per-entry counters would have left it.
    await ok(
      fake,
      NFT,
      `flush chain inet sallyport ${c}\ndelete map inet sallyport ${c}\nadd map inet sallyport ${c} { type ipv4_addr . inet_proto . inet_service : verdict; flags interval; }\nadd rule inet sallyport ${c} ip daddr . meta l4proto . th dport vmap @${c} comment "older #x"\n`,
    );
    await dp.sync(plan);
    await assertHoldsNft(fake, dp, plan);
  });

  it("moves a host from iptables to nftables and back, leaving nothing of the other", async () => {
    const s = SCENARIOS["dual stack with ports"]!;
    for (const index of [1, 2]) {
      const fake = nftHost(index);
      const seeded = fake.dump();
      const ipt = datapathOn(fake);
      await ipt.sync(planWith(index, await ipt.read(), s));
      assert.match(fake.dump(), /SALLYPORT/);
      const nft = await nftDatapathOn(fake);
      const nftPlan = nftPlanWith(index, await nft.read(), s);
      await nft.sync(nftPlan);
      await assertHoldsNft(fake, nft, nftPlan, `node-${index} on nftables`);
      assert.doesNotMatch(
        fake.dump(),
        /SALLYPORT|ipset sallyport-/,
        "no iptables chain or ipset of ours",
      );
      assert.equal(foreign(fake.dump()), foreign(seeded));
      const back = datapathOn(fake);
      const backPlan = planWith(index, await back.read(), s);
      await back.sync(backPlan);
      await assertHolds(back, backPlan, `node-${index} back on iptables`);
      assert.doesNotMatch(fake.dump(), /inet sallyport/, "no table of ours");
      await back.cleanup(`node-${index}`);
      assert.equal(fake.dump(), seeded);
    }
  });
});

// ------------------------------------------------------------------------------------------------
// Random plans on nftables: the property tests above, with the nftables filter.

describe("Datapath on nftables between random plans (property)", () => {
  it("every sync succeeds, the fake holds each plan, foreign state never changes, cleanup restores the host", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(1, 2, 3),
        fc.array(
          fc.tuple(snapshotArb, fc.boolean(), fc.double({ min: 0, max: 0.999, noNaN: true })),
          { minLength: 1, maxLength: 4 },
        ),
        async (index, steps) => {
          const fake = nftHost(index);
          const seeded = fake.dump();
          const dp = await nftDatapathOn(fake);
          let plan: NodePlan | undefined;
          for (const [r, partial, random] of steps) {
            plan = nftPlanWith(index, await dp.read(), randomSnapshot(r), random, {
              snatPorts: r.snatPorts ? SNAT_PORTS : undefined,
            });
            await dp.sync(plan, { partial });
            await assertHoldsNft(fake, dp, plan);
            assert.equal(foreign(fake.dump()), foreign(seeded));
          }
          fake.calls.length = 0;
          assert.equal((await dp.sync(plan!)).changes, 0);
          assert.deepEqual(writes(fake), []);
          await dp.cleanup(`node-${index}`);
          assert.equal(fake.dump(), seeded);
        },
      ),
      { numRuns: 100 },
    );
  });

  it("partial syncs of keyed plans (NodePlanner) hold every plan while classes split, merge and change SNAT addresses, as a full sync confirms", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.record({
            policy: fc.integer({ min: 0, max: 3 }),
            pods: fc.integer({ min: 0, max: 4 }),
            remove: fc.boolean(),
            // Another SNAT address list: every class map's verdicts name their index.
            eips: fc.constantFrom(undefined, ["10.168.60.105"], ["10.168.60.100", "10.168.60.105"]),
          }),
          { minLength: 1, maxLength: 8 },
        ),
        async (steps) => {
          const fake = nftHost(2);
          const dp = await nftDatapathOn(fake);
          const s = SCENARIOS["dual stack with ports"]!;
          const outcome = computeCluster(s);
          const local = localFactsFrom(await dp.read(), {
            nodeAddresses: s.nodes.find((n) => n.name === "node-2")!.addresses,
            peers: outcome.peers,
            rulePref: RULE_PREF,
            random: () => 0.5,
          });
          const view = nodeViewFromOutcome(outcome, "node-2", {
            local,
            config: { datapath: "nftables" },
          });
          const planner = new NodePlanner("node-2", view.config);
          planner.setLocal(local);
          planner.setPeers(view.peers);
          planner.setIgnoreCIDRs(view.ignoreCIDRs);
          const base = view.policies[0]!;
          for (const [i, step] of steps.entries()) {
            const key = `${base.key}-${step.policy}`;
            if (step.remove) planner.deletePolicy(key);
            else
              planner.setPolicy({
                ...base,
                key,
                ...(step.eips === undefined ? {} : { snat: { ...base.snat, 4: step.eips } }),
                // Overlapping pods: sources share classes, which split and merge.
                endpoints: Array.from({ length: step.pods }, (_, k) => ({
                  pod: `team-a/p${2 * step.policy + k}`,
                  node: "node-1",
                  ips: [`172.29.1.${2 * step.policy + k + 2}`],
                })),
              });
            const plan = planner.plan();
            await dp.sync(plan, { partial: i > 0 });
            await assertHoldsNft(fake, dp, plan, `step ${i}`);
          }
          assert.equal((await dp.sync(planner.plan())).changes, 0, "a full sync finds nothing");
        },
      ),
      { numRuns: 40 },
    );
  });
});
