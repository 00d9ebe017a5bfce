/**
 * EgressEndpointSlices: the pods a policy matches, in chunks, so that agents watch these instead
 * of every Pod in the cluster. Assignment is stable: a pod stays in the slice that holds it, new
 * pods fill the fullest slice with room, and only slices whose content changes are written, so
 * one pod added or removed rewrites one slice.
 */
import type { Endpoint } from "../api/types.ts";
import { hashName } from "../lib/hash.ts";

export const POLICY_LABEL = "sallyport.dev/policy";

/** Label value for a policy key (label values are at most 63 characters). */
export function policyLabel(policyKey: string): string {
  return hashName(policyKey, 20);
}

export interface SliceContent {
  readonly name: string;
  readonly endpoints: readonly Endpoint[];
}

export interface SlicePlan {
  /** Slices to create or update (content differs from what exists). */
  readonly write: readonly SliceContent[];
  readonly delete: readonly string[];
}

/** Typed: the API server returns endpoints with their keys in its own order. */
function sameEndpoints(a: readonly Endpoint[], b: readonly Endpoint[]): boolean {
  return (
    a.length === b.length &&
    a.every((e, i) => {
      const f = b[i]!;
      return (
        e.pod === f.pod &&
        e.node === f.node &&
        e.ips.length === f.ips.length &&
        e.ips.every((ip, j) => ip === f.ips[j])
      );
    })
  );
}

export function planSlices(
  policyKey: string,
  endpoints: readonly Endpoint[],
  existing: readonly SliceContent[],
  maxPerSlice = 100,
): SlicePlan {
  const wanted = new Map(endpoints.map((e) => [e.pod, e]));
  const placed = new Set<string>();
  const slices = [...existing]
    .sort((a, b) => (a.name < b.name ? -1 : 1))
    .map((s) => {
      const kept: Endpoint[] = [];
      for (const e of s.endpoints) {
        const now = wanted.get(e.pod);
        if (now === undefined || placed.has(e.pod) || kept.length >= maxPerSlice) continue;
        kept.push(now);
        placed.add(e.pod);
      }
      return { name: s.name, endpoints: kept, original: s.endpoints };
    });
  const base = policyLabel(policyKey).slice(0, 12);
  const used = new Set(slices.map((s) => s.name));
  let seq = 0;
  const fresh = () => {
    while (used.has(`${base}-${seq}`)) seq++;
    const name = `${base}-${seq}`;
    used.add(name);
    const s = { name, endpoints: [] as Endpoint[], original: [] as readonly Endpoint[] };
    slices.push(s);
    return s;
  };
  for (const e of endpoints) {
    if (placed.has(e.pod)) continue;
    const room = slices
      .filter((s) => s.endpoints.length < maxPerSlice)
      .sort((a, b) => b.endpoints.length - a.endpoints.length)[0];
    (room ?? fresh()).endpoints.push(e);
    placed.add(e.pod);
  }
  const write: SliceContent[] = [];
  const del: string[] = [];
  for (const s of slices) {
    if (s.endpoints.length === 0) {
      if (existing.some((x) => x.name === s.name)) del.push(s.name);
      continue;
    }
    const sorted = [...s.endpoints].sort((a, b) => (a.pod < b.pod ? -1 : 1));
    if (!sameEndpoints(sorted, s.original)) write.push({ name: s.name, endpoints: sorted });
  }
  return { write, delete: del };
}
