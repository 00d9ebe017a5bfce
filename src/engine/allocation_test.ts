/** Egress IPs from pools. Address plan: see ./testing.ts. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import type { Family } from "../lib/ip.ts";
import {
  AddressAllocator,
  type AddressRequest,
  type Allocation,
  type Pool,
  parseGatewayPool,
} from "./allocation.ts";

const EDGE = parseGatewayPool(["10.168.60.100-10.168.60.102", "fd00:a::100-fd00:a::101"]);

function pooled(
  key: string,
  day: number,
  options: { families?: Family[]; pool?: Pool; gateway?: string; count?: number } = {},
): AddressRequest {
  return {
    key,
    createdAt: `2026-01-0${day}T00:00:00Z`,
    gateway: options.gateway ?? "edge",
    pool: options.pool ?? EDGE,
    explicit: undefined,
    families: options.families ?? [4],
    count: options.count ?? 1,
  };
}

function explicit(key: string, day: number, addresses: string[], pool = EDGE): AddressRequest {
  return {
    key,
    createdAt: `2026-01-0${day}T00:00:00Z`,
    gateway: "edge",
    pool,
    explicit: addresses.map((a) => ({ text: a, address: a })),
    families: [4],
    count: 1,
  };
}

const addressesOf = (a: Allocation | undefined) => (a?.ok ? a.addresses : undefined);
const none = () => undefined;

describe("AddressAllocator", () => {
  it("gives the lowest free address of each family, oldest policy first", () => {
    const alloc = new AddressAllocator();
    alloc.set("young", pooled("young", 2, { families: [4, 6] }));
    alloc.set("old", pooled("old", 1, { families: [4, 6] }));
    assert.deepEqual([...alloc.run(none)].sort(), ["old", "young"]);
    assert.deepEqual(addressesOf(alloc.get("old")), ["10.168.60.100", "fd00:a::100"]);
    assert.deepEqual(addressesOf(alloc.get("young")), ["10.168.60.101", "fd00:a::101"]);
  });

  it("keeps what a policy held before, and says when nothing changed", () => {
    const alloc = new AddressAllocator();
    alloc.set("a", pooled("a", 1));
    const last = new Map([["a", ["10.168.60.102"]]]);
    alloc.run((k) => last.get(k));
    assert.deepEqual(addressesOf(alloc.get("a")), ["10.168.60.102"]);
    alloc.set("a", pooled("a", 1));
    assert.deepEqual([...alloc.run(none)], [], "the same request is not redone");
  });

  it("reports an exhausted pool with its usage, and hands a freed address to the oldest waiting policy", () => {
    const alloc = new AddressAllocator();
    for (const [k, day] of [
      ["a", 1],
      ["b", 2],
      ["c", 3],
      ["d", 4],
      ["e", 5],
    ] as const)
      alloc.set(k, pooled(k, day));
    alloc.run(none);
    const d = alloc.get("d")!;
    assert.equal(d.ok, false);
    assert.equal(!d.ok && d.reason, "PoolExhausted");
    assert.match(!d.ok ? d.message : "", /EgressGateway edge is exhausted \(IPv4 3\/3 in use\)/);
    alloc.set("b", undefined);
    const changed = alloc.run(none);
    assert.deepEqual([...changed].sort(), ["b", "d"], "e keeps waiting: d is older");
    assert.deepEqual(addressesOf(alloc.get("d")), ["10.168.60.101"]);
  });

  it("rejects a pool without the families the policy needs", () => {
    const alloc = new AddressAllocator();
    alloc.set("a", pooled("a", 1, { families: [6], pool: parseGatewayPool(["10.0.0.1"]) }));
    alloc.run(none);
    const a = alloc.get("a")!;
    assert.equal(!a.ok && a.reason, "NoPoolForFamily");
  });

  it("rejects an explicit address outside the pool, naming the pool", () => {
    const alloc = new AddressAllocator();
    alloc.set("x", explicit("x", 1, ["10.9.9.9"]));
    alloc.run(none);
    const x = alloc.get("x")!;
    assert.equal(!x.ok && x.reason, "EgressIPNotInPool");
    assert.match(
      !x.ok ? x.message : "",
      /10\.9\.9\.9 is not in the pool of EgressGateway edge \(10\.168\.60\.100-10\.168\.60\.102, fd00:a::100-fd00:a::101\)/,
    );
  });

  it("shares an explicit address, keeps pool policies off it, and makes a claim on a held address wait", () => {
    const alloc = new AddressAllocator();
    alloc.set("x", explicit("x", 1, ["10.168.60.100"]));
    alloc.set("y", explicit("y", 2, ["10.168.60.100"]));
    alloc.set("p", pooled("p", 3));
    alloc.run(none);
    assert.deepEqual(addressesOf(alloc.get("x")), ["10.168.60.100"]);
    assert.deepEqual(addressesOf(alloc.get("y")), ["10.168.60.100"]);
    assert.deepEqual(addressesOf(alloc.get("p")), ["10.168.60.101"]);
    // A newcomer names the address p holds: p keeps it, the newcomer waits.
    alloc.set("z", explicit("z", 4, ["10.168.60.101"]));
    alloc.run(none);
    const z = alloc.get("z")!;
    assert.equal(!z.ok && z.reason, "EgressIPInUse");
    assert.match(
      !z.ok ? z.message : "",
      /10\.168\.60\.101 is already allocated to p from the pool/,
    );
    alloc.set("p", undefined);
    assert.deepEqual([...alloc.run(none)].sort(), ["p", "z"]);
    assert.deepEqual(addressesOf(alloc.get("z")), ["10.168.60.101"]);
  });

  it("gives an address two changed policies held to the older one", () => {
    // Only when both change in one step, e.g. a node's own address inside a pool was reported as
    // one policy's egress IP while another held it from the pool.
    const alloc = new AddressAllocator();
    alloc.set("young", pooled("young", 2));
    alloc.run(() => ["10.168.60.100"]);
    assert.deepEqual(addressesOf(alloc.get("young")), ["10.168.60.100"]);
    alloc.set("old", pooled("old", 1));
    const changed = alloc.run((k) => (k === "old" ? ["10.168.60.100"] : undefined));
    assert.deepEqual([...changed].sort(), ["old", "young"]);
    assert.deepEqual(addressesOf(alloc.get("old")), ["10.168.60.100"]);
    assert.deepEqual(addressesOf(alloc.get("young")), ["10.168.60.101"]);
  });

  it("gives a pool policy egressIPCount addresses per family, the lowest free ones", () => {
    const alloc = new AddressAllocator();
    alloc.set("a", pooled("a", 1, { families: [4, 6], count: 2 }));
    alloc.set("b", pooled("b", 2, { families: [4], count: 1 }));
    alloc.run(none);
    const a = alloc.get("a")!;
    assert.deepEqual(a, {
      ok: true,
      addresses: ["10.168.60.100", "10.168.60.101", "fd00:a::100", "fd00:a::101"],
    });
    assert.deepEqual(addressesOf(alloc.get("b")), ["10.168.60.102"]);
  });

  it("allocates what it can when the pool runs short, says what is missing, and completes the policy when an address comes free", () => {
    const alloc = new AddressAllocator();
    alloc.set("a", pooled("a", 1));
    alloc.set("b", pooled("b", 2, { count: 3 }));
    alloc.run(none);
    const b = alloc.get("b")!;
    assert.deepEqual(b, {
      ok: true,
      addresses: ["10.168.60.101", "10.168.60.102"],
      short: [{ family: 4, got: 2, wanted: 3, usage: "IPv4 3/3 in use" }],
    });
    alloc.set("a", undefined);
    assert.deepEqual([...alloc.run(none)].sort(), ["a", "b"]);
    assert.deepEqual(alloc.get("b"), {
      ok: true,
      addresses: ["10.168.60.100", "10.168.60.101", "10.168.60.102"],
    });
  });

  it("keeps the lowest addresses a policy held when its egressIPCount goes down, and frees the rest", () => {
    const alloc = new AddressAllocator();
    alloc.set("a", pooled("a", 1, { count: 3 }));
    alloc.run(none);
    const last = addressesOf(alloc.get("a"));
    alloc.set("a", pooled("a", 1, { count: 2 }));
    alloc.set("b", pooled("b", 2));
    alloc.run((k) => (k === "a" ? last : undefined));
    assert.deepEqual(addressesOf(alloc.get("a")), ["10.168.60.100", "10.168.60.101"]);
    assert.deepEqual(addressesOf(alloc.get("b")), ["10.168.60.102"]);
  });

  it("lists explicit addresses IPv4 first, each family in address order", () => {
    const alloc = new AddressAllocator();
    alloc.set(
      "x",
      explicit("x", 1, ["fd00:a::101", "10.168.60.102", "fd00:a::100", "10.168.60.100"]),
    );
    alloc.run(none);
    assert.deepEqual(addressesOf(alloc.get("x")), [
      "10.168.60.100",
      "10.168.60.102",
      "fd00:a::100",
      "fd00:a::101",
    ]);
  });

  it("gives a freed address to the policy waiting for it while another policy of its gateway carries another pool (the pool being edited)", () => {
    // Found by the property below (seed -490873264).
    const alloc = new AddressAllocator();
    const edited = parseGatewayPool(["10.168.60.101", "fd00:a::100-fd00:a::103"]);
    const run = () => alloc.run((k) => addressesOf(alloc.get(k)));
    alloc.set("c", pooled("c", 1, { families: [4] }));
    run();
    alloc.set("a", pooled("a", 1, { families: [4], count: 3 }));
    run();
    const waiting = alloc.get("a");
    assert.equal(waiting?.ok === true && waiting.short?.[0]?.got, 2, "a waits for a third");
    alloc.set("e", pooled("e", 1, { families: [4], pool: edited }));
    run();
    alloc.set("c", undefined);
    run();
    assert.deepEqual(alloc.get("a"), {
      ok: true,
      addresses: ["10.168.60.100", "10.168.60.101", "10.168.60.102"],
    });
  });

  it("allocates incrementally what a fresh allocator allocates from the previous result", () => {
    const pools = [
      EDGE,
      parseGatewayPool(["10.168.60.101", "fd00:a::100-fd00:a::103"]),
      parseGatewayPool([]),
    ];
    const arbRequest = fc.record({
      key: fc.constantFrom("a", "b", "c", "d", "e", "f"),
      day: fc.integer({ min: 1, max: 5 }),
      pool: fc.nat({ max: 2 }),
      families: fc.constantFrom<Family[]>([4], [6], [4, 6]),
      explicit: fc.constantFrom(
        undefined,
        undefined,
        ["10.168.60.100"],
        ["10.168.60.101"],
        ["10.168.60.100", "10.168.60.102"],
        ["10.9.9.9"],
      ),
      count: fc.integer({ min: 1, max: 3 }),
      remove: fc.boolean(),
    });
    fc.assert(
      fc.property(fc.array(fc.array(arbRequest, { maxLength: 4 }), { maxLength: 12 }), (steps) => {
        const alloc = new AddressAllocator();
        const requests = new Map<string, AddressRequest>();
        let results = new Map<string, Allocation>();
        for (const step of steps) {
          for (const r of step) {
            const request: AddressRequest | undefined = r.remove
              ? undefined
              : r.explicit !== undefined
                ? explicit(r.key, r.day, [...r.explicit], pools[r.pool])
                : pooled(r.key, r.day, {
                    families: r.families,
                    pool: pools[r.pool]!,
                    count: r.count,
                  });
            if (request === undefined) requests.delete(r.key);
            else requests.set(r.key, request);
            alloc.set(r.key, request);
          }
          const last = results;
          alloc.run((k) => addressesOf(last.get(k)));
          const fresh = new AddressAllocator();
          for (const [k, r] of requests) fresh.set(k, r);
          fresh.run((k) => addressesOf(last.get(k)));
          results = new Map();
          for (const k of requests.keys()) {
            const got = alloc.get(k)!;
            const want = fresh.get(k)!;
            assert.deepEqual(
              got.ok ? { ...got, addresses: [...got.addresses].sort() } : got,
              want.ok ? { ...want, addresses: [...want.addresses].sort() } : want,
              k,
            );
            results.set(k, got);
          }
        }
      }),
    );
  });
});
