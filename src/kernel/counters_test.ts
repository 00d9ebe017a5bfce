/**
 * Rule counters from real `iptables-save -c` / `ip6tables-save -c` output
 * (testdata/traffic/ip*tables-save-c.txt: iptables 1.8.9, nft backend, a namespace holding the
 * datapath's rules for three policies while a client sent traffic through them):
 *
 *   EgressPolicy/default/web        this node is its gateway; ports 8080/tcp and 8081/udp, so two
 *                                   rules per chain; SNAT to 10.2.0.100 / fd02::100
 *   EgressPolicy/team-a/billing     steered to node 0001: 2 TCP connections and 2 pings (IPv4),
 *                                   1 TCP connection (IPv6)
 *   ClusterEgressPolicy/no-gateway  fails closed (-j DROP): 2 SYNs dropped (IPv4 only)
 *
 * And the nftables datapath's class maps (testdata/traffic/nft-*: nft 1.0.6, Linux 6.18, the
 * same lab with its iptables rules replaced by the `inet sallyport` table rendered from
 * nft-plan.json, the four policies of test/kernel/traffic_test.ts in one class per family):
 *
 *   nft-t-j-list-maps.json    `nft -t -j list maps inet`: the declarations
 *   nft-j-i-list-map.jsonl    `nft -j -i` fed `list map inet sallyport <map>` for both class
 *                             maps, snat4 and snat6: one document per line
 *   nft-j-list-maps.json      `nft -j list maps inet`: the same in one document (with src4/src6)
 *
 *   web        4 TCP connections and 1 UDP flow SNATed to 10.2.0.100, 2 and 1 to fd02::100
 *   billing    steered to node 0001: 2 TCP connections (IPv4), 1 (IPv6), the client killed
 *              after its echo (every packet of the original direction, FIN and RST included)
 *   no-gateway 2 UDP datagrams dropped
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import {
  INTERACTIVE_MAX_MAPS,
  IptablesCounters,
  NftCounters,
  parseIptablesCounters,
  parseNftClassCounters,
  type RuleCounter,
} from "./counters.ts";
import type { Runner, RunResult } from "./runner.ts";

const fixture = (name: string) =>
  readFileSync(join(import.meta.dirname, "testdata", "traffic", name), "utf8");
const SAVE4 = fixture("iptables-save-c.txt");
const SAVE6 = fixture("ip6tables-save-c.txt");

/** The part of a save that `-t table` prints. */
function table(save: string, name: string): string {
  const start = save.indexOf(`*${name}\n`);
  return start < 0 ? "" : save.slice(start, save.indexOf("COMMIT\n", start) + 7);
}

const summary = (counters: readonly RuleCounter[]) =>
  counters.map(
    (c) =>
      `${c.policy} v${c.family} ${c.kind}${c.egressIP === undefined ? "" : ` ${c.egressIP}`} ${c.packets}:${c.bytes}`,
  );

