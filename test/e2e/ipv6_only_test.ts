/**
 * An IPv6-only sandbox: node-to-node VXLAN over an IPv6 underlay, an egress IP from an IPv6 pool,
 * seed 003's before/after, and a gateway failure.
 */
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { mustRun } from "../../src/kernel/runner.ts";
import { ours } from "../../src/kube/client.ts";
import { FailoverProbe, probeOnce } from "../../src/sandbox/probe.ts";
import { Sandbox } from "../../src/sandbox/sandbox.ts";
import { nodeAddress, nsRunner } from "../../src/sandbox/topology.ts";
import { eventually, type WithStatus } from "../support/kube.ts";
import { NEEDS_ROOT, uniquePrefix } from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

const EIP = "fd00:77::100";
const TARGET = "[fd00:77::200]:8080";

describe("an IPv6-only cluster, end to end", { skip: NEEDS_ROOT }, () => {
  let sb: Sandbox;
  const status = async () =>
    (await sb.admin().get<WithStatus>(ours("EgressPolicy"), "web", "default")).status;

  before(async () => {
    sb = await Sandbox.up({
      prefix: uniquePrefix("six"),
      nodes: 3,
      families: [6],
      dir: mkdtempSync(join(tmpdir(), `${TMP_PREFIX}sandbox-`)),
    });
    await sb.addPod("web-1", { node: 1, labels: { app: "web" } });
  });
  after(async () => {
    await sb?.destroy();
  });

  it("seed 003 over IPv6: the node's address without a policy, the egress IP with it", async () => {
    assert.equal((await probeOnce(sb.pod("web-1").netns, TARGET)).saw, nodeAddress(1, 6));
    await sb.apply(`apiVersion: sallyport.dev/v1alpha1
kind: EgressGateway
metadata: {name: edge}
spec:
  nodeSelector: {matchLabels: {egress: "true"}}
  pool: ["fd00:77::100-fd00:77::120"]
---
apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {app: web}}
  destinationCIDRs: ["fd00:77::200/128"]
`);
    const s = await eventually(status, (x) => x?.programmed === "2/2");
    assert.deepEqual(s?.egressIPs, [EIP]);
    const r = await eventually(
      () => probeOnce(sb.pod("web-1").netns, TARGET),
      (x) => x.saw === EIP,
    );
    assert.equal(r.saw, EIP);
    const link = await mustRun(nsRunner(sb.nodeNs(1)), ["ip", "-d", "link", "show", "sallyport"]);
    assert.match(link, /mtu 1430 /, "the tunnel leaves room for the IPv6 VXLAN header (70 bytes)");
    assert.match(link, new RegExp(`local ${nodeAddress(1, 6)} `), "over the IPv6 underlay");
  });

  it("a killed gateway: the IPv6 egress IP comes back through the other gateway node", async () => {
    const holder = Number((await status())!.gatewayNode!.split("-")[1]);
    const p = new FailoverProbe(sb.pod("web-1").netns, TARGET, EIP);
    await p.start();
    const cut = Date.now();
    await sb.killNode(holder);
    const gap = await p.gapAfter(cut, 20_000);
    await p.stop();
    assert.notEqual(gap, undefined, "traffic came back");
    console.log(`# IPv6 failover gap ${gap} ms`);
  });
});
