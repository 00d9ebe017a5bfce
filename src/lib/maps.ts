/** The value at `key`, created with `make` and stored first when absent. */
export function getOrInsert<K extends WeakKey, V>(
  map: Map<K, V> | WeakMap<K, V>,
  key: K,
  make: () => V,
): V;
export function getOrInsert<K, V>(map: Map<K, V>, key: K, make: () => V): V;
export function getOrInsert<K, V>(
  map: { get(key: K): V | undefined; set(key: K, value: V): unknown },
  key: K,
  make: () => V,
): V {
  let value = map.get(key);
  if (value === undefined) {
    value = make();
    map.set(key, value);
  }
  return value;
}