describe("parseIptablesCounters()", () => {
  it("reads each policy rule's counter and what it counts", () => {
    assert.deepEqual(summary(parseIptablesCounters(SAVE4, 4)), [
      // every packet of the steered connections: 2 × (SYN, ACK, data, ACK, FIN …) and 2 echoes
      "EgressPolicy/team-a/billing v4 steered 10:634",
      "ClusterEgressPolicy/no-gateway v4 dropped 2:120",
      // nat chains see the first packet of a connection: 4 TCP connections, 1 UDP flow
      "EgressPolicy/default/web v4 snat_new 10.2.0.100 4:240",
      "EgressPolicy/default/web v4 snat_new 10.2.0.100 1:29",
    ]);
    assert.deepEqual(summary(parseIptablesCounters(SAVE6, 6)), [
      "EgressPolicy/team-a/billing v6 steered 4:313",
      "EgressPolicy/default/web v6 snat_new fd02::100 2:160",
      "EgressPolicy/default/web v6 snat_new fd02::100 1:49",
    ]);
  });

  it("gives each rule its own identity, stable while the rule is unchanged", () => {
    const ids = parseIptablesCounters(SAVE4, 4).map((c) => c.id);
    assert.equal(new Set(ids).size, ids.length);
    const later = SAVE4.replace(
      "[10:634] -A SALLYPORT-MARK-REQUEST",
      "[99:9999] -A SALLYPORT-MARK-REQUEST",
    );
    assert.deepEqual(
      parseIptablesCounters(later, 4).map((c) => c.id),
      ids,
    );
  });

  it("reads what a policy's rule counts from its group chain: steered, held here, or dropped", () => {
    const text = (steerGroup: string[]) =>
      [
        '[10:634] -A SALLYPORT-MARK-REQUEST -m comment --comment "EgressPolicy/a/classed" -g SALLYPORT-C-0001',
        '[3:180] -A SALLYPORT-MARK-REQUEST -m comment --comment "EgressPolicy/a/plain" -g SALLYPORT-G-aaaaaaaaaa',
        '[2:120] -A SALLYPORT-MARK-REQUEST -m comment --comment "EgressPolicy/a/none" -g SALLYPORT-G-bbbbbbbbbb',
        ...steerGroup,
        "[10:634] -A SALLYPORT-C-0001 -j CONNMARK --set-xmark 0x1/0xffff",
        "[10:634] -A SALLYPORT-C-0001 -g SALLYPORT-G-aaaaaaaaaa",
        '[2:120] -A SALLYPORT-G-bbbbbbbbbb -m comment --comment "sallyport: no gateway to steer to" -j DROP',
      ].join("\n");
    const steering = text([
      '[0:0] -A SALLYPORT-G-aaaaaaaaaa -i sallyport -m comment --comment "sallyport: another node holds the egress IPs" -j DROP',
      "[13:814] -A SALLYPORT-G-aaaaaaaaaa -j CONNMARK --set-xmark 0x26000000/0xff000000",
      "[13:814] -A SALLYPORT-G-aaaaaaaaaa -j MARK --set-xmark 0x26000100/0xffffff00",
      "[13:814] -A SALLYPORT-G-aaaaaaaaaa -j ACCEPT",
    ]);
    assert.deepEqual(summary(parseIptablesCounters(steering, 4)), [
      "EgressPolicy/a/classed v4 steered 10:634",
      "EgressPolicy/a/plain v4 steered 3:180",
      "EgressPolicy/a/none v4 dropped 2:120",
    ]);
    // The same rules once this node took the egress IPs over: same identities, held here.
    const held = text([
      "[13:814] -A SALLYPORT-G-aaaaaaaaaa -j CONNMARK --set-xmark 0x0/0xffff",
      '[13:814] -A SALLYPORT-G-aaaaaaaaaa -m comment --comment "sallyport: this node holds the egress IPs" -g SALLYPORT-GATEWAY',
    ]);
    assert.deepEqual(summary(parseIptablesCounters(held, 4)), [
      "EgressPolicy/a/classed v4 held 10:634",
      "EgressPolicy/a/plain v4 held 3:180",
      "EgressPolicy/a/none v4 dropped 2:120",
    ]);
    assert.deepEqual(
      parseIptablesCounters(held, 4).map((c) => c.id),
      parseIptablesCounters(steering, 4).map((c) => c.id),
    );
  });

  it("skips the datapath's own rules, other chains and other writers' rules", () => {
    const counted = parseIptablesCounters(SAVE4, 4);
    assert.ok(counted.every((c) => !c.policy.startsWith("sallyport:")));
    // The gateway's own policy rule in MARK-REQUEST (-g SALLYPORT-GATEWAY) counts first packets
    // only and is not reported; neither are NO-SNAT rules that carry a policy key.
    const text = [
      '[7:420] -A SALLYPORT-MARK-REQUEST -m comment --comment "EgressPolicy/x/y" -g SALLYPORT-GATEWAY',
      '[7:420] -A SALLYPORT-NO-SNAT -m comment --comment "EgressPolicy/x/y" -j ACCEPT',
      '[7:420] -A KUBE-SERVICES -m comment --comment "default/kubernetes:https" -j KUBE-SVC-X',
    ].join("\n");
    assert.deepEqual(parseIptablesCounters(text, 4), []);
  });

  it("reads the port range a SNAT rule names, IPv4 and IPv6", () => {
    const text = [
      '[1:60] -A SALLYPORT-SNAT-EIP -m comment --comment "EgressPolicy/a/b" -j SNAT --to-source 192.0.2.1:2000-2999',
      '[1:80] -A SALLYPORT-SNAT-EIP -m comment --comment "EgressPolicy/a/b" -j SNAT --to-source [2001:db8::1]:3000-3099 --random-fully',
      '[1:80] -A SALLYPORT-SNAT-EIP -m comment --comment "EgressPolicy/a/b" -j SNAT --to-source 2001:db8::2',
    ].join("\n");
    assert.deepEqual(
      parseIptablesCounters(text, 4).map((c) => [c.egressIP, c.ports]),
      [
        ["192.0.2.1", { first: 2000, last: 2999 }],
        ["2001:db8::1", { first: 3000, last: 3099 }],
        ["2001:db8::2", undefined],
      ],
    );
  });

  it("unescapes comments as iptables-save quotes them", () => {
    const text = String.raw`[3:180] -A SALLYPORT-MARK-REQUEST -m comment --comment "EgressPolicy/a/\"b\"" -g SALLYPORT-TO-0002`;
    assert.equal(parseIptablesCounters(text, 4)[0]?.policy, 'EgressPolicy/a/"b"');
  });
});

