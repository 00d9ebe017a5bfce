/**
 * `sallyport top` on what the agents really export: two scrapes of a registry holding the
 * agent's own traffic metrics (src/lib/metrics.ts), fed a collector whose counters moved.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Registry, type TrafficMetricsSource, trafficMetrics } from "../lib/metrics.ts";
import { runCli } from "./errors.ts";
import { buildProgram } from "./program.ts";
import {
  formatTop,
  human,
  type MetricsSource,
  parseMetrics,
  type Scrape,
  top,
  topRows,
} from "./top.ts";

/** An agent's metrics endpoint whose figures the test sets. */
class Agent {
  readonly registry = new Registry();
  traffic: Awaited<ReturnType<TrafficMetricsSource["policyTraffic"]>> = [];
  egress: TrafficMetricsSource["snatEgress"] = [];

  constructor() {
    trafficMetrics(this.registry, () => ({
      policyTraffic: async () => this.traffic,
      snatEgress: this.egress,
      conntrackEntries: 0,
    }));
  }

  scrape(node: string): Promise<Scrape> {
    return this.registry.metrics().then((text) => ({ node, text }));
  }
}

const steered = (policy: string, egressIP: string, packets: number) => ({
  policy,
  egressIP,
  kind: "steered" as const,
  packets,
  bytes: packets * 100,
});

describe("parseMetrics()", () => {
  it("reads samples with labels, escapes and timestamps, and skips comments", () => {
    const text = [
      "# HELP x_total a help",
      "# TYPE x_total counter",
      'x_total{policy="EgressPolicy/a/b",egress_ip="192.0.2.1",direction="steered"} 42',
      'y{destination="other",port="",protocol=""} 0.5 1700000000000',
      'z{msg="a \\"quoted\\" \\\\ value"} 1e3',
      "plain 7",
    ].join("\n");
    assert.deepEqual(parseMetrics(text), [
      {
        name: "x_total",
        labels: { policy: "EgressPolicy/a/b", egress_ip: "192.0.2.1", direction: "steered" },
        value: 42,
      },
      { name: "y", labels: { destination: "other", port: "", protocol: "" }, value: 0.5 },
      { name: "z", labels: { msg: 'a "quoted" \\ value' }, value: 1000 },
      { name: "plain", labels: {}, value: 7 },
    ]);
  });
});

describe("topRows() and formatTop()", () => {
  it("sums rates over the nodes per policy and egress IP, with the egress IP's port use", async () => {
    const node1 = new Agent();
    const node2 = new Agent(); // the gateway
    const web = "EgressPolicy/team-a/web";
    const batch = "ClusterEgressPolicy/batch";
    node1.traffic = [steered(web, "192.0.2.1", 1000)];
    node2.traffic = [
      steered(web, "192.0.2.1", 0),
      { policy: web, egressIP: "192.0.2.1", kind: "connections", packets: 50, bytes: 3000 },
      { policy: batch, egressIP: "", kind: "dropped", packets: 10, bytes: 600 },
    ];
    const first = await Promise.all([node1.scrape("node-1"), node2.scrape("node-2")]);
    node1.traffic = [steered(web, "192.0.2.1", 3000)];
    node2.traffic = [
      steered(web, "192.0.2.1", 200),
      { policy: web, egressIP: "192.0.2.1", kind: "connections", packets: 70, bytes: 4200 },
      { policy: batch, egressIP: "", kind: "dropped", packets: 30, bytes: 1800 },
    ];
    node2.egress = [
      {
        egressIP: "192.0.2.1",
        top: [
          {
            destination: "203.0.113.7",
            port: 443,
            protocol: "tcp",
            connections: 52_000,
            ports: 52_000,
            saturation: 52_000 / 64_512,
          },
        ],
        other: {
          destination: "other",
          port: 0,
          protocol: "",
          connections: 300,
          ports: 290,
          saturation: 0.001,
        },
      },
    ];
    const second = await Promise.all([node1.scrape("node-1"), node2.scrape("node-2")]);
    const rows = topRows(first, second, 2);
    assert.deepEqual(rows, [
      {
        policy: batch,
        egressIP: "",
        gateways: [],
        steeredPps: 0,
        steeredBps: 0,
        snatPps: undefined,
        snatBps: undefined,
        newConnectionsPerSecond: 0,
        droppedPps: 10,
        connections: 0,
      },
      {
        policy: web,
        egressIP: "192.0.2.1",
        gateways: ["node-2"],
        steeredPps: 1100,
        steeredBps: 110_000,
        snatPps: undefined,
        snatBps: undefined,
        newConnectionsPerSecond: 10,
        droppedPps: 0,
        connections: 52_300,
        top: { destination: "203.0.113.7:443/tcp", saturation: 52_000 / 64_512 },
      },
    ]);
    assert.equal(
      formatTop(rows),
      [
        "POLICY          EGRESS-IP  GATEWAY  STEERED(PKT/S)  STEERED(B/S)  SNAT(PKT/S)  SNAT(CONN/S)  CONNS  PORT-USE  DESTINATION          DROPPED(PKT/S)",
        "cegp/batch      -          -        0               0             -            0             0      -                              10",
        "egp/team-a/web  192.0.2.1  node-2   1.1k            110k          -            10            52k    80.6%     203.0.113.7:443/tcp  0",
      ].join("\n"),
    );
  });

  it("gives a policy with several egress IPs the connections and highest port use of them all", async () => {
    const gateway = new Agent();
    const web = "EgressPolicy/team-a/web";
    const both = "192.0.2.1,192.0.2.2";
    const destination = (connections: number) => ({
      destination: "203.0.113.7",
      port: 443,
      protocol: "tcp",
      connections,
      ports: connections,
      saturation: connections / 20,
    });
    gateway.traffic = [steered(web, both, 0)];
    const first = [await gateway.scrape("node-2")];
    gateway.traffic = [steered(web, both, 100)];
    gateway.egress = [
      { egressIP: "192.0.2.1", top: [destination(20)] },
      { egressIP: "192.0.2.2", top: [destination(15)] },
    ];
    const rows = topRows(first, [await gateway.scrape("node-2")], 1);
    assert.deepEqual(
      rows.map((r) => [r.egressIP, r.gateways, r.connections, r.top]),
      [[both, ["node-2"], 35, { destination: "203.0.113.7:443/tcp", saturation: 1 }]],
    );
  });

  it("gives no rate for a series that appeared or went down between the scrapes", async () => {
    const a = new Agent();
    const first = [await a.scrape("node-1")];
    a.traffic = [steered("EgressPolicy/a/b", "192.0.2.1", 500)];
    const appeared = topRows(first, [await a.scrape("node-1")], 1);
    assert.equal(appeared[0]?.steeredPps, 0);
    const before = [await a.scrape("node-1")];
    a.traffic = [steered("EgressPolicy/a/b", "192.0.2.1", 5)]; // the agent restarted
    assert.equal(topRows(before, [await a.scrape("node-1")], 1)[0]?.steeredPps, 0);
  });

  it("says so when nothing is programmed yet", () => {
    assert.match(formatTop([]), /^No traffic figures yet/);
  });

  it("prints rates with at most three figures", () => {
    assert.deepEqual([0, 0.25, 7, 999, 1000, 1234, 56_789, 1_234_567, 9.9e12].map(human), [
      "0",
      "0.3",
      "7",
      "999",
      "1.0k",
      "1.2k",
      "57k",
      "1.2M",
      "9.9T",
    ]);
  });
});

