/**
 * The traffic collector: counters that stay monotonic while the datapath rewrites its chains,
 * saturation reported with hysteresis (and so never per measurement), and the metrics it feeds.
 * The kernel side is the inline reader on the real outputs of src/kernel/testdata/traffic/; the
 * nftables class maps' elements are named by the plan they were rendered from (nft-plan.json).
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import type { NftPlan, NodePlan } from "../engine/plan.ts";
import type { SnatEgress } from "../kernel/conntrack.ts";
import { type NftElement, parseNftClassCounters, type RuleCounter } from "../kernel/counters.ts";
import type { Datapath, SyncReport } from "../kernel/datapath.ts";
import type { Runner } from "../kernel/runner.ts";
import { FakeClock } from "../lib/clock.ts";
import { silentLogger } from "../lib/log.ts";
import { Registry, trafficMetrics } from "../lib/metrics.ts";
import {
  InlineTrafficReader,
  nftPolicyOf,
  type SnatSaturation,
  syncedPlanOf,
  TrafficCollector,
  type TrafficReader,
  type TrafficReading,
} from "./traffic.ts";

const TESTDATA = join(import.meta.dirname, "..", "kernel", "testdata", "traffic");
const fixture = (name: string) => readFileSync(join(TESTDATA, name), "utf8");

/** A reader that answers what the test scripts, and counts how often it was asked. */
class ScriptedReader implements TrafficReader {
  counters: RuleCounter[] = [];
  egress: SnatEgress[] | undefined = [];
  snatError: string | undefined;
  reads = { counters: 0, conntrack: 0 };

  async read(options: { conntrack: boolean }): Promise<TrafficReading> {
    this.reads[options.conntrack ? "conntrack" : "counters"]++;
    const base = { counters: this.counters.map((c) => ({ ...c })), countersMs: 1 };
    if (!options.conntrack) return base;
    if (this.snatError !== undefined) return { ...base, snatError: this.snatError };
    if (this.egress === undefined) return base;
    return { ...base, snat: { egress: this.egress, entries: 7, ms: 2 } };
  }

  close(): void {}
}

const steered = (packets: number, id = "rule-1"): RuleCounter => ({
  id,
  policy: "EgressPolicy/team-a/billing",
  family: 4,
  kind: "steered",
  packets,
  bytes: packets * 100,
});

/** One egress IP with one destination at `saturation` of 1,000 ports. */
function egressAt(saturation: number, destination = "198.51.100.7"): SnatEgress[] {
  const ports = Math.round(saturation * 1000);
  return [
    {
      egressIP: "192.0.2.1",
      portRange: { first: 1024, last: 2023 },
      connections: ports,
      destinations: 1,
      top: [
        {
          egressIP: "192.0.2.1",
          destination,
          port: 443,
          protocol: "tcp",
          connections: ports,
          ports,
          saturation,
        },
      ],
    },
  ];
}

function collector(
  reader: TrafficReader,
  extra: Partial<ConstructorParameters<typeof TrafficCollector>[0]> = {},
) {
  const clock = new FakeClock();
  const reports: (readonly SnatSaturation[])[] = [];
  const c = new TrafficCollector({
    reader,
    clock,
    log: silentLogger,
    egressIPOf: (policy, family) =>
      policy === "EgressPolicy/team-a/billing" && family === 4 ? "192.0.2.1" : undefined,
    onSaturation: (list) => reports.push(list),
    ...extra,
  });
  return { c, clock, reports };
}

