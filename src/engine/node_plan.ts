/**
 * planNode(view) → NodePlan: the datapath one node must carry. Pure: no clock, kernel or API.
 *
 * Layout (per family, see docs/datapath.md for the packet walk):
 *
 *   mangle PREROUTING  1 → SALLYPORT-MARK-REQUEST   steer: first matching policy wins (-g)
 *   mangle FORWARD     1 → SALLYPORT-RESET-MARK     steered → keep mark (+ MSS clamp)
 *   mangle POSTROUTING 1 → SALLYPORT-KEEP-MARK      keep mark → ACCEPT
 *   filter FORWARD     1 → SALLYPORT-FORWARD        keep mark / from tunnel → ACCEPT
 *   filter OUTPUT      1 → SALLYPORT-KEEP-MARK      keep mark → ACCEPT (the VXLAN outer packet)
 *   nat    POSTROUTING 1 → SALLYPORT-NO-SNAT        keep mark → ACCEPT (no CNI masquerade)
 *   nat    POSTROUTING 2 → SALLYPORT-SNAT-EIP       gateway: SNAT --to-source EIP
 *
 * NO-SNAT comes before SNAT-EIP (the seed has them the other way round): a packet that this node
 * steers to another gateway must never be rewritten by a local SNAT rule of a lower-precedence
 * policy whose gateway happens to be this node.
 */
import type { PortSpec } from "../api/types.ts";
import {
  cidrContains,
  FAMILIES,
  type Family,
  familyOfText,
  hostCidr,
  normalizeCidrList,
  parseAddress,
  parseCidr,
} from "../lib/ip.ts";
import {
  KEEP_MARK,
  MARK_WRITE_MASK,
  nodeMark,
  PREFIX_MASK,
  REPLY_PREFIX,
  STEER_PREFIX,
  STEERED_MATCH_MASK,
} from "./marks.ts";
import {
  CHAIN_GATEWAY,
  CHAIN_KEEP_MARK,
  CHAIN_MARK_REQUEST,
  CHAIN_NO_SNAT,
  CHAIN_REPLY,
  CHAIN_RESET_MARK,
  CHAIN_SNAT_EIP,
  eipDeviceName,
  eipMac,
  eipSetName,
  ignoreSetName,
  policySetName,
  steerChain,
} from "./names.ts";
import type {
  EipPlan,
  FamilyRules,
  FdbPlan,
  Hook,
  IpRulePlan,
  IpSetPlan,
  NeighborPlan,
  NodePlan,
  RoutePlan,
  Rule,
  SetMatch,
  SysctlPlan,
  TableName,
  TunnelPlan,
} from "./plan.ts";
import { comparePrecedence } from "./precedence.ts";
import { assignTables } from "./tables.ts";
import type { NodeView, PeerView, PolicyView } from "./view.ts";

export const CHAIN_FORWARD = "SALLYPORT-FORWARD";
export const REPLY_TABLE_KEY = "reply";

const ANY: Record<Family, readonly string[]> = {
  4: ["0.0.0.0/1", "128.0.0.0/1"],
  6: ["::/1", "8000::/1"],
};

const VXLAN_OVERHEAD: Record<Family, number> = { 4: 50, 6: 70 };

/** Families a policy carries traffic for: those of its destinations (all when none). */
export function policyFamilies(policy: PolicyView, families: readonly Family[]): Family[] {
  if (policy.destinationCIDRs.length === 0) return [...families];
  const present = new Set(policy.destinationCIDRs.map((c) => familyOfText(c)));
  return families.filter((f) => present.has(f));
}

