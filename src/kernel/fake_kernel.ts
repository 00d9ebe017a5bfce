/**
 * A fake Linux host below `Datapath`, in the spirit of kubernetes-sigs/knftables' fake.go: a
 * `Runner` that answers the exact commands the datapath runs from an in-memory model of one host
 * (iptables chains and rules per family and table, ipsets, nftables tables, links, addresses, ip
 * rules, routes, neighbours, the VXLAN FDB, sysctls).
 *
 * - It applies exactly the text the datapath sends and parses only the forms our renderers emit;
 *   anything else is answered with exit 2 and "FakeKernel does not model …", never silently.
 * - It rejects what the kernel rejects, with the real tools' exit codes and messages.
 * - It prints state back as the real tools print it, so `Datapath.read()` round-trips. Rules are
 *   stored in the form iptables-save prints them (its own canonicalisation, not the renderer's),
 *   so a renderer that writes a form the kernel prints differently shows up as a diff.
 *
 * Every behaviour below was checked in throwaway network namespaces on Linux 6.18 with
 * iptables v1.8.9 (nf_tables), ipset v7.17 (protocol 7), nftables 1.0.6, iproute2 6.1.0 and
 * procps-ng sysctl 4.0.2; each section says what it models and what it leaves out.
 *
 * Tests seed foreign state with `seed(argv, stdin)`: the same tool syntax, not logged in `calls`,
 * and iptables rules, ipsets or nft rules the fake cannot parse (a CNI's MASQUERADE rule, a
 * kube-proxy hash:ip,port set, an nft rule with an anonymous set) are kept verbatim as someone
 * else's. `failNext()` injects a failure;
 * `dump()` prints the whole model as canonical text for equality assertions.
 */
import {
  bits,
  type Cidr,
  type Family,
  formatAddress,
  formatCidr,
  hostMask,
  parseAddress,
  parseCidr,
  tryParseAddress,
  tryParseCidr,
} from "../lib/ip.ts";
import type { Runner, RunOptions, RunResult } from "./runner.ts";

export interface RecordedCall {
  readonly argv: readonly string[];
  readonly stdin: string | undefined;
}

/** A command the tool refused: its exit code and output as the real tool prints them. */
class ToolFailure {
  readonly code: number;
  readonly stderr: string;
  /** True when the fake, not the real tool, refuses (a form it does not model). */
  readonly unmodeled: boolean;
  stdout = "";
  constructor(code: number, stderr: string, unmodeled = false) {
    this.code = code;
    this.stderr = stderr;
    this.unmodeled = unmodeled;
  }
}

function unmodeled(what: string): ToolFailure {
  return new ToolFailure(
    2,
    `FakeKernel does not model ${what}: teach src/kernel/fake_kernel.ts the real tool's behaviour, or test this in a network namespace\n`,
    true,
  );
}

/** A cheap, stable hash for values the kernel picks at random (MACs, ipset initval, order). */
function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

function hex(n: number): string {
  return `0x${(n >>> 0).toString(16)}`;
}

/** strtoul as the tools use it: decimal or 0x-hex, at most 32 bits. */
function parseU32(text: string): number | undefined {
  if (!/^(0x[0-9a-fA-F]{1,8}|\d{1,10})$/.test(text)) return undefined;
  const n = Number(text);
  return n <= 0xffffffff ? n : undefined;
}

function splitWords(line: string): string[] {
  return line.split(/\s+/).filter((w) => w !== "");
}

function familyName(family: Family): string {
  return family === 4 ? "inet" : "inet6";
}

// ================================================================================================
// iptables-nft-save / iptables-nft-restore (and ip6tables-*)
//
// Models iptables 1.8.9 on nf_tables:
// - restore --noflush: `:CHAIN` creates a user chain or flushes it (a built-in chain only gets its
//   policy); `-A`, `-I [n]`, `-D`, `-X`, `-F`, `-N`; each `*table … COMMIT` section is one
//   nf_tables transaction: all or nothing, while earlier sections of the same input stay applied.
// - rejects: a set that does not exist ("Set X doesn't exist.", exit 2, at the rule's line) or of
//   the other family; a jump or goto to a missing chain ("Chain 'X' does not exist", exit 2, at
//   the COMMIT line: nft checks at commit, in input order); deleting a chain that is built-in,
//   not empty or still referenced ("CHAIN_DEL failed (Device or resource busy)", exit 4); `-A`,
//   `-I`, `-X`, `-F` on a missing chain, `-D` of a missing rule, `-I` past the end ("line N
//   failed: …", exit 1); a chain name over 28 characters; input ending without COMMIT;
//   `-m statistic` (its nth mode only: bad or repeated options, --every without --packet and the
//   reverse, no --mode being random mode, --packet ≥ --every, word for word) and SNAT ports
//   without `-p tcp|udp|sctp` ("Need TCP, UDP, SCTP or DCCP with port specification"), ports out
//   of range or reversed.
// - save: tables in the fixed order nft-save prints them (mangle, security, raw, filter, nat),
//   every built-in chain of an existing table, user chains sorted by name, rules as iptables-save
//   canonicalises them: hex marks without leading zeros, a match mask of 0xffffffff omitted,
//   --set-xmark always with its mask, conntrack states in kernel order, comments quoted by
//   xtables_save_string (bare when only [A-Za-z0-9_-], else quoted with `"`, `\` and `'` escaped),
//   `-m statistic --mode nth --every N --packet P` in that order whatever the input's, SNAT
//   `--to-source 10.0.0.1:5000-5009` (one port as `:5000`), `[fd00::1]:5000-5009`.
//   `-t TABLE` of a table that does not exist prints its empty skeleton (backend detection).
// Not modeled: the legacy backend (its save prints nothing, as on a host without legacy tables),
// counters, matches and targets Sallyport does not emit (seeded rules keep them verbatim), the
// kernel's per-hook checks of targets beyond SNAT outside the nat table and TCPMSS without -p tcp or
// in a built-in chain of the wrong hook (refused at commit with "Invalid argument", exit 4, as
// checked); a TCPMSS rule reached from the wrong hook through a user chain is not caught.

type XTableName = "filter" | "nat" | "mangle" | "raw" | "security";

const BUILTIN_CHAINS: Readonly<Record<XTableName, readonly string[]>> = {
  filter: ["INPUT", "FORWARD", "OUTPUT"],
  nat: ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
  mangle: ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
  raw: ["PREROUTING", "OUTPUT"],
  security: ["INPUT", "FORWARD", "OUTPUT"],
};

/** iptables-nft-save's order, whatever order the tables were created in (checked). */
const SAVE_ORDER: readonly XTableName[] = ["mangle", "security", "raw", "filter", "nat"];
const SAVE_DATE = "Thu Jan  1 00:00:00 2026";
const XT_VERSION = "v1.8.9 (nf_tables)";
/** Standard targets that exist in the real tool but that the fake does not model. */
const UNMODELED_TARGETS = new Set([
  "MASQUERADE",
  "DNAT",
  "REDIRECT",
  "REJECT",
  "LOG",
  "NFLOG",
  "NOTRACK",
  "CT",
  "TPROXY",
  "CHECKSUM",
  "TRACE",
  "NFQUEUE",
  "CLASSIFY",
  "DSCP",
  "TOS",
  "TTL",
  "HL",
]);
const CTSTATES = ["INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT"];
const TCP_FLAGS = ["FIN", "SYN", "RST", "PSH", "ACK", "URG"];
const ICMPV6_TYPES: Readonly<Record<string, number>> = {
  "neighbour-solicitation": 135,
  "neighbor-solicitation": 135,
  "neighbour-advertisement": 136,
  "neighbor-advertisement": 136,
};

function isXTableName(name: string): name is XTableName {
  return Object.hasOwn(BUILTIN_CHAINS, name);
}

interface XRule {
  /** The words after `-A CHAIN`, exactly as iptables-save prints them. */
  readonly text: string;
  /** The user chain it jumps or goes to. */
  readonly target: string | undefined;
  readonly sets: readonly string[];
}

interface XChain {
  readonly builtin: boolean;
  policy: string;
  rules: XRule[];
}

type XTable = Map<string, XChain>;

function newXTable(name: XTableName): XTable {
  return new Map(
    BUILTIN_CHAINS[name].map((c) => [c, { builtin: true, policy: "ACCEPT", rules: [] }]),
  );
}

function cloneXTable(table: XTable): XTable {
  return new Map([...table].map(([k, c]) => [k, { ...c, rules: [...c.rules] }]));
}

/** Built-in chains in hook order, then user chains sorted by name: iptables-nft-save's order. */
function chainOrder(name: XTableName, table: XTable): string[] {
  const users = [...table.keys()].filter((c) => !table.get(c)!.builtin).sort();
  return [...BUILTIN_CHAINS[name].filter((c) => table.has(c)), ...users];
}

/** libxtables' xtables_save_string(). */
function saveString(value: string): string {
  if (/^[A-Za-z0-9_-]+$/.test(value)) return value;
  return `"${value.replace(/["\\']/g, (c) => `\\${c}`)}"`;
}

/**
 * Splits a restore line as iptables-restore's add_param_to_argv() does: double quotes group
 * words, and a backslash escapes the next character inside them.
 */
function splitRestoreLine(line: string): string[] {
  const out: string[] = [];
  let word = "";
  let inWord = false;
  let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i]!;
    if (quoted) {
      if (c === "\\" && i + 1 < line.length) word += line[++i];
      else if (c === '"') quoted = false;
      else word += c;
    } else if (c === '"') {
      quoted = true;
      inWord = true;
    } else if (c === " " || c === "\t") {
      if (inWord) out.push(word);
      word = "";
      inWord = false;
    } else {
      word += c;
      inWord = true;
    }
  }
  if (inWord) out.push(word);
  return out;
}

/** `-m statistic` as given (only `--mode nth` is modeled). */
interface Statistic {
  mode?: "nth";
  every?: number;
  packet?: number;
}

/**
 * libxt_statistic's final checks, in iptables 1.8.9's order (the option framework's "also
 * requires" first; no --mode is random mode), and the match as iptables-save prints it.
 */
function statisticWords(s: Statistic, errors: XtError, line: number): string[] {
  if (s.every !== undefined && s.packet === undefined)
    throw errors.parameter(line, 'statistic: option "--every" also requires "--packet".\n');
  if (s.packet !== undefined && s.every === undefined)
    throw errors.parameter(line, 'statistic: option "--packet" also requires "--every".\n');
  if (s.mode === undefined)
    throw errors.parameter(line, "--probability must be specified when using random mode");
  if (s.every === undefined || s.packet === undefined)
    throw errors.parameter(line, "--every and --packet must be specified when using nth mode");
  if (s.packet > s.every - 1) throw errors.parameter(line, "the --packet p must be 0 <= p <= n-1");
  return ["--mode", "nth", "--every", String(s.every), "--packet", String(s.packet)];
}

/**
 * SNAT's `--to-source`: an address, with a port or port range (`10.0.0.1:5000-5009`,
 * `[fd00::1]:5000-5009`), as libxt_NAT parses and iptables-save prints it. Address ranges are
 * not modeled.
 */
function snatSource(
  text: string,
  family: Family,
  errors: XtError,
  line: number,
): { text: string; ports?: readonly [number, number] } {
  let address = text;
  let ports: string | undefined;
  if (family === 6 && text.startsWith("[")) {
    const close = text.indexOf("]");
    address = text.slice(1, close < 0 ? undefined : close);
    const rest = close < 0 ? "" : text.slice(close + 1);
    if (rest.startsWith(":")) ports = rest.slice(1);
    else if (rest !== "") throw errors.parameter(line, `Bad IP address "${text}"`);
  } else if (family === 4 && text.includes(":")) {
    address = text.slice(0, text.indexOf(":"));
    ports = text.slice(text.indexOf(":") + 1);
  }
  if (address.includes("-")) throw unmodeled(`SNAT to the address range ${text}`);
  const a = tryParseAddress(address);
  if (a === undefined || a.family !== family)
    throw errors.parameter(line, `Bad IP address "${address}"`);
  if (ports === undefined) return { text: formatAddress(a) };
  const parts = ports.split("-");
  if (parts.length > 2) throw unmodeled(`the SNAT ports ${ports}`);
  const firstText = parts[0]!;
  const lastText = parts[1] ?? firstText;
  const port = (p: string) => {
    const n = /^\d+$/.test(p) ? Number(p) : Number.NaN;
    if (!(n >= 0 && n <= 65535)) throw errors.parameter(line, `Port \`${p}' not valid`);
    return n;
  };
  const first = port(firstText);
  const last = port(lastText);
  if (last < first) throw errors.parameter(line, `Port range \`${lastText}' funky`);
  const shown = first === last ? `${first}` : `${first}-${last}`;
  return {
    text: `${family === 6 ? `[${formatAddress(a)}]` : formatAddress(a)}:${shown}`,
    ports: [first, last],
  };
}

/** How one restore invocation reports its errors. */
class XtError {
  readonly tool: string;
  constructor(tool: string) {
    this.tool = tool;
  }
  /** xtables_error(PARAMETER_PROBLEM, …): exit 2. */
  parameter(line: number, message: string): ToolFailure {
    return new ToolFailure(
      2,
      `${this.tool} ${XT_VERSION}: ${message}\nError occurred at line: ${line}\nTry \`${this.tool} -h' or '${this.tool} --help' for more information.\n`,
    );
  }
  /** A command the cache refuses before commit: exit 1. */
  line(line: number, message: string): ToolFailure {
    return new ToolFailure(1, `${this.tool}: line ${line} failed: ${message}.\n`);
  }
  /** The kernel refused the transaction: exit 4. */
  kernel(line: number, message: string): ToolFailure {
    return new ToolFailure(4, `${this.tool} ${XT_VERSION}: \nline ${line}: ${message}\n`);
  }
}

interface ParsedRule {
  readonly rule: XRule;
  /** The kernel's checkentry refuses it (EINVAL at commit). */
  readonly invalid: boolean;
}

interface RuleContext {
  readonly family: Family;
  readonly table: XTableName;
  readonly chain: string;
  readonly chains: XTable;
  readonly line: number;
  readonly errors: XtError;
  readonly seeding: boolean;
}

class Xtables {
  readonly #tables: Record<Family, Map<XTableName, XTable>> = { 4: new Map(), 6: new Map() };
  readonly #sets: Ipsets;

  constructor(sets: Ipsets) {
    this.#sets = sets;
  }

