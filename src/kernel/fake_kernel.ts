/**
 * A fake Linux host below `Datapath`, in the spirit of kubernetes-sigs/knftables' fake.go: a
 * `Runner` that answers the exact commands the datapath runs from an in-memory model of one host
 * (iptables chains and rules per family and table, ipsets, links, addresses, ip rules, routes,
 * neighbours, the VXLAN FDB, sysctls).
 *
 * - It applies exactly the text the datapath sends and parses only the forms our renderers emit;
 *   anything else is answered with exit 2 and "FakeKernel does not model …", never silently.
 * - It rejects what the kernel rejects, with the real tools' exit codes and messages.
 * - It prints state back as the real tools print it, so `Datapath.read()` round-trips. Rules are
 *   stored in the form iptables-save prints them (its own canonicalisation, not the renderer's),
 *   so a renderer that writes a form the kernel prints differently shows up as a diff.
 *
 * Every behaviour below was checked in throwaway network namespaces on Linux 6.18 with
 * iptables v1.8.9 (nf_tables), ipset v7.17 (protocol 7), iproute2 6.1.0 and procps-ng sysctl 4.0.2;
 * each section says what it models and what it leaves out.
 *
 * Tests seed foreign state with `seed(argv, stdin)`: the same tool syntax, not logged in `calls`,
 * and iptables rules or ipsets the fake cannot parse (a CNI's MASQUERADE rule, a kube-proxy
 * hash:ip,port set) are kept verbatim as someone else's. `failNext()` injects a failure;
 * `dump()` prints the whole model as canonical text for equality assertions.
 */
