/**
 * The traffic collector on a real kernel: known traffic through the datapath's rules on a
 * gateway in network namespaces (test/support/snat_lab.ts has the address plan and the
 * policies), read by the agent's own reader thread, checked figure by figure.
 */
import assert from "node:assert/strict";
import { after, before, beforeEach, describe, it } from "node:test";
import { TrafficCollector } from "../../src/agent/traffic.ts";
import { WorkerTrafficReader } from "../../src/agent/traffic_worker.ts";
import { KERNEL_SNAT_PORTS, listSnatConnections } from "../../src/kernel/conntrack.ts";
import { mustRun } from "../../src/kernel/runner.ts";
import { realClock } from "../../src/lib/clock.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { Registry, trafficMetrics } from "../../src/lib/metrics.ts";
import { EIP, NARROW_EIP, NARROW_PORTS, NEEDS_ROOT, SERVER, SnatLab } from "../support/snat_lab.ts";

describe("traffic figures from a real kernel", { skip: NEEDS_ROOT }, () => {
  const lab = new SnatLab("t");
  let reader: WorkerTrafficReader;

  const collector = (extra: Partial<ConstructorParameters<typeof TrafficCollector>[0]> = {}) =>
    new TrafficCollector({
      reader,
      clock: realClock,
      log: silentLogger,
      countersMaxAgeMs: 0,
      egressIPOf: (policy, family) =>
        policy === "EgressPolicy/team-a/billing" ? `eip-of-billing-v${family}` : undefined,
      ...extra,
    });

  before(async () => {
    await lab.up();
    reader = new WorkerTrafficReader(
      {
        counters: { kind: "iptables", backend: "nft", families: [4, 6] },
        topDestinations: 5,
      },
      { within: ["nsenter", `--net=/run/netns/${lab.gateway}`] },
    );
  });

  after(async () => {
    reader?.close();
    await lab.down();
  });

  beforeEach(() => lab.reset());

  it("counts steered and dropped packets and bytes, SNATed connections, and their ports", async () => {
    await lab.send({
      tcp: [
        { host: SERVER.web[4], port: 8080, count: 7 },
        { host: SERVER.web[6], port: 8080, count: 3 },
      ],
      udp: [
        { host: SERVER.web[4], port: 8081, count: 2, size: 10, fromPorts: 4 },
        // Steered: every datagram of the original direction, 20 + 8 + 100 bytes (IPv6: 40 + 8 + 100)
        { host: SERVER.steered[4], port: 8081, count: 25, size: 100, fromPorts: 2 },
        { host: SERVER.steered[6], port: 8081, count: 10, size: 100, fromPorts: 1 },
        // Fails closed: every datagram dropped
        { host: SERVER.dropped, port: 8081, count: 3, size: 50, fromPorts: 1 },
      ],
    });
    const c = collector();
    await c.collect();
    const traffic = Object.fromEntries(
      (await c.policyTraffic()).map((t) => [
        `${t.policy} ${t.kind} ${t.egressIP}`,
        `${t.packets}p ${t.bytes}B`,
      ]),
    );
    assert.deepEqual(traffic, {
      "EgressPolicy/team-a/billing steered eip-of-billing-v4": `50p ${50 * 128}B`,
      "EgressPolicy/team-a/billing steered eip-of-billing-v6": `10p ${10 * 148}B`,
      "ClusterEgressPolicy/no-gateway dropped ": `3p ${3 * 78}B`,
      // nat chains see each connection's first packet: 7 SYNs (20 + 40 bytes with options) and
      // 4 UDP flows' first datagrams (20 + 8 + 10); over IPv6, 3 SYNs of 40 + 40 bytes
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

  it("reads the port range from the SNAT rule and reports a destination past 80 %", async () => {
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
