/**
 * Makes the kernel hold a NodePlan, and only touches what Sallyport owns.
 *
 * Every sync re-reads the kernel (iptables-save, ipset save, ip -json), diffs it against the
 * plan with the renderers, and applies the difference in an order that never leaves a rule
 * pointing at a missing set or a route through a missing device:
 *
 *   1. release egress IPs this node must give up (stop answering ARP/NDP first)
 *   2. create/update ipsets          (ipset restore -exist)
 *   3. tunnel device, its sysctls, up
 *   4. neighbours, routes, rules     (ip -4/-6 -batch), FDB (bridge -batch)
 *   5. iptables, ip6tables           (*-restore --noflush, only changed chains)
 *   6. egress-IP devices, sysctls, up: the kernel then announces them (GARP / unsolicited NA)
 *   7. stale rules, routes, tunnel, ipsets
 *
 * A failed command stops the sync; its input and the kernel's error are in the thrown
 * DatapathError, and the next sync starts over from a fresh read.
 */

import { isOwnedSet } from "../engine/names.ts";
import type { FamilyRules, IpSetPlan, NodePlan, SysctlPlan } from "../engine/plan.ts";
import { type Clock, realClock } from "../lib/clock.ts";
import type { Family } from "../lib/ip.ts";
import {
  type ActualRouting,
  diffRouting,
  eipLeaseLines,
  noRoutingChanges,
  type ParsedLink,
  parseFdb,
  parseLinks,
  parseNeighbors,
  parseRoutes,
  parseRules,
  type RoutingDiff,
  type RoutingPlan,
} from "../render/iproute.ts";
import { diffIpsets, parseIpsetSave, parseIpsetTerse, type SavedSet } from "../render/ipset.ts";
import { diffRules, parseSave, ruleText, type SavedState, TABLES } from "../render/iptables.ts";
import {
  desiredTable,
  diffNftFull,
  diffNftPartial,
  NFT_TABLE,
  type NftActual,
  type NftDesired,
  NftElementsUnknownError,
  parseNftTable,
} from "../render/nftables.ts";
import { deleteConnectionsTo } from "./conntrack.ts";
import type { Iptables } from "./iptables.ts";
import { CommandError, mustRun, type Runner } from "./runner.ts";

export interface KernelState {
  readonly rules: Readonly<Record<Family, SavedState>>;
  readonly ipsets: ReadonlyMap<string, SavedSet>;
  readonly routing: ActualRouting;
  /** Our nftables table, if there is one (either datapath removes the other's leftovers). */
  readonly nft?: NftActual | undefined;
}

export interface SyncReport {
  /** Number of kernel objects changed (0: the kernel already held the plan). */
  readonly changes: number;
  readonly detail: {
    readonly chains: readonly string[];
    readonly hooks: number;
    readonly setMembersAdded: number;
    readonly setMembersRemoved: number;
    readonly routing: number;
    readonly sysctls: number;
    /** What the nftables transaction changed (nftables datapath). */
    readonly nft?: readonly string[];
  };
  readonly durationMs: number;
}

export class DatapathError extends Error {
  override readonly name = "DatapathError";
  readonly step: string;
  readonly input: string | undefined;
  constructor(step: string, cause: unknown) {
    const input = cause instanceof CommandError ? cause.stdin : undefined;
    super(`Cannot ${step}: ${(cause as Error).message}`, { cause });
    this.step = step;
    this.input = input;
  }
}

