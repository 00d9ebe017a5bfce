/** Admission of policies against their gateway and namespace. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { policyKey } from "../api/types.ts";
import { admitPolicy, compileGateway, isPrepared, parsePolicy } from "./policies.ts";
import { gateway, policy } from "./testing.ts";

const p = policy("team-a", "web", { destinationCIDRs: ["203.0.113.0/24", "2001:db8::/64"] });
const key = policyKey(p);

describe("admitPolicy()", () => {
  it("returns the previous object when nothing it was made of changed", () => {
    const parsed = parsePolicy(p, key);
    const edge = compileGateway(gateway("edge", { pool: ["10.0.0.1"] }));
    const families = [4, 6] as const;
    const first = admitPolicy(parsed, edge, undefined, families, undefined);
    assert.ok(isPrepared(first));
    assert.equal(first.mode, "pool");
    assert.deepEqual(first.families, [4, 6]);
    assert.equal(admitPolicy(parsed, edge, { any: "labels" }, families, first), first);
    const noPool = compileGateway(gateway("edge"));
    const second = admitPolicy(parsed, noPool, undefined, families, first);
    assert.ok(isPrepared(second) && second !== first && second.mode === "nodeIP");
  });

  it("names the missing gateway and the namespace a gateway does not serve", () => {
    const parsed = parsePolicy(p, key);
    const missing = admitPolicy(parsed, undefined, undefined, [4], undefined);
    assert.ok(!isPrepared(missing) && missing.reason === "GatewayNotFound");
    const guarded = compileGateway(gateway("edge", { namespaces: { tier: "gold" } }));
    const refused = admitPolicy(parsed, guarded, { tier: "silver" }, [4], undefined);
    assert.ok(!isPrepared(refused) && refused.reason === "NamespaceNotAllowed");
    assert.match(refused.message, /only serves namespaces matching tier=gold; namespace team-a/);
    assert.ok(isPrepared(admitPolicy(parsed, guarded, { tier: "gold" }, [4], undefined)));
  });

  it("validates only what the engine reads: a status does not make a policy invalid", () => {
    const withStatus = { ...p, status: { observedGeneration: 3 } };
    const parsed = parsePolicy(withStatus, key);
    assert.ok("key" in parsed);
    const invalid = parsePolicy(
      policy("team-a", "x", { egressIP: ["10.0.0.1"], interface: "eth1" }),
      key,
    );
    assert.ok(!("key" in invalid) && invalid.reason === "InvalidSpec");
  });
});
