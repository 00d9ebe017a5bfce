/**
 * Per-policy packet and byte counters of the datapath's own rules.
 *
 * The counter source is one small interface so that each backend reads its counters its own way:
 * the iptables backend reads rule counters with `iptables-save -c`; the nftables backend reads the
 * per-element counters of its class maps (both below). Both say, per counter, what it counts; the
 * iptables rules also say which policy (their comment), the nftables elements do not (the node's
 * plan does: src/agent/traffic.ts `nftPolicyOf`).
 *
 * What the iptables rules can count (docs/datapath.md; testdata/traffic/ holds real output):
 *
 *   steered   mangle SALLYPORT-MARK-REQUEST, the policy's rule (`-g SALLYPORT-C-<class>` or
 *             `-g SALLYPORT-G-<group>`) on a node whose group chain sends the traffic to another
 *             node (`-j MARK`): every packet of the original direction (a steered connection
 *             keeps its connmark, so its later packets come back to the policy's rule), counted
 *             on the pod's node. (Before group chains: `-g SALLYPORT-TO-<node>[-<class>]`.)
 *   snat_new  nat SALLYPORT-SNAT-EIP, the policy's rule `-j SNAT --to-source EIP` on the
 *             gateway: the kernel walks nat chains for the first packet of a connection only,
 *             so this counts new connections SNATed, not packets.
 *   dropped   the policy's rule whose group chain drops (no reachable gateway: it fails closed),
 *             or `-j DROP` itself: every packet dropped.
 *   held      the policy's rule whose group chain goes to SALLYPORT-GATEWAY (this node holds the
 *             egress IPs): counted by the nat rules (snat_new) instead, so not reported; kept so
 *             that a rule whose group moves to another node counts as steered from then on.
 *   snat      every packet SNATed. No iptables rule sees them all (established packets of a
 *             gateway's flows leave SALLYPORT-MARK-REQUEST before the policy's rule, and nat
 *             chains see first packets only); a backend with a counter on that path reports it.
 *
 * What the nftables class maps count (`inet sallyport`, maps `c4-<hash>`/`c6-<hash>` declared
 * with `counter`: one counter per element `destination . protocol . port : verdict`; the
 * prerouting chain looks a packet up there unless it is a reply or an established connection we
 * never steered; testdata/traffic/nft-*.json holds real output):
 *
 *   steered   an element `goto to-<node>[-<class>]`: every packet of the original direction (a steered
 *             connection's connmark brings each of its packets back to the lookup), as above.
 *   snat_new  an element `goto snat4-<n>` / `snat6-<n>` (SNAT here to the n-th address of map
 *             `snat4`/`snat6`): the packets of a connection while conntrack calls it new, that
 *             is, until its first reply. A TCP connection's SYN (and its retransmissions, if
 *             unanswered); a UDP flow's datagrams until the first one is answered (one, for a
 *             request answered before the next is sent). Nearly the iptables figure, not exactly.
 *   dropped   an element `drop`: every packet dropped.
 *
 * A policy may have several rules or elements of one kind (one rule per protocol of its ports,
 * one element per destination range and port range it decides); each is its own counter, and
 * the collector adds them up per policy.
 */
import { CHAIN_MARK_REQUEST, CHAIN_SNAT_EIP } from "../engine/names.ts";
import type { Family } from "../lib/ip.ts";
import { NFT_TABLE, parseNftCounters, snatMark } from "../render/nftables.ts";
import { type PortRange, parsePortRange } from "./conntrack.ts";
import { CommandError, mustRun, type Runner } from "./runner.ts";

export type CounterKind = "steered" | "snat" | "snat_new" | "dropped" | "held";

/** An element of one of the nftables datapath's class maps, as the kernel holds it. */
export interface NftElement {
  /** The class map, `c4-<hash>` or `c6-<hash>`. */
  readonly map: string;
  /** The element's key as the renderer writes it (src/render/nftables.ts `entryKey`). */
  readonly key: string;
  /** `goto to-0001`, `goto snat4-0`, `drop` (`entryValue`). */
  readonly verdict: string;
}

export interface RuleCounter {
  /**
   * The counter's identity across reads (a rule's text; a map element's map, key and verdict):
   * a counter that reads lower than before under the same id was reset (its chain was
   * rewritten, its element deleted and added again).
   */
  readonly id: string;
  /**
   * The policy key, e.g. EgressPolicy/default/web or ClusterEgressPolicy/all; "" for an nftables
   * element, which names no policy (`element` says which element it is, and the node's plan
   * which policy decided it).
   */
  readonly policy: string;
  readonly family: Family;
  readonly kind: CounterKind;
  readonly packets: number;
  readonly bytes: number;
  /** snat and snat_new: the address the rule rewrites sources to. */
  readonly egressIP?: string;
  /**
   * nftables, snat_new of a policy with several egress IPs of the family: the addresses its
   * verdict's group chain (`goto snat4-0-1`) spreads new connections over.
   */
  readonly egressIPs?: readonly string[];
  /** snat and snat_new: the source ports the rule names, if it names any. */
  readonly ports?: PortRange;
  /** nftables: the class map element this counter belongs to. */
  readonly element?: NftElement;
}

