/**
 * Egress IP allocation from gateway pools.
 *
 *  - An explicit `egressIP` (one or several addresses per family) must lie in the pool of the
 *    policy's gateway; policies naming the same address share it. An explicit claim on an address
 *    a pool policy holds waits until that policy lets it go (`EgressIPInUse`): an address in use
 *    never moves because of a newcomer.
 *  - A pool policy wants `count` addresses (spec.egressIPCount) of each family it steers that the
 *    pool has. It keeps the addresses it held (the engine's last outcome, or the statuses a new
 *    leader reads back) while they stay in its pool and of a family it steers, up to `count` per
 *    family, the lowest first; when two claim the same address, the older policy keeps it. Then
 *    policies missing addresses get the lowest free ones of each family, oldest policy first.
 *  - A policy that got some of its addresses but not all is allocated what it got (`short` says
 *    what is missing) and waits for the rest: the next address freed in its pool goes to it.
 *  - An empty result is `PoolExhausted` or `NoPoolForFamily`, never an exception.
 *
 * `AddressAllocator` does this incrementally: `set()` records a policy's request and `run()`
 * redoes only those requests, plus the waiting ones of pools where an address came free. Pools
 * are range lists, never expanded; a cursor per pool remembers below which address everything is
 * taken, so finding the lowest free address does not rescan the pool.
 */
import { parsePool } from "../api/validate.ts";
import {
  type Address,
  type Family,
  formatAddress,
  normalizeAddressList,
  type Range,
  rangeSize,
  tryParseAddress,
} from "../lib/ip.ts";
import { getOrInsert } from "../lib/maps.ts";

export interface Pool {
  /** In the order of the gateway's spec.pool: the lowest free address is the first in it. */
  readonly ranges: readonly Range[];
  /** spec.pool as written, for messages. */
  readonly text: readonly string[];
}

export function parseGatewayPool(pool: readonly string[] | undefined): Pool {
  return { ranges: parsePool(pool).ranges.map((r) => r.range), text: pool ?? [] };
}

export function inPool(pool: Pool, a: Address): boolean {
  return pool.ranges.some((r) => r.family === a.family && r.first <= a.value && a.value <= r.last);
}

export function poolSize(pool: Pool, family: Family): bigint {
  let size = 0n;
  for (const r of pool.ranges) if (r.family === family) size += rangeSize(r);
  return size;
}

export interface AddressRequest {
  readonly key: string;
  readonly createdAt: string;
  readonly gateway: string;
  readonly pool: Pool;
  /** Explicit addresses (canonical, with the text written); undefined for a pool policy. */
  readonly explicit: readonly { readonly text: string; readonly address: string }[] | undefined;
  /** Families the policy steers: a pool policy gets `count` addresses of each the pool has. */
  readonly families: readonly Family[];
  /** Pool addresses wanted per family. */
  readonly count: number;
}

/** A family of which a pool policy got fewer addresses than it wants. */
export interface Shortfall {
  readonly family: Family;
  readonly got: number;
  readonly wanted: number;
  /** `IPv4 6/6 in use`: the pool's size in that family. */
  readonly usage: string;
}

export type Allocation =
  | {
      readonly ok: true;
      /** IPv4 first, each family in address order. */
      readonly addresses: readonly string[];
      readonly short?: readonly Shortfall[];
    }
  | { readonly ok: false; readonly reason: string; readonly message: string };

function sameRequest(a: AddressRequest, b: AddressRequest): boolean {
  return (
    a.key === b.key &&
    a.createdAt === b.createdAt &&
    a.gateway === b.gateway &&
    a.pool === b.pool &&
    (a.explicit === b.explicit ||
      (a.explicit !== undefined &&
        b.explicit !== undefined &&
        a.explicit.length === b.explicit.length &&
        a.explicit.every((e, i) => e.text === b.explicit![i]!.text))) &&
    a.families.length === b.families.length &&
    a.families.every((f, i) => f === b.families[i]) &&
    a.count === b.count
  );
}

function sameAllocation(a: Allocation | undefined, b: Allocation | undefined): boolean {
  if (a === undefined || b === undefined) return a === b;
  if (a.ok !== b.ok) return false;
  if (a.ok && b.ok) {
    const sa = a.short ?? [];
    const sb = b.short ?? [];
    return (
      a.addresses.length === b.addresses.length &&
      a.addresses.every((x, i) => x === b.addresses[i]) &&
      sa.length === sb.length &&
      sa.every(
        (x, i) => x.family === sb[i]!.family && x.got === sb[i]!.got && x.usage === sb[i]!.usage,
      )
    );
  }
  return !a.ok && !b.ok && a.reason === b.reason && a.message === b.message;
}

/** The family of an address in canonical text (what the allocator holds). */
function familyOf(canonical: string): Family {
  return canonical.includes(":") ? 6 : 4;
}

function byAge(a: AddressRequest, b: AddressRequest): number {
  if (a.createdAt !== b.createdAt) return a.createdAt < b.createdAt ? -1 : 1;
  return a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
}

