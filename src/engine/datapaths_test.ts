/**
 * The two packet filters decide alike: for random clusters and packets, a packet walked through
 * the iptables plan (a rule per policy) and through the nftables plan (classification) is steered
 * to the same node, SNATed to the same address, dropped, or left alone, on every node.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import type { PortSpec } from "../api/types.ts";
import { computeCluster } from "./cluster.ts";
import { planNode } from "./node_plan.ts";
import { nodeViewFromOutcome } from "./node_view.ts";
import { clusterPolicy, gateway, localFacts, node, pod, policy, snapshot } from "./testing.ts";
import { tracePacket } from "./trace.ts";

const NODES = [
  node("node-1", {
    ipv4: "192.168.0.11",
    ipv6: "fd00:192:168::11",
    podCIDRs: ["172.29.1.0/24", "fd00:172:29:1::/64"],
  }),
  node("node-2", {
    ipv4: "192.168.0.12",
    ipv6: "fd00:192:168::12",
    labels: { egress: "true" },
    podCIDRs: ["172.29.2.0/24", "fd00:172:29:2::/64"],
  }),
  node("node-3", {
    ipv4: "192.168.0.13",
    ipv6: "fd00:192:168::13",
    labels: { egress: "true" },
    podCIDRs: ["172.29.3.0/24", "fd00:172:29:3::/64"],
  }),
];

const DESTINATIONS = ["203.0.113.0/24", "203.0.113.128/25", "198.51.100.0/24", "2001:db8::/64"];

const arbCluster = fc.record({
  pods: fc.uniqueArray(
    fc.record({
      name: fc.constantFrom("a", "b", "c", "d"),
      node: fc.integer({ min: 1, max: 3 }),
      app: fc.constantFrom("web", "db"),
    }),
    { selector: (p) => p.name, maxLength: 4 },
  ),
  policies: fc.uniqueArray(
    fc.record({
      name: fc.constantFrom("p", "q", "r", "s"),
      app: fc.constantFrom("web", "db", undefined),
      priority: fc.integer({ min: 0, max: 2 }),
      day: fc.integer({ min: 1, max: 9 }),
      dest: fc.subarray(DESTINATIONS),
      excluded: fc.subarray(["203.0.113.7/32", "203.0.113.200/29"]),
      ports: fc.constantFrom<PortSpec[]>(
        [],
        [{ protocol: "TCP", port: 443 }],
        [{ protocol: "UDP", port: 53, endPort: 60 }],
      ),
      cluster: fc.boolean(),
      nodeIP: fc.boolean(),
    }),
    { selector: (p) => p.name, maxLength: 4 },
  ),
  healthy: fc.subarray(["node-2", "node-3"], { minLength: 1 }),
});

const PROBES = [
  { dst: "203.0.113.9", protocol: "tcp" as const, dport: 443 },
  { dst: "203.0.113.7", protocol: "tcp" as const, dport: 80 },
  { dst: "203.0.113.130", protocol: "udp" as const, dport: 55 },
  { dst: "203.0.113.201", protocol: "tcp" as const, dport: 443 },
  { dst: "198.51.100.4", protocol: "udp" as const, dport: 53 },
  { dst: "192.0.2.1", protocol: "tcp" as const, dport: 443 },
  { dst: "172.29.2.9", protocol: "tcp" as const, dport: 80 },
  { dst: "2001:db8::5", protocol: "tcp" as const, dport: 443 },
];

describe("iptables and nftables plans", () => {
  it("steer, SNAT, drop or leave alone every packet alike, on every node (standbys carrying their policies or not)", () => {
    fc.assert(
      fc.property(
        arbCluster,
        fc.constantFrom(...PROBES),
        fc.boolean(),
        fc.boolean(),
        (c, probe, fromTunnel, standbyDatapath) => {
          const s = snapshot({
            nodes: NODES,
            namespaces: [{ name: "team-a", labels: { team: "a" } }],
            pods: c.pods.map((p) =>
              pod(
                "team-a",
                p.name,
                `node-${p.node}`,
                [
                  `172.29.${p.node}.${p.name.charCodeAt(0)}`,
                  `fd00:172:29:${p.node}::${p.name.charCodeAt(0).toString(16)}`,
                ],
                { app: p.app },
              ),
            ),
            gateways: [
              gateway("edge", { pool: ["10.168.60.100-10.168.60.105", "fd00:a::100-fd00:a::105"] }),
            ],
            policies: c.policies.map((p) => {
              const spec = {
                ...(p.app === undefined ? {} : { podSelector: { matchLabels: { app: p.app } } }),
                priority: p.priority,
                ...(p.dest.length > 0 ? { destinationCIDRs: p.dest } : {}),
                ...(p.excluded.length > 0 ? { excludedCIDRs: p.excluded } : {}),
                ports: p.ports,
                ...(p.nodeIP ? { useNodeIP: true } : {}),
              };
              const meta = { created: `2026-01-0${p.day}T00:00:00Z` };
              return p.cluster
                ? clusterPolicy(
                    p.name,
                    { ...spec, namespaceSelector: { matchLabels: { team: "a" } } },
                    meta,
                  )
                : policy("team-a", p.name, spec, meta);
            }),
            serviceCIDRs: ["10.96.0.0/16"],
            healthy: new Set(c.healthy),
          });
          const outcome = computeCluster(s);
          for (const n of NODES) {
            const local = localFacts({ ipv4: n.addresses[4], ipv6: n.addresses[6] });
            const plan = (datapath: "iptables" | "nftables") =>
              planNode(
                nodeViewFromOutcome(outcome, n.name, {
                  local,
                  config: { datapath, standbyDatapath },
                }),
              );
            const v6 = probe.dst.includes(":");
            for (const p of s.pods) {
              const packet = {
                src: v6 ? p.ips[1]! : p.ips[0]!,
                ...probe,
                inInterface: fromTunnel ? "sallyport" : "veth-pod",
              };
              // A pod's own node sees its packets from the pod; others only through the tunnel.
              if (!fromTunnel && p.nodeName !== n.name) continue;
              const a = tracePacket(plan("iptables"), packet);
              const b = tracePacket(plan("nftables"), packet);
              // (Routing table numbers are drawn at random per plan: compare where packets go.)
              const summary = (t: typeof a) => [t.verdict, t.via, t.snat ?? "-"];
              assert.deepEqual(
                summary(b),
                summary(a),
                `${n.name}: ${JSON.stringify(packet)}\nip: ${a.steps.join(" | ")}\nnft: ${b.steps.join(" | ")}`,
              );
            }
          }
        },
      ),
      { numRuns: 400 },
    );
  });
});
