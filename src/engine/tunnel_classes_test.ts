import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { MAX_TUNNEL_CLASS, TunnelClasses } from "./tunnel_classes.ts";

const req = (key: string, createdAt: string, wanted?: number) => ({ key, createdAt, wanted });

describe("tunnel classes", () => {
  it("gives the lowest free class, oldest policy first, and keeps it", () => {
    const c = new TunnelClasses();
    c.assign([req("b", "2026-01-02"), req("a", "2026-01-03"), req("c", "2026-01-01")]);
    assert.deepEqual(
      ["a", "b", "c"].map((k) => c.get(k)),
      [3, 2, 1],
    );
    c.release("b");
    assert.equal(c.get("b"), undefined);
    c.assign([req("d", "2026-01-04"), req("a", "2026-01-03")]);
    assert.equal(c.get("d"), 2, "the freed class is the lowest free one");
    assert.equal(c.get("a"), 3, "a policy that has a class keeps it");
  });

  it("keeps a class read back from a status when no older policy claims it", () => {
    const c = new TunnelClasses();
    c.assign([req("new", "2026-02-01", 7), req("old", "2026-01-01", 7), req("x", "2026-03-01", 1)]);
    assert.equal(c.get("old"), 7, "the older policy keeps the class both claim");
    assert.equal(c.get("x"), 1);
    assert.equal(c.get("new"), 2, "the younger one gets the lowest free class");
  });

  it("ignores a wanted value that is no class (0, bits 14-15, not an integer)", () => {
    const c = new TunnelClasses();
    c.assign([req("a", "1", 0), req("b", "2", 0x4000), req("c", "3", 1.5)]);
    assert.deepEqual(
      ["a", "b", "c"].map((k) => c.get(k)),
      [1, 2, 3],
    );
  });

  it("gives none once all 16,383 are taken, and one again when a policy leaves", () => {
    const c = new TunnelClasses();
    const all = Array.from({ length: MAX_TUNNEL_CLASS + 1 }, (_, i) =>
      req(`p${String(i).padStart(5, "0")}`, "2026-01-01"),
    );
    assert.equal(c.assign(all).length, MAX_TUNNEL_CLASS);
    const last = all.at(-1)!.key;
    assert.equal(c.get(last), undefined);
    c.release("p00100");
    assert.deepEqual(c.assign([all.at(-1)!]), [last]);
    assert.equal(c.get(last), 101);
  });

  it("classes are unique whatever the order of assignments and releases", () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.oneof(
            fc.record({
              op: fc.constant("assign" as const),
              keys: fc.array(fc.integer({ min: 0, max: 30 }), { maxLength: 5 }),
              wanted: fc.option(fc.integer({ min: 0, max: 40 }), { nil: undefined }),
            }),
            fc.record({
              op: fc.constant("release" as const),
              key: fc.integer({ min: 0, max: 30 }),
            }),
          ),
          { maxLength: 60 },
        ),
        (ops) => {
          const c = new TunnelClasses();
          for (const o of ops) {
            if (o.op === "release") c.release(`k${o.key}`);
            else c.assign(o.keys.map((k) => req(`k${k}`, String(k), o.wanted)));
          }
          const held = Array.from({ length: 31 }, (_, k) => c.get(`k${k}`)).filter(
            (v) => v !== undefined,
          );
          assert.equal(new Set(held).size, held.length);
        },
      ),
    );
  });
});
