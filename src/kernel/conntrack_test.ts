/**
 * The conntrack reader on real output (testdata/traffic/conntrack-extended.txt: conntrack-tools
 * 1.4.7 on Linux 6.18, a gateway namespace SNATing a client's TCP, UDP and ICMP traffic to
 * 10.2.0.100 / fd02::100 while another policy's flows pass un-NATed), and on lines rendered the
 * way conntrack prints them for random tables.
 *
 * Address plan of the fixture: client 10.1.0.2 / fd01::2; server 10.2.0.2-4 / fd02::2-3;
 * egress IPs 10.2.0.100 / fd02::100.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import fc from "fast-check";
import {
  deleteConnectionsOf,
  KERNEL_SNAT_PORTS,
  listSnatConnections,
  parseConntrack,
  parsePortRange,
  portCapacity,
  type SnatUse,
  summarizeSnat,
} from "./conntrack.ts";
import type { Runner } from "./runner.ts";

const FIXTURE = readFileSync(
  join(import.meta.dirname, "testdata", "traffic", "conntrack-extended.txt"),
  "utf8",
);
const EIPS = ["10.2.0.100", "fd02::100"];

const byKey = (uses: readonly SnatUse[]) =>
  Object.fromEntries(
    uses.map((u) => [
      `${u.egressIP} ${u.destination}:${u.port}/${u.protocol}`,
      `${u.connections}/${u.ports}`,
    ]),
  );

describe("parseConntrack()", () => {
  it("counts the SNATed connections and source ports of real conntrack output", () => {
    assert.deepEqual(byKey(parseConntrack(FIXTURE, EIPS)), {
      // 3 established connections and one in TIME_WAIT (it still holds its reply tuple)
      "10.2.0.100 10.2.0.2:8080/tcp": "4/4",
      "10.2.0.100 10.2.0.2:8081/udp": "1/1",
      "fd02::100 fd02::2:8080/tcp": "2/2",
      // [UNREPLIED] between the tuples
      "fd02::100 fd02::2:8081/udp": "1/1",
    });
  });

  it("leaves out connections that are not SNATed to the egress IPs asked for", () => {
    // The steered flows to 10.2.0.3 / fd02::3 and the ICMP echo keep their source: no entry.
    assert.deepEqual(byKey(parseConntrack(FIXTURE, ["10.2.0.100"])), {
      "10.2.0.100 10.2.0.2:8080/tcp": "4/4",
      "10.2.0.100 10.2.0.2:8081/udp": "1/1",
    });
    assert.deepEqual(parseConntrack(FIXTURE, []), []);
  });

  it("reads conntrack's plain format (without -o extended) the same way", () => {
    const plain = FIXTURE.replace(/^ipv[46] +\d+ +/gm, "");
    assert.deepEqual(parseConntrack(plain, EIPS), parseConntrack(FIXTURE, EIPS));
  });

  it("counts ICMP echo identifiers as the ports SNAT rewrites", () => {
    const text =
      "ipv4     2 icmp     1 29 src=10.1.0.2 dst=10.2.0.2 type=8 code=0 id=3640 src=10.2.0.2 dst=10.2.0.100 type=0 code=0 id=3640 mark=0 use=1\n" +
      "ipv4     2 icmp     1 29 src=10.1.0.3 dst=10.2.0.2 type=8 code=0 id=3640 src=10.2.0.2 dst=10.2.0.100 type=0 code=0 id=17 mark=0 use=1\n";
    assert.deepEqual(byKey(parseConntrack(text, ["10.2.0.100"])), {
      "10.2.0.100 10.2.0.2:0/icmp": "2/2",
    });
  });

  it("counts a port once when two connections share it (another conntrack zone)", () => {
    const line = (zone: number) =>
      `ipv4     2 tcp      6 431998 ESTABLISHED src=10.1.0.2 dst=10.2.0.2 sport=40000 dport=443 src=10.2.0.2 dst=10.2.0.100 sport=443 dport=40000 [ASSURED] mark=0 zone=${zone} use=1\n`;
    assert.deepEqual(byKey(parseConntrack(line(1) + line(2), ["10.2.0.100"])), {
      "10.2.0.100 10.2.0.2:443/tcp": "2/1",
    });
  });

  it("skips the node's own connections from the egress IP and lines of another shape", () => {
    const text = [
      "ipv4     2 tcp      6 431998 ESTABLISHED src=10.2.0.100 dst=10.2.0.2 sport=40000 dport=443 src=10.2.0.2 dst=10.2.0.100 sport=443 dport=40000 [ASSURED] mark=0 use=1",
      "conntrack v1.4.7 (conntrack-tools): 1 flow entries have been shown.",
      "",
    ].join("\n");
    assert.deepEqual(parseConntrack(text, ["10.2.0.100"]), []);
  });

  it("equals a direct count for any table, printed the way conntrack prints it", () => {
    const conn = fc.record({
      client: fc.integer({ min: 1, max: 20 }),
      dst: fc.integer({ min: 1, max: 4 }),
      dport: fc.constantFrom(53, 443, 8080),
      protocol: fc.constantFrom("tcp", "udp"),
      eip: fc.constantFrom("192.0.2.1", "192.0.2.2", "192.0.2.3"),
      sport: fc.integer({ min: 1024, max: 1100 }),
      unreplied: fc.boolean(),
    });
    fc.assert(
      fc.property(fc.array(conn, { maxLength: 200 }), (conns) => {
        const lines = conns.map((c) => {
          const head =
            c.protocol === "tcp"
              ? "ipv4     2 tcp      6 431998 ESTABLISHED"
              : "ipv4     2 udp      17 28";
          const dst = `198.51.100.${c.dst}`;
          return `${head} src=10.0.0.${c.client} dst=${dst} sport=${40000 + c.client} dport=${c.dport}${c.unreplied ? " [UNREPLIED]" : ""} src=${dst} dst=${c.eip} sport=${c.dport} dport=${c.sport} mark=0 use=1`;
        });
        const expected = new Map<string, { n: number; ports: Set<number> }>();
        for (const c of conns) {
          if (c.eip === "192.0.2.3") continue;
          const key = `${c.eip} 198.51.100.${c.dst}:${c.dport}/${c.protocol}`;
          const e = expected.get(key) ?? { n: 0, ports: new Set() };
          e.n++;
          e.ports.add(c.sport);
          expected.set(key, e);
        }
        assert.deepEqual(
          byKey(parseConntrack(`${lines.join("\n")}\n`, ["192.0.2.1", "192.0.2.2"])),
          Object.fromEntries([...expected].map(([k, e]) => [k, `${e.n}/${e.ports.size}`])),
        );
      }),
    );
  });
});

describe("summarizeSnat()", () => {
  const use = (destination: string, ports: number, egressIP = "192.0.2.1"): SnatUse => ({
    egressIP,
    destination,
    port: 443,
    protocol: "tcp",
    connections: ports + 1,
    ports,
  });

  it("names the topN most saturated destinations per egress IP and aggregates the rest", () => {
    const range = { first: 1024, last: 1123 }; // 100 ports
    const [e] = summarizeSnat(
      [use("a", 10), use("b", 90), use("c", 50), use("d", 5)],
      new Map([["192.0.2.1", range]]),
      2,
    );
    assert.deepEqual(
      e!.top.map((d) => [d.destination, d.saturation]),
      [
        ["b", 0.9],
        ["c", 0.5],
      ],
    );
    assert.deepEqual(e!.other, {
      egressIP: "192.0.2.1",
      destination: "other",
      port: 0,
      protocol: "",
      connections: 17,
      ports: 15,
      saturation: 0.1,
    });
    assert.equal(e!.connections, 91 + 51 + 11 + 6);
    assert.equal(e!.destinations, 4);
  });

  it("lists idle egress IPs and ignores connections to egress IPs not asked for", () => {
    const out = summarizeSnat(
      [use("a", 1, "192.0.2.9")],
      new Map([["192.0.2.1", KERNEL_SNAT_PORTS]]),
      10,
    );
    assert.deepEqual(out, [
      {
        egressIP: "192.0.2.1",
        portRange: KERNEL_SNAT_PORTS,
        connections: 0,
        destinations: 0,
        top: [],
      },
    ]);
  });

  it("measures ICMP against its 65,536 identifiers, the rest against the port range", () => {
    assert.equal(portCapacity("icmp", KERNEL_SNAT_PORTS), 65536);
    assert.equal(portCapacity("tcp", KERNEL_SNAT_PORTS), 64512);
    assert.equal(portCapacity("udp", { first: 2000, last: 2999 }), 1000);
  });
});

describe("parsePortRange()", () => {
  it("reads FIRST-LAST and a single port, and names the fix otherwise", () => {
    assert.deepEqual(parsePortRange("1024-65535"), { first: 1024, last: 65535 });
    assert.deepEqual(parsePortRange("5000"), { first: 5000, last: 5000 });
    for (const bad of ["", "0-10", "10-5", "1024-70000", "a-b"])
      assert.throws(() => parsePortRange(bad), /Cannot parse port range: current value is ".*"/);
  });
});

describe("listSnatConnections()", () => {
  it("asks for SNATed entries in extended format and names the fix when conntrack fails", async () => {
    const calls: (readonly string[])[] = [];
    const runner = (code: number, stdout: string, stderr: string): Runner => ({
      run: async (argv) => {
        calls.push(argv);
        return { code, stdout, stderr };
      },
    });
    assert.equal(await listSnatConnections(runner(0, FIXTURE, "12 flow entries")), FIXTURE);
    assert.deepEqual(calls[0], ["conntrack", "-L", "-o", "extended", "-n"]);
    await assert.rejects(
      listSnatConnections(
        runner(1, "", "conntrack v1.4.7 (conntrack-tools): Operation failed: not supported\n"),
      ),
      /Cannot list SNATed connections with conntrack -L -o extended -n: exit 1: .*Operation failed.*; install conntrack-tools and load nf_conntrack_netlink/,
    );
  });
});

describe("deleteConnectionsOf()", () => {
  // As conntrack-tools 1.4.7 answers (measured in a network namespace).
  const said = (n: number) =>
    `conntrack v1.4.7 (conntrack-tools): ${n} flow entries have been deleted.\n`;

  it("deletes by original source, then original destination, in the address's family; none deleted is no failure", async () => {
    const calls: string[] = [];
    const answers = [
      { code: 0, stdout: "udp 17 …\n", stderr: said(2) },
      { code: 1, stdout: "", stderr: said(0) },
      { code: 1, stdout: "", stderr: said(0) },
      { code: 0, stdout: "", stderr: said(1) },
    ];
    const runner: Runner = {
      run: async (argv) => {
        calls.push(argv.join(" "));
        return answers.shift()!;
      },
    };
    assert.equal(await deleteConnectionsOf(runner, "10.244.1.9"), 2);
    assert.equal(await deleteConnectionsOf(runner, "fd00:244:1::9"), 1);
    assert.deepEqual(calls, [
      "conntrack -D -f ipv4 -s 10.244.1.9",
      "conntrack -D -f ipv4 -d 10.244.1.9",
      "conntrack -D -f ipv6 -s fd00:244:1::9",
      "conntrack -D -f ipv6 -d fd00:244:1::9",
    ]);
  });

  it("throws with conntrack's message when it fails", async () => {
    const runner: Runner = {
      run: async () => ({
        code: 1,
        stdout: "",
        stderr: "conntrack v1.4.7 (conntrack-tools): Operation failed: Operation not permitted\n",
      }),
    };
    await assert.rejects(
      deleteConnectionsOf(runner, "10.244.1.9"),
      /^CommandError: Cannot run conntrack -D -f ipv4 -s 10\.244\.1\.9: exit 1: .*Operation not permitted/,
    );
  });
});
