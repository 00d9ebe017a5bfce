/**
 * Rules ↔ iptables-restore / iptables-save text.
 *
 * `ruleArgs` writes a rule in exactly the form iptables-save prints it (verified against
 * iptables 1.8.9, nft and legacy backends), so the state read back from the kernel compares with
 * the desired state as plain text. `parseRuleArgs` reads that form back into a Rule; it knows only
 * the shapes Sallyport emits and throws on anything else, which is how a rule in one of our
 * chains that we did not write is recognized (and replaced).
 */
import { CHAIN_PREFIX } from "../engine/names.ts";
import {
  CTSTATE_ORDER,
  type CtState,
  type FamilyRules,
  type Hook,
  type MarkMatch,
  type Rule,
  type SetMatch,
  type TableName,
  type Target,
} from "../engine/plan.ts";
import { getOrInsert } from "../lib/maps.ts";

export const TABLES: readonly TableName[] = ["filter", "nat", "mangle"];

/** iptables-save prints marks in hex without leading zeros: 0x26000000/0xff000000, 0x0/0xffff. */
function markHex(value: number): string {
  return `0x${(value >>> 0).toString(16)}`;
}

function markText(m: { value: number; mask: number }): string {
  return `${markHex(m.value)}/${markHex(m.mask)}`;
}

/** iptables-save always quotes comments (xtables_save_string), escaping `"` and `\\`. */
function quote(text: string): string {
  return `"${text.replace(/(["\\])/g, "\\$1")}"`;
}

export function targetArgs(target: Target): string[] {
  switch (target.kind) {
    case "ACCEPT":
    case "DROP":
    case "RETURN":
      return ["-j", target.kind];
    case "JUMP":
      return ["-j", target.chain];
    case "GOTO":
      return ["-g", target.chain];
    case "MARK":
      return ["-j", "MARK", "--set-xmark", markText(target)];
    case "CONNMARK":
      return ["-j", "CONNMARK", "--set-xmark", markText(target)];
    case "RESTORE_MARK":
      return [
        "-j",
        "CONNMARK",
        "--restore-mark",
        "--nfmask",
        markHex(target.nfmask),
        "--ctmask",
        markHex(target.ctmask),
      ];
    case "SNAT":
      return ["-j", "SNAT", "--to-source", target.to];
    case "TCPMSS":
      return ["-j", "TCPMSS", "--clamp-mss-to-pmtu"];
  }
}

const rendered = new WeakMap<Rule, string>();

/** ruleArgs joined, memoized per rule object: a sync renders each planned rule once. */
export function ruleText(rule: Rule): string {
  let text = rendered.get(rule);
  if (text === undefined) {
    text = ruleArgs(rule).join(" ");
    rendered.set(rule, text);
  }
  return text;
}

/** The rule after `-A CHAIN`, in iptables-save's form. */
export function ruleArgs(rule: Rule): string[] {
  const args: string[] = [];
  if (rule.destination !== undefined) args.push("-d", rule.destination);
  if (rule.inInterface !== undefined) args.push("-i", rule.inInterface);
  if (rule.outInterface !== undefined) args.push("-o", rule.outInterface);
  if (rule.protocol !== undefined) args.push("-p", rule.protocol);
  if (rule.icmpv6Type !== undefined)
    args.push("-m", "icmp6", "--icmpv6-type", String(rule.icmpv6Type));
  if (rule.mark !== undefined) {
    args.push("-m", "mark", ...(rule.mark.invert ? ["!"] : []), "--mark", markText(rule.mark));
  }
  if (rule.tcpSyn === true) args.push("-m", "tcp", "--tcp-flags", "SYN,RST", "SYN");
  for (const set of rule.sets ?? []) {
    args.push("-m", "set", ...(set.invert ? ["!"] : []), "--match-set", set.name, set.dir);
  }
  if (rule.ctstate !== undefined) {
    const ordered = CTSTATE_ORDER.filter((s) => rule.ctstate!.includes(s));
    args.push("-m", "conntrack", "--ctstate", ordered.join(","));
  }
  if (rule.ctdir !== undefined) args.push("-m", "conntrack", "--ctdir", rule.ctdir);
  if (rule.connmark !== undefined) {
    args.push(
      "-m",
      "connmark",
      ...(rule.connmark.invert ? ["!"] : []),
      "--mark",
      markText(rule.connmark),
    );
  }
  if (rule.dports !== undefined) args.push("-m", "multiport", "--dports", rule.dports);
  if (rule.statistic !== undefined)
    args.push(
      "-m",
      "statistic",
      "--mode",
      "nth",
      "--every",
      String(rule.statistic.every),
      "--packet",
      String(rule.statistic.packet),
    );
  if (rule.comment !== undefined) args.push("-m", "comment", "--comment", quote(rule.comment));
  args.push(...targetArgs(rule.target));
  return args;
}

