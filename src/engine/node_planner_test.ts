/**
 * The keyed node planner: after any sequence of updates (policies, peers, host facts, ignore
 * CIDRs, fencing) its plan equals the plan computed from scratch, and an update that changes
 * nothing this node carries returns the very same plan object.
 *
 * Address plan: node-N underlay 192.168.0.1N / fd00:192:168::1N, pod CIDR 172.29.N.0/24 and
 * fd00:172:29:N::/64, tunnel 100.127.0.N+1, egress IPs 10.168.60.10x / fd00:a::10x.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import type { Family } from "../lib/ip.ts";
import { NodePlanner, planNode } from "./node_plan.ts";
import type { NodePlan } from "./plan.ts";
import { localFacts } from "./testing.ts";
import {
  DEFAULT_NODE_CONFIG,
  type EndpointView,
  type LocalFacts,
  type NodeConfig,
  type PeerView,
  type PolicyView,
} from "./view.ts";

const NODES = ["node-1", "node-2", "node-3", "node-4"];

function peer(name: string, options: { underlay?: boolean; id?: number } = {}): PeerView {
  const n = Number(name.slice(5));
  const id = options.id ?? n;
  return {
    name,
    nodeID: id,
    mac: `02:53:50:00:00:${id.toString(16).padStart(2, "0")}`,
    tunnel: { 4: `100.127.0.${id + 1}`, 6: `fd5a:11::${(id + 1).toString(16)}` },
    underlay: options.underlay === false ? undefined : `192.168.0.1${n}`,
    podCIDRs: [`172.29.${n}.0/24`, `fd00:172:29:${n}::/64`],
  };
}

const arbEndpoint: fc.Arbitrary<EndpointView> = fc
  .record({
    node: fc.constantFrom(...NODES),
    pod: fc.integer({ min: 1, max: 6 }),
    outside: fc.boolean(),
    v6: fc.boolean(),
  })
  .map(({ node, pod, outside, v6 }) => {
    const n = Number(node.slice(5));
    const v4 = outside ? `10.99.${n}.${pod}` : `172.29.${n}.${pod}`;
    return {
      pod: `ns/${node}-p${pod}`,
      node,
      ips: v6 ? [v4, `fd00:172:29:${n}::${pod}`] : [v4],
    };
  });

const arbPolicy: fc.Arbitrary<PolicyView> = fc
  .record({
    name: fc.constantFrom("a", "b", "c", "d", "e"),
    priority: fc.integer({ min: 0, max: 2 }),
    created: fc.integer({ min: 1, max: 3 }),
    destinations: fc.subarray(["203.0.113.0/24", "10.6.105.150/32", "2001:db8::/64"]),
    excluded: fc.subarray(["203.0.113.7/32"]),
    ports: fc.constantFrom([], [{ protocol: "TCP" as const, port: 443 }]),
    gatewayNode: fc.option(fc.constantFrom(...NODES), { nil: undefined }),
    eip: fc.integer({ min: 0, max: 3 }),
    // Several egress IPs of a family: 1-3 consecutive addresses.
    count: fc.integer({ min: 1, max: 3 }),
    v6: fc.boolean(),
    floats: fc.boolean(),
    endpoints: fc.array(arbEndpoint, { maxLength: 6 }),
    standbyNodes: fc.option(fc.subarray(NODES), { nil: undefined }),
    gatewayNodes: fc.option(fc.subarray(NODES), { nil: undefined }),
    tunnelClass: fc.option(fc.integer({ min: 1, max: 3 }), { nil: undefined }),
  })
  .map((r) => {
    const n = Array.from({ length: r.count }, (_, i) => r.eip + i);
    const snat: Partial<Record<Family, readonly string[]>> = {
      4: n.map((i) => `10.168.60.10${i}`),
    };
    if (r.v6) snat[6] = n.map((i) => `fd00:a::10${i}`);
    const unique = new Map(r.endpoints.map((e) => [e.pod, e]));
    return {
      key: `EgressPolicy/ns/${r.name}`,
      priority: r.priority,
      createdAt: `2026-01-0${r.created}T00:00:00Z`,
      destinationCIDRs: r.destinations,
      excludedCIDRs: r.excluded,
      ports: r.ports,
      gatewayNode: r.gatewayNode,
      snat,
      floating: r.floats ? Object.values(snat).flat().sort() : [],
      announceInterface: undefined,
      endpoints: [...unique.values()].sort((a, b) => (a.pod < b.pod ? -1 : 1)),
      standbyNodes: r.standbyNodes?.filter((n) => n !== r.gatewayNode),
      gatewayNodes: r.gatewayNodes,
      tunnelClass: r.tunnelClass,
    };
  });

type Op =
  | { readonly op: "policy"; readonly view: PolicyView }
  | { readonly op: "delete"; readonly name: string }
  | { readonly op: "peer"; readonly name: string; readonly underlay: boolean; readonly id: number }
  | { readonly op: "dropPeer"; readonly name: string }
  | { readonly op: "local"; readonly used: number[]; readonly device: string }
  | { readonly op: "ignore"; readonly cidrs: string[] }
  | { readonly op: "hold"; readonly hold: boolean }
  | { readonly op: "withhold"; readonly addresses: string[] };

const arbOp: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: arbPolicy.map((view) => ({ op: "policy" as const, view })) },
  {
    weight: 1,
    arbitrary: fc
      .constantFrom("a", "b", "c", "d", "e")
      .map((name) => ({ op: "delete" as const, name })),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      op: fc.constant("peer" as const),
      name: fc.constantFrom(...NODES),
      underlay: fc.boolean(),
      id: fc.integer({ min: 1, max: 6 }),
    }),
  },
  {
    weight: 1,
    arbitrary: fc
      .constantFrom(...NODES.slice(1))
      .map((name) => ({ op: "dropPeer" as const, name })),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      op: fc.constant("local" as const),
      used: fc.subarray([3000, 3001, 3002]),
      device: fc.constantFrom("eth0", "ens3"),
    }),
  },
  {
    weight: 1,
    arbitrary: fc
      .subarray(["172.29.0.0/16", "10.96.0.0/16", "fd00:172:29::/48"])
      .map((cidrs) => ({ op: "ignore" as const, cidrs })),
  },
  { weight: 1, arbitrary: fc.boolean().map((hold) => ({ op: "hold" as const, hold })) },
  {
    weight: 1,
    arbitrary: fc
      .subarray(["10.168.60.100", "10.168.60.101", "fd00:a::101"])
      .map((addresses) => ({ op: "withhold" as const, addresses })),
  },
);

const CONFIG: NodeConfig = {
  ...DEFAULT_NODE_CONFIG,
  tableRange: { start: 3000, count: 4 },
};

/** What the node is given, kept by the test to plan from scratch. */
class World {
  peers = new Map(NODES.map((n) => [n, peer(n)]));
  policies = new Map<string, PolicyView>();
  local: LocalFacts = localFacts({ ipv4: "192.168.0.11", ipv6: "fd00:192:168::11" });
  ignore: string[] = [];
  hold = true;
  withheld = new Set<string>();

