/**
 * The desired datapath of one node, as plain data: what the engine computes, what renderers turn
 * into `iptables-restore` / `ipset restore` / `ip -batch` text, and what parsers of the kernel's
 * state produce, so that desired and actual can be compared field by field.
 */
import type { Family } from "../lib/ip.ts";
import type { TrafficClass } from "./classify.ts";

export type TableName = "filter" | "nat" | "mangle";

export interface MarkMatch {
  readonly value: number;
  readonly mask: number;
  readonly invert?: boolean;
}

export interface SetMatch {
  readonly name: string;
  readonly dir: "src" | "dst";
  readonly invert?: boolean;
}

export type Target =
  | { readonly kind: "ACCEPT" }
  | { readonly kind: "DROP" }
  | { readonly kind: "RETURN" }
  | { readonly kind: "JUMP"; readonly chain: string }
  | { readonly kind: "GOTO"; readonly chain: string }
  | { readonly kind: "MARK"; readonly value: number; readonly mask: number }
  | { readonly kind: "CONNMARK"; readonly value: number; readonly mask: number }
  /**
   * `-j CONNMARK --restore-mark --nfmask N --ctmask C`: mark = (mark & ~N) ^ (connmark & C), as
   * xt_connmark computes it.
   */
  | { readonly kind: "RESTORE_MARK"; readonly nfmask: number; readonly ctmask: number }
  /** `to`: an address, with a port range `10.0.0.1:5000-5009`, `[fd00::1]:5000-5009`. */
  | { readonly kind: "SNAT"; readonly to: string }
  | { readonly kind: "TCPMSS" };

/**
 * One iptables rule in the shapes Sallyport emits. Field order here is the order iptables-save
 * prints the matches in, which is the order the renderer writes them.
 */
export interface Rule {
  /** Destination CIDR (`-d`), canonical: `203.0.113.0/24`, `192.0.2.1/32`, `2001:db8::/64`. */
  readonly destination?: string;
  readonly inInterface?: string;
  readonly outInterface?: string;
  readonly protocol?: "tcp" | "udp" | "sctp" | "ipv6-icmp";
  /** With protocol ipv6-icmp: neighbour solicitation (135) or advertisement (136). */
  readonly icmpv6Type?: 135 | 136;
  /** TCP SYN-without-RST match (for TCPMSS). */
  readonly tcpSyn?: boolean;
  readonly mark?: MarkMatch;
  readonly sets?: readonly SetMatch[];
  readonly ctstate?: readonly CtState[];
  readonly ctdir?: "ORIGINAL" | "REPLY";
  readonly connmark?: MarkMatch;
  /** multiport --dports, e.g. "80,443:445". */
  readonly dports?: string;
  /** `-m statistic --mode nth --every N --packet P`: every N-th packet that reaches the rule. */
  readonly statistic?: { readonly every: number; readonly packet: number };
  readonly comment?: string;
  readonly target: Target;
}

export type CtState = "INVALID" | "NEW" | "RELATED" | "ESTABLISHED" | "UNTRACKED";
/** The kernel's bit order, which iptables-save prints in. */
export const CTSTATE_ORDER: readonly CtState[] = [
  "INVALID",
  "NEW",
  "RELATED",
  "ESTABLISHED",
  "UNTRACKED",
];

/** A jump from a built-in chain into ours, kept first in that chain. */
export interface Hook {
  readonly table: TableName;
  readonly builtin: string;
  /** 1-based position among our hooks in this built-in chain. */
  readonly position: number;
  readonly rule: Rule;
}

export interface FamilyRules {
  /** Our chains and their rules, per table. */
  readonly chains: ReadonlyMap<TableName, ReadonlyMap<string, readonly Rule[]>>;
  readonly hooks: readonly Hook[];
}

export interface IpSetPlan {
  readonly name: string;
  readonly family: Family;
  /** Canonical CIDRs, sorted; "nomatch" entries carve exceptions out of larger ones. */
  readonly members: readonly string[];
  readonly nomatch: readonly string[];
}

export interface IpRulePlan {
  readonly family: Family;
  readonly pref: number;
  readonly fwmark: number;
  readonly mask: number;
  readonly table: number;
}

export interface RoutePlan {
  readonly family: Family;
  readonly table: number;
  /** "default" or a canonical CIDR. */
  readonly dst: string;
  readonly via: string;
  readonly dev: string;
}

export interface TunnelPlan {
  readonly name: string;
  readonly vni: number;
  readonly port: number;
  readonly local: string;
  readonly parent: string;
  readonly mtu: number;
  readonly mac: string;
  /** "100.127.0.2/32", "fd5a:5a11::2/128". */
  readonly addresses: readonly string[];
  /**
   * VXLAN Group Based Policy (`ip link add … type vxlan … gbp`): the low 16 bits of a packet's
   * mark travel in the VXLAN header and become the mark of the decapsulated packet. Sallyport
   * carries a steered connection's tunnel class in them (docs/datapath.md).
   */
  readonly gbp: boolean;
}

