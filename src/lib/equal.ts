/**
 * Equality and merge patches for JSON-like data (plain objects, arrays, strings, numbers,
 * booleans, null), as the API server stores it.
 *
 * Why not `JSON.stringify(a) === JSON.stringify(b)`: the API server returns objects with their
 * keys in its own order, not the order we built them in, so text comparison sees a change where
 * there is none and every reconcile rewrites objects that are already right.
 *
 * Both functions treat a property whose value is `undefined` as absent, as `JSON.stringify`
 * does: `{ a: 1, b: undefined }` is `{ a: 1 }`. Inside arrays `undefined` is not `null`.
 *
 * `mergePatch` follows RFC 7386 (JSON Merge Patch, what `PATCH` with
 * `application/merge-patch+json` applies). Its one limit: `null` in a patch means "remove this
 * key", so a desired object can never hold `null` as a member value. Desired values leave such
 * keys out instead; `mergePatch` throws when it meets one. `null` inside arrays is fine (arrays
 * are replaced whole).
 */

type JsonObject = Record<string, unknown>;

function isObject(value: unknown): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** The own value at `key`, never one inherited from `Object.prototype` (`constructor`, …). */
function own(object: JsonObject, key: string): unknown {
  return Object.hasOwn(object, key) ? object[key] : undefined;
}

/** Assigns without ever setting a prototype: `__proto__` is a valid key in JSON and in maps. */
function put(object: JsonObject, key: string, value: unknown): void {
  if (key === "__proto__")
    Object.defineProperty(object, key, {
      value,
      enumerable: true,
      writable: true,
      configurable: true,
    });
  else object[key] = value;
}

/** Whether two sets hold the same members. */
export function sameSet<T>(a: ReadonlySet<T>, b: ReadonlySet<T>): boolean {
  return a.size === b.size && [...a].every((x) => b.has(x));
}

/**
 * Whether `a` and `b` hold the same JSON, whatever the order of their keys. Walks both without
 * allocating (`for…in` instead of `Object.keys`), returning at the first difference.
 */
export function deepEqual(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  const aIsArray = Array.isArray(a);
  if (aIsArray !== Array.isArray(b)) return false;
  if (aIsArray) {
    const bArray = b as unknown[];
    if (a.length !== bArray.length) return false;
    for (let i = 0; i < a.length; i++) if (!deepEqual(a[i], bArray[i])) return false;
    return true;
  }
  const aObject = a as JsonObject;
  const bObject = b as JsonObject;
  let defined = 0;
  for (const key in aObject) {
    if (!Object.hasOwn(aObject, key)) continue;
    const value = aObject[key];
    if (value === undefined) continue;
    defined++;
    if (!deepEqual(value, own(bObject, key))) return false;
  }
  // Each defined member of `a` has an equal one in `b`, so `b` is equal unless it has more.
  for (const key in bObject) {
    if (Object.hasOwn(bObject, key) && bObject[key] !== undefined && --defined < 0) return false;
  }
  return true;
}

/**
 * The RFC 7386 merge patch that turns `current` into `desired`, or `undefined` when they are
 * equal. It recurses into nested objects, so it names only the keys that differ, at any depth;
 * a key gone from `desired` is set to `null` where it was (a label removed from
 * `metadata.labels` is removed on the server too); arrays that differ are replaced whole, as
 * the RFC has no way to patch inside one.
 *
 * `current` may be anything (`undefined` when the object or field does not exist yet);
 * `desired` must be an object without `null` member values (see the top of this file).
 */
export function mergePatch(current: unknown, desired: unknown): JsonObject | undefined {
  if (!isObject(desired))
    throw new TypeError(
      `Cannot compute a merge patch: the desired value is ${kindOf(desired)}; a merge patch ` +
        "describes an object, so pass the object that holds it",
    );
  try {
    return objectPatch(isObject(current) ? current : undefined, desired);
  } catch (e) {
    if (e !== NULL_MEMBER) throw e;
    throw new TypeError(
      `Cannot compute a merge patch: desired${nullPath(desired)} is null, which a merge patch ` +
        'can only say as "remove this key"; leave the key out of the desired value instead',
    );
  }
}

/** Thrown deep inside `objectPatch`; `mergePatch` finds the path only then, so the walk allocates no paths. */
const NULL_MEMBER = Symbol("null member");

function objectPatch(current: JsonObject | undefined, desired: JsonObject): JsonObject | undefined {
  let patch: JsonObject | undefined;
  for (const key in desired) {
    if (!Object.hasOwn(desired, key)) continue;
    const want = desired[key];
    if (want === undefined) continue;
    if (want === null) throw NULL_MEMBER;
    const have = current === undefined ? undefined : own(current, key);
    let change: unknown;
    if (isObject(want)) {
      // A patch object merges into what is there; when that is not an object the RFC starts
      // from `{}`, so the whole desired object goes in (`{}` itself when it is empty).
      change = isObject(have) ? objectPatch(have, want) : (objectPatch(undefined, want) ?? {});
      if (change === undefined) continue;
    } else {
      if (deepEqual(have, want)) continue;
      change = want;
    }
    patch ??= {};
    put(patch, key, change);
  }
  if (current !== undefined) {
    for (const key in current) {
      if (!Object.hasOwn(current, key) || current[key] === undefined) continue;
      if (own(desired, key) !== undefined) continue;
      patch ??= {};
      put(patch, key, null);
    }
  }
  return patch;
}

/** `.a.b` for the first member of `value` that is null, in the order `objectPatch` visits. */
function nullPath(value: JsonObject): string {
  for (const key in value) {
    if (!Object.hasOwn(value, key)) continue;
    const member = value[key];
    const name = /^[A-Za-z_$][\w$]*$/.test(key) ? `.${key}` : `[${JSON.stringify(key)}]`;
    if (member === null) return name;
    if (isObject(member)) {
      const below = nullPath(member);
      if (below !== "") return name + below;
    }
  }
  return "";
}

function kindOf(value: unknown): string {
  if (Array.isArray(value)) return "an array";
  if (value === null) return "null";
  return typeof value === "string" ? `the string ${JSON.stringify(value)}` : String(value);
}

/**
 * RFC 7386's MergePatch(target, patch), without modifying `target`: what the API server makes of
 * `target` when it receives `patch`. For tests and for predicting the server's answer.
 */
export function applyMergePatch(target: unknown, patch: unknown): unknown {
  if (!isObject(patch)) return patch;
  const result: JsonObject = {};
  if (isObject(target))
    for (const key in target) if (Object.hasOwn(target, key)) put(result, key, target[key]);
  for (const key in patch) {
    if (!Object.hasOwn(patch, key)) continue;
    const value = patch[key];
    if (value === null) delete result[key];
    else put(result, key, applyMergePatch(own(result, key), value));
  }
  return result;
}
