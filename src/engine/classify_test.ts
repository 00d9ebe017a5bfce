/**
 * Classification: the disjoint entries of a class give every packet the verdict of the first
 * policy (in precedence order) whose destinations, exclusions and ports hold it, as the rule-per-
 * policy datapath does; the incremental class table equals one built from scratch.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import type { PortSpec } from "../api/types.ts";
import { cidrToRange, type Family, parseAddress, parseCidr } from "../lib/ip.ts";
import { RangeSet } from "../lib/rangeset.ts";
import {
  type ClassEntry,
  type ClassPolicy,
  ClassTable,
  type ClassVerdict,
  classEntries,
  l4Boxes,
} from "./classify.ts";

const DESTINATIONS = ["203.0.113.0/24", "203.0.113.128/25", "10.6.105.150/32", "198.51.100.0/24"];
const EXCLUDED = ["203.0.113.7/32", "203.0.113.200/29"];
const IGNORE = ["10.0.0.0/8"];

const arbPort: fc.Arbitrary<PortSpec> = fc
  .record({
    protocol: fc.constantFrom("TCP", "UDP", "SCTP"),
    port: fc.option(fc.integer({ min: 1, max: 100 }), { nil: undefined }),
    span: fc.integer({ min: 0, max: 20 }),
  })
  .map(({ protocol, port, span }) => ({
    protocol: protocol as PortSpec["protocol"],
    ...(port === undefined ? {} : { port, ...(span > 0 ? { endPort: port + span } : {}) }),
  }));

const arbVerdict: fc.Arbitrary<ClassVerdict> = fc.oneof(
  fc.integer({ min: 1, max: 3 }).map((nodeID) => ({ kind: "steer" as const, nodeID })),
  fc.constantFrom("10.168.60.100", "10.168.60.101").map((eip) => ({ kind: "snat" as const, eip })),
  fc.constant({ kind: "drop" as const }),
);

const arbPolicy = (key: string): fc.Arbitrary<ClassPolicy> =>
  fc.record({
    key: fc.constant(key),
    destinations: fc.subarray(DESTINATIONS),
    excluded: fc.subarray(EXCLUDED),
    ports: fc.array(arbPort, { maxLength: 3 }),
    verdict: arbVerdict,
  });

const arbPolicies = fc
  .integer({ min: 1, max: 5 })
  .chain((n) => fc.tuple(...Array.from({ length: n }, (_, i) => arbPolicy(`p${i}`))));

const PROTO: Record<string, number> = { TCP: 6, UDP: 17, SCTP: 132 };

/** The rule-per-policy semantics: the first policy that holds the packet decides. */
function firstMatch(
  policies: readonly ClassPolicy[],
  dst: string,
  proto: number,
  port: number,
): ClassVerdict | undefined {
  const a = parseAddress(dst);
  const inCidr = (c: string) => {
    const r = cidrToRange(parseCidr(c));
    return r.family === a.family && r.first <= a.value && a.value <= r.last;
  };
  if (IGNORE.some(inCidr)) return undefined;
  for (const p of policies) {
    const dstOk =
      (p.destinations.length === 0 || p.destinations.some(inCidr)) && !p.excluded.some(inCidr);
    const portOk =
      p.ports.length === 0 ||
      p.ports.some(
        (s) =>
          PROTO[s.protocol ?? "TCP"] === proto &&
          (s.port === undefined || (s.port <= port && port <= (s.endPort ?? s.port))),
      );
    if (dstOk && portOk) return p.verdict;
  }
  return undefined;
}

function lookup(entries: readonly ClassEntry[], dst: string, proto: number, port: number) {
  const a = parseAddress(dst).value;
  const hits = entries.filter((e) => {
    const [first, last] = e.dst.includes("-")
      ? e.dst.split("-").map((x) => parseAddress(x).value)
      : [cidrToRange(parseCidr(e.dst)).first, cidrToRange(parseCidr(e.dst)).last];
    return (
      first! <= a &&
      a <= last! &&
      e.l4.proto[0] <= proto &&
      proto <= e.l4.proto[1] &&
      e.l4.port[0] <= port &&
      port <= e.l4.port[1]
    );
  });
  assert.ok(hits.length <= 1, `entries overlap for ${dst} ${proto}/${port}: ${hits.length}`);
  return hits[0]?.verdict;
}

