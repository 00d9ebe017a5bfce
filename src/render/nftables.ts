/**
 * The nftables datapath ↔ text: one `inet sallyport` table rendered from a NodePlan, parsed back
 * from `nft -j list table inet sallyport`, and the difference as one `nft -f -` transaction.
 *
 * The table (docs/datapath.md walks a packet through it):
 *
 *   prerouting (filter, mangle priority)   egress IPs expose no service; replies of steered
 *       flows go back through the tunnel; established flows we never steered keep their path;
 *       the source's class chain (IPv4: `meta priority set ip saddr map @src4 meta priority
 *       vmap @cls4`, IPv6: `ip6 saddr vmap @src6`) → `ip daddr . meta l4proto . th dport vmap
 *       @<class>` → a verdict chain (steer to a node, SNAT here) or drop; unclaimed tunnel
 *       traffic is dropped.
 *   forward (filter, mangle priority)      steered → keep mark (+ MSS clamp); accept.
 *   postrouting (nat, srcnat − 10)         keep mark → SNAT to the packet's own source (an
 *       identity binding, so that no later NAT chain, e.g. the CNI's masquerade in an iptables
 *       table, rewrites it: nftables runs every base chain of a hook, and only the first NAT
 *       binding counts); SNAT mark → the egress IP its index names (`map @snat4`).
 *
 * A policy with several egress IPs of a family SNATs through the chain of its group,
 * `snat4-<i>-<j>…` (the indexes of its addresses): `numgen inc mod N vmap { 0 : goto snat4-<i>,
 * … }` sends each new connection to the next address's chain, round-robin.
 *
 * Every rule carries a comment ending in `#<id>`, an id derived from the rule's text and comment,
 * so that reading the table back tells which rules are there without parsing nftables' rewritten
 * forms.
 * Sets and maps are compared element by element; classes are compared by identity when the
 * previous plan is known (partial syncs), so a pod added is one element.
 */
import { type ClassEntry, forClassChanges, type TrafficClass } from "../engine/classify.ts";
import { sameItems } from "../engine/equality.ts";
import {
  hex,
  KEEP_MARK,
  KEEP_MATCH_MASK,
  MARK_WRITE_MASK,
  nodeMark,
  PREFIX_MASK,
  REPLY_PREFIX,
  STEER_PREFIX,
  STEERED_MATCH_MASK,
  TUNNEL_CLASS_MASK,
} from "../engine/marks.ts";
import type { NftPlan, NodePlan } from "../engine/plan.ts";
import { hashName } from "../lib/hash.ts";
import { type Family, parseCidr } from "../lib/ip.ts";
import { getOrInsert } from "../lib/maps.ts";

export const NFT_TABLE = "sallyport";
/** Mark of a packet this node SNATs: the prefix, and its egress IP's index (see snatMark). */
export const SNAT_PREFIX = 0x28000000;

/**
 * The mark carrying egress-IP index `i`: bits 8–13 and 16–23 (16,384 indexes), never bits 14–15,
 * which kube-proxy uses for masquerade (0x4000) and drop (0x8000) on packets that, unlike our
 * steering marks, keep this mark through filter FORWARD.
 */
export function snatMark(index: number): number {
  if (!Number.isInteger(index) || index < 0 || index >= 1 << 14)
    throw new RangeError(`Cannot mark egress IP index ${index}: it must be 0-16383`);
  return (SNAT_PREFIX | ((index & 0x3f) << 8) | ((index >> 6) << 16)) >>> 0;
}

// ------------------------------------------------------------------------------------------------
// The model: what we compare

export interface NftSetDef {
  readonly name: string;
  /** "ipv4_addr" or a concatenation "ipv4_addr . inet_proto . inet_service". */
  readonly key: string;
  /** Map value type ("verdict", "ipv4_addr"); undefined for a set. */
  readonly value?: string | undefined;
  readonly interval: boolean;
  readonly counter: boolean;
}

export interface NftRule {
  /** The rule as `nft add rule` takes it, without its comment. */
  readonly text: string;
  /** What it is for, for people reading `nft list`. */
  readonly comment?: string | undefined;
}

export interface NftChainDef {
  readonly name: string;
  readonly base?: {
    readonly type: "filter" | "nat";
    readonly hook: "prerouting" | "input" | "forward" | "postrouting";
    /** Numeric priority (mangle = -150, srcnat = 100). */
    readonly priority: number;
  };
  readonly rules: readonly NftRule[];
}

/**
 * The table as read back: declarations, elements (canonical text) and rule ids per chain. A
 * terse read (`nft -t -j list ruleset inet`) has no elements: `elements` is undefined.
 */
export interface NftActual {
  readonly sets: ReadonlyMap<
    string,
    { readonly def: NftSetDef; readonly elements: ReadonlyMap<string, string> | undefined }
  >;
  readonly chains: ReadonlyMap<
    string,
    { readonly base?: NftChainDef["base"]; readonly ids: readonly string[] }
  >;
}

/** The desired table: static parts, and the classes kept by identity. */
export interface NftDesired {
  /** The table's sets and maps, without the classes' maps. */
  readonly sets: readonly NftSetDef[];
  /** Elements of the static sets and maps (not the classes' and not src4/src6). */
  readonly elements: ReadonlyMap<string, ReadonlyMap<string, string>>;
  /** The table's chains, without the classes' chains. */
  readonly chains: readonly NftChainDef[];
  /**
   * Each family's classes, sorted by name (the plan's lists: unchanged classes by identity). Each
   * has a map and a chain of its name, after the sets and chains above (`tableSets`,
   * `tableChains`): a partial sync compares only the classes that changed.
   */
  readonly classes: ReadonlyMap<Family, readonly TrafficClass[]>;
}

/** From the rule and its comment: a comment that no longer says what the rule is for is drift. */
export function ruleId(rule: NftRule): string {
  return hashName(rule.comment === undefined ? rule.text : `${rule.text}\n${rule.comment}`, 10);
}

