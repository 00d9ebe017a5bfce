/**
 * A packet tracer over a NodePlan: given a packet (addresses, port, interface, conntrack state and
 * marks), walk it through our chains in hook order, the ipsets they match, the ip rules and routing
 * tables, and report what happens to it: steered through the tunnel toward which node, SNATed to
 * which address, dropped, or left to the usual path. Tests read as a packet's journey; the
 * `explain` command uses the same walk.
 *
 * A policy with several egress IPs spreads new connections round-robin (iptables `-m statistic
 * --mode nth`, nftables `numgen inc`): which one a connection gets depends on the connections
 * before it, so the trace names every address it may leave with.
 *
 * It knows only the rule shapes planNode emits; anything else is reported as an error.
 */
import { cidrContainsAddress, type Family, parseAddress, parseCidr } from "../lib/ip.ts";
import { snatAddresses } from "./classify.ts";
import { hex } from "./marks.ts";
import type { IpSetPlan, NodePlan, Rule, TableName } from "./plan.ts";

export interface Packet {
  readonly src: string;
  readonly dst: string;
  readonly protocol?: "tcp" | "udp" | "sctp";
  readonly dport?: number;
  /** Interface it arrived on; a pod's veth by default. */
  readonly inInterface?: string;
  readonly ctstate?: "NEW" | "ESTABLISHED" | "RELATED" | "INVALID";
  readonly ctdir?: "ORIGINAL" | "REPLY";
  readonly mark?: number;
  readonly connmark?: number;
  /** A SYN without RST (for the MSS clamp). */
  readonly syn?: boolean;
}

export type Verdict = "drop" | "tunnel" | "usual";

export interface Trace {
  readonly verdict: Verdict;
  /** For "tunnel": the routing table and next hop chosen. */
  readonly table?: number | undefined;
  readonly via?: string | undefined;
  /**
   * The source addresses a new connection may leave with: one, or a policy's several of this
   * family (round-robin, in rule order). Undefined: not SNATed here.
   */
  readonly snat?: readonly string[] | undefined;
  /** The policy whose rule decided the packet's path (its key), if one did. */
  readonly policy?: string | undefined;
  readonly mark: number;
  readonly connmark: number;
  /** Our rules that matched, as "table/chain#index: comment or target". */
  readonly steps: readonly string[];
  readonly errors: readonly string[];
}

function inSet(set: IpSetPlan | undefined, address: string): boolean {
  if (set === undefined) return false;
  const a = parseAddress(address);
  let best: { prefix: number; nomatch: boolean } | undefined;
  const consider = (text: string, nomatch: boolean) => {
    const c = parseCidr(text);
    if (!cidrContainsAddress(c, a)) return;
    if (best === undefined || c.prefix > best.prefix) best = { prefix: c.prefix, nomatch };
  };
  for (const m of set.members) consider(m, false);
  for (const m of set.nomatch) consider(m, true);
  return best !== undefined && !best.nomatch;
}

function portMatches(spec: string, port: number | undefined): boolean {
  if (port === undefined) return false;
  return spec.split(",").some((part) => {
    const [a, b] = part.split(":").map(Number);
    return b === undefined ? port === a : port >= a! && port <= b;
  });
}

interface State {
  mark: number;
  connmark: number;
  snat: string[] | undefined;
  policy: string | undefined;
  steps: string[];
  errors: string[];
}

/** Rules a policy owns carry its key as their comment (src/engine/node_plan.ts). */
const POLICY_KEY = /^(EgressPolicy\/[^/\s]+\/[^/\s]+|ClusterEgressPolicy\/[^/\s]+)$/;

type Outcome = "continue" | "accept" | "drop" | "return-to-hook";

