/**
 * A simulated cluster network in network namespaces: nothing is configured in the root
 * namespace, and every namespace is named `<prefix>-…`.
 *
 *   <prefix>-br    an L2 segment (bridge "br0") joining the nodes and the external host
 *   <prefix>-nI    node I: eth0 on the segment, a CNI-like pod bridge "cni0", host-gw routes to
 *                  the other nodes' pod CIDRs, and the CNI's masquerade for pod traffic leaving
 *                  the cluster (so without a policy the outside sees the node's address)
 *   <prefix>-ext   the external host, on the same segment as the nodes and the egress IPs
 *   <prefix>-p…    pods, each a namespace with eth0 on its node's cni0
 *
 * Address plan (IPv4 / IPv6):
 *   segment        192.168.77.0/24          fd00:77::/64       node I = .10+I / ::a+I
 *   external host  192.168.77.200           fd00:77::200
 *   egress IPs     192.168.77.100-120       fd00:77::100-120   (same segment: ARP/NDP works)
 *   pods of node I 10.244.I.0/24            fd00:244:0:I::/64  (gateway .1 / ::1)
 */

import { ExecRunner, mustRun, type Runner } from "../kernel/runner.ts";
import type { Family } from "../lib/ip.ts";

export const SEGMENT = {
  4: { prefix: "192.168.77", len: 24 },
  6: { prefix: "fd00:77:", len: 64 },
} as const;
export const EXTERNAL = { 4: "192.168.77.200", 6: "fd00:77::200" } as const;
export const POD_SUPERNET = { 4: "10.244.0.0/16", 6: "fd00:244::/56" } as const;
export const EIP_POOL = ["192.168.77.100-192.168.77.120", "fd00:77::100-fd00:77::120"];

export function nodeAddress(index: number, family: Family): string {
  return family === 4 ? `192.168.77.${10 + index}` : `fd00:77::${(10 + index).toString(16)}`;
}

export function podCIDR(index: number, family: Family): string {
  return family === 4 ? `10.244.${index}.0/24` : `fd00:244:0:${index.toString(16)}::/64`;
}

export function podAddress(nodeIndex: number, podIndex: number, family: Family): string {
  return family === 4
    ? `10.244.${nodeIndex}.${podIndex + 2}`
    : `fd00:244:0:${nodeIndex.toString(16)}::${(podIndex + 2).toString(16)}`;
}

export interface TopologyOptions {
  readonly prefix: string;
  readonly nodes: number;
  readonly families: readonly Family[];
}

export interface PodHandle {
  readonly name: string;
  readonly netns: string;
  readonly node: number;
  readonly ips: Readonly<Partial<Record<Family, string>>>;
}

/** Runs a command inside a namespace of the topology. */
export function nsRunner(netns: string): Runner {
  return new ExecRunner(["ip", "netns", "exec", netns]);
}

export class Topology {
  readonly prefix: string;
  readonly families: readonly Family[];
  readonly nodeCount: number;
  readonly #root = new ExecRunner();
  readonly #pods = new Map<string, PodHandle>();
  #podSeq = new Map<number, number>();

  constructor(options: TopologyOptions) {
    this.prefix = options.prefix;
    this.families = options.families;
    this.nodeCount = options.nodes;
  }

  get bridgeNs(): string {
    return `${this.prefix}-br`;
  }
  get externalNs(): string {
    return `${this.prefix}-ext`;
  }
  nodeNs(index: number): string {
    return `${this.prefix}-n${index}`;
  }
  nodeName(index: number): string {
    return `node-${index}`;
  }
  pods(): PodHandle[] {
    return [...this.#pods.values()];
  }
  pod(name: string): PodHandle {
    const p = this.#pods.get(name);
    if (p === undefined) throw new Error(`Cannot find pod ${name} in the sandbox`);
    return p;
  }

  #ip(args: string[]): Promise<string> {
    return mustRun(this.#root, ["ip", ...args]);
  }

  async #netns(name: string): Promise<void> {
    await this.#ip(["netns", "add", name]);
    await this.#ip(["-n", name, "link", "set", "lo", "up"]);
    // Simulated links have no duplicate addresses: skip DAD so IPv6 addresses work at once.
    if (this.families.includes(6)) {
      await mustRun(nsRunner(name), [
        "sysctl",
        "-q",
        "-w",
        "net/ipv6/conf/all/accept_dad=0",
        "net/ipv6/conf/default/accept_dad=0",
      ]);
    }
  }

