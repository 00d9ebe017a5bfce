import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { assignTables } from "./tables.ts";

const fixed = (x: number) => () => x;

describe("assignTables() (TABLE_NUM)", () => {
  it("starts at a random point in [s, s+n] and walks circularly past used tables", () => {
    const r = assignTables(["node/a"], {
      range: { start: 3000, count: 100 },
      used: new Set([3050, 3051]),
      existing: new Map(),
      random: fixed(50 / 101),
    });
    assert.equal(r.tables.get("node/a"), 3052);
  });
  it("wraps around from the end of the range to its start", () => {
    const r = assignTables(["node/a"], {
      range: { start: 3000, count: 2 },
      used: new Set([3002]),
      existing: new Map(),
      random: fixed(0.99),
    });
    assert.equal(r.tables.get("node/a"), 3000);
  });
  it("keeps the tables this host assigned before a restart", () => {
    const r = assignTables(["node/a", "node/b"], {
      used: new Set(),
      existing: new Map([["node/b", 3007]]),
      random: fixed(0.07),
    });
    assert.equal(r.tables.get("node/b"), 3007);
    assert.notEqual(r.tables.get("node/a"), 3007);
  });
  it("reports a clear error when every table of the range is in use", () => {
    const used = new Set(Array.from({ length: 4 }, (_, i) => 3000 + i));
    const r = assignTables(["node/x"], {
      range: { start: 3000, count: 3 },
      used,
      existing: new Map(),
      random: fixed(0),
    });
    assert.equal(r.tables.size, 0);
    assert.match(r.errors[0]!, /every table in \[3000, 3003\] is in use on this host/);
  });
  it("gives distinct, unused, in-range tables to every peer (property)", () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.string({ minLength: 1, maxLength: 4 }), { maxLength: 30 }),
        fc.uniqueArray(fc.integer({ min: 2990, max: 3110 }), { maxLength: 60 }),
        fc.double({ min: 0, max: 0.999999, noNaN: true }),
        (keys, used, rnd) => {
          const r = assignTables(keys, {
            used: new Set(used),
            existing: new Map(),
            random: () => rnd,
          });
          const values = [...r.tables.values()];
          assert.equal(new Set(values).size, values.length, "unique");
          for (const t of values) {
            assert.ok(t >= 3000 && t <= 3100, "in range");
            assert.ok(!used.includes(t), "not used by anyone else");
          }
          const free = 101 - used.filter((u) => u >= 3000 && u <= 3100).length;
          assert.equal(r.tables.size, Math.min(keys.length, free), "assigns while tables are free");
        },
      ),
    );
  });
});
