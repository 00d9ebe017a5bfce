import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { isDeepStrictEqual } from "node:util";
import fc from "fast-check";
import { applyMergePatch, deepEqual, mergePatch } from "./equal.ts";

type JsonObject = Record<string, unknown>;

const isObject = (v: unknown): v is JsonObject =>
  typeof v === "object" && v !== null && !Array.isArray(v);

/**
 * JSON from a small alphabet, so that two draws often share keys and values. `__proto__` and
 * `constructor` are there because they are valid keys (ConfigMap data, JSON.parse output) that
 * naive code turns into prototypes or finds on `Object.prototype`.
 */
function json(options: { nullMembers: boolean; maxDepth?: number }) {
  const scalar = fc.oneof(
    fc.constantFrom("", "x", "y"),
    fc.integer({ min: -2, max: 2 }),
    fc.boolean(),
  );
  const key = fc.constantFrom("a", "b", "c", "spec", "__proto__", "constructor");
  return fc.letrec((tie) => ({
    value: fc.oneof(
      { maxDepth: options.maxDepth ?? 4, depthSize: "small" },
      options.nullMembers ? fc.oneof(scalar, fc.constant(null)) : scalar,
      tie("array"),
      tie("object"),
    ),
    // Arrays are replaced whole by a merge patch, so null is expressible inside them.
    array: fc.array(fc.oneof(tie("value"), fc.constant(null)), { maxLength: 3 }),
    object: fc.dictionary(key, tie("value"), { maxKeys: 4, noNullPrototype: true }),
  }));
}

const anyJson = json({ nullMembers: true });
/** What the API server may hold. */
const currentObject = anyJson.object as fc.Arbitrary<JsonObject>;
/** What we build: no null member values (RFC 7386 cannot express them). */
const desiredObject = json({ nullMembers: false }).object as fc.Arbitrary<JsonObject>;

