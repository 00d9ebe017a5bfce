import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { RoutingPlan } from "./iproute.ts";
import {
  type ActualRouting,
  diffRouting,
  parseFdb,
  parseLinks,
  parseNeighbors,
  parseRoutes,
  parseRules,
  usedTables,
} from "./iproute.ts";

// Captured from iproute2 6.1.0 in a network namespace holding a planned gateway node.
const RULES = `[{"priority":0,"src":"all","table":"local"},{"priority":5900,"src":"all","fwmark":"0x26000200","fwmask":"0xffffff00","table":"3001"},{"priority":6000,"src":"all","fwmark":"0x1","table":"200"},{"priority":32766,"src":"all","table":"main"},{"priority":32767,"src":"all","table":"default"}]`;
const ROUTES = `[{"dst":"default","gateway":"100.127.0.3","dev":"sallyport","table":"3001","flags":["onlink"]},{"dst":"10.244.1.5","gateway":"100.127.0.3","dev":"sallyport","table":"3002","flags":["onlink"]},{"dst":"192.0.2.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"192.0.2.1","flags":[]},{"dst":"10.0.0.0/8","dev":"eth0","table":"3050","flags":[]}]`;
const LINKS = `[{"ifindex":4,"ifname":"sallyport","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1450,"address":"02:53:50:00:00:01","linkinfo":{"info_kind":"vxlan","info_data":{"id":7799,"local":"192.0.2.1","link":"eth0","port":7799,"learning":false,"gbp":true}},"addr_info":[{"family":"inet","local":"100.127.0.2","prefixlen":32},{"family":"inet6","local":"fe80::1","prefixlen":64}]},{"ifindex":5,"link":"eth0","ifname":"spe-abc","flags":["BROADCAST","MULTICAST","UP"],"mtu":1500,"address":"02:aa:bb:cc:dd:ee","linkinfo":{"info_kind":"macvlan","info_data":{"mode":"bridge"}},"addr_info":[{"family":"inet","local":"10.168.60.100","prefixlen":32}]}]`;
const NEIGH = `[{"dst":"100.127.0.3","lladdr":"02:53:50:00:00:02","state":["PERMANENT"]},{"dst":"fd5a:11::3","lladdr":"02:53:50:00:00:02","state":["PERMANENT"]},{"dst":"100.127.0.9","lladdr":"02:53:50:00:00:09","state":["STALE"]}]`;
const FDB = `[{"mac":"02:53:50:00:00:02","dst":"192.0.2.2","flags":["self"],"state":"permanent"},{"mac":"00:00:00:00:00:00","dst":"192.0.2.9","flags":["self"],"state":"permanent"}]`;

function actual(): ActualRouting {
  return {
    rules: parseRules(RULES, 4),
    routes: parseRoutes(ROUTES, 4),
    links: parseLinks(LINKS),
    neighbors: parseNeighbors(NEIGH, "sallyport"),
    fdb: parseFdb(FDB, "sallyport"),
  };
}

const desired: RoutingPlan = {
  ipRules: [{ family: 4, pref: 5900, fwmark: 0x26000200, mask: 0xffffff00, table: 3001 }],
  routes: [{ family: 4, table: 3001, dst: "default", via: "100.127.0.3", dev: "sallyport" }],
  tunnel: {
    name: "sallyport",
    vni: 7799,
    port: 7799,
    local: "192.0.2.1",
    parent: "eth0",
    gbp: true,
    mtu: 1450,
    mac: "02:53:50:00:00:01",
    addresses: ["100.127.0.2/32"],
  },
  neighbors: [
    { family: 4, dev: "sallyport", address: "100.127.0.3", mac: "02:53:50:00:00:02" },
    { family: 6, dev: "sallyport", address: "fd5a:11::3", mac: "02:53:50:00:00:02" },
  ],
  fdb: [{ dev: "sallyport", mac: "02:53:50:00:00:02", dst: "192.0.2.2" }],
  eips: [
    {
      device: "spe-abc",
      parent: "eth0",
      mac: "02:aa:bb:cc:dd:ee",
      address: "10.168.60.100",
      family: 4,
    },
  ],
};
const OPTS = { rulePref: 5900, tunnelDevice: "sallyport" };