export interface CounterSource {
  read(): Promise<RuleCounter[]>;
}

const COUNTED = /^\[(\d+):(\d+)\] -A (\S+) (.*)$/;
const COMMENT = /(?:^| )-m comment --comment (?:"((?:[^"\\]|\\.)*)"|(\S+))/;
const STEER = / -g SALLYPORT-TO-[0-9a-f]{4}(-[0-9a-f]{4})?$/;
const GOTO = / -g (SALLYPORT-[CG]-\S+)$/;
const SNAT = / -j SNAT --to-source (\S+)/;

/**
 * What each class and group chain in the lines of a save does with a packet, found by following
 * its gotos: steered (it marks toward a node), held (it goes to SALLYPORT-GATEWAY) or dropped.
 */
function groupKinds(lines: readonly string[]): Map<string, CounterKind> {
  const bodies = new Map<string, string[]>();
  for (const line of lines) {
    const m = COUNTED.exec(line);
    if (m === null || !/^SALLYPORT-[CG]-/.test(m[3]!)) continue;
    const body = bodies.get(m[3]!) ?? [];
    body.push(m[4]!);
    bodies.set(m[3]!, body);
  }
  const kinds = new Map<string, CounterKind>();
  const kindOf = (chain: string, depth: number): CounterKind | undefined => {
    const body = bodies.get(chain);
    if (body === undefined || depth > 2) return undefined;
    for (const text of body) {
      const rule = ` ${text}`;
      if (rule.includes(" -j MARK ")) return "steered";
      if (rule.endsWith(" -g SALLYPORT-GATEWAY")) return "held";
      const next = GOTO.exec(rule);
      if (next !== null) return kindOf(next[1]!, depth + 1);
    }
    return "dropped";
  };
  for (const chain of bodies.keys()) {
    const kind = kindOf(chain, 0);
    if (kind !== undefined) kinds.set(chain, kind);
  }
  return kinds;
}

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
  const lines = save.split("\n");
  const groups = groupKinds(lines);
  for (const line of lines) {
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
    } else if (GOTO.test(rule)) {
      const kind = groups.get(GOTO.exec(rule)![1]!);
      if (kind !== undefined) out.push({ ...counted, kind });
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

// ------------------------------------------------------------------------------------------------
// nftables: the class maps' element counters

type Json = Record<string, unknown>;

const CLASS_MAP = /^c([46])-/;
const STEER_VERDICT = /^goto to-[0-9a-f]{4}(-[0-9a-f]{4})?$/;
const SNAT_VERDICT = /^goto snat([46])-(\d+)$/;
/** A policy with several egress IPs: a chain that picks one of the addresses' chains. */
const SNAT_GROUP_VERDICT = /^goto snat([46])((?:-\d+){2,})$/;

/** A class map element's verdict as src/render/nftables.ts writes it (`entryValue`). */
function verdictText(v: unknown): string | undefined {
  if (v === null || typeof v !== "object") return undefined;
  const o = v as Json;
  if ("drop" in o) return "drop";
  for (const k of ["goto", "jump"])
    if (k in o) return `${k} ${(o[k] as { target?: unknown }).target}`;
  return undefined;
}

/** The maps of table `inet sallyport` in one `nft -j` document. */
function ourMaps(doc: Json): Json[] {
  const out: Json[] = [];
  for (const item of (doc.nftables as Json[] | undefined) ?? []) {
    const map = item.map as Json | undefined;
    if (map !== undefined && map.table === NFT_TABLE && map.family === "inet") out.push(map);
  }
  return out;
}

/**
 * The class maps' element counters in `nft -j` output: one document, or one per line (what
 * `nft -j -i` prints for a `list map` per line). Per element its key and verdict, and for
 * `goto snatF-N` the egress IP that the same output's map `snatF` gives mark N
 * (src/render/nftables.ts `snatMark`); maps of other tables and families, and elements with
 * another verdict, are skipped.
 */
export function parseNftClassCounters(output: string, families: readonly Family[]): RuleCounter[] {
  const docs = output
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => ({ line, doc: JSON.parse(line) as Json }));
  const snat = new Map<string, string>();
  for (const { doc } of docs)
    for (const map of ourMaps(doc)) {
      const f = /^snat([46])$/.exec(map.name as string)?.[1];
      if (f === undefined) continue;
      for (const raw of (map.elem as unknown[] | undefined) ?? []) {
        const [mark, address] = raw as [unknown, unknown];
        if (typeof mark === "number" && typeof address === "string")
          snat.set(`${f} ${mark}`, address);
      }
    }
  const out: RuleCounter[] = [];
  for (const { line, doc } of docs) {
    // The renderer's own reading of element keys (`entryKey` text), in element order.
    const counted = parseNftCounters(line);
    for (const map of ourMaps(doc)) {
      const name = map.name as string;
      const ours = CLASS_MAP.exec(name);
      if (ours === null) continue;
      const family = Number(ours[1]) as Family;
      if (!families.includes(family)) continue;
      const counts = [...(counted.get(name) ?? new Map<string, [number, number]>())];
      const verdicts: (string | undefined)[] = [];
      for (const raw of (map.elem as unknown[] | undefined) ?? []) {
        const [key, value] = raw as [Json, unknown];
        if ((key?.elem as Json | undefined)?.counter !== undefined)
          verdicts.push(verdictText(value));
      }
      if (verdicts.length !== counts.length)
        throw new SyntaxError(`Cannot read the counters of nftables map ${name}`);
      for (let i = 0; i < counts.length; i++) {
        const [key, [packets, bytes]] = counts[i]!;
        const verdict = verdicts[i];
        if (verdict === undefined) continue;
        const base = {
          id: `nft ${name} ${key} : ${verdict}`,
          policy: "",
          family,
          packets,
          bytes,
          element: { map: name, key, verdict },
        };
        const to = SNAT_VERDICT.exec(verdict);
        if (to !== null) {
          const egressIP = snat.get(`${to[1]} ${snatMark(Number(to[2]))}`);
          out.push({
            ...base,
            kind: "snat_new",
            ...(egressIP === undefined ? {} : { egressIP }),
          });
        } else if (SNAT_GROUP_VERDICT.test(verdict)) {
          const [, f, indexes] = SNAT_GROUP_VERDICT.exec(verdict)!;
          const egressIPs = indexes!
            .slice(1)
            .split("-")
            .map((n) => snat.get(`${f} ${snatMark(Number(n))}`))
            .filter((a) => a !== undefined);
          out.push({ ...base, kind: "snat_new", egressIPs });
        } else if (STEER_VERDICT.test(verdict)) {
          out.push({ ...base, kind: "steered" });
        } else if (verdict === "drop") {
          out.push({ ...base, kind: "dropped" });
        }
      }
    }
  }
  return out;
}

