import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { gaugeOf, Registry } from "./metrics.ts";

describe("gaugeOf()", () => {
  it("reads its values at each scrape, and forgets label sets that are gone", async () => {
    const registry = new Registry();
    let nodes: [Record<string, string>, number][] = [
      [{ gateway: "edge", ready: "true" }, 2],
      [{ gateway: "old", ready: "true" }, 1],
    ];
    gaugeOf(registry, "test_nodes", "nodes", () => nodes, ["gateway", "ready"]);
    assert.match(await registry.metrics(), /test_nodes\{gateway="old",ready="true"\} 1/);
    nodes = [[{ gateway: "edge", ready: "true" }, 3]];
    const text = await registry.metrics();
    assert.match(text, /test_nodes\{gateway="edge",ready="true"\} 3/);
    assert.doesNotMatch(text, /gateway="old"/);
  });
});