export interface DatapathOptions {
  readonly runner: Runner;
  readonly iptables: Iptables;
  readonly families: readonly Family[];
  readonly rulePref: number;
  readonly tunnelDevice: string;
  /**
   * The packet filter that carries the rules: iptables + ipset, or one nftables table (plans
   * must then be made with `datapath: "nftables"`). @default "iptables"
   */
  readonly filter?: "iptables" | "nftables";
  /**
   * Egress-IP addresses are leased from the kernel for this many seconds (it deletes them when
   * the lease ends) and renewed with `refreshEgressIPs()`; undefined: permanent addresses.
   */
  readonly eipLeaseSeconds?: number | undefined;
  /**
   * How often a full read lists every ipset member (`ipset save`) and nftables element (`nft -j
   * list table`: ~1.4 s for 100,000 with nft 1.0.6, which fetches every element for any listing
   * that names the table). Between, a read lists each ipset's header and number of entries
   * (`ipset list -t`; a set of ours whose count moved is listed at once) and the nftables table's
   * declarations, chains and rules (`nft -t -j list ruleset inet`), and takes the members to be
   * what the last successful sync left: a deleted table, chain, rule or set, or a member deleted
   * from an ipset, is repaired by the next full sync; an nftables element deleted, or an ipset
   * member replaced, by the first one after the next listing. 0: every read lists them.
   * @default 0
   */
  readonly setElementsEveryMs?: number | undefined;
  /** Times `setElementsEveryMs`. @default realClock */
  readonly clock?: Pick<Clock, "now"> | undefined;
}

const EMPTY_PLAN = (node: string): NodePlan => ({
  node,
  ipsets: [],
  rules: {
    4: { chains: new Map(), hooks: [] },
    6: { chains: new Map(), hooks: [] },
  },
  ipRules: [],
  routes: [],
  tunnel: undefined,
  neighbors: [],
  fdb: [],
  eips: [],
  sysctls: [],
  tables: new Map(),
  errors: [],
});

/**
 * The kernel state a plan describes, in the shape the parsers produce: after a successful sync
 * it is what the kernel holds (as far as we own it), so the next event-driven sync can diff
 * against it without re-reading 100,000 set members and routes.
 */
/** An egress IP this node holds and the device that answers for it. */
export interface HeldEgressIP {
  readonly device: string;
  readonly address: string;
}

export function stateOfPlan(plan: NodePlan, eipLeaseSeconds?: number): KernelState {
  const rules = {} as Record<Family, SavedState>;
  for (const family of [4, 6] as const) rules[family] = savedRules(plan.rules[family]);
  let ipsets = SAVED_SETS.get(plan.ipsets);
  if (ipsets === undefined) {
    ipsets = new Map<string, SavedSet>(plan.ipsets.map((s) => [s.name, plannedSet(s)]));
    SAVED_SETS.set(plan.ipsets, ipsets);
    SET_SOURCES.set(ipsets, plan.ipsets);
  }

  const links: ParsedLink[] = [];
  if (plan.tunnel !== undefined) {
    const t = plan.tunnel;
    links.push({
      name: t.name,
      kind: "vxlan",
      parent: t.parent,
      mtu: t.mtu,
      mac: t.mac,
      up: true,
      addresses: t.addresses,
      vxlan: { vni: t.vni, port: t.port, local: t.local, learning: false, gbp: t.gbp },
    });
  }
  for (const e of plan.eips) {
    const cidr = `${e.address}/${e.family === 4 ? 32 : 128}`;
    links.push({
      name: e.device,
      kind: "macvlan",
      parent: e.parent,
      mtu: 0,
      mac: e.mac,
      up: true,
      addresses: [cidr],
      ...(eipLeaseSeconds === undefined ? {} : { leases: { [cidr]: eipLeaseSeconds } }),
      macvlanMode: "bridge",
    });
  }
  const routing: ActualRouting = {
    rules: plan.ipRules,
    routes: plan.routes,
    links,
    neighbors: plan.neighbors,
    fdb: plan.fdb,
  };
  ROUTING_SOURCES.set(routing, plan);
  return { rules, ipsets, routing };
}

/** The plan each mirror's routing was made from. */
const ROUTING_SOURCES = new WeakMap<ActualRouting, RoutingPlan>();

/**
 * Whether `plan`'s routing is, section by section, the very objects of the plan a mirror was made
 * from (the planner keeps unchanged sections by identity): its diff against that mirror is empty.
 */