/** multiport takes at most 15 ports, a range counting as two. */
function portRules(
  ports: readonly PortSpec[],
): { protocol: "tcp" | "udp" | "sctp"; dports?: string }[] {
  if (ports.length === 0) return [];
  const byProtocol = new Map<"tcp" | "udp" | "sctp", string[] | "all">();
  for (const p of ports) {
    const protocol = (p.protocol ?? "TCP").toLowerCase() as "tcp" | "udp" | "sctp";
    if (p.port === undefined) {
      byProtocol.set(protocol, "all");
      continue;
    }
    const current = byProtocol.get(protocol);
    if (current === "all") continue;
    const entry =
      p.endPort !== undefined && p.endPort !== p.port ? `${p.port}:${p.endPort}` : `${p.port}`;
    byProtocol.set(protocol, [...(current ?? []), entry]);
  }
  const out: { protocol: "tcp" | "udp" | "sctp"; dports?: string }[] = [];
  for (const protocol of ["tcp", "udp", "sctp"] as const) {
    const entries = byProtocol.get(protocol);
    if (entries === undefined) continue;
    if (entries === "all") {
      out.push({ protocol });
      continue;
    }
    let chunk: string[] = [];
    let weight = 0;
    for (const e of [...new Set(entries)]) {
      const w = e.includes(":") ? 2 : 1;
      if (weight + w > 15) {
        out.push({ protocol, dports: chunk.join(",") });
        chunk = [];
        weight = 0;
      }
      chunk.push(e);
      weight += w;
    }
    if (chunk.length > 0) out.push({ protocol, dports: chunk.join(",") });
  }
  return out;
}

/**
 * One string instance per set member text: consecutive plans then share their members, and the
 * datapath's "is this set unchanged?" check on 100,000 members is a pointer comparison each
 * instead of a character comparison (datapath bench: one pod added, 24 → 17 ms).
 * Bounded: cleared when it outgrows any realistic node.
 */
const INTERNED = new Map<string, string>();
function intern(text: string): string {
  const known = INTERNED.get(text);
  if (known !== undefined) return known;
  if (INTERNED.size >= 4_000_000) INTERNED.clear();
  INTERNED.set(text, text);
  return text;
}

function ipsOfFamily(ips: readonly string[], family: Family): string[] {
  const out: string[] = [];
  for (const ip of ips) {
    const a = parseAddress(ip);
    if (a.family === family) out.push(hostCidr(a));
  }
  return out;
}

function mark(value: number, mask: number, invert = false) {
  return invert ? { value, mask, invert } : { value, mask };
}

class FamilyBuilder {
  readonly chains = new Map<TableName, Map<string, Rule[]>>([
    ["filter", new Map()],
    ["nat", new Map()],
    ["mangle", new Map()],
  ]);
  readonly hooks: Hook[] = [];

  chain(table: TableName, name: string): Rule[] {
    const chains = this.chains.get(table)!;
    let rules = chains.get(name);
    if (rules === undefined) {
      rules = [];
      chains.set(name, rules);
    }
    return rules;
  }

  hook(table: TableName, builtin: string, chain: string, comment: string): void {
    const position =
      this.hooks.filter((h) => h.table === table && h.builtin === builtin).length + 1;
    this.hooks.push({
      table,
      builtin,
      position,
      rule: { comment, target: { kind: "JUMP", chain } },
    });
  }

  build(): FamilyRules {
    return { chains: this.chains, hooks: this.hooks };
  }
}

/**
 * Where replies to a pod go back through the tunnel: its node's pod CIDR when it lies inside one
 * (pod CIDRs of different nodes never overlap, so one route per node is exact and the reply table
 * grows with nodes, not pods), else the pod's own address.
 */
function replyDestination(hostCidrText: string, peer: PeerView): string {
  const address = parseCidr(hostCidrText);
  const covering = (peer.podCIDRs ?? []).find((c) => cidrContains(parseCidr(c), address));
  return covering ?? hostCidrText;
}

type Decision =
  | {
      readonly kind: "gateway";
      readonly sources: string[];
      readonly replies: { dst: string; peer: PeerView }[];
    }
  | { readonly kind: "steer"; readonly sources: string[]; readonly gateway: PeerView }
  | { readonly kind: "drop"; readonly sources: string[] };