describe("IptablesCounters", () => {
  it("reads mangle and nat of every family with the backend's save tool", async () => {
    const calls: string[] = [];
    const runner: Runner = {
      run: async (argv) => {
        calls.push(argv.join(" "));
        const save = argv[0]!.startsWith("ip6") ? SAVE6 : SAVE4;
        return { code: 0, stdout: table(save, argv.at(-1)!), stderr: "" };
      },
    };
    const counters = await new IptablesCounters(runner, {
      backend: "nft",
      families: [4, 6],
    }).read();
    assert.deepEqual(calls.sort(), [
      "ip6tables-nft-save -c -t mangle",
      "ip6tables-nft-save -c -t nat",
      "iptables-nft-save -c -t mangle",
      "iptables-nft-save -c -t nat",
    ]);
    assert.deepEqual(
      summary(counters).sort(),
      [
        ...summary(parseIptablesCounters(SAVE4, 4)),
        ...summary(parseIptablesCounters(SAVE6, 6)),
      ].sort(),
    );
  });

  it("fails with the tool's error when the save fails", async () => {
    const runner: Runner = {
      run: async () => ({ code: 1, stdout: "", stderr: "iptables-legacy-save: not found" }),
    };
    await assert.rejects(
      new IptablesCounters(runner, { backend: "legacy", families: [4] }).read(),
      /Cannot run iptables-legacy-save -c -t (mangle|nat): exit 1: iptables-legacy-save: not found/,
    );
  });
});

const NFT_INTERACTIVE = fixture("nft-j-i-list-map.jsonl");
const NFT_MAPS = fixture("nft-j-list-maps.json");
const NFT_TERSE = fixture("nft-t-j-list-maps.json");

const elements = (counters: readonly RuleCounter[]) =>
  counters
    .filter((c) => c.packets > 0)
    .map(
      (c) =>
        `v${c.family} ${c.element?.key} ${c.element?.verdict} ${c.kind}${c.egressIP === undefined ? "" : ` ${c.egressIP}`} ${c.packets}:${c.bytes}`,
    )
    .sort();

