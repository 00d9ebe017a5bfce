/**
 * Several egress IPs per policy, end to end: more concurrent connections to one destination than
 * one egress IP has source ports for. The agents SNAT from 20 source ports only
 * (`--snat-ports 20000-20019`), so one egress IP carries at most 20 connections to one address,
 * port and protocol; a policy with two carries 40. The saturation gauge, the gateway's
 * EgressNode status, the policies' SNATPortsSaturated condition and `sallyport top` say so.
 *
 * Sandbox, on each packet filter: IPv4, node-1 (pods "single" and "double"), node-2 (egress=true,
 * the only gateway node). Policies to the external host only:
 *   single  egressIP: [192.168.77.100]
 *   double  egressIPCount: 2, from the pool 192.168.77.100-192.168.77.120
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { parseMetrics, SandboxSource, type Scrape } from "../../src/cli/top.ts";
import { type KubeObject, ours } from "../../src/kube/client.ts";
import { Sandbox } from "../../src/sandbox/sandbox.ts";
import { EXTERNAL } from "../../src/sandbox/topology.ts";
import { EDGE_GATEWAY_YAML } from "../fixtures/manifests.ts";
import { connectMany, type HeldConnections } from "../support/capacity.ts";
import { condition, eventually, type WithStatus } from "../support/kube.ts";
import { NEEDS_ROOT, topOfSandbox, uniquePrefix } from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

const PORTS = { first: 20000, last: 20019 } as const;
const RANGE = PORTS.last - PORTS.first + 1;
const SINGLE_EIP = "192.168.77.100";
const DESTINATION = { host: EXTERNAL[4], port: 8080 } as const;
/** Long enough for the SYN retransmissions at 1 and 3 s (a port taken by a concurrent SYN). */
const CONNECT_TIMEOUT_MS = 5_000;

const MANIFESTS = `${EDGE_GATEWAY_YAML}---
apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: single, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {app: single}}
  destinationCIDRs: ["${EXTERNAL[4]}/32"]
  egressIP: ["${SINGLE_EIP}"]
---
apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: double, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {app: double}}
  destinationCIDRs: ["${EXTERNAL[4]}/32"]
  egressIPCount: 2
`;

type PolicyStatus = NonNullable<WithStatus["status"]> & { egressIPs?: string[] };
interface EgressNodeStatus {
  snatSaturation?: {
    egressIP: string;
    destination: string;
    port: number;
    protocol: string;
    percent: number;
  }[];
}

/** The sum of a metric's samples on one node whose labels include `labels`. */
function value(
  scrapes: readonly Scrape[],
  node: string,
  name: string,
  labels: Record<string, string>,
): number {
  let sum = 0;
  for (const s of scrapes.filter((x) => x.node === node))
    for (const sample of parseMetrics(s.text ?? ""))
      if (sample.name === name && Object.entries(labels).every(([k, v]) => sample.labels[k] === v))
        sum += sample.value;
  return sum;
}

