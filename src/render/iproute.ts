/**
 * Policy routing, the tunnel and egress-IP devices ↔ `ip -batch` / `bridge -batch` input and
 * `ip -json` / `bridge -json` output.
 *
 * Ownership: ip rules at Sallyport's preference, routes in the tables those rules point to, the
 * tunnel device, its neighbour and FDB entries, and links named `spe-*`. Nothing else is read as
 * ours, so nothing else is ever changed.
 */

import { hex } from "../engine/marks.ts";
import { EIP_DEVICE_PREFIX } from "../engine/names.ts";
import type {
  EipPlan,
  FdbPlan,
  IpRulePlan,
  NeighborPlan,
  RoutePlan,
  TunnelPlan,
} from "../engine/plan.ts";
import { canonicalAddress, canonicalCidr, type Family, parseAddress } from "../lib/ip.ts";

// ------------------------------------------------------------------------------------------------
// Parsers of `ip -json` output

interface JsonRule {
  priority?: number;
  fwmark?: string;
  fwmask?: string;
  table?: string;
}

/** All rules of one family, as `ip -json -4|-6 rule show` prints them. */
export function parseRules(json: string, family: Family): (IpRulePlan & { raw: JsonRule })[] {
  const list = JSON.parse(json || "[]") as JsonRule[];
  return list.map((r) => ({
    family,
    pref: r.priority ?? 0,
    fwmark: r.fwmark === undefined ? 0 : Number(r.fwmark),
    mask: r.fwmask === undefined ? 0xffffffff : Number(r.fwmask),
    table: tableNumber(r.table),
    raw: r,
  }));
}

const NAMED_TABLES: Record<string, number> = { local: 255, main: 254, default: 253, unspec: 0 };

function tableNumber(name: string | undefined): number {
  if (name === undefined) return 254;
  return NAMED_TABLES[name] ?? Number(name);
}

interface JsonRoute {
  dst?: string;
  gateway?: string;
  dev?: string;
  table?: string;
  type?: string;
}

export interface ParsedRoute {
  readonly family: Family;
  readonly table: number;
  readonly dst: string;
  readonly via?: string | undefined;
  readonly dev?: string | undefined;
}

/** `ip -json -4|-6 route show table all`. Host routes are printed without a prefix. */
export function parseRoutes(json: string, family: Family): ParsedRoute[] {
  const list = JSON.parse(json || "[]") as JsonRoute[];
  const host = family === 4 ? 32 : 128;
  return list.map((r) => {
    const dst =
      r.dst === undefined || r.dst === "default"
        ? "default"
        : r.dst.includes("/")
          ? canonicalCidr(r.dst)
          : `${canonicalAddress(r.dst)}/${host}`;
    return {
      family,
      table: tableNumber(r.table),
      dst,
      via: r.gateway === undefined ? undefined : canonicalAddress(r.gateway),
      dev: r.dev,
    };
  });
}

interface JsonLink {
  ifname: string;
  link?: string;
  mtu?: number;
  address?: string;
  flags?: string[];
  linkinfo?: { info_kind?: string; info_data?: Record<string, unknown> };
  addr_info?: {
    family: string;
    local: string;
    prefixlen: number;
    valid_life_time?: number;
  }[];
}

/** What `ip -json address show` prints as the valid lifetime of a permanent address. */
const FOREVER = 4294967295;

export interface ParsedLink {
  readonly name: string;
  readonly kind: string | undefined;
  readonly parent: string | undefined;
  readonly mtu: number;
  readonly mac: string;
  readonly up: boolean;
  readonly addresses: readonly string[];
  /**
   * Addresses with a finite valid lifetime (a lease in the kernel: it deletes them when it ends),
   * and the seconds left; the others are permanent.
   */
  readonly leases?: Readonly<Record<string, number>>;
  readonly vxlan?: {
    readonly vni: number;
    readonly port: number;
    readonly local: string | undefined;
    readonly learning: boolean;
    /** Group Based Policy: `gbp` at creation; the kernel refuses to change it afterwards. */
    readonly gbp: boolean;
  };
  readonly macvlanMode?: string | undefined;
}

