/**
 * End to end, the way users judge Sallyport: a dual-stack sandbox (real kube-apiserver, the
 * controller, one agent process per node, pods, an external server) and real packets.
 *
 * Nodes: node-1 (workloads), node-2 and node-3 (egress=true). Address plan: src/sandbox/topology.ts.
 * Pods: web-1 (node-1, app=web), web-2 (node-2, app=web), web-3 (node-3, app=web) so that one
 * selected pod always runs on the gateway itself; other (node-1, app=other); target (node-3, a
 * pod running a server, for pod-to-pod traffic).
 */
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { explain } from "../../src/cli/explain.ts";
import { mustRun } from "../../src/kernel/runner.ts";
import { CORE, ours } from "../../src/kube/client.ts";
import type { Family } from "../../src/lib/ip.ts";
import { FailoverProbe } from "../../src/sandbox/probe.ts";
import { Sandbox } from "../../src/sandbox/sandbox.ts";
import { EXTERNAL, nodeAddress, nsRunner } from "../../src/sandbox/topology.ts";
import { condition, eventually, type Status, type WithStatus } from "../support/kube.ts";
import {
  NEEDS_ROOT,
  probe,
  probeUntil,
  startEcho,
  stopAll,
  stream,
  uniquePrefix,
} from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

const EIP = { 4: "192.168.77.100", 6: "fd00:77::100" } as const;
const EIP2 = { 4: "192.168.77.101", 6: "fd00:77::101" } as const;
const EXCLUDED = { 4: "192.168.77.201", 6: "fd00:77::201" } as const;
const FAMILIES: Family[] = [4, 6];

const target = (f: Family, address: string = EXTERNAL[f], port = 8080) =>
  f === 4 ? `${address}:${port}` : `[${address}]:${port}`;

function gatewayYaml(): string {
  return `apiVersion: sallyport.dev/v1alpha1
kind: EgressGateway
metadata: {name: edge}
spec:
  nodeSelector: {matchLabels: {egress: "true"}}
  pool: ["192.168.77.100-192.168.77.120", "fd00:77::100-fd00:77::120"]
`;
}

function policyYaml(name: string, spec: string): string {
  return `apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: ${name}, namespace: default}
spec:
  gateway: edge
${spec}`;
}