for (const datapath of ["iptables", "nftables"] as const)
  describe(`several egress IPs carry more connections to one destination (${datapath})`, {
    skip: NEEDS_ROOT,
  }, () => {
    let sb: Sandbox;
    let cache: string;
    let doubleEIPs: string[] = [];
    const held: HeldConnections[] = [];

    const policy = async (name: string) =>
      (await sb.admin().get<WithStatus>(ours("EgressPolicy"), name, "default"))
        .status as PolicyStatus;
    const scrape = () =>
      new SandboxSource([{ name: sb.nodeName(2), netns: sb.nodeNs(2) }]).scrape();
    /** Source address and port of every connection the external server saw from `addresses`. */
    const seenFrom = (addresses: readonly string[]) =>
      readFileSync(join(sb.dir, "external-requests.log"), "utf8")
        .split("\n")
        .filter((l) => l.startsWith("{"))
        .map((l) => JSON.parse(l) as { proto: string; src: string; port: number })
        .filter((r) => r.proto === "tcp" && addresses.includes(r.src));

    before(async () => {
      cache = mkdtempSync(join(tmpdir(), `${TMP_PREFIX}capacity-`));
      const prefix = uniquePrefix(datapath === "iptables" ? "k" : "n");
      sb = await Sandbox.up({
        prefix,
        nodes: 2,
        gatewayNodes: [2],
        families: [4],
        dir: join(cache, "sandbox", prefix),
        agentArgs: [
          "--period-ms",
          "3000",
          "--traffic-period-ms",
          "1000",
          "--periodic-max-share",
          "1",
          "--datapath",
          datapath,
          "--snat-ports",
          `${PORTS.first}-${PORTS.last}`,
        ],
      });
      await sb.addPod("single", { node: 1, labels: { app: "single" } });
      await sb.addPod("double", { node: 1, labels: { app: "double" } });
      await sb.apply(MANIFESTS);
      for (const name of ["single", "double"]) {
        const s = await eventually(
          () => policy(name),
          (x) => condition(x, "Ready")?.status === "True",
          60_000,
          250,
        );
        assert.equal(condition(s, "Ready")?.status, "True", `${name}: ${JSON.stringify(s)}`);
      }
    });

    after(async () => {
      for (const h of held) h.stop();
      await sb?.destroy();
      if (cache !== undefined) rmSync(cache, { recursive: true, force: true });
    });

    it("lists both egress IPs of egressIPCount: 2 in the policy's status", async () => {
      const s = await policy("double");
      doubleEIPs = [...(s.egressIPs ?? [])];
      assert.equal(doubleEIPs.length, 2, JSON.stringify(s));
      assert.ok(
        !doubleEIPs.includes(SINGLE_EIP),
        `single's address is not given again: ${doubleEIPs}`,
      );
      for (const a of doubleEIPs)
        assert.match(a, /^192\.168\.77\.(1[01][0-9]|120)$/, "from the pool");
      assert.equal((await policy("single")).egressIPs?.join(), SINGLE_EIP);
    });

    it(`one egress IP: ${RANGE} of ${RANGE + 10} concurrent connections open, one per source port`, async () => {
      const h = await connectMany(sb.pod("single").netns, DESTINATION, {
        count: RANGE + 10,
        timeoutMs: CONNECT_TIMEOUT_MS,
      });
      held.push(h);
      const { open, failed, saw } = h.result;
      assert.deepEqual(
        { open, failed, saw },
        { open: RANGE, failed: 10, saw: { [SINGLE_EIP]: RANGE } },
      );
      const ports = new Set(seenFrom([SINGLE_EIP]).map((r) => r.port));
      assert.equal(ports.size, RANGE, "every port of the range, each once");
      for (const p of ports) assert.ok(p >= PORTS.first && p <= PORTS.last, `port ${p}`);
    });

    it(`two egress IPs: ${2 * RANGE} of ${2 * RANGE + 10} open, ${RANGE} through each`, async () => {
      assert.equal(doubleEIPs.length, 2);
      const h = await connectMany(sb.pod("double").netns, DESTINATION, {
        count: 2 * RANGE + 10,
        timeoutMs: CONNECT_TIMEOUT_MS,
      });
      held.push(h);
      const { open, failed, saw } = h.result;
      assert.deepEqual(
        { open, failed, saw },
        {
          open: 2 * RANGE,
          failed: 10,
          saw: Object.fromEntries(doubleEIPs.map((a) => [a, RANGE])),
        },
      );
      for (const a of doubleEIPs) {
        const ports = new Set(seenFrom([a]).map((r) => r.port));
        assert.equal(ports.size, RANGE, `${a}: every port of the range`);
      }
    });

    it("the saturation gauge is 1 for each egress IP toward the destination", async () => {
      const eips = [SINGLE_EIP, ...doubleEIPs];
      const tcp = (a: string) => ({
        egress_ip: a,
        destination: DESTINATION.host,
        port: String(DESTINATION.port),
        protocol: "tcp",
      });
      const s = await eventually(
        scrape,
        (x) =>
          eips.every((a) => value(x, "node-2", "sallyport_snat_port_saturation", tcp(a)) === 1),
        20_000,
        500,
      );
      for (const a of eips) {
        assert.equal(value(s, "node-2", "sallyport_snat_port_saturation", tcp(a)), 1, a);
        assert.equal(value(s, "node-2", "sallyport_snat_ports_in_use", tcp(a)), RANGE, a);
        assert.equal(value(s, "node-2", "sallyport_snat_connections", tcp(a)), RANGE, a);
      }
    });

    it("the gateway's EgressNode and both policies report the saturation", async () => {
      const eips = [SINGLE_EIP, ...doubleEIPs].sort();
      const node = await eventually(
        async () =>
          (
            await sb
              .admin()
              .get<KubeObject & { status?: EgressNodeStatus }>(ours("EgressNode"), "node-2")
          ).status,
        (x) => (x?.snatSaturation ?? []).length === 3,
        20_000,
        500,
      );
      // An entry keeps the percentage it crossed the threshold with (src/agent/traffic.ts): 100
      // when the collector first saw every connection open, less when it sampled mid-burst.
      const reported = node?.snatSaturation ?? [];
      assert.deepEqual(
        reported.map((s) => `${s.egressIP} ${s.destination}:${s.port}/${s.protocol}`).sort(),
        eips.map((a) => `${a} ${DESTINATION.host}:${DESTINATION.port}/tcp`),
      );
      for (const s of reported)
        assert.ok(s.percent >= 80 && s.percent <= 100, `${s.egressIP}: ${s.percent}%`);
      for (const [name, mine] of [
        ["single", [SINGLE_EIP]],
        ["double", doubleEIPs],
      ] as const) {
        const s = await eventually(
          () => policy(name),
          (x) => condition(x, "SNATPortsSaturated")?.status === "True",
          20_000,
          500,
        );
        const c = condition(s, "SNATPortsSaturated");
        assert.equal(c?.status, "True", `${name}: ${JSON.stringify(c)}`);
        for (const a of mine)
          assert.match(
            c?.message ?? "",
            new RegExp(`egress IP ${a.replaceAll(".", "\\.")} uses (8\\d|9\\d|100)%`),
          );
      }
    });

    it("sallyport top --sandbox shows the connections and 100% port use per policy", async () => {
      const r = await topOfSandbox(sb.prefix, cache);
      assert.equal(r.code, 0, r.stderr);
      const rows = (policy: string) =>
        r.stdout
          .split("\n")
          .filter((l) => l.startsWith(`${policy} `))
          .map((l) => l.split(/ {2,}/));
      const header = r.stdout.split("\n")[0]!.split(/ {2,}/);
      const col = (name: string) => header.indexOf(name);
      const byAddress = (policy: string) =>
        Object.fromEntries(rows(policy).map((c) => [c[col("EGRESS-IP")], Number(c[col("CONNS")])]));
      assert.deepEqual(byAddress("egp/default/single"), { [SINGLE_EIP]: RANGE }, r.stdout);
      // The policy's row (its counters name both addresses) and, on iptables, whose SNAT rules
      // count each address's new connections apart, one row per address.
      const double = byAddress("egp/default/double");
      assert.equal(double[[...doubleEIPs].sort().join(",")], 2 * RANGE, r.stdout);
      for (const a of doubleEIPs) assert.ok([undefined, RANGE].includes(double[a]), r.stdout);
      for (const policy of ["egp/default/single", "egp/default/double"])
        for (const cells of rows(policy)) {
          assert.equal(cells[col("PORT-USE")], "100%", r.stdout);
          assert.equal(cells[col("DESTINATION")], `${DESTINATION.host}:${DESTINATION.port}/tcp`);
        }
    });
  });