describe("TrafficCollector counters", () => {
  it("stay monotonic when the datapath rewrites a chain (its counters restart from zero)", async () => {
    const reader = new ScriptedReader();
    const { c, clock } = collector(reader);
    const packets = async () => {
      await clock.advance(2000);
      return (await c.policyTraffic()).map(
        (t) => `${t.policy} ${t.egressIP} ${t.kind} ${t.packets}`,
      );
    };
    reader.counters = [steered(100)];
    assert.deepEqual(await packets(), ["EgressPolicy/team-a/billing 192.0.2.1 steered 100"]);
    reader.counters = [steered(5)]; // the chain was rewritten, then 5 more packets
    assert.deepEqual(await packets(), ["EgressPolicy/team-a/billing 192.0.2.1 steered 105"]);
    reader.counters = [steered(8)];
    assert.deepEqual(await packets(), ["EgressPolicy/team-a/billing 192.0.2.1 steered 108"]);
    // The rule replaced by another (its ports changed): what the old one counted stays.
    reader.counters = [steered(2, "rule-2")];
    assert.deepEqual(await packets(), ["EgressPolicy/team-a/billing 192.0.2.1 steered 110"]);
    // The policy left this node: its series ends.
    reader.counters = [];
    assert.deepEqual(await packets(), []);
  });

  it("counts a rule as steered only for what it steered, across its group moving here and away", async () => {
    const reader = new ScriptedReader();
    const { c, clock } = collector(reader);
    const packets = async () => {
      await clock.advance(2000);
      return (await c.policyTraffic()).map((t) => `${t.kind} ${t.packets}`);
    };
    reader.counters = [steered(100)];
    assert.deepEqual(await packets(), ["steered 100"]);
    // This node took the egress IPs over: the same rule now goes to SNAT here (counted by the
    // nat rules); nothing is steered, the series ends.
    reader.counters = [{ ...steered(150), kind: "held" }];
    assert.deepEqual(await packets(), []);
    // They moved away again: a new series, counting only what the rule steers from now on (not
    // the 50 packets of this node's own SNAT).
    reader.counters = [steered(160)];
    assert.deepEqual(await packets(), ["steered 0"]);
    reader.counters = [steered(170)];
    assert.deepEqual(await packets(), ["steered 10"]);
  });

  it("adds up a policy's rules (one per protocol) and names the egress IP of each", async () => {
    const reader = new ScriptedReader();
    reader.counters = [
      steered(10, "a"),
      steered(20, "b"),
      {
        id: "c",
        policy: "EgressPolicy/default/web",
        family: 6,
        kind: "snat_new",
        packets: 3,
        bytes: 180,
        egressIP: "2001:db8::1",
      },
      {
        id: "d",
        policy: "ClusterEgressPolicy/x",
        family: 6,
        kind: "dropped",
        packets: 4,
        bytes: 240,
      },
    ];
    const { c } = collector(reader);
    assert.deepEqual(await c.policyTraffic(), [
      {
        policy: "EgressPolicy/team-a/billing",
        egressIP: "192.0.2.1",
        kind: "steered",
        packets: 30,
        bytes: 3000,
      },
      {
        policy: "EgressPolicy/default/web",
        egressIP: "2001:db8::1",
        kind: "connections",
        packets: 3,
        bytes: 180,
      },
      { policy: "ClusterEgressPolicy/x", egressIP: "", kind: "dropped", packets: 4, bytes: 240 },
    ]);
  });

  it("read the kernel at most once per countersMaxAgeMs, however many scrapes", async () => {
    const reader = new ScriptedReader();
    reader.counters = [steered(1)];
    const { c, clock } = collector(reader, { countersMaxAgeMs: 1000 });
    await Promise.all([c.policyTraffic(), c.policyTraffic(), c.policyTraffic()]);
    await clock.advance(500);
    await c.policyTraffic();
    assert.equal(reader.reads.counters, 1);
    await clock.advance(600);
    await c.policyTraffic();
    assert.equal(reader.reads.counters, 2);
  });

  it("answer a scrape from the last read when a fresh one takes longer than countersWaitMs", async () => {
    const reader = new ScriptedReader();
    reader.counters = [steered(1)];
    const { c, clock } = collector(reader, { countersMaxAgeMs: 1000, countersWaitMs: 2000 });
    const packets = async () => (await c.policyTraffic()).map((t) => t.packets);
    assert.deepEqual(await packets(), [1]);
    // The next read hangs until released.
    let release = () => {};
    const slow = reader.read.bind(reader);
    reader.read = (o) =>
      new Promise((resolve) => {
        release = () => resolve(slow(o));
      });
    reader.counters = [steered(5)];
    await clock.advance(1500);
    const scrape = packets();
    await clock.advance(1999);
    let answered: number[] | undefined;
    void scrape.then((p) => (answered = p));
    await clock.advance(0);
    assert.equal(answered, undefined, "still waiting for the read within countersWaitMs");
    await clock.advance(1);
    assert.deepEqual(answered, [1], "answered from the last read");
    release();
    await clock.advance(0);
    assert.deepEqual(await packets(), [5], "the slow read serves the next scrape");
    assert.equal(reader.reads.counters, 2);
  });
});

