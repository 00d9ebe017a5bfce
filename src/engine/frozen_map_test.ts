import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { FrozenMap } from "./frozen_map.ts";

const arbChanges = fc.array(
  fc.array(fc.tuple(fc.integer({ min: 0, max: 300 }), fc.option(fc.nat(), { nil: undefined })), {
    maxLength: 120,
  }),
  { maxLength: 30 },
);

describe("FrozenMap", () => {
  it("behaves like a Map rebuilt at every version, and never changes an older version", () => {
    fc.assert(
      fc.property(arbChanges, (steps) => {
        const model = new Map<number, number>();
        let version = FrozenMap.empty<number, number>();
        const history: [FrozenMap<number, number>, [number, number][]][] = [];
        for (const step of steps) {
          const changes = new Map(step);
          for (const [k, v] of changes) {
            if (v === undefined) model.delete(k);
            else model.set(k, v);
          }
          version = version.with(changes);
          assert.equal(version.size, model.size);
          assert.deepEqual([...version], [...model], "same entries in the same order");
          for (const [k, v] of model) assert.equal(version.get(k), v);
          assert.equal(version.has(301), false);
          history.push([version, [...model]]);
        }
        for (const [old, entries] of history) assert.deepEqual([...old], entries);
      }),
    );
  });

  it("returns the same version when nothing changes", () => {
    const a = FrozenMap.empty<string, number>().with(new Map([["x", 1]]));
    assert.equal(a.with(new Map([["x", 1]])), a);
    assert.equal(a.with(new Map([["y", undefined]])), a);
    assert.notEqual(a.with(new Map([["x", 2]])), a);
  });
});
