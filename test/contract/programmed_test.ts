/**
 * One notion of "programmed" for the controller and the agents, which may not import each other
 * (so this test lives here): for random clusters, the objects the controller writes (policy
 * statuses, endpoint slices, EgressNodes, the cluster info), read back by each node's agent,
 * give every node exactly the view the controller computed for it. So an agent whose kernel
 * holds its view reports the very revision the controller published, on exactly the nodes the
 * controller waits for. A pure test: no API server, no kernel.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { buildAgentView } from "../../src/agent/view.ts";
import {
  type AnyPolicy,
  API_VERSION,
  type EgressEndpointSlice,
  type EgressNode,
  policyKey,
} from "../../src/api/types.ts";
import { clusterInfoStatus, egressNodeSpec } from "../../src/controller/inputs.ts";
import { planSlices } from "../../src/controller/slices.ts";
import { gatewayStatus, policyStatus } from "../../src/controller/status.ts";
import { computeCluster } from "../../src/engine/cluster.ts";
import { nodeViewFromOutcome } from "../../src/engine/node_view.ts";
import type { Snapshot } from "../../src/engine/snapshot.ts";
import {
  clusterPolicy,
  gateway,
  localFacts,
  node,
  pod,
  policy,
  snapshot,
} from "../../src/engine/testing.ts";
import {
  DEFAULT_NODE_CONFIG,
  type PolicyView,
  policyRevision,
  policyTargets,
  reportedRevision,
} from "../../src/engine/view.ts";

const NODES = [
  node("node-1", { ipv4: "192.168.0.11", ipv6: "fd00:192:168::11", podCIDRs: ["172.29.1.0/24"] }),
  node("node-2", {
    ipv4: "192.168.0.12",
    ipv6: "fd00:192:168::12",
    labels: { egress: "true" },
    podCIDRs: ["172.29.2.0/24"],
  }),
  node("node-3", {
    ipv4: "192.168.0.13",
    labels: { egress: "true", zone: "b" },
    podCIDRs: ["172.29.3.0/24"],
  }),
];

const arbCluster = fc
  .record({
    pods: fc.uniqueArray(
      fc.record({
        ns: fc.constantFrom("team-a", "team-b"),
        name: fc.constantFrom("p1", "p2", "p3", "p4", "p5"),
        node: fc.integer({ min: 1, max: 3 }),
        app: fc.constantFrom("web", "db"),
        octet: fc.integer({ min: 2, max: 250 }),
        v6: fc.boolean(),
      }),
      { selector: (p) => `${p.ns}/${p.name}`, maxLength: 8 },
    ),
    policies: fc.uniqueArray(
      fc.record({
        ns: fc.constantFrom("team-a", "team-b"),
        name: fc.constantFrom("a", "b", "c", "d"),
        cluster: fc.boolean(),
        app: fc.constantFrom("web", "db", undefined),
        mode: fc.constantFrom("pool", "explicit", "nodeIP"),
        nodeSelector: fc.boolean(),
        priority: fc.integer({ min: 0, max: 2 }),
        day: fc.integer({ min: 1, max: 9 }),
        dest: fc.constantFrom<string[]>([], ["203.0.113.0/24"], ["2001:db8::/64"]),
        ports: fc.boolean(),
      }),
      { selector: (p) => (p.cluster ? p.name : `${p.ns}/${p.name}`), maxLength: 6 },
    ),
    healthy: fc.subarray(["node-2", "node-3"]),
  })
  .map(({ pods, policies, healthy }): Snapshot => {
    return snapshot({
      nodes: NODES,
      namespaces: [
        { name: "team-a", labels: { team: "a" } },
        { name: "team-b", labels: { team: "b" } },
      ],
      pods: pods.map((p) =>
        pod(
          p.ns,
          p.name,
          `node-${p.node}`,
          [`172.29.${p.node}.${p.octet}`, ...(p.v6 ? [`fd00:172:29:${p.node}::${p.octet}`] : [])],
          { app: p.app },
        ),
      ),
      gateways: [
        gateway("edge", { pool: ["10.168.60.100-10.168.60.105", "fd00:a::100-fd00:a::105"] }),
      ],
      policies: policies.map((p) => {
        const spec = {
          ...(p.app === undefined ? {} : { podSelector: { matchLabels: { app: p.app } } }),
          priority: p.priority,
          ...(p.dest.length > 0 ? { destinationCIDRs: p.dest } : {}),
          ...(p.mode === "explicit" && !p.dest.some((d) => d.includes(":"))
            ? { egressIP: ["10.168.60.105"] }
            : {}),
          ...(p.mode === "nodeIP" ? { useNodeIP: true } : {}),
          ...(p.nodeSelector
            ? { nodeSelector: { matchLabels: { "kubernetes.io/hostname": "node-1" } } }
            : {}),
          ...(p.ports ? { ports: [{ protocol: "TCP" as const, port: 443 }] } : {}),
        };
        const meta = { created: `2026-01-0${p.day}T00:00:00Z` };
        return p.cluster
          ? clusterPolicy(
              p.name,
              { ...spec, namespaceSelector: { matchLabels: { team: "a" } } },
              meta,
            )
          : policy(p.ns, p.name, spec, meta);
      }),
      healthy: new Set(healthy),
    });
  });

/** What the controller writes for a snapshot, as the agents read it back. */
function published(s: Snapshot) {
  const outcome = computeCluster(s);
  const now = "2026-02-01T00:00:00Z";
  const policies: AnyPolicy[] = s.policies.map((p) => {
    const o = outcome.policies.get(policyKey(p))!;
    return {
      ...p,
      status: policyStatus(o, undefined, { programmedOn: () => [] }, now),
    } as AnyPolicy;
  });
  const gateways = s.gateways.map((g) => {
    const o = outcome.gateways.get(g.metadata.name ?? "");
    return o === undefined ? g : { ...g, status: gatewayStatus(o, undefined, 1, now) };
  });
  const slices: EgressEndpointSlice[] = [];
  for (const o of outcome.policies.values()) {
    if (!o.accepted) continue;
    const plan = planSlices(
      o.key,
      o.endpoints.map((e) => ({ pod: e.pod, node: e.node, ips: [...e.ips] })),
      [],
      2,
    );
    for (const w of plan.write)
      slices.push({
        apiVersion: API_VERSION,
        kind: "EgressEndpointSlice",
        metadata: { name: w.name },
        policy: o.key,
        endpoints: [...w.endpoints],
      });
  }
  const egressNodes: EgressNode[] = [...outcome.identities].map(([name, id]) => ({
    apiVersion: API_VERSION,
    kind: "EgressNode",
    metadata: { name },
    spec: egressNodeSpec(id, s.nodes.find((n) => n.name === name)!, name !== "node-1"),
    // What the node's agent reported, as the controller read it (the snapshot's reports).
    ...(s.reports.get(name)?.tunnelClasses === true ? { status: { tunnelClasses: true } } : {}),
  }));
  const clusterInfo = {
    apiVersion: API_VERSION as typeof API_VERSION,
    kind: "EgressClusterInfo" as const,
    metadata: { name: "default" },
    spec: {},
    status: clusterInfoStatus(s.nodes, s.serviceCIDRs, outcome.ignoreCIDRs),
  };
  return { outcome, policies, gateways, slices, egressNodes, clusterInfo };
}

