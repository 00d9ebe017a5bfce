/**
 * The traffic collector on a real kernel: known traffic through the datapath's rules on a
 * gateway in network namespaces (test/support/snat_lab.ts has the address plan and the
 * policies), read by the agent's own reader thread, checked figure by figure, on both packet
 * filters. iptables: the lab's rules as the planner writes them. nftables: the lab's iptables
 * rules are flushed and the same four policies are classified (src/engine/classify.ts) and
 * rendered (src/render/nftables.ts) into the `inet sallyport` table the agent would write.
 */
import assert from "node:assert/strict";
import { after, before, beforeEach, describe, it } from "node:test";
import { nftPolicyOf, TrafficCollector } from "../../src/agent/traffic.ts";
import { WorkerTrafficReader } from "../../src/agent/traffic_worker.ts";
import {
  type ClassPolicy,
  classEntries,
  className,
  type TrafficClass,
} from "../../src/engine/classify.ts";
import type { NodePlan } from "../../src/engine/plan.ts";
import { KERNEL_SNAT_PORTS, listSnatConnections } from "../../src/kernel/conntrack.ts";
import { mustRun } from "../../src/kernel/runner.ts";
import { realClock } from "../../src/lib/clock.ts";
import type { Family } from "../../src/lib/ip.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { Registry, trafficMetrics } from "../../src/lib/metrics.ts";
import { RangeSet } from "../../src/lib/rangeset.ts";
import {
  desiredTable,
  diffNftFull,
  parseNftTable,
  renderNftTable,
} from "../../src/render/nftables.ts";
import {
  EIP,
  NARROW_EIP,
  NARROW_PORTS,
  NEEDS_ROOT,
  SERVER,
  SnatLab,
  type TrafficPlan,
} from "../support/snat_lab.ts";

/** The lab's policies as the nftables planner classifies them: one class per family. */
function labPlan(options: { readonly billingNode: number }): NodePlan {
  const host = (a: string) => `${a}/${a.includes(":") ? 128 : 32}`;
  const web = (family: Family): ClassPolicy => ({
    key: "EgressPolicy/default/web",
    destinations: [host(SERVER.web[family])],
    excluded: [],
    ports: [
      { protocol: "TCP", port: 8080 },
      { protocol: "UDP", port: 8081 },
    ],
    verdict: { kind: "snat", eip: EIP[family] },
  });
  const billing = (family: Family): ClassPolicy => ({
    key: "EgressPolicy/team-a/billing",
    destinations: [host(SERVER.steered[family])],
    excluded: [],
    ports: [],
    verdict: { kind: "steer", nodeID: options.billingNode },
  });
  const policies: Record<Family, ClassPolicy[]> = {
    4: [
      web(4),
      {
        key: "EgressPolicy/default/narrow",
        destinations: [host(SERVER.web[4])],
        excluded: [],
        ports: [{ protocol: "TCP", port: 9090 }],
        // nftables SNATs to an address, never to a port range: the whole range here.
        verdict: { kind: "snat", eip: NARROW_EIP },
      },
      billing(4),
      {
        key: "ClusterEgressPolicy/no-gateway",
        destinations: [host(SERVER.dropped)],
        excluded: [],
        ports: [],
        verdict: { kind: "drop" },
      },
    ],
    6: [web(6), billing(6)],
  };
  const sources: Record<Family, string[]> = {
    // The client's addresses (10.1.0.2, and 10.1.0.3-202 for port clashes)
    4: Array.from({ length: 201 }, (_, i) => `10.1.0.${i + 2}/32`),
    6: ["fd01::2/128"],
  };
  const classOf = (family: Family): TrafficClass => ({
    name: className(family, sources[family][0]!),
    anchor: sources[family][0]!,
    family,
    policies: policies[family].map((p) => p.key),
    sources: sources[family],
    entries: classEntries(policies[family], family, new RangeSet()),
  });
  return {
    nft: {
      classes: { 4: [classOf(4)], 6: [classOf(6)] },
      steerTo: [{ nodeID: options.billingNode }],
      snat: { 4: [EIP[4], NARROW_EIP], 6: [EIP[6]] },
      held: { 4: [host(EIP[4]), host(NARROW_EIP)], 6: [host(EIP[6])] },
      noSnatBySets: false,
    },
  } as Partial<NodePlan> as NodePlan;
}