  apply(op: Op, planner: NodePlanner): void {
    switch (op.op) {
      case "policy":
        this.policies.set(op.view.key, op.view);
        planner.setPolicy(op.view);
        return;
      case "delete":
        this.policies.delete(`EgressPolicy/ns/${op.name}`);
        planner.deletePolicy(`EgressPolicy/ns/${op.name}`);
        return;
      case "peer":
        this.peers = new Map(this.peers).set(
          op.name,
          peer(op.name, { underlay: op.underlay, id: op.name === "node-1" ? 1 : op.id + 10 }),
        );
        planner.setPeers(this.peers);
        return;
      case "dropPeer":
        this.peers = new Map(this.peers);
        this.peers.delete(op.name);
        planner.setPeers(this.peers);
        return;
      case "local":
        this.local = {
          ...localFacts({ ipv4: "192.168.0.11", ipv6: "fd00:192:168::11", device: op.device }),
          usedTables: new Set(op.used),
        };
        planner.setLocal(this.local);
        return;
      case "ignore":
        this.ignore = op.cidrs;
        planner.setIgnoreCIDRs(op.cidrs);
        return;
      case "hold":
        this.hold = op.hold;
        planner.setHoldEgressIPs(op.hold);
        return;
      case "withhold":
        this.withheld = new Set(op.addresses);
        planner.setWithheldEgressIPs(this.withheld);
        return;
    }
  }