/** `ip -json -d address show`: links with their kind details and addresses. */
export function parseLinks(json: string): ParsedLink[] {
  const list = JSON.parse(json || "[]") as JsonLink[];
  return list.map((l) => {
    const data = l.linkinfo?.info_data ?? {};
    const kind = l.linkinfo?.info_kind;
    const addrs = (l.addr_info ?? []).filter(
      (a) => a.family === "inet" || (a.family === "inet6" && !a.local.startsWith("fe80:")),
    );
    const cidr = (a: { local: string; prefixlen: number }) =>
      `${canonicalAddress(a.local)}/${a.prefixlen}`;
    const leased = addrs.filter(
      (a) => a.valid_life_time !== undefined && a.valid_life_time !== FOREVER,
    );
    return {
      name: l.ifname,
      kind,
      parent: l.link ?? (kind === "vxlan" ? (data.link as string | undefined) : undefined),
      mtu: l.mtu ?? 0,
      mac: (l.address ?? "").toLowerCase(),
      up: (l.flags ?? []).includes("UP"),
      addresses: addrs.map(cidr),
      ...(leased.length === 0
        ? {}
        : { leases: Object.fromEntries(leased.map((a) => [cidr(a), a.valid_life_time!])) }),
      ...(kind === "vxlan"
        ? {
            vxlan: {
              vni: Number(data.id),
              port: Number(data.port),
              local:
                typeof data.local === "string"
                  ? canonicalAddress(data.local)
                  : typeof data.local6 === "string"
                    ? canonicalAddress(data.local6)
                    : undefined,
              learning: data.learning === true,
              // Printed only when set.
              gbp: data.gbp === true,
            },
          }
        : {}),
      ...(kind === "macvlan" ? { macvlanMode: data.mode as string | undefined } : {}),
    };
  });
}

interface JsonNeigh {
  dst: string;
  lladdr?: string;
  state?: string[];
}

export function parseNeighbors(json: string, dev: string): NeighborPlan[] {
  const list = JSON.parse(json || "[]") as JsonNeigh[];
  return list
    .filter((n) => n.lladdr !== undefined && (n.state ?? []).includes("PERMANENT"))
    .map((n) => {
      const a = parseAddress(n.dst);
      return {
        family: a.family,
        dev,
        address: canonicalAddress(n.dst),
        mac: n.lladdr!.toLowerCase(),
      };
    });
}

interface JsonFdb {
  mac: string;
  dst?: string;
}

export function parseFdb(json: string, dev: string): FdbPlan[] {
  const list = JSON.parse(json || "[]") as JsonFdb[];
  return list
    .filter((f) => f.dst !== undefined && f.mac !== "00:00:00:00:00:00")
    .map((f) => ({ dev, mac: f.mac.toLowerCase(), dst: canonicalAddress(f.dst!) }));
}

// ------------------------------------------------------------------------------------------------
// Actual state, as far as it is ours

export interface ActualRouting {
  readonly rules: readonly IpRulePlan[];
  readonly routes: readonly ParsedRoute[];
  readonly links: readonly ParsedLink[];
  readonly neighbors: readonly NeighborPlan[];
  readonly fdb: readonly FdbPlan[];
}

/** Tables in use on the host that Sallyport did not create (TABLE_NUM must avoid them). */
export function usedTables(state: ActualRouting, rulePref: number): Set<number> {
  const ours = ownTables(state, rulePref);
  const used = new Set<number>([0, 253, 254, 255]);
  for (const r of state.rules) if (!ours.has(r.table)) used.add(r.table);
  for (const r of state.routes) if (!ours.has(r.table)) used.add(r.table);
  return used;
}

/** Tables our rules point to. */
export function ownTables(state: ActualRouting, rulePref: number): Set<number> {
  return new Set(
    state.rules.filter((r) => r.pref === rulePref && r.fwmark !== 0).map((r) => r.table),
  );
}

// ------------------------------------------------------------------------------------------------
// Desired vs actual → batches

export interface RoutingPlan {
  readonly ipRules: readonly IpRulePlan[];
  readonly routes: readonly RoutePlan[];
  readonly tunnel: TunnelPlan | undefined;
  readonly neighbors: readonly NeighborPlan[];
  readonly fdb: readonly FdbPlan[];
  readonly eips: readonly EipPlan[];
}