const PROBES = [
  "203.0.113.1",
  "203.0.113.7",
  "203.0.113.130",
  "203.0.113.203",
  "10.6.105.150",
  "10.1.2.3",
  "198.51.100.9",
  "192.0.2.1",
];

function ignore(): RangeSet {
  return RangeSet.of(IGNORE.map(parseCidr));
}

describe("classEntries()", () => {
  it("gives every packet the first matching policy's verdict, with disjoint entries", () => {
    fc.assert(
      fc.property(
        arbPolicies,
        fc.constantFrom(...PROBES),
        fc.constantFrom(1, 6, 17, 132),
        fc.integer({ min: 0, max: 130 }),
        (policies, dst, proto, port) => {
          const entries = classEntries(policies, 4, ignore());
          assert.deepEqual(
            lookup(entries, dst, proto, port),
            firstMatch(policies, dst, proto, port),
          );
        },
      ),
      { numRuns: 3000 },
    );
  });

  it("needs one entry per destination range for policies without ports", () => {
    const entries = classEntries(
      [
        {
          key: "a",
          destinations: ["203.0.113.0/24"],
          excluded: ["203.0.113.7/32"],
          ports: [],
          verdict: { kind: "drop" },
        },
      ],
      4,
      new RangeSet(),
    );
    assert.deepEqual(
      entries.map((e) => e.dst),
      ["203.0.113.0-203.0.113.6", "203.0.113.8-203.0.113.255"],
    );
    assert.deepEqual(entries[0]!.l4, l4Boxes([])[0]);
  });

  it("does not grow with policies that another policy shadows entirely", () => {
    const winner: ClassPolicy = {
      key: "winner",
      destinations: [],
      excluded: [],
      ports: [],
      verdict: { kind: "steer", nodeID: 1 },
    };
    const shadowed = Array.from(
      { length: 1000 },
      (_, i): ClassPolicy => ({
        key: `p${i}`,
        destinations: [`198.51.${i >> 8}.${i & 255}/32`],
        excluded: [],
        ports: [],
        verdict: { kind: "steer", nodeID: 2 },
      }),
    );
    assert.equal(classEntries([winner, ...shadowed], 4, new RangeSet()).length, 1);
  });
});