const TABLE = { families: [4, 6] as const, tunnelDevice: "sallyport" };

for (const filter of ["iptables", "nftables"] as const) {
  describe(`traffic figures from a real kernel (${filter})`, { skip: NEEDS_ROOT }, () => {
    const lab = new SnatLab(filter === "iptables" ? "t" : "n");
    let reader: WorkerTrafficReader;
    /** nftables: the plan the table holds, as the agent keeps it (syncedPlanOf). */
    let plan = labPlan({ billingNode: 1 });

    const gw = () => lab.runner(lab.gateway);
    /** nftables: the table made again from `plan` (its element counters start from zero). */
    const writeTable = async () => {
      await gw().run(["nft", "delete", "table", "inet", "sallyport"]);
      await mustRun(gw(), ["nft", "-f", "-"], {
        stdin: renderNftTable(desiredTable(plan, TABLE)),
      });
    };
    /** nftables: `next` applied as a sync would: the difference against the table as read. */
    const syncTable = async (next: NodePlan) => {
      const actual = parseNftTable(
        await mustRun(gw(), ["nft", "-j", "list", "table", "inet", "sallyport"]),
      );
      const diff = diffNftFull(desiredTable(next, TABLE), actual);
      await mustRun(gw(), ["nft", "-f", "-"], { stdin: diff.payload });
      plan = next;
    };

    const collector = (extra: Partial<ConstructorParameters<typeof TrafficCollector>[0]> = {}) =>
      new TrafficCollector({
        reader,
        clock: realClock,
        log: silentLogger,
        countersMaxAgeMs: 0,
        egressIPOf: (policy, family) =>
          policy === "EgressPolicy/team-a/billing" ? `eip-of-billing-v${family}` : undefined,
        ...(filter === "nftables" ? { policyOf: nftPolicyOf(() => plan) } : {}),
        ...extra,
      });
    const figures = async (c: TrafficCollector) =>
      Object.fromEntries(
        (await c.policyTraffic()).map((t) => [
          `${t.policy} ${t.kind} ${t.egressIP}`,
          `${t.packets}p ${t.bytes}B`,
        ]),
      );

    before(async () => {
      await lab.up();
      if (filter === "nftables") {
        // The lab's iptables rules and sets go; the nftables table takes their place.
        for (const tool of ["iptables", "ip6tables"])
          for (const table of ["mangle", "nat"]) {
            await mustRun(gw(), [tool, "-t", table, "-F"]);
            await mustRun(gw(), [tool, "-t", table, "-X"]);
          }
        await mustRun(gw(), ["ipset", "destroy"]);
      }
      reader = new WorkerTrafficReader(
        {
          counters:
            filter === "iptables"
              ? { kind: "iptables", backend: "nft", families: [4, 6] }
              : { kind: "nftables", families: [4, 6] },
          topDestinations: 5,
        },
        { within: ["nsenter", `--net=/run/netns/${lab.gateway}`] },
      );
    });

    after(async () => {
      reader?.close();
      await lab.down();
    });

    beforeEach(async () => {
      await lab.reset();
      if (filter === "nftables") {
        plan = labPlan({ billingNode: 1 });
        await writeTable();
      }
    });

    it("counts steered and dropped packets and bytes, SNATed connections, and their ports", async () => {
      const traffic: TrafficPlan = {
        tcp: [
          { host: SERVER.web[4], port: 8080, count: 7 },
          { host: SERVER.web[6], port: 8080, count: 3 },
        ],
        udp: [
          // iptables counts a flow's first datagram; nftables each one until the flow is
          // answered (see the next test), so one datagram per flow there.
          {
            host: SERVER.web[4],
            port: 8081,
            count: filter === "iptables" ? 2 : 1,
            size: 10,
            fromPorts: 4,
          },
          // Steered: every datagram of the original direction, 20 + 8 + 100 bytes (IPv6: 40 + 8 + 100)
          { host: SERVER.steered[4], port: 8081, count: 25, size: 100, fromPorts: 2 },
          { host: SERVER.steered[6], port: 8081, count: 10, size: 100, fromPorts: 1 },
          // Fails closed: every datagram dropped
          { host: SERVER.dropped, port: 8081, count: 3, size: 50, fromPorts: 1 },
        ],
      };
      await lab.send(traffic);
      const c = collector();
      await c.collect();
      assert.deepEqual(await figures(c), {
        "EgressPolicy/team-a/billing steered eip-of-billing-v4": `50p ${50 * 128}B`,
        "EgressPolicy/team-a/billing steered eip-of-billing-v6": `10p ${10 * 148}B`,
        "ClusterEgressPolicy/no-gateway dropped ": `3p ${3 * 78}B`,
        // A connection's first packets: 7 SYNs (20 + 40 bytes with options) and 4 UDP flows'
        // first datagrams (20 + 8 + 10); over IPv6, 3 SYNs of 40 + 40 bytes
        [`EgressPolicy/default/web connections ${EIP[4]}`]: `11p ${7 * 60 + 4 * 38}B`,
        [`EgressPolicy/default/web connections ${EIP[6]}`]: `3p ${3 * 80}B`,
        [`EgressPolicy/default/narrow connections ${NARROW_EIP}`]: "0p 0B",
      });
      const egress = Object.fromEntries(
        c.snatEgress.map((e) => [
          e.egressIP,
          e.top.map((d) => `${d.destination}:${d.port}/${d.protocol} ${d.connections}/${d.ports}`),
        ]),
      );
      assert.deepEqual(egress, {
        [EIP[4]]: [`${SERVER.web[4]}:8080/tcp 7/7`, `${SERVER.web[4]}:8081/udp 4/4`],
        [NARROW_EIP]: [],
        [EIP[6]]: [`${SERVER.web[6]}:8080/tcp 3/3`],
      });
      assert.equal(c.snatEgress[0]!.top[0]!.saturation, 7 / 64512);
    });

    it("counts an unanswered flow once (iptables) or each of its packets (nftables)", async () => {
      // The server's answers are dropped: conntrack calls the flow new until one comes back.
      const s = lab.runner(lab.server);
      await mustRun(s, ["nft", "-f", "-"], {
        stdin: [
          "add table inet mute",
          "add chain inet mute output { type filter hook output priority 0; policy accept; }",
          "add rule inet mute output udp sport 8081 drop",
        ].join("\n"),
      });
      try {
        await lab.send({
          udp: [{ host: SERVER.web[4], port: 8081, count: 3, size: 10, fromPorts: 1 }],
        });
      } finally {
        await mustRun(s, ["nft", "delete", "table", "inet", "mute"]);
      }
      const c = collector();
      await c.collect();
      const web = (await figures(c))[`EgressPolicy/default/web connections ${EIP[4]}`];
      assert.equal(web, filter === "iptables" ? "1p 38B" : `3p ${3 * 38}B`);
    });

    it("exposes the same figures on the metrics endpoint", async () => {
      await lab.send({ tcp: [{ host: SERVER.web[4], port: 8080, count: 2 }] });
      const registry = new Registry();
      let source: TrafficCollector | undefined;
      const metrics = trafficMetrics(registry, () => source);
      source = collector({ metrics });
      await source.collect();
      const text = await registry.metrics();
      assert.match(
        text,
        new RegExp(
          `sallyport_snat_connections\\{egress_ip="${EIP[4]}",destination="${SERVER.web[4]}",port="8080",protocol="tcp"\\} 2`,
        ),
      );
      assert.match(
        text,
        new RegExp(
          `sallyport_policy_snat_connections_total\\{policy="EgressPolicy/default/web",egress_ip="${EIP[4]}"\\} 2`,
        ),
      );
      assert.match(text, /sallyport_traffic_read_duration_seconds_count\{source="conntrack"\} 1/);
    });

    it("reads the port range from the SNAT rule and reports a destination past 80 %", {
      skip: filter === "nftables" && "the nftables datapath SNATs to addresses, not ports",
    }, async () => {
      const reports: unknown[] = [];
      const c = collector({ onSaturation: (list) => reports.push(list) });
      // 8 of the rule's 10 ports (5000-5009)
      await lab.send({ tcp: [{ host: SERVER.web[4], port: 9090, count: 8 }] });
      await c.collect();
      const narrow = c.snatEgress.find((e) => e.egressIP === NARROW_EIP)!;
      assert.deepEqual(narrow.portRange, NARROW_PORTS);
      assert.equal(narrow.top[0]?.saturation, 0.8);
      assert.deepEqual(reports, [
        [
          {
            egressIP: NARROW_EIP,
            destination: SERVER.web[4],
            port: 9090,
            protocol: "tcp",
            percent: 80,
          },
        ],
      ]);
    });

    it("stays monotonic while the class maps are rewritten", {
      skip: filter === "iptables" && "rule rewrites: src/agent/traffic_test.ts",
    }, async () => {
      const billing = "EgressPolicy/team-a/billing steered eip-of-billing-v4";
      const c = collector();
      await lab.send({
        udp: [{ host: SERVER.steered[4], port: 8081, count: 25, size: 100, fromPorts: 2 }],
      });
      await c.collect();
      assert.equal((await figures(c))[billing], `50p ${50 * 128}B`);
      // billing's gateway moves to node 2: its elements are deleted and added with their new
      // verdict (the diff a sync sends), and count from zero.
      await syncTable(labPlan({ billingNode: 2 }));
      const map = plan.nft!.classes[4]![0]!.name;
      assert.match(
        await mustRun(gw(), ["nft", "list", "map", "inet", "sallyport", map]),
        /10\.2\.0\.3 \. udp \. 8081 counter packets 0 bytes 0 : goto to-0002/,
      );
      await lab.send({
        udp: [{ host: SERVER.steered[4], port: 8081, count: 10, size: 100, fromPorts: 1 }],
      });
      await c.collect();
      assert.equal((await figures(c))[billing], `60p ${60 * 128}B`);
      // The table made again as it was (a repair after someone deleted it): the same elements,
      // their counters back at zero.
      await writeTable();
      await lab.send({
        udp: [{ host: SERVER.steered[4], port: 8081, count: 5, size: 100, fromPorts: 1 }],
      });
      await c.collect();
      assert.equal((await figures(c))[billing], `65p ${65 * 128}B`);
    });

    it("assumes the ports the kernel really picks: 1024-65535, not ip_local_port_range", async () => {
      // 201 clients, one source port: the first keeps it, the kernel must choose the others.
      const clients = Array.from({ length: 201 }, (_, i) => `10.1.0.${i + 2}`);
      await lab.send({
        tcp: [
          {
            host: SERVER.web[4],
            port: 8080,
            count: clients.length,
            localAddresses: clients,
            localPort: 40000,
          },
        ],
      });
      const text = await listSnatConnections(lab.runner(lab.gateway));
      const ports = [...text.matchAll(/ dst=10\.2\.0\.100 sport=8080 dport=(\d+)/g)].map((m) =>
        Number(m[1]),
      );
      assert.equal(ports.length, clients.length);
      assert.ok(ports.every((p) => p >= KERNEL_SNAT_PORTS.first && p <= KERNEL_SNAT_PORTS.last));
      const local = (
        await mustRun(lab.runner(lab.gateway), ["sysctl", "-n", "net.ipv4.ip_local_port_range"])
      )
        .trim()
        .split(/\s+/)
        .map(Number);
      const outside = ports.filter((p) => p < local[0]! || p > local[1]!).length;
      // Uniform over 1024-65535, more than half fall outside 32768-60999; 20 is far from chance.
      assert.ok(outside > 20, `only ${outside} of 200 chosen ports outside ${local.join("-")}`);
      const c = collector();
      await c.collect();
      const web = c.snatEgress.find((e) => e.egressIP === EIP[4])!.top[0]!;
      assert.equal(`${web.connections}/${web.ports}`, "201/201");
    });
  });
}