/** nft refuses comments over 128 bytes; a policy's key may be longer (names up to 253). */
const MAX_COMMENT = 128;

function commentOf(rule: NftRule): string {
  const id = ` #${ruleId(rule)}`;
  if (rule.comment === undefined) return id.slice(1);
  let text = rule.comment;
  while (Buffer.byteLength(text) + id.length > MAX_COMMENT) text = text.slice(0, -1);
  return text + id;
}

const MANGLE = -150;
const SRCNAT = 100;
const ADDR: Record<Family, string> = { 4: "ipv4_addr", 6: "ipv6_addr" };
const IP: Record<Family, string> = { 4: "ip", 6: "ip6" };

function srcMap(family: Family): string {
  return `src${family}`;
}

/**
 * IPv4 sources map to their class's id, and the ids to the class chains (`cls4`): adding a pod
 * is then an element of data, where an element of a verdict map makes the kernel validate every
 * jump of the table again (21–25 ms against 8–11 ms with 100,000 sources, measured with nft in a
 * namespace). The id travels from one lookup to the next in the packet's priority, the one field
 * a rule can set from a map and match without touching anyone's marks: only the sources of
 * classes get it, and ip_forward() sets the priority of every forwarded IPv4 packet from its TOS
 * anyway. IPv6 forwarding keeps the priority up to the egress qdisc (pfifo_fast bands, HTB
 * classes by id), so IPv6 sources keep their verdict map of jumps.
 */
const CLS4 = "cls4";

/** The id of an IPv4 class: its anchor's address as a TC classid, as nft prints it ("a00:5"). */
function classId(c: TrafficClass): string {
  const v = parseCidr(c.anchor).base;
  return `${(v >> 16n).toString(16)}:${(v & 0xffffn).toString(16)}`;
}

/** A source's value in its family's src map. */
function sourceValue(c: TrafficClass): string {
  return c.family === 4 ? classId(c) : `jump ${c.name}`;
}

export function steerChainName(nodeID: number, tunnelClass?: number): string {
  const node = `to-${nodeID.toString(16).padStart(4, "0")}`;
  return tunnelClass === undefined ? node : `${node}-${tunnelClass.toString(16).padStart(4, "0")}`;
}

function snatChainName(family: Family, index: number): string {
  return `snat${family}-${index}`;
}

/** The chain of a group of egress IPs: their indexes in `snat`, e.g. `snat4-0-3`. */
function groupChainName(family: Family, group: readonly string[], snat: readonly string[]): string {
  return `snat${family}-${group
    .map((a) => {
      const i = snat.indexOf(a);
      if (i < 0)
        throw new RangeError(
          `Cannot name the SNAT group ${group.join(",")}: ${a} is no SNAT address`,
        );
      return i;
    })
    .join("-")}`;
}

/** `: 5000-5009`, the source ports every SNAT to an egress IP names (TCP, UDP and SCTP). */
function portsText(ports: NftPlan["snatPorts"]): string {
  return ports === undefined ? "" : ` : ${ports.first}-${ports.last}`;
}

const masked = (mask: number, value: number) => `meta mark & ${hex(mask)} == ${hex(value)}`;
const ctMasked = (mask: number, value: number) => `ct mark & ${hex(mask)} == ${hex(value)}`;
const setMark = (value: number) =>
  `meta mark set meta mark & ${hex(~MARK_WRITE_MASK >>> 0)} | ${hex(value)}`;
const setCtPrefix = (value: number) =>
  `ct mark set ct mark & ${hex(~PREFIX_MASK >>> 0)} | ${hex(value)}`;