describe("parseNftClassCounters()", () => {
  it("reads each class map element's counter, its key and verdict, and what it counts", () => {
    const counters = parseNftClassCounters(NFT_INTERACTIVE, [4, 6]);
    // Every element of both maps (25 + 11), most of them at zero.
    assert.equal(counters.length, 36);
    assert.deepEqual(elements(counters), [
      // nat: a connection's packets until its first reply (4 SYNs, a UDP flow's one datagram)
      "v4 10.2.0.2 . 17 . 8081 goto snat4-0 snat_new 10.2.0.100 1:38",
      "v4 10.2.0.2 . 6 . 8080 goto snat4-0 snat_new 10.2.0.100 4:240",
      // every packet of the steered connections' original direction
      "v4 10.2.0.3 . 6 . 8080 goto to-0001 steered 12:644",
      "v4 10.2.0.4 . 17 . 8081 drop dropped 2:156",
      "v6 fd02::2 . 17 . 8081 goto snat6-0 snat_new fd02::100 1:58",
      "v6 fd02::2 . 6 . 8080 goto snat6-0 snat_new fd02::100 2:160",
      "v6 fd02::3 . 6 . 8080 goto to-0001 steered 6:442",
    ]);
    assert.ok(counters.every((c) => c.policy === "" && c.element !== undefined));
    assert.ok(
      counters.every(
        (c) => c.element!.map === (c.family === 4 ? "c4-dgfl7d7mxidl" : "c6-fvzr3fv7ym7l"),
      ),
    );
  });

  it("reads the same from one `list maps` document, and only the families asked for", () => {
    assert.deepEqual(
      parseNftClassCounters(NFT_MAPS, [4, 6]),
      parseNftClassCounters(NFT_INTERACTIVE, [4, 6]),
    );
    assert.ok(parseNftClassCounters(NFT_MAPS, [6]).every((c) => c.family === 6));
  });

  it("gives each element its own identity: its map, key and verdict", () => {
    const ids = parseNftClassCounters(NFT_INTERACTIVE, [4, 6]).map((c) => c.id);
    assert.equal(new Set(ids).size, ids.length);
    assert.ok(ids.includes("nft c4-dgfl7d7mxidl 10.2.0.3 . 6 . 8080 : goto to-0001"));
    // The same element with new counts keeps its id; with another verdict it is another one.
    const later = NFT_INTERACTIVE.replace(
      '"packets": 12, "bytes": 644',
      '"packets": 99, "bytes": 9999',
    );
    assert.deepEqual(
      parseNftClassCounters(later, [4, 6]).map((c) => c.id),
      ids,
    );
  });

  it("names every egress IP of a policy with several: the addresses its group chain picks from", () => {
    const doc = (map: object) => JSON.stringify({ nftables: [{ map }] });
    const text = [
      doc({
        family: "inet",
        name: "snat4",
        table: "sallyport",
        type: "mark",
        map: "ipv4_addr",
        elem: [
          [0x28000000, "10.2.0.100"],
          [0x28000100, "10.2.0.101"],
          [0x28000200, "10.2.0.102"],
        ],
      }),
      doc({
        family: "inet",
        name: "c4-y",
        table: "sallyport",
        type: ["ipv4_addr", "inet_proto", "inet_service"],
        map: "verdict",
        elem: [
          [
            {
              elem: {
                val: { concat: ["10.0.0.1", "tcp", 80] },
                counter: { packets: 40, bytes: 2400 },
              },
            },
            { goto: { target: "snat4-0-2" } },
          ],
        ],
      }),
    ].join("\n");
    assert.deepEqual(
      parseNftClassCounters(text, [4]).map((c) => [c.kind, c.egressIP, c.egressIPs, c.packets]),
      [["snat_new", undefined, ["10.2.0.100", "10.2.0.102"], 40]],
    );
  });

  it("skips other tables, maps without counters, and verdicts it does not count", () => {
    const doc = (map: object) => JSON.stringify({ nftables: [{ map }] });
    const elem = (verdict: object, port = 80) => [
      { elem: { val: { concat: ["10.0.0.1", "tcp", port] }, counter: { packets: 1, bytes: 60 } } },
      verdict,
    ];
    const text = [
      doc({
        family: "ip",
        name: "c4-x",
        table: "kube-proxy",
        type: ["ipv4_addr", "inet_proto", "inet_service"],
        map: "verdict",
        elem: [elem({ drop: null })],
      }),
      doc({
        family: "inet",
        name: "c4-y",
        table: "sallyport",
        type: ["ipv4_addr", "inet_proto", "inet_service"],
        map: "verdict",
        elem: [elem({ accept: null }), elem({ jump: { target: "c4-z" } }, 81)],
      }),
      doc({
        family: "inet",
        name: "src4",
        table: "sallyport",
        type: "ipv4_addr",
        map: "verdict",
        elem: [["10.1.0.2", { jump: { target: "c4-y" } }]],
      }),
    ].join("\n");
    assert.deepEqual(parseNftClassCounters(text, [4]), []);
  });
});

