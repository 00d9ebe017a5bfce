/**
 * Sallyport on a real pod network, once per kube-proxy mode (iptables, nftables), dual stack:
 * pods plugged by the CNI reference plugins (bridge with its own ipMasq chains, host-local),
 * host-gw routes between nodes, kube-proxy on every node, Services with EndpointSlices from
 * kube-controller-manager. What users check first: nothing but the egress traffic changes.
 *
 * Nodes: node-1 (workloads), node-2 and node-3 (egress=true).
 * Pods: client (node-1, selected), backend (node-3, runs the echo server, selected by the
 * empty-destination policy too), other (node-1, never selected).
 * Services: backend (ClusterIP: 80 → 8080/TCP, 53 → 8080/UDP), backend-np (NodePort, Cluster),
 * backend-local (NodePort, Local).
 */
import assert from "node:assert/strict";
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { mustRun } from "../../src/kernel/runner.ts";
import { ours } from "../../src/kube/client.ts";
import type { Family } from "../../src/lib/ip.ts";
import { PROXY_MODES, type ProxyMode } from "../../src/sandbox/kube_proxy.ts";
import { Sandbox, type SandboxService } from "../../src/sandbox/sandbox.ts";
import { EXTERNAL, nodeAddress, nsRunner } from "../../src/sandbox/topology.ts";
import { condition, eventually, type Status, type WithStatus } from "../support/kube.ts";
import { NEEDS_ROOT, probe, probeUntil, uniquePrefix } from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

const EIP = { 4: "192.168.77.100", 6: "fd00:77::100" } as const;
const FAMILIES: Family[] = [4, 6];

const hostPort = (address: string, port: number) =>
  address.includes(":") ? `[${address}]:${port}` : `${address}:${port}`;

const GATEWAY = `apiVersion: sallyport.dev/v1alpha1
kind: EgressGateway
metadata: {name: edge}
spec:
  nodeSelector: {matchLabels: {egress: "true"}}
  pool: ["192.168.77.100-192.168.77.120", "fd00:77::100-fd00:77::120"]
`;

function policy(spec: string): string {
  return `apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: client, namespace: default}
spec:
  gateway: edge
  egressIP: ["${EIP[4]}", "${EIP[6]}"]
${spec}`;
}

/** The lines of kube-proxy's own rules on a node, without counters: what the agent must not touch. */
async function kubeProxyRules(ns: string, mode: ProxyMode): Promise<string> {
  const node = nsRunner(ns);
  if (mode === "nftables") {
    const tables = await Promise.all(
      ["ip", "ip6"].map((family) => mustRun(node, ["nft", "list", "table", family, "kube-proxy"])),
    );
    return tables.join("\n").replace(/counter packets \d+ bytes \d+/g, "counter");
  }
  const saved = await Promise.all(
    ["iptables-save", "ip6tables-save"].map((tool) => mustRun(node, [tool])),
  );
  return saved
    .join("\n")
    .split("\n")
    .filter((l) => l.includes("KUBE-") && !l.startsWith("#"))
    .map((l) => l.replace(/\[\d+:\d+\]/, ""))
    .join("\n");
}

