/**
 * ipsets ↔ `ipset restore` / `ipset save` text.
 *
 * One `ipset restore` process carries any number of changes (upstream spawns one `ipset add`
 * per member). Small changes are sent as add/del lines; a large change builds a temporary set
 * and swaps it in, which is atomic for the rules that reference the set.
 */

import { isOwnedSet } from "../engine/names.ts";
import type { IpSetPlan } from "../engine/plan.ts";
import { canonicalCidr, type Family, hostCidr, parseAddress } from "../lib/ip.ts";

/** Sets hold at most this many members; memory is not reserved up front. */
export const MAXELEM = 1048576;

export interface SavedSet {
  readonly name: string;
  readonly type: string;
  readonly family: Family | undefined;
  readonly members: Set<string>;
  readonly nomatch: Set<string>;
  /** When the set came from a plan: its sorted lists, for an O(n) comparison without lookups. */
  readonly planned?: Pick<IpSetPlan, "members" | "nomatch">;
}

function sameList(a: readonly string[], b: readonly string[]): boolean {
  if (a === b) return true;
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/**
 * ipset save prints host entries without a prefix; we always write and compare with one. IPv4 is
 * printed in canonical dotted-quad form already (this parse runs on 100,000 members per resync);
 * IPv6 is canonicalized.
 */
function canonicalMember(text: string): string {
  if (!text.includes(":")) return text.includes("/") ? text : `${text}/32`;
  return text.includes("/") ? canonicalCidr(text) : hostCidr(parseAddress(text));
}

export function parseIpsetSave(text: string): Map<string, SavedSet> {
  const sets = new Map<string, SavedSet>();
  let start = 0;
  while (start < text.length) {
    let end = text.indexOf("\n", start);
    if (end < 0) end = text.length;
    const line = text.slice(start, end);
    start = end + 1;
    if (line.startsWith("add ")) {
      const nameEnd = line.indexOf(" ", 4);
      const set = sets.get(line.slice(4, nameEnd));
      if (set === undefined) continue;
      const memberEnd = line.indexOf(" ", nameEnd + 1);
      const raw = memberEnd < 0 ? line.slice(nameEnd + 1) : line.slice(nameEnd + 1, memberEnd);
      const member = set.type === "hash:net" ? canonicalMember(raw) : raw;
      if (memberEnd >= 0 && line.includes(" nomatch", memberEnd)) set.nomatch.add(member);
      else set.members.add(member);
    } else if (line.startsWith("create ")) {
      const words = line.split(" ");
      const familyAt = words.indexOf("family");
      const fam = familyAt >= 0 ? words[familyAt + 1] : undefined;
      sets.set(words[1]!, {
        name: words[1]!,
        type: words[2] ?? "",
        family: fam === "inet" ? 4 : fam === "inet6" ? 6 : undefined,
        members: new Set(),
        nomatch: new Set(),
      });
    }
  }
  return sets;
}

/** A set as `ipset list -t` describes it: no members, their number. */
export interface ListedSet {
  readonly name: string;
  readonly type: string;
  readonly family: Family | undefined;
  readonly entries: number;
}

/** Parses `ipset list -t` (terse: each set's header, no members). */
export function parseIpsetTerse(text: string): Map<string, ListedSet> {
  const sets = new Map<string, ListedSet>();
  for (const block of text.split(/\n(?=Name: )/)) {
    const field = (key: string) => new RegExp(`^${key}: (.*)$`, "m").exec(block)?.[1];
    const name = field("Name");
    if (name === undefined) continue;
    const family = /\bfamily (inet6?)\b/.exec(field("Header") ?? "")?.[1];
    sets.set(name, {
      name,
      type: field("Type") ?? "",
      family: family === "inet" ? 4 : family === "inet6" ? 6 : undefined,
      entries: Number(field("Number of entries") ?? Number.NaN),
    });
  }
  return sets;
}

function createLine(name: string, family: Family): string {
  return `create ${name} hash:net family ${family === 4 ? "inet" : "inet6"} hashsize 1024 maxelem ${MAXELEM}`;
}

function addLines(name: string, plan: Pick<IpSetPlan, "members" | "nomatch">): string[] {
  return [
    ...plan.members.map((m) => `add ${name} ${m}`),
    ...plan.nomatch.map((m) => `add ${name} ${m} nomatch`),
  ];
}

export interface IpsetDiff {
  /** Lines for `ipset restore` that create or update sets; run before iptables. */
  readonly update: string;
  /** Lines that destroy sets no longer desired; run after iptables stopped referencing them. */
  readonly destroy: string;
  readonly members: { readonly added: number; readonly removed: number };
  readonly swapped: readonly string[];
}

/**
 * The restore input that makes our sets equal to `desired`. Sets not ours are never named.
 * A set whose type or family is wrong, or whose change is larger than `swapThreshold` of its
 * size, is rebuilt in `<name>-tmp` and swapped in.
 */
export function diffIpsets(
  desired: readonly IpSetPlan[],
  actual: ReadonlyMap<string, SavedSet>,
  options?: {
    swapThreshold?: number;
    full?: boolean;
    /** `desired` is only the sets that changed: leave the others (destroy nothing stale). */
    onlyThese?: boolean;
  },
): IpsetDiff {
  const threshold = options?.swapThreshold ?? 0.5;
  const update: string[] = [];
  const destroy: string[] = [];
  const swapped: string[] = [];
  let added = 0;
  let removed = 0;
  const wanted = new Set<string>();
  for (const plan of desired) {
    wanted.add(plan.name);
    const have = actual.get(plan.name);
    if (have === undefined) {
      update.push(createLine(plan.name, plan.family), ...addLines(plan.name, plan));
      added += plan.members.length + plan.nomatch.length;
      continue;
    }
    if (
      options?.full !== true &&
      have.planned !== undefined &&
      have.family === plan.family &&
      sameList(have.planned.members, plan.members) &&
      sameList(have.planned.nomatch, plan.nomatch)
    ) {
      continue;
    }
    const toAdd: string[] = [];
    const toAddNomatch: string[] = [];
    const toDel: string[] = [];
    const wantMembers = new Set(plan.members);
    const wantNomatch = new Set(plan.nomatch);
    for (const m of plan.members) if (!have.members.has(m)) toAdd.push(m);
    for (const m of plan.nomatch) if (!have.nomatch.has(m)) toAddNomatch.push(m);
    for (const m of have.members) if (!wantMembers.has(m)) toDel.push(m);
    for (const m of have.nomatch) if (!wantNomatch.has(m)) toDel.push(m);
    const changes = toAdd.length + toAddNomatch.length + toDel.length;
    const wrongKind = have.type !== "hash:net" || have.family !== plan.family;
    if (!wrongKind && changes === 0 && options?.full !== true) continue;
    if (wrongKind) {
      // Only interference makes a set with our name of another type; swap needs equal types, so
      // recreate it. The kernel refuses while a rule references it, and the sync reports that.
      update.push(
        `destroy ${plan.name}`,
        createLine(plan.name, plan.family),
        ...addLines(plan.name, plan),
      );
      swapped.push(plan.name);
      added += plan.members.length + plan.nomatch.length;
      continue;
    }
    const size = Math.max(1, have.members.size + have.nomatch.size);
    if (options?.full === true || changes / size > threshold) {
      const tmp = `${plan.name.slice(0, 27)}-tmp`;
      update.push(
        createLine(tmp, plan.family),
        `flush ${tmp}`,
        ...addLines(tmp, plan),
        `swap ${tmp} ${plan.name}`,
        `destroy ${tmp}`,
      );
      swapped.push(plan.name);
      added += toAdd.length + toAddNomatch.length;
      removed += toDel.length;
      continue;
    }
    // Deleting before adding keeps a member that moves between normal and nomatch correct.
    for (const m of toDel) update.push(`del ${plan.name} ${m}`);
    for (const m of toAdd) update.push(`add ${plan.name} ${m}`);
    for (const m of toAddNomatch) update.push(`add ${plan.name} ${m} nomatch`);
    added += toAdd.length + toAddNomatch.length;
    removed += toDel.length;
  }
  if (options?.onlyThese !== true) {
    for (const name of actual.keys()) {
      if (isOwnedSet(name) && !wanted.has(name)) destroy.push(`destroy ${name}`);
    }
  }
  return {
    update: update.length === 0 ? "" : `${update.join("\n")}\n`,
    destroy: destroy.length === 0 ? "" : `${destroy.join("\n")}\n`,
    members: { added, removed },
    swapped,
  };
}

/** The restore input that creates all sets from nothing (golden files, first sync). */
export function renderIpsets(desired: readonly IpSetPlan[]): string {
  return diffIpsets(desired, new Map()).update;
}