/**
 * The lowest free address of one family of one pool. Everything before the mark is taken; taking
 * never moves it back, and a release moves it back to the released address.
 */
class Cursor {
  readonly pool: Pool;
  readonly #ranges: Range[];
  readonly #family: Family;
  #range = 0;
  #value: bigint | undefined;

  constructor(pool: Pool, family: Family) {
    this.pool = pool;
    this.#ranges = pool.ranges.filter((r) => r.family === family);
    this.#family = family;
  }

  next(taken: (address: string) => boolean): string | undefined {
    while (this.#range < this.#ranges.length) {
      const r = this.#ranges[this.#range]!;
      let v = this.#value ?? r.first;
      while (v <= r.last) {
        const text = formatAddress({ family: this.#family, value: v });
        v++;
        if (!taken(text)) {
          this.#value = v - 1n;
          return text;
        }
      }
      this.#range++;
      this.#value = undefined;
    }
    return undefined;
  }

  /** @returns whether the address lies in this pool */
  release(a: Address): boolean {
    if (a.family !== this.#family) return false;
    const i = this.#ranges.findIndex((r) => r.first <= a.value && a.value <= r.last);
    if (i < 0) return false;
    if (
      i < this.#range ||
      (i === this.#range && (this.#value ?? this.#ranges[i]!.first) > a.value)
    ) {
      this.#range = i;
      this.#value = a.value;
    }
    return true;
  }
}

export class AddressAllocator {
  readonly #requests = new Map<string, AddressRequest>();
  readonly #results = new Map<string, Allocation>();
  /** address → explicit policies naming it (that passed the pool check) */
  readonly #claims = new Map<string, Set<string>>();
  readonly #claimed = new Map<string, readonly string[]>();
  /** address → the pool policy holding it */
  readonly #holder = new Map<string, string>();
  readonly #held = new Map<string, string[]>();
  /** gateway → pool policies still missing an address of some family */
  readonly #waiting = new Map<string, Set<string>>();
  /** `${gateway}/${family}` */
  readonly #cursors = new Map<string, Cursor>();
  readonly #dirty = new Set<string>();

  /** Records what a policy asks for; undefined when it asks for nothing (any more). */
  set(key: string, request: AddressRequest | undefined): void {
    const current = this.#requests.get(key);
    if (
      current === undefined
        ? request === undefined
        : request !== undefined && sameRequest(current, request)
    )
      return;
    if (request === undefined) this.#requests.delete(key);
    else this.#requests.set(key, request);
    this.#dirty.add(key);
  }

  get(key: string): Allocation | undefined {
    return this.#results.get(key);
  }

  /**
   * Allocates for the requests set since the last run.
   * @param last the addresses each policy had in the last outcome
   * @returns the policies whose allocation changed
   */
  run(last: (key: string) => readonly string[] | undefined): Set<string> {
    const changed = new Set<string>();
    if (this.#dirty.size === 0) return changed;
    const before = new Map<string, Allocation | undefined>();
    const remember = (key: string) => {
      if (!before.has(key)) before.set(key, this.#results.get(key));
    };
    const touched = new Set<string>();

    // 1. Let go of everything the changed requests held.
    for (const key of this.#dirty) {
      remember(key);
      this.#results.delete(key);
      for (const a of this.#claimed.get(key) ?? []) {
        const owners = this.#claims.get(a)!;
        owners.delete(key);
        if (owners.size === 0) this.#claims.delete(a);
        touched.add(a);
      }
      this.#claimed.delete(key);
      for (const a of this.#held.get(key) ?? []) {
        this.#holder.delete(a);
        touched.add(a);
      }
      this.#held.delete(key);
      // The request may have moved to another gateway: look in all (there are few).
      for (const set of this.#waiting.values()) set.delete(key);
    }

    // 2. Explicit claims, and what pool policies held before, oldest first.
    const requests = [...this.#dirty]
      .map((k) => this.#requests.get(k))
      .filter((r) => r !== undefined)
      .sort(byAge);
    const explicit: string[] = [];
    const needAddresses = new Set<string>();
    for (const r of requests) {
      if (r.explicit !== undefined) {
        const bad = r.explicit.find((e) => !inPool(r.pool, tryParseAddress(e.address)!));
        if (bad !== undefined) {
          this.#results.set(r.key, {
            ok: false,
            reason: "EgressIPNotInPool",
            message: `${bad.text} is not in the pool of EgressGateway ${r.gateway} (${r.pool.text.join(", ") || "empty"}): pick an address from the pool or add it there`,
          });
          continue;
        }
        const list = r.explicit.map((e) => e.address);
        for (const a of list) {
          getOrInsert(this.#claims, a, () => new Set()).add(r.key);
          touched.add(a);
        }
        this.#claimed.set(r.key, list);
        explicit.push(r.key);
        continue;
      }
      const kept: string[] = [];
      // The lowest `count` of each family (the last outcome lists them in address order).
      const before = normalizeAddressList(
        (last(r.key) ?? []).filter((t) => tryParseAddress(t) !== undefined),
      );
      for (const canonical of before) {
        const a = tryParseAddress(canonical)!;
        if (!r.families.includes(a.family) || !inPool(r.pool, a)) continue;
        if (kept.filter((k) => familyOf(k) === a.family).length >= r.count) continue;
        const holder = this.#holder.get(canonical);
        if (holder !== undefined) {
          // Only a policy that changed in the same step as an older claimant can hold it.
          if (byAge(this.#requests.get(holder)!, r) < 0) continue;
          const theirs = this.#held.get(holder)!;
          theirs.splice(theirs.indexOf(canonical), 1);
          remember(holder);
          needAddresses.add(holder);
        }
        kept.push(canonical);
        this.#holder.set(canonical, r.key);
        touched.add(canonical);
      }
      this.#held.set(r.key, kept);
      needAddresses.add(r.key);
    }

    // 3. Explicit claims on an address a pool policy holds wait for it.
    for (const a of touched) for (const key of this.#claims.get(a) ?? []) explicit.push(key);
    for (const key of explicit) {
      remember(key);
      const list = this.#claimed.get(key)!;
      const held = list.find((a) => this.#holder.has(a));
      this.#results.set(
        key,
        held === undefined
          ? { ok: true, addresses: normalizeAddressList(list) }
          : {
              ok: false,
              reason: "EgressIPInUse",
              message: `${held} is already allocated to ${this.#holder.get(held)} from the pool; pick another address or delete that policy`,
            },
      );
    }

    // 4. Addresses that came free let the policies waiting in those pools try again. Asked of
    // each waiting policy's own pool, not of the gateway's cursor: while a gateway's pool is
    // being edited its policies may carry the old pool and the new one, and the cursor serves
    // whichever asked last (an address freed in the other pool was never offered).
    const taken = (a: string) => this.#claims.has(a) || this.#holder.has(a);
    for (const text of touched) {
      if (taken(text)) continue;
      const a = tryParseAddress(text)!;
      for (const cursor of this.#cursors.values()) cursor.release(a);
      for (const waiting of this.#waiting.values())
        for (const key of waiting) {
          const r = this.#requests.get(key);
          if (r === undefined || !inPool(r.pool, a)) continue;
          remember(key);
          needAddresses.add(key);
        }
    }

    // 5. New addresses, oldest policy first.
    const pending: AddressRequest[] = [];
    for (const key of needAddresses) {
      const r = this.#requests.get(key);
      if (r !== undefined && r.explicit === undefined) pending.push(r);
    }
    pending.sort(byAge);
    for (const r of pending) {
      const list = this.#held.get(r.key)!;
      const wanted = r.families.filter((f) => r.pool.ranges.some((x) => x.family === f));
      const short: Shortfall[] = [];
      for (const family of wanted) {
        let got = list.filter((a) => familyOf(a) === family).length;
        while (got < r.count) {
          const free = this.#cursor(r.gateway, r.pool, family).next(taken);
          if (free === undefined) break;
          this.#holder.set(free, r.key);
          list.push(free);
          got++;
        }
        if (got < r.count) short.push({ family, got, wanted: r.count, usage: usageOf(r, family) });
      }
      const waiting = getOrInsert(this.#waiting, r.gateway, () => new Set());
      if (short.length > 0) waiting.add(r.key);
      else waiting.delete(r.key);
      const addresses = normalizeAddressList(list);
      this.#results.set(
        r.key,
        list.length === 0
          ? exhausted(r, wanted)
          : short.length === 0
            ? { ok: true, addresses }
            : { ok: true, addresses, short },
      );
    }

    for (const [key, old] of before) {
      if (!sameAllocation(old, this.#results.get(key))) changed.add(key);
    }
    this.#dirty.clear();
    return changed;
  }

  #cursor(gateway: string, pool: Pool, family: Family): Cursor {
    const id = `${gateway}/${family}`;
    let cursor = this.#cursors.get(id);
    if (cursor === undefined || cursor.pool !== pool) {
      cursor = new Cursor(pool, family);
      this.#cursors.set(id, cursor);
    }
    return cursor;
  }
}

function exhausted(r: AddressRequest, wanted: readonly Family[]): Allocation {
  if (wanted.length === 0) {
    return {
      ok: false,
      reason: "NoPoolForFamily",
      message: `the pool of EgressGateway ${r.gateway} has no address of the families this policy needs (IPv${r.families.join(", IPv")})`,
    };
  }
  // Every family the pool has is exhausted: all of its addresses are in use.
  const usage = r.families.map((f) => usageOf(r, f)).join(", ");
  return {
    ok: false,
    reason: "PoolExhausted",
    message: `Cannot allocate an egress IP for ${r.key}: the pool of EgressGateway ${r.gateway} is exhausted (${usage}); add addresses to the pool or delete unused policies`,
  };
}

/** `IPv4 6/6 in use`: a family of the pool, every address taken. */
function usageOf(r: AddressRequest, family: Family): string {
  const size = poolSize(r.pool, family);
  return `IPv${family} ${size}/${size} in use`;
}