/**
 * The changes, in the order a sync applies them:
 *  1. `releaseEips`: delete egress-IP devices this node must no longer hold, first of all, so it
 *     stops answering ARP/NDP for them as soon as possible;
 *  2. `tunnel` then `tunnelUp`: create or fix the VXLAN device; per-device sysctls go in between;
 *  3. `ip4`, `ip6` (`ip -batch`) and `bridge`: neighbours, routes, then rules, and the FDB;
 *  4. (iptables and ipsets, elsewhere)
 *  5. `eips` then `eipsUp`: egress-IP devices, created down, sysctls (arp_notify, ndisc_notify,
 *     rp_filter), then up: the kernel announces the address (GARP / unsolicited NA) only after
 *     the SNAT rules for it exist;
 *  6. `remove4`, `remove6`, `removeTunnel`: stale rules and routes, a tunnel no longer wanted.
 */
export interface RoutingDiff {
  readonly releaseEips: string[];
  readonly tunnel: string[];
  readonly tunnelUp: string[];
  readonly ip4: string[];
  readonly ip6: string[];
  readonly bridge: string[];
  readonly eips: string[];
  readonly eipsUp: string[];
  /** Devices created by this diff: their sysctls must be written before they go up. */
  readonly newDevices: string[];
  /** Egress IPs this diff gives the node (their devices made, or made again). */
  readonly newEips: EipPlan[];
  readonly remove4: string[];
  readonly remove6: string[];
  readonly removeTunnel: string[];
  readonly changes: number;
}

function onFamily(f: Family): "ip4" | "ip6" {
  return f === 4 ? "ip4" : "ip6";
}

export interface RoutingOptions {
  readonly rulePref: number;
  readonly tunnelDevice: string;
  /**
   * Egress-IP addresses get this valid and preferred lifetime (a lease in the kernel, which
   * deletes the address when it ends) instead of a permanent one; the agent refreshes it while
   * it knows that it holds the egress IP. Whole seconds, as the kernel counts them.
   */
  readonly eipLeaseSeconds?: number | undefined;
}

function eipCidr(e: EipPlan): string {
  return `${canonicalAddress(e.address)}/${e.family === 4 ? 32 : 128}`;
}

function eipAddressLine(e: EipPlan, lease: number | "forever" | undefined): string {
  const lifetime = lease === undefined ? "" : ` valid_lft ${lease} preferred_lft ${lease}`;
  return `addr replace ${eipCidr(e)} dev ${e.device}${e.family === 6 ? " nodad" : ""}${lifetime}`;
}

/**
 * `ip -force -batch` lines that renew the leases of egress-IP addresses on their devices (a
 * device deleted meanwhile fails its line alone).
 */
export function eipLeaseLines(eips: readonly EipPlan[], seconds: number): string[] {
  return eips.map((e) => eipAddressLine(e, seconds));
}

/** A routing diff that changes nothing. */
export function noRoutingChanges(): RoutingDiff {
  return {
    releaseEips: [],
    tunnel: [],
    tunnelUp: [],
    ip4: [],
    ip6: [],
    bridge: [],
    eips: [],
    eipsUp: [],
    newDevices: [],
    newEips: [],
    remove4: [],
    remove6: [],
    removeTunnel: [],
    changes: 0,
  };
}