  /** Rules in every table of both families that name the set (the kernel's reference count). */
  setReferences(name: string): number {
    let n = 0;
    for (const family of [4, 6] as const)
      for (const table of this.#tables[family].values())
        for (const chain of table.values())
          for (const r of chain.rules) if (r.sets.includes(name)) n++;
    return n;
  }

  /** The tables iptables-nft made, as nftables names them (they share the kernel's table list). */
  tableNames(): (readonly [NftFamily, string])[] {
    return ([4, 6] as const).flatMap((family) =>
      SAVE_ORDER.filter((name) => this.#tables[family].has(name)).map(
        (name) => [family === 4 ? "ip" : "ip6", name] as const,
      ),
    );
  }

  save(family: Family, args: readonly string[]): string {
    const tool = `${family === 4 ? "iptables" : "ip6tables"}-nft-save`;
    let only: XTableName | undefined;
    if (args.length === 2 && args[0] === "-t" && isXTableName(args[1]!)) only = args[1];
    else if (args.length > 0) throw unmodeled(`${tool} ${args.join(" ")}`);
    const out: string[] = [];
    for (const name of SAVE_ORDER) {
      if (only !== undefined && name !== only) continue;
      const table = this.#tables[family].get(name) ?? (only === name ? newXTable(name) : undefined);
      if (table === undefined) continue;
      const order = chainOrder(name, table);
      out.push(`# Generated by ${tool} ${XT_VERSION} on ${SAVE_DATE}`, `*${name}`);
      for (const c of order) {
        const chain = table.get(c)!;
        out.push(`:${c} ${chain.builtin ? chain.policy : "-"} [0:0]`);
      }
      for (const c of order)
        for (const r of table.get(c)!.rules)
          out.push(r.text === "" ? `-A ${c}` : `-A ${c} ${r.text}`);
      out.push("COMMIT", `# Completed on ${SAVE_DATE}`);
    }
    return out.length === 0 ? "" : `${out.join("\n")}\n`;
  }

  restore(family: Family, args: readonly string[], stdin: string, seeding: boolean): void {
    const tool = `${family === 4 ? "iptables" : "ip6tables"}-nft-restore`;
    const errors = new XtError(tool);
    let noflush = false;
    for (let i = 0; i < args.length; i++) {
      const a = args[i]!;
      if (a === "--noflush" || a === "-n") noflush = true;
      else if ((a === "-w" || a === "-W") && /^\d+$/.test(args[i + 1] ?? "")) i++;
      else throw unmodeled(`the ${tool} option ${a}`);
    }
    if (!noflush) throw unmodeled(`${tool} without --noflush (it flushes every table it names)`);

    interface Section {
      readonly name: XTableName;
      readonly chains: XTable;
      /** The first error the kernel reports at COMMIT; parse errors before it still win. */
      deferred: ((commitLine: number) => ToolFailure) | undefined;
    }
    const lines = stdin.split("\n");
    let section: Section | undefined;
    for (let i = 0; i < lines.length; i++) {
      const n = i + 1;
      const line = lines[i]!.trim();
      if (line === "" || line.startsWith("#")) continue;
      if (line.startsWith("*")) {
        if (section !== undefined)
          throw new ToolFailure(1, `${tool}: COMMIT expected at line ${n}\n`);
        const name = line.slice(1);
        if (!isXTableName(name))
          throw errors.parameter(n, `${tool}: line ${n} table name '${name}' invalid`);
        const existing = this.#tables[family].get(name);
        section = {
          name,
          chains: existing === undefined ? newXTable(name) : cloneXTable(existing),
          deferred: undefined,
        };
        continue;
      }
      if (section === undefined)
        throw new ToolFailure(
          2,
          `${tool}: line ${n}: no table selected: the input must start with *filter, *nat or *mangle\n`,
        );
      const s = section;
      if (line === "COMMIT") {
        if (s.deferred !== undefined) throw s.deferred(n);
        this.#tables[family].set(s.name, s.chains);
        section = undefined;
        continue;
      }
      if (line.startsWith(":")) {
        const [name = "", policy = "-"] = splitWords(line.slice(1));
        if (name.length > 28)
          throw errors.parameter(n, `chain name \`${name}' too long (must be under 29 chars)`);
        const chain = s.chains.get(name);
        if (chain?.builtin === true) {
          if (policy !== "ACCEPT" && policy !== "DROP")
            throw errors.parameter(n, `Bad policy name \`${policy}'`);
          chain.policy = policy;
        } else if (policy !== "-") {
          throw errors.parameter(
            n,
            `Can't set policy \`${policy}' on \`${name}' line ${n}: Bad built-in chain name`,
          );
        } else if (chain !== undefined) {
          chain.rules = [];
        } else {
          s.chains.set(name, { builtin: false, policy: "-", rules: [] });
        }
        continue;
      }
      const words = splitRestoreLine(line);
      const op = words[0]!;
      const chainName = words[1];
      const ctx: RuleContext = {
        family,
        table: s.name,
        chain: chainName ?? "",
        chains: s.chains,
        line: n,
        errors,
        seeding,
      };
      const chain = chainName === undefined ? undefined : s.chains.get(chainName);
      const missingChain = () => errors.line(n, "No chain/target/match by that name");
      const checkTarget = (parsed: ParsedRule, what: "RULE_APPEND" | "RULE_INSERT") => {
        const target = parsed.rule.target;
        if (target !== undefined) {
          const t = s.chains.get(target);
          if (t === undefined)
            s.deferred ??= (c) => errors.parameter(c, `Chain '${target}' does not exist`);
          else if (t.builtin)
            s.deferred ??= () =>
              errors.kernel(
                n,
                `${what} failed (Operation not supported): rule in chain ${chainName}`,
              );
        }
        if (parsed.invalid)
          s.deferred ??= () =>
            errors.kernel(n, `${what} failed (Invalid argument): rule in chain ${chainName}`);
      };
      switch (op) {
        case "-A": {
          if (chain === undefined) throw missingChain();
          const parsed = this.#parseRule(words.slice(2), ctx);
          checkTarget(parsed, "RULE_APPEND");
          chain.rules.push(parsed.rule);
          break;
        }
        case "-I": {
          if (chain === undefined) throw missingChain();
          let at = 1;
          let rest = words.slice(2);
          if (/^\d+$/.test(rest[0] ?? "")) {
            at = Number(rest[0]);
            rest = rest.slice(1);
          }
          if (at < 1) throw errors.parameter(n, `Invalid rule number \`${at}'`);
          const parsed = this.#parseRule(rest, ctx);
          if (at > chain.rules.length + 1) throw errors.line(n, "Index of insertion too big");
          checkTarget(parsed, "RULE_INSERT");
          chain.rules.splice(at - 1, 0, parsed.rule);
          break;
        }
        case "-D": {
          if (chain === undefined) throw missingChain();
          const rest = words.slice(2);
          if (rest.length === 1 && /^\d+$/.test(rest[0]!)) {
            const at = Number(rest[0]);
            if (at < 1 || at > chain.rules.length)
              throw errors.line(n, "Index of deletion too big");
            chain.rules.splice(at - 1, 1);
            break;
          }
          const text = this.#parseRule(rest, ctx).rule.text;
          const at = chain.rules.findIndex((r) => r.text === text);
          if (at < 0) throw errors.line(n, "Bad rule (does a matching rule exist in that chain?)");
          chain.rules.splice(at, 1);
          break;
        }
        case "-F": {
          if (chainName === undefined) {
            for (const c of s.chains.values()) c.rules = [];
          } else {
            if (chain === undefined) throw missingChain();
            chain.rules = [];
          }
          break;
        }
        case "-X": {
          if (chainName === undefined) throw unmodeled("-X without a chain name");
          if (chain === undefined) throw missingChain();
          const referenced = [...s.chains.values()].some((c) =>
            c.rules.some((r) => r.target === chainName),
          );
          if (chain.builtin || chain.rules.length > 0 || referenced) {
            s.deferred ??= () =>
              errors.kernel(n, `CHAIN_DEL failed (Device or resource busy): chain ${chainName}`);
          } else {
            s.chains.delete(chainName);
          }
          break;
        }
        case "-N": {
          if (chainName === undefined) throw errors.parameter(n, "-N requires a chain name");
          if (chain !== undefined) throw errors.line(n, "Chain already exists");
          if (chainName.length > 28)
            throw errors.parameter(
              n,
              `chain name \`${chainName}' too long (must be under 29 chars)`,
            );
          s.chains.set(chainName, { builtin: false, policy: "-", rules: [] });
          break;
        }
        default:
          if (op.startsWith("-")) throw unmodeled(`the restore command ${op}`);
          throw new ToolFailure(
            2,
            `Bad argument \`${op}'\nError occurred at line: ${n}\nTry \`${tool} -h' or '${tool} --help' for more information.\n`,
          );
      }
    }
    if (section !== undefined) {
      const at = stdin.endsWith("\n") ? lines.length : lines.length + 1;
      throw new ToolFailure(1, `${tool}: COMMIT expected at line ${at}\n`);
    }
  }

  /** A rule in iptables-save's form; seeded rules the fake cannot parse are kept verbatim. */
  #parseRule(words: readonly string[], ctx: RuleContext): ParsedRule {
    try {
      return this.#parseModeledRule(words, ctx);
    } catch (e) {
      if (!ctx.seeding || !(e instanceof ToolFailure) || !e.unmodeled) throw e;
    }
    const sets: string[] = [];
    let target: string | undefined;
    words.forEach((w, i) => {
      const next = words[i + 1];
      if (w === "--match-set" && next !== undefined) sets.push(next);
      if (
        (w === "-j" || w === "-g") &&
        next !== undefined &&
        ctx.chains.get(next)?.builtin === false
      )
        target = next;
    });
    for (const s of sets) this.#checkSet(s, ctx);
    const text = words.map((w) => (/^[^\s"'\\]+$/.test(w) ? w : saveString(w))).join(" ");
    return { rule: { text, target, sets }, invalid: false };
  }

  #checkSet(name: string, ctx: RuleContext): void {
    const set = this.#sets.get(name);
    if (set === undefined) throw ctx.errors.parameter(ctx.line, `Set ${name} doesn't exist.\n`);
    if (set.family !== ctx.family)
      throw ctx.errors.parameter(
        ctx.line,
        `The protocol family of set ${name} is IPv${set.family}, which is not applicable.`,
      );
  }

  #parseModeledRule(words: readonly string[], ctx: RuleContext): ParsedRule {
    const { errors, line } = ctx;
    let i = 0;
    const arg = (option: string): string => {
      const w = words[i++];
      if (w === undefined) throw errors.parameter(line, `option "${option}" requires an argument`);
      return w;
    };
    const mark = (option: string, text: string): [number, number | undefined] => {
      const [v, m] = text.split("/");
      const value = parseU32(v ?? "");
      const mask = m === undefined ? undefined : parseU32(m);
      if (value === undefined || (m !== undefined && mask === undefined))
        throw errors.parameter(line, `Bad value for "${option}" option: "${text}"`);
      return [value, mask];
    };
    let address: string[] = [];
    let iface: string[] = [];
    let proto: string[] = [];
    let protocol: string | undefined;
    const matches: string[] = [];
    let targetWords: string[] = [];
    let target: string | undefined;
    let invalid = false;
    const sets: string[] = [];
    /** Options of the current match: `[!] --option args…` until the next clause. */
    const options = (): { invert: boolean; name: string }[] => {
      const out: { invert: boolean; name: string }[] = [];
      while (i < words.length) {
        const w = words[i]!;
        const invert = w === "!" && (words[i + 1] ?? "").startsWith("--");
        const name = invert ? words[i + 1]! : w;
        if (!name.startsWith("--")) break;
        i += invert ? 2 : 1;
        out.push({ invert, name });
      }
      return out;
    };
    const bang = (invert: boolean) => (invert ? ["!"] : []);
    while (i < words.length) {
      let w = words[i++]!;
      let invert = false;
      if (w === "!") {
        invert = true;
        w = words[i++] ?? "";
      }
      if (w === "-d" || w === "--destination") {
        // iptables-save prints the network, host bits cleared, with its prefix: 10.0.0.0/8.
        const text = arg(w);
        const cidr = tryParseCidr(text);
        if (cidr === undefined || cidr.family !== ctx.family)
          throw errors.parameter(line, `host/network \`${text}' not found`);
        address = [...bang(invert), "-d", formatCidr(cidr)];
      } else if (w === "-i" || w === "--in-interface") {
        const name = arg(w);
        if (name.length > 15)
          throw errors.parameter(
            line,
            `interface name \`${name}' must be shorter than IFNAMSIZ (15)`,
          );
        iface = [...iface, ...bang(invert), "-i", name];
      } else if (w === "-o" || w === "--out-interface") {
        const name = arg(w);
        if (name.length > 15)
          throw errors.parameter(
            line,
            `interface name \`${name}' must be shorter than IFNAMSIZ (15)`,
          );
        const builtin = ctx.chains.get(ctx.chain)?.builtin === true ? ctx.chain : undefined;
        if (builtin === "PREROUTING" || builtin === "INPUT")
          throw errors.parameter(line, `Can't use -o with ${builtin}`);
        iface = [...iface, ...bang(invert), "-o", name];
      } else if (w === "-p" || w === "--protocol") {
        let p = arg(w).toLowerCase();
        if (p === "icmpv6" || p === "58") p = "ipv6-icmp";
        if (p !== "tcp" && p !== "udp" && p !== "sctp" && p !== "ipv6-icmp")
          throw unmodeled(`the protocol ${p}`);
        protocol = p;
        proto = [...bang(invert), "-p", p];
      } else if (w === "-m" || w === "--match") {
        const module = arg(w);
        const out: string[] = ["-m", module];
        if (module === "statistic") {
          // Its options take a value each: `--mode nth --every N --packet P`, in any order.
          const statistic: Statistic = {};
          while ((words[i] ?? "").startsWith("--") || words[i] === "!") {
            if (words[i] === "!") throw unmodeled("the match -m statistic with !");
            const name = words[i++]!;
            const key = name.slice(2);
            if (key !== "mode" && key !== "every" && key !== "packet")
              throw unmodeled(`the match -m statistic ${name}`);
            if (statistic[key] !== undefined)
              throw errors.parameter(line, `statistic: option "${name}" can only be used once.\n`);
            const text = arg(name);
            if (key === "mode") {
              if (text === "random") throw unmodeled("the match -m statistic --mode random");
              if (text !== "nth") throw errors.parameter(line, `Bad mode "${text}"`);
              statistic.mode = text;
              continue;
            }
            const min = key === "every" ? 1 : 0;
            const n = /^\d+$/.test(text) ? Number(text) : Number.NaN;
            if (!(n >= min && n <= 0xffffffff))
              throw errors.parameter(
                line,
                `statistic: bad value for option "${name}", or out of range (${min}-4294967295).\n`,
              );
            statistic[key] = n;
          }
          matches.push(...out, ...statisticWords(statistic, errors, line));
          continue;
        }
        const opts = options();
        if (opts.length === 0) throw unmodeled(`-m ${module} without options`);
        const conntrack: string[][] = [[], []];
        for (const o of opts) {
          const known = (() => {
            switch (`${module} ${o.name}`) {
              case "mark --mark":
              case "connmark --mark": {
                const [v, m] = mark(o.name, arg(o.name));
                const text = m === undefined || m === 0xffffffff ? hex(v) : `${hex(v)}/${hex(m)}`;
                out.push(...bang(o.invert), "--mark", text);
                return true;
              }
              case "set --match-set": {
                const name = arg(o.name);
                const dir = arg(o.name);
                if (!/^(src|dst)(,(src|dst)){0,5}$/.test(dir))
                  throw errors.parameter(
                    line,
                    `You must specify (the comma separated list of) 'src' or 'dst'.`,
                  );
                this.#checkSet(name, ctx);
                sets.push(name);
                out.push(...bang(o.invert), "--match-set", name, dir);
                return true;
              }
              case "conntrack --ctstate": {
                const given = arg(o.name).split(",");
                for (const s of given)
                  if (!CTSTATES.includes(s)) throw errors.parameter(line, `Bad ctstate "${s}"`);
                const ordered = CTSTATES.filter((s) => given.includes(s)).join(",");
                conntrack[0] = [...bang(o.invert), "--ctstate", ordered];
                return true;
              }
              case "conntrack --ctdir": {
                const d = arg(o.name);
                if (d !== "ORIGINAL" && d !== "REPLY")
                  throw errors.parameter(line, `Unknown ctdir "${d}"`);
                conntrack[1] = ["--ctdir", d];
                return true;
              }
              case "tcp --tcp-flags": {
                const flags = (text: string) => {
                  const list = text.split(",");
                  for (const f of list)
                    if (!TCP_FLAGS.includes(f) && f !== "ALL" && f !== "NONE")
                      throw errors.parameter(line, `Unknown TCP flag \`${f}'`);
                  if (list.includes("ALL")) return "ALL";
                  const on = TCP_FLAGS.filter((f) => list.includes(f));
                  return on.length === 0 ? "NONE" : on.join(",");
                };
                const mask = flags(arg(o.name));
                const comp = flags(arg(o.name));
                if (protocol !== "tcp") throw errors.parameter(line, "TCP match requires '-p tcp'");
                out.push(...bang(o.invert), "--tcp-flags", mask, comp);
                return true;
              }
              case "icmp6 --icmpv6-type": {
                // The names Sallyport and kube-proxy could use; saved as numbers, like ip6tables.
                const given = arg(o.name);
                const type =
                  ICMPV6_TYPES[given] ?? (/^\d+$/.test(given) ? Number(given) : undefined);
                if (type === undefined || type > 255)
                  throw errors.parameter(line, `Unknown ICMPv6 type \`${given}'`);
                // icmp6_checkentry() wants -p ipv6-icmp (EINVAL at commit); IPv4 has no icmp6.
                if (protocol !== "ipv6-icmp" || ctx.family !== 6) invalid = true;
                out.push(...bang(o.invert), "--icmpv6-type", String(type));
                return true;
              }
              case "multiport --dports":
              case "multiport --destination-ports": {
                const list = arg(o.name);
                if (protocol === undefined)
                  throw errors.parameter(
                    line,
                    "multiport needs `-p tcp', `-p udp', `-p udplite', `-p sctp' or `-p dccp'",
                  );
                let count = 0;
                for (const p of list.split(",")) {
                  const range = p.split(":");
                  if (range.length > 2 || range.some((x) => !/^\d+$/.test(x) || Number(x) > 65535))
                    throw errors.parameter(line, `invalid port/service \`${p}' specified`);
                  count += range.length;
                }
                if (count > 15) throw errors.parameter(line, "too many ports specified");
                out.push(...bang(o.invert), "--dports", list);
                return true;
              }
              case "comment --comment": {
                const text = arg(o.name);
                if (text.length > 255)
                  throw errors.parameter(line, "comment may not exceed 255 characters");
                out.push("--comment", saveString(text));
                return true;
              }
              default:
                return false;
            }
          })();
          if (!known) throw unmodeled(`the match -m ${module} ${o.name}`);
        }
        if (module === "conntrack") out.push(...conntrack[0]!, ...conntrack[1]!);
        matches.push(...out);
      } else if (w === "-j" || w === "-g" || w === "--jump" || w === "--goto") {
        const name = arg(w);
        const goto = w === "-g" || w === "--goto";
        const opts = options();
        const only = (expected: string | undefined) => {
          const o = opts[0];
          if (
            opts.length !== (expected === undefined ? 0 : 1) ||
            (o !== undefined && o.name !== expected)
          )
            throw unmodeled(
              `the target ${name} with ${opts.map((x) => x.name).join(" ") || "no options"}`,
            );
        };
        if (goto) {
          only(undefined);
          target = name;
          targetWords = ["-g", name];
        } else if (name === "ACCEPT" || name === "DROP" || name === "RETURN") {
          only(undefined);
          targetWords = ["-j", name];
        } else if (name === "CONNMARK" && opts[0]?.name === "--restore-mark") {
          // `--restore-mark --nfmask N --ctmask C`, saved in that order (masks in hex).
          const masks = new Map<string, string>();
          // options() stopped at the value of the option after --restore-mark.
          let option = opts[1]?.name;
          while (option !== undefined) {
            if (
              (option !== "--nfmask" && option !== "--ctmask") ||
              masks.has(option) ||
              opts.length > 2
            )
              throw unmodeled(`the target CONNMARK --restore-mark with ${option}`);
            masks.set(option, hex(mark(option, arg(option))[0]));
            option = words[i]?.startsWith("--") ? words[i++] : undefined;
          }
          if (masks.size !== 2)
            throw unmodeled(
              "the target CONNMARK --restore-mark without both --nfmask and --ctmask",
            );
          targetWords = [
            "-j",
            "CONNMARK",
            "--restore-mark",
            "--nfmask",
            masks.get("--nfmask")!,
            "--ctmask",
            masks.get("--ctmask")!,
          ];
        } else if (name === "MARK" || name === "CONNMARK") {
          only("--set-xmark");
          const [v, m] = mark("--set-xmark", arg("--set-xmark"));
          targetWords = ["-j", name, "--set-xmark", `${hex(v)}/${hex(m ?? 0xffffffff)}`];
        } else if (name === "SNAT") {
          only("--to-source");
          const text = arg("--to-source");
          const to = snatSource(text, ctx.family, errors, line);
          if (to.ports !== undefined && !["tcp", "udp", "sctp"].includes(protocol ?? ""))
            throw errors.parameter(line, "Need TCP, UDP, SCTP or DCCP with port specification");
          // The nat targets' checkentry: only valid in the nat table.
          if (ctx.table !== "nat") invalid = true;
          targetWords = ["-j", "SNAT", "--to-source", to.text];
        } else if (name === "TCPMSS") {
          only("--clamp-mss-to-pmtu");
          // xt_check_target() wants -p tcp and tcpmss_tg4_check() the FORWARD, OUTPUT or
          // POSTROUTING hook; under nft_compat it skips its "only works on SYN packets" check.
          const hook = ctx.chains.get(ctx.chain)?.builtin === true ? ctx.chain : undefined;
          if (
            protocol !== "tcp" ||
            (hook !== undefined && !["FORWARD", "OUTPUT", "POSTROUTING"].includes(hook))
          )
            invalid = true;
          targetWords = ["-j", "TCPMSS", "--clamp-mss-to-pmtu"];
        } else if (UNMODELED_TARGETS.has(name)) {
          throw unmodeled(`the target ${name}`);
        } else {
          only(undefined);
          target = name;
          targetWords = ["-j", name];
        }
      } else if (w.startsWith("-")) {
        throw unmodeled(`the rule option ${w}`);
      } else {
        throw errors.parameter(line, `Bad argument \`${w}'`);
      }
    }
    const text = [...address, ...iface, ...proto, ...matches, ...targetWords].join(" ");
    return { rule: { text, target, sets }, invalid };
  }

  dump(): string[] {
    const out: string[] = [];
    for (const family of [4, 6] as const) {
      for (const name of [...this.#tables[family].keys()].sort()) {
        const table = this.#tables[family].get(name)!;
        for (const c of chainOrder(name, table)) {
          const chain = table.get(c)!;
          out.push(`iptables${family} ${name} :${c} ${chain.builtin ? chain.policy : "-"}`);
          for (const r of chain.rules)
            out.push(`iptables${family} ${name} -A ${c} ${r.text}`.trimEnd());
        }
      }
    }
    return out;
  }
}

// ================================================================================================
// ipset save / ipset restore (and single ipset commands)
//
// Models ipset 7.17 on Linux 6.18:
// - restore runs line by line and stops at the first error (exit 1, "ipset v7.17: Error in line
//   N: …"); what ran before stays. Consecutive add (or del) lines of one set are sent to the kernel
//   as one message when the next command differs, so an error the tool finds itself (a set that
//   does not exist, a bad element) loses the lines still waiting, while an error the kernel
//   returns keeps the elements before it. (The real tool also sends when its netlink buffer is
//   full; the fake never does, so it may lose more lines than the real tool, never fewer.)
// - -exist: create of an identical set (type, family, maxelem and options; hashsize is ignored
//   because the kernel resizes), add of a member already there (its nomatch flag is updated), del
//   of a missing member and destroy of a missing set succeed.
// - rejects: a set in use by an iptables rule cannot be destroyed; swap needs both sets and the
//   same type and family (the references follow the names, as the kernel swaps them too); a set
//   name over 31 characters; /0 in hash:net; an element of the other family; a full set.
// - save: `create NAME TYPE family F hashsize H maxelem M bucketsize 12 initval 0x…` then the
//   members in hash order, host entries without their prefix.
// - list -t [NAME] (terse): per set `Name`, `Type`, `Revision` (7 for hash:net, 6 for hash:ip),
//   `Header` as save prints it, `Size in memory` (not modeled: 0), `References` (1 while a rule
//   uses the set; the kernel counts the rules), `Number of entries`, sets apart by a blank line.
// Not modeled: types other than hash:net and hash:ip (seeded sets of other types keep their
// members verbatim), timeouts, counters, comments, hash growth, `ipset list` without -t.

interface Member {
  readonly text: string;
  nomatch: boolean;
}

interface IpSet {
  name: string;
  readonly type: string;
  readonly family: Family;
  readonly hashsize: number;
  readonly maxelem: number;
  /** Create options the fake keeps without modeling them (seeded foreign sets). */
  readonly options: string;
  readonly initval: number;
  members: Map<string, Member>;
}

/** What `ipset save` prints after a set's type, and `ipset list` as its header. */
function headerOf(s: IpSet): string {
  return `family ${familyName(s.family)} hashsize ${s.hashsize} maxelem ${s.maxelem}${s.options} bucketsize 12 initval 0x${s.initval.toString(16).padStart(8, "0")}`;
}

interface IpsetCommand {
  readonly op: string;
  readonly line: number;
  readonly set: string;
  readonly other?: string;
  readonly create?: Omit<IpSet, "members">;
  readonly member?: Member & { readonly key: string };
}

class Ipsets {
  /** Index slots, as the kernel keeps them: a new set takes the first free one. */
  readonly #slots: (IpSet | undefined)[] = [];
  #inUse: (name: string) => boolean = () => false;

  set references(fn: (name: string) => boolean) {
    this.#inUse = fn;
  }

  get(name: string): IpSet | undefined {
    return this.#slots.find((s) => s?.name === name);
  }

  /** Every set, or the one `args` names (`ipset save|list [-t] NAME`). */
  #named(command: string, args: readonly string[]): IpSet[] {
    const sets = this.#slots.filter((s): s is IpSet => s !== undefined);
    if (args.length === 0) return sets;
    if (args.length > 1) throw unmodeled(`ipset ${command} ${args.join(" ")}`);
    const named = sets.filter((s) => s.name === args[0]);
    if (named.length === 0)
      throw new ToolFailure(1, "ipset v7.17: The set with the given name does not exist\n");
    return named;
  }

  list(args: readonly string[]): string {
    if (args[0] !== "-t" && args[0] !== "-terse")
      throw unmodeled(`ipset list ${args.join(" ")} (only -t is modeled)`);
    const list = this.#named("list -t", args.slice(1));
    return list
      .map((s) =>
        [
          `Name: ${s.name}`,
          `Type: ${s.type}`,
          `Revision: ${s.type === "hash:ip" ? 6 : 7}`,
          `Header: ${headerOf(s)}`,
          "Size in memory: 0",
          `References: ${this.#inUse(s.name) ? 1 : 0}`,
          `Number of entries: ${s.members.size}`,
        ].join("\n"),
      )
      .join("\n\n")
      .concat(list.length === 0 ? "" : "\n");
  }

  save(args: readonly string[]): string {
    const out: string[] = [];
    for (const s of this.#named("save", args)) {
      out.push(`create ${s.name} ${s.type} ${headerOf(s)}`);
      // The kernel walks its hash buckets: members come out in no useful order.
      const order = [...s.members.values()].sort(
        (a, b) => fnv1a(`${s.initval}/${a.text}`) - fnv1a(`${s.initval}/${b.text}`),
      );
      for (const m of order) out.push(`add ${s.name} ${m.text}${m.nomatch ? " nomatch" : ""}`);
    }
    return out.length === 0 ? "" : `${out.join("\n")}\n`;
  }

  restore(args: readonly string[], stdin: string, seeding: boolean): void {
    let exist = false;
    for (const a of args) {
      if (a === "-exist" || a === "-!") exist = true;
      else throw unmodeled(`the ipset restore option ${a}`);
    }
    const fail = (line: number) => (message: string) =>
      new ToolFailure(1, `ipset v7.17: Error in line ${line}: ${message}\n`);
    const lines = stdin.split("\n");
    let pending: IpsetCommand[] = [];
    const send = () => {
      const batch = pending;
      pending = [];
      for (const c of batch) this.#kernel(c, exist, fail(c.line));
    };
    for (let i = 0; i < lines.length; i++) {
      const words = splitWords(lines[i]!);
      if (words.length === 0 || words[0]!.startsWith("#")) continue;
      if (words[0] === "COMMIT") continue;
      const command = this.#parse(words, i + 1, seeding, fail(i + 1));
      const last = pending[pending.length - 1];
      if (
        (command.op === "add" || command.op === "del") &&
        (last === undefined || (last.op === command.op && last.set === command.set))
      ) {
        pending.push(command);
        continue;
      }
      send();
      if (command.op === "add" || command.op === "del") pending.push(command);
      else this.#kernel(command, exist, fail(i + 1));
    }
    send();
  }

  /** `ipset create|add|del|flush|destroy|swap …` as one command. */
  single(words: readonly string[], seeding: boolean): void {
    const exist = words.includes("-exist") || words.includes("-!");
    const rest = words.filter((w) => w !== "-exist" && w !== "-!");
    const fail = (message: string) => new ToolFailure(1, `ipset v7.17: ${message}\n`);
    this.#kernel(this.#parse(rest, 0, seeding, fail), exist, fail);
  }

  /** What the ipset tool checks itself before it talks to the kernel. */
  #parse(
    words: readonly string[],
    line: number,
    seeding: boolean,
    fail: (message: string) => ToolFailure,
  ): IpsetCommand {
    const [op = "", name = ""] = words;
    const checkName = (n: string) => {
      if (n.length > 31) throw fail(`Syntax error: setname '${n}' is longer than 31 characters`);
    };
    switch (op) {
      case "create": {
        checkName(name);
        const type = words[2] ?? "";
        const modeled = type === "hash:net" || type === "hash:ip";
        if (!modeled && !seeding) throw unmodeled(`the ipset type ${type}`);
        let family: Family = 4;
        let hashsize = 1024;
        let maxelem = 65536;
        let initval = fnv1a(`initval/${name}`);
        let options = "";
        for (let i = 3; i < words.length; i++) {
          const w = words[i]!;
          const value = words[i + 1] ?? "";
          if (w === "family" && (value === "inet" || value === "inet6")) {
            family = value === "inet" ? 4 : 6;
            i++;
          } else if ((w === "hashsize" || w === "maxelem") && /^\d+$/.test(value)) {
            if (w === "hashsize") hashsize = Number(value);
            else maxelem = Number(value);
            i++;
          } else if (w === "bucketsize" && /^\d+$/.test(value)) {
            i++;
          } else if (w === "initval" && parseU32(value) !== undefined) {
            initval = parseU32(value)!;
            i++;
          } else if (seeding) {
            options += ` ${w}`;
          } else {
            throw unmodeled(`the ipset create option ${w}`);
          }
        }
        return {
          op,
          line,
          set: name,
          create: { name, type, family, hashsize, maxelem, options, initval },
        };
      }
      case "add":
      case "del": {
        const set = this.get(name);
        if (set === undefined) throw fail("The set with the given name does not exist");
        const elem = words[2] ?? "";
        const flags = words.slice(3);
        const nomatch = flags.includes("nomatch");
        if (set.type !== "hash:net" && set.type !== "hash:ip") {
          // A seeded set of a type the fake does not model: members are opaque text.
          if (!seeding) throw unmodeled(`elements of the ipset type ${set.type}`);
          const text = words.slice(2).join(" ");
          return { op, line, set: name, member: { key: elem, text, nomatch: false } };
        }
        if (flags.some((f) => f !== "nomatch") || (nomatch && set.type !== "hash:net"))
          throw unmodeled(`the ipset element options ${flags.join(" ")}`);
        const [addr = "", prefixText] = elem.split("/");
        const address = tryParseAddress(addr);
        const width = bits(set.family);
        if (address === undefined || address.family !== set.family)
          throw fail(
            `Syntax error: cannot parse ${elem}: resolving to IPv${set.family} address failed`,
          );
        if (prefixText !== undefined && (!/^\d+$/.test(prefixText) || Number(prefixText) > width))
          throw fail(`Syntax error: '${prefixText}' is out of range 0-${width}`);
        const prefix = prefixText === undefined ? width : Number(prefixText);
        if (set.type === "hash:ip" && prefix !== width) throw unmodeled("hash:ip ranges");
        const cidr: Cidr = {
          family: set.family,
          base: address.value & ~hostMask(set.family, prefix),
          prefix,
        };
        const base = formatAddress({ family: set.family, value: cidr.base });
        const text = prefix === width ? base : `${base}/${prefix}`;
        return { op, line, set: name, member: { key: `${base}/${prefix}`, text, nomatch } };
      }
      case "flush":
      case "destroy":
        if (name === "") throw unmodeled(`ipset ${op} of every set`);
        return { op, line, set: name };
      case "swap":
        return { op, line, set: name, other: words[2] ?? "" };
      case "rename":
      case "test":
      case "list":
      case "save":
      case "restore":
        throw unmodeled(`ipset ${op}`);
      default:
        throw new ToolFailure(
          2,
          `ipset v7.17: No command specified: unknown argument ${op}\nTry \`ipset help' for more information.\n`,
        );
    }
  }

