import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import type { Endpoint } from "../api/types.ts";
import { planSlices, type SliceContent } from "./slices.ts";

const ep = (n: number): Endpoint => ({
  pod: `ns/pod-${String(n).padStart(3, "0")}`,
  node: `node-${n % 3}`,
  ips: [`10.0.0.${n}`],
});

function apply(existing: SliceContent[], plan: ReturnType<typeof planSlices>): SliceContent[] {
  const m = new Map(existing.map((s) => [s.name, s]));
  for (const d of plan.delete) m.delete(d);
  for (const w of plan.write) m.set(w.name, w);
  return [...m.values()];
}

describe("planSlices()", () => {
  it("chunks endpoints into slices of at most maxPerSlice", () => {
    const p = planSlices(
      "EgressPolicy/ns/a",
      Array.from({ length: 25 }, (_, i) => ep(i)),
      [],
      10,
    );
    assert.deepEqual(
      p.write.map((s) => s.endpoints.length),
      [10, 10, 5],
    );
  });

  it("rewrites a single slice when one pod is added or removed", () => {
    const all = Array.from({ length: 25 }, (_, i) => ep(i));
    const first = apply([], planSlices("k", all, [], 10));
    const added = planSlices("k", [...all, ep(99)], first, 10);
    assert.equal(added.write.length, 1);
    const removed = planSlices(
      "k",
      all.filter((e) => e.pod !== ep(3).pod),
      first,
      10,
    );
    assert.equal(removed.write.length, 1);
    assert.deepEqual(removed.delete, []);
  });

  it("deletes slices that become empty", () => {
    const first = apply([], planSlices("k", [ep(1), ep(2)], [], 1));
    const p = planSlices("k", [ep(1)], first, 1);
    assert.equal(p.delete.length, 1);
  });

  it("always holds exactly the endpoints, each once (property)", () => {
    fc.assert(
      fc.property(
        fc.array(fc.uniqueArray(fc.integer({ min: 0, max: 60 })), { minLength: 1, maxLength: 6 }),
        (steps) => {
          let state: SliceContent[] = [];
          for (const ids of steps) {
            const eps = ids.map(ep);
            state = apply(state, planSlices("k", eps, state, 7));
            const held = state.flatMap((s) => s.endpoints.map((e) => e.pod)).sort();
            assert.deepEqual(held, eps.map((e) => e.pod).sort());
            for (const s of state) assert.ok(s.endpoints.length > 0 && s.endpoints.length <= 7);
          }
        },
      ),
    );
  });
});
