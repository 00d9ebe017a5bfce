import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { sameLabels } from "./selector.ts";

describe("sameLabels()", () => {
  it("compares label maps by content", () => {
    assert.equal(sameLabels({ a: "1", b: "2" }, { b: "2", a: "1" }), true);
    assert.equal(sameLabels(undefined, {}), true);
    assert.equal(sameLabels({ a: "1" }, { a: "2" }), false);
    assert.equal(sameLabels({ a: "1" }, { b: "1" }), false);
    assert.equal(sameLabels({ a: "1" }, { a: "1", b: "2" }), false);
    assert.equal(sameLabels({ a: "1" }, undefined), false);
  });
});