export function ruleLine(chain: string, rule: Rule): string {
  return `-A ${chain} ${ruleArgs(rule).join(" ")}`;
}

/** Splits an iptables-save rule line into words, honouring double quotes. */
export function tokenize(line: string): string[] {
  const out: string[] = [];
  let i = 0;
  while (i < line.length) {
    while (line[i] === " ") i++;
    if (i >= line.length) break;
    let word = "";
    if (line[i] === '"') {
      i++;
      while (i < line.length && line[i] !== '"') {
        if (line[i] === "\\" && i + 1 < line.length) i++;
        word += line[i];
        i++;
      }
      i++;
    } else {
      while (i < line.length && line[i] !== " ") word += line[i++];
    }
    out.push(word);
  }
  return out;
}

export class UnknownRuleError extends SyntaxError {
  override readonly name = "UnknownRuleError";
}

function parseMark(text: string | undefined, invert: boolean): MarkMatch {
  const [v, m] = (text ?? "").split("/");
  const value = Number(v);
  const mask = m === undefined ? 0xffffffff : Number(m);
  if (!Number.isFinite(value) || !Number.isFinite(mask))
    throw new UnknownRuleError(`bad mark ${text}`);
  return invert ? { value, mask, invert } : { value, mask };
}

/** Parses the words after `-A CHAIN` back into a Rule; throws UnknownRuleError on other shapes. */
export function parseRuleArgs(words: readonly string[]): Rule {
  let i = 0;
  const next = () => {
    const w = words[i++];
    if (w === undefined) throw new UnknownRuleError("rule ends early");
    return w;
  };
  const rule: {
    -readonly [K in keyof Rule]?: Rule[K];
  } = {};
  const sets: SetMatch[] = [];
  let target: Target | undefined;
  while (i < words.length) {
    const w = next();
    if (w === "-d") rule.destination = next();
    else if (w === "-i") rule.inInterface = next();
    else if (w === "-o") rule.outInterface = next();
    else if (w === "-p") {
      const p = next();
      if (p !== "tcp" && p !== "udp" && p !== "sctp" && p !== "ipv6-icmp")
        throw new UnknownRuleError(`protocol ${p}`);
      rule.protocol = p;
    } else if (w === "-m") {
      const module = next();
      let invert = false;
      let opt = next();
      if (opt === "!") {
        invert = true;
        opt = next();
      }
      if (module === "mark" && opt === "--mark") rule.mark = parseMark(next(), invert);
      else if (module === "connmark" && opt === "--mark") rule.connmark = parseMark(next(), invert);
      else if (module === "icmp6" && opt === "--icmpv6-type") {
        const type = next();
        if (type !== "135" && type !== "136") throw new UnknownRuleError(`icmpv6 type ${type}`);
        rule.icmpv6Type = type === "135" ? 135 : 136;
      } else if (module === "tcp" && opt === "--tcp-flags") {
        if (next() !== "SYN,RST" || next() !== "SYN") throw new UnknownRuleError("tcp flags");
        rule.tcpSyn = true;
      } else if (module === "set" && opt === "--match-set") {
        const name = next();
        const dir = next();
        if (dir !== "src" && dir !== "dst") throw new UnknownRuleError(`set direction ${dir}`);
        sets.push(invert ? { name, dir, invert } : { name, dir });
      } else if (module === "conntrack" && opt === "--ctstate") {
        rule.ctstate = next().split(",") as CtState[];
      } else if (module === "conntrack" && opt === "--ctdir") {
        const d = next();
        if (d !== "ORIGINAL" && d !== "REPLY") throw new UnknownRuleError(`ctdir ${d}`);
        rule.ctdir = d;
      } else if (module === "multiport" && opt === "--dports") rule.dports = next();
      else if (module === "statistic" && opt === "--mode" && !invert) {
        if (next() !== "nth" || next() !== "--every") throw new UnknownRuleError("statistic mode");
        const every = Number(next());
        if (next() !== "--packet") throw new UnknownRuleError("statistic packet");
        const packet = Number(next());
        if (!Number.isInteger(every) || !Number.isInteger(packet))
          throw new UnknownRuleError("statistic numbers");
        rule.statistic = { every, packet };
      } else if (module === "comment" && opt === "--comment") rule.comment = next();
      else throw new UnknownRuleError(`match -m ${module} ${opt}`);
    } else if (w === "-j" || w === "-g") {
      const t = next();
      if (w === "-g") target = { kind: "GOTO", chain: t };
      else if (t === "ACCEPT" || t === "DROP" || t === "RETURN") target = { kind: t };
      else if (t === "CONNMARK" && words[i] === "--restore-mark") {
        next();
        if (next() !== "--nfmask") throw new UnknownRuleError("CONNMARK --restore-mark option");
        const nfmask = Number(next());
        if (next() !== "--ctmask") throw new UnknownRuleError("CONNMARK --restore-mark option");
        const ctmask = Number(next());
        if (!Number.isInteger(nfmask) || !Number.isInteger(ctmask))
          throw new UnknownRuleError("CONNMARK --restore-mark masks");
        target = { kind: "RESTORE_MARK", nfmask, ctmask };
      } else if (t === "MARK" || t === "CONNMARK") {
        if (next() !== "--set-xmark") throw new UnknownRuleError(`${t} option`);
        const m = parseMark(next(), false);
        target = { kind: t, value: m.value, mask: m.mask };
      } else if (t === "SNAT") {
        if (next() !== "--to-source") throw new UnknownRuleError("SNAT option");
        target = { kind: "SNAT", to: next() };
      } else if (t === "TCPMSS") {
        if (next() !== "--clamp-mss-to-pmtu") throw new UnknownRuleError("TCPMSS option");
        target = { kind: "TCPMSS" };
      } else target = { kind: "JUMP", chain: t };
    } else {
      throw new UnknownRuleError(`word ${w}`);
    }
  }
  if (target === undefined) throw new UnknownRuleError("rule without target");
  if (sets.length > 0) rule.sets = sets;
  return { ...rule, target } as Rule;
}