/** Up to this many class maps, `nft -j -i`; beyond, `nft -j list maps` (see NftCounters). */
export const INTERACTIVE_MAX_MAPS = 1500;

/**
 * The nftables backend's counters: the element counters of the class maps, and maps `snat4`/
 * `snat6` for the egress IPs their SNAT verdicts name.
 *
 * Listing the whole table (or `list maps`) also prints `src4`/`src6`, one element per source
 * pod: at 100,000 that is 1.2–2.7 s of nft per read, whatever the number of classes. So the
 * class maps' names come from a terse listing (declarations only, 7–100 ms for 10–5,000
 * classes), and the maps themselves from one `nft -j -i` reading a `list map` per line (nft 1.0.6
 * finds only the first map of several `list` commands in one `nft -f`; one process per map
 * costs ~4 ms, 4 s for 1,000 classes). Measured with src4 at 100,000 and 10 elements per
 * class: 22 ms for 10 classes, 73 ms for 100, 0.55 s for 1,000. Each `list map` re-reads the
 * table's declarations, so this grows with the square of the classes (1.3 s for 3,000, 3.1 s for
 * 5,000): beyond INTERACTIVE_MAX_MAPS one `list maps` is cheaper, and so is it for an nft built
 * without its interactive CLI. `HOME=/dev/null`: interactive nft appends every command to
 * `$HOME/.nft.history` otherwise.
 */
export class NftCounters implements CounterSource {
  readonly #runner: Runner;
  readonly #families: readonly Family[];
  #interactive = true;

  constructor(runner: Runner, options: { readonly families: readonly Family[] }) {
    this.#runner = runner;
    this.#families = options.families;
  }

  async read(): Promise<RuleCounter[]> {
    const declared = JSON.parse(
      await mustRun(this.#runner, ["nft", "-t", "-j", "list", "maps", "inet"]),
    ) as Json;
    const names = ourMaps(declared)
      .map((m) => m.name as string)
      .filter((name) => this.#families.some((f) => name.startsWith(`c${f}-`)));
    if (names.length === 0) return [];
    if (this.#interactive && names.length <= INTERACTIVE_MAX_MAPS) {
      const argv = ["env", "HOME=/dev/null", "nft", "-j", "-i"];
      const stdin = [...names, ...this.#families.map((f) => `snat${f}`)]
        .map((m) => `list map inet ${NFT_TABLE} ${m}\n`)
        .join("");
      const r = await this.#runner.run(argv, { stdin });
      if (r.code === 0) {
        // Interactive nft goes on after an error and exits 0: a map deleted since the terse
        // listing is simply absent; any other error fails the read.
        const errors = r.stderr
          .split("\n")
          .filter((l) => l.includes("Error:") && !l.includes("No such file or directory"));
        if (errors.length > 0)
          throw new CommandError(argv, stdin, { ...r, code: 1, stderr: errors.join("\n") });
        return parseNftClassCounters(r.stdout, this.#families);
      }
      if (!/interactive/i.test(r.stderr)) throw new CommandError(argv, stdin, r);
      this.#interactive = false;
    }
    return parseNftClassCounters(
      await mustRun(this.#runner, ["nft", "-j", "list", "maps", "inet"]),
      this.#families,
    );
  }
}