/** What `view.node` does with `policy`'s traffic of one family; undefined: nothing at all. */
function decide(
  view: NodeView,
  policy: PolicyView,
  family: Family,
  hasTunnel: boolean,
): Decision | undefined {
  if (!policyFamilies(policy, view.config.families).includes(family)) return undefined;
  if (policy.gatewayNode !== undefined && policy.snat[family] === undefined) return undefined;
  const isGateway = policy.gatewayNode === view.node;
  const sources = new Set<string>();
  for (const ep of policy.endpoints) {
    if (isGateway || ep.node === view.node)
      for (const c of ipsOfFamily(ep.ips, family)) sources.add(c);
  }
  const sorted = normalizeCidrList(sources).map(intern);
  if (isGateway) {
    const replies: { dst: string; peer: PeerView }[] = [];
    for (const ep of policy.endpoints) {
      if (ep.node === view.node) continue;
      const peer = view.peers.get(ep.node);
      if (peer === undefined || peer.underlay === undefined || peer.tunnel[family] === undefined)
        continue;
      for (const c of ipsOfFamily(ep.ips, family))
        replies.push({ dst: replyDestination(c, peer), peer });
    }
    return { kind: "gateway", sources: sorted, replies };
  }
  if (sorted.length === 0) return undefined;
  const gateway = policy.gatewayNode === undefined ? undefined : view.peers.get(policy.gatewayNode);
  if (
    !hasTunnel ||
    gateway === undefined ||
    gateway.underlay === undefined ||
    gateway.tunnel[family] === undefined
  ) {
    return { kind: "drop", sources: sorted };
  }
  return { kind: "steer", sources: sorted, gateway };
}

