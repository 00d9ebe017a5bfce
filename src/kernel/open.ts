/**
 * Builds the kernel adapters for this host: chooses the packet filter (iptables or nftables)
 * and the iptables backend once, up front.
 */
import type { Clock } from "../lib/clock.ts";
import type { Family } from "../lib/ip.ts";
import { Datapath } from "./datapath.ts";
import { type Backend, detectBackend, Iptables } from "./iptables.ts";
import { ExecRunner, type Runner } from "./runner.ts";

export type PacketFilter = "iptables" | "nftables";

export interface OpenOptions {
  readonly runner?: Runner;
  readonly families?: readonly Family[];
  /** The iptables backend (also what `--datapath auto` looks at). @default "auto" */
  readonly backend?: Backend | "auto";
  /** @default "iptables" */
  readonly datapath?: PacketFilter | "auto";
  /** @default 5900 */
  readonly rulePref?: number;
  /** @default "sallyport" */
  readonly tunnelDevice?: string;
  /** Egress-IP addresses leased from the kernel (see DatapathOptions); default: permanent. */
  readonly eipLeaseSeconds?: number;
  /** How often a full read lists the nftables elements (see DatapathOptions); default: always. */
  readonly setElementsEveryMs?: number;
  readonly clock?: Pick<Clock, "now">;
}

export interface FilterChoice {
  readonly filter: PacketFilter;
  /** Why, for the log. */
  readonly reason: string;
  /** The kernel has ipset's hash:net,net (an O(1) iptables classification would need it). */
  readonly hashNetNet: boolean;
}

/**
 * `--datapath auto`, the way kube-proxy's and the iptables wrappers' detection work: follow what
 * the node already uses, and prefer nftables where iptables cannot classify in O(1).
 *
 *   - no usable nftables (no `nft`, or the kernel refuses it)          → iptables
 *   - kube-proxy runs in nftables mode (its `kube-proxy` tables exist)  → nftables
 *   - the node's iptables is the legacy backend (its hint or its rules) → iptables
 *   - otherwise → nftables: Sallyport's iptables datapath walks one rule per policy, since the
 *     set types an O(1) iptables classification needs (`hash:net,net`, `hash:net,port,net`)
 *     are missing from many kernels (this one: CONFIG_IP_SET_HASH_NETNET is not set).
 */
export async function detectFilter(runner: Runner, backend: Backend): Promise<FilterChoice> {
  const hashNetNet = await hasSetType(runner, "hash:net,net");
  let tables: string;
  try {
    const r = await runner.run(["nft", "list", "tables"]);
    if (r.code !== 0)
      return {
        filter: "iptables",
        reason: `nftables is not usable: ${r.stderr.trim()}`,
        hashNetNet,
      };
    tables = r.stdout;
  } catch (e) {
    return {
      filter: "iptables",
      reason: `nft is not installed: ${(e as Error).message}`,
      hashNetNet,
    };
  }
  if (/^table ip6? kube-proxy$/m.test(tables))
    return { filter: "nftables", reason: "kube-proxy runs in nftables mode", hashNetNet };
  if (backend === "legacy")
    return { filter: "iptables", reason: "the node's iptables is the legacy backend", hashNetNet };
  return {
    filter: "nftables",
    reason: hashNetNet
      ? "nftables classifies in O(1); the iptables datapath walks one rule per policy"
      : "the kernel has no ipset hash:net,net, so iptables could only walk one rule per policy",
    hashNetNet,
  };
}

/** Whether the kernel accepts an ipset type: create and destroy a probe set. */
async function hasSetType(runner: Runner, type: string): Promise<boolean> {
  const name = `sallyport-probe-${process.pid % 100000}`;
  try {
    const r = await runner.run(["ipset", "create", name, type]);
    if (r.code !== 0) return false;
    await runner.run(["ipset", "destroy", name]);
    return true;
  } catch {
    return false;
  }
}

export async function openDatapath(options: OpenOptions = {}): Promise<Datapath> {
  const runner = options.runner ?? new ExecRunner();
  const backend =
    options.backend === undefined || options.backend === "auto"
      ? await detectBackend(runner)
      : options.backend;
  const filter =
    options.datapath === "auto"
      ? (await detectFilter(runner, backend)).filter
      : (options.datapath ?? "iptables");
  return new Datapath({
    runner,
    iptables: new Iptables(runner, backend),
    families: options.families ?? [4, 6],
    rulePref: options.rulePref ?? 5900,
    tunnelDevice: options.tunnelDevice ?? "sallyport",
    filter,
    eipLeaseSeconds: options.eipLeaseSeconds,
    setElementsEveryMs: options.setElementsEveryMs,
    clock: options.clock,
  });
}
