/**
 * The node datapath on real kernels, in network namespaces (see src/sandbox/topology.ts for the
 * address plan): two nodes on one segment with an external server; node-2 is the gateway and
 * holds the egress IP 192.168.77.100 / fd00:77::100.
 *
 *   web-1 (node-1, selected)  web-2 (node-2 = gateway, selected)  other (node-1, not selected)
 *   target (node-2, a pod running a server, for pod-to-pod traffic)
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { DatapathSync } from "../../src/agent/datapath_sync.ts";
import { computeCluster } from "../../src/engine/cluster.ts";
import { planNode } from "../../src/engine/node_plan.ts";
import { nodeViewFromOutcome } from "../../src/engine/node_view.ts";
import { planToJSON } from "../../src/engine/plan.ts";
import type { Snapshot } from "../../src/engine/snapshot.ts";
import type { KernelState } from "../../src/kernel/datapath.ts";
import { localFactsFrom } from "../../src/kernel/facts.ts";
import { openDatapath } from "../../src/kernel/open.ts";
import { ExecRunner, mustRun } from "../../src/kernel/runner.ts";
import { realClock } from "../../src/lib/clock.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { datapathMetrics, Registry } from "../../src/lib/metrics.ts";
import { EXTERNAL, nodeAddress, nsRunner, podCIDR } from "../../src/sandbox/topology.ts";
import {
  DatapathLab,
  EIP4,
  EIP6,
  EXCLUDED4,
  EXCLUDED6,
  ext4,
  ext6,
  itSteersPodsTheGatewayHasNotHeardOf,
} from "../support/datapath_lab.ts";
import {
  hostState,
  NEEDS_ROOT,
  probe,
  probeUntil,
  REPO,
  startIn,
  stopAll,
  stream,
} from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

describe("node datapath in network namespaces", { skip: NEEDS_ROOT }, () => {
  const lab = new DatapathLab("iptables", "d");
  const { topo, datapaths, baseline, prefix } = lab;
  const planFor = (index: number, s?: Snapshot) => lab.planFor(index, s);
  const planWith = (index: number, state: KernelState, s?: Snapshot) =>
    lab.planWith(index, state, s);
  const syncNode = (index: number) => lab.syncNode(index);

  before(async () => {
    await lab.up();
    assert.equal(
      datapaths.get(1)!.options.iptables.backend,
      "nft",
      "kubelet's hint chains are in the nft backend",
    );
    for (const i of [2, 1]) assert.ok((await syncNode(i)) > 0);
  });

  after(async () => {
    await stopAll();
    await lab.down();
  });

  it("holds the plan exactly: a second sync changes nothing", async () => {
    for (const i of [1, 2]) assert.equal(await syncNode(i), 0, `node-${i}`);
  });

  it("keeps every rule, set, table and rule it does not own", async () => {
    const now = await hostState(topo.nodeNs(2));
    const before = baseline.get(2)!;
    const foreign = (text: string) =>
      text
        .split("\n")
        .filter((l) => !/SALLYPORT|sallyport|spe-/.test(l))
        .join("\n");
    assert.equal(foreign(now.iptables), foreign(before.iptables));
    assert.equal(foreign(now.ip6tables), foreign(before.ip6tables));
    assert.match(now.ipset, /add KUBE-TEST-SET 10\.96\.0\.1/);
    assert.match(now.rules4, /100:\s+from all fwmark 0x1 lookup 100/);
    assert.match(now.routes4, /10\.99\.0\.0\/16 dev eth0 table 100/);
    assert.match(
      now.iptables,
      /-A POSTROUTING -s 10\.244\.0\.0\/16 ! -d 10\.244\.0\.0\/16 .* -j MASQUERADE/,
    );
    assert.match(
      now.iptables,
      /-A POSTROUTING -m comment --comment "sallyport: no snat for steered traffic" -j SALLYPORT-NO-SNAT\n-A POSTROUTING -m comment --comment "sallyport: snat to egress IPs" -j SALLYPORT-SNAT-EIP\n-A POSTROUTING -s 10\.244/,
      "our hooks come first, the CNI's masquerade after them",
    );
  });

  it("IPv4: the external server sees the egress IP from a pod on a non-gateway node and on the gateway", async () => {
    const fromWeb1 = await probe(topo.pod("web-1").netns, ext4);
    assert.equal(fromWeb1.ok, true, fromWeb1.error);
    assert.equal(fromWeb1.saw, EIP4);
    assert.equal((await probe(topo.pod("web-2").netns, ext4)).saw, EIP4);
    assert.equal((await probe(topo.pod("web-1").netns, ext4, { udp: true })).saw, EIP4, "UDP too");
  });

  it("IPv6: the same, with the IPv6 egress IP", async () => {
    assert.equal((await probe(topo.pod("web-1").netns, ext6)).saw, EIP6);
    assert.equal((await probe(topo.pod("web-2").netns, ext6)).saw, EIP6);
  });

  itSteersPodsTheGatewayHasNotHeardOf(lab);

  it("a pod the policy does not select is seen with its node's address", async () => {
    assert.equal((await probe(topo.pod("other").netns, ext4)).saw, nodeAddress(1, 4));
    assert.equal((await probe(topo.pod("other").netns, ext6)).saw, nodeAddress(1, 6));
  });

  it("an excluded destination and pod-to-pod traffic keep their usual path", async () => {
    assert.equal(
      (await probe(topo.pod("web-1").netns, `${EXCLUDED4}:8080`)).saw,
      nodeAddress(1, 4),
    );
    assert.equal(
      (await probe(topo.pod("web-1").netns, `[${EXCLUDED6}]:8080`)).saw,
      nodeAddress(1, 6),
    );
    const t = topo.pod("target");
    assert.equal(
      (await probe(topo.pod("web-1").netns, `${t.ips[4]}:8080`)).saw,
      topo.pod("web-1").ips[4],
    );
    assert.equal(
      (await probe(topo.pod("web-1").netns, `[${t.ips[6]}]:8080`)).saw,
      topo.pod("web-1").ips[6],
    );
  });

  it("the seed's reset-mark match never matches, so the egress IP is lost; our prefix match is why it works", async () => {
    const n1 = nsRunner(topo.nodeNs(1));
    const save = await mustRun(n1, ["iptables-save", "-t", "mangle"]);
    const mark = /-A SALLYPORT-G-[\w-]+ -j MARK --set-xmark (0x[0-9a-f]+)\/0xffffff00/.exec(
      save,
    )?.[1];
    assert.ok(mark, "node-1 steers toward the gateway with its NODE_MARK");
    // Seed 000's rule: `-m mark --mark $NODE_MARK/0x26000000`. The kernel compares
    // (mark & 0x26000000) == NODE_MARK, false for any node id bit.
    const seed = [
      "-m",
      "mark",
      "--mark",
      `${mark}/0x26000000`,
      "-j",
      "MARK",
      "--set-xmark",
      "0x12000000/0xffffff00",
    ];
    await mustRun(n1, ["iptables", "-t", "mangle", "-R", "SALLYPORT-RESET-MARK", "2", ...seed]);
    try {
      const r = await probe(topo.pod("web-1").netns, ext4, { timeoutMs: 800 });
      assert.notEqual(r.saw, EIP4, "with the seed's rule the server never sees the egress IP");
      const counters = await mustRun(n1, [
        "iptables",
        "-t",
        "mangle",
        "-S",
        "SALLYPORT-RESET-MARK",
        "-v",
      ]);
      assert.match(
        counters,
        new RegExp(`--mark ${mark}/0x26000000 -c 0 0 -j MARK`),
        "and it matched no packet",
      );
    } finally {
      assert.ok((await syncNode(1)) > 0, "the sync puts our rule back");
    }
    assert.equal((await probe(topo.pod("web-1").netns, ext4)).saw, EIP4);
  });

  it("replies come back through the tunnel, so egress does not depend on the underlay routing pod CIDRs", async () => {
    const n2 = nsRunner(topo.nodeNs(2));
    const podRoute = [podCIDR(1, 4), "via", nodeAddress(1, 4), "dev", "eth0"];
    // As on a cloud network that routes node addresses only: the gateway has no route to node-1's
    // pods, just a default route (here toward the external host, which does not forward).
    const defaultRoute = ["default", "via", EXTERNAL[4], "dev", "eth0"];
    await mustRun(n2, ["ip", "route", "del", ...podRoute]);
    await mustRun(n2, ["ip", "route", "add", ...defaultRoute]);
    try {
      assert.equal(
        (await probe(topo.pod("web-1").netns, ext4)).saw,
        EIP4,
        "through the tunnel both ways",
      );
      await mustRun(n2, ["ip", "rule", "del", "pref", "5900", "fwmark", "0x27000000/0xff000000"]);
      const r = await probe(topo.pod("web-1").netns, ext4, { timeoutMs: 800 });
      assert.equal(r.ok, false, "without our reply rule the answer cannot find its way back");
    } finally {
      await mustRun(n2, ["ip", "route", "del", ...defaultRoute]);
      await mustRun(n2, ["ip", "route", "replace", ...podRoute]);
      await syncNode(2);
    }
    assert.equal((await probe(topo.pod("web-1").netns, ext4)).saw, EIP4);
  });

  it("an egress IP that appears on a node is announced at once: neighbours update without any traffic", async () => {
    const n2 = nsRunner(topo.nodeNs(2));
    const ext = nsRunner(topo.externalNs);
    const links = JSON.parse(
      await mustRun(n2, ["ip", "-j", "link", "show", "type", "macvlan"]),
    ) as {
      ifname: string;
      address: string;
    }[];
    const device = links.find((l) => l.ifname.startsWith("spe-"));
    assert.ok(device, "node-2 holds the egress IP on its own device");
    await mustRun(n2, ["ip", "link", "del", device.ifname]);
    // The external host believes the egress IP is somewhere else.
    await mustRun(ext, [
      "ip",
      "neigh",
      "replace",
      EIP4,
      "lladdr",
      "02:00:00:00:00:99",
      "dev",
      "eth0",
      "nud",
      "stale",
    ]);
    assert.ok((await syncNode(2)) > 0, "the device comes back");
    let seen = "";
    for (let i = 0; i < 40 && !seen.includes(device.address); i++) {
      seen = await mustRun(ext, ["ip", "neigh", "show", EIP4, "dev", "eth0"]);
      if (!seen.includes(device.address)) await new Promise((r) => setTimeout(r, 50));
    }
    assert.match(
      seen,
      new RegExp(device.address),
      "the gratuitous ARP corrected the external host's cache",
    );
  });

  it("the egress IP answers neighbour discovery: a router's unicast probe keeps it reachable", async () => {
    assert.equal(await lab.probeEgressNeighbour(), "REACHABLE");
  });

  it("the egress IP exposes no service of the gateway node", async () => {
    startIn(topo.nodeNs(2), [
      process.execPath,
      join(REPO, "src", "sandbox", "echo.ts"),
      "serve",
      "--port",
      "9090",
    ]);
    await new Promise((r) => setTimeout(r, 500));
    const viaNode = await probe(topo.externalNs, `${nodeAddress(2, 4)}:9090`);
    assert.equal(viaNode.ok, true, "the node's own address still serves");
    const viaEip = await probe(topo.externalNs, `${EIP4}:9090`, { timeoutMs: 800 });
    assert.equal(viaEip.ok, false, "a new connection to the egress IP is dropped");
  });

  const drifts: [string, number, string[]][] = [
    ["a deleted rule of ours", 1, ["iptables", "-t", "mangle", "-D", "SALLYPORT-RESET-MARK", "2"]],
    ["a deleted hook", 1, ["iptables", "-t", "nat", "-D", "POSTROUTING", "1"]],
    ["a flushed set of ours", 1, ["ipset", "flush", "sallyport-ignore4"]],
    ["a deleted ip rule", 1, ["ip", "rule", "del", "pref", "5900"]],
    ["a deleted route", 1, ["ip", "route", "flush", "table", "all", "dev", "sallyport"]],
    ["a deleted tunnel device", 1, ["ip", "link", "del", "sallyport"]],
    ["a deleted egress-IP device", 2, ["ip", "link", "del", "dev", "spe-$EIP4"]],
  ];
  for (const [what, index, argv] of drifts) {
    it(`repairs ${what} and traffic flows again`, async () => {
      const eipDevice = (
        await mustRun(nsRunner(topo.nodeNs(2)), ["ip", "-o", "link", "show", "type", "macvlan"])
      )
        .split("\n")
        .map((l) => l.split(":")[1]?.trim().split("@")[0])
        .find((n) => n?.startsWith("spe-"));
      await mustRun(
        nsRunner(topo.nodeNs(index)),
        argv.map((a) => (a === "spe-$EIP4" ? eipDevice! : a)),
      );
      assert.ok((await syncNode(index)) > 0, "the sync found and repaired the drift");
      assert.equal(await syncNode(index), 0, "and then holds the plan again");
      assert.equal((await probe(topo.pod("web-1").netns, ext4)).saw, EIP4);
    });
  }

  it("reads the sets' headers between member listings (as the agent does): it holds the plan, a removed member is seen by the number of entries, a replaced one waits for the listing", async () => {
    const r = nsRunner(topo.nodeNs(1));
    const { advance, fullSync } = await lab.listingOnceAMinute(1);
    assert.equal(await fullSync(), 0, "adopted: the first read lists every member");
    assert.equal(await fullSync(), 0, "the headers agree");
    const save = await mustRun(r, ["ipset", "save", "sallyport-ignore4"]);
    const member = /^add sallyport-ignore4 (\S+)/m.exec(save)?.[1] ?? "";
    await mustRun(r, ["ipset", "del", "sallyport-ignore4", member]);
    assert.ok((await fullSync()) > 0, "one entry fewer: listed and repaired");
    await mustRun(r, ["ipset", "restore", "-exist"], {
      stdin: `del sallyport-ignore4 ${member}\nadd sallyport-ignore4 192.0.2.0/24\n`,
    });
    assert.equal(await fullSync(), 0, "as many entries: not seen yet");
    advance(60_000);
    assert.ok((await fullSync()) > 0, "the listing found it");
    assert.doesNotMatch(await mustRun(r, ["ipset", "save", "sallyport-ignore4"]), /192\.0\.2\.0/);
    assert.equal(await syncNode(1), 0, "the lab's datapath sees the same sets");
  });

  it("makes a tunnel device without gbp (an agent of an earlier version) again with it, and traffic flows again", async () => {
    const n1 = nsRunner(topo.nodeNs(1));
    const plan = await planFor(1);
    const gbp = async () =>
      JSON.parse(await mustRun(n1, ["ip", "-d", "-j", "link", "show", plan.tunnel!.name]))[0]
        .linkinfo.info_data.gbp === true;
    assert.equal(await gbp(), true, "the planned device has gbp");
    await datapaths.get(1)!.sync({ ...plan, tunnel: { ...plan.tunnel!, gbp: false } });
    assert.equal(await gbp(), false, "as an earlier version made it");
    assert.ok((await syncNode(1)) > 0);
    assert.equal(await gbp(), true, "made again with gbp");
    assert.equal(await syncNode(1), 0, "and then holds the plan again");
    assert.equal((await probe(topo.pod("web-1").netns, ext4)).saw, EIP4);
  });

  it("a new agent process adopts the state without changing it, and an established TCP connection survives", async () => {
    const summary = stream(topo.pod("web-1").netns, ext4, 3);
    await new Promise((r) => setTimeout(r, 800));
    for (const i of [2, 1]) {
      const file = join(tmpdir(), `${TMP_PREFIX}${process.pid}-plan-${i}.json`);
      writeFileSync(file, planToJSON(await planFor(i)));
      try {
        const out = await mustRun(nsRunner(topo.nodeNs(i)), [
          process.execPath,
          join(REPO, "src", "cli", "main.ts"),
          "datapath",
          "apply",
          "--plan",
          file,
        ]);
        assert.equal(JSON.parse(out).changes, 0, `node-${i}: the new process changed nothing`);
      } finally {
        await mustRun(nsRunner(topo.nodeNs(i)), ["rm", "-f", file]);
      }
    }
    const result = await summary;
    assert.equal(result.reset, false);
    assert.equal(result.echoed, result.sent, "every line came back");
    assert.deepEqual(result.sources, [EIP4]);
  });

  it("the sync loop repairs drift by itself within one period, and counts it", async () => {
    const registry = new Registry();
    const metrics = datapathMetrics(registry);
    const initial = await datapaths.get(1)!.read();
    const loop = new DatapathSync({
      datapath: datapaths.get(1)!,
      // Host facts do not change here: event-driven syncs can plan with the state read up front.
      plan: (state) => planWith(1, state ?? initial),
      clock: realClock,
      log: silentLogger,
      metrics,
      periodMs: 1000,
    });
    loop.start();
    try {
      await loop.idle();
      await mustRun(nsRunner(topo.nodeNs(1)), [
        "iptables",
        "-t",
        "mangle",
        "-F",
        "SALLYPORT-MARK-REQUEST",
      ]);
      const started = Date.now();
      const r = await probeUntil(topo.pod("web-1").netns, ext4, (x) => x.saw === EIP4, 10_000);
      assert.equal(r.saw, EIP4, "traffic leaves through the egress IP again");
      await loop.idle();
      assert.ok(loop.repairs > 0, "the repair is counted");
      const counted = (
        await registry.getSingleMetric("sallyport_datapath_drift_repairs_total")!.get()
      ).values[0]!.value;
      assert.equal(counted, loop.repairs, "and exported as a metric");
      assert.ok(Date.now() - started < 10_000);
    } finally {
      loop.stop();
    }
  });

  it("TABLE_NUM avoids tables in use on the host, and says so clearly when none is free", async () => {
    const ns = `${prefix}-tbl`;
    await mustRun(new ExecRunner(), ["ip", "netns", "add", ns]);
    try {
      const r = nsRunner(ns);
      await mustRun(r, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
      await mustRun(r, ["ip", "addr", "add", `${nodeAddress(1, 4)}/24`, "dev", "eth0"]);
      await mustRun(r, ["ip", "link", "set", "eth0", "up"]);
      const busy = Array.from(
        { length: 100 },
        (_, i) => `route add 10.250.${i}.0/24 dev eth0 table ${3000 + i}`,
      );
      await mustRun(r, ["ip", "-batch", "-"], { stdin: `${busy.join("\n")}\n` });
      const d = await openDatapath({ runner: r, families: [4] });
      const outcome = computeCluster(lab.snap);
      const planWith = async () =>
        planNode(
          nodeViewFromOutcome(outcome, "node-1", {
            local: localFactsFrom(await d.read(), {
              nodeAddresses: { 4: nodeAddress(1, 4) },
              peers: outcome.peers,
              rulePref: 5900,
              random: () => 0.3,
            }),
            config: { families: [4] },
          }),
        );
      const plan = await planWith();
      assert.deepEqual([...plan.tables.values()], [3100], "the only free table of [3000, 3100]");
      await d.sync(plan);
      assert.match(
        await mustRun(r, ["ip", "rule"]),
        /5900:\s+from all fwmark 0x26000100\/0xffffff00 lookup 3100/,
      );
      await mustRun(r, ["ip", "-batch", "-"], {
        stdin: "rule del pref 5900\nroute add 10.251.0.0/24 dev eth0 table 3100\n",
      });
      const full = await planWith();
      assert.match(full.errors.join(), /every table in \[3000, 3100\] is in use on this host/);
    } finally {
      await new ExecRunner().run(["ip", "netns", "del", ns]);
    }
  });

  it("cleanup removes everything it created and nothing else", async () => {
    for (const i of [1, 2]) {
      await mustRun(nsRunner(topo.nodeNs(i)), [
        process.execPath,
        join(REPO, "src", "cli", "main.ts"),
        "cleanup",
      ]);
      assert.deepEqual(
        await hostState(topo.nodeNs(i)),
        baseline.get(i),
        `node-${i} is as before the agent ran`,
      );
    }
    assert.equal(
      (await probe(topo.pod("web-1").netns, ext4)).saw,
      nodeAddress(1, 4),
      "traffic is back on its usual path",
    );
  });
});