/** A deterministic shuffle source, so that a failing permutation shrinks and replays. */
function random(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/** The same JSON with the keys of every object, at every depth, in another order. */
function permute(value: unknown, rand: () => number): unknown {
  if (Array.isArray(value)) return value.map((v) => permute(v, rand));
  if (!isObject(value)) return value;
  const entries = Object.entries(value);
  for (let i = entries.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [entries[i], entries[j]] = [entries[j]!, entries[i]!];
  }
  // fromEntries defines properties, so `__proto__` stays an own key.
  return Object.fromEntries(entries.map(([k, v]) => [k, permute(v, rand)]));
}

/** The same JSON with an `undefined` member added to every object: JSON cannot tell. */
function withUndefined(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(withUndefined);
  if (!isObject(value)) return value;
  return Object.fromEntries([
    ["absent", undefined],
    ...Object.entries(value).map(([k, v]) => [k, withUndefined(v)]),
  ]);
}

/** A copy of `value` with at most one change (a member added, removed or replaced) somewhere. */
function tweak(value: unknown, rand: () => number): unknown {
  const pick = (n: number) => Math.floor(rand() * n);
  if (Array.isArray(value)) {
    const copy = [...value];
    if (copy.length === 0 || rand() < 0.3) rand() < 0.5 ? copy.push(0) : copy.pop();
    else {
      const i = pick(copy.length);
      copy[i] = tweak(copy[i], rand);
    }
    return copy;
  }
  if (isObject(value)) {
    const entries = Object.entries(value);
    if (entries.length === 0 || rand() < 0.3) {
      if (rand() < 0.5) entries.push(["b", 0]);
      else entries.splice(pick(entries.length), 1);
    } else {
      const i = pick(entries.length);
      entries[i] = [entries[i]![0], tweak(entries[i]![1], rand)];
    }
    return Object.fromEntries(entries);
  }
  return [0, "x", true, null, {}][pick(5)];
}

const ownValue = (o: unknown, key: string) =>
  isObject(o) && Object.hasOwn(o, key) ? o[key] : undefined;

/** Every key the patch names differs between current and desired, at every depth. */
function namesOnlyDifferences(patch: JsonObject, current: unknown, desired: unknown): boolean {
  for (const [key, change] of Object.entries(patch)) {
    const have = ownValue(current, key);
    const want = ownValue(desired, key);
    if (deepEqual(have, want)) return false;
    if (change === null) {
      if (want !== undefined) return false;
    } else if (isObject(change) && isObject(have)) {
      if (!namesOnlyDifferences(change, have, want)) return false;
    } else if (!deepEqual(change, want)) return false;
  }
  return true;
}

describe("deepEqual()", () => {
  it("ignores the order of keys", () =>
    assert.ok(
      deepEqual(
        { a: 1, b: { c: [1, { d: "x", e: true }] } },
        { b: { c: [1, { e: true, d: "x" }] }, a: 1 },
      ),
    ));
  it("counts an undefined member as absent, as JSON does", () => {
    assert.ok(deepEqual({ a: 1, b: undefined }, { a: 1 }));
    assert.ok(deepEqual({ a: 1 }, { b: undefined, a: 1 }));
    assert.ok(!deepEqual({ a: 1, b: undefined }, { a: 1, b: null }));
  });
  it("tells apart what JSON tells apart", () => {
    assert.ok(!deepEqual([1, 2], [2, 1]));
    assert.ok(!deepEqual([], {}));
    assert.ok(!deepEqual({}, null));
    assert.ok(!deepEqual(0, "0"));
    assert.ok(!deepEqual([1], [1, undefined]));
    assert.ok(!deepEqual({ a: 1 }, { a: 1, b: 2 }));
    assert.ok(!deepEqual({ a: 1, b: 2 }, { a: 1 }));
  });
  it("never reads inherited properties", () => {
    assert.ok(!deepEqual({ constructor: Object }, {}));
    assert.ok(!deepEqual({}, { constructor: Object }));
    assert.ok(deepEqual(JSON.parse('{"__proto__": 1}'), JSON.parse('{"__proto__": 1}')));
    assert.ok(!deepEqual(JSON.parse('{"__proto__": 1}'), {}));
  });

  it("is reflexive and symmetric", () =>
    fc.assert(
      fc.property(anyJson.value, anyJson.value, (a, b) => {
        assert.ok(deepEqual(a, a));
        assert.ok(deepEqual(a, structuredClone(a)));
        assert.equal(deepEqual(a, b), deepEqual(b, a));
      }),
    ));
  it("holds after any permutation of keys at any depth", () =>
    fc.assert(
      fc.property(anyJson.value, fc.integer(), (a, seed) => {
        const b = permute(a, random(seed));
        assert.ok(deepEqual(a, b));
        assert.ok(deepEqual(b, a));
        assert.ok(deepEqual(a, withUndefined(b)));
      }),
    ));
  it("agrees with structural equality", () => {
    // Independent draws are rarely equal, so half the pairs are one value and a copy of it
    // with at most one change somewhere inside: equal, or different in one place.
    const small = json({ nullMembers: true, maxDepth: 3 }).value;
    const pair = fc.oneof(
      fc.tuple(small, small),
      fc.tuple(small, fc.integer()).map(([a, seed]) => [a, tweak(a, random(seed))] as const),
    );
    fc.assert(
      fc.property(pair, fc.integer(), ([a, b], seed) => {
        const shuffled = permute(b, random(seed));
        assert.equal(deepEqual(a, shuffled), isDeepStrictEqual(a, b));
      }),
      { numRuns: 2000 },
    );
  });
});

describe("mergePatch()", () => {
  it("sets a nested key that disappeared to null where it was", () =>
    assert.deepEqual(
      mergePatch(
        { metadata: { labels: { app: "web", tier: "front" } }, spec: { a: 1 } },
        { metadata: { labels: { app: "web" } }, spec: { a: 1 } },
      ),
      { metadata: { labels: { tier: null } } },
    ));
  it("replaces an array that differs whole", () =>
    assert.deepEqual(mergePatch({ cidrs: ["10.0.0.0/8", "fd00::/8"] }, { cidrs: ["10.0.0.0/8"] }), {
      cidrs: ["10.0.0.0/8"],
    }));
  it("is undefined when only the order of keys differs", () =>
    assert.equal(
      mergePatch({ spec: { b: [{ y: 1, x: 2 }], a: 1 } }, { spec: { a: 1, b: [{ x: 2, y: 1 }] } }),
      undefined,
    ));
  it("is the whole desired object when there is nothing yet, leaving undefined members out", () =>
    assert.deepEqual(mergePatch(undefined, { a: { b: 1, c: undefined }, d: {} }), {
      a: { b: 1 },
      d: {},
    }));
  it("builds an object where a scalar or array was", () =>
    assert.deepEqual(mergePatch({ a: 1, b: [1] }, { a: {}, b: { c: 1 } }), { a: {}, b: { c: 1 } }));
  it("keeps __proto__ an own key instead of setting a prototype", () => {
    const patch = mergePatch({}, JSON.parse('{"__proto__": {"polluted": true}}'))!;
    assert.equal(Object.getPrototypeOf(patch), Object.prototype);
    assert.ok(Object.hasOwn(patch, "__proto__"));
    assert.equal(JSON.stringify(patch), '{"__proto__":{"polluted":true}}');
  });
  it("refuses a null member, naming where it is and what to do", () =>
    assert.throws(
      () => mergePatch({}, { spec: { selector: { "app.kubernetes.io/name": null } } }),
      (e: Error) =>
        e instanceof TypeError &&
        e.message.includes('desired.spec.selector["app.kubernetes.io/name"] is null') &&
        e.message.includes("leave the key out"),
    ));
  it("refuses a desired value that is not an object", () =>
    assert.throws(() => mergePatch({}, ["a"]), /desired value is an array/));

  it("turns current into desired", () =>
    fc.assert(
      fc.property(currentObject, desiredObject, (current, desired) => {
        const patch = mergePatch(current, desired);
        const result = applyMergePatch(current, patch ?? {});
        assert.ok(deepEqual(result, desired), `got ${JSON.stringify(result)}`);
        // What the server would store, through the wire and back.
        assert.ok(
          deepEqual(applyMergePatch(current, JSON.parse(JSON.stringify(patch ?? {}))), desired),
        );
      }),
      { numRuns: 1000 },
    ));
  it("turns current into desired when desired has undefined members", () =>
    fc.assert(
      fc.property(currentObject, desiredObject, (current, desired) => {
        const patch = mergePatch(current, withUndefined(desired));
        assert.ok(deepEqual(applyMergePatch(current, patch ?? {}), desired));
      }),
    ));
  it("is undefined between equal objects, whatever the order of their keys", () =>
    fc.assert(
      fc.property(desiredObject, fc.integer(), (x, seed) => {
        assert.equal(mergePatch(x, x), undefined);
        assert.equal(mergePatch(permute(x, random(seed)), withUndefined(x)), undefined);
      }),
    ));
  it("names only the keys that differ", () =>
    fc.assert(
      fc.property(currentObject, desiredObject, (current, desired) => {
        const patch = mergePatch(current, desired);
        if (patch !== undefined) assert.ok(namesOnlyDifferences(patch, current, desired));
      }),
      { numRuns: 1000 },
    ));
});

describe("applyMergePatch()", () => {
  // RFC 7386, Appendix A.
  const cases: [unknown, unknown, unknown][] = [
    [{ a: "b" }, { a: "c" }, { a: "c" }],
    [{ a: "b" }, { b: "c" }, { a: "b", b: "c" }],
    [{ a: "b" }, { a: null }, {}],
    [{ a: "b", b: "c" }, { a: null }, { b: "c" }],
    [{ a: ["b"] }, { a: "c" }, { a: "c" }],
    [{ a: "c" }, { a: ["b"] }, { a: ["b"] }],
    [{ a: { b: "c" } }, { a: { b: "d", c: null } }, { a: { b: "d" } }],
    [{ a: [{ b: "c" }] }, { a: [1] }, { a: [1] }],
    [
      ["a", "b"],
      ["c", "d"],
      ["c", "d"],
    ],
    [{ a: "b" }, ["c"], ["c"]],
    [{ a: "foo" }, null, null],
    [{ a: "foo" }, "bar", "bar"],
    [{ e: null }, { a: 1 }, { e: null, a: 1 }],
    [[1, 2], { a: "b", c: null }, { a: "b" }],
    [{}, { a: { bb: { ccc: null } } }, { a: { bb: {} } }],
  ];
  for (const [target, patch, want] of cases) {
    it(`${JSON.stringify(target)} + ${JSON.stringify(patch)} = ${JSON.stringify(want)}`, () =>
      assert.deepEqual(applyMergePatch(target, patch), want));
  }
  it("leaves its target alone", () => {
    const target = { a: { b: 1 } };
    applyMergePatch(target, { a: { b: null, c: 2 } });
    assert.deepEqual(target, { a: { b: 1 } });
  });
});
