/** Placement of egress IPs on gateway nodes. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import {
  type GatewayNodes,
  type Member,
  Placement,
  rendezvousScore,
  STANDBY_NODES,
} from "./placement.ts";

const EDGE: GatewayNodes = { nodeSelector: { matchLabels: { egress: "true" } }, failback: false };
const gw = { egress: "true" };

function member(key: string, day: number, options: Partial<Member> = {}): Member {
  return {
    key,
    createdAt: `2026-01-0${day}T00:00:00Z`,
    gateway: "edge",
    iface: undefined,
    addresses: [`10.0.0.${day}`],
    shared: false,
    ...options,
  };
}

/** A placement with gateway "edge" on nodes a, b, c (all usable). */
function setup(failback = false): Placement {
  const p = new Placement();
  p.setGateway("edge", { ...EDGE, failback });
  for (const n of ["a", "b", "c"]) {
    p.setNode(n, gw);
    p.setUsable(n, true);
  }
  return p;
}

const nowhere = () => undefined;

/** Nodes by descending rendezvous score, ties by name: a unit's rendezvous order. */
function rendezvous(unitKey: string, nodes: Iterable<string>): string[] {
  return [...nodes].sort((a, b) => {
    const d = rendezvousScore(unitKey, b) - rendezvousScore(unitKey, a);
    return d !== 0 ? d : a < b ? -1 : 1;
  });
}

