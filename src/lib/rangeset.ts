/**
 * Sets of addresses as sorted, disjoint, inclusive ranges per family: union, subtraction,
 * intersection tests and conversion back to the fewest CIDRs. Used to aggregate the cluster's
 * ignore set and to decide whether two policies' destinations overlap.
 */
import { type Cidr, cidrToRange, type Family, formatCidr, type Range, rangeToCidrs } from "./ip.ts";

export class RangeSet {
  readonly #ranges: Map<Family, Range[]> = new Map();

  static of(cidrs: Iterable<Cidr>): RangeSet {
    const set = new RangeSet();
    for (const c of cidrs) set.add(cidrToRange(c));
    return set;
  }

  add(range: Range): void {
    const list = [...(this.#ranges.get(range.family) ?? []), range].sort((a, b) =>
      a.first < b.first ? -1 : a.first > b.first ? 1 : 0,
    );
    const merged: Range[] = [];
    for (const r of list) {
      const last = merged[merged.length - 1];
      if (last !== undefined && r.first <= last.last + 1n) {
        if (r.last > last.last) merged[merged.length - 1] = { ...last, last: r.last };
      } else {
        merged.push(r);
      }
    }
    this.#ranges.set(range.family, merged);
  }

  subtract(range: Range): void {
    const list = this.#ranges.get(range.family);
    if (list === undefined) return;
    const out: Range[] = [];
    for (const r of list) {
      if (r.last < range.first || r.first > range.last) {
        out.push(r);
        continue;
      }
      if (r.first < range.first) out.push({ ...r, last: range.first - 1n });
      if (r.last > range.last) out.push({ ...r, first: range.last + 1n });
    }
    this.#ranges.set(range.family, out);
  }

  ranges(family: Family): readonly Range[] {
    return this.#ranges.get(family) ?? [];
  }

  isEmpty(family?: Family): boolean {
    if (family !== undefined) return this.ranges(family).length === 0;
    for (const list of this.#ranges.values()) if (list.length > 0) return false;
    return true;
  }

  intersects(other: RangeSet): boolean {
    for (const [family, mine] of this.#ranges) {
      const theirs = other.ranges(family);
      let i = 0;
      let j = 0;
      while (i < mine.length && j < theirs.length) {
        const a = mine[i]!;
        const b = theirs[j]!;
        if (a.first <= b.last && b.first <= a.last) return true;
        if (a.last < b.last) i++;
        else j++;
      }
    }
    return false;
  }

  /** The fewest canonical CIDRs covering exactly this set, IPv4 first. */
  toCidrs(family?: Family): string[] {
    const families: Family[] = family === undefined ? [4, 6] : [family];
    return families.flatMap((f) => this.ranges(f).flatMap((r) => rangeToCidrs(r).map(formatCidr)));
  }
}