describe("NftCounters", () => {
  /** A host whose nft prints the fixtures; `answer` overrides the interactive run. */
  const host = (answer?: (stdin: string) => RunResult) => {
    const calls: { argv: string; stdin: string }[] = [];
    const runner: Runner = {
      run: async (argv, options) => {
        const stdin = options?.stdin ?? "";
        calls.push({ argv: argv.join(" "), stdin });
        const line = argv.join(" ");
        if (line === "nft -t -j list maps inet") return { code: 0, stdout: NFT_TERSE, stderr: "" };
        if (line === "nft -j list maps inet") return { code: 0, stdout: NFT_MAPS, stderr: "" };
        if (line === "env HOME=/dev/null nft -j -i")
          return answer?.(stdin) ?? { code: 0, stdout: NFT_INTERACTIVE, stderr: "" };
        return { code: 1, stdout: "", stderr: `unexpected: ${line}` };
      },
    };
    return { runner, calls };
  };

  it("lists the class maps by name, then reads them and the SNAT maps in one interactive nft", async () => {
    const { runner, calls } = host();
    const counters = await new NftCounters(runner, { families: [4, 6] }).read();
    assert.deepEqual(
      calls.map((c) => c.argv),
      ["nft -t -j list maps inet", "env HOME=/dev/null nft -j -i"],
    );
    assert.equal(
      calls[1]!.stdin,
      [
        "list map inet sallyport c4-dgfl7d7mxidl",
        "list map inet sallyport c6-fvzr3fv7ym7l",
        "list map inet sallyport snat4",
        "list map inet sallyport snat6",
        "",
      ].join("\n"),
    );
    assert.deepEqual(elements(counters), elements(parseNftClassCounters(NFT_INTERACTIVE, [4, 6])));
  });

  it("reads nothing more when there is no class map (no table, or no policy here)", async () => {
    const { runner, calls } = host();
    const none = new NftCounters(
      {
        run: async (argv, options) =>
          argv.includes("-t")
            ? { code: 0, stdout: '{"nftables": [{"metainfo": {"version": "1.0.6"}}]}', stderr: "" }
            : runner.run(argv, options),
      },
      { families: [4, 6] },
    );
    assert.deepEqual(await none.read(), []);
    assert.deepEqual(calls, []);
  });

  it("takes a map deleted meanwhile as absent, and fails on any other error", async () => {
    const gone = host(() => ({
      code: 0,
      stdout: NFT_INTERACTIVE.split("\n").slice(1).join("\n"),
      stderr:
        "Error: No such file or directory\nlist map inet sallyport c4-dgfl7d7mxidl\n                        ^^^^^^^^^^^^^^^\n",
    }));
    const counters = await new NftCounters(gone.runner, { families: [4, 6] }).read();
    assert.ok(counters.length > 0 && counters.every((c) => c.family === 6));
    const denied = host(() => ({
      code: 0,
      stdout: "",
      stderr: "Error: Operation not permitted\nlist map inet sallyport snat4\n",
    }));
    await assert.rejects(
      new NftCounters(denied.runner, { families: [4, 6] }).read(),
      /Cannot run env HOME=\/dev\/null nft -j -i: exit 1: Error: Operation not permitted/,
    );
  });

  it("falls back to one `list maps` when nft has no interactive CLI, and stays there", async () => {
    const { runner, calls } = host(() => ({
      code: 1,
      stdout: "",
      stderr: "nft: interactive CLI not supported in this build\n",
    }));
    const source = new NftCounters(runner, { families: [4, 6] });
    const counters = await source.read();
    await source.read();
    assert.deepEqual(
      calls.map((c) => c.argv),
      [
        "nft -t -j list maps inet",
        "env HOME=/dev/null nft -j -i",
        "nft -j list maps inet",
        "nft -t -j list maps inet",
        "nft -j list maps inet",
      ],
    );
    assert.deepEqual(counters, parseNftClassCounters(NFT_MAPS, [4, 6]));
  });

  it(`lists all maps at once beyond ${INTERACTIVE_MAX_MAPS} classes (each interactive list costs more)`, async () => {
    const many = JSON.stringify({
      nftables: Array.from({ length: INTERACTIVE_MAX_MAPS + 1 }, (_, i) => ({
        map: { family: "inet", name: `c4-${i}`, table: "sallyport" },
      })),
    });
    const { runner, calls } = host();
    await new NftCounters(
      {
        run: async (argv, options) =>
          argv.includes("-t") ? { code: 0, stdout: many, stderr: "" } : runner.run(argv, options),
      },
      { families: [4] },
    ).read();
    assert.deepEqual(
      calls.map((c) => c.argv),
      ["nft -j list maps inet"],
    );
  });
});