describe("Placement", () => {
  it("spreads units over the least loaded candidates, in unit key order", () => {
    const p = setup();
    for (let i = 1; i <= 4; i++) p.setMember(`p${i}`, member(`p${i}`, i));
    assert.deepEqual([...p.place(nowhere)].sort(), ["p1", "p2", "p3", "p4"]);
    assert.deepEqual(
      ["p1", "p2", "p3", "p4"].map((k) => p.nodeOf(k)),
      ["a", "b", "c", "a"],
    );
    assert.deepEqual([...p.place(nowhere)], [], "nothing changed, nothing placed");
  });

  it("moves only the units of a lost node, keeps everything else, and does not move them back", () => {
    const p = setup();
    for (let i = 1; i <= 6; i++) p.setMember(`p${i}`, member(`p${i}`, i));
    p.place(nowhere);
    const before = new Map([1, 2, 3, 4, 5, 6].map((i) => [`p${i}`, p.nodeOf(`p${i}`)]));
    p.setUsable("b", false);
    const moved = p.place((k) => before.get(k));
    assert.deepEqual([...moved].sort(), ["p2", "p5"], "only the units that were on b");
    for (const [k, n] of before) if (n !== "b") assert.equal(p.nodeOf(k), n, k);
    assert.ok(["a", "c"].includes(p.nodeOf("p2")!));
    const after = new Map([...before.keys()].map((k) => [k, p.nodeOf(k)]));
    p.setUsable("b", true);
    assert.deepEqual([...p.place((k) => after.get(k))], [], "without failback nothing moves back");
  });

  it("places units that had no candidate when a node comes back", () => {
    const p = new Placement();
    p.setGateway("edge", EDGE);
    p.setMember("x", member("x", 1));
    p.place(nowhere);
    assert.equal(p.nodeOf("x"), undefined);
    p.setNode("a", gw);
    assert.deepEqual([...p.place(nowhere)], [], "not usable yet (no live agent)");
    p.setUsable("a", true);
    assert.deepEqual([...p.place(nowhere)], ["x"]);
    assert.equal(p.nodeOf("x"), "a");
  });

  it("with failback, returns a unit to its rendezvous winner when that node recovers", () => {
    const p = setup(true);
    for (let i = 1; i <= 6; i++) p.setMember(`p${i}`, member(`p${i}`, i));
    p.place(nowhere);
    const home = new Map([1, 2, 3, 4, 5, 6].map((i) => [`p${i}`, p.nodeOf(`p${i}`)!]));
    const victim = home.get("p1")!;
    p.setUsable(victim, false);
    p.place(nowhere);
    assert.notEqual(p.nodeOf("p1"), victim);
    p.setUsable(victim, true);
    const back = p.place(nowhere);
    for (const [k, n] of home) assert.equal(p.nodeOf(k), n, `${k} is home again`);
    for (const k of back) assert.equal(home.get(k), victim, "only the units of the recovered node");
  });

  it("keeps policies sharing an address on one node, and splits them when the link goes", () => {
    const p = setup();
    p.setMember("p1", member("p1", 1));
    p.setMember("x", member("x", 2, { addresses: ["10.9.0.1"], shared: true }));
    p.setMember("y", member("y", 3, { addresses: ["10.9.0.1", "fd00:9::1"], shared: true }));
    p.setMember("z", member("z", 4, { addresses: ["fd00:9::1"], shared: true }));
    p.place(nowhere);
    assert.equal(p.nodeOf("x"), p.nodeOf("y"));
    assert.equal(p.nodeOf("y"), p.nodeOf("z"));
    p.setMember("y", undefined);
    const placed = p.place((k) => (k === "y" ? undefined : p.nodeOf(k)));
    assert.deepEqual([...placed].sort(), ["x", "z"], "both halves are placed again");
  });

  it("policies joining and leaving a shared address's unit move nothing and report only themselves", () => {
    const p = setup();
    const shared = (key: string, day: number) =>
      member(key, day, { addresses: ["10.9.0.1"], shared: true });
    p.setMember("p1", member("p1", 1));
    p.setMember("s0", shared("s0", 2));
    p.place(nowhere);
    const node = p.nodeOf("s0");
    const last = (k: string) => p.nodeOf(k);
    for (const [i, day] of [3, 5, 4, 3].entries()) {
      p.setMember(`s${i + 1}`, shared(`s${i + 1}`, day));
      assert.deepEqual([...p.place(last)], [`s${i + 1}`], "only the newcomer is placed");
      assert.equal(p.nodeOf(`s${i + 1}`), node);
    }
    p.setMember("s2", undefined);
    assert.deepEqual([...p.place(last)], [], "a member leaving moves nobody");
    assert.equal(p.nodeOf("s2"), undefined);
    assert.deepEqual([...p.placedOn(node!)].sort(), ["s0", "s1", "s3", "s4"]);
    // The oldest leaving hands the unit to the next oldest, on the same node.
    p.setMember("s0", undefined);
    assert.deepEqual([...p.place(last)].sort(), ["s1", "s3", "s4"]);
    assert.deepEqual([...p.placedOn(node!)].sort(), ["s1", "s3", "s4"]);
    // An older newcomer is the unit's oldest: the unit is built again.
    p.setMember("s5", shared("s5", 2));
    assert.deepEqual([...p.place(last)].sort(), ["s1", "s3", "s4", "s5"]);
    assert.equal(p.nodeOf("s5"), node);
  });

  it("places interface units only on nodes that report the interface", () => {
    const p = setup();
    p.setMember("i", member("i", 1, { iface: "eth1", addresses: [] }));
    p.place(nowhere);
    assert.equal(p.nodeOf("i"), undefined);
    p.setInterfaces("c", new Set(["eth1"]));
    p.place(nowhere);
    assert.equal(p.nodeOf("i"), "c");
    p.setInterfaces("c", new Set());
    p.place((k) => (k === "i" ? "c" : undefined));
    assert.equal(p.nodeOf("i"), undefined);
  });

  it("lists the next nodes of each unit's rendezvous order, without its holder, as standby", () => {
    const p = new Placement();
    p.setGateway("edge", EDGE);
    const nodes = ["a", "b", "c", "d", "e", "f"];
    for (const n of nodes) {
      p.setNode(n, gw);
      p.setUsable(n, true);
    }
    for (let i = 1; i <= 9; i++) p.setMember(`p${i}`, member(`p${i}`, i));
    p.place(nowhere);
    for (let i = 1; i <= 9; i++) {
      const holder = p.nodeOf(`p${i}`)!;
      const order = rendezvous(`10.0.0.${i}`, nodes).filter((n) => n !== holder);
      assert.deepEqual(p.standbyOf(`p${i}`), order.slice(0, STANDBY_NODES), `p${i}`);
    }
    assert.deepEqual(p.standbyOf("nobody"), []);
  });

  it("moves the unit of a lost node to its first live standby, not to the least loaded node", () => {
    const p = new Placement();
    p.setGateway("edge", EDGE);
    const nodes = ["a", "b", "c", "d", "e"];
    for (const n of nodes) {
      p.setNode(n, gw);
      p.setUsable(n, true);
    }
    for (let i = 1; i <= 9; i++) p.setMember(`p${i}`, member(`p${i}`, i));
    p.place(nowhere);
    for (let i = 1; i <= 9; i++) {
      const key = `p${i}`;
      const q = new Placement();
      q.setGateway("edge", EDGE);
      for (const n of nodes) {
        q.setNode(n, gw);
        q.setUsable(n, true);
      }
      for (let j = 1; j <= 9; j++) q.setMember(`p${j}`, member(`p${j}`, j));
      q.place(nowhere);
      const [holder, published] = [q.nodeOf(key)!, q.standbyOf(key)];
      const snapshot = () => {
        const nodeOf = new Map(
          [1, 2, 3, 4, 5, 6, 7, 8, 9].map((j) => [`p${j}`, q.nodeOf(`p${j}`)]),
        );
        return (k: string) => nodeOf.get(k);
      };
      let last = snapshot();
      q.setUsable(holder, false);
      q.place(last);
      assert.equal(q.nodeOf(key), published[0], `${key} goes to its first standby`);
      assert.ok(!q.standbyOf(key).includes(published[0]!), "the new holder is no standby");
      // The new holder dies too before anything else changes: the next one of the list.
      last = snapshot();
      q.setUsable(published[0]!, false);
      q.place(last);
      assert.equal(q.nodeOf(key), published[1], `${key} then goes to its second standby`);
    }
  });

  it("changes a standby list only where a joining or leaving node ranks, and spreads standby duty", () => {
    const p = new Placement();
    p.setGateway("edge", EDGE);
    const nodes = Array.from({ length: 8 }, (_, i) => `node-${i}`);
    for (const n of nodes) {
      p.setNode(n, gw);
      p.setUsable(n, true);
    }
    const keys = Array.from({ length: 400 }, (_, i) => `k${i}`);
    for (const k of keys)
      p.setMember(k, member(k, 1, { addresses: [`10.1.${k.length}.${k}`], shared: false }));
    p.place(nowhere);
    const firstStandby = new Map<string, number>();
    for (const k of keys) {
      const s = p.standbyOf(k);
      firstStandby.set(s[0]!, (firstStandby.get(s[0]!) ?? 0) + 1);
    }
    // 400 lists over 8 nodes: each node is the first standby of about 50.
    for (const n of nodes) assert.ok((firstStandby.get(n) ?? 0) >= 25, `${n} is a first standby`);
    const before = new Map(keys.map((k) => [k, [...p.standbyOf(k)]]));
    const nodeOf = new Map(keys.map((k) => [k, p.nodeOf(k)]));
    const last = (k: string) => nodeOf.get(k);
    p.setNode("node-8", gw);
    p.setUsable("node-8", true);
    assert.deepEqual([...p.place(last)], [], "a node joining places nothing (without failback)");
    const changed = [...p.standbyChanged()];
    for (const k of keys) {
      const now = p.standbyOf(k);
      if (!changed.includes(k)) {
        assert.deepEqual(now, before.get(k), `${k}: only reported lists change`);
        continue;
      }
      assert.ok(now.includes("node-8"), `${k}: a list changes only to take the new node in`);
      assert.deepEqual(
        now.filter((n) => n !== "node-8"),
        before.get(k)!.slice(0, now.length - 1),
        `${k}: the others keep their order`,
      );
    }
    // About (STANDBY_NODES) / 8 of the lists take the new node in, not all of them.
    assert.ok(changed.length > 0 && changed.length < keys.length / 2, `${changed.length} changed`);
    p.setUsable("node-8", false);
    p.place(last);
    for (const k of keys) assert.deepEqual(p.standbyOf(k), before.get(k), `${k}: back as it was`);
  });

  it("places incrementally where a fresh placement from the previous result places", () => {
    const NODES = ["a", "b", "c", "d"];
    const arbStep = fc.oneof(
      fc.record({
        t: fc.constant("member" as const),
        key: fc.constantFrom("p1", "p2", "p3", "p4", "p5", "p6"),
        day: fc.integer({ min: 1, max: 6 }),
        gateway: fc.constantFrom("edge", "alt"),
        address: fc.constantFrom(undefined, "10.0.0.1", "10.0.0.2", "10.0.0.3"),
        iface: fc.constantFrom(undefined, undefined, "eth1"),
        remove: fc.boolean(),
      }),
      fc.record({
        t: fc.constant("node" as const),
        name: fc.constantFrom(...NODES),
        labels: fc.constantFrom({ egress: "true" }, { zone: "b" }, { egress: "true", zone: "b" }),
        usable: fc.boolean(),
        eth1: fc.boolean(),
        remove: fc.boolean(),
      }),
      fc.record({ t: fc.constant("gateway" as const), failback: fc.boolean(), alt: fc.boolean() }),
    );
    fc.assert(
      fc.property(fc.array(fc.array(arbStep, { maxLength: 3 }), { maxLength: 15 }), (steps) => {
        const p = new Placement();
        const members = new Map<string, Member>();
        const nodes = new Map<
          string,
          { labels: Record<string, string>; usable: boolean; eth1: boolean }
        >();
        const gateways = new Map<string, GatewayNodes>([
          ["edge", EDGE],
          ["alt", { nodeSelector: { matchLabels: { zone: "b" } }, failback: true }],
        ]);
        for (const [name, spec] of gateways) p.setGateway(name, spec);
        let last = new Map<string, string | undefined>();
        let lastStandby = new Map<string, readonly string[]>();
        for (const step of steps) {
          for (const s of step) {
            if (s.t === "member") {
              const m = s.remove
                ? undefined
                : member(s.key, s.day, {
                    gateway: s.gateway,
                    iface: s.address === undefined ? s.iface : undefined,
                    addresses: s.address === undefined ? [] : [s.address],
                    shared: s.address !== undefined,
                  });
              if (m === undefined) members.delete(s.key);
              else members.set(s.key, m);
              p.setMember(s.key, m);
            } else if (s.t === "node") {
              if (s.remove) {
                nodes.delete(s.name);
                p.setNode(s.name, undefined);
                continue;
              }
              nodes.set(s.name, s);
              p.setNode(s.name, s.labels);
              p.setUsable(s.name, s.usable);
              p.setInterfaces(s.name, new Set(s.eth1 ? ["eth1"] : []));
            } else {
              const spec = s.alt
                ? { nodeSelector: { matchLabels: { zone: "b" } }, failback: s.failback }
                : { ...EDGE, failback: s.failback };
              gateways.set(s.alt ? "alt" : "edge", spec);
              p.setGateway(s.alt ? "alt" : "edge", spec);
            }
          }
          const previous = last;
          const placed = p.place((k) => previous.get(k));
          const fresh = new Placement();
          for (const [name, spec] of gateways) fresh.setGateway(name, spec);
          for (const [name, n] of nodes) {
            fresh.setNode(name, n.labels);
            fresh.setUsable(name, n.usable);
            fresh.setInterfaces(name, new Set(n.eth1 ? ["eth1"] : []));
          }
          for (const [k, m] of members) fresh.setMember(k, m);
          fresh.place((k) => previous.get(k));
          const previousStandby = lastStandby;
          last = new Map([...members.keys()].map((k) => [k, p.nodeOf(k)]));
          lastStandby = new Map([...members.keys()].map((k) => [k, p.standbyOf(k)]));
          const reported = new Set([...placed, ...p.standbyChanged()]);
          for (const k of members.keys()) {
            assert.equal(p.nodeOf(k), fresh.nodeOf(k), k);
            assert.deepEqual(p.standbyOf(k), fresh.standbyOf(k), `${k}: standby`);
          }
          for (const [k, m] of members) {
            // The unit's key, gateway and interface: its oldest member's (one address at most).
            const unit = [...members.values()]
              .filter((o) => o === m || (m.shared && o.shared && o.addresses[0] === m.addresses[0]))
              .sort((a, b) =>
                a.createdAt !== b.createdAt
                  ? a.createdAt < b.createdAt
                    ? -1
                    : 1
                  : a.key < b.key
                    ? -1
                    : 1,
              )[0]!;
            const spec = gateways.get(unit.gateway)!;
            const label = Object.entries(spec.nodeSelector.matchLabels ?? {})[0]!;
            const candidates = [...nodes]
              .filter(
                ([, n]) =>
                  n.usable &&
                  n.labels[label[0]] === label[1] &&
                  (unit.iface === undefined || n.eth1),
              )
              .map(([name]) => name);
            const order = rendezvous(unit.addresses[0] ?? unit.key, candidates);
            const holder = p.nodeOf(k);
            if (holder === undefined) assert.deepEqual(p.standbyOf(k), [], k);
            else
              assert.deepEqual(
                p.standbyOf(k),
                order.filter((n) => n !== holder).slice(0, STANDBY_NODES),
                `${k}: the rendezvous order without the holder`,
              );
            const was = previous.get(k);
            if (holder !== undefined && was !== undefined && !candidates.includes(was))
              assert.equal(holder, order[0], `${k}: a lost holder's unit goes to the winner`);
            if (
              holder === was &&
              holder !== undefined &&
              !reported.has(k) &&
              previousStandby.has(k)
            )
              assert.deepEqual(p.standbyOf(k), previousStandby.get(k), `${k}: reported`);
          }
        }
      }),
    );
  });
});
