/** Which pods each policy selects, and shadows. Address plan: see ./testing.ts. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { type AnyPolicy, policyKey } from "../api/types.ts";
import { Memberships } from "./membership.ts";
import {
  admitPolicy,
  compileGateway,
  isPrepared,
  type PreparedPolicy,
  parsePolicy,
} from "./policies.ts";
import type { PodInfo } from "./snapshot.ts";
import { clusterPolicy, gateway, pod, policy } from "./testing.ts";

const EDGE = compileGateway(gateway("edge"));

function prepare(p: AnyPolicy): PreparedPolicy {
  const key = policyKey(p);
  const admitted = admitPolicy(parsePolicy(p, key), EDGE, undefined, [4, 6], undefined);
  assert.ok(isPrepared(admitted), key);
  return admitted;
}

const web = (ns: string, name: string, node: string, octet: number) =>
  pod(ns, name, node, [`172.29.1.${octet}`], { app: "web" });

describe("Memberships", () => {
  it("selects by namespace and labels, and only pods a policy can steer", () => {
    const m = new Memberships();
    m.setPod(web("team-a", "w1", "node-1", 1));
    m.setPod(web("team-b", "w2", "node-1", 2));
    m.setPod({ ...web("team-a", "host", "node-1", 3), hostNetwork: true });
    const p = prepare(policy("team-a", "web", { podSelector: { matchLabels: { app: "web" } } }));
    m.setPolicy(p.key, p);
    assert.deepEqual(
      m.endpoints(p.key).map((e) => e.pod),
      ["team-a/w1"],
    );
    assert.deepEqual(m.endpointNodes(p.key), ["node-1"]);
    assert.deepEqual([...m.takeDirty()], [p.key]);
    assert.equal(m.setPod(web("team-a", "w1", "node-1", 1)), false, "nothing it reads changed");
    assert.deepEqual([...m.takeDirty()], []);
  });

  it("counts the pods a higher-precedence policy takes over, per winner", () => {
    const m = new Memberships();
    for (let i = 1; i <= 3; i++) m.setPod(web("team-a", `w${i}`, "node-1", i));
    const all = prepare(policy("team-a", "all", {}));
    const partner = prepare(
      policy("team-a", "partner", {
        podSelector: { matchLabels: { app: "web" } },
        destinationCIDRs: ["203.0.113.0/24"],
        priority: 10,
      }),
    );
    m.setPolicy(all.key, all);
    m.setPolicy(partner.key, partner);
    assert.deepEqual([...m.shadows(all.key)], [[partner.key, 3]]);
    assert.equal(m.shadows(partner.key).size, 0);
    m.deletePod("team-a/w2");
    assert.deepEqual([...m.shadows(all.key)], [[partner.key, 2]]);
    m.setPolicy(partner.key, undefined);
    assert.equal(m.shadows(all.key).size, 0);
  });

  it("follows namespace labels for cluster policies and node labels for node selectors", () => {
    const m = new Memberships();
    m.setPod(web("team-a", "w1", "node-1", 1));
    m.setPod(web("team-b", "w2", "node-2", 2));
    const prod = prepare(
      clusterPolicy("prod", { namespaceSelector: { matchLabels: { env: "prod" } } }),
    );
    const edgeNodes = prepare(
      policy("team-b", "edge", { nodeSelector: { matchLabels: { edge: "true" } } }),
    );
    m.setPolicy(prod.key, prod);
    m.setPolicy(edgeNodes.key, edgeNodes);
    assert.equal(m.endpoints(prod.key).length, 0);
    m.setNamespace("team-a", { env: "prod" });
    assert.deepEqual(
      m.endpoints(prod.key).map((e) => e.pod),
      ["team-a/w1"],
    );
    assert.equal(m.endpoints(edgeNodes.key).length, 0);
    m.setNode("node-2", { edge: "true" });
    assert.deepEqual(
      m.endpoints(edgeNodes.key).map((e) => e.pod),
      ["team-b/w2"],
    );
    m.setNode("node-2", undefined);
    assert.equal(m.endpoints(edgeNodes.key).length, 0, "a node that is gone has no labels");
  });

  it("selects incrementally what a fresh index selects", () => {
    const arbPolicy = fc.record({
      scope: fc.constantFrom("team-a", "team-b", "cluster"),
      name: fc.constantFrom("p1", "p2", "p3"),
      app: fc.constantFrom(undefined, "web", "db"),
      prodOnly: fc.boolean(),
      edgeOnly: fc.boolean(),
      priority: fc.integer({ min: 0, max: 2 }),
      dest: fc.constantFrom<string[]>([], ["203.0.113.0/24"], ["2001:db8::/64"]),
      remove: fc.boolean(),
    });
    const arbStep = fc.oneof(
      fc.record({
        t: fc.constant("pod" as const),
        ns: fc.constantFrom("team-a", "team-b"),
        name: fc.constantFrom("w1", "w2", "w3", "w4"),
        node: fc.constantFrom("node-1", "node-2"),
        app: fc.constantFrom("web", "db"),
        remove: fc.boolean(),
        done: fc.boolean(),
      }),
      fc.record({ t: fc.constant("policy" as const), p: arbPolicy }),
      fc.record({
        t: fc.constant("namespace" as const),
        ns: fc.constantFrom("team-a", "team-b"),
        prod: fc.boolean(),
      }),
      fc.record({
        t: fc.constant("node" as const),
        name: fc.constantFrom("node-1", "node-2"),
        edge: fc.option(fc.boolean(), { nil: undefined }),
      }),
    );
    fc.assert(
      fc.property(fc.array(arbStep, { maxLength: 30 }), (steps) => {
        const m = new Memberships();
        const pods = new Map<string, PodInfo>();
        const policies = new Map<string, PreparedPolicy>();
        const namespaces = new Map<string, Record<string, string>>();
        const nodes = new Map<string, Record<string, string>>();
        for (const s of steps) {
          if (s.t === "pod") {
            const key = `${s.ns}/${s.name}`;
            if (s.remove) {
              pods.delete(key);
              m.deletePod(key);
            } else {
              const p: PodInfo = {
                ...pod(s.ns, s.name, s.node, ["172.29.1.9"], { app: s.app }),
                phase: s.done ? "Succeeded" : "Running",
              };
              pods.set(key, p);
              m.setPod(p);
            }
          } else if (s.t === "policy") {
            const spec = {
              ...(s.p.app === undefined ? {} : { podSelector: { matchLabels: { app: s.p.app } } }),
              ...(s.p.edgeOnly ? { nodeSelector: { matchLabels: { edge: "true" } } } : {}),
              ...(s.p.dest.length > 0 ? { destinationCIDRs: s.p.dest } : {}),
              priority: s.p.priority,
            };
            const object =
              s.p.scope === "cluster"
                ? clusterPolicy(s.p.name, {
                    ...spec,
                    podSelector: spec.podSelector ?? {},
                    namespaceSelector: s.p.prodOnly ? { matchLabels: { env: "prod" } } : {},
                  })
                : policy(s.p.scope, s.p.name, spec);
            const p = prepare(object);
            if (s.p.remove) policies.delete(p.key);
            else policies.set(p.key, p);
            m.setPolicy(p.key, s.p.remove ? undefined : p);
          } else if (s.t === "namespace") {
            const labels = { env: s.prod ? "prod" : "dev" };
            namespaces.set(s.ns, labels);
            m.setNamespace(s.ns, labels);
          } else {
            const labels = s.edge === undefined ? undefined : { edge: String(s.edge) };
            if (labels === undefined) nodes.delete(s.name);
            else nodes.set(s.name, labels);
            m.setNode(s.name, labels);
          }
        }
        const fresh = new Memberships();
        for (const [name, labels] of namespaces) fresh.setNamespace(name, labels);
        for (const [name, labels] of nodes) fresh.setNode(name, labels);
        for (const p of pods.values()) fresh.setPod(p);
        for (const [k, p] of policies) fresh.setPolicy(k, p);
        for (const k of policies.keys()) {
          assert.deepEqual(m.endpoints(k), fresh.endpoints(k), k);
          assert.deepEqual(m.endpointNodes(k), fresh.endpointNodes(k), k);
          assert.deepEqual(
            [...m.shadows(k)].sort(),
            [...fresh.shadows(k)].sort(),
            `shadows of ${k}`,
          );
        }
      }),
    );
  });
});