/** The desired table of a plan made with `datapath: "nftables"`. */
export function desiredTable(
  plan: NodePlan,
  options: { readonly families: readonly Family[]; readonly tunnelDevice: string },
): NftDesired {
  const nft: NftPlan = plan.nft ?? {
    classes: {},
    steerTo: [],
    snat: {},
    held: {},
    noSnatBySets: false,
  };
  const { families, tunnelDevice: tunnel } = options;
  const sets: NftSetDef[] = [];
  const elements = new Map<string, Map<string, string>>();
  const chains: NftChainDef[] = [];
  const classes = new Map<Family, readonly TrafficClass[]>();

  for (const family of families) {
    sets.push({ name: `eip${family}`, key: ADDR[family], interval: false, counter: false });
    elements.set(
      `eip${family}`,
      elementsOfList("held", nft.held[family] ?? [], (c) => [hostText(c), ""]),
    );
    sets.push({
      name: srcMap(family),
      key: ADDR[family],
      value: family === 4 ? "classid" : "verdict",
      interval: false,
      counter: false,
    });
    if (family === 4)
      sets.push({ name: CLS4, key: "classid", value: "verdict", interval: false, counter: false });
    sets.push({
      name: `snat${family}`,
      key: "mark",
      value: ADDR[family],
      interval: false,
      counter: false,
    });
    const snat = nft.snat[family] ?? [];
    elements.set(
      `snat${family}`,
      elementsOfList("snat", snat, (eip, i) => [hex(snatMark(i)), eip]),
    );
    for (let i = 0; i < snat.length; i++)
      chains.push({
        name: snatChainName(family, i),
        rules: [
          {
            text: `iifname "${tunnel}" ct state new ${setCtPrefix(REPLY_PREFIX)}`,
            comment: "remember flows that came through the tunnel",
          },
          { text: `${setMark(snatMark(i))} accept` },
        ],
      });
    for (const group of nft.snatGroups?.[family] ?? []) {
      const targets = group.map((a, k) => `${k} : goto ${snatChainName(family, snat.indexOf(a))}`);
      chains.push({
        name: groupChainName(family, group, snat),
        rules: [
          {
            text: `numgen inc mod ${group.length} vmap { ${targets.join(", ")} }`,
            comment: `new connections round-robin over ${group.length} egress IPs`,
          },
        ],
      });
    }
    const list = nft.classes[family];
    if (list !== undefined && list.length > 0) classes.set(family, list);
  }
  for (const { nodeID, tunnelClass } of nft.steerTo) {
    // With a tunnel class, the connection mark carries it too; tunnel-out puts it into the
    // packet as it enters the tunnel.
    const ct =
      tunnelClass === undefined
        ? setCtPrefix(STEER_PREFIX)
        : `ct mark set ct mark & ${hex(~(PREFIX_MASK | TUNNEL_CLASS_MASK) >>> 0)} | ${hex((STEER_PREFIX | tunnelClass) >>> 0)}`;
    chains.push({
      name: steerChainName(nodeID, tunnelClass),
      rules: [
        // What came through the tunnel (a peer that thinks this node holds the egress IPs)
        // goes no further, and never back into the tunnel.
        { text: `iifname "${tunnel}" drop`, comment: "another node holds the egress IPs" },
        { text: `${ct} ${setMark(nodeMark(nodeID))} accept` },
      ],
    });
  }
  chains.push({
    name: "tunnel-reply",
    rules: [{ text: `${setMark(REPLY_PREFIX)} accept` }],
  });
  const prerouting: NftRule[] = [];
  for (const family of families) {
    // Neighbour discovery is not a connection (conntrack calls it invalid): a unicast
    // solicitation of the egress IP, or the advertisement answering one it sent, must pass.
    if (family === 6)
      for (const type of ["nd-neighbor-solicit", "nd-neighbor-advert"])
        prerouting.push({
          text: `ip6 daddr @eip6 icmpv6 type ${type} accept`,
          comment: "neighbour discovery of egress IPs",
        });
    prerouting.push({
      text: `${IP[family]} daddr @eip${family} ct state invalid,new,untracked drop`,
      comment: "egress IPs expose no service",
    });
  }
  prerouting.push(
    {
      text: `ct direction reply ${ctMasked(PREFIX_MASK, REPLY_PREFIX)} goto tunnel-reply`,
      comment: "replies go back through the tunnel",
    },
    { text: "ct direction reply return" },
    {
      text: `ct state established,related ${ctMasked(PREFIX_MASK, STEER_PREFIX).replace("==", "!=")} return`,
      comment: "connections we never steered keep their path",
    },
  );
  for (const family of families)
    prerouting.push({
      text:
        family === 4
          ? `meta nfproto ipv4 meta priority set ip saddr map @${srcMap(4)} meta priority vmap @${CLS4}`
          : `meta nfproto ipv6 ip6 saddr vmap @${srcMap(6)}`,
      comment: "classify: the source's policies, then its destination and port",
    });
  // A pod this gateway has not heard of yet: the tunnel class its steering node wrote into the
  // VXLAN header (only peers can, see input and forward) names the policy, and its egress IPs.
  for (const family of families) {
    const name = `tclass${family}`;
    sets.push({ name, key: "mark", value: "verdict", interval: false, counter: false });
    const snat = nft.snat[family] ?? [];
    // (Not cached by list like the static sets: the values name indexes into `snat`.)
    elements.set(
      name,
      new Map(
        (nft.tunnelClasses?.[family] ?? []).map((c) => [
          hex(c.tunnelClass),
          c.eips.length > 1
            ? `goto ${groupChainName(family, c.eips, snat)}`
            : `goto ${snatChainName(family, snat.indexOf(c.eips[0]!))}`,
        ]),
      ),
    );
    prerouting.push({
      text: `meta nfproto ${family === 4 ? "ipv4" : "ipv6"} iifname "${tunnel}" meta mark & ${hex(TUNNEL_CLASS_MASK)} vmap @${name}`,
      comment: "a pod not classified yet: the tunnel class its node names",
    });
  }
  prerouting.push({
    text: `iifname "${tunnel}" drop`,
    comment: "tunnel traffic no policy here claims",
  });
  chains.push({
    name: "prerouting",
    base: { type: "filter", hook: "prerouting", priority: MANGLE },
    rules: prerouting,
  });
  // Tunnel packets only from the peer nodes' underlay addresses, before the VXLAN socket
  // decapsulates them (it reads what the input hook lets through): a host that is no peer node
  // could otherwise send any inner packet, a selected pod's source included, into this node's
  // tunnel and out with an egress IP. Counted: `nft list chain inet sallyport input`.
  const tunnelPeers = nft.tunnelPeers;
  if (tunnelPeers !== undefined) {
    const input: NftRule[] = [];
    for (const family of families) {
      sets.push({ name: `peers${family}`, key: ADDR[family], interval: false, counter: false });
      elements.set(
        `peers${family}`,
        elementsOfList("peers", tunnelPeers.peers[family] ?? [], (a) => [a, ""]),
      );
      input.push({
        text: `udp dport ${tunnelPeers.port} ${IP[family]} saddr != @peers${family} counter drop`,
        comment: "tunnel packets from a host that is no peer node",
      });
    }
    chains.push({
      name: "input",
      base: { type: "filter", hook: "input", priority: MANGLE },
      rules: input,
    });
  }
  chains.push({
    name: "forward",
    base: { type: "filter", hook: "forward", priority: MANGLE },
    rules: [
      // Only a node writes into the tunnel (and the tunnel class in its header): a pod's packet
      // to a peer's tunnel port, which the CNI would masquerade to this node's address, stops.
      ...(tunnelPeers === undefined
        ? []
        : families.map((family) => ({
            text: `udp dport ${tunnelPeers.port} ${IP[family]} daddr @peers${family} drop`,
            comment: "no pod sends into the tunnel",
          }))),
      {
        text: `${masked(STEERED_MATCH_MASK, STEER_PREFIX)} tcp flags syn / syn,rst tcp option maxseg size set rt mtu`,
        comment: "fit the tunnel MTU",
      },
      { text: `${masked(STEERED_MATCH_MASK, STEER_PREFIX)} ${setMark(KEEP_MARK)}` },
      { text: `${masked(PREFIX_MASK, KEEP_MARK)} accept`, comment: "steered traffic" },
      { text: `iifname "${tunnel}" accept`, comment: "traffic from the tunnel" },
    ],
  });
  chains.push({
    name: "tunnel-out",
    base: { type: "filter", hook: "postrouting", priority: MANGLE },
    rules: [
      {
        text: `oifname "${tunnel}" ${masked(KEEP_MATCH_MASK, KEEP_MARK)} ${ctMasked(TUNNEL_CLASS_MASK, 0).replace("==", "!=")} meta mark set ct mark & ${hex(TUNNEL_CLASS_MASK)} | ${hex(KEEP_MARK)}`,
        comment: "tunnel class of the connection into the VXLAN header",
      },
    ],
  });
  const postrouting: NftRule[] = [];
  for (const family of families) {
    postrouting.push({
      text: `meta nfproto ${family === 4 ? "ipv4" : "ipv6"} ${masked(PREFIX_MASK, KEEP_MARK)} snat ${IP[family]} to ${IP[family]} saddr`,
      comment: "no SNAT for steered traffic: an identity binding keeps other NAT chains off it",
    });
    // --exempt-by-sets: for a CNI or firewall that clears packet marks before NAT, the same
    // binding by the connection's steer mark, which no packet-mark rewrite touches.
    if (nft.noSnatBySets)
      postrouting.push({
        text: `meta nfproto ${family === 4 ? "ipv4" : "ipv6"} ${ctMasked(PREFIX_MASK, STEER_PREFIX)} snat ${IP[family]} to ${IP[family]} saddr`,
        comment: "no SNAT for steered connections whose packet mark was cleared",
      });
    // nft names ports only after a transport protocol match; other protocols (ICMP) below.
    if (nft.snatPorts !== undefined)
      postrouting.push({
        text: `meta nfproto ${family === 4 ? "ipv4" : "ipv6"} ${masked(PREFIX_MASK, SNAT_PREFIX)} meta l4proto { tcp, udp, sctp } snat ${IP[family]} to meta mark & ${hex(MARK_WRITE_MASK)} map @snat${family}${portsText(nft.snatPorts)}`,
        comment: "SNAT to the egress IP the mark names, from the source ports --snat-ports names",
      });
    postrouting.push({
      text: `meta nfproto ${family === 4 ? "ipv4" : "ipv6"} ${masked(PREFIX_MASK, SNAT_PREFIX)} snat ${IP[family]} to meta mark & ${hex(MARK_WRITE_MASK)} map @snat${family}`,
      comment: "SNAT to the egress IP the mark names",
    });
  }
  chains.push({
    name: "postrouting",
    base: { type: "nat", hook: "postrouting", priority: SRCNAT - 10 },
    rules: postrouting,
  });
  return { sets, elements, chains, classes };
}