// ------------------------------------------------------------------------------------------------
// iptables-save

export interface SavedChain {
  /** Rule words after `-A CHAIN`, in order, as the kernel holds them. */
  readonly rules: string[];
}

export interface SavedTable {
  /** Every chain of the table (built-in and user), in save order. */
  readonly chains: Map<string, SavedChain>;
}

export type SavedState = Map<TableName, SavedTable>;

/** Parses `iptables-save` output (all tables, or the ones asked for). */
export function parseSave(text: string): SavedState {
  const state: SavedState = new Map();
  let table: SavedTable | undefined;
  for (const raw of text.split("\n")) {
    const line = raw.trimEnd();
    if (line === "" || line.startsWith("#")) continue;
    if (line.startsWith("*")) {
      const name = line.slice(1) as TableName;
      table = { chains: new Map() };
      state.set(name, table);
      continue;
    }
    if (table === undefined || line === "COMMIT") continue;
    if (line.startsWith(":")) {
      const name = line.slice(1).split(" ")[0]!;
      table.chains.set(name, { rules: [] });
      continue;
    }
    if (line.startsWith("-A ")) {
      const rest = line.slice(3);
      const space = rest.indexOf(" ");
      const chain = space < 0 ? rest : rest.slice(0, space);
      const body = space < 0 ? "" : rest.slice(space + 1);
      getOrInsert(table.chains, chain, () => ({ rules: [] })).rules.push(body);
    }
  }
  return state;
}

