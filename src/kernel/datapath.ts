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
import type { NodePlan, SysctlPlan } from "../engine/plan.ts";
import type { Family } from "../lib/ip.ts";
import {
  type ActualRouting,
  diffRouting,
  parseFdb,
  parseLinks,
  parseNeighbors,
  parseRoutes,
  parseRules,
  type RoutingDiff,
} from "../render/iproute.ts";
import { diffIpsets, parseIpsetSave, type SavedSet } from "../render/ipset.ts";
import { diffRules, parseSave, type SavedState } from "../render/iptables.ts";
import type { Iptables } from "./iptables.ts";
import { CommandError, mustRun, type Runner } from "./runner.ts";

export interface KernelState {
  readonly rules: Readonly<Record<Family, SavedState>>;
  readonly ipsets: ReadonlyMap<string, SavedSet>;
  readonly routing: ActualRouting;
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

export class Datapath {
  readonly #o: DatapathOptions;

  constructor(options: DatapathOptions) {
    this.#o = options;
  }

  get options(): DatapathOptions {
    return this.#o;
  }

  async read(): Promise<KernelState> {
    const { runner, iptables, families, tunnelDevice } = this.#o;
    const json = (argv: string[]) => mustRun(runner, argv);
    const [saves, ipsetText, links, rules4, rules6, routes4, routes6] = await Promise.all([
      Promise.all(families.map(async (f) => [f, parseSave(await iptables.save(f))] as const)),
      mustRun(runner, ["ipset", "save"]),
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
      rules,
      ipsets: parseIpsetSave(ipsetText),
      routing: {
        rules: [...parseRules(rules4, 4), ...parseRules(rules6, 6)],
        routes: [...parseRoutes(routes4, 4), ...parseRoutes(routes6, 6)],
        links: parsedLinks,
        neighbors: parseNeighbors(neigh, tunnelDevice),
        fdb: parseFdb(fdb, tunnelDevice),
      },
    };
  }

  /** Makes the kernel hold `plan`; returns what had to change. */
  async sync(plan: NodePlan, state?: KernelState): Promise<SyncReport> {
    const started = performance.now();
    const { runner, iptables, families, rulePref, tunnelDevice } = this.#o;
    const actual = state ?? (await this.read());
    const routing = diffRouting(plan, actual.routing, { rulePref, tunnelDevice });
    const sets = diffIpsets(plan.ipsets, actual.ipsets);
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

    await step("release egress IPs", () => batch(["ip", "-batch", "-"], routing.releaseEips));
    await step("update ipsets", () =>
      sets.update === ""
        ? Promise.resolve()
        : mustRun(runner, ["ipset", "restore", "-exist"], { stdin: sets.update }),
    );
    await step("set up the tunnel", async () => {
      await batch(["ip", "-batch", "-"], routing.tunnel);
    });
    const sysctlChanges = await this.#sysctls(
      [...plan.sysctls, ...this.#deviceSysctls(plan, routing)],
      step,
    );
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
      const diff = diffRules(
        plan.rules[family] ?? { chains: new Map(), hooks: [] },
        actual.rules[family],
      );
      chains.push(
        ...diff.changedChains.map((c) => `v${family}:${c}`),
        ...diff.deletedChains.map((c) => `v${family}:-${c}`),
      );
      hooks += diff.hookRepairs;
      await step(`restore ${family === 4 ? "iptables" : "ip6tables"} rules`, () =>
        iptables.restore(family, diff.payload),
      );
    }
    await step("create egress-IP devices", () => batch(["ip", "-batch", "-"], routing.eips));
    // Sysctls of new egress-IP devices were written above, before they go up (arp_notify
    // sends the gratuitous ARP at NETDEV_UP).
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
      },
      durationMs: performance.now() - started,
    };
  }

  /** Removes every kernel object Sallyport created on this node, and nothing else. */
  cleanup(node: string): Promise<SyncReport> {
    return this.sync(EMPTY_PLAN(node));
  }

  /**
   * Sysctls of devices this sync creates. arp_notify / ndisc_notify make the kernel announce an
   * egress IP when its device comes up; rp_filter=2 because replies to the egress IP arrive on
   * its device while the route back to their source goes through the node's uplink.
   */
  #deviceSysctls(plan: NodePlan, routing: RoutingDiff): SysctlPlan[] {
    const out: SysctlPlan[] = [];
    for (const e of plan.eips) {
      if (!routing.newDevices.includes(e.device)) continue;
      if (this.#o.families.includes(4)) {
        out.push(
          { path: `net/ipv4/conf/${e.device}/arp_notify`, value: "1" },
          { path: `net/ipv4/conf/${e.device}/rp_filter`, value: "2" },
        );
      }
      if (this.#o.families.includes(6))
        out.push({ path: `net/ipv6/conf/${e.device}/ndisc_notify`, value: "1" });
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
    const todo = list.filter((s) => current.get(s.path.replaceAll(".", "/")) !== s.value);
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