describe("top()", () => {
  const failing: MetricsSource = {
    scrape: async () => [
      { node: "node-1", error: "connect ECONNREFUSED 192.168.77.11:9091" },
      { node: "node-2", error: "HTTP 503" },
    ],
  };

  it("fails, naming each agent, when no agent can be read", async () => {
    await assert.rejects(top(failing, { intervalMs: 1 }), (e: Error & { details?: string[] }) => {
      assert.equal(e.message, "Cannot read the metrics of any Sallyport agent (2 tried)");
      assert.deepEqual(e.details, [
        "node-1: connect ECONNREFUSED 192.168.77.11:9091",
        "node-2: HTTP 503",
      ]);
      return true;
    });
  });

  it("warns about the agents it could not read and shows the others, of one namespace with -n", async () => {
    const a = new Agent();
    a.traffic = [
      steered("EgressPolicy/team-a/web", "192.0.2.1", 1),
      steered("EgressPolicy/team-b/web", "192.0.2.2", 1),
      steered("ClusterEgressPolicy/all", "192.0.2.3", 1),
    ];
    const source: MetricsSource = {
      scrape: async () => [await a.scrape("node-1"), { node: "node-2", error: "HTTP 503" }],
    };
    const warnings: string[] = [];
    const rows = await top(source, {
      intervalMs: 1,
      namespace: "team-a",
      warn: (l) => warnings.push(l),
    });
    assert.deepEqual(
      rows.map((r) => r.policy),
      ["ClusterEgressPolicy/all", "EgressPolicy/team-a/web"],
    );
    assert.deepEqual(warnings, ["warning: no figures from the agent on node-2: HTTP 503"]);
  });
});

describe("sallyport top on the command line", () => {
  const run = async (args: string[], env: NodeJS.ProcessEnv = {}) => {
    const stderr: string[] = [];
    const argv = ["node", "sallyport", ...args];
    const code = await runCli(await buildProgram({ argv }), argv, {
      stderr: (l) => stderr.push(l),
      env,
    });
    return { code, stderr };
  };

  it("refuses a bad interval as a usage error (exit 2)", async () => {
    const r = await run(["top", "--interval", "0"]);
    assert.equal(r.code, 2);
  });

  it("names the kubeconfig it cannot read (exit 1, no stack trace)", async () => {
    const r = await run(["top", "--kubeconfig", "/nonexistent/kubeconfig"]);
    assert.equal(r.code, 1);
    assert.deepEqual(r.stderr, [
      "error: Cannot read kubeconfig /nonexistent/kubeconfig: no such file",
    ]);
  });
});