  /** What the kernel does with one command. */
  #kernel(c: IpsetCommand, exist: boolean, fail: (message: string) => ToolFailure): void {
    const at = this.#slots.findIndex((s) => s?.name === c.set);
    const set = at < 0 ? undefined : this.#slots[at];
    switch (c.op) {
      case "create": {
        const want = c.create!;
        if (set !== undefined) {
          const same =
            set.type === want.type &&
            set.family === want.family &&
            set.maxelem === want.maxelem &&
            set.options === want.options;
          if (exist && same) return;
          throw fail("Set cannot be created: set with the same name already exists");
        }
        const free = this.#slots.indexOf(undefined);
        const created = { ...want, members: new Map<string, Member>() };
        if (free < 0) this.#slots.push(created);
        else this.#slots[free] = created;
        return;
      }
      case "add": {
        if (set === undefined) throw fail("The set with the given name does not exist");
        const m = c.member!;
        const have = set.members.get(m.key);
        if (have !== undefined) {
          if (!exist) throw fail("Element cannot be added to the set: it's already added");
          have.nomatch = m.nomatch;
          return;
        }
        if (set.members.size >= set.maxelem) throw fail("Hash is full, cannot add more elements");
        if (set.type === "hash:net" && m.key.endsWith("/0"))
          throw fail("The value of the CIDR parameter of the IP address is invalid");
        set.members.set(m.key, { text: m.text, nomatch: m.nomatch });
        return;
      }
      case "del": {
        if (set === undefined) throw fail("The set with the given name does not exist");
        if (!set.members.delete(c.member!.key) && !exist)
          throw fail("Element cannot be deleted from the set: it's not added");
        return;
      }
      case "flush":
        if (set === undefined) throw fail("The set with the given name does not exist");
        set.members = new Map();
        return;
      case "destroy":
        if (set === undefined) {
          if (exist) return;
          throw fail("The set with the given name does not exist");
        }
        if (this.#inUse(set.name))
          throw fail("Set cannot be destroyed: it is in use by a kernel component");
        this.#slots[at] = undefined;
        while (this.#slots.length > 0 && this.#slots[this.#slots.length - 1] === undefined)
          this.#slots.pop();
        return;
      case "swap": {
        if (set === undefined) throw fail("The set with the given name does not exist");
        const bt = this.#slots.findIndex((s) => s?.name === c.other);
        const other = bt < 0 ? undefined : this.#slots[bt];
        if (other === undefined)
          throw fail("Sets cannot be swapped: the second set does not exist");
        if (other.type !== set.type || other.family !== set.family)
          throw fail("The sets cannot be swapped: their type does not match");
        [set.name, other.name] = [other.name, set.name];
        this.#slots[at] = other;
        this.#slots[bt] = set;
        return;
      }
    }
  }

  dump(): string[] {
    const out: string[] = [];
    const sets = this.#slots.filter((s): s is IpSet => s !== undefined);
    for (const s of sets.sort((a, b) => (a.name < b.name ? -1 : 1))) {
      out.push(
        `ipset ${s.name} ${s.type} family ${familyName(s.family)} hashsize ${s.hashsize} maxelem ${s.maxelem}${s.options}`,
      );
      const members = [...s.members.values()].map(
        (m) => `ipset ${s.name} add ${m.text}${m.nomatch ? " nomatch" : ""}`,
      );
      out.push(...members.sort());
    }
    return out;
  }
}

// ================================================================================================
// sysctl
//
// Models procps-ng 4.0.2 over /proc/sys/net: keys are read with `sysctl [-e] KEY…` (printed as
// "net.ipv4.ip_forward = 1"; a missing key is skipped with -e, an error without) and written with
// `sysctl [-q] -w KEY=VALUE…` (a missing key or a non-integer value is reported and the others
// are still written; exit 1). A key with a slash is a path, otherwise dots separate its parts.
// Each device gets its conf/<dev> keys, copied from conf/default, and loses them with the device;
// writing net/ipv4/ip_forward or net/ipv6/conf/all/forwarding sets `forwarding` everywhere, as the
// kernel does. Only the keys below exist.

const IPV4_CONF: Readonly<Record<string, string>> = {
  forwarding: "0",
  rp_filter: "0",
  arp_notify: "0",
  arp_ignore: "0",
  accept_local: "0",
  proxy_arp: "0",
  send_redirects: "1",
  promote_secondaries: "0",
};
const IPV6_CONF: Readonly<Record<string, string>> = {
  forwarding: "0",
  ndisc_notify: "0",
  disable_ipv6: "0",
  accept_ra: "1",
  keep_addr_on_down: "0",
  addr_gen_mode: "0",
  mldv1_unsolicited_report_interval: "10000",
  mldv2_unsolicited_report_interval: "1000",
};

class Sysctls {
  readonly values = new Map<string, string>([["net/ipv4/ip_forward", "0"]]);

  constructor() {
    for (const dir of ["all", "default"]) this.addDevice(dir);
  }

  addDevice(name: string): void {
    for (const [key, value] of Object.entries(IPV4_CONF))
      this.values.set(
        `net/ipv4/conf/${name}/${key}`,
        this.values.get(`net/ipv4/conf/default/${key}`) ?? value,
      );
    for (const [key, value] of Object.entries(IPV6_CONF))
      this.values.set(
        `net/ipv6/conf/${name}/${key}`,
        this.values.get(`net/ipv6/conf/default/${key}`) ?? value,
      );
  }

  removeDevice(name: string): void {
    for (const key of [...this.values.keys()])
      if (key.startsWith(`net/ipv4/conf/${name}/`) || key.startsWith(`net/ipv6/conf/${name}/`))
        this.values.delete(key);
  }

  device(family: Family, dev: string, key: string): string | undefined {
    return this.values.get(`net/ipv${family}/conf/${dev}/${key}`);
  }

  run(args: readonly string[]): string {
    let ignoreMissing = false;
    let quiet = false;
    let write = false;
    const keys: string[] = [];
    for (const a of args) {
      if (a === "-e") ignoreMissing = true;
      else if (a === "-q") quiet = true;
      else if (a === "-w") write = true;
      else if (a.startsWith("-")) throw unmodeled(`the sysctl option ${a}`);
      else keys.push(a);
    }
    const path = (key: string) => (key.includes("/") ? key : key.replaceAll(".", "/"));
    const dotted = (p: string) => p.replaceAll("/", ".");
    let stdout = "";
    let stderr = "";
    for (const k of keys) {
      const eq = k.indexOf("=");
      if (write !== eq >= 0)
        throw unmodeled(`sysctl ${write ? "-w without =" : "KEY=VALUE without -w"}`);
      const p = path(write ? k.slice(0, eq) : k);
      if (!this.values.has(p)) {
        if (!ignoreMissing || write)
          stderr += `sysctl: cannot stat /proc/sys/${p}: No such file or directory\n`;
        continue;
      }
      if (!write) {
        stdout += `${dotted(p)} = ${this.values.get(p)}\n`;
        continue;
      }
      const value = k.slice(eq + 1).trim();
      if (!/^-?\d+$/.test(value)) {
        stderr += `sysctl: setting key "${dotted(p)}": Invalid argument\n`;
        continue;
      }
      this.values.set(p, value);
      if (p === "net/ipv4/ip_forward" || p === "net/ipv6/conf/all/forwarding") {
        const v = p.includes("ipv4") ? "ipv4" : "ipv6";
        for (const key of this.values.keys())
          if (key.startsWith(`net/${v}/conf/`) && key.endsWith("/forwarding"))
            this.values.set(key, value);
      }
      if (!quiet) stdout += `${dotted(p)} = ${value}\n`;
    }
    if (stderr !== "") {
      const f = new ToolFailure(ignoreMissing && !write ? 0 : 1, stderr);
      f.stdout = stdout;
      if (f.code !== 0) throw f;
    }
    return stdout;
  }

  dump(): string[] {
    return [...this.values]
      .sort(([a], [b]) => (a < b ? -1 : 1))
      .map(([k, v]) => `sysctl ${k} = ${v}`);
  }
}

// ================================================================================================
// ip (links, addresses, routes, rules, neighbours) and bridge (the VXLAN FDB)
//
// Models iproute2 6.1.0 on Linux 6.18:
// - `ip [-4|-6] -batch -` runs line by line and stops at the first failing line with "Command
//   failed -:N" (exit 1); earlier lines stay applied. Some failures end the tool at once without
//   that line, as the real one does: a neighbour the kernel refuses (exit 2), an address of the
//   wrong family (exit 1), a VXLAN lower device that does not exist (exit 255).
// - links: `link add` of an existing name ("RTNETLINK answers: File exists"), of a name over 15
//   characters, of a second VXLAN with the same VNI, port, family and `gbp`, on a missing parent;
//   `gbp` twice (exit 255); `link set … type vxlan gbp` ("Error: vxlan: cannot change GBP flag.",
//   whatever the device has); `link set … up` of a VXLAN while an up one on the same port and
//   family differs in `gbp` (they cannot share the UDP socket: "RTNETLINK answers: Address already
//   in use"); `ip -json -details` prints `"gbp":true` only when set. VXLAN MTU at
//   most the parent's minus 50 (IPv4 underlay) or 70 (IPv6), macvlan at most the parent's
//   ("RTNETLINK answers: Invalid argument"). A device going down loses its routes (all tables),
//   its neighbours (permanent ones too) and its IPv6 addresses (keep_addr_on_down=0); its IPv4
//   addresses and VXLAN FDB entries stay. Deleting a device deletes its macvlan and VXLAN children.
// - addresses: add of an existing one, del of a missing one, on a missing device; deleting an IPv4
//   primary deletes its secondaries (promote_secondaries=0). `valid_lft`/`preferred_lft` in
//   seconds or `forever`: the kernel deletes an address when its valid lifetime ends (measured on
//   Linux 6.18: 1.02-1.09 s after `valid_lft 1`, IPv4 and IPv6 alike, also while the link has no
//   carrier; the fake deletes it at exactly the lifetime of its clock, `FakeKernel.advance()`);
//   `replace` restarts it; `ip -json` prints the seconds left (4294967295 when permanent) and
//   `dynamic`. `ip -force -batch` runs every line and fails at the end if one failed.
// - conf/<dev>/addr_gen_mode=1: no link-local address (printed) on the device.
// - routes: through a missing device, a down device ("Error: Nexthop device is not up."), a gateway
//   that is a local address (onlink, IPv4) or not on a connected subnet of the device (no onlink:
//   "Error: Nexthop has invalid gateway." / IPv6 "RTNETLINK answers: No route to host"); add of an
//   existing route; del of a missing one ("RTNETLINK answers: No such process").
// - rules: add of an identical rule ("File exists"), del of a missing one.
// - printing: `ip -json -details address show`, `ip -json rule show`, `ip -json route show table
//   all` with the routes the kernel derives from addresses (connected, local, broadcast, IPv6
//   prefix, link-local, multicast), `ip -json neigh show dev X`, `bridge -json fdb show dev X`.
// - VXLAN FDB: `fdb append` of a unicast MAC that has an entry changes nothing (the kernel appends
//   remotes only to the all-zero and multicast entries), `fdb replace` changes its remote, `fdb
//   del … dst X` of a remote the entry does not have succeeds and changes nothing.
// Not modeled: veth and other link kinds (use dummy for an underlay), carrier, link-local
// addresses as stored state (they are derived from the MAC when printed), route metrics and
// types other than unicast, multipath, rules other than fwmark/table, non-permanent FDB entries.

type LinkKind = "loopback" | "dummy" | "vxlan" | "macvlan";

interface Addr {
  readonly family: Family;
  readonly address: string;
  readonly value: bigint;
  readonly prefix: number;
  nodad: boolean;
  /** Clock time (ms) at which the kernel deletes it; undefined: permanent. */
  validUntil?: number | undefined;
  /** The valid lifetime last set (seconds), for printing. */
  validLft?: number | undefined;
}

interface Link {
  readonly index: number;
  readonly name: string;
  readonly kind: LinkKind;
  readonly parent: string | undefined;
  mtu: number;
  mac: string;
  up: boolean;
  addresses: Addr[];
  readonly vxlan?: {
    readonly vni: number;
    readonly port: number;
    readonly local: string;
    readonly learning: boolean;
    readonly gbp: boolean;
  };
  readonly macvlanMode?: string;
}

interface IpRule {
  readonly family: Family;
  readonly pref: number;
  readonly fwmark: number | undefined;
  readonly mask: number | undefined;
  readonly table: number;
}

interface Route {
  readonly family: Family;
  readonly table: number;
  readonly dst: Cidr;
  readonly via: string | undefined;
  readonly dev: string;
  readonly onlink: boolean;
}

interface Neighbour {
  readonly dev: string;
  readonly family: Family;
  readonly address: string;
  readonly mac: string;
  readonly state: string;
}

interface FdbEntry {
  readonly dev: string;
  readonly mac: string;
  dsts: string[];
  readonly seq: number;
}

/** An `ip` failure: the message, and whether the tool exits at once (not "Command failed"). */
class IpError {
  readonly message: string;
  readonly exit: number | undefined;
  readonly kernel: boolean;
  constructor(message: string, options: { exit?: number; kernel?: boolean } = {}) {
    this.message = message;
    this.exit = options.exit;
    this.kernel = options.kernel ?? false;
  }
}

/** The fake, not iproute2, refuses: exit 2 at once (a batch stops there). */
const ipUnmodeled = (what: string) => new IpError(unmodeled(what).stderr.trimEnd(), { exit: 2 });
const kernelSays = (message: string) => new IpError(message, { kernel: true });
const noDevice = (name: string) => new IpError(`Cannot find device "${name}"`);
const vxlanFamily = (x: { readonly local: string }): Family => (x.local.includes(":") ? 6 : 4);

const TABLE_NAMES: Readonly<Record<string, number>> = { local: 255, main: 254, default: 253 };

function tableName(id: number): string {
  return Object.entries(TABLE_NAMES).find(([, v]) => v === id)?.[0] ?? String(id);
}

function parseMac(text: string): string | undefined {
  return /^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$/.test(text) ? text.toLowerCase() : undefined;
}

function cidrText(c: Cidr): string {
  return `${formatAddress({ family: c.family, value: c.base })}/${c.prefix}`;
}

function inCidr(c: Cidr, value: bigint): boolean {
  return (value & ~hostMask(c.family, c.prefix)) === c.base;
}

/** EUI-64 link-local address of a MAC, as the kernel assigns when a device comes up. */
function linkLocal(mac: string): string {
  const b = mac.split(":").map((x) => Number.parseInt(x, 16));
  b[0] = b[0]! ^ 2;
  const words = [(b[0] << 8) | b[1]!, (b[2]! << 8) | 0xff, 0xfe00 | b[3]!, (b[4]! << 8) | b[5]!];
  let v = 0xfe80n << 112n;
  for (let i = 0; i < 4; i++) v |= BigInt(words[i]!) << BigInt(48 - 16 * i);
  return formatAddress({ family: 6, value: v });
}

interface JsonRoute {
  readonly order: [number, bigint, number, number];
  readonly json: Record<string, unknown>;
}

class Net {
  readonly #sysctls: Sysctls;
  readonly links = new Map<string, Link>();
  rules: IpRule[] = [
    { family: 4, pref: 0, fwmark: undefined, mask: undefined, table: 255 },
    { family: 4, pref: 32766, fwmark: undefined, mask: undefined, table: 254 },
    { family: 4, pref: 32767, fwmark: undefined, mask: undefined, table: 253 },
    { family: 6, pref: 0, fwmark: undefined, mask: undefined, table: 255 },
    { family: 6, pref: 32766, fwmark: undefined, mask: undefined, table: 254 },
  ];
  routes: Route[] = [];
  neighbours: Neighbour[] = [];
  fdb: FdbEntry[] = [];
  #nextIndex = 1;
  #seq = 0;
  /** The fake's clock (ms), for address lifetimes. */
  now = 0;

