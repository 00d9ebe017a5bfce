/**
 * Per-policy packet and byte counters of the datapath's own rules.
 *
 * The counter source is one small interface so that each backend reads its counters its own way:
 * the iptables backend reads rule counters with `iptables-save -c` (below); an nftables backend
 * reads named counters. Both say, per counter, which policy it belongs to and what it counts.
 *
 * What the iptables rules can count (docs/datapath.md; testdata/traffic/ holds real output):
 *
 *   steered   mangle SALLYPORT-MARK-REQUEST, the policy's rule `-g SALLYPORT-TO-<node>` on a
 *             node that sends the policy's traffic to its gateway: every packet of the original
 *             direction (a steered connection keeps its connmark, so its later packets come
 *             back to the policy's rule), counted on the pod's node.
 *   snat_new  nat SALLYPORT-SNAT-EIP, the policy's rule `-j SNAT --to-source EIP` on the
 *             gateway: the kernel walks nat chains for the first packet of a connection only,
 *             so this counts new connections SNATed, not packets.
 *   dropped   the policy's rule `-j DROP` (no reachable gateway: it fails closed): every packet
 *             dropped.
 *   snat      every packet SNATed. No iptables rule sees them all (established packets of a
 *             gateway's flows leave SALLYPORT-MARK-REQUEST before the policy's rule, and nat
 *             chains see first packets only); a backend with a counter on that path reports it.
 *
 * A policy may have several rules of one kind (one per protocol of its ports); each is its own
 * counter, and the collector adds them up per policy.
 */
import { CHAIN_MARK_REQUEST, CHAIN_SNAT_EIP } from "../engine/names.ts";
import type { Family } from "../lib/ip.ts";
import { type PortRange, parsePortRange } from "./conntrack.ts";
import { mustRun, type Runner } from "./runner.ts";

export type CounterKind = "steered" | "snat" | "snat_new" | "dropped";

export interface RuleCounter {
  /**
   * The counter's identity across reads (a rule's text, a named counter's name): a counter that
   * reads lower than before under the same id was reset (its chain was rewritten).
   */
  readonly id: string;
  /** The policy key, e.g. EgressPolicy/default/web or ClusterEgressPolicy/all. */
  readonly policy: string;
  readonly family: Family;
  readonly kind: CounterKind;
  readonly packets: number;
  readonly bytes: number;
  /** snat and snat_new: the address the rule rewrites sources to. */
  readonly egressIP?: string;
  /** snat and snat_new: the source ports the rule names, if it names any. */
  readonly ports?: PortRange;
}

export interface CounterSource {
  read(): Promise<RuleCounter[]>;
}

const COUNTED = /^\[(\d+):(\d+)\] -A (\S+) (.*)$/;
const COMMENT = /(?:^| )-m comment --comment (?:"((?:[^"\\]|\\.)*)"|(\S+))/;
const STEER = / -g SALLYPORT-TO-[0-9a-f]{4}$/;
const SNAT = / -j SNAT --to-source (\S+)/;

/** `10.0.0.1`, `10.0.0.1:1024-2047`, `fd00::1`, `[fd00::1]:1024-2047`. */
function toSource(text: string): { address: string; ports?: PortRange } {
  if (text.startsWith("[")) {
    const close = text.indexOf("]");
    const address = text.slice(1, close);
    const rest = text.slice(close + 1);
    return rest.startsWith(":") ? { address, ports: parsePortRange(rest.slice(1)) } : { address };
  }
  const colons = text.split(":").length - 1;
  if (colons !== 1) return { address: text };
  const [address, ports] = text.split(":") as [string, string];
  return { address, ports: parsePortRange(ports) };
}

/**
 * The policies' counters in `iptables-save -c` output of one family (any tables; only
 * SALLYPORT-MARK-REQUEST and SALLYPORT-SNAT-EIP hold policy rules). Rules whose comment is not a
 * policy key (`sallyport: …`) and other chains are skipped.
 */
export function parseIptablesCounters(save: string, family: Family): RuleCounter[] {
  const out: RuleCounter[] = [];
  for (const line of save.split("\n")) {
    if (!line.startsWith("[")) continue;
    const m = COUNTED.exec(line);
    if (m === null) continue;
    const chain = m[3]!;
    if (chain !== CHAIN_MARK_REQUEST && chain !== CHAIN_SNAT_EIP) continue;
    const rule = m[4]!;
    const c = COMMENT.exec(rule);
    const policy = c === null ? undefined : (c[1]?.replace(/\\(.)/g, "$1") ?? c[2]);
    if (policy === undefined || policy.startsWith("sallyport:")) continue;
    const counted = {
      id: `v${family} ${chain} ${rule}`,
      policy,
      family,
      packets: Number(m[1]),
      bytes: Number(m[2]),
    };
    if (chain === CHAIN_SNAT_EIP) {
      const snat = SNAT.exec(rule);
      if (snat === null) continue;
      const to = toSource(snat[1]!);
      out.push({
        ...counted,
        kind: "snat_new",
        egressIP: to.address,
        ...(to.ports === undefined ? {} : { ports: to.ports }),
      });
    } else if (STEER.test(rule)) {
      out.push({ ...counted, kind: "steered" });
    } else if (rule.endsWith(" -j DROP")) {
      out.push({ ...counted, kind: "dropped" });
    }
  }
  return out;
}

/** The iptables backend's counters: `ip(6)tables-<backend>-save -c -t mangle|nat` per family. */
export class IptablesCounters implements CounterSource {
  readonly #runner: Runner;
  readonly #backend: "nft" | "legacy";
  readonly #families: readonly Family[];

  constructor(
    runner: Runner,
    options: { readonly backend: "nft" | "legacy"; readonly families: readonly Family[] },
  ) {
    this.#runner = runner;
    this.#backend = options.backend;
    this.#families = options.families;
  }

  async read(): Promise<RuleCounter[]> {
    const reads = this.#families.flatMap((family) =>
      (["mangle", "nat"] as const).map(async (table) => {
        const tool = `${family === 4 ? "iptables" : "ip6tables"}-${this.#backend}-save`;
        return parseIptablesCounters(
          await mustRun(this.#runner, [tool, "-c", "-t", table]),
          family,
        );
      }),
    );
    return (await Promise.all(reads)).flat();
  }
}