import {
  bits,
  type Cidr,
  type Family,
  formatAddress,
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
//   failed: …", exit 1); a chain name over 28 characters; input ending without COMMIT.
// - save: tables in the fixed order nft-save prints them (mangle, security, raw, filter, nat),
//   every built-in chain of an existing table, user chains sorted by name, rules as iptables-save
//   canonicalises them: hex marks without leading zeros, a match mask of 0xffffffff omitted,
//   --set-xmark always with its mask, conntrack states in kernel order, comments quoted by
//   xtables_save_string (bare when only [A-Za-z0-9_-], else quoted with `"`, `\` and `'` escaped).
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
      if (w === "-i" || w === "--in-interface") {
        const name = arg(w);
        if (name.length > 15)
          throw errors.parameter(
            line,
            `interface name \`${name}' must be shorter than IFNAMSIZ (15)`,
          );
        iface = [...bang(invert), "-i", name];
      } else if (w === "-p" || w === "--protocol") {
        const p = arg(w).toLowerCase();
        if (p !== "tcp" && p !== "udp" && p !== "sctp") throw unmodeled(`the protocol ${p}`);
        protocol = p;
        proto = [...bang(invert), "-p", p];
      } else if (w === "-m" || w === "--match") {
        const module = arg(w);
        const out: string[] = ["-m", module];
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
        } else if (name === "MARK" || name === "CONNMARK") {
          only("--set-xmark");
          const [v, m] = mark("--set-xmark", arg("--set-xmark"));
          targetWords = ["-j", name, "--set-xmark", `${hex(v)}/${hex(m ?? 0xffffffff)}`];
        } else if (name === "SNAT") {
          only("--to-source");
          const text = arg("--to-source");
          const a = tryParseAddress(text);
          if (a === undefined || a.family !== ctx.family)
            throw errors.parameter(line, `Bad IP address "${text}"`);
          // The nat targets' checkentry: only valid in the nat table.
          if (ctx.table !== "nat") invalid = true;
          targetWords = ["-j", "SNAT", "--to-source", formatAddress(a)];
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
    const text = [...iface, ...proto, ...matches, ...targetWords].join(" ");
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
// Not modeled: types other than hash:net and hash:ip (seeded sets of other types keep their
// members verbatim), timeouts, counters, comments, hash growth, `ipset list`.

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

  save(args: readonly string[]): string {
    const sets = this.#slots.filter((s): s is IpSet => s !== undefined);
    let list = sets;
    if (args.length === 1) {
      list = sets.filter((s) => s.name === args[0]);
      if (list.length === 0)
        throw new ToolFailure(1, "ipset v7.17: The set with the given name does not exist\n");
    } else if (args.length > 1) throw unmodeled(`ipset save ${args.join(" ")}`);
    const out: string[] = [];
    for (const s of list) {
      out.push(
        `create ${s.name} ${s.type} family ${familyName(s.family)} hashsize ${s.hashsize} maxelem ${s.maxelem}${s.options} bucketsize 12 initval 0x${s.initval.toString(16).padStart(8, "0")}`,
      );
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
//   characters, of a second VXLAN with the same VNI and port, on a missing parent; VXLAN MTU at
//   most the parent's minus 50 (IPv4 underlay) or 70 (IPv6), macvlan at most the parent's
//   ("RTNETLINK answers: Invalid argument"). A device going down loses its routes (all tables),
//   its neighbours (permanent ones too) and its IPv6 addresses (keep_addr_on_down=0); its IPv4
//   addresses and VXLAN FDB entries stay. Deleting a device deletes its macvlan and VXLAN children.
// - addresses: add of an existing one, del of a missing one, on a missing device; deleting an IPv4
//   primary deletes its secondaries (promote_secondaries=0).
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

  batch(family: Family | undefined, stdin: string): void {
    const lines = stdin.split("\n");
    for (let i = 0; i < lines.length; i++) {
      const words = splitWords(lines[i]!);
      if (words.length === 0 || words[0]!.startsWith("#")) continue;
      try {
        this.command(family, words);
      } catch (e) {
        if (!(e instanceof IpError)) throw e;
        if (e.exit !== undefined) throw new ToolFailure(e.exit, `${e.message}\n`);
        throw new ToolFailure(1, `${e.message}\nCommand failed -:${i + 1}\n`);
      }
    }
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
    if (up === true) link.up = true;
    if (up === false && link.up) {
      link.up = false;
      this.#wentDown(link);
    }
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
        else throw ipUnmodeled(`the vxlan option ${w}`);
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
        vxlan: { vni, port, local, learning },
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
      [...this.links.values()].some((o) => o.vxlan?.vni === x.vni && o.vxlan.port === x.port)
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
    for (let i = 1; i < words.length; i++) {
      if (words[i] === "dev") dev = words[++i];
      else if (words[i] === "nodad") nodad = true;
      else throw ipUnmodeled(`ip address ${verb} … ${words[i]}`);
    }
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
        return;
      }
      link.addresses.push({
        family: a.family,
        address,
        value: a.value,
        prefix: cidr.prefix,
        nodad,
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
      this.#sysctls.device(6, link.name, "disable_ipv6") === "1"
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
        const addrInfo: Record<string, unknown>[] = [
          ...[...primaries, ...secondaries].map((a) => ({
            family: "inet",
            local: a.address,
            prefixlen: a.prefix,
            scope: a.address.startsWith("127.") ? "host" : "global",
            ...(secondaries.includes(a) ? { secondary: true } : {}),
            label: l.name,
            ...life,
          })),
          ...v6.map((a) => ({
            family: "inet6",
            local: a.address,
            prefixlen: a.prefix,
            scope: a.address === "::1" ? "host" : "global",
            ...(a.nodad ? { nodad: true } : {}),
            ...life,
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
          ? `vxlan id ${l.vxlan!.vni} dstport ${l.vxlan!.port} local ${l.vxlan!.local} dev ${l.parent}${l.vxlan!.learning ? "" : " nolearning"}`
          : l.kind === "macvlan"
            ? `macvlan mode ${l.macvlanMode} link ${l.parent}`
            : l.kind;
      out.push(`link ${l.name} ${kind} mtu ${l.mtu} address ${l.mac} ${l.up ? "up" : "down"}`);
      for (const a of [...l.addresses].sort(
        (x, y) =>
          x.family - y.family ||
          (x.value < y.value ? -1 : x.value > y.value ? 1 : x.prefix - y.prefix),
      ))
        out.push(`link ${l.name} addr ${a.address}/${a.prefix}${a.nodad ? " nodad" : ""}`);
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
// The host

/** Commands that change the kernel (for assertions like "this sync ran no write command"). */
export function isWriteCommand(argv: readonly string[]): boolean {
  const [tool = "", ...args] = argv;
  if (/-save$/.test(tool)) return false;
  if (/-restore$/.test(tool)) return true;
  if (tool === "ipset") return args[0] !== "save" && args[0] !== "list";
  if (tool === "ip" || tool === "bridge") return !args.some((a) => a === "show" || a === "list");
  if (tool === "sysctl") return args.includes("-w");
  return true;
}

export class FakeKernel implements Runner {
  /** Every command run through `run()`, with its stdin, in order. */
  readonly calls: RecordedCall[] = [];
  readonly #faults: { readonly prefix: readonly string[]; readonly result: RunResult }[] = [];
  readonly #sysctls = new Sysctls();
  readonly #ipsets = new Ipsets();
  readonly #xtables = new Xtables(this.#ipsets);
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

  /** The next command whose argv starts with `prefix` returns `result` and changes nothing. */
  failNext(
    prefix: readonly string[],
    result: Partial<RunResult> & { readonly code: number },
  ): void {
    this.#faults.push({ prefix, result: { stdout: "", stderr: "", ...result } });
  }

  /** The whole model as canonical text, one self-describing line per object, sorted per kind. */
  dump(): string {
    return `${[...this.#xtables.dump(), ...this.#ipsets.dump(), ...this.#net.dump(), ...this.#sysctls.dump()].join("\n")}\n`;
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
      default:
        throw new ToolFailure(
          127,
          `FakeKernel does not model the program ${tool}: it runs iptables, ipset, ip, bridge and sysctl\n`,
          true,
        );
    }
  }

  #ip(args: readonly string[], stdin: string): string {
    let family: Family | undefined;
    let json = false;
    let i = 0;
    for (; i < args.length; i++) {
      const a = args[i]!;
      if (a === "-4" || a === "-6") family = a === "-4" ? 4 : 6;
      else if (a === "-json" || a === "-j") json = true;
      else if (a === "-details" || a === "-d") continue;
      else if (a === "-batch") {
        if (args[i + 1] !== "-" || i + 2 !== args.length) throw unmodeled(`ip ${args.join(" ")}`);
        this.#net.batch(family, stdin);
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