describe("TrafficCollector saturation", () => {
  it("enters at 80 %, stays down to 70 %, and reports only when the list changes", async () => {
    const reader = new ScriptedReader();
    const { c, reports } = collector(reader);
    const at = async (s: number) => {
      reader.egress = egressAt(s);
      await c.collect();
    };
    await at(0.5);
    await at(0.79);
    assert.equal(reports.length, 0);
    await at(0.83);
    assert.deepEqual(reports, [
      [
        {
          egressIP: "192.0.2.1",
          destination: "198.51.100.7",
          port: 443,
          protocol: "tcp",
          percent: 83,
        },
      ],
    ]);
    // Moving about above the lower threshold changes nothing (the percentage it entered with stays).
    for (const s of [0.95, 0.75, 0.7, 0.99]) await at(s);
    assert.equal(reports.length, 1);
    assert.equal(c.saturated[0]?.percent, 83);
    await at(0.69);
    assert.deepEqual(reports.at(-1), []);
    assert.equal(reports.length, 2);
  });

  it("clears when the node no longer SNATs to the egress IP, and keeps state when conntrack fails", async () => {
    const reader = new ScriptedReader();
    const errors: string[] = [];
    const { c, reports } = collector(reader, {
      metrics: {
        readDuration: { observe: () => {} },
        readErrors: { inc: (l) => errors.push(l.source) },
      },
    });
    reader.egress = egressAt(0.9);
    await c.collect();
    reader.snatError = "Cannot list SNATed connections …";
    await c.collect();
    assert.equal(c.saturated.length, 1);
    assert.deepEqual(errors, ["conntrack"]);
    reader.snatError = undefined;
    reader.egress = undefined; // no SNAT rule here any more: the egress IP moved away
    await c.collect();
    assert.deepEqual(reports.at(-1), []);
    assert.deepEqual(c.snatEgress, []);
  });

  it("reports at most 16 destinations, the most saturated first", async () => {
    const reader = new ScriptedReader();
    const { c, reports } = collector(reader);
    reader.egress = [
      {
        ...egressAt(0.9)[0]!,
        top: Array.from({ length: 20 }, (_, i) => ({
          ...egressAt(0.8 + i / 100)[0]!.top[0]!,
          destination: `198.51.100.${i}`,
        })),
      },
    ];
    await c.collect();
    assert.equal(reports[0]!.length, 16);
    assert.equal(reports[0]![0]!.destination, "198.51.100.19");
  });
});

describe("trafficMetrics()", () => {
  it("exposes the collector's figures with Prometheus names and bounded labels", async () => {
    const reader = new ScriptedReader();
    reader.counters = [
      steered(10),
      {
        id: "s",
        policy: "EgressPolicy/default/web",
        family: 4,
        kind: "snat_new",
        packets: 3,
        bytes: 180,
        egressIP: "192.0.2.1",
      },
    ];
    reader.egress = egressAt(0.5).map((e) => ({
      ...e,
      other: { ...e.top[0]!, destination: "other", port: 0, protocol: "", saturation: 0.1 },
    }));
    const registry = new Registry();
    let source: TrafficCollector | undefined;
    const metrics = trafficMetrics(registry, () => source);
    source = collector(reader, { metrics }).c;
    await source.collect();
    const text = await registry.metrics();
    for (const line of [
      'sallyport_policy_packets_total{policy="EgressPolicy/team-a/billing",egress_ip="192.0.2.1",direction="steered"} 10',
      'sallyport_policy_bytes_total{policy="EgressPolicy/team-a/billing",egress_ip="192.0.2.1",direction="steered"} 1000',
      'sallyport_policy_snat_connections_total{policy="EgressPolicy/default/web",egress_ip="192.0.2.1"} 3',
      'sallyport_snat_connections{egress_ip="192.0.2.1",destination="198.51.100.7",port="443",protocol="tcp"} 500',
      'sallyport_snat_ports_in_use{egress_ip="192.0.2.1",destination="198.51.100.7",port="443",protocol="tcp"} 500',
      'sallyport_snat_port_saturation{egress_ip="192.0.2.1",destination="198.51.100.7",port="443",protocol="tcp"} 0.5',
      'sallyport_snat_port_saturation{egress_ip="192.0.2.1",destination="other",port="",protocol=""} 0.1',
      "sallyport_conntrack_snat_entries 7",
      'sallyport_traffic_read_duration_seconds_count{source="conntrack"} 1',
    ])
      assert.ok(text.includes(line), `${line}\nin\n${text}`);
    assert.doesNotMatch(text, /direction="connections"/);
  });
});