/**
 * Elements of a static set, made once per list object: the planner keeps unchanged lists by
 * identity, and a partial sync then skips them by reference.
 */
const STATIC_ELEMENTS = new Map<string, WeakMap<readonly string[], Map<string, string>>>();
function elementsOfList(
  kind: string,
  list: readonly string[],
  entry: (item: string, index: number) => [string, string],
): Map<string, string> {
  let cache = STATIC_ELEMENTS.get(kind);
  if (cache === undefined) {
    cache = new WeakMap();
    STATIC_ELEMENTS.set(kind, cache);
  }
  let m = cache.get(list);
  if (m === undefined) {
    m = new Map(list.map(entry));
    cache.set(list, m);
  }
  return m;
}

/**
 * A class's map and chain, made once per class object: the planner keeps unchanged classes by
 * identity, and a partial sync then skips their definitions by reference.
 */
const CLASS_DEFS = new WeakMap<TrafficClass, { map: NftSetDef; chain: NftChainDef }>();
function classDefs(c: TrafficClass): { map: NftSetDef; chain: NftChainDef } {
  let defs = CLASS_DEFS.get(c);
  if (defs === undefined) {
    defs = {
      map: classMapDef(c),
      chain: {
        name: c.name,
        rules: [
          {
            text: `${IP[c.family]} daddr . meta l4proto . th dport vmap @${c.name}`,
            comment: c.policies.length === 1 ? c.policies[0] : `${c.policies.length} policies`,
          },
        ],
      },
    };
    CLASS_DEFS.set(c, defs);
  }
  return defs;
}

/** Every set and map of the table, the classes' maps last (by family, then name). */
function tableSets(desired: NftDesired): readonly NftSetDef[] {
  return whole(desired).sets;
}

/** Every chain of the table, the classes' chains last (by family, then name). */
function tableChains(desired: NftDesired): readonly NftChainDef[] {
  return whole(desired).chains;
}

/** Each class of the table by name. */
function classNamed(desired: NftDesired): ReadonlyMap<string, TrafficClass> {
  return whole(desired).classes;
}

const WHOLE = new WeakMap<
  NftDesired,
  {
    sets: readonly NftSetDef[];
    chains: readonly NftChainDef[];
    classes: ReadonlyMap<string, TrafficClass>;
  }
>();
function whole(desired: NftDesired) {
  let w = WHOLE.get(desired);
  if (w === undefined) {
    const sets = [...desired.sets];
    const chains = [...desired.chains];
    const classes = new Map<string, TrafficClass>();
    for (const list of desired.classes.values())
      for (const c of list) {
        const defs = classDefs(c);
        sets.push(defs.map);
        chains.push(defs.chain);
        classes.set(c.name, c);
      }
    w = { sets, chains, classes };
    WHOLE.set(desired, w);
  }
  return w;
}

function classMapDef(c: TrafficClass): NftSetDef {
  return {
    name: c.name,
    key: `${ADDR[c.family]} . inet_proto . inet_service`,
    value: "verdict",
    interval: true,
    counter: true,
  };
}

/** nftables prints a host prefix as a plain address. */
function hostText(cidr: string): string {
  return cidr.endsWith("/32") || cidr.endsWith("/128")
    ? cidr.slice(0, cidr.lastIndexOf("/"))
    : cidr;
}

const span = (r: readonly [number, number]) => (r[0] === r[1] ? `${r[0]}` : `${r[0]}-${r[1]}`);