function sameRoutingAsMirror(plan: RoutingPlan, actual: ActualRouting): boolean {
  const from = ROUTING_SOURCES.get(actual);
  return (
    from !== undefined &&
    from.ipRules === plan.ipRules &&
    from.routes === plan.routes &&
    from.tunnel === plan.tunnel &&
    from.neighbors === plan.neighbors &&
    from.fdb === plan.fdb &&
    from.eips === plan.eips
  );
}

// Plans share unchanged sections by identity (src/engine/node_plan.ts): their saved forms are
// kept with them, so the mirror of a plan that changed one set costs that set.
const SAVED_RULES = new WeakMap<FamilyRules, SavedState>();
const SAVED_SETS = new WeakMap<readonly IpSetPlan[], ReadonlyMap<string, SavedSet>>();
const PLANNED_SETS = new WeakMap<IpSetPlan, SavedSet>();
/** The plan's set list each saved set map was made from. */
const SET_SOURCES = new WeakMap<ReadonlyMap<string, SavedSet>, readonly IpSetPlan[]>();
const NO_RULES: FamilyRules = { chains: new Map(), hooks: [] };

function savedRules(fr: FamilyRules | undefined): SavedState {
  const rules = fr ?? NO_RULES;
  let state = SAVED_RULES.get(rules);
  if (state !== undefined) return state;
  state = new Map();
  for (const table of TABLES) {
    const chains = new Map<string, { rules: string[] }>();
    for (const h of rules.hooks
      .filter((x) => x.table === table)
      .sort((a, b) => a.position - b.position)) {
      const c = chains.get(h.builtin) ?? { rules: [] };
      c.rules.push(ruleText(h.rule));
      chains.set(h.builtin, c);
    }
    for (const [name, list] of rules.chains.get(table) ?? []) {
      chains.set(name, { rules: list.map(ruleText) });
    }
    state.set(table, { chains });
  }
  SAVED_RULES.set(rules, state);
  return state;
}

/** A set as a plan describes it; its member Sets are only built if a diff needs them. */
function plannedSet(plan: IpSetPlan): SavedSet {
  const known = PLANNED_SETS.get(plan);
  if (known !== undefined) return known;
  const saved = newPlannedSet(plan);
  PLANNED_SETS.set(plan, saved);
  return saved;
}

function newPlannedSet(plan: IpSetPlan): SavedSet {
  let members: Set<string> | undefined;
  let nomatch: Set<string> | undefined;
  return {
    name: plan.name,
    type: "hash:net",
    family: plan.family,
    planned: plan,
    get members() {
      members ??= new Set(plan.members);
      return members;
    },
    get nomatch() {
      nomatch ??= new Set(plan.nomatch);
      return nomatch;
    },
  };
}

export class Datapath {
  readonly #o: DatapathOptions;
  /** What the last successful sync left in the kernel; undefined forces a full read. */
  #mirror: KernelState | undefined;
  /** The nftables table the last successful sync left (nftables datapath). */
  #mirrorNft: NftDesired | undefined;
  #lastNft: NftDesired | undefined;
  /** When the last read that listed every set member and element was (`clock`). */
  #elementsReadAt = Number.NEGATIVE_INFINITY;
  /** The egress IPs the last successful sync left in the kernel. */
  #heldEips: NodePlan["eips"] = [];

  constructor(options: DatapathOptions) {
    this.#o = options;
  }

  get options(): DatapathOptions {
    return this.#o;
  }

  /** Reads everything Sallyport owns (and what it must avoid) from the kernel. */
  async read(): Promise<KernelState> {
    try {
      return await this.#read();
    } catch (e) {
      throw new DatapathError("read the kernel", e);
    }
  }