describe("InlineTrafficReader", () => {
  const saves: Record<string, string> = {
    iptables: fixture("iptables-save-c.txt"),
    ip6tables: fixture("ip6tables-save-c.txt"),
  };
  /** The host of the fixtures: each tool prints what it printed there. */
  const host = (options: { snat: boolean }): Runner & { calls: string[] } => {
    const calls: string[] = [];
    return {
      calls,
      run: async (argv) => {
        calls.push(argv.join(" "));
        if (argv[0] === "conntrack")
          return { code: 0, stdout: fixture("conntrack-extended.txt"), stderr: "" };
        const save = saves[argv[0]!.replace(/-nft-save$/, "")]!;
        const start = save.indexOf(`*${argv.at(-1)}\n`);
        let text = save.slice(start, save.indexOf("COMMIT\n", start) + 7);
        if (!options.snat) text = text.replace(/^.*-j SNAT.*$/gm, "");
        return { code: 0, stdout: text, stderr: "" };
      },
    };
  };
  const config = { counters: { kind: "iptables", backend: "nft", families: [4, 6] } } as const;

  it("reads conntrack for the egress IPs its SNAT rules name, with their port range", async () => {
    const runner = host({ snat: true });
    const reading = await new InlineTrafficReader(runner, config).read({ conntrack: true });
    assert.ok(runner.calls.includes("conntrack -L -o extended -n"));
    assert.equal(reading.snat?.entries, 12);
    assert.deepEqual(
      reading.snat?.egress.map((e) => [e.egressIP, e.connections, e.portRange.first]),
      [
        ["10.2.0.100", 5, 1024],
        ["fd02::100", 3, 1024],
      ],
    );
  });

  it("does not read conntrack on a node that SNATs nothing, nor for a scrape", async () => {
    for (const [snat, conntrack] of [
      [false, true],
      [true, false],
    ] as const) {
      const runner = host({ snat });
      const reading = await new InlineTrafficReader(runner, config).read({ conntrack });
      assert.equal(reading.snat, undefined);
      assert.ok(!runner.calls.some((c) => c.startsWith("conntrack")));
      assert.ok(reading.counters.length > 0);
    }
  });
});

// ------------------------------------------------------------------------------------------------
// nftables: class map elements, named by the plan the kernel holds

/** The plan the fixtures' table was rendered from (only `nft` is read). */
const NFT_PLAN = {
  nft: JSON.parse(fixture("nft-plan.json")) as NftPlan,
} as Partial<NodePlan> as NodePlan;
const NFT_OUTPUT = fixture("nft-j-i-list-map.jsonl");
const WEB = "EgressPolicy/default/web";
const BILLING = "EgressPolicy/team-a/billing";

