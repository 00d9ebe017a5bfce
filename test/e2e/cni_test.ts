/**
 * sallyport-cni in the sandbox: the chained plugin last in every node's configuration list, each
 * node's agent serving its socket. What it must hold:
 *
 *  - a new selected pod is in its node's sets when CNI ADD returns, so nothing it sends from its
 *    first moment leaves with the node's address;
 *  - ADD fails closed while the node's agent is down, and the runtime's retry succeeds after;
 *  - CNI DEL takes the pod's address out of the sets before IPAM hands it out again: a pod that
 *    is not selected and gets the address at once never leaves with the old policy's egress IP,
 *    although the old Pod object (Running, with that address) and the controller's slice still
 *    name it;
 *  - a running pod that a policy starts selecting leaves with the egress IP at once, even while
 *    no controller writes the slice that would tell the gateway: the steering node names the
 *    policy's tunnel class in the VXLAN header, and the gateway SNATs by it.
 *
 * Nodes: node-1 (workloads), node-2 and node-3 (egress=true). IPv4, kube-proxy in iptables mode.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { mustRun } from "../../src/kernel/runner.ts";
import { ours } from "../../src/kube/client.ts";
import { Sandbox, type SandboxPod } from "../../src/sandbox/sandbox.ts";
import { EXTERNAL, nodeAddress, nsRunner } from "../../src/sandbox/topology.ts";
import { EDGE_GATEWAY_YAML } from "../fixtures/manifests.ts";
import { condition, eventually, type WithStatus } from "../support/kube.ts";
import { NEEDS_ROOT, uniquePrefix } from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

const EIP = "192.168.77.100";
const NODE_1 = nodeAddress(1, 4);

const MANIFESTS = `${EDGE_GATEWAY_YAML}---
apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {app: web}}
  destinationCIDRs: ["${EXTERNAL[4]}/32"]
  egressIP: ["${EIP}"]
`;

describe("sallyport-cni: pods steered from their first packet", { skip: NEEDS_ROOT }, () => {
  let sb: Sandbox;
  const senders: ChildProcess[] = [];

  /** A UDP datagram carrying the pod's name every 20 ms to the external server, from now on. */
  const send = (pod: SandboxPod) => {
    const script = `while :; do echo ${pod.name} > /dev/udp/${EXTERNAL[4]}/8080; sleep 0.02; done`;
    const child = spawn("ip", ["netns", "exec", pod.netns, "bash", "-c", script], {
      stdio: "ignore",
    });
    senders.push(child);
    return child;
  };
  const seenFrom = (name: string) =>
    sb
      .externalRequests()
      .filter((r) => r.data === name)
      .map((r) => r.src);
  /** The node's packet filter as text (ipset or nftables, whichever the agent chose). */
  const kernelSets = async (node: number) => {
    const ns = nsRunner(sb.nodeNs(node));
    const [ipset, nft] = await Promise.all([
      ns.run(["ipset", "save"]),
      ns.run(["nft", "list", "table", "inet", "sallyport"]),
    ]);
    return `${ipset.stdout}\n${nft.stdout}`;
  };

  before(async () => {
    sb = await Sandbox.up({
      prefix: uniquePrefix("cn"),
      nodes: 3,
      families: [4],
      dir: mkdtempSync(join(tmpdir(), `${TMP_PREFIX}sandbox-`)),
      agentArgs: ["--period-ms", "3000", "--periodic-max-share", "1"],
    });
    await sb.addPod("seed", { node: 1, labels: { app: "web" } });
    await sb.apply(MANIFESTS);
    await eventually(
      async () => (await sb.admin().get<WithStatus>(ours("EgressPolicy"), "web", "default")).status,
      (s) => condition(s, "Ready")?.status === "True",
      60_000,
    );
  });

  after(async () => {
    for (const s of senders) s.kill("SIGKILL");
    await sb?.destroy();
  });

  it("the sandbox installs the plugin last in every node's configuration list", () => {
    for (let i = 1; i <= sb.nodeCount; i++) {
      const types = sb.topology.confList(i).plugins.map((p) => p.type);
      assert.equal(types.at(-1), "sallyport-cni", `node-${i}: ${types.join(", ")}`);
    }
  });

  it("a selected pod is in its node's sets when CNI ADD returns; nothing leaks", async () => {
    const pod = await sb.addPodNetwork("first", { node: 1, labels: { app: "web" } });
    // Before the Pod object says anything about its address: only CNI ADD told the agent.
    const sets = await kernelSets(1);
    assert.ok(sets.includes(pod.ips[4]!), `node-1's sets hold ${pod.ips[4]} after ADD`);
    send(pod);
    await sb.registerPod(pod);
    const srcs = await eventually(
      async () => seenFrom("first"),
      (s) => s.includes(EIP),
      15_000,
    );
    assert.ok(srcs.includes(EIP), "seen from the egress IP");
    assert.deepEqual(
      srcs.filter((s) => s !== EIP),
      [],
      "no datagram of the new pod left with another address",
    );
    assert.match(sb.log("agent-1"), /CNI ADD: the kernel holds the pod's sets/);
  });

  it("ADD fails closed while the node's agent is down; the runtime's retry succeeds after", async () => {
    await sb.stopAgent(1, "SIGKILL");
    await assert.rejects(
      sb.addPodNetwork("closed", { node: 1, labels: { app: "web" } }),
      /plugin sallyport-cni of network "sandbox" failed: Cannot reach the Sallyport agent .*\[CNI error 11\]/,
    );
    assert.equal(
      sb.pods().some((p) => p.name === "closed"),
      false,
      "the failed pod has no network",
    );
    sb.startAgent(1);
    await sb.waitCniReady(1);
    const pod = await sb.addPodNetwork("closed", { node: 1, labels: { app: "web" } });
    assert.ok(
      (await kernelSets(1)).includes(pod.ips[4]!),
      "the retried ADD put the pod in the sets",
    );
    await sb.deletePod("closed");
  });

  it("an address CNI DEL released and IPAM gives to an unselected pod never leaves with the old egress IP", async () => {
    const old = await sb.addPod("old", { node: 1, labels: { app: "web" } });
    send(old);
    await eventually(
      async () => seenFrom("old"),
      (s) => s.includes(EIP),
      15_000,
    );
    // The runtime tears the old pod's sandbox down; its Pod object stays (Running, with its
    // address), and so does the controller's slice naming it.
    await sb.removePodNetwork("old");
    // host-local hands out the address after its last reserved one: make that the old pod's.
    const octets = old.ips[4]!.split(".").map(Number);
    const before = [...octets.slice(0, 3), octets[3]! - 1].join(".");
    const ipam = join(sb.dir, "cni", "node-1", "ipam", "sandbox");
    assert.equal(existsSync(join(ipam, old.ips[4]!)), false, "host-local released the address");
    writeFileSync(join(ipam, "last_reserved_ip.0"), before);
    const reuse = await sb.addPodNetwork("reuse", { node: 1, labels: { app: "other" } });
    assert.equal(reuse.ips[4], old.ips[4], "IPAM gave the new pod the old pod's address");
    send(reuse);
    await sb.registerPod(reuse);
    const oldObject = await sb
      .admin()
      .get<WithStatus & { status?: { podIP?: string } }>(
        { group: "", version: "v1", plural: "pods", namespaced: true },
        "old",
        "default",
      );
    assert.equal(oldObject.status?.podIP, old.ips[4], "the old Pod object still names the address");
    await new Promise((r) => setTimeout(r, 3000));
    const srcs = seenFrom("reuse");
    assert.ok(srcs.length > 50, `the new pod's datagrams arrived (${srcs.length})`);
    assert.deepEqual(
      [...new Set(srcs)],
      [NODE_1],
      "every datagram of the new pod left with its node's address",
    );
    await sb.deletePod("old");
    await sb.deletePod("reuse");
  });

  it("with the controller down, a running pod a policy starts selecting leaves with the egress IP at once: its node names the policy's tunnel class, which the gateway SNATs", async () => {
    const pod = await sb.addPod("late", { node: 1, labels: { app: "other" } });
    send(pod);
    await eventually(
      async () => seenFrom("late"),
      (s) => s.includes(NODE_1),
      15_000,
    );
    // No controller: no endpoint slice will ever tell the gateway about the pod.
    await sb.stopController();
    try {
      await sb.labelPod("late", { app: "web" });
      await eventually(
        async () => seenFrom("late"),
        (s) => s.includes(EIP),
        15_000,
      );
      for (const gateway of [2, 3])
        assert.doesNotMatch(
          await kernelSets(gateway),
          new RegExp(`(^|[^\\d.])${pod.ips[4]!.replaceAll(".", "\\.")}(?![\\d])`, "m"),
          `node-${gateway} holds no set naming the pod: the tunnel class let it through`,
        );
      const srcs = seenFrom("late");
      const steered = srcs.indexOf(EIP);
      assert.deepEqual(
        [...new Set(srcs.slice(steered))],
        [EIP],
        "from its first datagram through the gateway on, every one left with the egress IP",
      );
    } finally {
      await sb.startController();
    }
    await sb.deletePod("late");
  });

  it("CNI DEL leaves nothing of the pod in the sets", async () => {
    const pod = await sb.addPod("gone", { node: 1, labels: { app: "web" } });
    assert.ok((await kernelSets(1)).includes(pod.ips[4]!));
    await sb.deletePod("gone");
    assert.equal((await kernelSets(1)).includes(`${pod.ips[4]!} `), false);
    const nat = await mustRun(nsRunner(sb.nodeNs(1)), ["iptables-save", "-t", "nat"]);
    assert.doesNotMatch(nat, new RegExp(`-s ${pod.ips[4]!.replaceAll(".", "\\.")}/32`));
  });
});
