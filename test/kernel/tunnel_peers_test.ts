/**
 * Issue 12, item 6 (the tunnel): a gateway accepts tunnel packets only from its peer nodes'
 * underlay addresses, on both packet filters.
 *
 * The lab of test/support/datapath_lab.ts (node-2 is the gateway of the policy "web", which
 * selects web-1 on node-1), plus a rogue host on the nodes' segment that is no node
 * (192.168.77.66): it makes a VXLAN device with the tunnel's VNI and port, addressed to node-2's
 * tunnel MAC, and sends UDP to the external server from web-1's address through it. Before the
 * fix node-2 decapsulated that, took it for web-1's traffic and SNATed it to the egress IP.
 *
 * The external server logs every UDP datagram with its source (port 9099).
 */
import assert from "node:assert/strict";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { computeCluster } from "../../src/engine/cluster.ts";
import type { PacketFilter } from "../../src/kernel/open.ts";
import { mustRun } from "../../src/kernel/runner.ts";
import { EXTERNAL, nodeAddress, nsRunner } from "../../src/sandbox/topology.ts";
import { DatapathLab, EIP4 } from "../support/datapath_lab.ts";
import { ECHO, NEEDS_ROOT, startIn, stopAll, waitForLine } from "../support/lab.ts";
import { TMP_PREFIX } from "../support/leaks.ts";

const ROGUE = "192.168.77.66";
const PORT = 9099;

