import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { MAX_TUNNEL_CLASS, shareOf, TunnelClasses } from "./tunnel_classes.ts";

const req = (key: string, createdAt: string, wanted?: number, share = `policy:${key}`) => ({
  key,
  share,
  createdAt,
  wanted,
});

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

  it("gives policies with the same egress IPs one class, freed with the last of them", () => {
    const c = new TunnelClasses();
    const eip = shareOf("x", ["10.0.0.2", "10.0.0.1"]);
    assert.equal(eip, shareOf("y", ["10.0.0.1", "10.0.0.2"]), "the share names the addresses");
    assert.notEqual(shareOf("x", []), shareOf("y", []), "without addresses, each its own");
    c.assign([req("own", "2026-01-01"), req("a", "2026-01-02", undefined, eip)]);
    c.assign([req("b", "2026-01-03", undefined, eip)]);
    assert.deepEqual(
      ["own", "a", "b"].map((k) => c.get(k)),
      [1, 2, 2],
    );
    c.release("a");
    assert.equal(c.get("b"), 2, "the class stays while a policy of its share is left");
    c.assign([req("new", "2026-01-04")]);
    assert.equal(c.get("new"), 3);
    c.release("b");
    c.assign([req("newer", "2026-01-05")]);
    assert.equal(c.get("newer"), 2, "the last policy of the share frees the class");
  });

  it("keeps the class a share's oldest policy wanted, and gives it to younger ones", () => {
    const c = new TunnelClasses();
    c.assign([
      req("young", "2026-02-01", 9, "eips:10.0.0.1"),
      req("old", "2026-01-01", 7, "eips:10.0.0.1"),
      req("other", "2026-01-15", 9),
    ]);
    assert.deepEqual(
      ["old", "young", "other"].map((k) => c.get(k)),
      [7, 7, 9],
    );
  });

  it("gives a class to the share that had it before a policy that left that share", () => {
    const c = new TunnelClasses();
    c.assign([
      req("left", "2026-01-01", 4, "eips:10.0.0.9"),
      { ...req("stayed", "2026-01-02", 4, "eips:10.0.0.1"), firm: true },
    ]);
    assert.equal(c.get("stayed"), 4, "the firm wish, though younger");
    assert.equal(c.get("left"), 1);
  });

  it("policies share a class exactly when they share egress IPs, whatever the order of assignments and releases", () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.oneof(
            fc.record({
              op: fc.constant("assign" as const),
              keys: fc.array(fc.integer({ min: 0, max: 30 }), { maxLength: 5 }),
              shift: fc.integer({ min: 0, max: 4 }),
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
            else
              c.assign(
                o.keys.map((k) =>
                  req(
                    `k${k}`,
                    String(k),
                    o.wanted,
                    k % 3 === 0 ? `s${(k + o.shift) % 4}` : undefined,
                  ),
                ),
              );
          }
          const held = Array.from({ length: 31 }, (_, k) => `k${k}`).filter(
            (k) => c.get(k) !== undefined,
          );
          for (const a of held)
            for (const b of held)
              assert.equal(c.get(a) === c.get(b), c.share(a) === c.share(b), `${a} and ${b}`);
        },
      ),
    );
  });
});
