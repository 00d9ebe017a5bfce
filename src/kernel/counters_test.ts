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
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import { IptablesCounters, parseIptablesCounters, type RuleCounter } from "./counters.ts";
import type { Runner } from "./runner.ts";

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
