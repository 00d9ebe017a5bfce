/**
 * The agent's keyed state: after any sequence of watch events its views equal those built from
 * scratch from the final objects, every key whose view changed is reported dirty, and events
 * that change nothing the datapath reads (status counters, another node's status) mark nothing.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import type { AnyPolicy, EgressEndpointSlice, EgressGateway, EgressNode } from "../api/types.ts";
import type { PodInfo } from "../engine/snapshot.ts";
import type { PolicyView } from "../engine/view.ts";
import { AgentState, agentStateOf } from "./view.ts";

const NODE = "n1";
const accepted = (ok: boolean) => [
  {
    type: "Accepted",
    status: ok ? ("True" as const) : ("False" as const),
    reason: ok ? "Accepted" : "InvalidSpec",
    message: "",
    lastTransitionTime: "2026-01-01T00:00:00Z",
  },
];

const arbPolicy: fc.Arbitrary<AnyPolicy> = fc
  .record({
    name: fc.constantFrom("a", "b", "c"),
    cluster: fc.boolean(),
    app: fc.constantFrom("web", "db", undefined),
    team: fc.constantFrom("red", undefined),
    nodeSelector: fc.boolean(),
    ok: fc.boolean(),
    gw: fc.constantFrom("edge", "core"),
    gatewayNode: fc.constantFrom("n1", "n2", undefined),
    eip: fc.constantFrom("10.168.60.100", "10.168.60.101"),
    priority: fc.integer({ min: 0, max: 2 }),
    dest: fc.constantFrom(["203.0.113.0/24"], [], ["10.6.105.150/32", "2001:db8::/64"]),
    egressIP: fc.boolean(),
    revision: fc.constantFrom("r1", "r2"),
    matched: fc.integer({ min: 0, max: 5 }),
  })
  .map(
    (r) =>
      ({
        apiVersion: "sallyport.dev/v1alpha1",
        kind: r.cluster ? "ClusterEgressPolicy" : "EgressPolicy",
        metadata: r.cluster
          ? { name: r.name, creationTimestamp: "2026-01-01T00:00:00Z" }
          : { name: r.name, namespace: "ns1", creationTimestamp: "2026-01-01T00:00:00Z" },
        spec: {
          gateway: r.gw,
          priority: r.priority,
          destinationCIDRs: r.dest,
          podSelector: { matchLabels: r.app === undefined ? {} : { app: r.app } },
          ...(r.cluster
            ? { namespaceSelector: { matchLabels: r.team === undefined ? {} : { team: r.team } } }
            : {}),
          ...(r.nodeSelector ? { nodeSelector: { matchLabels: { zone: "a" } } } : {}),
          ...(r.egressIP ? { egressIP: [r.eip] } : {}),
        },
        status: {
          conditions: accepted(r.ok),
          egressIPs: [r.eip],
          ...(r.gatewayNode === undefined ? {} : { gatewayNode: r.gatewayNode }),
          revision: r.revision,
          matchedPods: r.matched,
        },
      }) as unknown as AnyPolicy,
  );

const arbGateway: fc.Arbitrary<EgressGateway> = fc
  .record({
    name: fc.constantFrom("edge", "core"),
    pool: fc.boolean(),
    iface: fc.constantFrom("eth1", undefined),
  })
  .map((r) => ({
    apiVersion: "sallyport.dev/v1alpha1",
    kind: "EgressGateway",
    metadata: { name: r.name },
    spec: {
      nodeSelector: { matchLabels: { egress: "true" } },
      ...(r.pool ? { pool: ["10.168.60.100-10.168.60.110"] } : {}),
      ...(r.iface === undefined ? {} : { interface: r.iface }),
    },
  }));

const policyKeyOf = (name: string, cluster: boolean) =>
  cluster ? `ClusterEgressPolicy/${name}` : `EgressPolicy/ns1/${name}`;

const arbSlice: fc.Arbitrary<EgressEndpointSlice> = fc
  .record({
    name: fc.constantFrom("s1", "s2", "s3"),
    policy: fc.constantFrom("a", "b", "c"),
    cluster: fc.boolean(),
    pods: fc.subarray(["p1", "p2", "p3", "q1"]),
    node: fc.constantFrom("n1", "n2"),
  })
  .map((r) => ({
    apiVersion: "sallyport.dev/v1alpha1",
    kind: "EgressEndpointSlice",
    metadata: { name: r.name },
    policy: policyKeyOf(r.policy, r.cluster),
    endpoints: r.pods.map((p, i) => ({
      pod: `ns1/${p}`,
      node: r.node,
      ips: [`10.244.${r.node === "n1" ? 1 : 2}.${i + 1}`],
    })),
  }));

const arbPod: fc.Arbitrary<PodInfo> = fc
  .record({
    name: fc.constantFrom("p1", "p2", "p3"),
    app: fc.constantFrom("web", "db"),
    octet: fc.integer({ min: 1, max: 9 }),
    phase: fc.constantFrom("Running", "Succeeded"),
  })
  .map((r) => ({
    namespace: "ns1",
    name: r.name,
    labels: { app: r.app },
    nodeName: NODE,
    ips: [`10.244.1.${r.octet}`],
    hostNetwork: false,
    phase: r.phase,
  }));

const arbEgressNode: fc.Arbitrary<EgressNode> = fc
  .record({
    name: fc.constantFrom("n1", "n2", "n3"),
    id: fc.integer({ min: 1, max: 3 }),
    underlay: fc.constantFrom("192.168.0.11", "192.168.0.12", undefined),
    lastSync: fc.constantFrom("t1", "t2"),
  })
  .map(
    (r) =>
      ({
        apiVersion: "sallyport.dev/v1alpha1",
        kind: "EgressNode",
        metadata: { name: r.name },
        spec: {
          nodeID: r.id,
          mark: "0x26000100",
          tunnel: { mac: `02:53:50:00:00:0${r.id}`, ipv4: `100.127.0.${r.id + 1}` },
          addresses: { ipv4: `192.168.0.1${r.id}` },
        },
        status: {
          ...(r.underlay === undefined
            ? {}
            : { underlay: { interface: "eth0", ipv4: r.underlay } }),
          lastSync: r.lastSync,
        },
      }) as EgressNode,
  );

type Event =
  | { kind: "policy"; obj: AnyPolicy }
  | { kind: "deletePolicy"; name: string; cluster: boolean }
  | { kind: "gateway"; obj: EgressGateway }
  | { kind: "deleteGateway"; name: string }
  | { kind: "slice"; obj: EgressEndpointSlice }
  | { kind: "deleteSlice"; name: string }
  | { kind: "pod"; pod: PodInfo }
  | { kind: "deletePod"; name: string }
  | { kind: "namespace"; team: string | undefined }
  | { kind: "node"; obj: EgressNode }
  | { kind: "deleteNode"; name: string }
  | { kind: "ignore"; cidrs: string[] };

const arbEvent: fc.Arbitrary<Event> = fc.oneof(
  { weight: 4, arbitrary: arbPolicy.map((obj) => ({ kind: "policy" as const, obj })) },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("deletePolicy" as const),
      name: fc.constantFrom("a", "b", "c"),
      cluster: fc.boolean(),
    }),
  },
  { weight: 2, arbitrary: arbGateway.map((obj) => ({ kind: "gateway" as const, obj })) },
  {
    weight: 1,
    arbitrary: fc
      .constantFrom("edge", "core")
      .map((name) => ({ kind: "deleteGateway" as const, name })),
  },
  { weight: 4, arbitrary: arbSlice.map((obj) => ({ kind: "slice" as const, obj })) },
  {
    weight: 1,
    arbitrary: fc
      .constantFrom("s1", "s2", "s3")
      .map((name) => ({ kind: "deleteSlice" as const, name })),
  },
  { weight: 3, arbitrary: arbPod.map((pod) => ({ kind: "pod" as const, pod })) },
  {
    weight: 1,
    arbitrary: fc
      .constantFrom("p1", "p2", "p3")
      .map((name) => ({ kind: "deletePod" as const, name })),
  },
  {
    weight: 1,
    arbitrary: fc
      .constantFrom("red", undefined)
      .map((team) => ({ kind: "namespace" as const, team })),
  },
  { weight: 2, arbitrary: arbEgressNode.map((obj) => ({ kind: "node" as const, obj })) },
  {
    weight: 1,
    arbitrary: fc.constantFrom("n2", "n3").map((name) => ({ kind: "deleteNode" as const, name })),
  },
  {
    weight: 1,
    arbitrary: fc
      .subarray(["10.96.0.0/16", "10.244.0.0/16"])
      .map((cidrs) => ({ kind: "ignore" as const, cidrs })),
  },
);

/** The objects the watches hold, to build the state from scratch. */
class Objects {
  policies = new Map<string, AnyPolicy>();
  gateways = new Map<string, EgressGateway>();
  slices = new Map<string, EgressEndpointSlice>();
  pods = new Map<string, PodInfo>();
  namespaces = new Map<string, Record<string, string>>();
  nodes = new Map<string, EgressNode>();
  ignore: string[] = [];