for (const mode of PROXY_MODES) {
  describe(`a real pod network with kube-proxy in ${mode} mode (dual stack)`, {
    skip: NEEDS_ROOT,
  }, () => {
    let sb: Sandbox;
    let backend: SandboxService;
    let nodePort: SandboxService;
    let nodePortLocal: SandboxService;
    const usual = new Map<string, string | undefined>();

    const status = async (): Promise<Status | undefined> =>
      (await sb.admin().get<WithStatus>(ours("EgressPolicy"), "client", "default")).status;
    const saw = async (pod: string, target: string, udp = false) =>
      (await probe(sb.pod(pod).netns, target, { udp })).saw;

    /** What the client's traffic inside the cluster looks like to its peers. */
    const inCluster = async (f: Family) => ({
      service: await saw("client", hostPort(backend.clusterIPs[f]!, 80)),
      dns: await saw("client", hostPort(backend.clusterIPs[f]!, 53), true),
      pod: await saw("client", hostPort(sb.pod("backend").ips[f]!, 8080)),
    });

    before(async () => {
      sb = await Sandbox.up({
        prefix: uniquePrefix(mode === "iptables" ? "pi" : "pn"),
        nodes: 3,
        families: FAMILIES,
        proxyMode: mode,
        dir: mkdtempSync(join(tmpdir(), `${TMP_PREFIX}sandbox-`)),
        agentArgs: ["--period-ms", "3000", "--periodic-max-share", "1"],
      });
      await sb.addPod("client", { node: 1, labels: { app: "client", egress: "yes" } });
      await sb.addPod("other", { node: 1, labels: { app: "other" } });
      await sb.addPod("backend", {
        node: 3,
        labels: { app: "backend", egress: "yes" },
        echo: true,
      });
      const selector = { app: "backend" };
      backend = await sb.addService("backend", {
        selector,
        ports: [
          { port: 80, targetPort: 8080 },
          { port: 53, targetPort: 8080, protocol: "UDP", name: "dns" },
        ],
      });
      nodePort = await sb.addService("backend-np", {
        selector,
        type: "NodePort",
        ports: [{ port: 8080 }],
      });
      nodePortLocal = await sb.addService("backend-local", {
        selector,
        type: "NodePort",
        externalTrafficPolicy: "Local",
        ports: [{ port: 8080 }],
      });
      await sb.apply(GATEWAY);
    });

    after(async () => {
      await sb?.destroy();
    });

    it("Services get EndpointSlices from kube-controller-manager and rules from kube-proxy", async () => {
      for (const f of FAMILIES) {
        const r = await probeUntil(
          sb.pod("client").netns,
          hostPort(backend.clusterIPs[f]!, 80),
          (x) => x.ok,
          20_000,
        );
        assert.equal(r.ok, true, `the ClusterIP answers over IPv${f}: ${r.error}`);
      }
      for (const f of FAMILIES) {
        const c = await inCluster(f);
        usual.set(`service${f}`, c.service);
        usual.set(`dns${f}`, c.dns);
        usual.set(`pod${f}`, c.pod);
        const client = sb.pod("client").ips[f];
        assert.deepEqual(
          c,
          { service: client, dns: client, pod: client },
          `without a policy the backend on node-3 sees the client's pod address, IPv${f}: the host-gw network does not masquerade pod-to-pod traffic`,
        );
      }
      const slices = sb.kubectl([
        "get",
        "endpointslices",
        "-l",
        "kubernetes.io/service-name=backend",
      ]);
      assert.match(slices, new RegExp(sb.pod("backend").ips[4]!.replaceAll(".", "\\.")));
    });

    it("seed 003: the node's address without a policy, the egress IP with it (IPv4 and IPv6)", async () => {
      for (const f of FAMILIES) {
        assert.equal(
          await saw("client", hostPort(EXTERNAL[f], 8080)),
          nodeAddress(1, f),
          `IPv${f}`,
        );
      }
      const before = await kubeProxyRules(sb.nodeNs(1), mode);
      await sb.apply(
        policy(`  podSelector: {matchLabels: {app: client}}
  destinationCIDRs: ["${EXTERNAL[4]}/32", "${EXTERNAL[6]}/128"]
`),
      );
      const s = await eventually(status, (x) => condition(x, "Ready")?.status === "True", 30_000);
      assert.equal(condition(s, "Ready")?.status, "True", condition(s, "Ready")?.message);
      for (const f of FAMILIES) {
        const r = await probeUntil(
          sb.pod("client").netns,
          hostPort(EXTERNAL[f], 8080),
          (x) => x.saw === EIP[f],
          10_000,
        );
        assert.equal(r.saw, EIP[f], `IPv${f}`);
        assert.equal(
          await saw("other", hostPort(EXTERNAL[f], 8080)),
          nodeAddress(1, f),
          `a pod not selected keeps its node's address, IPv${f}`,
        );
      }
      assert.equal(
        await kubeProxyRules(sb.nodeNs(1), mode),
        before,
        "the agent left kube-proxy's rules as they were",
      );
      const wide = sb.kubectl(["get", "egp", "-o", "wide"]);
      assert.match(wide, /GATEWAY\s+EGRESS-IPS\s+NODE\s+PODS\s+PROGRAMMED\s+READY/);
      assert.match(wide, new RegExp(`client\\s+edge\\s+\\S*${EIP[4].replaceAll(".", "\\.")}`));
    });

    it("empty destinationCIDRs: the outside sees the egress IP; a Service with its backend on another node, DNS-like UDP to a Service and another pod see the usual source", async () => {
      await sb.apply(policy(`  podSelector: {matchLabels: {egress: "yes"}}\n`));
      const s = await eventually(status, (x) => x?.matchedPods === 2 && x.programmed === "3/3");
      assert.equal(s?.matchedPods, 2, "client and backend are selected");
      for (const f of FAMILIES) {
        const r = await probeUntil(
          sb.pod("client").netns,
          hostPort(EXTERNAL[f], 8080),
          (x) => x.saw === EIP[f],
          10_000,
        );
        assert.equal(r.saw, EIP[f], `outside, IPv${f}`);
        const c = await inCluster(f);
        assert.equal(c.service, usual.get(`service${f}`), `ClusterIP over TCP, IPv${f}`);
        assert.equal(c.dns, usual.get(`dns${f}`), `ClusterIP over UDP (port 53), IPv${f}`);
        assert.equal(c.pod, usual.get(`pod${f}`), `pod to pod, IPv${f}`);
      }
    });

    it("a NodePort reached from the external host still answers while its backend pod is selected", async () => {
      for (const f of FAMILIES) {
        const port = nodePort.nodePorts[8080]!;
        const cluster = await probe(sb.externalNs, hostPort(nodeAddress(1, f), port));
        assert.equal(cluster.ok, true, `Cluster policy through node-1, IPv${f}: ${cluster.error}`);
        assert.equal(cluster.saw, nodeAddress(1, f), "kube-proxy masqueraded it to node-1");
        const local = await probe(
          sb.externalNs,
          hostPort(nodeAddress(3, f), nodePortLocal.nodePorts[8080]!),
        );
        assert.equal(local.ok, true, `Local policy on the backend's node, IPv${f}: ${local.error}`);
        assert.equal(local.saw, EXTERNAL[f], "the backend saw the client, and its reply went back");
      }
    });

    it("our jump rules come first in the built-in chains; kube-proxy's follow", async () => {
      const nat = await mustRun(nsRunner(sb.nodeNs(1)), ["iptables-save", "-t", "nat"]);
      const postrouting = nat.split("\n").filter((l) => l.startsWith("-A POSTROUTING"));
      assert.match(postrouting[0] ?? "", /SALLYPORT-NO-SNAT/);
      assert.match(postrouting[1] ?? "", /SALLYPORT-SNAT-EIP/);
      if (mode === "iptables") {
        assert.ok(
          postrouting.some((l) => l.includes("KUBE-POSTROUTING")),
          "kube-proxy's masquerade hook is still there",
        );
      }
      assert.ok(
        postrouting.some((l) => / -j CNI-/.test(l)),
        "and the bridge plugin's masquerade chains",
      );
    });

    it("pods come and go: a second pod on the node, a relabel, a delete that runs CNI DEL", async () => {
      const late = await sb.addPod("late", { node: 1, labels: { egress: "yes" } });
      for (const f of FAMILIES) {
        const r = await probeUntil(
          late.netns,
          hostPort(EXTERNAL[f], 8080),
          (x) => x.saw === EIP[f],
          10_000,
        );
        assert.equal(r.saw, EIP[f], `a new pod on node-1 is selected at once, IPv${f}`);
      }
      await sb.labelPod("late", { egress: null });
      const r = await probeUntil(
        late.netns,
        hostPort(EXTERNAL[4], 8080),
        (x) => x.saw === nodeAddress(1, 4),
        10_000,
      );
      assert.equal(r.saw, nodeAddress(1, 4), "relabelled out of the policy");
      await sb.deletePod("late");
      const nat = await mustRun(nsRunner(sb.nodeNs(1)), ["iptables-save", "-t", "nat"]);
      assert.doesNotMatch(nat, new RegExp(`-s ${late.ips[4]!.replaceAll(".", "\\.")}/32`));
      for (const f of FAMILIES) {
        assert.equal(
          existsSync(join(sb.dir, "cni", "node-1", "ipam", "sandbox", late.ips[f]!)),
          false,
          `host-local released ${late.ips[f]}`,
        );
      }
      const netns = await mustRun(nsRunner(sb.nodeNs(1)), ["ip", "netns", "list"]);
      assert.doesNotMatch(netns, new RegExp(`^${late.netns}\\b`, "m"), "its namespace is gone");
      const again = await sb.addPod("late", { node: 1 });
      assert.notEqual(again.netns, late.netns, "a pod of the same name again, in a new namespace");
    });
  });
}