export function entryKey(e: ClassEntry): string {
  return `${hostText(e.dst)} . ${span(e.l4.proto)} . ${span(e.l4.port)}`;
}

export function entryValue(e: ClassEntry, family: Family, snat: readonly string[]): string {
  const v = e.verdict;
  if (v.kind === "drop") return "drop";
  if (v.kind === "steer") return `goto ${steerChainName(v.nodeID, v.tunnelClass)}`;
  if (v.eips !== undefined && v.eips.length > 1)
    return `goto ${groupChainName(family, v.eips, snat)}`;
  return `goto ${snatChainName(family, snat.indexOf(v.eip))}`;
}

function classElements(c: TrafficClass, snat: readonly string[]): Map<string, string> {
  return new Map(c.entries.map((e) => [entryKey(e), entryValue(e, c.family, snat)]));
}

// ------------------------------------------------------------------------------------------------
// Reading back: `nft -j list table inet sallyport`

type Json = Record<string, unknown>;

const PROTO_NUMBERS: Readonly<Record<string, number>> = {
  icmp: 1,
  igmp: 2,
  tcp: 6,
  udp: 17,
  ipv6: 41,
  gre: 47,
  esp: 50,
  ah: 51,
  "ipv6-icmp": 58,
  sctp: 132,
  udplite: 136,
};

/** One field of an element as we write it. */
function fieldText(v: unknown, kind: string): string {
  if (typeof v === "number") return kind === "mark" ? hex(v) : String(v);
  if (typeof v === "string") {
    if (kind === "inet_proto" && PROTO_NUMBERS[v] !== undefined) return String(PROTO_NUMBERS[v]);
    return v;
  }
  const o = v as Json;
  if (o.prefix !== undefined) {
    const p = o.prefix as { addr: string; len: number };
    return hostText(`${p.addr}/${p.len}`);
  }
  if (o.range !== undefined) {
    const [a, b] = o.range as [unknown, unknown];
    return `${fieldText(a, kind)}-${fieldText(b, kind)}`;
  }
  throw new SyntaxError(`Cannot read an nftables element field: ${JSON.stringify(v)}`);
}

function valueText(v: unknown, kind: string | undefined): string {
  if (kind === undefined) return "";
  if (kind === "verdict") {
    const o = v as Json;
    if ("drop" in o) return "drop";
    if ("accept" in o) return "accept";
    if ("return" in o) return "return";
    for (const k of ["goto", "jump"]) {
      if (k in o) return `${k} ${(o[k] as { target: string }).target}`;
    }
    throw new SyntaxError(`Cannot read an nftables verdict: ${JSON.stringify(v)}`);
  }
  return fieldText(v, kind);
}

/**
 * Parses the JSON of `nft -j list table inet sallyport`, or with `terse` of `nft -t -j list
 * ruleset inet` (declarations, chains and rules of every inet table, no elements: nft 1.0.6
 * fetches every element of a table for any other listing that names it, ~1.4 s for 100,000);
 * undefined when there is no table.
 */
export function parseNftTable(json: string, terse = false): NftActual | undefined {
  const doc = JSON.parse(json) as { nftables?: Json[] };
  const sets = new Map<string, { def: NftSetDef; elements: Map<string, string> | undefined }>();
  const chains = new Map<string, { base?: NftChainDef["base"]; ids: string[] }>();
  let found = false;
  for (const item of doc.nftables ?? []) {
    if (item.table !== undefined) {
      const t = item.table as Json;
      if (t.name === NFT_TABLE && t.family === "inet") found = true;
      continue;
    }
    const set = (item.set ?? item.map) as Json | undefined;
    if (set !== undefined) {
      if (set.table !== NFT_TABLE || set.family !== "inet") continue;
      const types = Array.isArray(set.type) ? (set.type as string[]) : [set.type as string];
      const flags = (set.flags as string[] | undefined) ?? [];
      const def: NftSetDef = {
        name: set.name as string,
        key: types.join(" . "),
        value: item.map === undefined ? undefined : (set.map as string),
        interval: flags.includes("interval"),
        counter:
          ((set.stmt as Json[] | undefined) ?? []).some((x) => "counter" in x) || hasCounter(set),
      };
      const elements = new Map<string, string>();
      for (const raw of (set.elem as unknown[] | undefined) ?? []) {
        const [keyRaw, valRaw] =
          item.map === undefined ? [raw, undefined] : (raw as [unknown, unknown]);
        let key = keyRaw;
        if (key !== null && typeof key === "object" && "elem" in (key as Json))
          key = ((key as Json).elem as Json).val;
        const fields =
          key !== null && typeof key === "object" && "concat" in (key as Json)
            ? ((key as Json).concat as unknown[])
            : [key];
        const text = fields.map((f, i) => fieldText(f, types[i] ?? "")).join(" . ");
        elements.set(text, valueText(valRaw, def.value));
      }
      sets.set(def.name, { def, elements: terse ? undefined : elements });
      continue;
    }
    if (item.chain !== undefined) {
      const c = item.chain as Json;
      if (c.table !== NFT_TABLE || c.family !== "inet") continue;
      chains.set(c.name as string, {
        ...(c.hook === undefined
          ? {}
          : {
              base: {
                type: c.type as "filter" | "nat",
                hook: c.hook as "prerouting" | "input" | "forward" | "postrouting",
                priority: c.prio as number,
              },
            }),
        ids: [],
      });
      continue;
    }
    if (item.rule !== undefined) {
      const r = item.rule as Json;
      if (r.table !== NFT_TABLE || r.family !== "inet") continue;
      const comment = (r.comment as string | undefined) ?? "";
      const at = comment.lastIndexOf("#");
      chains.get(r.chain as string)?.ids.push(at < 0 ? "" : comment.slice(at + 1));
    }
  }
  return found ? { sets, chains } : undefined;
}