  apply(e: Event, state: AgentState): void {
    switch (e.kind) {
      case "policy": {
        const key = policyKeyOf(e.obj.metadata.name ?? "", e.obj.kind === "ClusterEgressPolicy");
        this.policies.set(key, e.obj);
        state.setPolicy(e.obj);
        return;
      }
      case "deletePolicy": {
        const key = policyKeyOf(e.name, e.cluster);
        const obj = this.policies.get(key);
        if (obj === undefined) return;
        this.policies.delete(key);
        state.deletePolicy(obj);
        return;
      }
      case "gateway":
        this.gateways.set(e.obj.metadata.name ?? "", e.obj);
        state.setGateway(e.obj);
        return;
      case "deleteGateway":
        this.gateways.delete(e.name);
        state.deleteGateway(e.name);
        return;
      case "slice":
        this.slices.set(e.obj.metadata.name ?? "", e.obj);
        state.setSlice(e.obj);
        return;
      case "deleteSlice":
        this.slices.delete(e.name);
        state.deleteSlice(e.name);
        return;
      case "pod":
        this.pods.set(`ns1/${e.pod.name}`, e.pod);
        state.setLocalPod(e.pod);
        return;
      case "deletePod":
        this.pods.delete(`ns1/${e.name}`);
        state.deleteLocalPod(`ns1/${e.name}`);
        return;
      case "namespace": {
        const labels = e.team === undefined ? {} : { team: e.team };
        this.namespaces.set("ns1", labels);
        state.setNamespace("ns1", labels);
        return;
      }
      case "node":
        this.nodes.set(e.obj.metadata.name ?? "", e.obj);
        state.setEgressNode(e.obj);
        return;
      case "deleteNode":
        this.nodes.delete(e.name);
        state.deleteEgressNode(e.name);
        return;
      case "ignore":
        this.ignore = e.cidrs;
        state.setClusterInfo({
          apiVersion: "sallyport.dev/v1alpha1",
          kind: "EgressClusterInfo",
          metadata: { name: "default" },
          spec: {},
          status: { ignoredCIDRs: e.cidrs },
        } as never);
        return;
    }
  }

