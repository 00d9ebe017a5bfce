/**
 * The image `make image` builds (scripts/image.ts: mmdebstrap, the pinned Node.js, the bundle,
 * buildah) runs here with podman: `sallyport --help`, the kernel tools the agent spawns, and a
 * dual-stack sandbox whose agents all run from the image, each in a container inside its node's
 * network namespace (as the DaemonSet's pods run in the host's), carrying a pod's traffic out
 * through the egress IP.
 *
 * The image is rebuilt only when an input changed (the Debian root is cached in
 * ~/.cache/sallyport/image, the image in podman's storage): a few seconds when warm.
 */
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { buildImage, defaultImage } from "../../scripts/image.ts";
import { ours } from "../../src/kube/client.ts";
import type { Family } from "../../src/lib/ip.ts";
import { podmanRunOptions } from "../../src/sandbox/podman.ts";
import { Sandbox } from "../../src/sandbox/sandbox.ts";
import { EXTERNAL, nodeAddress } from "../../src/sandbox/topology.ts";
import { eventually, type WithStatus } from "../support/kube.ts";
import { NEEDS_ROOT, probe, probeUntil, uniquePrefix } from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

const EIP = { 4: "192.168.77.100", 6: "fd00:77::100" } as const;
const FAMILIES: Family[] = [4, 6];
const target = (f: Family) => (f === 4 ? `${EXTERNAL[4]}:8080` : `[${EXTERNAL[6]}]:8080`);

function podman(args: readonly string[]): { status: number | null; out: string } {
  const r = spawnSync("podman", args, { encoding: "utf8" });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

describe("the image", { skip: NEEDS_ROOT }, () => {
  let image: string;
  let sb: Sandbox | undefined;
  let prefix: string;

  before(async () => {
    const started = Date.now();
    const built = await buildImage();
    image = built.image;
    console.log(
      `# image ${image}: ${built.built ? "built" : "up to date"} in ${((Date.now() - started) / 1000).toFixed(1)} s`,
    );
  });

  after(async () => {
    await sb?.destroy();
    const left = execFileSync("podman", ["ps", "--all", "--format", "{{.Names}}"], {
      encoding: "utf8",
    })
      .split("\n")
      .filter((n) => prefix !== undefined && n.startsWith(prefix));
    assert.deepEqual(left, [], "the sandbox removed its agents' containers");
  });

  it("is the chart's default image", () => {
    assert.equal(image, defaultImage());
  });

  it("runs `sallyport --help`", () => {
    const r = podman(["run", "--rm", ...podmanRunOptions(), image, "--help"]);
    assert.equal(r.status, 0, r.out);
    assert.match(r.out, /Usage: sallyport/);
    assert.match(r.out, /\bagent\b/);
    assert.match(r.out, /\bcontroller\b/);
  });

  it("holds the kernel tools the agent spawns", () => {
    const r = podman([
      "run",
      "--rm",
      ...podmanRunOptions(),
      "--entrypoint",
      "/bin/sh",
      image,
      "-c",
      // Versions only where printing one needs no privilege (ipset's asks the kernel).
      "for t in iptables-nft-restore iptables-legacy-restore ip6tables-nft-save ipset ip bridge sysctl nft conntrack modprobe; do command -v $t || exit 1; done; iptables --version && ip -V && node --version",
    ]);
    assert.equal(r.status, 0, r.out);
    assert.match(r.out, /iptables v1\.8/);
    assert.match(r.out, /\/ipset$/m);
    assert.match(r.out, /^v24\./m, "Node.js 24");
  });

  it("agents from the image program their nodes: a pod leaves through the egress IP (IPv4 and IPv6)", async () => {
    prefix = uniquePrefix("img");
    sb = await Sandbox.up({
      prefix,
      nodes: 2,
      families: FAMILIES,
      gatewayNodes: [2],
      agentImage: image,
      dir: mkdtempSync(join(tmpdir(), `${TMP_PREFIX}sandbox-`)),
    });
    const agents = new RegExp(`^${prefix}-agent-[12] ${image}$`, "gm");
    const running = await eventually(
      async () => podman(["ps", "--format", "{{.Names}} {{.Image}}"]).out,
      (out) => (out.match(agents) ?? []).length === 2,
    );
    assert.equal(
      (running.match(agents) ?? []).length,
      2,
      `both agents run from the image: ${running}`,
    );
    const pod = await sb.addPod("bot", { node: 1, labels: { app: "bot" } });
    for (const f of FAMILIES)
      assert.equal((await probe(pod.netns, target(f))).saw, nodeAddress(1, f));
    await sb.apply(`apiVersion: sallyport.dev/v1alpha1
kind: EgressGateway
metadata: {name: edge}
spec:
  nodeSelector: {matchLabels: {egress: "true"}}
  pool: ["192.168.77.100-192.168.77.120", "fd00:77::100-fd00:77::120"]
---
apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: bot, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {app: bot}}
  destinationCIDRs: ["192.168.77.192/26", "fd00:77::200/120"]
  egressIP: ["${EIP[4]}", "${EIP[6]}"]
`);
    const status = await eventually(
      async () =>
        (await sb!.admin().get<WithStatus>(ours("EgressPolicy"), "bot", "default")).status,
      (s) => s?.programmed === "2/2",
      30_000,
    );
    assert.equal(status?.programmed, "2/2", "programmed by both agents from the image");
    for (const f of FAMILIES) {
      const r = await probeUntil(pod.netns, target(f), (x) => x.saw === EIP[f], 15_000);
      assert.equal(r.saw, EIP[f], `IPv${f}`);
    }
  });
});