  /** From scratch, keeping the routing tables the incremental planner chose (they are sticky). */
  readonly config: NodeConfig;
  constructor(config: NodeConfig = CONFIG) {
    this.config = config;
  }

  fromScratch(tables: ReadonlyMap<string, number>): NodePlan {
    const planner = new NodePlanner("node-1", this.config);
    planner.setLocal({ ...this.local, existingTables: tables });
    planner.setPeers(this.peers);
    for (const p of this.policies.values()) planner.setPolicy(p);
    planner.setIgnoreCIDRs(this.ignore);
    planner.setHoldEgressIPs(this.hold);
    planner.setWithheldEgressIPs(this.withheld);
    return planner.plan();
  }
}

function comparable(plan: NodePlan): unknown {
  return JSON.parse(
    JSON.stringify(plan, (_k, v: unknown) => (v instanceof Map ? [...v.entries()].sort() : v)),
  );
}

describe("NodePlanner", () => {
  for (const [datapath, snatPorts] of [
    ["iptables", undefined],
    ["nftables", undefined],
    ["iptables", { first: 5000, last: 5009 }],
    ["nftables", { first: 5000, last: 5009 }],
  ] as const)
    it(`plans incrementally exactly what it plans from scratch, after any sequence of updates (${datapath}${snatPorts === undefined ? "" : ", --snat-ports"})`, () => {
      const config = { ...CONFIG, datapath, snatPorts };
      fc.assert(
        fc.property(fc.array(arbOp, { minLength: 1, maxLength: 25 }), (ops) => {
          const world = new World(config);
          const planner = new NodePlanner("node-1", config);
          planner.setLocal(world.local);
          planner.setPeers(world.peers);
          for (const op of ops) {
            world.apply(op, planner);
            const plan = planner.plan();
            assert.deepEqual(comparable(plan), comparable(world.fromScratch(plan.tables)));
          }
        }),
        { numRuns: 500 },
      );
    });

  it("returns the same plan object when an update changes nothing this node carries", () => {
    const world = new World();
    const planner = new NodePlanner("node-1", CONFIG);
    planner.setLocal(world.local);
    planner.setPeers(world.peers);
    const mine: PolicyView = {
      key: "EgressPolicy/ns/mine",
      priority: 0,
      createdAt: "2026-01-01T00:00:00Z",
      destinationCIDRs: ["203.0.113.0/24"],
      excludedCIDRs: [],
      ports: [],
      gatewayNode: "node-2",
      snat: { 4: ["10.168.60.100"] },
      floating: ["10.168.60.100"],
      endpoints: [{ pod: "ns/web", node: "node-1", ips: ["172.29.1.5"] }],
    };
    planner.setPolicy(mine);
    const before = planner.plan();
    // Another policy whose pods live elsewhere and whose egress IP another node holds.
    planner.setPolicy({
      ...mine,
      key: "EgressPolicy/ns/theirs",
      gatewayNode: "node-3",
      endpoints: [{ pod: "ns/db", node: "node-4", ips: ["172.29.4.5"] }],
    });
    assert.equal(planner.plan(), before, "a policy this node carries nothing of");
    planner.setPeers(new Map(world.peers).set("node-4", peer("node-4", { id: 9 })));
    assert.equal(planner.plan(), before, "a peer no policy here reads");
    planner.setPolicy({ ...mine, endpoints: [...mine.endpoints] });
    assert.equal(planner.plan(), before, "the same view content in a new object");
  });

  for (const datapath of ["iptables", "nftables"] as const)
    it(`keeps the tunnel's peer set per family as peers come and go, and nothing else (${datapath})`, () => {
      const config: NodeConfig = { ...CONFIG, datapath };
      const planner = new NodePlanner("node-2", config);
      planner.setLocal(localFacts({ ipv4: "192.168.0.12" }));
      let peers = new Map(NODES.map((n) => [n, peer(n)]));
      planner.setPeers(peers);
      const peersOf = (plan: NodePlan, family: Family) =>
        datapath === "iptables"
          ? plan.ipsets.find((s) => s.name === `sallyport-peers${family}`)?.members
          : plan.nft?.tunnelPeers?.peers[family]?.map((a) => `${a}/${family === 4 ? 32 : 128}`);
      const before = planner.plan();
      assert.deepEqual(
        peersOf(before, 4),
        ["192.168.0.11/32", "192.168.0.13/32", "192.168.0.14/32"],
        "every other node's underlay address, not its own",
      );
      assert.deepEqual(peersOf(before, 6), []);
      peers = new Map(peers).set("node-5", peer("node-5"));
      planner.setPeers(peers);
      const joined = planner.plan();
      assert.deepEqual(peersOf(joined, 4), [
        "192.168.0.11/32",
        "192.168.0.13/32",
        "192.168.0.14/32",
        "192.168.0.15/32",
      ]);
      assert.equal(joined.rules, before.rules, "no rule changes: the rule names the set");
      if (datapath === "iptables") {
        const changed = joined.ipsets.filter((s, i) => s !== before.ipsets[i]).map((s) => s.name);
        assert.deepEqual(changed, ["sallyport-peers4"]);
      } else assert.equal(joined.nft?.classes[4], before.nft?.classes[4]);
      peers = new Map(peers);
      peers.delete("node-1");
      planner.setPeers(peers);
      assert.deepEqual(
        peersOf(planner.plan(), 4),
        ["192.168.0.13/32", "192.168.0.14/32", "192.168.0.15/32"],
        "a node that leaves the cluster is refused",
      );
      // A peer whose identity changes but not its underlay address changes nothing here.
      const now = planner.plan();
      planner.setPeers(new Map(peers).set("node-4", peer("node-4", { id: 9 })));
      const same = planner.plan();
      if (datapath === "iptables")
        assert.equal(
          same.ipsets.find((s) => s.name === "sallyport-peers4"),
          now.ipsets.find((s) => s.name === "sallyport-peers4"),
        );
      else assert.equal(same.nft?.tunnelPeers, now.nft?.tunnelPeers);
    });

  it("keeps unchanged sets and chains by identity when one pod is added", () => {
    const world = new World();
    const planner = new NodePlanner("node-2", CONFIG);
    planner.setLocal(localFacts({ ipv4: "192.168.0.12" }));
    planner.setPeers(world.peers);
    const views = ["a", "b", "c"].map(
      (name, i): PolicyView => ({
        key: `EgressPolicy/ns/${name}`,
        priority: 0,
        createdAt: "2026-01-01T00:00:00Z",
        destinationCIDRs: ["203.0.113.0/24"],
        excludedCIDRs: [],
        ports: [],
        gatewayNode: "node-2",
        snat: { 4: [`10.168.60.10${i}`] },
        floating: [`10.168.60.10${i}`],
        endpoints: [{ pod: `ns/${name}-1`, node: "node-1", ips: [`172.29.1.${i + 1}`] }],
      }),
    );
    for (const v of views) planner.setPolicy(v);
    const before = planner.plan();
    planner.setPolicy({
      ...views[1]!,
      endpoints: [...views[1]!.endpoints, { pod: "ns/b-2", node: "node-1", ips: ["172.29.1.9"] }],
    });
    const after = planner.plan();
    assert.notEqual(after, before);
    assert.equal(after.rules, before.rules, "no chain is rebuilt for a new set member");
    assert.equal(after.routes, before.routes, "the pod's node already had its reply route");
    const changed = after.ipsets.filter((s, i) => s !== before.ipsets[i]).map((s) => s.name);
    assert.equal(changed.length, 1, `only the policy's source set changes: ${changed}`);
    assert.deepEqual(
      planNode({
        node: "node-2",
        peers: world.peers,
        policies: [
          views[0]!,
          {
            ...views[1]!,
            endpoints: [
              ...views[1]!.endpoints,
              { pod: "ns/b-2", node: "node-1", ips: ["172.29.1.9"] },
            ],
          },
          views[2]!,
        ],
        ignoreCIDRs: [],
        config: CONFIG,
        local: localFacts({ ipv4: "192.168.0.12" }),
      }).ipsets.map((s) => s.members),
      after.ipsets.map((s) => s.members),
    );
  });
});