/** The same journeys on both packet filters (`sallyport agent --datapath`). */
for (const datapath of ["iptables", "nftables"] as const)
  describe(`the sandbox, end to end (dual stack, ${datapath})`, { skip: NEEDS_ROOT }, () => {
    let sb: Sandbox;

    const status = async (name: string): Promise<Status | undefined> =>
      (await sb.admin().get<WithStatus>(ours("EgressPolicy"), name, "default")).status;
    const ready = (name: string, ms = 30_000) =>
      eventually(
        () => status(name),
        (s) => condition(s, "Ready")?.status === "True",
        ms,
      );
    /**
     * The last `n` lines of an agent's log whose message matches `about` ("time msg"): what a
     * failure message needs to say where the time went.
     */
    const notes = (agent: string, about: RegExp, n = 8): string[] =>
      sb
        .log(agent)
        .split("\n")
        .filter(Boolean)
        .map((l) => {
          try {
            return JSON.parse(l) as { msg?: string; time?: number | string };
          } catch {
            return {};
          }
        })
        .filter((j) => about.test(j.msg ?? ""))
        .slice(-n)
        .map((j) => `${j.time ?? "?"} ${j.msg}`);
    /** Lease, liveness and fence decisions of the gateway nodes' agents. */
    const LEASE_NOTES = /lease|holding|released|judged|fence|waiting|API server|peers/;
    const gatewayNotes = () =>
      JSON.stringify({
        "agent-2": notes("agent-2", LEASE_NOTES),
        "agent-3": notes("agent-3", LEASE_NOTES),
        // when the controller saw a node's lease expire (or a gateway judge it down)
        controller: sb
          .log("controller")
          .split("\n")
          .filter((l) => l.includes("alive for placement"))
          .slice(-4),
      });
    /** Someone flushes our steering rules on a node. */
    const flushSteering = (i: number) =>
      mustRun(
        nsRunner(sb.nodeNs(i)),
        datapath === "iptables"
          ? ["iptables", "-t", "mangle", "-F", "SALLYPORT-MARK-REQUEST"]
          : ["nft", "flush", "chain", "inet", "sallyport", "prerouting"],
      );
    /**
     * Journeys that test the agent and the controller (their clocks, the API server's absence,
     * the ARP fence), not the packet filter: the suite's time is better spent once.
     */
    const agentOnly =
      datapath === "nftables" && "the agent's behaviour, the same on both filters: run on iptables";
    const saw = async (pod: string, f: Family, address?: string) =>
      (await probe(sb.pod(pod).netns, target(f, address))).saw;

    before(async () => {
      const prefix = uniquePrefix(datapath === "iptables" ? "e" : "f");
      sb = await Sandbox.up({
        prefix,
        nodes: 3,
        families: FAMILIES,
        dir: mkdtempSync(join(tmpdir(), `${TMP_PREFIX}sandbox-`)),
        agentArgs: ["--period-ms", "3000", "--periodic-max-share", "1", "--datapath", datapath],
      });
      for (const [name, node, labels] of [
        ["web-1", 1, { app: "web" }],
        ["web-2", 2, { app: "web" }],
        ["web-3", 3, { app: "web" }],
        ["other", 1, { app: "other" }],
        ["target", 3, { app: "target" }],
      ] as const) {
        await sb.addPod(name, { node, labels });
      }
      for (const f of FAMILIES) {
        await mustRun(nsRunner(sb.externalNs), [
          "ip",
          ...(f === 6 ? ["-6"] : []),
          "addr",
          "add",
          `${EXCLUDED[f]}/${f === 4 ? 24 : 64}`,
          "dev",
          "eth0",
          ...(f === 6 ? ["nodad"] : []),
        ]);
      }
      await startEcho(sb.pod("target").netns);
      await startEcho(sb.nodeNs(3));
      await sb.apply(gatewayYaml());
    });

    after(async () => {
      await stopAll();
      await sb?.destroy();
    });

    it("seed 003: without a policy the external server sees the pod's node", async () => {
      for (const f of FAMILIES) {
        assert.equal(await saw("web-1", f), nodeAddress(1, f), `IPv${f}`);
        assert.equal(await saw("web-2", f), nodeAddress(2, f), `IPv${f}`);
      }
    });

    it("seed 003: with the policy it sees the egress IP, IPv4 and IPv6, also from the gateway node's own pod", async () => {
      await sb.apply(
        policyYaml(
          "web",
          `  podSelector: {matchLabels: {app: web}}
  destinationCIDRs: ["192.168.77.192/26", "fd00:77::200/120"]
  excludedCIDRs: ["${EXCLUDED[4]}/32", "${EXCLUDED[6]}/128"]
  egressIP: ["${EIP[4]}", "${EIP[6]}"]
`,
        ),
      );
      const s = await ready("web");
      assert.equal(condition(s, "Ready")?.status, "True", condition(s, "Ready")?.message);
      assert.equal(
        s?.programmed,
        "3/3",
        "programmed on the gateway and on both nodes with selected pods",
      );
      for (const f of FAMILIES) {
        for (const pod of ["web-1", "web-2", "web-3"]) {
          const r = await probeUntil(sb.pod(pod).netns, target(f), (x) => x.saw === EIP[f], 10_000);
          assert.equal(r.saw, EIP[f], `${pod} over IPv${f}`);
        }
      }
    });

    it("a pod the policy does not select keeps its node's address", async () => {
      for (const f of FAMILIES) assert.equal(await saw("other", f), nodeAddress(1, f), `IPv${f}`);
    });

    it("sallyport explain agrees with the packets: which policy, which path, which address is seen", async () => {
      for (const f of FAMILIES) {
        const gw = (await status("web"))?.gatewayNode;
        const selected = await explain(sb.admin(), { pod: "web-1", destination: EXTERNAL[f] });
        assert.equal(selected.seenAs, await saw("web-1", f), `web-1, IPv${f}`);
        assert.equal(selected.policy?.key, "EgressPolicy/default/web");
        assert.deepEqual(
          selected.hops.map((h) => h.node),
          ["node-1", gw],
          "from the pod's node through the tunnel to the gateway node",
        );
        assert.deepEqual(selected.notProgrammedOn, []);
        const excluded = await explain(sb.admin(), { pod: "web-1", destination: EXCLUDED[f] });
        assert.equal(excluded.policy, undefined, `an excluded destination, IPv${f}`);
        assert.match(excluded.summary, /usual path/);
        const other = await explain(sb.admin(), { pod: "other", destination: EXTERNAL[f] });
        assert.match(other.summary, /no policy selects/, `a pod not selected, IPv${f}`);
      }
    });

    it("excluded CIDRs, pod-to-pod and pod-to-node traffic keep their usual path", async () => {
      const t = sb.pod("target");
      for (const f of FAMILIES) {
        assert.equal(await saw("web-1", f, EXCLUDED[f]), nodeAddress(1, f), `excluded, IPv${f}`);
        assert.equal(
          await saw("web-1", f, t.ips[f]),
          sb.pod("web-1").ips[f],
          `pod to pod, IPv${f}`,
        );
        assert.equal(
          await saw("web-1", f, nodeAddress(3, f)),
          nodeAddress(1, f),
          `pod to node, IPv${f} (the CNI's usual masquerade)`,
        );
      }
    });

    it("empty destinationCIDRs: the outside goes through the egress IP, the cluster keeps its path", async () => {
      await sb.apply(
        policyYaml(
          "everything",
          `  podSelector: {matchLabels: {app: other}}
  excludedCIDRs: ["${EXCLUDED[4]}/32", "${EXCLUDED[6]}/128"]
  egressIP: ["${EIP2[4]}", "${EIP2[6]}"]
`,
        ),
      );
      await ready("everything");
      const t = sb.pod("target");
      for (const f of FAMILIES) {
        const r = await probeUntil(
          sb.pod("other").netns,
          target(f),
          (x) => x.saw === EIP2[f],
          10_000,
        );
        assert.equal(r.saw, EIP2[f], `outside, IPv${f}`);
        assert.equal(
          await saw("other", f, t.ips[f]),
          sb.pod("other").ips[f],
          `pod to pod across nodes, IPv${f}`,
        );
        assert.equal(
          await saw("other", f, nodeAddress(3, f)),
          nodeAddress(1, f),
          `pod to node, IPv${f}`,
        );
        assert.equal(await saw("other", f, EXCLUDED[f]), nodeAddress(1, f), `excluded, IPv${f}`);
      }
    });

    it("two overlapping policies: the higher priority wins on every node; the other says it is shadowed", async () => {
      await sb.apply(
        policyYaml(
          "vip",
          `  podSelector: {matchLabels: {app: web}}
  destinationCIDRs: ["${EXTERNAL[4]}/32", "${EXTERNAL[6]}/128"]
  egressIP: ["${EIP2[4]}", "${EIP2[6]}"]
  priority: 100
`,
        ),
      );
      await ready("vip");
      const web = await eventually(
        () => status("web"),
        (s) => (s?.shadowedBy ?? []).length > 0,
      );
      assert.deepEqual(web?.shadowedBy, [{ policy: "EgressPolicy/default/vip", pods: 3 }]);
      assert.equal(condition(web, "Conflicted")?.status, "True");
      for (const f of FAMILIES) {
        for (const pod of ["web-1", "web-2", "web-3"]) {
          const r = await probeUntil(
            sb.pod(pod).netns,
            target(f),
            (x) => x.saw === EIP2[f],
            10_000,
          );
          assert.equal(r.saw, EIP2[f], `${pod} over IPv${f} follows the higher priority`);
        }
      }
      await sb.delete("EgressPolicy", "vip");
      for (const f of FAMILIES) {
        const r = await probeUntil(
          sb.pod("web-1").netns,
          target(f),
          (x) => x.saw === EIP[f],
          10_000,
        );
        assert.equal(r.saw, EIP[f], "back to the other policy once the winner is gone");
      }
    });

    it("a changed policy takes effect: new selector, new destination", async () => {
      await sb.apply(
        policyYaml(
          "web",
          `  podSelector: {matchLabels: {app: other}}
  destinationCIDRs: ["${EXCLUDED[4]}/32", "${EXCLUDED[6]}/128"]
  egressIP: ["${EIP[4]}", "${EIP[6]}"]
`,
        ),
      );
      for (const f of FAMILIES) {
        const r = await probeUntil(
          sb.pod("other").netns,
          target(f, EXCLUDED[f]),
          (x) => x.saw === EIP[f],
          15_000,
        );
        assert.equal(r.saw, EIP[f], `the new destination and the new pods, IPv${f}`);
        const w = await probeUntil(
          sb.pod("web-1").netns,
          target(f),
          (x) => x.saw === nodeAddress(1, f),
          15_000,
        );
        assert.equal(
          w.saw,
          nodeAddress(1, f),
          `pods no longer selected are back to their node, IPv${f}`,
        );
      }
    });

    it("a deleted policy leaves no trace on any node", async () => {
      const { policySetName } = await import("../../src/engine/names.ts");
      await sb.delete("EgressPolicy", "web");
      await sb.delete("EgressPolicy", "everything");
      for (const f of FAMILIES) {
        const r = await probeUntil(
          sb.pod("other").netns,
          target(f),
          (x) => x.saw === nodeAddress(1, f),
          15_000,
        );
        assert.equal(r.saw, nodeAddress(1, f), `IPv${f}`);
      }
      for (let i = 1; i <= 3; i++) {
        const node = nsRunner(sb.nodeNs(i));
        const state = await eventually(
          async () =>
            [
              await mustRun(node, ["ipset", "save"]),
              await mustRun(node, ["iptables-save"]),
              await mustRun(node, ["ip6tables-save"]),
              await mustRun(node, ["ip", "-o", "link"]),
              await mustRun(node, ["ip", "rule"]),
              await mustRun(node, ["nft", "list", "ruleset"]),
            ].join("\n"),
          (text) =>
            // (every set of both: the gateway's other node carries them too, and a sync destroys
            // a set after the rules that name it)
            ["EgressPolicy/default/web", "EgressPolicy/default/everything"].every((key) =>
              FAMILIES.every((f) => !text.includes(policySetName("src", f, key))),
            ) &&
            // (an egress-IP device in `ip -o link`; the fence's rules name `spe-*` on purpose)
            !/\d+: spe-/.test(text) &&
            !text.includes("EgressPolicy/default/") &&
            !/5900:.*fwmark 0x26/.test(text),
        );
        for (const key of ["EgressPolicy/default/web", "EgressPolicy/default/everything"]) {
          for (const f of FAMILIES) {
            assert.ok(
              !state.includes(policySetName("src", f, key)),
              `node-${i}: no ipset of ${key}`,
            );
          }
          assert.ok(!state.includes(key), `node-${i}: no rule of ${key}`);
        }
        assert.ok(!/\d+: spe-/.test(state), `node-${i}: no egress-IP device`);
      }
    });

    it("drift: a rule deleted by hand is repaired and traffic recovers, with no API change", async () => {
      await sb.apply(
        policyYaml(
          "drift",
          `  podSelector: {matchLabels: {app: web}}
  destinationCIDRs: ["192.168.77.192/26", "fd00:77::200/120"]
  egressIP: ["${EIP[4]}", "${EIP[6]}"]
`,
        ),
      );
      await ready("drift");
      assert.equal(
        (await probeUntil(sb.pod("web-1").netns, target(4), (x) => x.saw === EIP[4])).saw,
        EIP[4],
      );
      // Right after a full sync of node-1: the next one, which repairs the drift, is a period
      // (3 s) away, not possibly between the flush and the probe.
      const fullSyncs = async () =>
        Number(
          /sallyport_datapath_syncs_total\{kind="full",result="ok"\} (\d+)/.exec(
            await mustRun(nsRunner(sb.nodeNs(1)), ["curl", "-s", "http://127.0.0.1:9091/metrics"]),
          )?.[1] ?? 0,
        );
      const synced = await fullSyncs();
      await eventually(fullSyncs, (n) => n > synced, 10_000, 20);
      await flushSteering(1);
      assert.equal(await saw("web-1", 4), nodeAddress(1, 4), "the drift broke it");
      const r = await probeUntil(sb.pod("web-1").netns, target(4), (x) => x.saw === EIP[4], 15_000);
      assert.equal(r.saw, EIP[4], "repaired within a sync period");
      assert.match(sb.log("agent-1"), /repaired datapath drift/);
    });

    it("drift is repaired on its own clock while a selected pod is relabelled every second for 60 s", {
      skip: agentOnly,
    }, async () => {
      await ready("drift");
      let relabels = 0;
      const started = Date.now();
      const churn = (async () => {
        while (Date.now() - started < 60_000) {
          await sb
            .admin()
            .mergePatch(
              CORE.pods,
              "web-1",
              { metadata: { labels: { app: "web", churn: String(relabels) } } },
              { namespace: "default" },
            );
          relabels++;
          await new Promise((r) => setTimeout(r, 1000));
        }
      })();
      try {
        await new Promise((r) => setTimeout(r, 15_000));
        await flushSteering(1);
        const flushed = Date.now();
        assert.equal(await saw("web-1", 4), nodeAddress(1, 4), "the flush broke it");
        const r = await probeUntil(
          sb.pod("web-1").netns,
          target(4),
          (x) => x.saw === EIP[4],
          12_000,
        );
        const repairMs = Date.now() - flushed;
        assert.equal(r.saw, EIP[4], `repaired within one period plus one sync (${repairMs} ms)`);
        assert.ok(Date.now() - started < 60_000, "while the relabelling still went on");
      } finally {
        await churn;
      }
      assert.ok(relabels >= 50, `the pod was relabelled every second (${relabels} times)`);
      assert.equal(await saw("web-1", 4), EIP[4], "and traffic still leaves with the egress IP");
    });

    for (const role of ["gateway", "non-gateway"] as const) {
      it(`restarting the agent of a ${role} node (a rolling update) breaks no connection and changes nothing in its kernel`, async () => {
        const s = await ready("drift");
        const index = role === "gateway" ? Number(s!.gatewayNode!.split("-")[1]) : 1;
        const summary = stream(sb.pod("web-1").netns, target(4), 8);
        await new Promise((r) => setTimeout(r, 1000));
        await sb.stopAgent(index, "SIGTERM");
        await new Promise((r) => setTimeout(r, 500));
        sb.startAgent(index);
        const result = await summary;
        assert.equal(result.reset, false, "no reset");
        assert.equal(result.echoed, result.sent, "every line came back");
        assert.deepEqual(result.sources, [EIP[4]]);
        const metrics = await eventually(
          () =>
            mustRun(nsRunner(sb.nodeNs(index)), [
              "curl",
              "-s",
              "http://127.0.0.1:9091/metrics",
            ]).catch(() => ""),
          (m) => /sallyport_datapath_syncs_total\{kind="full",result="ok"\} [2-9]/.test(m),
          20_000,
        );
        // What the restarted agent changed, and what its liveness said, if anything: the cause
        // of a failure here (it has been seen once in ~4 full runs, not reproduced alone).
        const since = notes(
          `agent-${index}`,
          /datapath updated|holding|released|judged|fence|waiting/,
        );
        assert.equal(
          /sallyport_datapath_changes_total (\d+)/.exec(metrics)?.[1],
          "0",
          `the restarted agent found the kernel already right; its log: ${JSON.stringify(since)}`,
        );
      });
    }

    it("the API server is stopped for 30 s: traffic keeps flowing through the egress IP the whole time", {
      skip: agentOnly,
    }, async () => {
      const p = new FailoverProbe(sb.pod("web-1").netns, target(4), EIP[4], 100);
      await p.start();
      const from = Date.now();
      await sb.stopApiServer();
      await new Promise((r) => setTimeout(r, 30_000));
      await sb.startApiServer();
      await new Promise((r) => setTimeout(r, 2000));
      await p.stop();
      const during = p.lines.filter((l) => l.t > from);
      assert.ok(during.length >= 100, `probed all along (${during.length} requests)`);
      const other = during.filter((l) => l.saw !== EIP[4]);
      assert.deepEqual(
        other,
        [],
        `every request was answered, and from the egress IP (outage from ${from}); the gateway agents said: ${other.length === 0 ? "" : gatewayNotes()}`,
      );
      // and the control plane catches up with a change made after it came back
      await sb.apply(
        policyYaml(
          "after-outage",
          `  podSelector: {matchLabels: {app: other}}\n  destinationCIDRs: ["${EXTERNAL[4]}/32"]\n  egressIP: ["${EIP2[4]}"]\n`,
        ),
      );
      const r = await probeUntil(
        sb.pod("other").netns,
        target(4),
        (x) => x.saw === EIP2[4],
        30_000,
      );
      assert.equal(r.saw, EIP2[4]);
    });

    /**
     * The two partitions the rule decides (docs/operations.md "Partitions"), each with no moment
     * when two nodes answer ARP for the egress IP.
     */
    const partitions = {
      // Its uplink and its peers stay reachable: it keeps its egress IPs until its node lease
      // expires (40 s after its last renewal, 30-40 s after the cut), then releases them; the
      // controller moves them 10 s later (50 s after its lease watch reconnected, at the earliest:
      // the API server restarted a minute ago). The watch allows twice that.
      "from the API server alone stops answering ARP when its lease expires": {
        watchMs: 120_000,
        rules: [["OUTPUT", "-d", "192.168.77.2", "-p", "tcp", "--dport", "6443", "-j", "DROP"]],
      },
      // The API server stays reachable: a majority of the voters no longer hears it, so it
      // releases within the detection time and the other node takes over.
      "from its peers alone (liveness probes dropped) stops answering ARP within the detection time":
        {
          watchMs: 40_000,
          rules: [
            ["INPUT", "-p", "udp", "--dport", "7800", "-j", "DROP"],
            ["OUTPUT", "-p", "udp", "--dport", "7800", "-j", "DROP"],
          ],
        },
    };
    for (const [partition, { watchMs, rules }] of Object.entries(partitions))
      it(`split brain: a gateway cut off ${partition}, before another node starts`, {
        skip: agentOnly,
      }, async () => {
        const s = await ready("drift");
        const holder = Number(s!.gatewayNode!.split("-")[1]);
        const other = holder === 2 ? 3 : 2;
        const macOf = async (i: number) =>
          (await mustRun(nsRunner(sb.nodeNs(i)), ["cat", "/sys/class/net/eth0/address"])).trim();
        const macs: Record<string, string> = {
          [await macOf(holder)]: `node-${holder}`,
          [await macOf(other)]: `node-${other}`,
        };
        // One ARP request at a time from the external host; each answer is attributed by the
        // answering node's uplink MAC (the egress IP's own MAC is shared by design and says nothing).
        // The watch ends 5 s after the other node first answered, or after `watchMs` (a bound for
        // a busy machine, not the expected time).
        const answers: string[] = [];
        const at: number[] = [];
        let cutAt = Number.NaN;
        const stopAt = Date.now() + watchMs;
        const tookOver = () => {
          const i = answers.indexOf(`node-${other}`);
          return i >= 0 && Date.now() - at[i]! > 5000;
        };
        const arp = (async () => {
          while (Date.now() < stopAt && !tookOver()) {
            const r = await nsRunner(sb.externalNs).run([
              "arping",
              "-I",
              "eth0",
              "-c",
              "1",
              "-w",
              "1",
              EIP[4],
            ]);
            for (const m of r.stdout.matchAll(/\[([0-9A-F:]+)\]/gi)) {
              const who = macs[m[1]!.toLowerCase()];
              if (who === undefined) continue;
              answers.push(who);
              at.push(Date.now());
            }
          }
        })();
        await new Promise((r) => setTimeout(r, 1000));
        for (const rule of rules)
          await mustRun(nsRunner(sb.nodeNs(holder)), ["iptables", "-I", ...rule]);
        cutAt = Date.now();
        try {
          await arp;
        } finally {
          for (const rule of rules)
            await mustRun(nsRunner(sb.nodeNs(holder)), ["iptables", "-D", ...rule]);
        }
        const firstOther = answers.indexOf(`node-${other}`);
        assert.ok(
          answers.indexOf(`node-${holder}`) === 0,
          `the holder answered first: ${answers.join(" ")}`,
        );
        assert.ok(
          firstOther > 0,
          `then the other node took over within ${watchMs / 1000} s: ${[...new Set(answers)].join(" ")} (${answers.length} answers, node-${holder}'s last ${(at[answers.lastIndexOf(`node-${holder}`)]! - cutAt) / 1000} s after the cut at ${cutAt}); the gateway agents said: ${firstOther > 0 ? "" : gatewayNotes()}`,
        );
        assert.ok(
          !answers.slice(firstOther).includes(`node-${holder}`),
          `the cut-off node never answered once the other had started: ${answers.join(" ")}`,
        );
        console.log(
          `# ${partition}: node-${other} answered ${(at[firstOther]! - cutAt) / 1000} s after the cut`,
        );
        const s2 = await eventually(
          () => status("drift"),
          (x) => x?.gatewayNode === `node-${other}`,
        );
        assert.equal(s2?.gatewayNode, `node-${other}`);
        assert.match(sb.log(`agent-${holder}`), /released the egress IPs/);
      });

    it("a killed gateway node: traffic resumes from the same egress IP through the other gateway node", async () => {
      const s = await ready("drift");
      const holder = Number(s!.gatewayNode!.split("-")[1]);
      const p = new FailoverProbe(sb.pod("web-1").netns, target(4), EIP[4]);
      await p.start();
      const killedAt = Date.now();
      await sb.killNode(holder);
      const gap = await p.gapAfter(killedAt, 20_000);
      await p.stop();
      assert.notEqual(gap, undefined, "traffic came back through the egress IP");
      const moved = await eventually(
        () => status("drift"),
        (x) => x?.gatewayNode !== undefined && x.gatewayNode !== `node-${holder}`,
      );
      assert.notEqual(moved?.gatewayNode, `node-${holder}`);
      console.log(`# failover gap ${gap} ms`);
      await sb.reviveNode(holder);
    });
  });

export { EIP, nsRunner };
