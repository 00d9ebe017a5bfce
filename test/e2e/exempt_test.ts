/**
 * `sallyport agent --exempt-by-sets` on the real pod network, where the CNI's masquerade would
 * otherwise rewrite the source of steered traffic.
 *
 * Sallyport keeps the CNI's masquerade (here the bridge plugin's `CNI-…` ipMasq chains) off
 * steered traffic with `SALLYPORT-NO-SNAT`, which accepts the keep mark 0x12 in nat POSTROUTING
 * before any other rule. A CNI that clears packet marks after mangle FORWARD and before nat
 * POSTROUTING defeats that: the packet is already routed into the tunnel, but reaches nat
 * POSTROUTING unmarked and the CNI masquerades it. The switch adds the same exemption matched by
 * the policy's sets, which no mark clearing touches.
 *
 * The foreign rule, on the pod's node (node-1) only, in its network namespace:
 *
 *   -t mangle -A FORWARD -s 10.244.1.0/24 -j MARK --set-xmark 0x0/0xffffffff     (node-1's pods)
 *
 * Appended, as a CNI installs its rules after Sallyport's jumps (Sallyport's `SALLYPORT-RESET-MARK`
 * does not end the chain, so the clearing runs after it). Weave Net itself does not clear marks
 * this way (its NPC sets its own bit 0x40000 with a mask that keeps every other bit); the rule
 * stands for any CNI or host firewall that does. The same rule appended in mangle POSTROUTING would
 * not reach steered packets: Sallyport's `SALLYPORT-KEEP-MARK` accepts them first there, and the
 * agent keeps its jumps first in every built-in chain. Checked below.
 *
 * Nodes: node-1 (workloads), node-2 and node-3 (egress=true). IPv4, kube-proxy in iptables mode.
 * Pods: client (node-1, selected), other (node-1, never selected), backend (node-3, the echo
 * server behind the ClusterIP Service `backend`, port 80 → 8080).
 */
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { mustRun } from "../../src/kernel/runner.ts";
import { Sandbox, type SandboxService } from "../../src/sandbox/sandbox.ts";
import { EXTERNAL, nodeAddress, nsRunner, podCIDR } from "../../src/sandbox/topology.ts";
import { EDGE_GATEWAY_YAML } from "../fixtures/manifests.ts";
import { NEEDS_ROOT, probe, probeUntil, uniquePrefix } from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

const EIP = "192.168.77.100";
const TARGET = `${EXTERNAL[4]}:8080`;
const NODE_1 = nodeAddress(1, 4);
const CLEAR_COMMENT = "test: a CNI that clears packet marks";

const MANIFESTS = `${EDGE_GATEWAY_YAML}---
apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: client, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {app: client}}
  destinationCIDRs: ["${EXTERNAL[4]}/32"]
  egressIP: ["${EIP}"]
`;

/** `iptables -t TABLE -A|-D CHAIN`: the foreign mark-clearing rule on a node. */
function clearMarks(op: "-A" | "-D", chain: "FORWARD" | "POSTROUTING"): string[] {
  return [
    "iptables",
    "-w",
    "-t",
    "mangle",
    op,
    chain,
    "-s",
    podCIDR(1, 4),
    "-m",
    "comment",
    "--comment",
    CLEAR_COMMENT,
    "-j",
    "MARK",
    "--set-xmark",
    "0x0/0xffffffff",
  ];
}

const conntrackOfPod = (podIP: string) => [
  "-p",
  "tcp",
  "-s",
  podIP,
  "-d",
  EXTERNAL[4],
  "--dport",
  "8080",
];

/**
 * The sources node-1's connection tracking gave the pod's connections to the external host as
 * they left node-1 (each reply tuple's destination): the pod's own address when nothing
 * rewrote it. `forget` first, so that only connections made after it count.
 */
async function leftNodeWith(ns: string, podIP: string): Promise<string[]> {
  const out = await mustRun(nsRunner(ns), ["conntrack", "-L", ...conntrackOfPod(podIP)]);
  const sources = out
    .split("\n")
    .map((l) => [...l.matchAll(/dst=(\S+)/g)][1]?.[1])
    .filter((a) => a !== undefined);
  return [...new Set(sources)].sort();
}