export interface NeighborPlan {
  readonly family: Family;
  readonly dev: string;
  readonly address: string;
  readonly mac: string;
}

export interface FdbPlan {
  readonly dev: string;
  readonly mac: string;
  readonly dst: string;
}

/** An egress IP this node holds: a macvlan device answering ARP/NDP for it. */
export interface EipPlan {
  readonly device: string;
  readonly parent: string;
  readonly mac: string;
  readonly address: string;
  readonly family: Family;
}

export interface TunnelPeers {
  readonly port: number;
  /** Per family, canonical addresses, sorted. */
  readonly peers: Readonly<Partial<Record<Family, readonly string[]>>>;
}

export interface SysctlPlan {
  readonly path: string;
  readonly value: string;
  /** Written only where the key exists (e.g. IPv6 keys on a kernel without IPv6). */
  readonly optional?: boolean;
}

export interface NodePlan {
  readonly node: string;
  readonly ipsets: readonly IpSetPlan[];
  readonly rules: Readonly<Record<Family, FamilyRules>>;
  readonly ipRules: readonly IpRulePlan[];
  readonly routes: readonly RoutePlan[];
  readonly tunnel: TunnelPlan | undefined;
  readonly neighbors: readonly NeighborPlan[];
  readonly fdb: readonly FdbPlan[];
  readonly eips: readonly EipPlan[];
  readonly sysctls: readonly SysctlPlan[];
  /** Peer key → TABLE_NUM chosen on this host. */
  readonly tables: ReadonlyMap<string, number>;
  /** Problems that keep part of the plan out (e.g. no free routing table). */
  readonly errors: readonly string[];
  /** The nftables datapath's classification (absent with iptables, which uses `rules`/`ipsets`). */
  readonly nft?: NftPlan | undefined;
}

/** What the nftables datapath holds besides routing, tunnel and egress-IP devices. */
export interface SteerTarget {
  readonly nodeID: number;
  readonly tunnelClass?: number | undefined;
}

export interface TunnelClassSnat {
  readonly tunnelClass: number;
  /** A policy of the class (for explain): the first by name of those that share it. */
  readonly policy: string;
  /** In address order; several: round-robin. */
  readonly eips: readonly string[];
}

export interface NftPlan {
  /**
   * The tunnel's UDP port and, per family, the peer nodes' underlay addresses: the only sources
   * it accepts (sets `peers4`, `peers6`). Absent in plans made before it existed.
   */
  readonly tunnelPeers?: TunnelPeers | undefined;
  /** Per family, the classes of sources and their disjoint entries, sorted by name. */
  readonly classes: Readonly<Partial<Record<Family, readonly TrafficClass[]>>>;
  /** The steer chains: per gateway node this node steers to, and tunnel class (when any). */
  readonly steerTo: readonly SteerTarget[];
  /**
   * Per family, the tunnel classes of the policies this node holds egress IPs of, and their
   * egress IPs (also in `snat`, and in `snatGroups` when several): a packet from the tunnel
   * carrying one is SNATed even when its source is in no class yet.
   */
  readonly tunnelClasses?:
    | Readonly<Partial<Record<Family, readonly TunnelClassSnat[]>>>
    | undefined;
  /**
   * Per family, the source addresses this node SNATs to, sorted; a packet carries its index in its
   * mark. The addresses of policies with several of a family are here one by one.
   */
  readonly snat: Readonly<Partial<Record<Family, readonly string[]>>>;
  /**
   * Per family, the egress IPs of policies with several of that family (each in address order,
   * the groups sorted): a group's chain picks one of its addresses round-robin. Absent: none.
   */
  readonly snatGroups?:
    | Readonly<Partial<Record<Family, readonly (readonly string[])[]>>>
    | undefined;
  /** Per family, the egress IPs this node holds (no service of the node answers on them). */
  readonly held: Readonly<Partial<Record<Family, readonly string[]>>>;
  readonly noSnatBySets: boolean;
  /** Source ports the SNAT names for TCP, UDP and SCTP (NodeConfig.snatPorts). */
  readonly snatPorts?: { readonly first: number; readonly last: number } | undefined;
}

/** A NodePlan as JSON (Maps become entry lists), for the CLI and for handing plans between processes. */
export function planToJSON(plan: NodePlan): string {
  return JSON.stringify(plan, (_key, value: unknown) => {
    if (value instanceof Map) return { $map: [...value.entries()] };
    return value;
  });
}

export function planFromJSON(text: string): NodePlan {
  return JSON.parse(text, (_key, value: unknown) => {
    if (value !== null && typeof value === "object" && "$map" in value) {
      return new Map((value as { $map: [unknown, unknown][] }).$map);
    }
    return value;
  }) as NodePlan;
}
