/**
 * The nftables datapath on real kernels, in network namespaces: the same lab and the same
 * promises as the iptables datapath (test/kernel/datapath_test.ts): exact state, foreign state
 * untouched byte for byte (iptables-nft's tables and a kube-proxy nftables table included), real
 * packets in both families, drift repaired, a restart adopting the state, cleanup.
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { planToJSON } from "../../src/engine/plan.ts";
import { mustRun } from "../../src/kernel/runner.ts";
import { nodeAddress, nsRunner } from "../../src/sandbox/topology.ts";
import {
  DatapathLab,
  EIP4,
  EIP6,
  EXCLUDED4,
  EXCLUDED6,
  ext4,
  ext6,
  itSteersPodsTheGatewayHasNotHeardOf,
} from "../support/datapath_lab.ts";
import { hostState, NEEDS_ROOT, probe, REPO, startIn, stopAll, stream } from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

/** The ruleset without our table: what must never change. */
function foreign(nft: string): string {
  const start = nft.indexOf("table inet sallyport {");
  if (start < 0) return nft;
  const end = nft.indexOf("\n}\n", start);
  return nft.slice(0, start) + nft.slice(end + 3);
}

describe("nftables datapath in network namespaces", { skip: NEEDS_ROOT }, () => {
  const lab = new DatapathLab("nftables", "n");
  const topo = lab.topo;

  before(async () => {
    await lab.up();
    for (const i of [2, 1]) assert.ok((await lab.syncNode(i)) > 0);
  });

  after(async () => {
    await stopAll();
    await lab.down();
  });

  itSteersPodsTheGatewayHasNotHeardOf(lab);

  it("holds the plan exactly: a second sync changes nothing", async () => {
    for (const i of [1, 2]) assert.equal(await lab.syncNode(i), 0, `node-${i}`);
  });

  it("classifies with a constant number of rules: one table, three lookups per packet", async () => {
    const ruleset = await mustRun(nsRunner(topo.nodeNs(1)), [
      "nft",
      "list",
      "table",
      "inet",
      "sallyport",
    ]);
    assert.match(ruleset, /meta priority set ip saddr map @src4 meta priority vmap @cls4/);
    assert.match(ruleset, /ip daddr \. meta l4proto \. th dport vmap @c4-/);
    assert.doesNotMatch(
      await mustRun(nsRunner(topo.nodeNs(1)), ["iptables-save"]),
      /SALLYPORT/,
      "no iptables rule of ours",
    );
    assert.doesNotMatch(await mustRun(nsRunner(topo.nodeNs(1)), ["ipset", "save"]), /sallyport/);
  });

  it("keeps every rule, set, table and rule it does not own", async () => {
    const now = await hostState(topo.nodeNs(2));
    const before = lab.baseline.get(2)!;
    assert.equal(now.iptables, before.iptables, "iptables-nft's rules, byte for byte");
    assert.equal(now.ip6tables, before.ip6tables);
    assert.equal(now.ipset, before.ipset);
    assert.equal(foreign(now.nft), before.nft, "every other nftables table, kube-proxy's included");
    assert.match(now.rules4, /100:\s+from all fwmark 0x1 lookup 100/);
    assert.match(now.routes4, /10\.99\.0\.0\/16 dev eth0 table 100/);
  });

  it("IPv4: the external server sees the egress IP from a pod on a non-gateway node and on the gateway", async () => {
    const fromWeb1 = await probe(topo.pod("web-1").netns, ext4);
    assert.equal(fromWeb1.ok, true, fromWeb1.error);
    assert.equal(fromWeb1.saw, EIP4);
    assert.equal((await probe(topo.pod("web-2").netns, ext4)).saw, EIP4);
    assert.equal((await probe(topo.pod("web-1").netns, ext4, { udp: true })).saw, EIP4, "UDP too");
  });

  it("IPv6: the same, with the IPv6 egress IP", async () => {
    assert.equal((await probe(topo.pod("web-1").netns, ext6)).saw, EIP6);
    assert.equal((await probe(topo.pod("web-2").netns, ext6)).saw, EIP6);
  });

  it("a pod the policy does not select is seen with its node's address (the CNI's masquerade)", async () => {
    assert.equal((await probe(topo.pod("other").netns, ext4)).saw, nodeAddress(1, 4));
    assert.equal((await probe(topo.pod("other").netns, ext6)).saw, nodeAddress(1, 6));
  });

  it("an excluded destination and pod-to-pod traffic keep their usual path", async () => {
    assert.equal(
      (await probe(topo.pod("web-1").netns, `${EXCLUDED4}:8080`)).saw,
      nodeAddress(1, 4),
    );
    assert.equal(
      (await probe(topo.pod("web-1").netns, `[${EXCLUDED6}]:8080`)).saw,
      nodeAddress(1, 6),
    );
    const t = topo.pod("target");
    assert.equal(
      (await probe(topo.pod("web-1").netns, `${t.ips[4]}:8080`)).saw,
      topo.pod("web-1").ips[4],
    );
  });

  it("counts the packets each policy steers, per entry of its class", async () => {
    const before = await mustRun(nsRunner(topo.nodeNs(1)), [
      "nft",
      "-j",
      "list",
      "table",
      "inet",
      "sallyport",
    ]);
    const packets = (json: string) =>
      (JSON.stringify(JSON.parse(json)).match(/"packets":(\d+)/g) ?? [])
        .map((m) => Number(m.split(":")[1]))
        .reduce((a, b) => a + b, 0);
    await probe(topo.pod("web-1").netns, ext4);
    const after = await mustRun(nsRunner(topo.nodeNs(1)), [
      "nft",
      "-j",
      "list",
      "table",
      "inet",
      "sallyport",
    ]);
    assert.ok(packets(after) > packets(before), "the class map's counters grew");
  });

  it("the egress IP answers neighbour discovery: a router's unicast probe keeps it reachable", async () => {
    assert.equal(await lab.probeEgressNeighbour(), "REACHABLE");
  });

  it("the egress IP exposes no service of the gateway node", async () => {
    startIn(topo.nodeNs(2), [
      process.execPath,
      join(REPO, "src", "sandbox", "echo.ts"),
      "serve",
      "--port",
      "9090",
    ]);
    await new Promise((r) => setTimeout(r, 500));
    assert.equal((await probe(topo.externalNs, `${nodeAddress(2, 4)}:9090`)).ok, true);
    const viaEip = await probe(topo.externalNs, `${EIP4}:9090`, { timeoutMs: 800 });
    assert.equal(viaEip.ok, false, "a new connection to the egress IP is dropped");
  });

  const drifts: [string, number, string[], string?][] = [
    ["a flushed chain", 1, ["nft", "flush", "chain", "inet", "sallyport", "prerouting"]],
    ["a deleted source element", 1, ["nft", "-f", "-"], "flush map inet sallyport src4\n"],
    ["a flushed map of class ids", 1, ["nft", "flush", "map", "inet", "sallyport", "cls4"]],
    ["a flushed class map", 1, ["nft", "flush", "map", "inet", "sallyport", "$CLASS"]],
    ["a flushed verdict chain", 1, ["nft", "flush", "chain", "inet", "sallyport", "$STEER"]],
    ["a deleted table", 2, ["nft", "delete", "table", "inet", "sallyport"]],
    ["a deleted ip rule", 1, ["ip", "rule", "del", "pref", "5900"]],
    ["a deleted tunnel device", 1, ["ip", "link", "del", "sallyport"]],
  ];
  for (const [what, index, argv, stdin] of drifts) {
    it(`repairs ${what} and traffic flows again`, async () => {
      const r = nsRunner(topo.nodeNs(index));
      const table = await mustRun(r, ["nft", "list", "table", "inet", "sallyport"]);
      const names: Record<string, string> = {
        $CLASS: /map (c4-\w+) \{/.exec(table)?.[1] ?? "",
        $STEER: /chain (to-[\w-]+) \{/.exec(table)?.[1] ?? "",
      };
      await mustRun(
        r,
        argv.map((a) => names[a] ?? a),
        stdin === undefined ? {} : { stdin },
      );
      assert.ok((await lab.syncNode(index)) > 0, "the sync found and repaired the drift");
      assert.equal(await lab.syncNode(index), 0, "and then holds the plan again");
      assert.equal((await probe(topo.pod("web-1").netns, ext4)).saw, EIP4);
    });
  }

  it("reads the table tersely between element listings (as the agent does): it holds the plan, a flushed chain is repaired, a flushed class map waits for the listing", async () => {
    const r = nsRunner(topo.nodeNs(1));
    const { dp, advance, fullSync } = await lab.listingOnceAMinute(1);
    assert.equal(await fullSync(), 0, "adopted: the first read lists all");
    const state = await dp.read();
    assert.ok(state.nft !== undefined && state.nft.sets.size > 0);
    assert.ok(
      [...state.nft.sets.values()].every((x) => x.elements === undefined),
      "the next read is terse",
    );
    assert.equal((await dp.sync(lab.planWith(1, state), { state })).changes, 0);
    const table = await mustRun(r, ["nft", "list", "table", "inet", "sallyport"]);
    const classMap = /map (c4-\w+) \{/.exec(table)?.[1] ?? "";
    await mustRun(r, ["nft", "flush", "chain", "inet", "sallyport", "prerouting"]);
    await mustRun(r, ["nft", "flush", "map", "inet", "sallyport", classMap]);
    assert.ok((await fullSync()) > 0, "the flushed chain");
    assert.notEqual((await probe(topo.pod("web-1").netns, ext4)).saw, EIP4, "the map is empty");
    advance(60_000);
    assert.ok((await fullSync()) > 0, "the listing found the map");
    assert.equal((await probe(topo.pod("web-1").netns, ext4)).saw, EIP4);
    assert.equal(await lab.syncNode(1), 0, "the lab's datapath sees the same table");
  });

  for (const partial of [false, true])
    it(`a deleted policy takes its class and its steering chain with it in one transaction (${partial ? "partial" : "full"} sync)`, async () => {
      const dp = lab.datapaths.get(1)!;
      const r = nsRunner(topo.nodeNs(1));
      const without = { ...lab.snap, policies: [] };
      const report = await dp.sync(lab.planWith(1, await dp.read(), without), { partial });
      assert.ok(report.changes > 0);
      const table = await mustRun(r, ["nft", "list", "table", "inet", "sallyport"]);
      assert.doesNotMatch(table, /c4-|c6-|to-\d+/, "no class and no steering chain left");
      assert.equal((await probe(topo.pod("web-1").netns, ext4)).saw, nodeAddress(1, 4));
      assert.ok((await lab.syncNode(1)) > 0, "the policy again");
      assert.equal((await probe(topo.pod("web-1").netns, ext4)).saw, EIP4);
    });

  it("a new agent process adopts the state without changing it, and an established TCP connection survives", async () => {
    const summary = stream(topo.pod("web-1").netns, ext4, 3);
    await new Promise((r) => setTimeout(r, 800));
    for (const i of [2, 1]) {
      const file = join(tmpdir(), `${TMP_PREFIX}${process.pid}-nftplan-${i}.json`);
      writeFileSync(file, planToJSON(await lab.planFor(i)));
      try {
        const out = await mustRun(nsRunner(topo.nodeNs(i)), [
          process.execPath,
          join(REPO, "src", "cli", "main.ts"),
          "datapath",
          "apply",
          "--plan",
          file,
        ]);
        assert.equal(JSON.parse(out).changes, 0, `node-${i}: the new process changed nothing`);
      } finally {
        await mustRun(nsRunner(topo.nodeNs(i)), ["rm", "-f", file]);
      }
    }
    const result = await summary;
    assert.equal(result.reset, false);
    assert.equal(result.echoed, result.sent, "every line came back");
    assert.deepEqual(result.sources, [EIP4]);
  });

  it("cleanup removes everything it created and nothing else", async () => {
    for (const i of [1, 2]) {
      await mustRun(nsRunner(topo.nodeNs(i)), [
        process.execPath,
        join(REPO, "src", "cli", "main.ts"),
        "cleanup",
      ]);
      assert.deepEqual(
        await hostState(topo.nodeNs(i)),
        lab.baseline.get(i),
        `node-${i} is as before the agent ran`,
      );
    }
    assert.equal((await probe(topo.pod("web-1").netns, ext4)).saw, nodeAddress(1, 4));
  });
});
