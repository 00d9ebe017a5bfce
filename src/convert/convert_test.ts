/** What convert does with any input: lists, other kinds, its own kinds, and random policies. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import type { AnyPolicy, EgressGateway } from "../api/types.ts";
import { validateObject, validatePolicyAgainstGateway } from "../api/validate.ts";
import { convert, formatConversionError, formatWarning } from "./convert.ts";
import { convertText } from "./testing.ts";

describe("convert()", () => {
  it("opens Lists, skips other kinds with a warning, and passes Sallyport objects through", () => {
    const r = convertText(`
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web, namespace: shop}
- apiVersion: sallyport.dev/v1alpha1
  kind: EgressGateway
  metadata: {name: edge}
  spec: {nodeSelector: {matchLabels: {egress: "true"}}, pool: ["10.0.0.1"]}
`);
    assert.deepEqual(r.errors, []);
    assert.deepEqual(
      r.objects.map((o) => o.metadata.name),
      ["edge"],
    );
    assert.deepEqual(r.warnings.map(formatWarning), [
      "Warning: Deployment.apps/shop/web kind: skipped: not a kind convert reads (CiliumEgressGatewayPolicy (cilium.io), EgressGateway, EgressPolicy and EgressClusterPolicy (egressgateway.spidernet.io))",
    ]);
  });

  it("reports a document that is not an object, and treats null fields as unset", () => {
    const r = convert([
      "just text",
      {
        apiVersion: "cilium.io/v2",
        kind: "CiliumEgressGatewayPolicy",
        metadata: { name: "n", labels: null },
        spec: {
          selectors: [{ podSelector: { matchLabels: { app: "a" } }, nodeSelector: null }],
          destinationCIDRs: ["192.0.2.0/24"],
          excludedCIDRs: null,
          egressGateway: { nodeSelector: { matchLabels: { egress: "true" } }, interface: "eth0" },
        },
      },
    ]);
    assert.deepEqual(r.errors.map(formatConversionError), [
      "Cannot convert document 1: (root): is not an object: write one Kubernetes object per YAML document",
    ]);
    assert.equal(r.objects.length, 2);
  });

  it("writes only objects that our own admission accepts, whatever the Cilium policy", () => {
    // Mostly well-formed policies (so that most runs write objects), with a few mistakes mixed in.
    const mostly = <T, U>(good: fc.Arbitrary<T>, bad: fc.Arbitrary<U>): fc.Arbitrary<T | U> =>
      fc.oneof({ arbitrary: good, weight: 9 }, { arbitrary: bad, weight: 1 });
    const label = mostly(
      fc.constantFrom(
        "app",
        "tier",
        "io.kubernetes.pod.namespace",
        "k8s:io.kubernetes.pod.namespace",
        "io.cilium.k8s.namespace.labels.team",
      ),
      fc.constantFrom("io.cilium.k8s.policy.serviceaccount", "reserved:host"),
    );
    const value = fc.constantFrom("a", "b", "default");
    const requirement = fc.oneof(
      fc.record({
        key: label,
        operator: fc.constantFrom("In", "NotIn"),
        values: fc.array(value, { minLength: 1, maxLength: 2 }),
      }),
      fc.record({ key: label, operator: fc.constantFrom("Exists", "DoesNotExist") }),
    );
    const selector = fc.record(
      {
        matchLabels: fc.dictionary(label, value, { maxKeys: 3 }),
        matchExpressions: fc.array(requirement, { maxLength: 2 }),
      },
      { requiredKeys: [] },
    );
    const nodeSelector = mostly(
      fc.record({
        matchLabels: fc.dictionary(fc.constantFrom("egress", "zone"), value, {
          minKeys: 1,
          maxKeys: 2,
        }),
      }),
      selector,
    );
    const cidr = mostly(
      fc.constantFrom(
        "0.0.0.0/0",
        "10.0.0.0/8",
        "10.1.0.0/16",
        "192.0.2.7/32",
        "::/0",
        "2001:db8::/32",
      ),
      fc.constantFrom("bogus", "10.0.0.0", "10.0.0.0/33"),
    );
    const gateway = fc.oneof(
      {
        arbitrary: fc.record({
          nodeSelector,
          egressIP: mostly(
            fc.constantFrom("192.0.2.100", "192.0.2.101", "2001:db8::100"),
            fc.constant("nope"),
          ),
        }),
        weight: 4,
      },
      {
        arbitrary: fc.record({ nodeSelector, interface: fc.constantFrom("eth1", "ens5") }),
        weight: 3,
      },
      { arbitrary: fc.record({ nodeSelector }), weight: 2 },
      {
        arbitrary: fc.record({
          nodeSelector,
          egressIP: fc.constant("192.0.2.100"),
          interface: fc.constant("eth1"),
        }),
        weight: 1,
      },
    );
    const policy = fc.record({
      apiVersion: fc.constant("cilium.io/v2"),
      kind: fc.constant("CiliumEgressGatewayPolicy"),
      metadata: fc.record({ name: fc.constantFrom("p", "q", "r") }),
      spec: fc.record(
        {
          selectors: fc.array(
            mostly(
              fc.record(
                { podSelector: selector, namespaceSelector: selector, nodeSelector: selector },
                { requiredKeys: ["podSelector"] },
              ),
              fc.record({ nodeSelector: selector }, { requiredKeys: [] }),
            ),
            { minLength: 1, maxLength: 3 },
          ),
          destinationCIDRs: fc.array(cidr, { minLength: 1, maxLength: 3 }),
          excludedCIDRs: fc.array(cidr, { maxLength: 2 }),
          egressGateway: gateway,
          egressGateways: fc.array(gateway, { maxLength: 2 }),
        },
        { requiredKeys: ["selectors", "destinationCIDRs", "egressGateway"] },
      ),
    });
    let written = 0;
    fc.assert(
      fc.property(fc.array(policy, { maxLength: 3 }), (docs) => {
        const r = convert(docs);
        if (r.objects.some((o) => o.kind !== "EgressGateway")) written++;
        const gateways = r.objects.filter((o): o is EgressGateway => o.kind === "EgressGateway");
        for (const o of r.objects) {
          assert.deepEqual(validateObject(o), [], JSON.stringify(o));
          if (o.kind !== "EgressGateway") {
            const gw = gateways.find((g) => g.metadata.name === (o as AnyPolicy).spec.gateway);
            assert.ok(gw, `policy ${o.metadata.name} names a gateway that was not written`);
            assert.deepEqual(validatePolicyAgainstGateway(o as AnyPolicy, gw), []);
          }
        }
        // Every source is accounted for: written, or refused with a reason.
        for (const d of docs) {
          const source = `CiliumEgressGatewayPolicy/${d.metadata.name}`;
          const written = r.objects.some((o) =>
            o.metadata.annotations?.["sallyport.dev/converted-from"]?.split(", ").includes(source),
          );
          const refused = r.errors.some((e) => e.source === source);
          assert.ok(written || refused, `${source}: neither written nor refused`);
        }
      }),
      { numRuns: 300 },
    );
    assert.ok(written > 100, `only ${written} of 300 runs wrote a policy`);
  });

  it("writes only objects that our own admission accepts, whatever the spidernet objects", () => {
    const address4 = fc.constantFrom("10.0.0.1", "10.0.0.2", "10.0.0.9", "");
    const address6 = fc.constantFrom("fd00::1", "fd00::2", "");
    const gateway = fc.record({
      apiVersion: fc.constant("egressgateway.spidernet.io/v1beta1"),
      kind: fc.constant("EgressGateway"),
      metadata: fc.record({ name: fc.constantFrom("g1", "g2") }),
      spec: fc.record(
        {
          clusterDefault: fc.boolean(),
          ippools: fc.record(
            {
              ipv4: fc.array(fc.constantFrom("10.0.0.1", "10.0.0.1-10.0.0.3", "10.0.0.0/30", ""), {
                maxLength: 2,
              }),
              ipv6: fc.array(fc.constantFrom("fd00::1", "fd00::/126", ""), { maxLength: 2 }),
              ipv4DefaultEIP: address4,
              ipv6DefaultEIP: address6,
            },
            { requiredKeys: [] },
          ),
          nodeSelector: fc.record({
            selector: fc.record({
              matchLabels: fc.constantFrom({ egress: "true" }, { zone: "a" }),
            }),
          }),
        },
        { requiredKeys: ["nodeSelector"] },
      ),
    });
    const policy = fc.record({
      apiVersion: fc.constant("egressgateway.spidernet.io/v1beta1"),
      kind: fc.constantFrom("EgressPolicy", "EgressClusterPolicy"),
      metadata: fc.record({ name: fc.constantFrom("p", "q"), namespace: fc.constant("ns") }),
      spec: fc.record(
        {
          egressGatewayName: fc.constantFrom("g1", "g2", ""),
          egressIP: fc.record(
            {
              ipv4: address4,
              ipv6: address6,
              useNodeIP: fc.boolean(),
              allocatorPolicy: fc.constantFrom("default", "rr"),
            },
            { requiredKeys: [] },
          ),
          appliedTo: fc.record({ podSelector: fc.constant({ matchLabels: { app: "x" } }) }),
          destSubnet: fc.array(fc.constantFrom("192.0.2.0/24", "2001:db8::/64"), { maxLength: 2 }),
        },
        { requiredKeys: ["appliedTo"] },
      ),
      status: fc.option(fc.record({ eip: fc.record({ ipv4: address4 }) }), { nil: undefined }),
    });
    fc.assert(
      fc.property(fc.array(fc.oneof(gateway, policy), { maxLength: 5 }), (docs) => {
        const r = convert(docs.map((d) => JSON.parse(JSON.stringify(d))));
        const gateways = r.objects.filter((o): o is EgressGateway => o.kind === "EgressGateway");
        for (const o of r.objects) {
          assert.deepEqual(validateObject(o), [], JSON.stringify(o));
          if (o.kind !== "EgressGateway") {
            const gw = gateways.find((g) => g.metadata.name === (o as AnyPolicy).spec.gateway);
            assert.deepEqual(validatePolicyAgainstGateway(o as AnyPolicy, gw), []);
          }
        }
      }),
      { numRuns: 300 },
    );
  });
});
