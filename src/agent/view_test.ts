import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { AnyPolicy, EgressEndpointSlice, EgressGateway } from "../api/types.ts";
import type { PodInfo } from "../engine/snapshot.ts";
import { DEFAULT_NODE_CONFIG } from "../engine/view.ts";
import { AgentState, buildAgentView } from "./view.ts";

const status = {
  gatewayNode: "gw",
  egressIPs: ["192.168.77.100"],
  conditions: [
    {
      type: "Accepted",
      status: "True" as const,
      reason: "Accepted",
      message: "",
      lastTransitionTime: "2026-01-01T00:00:00Z",
    },
  ],
};

function policy(name: string, spec: Record<string, unknown>, cluster = false): AnyPolicy {
  return {
    apiVersion: "sallyport.dev/v1alpha1",
    kind: cluster ? "ClusterEgressPolicy" : "EgressPolicy",
    metadata: cluster ? { name } : { name, namespace: "default" },
    spec: { gateway: "edge", destinationCIDRs: ["192.168.77.200/32"], ...spec },
    status,
  } as unknown as AnyPolicy;
}

function pod(name: string, labels: Record<string, string>, namespace = "default"): PodInfo {
  return {
    namespace,
    name,
    labels,
    nodeName: "n1",
    ips: ["10.244.1.9"],
    hostNetwork: false,
    phase: "Running",
  };
}

function endpointsOf(
  policies: AnyPolicy[],
  localPods: PodInfo[],
  slices: EgressEndpointSlice[] = [],
  namespaceLabels = new Map<string, Record<string, string>>(),
): Map<string, string[]> {
  const { view } = buildAgentView({
    node: "n1",
    policies,
    gateways: [],
    egressNodes: [],
    slices,
    clusterInfo: undefined,
    localPods,
    namespaceLabels,
    config: DEFAULT_NODE_CONFIG,
    local: {
      underlay: { device: "eth0", mtu: 1500, ipv4: "192.168.77.11" },
      usedTables: new Set(),
      existingTables: new Map(),
      random: () => 0,
    },
  });
  return new Map(view.policies.map((p) => [p.key, p.endpoints.map((e) => `${e.pod}@${e.node}`)]));
}

describe("buildAgentView() with this node's pods", () => {
  it("steers a new local pod the policy selects before the controller's slice lists it", () => {
    const e = endpointsOf(
      [policy("web", { podSelector: { matchLabels: { app: "web" } } })],
      [
        pod("web-new", { app: "web" }),
        pod("other", { app: "other" }),
        pod("web-elsewhere", { app: "web" }, "team-b"),
      ],
    );
    assert.deepEqual(e.get("EgressPolicy/default/web"), ["default/web-new@n1"]);
  });

  it("does not list a pod twice when the slice already has it", () => {
    const slice = {
      apiVersion: "sallyport.dev/v1alpha1",
      kind: "EgressEndpointSlice",
      metadata: { name: "s" },
      policy: "EgressPolicy/default/web",
      endpoints: [{ pod: "default/web-new", node: "n1", ips: ["10.244.1.9"] }],
    } as EgressEndpointSlice;
    const e = endpointsOf(
      [policy("web", { podSelector: { matchLabels: { app: "web" } } })],
      [pod("web-new", { app: "web" })],
      [slice],
    );
    assert.deepEqual(e.get("EgressPolicy/default/web"), ["default/web-new@n1"]);
  });

  it("leaves policies with a nodeSelector to the controller (the agent does not read Nodes)", () => {
    const e = endpointsOf(
      [
        policy("web", {
          podSelector: { matchLabels: { app: "web" } },
          nodeSelector: { matchLabels: { zone: "a" } },
        }),
      ],
      [pod("web-new", { app: "web" })],
    );
    assert.deepEqual(e.get("EgressPolicy/default/web"), []);
  });

  it("evaluates a ClusterEgressPolicy's namespaceSelector with the namespaces' labels", () => {
    const cluster = policy(
      "all-team-a",
      { podSelector: {}, namespaceSelector: { matchLabels: { team: "a" } } },
      true,
    );
    const pods = [pod("x", {}, "ns-a"), pod("y", {}, "ns-b")];
    const labels = new Map([
      ["ns-a", { team: "a" }],
      ["ns-b", { team: "b" }],
    ]);
    assert.deepEqual(
      endpointsOf([cluster], pods, [], labels).get("ClusterEgressPolicy/all-team-a"),
      ["ns-a/x@n1"],
    );
  });

  it("ignores pods that cannot be steered: finished, host network, no IP yet", () => {
    const e = endpointsOf(
      [policy("web", { podSelector: {} })],
      [
        { ...pod("done", {}), phase: "Succeeded" },
        { ...pod("host", {}), hostNetwork: true },
        { ...pod("starting", {}), ips: [] },
      ],
    );
    assert.deepEqual(e.get("EgressPolicy/default/web"), []);
  });
});