export function planNode(view: NodeView): NodePlan {
  const { config, local } = view;
  const families = config.families;
  const tunnel = config.tunnelDevice;
  const self = view.peers.get(view.node);
  const policies = [...view.policies].sort(comparePrecedence);
  const errors: string[] = [];

  // --- the tunnel device and the sysctls the path needs
  let tunnelPlan: TunnelPlan | undefined;
  const underlayAddress = local.underlay.ipv4 ?? local.underlay.ipv6;
  if (self !== undefined && underlayAddress !== undefined) {
    const outer = parseAddress(underlayAddress).family;
    tunnelPlan = {
      name: tunnel,
      vni: config.vni,
      port: config.port,
      local: underlayAddress,
      parent: local.underlay.device,
      mtu: local.underlay.mtu - VXLAN_OVERHEAD[outer],
      mac: self.mac,
      addresses: FAMILIES.filter((f) => families.includes(f) && self.tunnel[f] !== undefined).map(
        (f) => hostCidr(parseAddress(self.tunnel[f]!)),
      ),
    };
  } else if (self === undefined) {
    errors.push(`Cannot build the tunnel: node ${view.node} has no identity yet (no EgressNode)`);
  } else {
    errors.push(`Cannot build the tunnel: node ${view.node} has no underlay address`);
  }

  // Peers this node must reach through the tunnel: gateway nodes it steers to, and (when it is a
  // gateway) the nodes whose pods' replies it sends back.
  const steerTargets = new Map<string, PeerView>();
  const replyTargets = new Map<string, PeerView>();
  const ipsets = new Map<string, IpSetPlan>();
  const perFamily = new Map<Family, FamilyBuilder>();
  const replyRoutes: { family: Family; dst: string; peer: PeerView }[] = [];
  const eips = new Map<string, EipPlan>();

  // First pass: what this node does with each policy's traffic, per family. The routing tables
  // (TABLE_NUM) follow from it, and a peer that gets no table makes its traffic fail closed.
  const decisions = new Map<string, Decision>();
  for (const family of families) {
    for (const policy of policies) {
      const d = decide(view, policy, family, tunnelPlan !== undefined);
      if (d !== undefined) decisions.set(`${family}/${policy.key}`, d);
    }
  }
  const tableKeys = new Set<string>();
  for (const d of decisions.values()) {
    if (d.kind === "steer") tableKeys.add(`node/${d.gateway.name}`);
    if (d.kind === "gateway" && d.replies.length > 0) tableKeys.add(REPLY_TABLE_KEY);
  }
  const choice = assignTables([...tableKeys], {
    range: config.tableRange,
    used: local.usedTables,
    existing: local.existingTables,
    random: local.random,
  });
  errors.push(...choice.errors);

  for (const family of families) {
    const fb = new FamilyBuilder();
    perFamily.set(family, fb);
    const ignore = ignoreSetName(family);
    const eipSet = eipSetName(family);
    ipsets.set(ignore, {
      name: ignore,
      family,
      members: view.ignoreCIDRs.filter((c) => familyOfText(c) === family),
      nomatch: [],
    });
    const held = new Set<string>();
    for (const p of policies) {
      if (p.gatewayNode !== view.node) continue;
      for (const address of p.floating) {
        if (familyOfText(address) === family) held.add(hostCidr(parseAddress(address)));
      }
    }
    ipsets.set(eipSet, { name: eipSet, family, members: normalizeCidrList(held), nomatch: [] });

    // --- static chains
    fb.hook("mangle", "PREROUTING", CHAIN_MARK_REQUEST, "sallyport: steer egress traffic");
    fb.hook("mangle", "FORWARD", CHAIN_RESET_MARK, "sallyport: keep steered traffic");
    fb.hook("mangle", "POSTROUTING", CHAIN_KEEP_MARK, "sallyport: keep steered traffic");
    fb.hook("filter", "FORWARD", CHAIN_FORWARD, "sallyport: accept steered traffic");
    fb.hook("filter", "OUTPUT", CHAIN_KEEP_MARK, "sallyport: accept steered traffic");
    fb.hook("nat", "POSTROUTING", CHAIN_NO_SNAT, "sallyport: no snat for steered traffic");
    fb.hook("nat", "POSTROUTING", CHAIN_SNAT_EIP, "sallyport: snat to egress IPs");

    const markRequest = fb.chain("mangle", CHAIN_MARK_REQUEST);
    markRequest.push(
      {
        sets: [{ name: eipSet, dir: "dst" }],
        ctstate: ["INVALID", "NEW", "UNTRACKED"],
        comment: "sallyport: egress IPs expose no service",
        target: { kind: "DROP" },
      },
      {
        ctdir: "REPLY",
        connmark: mark(REPLY_PREFIX, PREFIX_MASK),
        comment: "sallyport: replies go back through the tunnel",
        target: { kind: "GOTO", chain: CHAIN_REPLY },
      },
      { ctdir: "REPLY", target: { kind: "RETURN" } },
      {
        ctstate: ["RELATED", "ESTABLISHED"],
        connmark: mark(STEER_PREFIX, PREFIX_MASK, true),
        comment: "sallyport: connections we never steered keep their path",
        target: { kind: "RETURN" },
      },
    );
    fb.chain("mangle", CHAIN_REPLY).push(
      { target: { kind: "MARK", value: REPLY_PREFIX, mask: MARK_WRITE_MASK } },
      { target: { kind: "ACCEPT" } },
    );
    fb.chain("mangle", CHAIN_GATEWAY).push({
      inInterface: tunnel,
      ctstate: ["NEW"],
      comment: "sallyport: remember flows that came through the tunnel",
      target: { kind: "CONNMARK", value: REPLY_PREFIX, mask: PREFIX_MASK },
    });
    const resetMark = fb.chain("mangle", CHAIN_RESET_MARK);
    resetMark.push(
      {
        protocol: "tcp",
        mark: mark(STEER_PREFIX, STEERED_MATCH_MASK),
        tcpSyn: true,
        comment: "sallyport: fit the tunnel MTU",
        target: { kind: "TCPMSS" },
      },
      {
        mark: mark(STEER_PREFIX, STEERED_MATCH_MASK),
        target: { kind: "MARK", value: KEEP_MARK, mask: MARK_WRITE_MASK },
      },
    );
    const keep: Rule = { mark: mark(KEEP_MARK, MARK_WRITE_MASK), target: { kind: "ACCEPT" } };
    fb.chain("mangle", CHAIN_KEEP_MARK).push(keep);
    fb.chain("filter", CHAIN_KEEP_MARK).push(keep);
    fb.chain("filter", CHAIN_FORWARD).push(keep, {
      inInterface: tunnel,
      comment: "sallyport: traffic from the tunnel",
      target: { kind: "ACCEPT" },
    });
    const noSnat = fb.chain("nat", CHAIN_NO_SNAT);
    noSnat.push(keep);
    const snat = fb.chain("nat", CHAIN_SNAT_EIP);

    // --- policies, in precedence order: the first rule that matches a packet decides.
    for (const policy of policies) {
      const decision = decisions.get(`${family}/${policy.key}`);
      if (decision === undefined) continue;
      const isGateway = decision.kind === "gateway";
      const snatTo = policy.snat[family];
      if (isGateway) {
        for (const address of policy.floating) {
          if (familyOfText(address) !== family || eips.has(address)) continue;
          eips.set(address, {
            device: eipDeviceName(address),
            parent: policy.announceInterface ?? local.underlay.device,
            mac: eipMac(address),
            address,
            family,
          });
        }
      }
      if (decision.sources.length === 0) continue;

      const src = policySetName("src", family, policy.key);
      const dst = policySetName("dst", family, policy.key);
      const destinations = policy.destinationCIDRs.filter((c) => familyOfText(c) === family);
      ipsets.set(src, { name: src, family, members: decision.sources, nomatch: [] });
      ipsets.set(dst, {
        name: dst,
        family,
        members: destinations.length > 0 ? destinations : [...ANY[family]],
        nomatch: policy.excludedCIDRs.filter((c) => familyOfText(c) === family),
      });
      const sets: SetMatch[] = [
        { name: src, dir: "src" },
        { name: dst, dir: "dst" },
        { name: ignore, dir: "dst", invert: true },
      ];
      const matches = portRules(policy.ports);
      const variants = matches.length === 0 ? [{}] : matches;

      let action: Rule["target"];
      if (decision.kind === "gateway") {
        action = { kind: "GOTO", chain: CHAIN_GATEWAY };
        if (choice.tables.has(REPLY_TABLE_KEY)) {
          for (const r of decision.replies) {
            replyTargets.set(r.peer.name, r.peer);
            replyRoutes.push({ family, dst: r.dst, peer: r.peer });
          }
        }
      } else if (decision.kind === "steer" && choice.tables.has(`node/${decision.gateway.name}`)) {
        const gateway = decision.gateway;
        steerTargets.set(gateway.name, gateway);
        const chain = fb.chain("mangle", steerChain(gateway.nodeID));
        if (chain.length === 0) {
          chain.push(
            { target: { kind: "CONNMARK", value: STEER_PREFIX, mask: PREFIX_MASK } },
            { target: { kind: "MARK", value: nodeMark(gateway.nodeID), mask: MARK_WRITE_MASK } },
            { target: { kind: "ACCEPT" } },
          );
        }
        action = { kind: "GOTO", chain: steerChain(gateway.nodeID) };
      } else {
        // No node holds this policy's egress IP, it cannot be reached, or no routing table is
        // free for it: fail closed rather than let the traffic out with another address.
        action = { kind: "DROP" };
      }
      for (const v of variants) {
        markRequest.push({ ...v, sets, comment: policy.key, target: action });
        if (config.noSnatBySets && !isGateway && action.kind === "GOTO") {
          noSnat.push({
            ...v,
            sets: sets.slice(0, 2),
            comment: policy.key,
            target: { kind: "ACCEPT" },
          });
        } else if (config.noSnatBySets && isGateway) {
          noSnat.push({
            ...v,
            sets: sets.slice(0, 2),
            comment: policy.key,
            target: { kind: "RETURN" },
          });
        }
        if (isGateway && snatTo !== undefined) {
          snat.push({ ...v, sets, comment: policy.key, target: { kind: "SNAT", to: snatTo } });
        }
      }
    }
    markRequest.push({
      inInterface: tunnel,
      comment: "sallyport: tunnel traffic no policy here claims",
      target: { kind: "DROP" },
    });
  }

  // --- routing: one table per gateway peer (TABLE_NUM), one for replies.
  const ipRules: IpRulePlan[] = [];
  const routes: RoutePlan[] = [];
  const neighbors = new Map<string, NeighborPlan>();
  const fdb = new Map<string, FdbPlan>();
  const addPeer = (peer: PeerView) => {
    for (const family of families) {
      const address = peer.tunnel[family];
      if (address === undefined) continue;
      neighbors.set(`${family}/${address}`, { family, dev: tunnel, address, mac: peer.mac });
    }
    if (peer.underlay !== undefined)
      fdb.set(peer.mac, { dev: tunnel, mac: peer.mac, dst: peer.underlay });
  };
  for (const peer of steerTargets.values()) {
    const table = choice.tables.get(`node/${peer.name}`);
    if (table === undefined) continue;
    addPeer(peer);
    for (const family of families) {
      const via = peer.tunnel[family];
      if (via === undefined) continue;
      ipRules.push({
        family,
        pref: config.rulePref,
        fwmark: nodeMark(peer.nodeID),
        mask: MARK_WRITE_MASK,
        table,
      });
      routes.push({ family, table, dst: "default", via, dev: tunnel });
    }
  }
  const replyTable = choice.tables.get(REPLY_TABLE_KEY);
  if (replyTable !== undefined) {
    for (const peer of replyTargets.values()) addPeer(peer);
    const seen = new Set<string>();
    for (const { family, dst, peer } of replyRoutes) {
      if (seen.has(dst)) continue;
      seen.add(dst);
      routes.push({ family, table: replyTable, dst, via: peer.tunnel[family]!, dev: tunnel });
    }
    for (const family of families) {
      if (replyRoutes.some((r) => r.family === family)) {
        ipRules.push({
          family,
          pref: config.rulePref,
          fwmark: REPLY_PREFIX,
          mask: PREFIX_MASK,
          table: replyTable,
        });
      }
    }
  }

  const sysctls: SysctlPlan[] = [];
  if (families.includes(4)) sysctls.push({ path: "net/ipv4/ip_forward", value: "1" });
  if (families.includes(6)) sysctls.push({ path: "net/ipv6/conf/all/forwarding", value: "1" });
  if (tunnelPlan !== undefined && families.includes(4)) {
    // Requests reach a gateway, and replies reach the source node, on the tunnel while the
    // reverse path of their source is elsewhere: strict rp_filter would drop them
    // (spidernet-io/egressgateway#1797 on Rocky Linux, where the default is 1).
    sysctls.push({ path: `net/ipv4/conf/${tunnel}/rp_filter`, value: "2" });
  }

  const sortedIpsets = [...ipsets.values()].sort((a, b) =>
    a.name < b.name ? -1 : a.name > b.name ? 1 : 0,
  );
  const rules = {} as Record<Family, FamilyRules>;
  for (const family of families) rules[family] = perFamily.get(family)!.build();
  return {
    node: view.node,
    ipsets: sortedIpsets,
    rules,
    ipRules: ipRules.sort((a, b) => a.family - b.family || a.fwmark - b.fwmark),
    routes: routes.sort(
      (a, b) => a.family - b.family || a.table - b.table || compareDst(a.dst, b.dst),
    ),
    tunnel: tunnelPlan,
    neighbors: [...neighbors.values()].sort(
      (a, b) => a.family - b.family || (a.address < b.address ? -1 : 1),
    ),
    fdb: [...fdb.values()].sort((a, b) => (a.mac < b.mac ? -1 : 1)),
    eips: [...eips.values()].sort((a, b) => (a.device < b.device ? -1 : 1)),
    sysctls,
    tables: choice.tables,
    errors,
  };
}

function compareDst(a: string, b: string): number {
  if (a === b) return 0;
  if (a === "default") return -1;
  if (b === "default") return 1;
  const ca = parseCidr(a);
  const cb = parseCidr(b);
  return ca.base < cb.base ? -1 : ca.base > cb.base ? 1 : ca.prefix - cb.prefix;
}