export function tracePacket(plan: NodePlan, packet: Packet): Trace {
  if (plan.nft !== undefined) return traceNft(plan, packet);
  const family: Family = parseAddress(packet.dst).family;
  const rules = plan.rules[family];
  const sets = new Map(plan.ipsets.map((s) => [s.name, s]));
  const state: State = {
    mark: packet.mark ?? 0,
    connmark: packet.connmark ?? 0,
    snat: undefined,
    policy: undefined,
    steps: [],
    errors: [],
  };
  const ctstate = packet.ctstate ?? "NEW";
  const ctdir = packet.ctdir ?? "ORIGINAL";
  const iif = packet.inInterface ?? "veth-pod";

  /** The interface a packet leaves by: the tunnel when our routing took it, else the uplink. */
  let oif = "uplink";
  const matches = (rule: Rule): boolean => {
    if (
      rule.destination !== undefined &&
      !cidrContainsAddress(parseCidr(rule.destination), parseAddress(packet.dst))
    )
      return false;
    if (rule.inInterface !== undefined && rule.inInterface !== iif) return false;
    if (rule.outInterface !== undefined && rule.outInterface !== oif) return false;
    if (rule.protocol !== undefined && rule.protocol !== packet.protocol) return false;
    if (rule.tcpSyn === true && packet.syn !== true) return false;
    if (rule.mark !== undefined) {
      const hit = (state.mark & rule.mark.mask) >>> 0 === rule.mark.value >>> 0;
      if (hit === (rule.mark.invert === true)) return false;
    }
    for (const s of rule.sets ?? []) {
      const hit = inSet(sets.get(s.name), s.dir === "src" ? packet.src : packet.dst);
      if (hit === (s.invert === true)) return false;
    }
    if (rule.ctstate !== undefined && !rule.ctstate.includes(ctstate)) return false;
    if (rule.ctdir !== undefined && rule.ctdir !== ctdir) return false;
    if (rule.connmark !== undefined) {
      const hit = (state.connmark & rule.connmark.mask) >>> 0 === rule.connmark.value >>> 0;
      if (hit === (rule.connmark.invert === true)) return false;
    }
    if (rule.dports !== undefined && !portMatches(rule.dports, packet.dport)) return false;
    return true;
  };

  const runChain = (table: TableName, chain: string, depth: number): Outcome => {
    const list = rules.chains.get(table)?.get(chain);
    if (list === undefined) {
      state.errors.push(`no chain ${table}/${chain}`);
      return "continue";
    }
    for (let i = 0; i < list.length; i++) {
      const rule = list[i]!;
      if (!matches(rule)) continue;
      const t = rule.target;
      state.steps.push(`${table}/${chain}#${i + 1}: ${rule.comment ?? t.kind}`);
      if (rule.comment !== undefined && POLICY_KEY.test(rule.comment))
        state.policy ??= rule.comment;
      switch (t.kind) {
        case "ACCEPT":
          return "accept";
        case "DROP":
          return "drop";
        case "RETURN":
          return "continue";
        case "MARK":
          state.mark = ((state.mark & ~t.mask) | (t.value & t.mask)) >>> 0;
          break;
        case "CONNMARK":
          state.connmark = ((state.connmark & ~t.mask) | (t.value & t.mask)) >>> 0;
          break;
        case "RESTORE_MARK":
          state.mark = ((state.mark & ~t.nfmask) ^ (state.connmark & t.ctmask)) >>> 0;
          break;
        case "SNAT":
          state.snat = [...(state.snat ?? []), snatAddressOf(t.to)];
          // Every n-th connection: the others go on to the policy's next address.
          if (rule.statistic !== undefined) break;
          return "accept";
        case "TCPMSS":
          break;
        case "JUMP": {
          const r = runChain(table, t.chain, depth + 1);
          if (r !== "continue") return r;
          break;
        }
        case "GOTO": {
          const r = runChain(table, t.chain, depth + 1);
          // -g: when the target chain ends, processing resumes after the rule that called the
          // chain holding the -g, i.e. our hook returns to the built-in chain.
          return r === "continue" ? "return-to-hook" : r;
        }
      }
    }
    return "continue";
  };

  const runHook = (table: TableName, builtin: string): Outcome => {
    for (const hook of rules.hooks.filter((h) => h.table === table && h.builtin === builtin)) {
      if (hook.rule.target.kind !== "JUMP") continue;
      const r = runChain(table, hook.rule.target.chain, 0);
      if (r === "accept" || r === "drop") return r;
    }
    return "continue";
  };

  const finish = (verdict: Verdict, route?: { table: number; via: string }): Trace => ({
    verdict,
    table: route?.table,
    via: route?.via,
    snat: state.snat,
    policy: state.policy,
    mark: state.mark,
    connmark: state.connmark,
    steps: state.steps,
    errors: state.errors,
  });

  // PREROUTING (mangle)
  if (runHook("mangle", "PREROUTING") === "drop") return finish("drop");

  // Routing: our rules (one preference), then the main table (the usual path).
  let route: { table: number; via: string } | undefined;
  for (const r of plan.ipRules.filter((x) => x.family === family)) {
    if ((state.mark & r.mask) >>> 0 !== r.fwmark >>> 0) continue;
    const dst = parseAddress(packet.dst);
    const candidates = plan.routes
      .filter((x) => x.family === family && x.table === r.table)
      .filter((x) => x.dst === "default" || cidrContainsAddress(parseCidr(x.dst), dst))
      .sort((a, b) => prefixOf(b.dst) - prefixOf(a.dst));
    const hit = candidates[0];
    if (hit !== undefined) {
      route = { table: r.table, via: hit.via };
      state.steps.push(
        `route: fwmark ${hex(r.fwmark)}/${hex(r.mask)} → table ${r.table} via ${hit.via}`,
      );
      break;
    }
  }

  // FORWARD (mangle, filter), POSTROUTING (mangle, nat)
  if (route !== undefined) oif = plan.tunnel?.name ?? "sallyport";
  if (runHook("mangle", "FORWARD") === "drop") return finish("drop");
  if (runHook("filter", "FORWARD") === "drop") return finish("drop");
  runHook("mangle", "POSTROUTING");
  if (ctstate === "NEW") runHook("nat", "POSTROUTING");
  return finish(route === undefined ? "usual" : "tunnel", route);
}