describe("ClassTable", () => {
  const arbOps = fc.array(
    fc.record({
      policy: fc.integer({ min: 0, max: 3 }),
      spec: arbPolicy("x"),
      sources: fc.subarray(["172.29.1.2/32", "172.29.1.3/32", "172.29.2.9/32", "172.29.3.4/32"]),
      remove: fc.boolean(),
      reorder: fc.boolean(),
    }),
    { minLength: 1, maxLength: 12 },
  );

  it("keeps the classes it would build from scratch after any sequence of changes", () => {
    fc.assert(
      fc.property(arbOps, (ops) => {
        const family: Family = 4;
        const table = new ClassTable(family);
        table.setIgnore(ignore());
        const live = new Map<string, { policy: ClassPolicy; sources: string[] }>();
        let order = ["p0", "p1", "p2", "p3"];
        const rank = () => new Map(order.map((k, i) => [k, i]));
        table.setOrder(rank());
        for (const op of ops) {
          const key = `p${op.policy}`;
          if (op.reorder) {
            order = [...order.slice(1), order[0]!];
            table.setOrder(rank());
          }
          if (op.remove) {
            live.delete(key);
            table.set(key, undefined, []);
          } else {
            const policy = { ...op.spec, key };
            live.set(key, { policy, sources: op.sources });
            table.set(key, policy, op.sources);
          }
          const scratch = new ClassTable(family);
          scratch.setIgnore(ignore());
          scratch.setOrder(rank());
          for (const [k, v] of live) scratch.set(k, v.policy, v.sources);
          assert.deepEqual(table.classes(), scratch.classes());
        }
      }),
      { numRuns: 500 },
    );
  });

  it("keeps an unchanged class by identity when another class gains a source", () => {
    const table = new ClassTable(4);
    const a: ClassPolicy = {
      key: "a",
      destinations: ["203.0.113.0/24"],
      excluded: [],
      ports: [],
      verdict: { kind: "drop" },
    };
    const b: ClassPolicy = { ...a, key: "b", destinations: ["198.51.100.0/24"] };
    table.setOrder(
      new Map([
        ["a", 0],
        ["b", 1],
      ]),
    );
    table.set("a", a, ["172.29.1.2/32"]);
    table.set("b", b, ["172.29.1.3/32"]);
    const first = table.classes();
    const ca = first.find((c) => c.policies[0] === "a");
    const cb = first.find((c) => c.policies[0] === "b");
    table.set("b", b, ["172.29.1.3/32", "172.29.1.4/32"]);
    const after = table.classes();
    assert.equal(
      after.find((c) => c.name === ca!.name),
      ca,
    );
    const nb = after.find((c) => c.policies[0] === "b")!;
    assert.deepEqual(nb.sources, ["172.29.1.3/32", "172.29.1.4/32"]);
    assert.equal(nb.entries, cb!.entries, "its entries did not change");
  });

  const drop = (key: string, destination: string): ClassPolicy => ({
    key,
    destinations: [destination],
    excluded: [],
    ports: [],
    verdict: { kind: "drop" },
  });
  const hosts = (from: number, count: number) =>
    Array.from({ length: count }, (_, i) => `10.9.${(from + i) >> 8}.${(from + i) & 255}/32`);

  it("keeps a class's name when policies come or go over the same sources (only its entries change)", () => {
    const table = new ClassTable(4);
    const pods = hosts(0, 50);
    const rank = new Map<string, number>();
    const names = new Set<string>();
    for (let i = 0; i < 20; i++) {
      rank.set(`p${i}`, i);
      table.setOrder(rank);
      table.set(`p${i}`, drop(`p${i}`, `203.0.113.${i}/32`), pods);
      const [only, ...more] = table.classes();
      assert.equal(more.length, 0);
      assert.equal(only!.policies.length, i + 1);
      assert.equal(only!.entries.length, i + 1);
      names.add(only!.name);
    }
    assert.equal(names.size, 1, "one name all along");
  });

  it("renames a class seldom while its pods churn in address order (a rolling update), and never gives two classes one name", () => {
    const table = new ClassTable(4);
    table.setOrder(
      new Map([
        ["a", 0],
        ["b", 1],
      ]),
    );
    let pods = hosts(0, 100);
    table.set("a", drop("a", "203.0.113.0/24"), pods);
    table.set("b", drop("b", "198.51.100.0/24"), hosts(1000, 100));
    let name = table.classes().find((c) => c.policies[0] === "a")!.name;
    let renames = 0;
    for (let i = 100; i < 1100; i++) {
      // The oldest pod goes, a new one comes with the next address.
      pods = [...pods.slice(1), ...hosts(i, 1)];
      table.set("a", drop("a", "203.0.113.0/24"), pods);
      const classes = table.classes();
      assert.equal(new Set(classes.map((c) => c.name)).size, classes.length, "unique names");
      const now = classes.find((c) => c.policies[0] === "a")!.name;
      if (now !== name) renames++;
      name = now;
    }
    // One chance in the class's size per change that the pod leaving or coming anchors it:
    // about 2 × 1,000 / 100 = 20 (a name made of the lowest address: 1,000).
    assert.ok(renames > 0 && renames < 60, `${renames} renames in 1,000 changes`);
  });
});