function hasCounter(set: Json): boolean {
  for (const raw of (set.elem as unknown[] | undefined) ?? []) {
    const key = Array.isArray(raw) ? raw[0] : raw;
    if (key !== null && typeof key === "object" && "elem" in (key as Json))
      return ((key as Json).elem as Json).counter !== undefined;
    return false;
  }
  return (set.flags as string[] | undefined)?.includes("counter") ?? false;
}

/** Per-element counters of the class maps, for traffic metrics: map → key → [packets, bytes]. */
export function parseNftCounters(json: string): Map<string, Map<string, [number, number]>> {
  const doc = JSON.parse(json) as { nftables?: Json[] };
  const out = new Map<string, Map<string, [number, number]>>();
  for (const item of doc.nftables ?? []) {
    const set = item.map as Json | undefined;
    if (set === undefined || set.table !== NFT_TABLE) continue;
    const types = Array.isArray(set.type) ? (set.type as string[]) : [set.type as string];
    const counts = new Map<string, [number, number]>();
    for (const raw of (set.elem as unknown[] | undefined) ?? []) {
      const key = (raw as [Json, unknown])[0];
      const elem = key.elem as Json | undefined;
      if (elem?.counter === undefined) continue;
      const fields =
        "concat" in (elem.val as Json) ? ((elem.val as Json).concat as unknown[]) : [elem.val];
      const c = elem.counter as { packets: number; bytes: number };
      counts.set(fields.map((f, i) => fieldText(f, types[i] ?? "")).join(" . "), [
        c.packets,
        c.bytes,
      ]);
    }
    if (counts.size > 0) out.set(set.name as string, counts);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// The difference, as one transaction

export interface NftDiff {
  /** `nft -f -` input; empty when nothing differs. */
  readonly payload: string;
  readonly changes: number;
  readonly detail: readonly string[];
}

class Transaction {
  /** Sets and maps made again with another definition: deleted before anything else. */
  readonly recreateSets: string[] = [];
  /** Base chains of ours at another hook or priority: deleted before they are added again. */
  readonly replaceChains: string[] = [];
  readonly addSets: string[] = [];
  readonly addChains: string[] = [];
  readonly delElements: string[] = [];
  readonly addElements: string[] = [];
  readonly rules: string[] = [];
  readonly delChains: string[] = [];
  readonly delSets: string[] = [];
  readonly detail: string[] = [];
  changes = 0;

  elements(verb: "add" | "delete", set: string, items: readonly string[]): void {
    if (items.length === 0) return;
    this.changes += items.length;
    const out = verb === "add" ? this.addElements : this.delElements;
    // Bounded lines: nft reads them fine, and an error names a smaller batch.
    for (let i = 0; i < items.length; i += 1000)
      out.push(
        `${verb} element inet ${NFT_TABLE} ${set} { ${items.slice(i, i + 1000).join(", ")} }`,
      );
  }

  /** A set or map of ours that was not there. */
  newSet(d: NftSetDef): void {
    this.addSets.push(setDecl(d));
    this.changes++;
    this.detail.push(`set ${d.name}`);
  }

  /** A chain of ours that was not there, with its rules. */
  newChain(c: NftChainDef): void {
    this.addChains.push(chainDecl(c));
    writeChain(this, c, false);
  }

  /** A chain no longer wanted: flushed first (a map element may jump to it until the map goes). */
  dropChain(name: string): void {
    this.rules.push(`flush chain inet ${NFT_TABLE} ${name}`);
    this.delChains.push(`delete chain inet ${NFT_TABLE} ${name}`);
    this.changes++;
    this.detail.push(`-chain ${name}`);
  }

  /** A set or map no longer wanted. */
  dropSet(name: string, def: NftSetDef): void {
    this.delSets.push(delSetLine(name, def));
    this.changes++;
    this.detail.push(`-set ${name}`);
  }

  text(tableMissing: boolean): string {
    // A set made again is still looked up by our rules until their chains are flushed.
    const early = this.recreateSets.length === 0 ? [] : this.rules.filter(isFlush);
    const lines = [
      ...(tableMissing ? [`add table inet ${NFT_TABLE}`] : []),
      ...early,
      ...this.recreateSets,
      ...this.replaceChains,
      ...this.addSets,
      ...this.addChains,
      ...this.delElements,
      ...this.addElements,
      ...(early.length === 0 ? this.rules : this.rules.filter((l) => !isFlush(l))),
      // Stale maps before stale chains: their elements may still goto those chains.
      ...this.delSets,
      ...this.delChains,
    ];
    return lines.length === 0 ? "" : `${lines.join("\n")}\n`;
  }
}

function isFlush(line: string): boolean {
  return line.startsWith("flush chain ");
}

function delSetLine(name: string, def: NftSetDef): string {
  return `delete ${def.value === undefined ? "set" : "map"} inet ${NFT_TABLE} ${name}`;
}

function setDecl(d: NftSetDef): string {
  const kind = d.value === undefined ? "set" : "map";
  const type = d.value === undefined ? d.key : `${d.key} : ${d.value}`;
  const flags = d.interval ? " flags interval;" : "";
  const counter = d.counter ? " counter;" : "";
  return `add ${kind} inet ${NFT_TABLE} ${d.name} { type ${type};${flags}${counter} }`;
}

function sameDef(a: NftSetDef, b: NftSetDef): boolean {
  return (
    a.key === b.key && a.value === b.value && a.interval === b.interval && a.counter === b.counter
  );
}

function chainDecl(c: NftChainDef): string {
  if (c.base === undefined) return `add chain inet ${NFT_TABLE} ${c.name}`;
  return `add chain inet ${NFT_TABLE} ${c.name} { type ${c.base.type} hook ${c.base.hook} priority ${c.base.priority}; policy accept; }`;
}

function writeChain(t: Transaction, c: NftChainDef, exists: boolean): void {
  if (exists) t.rules.push(`flush chain inet ${NFT_TABLE} ${c.name}`);
  for (const r of c.rules)
    t.rules.push(`add rule inet ${NFT_TABLE} ${c.name} ${r.text} comment "${commentOf(r)}"`);
  t.changes++;
  t.detail.push(`chain ${c.name}`);
}

function diffElements(
  t: Transaction,
  set: string,
  want: ReadonlyMap<string, string>,
  have: ReadonlyMap<string, string>,
  isMap: boolean,
): void {
  const add: string[] = [];
  const del: string[] = [];
  for (const [k, v] of want) {
    const h = have.get(k);
    if (h === v) continue;
    if (h !== undefined) del.push(k);
    add.push(isMap ? `${k} : ${v}` : k);
  }
  for (const k of have.keys()) if (!want.has(k)) del.push(k);
  t.elements("delete", set, del);
  t.elements("add", set, add);
  if (add.length + del.length > 0) t.detail.push(`${set} +${add.length} -${del.length}`);
}

/** The src map of one family, from its classes. */
function sourceElements(classes: readonly TrafficClass[]): Map<string, string> {
  const out = new Map<string, string>();
  for (const c of classes) {
    const value = sourceValue(c);
    for (const s of c.sources) out.set(hostText(s), value);
  }
  return out;
}

/**
 * Full: what turns the table as read (`actual`) into `desired`; undefined actual: no table yet.
 * A set read without its elements (a terse read) is taken to hold what `assumed`, the table the
 * last sync left, put there, if it is the same set; otherwise this throws.
 */
export function diffNftFull(
  desired: NftDesired,
  actual: NftActual | undefined,
  assumed?: NftDesired,
): NftDiff {
  const t = new Transaction();
  const haveSets = actual?.sets ?? new Map();
  const haveChains = actual?.chains ?? new Map();
  const sets = tableSets(desired);
  const wantSets = new Map(sets.map((s) => [s.name, s]));
  const recreated = new Set<string>();
  for (const d of sets) {
    const have = haveSets.get(d.name);
    if (have !== undefined && sameDef(have.def, d)) continue;
    if (have !== undefined) {
      // Interference, or an upgrade, made a set of ours with another type: recreate it.
      t.recreateSets.push(delSetLine(d.name, have.def));
      recreated.add(d.name);
    }
    t.newSet(d);
  }
  const chains = tableChains(desired);
  const wantChains = new Map(chains.map((c) => [c.name, c]));
  for (const c of chains) {
    const have = haveChains.get(c.name);
    const sameBase =
      have !== undefined &&
      have.base?.type === c.base?.type &&
      have.base?.hook === c.base?.hook &&
      have.base?.priority === c.base?.priority;
    if (have === undefined || !sameBase) {
      if (have !== undefined) t.replaceChains.push(`delete chain inet ${NFT_TABLE} ${c.name}`);
      t.newChain(c);
      continue;
    }
    const ids = c.rules.map(ruleId);
    const same = ids.length === have.ids.length && ids.every((id, i) => id === have.ids[i]);
    // A recreated set is looked up by rules that must be written again after it.
    if (same && recreated.size === 0) continue;
    writeChain(t, c, true);
  }
  const assumedSets = new Map(
    (assumed === undefined ? [] : tableSets(assumed)).map((s) => [s.name, s]),
  );
  const assumedElements = (d: NftSetDef): ReadonlyMap<string, string> => {
    const before = assumedSets.get(d.name);
    if (assumed === undefined || before === undefined || !sameDef(before, d))
      throw new NftElementsUnknownError(d.name);
    return elementsIn(assumed, d.name);
  };
  for (const d of sets) {
    const have = recreated.has(d.name) ? undefined : haveSets.get(d.name);
    // Read tersely, and made of the very lists the last sync wrote: nothing to compare.
    if (
      have !== undefined &&
      have.elements === undefined &&
      assumed !== undefined &&
      sameSource(d, assumedSets.get(d.name), desired, assumed)
    )
      continue;
    const haveElements =
      have === undefined ? new Map() : (have.elements ?? assumedElements(have.def));
    diffElements(t, d.name, elementsIn(desired, d.name), haveElements, d.value !== undefined);
  }
  for (const [name] of haveChains) if (!wantChains.has(name)) t.dropChain(name);
  for (const [name, have] of haveSets) if (!wantSets.has(name)) t.dropSet(name, have.def);
  return { payload: t.text(actual === undefined), changes: t.changes, detail: t.detail };
}

/** The elements `desired` holds in one set or map. */
function elementsIn(desired: NftDesired, name: string): ReadonlyMap<string, string> {
  const fixed = desired.elements.get(name);
  if (fixed !== undefined) return fixed;
  if (name === "src4") return sourceElements(desired.classes.get(4) ?? []);
  if (name === CLS4)
    return new Map((desired.classes.get(4) ?? []).map((c) => [classId(c), `jump ${c.name}`]));
  if (name === "src6") return sourceElements(desired.classes.get(6) ?? []);
  const c = classNamed(desired).get(name);
  if (c === undefined) return new Map();
  return classElements(c, [...(desired.elements.get(`snat${c.family}`)?.values() ?? [])]);
}

/**
 * Whether set `d` of `desired` holds what it held in `before` by identity alone (the planner
 * keeps unchanged lists and classes): its static list, its class, or for src4/src6/cls4 every
 * class of the family; a class map also needs the same SNAT addresses (its verdicts name their
 * index).
 */
function sameSource(
  d: NftSetDef,
  old: NftSetDef | undefined,
  desired: NftDesired,
  before: NftDesired,
): boolean {
  if (old === undefined || !sameDef(old, d)) return false;
  const fixed = desired.elements.get(d.name);
  if (fixed !== undefined) return fixed === before.elements.get(d.name);
  const family = d.name === "src4" || d.name === CLS4 ? 4 : d.name === "src6" ? 6 : undefined;
  if (family !== undefined)
    return sameItems(desired.classes.get(family) ?? [], before.classes.get(family) ?? []);
  const c = classNamed(desired).get(d.name);
  return (
    c !== undefined &&
    classNamed(before).get(d.name) === c &&
    desired.elements.get(`snat${c.family}`) === before.elements.get(`snat${c.family}`)
  );
}

/**
 * A terse read left a set's elements unknown, and the last sync did not make that set the same
 * way (or there was none): read the elements (`Datapath.read()` does so after this error).
 */
export class NftElementsUnknownError extends Error {
  override readonly name = "NftElementsUnknownError";
  constructor(set: string) {
    super(
      `Cannot tell which elements set ${set} of table inet ${NFT_TABLE} holds: it was read without its elements and the last sync did not leave it; the next full sync reads them`,
    );
  }
}

/** The table a sync of `desired` left, as a read would return it. */
function actualOf(desired: NftDesired): NftActual {
  return {
    sets: new Map(
      tableSets(desired).map((d) => [d.name, { def: d, elements: elementsIn(desired, d.name) }]),
    ),
    chains: new Map(
      tableChains(desired).map((c) => [c.name, { base: c.base, ids: c.rules.map(ruleId) }]),
    ),
  };
}

/**
 * Partial: what turns the table the previous sync left (`before`, its desired state) into
 * `desired`. Unchanged classes are skipped by identity (a pod added costs its class, not the
 * 1,000 others); a class whose sources changed costs the sources that came or went.
 */
export function diffNftPartial(desired: NftDesired, before: NftDesired): NftDiff {
  const t = new Transaction();
  const oldSets = new Map(before.sets.map((s) => [s.name, s]));
  const newSets = new Map(desired.sets.map((s) => [s.name, s]));
  for (const d of desired.sets) {
    const o = oldSets.get(d.name);
    if (o === d || (o !== undefined && sameDef(o, d))) continue;
    // A set made again with another definition (rare: an upgrade) rewrites what uses it.
    if (o !== undefined) return diffNftFull(desired, actualOf(before));
    t.newSet(d);
  }
  const oldChains = new Map(before.chains.map((c) => [c.name, c]));
  const newChains = new Map(desired.chains.map((c) => [c.name, c]));
  for (const c of desired.chains) {
    const o = oldChains.get(c.name);
    if (o === undefined) t.newChain(c);
    else if (o !== c && !sameRules(o, c)) writeChain(t, c, true);
  }
  // Static elements (small).
  for (const [name, want] of desired.elements) {
    const have = before.elements.get(name) ?? new Map<string, string>();
    if (have === want) continue;
    diffElements(t, name, want, have, newSets.get(name)?.value !== undefined);
  }
  // Classes that changed: their maps, chains and entries, and the sources that moved.
  const srcAdd = new Map<Family, string[]>();
  const srcDel = new Map<Family, string[]>();
  const clsAdd: string[] = [];
  const clsDel: string[] = [];
  for (const family of new Set([...before.classes.keys(), ...desired.classes.keys()])) {
    const now = desired.classes.get(family) ?? [];
    const was = before.classes.get(family) ?? [];
    const snatNew = desired.elements.get(`snat${family}`);
    const snatOld = before.elements.get(`snat${family}`);
    // The class maps' verdicts name the index of their egress IP: all of them follow a new list.
    const snatMoved = snatNew !== snatOld;
    if (now === was && !snatMoved) continue;
    const eipsNew = [...(snatNew?.values() ?? [])];
    const eipsOld = [...(snatOld?.values() ?? [])];
    const add = getOrInsert(srcAdd, family, () => []);
    const del = getOrInsert(srcDel, family, () => []);
    const fallback = forClassChanges(was, now, snatMoved, (o, c) => {
      if (c === undefined) {
        // Gone: its sources, its id, its chain and its map.
        for (const s of o!.sources) del.push(hostText(s));
        if (family === 4) clsDel.push(classId(o!));
        t.dropChain(o!.name);
        t.dropSet(o!.name, classDefs(o!).map);
        return false;
      }
      const defs = classDefs(c);
      if (o === undefined) {
        t.newSet(defs.map);
        t.newChain(defs.chain);
        diffElements(t, c.name, classElements(c, eipsNew), new Map(), true);
        if (family === 4) clsAdd.push(`${classId(c)} : jump ${c.name}`);
        const value = sourceValue(c);
        for (const s of c.sources) add.push(`${hostText(s)} : ${value}`);
        return false;
      }
      // The same name: the same anchor, so the same id.
      const old = classDefs(o);
      if (!sameDef(old.map, defs.map)) return true;
      if (old.chain !== defs.chain && !sameRules(old.chain, defs.chain))
        writeChain(t, defs.chain, true);
      if (o.entries !== c.entries || snatMoved)
        diffElements(t, c.name, classElements(c, eipsNew), classElements(o, eipsOld), true);
      if (o.sources !== c.sources) {
        const had = new Set(o.sources);
        const has = new Set(c.sources);
        const value = sourceValue(c);
        for (const s of c.sources) if (!had.has(s)) add.push(`${hostText(s)} : ${value}`);
        for (const s of o.sources) if (!has.has(s)) del.push(hostText(s));
      }
      return false;
    });
    // A class map made again with another definition (rare: an upgrade) rewrites what uses it.
    if (fallback) return diffNftFull(desired, actualOf(before));
  }
  // A source that moved to another class is deleted, then added with its new verdict.
  for (const [f, items] of srcDel) t.elements("delete", srcMap(f), items);
  for (const [f, items] of srcAdd) t.elements("add", srcMap(f), items);
  t.elements("delete", CLS4, clsDel);
  t.elements("add", CLS4, clsAdd);
  for (const [name] of oldChains) if (!newChains.has(name)) t.dropChain(name);
  for (const [name, o] of oldSets) if (!newSets.has(name)) t.dropSet(name, o);
  return { payload: t.text(false), changes: t.changes, detail: t.detail };
}

function sameRules(a: NftChainDef, b: NftChainDef): boolean {
  return (
    a.rules.length === b.rules.length &&
    a.rules.every((r, i) => r.text === b.rules[i]!.text && r.comment === b.rules[i]!.comment)
  );
}

/** The whole table as one `nft -f` input (golden files, `sallyport datapath show`). */
export function renderNftTable(desired: NftDesired): string {
  return diffNftFull(desired, undefined).payload;
}
