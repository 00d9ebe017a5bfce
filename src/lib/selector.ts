/**
 * Kubernetes label selectors (matchLabels + matchExpressions), compiled once into a matcher.
 *
 * Semantics follow apimachinery: requirements are ANDed; an empty selector matches everything;
 * `NotIn` and `DoesNotExist` match objects that lack the key.
 */
export type Labels = Readonly<Record<string, string>>;

export type SelectorOperator = "In" | "NotIn" | "Exists" | "DoesNotExist";

export interface SelectorRequirement {
  readonly key: string;
  readonly operator: SelectorOperator;
  readonly values?: readonly string[];
}

export interface LabelSelector {
  readonly matchLabels?: Labels;
  readonly matchExpressions?: readonly SelectorRequirement[];
}

export interface CompiledSelector {
  matches(labels: Labels | undefined): boolean;
  /** True for `{}`: every object matches. */
  readonly matchesAll: boolean;
  /**
   * Requirements of the form key ∈ {values}, usable to look candidates up in an index before the
   * full match. Empty when the selector has none (then candidates must be scanned).
   */
  readonly equalities: readonly { readonly key: string; readonly values: readonly string[] }[];
}

const EMPTY: Labels = {};

function requirementCheck(req: SelectorRequirement): (l: Labels) => boolean {
  const values = new Set(req.values ?? []);
  const { key } = req;
  if (req.operator === "In") return (l) => Object.hasOwn(l, key) && values.has(l[key]!);
  if (req.operator === "NotIn") return (l) => !Object.hasOwn(l, key) || !values.has(l[key]!);
  if (req.operator === "Exists") return (l) => Object.hasOwn(l, key);
  return (l) => !Object.hasOwn(l, key);
}

export function compileSelector(selector: LabelSelector | undefined): CompiledSelector {
  const reqs: SelectorRequirement[] = [];
  for (const [key, value] of Object.entries(selector?.matchLabels ?? {})) {
    reqs.push({ key, operator: "In", values: [value] });
  }
  for (const req of selector?.matchExpressions ?? []) reqs.push(req);
  const checks = reqs.map(requirementCheck);
  const equalities = reqs
    .filter((r) => r.operator === "In")
    .map((r) => ({ key: r.key, values: [...(r.values ?? [])] }));
  return {
    matchesAll: checks.length === 0,
    equalities,
    matches(labels) {
      const l = labels ?? EMPTY;
      for (const check of checks) if (!check(l)) return false;
      return true;
    },
  };
}

/** Renders a selector the way kubectl does ("app=web,tier in (a,b)"), for messages. */
export function formatSelector(selector: LabelSelector | undefined): string {
  const parts: string[] = [];
  for (const [k, v] of Object.entries(selector?.matchLabels ?? {})) parts.push(`${k}=${v}`);
  for (const r of selector?.matchExpressions ?? []) {
    if (r.operator === "Exists") parts.push(r.key);
    else if (r.operator === "DoesNotExist") parts.push(`!${r.key}`);
    else
      parts.push(
        `${r.key} ${r.operator === "In" ? "in" : "notin"} (${(r.values ?? []).join(",")})`,
      );
  }
  return parts.length === 0 ? "<all>" : parts.join(",");
}

/** Same keys and values (label maps from two versions of an object are never the same object). */
export function sameLabels(a: Labels | undefined, b: Labels | undefined): boolean {
  const ka = Object.keys(a ?? {});
  if (ka.length !== Object.keys(b ?? {}).length) return false;
  return ka.every((k) => a?.[k] === b?.[k]);
}