  constructor(sysctls: Sysctls) {
    this.#sysctls = sysctls;
    const lo = this.#newLink({
      name: "lo",
      kind: "loopback",
      parent: undefined,
      mtu: 65536,
      mac: "00:00:00:00:00:00",
    });
    lo.up = true;
    lo.addresses.push(
      {
        family: 4,
        address: "127.0.0.1",
        value: parseAddress("127.0.0.1").value,
        prefix: 8,
        nodad: false,
      },
      { family: 6, address: "::1", value: 1n, prefix: 128, nodad: false },
    );
  }

  #newLink(l: Pick<Link, "name" | "kind" | "parent" | "mtu" | "mac"> & Partial<Link>): Link {
    const link: Link = { index: this.#nextIndex++, up: false, addresses: [], ...l };
    this.links.set(link.name, link);
    this.#sysctls.addDevice(link.name);
    return link;
  }

  // --- commands ---------------------------------------------------------------------------------

  batch(family: Family | undefined, stdin: string, force = false): void {
    const lines = stdin.split("\n");
    let failed = "";
    for (let i = 0; i < lines.length; i++) {
      const words = splitWords(lines[i]!);
      if (words.length === 0 || words[0]!.startsWith("#")) continue;
      try {
        this.command(family, words);
      } catch (e) {
        if (!(e instanceof IpError)) throw e;
        if (e.exit !== undefined && !force) throw new ToolFailure(e.exit, `${e.message}\n`);
        if (!force) throw new ToolFailure(1, `${e.message}\nCommand failed -:${i + 1}\n`);
        failed += `${e.message}\nCommand failed -:${i + 1}\n`;
      }
    }
    if (failed !== "") throw new ToolFailure(1, failed);
  }

  /** Advances the clock: addresses whose valid lifetime ended are deleted, as the kernel does. */
  advance(ms: number): void {
    this.now += ms;
    for (const link of this.links.values())
      link.addresses = link.addresses.filter(
        (a) => a.validUntil === undefined || a.validUntil > this.now,
      );
  }

  /** One `ip` command (as a batch line, or from the command line). */
  command(family: Family | undefined, words: readonly string[]): void {
    const [object = "", verb = "", ...rest] = words;
    switch (object) {
      case "link":
        this.#link(verb, rest);
        return;
      case "addr":
      case "address":
        this.#address(family, verb, rest);
        return;
      case "route":
        this.#route(family, verb, rest);
        return;
      case "rule":
        this.#rule(family ?? 4, verb, rest);
        return;
      case "neigh":
      case "neighbor":
      case "neighbour":
        this.#neigh(family, verb, rest);
        return;
    }
    if (["maddress", "tunnel", "netns", "nexthop", "xfrm", "monitor"].includes(object))
      throw ipUnmodeled(`ip ${object}`);
    throw new IpError(`Object "${object}" is unknown, try "ip help".`);
  }

  #link(verb: string, words: readonly string[]): void {
    if (verb === "add") {
      this.#linkAdd(words);
      return;
    }
    const [first, second] = words;
    const name = first === "dev" ? second : first;
    const args = words.slice(first === "dev" ? 2 : 1);
    if (name === undefined)
      throw new IpError(`Not enough information: "dev" argument is required.`);
    const link = this.links.get(name);
    if (verb === "del" || verb === "delete") {
      if (link === undefined) throw noDevice(name);
      if (args.length > 0) throw ipUnmodeled(`ip link del with ${args.join(" ")}`);
      this.#deleteLink(link);
      return;
    }
    if (verb !== "set") throw ipUnmodeled(`ip link ${verb}`);
    if (link === undefined) throw noDevice(name);
    let mac: string | undefined;
    let mtu: number | undefined;
    let up: boolean | undefined;
    for (let i = 0; i < args.length; i++) {
      const w = args[i]!;
      if (w === "type") {
        this.#changeLink(link, args.slice(i + 1));
        break;
      }
      if (w === "up" || w === "down") up = w === "up";
      else if (w === "address") {
        mac = parseMac(args[++i] ?? "");
        if (mac === undefined)
          throw new IpError(`"${args[i] ?? ""}" is invalid lladdr.`, { exit: 1 });
      } else if (w === "mtu" && /^\d+$/.test(args[i + 1] ?? "")) mtu = Number(args[++i]);
      else throw ipUnmodeled(`ip link set … ${w}`);
    }
    // do_setlink() applies the address, then the MTU, then the flags; a failure keeps the rest.
    if (mac !== undefined) {
      if ((Number.parseInt(mac.slice(0, 2), 16) & 1) === 1)
        throw kernelSays("RTNETLINK answers: Cannot assign requested address");
      link.mac = mac;
    }
    if (mtu !== undefined) {
      if (mtu < 68 || mtu > this.#maxMtu(link))
        throw kernelSays("RTNETLINK answers: Invalid argument");
      link.mtu = mtu;
      for (const child of this.links.values())
        if (child.parent === link.name && child.kind === "macvlan" && child.mtu > mtu)
          child.mtu = mtu;
    }
    if (up === true && !link.up) {
      // vxlan_open() → vxlan_sock_add(): devices share the UDP socket of a port and family only
      // when their receive flags (gbp) agree; another socket on that port cannot be bound.
      const x = link.vxlan;
      if (
        x !== undefined &&
        [...this.links.values()].some(
          (o) =>
            o.up &&
            o.vxlan?.port === x.port &&
            vxlanFamily(o.vxlan) === vxlanFamily(x) &&
            o.vxlan.gbp !== x.gbp,
        )
      )
        throw kernelSays("RTNETLINK answers: Address already in use");
      link.up = true;
    }
    if (up === false && link.up) {
      link.up = false;
      this.#wentDown(link);
    }
  }

  /**
   * `ip link set DEV type KIND …`: the driver's changelink, before anything else of the line.
   * Only what the kernel refuses of VXLAN is modeled: vxlan_nl2flag() refuses any change of
   * the GBP flag, even to the value the device has.
   */
  #changeLink(link: Link, words: readonly string[]): void {
    const [kind, ...options] = words;
    if (kind !== "vxlan" || link.kind !== "vxlan")
      throw ipUnmodeled(`ip link set … type ${kind ?? "(none)"} on a ${link.kind} device`);
    if (options.filter((w) => w === "gbp").length > 1)
      throw new IpError(`Error: either "gbp" is duplicate, or "gbp" is a garbage.`, { exit: 255 });
    const other = options.find((w) => w !== "gbp");
    if (other !== undefined) throw ipUnmodeled(`ip link set … type vxlan ${other}`);
    if (options.length > 0) throw kernelSays("Error: vxlan: cannot change GBP flag.");
    throw ipUnmodeled("ip link set … type vxlan without options");
  }

  #maxMtu(link: Link): number {
    const parent = link.parent === undefined ? undefined : this.links.get(link.parent);
    if (link.kind === "vxlan" && parent !== undefined)
      return parent.mtu - (link.vxlan!.local.includes(":") ? 70 : 50);
    if (link.kind === "macvlan" && parent !== undefined) return parent.mtu;
    return 65535;
  }

  #linkAdd(words: readonly string[]): void {
    let name: string | undefined;
    let parent: string | undefined;
    let mac: string | undefined;
    let mtu: number | undefined;
    let i = 0;
    for (; i < words.length; i++) {
      const w = words[i]!;
      const v = words[i + 1];
      if (w === "type") break;
      if (w === "name" && v !== undefined) name = words[++i];
      else if (w === "link" && v !== undefined) parent = words[++i];
      else if (w === "address" && v !== undefined) {
        mac = parseMac(v);
        if (mac === undefined) throw new IpError(`"${v}" is invalid lladdr.`, { exit: 1 });
        i++;
      } else if (w === "mtu" && /^\d+$/.test(v ?? "")) mtu = Number(words[++i]);
      else if (name === undefined && !w.startsWith("-")) name = w;
      else throw ipUnmodeled(`ip link add … ${w}`);
    }
    const kind = words[i + 1];
    const kindArgs = words.slice(i + 2);
    if (name === undefined)
      throw new IpError(`Not enough information: "name" argument is required.`);
    if (parent !== undefined && !this.links.has(parent)) throw noDevice(parent);
    let link: Omit<Link, "index" | "up" | "addresses">;
    if (kind === "vxlan") {
      let vni: number | undefined;
      let port = 8472;
      let local: string | undefined;
      let dev: string | undefined;
      let learning = true;
      let gbp = false;
      for (let j = 0; j < kindArgs.length; j++) {
        const w = kindArgs[j]!;
        const v = kindArgs[j + 1] ?? "";
        if (w === "id" && /^\d+$/.test(v)) vni = Number(kindArgs[++j]);
        else if (w === "dstport" && /^\d+$/.test(v)) port = Number(kindArgs[++j]);
        else if (w === "local" && tryParseAddress(v) !== undefined) {
          local = formatAddress(parseAddress(v));
          j++;
        } else if (w === "dev") {
          dev = kindArgs[++j] ?? "";
          // vxlan_parse_opt() exits the whole tool when the lower device is missing.
          if (!this.links.has(dev)) throw new IpError(`Cannot find device "${dev}"`, { exit: 255 });
        } else if (w === "nolearning" || w === "learning") learning = w === "learning";
        else if (w === "gbp") {
          // check_duparg(): the tool exits at once.
          if (gbp)
            throw new IpError(`Error: either "gbp" is duplicate, or "gbp" is a garbage.`, {
              exit: 255,
            });
          gbp = true;
        } else throw ipUnmodeled(`the vxlan option ${w}`);
      }
      if (vni === undefined || local === undefined || dev === undefined)
        throw ipUnmodeled("a vxlan device without id, local and dev");
      const lower = this.links.get(dev)!;
      link = {
        name,
        kind: "vxlan",
        parent: dev,
        mtu: lower.mtu - (local.includes(":") ? 70 : 50),
        mac: mac ?? this.#randomMac(name),
        vxlan: { vni, port, local, learning, gbp },
      };
    } else if (kind === "macvlan") {
      if (parent === undefined) throw ipUnmodeled("a macvlan device without link");
      let mode = "vepa";
      for (let j = 0; j < kindArgs.length; j++) {
        if (
          kindArgs[j] === "mode" &&
          ["bridge", "private", "vepa", "passthru", "source"].includes(kindArgs[j + 1] ?? "")
        )
          mode = kindArgs[++j]!;
        else throw ipUnmodeled(`the macvlan option ${kindArgs[j]}`);
      }
      link = {
        name,
        kind: "macvlan",
        parent,
        mtu: this.links.get(parent)!.mtu,
        mac: mac ?? this.#randomMac(name),
        macvlanMode: mode,
      };
    } else if (kind === "dummy") {
      if (kindArgs.length > 0 || parent !== undefined)
        throw ipUnmodeled(`a dummy device with ${kindArgs.join(" ")}`);
      link = {
        name,
        kind: "dummy",
        parent: undefined,
        mtu: 1500,
        mac: mac ?? this.#randomMac(name),
      };
    } else {
      throw ipUnmodeled(`links of type ${kind ?? "(none)"}`);
    }
    // rtnl_newlink(): the name first, then the driver's own checks.
    if (name.length > 15) throw kernelSays("Error: Attribute failed policy validation.");
    if (this.links.has(name)) throw kernelSays("RTNETLINK answers: File exists");
    const x = link.vxlan;
    if (
      x !== undefined &&
      [...this.links.values()].some(
        (o) =>
          o.vxlan?.vni === x.vni &&
          o.vxlan.port === x.port &&
          vxlanFamily(o.vxlan) === vxlanFamily(x) &&
          o.vxlan.gbp === x.gbp,
      )
    )
      throw kernelSays("Error: A VXLAN device with the specified VNI already exists.");
    const created = this.#newLink(link);
    if (mtu !== undefined) {
      if (mtu < 68 || mtu > this.#maxMtu(created)) {
        this.#deleteLink(created);
        throw kernelSays("RTNETLINK answers: Invalid argument");
      }
      created.mtu = mtu;
    }
  }

  #randomMac(name: string): string {
    const h = fnv1a(`${name}/${this.#nextIndex}`);
    const b = [
      0x02,
      (h >>> 24) & 0xff,
      (h >>> 16) & 0xff,
      (h >>> 8) & 0xff,
      h & 0xff,
      (this.#nextIndex * 7) & 0xff,
    ];
    return b.map((x) => x.toString(16).padStart(2, "0")).join(":");
  }

  /** NETDEV_DOWN: routes and neighbours through the device go, and (by default) IPv6 addresses. */
  #wentDown(link: Link): void {
    this.routes = this.routes.filter((r) => r.dev !== link.name);
    this.neighbours = this.neighbours.filter((n) => n.dev !== link.name);
    // addrconf_ifdown(): conf/all/keep_addr_on_down, else the device's own.
    const keep =
      Number(this.#sysctls.device(6, "all", "keep_addr_on_down") ?? "0") ||
      Number(this.#sysctls.device(6, link.name, "keep_addr_on_down") ?? "0");
    if (keep <= 0) link.addresses = link.addresses.filter((a) => a.family === 4);
  }

  #deleteLink(link: Link): void {
    for (const child of [...this.links.values()])
      if (child.parent === link.name && this.links.has(child.name)) this.#deleteLink(child);
    this.#wentDown(link);
    this.fdb = this.fdb.filter((f) => f.dev !== link.name);
    this.links.delete(link.name);
    this.#sysctls.removeDevice(link.name);
  }

  #address(family: Family | undefined, verb: string, words: readonly string[]): void {
    const [text = ""] = words;
    let dev: string | undefined;
    let nodad = false;
    let valid: number | undefined;
    let preferred: number | undefined;
    const lifetime = (w: string, v: string | undefined): number => {
      if (v === "forever" || v === "infinity") return Number.POSITIVE_INFINITY;
      if (v === undefined || !/^\d+$/.test(v))
        throw new IpError(`Error: argument "${v ?? ""}" is wrong: ${w} value`);
      return Number(v);
    };
    for (let i = 1; i < words.length; i++) {
      if (words[i] === "dev") dev = words[++i];
      else if (words[i] === "nodad") nodad = true;
      else if (words[i] === "valid_lft") valid = lifetime("valid_lft", words[++i]);
      else if (words[i] === "preferred_lft") preferred = lifetime("preferred_lft", words[++i]);
      else throw ipUnmodeled(`ip address ${verb} … ${words[i]}`);
    }
    if ((valid !== undefined || preferred !== undefined) && verb !== "add" && verb !== "replace")
      throw ipUnmodeled(`lifetimes on ip address ${verb}`);
    if ((preferred ?? valid ?? 0) > (valid ?? Number.POSITIVE_INFINITY))
      throw kernelSays("Error: preferred_lft is greater than valid_lft.");
    if (preferred !== undefined && preferred !== valid)
      throw ipUnmodeled("a preferred lifetime other than the valid one");
    const lease =
      valid === undefined || valid === Number.POSITIVE_INFINITY
        ? { validUntil: undefined, validLft: undefined }
        : { validUntil: this.now + valid * 1000, validLft: valid };
    const cidr = tryParseCidr(text);
    if (cidr === undefined)
      throw new IpError(`Error: any valid prefix is expected rather than "${text}".`, { exit: 1 });
    if (family !== undefined && cidr.family !== family)
      throw new IpError(`Error: ${familyName(family)} prefix is expected rather than "${text}".`, {
        exit: 1,
      });
    if (dev === undefined) throw new IpError(`Not enough information: "dev" argument is required.`);
    const link = this.links.get(dev);
    if (link === undefined) throw noDevice(dev);
    const [addrText = ""] = text.split("/");
    const a = parseAddress(addrText);
    const address = formatAddress(a);
    const same = (x: Addr) =>
      x.family === a.family &&
      x.address === address &&
      (a.family === 6 || x.prefix === cidr.prefix);
    const have = link.addresses.find(same);
    const v = a.family === 4 ? "ipv4" : "ipv6";
    if (verb === "add" || verb === "replace") {
      if (have !== undefined) {
        if (verb === "add")
          throw kernelSays(
            a.family === 4
              ? "Error: ipv4: Address already assigned."
              : "Error: ipv6: address already assigned.",
          );
        have.nodad = nodad;
        // Without lifetimes a replace keeps the address's; with them it restarts them.
        if (valid !== undefined) Object.assign(have, lease);
        return;
      }
      link.addresses.push({
        family: a.family,
        address,
        value: a.value,
        prefix: cidr.prefix,
        nodad,
        ...lease,
      });
      return;
    }
    if (verb === "del" || verb === "delete") {
      if (have === undefined)
        throw kernelSays(
          a.family === 4 ? `Error: ${v}: Address not found.` : `Error: ${v}: address not found.`,
        );
      link.addresses = link.addresses.filter((x) => x !== have);
      if (
        a.family === 4 &&
        !this.#isSecondary(link, have) &&
        this.#sysctls.device(4, link.name, "promote_secondaries") !== "1"
      ) {
        const subnet = parseCidr(`${have.address}/${have.prefix}`);
        link.addresses = link.addresses.filter(
          (x) => x.family !== 4 || x.prefix !== have.prefix || !inCidr(subnet, x.value),
        );
      }
      return;
    }
    throw ipUnmodeled(`ip address ${verb}`);
  }

  /** An IPv4 address in the subnet of an earlier one with the same prefix is a secondary. */
  #isSecondary(link: Link, a: Addr): boolean {
    if (a.family !== 4) return false;
    for (const x of link.addresses) {
      if (x === a) return false;
      if (
        x.family === 4 &&
        x.prefix === a.prefix &&
        inCidr(parseCidr(`${x.address}/${x.prefix}`), a.value)
      )
        return true;
    }
    return false;
  }

  #route(family: Family | undefined, verb: string, words: readonly string[]): void {
    const [dstText = ""] = words;
    let via: string | undefined;
    let dev: string | undefined;
    let onlink = false;
    let table = 254;
    for (let i = 1; i < words.length; i++) {
      const w = words[i]!;
      const v = words[i + 1] ?? "";
      if (w === "via") {
        const a = tryParseAddress(v);
        const f = family ?? (dstText === "default" ? a?.family : tryParseCidr(dstText)?.family);
        if (a === undefined || (f !== undefined && a.family !== f))
          throw new IpError(
            `Error: ${familyName(f ?? 4)} address is expected rather than "${v}".`,
            { exit: 1 },
          );
        via = formatAddress(a);
        i++;
      } else if (w === "dev") {
        dev = v;
        i++;
      } else if (w === "onlink") onlink = true;
      else if (w === "table") {
        const t = TABLE_NAMES[v] ?? (/^\d+$/.test(v) ? Number(v) : undefined);
        if (t === undefined)
          throw new IpError(`Error: argument "${v}" is wrong: "table" value is invalid`, {
            exit: 1,
          });
        table = t;
        i++;
      } else throw ipUnmodeled(`ip route ${verb} … ${w}`);
    }
    const routeFamily: Family =
      family ??
      (dstText === "default" ? (via?.includes(":") ? 6 : 4) : (tryParseCidr(dstText)?.family ?? 4));
    const dst =
      dstText === "default"
        ? parseCidr(routeFamily === 4 ? "0.0.0.0/0" : "::/0")
        : tryParseCidr(dstText);
    if (dst === undefined || dst.family !== routeFamily)
      throw new IpError(
        `Error: ${familyName(routeFamily)} prefix is expected rather than "${dstText}".`,
        { exit: 1 },
      );
    const same = (r: Route) =>
      r.family === routeFamily &&
      r.table === table &&
      r.dst.base === dst.base &&
      r.dst.prefix === dst.prefix;
    if (verb === "del" || verb === "delete") {
      const at = this.routes.findIndex(
        (r) =>
          same(r) && (via === undefined || r.via === via) && (dev === undefined || r.dev === dev),
      );
      if (at >= 0) {
        this.routes.splice(at, 1);
        return;
      }
      const derived = this.#derivedRoutes(routeFamily).some(
        (r) => r.json.table === tableName(table) && r.json.dst === this.#dstText(dst),
      );
      if (derived)
        throw new IpError(
          unmodeled("deleting a route the kernel made for an address").stderr.trimEnd(),
          { exit: 2 },
        );
      throw kernelSays("RTNETLINK answers: No such process");
    }
    if (verb !== "add" && verb !== "replace") throw ipUnmodeled(`ip route ${verb}`);
    if (dev === undefined) throw ipUnmodeled("routes without a device");
    const link = this.links.get(dev);
    if (link === undefined) throw noDevice(dev);
    if (!link.up) {
      throw kernelSays(
        routeFamily === 4 && via === undefined
          ? "Error: Device for nexthop is not up."
          : "Error: Nexthop device is not up.",
      );
    }
    if (via !== undefined) {
      const gw = parseAddress(via);
      if (routeFamily === 4 && onlink && this.#isLocal(gw.value))
        throw kernelSays("Error: Nexthop has invalid gateway.");
      if (!onlink && !this.#reachable(link, gw.family, gw.value))
        throw kernelSays(
          routeFamily === 4
            ? "Error: Nexthop has invalid gateway."
            : "RTNETLINK answers: No route to host",
        );
    }
    const at = this.routes.findIndex(same);
    if (at >= 0 && verb === "add") throw kernelSays("RTNETLINK answers: File exists");
    const route: Route = { family: routeFamily, table, dst, via, dev, onlink };
    if (at >= 0) this.routes[at] = route;
    else this.routes.push(route);
  }

  #isLocal(value: bigint): boolean {
    for (const l of this.links.values())
      for (const a of l.addresses) if (a.family === 4 && a.value === value) return true;
    return false;
  }

  /** A gateway without onlink must be on a subnet the device is connected to. */
  #reachable(link: Link, family: Family, value: bigint): boolean {
    if (family === 6 && value >> 118n === 0x3fan) return true;
    for (const a of link.addresses)
      if (
        a.family === family &&
        a.prefix < bits(family) &&
        inCidr(parseCidr(`${a.address}/${a.prefix}`), value)
      )
        return true;
    return this.routes.some(
      (r) =>
        r.dev === link.name && r.via === undefined && r.family === family && inCidr(r.dst, value),
    );
  }

  #rule(family: Family, verb: string, words: readonly string[]): void {
    let pref: number | undefined;
    let fwmark: number | undefined;
    let mask: number | undefined;
    let table: number | undefined;
    for (let i = 0; i < words.length; i++) {
      const w = words[i]!;
      const v = words[i + 1] ?? "";
      if ((w === "pref" || w === "priority" || w === "preference") && /^\d+$/.test(v)) {
        pref = Number(v);
        i++;
      } else if (w === "fwmark") {
        const [m, k] = v.split("/");
        fwmark = parseU32(m ?? "");
        mask = k === undefined ? 0xffffffff : parseU32(k);
        if (fwmark === undefined || mask === undefined)
          throw new IpError(`Error: argument "${v}" is wrong: fwmark value is invalid`, {
            exit: 1,
          });
        i++;
      } else if (w === "table" || w === "lookup") {
        table = TABLE_NAMES[v] ?? (/^\d+$/.test(v) ? Number(v) : undefined);
        if (table === undefined)
          throw new IpError(`Error: argument "${v}" is wrong: invalid table ID`, { exit: 1 });
        i++;
      } else throw ipUnmodeled(`ip rule ${verb} … ${w}`);
    }
    const matches = (r: IpRule) =>
      r.family === family &&
      (pref === undefined || r.pref === pref) &&
      (fwmark === undefined || (r.fwmark === fwmark && r.mask === mask)) &&
      (table === undefined || r.table === table);
    if (verb === "add") {
      if (pref === undefined) throw ipUnmodeled("ip rule add without pref");
      const rule: IpRule = { family, pref, fwmark, mask, table: table ?? 254 };
      if (
        this.rules.some(
          (r) =>
            r.family === family &&
            r.pref === pref &&
            r.fwmark === fwmark &&
            r.mask === mask &&
            r.table === rule.table,
        )
      )
        throw kernelSays("RTNETLINK answers: File exists");
      // fib_nl_newrule(): after the last rule with the same or a lower preference.
      let at = this.rules.length;
      while (at > 0 && (this.rules[at - 1]!.family !== family || this.rules[at - 1]!.pref > pref))
        at--;
      if (at === 0) at = this.rules.findIndex((r) => r.family === family);
      this.rules.splice(at < 0 ? this.rules.length : at, 0, rule);
      return;
    }
    if (verb === "del" || verb === "delete") {
      const at = this.rules.findIndex(matches);
      if (at < 0) throw kernelSays("RTNETLINK answers: No such file or directory");
      this.rules.splice(at, 1);
      return;
    }
    throw ipUnmodeled(`ip rule ${verb}`);
  }

  #neigh(family: Family | undefined, verb: string, words: readonly string[]): void {
    const [addrText = ""] = words;
    let mac: string | undefined;
    let dev: string | undefined;
    let state = "PERMANENT";
    for (let i = 1; i < words.length; i++) {
      const w = words[i]!;
      const v = words[i + 1] ?? "";
      if (w === "lladdr") {
        mac = parseMac(v);
        if (mac === undefined) throw new IpError(`"${v}" is invalid lladdr.`, { exit: 1 });
        i++;
      } else if (w === "dev") {
        dev = v;
        i++;
      } else if (
        w === "nud" &&
        ["permanent", "noarp", "reachable", "stale", "delay", "probe", "failed"].includes(v)
      ) {
        state = v.toUpperCase();
        i++;
      } else throw ipUnmodeled(`ip neigh ${verb} … ${w}`);
    }
    const a = tryParseAddress(addrText);
    if (a === undefined || (family !== undefined && a.family !== family))
      throw new IpError(
        `Error: ${familyName(family ?? 4)} address is expected rather than "${addrText}".`,
        { exit: 1 },
      );
    if (dev === undefined) throw new IpError("Device is required");
    if (!this.links.has(dev)) throw noDevice(dev);
    const address = formatAddress(a);
    const at = this.neighbours.findIndex((n) => n.dev === dev && n.address === address);
    // ipneigh_modify() exits with 2 when the kernel refuses.
    const refused = (message: string) => new IpError(message, { exit: 2 });
    if (verb === "del" || verb === "delete") {
      if (at < 0) throw refused("RTNETLINK answers: No such file or directory");
      this.neighbours.splice(at, 1);
      return;
    }
    if (verb !== "add" && verb !== "replace") throw ipUnmodeled(`ip neigh ${verb}`);
    if (mac === undefined) throw ipUnmodeled("a neighbour without lladdr");
    if (at >= 0 && verb === "add") throw refused("RTNETLINK answers: File exists");
    const entry: Neighbour = { dev, family: a.family, address, mac, state };
    if (at >= 0) this.neighbours[at] = entry;
    else this.neighbours.push(entry);
  }

  /** `bridge -batch -` lines: the VXLAN FDB, as vxlan_fdb_update() treats permanent entries. */
  bridge(stdin: string): void {
    const lines = stdin.split("\n");
    for (let i = 0; i < lines.length; i++) {
      const words = splitWords(lines[i]!);
      if (words.length === 0 || words[0]!.startsWith("#")) continue;
      try {
        this.#fdb(words);
      } catch (e) {
        if (!(e instanceof IpError)) throw e;
        if (e.exit !== undefined) throw new ToolFailure(e.exit, `${e.message}\n`);
        throw new ToolFailure(1, `${e.message}\nCommand failed -:${i + 1}\n`);
      }
    }
  }

  #fdb(words: readonly string[]): void {
    const [object, verb = "", macText = ""] = words;
    if (object !== "fdb") throw new IpError(`Object "${object}" is unknown, try "bridge help".`);
    let dev: string | undefined;
    let dst: string | undefined;
    const flags = new Set<string>();
    for (let i = 3; i < words.length; i++) {
      const w = words[i]!;
      if (w === "dev") dev = words[++i];
      else if (w === "dst") {
        const a = tryParseAddress(words[i + 1] ?? "");
        if (a === undefined)
          throw new IpError(
            `Error: any valid address is expected rather than "${words[i + 1] ?? ""}".`,
            { exit: 1 },
          );
        dst = formatAddress(a);
        i++;
      } else if (w === "self" || w === "permanent") flags.add(w);
      else throw ipUnmodeled(`bridge fdb ${verb} … ${w}`);
    }
    const mac = parseMac(macText);
    if (mac === undefined) throw new IpError(`Invalid mac address ${macText}`, { exit: 1 });
    if (dev === undefined) throw new IpError("Device is required");
    const link = this.links.get(dev);
    if (link === undefined) throw noDevice(dev);
    if (link.kind !== "vxlan" || !flags.has("self"))
      throw new IpError(
        unmodeled("FDB entries other than `self` entries of a VXLAN device").stderr.trimEnd(),
        { exit: 2 },
      );
    const entry = this.fdb.find((f) => f.dev === dev && f.mac === mac);
    const unicast = (Number.parseInt(mac.slice(0, 2), 16) & 1) === 0 && mac !== "00:00:00:00:00:00";
    if (verb === "del" || verb === "delete") {
      if (entry === undefined) throw kernelSays("RTNETLINK answers: No such file or directory");
      if (dst === undefined) entry.dsts = [];
      else entry.dsts = entry.dsts.filter((d) => d !== dst); // another remote: success, no change
      if (entry.dsts.length === 0) this.fdb = this.fdb.filter((f) => f !== entry);
      return;
    }
    if (verb !== "add" && verb !== "append" && verb !== "replace")
      throw ipUnmodeled(`bridge fdb ${verb}`);
    if (dst === undefined || !flags.has("permanent"))
      throw ipUnmodeled("FDB entries without dst or not permanent");
    if (entry === undefined) {
      this.fdb.push({ dev, mac, dsts: [dst], seq: this.#seq++ });
      return;
    }
    if (verb === "add") throw kernelSays("RTNETLINK answers: File exists");
    if (verb === "replace") {
      if (!unicast) throw kernelSays("Error: Cannot replace non-unicast fdb entries.");
      entry.dsts[0] = dst;
      return;
    }
    // append: vxlan_fdb_update_existing() adds a remote only to all-zero and multicast entries.
    if (!unicast && !entry.dsts.includes(dst)) entry.dsts.push(dst);
  }

  // --- printing ---------------------------------------------------------------------------------

  #linkLocal(link: Link): string | undefined {
    if (
      !link.up ||
      link.kind === "loopback" ||
      this.#sysctls.device(6, link.name, "disable_ipv6") === "1" ||
      this.#sysctls.device(6, link.name, "addr_gen_mode") === "1"
    )
      return undefined;
    return linkLocal(link.mac);
  }

  addressesJson(): string {
    const out = [...this.links.values()]
      .sort((a, b) => a.index - b.index)
      .map((l) => {
        const loopback = l.kind === "loopback";
        const flags = loopback
          ? ["LOOPBACK"]
          : l.kind === "dummy"
            ? ["BROADCAST", "NOARP"]
            : ["BROADCAST", "MULTICAST"];
        if (l.up) flags.push("UP", "LOWER_UP");
        const v4 = l.addresses.filter((a) => a.family === 4);
        const primaries = v4.filter((a) => !this.#isSecondary(l, a));
        const secondaries = v4.filter((a) => this.#isSecondary(l, a));
        const v6 = l.addresses.filter((a) => a.family === 6).reverse();
        const life = { valid_life_time: 4294967295, preferred_life_time: 4294967295 };
        // What is left of a lease, in whole seconds as the kernel counts its age.
        const lifeOf = (a: Addr) => {
          if (a.validUntil === undefined || a.validLft === undefined) return life;
          const age = Math.floor((this.now - (a.validUntil - a.validLft * 1000)) / 1000);
          return { valid_life_time: a.validLft - age, preferred_life_time: a.validLft - age };
        };
        const addrInfo: Record<string, unknown>[] = [
          ...[...primaries, ...secondaries].map((a) => ({
            family: "inet",
            local: a.address,
            prefixlen: a.prefix,
            scope: a.address.startsWith("127.") ? "host" : "global",
            ...(secondaries.includes(a) ? { secondary: true } : {}),
            ...(a.validUntil === undefined ? {} : { dynamic: true }),
            label: l.name,
            ...lifeOf(a),
          })),
          ...v6.map((a) => ({
            family: "inet6",
            local: a.address,
            prefixlen: a.prefix,
            scope: a.address === "::1" ? "host" : "global",
            ...(a.nodad ? { nodad: true } : {}),
            ...(a.validUntil === undefined ? {} : { dynamic: true }),
            ...lifeOf(a),
          })),
        ];
        const ll = this.#linkLocal(l);
        if (ll !== undefined)
          addrInfo.push({ family: "inet6", local: ll, prefixlen: 64, scope: "link", ...life });
        let linkinfo: Record<string, unknown> | undefined;
        if (l.kind === "vxlan") {
          const x = l.vxlan!;
          linkinfo = {
            info_kind: "vxlan",
            info_data: {
              id: x.vni,
              ...(x.local.includes(":") ? { local6: x.local } : { local: x.local }),
              ...(l.parent === undefined ? {} : { link: l.parent }),
              port_range: { low: 0, high: 0 },
              port: x.port,
              learning: x.learning,
              ttl: 0,
              df: "unset",
              ageing: 300,
              udp_csum: true,
              udp_zero_csum6_tx: false,
              udp_zero_csum6_rx: false,
              ...(x.gbp ? { gbp: true } : {}),
            },
          };
        } else if (l.kind === "macvlan") {
          linkinfo = {
            info_kind: "macvlan",
            info_data: { mode: l.macvlanMode, bcqueuelen: 1000, usedbcqueuelen: 1000 },
          };
        } else if (l.kind === "dummy") {
          linkinfo = { info_kind: "dummy" };
        }
        return {
          ifindex: l.index,
          ...(l.kind === "macvlan" ? { link: l.parent } : {}),
          ifname: l.name,
          flags,
          mtu: l.mtu,
          qdisc: l.up ? "noqueue" : "noop",
          operstate: !l.up ? "DOWN" : l.kind === "macvlan" ? "UP" : "UNKNOWN",
          group: "default",
          txqlen: 1000,
          link_type: loopback ? "loopback" : "ether",
          address: l.mac,
          broadcast: loopback ? "00:00:00:00:00:00" : "ff:ff:ff:ff:ff:ff",
          promiscuity: 0,
          allmulti: 0,
          min_mtu: loopback ? 0 : 68,
          max_mtu: loopback ? 0 : 65535,
          ...(linkinfo === undefined ? {} : { linkinfo }),
          num_tx_queues: 1,
          num_rx_queues: 1,
          gso_max_size: 65536,
          gso_max_segs: 65535,
          tso_max_size: 524280,
          tso_max_segs: 65535,
          gro_max_size: 65536,
          addr_info: addrInfo,
        };
      });
    return `${JSON.stringify(out)}\n`;
  }

  rulesJson(family: Family): string {
    const out = this.rules
      .filter((r) => r.family === family)
      .map((r) => ({
        priority: r.pref,
        src: "all",
        ...(r.fwmark === undefined ? {} : { fwmark: hex(r.fwmark) }),
        ...(r.mask === undefined || r.mask === 0xffffffff ? {} : { fwmask: hex(r.mask) }),
        table: tableName(r.table),
      }));
    return `${JSON.stringify(out)}\n`;
  }

  #dstText(dst: Cidr): string {
    if (dst.prefix === 0) return "default";
    const base = formatAddress({ family: dst.family, value: dst.base });
    return dst.prefix === bits(dst.family) ? base : `${base}/${dst.prefix}`;
  }

  /** The routes the kernel keeps for addresses and devices (checked against `ip route show`). */
  #derivedRoutes(family: Family): JsonRoute[] {
    const out: JsonRoute[] = [];
    const add = (
      table: number,
      dst: Cidr,
      index: number,
      json: (dst: string) => Record<string, unknown>,
    ) =>
      out.push({
        order: [table & 0xff, dst.base, dst.prefix, index],
        json: json(this.#dstText(dst)),
      });
    for (const l of this.links.values()) {
      const dev = l.name;
      if (family === 4) {
        for (const a of l.addresses) {
          if (a.family !== 4) continue;
          const prefsrc = a.address;
          const local = (type: string, scope: string) => (dst: string) => ({
            type,
            dst,
            dev,
            table: "local",
            protocol: "kernel",
            scope,
            prefsrc,
            flags: [],
          });
          // fib_add_ifaddr(): the local route is there while the device is down, the others not.
          add(255, parseCidr(`${a.address}/32`), l.index, local("local", "host"));
          if (!l.up || this.#isSecondary(l, a)) continue;
          const net = parseCidr(`${a.address}/${a.prefix}`);
          if (l.kind === "loopback" && a.prefix < 32)
            add(255, net, l.index, local("local", "host"));
          else if (a.prefix < 32)
            add(254, net, l.index, (dst) => ({
              dst,
              dev,
              protocol: "kernel",
              scope: "link",
              prefsrc,
              flags: [],
            }));
          if (a.prefix < 31) {
            const broadcast: Cidr = {
              family: 4,
              base: net.base | hostMask(4, a.prefix),
              prefix: 32,
            };
            add(255, broadcast, l.index, local("broadcast", "link"));
          }
        }
        continue;
      }
      if (!l.up) continue;
      const tail = { protocol: "kernel", flags: [], pref: "medium" };
      const ll = this.#linkLocal(l);
      for (const a of l.addresses) {
        if (a.family !== 6 || l.kind === "loopback") continue;
        const net = parseCidr(`${a.address}/${a.prefix}`);
        add(254, net, l.index, (dst) => ({
          dst,
          dev,
          protocol: "kernel",
          metric: 256,
          flags: [],
          pref: "medium",
        }));
      }
      if (ll !== undefined)
        add(254, parseCidr("fe80::/64"), l.index, (dst) => ({
          dst,
          dev,
          protocol: "kernel",
          metric: 256,
          flags: [],
          pref: "medium",
        }));
      const locals = l.addresses.filter((a) => a.family === 6).map((a) => a.address);
      if (ll !== undefined) locals.push(ll);
      for (const a of locals)
        add(255, parseCidr(`${a}/128`), l.index, (dst) => ({
          type: "local",
          dst,
          dev,
          table: "local",
          ...tail,
          metric: 0,
          flags: [],
          pref: "medium",
        }));
      if (l.kind !== "loopback")
        add(255, parseCidr("ff00::/8"), l.index, (dst) => ({
          type: "multicast",
          dst,
          dev,
          table: "local",
          protocol: "kernel",
          metric: 256,
          flags: [],
          pref: "medium",
        }));
    }
    return out;
  }

  routesJson(family: Family): string {
    const user: JsonRoute[] = this.routes
      .filter((r) => r.family === family)
      .map((r) => {
        const index = this.links.get(r.dev)?.index ?? 0;
        const table = r.table === 254 ? {} : { table: tableName(r.table) };
        const flags = r.onlink ? ["onlink"] : [];
        const json: Record<string, unknown> =
          family === 4
            ? {
                dst: this.#dstText(r.dst),
                ...(r.via === undefined ? {} : { gateway: r.via }),
                dev: r.dev,
                ...table,
                ...(r.via === undefined ? { scope: "link" } : {}),
                flags,
              }
            : {
                dst: this.#dstText(r.dst),
                ...(r.via === undefined ? {} : { gateway: r.via }),
                dev: r.dev,
                ...table,
                metric: 1024,
                flags,
                pref: "medium",
              };
        return { order: [r.table & 0xff, r.dst.base, r.dst.prefix, index], json };
      });
    const all = [...user, ...this.#derivedRoutes(family)].sort((a, b) => {
      for (let i = 0; i < 4; i++) {
        const x = a.order[i]!;
        const y = b.order[i]!;
        if (x !== y) return x < y ? -1 : 1;
      }
      return 0;
    });
    return `${JSON.stringify(all.map((r) => r.json))}\n`;
  }

  neighboursJson(dev: string): string {
    if (!this.links.has(dev)) throw new ToolFailure(1, `Cannot find device "${dev}"\n`);
    const list = this.neighbours
      .filter((n) => n.dev === dev)
      .sort((a, b) => a.family - b.family)
      .map((n) => ({
        dst: n.address,
        ...(n.state === "FAILED" ? {} : { lladdr: n.mac }),
        state: [n.state],
      }));
    return `${JSON.stringify(list)}\n`;
  }

  fdbJson(dev: string): string {
    if (!this.links.has(dev)) throw new ToolFailure(255, `Cannot find device "${dev}"\n`);
    const list = this.fdb
      .filter((f) => f.dev === dev)
      .sort((a, b) => b.seq - a.seq)
      .flatMap((f) =>
        f.dsts.map((d) => ({ mac: f.mac, dst: d, flags: ["self"], state: "permanent" })),
      );
    return `${JSON.stringify(list)}\n`;
  }

  dump(): string[] {
    const out: string[] = [];
    for (const l of [...this.links.values()].sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const kind =
        l.kind === "vxlan"
          ? `vxlan id ${l.vxlan!.vni} dstport ${l.vxlan!.port} local ${l.vxlan!.local} dev ${l.parent}${l.vxlan!.learning ? "" : " nolearning"}${l.vxlan!.gbp ? " gbp" : ""}`
          : l.kind === "macvlan"
            ? `macvlan mode ${l.macvlanMode} link ${l.parent}`
            : l.kind;
      out.push(`link ${l.name} ${kind} mtu ${l.mtu} address ${l.mac} ${l.up ? "up" : "down"}`);
      for (const a of [...l.addresses].sort(
        (x, y) =>
          x.family - y.family ||
          (x.value < y.value ? -1 : x.value > y.value ? 1 : x.prefix - y.prefix),
      ))
        out.push(
          `link ${l.name} addr ${a.address}/${a.prefix}${a.nodad ? " nodad" : ""}${a.validUntil === undefined ? "" : ` valid_lft ${a.validLft}`}`,
        );
    }
    for (const r of [...this.rules].sort((a, b) => a.family - b.family || a.pref - b.pref)) {
      const mark =
        r.fwmark === undefined ? "" : ` fwmark ${hex(r.fwmark)}/${hex(r.mask ?? 0xffffffff)}`;
      out.push(`rule${r.family} pref ${r.pref}${mark} table ${tableName(r.table)}`);
    }
    const routes = this.routes.map(
      (r) =>
        `route${r.family} table ${tableName(r.table)} ${cidrText(r.dst)}${r.via === undefined ? "" : ` via ${r.via}`} dev ${r.dev}${r.onlink ? " onlink" : ""}`,
    );
    out.push(...routes.sort());
    out.push(
      ...this.neighbours
        .map((n) => `neigh ${n.dev} ${n.address} lladdr ${n.mac} ${n.state}`)
        .sort(),
    );
    out.push(
      ...this.fdb.flatMap((f) => f.dsts.map((d) => `fdb ${f.dev} ${f.mac} dst ${d}`)).sort(),
    );
    return out;
  }
}