describe("ip -json parsers", () => {
  it("read rules, routes (host routes get a prefix), links, permanent neighbours and FDB", () => {
    const a = actual();
    assert.deepEqual(
      a.rules
        .filter((r) => r.pref === 5900)
        .map((r) => ({
          family: r.family,
          pref: r.pref,
          fwmark: r.fwmark,
          mask: r.mask,
          table: r.table,
        })),
      [{ family: 4, pref: 5900, fwmark: 0x26000200, mask: 0xffffff00, table: 3001 }],
    );
    assert.equal(a.routes[1]!.dst, "10.244.1.5/32");
    assert.equal(a.routes[2]!.table, 254, "no table field means main");
    assert.deepEqual(a.links[0]!.vxlan, {
      vni: 7799,
      port: 7799,
      local: "192.0.2.1",
      learning: false,
      gbp: true,
    });
    assert.equal(
      parseLinks(LINKS.replace(',"gbp":true', ""))[0]!.vxlan?.gbp,
      false,
      "iproute2 prints gbp only when the device has it",
    );
    assert.deepEqual(
      a.links[0]!.addresses,
      ["100.127.0.2/32"],
      "link-local addresses are not ours to manage",
    );
    assert.equal(a.neighbors.length, 2, "only permanent entries");
    assert.equal(a.fdb.length, 1, "the all-zero default entry is not a peer");
  });

  it("counts every table not referenced by our rules as in use", () => {
    const used = [...usedTables(actual(), 5900)].sort((a, b) => a - b);
    assert.deepEqual(used, [0, 200, 253, 254, 255, 3002, 3050]);
  });
});