for (const filter of ["iptables", "nftables"] as const satisfies readonly PacketFilter[])
  describe(`the tunnel accepts only peer nodes (${filter})`, { skip: NEEDS_ROOT }, () => {
    const lab = new DatapathLab(filter, filter === "iptables" ? "tp" : "tq");
    const { topo } = lab;
    const rogueNs = `${lab.prefix}-rogue`;
    const log = join(tmpdir(), `${TMP_PREFIX}${lab.prefix}-udp.log`);
    let web1: string;

    /** Sources the external server saw on PORT for datagrams carrying `tag`. */
    const seen = (tag: string): string[] => {
      let text = "";
      try {
        text = readFileSync(log, "utf8");
      } catch {
        return [];
      }
      return text
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l) as { proto: string; src: string; data?: string })
        .filter((e) => e.proto === "udp" && e.data === tag)
        .map((e) => e.src);
    };
    /** Sends `count` datagrams carrying `tag` to the external server from `netns`. */
    const send = async (netns: string, tag: string, count = 5) => {
      const script = `const s = require("node:dgram").createSocket("udp4");
let n = 0;
const next = () => n++ < ${count} ? s.send(${JSON.stringify(tag)}, ${PORT}, ${JSON.stringify(EXTERNAL[4])}, () => setTimeout(next, 20)) : s.close();
next();`;
      await mustRun(nsRunner(netns), [process.execPath, "-e", script]);
      await new Promise((r) => setTimeout(r, 300));
    };
    /** Packets node-2's drop rule for tunnel packets from strangers has counted. */
    const dropped = async (): Promise<number> => {
      const n2 = nsRunner(topo.nodeNs(2));
      if (filter === "iptables") {
        const out = await mustRun(n2, [
          "iptables",
          "-t",
          "filter",
          "-L",
          "SALLYPORT-TUNNEL-IN",
          "-v",
          "-x",
          "-n",
        ]);
        const line = out.split("\n").find((l) => /\bDROP\b/.test(l) && /dports 7799/.test(l));
        assert.ok(line !== undefined, `the drop rule is there:\n${out}`);
        return Number(line.trim().split(/\s+/)[0]);
      }
      const out = await mustRun(n2, ["nft", "list", "chain", "inet", "sallyport", "input"]);
      const m = /ip saddr != @peers4 counter packets (\d+)/.exec(out);
      assert.ok(m !== null, `the drop rule is there:\n${out}`);
      return Number(m[1]);
    };
    const removeOurRule = () =>
      mustRun(
        nsRunner(topo.nodeNs(2)),
        filter === "iptables"
          ? ["iptables", "-t", "filter", "-F", "SALLYPORT-TUNNEL-IN"]
          : ["nft", "flush", "chain", "inet", "sallyport", "input"],
      );

    before(async () => {
      await lab.up();
      for (const i of [2, 1]) assert.ok((await lab.syncNode(i)) > 0);
      web1 = lab.snap.pods.find((p) => p.name === "web-1")!.ips.find((a) => !a.includes(":"))!;
      writeFileSync(log, "");
      const server = startIn(topo.externalNs, [
        process.execPath,
        ECHO,
        "serve",
        "--port",
        String(PORT),
        "--log",
        log,
      ]);
      await waitForLine(server, (l) => l.includes('"listening"'));
      // The rogue host: on the segment, not a node. Its VXLAN device speaks the tunnel's VNI and
      // port and addresses node-2's tunnel MAC; web-1's address is its own.
      const tunnel = (await lab.planFor(2)).tunnel!;
      await topo.addHost(rogueNs, "vrogue", { 4: ROGUE });
      const rogue = nsRunner(rogueNs);
      await mustRun(rogue, ["ip", "-batch", "-"], {
        stdin: [
          `link add vx0 type vxlan id ${tunnel.vni} dstport ${tunnel.port} local ${ROGUE} dev eth0 nolearning`,
          "link set vx0 address 02:53:50:ff:ff:ff up",
          `addr add ${web1}/32 dev vx0`,
          `neigh add 100.127.255.254 lladdr ${tunnel.mac} dev vx0 nud permanent`,
          `route add ${EXTERNAL[4]}/32 via 100.127.255.254 dev vx0 onlink src ${web1}`,
          "",
        ].join("\n"),
      });
      await mustRun(rogue, [
        "bridge",
        "fdb",
        "append",
        tunnel.mac,
        "dev",
        "vx0",
        "dst",
        nodeAddress(2, 4),
        "self",
        "permanent",
      ]);
    });

    after(async () => {
      await stopAll();
      await lab.down();
      rmSync(log, { force: true });
    });

    it("a peer node's tunnel traffic leaves with the egress IP", async () => {
      const pod = topo.pods().find((p) => p.name === "web-1")!;
      await send(pod.netns, "from-web-1");
      assert.ok(seen("from-web-1").length > 0, "the external server got web-1's datagrams");
      assert.deepEqual([...new Set(seen("from-web-1"))], [EIP4]);
    });

    it("without our rule (as before), a rogue host on the underlay speaks as the egress IP", async () => {
      await removeOurRule();
      try {
        await send(rogueNs, "rogue-unguarded");
        assert.deepEqual(
          [...new Set(seen("rogue-unguarded"))],
          [EIP4],
          "the attack this rule stops works without it",
        );
      } finally {
        assert.ok((await lab.syncNode(2)) > 0, "the next sync puts the rule back");
      }
    });

    it("a rogue host's tunnel packets are dropped and counted, and never leave with the egress IP", async () => {
      const before = await dropped();
      await send(rogueNs, "rogue", 5);
      assert.deepEqual(seen("rogue"), [], "nothing reached the external server");
      assert.ok((await dropped()) >= before + 5, "each was counted");
    });

    it("after a node leaves the cluster, its tunnel packets are refused too", async () => {
      // node-2's plan without node-1 (its pods gone with it); node-1 still steers into the tunnel.
      // node-2 keeps its identity, as the controller keeps it (read back from its EgressNode).
      const self = computeCluster(lab.snap).peers.get("node-2")!;
      const without = {
        ...lab.snap,
        nodes: lab.snap.nodes.filter((n) => n.name !== "node-1"),
        pods: lab.snap.pods.filter((p) => p.nodeName !== "node-1"),
        previousNodes: new Map([
          ["node-2", { nodeID: self.nodeID, mac: self.mac, tunnel: self.tunnel }],
        ]),
      };
      const dp = lab.datapaths.get(2)!;
      await dp.sync(lab.planWith(2, await dp.read(), without));
      const before = await dropped();
      const pod = topo.pods().find((p) => p.name === "web-1")!;
      await send(pod.netns, "from-removed-node", 5);
      assert.deepEqual(seen("from-removed-node"), [], "nothing reached the external server");
      assert.ok((await dropped()) >= before + 5, "each was counted");
      // And back: the peer is accepted again once it is in the cluster again.
      assert.ok((await lab.syncNode(2)) > 0);
      await send(pod.netns, "from-web-1-again");
      assert.deepEqual([...new Set(seen("from-web-1-again"))], [EIP4]);
    });
  });