export function isOwnedChain(name: string): boolean {
  return name.startsWith(CHAIN_PREFIX);
}

/** True for a rule line (after `-A BUILTIN`) that jumps into one of our chains. */
export function isOwnedHook(body: string): boolean {
  const words = tokenize(body);
  const j = words.lastIndexOf("-j");
  const g = words.lastIndexOf("-g");
  const at = Math.max(j, g);
  return at >= 0 && isOwnedChain(words[at + 1] ?? "");
}

// ------------------------------------------------------------------------------------------------
// Desired vs actual → restore payload

export interface RestoreDiff {
  /** iptables-restore --noflush input; empty when nothing differs. */
  readonly payload: string;
  /** Chains rewritten, per table, for logs and metrics. */
  readonly changedChains: readonly string[];
  readonly hookRepairs: number;
  readonly deletedChains: readonly string[];
}

const chainLines = new WeakMap<readonly Rule[], string[]>();
/** A chain's rules as restore lines, once per chain object (the planner keeps unchanged ones). */
function desiredChainLines(rules: readonly Rule[]): string[] {
  let lines = chainLines.get(rules);
  if (lines === undefined) {
    lines = rules.map(ruleText);
    chainLines.set(rules, lines);
  }
  return lines;
}

/**
 * Builds the smallest iptables-restore --noflush payload that turns `actual` into `desired` for
 * the chains and hooks we own, leaving every other rule and chain untouched.
 *
 * - A chain whose rules differ is redeclared (`:NAME - [0:0]` empties it) and refilled: if one
 *   rule changes the kernel needs the whole chain anyway (kubernetes#110268).
 * - Our hooks must be the first rules of their built-in chain, in order. If one is missing,
 *   misplaced or duplicated, all our hooks in that chain are deleted and inserted again at the top.
 * - Chains we own that are no longer desired are flushed and deleted after the hooks are gone.
 */
export function diffRules(
  desired: FamilyRules,
  actual: SavedState,
  options?: { full?: boolean },
): RestoreDiff {
  const sections: string[] = [];
  const changedChains: string[] = [];
  const deletedChains: string[] = [];
  let hookRepairs = 0;
  for (const table of TABLES) {
    const lines: string[] = [];
    const declare: string[] = [];
    const want = desired.chains.get(table) ?? new Map<string, readonly Rule[]>();
    const have = actual.get(table)?.chains ?? new Map<string, SavedChain>();
    for (const [name, rules] of want) {
      const wantLines = desiredChainLines(rules);
      const haveLines = have.get(name)?.rules;
      if (options?.full !== true && haveLines !== undefined && sameLines(wantLines, haveLines))
        continue;
      const edit =
        options?.full === true || haveLines === undefined
          ? undefined
          : chainEdit(name, haveLines, wantLines);
      if (edit !== undefined) lines.push(...edit);
      else {
        declare.push(`:${name} - [0:0]`);
        for (const l of wantLines) lines.push(`-A ${name} ${l}`);
      }
      changedChains.push(`${table}/${name}`);
    }
    // Hooks, per built-in chain.
    const hooks = desired.hooks.filter((h) => h.table === table);
    const builtins = new Set([...hooks.map((h) => h.builtin)]);
    for (const [name, chain] of have)
      if (!isOwnedChain(name) && chain.rules.some(isOwnedHook)) builtins.add(name);
    for (const builtin of builtins) {
      const wanted = hooks
        .filter((h) => h.builtin === builtin)
        .sort((a, b) => a.position - b.position);
      const wantedLines = wanted.map((h) => ruleText(h.rule));
      const current = have.get(builtin)?.rules ?? [];
      const head = current.slice(0, wantedLines.length);
      const ownedCount = current.filter(isOwnedHook).length;
      if (sameLines(head, wantedLines) && ownedCount === wantedLines.length) continue;
      hookRepairs++;
      for (const body of current) if (isOwnedHook(body)) lines.push(`-D ${builtin} ${body}`);
      wantedLines.forEach((l, i) => {
        lines.push(`-I ${builtin} ${i + 1} ${l}`);
      });
    }
    // Stale chains we own: flush first (a rule elsewhere may still jump to them), then delete.
    const stale = [...have.keys()].filter((n) => isOwnedChain(n) && !want.has(n));
    for (const name of stale) {
      declare.push(`:${name} - [0:0]`);
      deletedChains.push(`${table}/${name}`);
    }
    for (const name of stale) lines.push(`-X ${name}`);
    if (declare.length === 0 && lines.length === 0) continue;
    sections.push(`*${table}`, ...declare, ...lines, "COMMIT");
  }
  return {
    payload: sections.length === 0 ? "" : `${sections.join("\n")}\n`,
    changedChains,
    hookRepairs,
    deletedChains,
  };
}

