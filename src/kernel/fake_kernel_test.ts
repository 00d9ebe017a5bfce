/**
 * The fake kernel against the real tools, then `Datapath` on top of it: the datapath tests that
 * would otherwise need root and network namespaces.
 *
 * Every exit code and message asserted in the first half was observed with the real tools in a
 * throwaway network namespace (Linux 6.18, iptables 1.8.9 nf_tables, ipset 7.17, iproute2 6.1.0).
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
import type { Family } from "../lib/ip.ts";
import {
  parseFdb,
  parseLinks,
  parseNeighbors,
  parseRoutes,
  parseRules,
} from "../render/iproute.ts";
import { parseIpsetSave } from "../render/ipset.ts";
import { Datapath, DatapathError, type KernelState, stateOfPlan } from "./datapath.ts";
import { localFactsFrom } from "./facts.ts";
import { FakeKernel, isWriteCommand } from "./fake_kernel.ts";
import { Iptables } from "./iptables.ts";
import { openDatapath } from "./open.ts";
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
function planWith(index: number, state: KernelState, s: Snapshot, random = 0.5): NodePlan {
  const outcome = computeCluster(s);
  const self = s.nodes.find((n) => n.name === `node-${index}`)!;
  const local = localFactsFrom(state, {
    nodeAddresses: self.addresses,
    peers: outcome.peers,
    rulePref: RULE_PREF,
    random: () => random,
  });
  return planNode(nodeViewFromOutcome(outcome, `node-${index}`, { local }));
}

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

  it("says so, with a non-zero exit, for everything it does not model", async () => {
    const fake = new FakeKernel();
    for (const [argv, stdin] of [
      [IPT, "*nat\n:N - [0:0]\n-A N -j MASQUERADE\nCOMMIT\n"],
      [IPT, "*nat\n:N - [0:0]\n-A N -m addrtype --dst-type LOCAL -j ACCEPT\nCOMMIT\n"],
      [["iptables-nft-restore"], "*nat\nCOMMIT\n"],
      [["iptables-legacy-restore", "--noflush"], "*nat\nCOMMIT\n"],
      [["ipset", "restore"], "create x hash:ip,port\n"],
      [["ip", "-batch", "-"], "link add v0 type veth peer name v1\n"],
      [["nft", "list", "ruleset"], ""],
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
    fake.seed([
      "ip",
      "link",
      "add",
      "flannel.1",
      "type",
      "vxlan",
      "id",
      "7799",
      "dstport",
      "7799",
      "local",
      "192.168.0.11",
      "dev",
      "eth0",
      "nolearning",
    ]);
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
  /** An address from the pool, the pool's lowest free address, or the gateway node's own. */
  egress: fc.constantFrom("10.168.60.101", "10.168.60.102", "fd00:a::101", "pool", "nodeIP"),
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
        ...(p.egress === "pool" || p.egress === "nodeIP" ? {} : { egressIP: [p.egress] }),
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
            plan = planWith(index, await dp.read(), randomSnapshot(r), random);
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
                endpoints: Array.from({ length: step.pods }, (_, k) => ({
                  pod: `team-a/p${k}`,
                  node: "node-1",
                  ips: [`172.29.1.${10 * step.policy + k + 2}`],
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