/** The address of a SNAT target: `10.0.0.1`, `10.0.0.1:5000-5009`, `[fd00::1]:5000-5009`. */
function snatAddressOf(to: string): string {
  if (to.startsWith("[")) return to.slice(1, to.indexOf("]"));
  return to.split(":").length === 2 ? to.slice(0, to.indexOf(":")) : to;
}

function prefixOf(dst: string): number {
  return dst === "default" ? 0 : parseCidr(dst).prefix;
}

// ------------------------------------------------------------------------------------------------
// The nftables datapath: the same journey through the `inet sallyport` table (see
// src/render/nftables.ts), evaluated from the plan's classes rather than from rule text.

const SNAT_PREFIX = 0x28000000;
const KEEP = 0x12000000;

function inRange(text: string, address: ReturnType<typeof parseAddress>): boolean {
  if (text.includes("-")) {
    const [a, b] = text.split("-").map((x) => parseAddress(x).value);
    return a! <= address.value && address.value <= b!;
  }
  return cidrContainsAddress(
    parseCidr(text.includes("/") ? text : `${text}/${address.family === 4 ? 32 : 128}`),
    address,
  );
}

const PROTOCOL_NUMBER = { tcp: 6, udp: 17, sctp: 132 } as const;

function traceNft(plan: NodePlan, packet: Packet): Trace {
  const nft = plan.nft!;
  const dst = parseAddress(packet.dst);
  const family: Family = dst.family;
  const ctstate = packet.ctstate ?? "NEW";
  const ctdir = packet.ctdir ?? "ORIGINAL";
  const iif = packet.inInterface ?? "veth-pod";
  const tunnel = plan.tunnel?.name ?? "sallyport";
  let mark = packet.mark ?? 0;
  let connmark = packet.connmark ?? 0;
  let snat: readonly string[] | undefined;
  let candidates: readonly string[] | undefined;
  let policy: string | undefined;
  const steps: string[] = [];
  const setMark = (value: number) => {
    mark = ((mark & 0xff) | value) >>> 0;
  };
  /** A group's chain sends the connection to one of its addresses' chains (round-robin): the
   * trace follows the first and names them all. */
  const snatHere = (eips: readonly string[]) => {
    candidates = eips;
    if (eips.length > 1) steps.push(`nft/snat: round-robin over ${eips.join(", ")}`);
    const index = (nft.snat[family] ?? []).indexOf(eips[0]!);
    if (iif === tunnel && ctstate === "NEW")
      connmark = ((connmark & 0x00ffffff) | 0x27000000) >>> 0;
    setMark((SNAT_PREFIX | ((index & 0x3f) << 8) | ((index >> 6) << 16)) >>> 0);
  };
  const done = (verdict: Verdict, route?: { table: number; via: string }): Trace => ({
    verdict,
    table: route?.table,
    via: route?.via,
    snat,
    policy,
    mark,
    connmark,
    steps,
    errors: [],
  });

  // prerouting
  const held = (nft.held[family] ?? []).some((c) => inRange(c, dst));
  if (held && ctstate !== "ESTABLISHED" && ctstate !== "RELATED") {
    steps.push("nft/prerouting: egress IPs expose no service → drop");
    return done("drop");
  }
  let decided = false;
  if (ctdir === "REPLY") {
    if ((connmark & 0xff000000) >>> 0 === 0x27000000) {
      steps.push("nft/prerouting: replies go back through the tunnel");
      setMark(0x27000000);
    }
    decided = true;
  } else if (
    (ctstate === "ESTABLISHED" || ctstate === "RELATED") &&
    (connmark & 0xff000000) >>> 0 !== 0x26000000
  ) {
    steps.push("nft/prerouting: connections we never steered keep their path");
    decided = true;
  }
  if (!decided) {
    const src = parseAddress(packet.src);
    const cls = (nft.classes[family] ?? []).find((c) => c.sources.some((s) => inRange(s, src)));
    const proto = packet.protocol === undefined ? 1 : PROTOCOL_NUMBER[packet.protocol];
    const port = packet.dport ?? 0;
    const entry = cls?.entries.find(
      (e) =>
        inRange(e.dst, dst) &&
        e.l4.proto[0] <= proto &&
        proto <= e.l4.proto[1] &&
        e.l4.port[0] <= port &&
        port <= e.l4.port[1],
    );
    if (cls !== undefined) steps.push(`nft/prerouting: source in class ${cls.name}`);
    if (cls !== undefined && entry !== undefined) {
      steps.push(`nft/${cls.name}: ${entry.dst} → ${entry.verdict.kind} (${entry.policy})`);
      policy = entry.policy;
      const v = entry.verdict;
      if (v.kind === "drop") return done("drop");
      if (v.kind === "steer") {
        if (iif === tunnel) {
          steps.push(`nft/to-${v.nodeID}: another node holds the egress IPs → drop`);
          return done("drop");
        }
        connmark =
          v.tunnelClass === undefined
            ? ((connmark & 0x00ffffff) | 0x26000000) >>> 0
            : ((connmark & 0x00ff0000) | 0x26000000 | v.tunnelClass) >>> 0;
        setMark((0x26000000 | (v.nodeID << 8)) >>> 0);
      } else snatHere(snatAddresses(v));
    } else {
      const byClass =
        iif === tunnel
          ? nft.tunnelClasses?.[family]?.find((c) => c.tunnelClass === (mark & 0xffff))
          : undefined;
      if (byClass !== undefined) {
        steps.push(
          `nft/prerouting: a pod not classified yet: tunnel class ${byClass.tunnelClass} (${byClass.policy})`,
        );
        policy = byClass.policy;
        snatHere(byClass.eips);
      } else if (iif === tunnel) {
        steps.push("nft/prerouting: tunnel traffic no policy here claims → drop");
        return done("drop");
      }
    }
  }

  // routing: our ip rules, then the usual path
  let route: { table: number; via: string } | undefined;
  for (const r of plan.ipRules.filter((x) => x.family === family)) {
    if ((mark & r.mask) >>> 0 !== r.fwmark >>> 0) continue;
    const hit = plan.routes
      .filter((x) => x.family === family && x.table === r.table)
      .filter((x) => x.dst === "default" || cidrContainsAddress(parseCidr(x.dst), dst))
      .sort((a, b) => prefixOf(b.dst) - prefixOf(a.dst))[0];
    if (hit !== undefined) {
      route = { table: r.table, via: hit.via };
      steps.push(`route: fwmark ${hex(r.fwmark)}/${hex(r.mask)} → table ${r.table} via ${hit.via}`);
      break;
    }
  }
  // forward: no pod sends into the tunnel; steered → keep; postrouting: the tunnel class into the
  // VXLAN header, keep → no SNAT, SNAT mark → the egress IP
  const peers = nft.tunnelPeers;
  if (
    peers !== undefined &&
    packet.protocol === "udp" &&
    packet.dport === peers.port &&
    (peers.peers[family] ?? []).includes(packet.dst)
  ) {
    steps.push("nft/forward: no pod sends into the tunnel → drop");
    return done("drop");
  }
  if ((mark & 0xfe000000) >>> 0 === 0x26000000) setMark(KEEP);
  if (route !== undefined && (mark & 0xffff0000) >>> 0 === KEEP && (connmark & 0xffff) !== 0) {
    mark = ((connmark & 0xffff) | KEEP) >>> 0;
    steps.push(`nft/tunnel-out: tunnel class ${connmark & 0xffff} into the VXLAN header`);
  }
  if (ctstate === "NEW" && (mark & 0xff000000) >>> 0 === SNAT_PREFIX) {
    const index = ((mark >>> 8) & 0x3f) | (((mark >>> 16) & 0xff) << 6);
    const address = nft.snat[family]?.[index];
    snat = candidates ?? (address === undefined ? undefined : [address]);
    steps.push(`nft/postrouting: SNAT to ${snat?.join(" or ")}`);
  }
  return done(route === undefined ? "usual" : "tunnel", route);
}