// ================================================================================================
// nft (nftables)
//
// Models nftables 1.0.6 (Debian's) on Linux 6.18 for tables of the ip, ip6 and inet families.
// Every message, exit code, listing and handle below was compared byte for byte with the real
// tool in network namespaces, on hand-written cases and on the transactions the datapath sends
// for random plans.
// - Input: `nft -f -`, or one command in argv (`nft flush chain inet sallyport prerouting`):
//   `add table`, `table FAMILY NAME { … }` blocks (sets, maps and chains with their rules, for
//   seeding), `add set|map … { type K [. K…] [: V]; [flags interval;] [counter;] [elements = {…}] }`,
//   `add chain` (regular, or base `{ type filter|nat|route hook H priority P; policy accept|drop; }`
//   with priorities by number or name), `add rule … [comment "…"]`, `add|delete element` (single or
//   concatenated keys of prefixes, ranges and values; verdicts, marks and addresses as values),
//   `flush chain|set|map`, `delete table|chain|set|map`, `flush ruleset`.
// - Atomic as the kernel's batch: nft first evaluates every command and sends nothing if one fails
//   (its own errors below); the kernel then runs the commands in order, reports every one it
//   refuses ("Could not process rule: …") and aborts them all. Each error is printed as nft does,
//   `/dev/stdin:LINE:FIRST-LAST: Error: …`, the line and carets (`Error: …` and the command for one
//   in argv); exit 1.
// - nft's own refusals: a table, set or map that does not exist for a set, chain, element or `@set`
//   lookup (`flush set` too); `vmap` of a set ("Expression is not a map") or of a data map; a lookup
//   or map key of another type or arity ("datatype mismatch, …", with the expression underlined);
//   elements that do not parse as the set's type (an address of the other family, a prefix longer
//   than the type, a protocol or port out of range, an unknown protocol name, a mark over 32 bits, a
//   range of negative size, a prefix or range without `flags interval`, too few or too many
//   fields); a verdict map value that is no verdict; a value for a set ("netlink: Error: set is not
//   a map"); a comment over 128 characters; an unknown datatype.
// - The kernel's: a rule in a table or chain that does not exist; `goto`/`jump` (in a rule or a map
//   element) to a chain missing at that point of the batch (No such file or directory) or to a base
//   chain (Operation not supported); deleting or flushing what does not exist; deleting a chain a
//   rule or map element still jumps to, or a set a rule still uses (Device or resource busy);
//   `delete element` of what is not there; `add element` of a key already there with another value,
//   and in an interval map (pipapo) of an element whose first or last point lies in one already
//   there (File exists: only those two corners are checked, so an element holding another one whole
//   is accepted); a map element without value, a verdict in a data map (Invalid argument); `add
//   set|map` over one of another definition, `add chain` over one of another type (File exists);
//   `add chain` over a base chain at another hook or priority, or with a hook over a regular chain,
//   a nat chain at forward, a route chain but at output (Operation not supported; only a policy
//   changes in place); snat/masquerade, dnat or `rt mtu` where a base chain of another hook reaches
//   them through jumps, gotos and verdict maps, snat in a base chain not of type nat (Operation not
//   supported, located on the whole command; the kernel finds these when it validates at commit
//   and replays the batch, so every handle the batch took is taken twice).
// - Kept as the kernel does it: `delete element` in an interval map removes the first element (in
//   insertion order) that holds the key's first point, even when it is not that key; a chain is
//   deleted with its rules (and what they referenced); `add` of what is there with the same
//   definition or value changes nothing; `delete set` deletes a map of that name and vice versa;
//   handles count per table and are used up by refused batches too.
// - Listings: `nft [-j] [-t] list table|tables|ruleset [FAMILY]`; `-t` (terse) leaves the elements
//   out. JSON as nft prints it: sets with `type` a string
//   or a list, `map`, `flags`, `elem`, `stmt: [{"counter": null}]`; elements as values, `{"concat":
//   […]}`, `{"prefix": …}` (any range that is one CIDR), `{"range": […]}`, protocol names from
//   netbase's /etc/protocols, `{"elem": {"val", "counter"}}` in counter sets, verdict objects;
//   chains with type/hook/prio/policy; rules with their comment. Text as nft prints sets (elements
//   so many a line by type) and chains (priorities by name). nft sorts the elements of hash sets;
//   interval maps list in insertion order. A missing table: exit 1, "Error: No such file or
//   directory" and the command with carets.
// - iptables-nft's tables (the model above) are listed by `nft list tables`, before ours rather
//   than in creation order; nft commands on them, and `list|flush ruleset` while they exist, are
//   not modeled (`list ruleset inet` is: it does not list them).
// - In rules, beyond selectors, operators and verdicts: `numgen inc|random mod N [offset M]` with an
//   anonymous verdict map of numbers (`vmap { 0 : goto a, 1 : goto b }`: its chains are the
//   rule's, checked and counted as a goto's, the kernel's errors located at the element's key; a
//   key that is not a number, a value that is no verdict, `mod 0` (ERANGE) refused as nft does),
//   anonymous sets of protocols after `meta l4proto` or `ip protocol`, and nat ports
//   (`snat ip to … : 5000-5009`), refused without a transport protocol match before them
//   (`meta l4proto`, a protocol set, `tcp`/`udp` headers), out of range or reversed, word for word;
//   a data map feeding a set statement (`meta priority set ip saddr map @m`, its value type checked
//   against what it sets: TC classids for `meta priority`, printed `a00:5`, `none`, `root`).
// Not modeled (exit 2, "FakeKernel does not model …"): other families, set types and options
// (timeout, size, policy, typeof, dynamic), single-field interval sets (rbtree and its auto-merge),
// hostnames and service names in elements, other anonymous sets and maps in rules, `insert`, `replace`,
// `create`, `delete rule … handle`, `list` of single chains or sets. Rules are checked against the
// vocabulary of the statements Sallyport renders and kube-proxy uses (selectors, operators, values,
// nat, mangling, verdicts, counter, comment), not against nft's grammar; they are kept and printed
// as written (nft prints its canonical form, e.g. `meta mark 0x12000000/8`), and their JSON `expr`
// is a placeholder, `[{"fake": "<rule as written>"}]`: the datapath reads only rule comments.
// Counters stay at zero. nft's "; did you mean …" suggestions are not printed: when a similar name
// exists, nft reports in userspace, with a suggestion, what the kernel reports otherwise.

const NFT_METAINFO = {
  metainfo: { version: "1.0.6", release_name: "Lester Gooch #5", json_schema_version: 1 },
};

type NftFamily = "ip" | "ip6" | "inet";
type NftKeyType = "ipv4_addr" | "ipv6_addr" | "inet_proto" | "inet_service" | "mark" | "classid";
type NftValueType = NftKeyType | "verdict";

const NFT_TYPES: Readonly<Record<NftValueType, string>> = {
  ipv4_addr: "IPv4 address",
  ipv6_addr: "IPv6 address",
  inet_proto: "Internet protocol",
  inet_service: "internet network service",
  mark: "packet mark",
  classid: "TC classid",
  verdict: "netfilter verdict",
};
/** Datatypes nft knows and the fake does not model (anything else is an unknown datatype). */
const NFT_OTHER_TYPES = new Set([
  "integer",
  "string",
  "ether_addr",
  "ether_type",
  "ifname",
  "iface_index",
  "iface_type",
  "icmp_type",
  "icmpv6_type",
  "tcp_flag",
  "ct_state",
  "ct_status",
  "ct_dir",
  "nf_proto",
  "boolean",
  "uid",
  "gid",
  "realm",
  "dscp",
  "ecn",
  "pkt_type",
  "devgroup",
  "ct_label",
  "time",
  "day",
  "hour",
]);

function isNftKeyType(name: string): name is NftKeyType {
  return name !== "verdict" && Object.hasOwn(NFT_TYPES, name);
}

/** Debian netbase's /etc/protocols: getprotobynumber() names (the first name of each number). */
const PROTOCOL_NAMES: ReadonlyMap<number, string> = new Map(
  "0:ip 1:icmp 2:igmp 3:ggp 4:ipencap 5:st 6:tcp 8:egp 9:igp 12:pup 17:udp 20:hmp 22:xns-idp 27:rdp 29:iso-tp4 33:dccp 36:xtp 37:ddp 38:idpr-cmtp 41:ipv6 43:ipv6-route 44:ipv6-frag 45:idrp 46:rsvp 47:gre 50:esp 51:ah 57:skip 58:ipv6-icmp 59:ipv6-nonxt 60:ipv6-opts 73:rspf 81:vmtp 88:eigrp 89:ospf 93:ax.25 94:ipip 97:etherip 98:encap 103:pim 108:ipcomp 112:vrrp 115:l2tp 124:isis 132:sctp 133:fc 135:mobility-header 136:udplite 137:mpls-in-ip 138:manet 139:hip 140:shim6 141:wesp 142:rohc 143:ethernet"
    .split(" ")
    .map((e) => {
      const [n, name] = e.split(":");
      return [Number(n), name!] as const;
    }),
);
const PROTOCOL_NUMBERS: ReadonlyMap<string, number> = new Map([
  ...[...PROTOCOL_NAMES].map(([n, name]) => [name, n] as const),
  ["hopopt", 0],
]);

const HOOKS = ["prerouting", "input", "forward", "output", "postrouting"] as const;
type NftHook = (typeof HOOKS)[number];
const hookBit = (hook: NftHook) => 1 << HOOKS.indexOf(hook);
/** Where the kernel's validate callbacks allow an expression (nft_nat_validate, nft_rt_validate). */
const SNAT_HOOKS = hookBit("postrouting") | hookBit("input");
const DNAT_HOOKS = hookBit("prerouting") | hookBit("output");
const RT_MTU_HOOKS = hookBit("forward") | hookBit("output") | hookBit("postrouting");

/** nft's standard priorities (ip, ip6, inet) and the hooks srcnat and dnat are valid at. */
const STD_PRIORITIES: readonly (readonly [string, number, readonly NftHook[] | undefined])[] = [
  ["raw", -300, undefined],
  ["mangle", -150, undefined],
  ["dstnat", -100, ["prerouting", "output"]],
  ["filter", 0, undefined],
  ["security", 50, undefined],
  ["srcnat", 100, ["postrouting", "input"]],
];

/** nft's prio2str(): a standard priority within ±10 by name, anything else as a number. */
function priorityText(priority: number, hook: NftHook): string {
  for (const [name, value, hooks] of STD_PRIORITIES) {
    const offset = priority - value;
    if (Math.abs(offset) > 10 || (hooks !== undefined && !hooks.includes(hook))) continue;
    return offset === 0 ? name : `${name} ${offset > 0 ? "+" : "-"} ${Math.abs(offset)}`;
  }
  return String(priority);
}

const ERRNO = {
  ENOENT: "No such file or directory",
  EEXIST: "File exists",
  EBUSY: "Device or resource busy",
  EOPNOTSUPP: "Operation not supported",
  EINVAL: "Invalid argument",
  ERANGE: "Numerical result out of range",
} as const;

interface NftToken {
  /** A string's text without its quotes. */
  readonly text: string;
  readonly kind: "word" | "string" | "punct" | "newline";
  readonly line: number;
  /** Columns of the first and last character (1-based, quotes included), as nft reports them. */
  readonly first: number;
  readonly last: number;
}