/** Packets the gateway nodes (2, 3) dropped as tunnel traffic that no policy there claims. */
async function unclaimedTunnelDrops(sb: Sandbox): Promise<number> {
  let sum = 0;
  for (const i of [2, 3]) {
    const save = await mustRun(nsRunner(sb.nodeNs(i)), ["iptables-save", "-c", "-t", "mangle"]);
    for (const line of save.split("\n"))
      if (line.includes("tunnel traffic no policy here claims"))
        sum += Number(/^\[(\d+):/.exec(line)?.[1] ?? 0);
  }
  return sum;
}

async function forget(ns: string, podIP: string): Promise<void> {
  // conntrack -D exits 1 when nothing matched.
  await nsRunner(ns).run(["conntrack", "-D", ...conntrackOfPod(podIP)]);
}

for (const datapath of ["iptables", "nftables"] as const) {
  describe(`--exempt-by-sets where a CNI clears marks before nat POSTROUTING (${datapath} datapath)`, {
    skip: NEEDS_ROOT,
  }, () => {
    let sb: Sandbox;
    let backend: SandboxService;
    let client: string;
    const saw = async (pod: string, target = TARGET) =>
      (await probe(sb.pod(pod).netns, target)).saw;

    before(async () => {
      sb = await Sandbox.up({
        prefix: uniquePrefix(datapath === "iptables" ? "xi" : "xn"),
        nodes: 3,
        families: [4],
        proxyMode: "iptables",
        dir: mkdtempSync(join(tmpdir(), `${TMP_PREFIX}sandbox-`)),
        agentArgs: ["--datapath", datapath, "--period-ms", "3000", "--periodic-max-share", "1"],
      });
      client = (await sb.addPod("client", { node: 1, labels: { app: "client" } })).ips[4]!;
      await sb.addPod("other", { node: 1, labels: { app: "other" } });
      await sb.addPod("backend", { node: 3, labels: { app: "backend" }, echo: true });
      backend = await sb.addService("backend", {
        selector: { app: "backend" },
        ports: [{ port: 80, targetPort: 8080 }],
      });
      await sb.apply(MANIFESTS);
    });

    after(async () => {
      await sb?.destroy();
    });

    it("with marks intact, the mark-based exemption suffices: the client leaves with the egress IP", async () => {
      const r = await probeUntil(sb.pod("client").netns, TARGET, (x) => x.saw === EIP, 30_000);
      assert.equal(r.saw, EIP, r.error);
      const service = await probeUntil(
        sb.pod("client").netns,
        `${backend.clusterIPs[4]}:80`,
        (x) => x.ok,
        20_000,
      );
      assert.equal(service.saw, client, "the backend sees the client's pod address");
    });

    it(
      datapath === "iptables"
        ? "the same clearing in mangle POSTROUTING comes too late: SALLYPORT-KEEP-MARK accepted the packet first"
        : "the same clearing in mangle POSTROUTING is in time: no chain of ours accepts the packet before it",
      async () => {
        const node = nsRunner(sb.nodeNs(1));
        await mustRun(node, clearMarks("-A", "POSTROUTING"));
        try {
          const r = await probe(sb.pod("client").netns, TARGET, { timeoutMs: 1000 });
          if (datapath === "iptables") assert.equal(r.saw, EIP, r.error);
          else assert.notEqual(r.saw, EIP);
        } finally {
          await mustRun(node, clearMarks("-D", "POSTROUTING"));
        }
      },
    );

    it("without the switch, cleared marks let the bridge plugin's masquerade rewrite the steered traffic: it never leaves with the egress IP", async () => {
      await mustRun(nsRunner(sb.nodeNs(1)), clearMarks("-A", "FORWARD"));
      await forget(sb.nodeNs(1), client);
      const dropsBefore = datapath === "iptables" ? await unclaimedTunnelDrops(sb) : 0;
      const seen = new Set<string>();
      for (let i = 0; i < 5; i++) {
        const r = await probe(sb.pod("client").netns, TARGET, { timeoutMs: 1000 });
        seen.add(r.saw ?? `no answer (${r.error ?? "?"})`);
      }
      const leftWith = await leftNodeWith(sb.nodeNs(1), client);
      const dropped =
        datapath === "iptables" ? (await unclaimedTunnelDrops(sb)) - dropsBefore : undefined;
      console.log(
        `${datapath}, without --exempt-by-sets: the server saw ${[...seen].join(", ")}; node-1 sent it from ${leftWith.join(", ")}; the gateways dropped ${dropped ?? "?"} packets as tunnel traffic no policy claims`,
      );
      assert.ok(!seen.has(EIP), `the server saw the egress IP: ${[...seen].join(", ")}`);
      const tunnel = await mustRun(nsRunner(sb.nodeNs(1)), [
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "dev",
        "sallyport",
      ]);
      assert.deepEqual(
        leftWith,
        [/inet (\S+)\//.exec(tunnel)?.[1]],
        "node-1 masqueraded the pod's connections to its tunnel device's address",
      );
      if (dropped !== undefined) assert.ok(dropped > 0, "the gateway dropped them");
    });

    it("with `sallyport agent --exempt-by-sets`, the selected pod leaves with the egress IP again", async () => {
      await sb.stopAgent(1);
      sb.startAgent(1, ["--exempt-by-sets"]);
      const r = await probeUntil(sb.pod("client").netns, TARGET, (x) => x.saw === EIP, 20_000);
      console.log(`${datapath}, with --exempt-by-sets: the server saw ${r.saw ?? r.error}`);
      assert.equal(r.saw, EIP, r.error);
      const node = nsRunner(sb.nodeNs(1));
      if (datapath === "iptables") {
        const nat = await mustRun(node, ["iptables-save", "-t", "nat"]);
        assert.match(
          nat,
          new RegExp(
            `-A SALLYPORT-NO-SNAT -d ${EXTERNAL[4]}/32 -m set --match-set sallyport-src4-\\S+ src .*-j ACCEPT`,
          ),
        );
      } else {
        const chain = await mustRun(node, [
          "nft",
          "list",
          "chain",
          "inet",
          "sallyport",
          "postrouting",
        ]);
        assert.match(chain, /ct mark 0x26000000\/8 snat ip to ip saddr/);
      }
      const mangle = await mustRun(node, ["iptables-save", "-t", "mangle"]);
      assert.match(
        mangle,
        new RegExp(`-A FORWARD -s ${podCIDR(1, 4)} .*${CLEAR_COMMENT}`),
        "the foreign rule is still there",
      );
    });

    it("unselected pods and pod-to-Service traffic are unaffected", async () => {
      assert.equal(
        await saw("other"),
        NODE_1,
        "a pod no policy selects leaves with its node's address",
      );
      assert.equal(
        (await probe(sb.pod("client").netns, `${backend.clusterIPs[4]}:80`)).saw,
        client,
        "the client reaches the ClusterIP Service (backend on node-3) with its pod address",
      );
      assert.equal(
        (await probe(sb.pod("client").netns, `${sb.pod("backend").ips[4]}:8080`)).saw,
        client,
        "and the backend pod directly",
      );
    });
  });
}