describe("nftPolicyOf()", () => {
  it("names the policy of every element of the kernel's class maps, from the plan they came from", () => {
    const policyOf = nftPolicyOf(() => NFT_PLAN);
    const counters = parseNftClassCounters(NFT_OUTPUT, [4, 6]);
    const named = counters.map((c) => policyOf(c.element!));
    assert.ok(named.every((p) => p !== undefined));
    assert.deepEqual(
      counters
        .map((c, i) => `${named[i]} v${c.family} ${c.kind} ${c.packets}:${c.bytes}`)
        .filter((l) => !l.endsWith(" 0:0"))
        .sort(),
      [
        "ClusterEgressPolicy/no-gateway v4 dropped 2:156",
        `${WEB} v4 snat_new 1:38`,
        `${WEB} v4 snat_new 4:240`,
        `${WEB} v6 snat_new 1:58`,
        `${WEB} v6 snat_new 2:160`,
        `${BILLING} v4 steered 12:644`,
        `${BILLING} v6 steered 6:442`,
      ],
    );
  });

  it("names nothing the plan does not hold with that verdict", () => {
    let plan: NodePlan | undefined;
    const policyOf = nftPolicyOf(() => plan);
    const steered: NftElement = {
      map: "c4-dgfl7d7mxidl",
      key: "10.2.0.3 . 6 . 8080",
      verdict: "goto to-0001",
    };
    assert.equal(policyOf(steered), undefined); // nothing synced yet
    plan = NFT_PLAN;
    assert.equal(policyOf(steered), BILLING);
    assert.equal(policyOf({ ...steered, verdict: "goto to-0002" }), undefined);
    assert.equal(policyOf({ ...steered, map: "c4-other" }), undefined);
    assert.equal(policyOf({ ...steered, key: "10.2.0.9 . 6 . 8080" }), undefined);
    // SNAT verdicts name the egress IP's index in the plan's list.
    const snat: NftElement = {
      map: "c4-dgfl7d7mxidl",
      key: "10.2.0.2 . 6 . 9090",
      verdict: "goto snat4-1",
    };
    assert.equal(policyOf(snat), "EgressPolicy/default/narrow");
    const nft = NFT_PLAN.nft!;
    plan = {
      nft: { ...nft, snat: { ...nft.snat, 4: [nft.snat[4]![1]!] } },
    } as Partial<NodePlan> as NodePlan;
    assert.equal(policyOf(snat), undefined);
    assert.equal(policyOf({ ...snat, verdict: "goto snat4-0" }), "EgressPolicy/default/narrow");
  });
});

describe("TrafficCollector with nftables elements", () => {
  const element = (key: string, packets: number, verdict = "goto to-0001"): RuleCounter => ({
    id: `nft c4-x ${key} : ${verdict}`,
    policy: "",
    family: 4,
    kind: "steered",
    packets,
    bytes: packets * 100,
    element: { map: "c4-x", key, verdict },
  });

  it("names elements by the plan; waits for one the plan does not name yet", async () => {
    const reader = new ScriptedReader();
    const policies = new Map<string, string>();
    const { c, clock } = collector(reader, { policyOf: (e) => policies.get(e.key) });
    const figures = async () => {
      await clock.advance(2000);
      return (await c.policyTraffic()).map((t) => `${t.policy} ${t.kind} ${t.packets}`);
    };
    policies.set("a", BILLING);
    reader.counters = [element("a", 10), element("b", 3)];
    // b is in the kernel, not yet in the plan synced (the sync that wrote it has not returned)
    assert.deepEqual(await figures(), [`${BILLING} steered 10`]);
    policies.set("b", BILLING);
    reader.counters = [element("a", 10), element("b", 4)];
    assert.deepEqual(await figures(), [`${BILLING} steered 14`]);
  });

  it("keeps an element's policy while the kernel holds it, and stays monotonic across rewrites", async () => {
    const reader = new ScriptedReader();
    const policies = new Map([
      ["a", BILLING],
      ["b", BILLING],
    ]);
    const { c, clock } = collector(reader, { policyOf: (e) => policies.get(e.key) });
    const figures = async () => {
      await clock.advance(2000);
      return (await c.policyTraffic()).map((t) => `${t.policy} ${t.kind} ${t.packets}`);
    };
    reader.counters = [element("a", 10), element("b", 5)];
    assert.deepEqual(await figures(), [`${BILLING} steered 15`]);
    // The plan moved on (a is gone from it) before the kernel did: a still counts for billing.
    policies.delete("a");
    reader.counters = [element("a", 12), element("b", 5)];
    assert.deepEqual(await figures(), [`${BILLING} steered 17`]);
    // a deleted from the kernel; b deleted and added again (its counter restarts).
    reader.counters = [element("b", 1)];
    assert.deepEqual(await figures(), [`${BILLING} steered 18`]);
    // b's verdict changed (another gateway): another element, from zero.
    policies.set("b", BILLING);
    reader.counters = [element("b", 2, "goto to-0002")];
    assert.deepEqual(await figures(), [`${BILLING} steered 20`]);
  });

  it("counts an element for the policy that decides it now only from then on", async () => {
    const reader = new ScriptedReader();
    const policies = new Map([
      ["a", BILLING],
      ["b", WEB],
    ]);
    const { c, clock } = collector(reader, { policyOf: (e) => policies.get(e.key) });
    const figures = async () => {
      await clock.advance(2000);
      return (await c.policyTraffic()).map((t) => `${t.policy} ${t.packets}`);
    };
    reader.counters = [element("a", 10), element("b", 7)];
    assert.deepEqual(await figures(), [`${BILLING} 10`, `${WEB} 7`]);
    // web now decides a too, with the same verdict: the element is not rewritten.
    policies.set("a", WEB);
    reader.counters = [element("a", 11), element("b", 7)];
    assert.deepEqual(await figures(), [`${WEB} 7`]);
    reader.counters = [element("a", 15), element("b", 8)];
    assert.deepEqual(await figures(), [`${WEB} 12`]);
  });
});