describe("diffRouting()", () => {
  it("changes nothing when the kernel already holds the plan, apart from our stale state", () => {
    const d = diffRouting(desired, actual(), OPTS);
    assert.equal(d.changes, 0);
    assert.deepEqual(d.ip4, []);
    assert.deepEqual(d.bridge, []);
    assert.deepEqual(
      d.remove4,
      [],
      "the route in table 3002 is not ours: no rule of ours points there",
    );
  });

  it("removes our stale rule and the routes of its table, never foreign ones", () => {
    const d = diffRouting({ ...desired, ipRules: [], routes: [] }, actual(), OPTS);
    assert.deepEqual(d.remove4, [
      "rule del pref 5900 fwmark 0x26000200/0xffffff00 table 3001",
      "route del default table 3001",
    ]);
  });

  it("recreates a tunnel whose VNI changed and brings it up", () => {
    const d = diffRouting({ ...desired, tunnel: { ...desired.tunnel!, vni: 42 } }, actual(), OPTS);
    assert.equal(d.tunnel[0], "link del sallyport");
    assert.match(
      d.tunnel[1]!,
      /^link add sallyport type vxlan id 42 dstport 7799 local 192\.0\.2\.1 dev eth0 nolearning gbp$/,
    );
    assert.deepEqual(d.tunnelUp, ["link set sallyport up"]);
    assert.ok(
      d.ip4.some((l) => l.startsWith("route replace default")),
      "routes through a new device are re-added",
    );
  });

  it("recreates a tunnel without gbp (made by an earlier version) with it, and one with it when the plan has none", () => {
    const before = parseLinks(LINKS.replace(',"gbp":true', ""));
    const d = diffRouting(desired, { ...actual(), links: before }, OPTS);
    assert.deepEqual(d.tunnel, [
      "link del sallyport",
      "link add sallyport type vxlan id 7799 dstport 7799 local 192.0.2.1 dev eth0 nolearning gbp",
      "link set sallyport address 02:53:50:00:00:01 mtu 1450",
      "addr replace 100.127.0.2/32 dev sallyport",
    ]);
    assert.deepEqual(d.newDevices, ["sallyport"]);
    assert.deepEqual(d.tunnelUp, ["link set sallyport up"]);
    assert.ok(
      d.ip4.some((l) => l.startsWith("neigh replace 100.127.0.3")) &&
        d.bridge.some((l) => l.startsWith("fdb replace 02:53:50:00:00:02")),
      "neighbours and FDB entries of the new device are written again",
    );
    const off = diffRouting(
      { ...desired, tunnel: { ...desired.tunnel!, gbp: false } },
      actual(),
      OPTS,
    );
    assert.deepEqual(off.tunnel.slice(0, 2), [
      "link del sallyport",
      "link add sallyport type vxlan id 7799 dstport 7799 local 192.0.2.1 dev eth0 nolearning",
    ]);
    assert.equal(diffRouting(desired, actual(), OPTS).changes, 0, "a device with gbp stays");
  });

  it("gives up an egress IP by deleting its device, and announces a new one by bringing it up", () => {
    const gone = diffRouting({ ...desired, eips: [] }, actual(), OPTS);
    assert.deepEqual(gone.releaseEips, ["link del spe-abc"]);
    const fresh = diffRouting(
      desired,
      { ...actual(), links: actual().links.filter((l) => l.name !== "spe-abc") },
      OPTS,
    );
    assert.deepEqual(fresh.newDevices, ["spe-abc"]);
    assert.deepEqual(fresh.eipsUp, ["link set spe-abc up"]);
  });

  it("leases egress-IP addresses from the kernel, reads the leases back and leaves them alone", () => {
    const leased = { ...OPTS, eipLeaseSeconds: 1 };
    const fresh = diffRouting(
      desired,
      { ...actual(), links: actual().links.filter((l) => l.name !== "spe-abc") },
      leased,
    );
    assert.ok(
      fresh.eips.includes("addr replace 10.168.60.100/32 dev spe-abc valid_lft 1 preferred_lft 1"),
    );
    // As `ip -json address show` prints an address with a lease: the seconds left.
    const withLease = parseLinks(
      LINKS.replace(
        '"local":"10.168.60.100","prefixlen":32}',
        '"local":"10.168.60.100","prefixlen":32,"dynamic":true,"valid_life_time":1,"preferred_life_time":1}',
      ),
    );
    assert.deepEqual(withLease[1]!.leases, { "10.168.60.100/32": 1 });
    const running = { ...actual(), links: withLease };
    const diff = diffRouting(desired, running, leased);
    assert.deepEqual([...diff.eips, ...diff.eipsUp, ...diff.releaseEips], [], "a lease running");
    // A permanent address becomes a lease (an agent of an earlier version), and back.
    assert.deepEqual(diffRouting(desired, actual(), leased).eips, [
      "addr replace 10.168.60.100/32 dev spe-abc valid_lft 1 preferred_lft 1",
    ]);
    assert.deepEqual(diffRouting(desired, running, OPTS).eips, [
      "addr replace 10.168.60.100/32 dev spe-abc valid_lft forever preferred_lft forever",
    ]);
  });

  it("makes an egress-IP device whose address is gone again, so that it is announced again", () => {
    const expired = parseLinks(
      LINKS.replace('{"family":"inet","local":"10.168.60.100","prefixlen":32}', ""),
    );
    assert.deepEqual(expired[1]!.addresses, []);
    const diff = diffRouting(desired, { ...actual(), links: expired }, OPTS);
    assert.deepEqual(diff.eips.slice(0, 2), [
      "link del spe-abc",
      "link add spe-abc link eth0 address 02:aa:bb:cc:dd:ee type macvlan mode bridge",
    ]);
    assert.deepEqual(diff.newDevices, ["spe-abc"]);
    assert.deepEqual(diff.eipsUp, ["link set spe-abc up"]);
  });
});