/**
 * The lines that turn chain `name` from `have` into `want` when they differ in one stretch (a
 * policy added, removed or changed): `-D name rule` for each rule that goes and `-I name N rule`
 * for each that comes, instead of declaring the chain again, which makes iptables-nft delete and
 * add every rule of it (1,000 rules for one policy). Undefined when the stretch is over a quarter
 * of the chain: a rewrite is then as cheap.
 *
 * A rule goes by its text, wherever it is (by its position if `have` has it twice); one comes at
 * a position counted in `have`. A partial sync's `have` is what the last sync left: had someone
 * added a rule to our chain since, an insertion lands that many places early, until the next
 * full sync (which reads the chain) puts it back in order along with removing the stranger.
 */
export function chainEdit(
  name: string,
  have: readonly string[],
  want: readonly string[],
): string[] | undefined {
  const common = Math.min(have.length, want.length);
  let head = 0;
  while (head < common && have[head] === want[head]) head++;
  let tail = 0;
  while (tail < common - head && have[have.length - 1 - tail] === want[want.length - 1 - tail])
    tail++;
  const gone = have.length - head - tail;
  const come = want.length - head - tail;
  if ((gone + come) * 4 > want.length) return undefined;
  const out: string[] = [];
  const count = new Map<string, number>();
  for (const line of have) count.set(line, (count.get(line) ?? 0) + 1);
  // A rule written twice in the chain goes by its position: by text, the first one would go.
  for (let i = 0; i < gone; i++) {
    const line = have[head + i]!;
    out.push(count.get(line) === 1 ? `-D ${name} ${line}` : `-D ${name} ${head + 1}`);
  }
  for (let i = 0; i < come; i++) out.push(`-I ${name} ${head + 1 + i} ${want[head + i]}`);
  return out;
}

function sameLines(a: readonly string[], b: readonly string[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Payload that removes every chain and hook we own from `actual` (cleanup). */
export function cleanupRules(actual: SavedState): string {
  return diffRules({ chains: new Map(), hooks: [] }, actual).payload;
}

/** Render desired rules alone (for golden files and the explain command). */
export function renderRules(rules: FamilyRules): string {
  const out: string[] = [];
  for (const table of TABLES) {
    const chains = rules.chains.get(table);
    const hooks: Hook[] = rules.hooks.filter((h) => h.table === table);
    if ((chains === undefined || chains.size === 0) && hooks.length === 0) continue;
    out.push(`*${table}`);
    for (const name of chains?.keys() ?? []) out.push(`:${name} - [0:0]`);
    for (const h of hooks) out.push(`-I ${h.builtin} ${h.position} ${ruleArgs(h.rule).join(" ")}`);
    for (const [name, rules] of chains ?? []) for (const r of rules) out.push(ruleLine(name, r));
    out.push("COMMIT");
  }
  return `${out.join("\n")}\n`;
}
