import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { BAD_MANIFESTS, CLUSTER_POLICY, GATEWAY, POLICY } from "../../test/fixtures/manifests.ts";
import type { AnyPolicy, EgressGateway } from "./types.ts";
import {
  type FieldError,
  validateGatewayAgainstOthers,
  validateObject,
  validatePolicyAgainstGateway,
} from "./validate.ts";

/** What the webhook runs: the object's own rules, then the rules against the world. */
function admit(obj: Record<string, unknown>): FieldError[] {
  const own = validateObject(obj);
  if (own.length > 0) return own;
  if (obj.kind === "EgressGateway")
    return validateGatewayAgainstOthers(obj as EgressGateway, [
      GATEWAY as unknown as EgressGateway,
    ]);
  if (obj.kind === "EgressPolicy" || obj.kind === "ClusterEgressPolicy") {
    return validatePolicyAgainstGateway(obj as AnyPolicy, GATEWAY as unknown as EgressGateway);
  }
  return [];
}

describe("validateObject()", () => {
  it("accepts the good examples", () => {
    for (const good of [GATEWAY, POLICY, CLUSTER_POLICY])
      assert.deepEqual(validateObject(good), [], good.kind);
  });

  it("accepts several egress IPs per family, and egressIPCount for pool addresses", () => {
    const many = {
      ...POLICY,
      spec: {
        ...POLICY.spec,
        destinationCIDRs: ["10.6.105.150/32", "2001:db8::/64"],
        egressIP: [
          ...Array.from({ length: 8 }, (_, i) => `10.168.60.${100 + i}`),
          "fd00:a::1",
          "fd00:a::2",
        ],
      },
    };
    assert.deepEqual(admit(many), []);
    const { egressIP: _, ...pool } = POLICY.spec;
    assert.deepEqual(validateObject({ ...POLICY, spec: { ...pool, egressIPCount: 8 } }), []);
  });

  it(`has at least 30 bad manifests`, () => assert.ok(BAD_MANIFESTS.length >= 30));

  for (const bad of BAD_MANIFESTS) {
    it(`rejects ${bad.name}, naming ${bad.field}`, () => {
      const errors = admit(bad.object);
      assert.ok(errors.length > 0, "accepted");
      assert.ok(
        errors.some(
          (e) =>
            e.field === bad.field ||
            e.field.startsWith(`${bad.field}.`) ||
            e.field.startsWith(`${bad.field}[`),
        ),
        `no error names ${bad.field}: ${JSON.stringify(errors)}`,
      );
      for (const e of errors) assert.ok(e.message.length > 10, `message too terse: ${e.message}`);
    });
  }
});