describe("AgentState: the standby list", () => {
  it("keeps a policy's standby nodes in its view and wakes the planner (not the report) when they change", () => {
    const state = new AgentState("n1");
    const p = policy("web", { podSelector: { matchLabels: { app: "web" } } });
    state.setLocalPod(pod("web-1", { app: "web" }));
    state.setPolicy({ ...p, status: { ...status, revision: "r1", standbyNodes: ["gw2", "gw3"] } });
    const key = "EgressPolicy/default/web";
    assert.deepEqual(state.view(key)?.standbyNodes, ["gw2", "gw3"]);
    assert.deepEqual([...state.takeChanges().policies], [key]);
    state.programmed();
    // A node gained or lost: steering nodes keep a route toward the first standby, so they plan again.
    state.setPolicy({ ...p, status: { ...status, revision: "r1", standbyNodes: ["gw3"] } });
    assert.deepEqual(state.view(key)?.standbyNodes, ["gw3"], "the view has the new list");
    assert.deepEqual([...state.takeChanges().policies], [key], "the planner is woken");
    assert.equal(state.reportDirty, false, "nothing to report: the revision does not count it");
    state.setPolicy({ ...p, status: { ...status, revision: "r1", standbyNodes: ["gw3"] } });
    assert.equal(state.planDirty, false, "the same list again: nothing");
    state.setPolicy({ ...p, status: { ...status, revision: "r1" } });
    assert.deepEqual(state.view(key)?.standbyNodes, [], "none published");
    assert.equal(state.planDirty, true);
  });
});

describe("AgentState: the gateway's nodes", () => {
  const gateway = (nodes: string[], readyNodes = nodes.length): EgressGateway =>
    ({
      apiVersion: "sallyport.dev/v1alpha1",
      kind: "EgressGateway",
      metadata: { name: "edge" },
      spec: { nodeSelector: { matchLabels: { egress: "true" } } },
      status: {
        readyNodes,
        nodes: nodes.map((name, i) => ({
          name,
          ready: i < readyNodes,
          egressIPs: [],
          policies: 0,
        })),
      },
    }) as unknown as EgressGateway;

  it("gives every policy of a gateway the nodes its status lists, and wakes the planner (not the report) only when the names change", () => {
    const state = new AgentState("n1");
    state.setGateway(gateway(["gw3", "gw"]));
    state.setPolicy({ ...policy("web", {}), status: { ...status, revision: "r1" } });
    const key = "EgressPolicy/default/web";
    assert.deepEqual(state.view(key)?.gatewayNodes, ["gw", "gw3"]);
    state.takeChanges();
    state.programmed();
    // A node of the gateway dies: it stays in the list (ready or not), nothing to plan.
    state.setGateway(gateway(["gw", "gw3"], 1));
    assert.equal(state.planDirty, false);
    // A node joins the gateway.
    state.setGateway(gateway(["gw", "gw3", "n1"]));
    assert.deepEqual(state.view(key)?.gatewayNodes, ["gw", "gw3", "n1"], "the view has it");
    assert.deepEqual([...state.takeChanges().policies], [key], "the planner is woken");
    assert.equal(state.reportDirty, false, "nothing to report: the revision does not count it");
  });
});