describe("InlineTrafficReader on nftables", () => {
  const host = (): Runner & { calls: string[] } => {
    const calls: string[] = [];
    return {
      calls,
      run: async (argv) => {
        calls.push(argv.join(" "));
        const line = argv.join(" ");
        const stdout =
          argv[0] === "conntrack"
            ? fixture("conntrack-extended.txt")
            : line === "nft -t -j list maps inet"
              ? fixture("nft-t-j-list-maps.json")
              : NFT_OUTPUT;
        return { code: 0, stdout, stderr: "" };
      },
    };
  };

  it("reads conntrack for the egress IPs the class maps SNAT to", async () => {
    const runner = host();
    const reading = await new InlineTrafficReader(runner, {
      counters: { kind: "nftables", families: [4, 6] },
    }).read({ conntrack: true });
    assert.deepEqual(runner.calls, [
      "nft -t -j list maps inet",
      "env HOME=/dev/null nft -j -i",
      "conntrack -L -o extended -n",
    ]);
    assert.deepEqual(
      reading.snat?.egress.map((e) => [e.egressIP, e.connections, e.portRange.first]),
      [
        ["10.2.0.100", 5, 1024],
        ["10.2.0.101", 0, 1024],
        ["fd02::100", 3, 1024],
      ],
    );
  });

  it("gives the collector figures per policy once a plan names the elements", async () => {
    const reader = new InlineTrafficReader(host(), {
      counters: { kind: "nftables", families: [4, 6] },
    });
    const { c } = collector(reader, { policyOf: nftPolicyOf(() => NFT_PLAN) });
    await c.collect();
    assert.deepEqual(
      (await c.policyTraffic())
        .filter((t) => t.packets > 0)
        .map((t) => `${t.policy} ${t.kind} ${t.egressIP} ${t.packets}:${t.bytes}`)
        .sort(),
      [
        "ClusterEgressPolicy/no-gateway dropped  2:156",
        // 4 SYNs and a UDP flow's datagram; 2 SYNs and one datagram over IPv6
        `${WEB} connections 10.2.0.100 5:278`,
        `${WEB} connections fd02::100 3:218`,
        `${BILLING} steered  6:442`,
        `${BILLING} steered 192.0.2.1 12:644`,
      ],
    );
  });
});

describe("syncedPlanOf()", () => {
  it("holds the plan of the last sync that succeeded", async () => {
    let fail = false;
    const report = { changes: 0, detail: {}, durationMs: 1 } as unknown as SyncReport;
    const datapath = {
      sync: async () => {
        if (fail) throw new Error("nft: refused");
        return report;
      },
    } as unknown as Datapath;
    const plan = syncedPlanOf(datapath);
    const a = { node: "a" } as NodePlan;
    const b = { node: "b" } as NodePlan;
    assert.equal(plan(), undefined);
    assert.equal(await datapath.sync(a), report);
    assert.equal(plan(), a);
    fail = true;
    await assert.rejects(datapath.sync(b), /refused/);
    assert.equal(plan(), a);
  });
});
