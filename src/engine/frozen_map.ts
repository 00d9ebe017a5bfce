/**
 * An immutable map whose next version shares storage with the previous one, so that the engine
 * can hand out a new map of 10,000 policy outcomes without copying 10,000 entries (a copy costs
 * ~1.6 ms, most of what one pod change may cost). Versions keep a large shared base that is never
 * written again and a small map of overrides; when the overrides grow past a fraction of the
 * base, the next version is flattened, so each change costs O(1) amortized.
 *
 * Iteration order: the base's order with overridden values in place, then added keys.
 */

const DELETED: unique symbol = Symbol("deleted");
type Slot<V> = V | typeof DELETED;

export class FrozenMap<K, V> implements ReadonlyMap<K, V> {
  readonly #base: ReadonlyMap<K, V>;
  readonly #delta: ReadonlyMap<K, Slot<V>>;
  readonly size: number;

  private constructor(base: ReadonlyMap<K, V>, delta: ReadonlyMap<K, Slot<V>>, size: number) {
    this.#base = base;
    this.#delta = delta;
    this.size = size;
  }

  static empty<K, V>(): FrozenMap<K, V> {
    return new FrozenMap<K, V>(new Map(), new Map(), 0);
  }

  /** Takes ownership of `map`: the caller must not change it afterwards. */
  static adopt<K, V>(map: Map<K, V>): FrozenMap<K, V> {
    return new FrozenMap<K, V>(map, new Map(), map.size);
  }

  /**
   * A new version with `changes` applied (undefined deletes). Returns this version when nothing
   * changes, so callers can compare versions by reference.
   */
  with(changes: ReadonlyMap<K, V | undefined>): FrozenMap<K, V> {
    let delta: Map<K, Slot<V>> | undefined;
    let size = this.size;
    for (const [key, value] of changes) {
      const had = this.has(key);
      if (value === undefined ? !had : had && this.get(key) === value) continue;
      delta ??= new Map(this.#delta);
      if (value === undefined) {
        size--;
        if (this.#base.has(key)) delta.set(key, DELETED);
        else delta.delete(key);
      } else {
        if (!had) size++;
        delta.set(key, value);
      }
    }
    if (delta === undefined) return this;
    // Flatten once the overrides cost more to copy per version than a rebuild amortized over them.
    if (delta.size > 64 && delta.size * 8 > this.#base.size) {
      // The native copy keeps the base's order; set() on a present key keeps its place.
      const flat = new Map<K, V>(this.#base);
      for (const [k, slot] of delta) {
        if (slot === DELETED) flat.delete(k);
        else flat.set(k, slot);
      }
      return new FrozenMap(flat, new Map(), size);
    }
    return new FrozenMap(this.#base, delta, size);
  }

  get(key: K): V | undefined {
    const slot = this.#delta.get(key);
    if (slot === DELETED) return undefined;
    return slot !== undefined ? slot : this.#base.get(key);
  }

  has(key: K): boolean {
    const slot = this.#delta.get(key);
    if (slot === DELETED) return false;
    return slot !== undefined || this.#base.has(key);
  }

  *entries(): MapIterator<[K, V]> {
    const delta = this.#delta;
    if (delta.size === 0) {
      yield* this.#base.entries();
      return;
    }
    for (const [k, v] of this.#base) {
      const slot = delta.get(k);
      if (slot === undefined) yield [k, v];
      else if (slot !== DELETED) yield [k, slot];
    }
    for (const [k, slot] of delta) {
      if (slot !== DELETED && !this.#base.has(k)) yield [k, slot];
    }
  }

  *keys(): MapIterator<K> {
    for (const [k] of this.entries()) yield k;
  }

  *values(): MapIterator<V> {
    for (const [, v] of this.entries()) yield v;
  }

  [Symbol.iterator](): MapIterator<[K, V]> {
    return this.entries();
  }

  forEach(callback: (value: V, key: K, map: ReadonlyMap<K, V>) => void, thisArg?: unknown): void {
    for (const [k, v] of this.entries()) callback.call(thisArg, v, k, this);
  }
}
