/** Node identities, peers and ignore CIDRs. Address plan: see ./testing.ts. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { cidrToRange, tryParseCidr } from "../lib/ip.ts";
import { RangeSet } from "../lib/rangeset.ts";
import { clusterFamilies, ignoreCidrs, NodeIdentities, peerOf } from "./nodes.ts";
import { DEFAULT_CLUSTER_CONFIG, type NodeIdentity } from "./snapshot.ts";
import { node } from "./testing.ts";

const NONE = new Map<string, NodeIdentity>();
const names = (...list: string[]) => new Map(list.map((n) => [n, true]));

describe("NodeIdentities", () => {
  it("gives the lowest free ids in name order and keeps them while the node exists", () => {
    const ids = new NodeIdentities(DEFAULT_CLUSTER_CONFIG.tunnelCIDRs, [4, 6]);
    assert.deepEqual([...ids.update(names("b", "a", "c"), NONE)].sort(), ["a", "b", "c"]);
    assert.deepEqual(
      ["a", "b", "c"].map((n) => ids.get(n)?.nodeID),
      [0, 1, 2],
    );
    assert.deepEqual(ids.get("b"), {
      nodeID: 1,
      mac: "02:53:50:00:00:01",
      tunnel: { 4: "100.127.0.2", 6: "fd5a:11::2" },
    });
    const b = ids.get("b");
    assert.deepEqual([...ids.update(names("b", "c", "d"), NONE)].sort(), ["a", "d"]);
    assert.equal(ids.get("d")?.nodeID, 0, "a's id is free again");
    assert.equal(ids.get("b"), b, "an unchanged identity is the same object");
    assert.deepEqual([...ids.update(names("b", "c", "d"), NONE)], [], "nothing to do");
  });

  it("gives a node the id it had before when no other node holds it", () => {
    const ids = new NodeIdentities(DEFAULT_CLUSTER_CONFIG.tunnelCIDRs, [4]);
    const previous = new Map<string, NodeIdentity>([
      ["a", { nodeID: 7, mac: "", tunnel: {} }],
      ["b", { nodeID: 7, mac: "", tunnel: {} }],
    ]);
    ids.update(names("a", "b", "c"), previous);
    assert.equal(ids.get("a")?.nodeID, 7, "first by name keeps it");
    assert.equal(ids.get("b")?.nodeID, 0);
    assert.equal(ids.get("c")?.nodeID, 1);
  });

  it("says which node does not fit in the tunnel CIDR and how to fix it", () => {
    const ids = new NodeIdentities({ 4: "100.127.0.0/30" }, [4]);
    ids.update(names("a", "b", "c"), NONE);
    assert.equal(ids.error("a"), undefined);
    assert.match(
      ids.error("c") ?? "",
      /node id 2 does not fit in 100\.127\.0\.0\/30; use a larger/,
    );
    assert.equal(ids.get("c")?.tunnel[4], undefined);
  });
});

describe("peerOf() and clusterFamilies()", () => {
  it("tunnels to the agent's reported underlay, else the node's InternalIP", () => {
    const n = node("node-1", { ipv4: "192.168.0.11", podCIDRs: ["172.29.1.0/24"] });
    const id = { nodeID: 0, mac: "02:53:50:00:00:00", tunnel: { 4: "100.127.0.1" } };
    assert.equal(peerOf("node-1", id, n, undefined).underlay, "192.168.0.11");
    const report = { underlay: { ipv4: "10.0.0.11" }, interfaces: new Map() };
    assert.equal(peerOf("node-1", id, n, report).underlay, "10.0.0.11");
    assert.deepEqual(peerOf("node-1", id, n, report).podCIDRs, ["172.29.1.0/24"]);
  });

  it("takes the families some node has an address of, IPv4 when none", () => {
    assert.deepEqual(clusterFamilies([]), [4]);
    assert.deepEqual(clusterFamilies([node("a", { ipv6: "fd00::1" })]), [6]);
    assert.deepEqual(
      clusterFamilies([node("a", { ipv6: "fd00::1" }), node("b", { ipv4: "10.0.0.1" })]),
      [4, 6],
    );
  });
});

describe("ignoreCidrs()", () => {
  it("aggregates like a RangeSet built one CIDR at a time", () => {
    const octet = fc.integer({ min: 0, max: 255 });
    fc.assert(
      fc.property(
        fc.array(fc.tuple(octet, octet, fc.integer({ min: 20, max: 32 })), { maxLength: 30 }),
        (list) => {
          const cidrs = list.map(([a, b, p]) => `10.${a}.${b}.0/${p}`);
          const expected = new RangeSet();
          for (const c of [...cidrs, DEFAULT_CLUSTER_CONFIG.tunnelCIDRs[4]!]) {
            const parsed = tryParseCidr(c);
            if (parsed !== undefined) expected.add(cidrToRange(parsed));
          }
          assert.deepEqual(ignoreCidrs([], cidrs, DEFAULT_CLUSTER_CONFIG, [4]), expected.toCidrs());
        },
      ),
    );
  });
});