  fromScratch(): AgentState {
    return agentStateOf({
      node: NODE,
      policies: this.policies.values(),
      gateways: this.gateways.values(),
      egressNodes: this.nodes.values(),
      slices: this.slices.values(),
      localPods: this.pods.values(),
      namespaceLabels: this.namespaces,
      clusterInfo: {
        apiVersion: "sallyport.dev/v1alpha1",
        kind: "EgressClusterInfo",
        metadata: { name: "default" },
        spec: {},
        status: { ignoredCIDRs: this.ignore },
      } as never,
    });
  }
}

const viewsOf = (s: AgentState) =>
  new Map<string, PolicyView>([...s.views()].map((v) => [v.key, v]));

describe("AgentState", () => {
  it("equals the state built from scratch after any sequence of events, and reports every change", () => {
    fc.assert(
      fc.property(fc.array(arbEvent, { minLength: 1, maxLength: 30 }), (events) => {
        const objects = new Objects();
        const state = new AgentState(NODE);
        let before = viewsOf(state);
        let peersBefore = state.peers;
        for (const e of events) {
          objects.apply(e, state);
          const scratch = objects.fromScratch();
          const now = viewsOf(state);
          assert.deepEqual(now, viewsOf(scratch));
          assert.deepEqual(state.peers, scratch.peers);
          assert.deepEqual(state.programmed(), scratch.programmed());
          const changes = state.takeChanges();
          for (const key of new Set([...before.keys(), ...now.keys()])) {
            const changed = JSON.stringify(before.get(key)) !== JSON.stringify(now.get(key));
            if (changed) assert.ok(changes.policies.has(key), `${key} changed but is not dirty`);
          }
          if (JSON.stringify([...peersBefore]) !== JSON.stringify([...state.peers]))
            assert.ok(changes.peers, "peers changed but are not dirty");
          before = now;
          peersBefore = state.peers;
        }
      }),
      { numRuns: 3000 },
    );
  });

  it("marks nothing for status writes it does not read", () => {
    const state = new AgentState(NODE);
    const [policy] = fc.sample(
      arbPolicy.filter((p) => p.status?.conditions?.[0]?.status === "True"),
      { numRuns: 1, seed: 7 },
    );
    state.setPolicy(policy!);
    const [node] = fc.sample(arbEgressNode, { numRuns: 1, seed: 3 });
    state.setEgressNode(node!);
    state.takeChanges();
    state.setPolicy({
      ...policy!,
      status: { ...policy!.status!, matchedPods: 99, programmedNodes: 3 },
    } as AnyPolicy);
    state.setEgressNode({ ...node!, status: { ...node!.status, lastSync: "later", repairs: 4 } });
    assert.equal(state.planDirty, false);
    state.setPolicy({ ...policy!, status: { ...policy!.status!, revision: "r9" } } as AnyPolicy);
    assert.equal(state.planDirty, false, "a new revision is reported, not planned");
    assert.equal(state.reportDirty, true);
  });
});