  /** Builds the segment, the nodes and the external host. */
  async up(): Promise<void> {
    await this.#netns(this.bridgeNs);
    await this.#ip(["-n", this.bridgeNs, "link", "add", "br0", "type", "bridge"]);
    await this.#ip(["-n", this.bridgeNs, "link", "set", "br0", "up"]);
    for (let i = 1; i <= this.nodeCount; i++) await this.#addNode(i);
    await this.addHost(this.externalNs, "vext", EXTERNAL);
    for (let i = 1; i <= this.nodeCount; i++) await this.#nodeRoutes(i);
  }

  /** A host on the underlay segment: its namespace, its eth0 on the bridge, its addresses. */
  async addHost(
    netns: string,
    port: string,
    addresses: Partial<Record<Family, string>>,
  ): Promise<void> {
    await this.#plug(netns, port, { netns: this.bridgeNs, bridge: "br0" }, (f) => {
      const a = addresses[f];
      return a === undefined ? undefined : `${a}/${SEGMENT[f].len}`;
    });
  }

  /**
   * A new namespace whose eth0 is a veth pair with `port` on `into.bridge` in `into.netns`,
   * with the addresses `address(family)` gives (CIDR form), up.
   */
  async #plug(
    netns: string,
    port: string,
    into: { netns: string; bridge: string },
    address: (f: Family) => string | undefined,
  ): Promise<void> {
    await this.#netns(netns);
    await this.#ip([
      "-n",
      netns,
      "link",
      "add",
      "eth0",
      "type",
      "veth",
      "peer",
      "name",
      port,
      "netns",
      into.netns,
    ]);
    await this.#ip(["-n", into.netns, "link", "set", port, "master", into.bridge, "up"]);
    for (const f of this.families) {
      const a = address(f);
      if (a !== undefined)
        await this.#ip([
          "-n",
          netns,
          "addr",
          "add",
          a,
          "dev",
          "eth0",
          ...(f === 6 ? ["nodad"] : []),
        ]);
    }
    await this.#ip(["-n", netns, "link", "set", "eth0", "up"]);
  }

  async #addNode(i: number): Promise<void> {
    const ns = this.nodeNs(i);
    await this.addHost(ns, `vn${i}`, { 4: nodeAddress(i, 4), 6: nodeAddress(i, 6) });
    const r = nsRunner(ns);
    await mustRun(r, [
      "sysctl",
      "-q",
      "-w",
      "net/ipv4/ip_forward=1",
      "net/ipv6/conf/all/forwarding=1",
    ]);
    await this.#ip(["-n", ns, "link", "add", "cni0", "type", "bridge"]);
    for (const f of this.families) {
      const gw = f === 4 ? `10.244.${i}.1/24` : `fd00:244:0:${i.toString(16)}::1/64`;
      await this.#ip(["-n", ns, "addr", "add", gw, "dev", "cni0", ...(f === 6 ? ["nodad"] : [])]);
    }
    await this.#ip(["-n", ns, "link", "set", "cni0", "up"]);
    // What kubelet, kube-proxy and the CNI leave on a node: kubelet's backend hints, a kube-proxy
    // service chain, and the CNI's masquerade for pod traffic leaving the pod network (so that
    // without a policy the outside sees the node's address).
    const rules = (family: Family) => {
      const supernet = POD_SUPERNET[family];
      const lo = family === 4 ? "127.0.0.0/8" : "::1/128";
      return [
        "*mangle",
        ":KUBE-IPTABLES-HINT - [0:0]",
        ":KUBE-KUBELET-CANARY - [0:0]",
        "COMMIT",
        "*filter",
        ":KUBE-FIREWALL - [0:0]",
        ":KUBE-KUBELET-CANARY - [0:0]",
        "-A INPUT -j KUBE-FIREWALL",
        "-A OUTPUT -j KUBE-FIREWALL",
        `-A KUBE-FIREWALL ! -s ${lo} -d ${lo} -m comment --comment "block incoming localnet connections" -j DROP`,
        "COMMIT",
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-KUBELET-CANARY - [0:0]",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        `-A POSTROUTING -s ${supernet} ! -d ${supernet} -m comment --comment "cni: masquerade pod traffic" -j MASQUERADE`,
        "COMMIT",
        "",
      ].join("\n");
    };
    for (const family of this.families) {
      await mustRun(r, [family === 4 ? "iptables-restore" : "ip6tables-restore", "--noflush"], {
        stdin: rules(family),
      });
    }
  }

  async #nodeRoutes(i: number): Promise<void> {
    for (let k = 1; k <= this.nodeCount; k++) {
      if (k === i) continue;
      for (const f of this.families) {
        await this.#ip([
          "-n",
          this.nodeNs(i),
          ...(f === 6 ? ["-6"] : []),
          "route",
          "replace",
          podCIDR(k, f),
          "via",
          nodeAddress(k, f),
          "dev",
          "eth0",
        ]);
      }
    }
  }

  /** Adds a pod on node `node`; returns its addresses. */
  async addPod(name: string, node: number): Promise<PodHandle> {
    const seq = this.#podSeq.get(node) ?? 0;
    this.#podSeq.set(node, seq + 1);
    const netns = `${this.prefix}-p${node}x${seq}`;
    const hostSide = `vp${seq}`;
    const ips: Partial<Record<Family, string>> = {};
    for (const f of this.families) ips[f] = podAddress(node, seq, f);
    await this.#plug(netns, hostSide, { netns: this.nodeNs(node), bridge: "cni0" }, (f) =>
      ips[f] === undefined ? undefined : `${ips[f]}/${f === 4 ? 24 : 64}`,
    );
    for (const f of this.families) {
      const gw = f === 4 ? `10.244.${node}.1` : `fd00:244:0:${node.toString(16)}::1`;
      await this.#ip([
        "-n",
        netns,
        ...(f === 6 ? ["-6"] : []),
        "route",
        "add",
        "default",
        "via",
        gw,
      ]);
    }
    const pod = { name, netns, node, ips };
    this.#pods.set(name, pod);
    return pod;
  }

  /** Cuts a node off: its uplink goes down (no ARP, no traffic). */
  async cutNode(index: number): Promise<void> {
    await this.#ip(["-n", this.bridgeNs, "link", "set", `vn${index}`, "down"]);
  }

  async reconnectNode(index: number): Promise<void> {
    await this.#ip(["-n", this.bridgeNs, "link", "set", `vn${index}`, "up"]);
  }

  /** Deletes every namespace with this prefix (also ones from a crashed run). */
  static async down(prefix: string): Promise<string[]> {
    const root = new ExecRunner();
    const list = (await root.run(["ip", "netns", "list"])).stdout
      .split("\n")
      .map((l) => l.split(" ")[0] ?? "")
      .filter((n) => n === `${prefix}-br` || n.startsWith(`${prefix}-`));
    // Kill what still runs inside before removing the namespaces.
    for (const ns of list) {
      const pids = (await root.run(["ip", "netns", "pids", ns])).stdout.split("\n").filter(Boolean);
      for (const pid of pids) {
        try {
          process.kill(Number(pid), "SIGKILL");
        } catch {
          // already gone
        }
      }
    }
    for (const ns of list) await root.run(["ip", "netns", "del", ns]);
    return list;
  }
}
