/**
 * TABLE_NUM: the routing table that carries the route toward one peer on one host, chosen exactly
 * as the seed defines it: the user sets a start `s` (default 3000) and a count `n` (default 100,
 * also the maximum number of gateway peers); the range is [s, s+n]; pick a random start in the
 * range, then walk circularly to the first table not used on this host; fail with a clear error
 * when none is free. Tables this host already assigned (found again in the kernel after a
 * restart) are kept.
 */
export interface TableRange {
  /** @default 3000 */
  readonly start: number;
  /** @default 100 */
  readonly count: number;
}

export const DEFAULT_TABLE_RANGE: TableRange = { start: 3000, count: 100 };

export class TableRangeFullError extends Error {
  override readonly name = "TableRangeFullError";
}

export interface TableChoice {
  readonly tables: ReadonlyMap<string, number>;
  readonly errors: readonly string[];
}

/**
 * Assigns a table to each key (a peer) in `keys`.
 *
 * @param used tables in use on the host that are not ours (any route or rule refers to them)
 * @param existing tables this host already gave to keys (kept when still in range and not used)
 * @param random uniform in [0, 1): injected so that tests are deterministic
 */
export function assignTables(
  keys: readonly string[],
  options: {
    readonly range?: TableRange;
    readonly used: ReadonlySet<number>;
    readonly existing: ReadonlyMap<string, number>;
    readonly random: () => number;
  },
): TableChoice {
  const range = options.range ?? DEFAULT_TABLE_RANGE;
  const size = range.count + 1;
  const taken = new Set(options.used);
  const tables = new Map<string, number>();
  const errors: string[] = [];
  const sorted = [...new Set(keys)].sort();
  for (const key of sorted) {
    const prior = options.existing.get(key);
    if (
      prior !== undefined &&
      prior >= range.start &&
      prior <= range.start + range.count &&
      !taken.has(prior)
    ) {
      tables.set(key, prior);
      taken.add(prior);
    }
  }
  for (const key of sorted) {
    if (tables.has(key)) continue;
    const offset = Math.min(size - 1, Math.floor(options.random() * size));
    let chosen: number | undefined;
    for (let i = 0; i < size; i++) {
      const candidate = range.start + ((offset + i) % size);
      if (!taken.has(candidate)) {
        chosen = candidate;
        break;
      }
    }
    if (chosen === undefined) {
      errors.push(
        `Cannot choose a routing table for ${key}: every table in [${range.start}, ${range.start + range.count}] is in use on this host; raise the table count or free a table`,
      );
      continue;
    }
    tables.set(key, chosen);
    taken.add(chosen);
  }
  return { tables, errors };
}
