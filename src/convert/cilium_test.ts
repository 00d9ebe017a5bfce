/**
 * CiliumEgressGatewayPolicy → Sallyport, on fixtures that follow Cilium's documented examples
 * (each fixture says which part of egress-gateway.rst it follows).
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { CONVERTED_FROM } from "./convert.ts";
import { convertFixture, convertText } from "./testing.ts";

const CEGP = (name: string) => `CiliumEgressGatewayPolicy/${name}`;

describe("convert: CiliumEgressGatewayPolicy", () => {
  it("turns seed 003's example into a gateway and a namespaced policy, as examples/egress-sample.yaml", () => {
    const r = convertFixture("cilium/seed-003.yaml");
    assert.deepEqual(r.errors, []);
    assert.deepEqual(
      r.objects.map((o) => `${o.kind}/${o.metadata.name}`),
      ["EgressGateway/node2", "EgressPolicy/egress-sample"],
    );
    const gw = r.gateway("node2");
    assert.deepEqual(gw.spec, {
      nodeSelector: { matchLabels: { "node.kubernetes.io/name": "node2" } },
      pool: ["10.168.60.100"],
    });
    assert.equal(gw.metadata.annotations?.[CONVERTED_FROM], CEGP("egress-sample"));
    const p = r.policy("EgressPolicy", "egress-sample");
    // io.kubernetes.pod.namespace became the policy's namespace, not a pod label.
    assert.equal(p.metadata.namespace, "default");
    assert.deepEqual(p.spec, {
      podSelector: { matchLabels: { org: "empire", class: "mediabot" } },
      nodeSelector: { matchLabels: { "node.kubernetes.io/name": "node1" } },
      destinationCIDRs: ["0.0.0.0/0"],
      gateway: "node2",
      egressIP: ["10.168.60.100"],
    });
    assert.deepEqual(r.warningsOf(CEGP("egress-sample")), [
      "spec.egressGateway.egressIP: approximated",
    ]);
    assert.match(
      r.warning(CEGP("egress-sample"), "spec.egressGateway.egressIP").message,
      /configured on the gateway node's interface.*take it off/,
    );
  });

  it("drops destinations of a family the egressIP lacks, and says so (the newest docs example)", () => {
    const r = convertFixture("cilium/dual-stack-destinations.yaml");
    const p = r.policy("EgressPolicy", "payments-out");
    assert.equal(p.metadata.namespace, "payments", "k8s:-prefixed namespace label");
    assert.deepEqual(p.metadata.labels, { team: "payments" });
    assert.deepEqual(p.spec.podSelector, { matchLabels: { app: "ledger" } });
    assert.deepEqual(p.spec.destinationCIDRs, ["0.0.0.0/0"]);
    assert.equal(p.spec.gateway, "role-gateway");
    const w = r.warning(CEGP("payments-out"), "spec.destinationCIDRs[1]");
    assert.equal(w.kind, "no equivalent");
    assert.match(w.message, /::\/0 is IPv6 but the egressIP 198\.51\.100\.20 is IPv4/);
  });

  it("keeps a namespaceSelector and becomes a ClusterEgressPolicy (the examples/ file)", () => {
    const r = convertFixture("cilium/examples-file.yaml");
    const p = r.policy("ClusterEgressPolicy", "crawler-egress");
    assert.ok(!("namespace" in p.metadata));
    assert.deepEqual(p.spec, {
      podSelector: { matchLabels: { app: "crawler" } },
      namespaceSelector: { matchLabels: { env: "staging" } },
      destinationCIDRs: ["203.0.113.13/32"],
      gateway: "egress-node",
      egressIP: ["203.0.113.100"],
      // A /32 outranks wider policies, as Cilium's longest-prefix match would have it.
      priority: 32,
    });
    assert.deepEqual(r.gateway("egress-node").spec.nodeSelector, {
      matchLabels: { "egress-node": "true" },
    });
  });

  it("splits selectors into one policy each and maps matchExpressions and namespace labels", () => {
    const r = convertFixture("cilium/selectors.yaml");
    assert.deepEqual(r.errors, []);
    const one = r.policy("ClusterEgressPolicy", "reports-1");
    assert.deepEqual(one.spec.podSelector, {
      matchExpressions: [
        { key: "tier", operator: "In", values: ["reports"] },
        { key: "track", operator: "NotIn", values: ["canary"] },
      ],
    });
    assert.ok("namespaceSelector" in one.spec);
    assert.deepEqual(one.spec.namespaceSelector, {
      matchExpressions: [
        { key: "kubernetes.io/metadata.name", operator: "In", values: ["analytics", "finance"] },
      ],
    });
    const two = r.policy("ClusterEgressPolicy", "reports-2");
    assert.deepEqual(two.spec.podSelector, { matchLabels: { app: "exporter" } });
    assert.ok("namespaceSelector" in two.spec);
    assert.deepEqual(two.spec.namespaceSelector, { matchLabels: { team: "finance" } });
    assert.deepEqual(two.spec.nodeSelector, { matchLabels: { zone: "west" } });
    // The service-account label has no Pod-label equivalent: kept, so the policy selects nothing.
    const three = r.policy("EgressPolicy", "reports-3");
    assert.equal(three.metadata.namespace, "analytics");
    assert.deepEqual(three.spec.podSelector, {
      matchLabels: { "io.cilium.k8s.policy.serviceaccount": "reporter" },
    });
    const w = r.warning(
      CEGP("reports"),
      "spec.selectors[2].podSelector.matchLabels.io.cilium.k8s.policy.serviceaccount",
    );
    assert.equal(w.kind, "no equivalent");
    assert.match(w.message, /selects no pod until you replace it/);
    // All three share the gateway and its address, so the split changes nothing on the wire.
    for (const p of [one, two, three]) {
      assert.equal(p.spec.gateway, "egress");
      assert.deepEqual(p.spec.egressIP, ["192.0.2.200"]);
    }
  });

  it("maps excludedCIDRs and drops those that exclude nothing", () => {
    const r = convertFixture("cilium/excluded.yaml");
    const p = r.policy("ClusterEgressPolicy", "partner-range");
    assert.deepEqual(p.spec.destinationCIDRs, ["172.20.0.0/16", "2001:db8:20::/48"]);
    assert.deepEqual(p.spec.excludedCIDRs, ["172.20.5.0/24", "2001:db8:20:5::/64"]);
    assert.equal(p.spec.interface, "eth1");
    assert.equal(p.spec.egressIP, undefined);
    assert.equal(r.gateway("egress").spec.pool, undefined, "an interface needs no pool");
    assert.deepEqual(r.warningsOf(CEGP("partner-range")), ["spec.excludedCIDRs[2]: no equivalent"]);
  });

  it("maps interface, egressIP and neither; refuses egressIP with interface, which Cilium ignores", () => {
    const r = convertFixture("cilium/gateway-choices.yaml");
    assert.equal(r.policy("ClusterEgressPolicy", "by-interface").spec.interface, "ens5");
    assert.deepEqual(r.policy("ClusterEgressPolicy", "by-address").spec.egressIP, ["198.51.100.7"]);
    assert.equal(r.policy("ClusterEgressPolicy", "by-default-route").spec.useNodeIP, true);
    assert.equal(r.warning(CEGP("by-default-route"), "spec.egressGateway").kind, "approximated");
    // Same gateway nodes: one gateway, named after them, remembering every source.
    const gw = r.gateway("role-egress");
    assert.deepEqual(gw.spec.pool, ["198.51.100.7"]);
    assert.equal(
      gw.metadata.annotations?.[CONVERTED_FROM],
      [CEGP("by-interface"), CEGP("by-address"), CEGP("by-default-route")].join(", "),
    );
    assert.equal(r.objects.filter((o) => o.kind === "EgressGateway").length, 1);
    assert.deepEqual(r.errors, [
      {
        source: CEGP("ignored-by-cilium"),
        field: "spec.egressGateway",
        message:
          "sets both egressIP and interface, so Cilium ignores this policy: keep the one you meant and convert again",
      },
    ]);
    assert.ok(!r.objects.some((o) => o.metadata.name === "ignored-by-cilium"));
  });

  it("merges egressGateways into one gateway over all their nodes, and says what differs", () => {
    const r = convertFixture("cilium/multi-gateway.yaml");
    const gw = r.gateway("spread");
    assert.deepEqual(gw.spec.nodeSelector, {
      matchExpressions: [{ key: "egress-group", operator: "In", values: ["blue", "green"] }],
    });
    assert.deepEqual(gw.spec.pool, ["192.0.2.51", "192.0.2.52"]);
    assert.deepEqual(r.policy("ClusterEgressPolicy", "spread").spec.egressIP, ["192.0.2.51"]);
    assert.deepEqual(r.warningsOf(CEGP("spread")), [
      "spec.egressGateways[0].egressIP: approximated",
      "spec.egressGateways: approximated",
      "spec.egressGateways[1].egressIP: approximated",
    ]);
    assert.match(
      r.warning(CEGP("spread"), "spec.egressGateways").message,
      /pins each pod to one of 2/,
    );
  });

  it("keeps only the first gateway when the entries' nodes cannot be one selector", () => {
    const r = convertText(`
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata: {name: two-kinds}
spec:
  selectors: [{podSelector: {}}]
  destinationCIDRs: ["0.0.0.0/0"]
  egressGateway: {nodeSelector: {matchLabels: {rack: r1}}, interface: eth1}
  egressGateways:
  - nodeSelector: {matchLabels: {zone: z2}}
    interface: eth2
`);
    assert.deepEqual(r.gateway("rack-r1").spec.nodeSelector, { matchLabels: { rack: "r1" } });
    assert.deepEqual(r.warningsOf(CEGP("two-kinds")), [
      "spec.egressGateways[0]: no equivalent",
      "spec.egressGateways[0].interface: no equivalent",
    ]);
  });

  it("ranks policies by their shortest destination and warns where that is not Cilium's longest prefix", () => {
    const r = convertFixture("cilium/longest-prefix.yaml");
    assert.equal(r.policy("ClusterEgressPolicy", "everything").spec.priority, undefined);
    assert.equal(r.policy("ClusterEgressPolicy", "datacenter").spec.priority, 8);
    assert.equal(r.policy("ClusterEgressPolicy", "wide-and-narrow").spec.priority, undefined);
    assert.deepEqual(r.warningsOf(CEGP("datacenter")), [
      "spec.egressGateway.egressIP: approximated",
    ]);
    const narrow = r.warnings.filter(
      (w) => w.source === CEGP("wide-and-narrow") && w.field === "spec.destinationCIDRs",
    );
    assert.equal(narrow.length, 2);
    assert.match(narrow[0]!.message, /10\.1\.2\.3\/32.*CiliumEgressGatewayPolicy\/everything/);
    assert.match(narrow[1]!.message, /CiliumEgressGatewayPolicy\/datacenter \(10\.0\.0\.0\/8\)/);
  });

  it("refuses what Cilium refuses, naming the field", () => {
    const r = convertText(`
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata: {name: broken}
spec:
  selectors:
  - nodeSelector: {matchLabels: {a: b}}
  destinationCIDRs: ["10.0.0.0/33", "10.1.0.0/16"]
  egressGateway:
    nodeSelector: {}
    egressIP: not-an-ip
`);
    assert.deepEqual(
      r.errors.map((e) => e.field),
      ["spec.egressGateway.nodeSelector", "spec.egressGateway.egressIP"],
    );
    const later = convertText(`
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata: {name: broken}
spec:
  selectors:
  - nodeSelector: {matchLabels: {a: b}}
  destinationCIDRs: ["10.0.0.0/33"]
  egressGateway: {nodeSelector: {matchLabels: {egress: "true"}}}
`);
    assert.deepEqual(
      later.errors.map((e) => e.field),
      ["spec.destinationCIDRs[0]", "spec.selectors[0]"],
    );
    assert.deepEqual(later.objects, []);
  });

  it("warns about fields its version of the CRD does not have, and goes on", () => {
    const r = convertText(`
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata: {name: newer, uid: x, resourceVersion: "5"}
spec:
  selectors: [{podSelector: {matchLabels: {app: x}}}]
  destinationCIDRs: ["192.0.2.0/24"]
  egressGateway: {nodeSelector: {matchLabels: {egress: "true"}}, interface: eth1, weight: 3}
  futureField: true
`);
    assert.deepEqual(r.errors, []);
    assert.deepEqual(r.warningsOf(CEGP("newer")), [
      "spec.egressGateway.weight: no equivalent",
      "spec.futureField: no equivalent",
    ]);
    assert.equal(r.policy("ClusterEgressPolicy", "newer").spec.interface, "eth1");
  });
});