export function diffRouting(
  desired: RoutingPlan,
  actual: ActualRouting,
  options: RoutingOptions,
): RoutingDiff {
  const d: RoutingDiff = noRoutingChanges();
  const linkByName = new Map(actual.links.map((l) => [l.name, l]));

  // Tunnel device.
  const tun = desired.tunnel;
  const haveTun = linkByName.get(options.tunnelDevice);
  // A new or recreated tunnel device has lost every route, neighbour and FDB entry on it.
  let tunnelFresh = haveTun === undefined;
  if (tun !== undefined) {
    // The kernel changes none of these on an existing device ("Error: vxlan: cannot change GBP
    // flag.", "Cannot change port."): a device that differs is deleted and made again.
    const recreate =
      haveTun !== undefined &&
      (haveTun.kind !== "vxlan" ||
        haveTun.vxlan?.vni !== tun.vni ||
        haveTun.vxlan?.port !== tun.port ||
        haveTun.vxlan?.local !== canonicalAddress(tun.local) ||
        haveTun.vxlan?.learning !== false ||
        haveTun.vxlan?.gbp !== tun.gbp ||
        haveTun.parent !== tun.parent);
    if (haveTun === undefined || recreate) {
      if (recreate) d.tunnel.push(`link del ${tun.name}`);
      d.tunnel.push(
        `link add ${tun.name} type vxlan id ${tun.vni} dstport ${tun.port} local ${tun.local} dev ${tun.parent} nolearning${tun.gbp ? " gbp" : ""}`,
      );
      d.newDevices.push(tun.name);
    }
    const fresh = haveTun === undefined || recreate;
    tunnelFresh = fresh;
    if (fresh || haveTun.mac !== tun.mac || haveTun.mtu !== tun.mtu) {
      d.tunnel.push(`link set ${tun.name} address ${tun.mac} mtu ${tun.mtu}`);
    }
    const haveAddrs = new Set(fresh ? [] : haveTun.addresses);
    for (const a of tun.addresses) {
      if (!haveAddrs.has(a))
        d.tunnel.push(`addr replace ${a} dev ${tun.name}${a.includes(":") ? " nodad" : ""}`);
    }
    for (const a of fresh ? [] : haveTun.addresses) {
      if (!tun.addresses.includes(a)) d.tunnel.push(`addr del ${a} dev ${tun.name}`);
    }
    if (fresh || !haveTun.up) d.tunnelUp.push(`link set ${tun.name} up`);
  } else if (haveTun !== undefined && haveTun.kind === "vxlan") {
    d.removeTunnel.push(`link del ${options.tunnelDevice}`);
  }

  // Egress-IP devices.
  const wantEips = new Map(desired.eips.map((e) => [e.device, e]));
  const lease = options.eipLeaseSeconds;
  for (const e of desired.eips) {
    const have = linkByName.get(e.device);
    const cidr = eipCidr(e);
    // A device whose address is gone (its lease in the kernel ended, or someone deleted it) is
    // made again, so that it is announced again when it comes up.
    const wrong =
      have !== undefined &&
      (have.kind !== "macvlan" ||
        have.parent !== e.parent ||
        have.mac !== e.mac ||
        !have.addresses.includes(cidr));
    if (have === undefined || wrong) {
      if (wrong) d.eips.push(`link del ${e.device}`);
      d.eips.push(
        `link add ${e.device} link ${e.parent} address ${e.mac} type macvlan mode bridge`,
        eipAddressLine(e, lease),
      );
      d.newDevices.push(e.device);
      d.newEips.push(e);
      d.eipsUp.push(`link set ${e.device} up`);
      continue;
    }
    // Leased or permanent as the options say; a lease's time left is the refresh's business
    // (Datapath.refreshEgressIPs), not drift.
    const leased = have.leases?.[cidr] !== undefined;
    if (leased !== (lease !== undefined)) d.eips.push(eipAddressLine(e, lease ?? "forever"));
    for (const a of have.addresses) if (a !== cidr) d.eips.push(`addr del ${a} dev ${e.device}`);
    if (!have.up) d.eipsUp.push(`link set ${e.device} up`);
  }
  for (const l of actual.links) {
    if (l.name.startsWith(EIP_DEVICE_PREFIX) && !wantEips.has(l.name))
      d.releaseEips.push(`link del ${l.name}`);
  }

  // Neighbours and FDB on the tunnel.
  const key = (n: NeighborPlan) => `${n.family}/${n.address}`;
  const haveNeigh = new Map(actual.neighbors.map((n) => [key(n), n]));
  const wantNeigh = new Set(desired.neighbors.map(key));
  for (const n of desired.neighbors) {
    const h = haveNeigh.get(key(n));
    if (h === undefined || h.mac !== n.mac || tunnelFresh) {
      d[onFamily(n.family)].push(
        `neigh replace ${n.address} lladdr ${n.mac} dev ${n.dev} nud permanent`,
      );
    }
  }
  for (const n of actual.neighbors) {
    if (!wantNeigh.has(key(n)))
      d[n.family === 4 ? "remove4" : "remove6"].push(`neigh del ${n.address} dev ${n.dev}`);
  }
  const fkey = (f: FdbPlan) => `${f.mac}/${f.dst}`;
  const haveFdb = new Set(actual.fdb.map(fkey));
  const wantFdb = new Set(desired.fdb.map(fkey));
  for (const f of desired.fdb) {
    if (!haveFdb.has(fkey(f)) || tunnelFresh) {
      // `replace`, not `append`: the kernel ignores an append for a unicast MAC that already has
      // an entry, and the `del` of the old remote below would then leave none.
      d.bridge.push(`fdb replace ${f.mac} dev ${f.dev} dst ${f.dst} self permanent`);
    }
  }
  for (const f of actual.fdb) {
    if (!wantFdb.has(fkey(f))) d.bridge.push(`fdb del ${f.mac} dev ${f.dev} dst ${f.dst} self`);
  }

  // Routes in our tables.
  const ours = new Set([
    ...ownTables(actual, options.rulePref),
    ...desired.ipRules.map((r) => r.table),
  ]);
  const rkey = (r: { family: Family; table: number; dst: string }) =>
    `${r.family}/${r.table}/${r.dst}`;
  const haveRoutes = new Map(
    actual.routes.filter((r) => ours.has(r.table)).map((r) => [rkey(r), r]),
  );
  const wantRoutes = new Set(desired.routes.map(rkey));
  for (const r of desired.routes) {
    const h = haveRoutes.get(rkey(r));
    if (h === undefined || h.via !== r.via || h.dev !== r.dev || tunnelFresh) {
      d[onFamily(r.family)].push(
        `route replace ${r.dst} via ${r.via} dev ${r.dev} onlink table ${r.table}`,
      );
    }
  }
  for (const [k, r] of haveRoutes) {
    if (!wantRoutes.has(k))
      d[r.family === 4 ? "remove4" : "remove6"].push(`route del ${r.dst} table ${r.table}`);
  }

  // Rules at our preference. Rules go after routes so a rule never points at an empty table.
  const ruleKey = (r: IpRulePlan) => `${r.family}/${r.fwmark}/${r.mask}/${r.table}`;
  const haveRules = new Set(actual.rules.filter((r) => r.pref === options.rulePref).map(ruleKey));
  const wantRules = new Set(desired.ipRules.map(ruleKey));
  for (const r of desired.ipRules) {
    if (!haveRules.has(ruleKey(r))) {
      d[onFamily(r.family)].push(
        `rule add pref ${r.pref} fwmark ${hex(r.fwmark)}/${hex(r.mask)} table ${r.table}`,
      );
    }
  }
  for (const r of actual.rules) {
    if (r.pref === options.rulePref && !wantRules.has(ruleKey(r))) {
      // Rules first when removing: a rule must not outlive its table's routes by much.
      d[r.family === 4 ? "remove4" : "remove6"].unshift(
        `rule del pref ${r.pref} fwmark ${hex(r.fwmark)}/${hex(r.mask)} table ${r.table}`,
      );
    }
  }

  let changes = 0;
  for (const list of Object.values(d)) if (Array.isArray(list)) changes += list.length;
  return { ...d, changes };
}

/** Everything a fresh node needs, as batch text (golden files). */
export function renderRouting(desired: RoutingPlan, options: RoutingOptions): string {
  const d = diffRouting(
    desired,
    { rules: [], routes: [], links: [], neighbors: [], fdb: [] },
    options,
  );
  const section = (title: string, lines: readonly string[]) =>
    lines.length === 0 ? [] : [`# ${title}`, ...lines];
  return `${[
    ...section("ip -batch (tunnel)", [...d.tunnel, ...d.tunnelUp]),
    ...section("ip -4 -batch", d.ip4),
    ...section("ip -6 -batch", d.ip6),
    ...section("bridge -batch", d.bridge),
    ...section("ip -batch (egress IPs, after the SNAT rules)", [...d.eips, ...d.eipsUp]),
  ].join("\n")}\n`;
}
