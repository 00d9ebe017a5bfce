/**
 * The kernel fence (src/kernel/neighbour_fence.ts) with the real nft, in a network namespace of
 * its own: what the agent renews stays in the sets past its first deadline (a renewal moves the
 * deadline, whichever way this kernel lets it), what it stops renewing lapses by itself, and a
 * release empties the sets at once.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { FENCE_TABLE, NeighbourFence, updatesExpiry } from "../../src/kernel/neighbour_fence.ts";
import { ExecRunner, mustRun } from "../../src/kernel/runner.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { nsRunner } from "../../src/sandbox/topology.ts";
import { eventually } from "../support/kube.ts";
import { NEEDS_ROOT, uniquePrefix } from "../support/lab.ts";

const HELD = [
  { device: "spe-a4", address: "192.0.2.10" },
  { device: "spe-a6", address: "2001:db8::10" },
];

describe("the neighbour fence's sets", { skip: NEEDS_ROOT }, () => {
  const ns = `${uniquePrefix("nf")}-n`;
  const host = new ExecRunner();
  const inNs = nsRunner(ns);

  before(async () => {
    await mustRun(host, ["ip", "netns", "add", ns]);
  });
  after(async () => {
    for (const f of fences) await f.close();
    await host.run(["ip", "netns", "del", ns]);
  });

  /** Per set, its elements and the ms each has left (both tables listed at once). */
  const left = async (): Promise<Record<string, Record<string, number>>> => {
    const listed = await Promise.all(
      ["arp", "inet"].map(
        async (family) =>
          JSON.parse(await mustRun(inNs, ["nft", "-j", "list", "table", family, FENCE_TABLE])) as {
            nftables: {
              set?: {
                family: string;
                name: string;
                elem?: { elem: { val: string; expires?: number } }[];
              };
            }[];
          },
      ),
    );
    const out: Record<string, Record<string, number>> = {};
    for (const o of listed.flatMap((l) => l.nftables)) {
      if (o.set === undefined || o.set.name === "eips4") continue;
      out[`${o.set.family} ${o.set.name}`] = Object.fromEntries(
        (o.set.elem ?? []).map((e) => [e.elem.val, (e.elem.expires ?? 0) * 1000]),
      );
    }
    return out;
  };
  const fences: NeighbourFence[] = [];
  const fence = async (updates?: boolean) => {
    const f = new NeighbourFence({
      runner: inNs,
      log: silentLogger,
      ...(updates === undefined ? {} : { updatesExpiry: updates }),
    });
    fences.push(f);
    await f.install();
    return f;
  };

  it("finds out whether this kernel updates an element's expiry, leaving no trace of asking", async () => {
    await fence();
    const updates = await updatesExpiry(inNs);
    assert.equal(typeof updates, "boolean");
    assert.deepEqual(await left(), { "arp heldif": {}, "inet heldif": {}, "arp held4": {} });
  });

  const ways = {
    "as found out": undefined,
    "expiry updated in place": true,
    "delete and add in one transaction": false,
  };
  for (const [way, updates] of Object.entries(ways))
    it(`a renewal moves the deadline (${way}); what is not renewed lapses; a release empties the sets`, async (t) => {
      const f = await fence(updates);
      if (updates === true && !(await updatesExpiry(inNs)))
        return t.skip("this kernel does not update an element's expiry");
      f.hold(HELD, 4000);
      const first = await eventually(left, (l) => l["arp held4"]!["192.0.2.10"] !== undefined);
      assert.deepEqual(Object.keys(first["inet heldif"]!).sort(), ["spe-a4", "spe-a6"]);
      assert.deepEqual(Object.keys(first["arp held4"]!), ["192.0.2.10"], "IPv4 addresses only");
      await new Promise((r) => setTimeout(r, 2500));
      // Renewed past halfway: 4 s to live again, not the 1.5 s left of the first deadline.
      // Without the renewal no element ever has more than 1.5 s left: no tight deadline.
      f.hold(HELD, 4000);
      const all = (l: Record<string, Record<string, number>>) =>
        Object.values(l).flatMap((set) => Object.values(set));
      const renewed = await eventually(
        left,
        (l) => all(l).length === 5 && all(l).every((ms) => ms > 2500),
        10_000,
      );
      assert.deepEqual(
        Object.fromEntries(Object.entries(renewed).map(([set, e]) => [set, Object.keys(e).sort()])),
        {
          "arp heldif": ["spe-a4", "spe-a6"],
          "arp held4": ["192.0.2.10"],
          "inet heldif": ["spe-a4", "spe-a6"],
        },
        "every element is still there",
      );
      for (const [set, elements] of Object.entries(renewed))
        for (const [e, ms] of Object.entries(elements))
          assert.ok(ms > 2500, `${set} ${e}: ${ms} ms left after the renewal, not ~1500`);
      // Only one of them renewed, shortly: the other lapses at its deadline, this one at its own.
      f.hold([HELD[0]!], 300);
      const lapsed = await eventually(
        left,
        (l) => Object.keys(l["inet heldif"]!).length === 0,
        8000,
      );
      assert.deepEqual(lapsed["inet heldif"], {}, "each lapsed at its own deadline");
      f.hold(HELD, 60_000);
      await eventually(left, (l) => Object.keys(l["inet heldif"]!).length === 2);
      f.release();
      // (Told in one transaction: once it is, every set is empty; the two tables are listed apart.)
      await f.close();
      assert.deepEqual(
        await left(),
        { "arp heldif": {}, "arp held4": {}, "inet heldif": {} },
        "released at once",
      );
    });

  it("tells the kernel only what is due: a renewal with more than half its time left spawns nothing; an earlier end, other egress IPs and a release do", async () => {
    const f = await fence();
    const told = async () => {
      await f.close();
      return f.transactions;
    };
    f.hold(HELD, 10_000);
    const first = await told();
    f.hold(HELD, 10_000);
    assert.equal(await told(), first, "nothing new to say");
    f.hold(HELD, 1_000);
    assert.equal(await told(), first + 1, "an earlier end is said at once");
    const left1 = await left();
    assert.ok(left1["arp held4"]!["192.0.2.10"]! <= 1000, "and the kernel has it");
    f.hold([HELD[0]!], 1_000);
    assert.equal(await told(), first + 2, "other egress IPs");
    f.release();
    assert.equal(await told(), first + 3, "a release");
    assert.deepEqual(await left(), { "arp heldif": {}, "arp held4": {}, "inet heldif": {} });
  });

  it("a renewal asked while another is being told waits, and only the newest is told, with the time it has left when it is", async () => {
    const f = await fence();
    const before = f.transactions;
    for (let i = 1; i <= 20; i++) f.hold(i % 2 === 0 ? HELD : [HELD[0]!], 3000 - i);
    await f.close();
    assert.equal(f.transactions - before, 2, "the first, then only the last of the 19 that waited");
    const l = await left();
    assert.deepEqual(Object.keys(l["inet heldif"]!).sort(), ["spe-a4", "spe-a6"]);
    f.release();
    await f.close();
  });
});