  async #read(): Promise<KernelState> {
    const { runner, iptables, families, tunnelDevice } = this.#o;
    const json = (argv: string[]) => mustRun(runner, argv);
    // Set members and elements: listed when due, or when no sync left them known.
    const now = (this.#o.clock ?? realClock).now();
    const elements =
      this.#mirror === undefined ||
      (this.#o.filter === "nftables" && this.#mirrorNft === undefined) ||
      now - this.#elementsReadAt >= (this.#o.setElementsEveryMs ?? 0);
    // Counted when tried: a listing that fails (one timed out, 30 s at a time, on a gateway node
    // at 10,000 policies) is not tried again by every retry; the reads between are terse, and
    // the elements known from the last sync stand (when none are known, every read lists them).
    if (elements) this.#elementsReadAt = now;
    const [saves, ipsets, nft, links, rules4, rules6, routes4, routes6] = await Promise.all([
      Promise.all(families.map(async (f) => [f, parseSave(await iptables.save(f))] as const)),
      this.#readIpsets(elements),
      this.#readNft(elements && this.#o.filter === "nftables"),
      json(["ip", "-json", "-details", "address", "show"]),
      families.includes(4) ? json(["ip", "-4", "-json", "rule", "show"]) : Promise.resolve("[]"),
      families.includes(6) ? json(["ip", "-6", "-json", "rule", "show"]) : Promise.resolve("[]"),
      families.includes(4)
        ? json(["ip", "-4", "-json", "route", "show", "table", "all"])
        : Promise.resolve("[]"),
      families.includes(6)
        ? json(["ip", "-6", "-json", "route", "show", "table", "all"])
        : Promise.resolve("[]"),
    ]);
    const parsedLinks = parseLinks(links);
    const hasTunnel = parsedLinks.some((l) => l.name === tunnelDevice);
    const [neigh, fdb] = hasTunnel
      ? await Promise.all([
          json(["ip", "-json", "neigh", "show", "dev", tunnelDevice]),
          json(["bridge", "-json", "fdb", "show", "dev", tunnelDevice]),
        ])
      : ["[]", "[]"];
    const rules = { 4: new Map(), 6: new Map() } as Record<Family, SavedState>;
    for (const [f, s] of saves) rules[f] = s;
    return {
      ...(nft === undefined ? {} : { nft }),
      rules,
      ipsets,
      routing: {
        rules: [...parseRules(rules4, 4), ...parseRules(rules6, 6)],
        routes: [...parseRoutes(routes4, 4), ...parseRoutes(routes6, 6)],
        links: parsedLinks,
        neighbors: parseNeighbors(neigh, tunnelDevice),
        fdb: parseFdb(fdb, tunnelDevice),
      },
    };
  }

  /**
   * Every ipset: with `members`, `ipset save`; otherwise `ipset list -t` (each set's header and
   * its number of entries, without the members), and a set of ours whose type, family and number of entries are what the last sync left is
   * taken to hold its members; any other set of ours is listed with `ipset save NAME`. A foreign
   * set is described without members: nothing reads them.
   */
  async #readIpsets(members: boolean): Promise<Map<string, SavedSet>> {
    const runner = this.#o.runner;
    const left = this.#mirror?.ipsets;
    if (members || left === undefined)
      return parseIpsetSave(await mustRun(runner, ["ipset", "save"]));
    const sets = new Map<string, SavedSet>();
    const unknown: string[] = [];
    for (const t of parseIpsetTerse(await mustRun(runner, ["ipset", "list", "-t"])).values()) {
      const had = left.get(t.name);
      const same =
        had?.planned !== undefined &&
        had.type === t.type &&
        had.family === t.family &&
        had.planned.members.length + had.planned.nomatch.length === t.entries;
      if (same) sets.set(t.name, had);
      else if (isOwnedSet(t.name)) unknown.push(t.name);
      else sets.set(t.name, { ...t, members: new Set(), nomatch: new Set() });
    }
    for (const name of unknown) {
      const r = await runner.run(["ipset", "save", name]);
      // Destroyed since the listing: absent.
      if (r.code !== 0 && /does not exist/.test(r.stderr)) continue;
      if (r.code !== 0) throw new CommandError(["ipset", "save", name], undefined, r);
      for (const [n, set] of parseIpsetSave(r.stdout)) sets.set(n, set);
    }
    return sets;
  }

