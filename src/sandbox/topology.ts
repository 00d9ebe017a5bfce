/**
 * A simulated cluster network in network namespaces: nothing is configured in the root
 * namespace, and every namespace is named `<prefix>-…`.
 *
 *   <prefix>-br    an L2 segment (bridge "br0") joining the nodes and the external host
 *   <prefix>-nI    node I: eth0 on the segment, host-gw routes to the other nodes' pod CIDRs, and
 *                  its pod network (see below)
 *   <prefix>-ext   the external host, on the same segment as the nodes and the egress IPs
 *   <prefix>-p…    pods, each a namespace with eth0 on its node's bridge "cni0"
 *
 * The pod network (`podNetwork`):
 *   "cni"     what a cluster with a bridge CNI and a host-gw network has: pods plugged by the
 *             CNI reference plugins (bridge with its own `ipMasq` chains, host-local, portmap;
 *             see cni.ts) with CNI ADD and DEL, and the host-gw network's masquerade exemption
 *             for pod-to-pod traffic. The sandbox uses it.
 *   "static"  a hand-made stand-in: cni0, addresses and one masquerade rule written directly,
 *             for kernel tests that program the datapath without a cluster.
 *
 * Address plan (IPv4 / IPv6):
 *   segment        192.168.77.0/24          fd00:77::/64       node I = .10+I / ::a+I
 *   external host  192.168.77.200           fd00:77::200
 *   egress IPs     192.168.77.100-120       fd00:77::100-120   (same segment: ARP/NDP works)
 *   pods           10.244.0.0/16            fd00:244::/56      (the cluster CIDR)
 *   pods of node I 10.244.I.0/24            fd00:244:0:I::/64  (gateway .1 / ::1)
 */

import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ExecRunner, mustRun, type Runner } from "../kernel/runner.ts";
import type { Family } from "../lib/ip.ts";
import {
  type CniResult,
  type CniRuntime,
  cniAdd,
  cniBinaries,
  cniDel,
  LOOPBACK,
  type NetworkConfList,
  nodeConfList,
  type PluginConf,
  podIPs,
} from "./cni.ts";

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
  /** @default "static" */
  readonly podNetwork?: "cni" | "static";
  /**
   * Where the nodes' CNI configuration lists and host-local's state go.
   * @default a directory under the system's temporary directory, removed by `Topology.down()`
   */
  readonly cniDir?: string;
  /** Plugins appended to every node's configuration list (a chained plugin), or per node. */
  readonly chainedPlugins?: readonly PluginConf[] | ((node: number) => readonly PluginConf[]);
  /** More plugin directories, searched after the reference plugins' (CNI_PATH). */
  readonly extraCniPath?: string;
}

export interface PodHandle {
  readonly name: string;
  readonly netns: string;
  readonly node: number;
  readonly ips: Readonly<Partial<Record<Family, string>>>;
  /** CNI_CONTAINERID and the ADD result, which DEL is given again ("cni" pod network). */
  readonly cni?: { readonly containerId: string; readonly result: CniResult };
}

/** A pod named "namespace/name" is a Kubernetes pod to the CNI plugins (CNI_ARGS). */
function k8sPod(name: string): { pod?: { namespace: string; name: string } } {
  const slash = name.indexOf("/");
  return slash < 0 ? {} : { pod: { namespace: name.slice(0, slash), name: name.slice(slash + 1) } };
}

function defaultCniDir(prefix: string): string {
  return join(tmpdir(), `sallyport-cni-${prefix}`);
}

/** Runs a command inside a namespace of the topology. */
export function nsRunner(netns: string): Runner {
  return new ExecRunner(["ip", "netns", "exec", netns]);
}

export class Topology {
  readonly prefix: string;
  readonly families: readonly Family[];
  readonly nodeCount: number;
  readonly podNetwork: "cni" | "static";
  readonly cniDir: string;
  readonly #chained: (node: number) => readonly PluginConf[];
  readonly #extraCniPath: string | undefined;
  readonly #root = new ExecRunner();
  readonly #pods = new Map<string, PodHandle>();
  #podSeq = new Map<number, number>();
  #cniPath: string | undefined;

  constructor(options: TopologyOptions) {
    this.prefix = options.prefix;
    this.families = options.families;
    this.nodeCount = options.nodes;
    this.podNetwork = options.podNetwork ?? "static";
    this.cniDir = options.cniDir ?? defaultCniDir(options.prefix);
    const chained = options.chainedPlugins ?? [];
    this.#chained = typeof chained === "function" ? chained : () => chained;
    this.#extraCniPath = options.extraCniPath;
  }

  /** Node `i`'s CNI configuration list: what a CNI's installer writes to /etc/cni/net.d. */
  confList(i: number): NetworkConfList {
    return nodeConfList({
      podCIDRs: Object.fromEntries(this.families.map((f) => [f, podCIDR(i, f)])),
      ipamDataDir: join(this.cniDir, `node-${i}`, "ipam"),
      chained: this.#chained(i),
    });
  }