function nftTokens(input: string): NftToken[] {
  const out: NftToken[] = [];
  let line = 1;
  let col = 1;
  let i = 0;
  while (i < input.length) {
    const c = input[i]!;
    if (c === "\n") {
      out.push({ text: "\n", kind: "newline", line, first: col, last: col });
      line++;
      col = 1;
      i++;
    } else if (c === " " || c === "\t" || c === "\r") {
      i++;
      col++;
    } else if (c === "#") {
      while (i < input.length && input[i] !== "\n") i++;
    } else if (c === "{" || c === "}" || c === ";" || c === ",") {
      out.push({ text: c, kind: "punct", line, first: col, last: col });
      i++;
      col++;
    } else if (c === '"') {
      const end = input.indexOf('"', i + 1);
      const newline = input.indexOf("\n", i + 1);
      if (end < 0 || (newline >= 0 && newline < end))
        throw unmodeled(`an unterminated string in nft input line ${line}`);
      out.push({
        text: input.slice(i + 1, end),
        kind: "string",
        line,
        first: col,
        last: col + end - i,
      });
      col += end - i + 1;
      i = end + 1;
    } else {
      let j = i;
      while (j < input.length && !/[\s{};,"]/.test(input[j]!)) j++;
      out.push({ text: input.slice(i, j), kind: "word", line, first: col, last: col + j - i - 1 });
      col += j - i;
      i = j;
    }
  }
  return out;
}

/** Top-level commands: split at newlines and semicolons outside braces. */
function nftCommands(tokens: readonly NftToken[]): NftToken[][] {
  const out: NftToken[][] = [];
  let current: NftToken[] = [];
  let depth = 0;
  for (const t of tokens) {
    if (depth === 0 && (t.kind === "newline" || t.text === ";")) {
      if (current.length > 0) out.push(current);
      current = [];
      continue;
    }
    if (t.kind === "punct" && t.text === "{") depth++;
    if (t.kind === "punct" && t.text === "}") {
      depth--;
      if (depth < 0) throw unmodeled(`an unbalanced "}" in nft input line ${t.line}`);
    }
    current.push(t);
  }
  if (depth !== 0) throw unmodeled("an nft input whose braces do not balance");
  if (current.length > 0) out.push(current);
  return out;
}

interface NftSpan {
  readonly line: number;
  readonly first: number;
  readonly last: number;
}

function nftSpan(from: NftToken, to: NftToken = from): NftSpan {
  return { line: from.line, first: from.first, last: to.line === from.line ? to.last : from.last };
}

/** A whole command, as the kernel's errors locate it: up to the newline that ends it. */
function nftCommandSpan(tokens: readonly NftToken[]): NftSpan {
  const span = nftSpan(tokens[0]!, tokens[tokens.length - 1]!);
  return { ...span, last: span.last + 1 };
}

/** One error nft prints: refused by nft itself ("user") or by the kernel. */
class NftFailure {
  readonly stage: "user" | "kernel";
  readonly message: string;
  /** Undefined: printed without location (netlink's own errors). */
  readonly at: NftSpan | undefined;
  /** The expression a datatype mismatch is about, underlined with `~`. */
  readonly context: NftSpan | undefined;
  constructor(stage: "user" | "kernel", message: string, at?: NftSpan, context?: NftSpan) {
    this.stage = stage;
    this.message = message;
    this.at = at;
    this.context = context;
  }
}

const userError = (message: string, at?: NftSpan, context?: NftSpan) =>
  new NftFailure("user", message, at, context);
const kernelError = (errno: keyof typeof ERRNO, at: NftSpan) =>
  new NftFailure("kernel", `Could not process rule: ${ERRNO[errno]}`, at);

// ------------------------------------------------------------------------------------------------
// The model

/** One field of an element key: a single value (lo = hi), a prefix or a range. */
interface NftField {
  readonly lo: bigint;
  readonly hi: bigint;
}

type NftVerdict =
  | { readonly kind: "accept" | "drop" | "return" | "continue" }
  | { readonly kind: "goto" | "jump"; readonly chain: string };

interface NftElement {
  readonly key: readonly NftField[];
  /** A verdict (verdict maps), an address or mark (data maps), nothing (sets). */
  readonly value: NftVerdict | bigint | undefined;
}

interface NftSet {
  readonly name: string;
  readonly handle: number;
  readonly key: readonly NftKeyType[];
  readonly value: NftValueType | undefined;
  readonly interval: boolean;
  readonly counter: boolean;
  /** By key identity, in insertion order. */
  elements: Map<string, NftElement>;
}

interface NftBaseChain {
  readonly type: "filter" | "nat" | "route";
  readonly hook: NftHook;
  readonly priority: number;
  readonly policy: "accept" | "drop";
}

interface NftRule {
  readonly handle: number;
  /** The statements as written (without the comment). */
  readonly text: string;
  readonly comment: string | undefined;
  /** Chains it jumps or goes to. */
  readonly chains: readonly string[];
  /** Sets and maps it uses (the kernel's reference count). */
  readonly sets: readonly string[];
  /** Verdict maps it looks up: their elements' chains are reachable from it. */
  readonly vmaps: readonly string[];
  /** Hooks its expressions are valid at (a bit per hook); undefined: any. */
  readonly hooks: number | undefined;
  /** It has a nat statement: in a base chain, that chain must be of type nat. */
  readonly nat: boolean;
}

interface NftChain {
  readonly name: string;
  readonly handle: number;
  readonly base: NftBaseChain | undefined;
  rules: NftRule[];
}

interface NftTable {
  readonly family: NftFamily;
  readonly name: string;
  readonly handle: number;
  /** The table's handle generator: shared by its copies, so an aborted batch still uses handles. */
  readonly handles: { next: number };
  sets: Map<string, NftSet>;
  chains: Map<string, NftChain>;
}

function cloneNftTable(t: NftTable): NftTable {
  return {
    ...t,
    sets: new Map([...t.sets].map(([k, s]) => [k, { ...s, elements: new Map(s.elements) }])),
    chains: new Map([...t.chains].map(([k, c]) => [k, { ...c, rules: [...c.rules] }])),
  };
}

function elementId(key: readonly NftField[]): string {
  return key.map((f) => (f.lo === f.hi ? `${f.lo}` : `${f.lo}-${f.hi}`)).join(".");
}

function sameValue(a: NftElement["value"], b: NftElement["value"]): boolean {
  if (typeof a !== "object" || typeof b !== "object") return a === b;
  return a.kind === b.kind && ("chain" in a ? a.chain : "") === ("chain" in b ? b.chain : "");
}

function typeWidth(type: NftKeyType): number {
  switch (type) {
    case "ipv4_addr":
      return 32;
    case "ipv6_addr":
      return 128;
    case "inet_proto":
      return 8;
    case "inet_service":
      return 16;
    case "mark":
    case "classid":
      return 32;
  }
}

/** A field as nft prints it: an address prefix when the range is one, names for protocols. */
function fieldText(f: NftField, type: NftKeyType): string {
  if (type === "ipv4_addr" || type === "ipv6_addr") {
    const family: Family = type === "ipv4_addr" ? 4 : 6;
    const addr = (v: bigint) => formatAddress({ family, value: v });
    if (f.lo === f.hi) return addr(f.lo);
    const prefix = cidrPrefix(f, family);
    return prefix === undefined ? `${addr(f.lo)}-${addr(f.hi)}` : `${addr(f.lo)}/${prefix}`;
  }
  const one = (v: bigint) => {
    if (type === "mark") return `0x${v.toString(16).padStart(8, "0")}`;
    if (type === "classid") return classidText(v);
    if (type === "inet_proto" && f.lo === f.hi) return PROTOCOL_NAMES.get(Number(v)) ?? `${v}`;
    return `${v}`;
  };
  return f.lo === f.hi ? one(f.lo) : `${one(f.lo)}-${one(f.hi)}`;
}

function fieldJson(f: NftField, type: NftKeyType): unknown {
  if (type === "ipv4_addr" || type === "ipv6_addr") {
    const family: Family = type === "ipv4_addr" ? 4 : 6;
    const addr = (v: bigint) => formatAddress({ family, value: v });
    if (f.lo === f.hi) return addr(f.lo);
    const prefix = cidrPrefix(f, family);
    return prefix === undefined
      ? { range: [addr(f.lo), addr(f.hi)] }
      : { prefix: { addr: addr(f.lo), len: prefix } };
  }
  if (f.lo !== f.hi) return { range: [Number(f.lo), Number(f.hi)] };
  if (type === "inet_proto") return PROTOCOL_NAMES.get(Number(f.lo)) ?? Number(f.lo);
  if (type === "classid") return classidText(f.lo);
  return Number(f.lo);
}

/** nft's classid print: `root`, `none`, else major:minor in hex without leading zeros. */
function classidText(v: bigint): string {
  if (v === 0xffffffffn) return "root";
  if (v === 0n) return "none";
  return `${(v >> 16n).toString(16)}:${(v & 0xffffn).toString(16)}`;
}

/** The prefix length when [lo, hi] is exactly one CIDR. */
function cidrPrefix(f: NftField, family: Family): number | undefined {
  const size = f.hi - f.lo + 1n;
  if ((size & (size - 1n)) !== 0n || f.lo % size !== 0n) return undefined;
  return bits(family) - (size.toString(2).length - 1);
}

function verdictText(v: NftVerdict): string {
  return "chain" in v ? `${v.kind} ${v.chain}` : v.kind;
}

function verdictJson(v: NftVerdict): unknown {
  return "chain" in v ? { [v.kind]: { target: v.chain } } : { [v.kind]: null };
}

/** JSON as libjansson prints it for nft: `", "` and `": "` separators, one line. */
function nftJson(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return `[${value.map(nftJson).join(", ")}]`;
  if (typeof value === "object")
    return `{${Object.entries(value as Record<string, unknown>)
      .map(([k, v]) => `${JSON.stringify(k)}: ${nftJson(v)}`)
      .join(", ")}}`;
  return JSON.stringify(value);
}

function typeDescription(types: readonly NftValueType[]): string {
  return types.length === 1
    ? NFT_TYPES[types[0]!]
    : `concatenation of (${types.map((t) => NFT_TYPES[t]).join(", ")})`;
}

// ------------------------------------------------------------------------------------------------
// Rules: the vocabulary of the statements the fake understands

/** Selectors and the datatype of what they load (undefined: a type the fake does not model). */
const NFT_SELECTORS: Readonly<Record<string, Readonly<Record<string, NftKeyType | null>>>> = {
  ip: { saddr: "ipv4_addr", daddr: "ipv4_addr", protocol: "inet_proto" },
  ip6: { saddr: "ipv6_addr", daddr: "ipv6_addr", nexthdr: "inet_proto" },
  meta: {
    mark: "mark",
    priority: "classid",
    l4proto: "inet_proto",
    nfproto: null,
    iifname: null,
    oifname: null,
    protocol: null,
  },
  ct: { state: null, direction: null, mark: "mark", status: null },
  th: { dport: "inet_service", sport: "inet_service" },
  tcp: { dport: "inet_service", sport: "inet_service", flags: null },
  udp: { dport: "inet_service", sport: "inet_service" },
  icmpv6: { type: null },
};
const NFT_VALUE_WORDS = new Set([
  // ct state, ct direction, meta nfproto, tcp flags
  "invalid",
  "new",
  "established",
  "related",
  "untracked",
  "original",
  "reply",
  "ipv4",
  "ipv6",
  "syn",
  "ack",
  "fin",
  "rst",
  "psh",
  "urg",
  "ecn",
  "cwr",
  // icmpv6 type
  "nd-neighbor-solicit",
  "nd-neighbor-advert",
]);
const NFT_OPERATORS = new Set(["==", "!=", "<", ">", "<=", ">=", "&", "|", "^", "/", "set"]);
const NFT_VERDICTS = new Set(["accept", "drop", "return", "continue"]);

interface NftSetRef {
  readonly name: string;
  readonly token: NftToken;
  readonly mode: "lookup" | "vmap" | "map";
  /** The expression looked up, and its types when the fake knows them. */
  readonly key: {
    readonly types: readonly NftKeyType[];
    readonly from: NftToken;
    readonly to: NftToken;
  };
  /**
   * What a `map` feeds, and the type it needs: a snat/dnat statement (an address of its family),
   * or a `set` statement (`meta priority set ip saddr map @m`: the type of what it sets).
   */
  readonly feeds?: {
    readonly kind: "nat" | "set";
    readonly token: NftToken;
    readonly type: NftKeyType;
  };
}

interface ParsedNftRule {
  readonly text: string;
  readonly comment: string | undefined;
  readonly chains: readonly NftToken[];
  readonly refs: readonly NftSetRef[];
  readonly hooks: number | undefined;
  readonly nat: boolean;
  /** nft's own refusals (a comment too long, snat without family in an inet table). */
  readonly errors: readonly NftFailure[];
  /** Where the kernel refuses an expression's value (`numgen … mod 0`: ERANGE). */
  readonly outOfRange?: NftSpan | undefined;
}

function isNumberWord(text: string): boolean {
  return /^(0x[0-9a-fA-F]+|\d+)$/.test(text);
}

function isValueWord(text: string): boolean {
  if (isNumberWord(text) || NFT_VALUE_WORDS.has(text) || PROTOCOL_NUMBERS.has(text)) return true;
  if (text.startsWith("@")) return false;
  return text
    .split("-")
    .every(
      (p) => isNumberWord(p) || tryParseAddress(p) !== undefined || tryParseCidr(p) !== undefined,
    );
}

/**
 * Walks a rule's statements: checks every word against the vocabulary (seeded rules keep words the
 * fake does not know), and collects what the kernel checks (chains, sets, hooks) and the comment.
 */
function parseNftRule(
  tokens: readonly NftToken[],
  source: string,
  family: NftFamily,
  seeding: boolean,
): ParsedNftRule {
  const chains: NftToken[] = [];
  const refs: NftSetRef[] = [];
  const errors: NftFailure[] = [];
  let hooks: number | undefined;
  let nat = false;
  let comment: string | undefined;
  let end = tokens.length;
  const restrict = (mask: number) => {
    hooks = (hooks ?? mask) & mask;
  };
  /** The expression being built (selectors joined by `.`), for set lookups. */
  let expr:
    | { types: (NftKeyType | null)[]; from: NftToken; to: NftToken; open: boolean }
    | undefined;
  let natStatement: { kind: "nat"; token: NftToken; type: NftKeyType } | undefined;
  /** The `set` statement just parsed (`meta priority set`): a `map` may feed it. */
  let setStatement: { kind: "set"; token: NftToken; type: NftKeyType } | undefined;
  /** A transport protocol is known (nft's protocol context): a nat statement may name ports. */
  let transport = false;
  /** The `numgen` expression just parsed (only an anonymous vmap may follow it). */
  let numgen: { from: NftToken; to: NftToken } | undefined;
  let outOfRange: NftSpan | undefined;
  const reject = (t: NftToken) => {
    if (!seeding) throw unmodeled(`the nft rule syntax "${t.text}" (in: ${source.trim()})`);
  };
  /** The tokens of the `{ … }` block opening at `at`, and the index of its `}`. */
  const block = (at: number): { items: NftToken[][]; end: number } => {
    const items: NftToken[][] = [[]];
    let j = at + 1;
    for (; j < tokens.length && tokens[j]!.text !== "}"; j++) {
      const x = tokens[j]!;
      if (x.text === "{") throw unmodeled(`nested braces in an nft rule (in: ${source.trim()})`);
      if (x.kind === "punct" && x.text === ",") items.push([]);
      else items[items.length - 1]!.push(x);
    }
    if (j >= tokens.length) throw unmodeled(`an unterminated "{" in an nft rule`);
    return { items, end: j };
  };
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i]!;
    const next = tokens[i + 1];
    if (t.kind === "string") {
      expr = undefined;
      continue;
    }
    if (
      t.kind === "punct" &&
      t.text === "{" &&
      expr !== undefined &&
      !expr.open &&
      expr.types.length === 1 &&
      expr.types[0] === "inet_proto"
    ) {
      // An anonymous set of protocols (`meta l4proto { tcp, udp, sctp }`).
      const { items, end } = block(i);
      const empty = items.length === 1 && items[0]!.length === 0;
      if (empty) errors.push(userError("syntax error, unexpected '}'", nftSpan(tokens[end]!)));
      for (const item of empty ? [] : items) {
        if (item.length !== 1) throw unmodeled(`this anonymous set (in: ${source.trim()})`);
        const x = item[0]!;
        const n = isNumberWord(x.text) ? Number(x.text) : PROTOCOL_NUMBERS.get(x.text);
        if (n === undefined) errors.push(userError("Could not resolve protocol name", nftSpan(x)));
        else if (n > 255) throw unmodeled(`the protocol number ${x.text}`);
      }
      transport = true;
      expr = undefined;
      i = end;
      continue;
    }
    if (t.kind === "punct") {
      if (t.text === ",") continue;
      if (t.text === "{" && seeding) {
        // An anonymous set or map of someone else's rule: kept as written.
        let depth = 0;
        for (; i < tokens.length; i++) {
          if (tokens[i]!.text === "{") depth++;
          if (tokens[i]!.text === "}" && --depth === 0) break;
        }
        continue;
      }
      throw unmodeled(`anonymous sets and maps in nft rules (in: ${source.trim()})`);
    }
    const w = t.text;
    if (w === "comment") {
      if (next?.kind !== "string" && next?.kind !== "word")
        throw unmodeled(`a rule's comment without text (in: ${source.trim()})`);
      if (i + 2 !== tokens.length)
        throw unmodeled(`statements after a rule's comment (in: ${source.trim()})`);
      comment = next.text;
      end = i;
      if (Buffer.byteLength(comment) > 128)
        errors.push(userError("comment too long, 128 characters maximum allowed", nftSpan(next)));
      break;
    }
    if (w === "numgen") {
      // numgen inc|random mod N [offset M]: a 32-bit integer.
      if (next?.text !== "inc" && next?.text !== "random") {
        errors.push(
          userError("syntax error, unexpected string, expecting random or inc", nftSpan(next ?? t)),
        );
        break;
      }
      const mod = tokens[i + 3];
      if (tokens[i + 2]?.text !== "mod" || mod === undefined || !isNumberWord(mod.text))
        throw unmodeled(`this numgen expression (in: ${source.trim()})`);
      let last = mod;
      i += 3;
      if (tokens[i + 1]?.text === "offset") {
        if (!isNumberWord(tokens[i + 2]?.text ?? ""))
          throw unmodeled(`this numgen offset (in: ${source.trim()})`);
        last = tokens[i + 2]!;
        i += 2;
      }
      if (Number(mod.text) === 0) outOfRange = nftSpan(t, last);
      numgen = { from: t, to: last };
      expr = undefined;
      continue;
    }
    if (w === "vmap" && next?.text === "{" && numgen !== undefined) {
      // An anonymous verdict map keyed by the numgen value: `{ 0 : goto c, 1 : goto d }`.
      const { items, end } = block(i + 1);
      const keys = new Set<string>();
      for (const item of items) {
        const [key, colon, verdict, target] = item;
        if (key === undefined || colon?.text !== ":" || verdict === undefined)
          throw unmodeled(`this anonymous verdict map (in: ${source.trim()})`);
        if (!isNumberWord(key.text)) {
          errors.push(userError("Could not parse integer", nftSpan(key)));
          continue;
        }
        if (keys.has(String(Number(key.text))))
          throw unmodeled(`a key twice in an anonymous verdict map (nft merges them)`);
        keys.add(String(Number(key.text)));
        if (isNumberWord(verdict.text)) {
          errors.push(userError("syntax error, unexpected number", nftSpan(verdict)));
          continue;
        }
        if ((verdict.text === "goto" || verdict.text === "jump") && target !== undefined) {
          if (item.length !== 4) throw unmodeled(`this anonymous verdict map element`);
          // The kernel reports a missing or base chain at the element's key.
          chains.push({ ...key, text: target.text });
        } else if (!NFT_VERDICTS.has(verdict.text) || item.length !== 3) {
          throw unmodeled(`this anonymous verdict map element (in: ${source.trim()})`);
        }
      }
      numgen = undefined;
      expr = undefined;
      i = end;
      continue;
    }
    if (w === ":" && natStatement !== undefined && next !== undefined) {
      // The ports of a nat statement: `: 5000` or `: 5000-5009`.
      const parts = next.text.split("-");
      if (parts.length > 2 || !parts.every((p) => /^\d+$/.test(p)))
        throw unmodeled(`the nat ports ${next.text}`);
      let col = next.first;
      const spans = parts.map((p) => {
        const span = { line: next.line, first: col, last: col + p.length - 1 };
        col += p.length + 1;
        return span;
      });
      const bad = parts.findIndex((p) => Number(p) > 65535);
      if (bad >= 0) errors.push(userError("Service out of range", spans[bad]));
      else if (parts.length === 2 && Number(parts[1]) < Number(parts[0]))
        errors.push(userError("Range has zero or negative size", nftSpan(next)));
      else if (!transport)
        errors.push(
          userError(
            "transport protocol mapping is only valid after transport protocol match",
            nftSpan(next),
            nftSpan(natStatement.token),
          ),
        );
      i++;
      continue;
    }
    const fields = NFT_SELECTORS[w];
    if (fields !== undefined && next !== undefined && Object.hasOwn(fields, next.text)) {
      const type = fields[next.text]!;
      // tcp and udp headers imply their protocol; `meta l4proto` and `ip protocol` set it when
      // compared with a value (below, or an anonymous set).
      if (w === "tcp" || w === "udp") transport = true;
      if (
        type === "inet_proto" &&
        expr?.open !== true &&
        tokens[i + 2] !== undefined &&
        tokens[i + 2]!.kind === "word" &&
        (PROTOCOL_NUMBERS.has(tokens[i + 2]!.text) || isNumberWord(tokens[i + 2]!.text))
      )
        transport = true;
      if (expr?.open === true) {
        expr.types.push(type);
        expr.to = next;
        expr.open = false;
      } else {
        expr = { types: [type], from: t, to: next, open: false };
      }
      i++;
      continue;
    }
    if (w === "iifname" || w === "oifname") {
      expr = { types: [null], from: t, to: t, open: false };
      continue;
    }
    if (w === "." && expr !== undefined && !expr.open) {
      expr.open = true;
      continue;
    }
    if (w === "set" && expr !== undefined && !expr.open && expr.types.length === 1) {
      const type = expr.types[0];
      if (type !== null && type !== undefined)
        setStatement = { kind: "set", token: expr.from, type };
      expr = undefined;
      continue;
    }
    if (NFT_OPERATORS.has(w)) continue;
    if (NFT_VERDICTS.has(w)) {
      expr = undefined;
      continue;
    }
    if ((w === "goto" || w === "jump") && next?.kind === "word") {
      chains.push(next);
      expr = undefined;
      i++;
      continue;
    }
    if (w === "counter") {
      if (next?.text === "packets" && tokens[i + 3]?.text === "bytes") i += 4;
      expr = undefined;
      continue;
    }
    if (w === "masquerade") {
      nat = true;
      restrict(SNAT_HOOKS);
      continue;
    }
    if (w === "snat" || w === "dnat") {
      nat = true;
      restrict(w === "snat" ? SNAT_HOOKS : DNAT_HOOKS);
      let type: NftKeyType | undefined;
      if ((next?.text === "ip" || next?.text === "ip6") && tokens[i + 2]?.text === "to") {
        type = next.text === "ip" ? "ipv4_addr" : "ipv6_addr";
        i += 2;
      } else if (next?.text === "to") {
        if (family === "inet")
          errors.push(
            userError("ip or ip6 must be specified with address for inet tables.", nftSpan(t)),
          );
        type = family === "ip6" ? "ipv6_addr" : "ipv4_addr";
        i++;
      } else {
        reject(t);
        continue;
      }
      natStatement = { kind: "nat", token: t, type };
      expr = undefined;
      continue;
    }
    if (w === "tcp" && next?.text === "option" && tokens[i + 2]?.text === "maxseg") {
      if (tokens[i + 3]?.text !== "size") reject(t);
      i += 3;
      continue;
    }
    if (w === "rt" && next?.text === "mtu") {
      restrict(RT_MTU_HOOKS);
      i++;
      continue;
    }
    if ((w === "vmap" || w === "map") && next?.text.startsWith("@") === true) {
      if (expr === undefined || expr.open) reject(t);
      else {
        if (expr.types.includes(null))
          throw unmodeled(`a set lookup of this expression (in: ${source.trim()})`);
        if (w === "map" && natStatement === undefined && setStatement === undefined)
          throw unmodeled(`maps outside snat/dnat and set statements (in: ${source.trim()})`);
        refs.push({
          name: next.text.slice(1),
          token: next,
          mode: w,
          key: { types: expr.types as NftKeyType[], from: expr.from, to: expr.to },
          ...(w === "map" ? { feeds: natStatement ?? setStatement! } : {}),
        });
        if (w === "map") setStatement = undefined;
      }
      expr = undefined;
      i++;
      continue;
    }
    if (w.startsWith("@") && w.length > 1) {
      if (expr === undefined || expr.types.includes(null)) reject(t);
      else
        refs.push({
          name: w.slice(1),
          token: t,
          mode: "lookup",
          key: { types: expr.types as NftKeyType[], from: expr.from, to: expr.to },
        });
      expr = undefined;
      continue;
    }
    if (isValueWord(w)) continue;
    reject(t);
  }
  const last = tokens[end - 1];
  const text =
    last === undefined ? "" : source.slice(tokens[0]!.first - 1, last.last).replace(/\s+/g, " ");
  return { text, comment, chains, refs, hooks, nat, errors, outOfRange };
}

// ------------------------------------------------------------------------------------------------
// Elements

interface ParsedElement {
  readonly key: readonly NftField[];
  readonly value: NftVerdict | bigint | undefined;
  /** The value is a verdict in a data map (the kernel refuses it). */
  readonly misplacedVerdict: boolean;
  readonly span: NftSpan;
}

/** Parses `{ key [: value], … }` for `set` as nft evaluates it (every error is nft's own). */
function parseNftElements(tokens: readonly NftToken[], set: NftSet): ParsedElement[] {
  const items: NftToken[][] = [[]];
  for (const t of tokens) {
    if (t.kind === "newline") continue;
    if (t.kind === "punct" && t.text === ",") items.push([]);
    else if (t.kind === "punct") throw unmodeled(`"${t.text}" inside an nft element list`);
    else items[items.length - 1]!.push(t);
  }
  const out: ParsedElement[] = [];
  for (const item of items) {
    if (item.length === 0) continue;
    const colon = item.findIndex((t) => t.text === ":");
    const keyTokens = colon < 0 ? item : item.slice(0, colon);
    const valueTokens = colon < 0 ? [] : item.slice(colon + 1);
    if (keyTokens.length === 0) throw unmodeled("an nft element without key");
    const span = nftSpan(keyTokens[0]!, keyTokens[keyTokens.length - 1]!);
    // Fields separated by ".": nft locates the third and later ones from the dot before them.
    const fields: { token: NftToken; at: NftSpan }[] = [];
    for (let i = 0; i < keyTokens.length; i++) {
      const t = keyTokens[i]!;
      if (i % 2 === 1) {
        if (t.text !== ".") throw unmodeled(`the nft element syntax "${t.text}"`);
        continue;
      }
      if (t.kind !== "word") throw unmodeled(`the nft element syntax "${t.text}"`);
      const dot = keyTokens[i - 1];
      fields.push({
        token: t,
        at: fields.length >= 2 && dot !== undefined ? nftSpan(dot, t) : nftSpan(t),
      });
    }
    if (fields.length > set.key.length)
      throw userError("Can't parse symbolic invalid expressions", fields[set.key.length]!.at);
    if (fields.length < set.key.length)
      throw userError(
        `datatype mismatch, expected ${typeDescription(set.key)}, expression has type ${typeDescription(set.key.slice(0, fields.length))}`,
        span,
      );
    const key = fields.map((f, i) => parseNftField(f.token, f.at, set.key[i]!, set.interval));
    let value: NftVerdict | bigint | undefined;
    let misplacedVerdict = false;
    if (colon >= 0) {
      if (set.value === undefined) throw new NftFailure("user", "netlink: Error: set is not a map");
      const v = valueTokens[0];
      if (v === undefined) throw unmodeled("an nft element value that is missing");
      const isVerdict = NFT_VERDICTS.has(v.text) || v.text === "goto" || v.text === "jump";
      if (isVerdict) {
        const target = valueTokens[1];
        if (
          (v.text === "goto" || v.text === "jump") !== (target !== undefined) ||
          valueTokens.length > 2
        )
          throw unmodeled(`the nft verdict syntax "${valueTokens.map((t) => t.text).join(" ")}"`);
        value =
          target === undefined
            ? { kind: v.text as "accept" }
            : { kind: v.text as "goto" | "jump", chain: target.text };
        misplacedVerdict = set.value !== "verdict";
      } else if (set.value === "verdict") {
        throw userError("Can't parse symbolic netfilter verdict expressions", nftSpan(v));
      } else {
        if (valueTokens.length > 1) throw unmodeled(`the nft element value "${v.text} …"`);
        const f = parseNftField(v, nftSpan(v), set.value, true);
        if (f.lo !== f.hi) throw userError("Value must be a singleton", nftSpan(v));
        value = f.lo;
      }
    }
    out.push({ key, value, misplacedVerdict, span });
  }
  if (out.length === 0) throw unmodeled("an empty nft element list (nft: syntax error)");
  return out;
}