const byKey = (views: readonly PolicyView[]) =>
  new Map(views.map((v) => [v.key, JSON.parse(JSON.stringify(v)) as unknown]));

describe("the controller's and the agents' notion of programmed", () => {
  it("every agent reads back exactly the views the controller computed, so their revisions agree", () => {
    fc.assert(
      fc.property(arbCluster, (s) => {
        const { outcome, policies, gateways, slices, egressNodes, clusterInfo } = published(s);
        for (const n of NODES) {
          const local = localFacts({ ipv4: n.addresses[4], ipv6: n.addresses[6] });
          const controllerView = nodeViewFromOutcome(outcome, n.name, { local });
          const { view: agentView } = buildAgentView({
            node: n.name,
            policies,
            gateways,
            egressNodes,
            slices,
            clusterInfo,
            localPods: s.pods.filter((p) => p.nodeName === n.name),
            namespaceLabels: new Map(s.namespaces.map((x) => [x.name, x.labels])),
            config: DEFAULT_NODE_CONFIG,
            local,
          });
          assert.deepEqual(byKey(agentView.policies), byKey(controllerView.policies), n.name);
          assert.deepEqual(
            JSON.parse(JSON.stringify([...agentView.peers].sort())),
            JSON.parse(JSON.stringify([...controllerView.peers].sort())),
          );
          assert.deepEqual(agentView.ignoreCIDRs, controllerView.ignoreCIDRs);
          for (const view of agentView.policies) {
            const o = outcome.policies.get(view.key)!;
            const status = policies.find((p) => policyKey(p) === view.key)!.status!;
            assert.equal(status.revision, policyRevision(o.view!));
            // The agent reports the published revision on the target nodes, and only there.
            const reported = reportedRevision(view, n.name, status.revision);
            if (policyTargets(o.view!).includes(n.name)) assert.equal(reported, status.revision);
            else assert.equal(reported, undefined);
          }
        }
      }),
      { numRuns: 300 },
    );
  });
});
