/**
 * spidernet-io/egressgateway → Sallyport, on fixtures that follow spidernet's documented examples
 * (docs/reference/*.en.md and docs/usage/*.en.md; each fixture names its page).
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { CONVERTED_FROM } from "./convert.ts";
import { convertFixture, convertText } from "./testing.ts";

const GW = (name: string) => `EgressGateway.egressgateway.spidernet.io/${name}`;
const EGP = (name: string) => `EgressPolicy.egressgateway.spidernet.io/${name}`;
const EGCP = (name: string) => `EgressClusterPolicy.egressgateway.spidernet.io/${name}`;

describe("convert: spidernet EgressGateway, EgressPolicy, EgressClusterPolicy", () => {
  it("converts the reference examples field by field (docs/reference)", () => {
    const r = convertFixture("spidernet/reference.yaml");
    assert.deepEqual(r.errors, []);

    const gw = r.gateway("gw-east");
    assert.deepEqual(gw.spec, {
      nodeSelector: { matchLabels: { egress: "true" } },
      // ippools.ipv4's three formats are the pool's; `ipv6: [""]` means none.
      pool: ["172.16.9.5", "172.16.9.10-172.16.9.14", "172.16.9.32/28"],
    });
    assert.equal(gw.metadata.annotations?.[CONVERTED_FROM], GW("gw-east"));
    assert.deepEqual(r.warningsOf(GW("gw-east")), [
      "spec.nodeSelector.policy: no equivalent",
      "spec.ippools.ipv4[2]: approximated",
    ]);

    const p = r.policy("EgressPolicy", "checkout");
    assert.equal(p.metadata.namespace, "shop");
    assert.deepEqual(p.spec, {
      podSelector: { matchLabels: { app: "checkout" } },
      // The IPv6 destination has no address of its family in the pool: dropped.
      destinationCIDRs: ["203.0.113.92/32"],
      gateway: "gw-east",
    });
    assert.deepEqual(r.warningsOf(EGP("shop/checkout")), [
      "spec.egressIP: approximated",
      "spec.appliedTo.podSubnet: no equivalent",
      "spec.destSubnet[1]: no equivalent",
      "spec.priority: no equivalent",
    ]);
    assert.match(
      r.warning(EGP("shop/checkout"), "spec.egressIP").message,
      /no default EIP .* gets its own address from the pool/,
    );
    assert.match(
      r.warning(EGP("shop/checkout"), "spec.appliedTo.podSubnet").message,
      /never implemented/,
    );

    const c = r.policy("ClusterEgressPolicy", "all-shops");
    assert.deepEqual(c.spec, {
      podSelector: { matchLabels: { app: "checkout" } },
      namespaceSelector: { matchLabels: { kind: "shop" } },
      destinationCIDRs: ["203.0.113.92/32"],
      gateway: "gw-east",
      egressIP: ["172.16.9.11"],
    });
    assert.deepEqual(r.warningsOf(EGCP("all-shops")), ["spec.priority: no equivalent"]);
  });

  it("names the cluster's default gateway and its default EIPs explicitly (ClusterDefaultEgressGateway)", () => {
    const r = convertFixture("spidernet/cluster-default.yaml");
    assert.deepEqual(r.gateway("main").spec.pool, [
      "10.20.0.55",
      "10.20.0.56",
      "fd20::55",
      "fd20::56",
    ]);
    const p = r.policy("EgressPolicy", "billing");
    assert.ok(
      !("namespace" in p.metadata),
      "no namespace: kubectl apply puts it in the current one",
    );
    assert.deepEqual(p.spec, {
      podSelector: { matchLabels: { app: "billing" } },
      destinationCIDRs: ["192.0.2.92/32"],
      gateway: "main",
      // allocatorPolicy default: the gateway's default EIPs, shared as spidernet shares them.
      egressIP: ["10.20.0.55", "fd20::56"],
    });
    assert.deepEqual(r.warningsOf(EGP("billing")), ["spec.egressGatewayName: approximated"]);
    assert.deepEqual(r.warningsOf(GW("main")), [
      "spec.ippools.ipv4DefaultEIP: approximated",
      "spec.ippools.ipv6DefaultEIP: approximated",
      "spec.clusterDefault: no equivalent",
    ]);
  });

  it("prefers the namespace's default gateway to the cluster's (NamespaceDefaultEgressGateway)", () => {
    const r = convertFixture("spidernet/namespace-default.yaml");
    const p = r.policy("EgressPolicy", "crawler");
    assert.equal(p.spec.gateway, "team-a-gw");
    // allocatorPolicy rr: an address of its own from the pool, as in Sallyport by default.
    assert.equal(p.spec.egressIP, undefined);
    assert.match(
      r.warning(EGP("team-a/crawler"), "spec.egressGatewayName").message,
      /default gateway of namespace team-a, team-a-gw/,
    );
    assert.ok(!r.objects.some((o) => (o.kind as string) === "Namespace"));
  });

  it("maps useNodeIP and a gateway without pools (Aliyun)", () => {
    const r = convertFixture("spidernet/node-ip.yaml");
    assert.deepEqual(r.errors, []);
    assert.deepEqual(r.warnings, []);
    assert.deepEqual(r.gateway("cloud-egress").spec, {
      nodeSelector: { matchLabels: { egress: "true" } },
    });
    assert.deepEqual(r.policy("EgressPolicy", "web-egress").spec, {
      podSelector: { matchLabels: { app: "web" } },
      destinationCIDRs: ["172.31.81.29/32", "34.117.0.1/32"],
      gateway: "cloud-egress",
      useNodeIP: true,
    });
  });

  it("reads kubectl get -o yaml output and keeps the address a policy holds (status.eip)", () => {
    const r = convertFixture("spidernet/exported.yaml");
    assert.deepEqual(r.errors, []);
    const p = r.policy("EgressPolicy", "reporter");
    assert.equal(p.metadata.namespace, "ops");
    assert.deepEqual(p.spec.egressIP, ["10.40.0.3"]);
    assert.ok(!("status" in p));
    assert.ok(!("uid" in r.gateway("edge").metadata));
    assert.match(r.warning(EGP("ops/reporter"), "spec.egressIP").message, /status\.eip/);
  });

  it("refuses what spidernet refuses, and a policy left without destinations", () => {
    const r = convertText(`
apiVersion: egressgateway.spidernet.io/v1beta1
kind: EgressGateway
metadata: {name: empty-selector}
spec:
  nodeSelector: {selector: {}}
  ippools: {ipv4: ["10.0.0.1", "fd00::1"]}
---
apiVersion: egressgateway.spidernet.io/v1beta1
kind: EgressPolicy
metadata: {name: both, namespace: x}
spec:
  egressGatewayName: elsewhere
  egressIP: {ipv4: 10.9.9.9, useNodeIP: true}
  appliedTo: {podSubnet: ["10.244.0.0/24"]}
---
apiVersion: egressgateway.spidernet.io/v1beta1
kind: EgressPolicy
metadata: {name: v6-only-dest, namespace: x}
spec:
  egressGatewayName: elsewhere
  egressIP: {ipv4: 10.9.9.9}
  appliedTo: {podSelector: {matchLabels: {a: b}}}
  destSubnet: ["fd00::/64"]
---
apiVersion: egressgateway.spidernet.io/v1beta1
kind: EgressPolicy
metadata: {name: no-gateway, namespace: x}
spec:
  appliedTo: {podSelector: {}}
`);
    assert.deepEqual(
      r.errors.map((e) => `${e.source} ${e.field}`),
      [
        `${GW("empty-selector")} spec.nodeSelector.selector`,
        `${GW("empty-selector")} spec.ippools.ipv4[1]`,
        `${EGP("x/both")} spec.egressIP.useNodeIP`,
        `${EGP("x/both")} spec.appliedTo.podSelector`,
        `${EGP("x/v6-only-dest")} spec.destSubnet`,
        `${EGP("x/no-gateway")} spec.egressGatewayName`,
      ],
    );
    assert.deepEqual(r.objects, []);
  });

  it("refuses an explicit address outside the converted gateway's pool, as our webhook would", () => {
    const r = convertText(`
apiVersion: egressgateway.spidernet.io/v1beta1
kind: EgressGateway
metadata: {name: g}
spec:
  nodeSelector: {selector: {matchLabels: {egress: "true"}}}
  ippools: {ipv4: ["10.0.0.1-10.0.0.5"]}
---
apiVersion: egressgateway.spidernet.io/v1beta1
kind: EgressPolicy
metadata: {name: outside, namespace: x}
spec:
  egressGatewayName: g
  egressIP: {ipv4: 10.0.0.9}
  appliedTo: {podSelector: {}}
`);
    assert.equal(r.errors.length, 1);
    assert.equal(r.errors[0]!.field, "spec.egressIP[0]");
    assert.match(
      r.errors[0]!.message,
      /not in the pool of EgressGateway g .*converted EgressPolicy\/x\/outside/,
    );
    assert.deepEqual(
      r.objects.map((o) => o.metadata.name),
      ["g"],
    );
  });

  it("refuses the v1 kinds of spidernet's early docs by their version", () => {
    const r = convertText(`
apiVersion: egressgateway.spidernet.io/v1
kind: EgressGateway
metadata: {name: default}
spec:
  nodeSelector: {matchLabels: {kubernetes.io/hostname: workstation2}}
`);
    assert.equal(r.errors[0]?.field, "apiVersion");
    assert.match(r.errors[0]!.message, /not egressgateway\.spidernet\.io\/v1beta1/);
  });
});