  #cni(node: number): CniRuntime {
    this.#cniPath ??= [
      cniBinaries(),
      ...(this.#extraCniPath === undefined ? [] : [this.#extraCniPath]),
    ].join(":");
    return { runner: nsRunner(this.nodeNs(node)), cniPath: this.#cniPath };
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
    if (this.podNetwork === "cni") {
      await this.#cniNode(i);
      return;
    }
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

  /**
   * A node of the "cni" pod network before its first pod: the CNI's configuration list, the
   * chains the kubelet leaves (which tell the iptables backend in use, see kernel/iptables.ts),
   * and the host-gw network's exemption: pod-to-pod traffic keeps its source. The bridge
   * plugin's `ipMasq` chains masquerade everything that leaves the node's own pod CIDR, other
   * nodes' pods included; a host-gw network (flannel's `FLANNEL-POSTRTG` rules) exempts the
   * cluster CIDR first. Appended, so kube-proxy's masquerade (hairpin, NodePort) still comes
   * before it and the bridge plugin's per-pod rules, appended at each ADD, after it.
   */
  async #cniNode(i: number): Promise<void> {
    const dir = join(this.cniDir, `node-${i}`);
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "10-sandbox.conflist"), JSON.stringify(this.confList(i), null, 2));
    const rules = (family: Family) => {
      const supernet = POD_SUPERNET[family];
      return [
        "*mangle",
        ":KUBE-IPTABLES-HINT - [0:0]",
        ":KUBE-KUBELET-CANARY - [0:0]",
        "COMMIT",
        "*filter",
        ":KUBE-KUBELET-CANARY - [0:0]",
        "COMMIT",
        "*nat",
        ":KUBE-KUBELET-CANARY - [0:0]",
        `-A POSTROUTING -s ${supernet} -d ${supernet} -m comment --comment "host-gw: pod to pod keeps its source" -j ACCEPT`,
        "COMMIT",
        "",
      ].join("\n");
    };
    for (const family of this.families) {
      await mustRun(
        nsRunner(this.nodeNs(i)),
        [family === 4 ? "iptables-restore" : "ip6tables-restore", "--noflush"],
        { stdin: rules(family) },
      );
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

  /**
   * Adds a pod on node `node`; returns its addresses. Its namespace is `netns`, by default the
   * next `<prefix>-p<node>x<n>` this Topology object has not used.
   */
  async addPod(name: string, node: number, options: { netns?: string } = {}): Promise<PodHandle> {
    const seq = this.#podSeq.get(node) ?? 0;
    this.#podSeq.set(node, seq + 1);
    const netns = options.netns ?? `${this.prefix}-p${node}x${seq}`;
    if (this.podNetwork === "cni") return this.#addCniPod(name, node, netns);
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

  /**
   * What a container runtime does for a new pod sandbox: an empty network namespace, then CNI
   * ADD of the loopback network and of the node's network. On failure the namespace goes again
   * (after a DEL, which cleans up what the ADD got done).
   */
  async #addCniPod(name: string, node: number, netns: string): Promise<PodHandle> {
    await this.#ip(["netns", "add", netns]);
    const containerId = `${netns}-${Date.now().toString(36)}`;
    const attachment = { containerId, netns: `/run/netns/${netns}`, ...k8sPod(name) };
    const rt = this.#cni(node);
    try {
      await cniAdd(rt, LOOPBACK, attachment);
      const result = await cniAdd(rt, this.confList(node), attachment);
      const pod: PodHandle = {
        name,
        netns,
        node,
        ips: podIPs(result),
        cni: { containerId, result },
      };
      this.#pods.set(name, pod);
      return pod;
    } catch (e) {
      await cniDel(rt, this.confList(node), attachment, undefined).catch(() => {});
      await this.#root.run(["ip", "netns", "del", netns]);
      throw e;
    }
  }

  /**
   * Removes a pod as a runtime does: CNI DEL with the ADD's result (the bridge plugin's chains
   * and host-local's address go), then its namespace. Idempotent: a pod already gone is no error.
   */
  async deletePod(pod: PodHandle): Promise<void> {
    this.#pods.delete(pod.name);
    if (pod.cni !== undefined) {
      const attachment = {
        containerId: pod.cni.containerId,
        netns: `/run/netns/${pod.netns}`,
        ...k8sPod(pod.name),
      };
      const rt = this.#cni(pod.node);
      await cniDel(rt, this.confList(pod.node), attachment, pod.cni.result);
      await cniDel(rt, LOOPBACK, attachment, undefined);
    }
    const pids = (await this.#root.run(["ip", "netns", "pids", pod.netns])).stdout
      .split("\n")
      .filter(Boolean);
    for (const pid of pids) {
      try {
        process.kill(Number(pid), "SIGKILL");
      } catch {
        // already gone
      }
    }
    await this.#root.run(["ip", "netns", "del", pod.netns]);
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
    rmSync(defaultCniDir(prefix), { recursive: true, force: true });
    return list;
  }
}