function parseNftField(
  token: NftToken,
  at: NftSpan,
  type: NftKeyType,
  interval: boolean,
): NftField {
  const text = token.text;
  const single = (part: string, where: NftSpan): bigint => {
    switch (type) {
      case "ipv4_addr":
      case "ipv6_addr": {
        const want: Family = type === "ipv4_addr" ? 4 : 6;
        const a = tryParseAddress(part);
        if (a === undefined) throw unmodeled(`hostnames in nft elements ("${part}")`);
        if (a.family !== want)
          throw userError(
            "Could not resolve hostname: Address family for hostname not supported",
            where,
          );
        return a.value;
      }
      case "inet_proto": {
        if (isNumberWord(part)) {
          const n = BigInt(part);
          if (n > 255n) throw userError("Protocol out of range", where);
          return n;
        }
        const n = PROTOCOL_NUMBERS.get(part.toLowerCase());
        if (n === undefined) throw userError("Could not resolve protocol name", where);
        return BigInt(n);
      }
      case "inet_service": {
        if (!isNumberWord(part)) throw unmodeled(`service names in nft elements ("${part}")`);
        const n = BigInt(part);
        if (n > 65535n) throw userError("Service out of range", where);
        return n;
      }
      case "classid": {
        if (part === "root") return 0xffffffffn;
        if (part === "none") return 0n;
        const m = /^([0-9a-fA-F]{1,4}):([0-9a-fA-F]{1,4})$/.exec(part);
        if (m === null) throw unmodeled(`the TC classid "${part}" (the fake reads major:minor)`);
        return (BigInt(`0x${m[1]}`) << 16n) | BigInt(`0x${m[2]}`);
      }
      case "mark": {
        if (!isNumberWord(part)) throw userError("Could not parse packet mark", where);
        const n = BigInt(part);
        if (n > 0xffffffffn) throw userError(`Value ${n} exceeds valid range 0-4294967295`, where);
        return n;
      }
    }
  };
  const isAddress = type === "ipv4_addr" || type === "ipv6_addr";
  const slash = text.indexOf("/");
  if (isAddress && slash >= 0) {
    const base = single(text.slice(0, slash), {
      line: token.line,
      first: token.first,
      last: token.first + slash - 1,
    });
    const lenText = text.slice(slash + 1);
    const width = typeWidth(type);
    if (!/^\d+$/.test(lenText)) throw unmodeled(`the nft prefix "${text}"`);
    const len = Number(lenText);
    if (len > width)
      throw userError(`Prefix length ${len} is invalid for type of ${width} bits width`, at);
    if (!interval)
      throw userError(
        "You must add 'flags interval' to your set declaration if you want to add prefix elements",
        at,
      );
    const host = (1n << BigInt(width - len)) - 1n;
    return { lo: base & ~host, hi: (base & ~host) | host };
  }
  const dash =
    type === "inet_proto" && PROTOCOL_NUMBERS.has(text.toLowerCase()) ? -1 : text.indexOf("-", 1);
  if (dash > 0) {
    const lo = single(text.slice(0, dash), at);
    const hi = single(text.slice(dash + 1), at);
    if (lo > hi) throw userError("Range has zero or negative size", at);
    if (!interval)
      throw userError(
        "You must add 'flags interval' to your set declaration if you want to add range elements",
        at,
      );
    return { lo, hi };
  }
  const v = single(text, at);
  return { lo: v, hi: v };
}

// ------------------------------------------------------------------------------------------------
// Transactions and listings

/** A cursor over one command's tokens. */
class NftCursor {
  readonly #tokens: readonly NftToken[];
  readonly #source: string;
  #i = 0;
  constructor(tokens: readonly NftToken[], source: string) {
    this.#tokens = tokens;
    this.#source = source;
  }
  get done(): boolean {
    return this.#i >= this.#tokens.length;
  }
  next(what: string): NftToken {
    const t = this.#tokens[this.#i++];
    if (t === undefined || t.kind === "newline" || t.kind === "punct")
      throw unmodeled(`nft input without ${what} (in: ${this.#source.trim()})`);
    return t;
  }
  /** The tokens of a `{ … }` block, without its braces. */
  /** The `{` of the last block(). */
  opened: NftToken | undefined;
  block(): NftToken[] {
    const open = this.#tokens[this.#i];
    if (open?.text !== "{") throw unmodeled(`nft input without "{" (in: ${this.#source.trim()})`);
    this.opened = open;
    let depth = 0;
    const start = this.#i + 1;
    for (; this.#i < this.#tokens.length; this.#i++) {
      const t = this.#tokens[this.#i]!;
      if (t.kind === "punct" && t.text === "{") depth++;
      if (t.kind === "punct" && t.text === "}" && --depth === 0) break;
    }
    return this.#tokens.slice(start, this.#i++);
  }
  rest(): NftToken[] {
    const out = this.#tokens.slice(this.#i);
    this.#i = this.#tokens.length;
    return out;
  }
}

/** Items of a block: split at newlines and semicolons outside nested braces. */
function nftItems(tokens: readonly NftToken[]): NftToken[][] {
  const out: NftToken[][] = [];
  let current: NftToken[] = [];
  let depth = 0;
  for (const t of tokens) {
    if (depth === 0 && (t.kind === "newline" || (t.kind === "punct" && t.text === ";"))) {
      if (current.length > 0) out.push(current);
      current = [];
      continue;
    }
    if (t.kind === "punct" && t.text === "{") depth++;
    if (t.kind === "punct" && t.text === "}") depth--;
    current.push(t);
  }
  if (current.length > 0) out.push(current);
  return out;
}

interface NftBatch {
  readonly tables: NftTable[];
  readonly lines: readonly string[];
  readonly seeding: boolean;
  readonly failures: NftFailure[];
  /**
   * A chain failed validation at commit: the kernel aborts and replays the whole batch to find the
   * message at fault, so every handle the batch took is taken twice.
   */
  replayed: boolean;
}

interface NftSetSpec {
  readonly key: NftKeyType[];
  readonly value: NftValueType | undefined;
  readonly interval: boolean;
  readonly counter: boolean;
  readonly elements: NftToken[] | undefined;
}

class Nftables {
  #tables: NftTable[] = [];
  readonly #tableHandles = { next: 1 };
  /** iptables-nft's tables, which live in the same kernel tables list. */
  readonly #xtables: () => readonly (readonly [NftFamily, string])[];

  constructor(xtables: () => readonly (readonly [NftFamily, string])[]) {
    this.#xtables = xtables;
  }

  /** `nft ARGS…`: a transaction from stdin (`-f -`) or argv, or a listing. */
  run(args: readonly string[], stdin: string, seeding: boolean): string {
    let json = false;
    let terse = false;
    let i = 0;
    for (; i < args.length; i++) {
      const a = args[i]!;
      if (a === "-j" || a === "--json") json = true;
      else if (a === "-t" || a === "--terse") terse = true;
      else if (a === "-f" || a === "--file") {
        if (args[i + 1] !== "-" || i + 2 !== args.length)
          throw unmodeled(`nft ${args.join(" ")} (only -f - is modeled)`);
        this.#transaction(stdin, stdin.split("\n"), seeding, false);
        return "";
      } else if (a.startsWith("-")) throw unmodeled(`the nft option ${a}`);
      else break;
    }
    const rest = args.slice(i);
    if (rest[0] === "list") return this.#list(rest, json, terse);
    if (rest.length === 0) throw unmodeled("nft without a command (the interactive mode)");
    if (json) throw unmodeled("nft -j with a command other than list");
    const line = rest.join(" ");
    this.#transaction(line, [line], seeding, true);
    return "";
  }

  tableNames(): string[] {
    return this.#tables.map((t) => `${t.family} ${t.name}`);
  }

  // --- transactions

  #transaction(input: string, lines: readonly string[], seeding: boolean, cli: boolean): void {
    const commands = nftCommands(nftTokens(input));
    const batch: NftBatch = {
      tables: this.#tables.map(cloneNftTable),
      lines,
      seeding,
      failures: [],
      replayed: false,
    };
    const handles = [this.#tableHandles, ...batch.tables.map((t) => t.handles)];
    const start = handles.map((h) => h.next);
    for (const tokens of commands) this.#command(tokens, batch);
    const user = batch.failures.filter((f) => f.stage === "user");
    const failed = user.length > 0 ? user : batch.failures;
    if (failed.length > 0) {
      if (user.length === 0 && batch.replayed)
        handles.forEach((h, i) => {
          h.next += h.next - start[i]!;
        });
      throw new ToolFailure(1, failed.map((f) => this.#format(f, lines, cli)).join(""));
    }
    this.#tables = batch.tables;
  }

  #format(f: NftFailure, lines: readonly string[], cli: boolean): string {
    if (f.at === undefined) return `${f.message}\n`;
    const where = cli ? "" : `/dev/stdin:${f.at.line}:${f.at.first}-${f.at.last}: `;
    const marks: string[] = [];
    const mark = (s: NftSpan, c: string) => {
      for (let col = s.first; col <= s.last; col++) marks[col - 1] = c;
    };
    if (f.context !== undefined) mark(f.context, "~");
    mark(f.at, "^");
    const carets = Array.from(marks, (m) => m ?? " ").join("");
    return `${where}Error: ${f.message}\n${lines[f.at.line - 1] ?? ""}\n${carets}\n`;
  }

  /** Runs one command of a batch; a refusal is recorded and the command changes nothing. */
  #attempt(batch: NftBatch, fn: () => void): void {
    try {
      fn();
    } catch (e) {
      if (e instanceof NftFailure) batch.failures.push(e);
      else if (Array.isArray(e) && e.every((x) => x instanceof NftFailure))
        batch.failures.push(...(e as NftFailure[]));
      else throw e;
    }
  }

  #command(tokens: readonly NftToken[], batch: NftBatch): void {
    const source = batch.lines[tokens[0]!.line - 1] ?? "";
    const p = new NftCursor(tokens, source);
    const whole = nftCommandSpan(tokens);
    const verb = p.next("a command");
    const object = verb.text === "table" ? verb : p.next("an object");
    const target = () => {
      const f = p.next("a family or table");
      if (f.text === "ip" || f.text === "ip6" || f.text === "inet")
        return { family: f.text as NftFamily, table: p.next("a table") };
      if (["arp", "bridge", "netdev"].includes(f.text)) throw unmodeled(`nft's ${f.text} family`);
      return { family: "ip" as NftFamily, table: f };
    };
    const run = (fn: () => void) => this.#attempt(batch, fn);
    switch (`${verb.text} ${object.text}`) {
      case "table table":
      case "add table": {
        const { family, table } = target();
        run(() => this.#addTable(batch, family, table));
        if (!p.done) this.#tableBlock(batch, family, table, p.block(), source);
        break;
      }
      case "add chain": {
        const { family, table } = target();
        const name = p.next("a chain name");
        const spec = p.done ? undefined : nftItems(p.block());
        run(() => this.#addChain(batch, family, table, name, spec, whole, source));
        break;
      }
      case "add set":
      case "add map": {
        const { family, table } = target();
        const name = p.next("a set name");
        const block = p.block();
        const open = p.opened!;
        run(() =>
          this.#addSet(
            batch,
            family,
            table,
            name,
            this.#setSpec(open, block, object.text === "map", source),
            whole,
          ),
        );
        break;
      }
      case "add rule": {
        const { family, table } = target();
        const chain = p.next("a chain name");
        run(() => this.#addRule(batch, family, table, chain, p.rest(), whole, source));
        break;
      }
      case "add element":
      case "delete element": {
        const { family, table } = target();
        const set = p.next("a set name");
        const elements = p.block();
        run(() =>
          verb.text === "add"
            ? this.#addElements(batch, family, table, set, elements, whole)
            : this.#deleteElements(batch, family, table, set, elements),
        );
        break;
      }
      case "delete table":
      case "delete chain":
      case "delete set":
      case "delete map":
      case "flush chain":
      case "flush set":
      case "flush map": {
        const { family, table } = target();
        const name = object.text === "table" ? undefined : p.next("a name");
        run(() => this.#removal(batch, `${verb.text} ${object.text}`, family, table, name));
        break;
      }
      case "flush ruleset":
        if (this.#xtables().length > 0)
          throw unmodeled("nft flush ruleset on a host with iptables-nft tables");
        batch.tables.length = 0;
        break;
      default:
        throw unmodeled(`the nft command "${verb.text} ${object.text}"`);
    }
    if (!p.done) throw unmodeled(`nft input after the command (in: ${source.trim()})`);
  }

  /** `table F N { set …; map …; chain … }`: chains, then sets and their elements, then rules. */
  #tableBlock(
    batch: NftBatch,
    family: NftFamily,
    table: NftToken,
    tokens: readonly NftToken[],
    source: string,
  ): void {
    const chains: {
      name: NftToken;
      spec: NftToken[][] | undefined;
      rules: NftToken[][];
      whole: NftSpan;
      line: string;
    }[] = [];
    const sets: {
      name: NftToken;
      open: NftToken;
      block: NftToken[];
      map: boolean;
      line: string;
      whole: NftSpan;
    }[] = [];
    for (const item of nftItems(tokens)) {
      const line = batch.lines[item[0]!.line - 1] ?? source;
      const p = new NftCursor(item, line);
      const kind = p.next("an object").text;
      const name = p.next("a name");
      const whole = nftCommandSpan(item);
      if (kind === "chain") {
        const items = nftItems(p.block());
        const spec: NftToken[][] = [];
        while (items[0]?.[0]?.text === "type" || items[0]?.[0]?.text === "policy")
          spec.push(items.shift()!);
        chains.push({
          name,
          spec: spec.length === 0 ? undefined : spec,
          rules: items,
          whole,
          line,
        });
      } else if (kind === "set" || kind === "map") {
        const block = p.block();
        sets.push({ name, open: p.opened!, block, map: kind === "map", line, whole });
      } else {
        throw unmodeled(`"${kind}" in an nft table block`);
      }
      if (!p.done) throw unmodeled(`nft input after the ${kind} ${name.text}`);
    }
    const run = (fn: () => void) => this.#attempt(batch, fn);
    for (const c of chains)
      run(() => this.#addChain(batch, family, table, c.name, c.spec, c.whole, c.line));
    for (const s of sets)
      run(() =>
        this.#addSet(
          batch,
          family,
          table,
          s.name,
          this.#setSpec(s.open, s.block, s.map, s.line),
          s.whole,
        ),
      );
    for (const c of chains)
      for (const rule of c.rules) {
        const line = batch.lines[rule[0]!.line - 1] ?? "";
        const whole = nftCommandSpan(rule);
        run(() => this.#addRule(batch, family, table, c.name, rule, whole, line));
      }
  }

  #findTable(batch: NftBatch, family: NftFamily, name: NftToken): NftTable | undefined {
    if (this.#xtables().some(([f, n]) => f === family && n === name.text))
      throw unmodeled(`nft commands on iptables-nft's table ${family} ${name.text}`);
    return batch.tables.find((t) => t.family === family && t.name === name.text);
  }

  #addTable(batch: NftBatch, family: NftFamily, name: NftToken): void {
    if (this.#findTable(batch, family, name) !== undefined) return;
    batch.tables.push({
      family,
      name: name.text,
      handle: this.#tableHandles.next++,
      handles: { next: 1 },
      sets: new Map(),
      chains: new Map(),
    });
  }

  /** `type T hook H priority P; policy accept|drop;`, as items of a block. */
  #chainSpec(
    items: readonly NftToken[][],
    source: string,
  ): { base: NftBaseChain; policy: NftToken[] | undefined } {
    let base: Omit<NftBaseChain, "policy"> | undefined;
    let policy: NftToken[] | undefined;
    let policyValue: "accept" | "drop" = "accept";
    for (const item of items) {
      const words = item.map((t) => t.text);
      if (words[0] === "type" && words[2] === "hook" && words[4] === "priority") {
        const type = words[1]!;
        const hook = words[3]!;
        if (type !== "filter" && type !== "nat" && type !== "route")
          throw unmodeled(`the nft chain type ${type}`);
        if (!(HOOKS as readonly string[]).includes(hook)) throw unmodeled(`the nft hook ${hook}`);
        base = {
          type,
          hook: hook as NftHook,
          priority: this.#priority(words.slice(5), hook, source),
        };
      } else if (words[0] === "policy" && words.length === 2) {
        if (words[1] !== "accept" && words[1] !== "drop")
          throw unmodeled(`the nft chain policy ${words[1]}`);
        policy = item;
        policyValue = words[1];
      } else {
        throw unmodeled(`the nft chain property "${words.join(" ")}" (in: ${source.trim()})`);
      }
    }
    if (base === undefined)
      throw unmodeled(`an nft chain block without type (in: ${source.trim()})`);
    return { base: { ...base, policy: policyValue }, policy };
  }

  /** A number, or a standard priority's name with an optional `+ N` / `- N`. */
  #priority(words: readonly string[], hook: string, source: string): number {
    if (words.length === 1 && /^-?\d+$/.test(words[0]!)) return Number(words[0]);
    const std = STD_PRIORITIES.find(([name]) => name === words[0]);
    const sign = words.length === 1 ? 1 : words[1] === "+" ? 1 : words[1] === "-" ? -1 : 0;
    const offset = words.length === 1 ? 0 : /^\d+$/.test(words[2] ?? "") ? Number(words[2]) : NaN;
    if (std === undefined || sign === 0 || Number.isNaN(offset) || words.length > 3)
      throw unmodeled(`the nft priority "${words.join(" ")}" (in: ${source.trim()})`);
    if (std[2] !== undefined && !std[2].includes(hook as NftHook))
      throw unmodeled(`the priority ${std[0]} at the ${hook} hook`);
    return std[1] + sign * offset;
  }

  #addChain(
    batch: NftBatch,
    family: NftFamily,
    tableName: NftToken,
    name: NftToken,
    specItems: readonly NftToken[][] | undefined,
    whole: NftSpan,
    source: string,
  ): void {
    const spec = specItems === undefined ? undefined : this.#chainSpec(specItems, source);
    const table = this.#findTable(batch, family, tableName);
    if (table === undefined) throw userError(ERRNO.ENOENT, nftSpan(tableName));
    const base = spec?.base;
    if (base !== undefined) {
      const valid =
        base.type === "filter" ||
        (base.type === "nat" && base.hook !== "forward") ||
        (base.type === "route" && base.hook === "output");
      if (!valid) throw kernelError("EOPNOTSUPP", whole);
    }
    const existing = table.chains.get(name.text);
    if (existing !== undefined) {
      // The kernel updates a chain in place only where nothing about its hook changes.
      if (base === undefined) return;
      if (existing.base === undefined) {
        if (spec?.policy === undefined) throw kernelError("EEXIST", nftSpan(name));
        throw kernelError(
          "EOPNOTSUPP",
          nftSpan(spec.policy[0]!, spec.policy[spec.policy.length - 1]),
        );
      }
      const b = existing.base;
      if (b.type !== base.type) throw kernelError("EEXIST", nftSpan(name));
      if (b.hook !== base.hook || b.priority !== base.priority)
        throw kernelError("EOPNOTSUPP", whole);
      table.chains.set(name.text, { ...existing, base: { ...b, policy: base.policy } });
      return;
    }
    table.chains.set(name.text, {
      name: name.text,
      handle: table.handles.next++,
      base,
      rules: [],
    });
  }