  /**
   * Our nftables table; undefined when there is none (or, with iptables, no nft at all). With
   * `elements` every element too; otherwise the table's structure only (see
   * `setElementsEveryMs`). The iptables datapath only looks for a table of ours left over.
   */
  async #readNft(elements: boolean): Promise<NftActual | undefined> {
    // The iptables datapath names our table: absent, as it should be, nft answers at once, while
    // `list ruleset inet` first fetches every chain and rule of iptables-nft's tables (nft 1.0.6:
    // 40–70 ms with 1,000 policies' rules, on every resync).
    const argv =
      this.#o.filter !== "nftables"
        ? ["nft", "-t", "-j", "list", "table", "inet", NFT_TABLE]
        : elements
          ? ["nft", "-j", "list", "table", "inet", NFT_TABLE]
          : ["nft", "-t", "-j", "list", "ruleset", "inet"];
    let result: { code: number; stdout: string; stderr: string };
    try {
      result = await this.#o.runner.run(argv);
    } catch (e) {
      // The iptables datapath only looks for leftovers of ours; a host without nft has none.
      if (this.#o.filter !== "nftables") return undefined;
      throw e;
    }
    if (result.code === 0) return parseNftTable(result.stdout, !elements);
    if (/No such file or directory/.test(result.stderr)) return undefined;
    if (this.#o.filter !== "nftables" && /not found|Operation not supported/.test(result.stderr))
      return undefined;
    throw new CommandError(argv, undefined, result);
  }

  /**
   * Makes the kernel hold `plan`; returns what had to change. A full sync (the default) re-reads
   * the kernel (or takes `state`, just read by the caller) and so repairs drift; `partial` diffs
   * against what the last successful sync applied, for fast event-driven updates, and falls back
   * to a full read when there is none.
   */
  async sync(
    plan: NodePlan,
    options?: { partial?: boolean; state?: KernelState },
  ): Promise<SyncReport> {
    const mirror = options?.partial === true ? this.#mirror : undefined;
    // Until this sync succeeds, renew only the egress IPs both the old and the new plan hold.
    const keep = new Set(plan.eips.map((e) => `${e.device} ${e.address}`));
    this.#heldEips = this.#heldEips.filter((e) => keep.has(`${e.device} ${e.address}`));
    const actual = mirror ?? options?.state ?? (await this.read());
    // A full read may have listed the table without its elements: they are what this left.
    const lastNft = this.#mirrorNft;
    this.#mirror = undefined;
    this.#mirrorNft = undefined;
    const report = await this.#apply(plan, actual, mirror === undefined, lastNft);
    this.#mirror = stateOfPlan(plan, this.#o.eipLeaseSeconds);
    this.#mirrorNft = this.#lastNft;
    this.#heldEips = plan.eips;
    return report;
  }

  /** The egress IPs the last sync made this node hold, and their devices. */
  heldEgressIPs(): HeldEgressIP[] {
    return this.#heldEips.map((e) => ({ device: e.device, address: e.address }));
  }

  /**
   * Renews the kernel's leases of the egress-IP addresses the last successful sync left (see
   * `eipLeaseSeconds`), for `seconds` (default: the lease). Call it only while this node knows
   * that it holds them: a node that stops calling it (dead, frozen, cut off) stops answering for
   * them when the lease ends, without any process of its own. Runs beside a sync: a device the
   * sync deletes meanwhile fails its own line only (`-force`), and an address the sync has not
   * made yet is not in the list. Returns the number of addresses renewed.
   */
  async refreshEgressIPs(seconds?: number): Promise<number> {
    const lease = seconds ?? this.#o.eipLeaseSeconds;
    const eips = this.#heldEips;
    if (lease === undefined || eips.length === 0) return 0;
    const result = await this.#o.runner.run(["ip", "-force", "-batch", "-"], {
      stdin: `${eipLeaseLines(eips, lease).join("\n")}\n`,
    });
    if (result.code !== 0)
      throw new DatapathError(
        "renew the egress IPs' leases",
        new CommandError(["ip", "-force", "-batch", "-"], undefined, result),
      );
    return eips.length;
  }

  async #apply(
    plan: NodePlan,
    actual: KernelState,
    full: boolean,
    lastNft: NftDesired | undefined,
  ): Promise<SyncReport> {
    const started = performance.now();
    const { runner, iptables, families, rulePref, tunnelDevice } = this.#o;
    // nftables: the whole table in one transaction; iptables: remove a table of ours left over.
    let nft: { payload: string; changes: number; detail: readonly string[] };
    // The empty plan (cleanup) has no table at all: the branch below removes it.
    if (this.#o.filter === "nftables" && plan.nft !== undefined) {
      const desired = desiredTable(plan, { families, tunnelDevice });
      if (lastNft !== undefined && !full) nft = diffNftPartial(desired, lastNft);
      else
        try {
          nft = diffNftFull(desired, actual.nft, lastNft);
        } catch (e) {
          if (!(e instanceof NftElementsUnknownError)) throw e;
          // Read without its elements, a set the last sync did not leave: list them now.
          this.#elementsReadAt = Number.NEGATIVE_INFINITY;
          nft = diffNftFull(desired, await this.#readNft(true));
        }
      this.#lastNft = desired;
    } else {
      nft =
        full && actual.nft !== undefined
          ? { payload: `delete table inet ${NFT_TABLE}\n`, changes: 1, detail: ["-table"] }
          : { payload: "", changes: 0, detail: [] };
      this.#lastNft = undefined;
    }
    // A partial sync after a change elsewhere (a pod added): nothing to compare.
    const routing =
      !full && sameRoutingAsMirror(plan, actual.routing)
        ? noRoutingChanges()
        : diffRouting(plan, actual.routing, {
            rulePref,
            tunnelDevice,
            eipLeaseSeconds: this.#o.eipLeaseSeconds,
          });
    const sets = this.#diffSets(plan, actual, full);
    const step = async (name: string, fn: () => Promise<unknown>) => {
      try {
        await fn();
      } catch (e) {
        throw new DatapathError(name, e);
      }
    };
    const batch = async (argv: string[], lines: readonly string[]) => {
      if (lines.length > 0) await mustRun(runner, argv, { stdin: `${lines.join("\n")}\n` });
    };

    const forgetting = Promise.all(
      routing.newEips.map((e) => deleteConnectionsTo(runner, e.address)),
    );
    // Awaited below; a step that fails before must not leave it rejected unheard.
    forgetting.catch(() => {});
    await step("release egress IPs", () => batch(["ip", "-batch", "-"], routing.releaseEips));
    await step("update ipsets", () =>
      sets.update === ""
        ? Promise.resolve()
        : mustRun(runner, ["ipset", "restore", "-exist"], { stdin: sets.update }),
    );
    await step("set up the tunnel", async () => {
      await batch(["ip", "-batch", "-"], routing.tunnel);
    });
    // Global sysctls can only drift behind our back: check them on full syncs.
    let sysctlChanges =
      full || routing.newDevices.length > 0 ? await this.#sysctls(plan.sysctls, step) : 0;
    await step("bring the tunnel up", () => batch(["ip", "-batch", "-"], routing.tunnelUp));
    await step("program IPv4 neighbours, routes and rules", () =>
      batch(["ip", "-4", "-batch", "-"], routing.ip4),
    );
    await step("program IPv6 neighbours, routes and rules", () =>
      batch(["ip", "-6", "-batch", "-"], routing.ip6),
    );
    await step("program the tunnel FDB", () => batch(["bridge", "-batch", "-"], routing.bridge));
    const chains: string[] = [];
    let hooks = 0;
    for (const family of families) {
      const desired = plan.rules[family] ?? NO_RULES;
      // The mirror of these very rules (a partial sync after a change elsewhere): nothing to do.
      if (!full && SAVED_RULES.get(desired) === actual.rules[family]) continue;
      const diff = diffRules(desired, actual.rules[family]);
      chains.push(
        ...diff.changedChains.map((c) => `v${family}:${c}`),
        ...diff.deletedChains.map((c) => `v${family}:-${c}`),
      );
      hooks += diff.hookRepairs;
      await step(`restore ${family === 4 ? "iptables" : "ip6tables"} rules`, () =>
        iptables.restore(family, diff.payload),
      );
    }
    await step("apply the nftables table", () =>
      nft.payload === ""
        ? Promise.resolve()
        : mustRun(runner, ["nft", "-f", "-"], { stdin: nft.payload }),
    );
    // Connections tracked for an egress IP this node held before are stale (deleteConnectionsTo):
    // forgotten before its device is made, while the rules are written (a takeover waits for
    // every step of this sync: one more process in a row cost it ~40 ms).
    await step("forget the stale connections of the egress IPs taken", () => forgetting);
    await step("create egress-IP devices", () => batch(["ip", "-batch", "-"], routing.eips));
    // Before they go up: arp_notify / ndisc_notify act at NETDEV_UP.
    sysctlChanges += await this.#sysctls(this.#deviceSysctls(plan, routing), step);
    await step("announce egress IPs", () => batch(["ip", "-batch", "-"], routing.eipsUp));
    await step("remove stale IPv4 rules and routes", () =>
      batch(["ip", "-4", "-batch", "-"], routing.remove4),
    );
    await step("remove stale IPv6 rules and routes", () =>
      batch(["ip", "-6", "-batch", "-"], routing.remove6),
    );
    await step("remove the tunnel", () => batch(["ip", "-batch", "-"], routing.removeTunnel));
    await step("destroy stale ipsets", () =>
      sets.destroy === ""
        ? Promise.resolve()
        : mustRun(runner, ["ipset", "restore", "-exist"], { stdin: sets.destroy }),
    );

    const changes =
      routing.changes +
      (sets.update === "" ? 0 : sets.members.added + sets.members.removed + sets.swapped.length) +
      (sets.destroy === "" ? 0 : sets.destroy.split("\n").filter(Boolean).length) +
      chains.length +
      nft.changes +
      hooks +
      sysctlChanges;
    return {
      changes,
      detail: {
        chains,
        hooks,
        setMembersAdded: sets.members.added,
        setMembersRemoved: sets.members.removed,
        routing: routing.changes,
        sysctls: sysctlChanges,
        ...(nft.detail.length === 0 ? {} : { nft: nft.detail }),
      },
      durationMs: performance.now() - started,
    };
  }

  /**
   * The ipset difference. After a change that kept every set name (a pod added: one set's
   * members) only the sets whose plan object changed are compared; the others are the very
   * objects the mirror was made of.
   */
  #diffSets(plan: NodePlan, actual: KernelState, full: boolean) {
    const before = full ? undefined : SET_SOURCES.get(actual.ipsets);
    const now = plan.ipsets;
    if (
      before !== undefined &&
      before.length === now.length &&
      now.every((s, i) => s.name === before[i]!.name)
    ) {
      const changed = now.filter((s, i) => s !== before[i]);
      return diffIpsets(changed, actual.ipsets, { onlyThese: true });
    }
    return diffIpsets(now, actual.ipsets);
  }

  /** Removes every kernel object Sallyport created on this node, and nothing else. */
  cleanup(node: string): Promise<SyncReport> {
    return this.sync(EMPTY_PLAN(node));
  }

  /**
   * Sysctls of devices this sync creates. arp_notify / ndisc_notify make the kernel announce an
   * egress IP when its device comes up; rp_filter=2 because replies to the egress IP arrive on
   * its device while the route back to their source goes through the node's uplink.
   *
   * The device's MAC is the same on every node that may hold the egress IP, so it must send
   * nothing but answers for the egress IP: a frame from it on a node that does not hold the
   * egress IP teaches the segment's switches to send the egress IP's traffic there. Hence
   * arp_ignore=1 (the default 0 answers ARP for any of the node's addresses, the node's own
   * address included, on every device); on an IPv4 egress IP's device no IPv6 at all, and on an
   * IPv6 one addr_gen_mode=1 (no link-local address: it would be the same on every node, and
   * its duplicate address detection would go out from the shared MAC whenever the link comes
   * back) and forwarding=0 (a router's device joins ff02::2 and reports it again whenever its
   * link comes back: in the sandbox the segment's bridge learned the shared MAC on a revived
   * node's port within 100 ms of its link coming up, before its agent had started). Routing
   * reads only `all`'s IPv6 forwarding, not a device's.
   */
  #deviceSysctls(plan: NodePlan, routing: RoutingDiff): SysctlPlan[] {
    const out: SysctlPlan[] = [];
    for (const e of plan.eips) {
      if (!routing.newDevices.includes(e.device)) continue;
      if (this.#o.families.includes(4)) {
        out.push(
          { path: `net/ipv4/conf/${e.device}/arp_notify`, value: "1" },
          { path: `net/ipv4/conf/${e.device}/arp_ignore`, value: "1" },
          { path: `net/ipv4/conf/${e.device}/rp_filter`, value: "2" },
        );
      }
      if (e.family === 4)
        // Also on a node without IPv6 egress: its kernel may well have IPv6 (a link-local address
        // and its duplicate address detection from the shared MAC); one without has no key.
        out.push({
          path: `net/ipv6/conf/${e.device}/disable_ipv6`,
          value: "1",
          ...(this.#o.families.includes(6) ? {} : { optional: true }),
        });
      else
        out.push(
          { path: `net/ipv6/conf/${e.device}/ndisc_notify`, value: "1" },
          { path: `net/ipv6/conf/${e.device}/addr_gen_mode`, value: "1" },
          { path: `net/ipv6/conf/${e.device}/forwarding`, value: "0" },
          // as a host's, it would take router advertisements and routes through itself
          { path: `net/ipv6/conf/${e.device}/accept_ra`, value: "0" },
          // The kernel reports leaving the address's solicited-node group when the lease ends,
          // and repeats the report after up to 1 s: on a node whose agent froze, that repeat
          // came after another node had taken the egress IP over (seen in the sandbox: the
          // bridge learned the shared MAC on the frozen node's port). 10 ms: every report goes
          // out before anyone can take over.
          { path: `net/ipv6/conf/${e.device}/mldv1_unsolicited_report_interval`, value: "10" },
          { path: `net/ipv6/conf/${e.device}/mldv2_unsolicited_report_interval`, value: "10" },
        );
    }
    return out;
  }

  async #sysctls(
    list: readonly SysctlPlan[],
    step: (name: string, fn: () => Promise<unknown>) => Promise<void>,
  ): Promise<number> {
    if (list.length === 0) return 0;
    const { runner } = this.#o;
    // Read all at once; a key of a device that does not exist yet reads as missing (exit 255).
    const current = new Map<string, string>();
    const read = await runner.run(["sysctl", "-e", ...list.map((s) => s.path)]);
    for (const line of read.stdout.split("\n")) {
      const at = line.indexOf(" = ");
      if (at > 0) current.set(line.slice(0, at).replaceAll(".", "/"), line.slice(at + 3).trim());
    }
    const todo = list.filter((s) => {
      const now = current.get(s.path.replaceAll(".", "/"));
      return now !== s.value && (now !== undefined || s.optional !== true);
    });
    if (todo.length === 0) return 0;
    await step("write sysctls", () =>
      mustRun(runner, ["sysctl", "-q", "-w", ...todo.map((s) => `${s.path}=${s.value}`)]),
    );
    return todo.length;
  }
}

/** ipsets that belong to Sallyport in a kernel state (for status and tests). */
export function ownedSets(state: KernelState): string[] {
  return [...state.ipsets.keys()].filter(isOwnedSet);
}