  #setSpec(open: NftToken, tokens: readonly NftToken[], map: boolean, source: string): NftSetSpec {
    let key: NftKeyType[] | undefined;
    let value: NftValueType | undefined;
    let interval = false;
    let counter = false;
    let elements: NftToken[] | undefined;
    const errors: NftFailure[] = [];
    for (const item of nftItems(tokens)) {
      const words = item.map((t) => t.text);
      if (words[0] === "type") {
        const colon = words.indexOf(":");
        const keyTokens = item.slice(1, colon < 0 ? item.length : colon);
        if (map !== colon >= 0)
          throw unmodeled(`a ${map ? "map" : "set"} declared with "${words.join(" ")}"`);
        const types: NftKeyType[] = [];
        for (let i = 0; i < keyTokens.length; i++) {
          const t = keyTokens[i]!;
          if (i % 2 === 1) {
            if (t.text !== ".") throw unmodeled(`the nft set type "${words.join(" ")}"`);
            continue;
          }
          if (isNftKeyType(t.text)) types.push(t.text);
          else if (NFT_OTHER_TYPES.has(t.text) || t.text === "verdict")
            throw unmodeled(`nft sets of type ${t.text}`);
          else errors.push(userError(`unknown datatype ${t.text}`, nftSpan(t)));
        }
        if (colon >= 0) {
          const v = item[colon + 1];
          if (v === undefined || item.length !== colon + 2)
            throw unmodeled(`the nft map type "${words.join(" ")}"`);
          if (v.text === "verdict" || isNftKeyType(v.text)) value = v.text as NftValueType;
          else throw unmodeled(`nft maps to ${v.text}`);
        }
        if (errors.length > 0) {
          errors.push(
            userError(
              "set definition does not specify key",
              nftSpan(open, tokens[tokens.length - 1] ?? open),
            ),
          );
          throw errors;
        }
        key = types;
      } else if (words[0] === "flags" && words.length === 2 && words[1] === "interval") {
        interval = true;
      } else if (words.length === 1 && words[0] === "counter") {
        counter = true;
      } else if (words[0] === "elements" && words[1] === "=") {
        const p = new NftCursor(item.slice(2), source);
        elements = p.block();
        if (!p.done) throw unmodeled(`nft input after a set's elements (in: ${source.trim()})`);
      } else {
        throw unmodeled(`the nft set property "${words.join(" ")}" (in: ${source.trim()})`);
      }
    }
    if (key === undefined) throw unmodeled(`an nft set without type (in: ${source.trim()})`);
    if (interval && key.length === 1)
      throw unmodeled("interval sets of one field (nft's rbtree backend and its auto-merge)");
    return { key, value, interval, counter, elements };
  }

  #addSet(
    batch: NftBatch,
    family: NftFamily,
    tableName: NftToken,
    name: NftToken,
    spec: NftSetSpec,
    whole: NftSpan,
  ): void {
    const table = this.#findTable(batch, family, tableName);
    if (table === undefined) throw userError(ERRNO.ENOENT, nftSpan(tableName));
    let created = false;
    const existing = table.sets.get(name.text);
    if (existing === undefined) {
      created = true;
      table.sets.set(name.text, {
        name: name.text,
        handle: table.handles.next++,
        key: spec.key,
        value: spec.value,
        interval: spec.interval,
        counter: spec.counter,
        elements: new Map(),
      });
    } else if (
      existing.key.join(".") !== spec.key.join(".") ||
      existing.value !== spec.value ||
      existing.interval !== spec.interval ||
      existing.counter !== spec.counter
    ) {
      throw kernelError("EEXIST", nftSpan(name));
    }
    if (spec.elements === undefined) return;
    try {
      this.#addElements(batch, family, tableName, name, spec.elements, whole);
    } catch (e) {
      if (created) table.sets.delete(name.text);
      throw e;
    }
  }

  #setOf(batch: NftBatch, family: NftFamily, tableName: NftToken, name: NftToken) {
    const table = this.#findTable(batch, family, tableName);
    if (table === undefined) throw userError(ERRNO.ENOENT, nftSpan(tableName));
    const set = table.sets.get(name.text);
    if (set === undefined) throw userError(ERRNO.ENOENT, nftSpan(name));
    return { table, set };
  }

  #addElements(
    batch: NftBatch,
    family: NftFamily,
    tableName: NftToken,
    name: NftToken,
    tokens: readonly NftToken[],
    whole: NftSpan,
  ): void {
    const { table, set } = this.#setOf(batch, family, tableName, name);
    const parsed = parseNftElements(tokens, set);
    const next: NftSet = { ...set, elements: new Map(set.elements) };
    let jumps = false;
    for (const e of parsed) {
      if (set.value !== undefined && e.value === undefined) throw kernelError("EINVAL", e.span);
      if (e.misplacedVerdict) throw kernelError("EINVAL", e.span);
      if (typeof e.value === "object" && "chain" in e.value) {
        const target = table.chains.get(e.value.chain);
        if (target === undefined) throw kernelError("ENOENT", e.span);
        if (target.base !== undefined) throw kernelError("EOPNOTSUPP", e.span);
        jumps = true;
      }
      const element: NftElement = { key: e.key, value: e.value };
      const id = elementId(e.key);
      if (!set.interval) {
        const have = next.elements.get(id);
        if (have !== undefined) {
          if (!sameValue(have.value, e.value)) throw kernelError("EEXIST", e.span);
          continue;
        }
        next.elements.set(id, element);
        continue;
      }
      // pipapo: the element holding the new one's first point, then its last point.
      const holds = (point: readonly bigint[]) => {
        for (const x of next.elements.values())
          if (x.key.every((f, i) => f.lo <= point[i]! && point[i]! <= f.hi)) return x;
        return undefined;
      };
      const atStart = holds(e.key.map((f) => f.lo));
      if (atStart !== undefined) {
        if (elementId(atStart.key) !== id || !sameValue(atStart.value, e.value))
          throw kernelError("EEXIST", e.span);
        continue;
      }
      if (holds(e.key.map((f) => f.hi)) !== undefined) throw kernelError("EEXIST", e.span);
      next.elements.set(id, element);
    }
    table.sets.set(set.name, next);
    if (jumps && set.value === "verdict" && this.#hookViolation(table)) {
      table.sets.set(set.name, set);
      batch.replayed = true;
      throw kernelError("EOPNOTSUPP", whole);
    }
  }

  #deleteElements(
    batch: NftBatch,
    family: NftFamily,
    tableName: NftToken,
    name: NftToken,
    tokens: readonly NftToken[],
  ): void {
    const { table, set } = this.#setOf(batch, family, tableName, name);
    const parsed = parseNftElements(tokens, set);
    const next: NftSet = { ...set, elements: new Map(set.elements) };
    for (const e of parsed) {
      if (!set.interval) {
        if (!next.elements.delete(elementId(e.key))) throw kernelError("ENOENT", e.span);
        continue;
      }
      // pipapo looks the key's first point up and deletes what holds it (checked on 6.18).
      const point = e.key.map((f) => f.lo);
      const hit = [...next.elements].find(([, x]) =>
        x.key.every((f, i) => f.lo <= point[i]! && point[i]! <= f.hi),
      );
      if (hit === undefined) throw kernelError("ENOENT", e.span);
      next.elements.delete(hit[0]);
    }
    table.sets.set(set.name, next);
  }

  #addRule(
    batch: NftBatch,
    family: NftFamily,
    tableName: NftToken,
    chainName: NftToken,
    tokens: readonly NftToken[],
    whole: NftSpan,
    source: string,
  ): void {
    if (tokens.length === 0) throw unmodeled(`an empty nft rule (in: ${source.trim()})`);
    const rule = parseNftRule(tokens, source, family, batch.seeding);
    const table = this.#findTable(batch, family, tableName);
    // What nft evaluates itself.
    const errors: NftFailure[] = [...rule.errors];
    for (const ref of rule.refs) {
      if (table === undefined) {
        errors.push(userError(ERRNO.ENOENT, nftSpan(tableName)));
        break;
      }
      const set = table.sets.get(ref.name);
      if (set === undefined) {
        errors.push(userError(ERRNO.ENOENT, nftSpan(ref.token)));
        continue;
      }
      const keyAt = nftSpan(ref.key.from, ref.key.to);
      const refAt = nftSpan(ref.token);
      const sameKey = set.key.join(".") === ref.key.types.join(".");
      if (ref.mode === "lookup") {
        if (!sameKey)
          errors.push(
            userError(
              `datatype mismatch, expected ${typeDescription(ref.key.types)}, expression has type ${typeDescription(set.key)}`,
              refAt,
              keyAt,
            ),
          );
        continue;
      }
      if (set.value === undefined) {
        if (ref.mode === "map") throw unmodeled("snat to a map that is a set (nft 1.0.6 crashes)");
        errors.push(userError("Expression is not a map", refAt));
        continue;
      }
      if (!sameKey) {
        errors.push(
          userError(
            `datatype mismatch, map expects ${typeDescription(set.key)}, mapping expression has type ${typeDescription(ref.key.types)}`,
            refAt,
            keyAt,
          ),
        );
        continue;
      }
      if (ref.mode === "vmap" && set.value !== "verdict")
        errors.push(
          userError(
            `datatype mismatch: expected netfilter verdict, expression has type ${NFT_TYPES[set.value]}`,
            nftSpan(ref.key.from, ref.token),
          ),
        );
      if (ref.mode === "map" && set.value !== ref.feeds!.type)
        errors.push(
          userError(
            `datatype mismatch: expected ${NFT_TYPES[ref.feeds!.type]}, expression has type ${NFT_TYPES[set.value]}`,
            nftSpan(ref.key.from, ref.token),
            // nft underlines a set statement up to the expression it sets (`meta priority set `).
            ref.feeds!.kind === "nat"
              ? nftSpan(ref.feeds!.token)
              : { ...nftSpan(ref.feeds!.token), last: ref.key.from.first - 1 },
          ),
        );
    }
    if (errors.length > 0) throw errors;
    // What the kernel checks.
    if (table === undefined) throw kernelError("ENOENT", nftSpan(tableName));
    const chain = table.chains.get(chainName.text);
    if (chain === undefined) throw kernelError("ENOENT", nftSpan(chainName));
    const handle = table.handles.next++;
    if (rule.outOfRange !== undefined) throw kernelError("ERANGE", rule.outOfRange);
    for (const target of rule.chains) {
      const c = table.chains.get(target.text);
      if (c === undefined) throw kernelError("ENOENT", nftSpan(target));
      if (c.base !== undefined) throw kernelError("EOPNOTSUPP", nftSpan(target));
    }
    const added: NftRule = {
      handle,
      text: rule.text,
      comment: rule.comment,
      chains: rule.chains.map((t) => t.text),
      sets: rule.refs.map((r) => r.name),
      vmaps: rule.refs.filter((r) => r.mode === "vmap").map((r) => r.name),
      hooks: rule.hooks,
      nat: rule.nat,
    };
    const before = chain.rules;
    chain.rules = [...before, added];
    if (this.#hookViolation(table)) {
      chain.rules = before;
      batch.replayed = true;
      throw kernelError("EOPNOTSUPP", whole);
    }
  }

  /** The kernel's chain validation: every base chain and what it reaches, through verdict maps too. */
  #hookViolation(table: NftTable): boolean {
    for (const start of table.chains.values()) {
      const base = start.base;
      if (base === undefined) continue;
      const seen = new Set<string>();
      const stack = [start.name];
      while (stack.length > 0) {
        const name = stack.pop()!;
        if (seen.has(name)) continue;
        seen.add(name);
        const chain = table.chains.get(name);
        if (chain === undefined) continue;
        for (const r of chain.rules) {
          if (r.hooks !== undefined && (r.hooks & hookBit(base.hook)) === 0) return true;
          if (r.nat && chain === start && base.type !== "nat") return true;
          stack.push(...r.chains);
          for (const m of r.vmaps)
            for (const e of table.sets.get(m)?.elements.values() ?? [])
              if (typeof e.value === "object" && "chain" in e.value) stack.push(e.value.chain);
        }
      }
    }
    return false;
  }

  #removal(
    batch: NftBatch,
    what: string,
    family: NftFamily,
    tableName: NftToken,
    name: NftToken | undefined,
  ): void {
    const table = this.#findTable(batch, family, tableName);
    const isSet = what === "flush set" || what === "flush map";
    if (table === undefined)
      throw isSet
        ? userError(ERRNO.ENOENT, nftSpan(tableName))
        : kernelError("ENOENT", nftSpan(tableName));
    if (name === undefined) {
      batch.tables.splice(batch.tables.indexOf(table), 1);
      return;
    }
    const rules = [...table.chains.values()].flatMap((c) => c.rules);
    switch (what) {
      case "delete chain": {
        if (!table.chains.has(name.text)) throw kernelError("ENOENT", nftSpan(name));
        // Its own rules go with it; a jump or a map element elsewhere keeps it.
        const elements = [...table.sets.values()].flatMap((s) => [...s.elements.values()]);
        if (
          rules.some((r) => r.chains.includes(name.text)) ||
          elements.some(
            (e) => typeof e.value === "object" && "chain" in e.value && e.value.chain === name.text,
          )
        )
          throw kernelError("EBUSY", nftSpan(name));
        table.chains.delete(name.text);
        return;
      }
      case "delete set":
      case "delete map":
        if (!table.sets.has(name.text)) throw kernelError("ENOENT", nftSpan(name));
        if (rules.some((r) => r.sets.includes(name.text)))
          throw kernelError("EBUSY", nftSpan(name));
        table.sets.delete(name.text);
        return;
      case "flush chain": {
        const chain = table.chains.get(name.text);
        if (chain === undefined) throw kernelError("ENOENT", nftSpan(name));
        chain.rules = [];
        return;
      }
      default: {
        const set = table.sets.get(name.text);
        if (set === undefined) throw userError(ERRNO.ENOENT, nftSpan(name));
        table.sets.set(name.text, { ...set, elements: new Map() });
      }
    }
  }

  // --- listings

  #list(words: readonly string[], json: boolean, terse: boolean): string {
    const what = words.slice(1);
    if (what.length === 1 && what[0] === "tables") {
      const names = [...this.#xtables().map(([f, n]) => `${f} ${n}`), ...this.tableNames()];
      if (json)
        return `${nftJson({
          nftables: [
            NFT_METAINFO,
            ...this.#xtables().map(([family, name], i) => ({
              table: { family, name, handle: i + 1 },
            })),
            ...this.#tables.map((t) => ({
              table: { family: t.family, name: t.name, handle: t.handle },
            })),
          ],
        })}\n`;
      return names.map((n) => `table ${n}\n`).join("");
    }
    if (what[0] === "ruleset" && what.length <= 2) {
      // `list ruleset FAMILY`: that family's tables only (iptables-nft's are ip, ip6, arp).
      const family = what[1];
      if (this.#xtables().some(([f]) => family === undefined || f === family))
        throw unmodeled(
          "nft list ruleset on a host with iptables-nft tables (they list as xt expressions)",
        );
      const tables = this.#tables.filter((t) => family === undefined || t.family === family);
      if (json)
        return `${nftJson({ nftables: [NFT_METAINFO, ...tables.flatMap((t) => this.#tableJson(t, terse))] })}\n`;
      return tables.map((t) => this.#tableText(t, terse)).join("");
    }
    if (what[0] === "table" && what.length >= 2 && what.length <= 3) {
      const [family, name] = what.length === 3 ? [what[1]!, what[2]!] : ["ip", what[1]!];
      if (this.#xtables().some(([f, n]) => f === family && n === name))
        throw unmodeled(`nft list of iptables-nft's table ${family} ${name}`);
      const table = this.#tables.find((t) => t.family === family && t.name === name);
      if (table === undefined) {
        const line = words.join(" ");
        const at = line.length - name.length + 1;
        throw new ToolFailure(
          1,
          `Error: ${ERRNO.ENOENT}\n${line}\n${" ".repeat(at - 1)}${"^".repeat(name.length)}\n`,
        );
      }
      if (json)
        return `${nftJson({ nftables: [NFT_METAINFO, ...this.#tableJson(table, terse)] })}\n`;
      return this.#tableText(table, terse);
    }
    throw unmodeled(`nft ${words.join(" ")}`);
  }

  /** `terse` (`-t`): sets and maps without their elements. */
  #tableJson(t: NftTable, terse = false): unknown[] {
    const { family, name: table } = t;
    const sets = [...t.sets.values()].map((s) => {
      const kind = s.value === undefined ? "set" : "map";
      const elem = (terse ? [] : this.#ordered(s)).map((e) => {
        const val =
          e.key.length === 1
            ? fieldJson(e.key[0]!, s.key[0]!)
            : { concat: e.key.map((f, i) => fieldJson(f, s.key[i]!)) };
        const key = s.counter ? { elem: { val, counter: { packets: 0, bytes: 0 } } } : val;
        if (s.value === undefined) return key;
        const v = e.value!;
        return [key, typeof v === "object" ? verdictJson(v) : this.#dataJson(v, s.value)];
      });
      return {
        [kind]: {
          family,
          name: s.name,
          table,
          type: s.key.length === 1 ? s.key[0] : s.key,
          handle: s.handle,
          ...(s.value === undefined ? {} : { map: s.value }),
          ...(s.interval ? { flags: ["interval"] } : {}),
          ...(elem.length === 0 ? {} : { elem }),
          ...(s.counter ? { stmt: [{ counter: null }] } : {}),
        },
      };
    });
    const chains = [...t.chains.values()].map((c) => ({
      chain: {
        family,
        table,
        name: c.name,
        handle: c.handle,
        ...(c.base === undefined
          ? {}
          : { type: c.base.type, hook: c.base.hook, prio: c.base.priority, policy: c.base.policy }),
      },
    }));
    const rules = [...t.chains.values()].flatMap((c) =>
      c.rules.map((r) => ({
        rule: {
          family,
          table,
          chain: c.name,
          handle: r.handle,
          ...(r.comment === undefined ? {} : { comment: r.comment }),
          expr: [{ fake: r.text }],
        },
      })),
    );
    return [{ table: { family, name: table, handle: t.handle } }, ...sets, ...chains, ...rules];
  }

  #dataJson(v: bigint, type: NftValueType): unknown {
    if (type === "ipv4_addr") return formatAddress({ family: 4, value: v });
    if (type === "ipv6_addr") return formatAddress({ family: 6, value: v });
    if (type === "classid") return classidText(v);
    return Number(v);
  }

  #dataText(v: bigint, type: NftValueType): string {
    return type === "verdict" ? "" : fieldText({ lo: v, hi: v }, type);
  }

  /**
   * Elements as nft lists them: it sorts those of hash sets by key; interval maps (pipapo) come
   * out in insertion order.
   */
  #ordered(s: NftSet): NftElement[] {
    const all = [...s.elements.values()];
    if (s.interval) return all;
    return all.sort((a, b) => {
      for (let i = 0; i < a.key.length; i++) {
        const x = a.key[i]!.lo;
        const y = b.key[i]!.lo;
        if (x !== y) return x < y ? -1 : 1;
      }
      return 0;
    });
  }

  #elementText(s: NftSet, e: NftElement, counters: boolean): string {
    const key = e.key.map((f, i) => fieldText(f, s.key[i]!)).join(" . ");
    const counter = counters && s.counter ? " counter packets 0 bytes 0" : "";
    if (s.value === undefined || e.value === undefined) return `${key}${counter}`;
    const v = typeof e.value === "object" ? verdictText(e.value) : this.#dataText(e.value, s.value);
    return `${key}${counter} : ${v}`;
  }

  #tableText(t: NftTable, terse = false): string {
    const blocks: string[] = [];
    for (const s of t.sets.values()) {
      const lines = [`\t${s.value === undefined ? "set" : "map"} ${s.name} {`];
      lines.push(`\t\ttype ${s.key.join(" . ")}${s.value === undefined ? "" : ` : ${s.value}`}`);
      if (s.interval) lines.push("\t\tflags interval");
      if (s.counter) lines.push("\t\tcounter");
      const elements = terse ? [] : this.#ordered(s);
      if (elements.length > 0) {
        // expression.c calculate_delim(): per key type, a number of elements per line.
        const perLine =
          s.key.length > 1 ? 1 : s.key[0] === "ipv4_addr" ? 2 : s.key[0] === "ipv6_addr" ? 1 : 5;
        let text = "";
        elements.forEach((e, i) => {
          if (i > 0) text += i % perLine === 0 ? ",\n\t\t\t     " : ", ";
          text += this.#elementText(s, e, true);
        });
        lines.push(`\t\telements = { ${text} }`);
      }
      lines.push("\t}");
      blocks.push(lines.join("\n"));
    }
    for (const c of t.chains.values()) {
      const lines = [`\tchain ${c.name} {`];
      if (c.base !== undefined)
        lines.push(
          `\t\ttype ${c.base.type} hook ${c.base.hook} priority ${priorityText(c.base.priority, c.base.hook)}; policy ${c.base.policy};`,
        );
      for (const r of c.rules)
        lines.push(`\t\t${r.text}${r.comment === undefined ? "" : ` comment "${r.comment}"`}`);
      lines.push("\t}");
      blocks.push(lines.join("\n"));
    }
    return `table ${t.family} ${t.name} {\n${blocks.map((b) => `${b}\n`).join("\n")}}\n`;
  }

  /** Canonical text: tables, sets and chains by name, elements sorted, rules in order. */
  dump(): string[] {
    const out: string[] = [];
    const byName = <T extends { name: string }>(list: Iterable<T>) =>
      [...list].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const tables = [...this.#tables].sort((a, b) =>
      `${a.family} ${a.name}` < `${b.family} ${b.name}` ? -1 : 1,
    );
    for (const t of tables) {
      const at = `nft ${t.family} ${t.name}`;
      out.push(`nft table ${t.family} ${t.name}`);
      for (const s of byName(t.sets.values())) {
        const kind = s.value === undefined ? "set" : "map";
        out.push(
          `${at} ${kind} ${s.name} type ${s.key.join(" . ")}${s.value === undefined ? "" : ` : ${s.value}`}${s.interval ? " flags interval" : ""}${s.counter ? " counter" : ""}`,
        );
        out.push(
          ...[...s.elements.values()]
            .map((e) => `${at} ${kind} ${s.name} element ${this.#elementText(s, e, false)}`)
            .sort(),
        );
      }
      for (const c of byName(t.chains.values())) {
        out.push(
          `${at} chain ${c.name}${c.base === undefined ? "" : ` type ${c.base.type} hook ${c.base.hook} priority ${c.base.priority} policy ${c.base.policy}`}`,
        );
        for (const r of c.rules)
          out.push(
            `${at} chain ${c.name} rule ${r.text}${r.comment === undefined ? "" : ` comment "${r.comment}"`}`,
          );
      }
    }
    return out;
  }
}

// ================================================================================================
// The host

/** Commands that change the kernel (for assertions like "this sync ran no write command"). */
export function isWriteCommand(argv: readonly string[]): boolean {
  const [tool = "", ...args] = argv;
  if (/-save$/.test(tool)) return false;
  if (/-restore$/.test(tool)) return true;
  if (tool === "ipset") return args[0] !== "save" && args[0] !== "list";
  if (tool === "ip" || tool === "bridge") return !args.some((a) => a === "show" || a === "list");
  if (tool === "sysctl") return args.includes("-w");
  if (tool === "nft") return args.find((a) => !a.startsWith("-")) !== "list";
  return true;
}

export class FakeKernel implements Runner {
  /** Every command run through `run()`, with its stdin, in order. */
  readonly calls: RecordedCall[] = [];
  readonly #faults: { readonly prefix: readonly string[]; readonly result: RunResult }[] = [];
  readonly #sysctls = new Sysctls();
  readonly #ipsets = new Ipsets();
  readonly #xtables = new Xtables(this.#ipsets);
  readonly #nft = new Nftables(() => this.#xtables.tableNames());
  readonly #net = new Net(this.#sysctls);

  /** A host with only `lo` (up), the default ip rules and no iptables tables, like a new netns. */
  constructor() {
    this.#ipsets.references = (name) => this.#xtables.setReferences(name) > 0;
  }

  async run(argv: readonly string[], options?: RunOptions): Promise<RunResult> {
    this.calls.push({ argv: [...argv], stdin: options?.stdin });
    const fault = this.#faults.findIndex((f) => f.prefix.every((p, i) => argv[i] === p));
    if (fault >= 0) return this.#faults.splice(fault, 1)[0]!.result;
    return this.#execute(argv, options?.stdin ?? "", false);
  }

  /**
   * Runs a command to set up foreign state: not logged in `calls`, throws on failure, and keeps
   * iptables rules and ipsets the fake does not model verbatim (they are someone else's).
   */
  seed(argv: readonly string[], stdin = ""): void {
    const r = this.#execute(argv, stdin, true);
    if (r.code !== 0)
      throw new Error(
        `Cannot seed the fake kernel with ${argv.join(" ")}: exit ${r.code}: ${r.stderr.trim()}`,
      );
  }

  /** Lets `ms` pass on the fake's clock: address lifetimes run out (see Net). */
  advance(ms: number): void {
    this.#net.advance(ms);
  }

  /** The next command whose argv starts with `prefix` returns `result` and changes nothing. */
  failNext(
    prefix: readonly string[],
    result: Partial<RunResult> & { readonly code: number },
  ): void {
    this.#faults.push({ prefix, result: { stdout: "", stderr: "", ...result } });
  }

  /** The whole model as canonical text, one self-describing line per object, sorted per kind. */
  dump(): string {
    return `${[...this.#xtables.dump(), ...this.#nft.dump(), ...this.#ipsets.dump(), ...this.#net.dump(), ...this.#sysctls.dump()].join("\n")}\n`;
  }

  #execute(argv: readonly string[], stdin: string, seeding: boolean): RunResult {
    try {
      return { code: 0, stdout: this.#dispatch(argv, stdin, seeding), stderr: "" };
    } catch (e) {
      if (e instanceof ToolFailure) return { code: e.code, stdout: e.stdout, stderr: e.stderr };
      if (e instanceof IpError)
        return { code: e.exit ?? (e.kernel ? 2 : 1), stdout: "", stderr: `${e.message}\n` };
      throw e;
    }
  }

  #dispatch(argv: readonly string[], stdin: string, seeding: boolean): string {
    const [tool = "", ...args] = argv;
    // On this machine `iptables-save` and `iptables-restore` are the nft variants (alternatives).
    const xt = /^(ip6?tables)(-nft|-legacy)?-(save|restore)$/.exec(tool);
    if (xt !== null) {
      const family: Family = xt[1] === "iptables" ? 4 : 6;
      if (xt[2] === "-legacy") {
        if (xt[3] === "save") return "";
        throw unmodeled("the legacy iptables backend");
      }
      if (xt[3] === "save") return this.#xtables.save(family, args);
      this.#xtables.restore(family, args, stdin, seeding);
      return "";
    }
    switch (tool) {
      case "ipset":
        if (args[0] === "save") return this.#ipsets.save(args.slice(1));
        if (args[0] === "list") return this.#ipsets.list(args.slice(1));
        if (args[0] === "restore") {
          this.#ipsets.restore(args.slice(1), stdin, seeding);
          return "";
        }
        this.#ipsets.single(args, seeding);
        return "";
      case "ip":
        return this.#ip(args, stdin);
      case "bridge":
        if (args.length === 2 && args[0] === "-batch" && args[1] === "-") {
          this.#net.bridge(stdin);
          return "";
        }
        if (
          args.length === 5 &&
          args[0] === "-json" &&
          args[1] === "fdb" &&
          args[2] === "show" &&
          args[3] === "dev"
        )
          return this.#net.fdbJson(args[4]!);
        throw unmodeled(`bridge ${args.join(" ")}`);
      case "sysctl":
        return this.#sysctls.run(args);
      case "nft":
        return this.#nft.run(args, stdin, seeding);
      case "conntrack":
        // No connections are tracked here: a delete finds none, and says so as conntrack does.
        if (args[0] === "-D")
          throw new ToolFailure(
            1,
            "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n",
          );
        throw unmodeled(`conntrack ${args.join(" ")}`);
      default:
        throw new ToolFailure(
          127,
          `FakeKernel does not model the program ${tool}: it runs iptables, ipset, nft, ip, bridge, sysctl and conntrack -D\n`,
          true,
        );
    }
  }

  #ip(args: readonly string[], stdin: string): string {
    let family: Family | undefined;
    let json = false;
    let force = false;
    let i = 0;
    for (; i < args.length; i++) {
      const a = args[i]!;
      if (a === "-4" || a === "-6") family = a === "-4" ? 4 : 6;
      else if (a === "-json" || a === "-j") json = true;
      else if (a === "-details" || a === "-d") continue;
      else if (a === "-force") force = true;
      else if (a === "-batch") {
        if (args[i + 1] !== "-" || i + 2 !== args.length) throw unmodeled(`ip ${args.join(" ")}`);
        this.#net.batch(family, stdin, force);
        return "";
      } else break;
    }
    const rest = args.slice(i);
    const words = rest.join(" ");
    if (json) {
      if (/^(addr|address) show$/.test(words)) return this.#net.addressesJson();
      if (words === "rule show" && family !== undefined) return this.#net.rulesJson(family);
      if (words === "route show table all" && family !== undefined)
        return this.#net.routesJson(family);
      const neigh = /^neigh show dev (\S+)$/.exec(words);
      if (neigh !== null && family === undefined) return this.#net.neighboursJson(neigh[1]!);
      throw unmodeled(`ip ${args.join(" ")}`);
    }
    this.#net.command(family, rest);
    return "";
  }
}
