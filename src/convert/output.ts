/**
 * The bookkeeping shared by the converters: findings (warnings and errors) named after the source
 * object and the field, and the Sallyport objects written so far.
 */
import {
  API_VERSION,
  type ClusterEgressPolicy,
  type EgressGateway,
  type EgressPolicy,
  type LabelSelectorSpec,
  type ObjectMeta,
} from "../api/types.ts";
import type { UpstreamSelector } from "./upstream.ts";

export type SallyportObject = EgressGateway | EgressPolicy | ClusterEgressPolicy;

/**
 * - `no equivalent`: Sallyport has nothing like this field; it is dropped (or kept in a form that
 *   matches nothing, and the message says so).
 * - `approximated`: mapped to something close whose behaviour differs as the message says.
 * - `skipped`: a whole document that `convert` does not read.
 */
export type WarningKind = "no equivalent" | "approximated" | "skipped";

export interface ConversionWarning {
  /** The source object, e.g. `CiliumEgressGatewayPolicy/egress-sample`. */
  readonly source: string;
  /** Field path in the source object, e.g. `spec.egressGateway.egressIP`. */
  readonly field: string;
  readonly kind: WarningKind;
  readonly message: string;
}

export interface ConversionError {
  readonly source: string;
  readonly field: string;
  readonly message: string;
}

/** Annotation naming the object a Sallyport object was converted from. */
export const CONVERTED_FROM = "sallyport.dev/converted-from";

export class Findings {
  readonly source: string;
  readonly #warnings: ConversionWarning[];
  readonly #errors: ConversionError[];
  #failed = false;

  constructor(source: string, warnings: ConversionWarning[], errors: ConversionError[]) {
    this.source = source;
    this.#warnings = warnings;
    this.#errors = errors;
  }

  warn(field: string, kind: WarningKind, message: string): void {
    this.#warnings.push({ source: this.source, field, kind, message });
  }

  fail(field: string, message: string): void {
    this.#failed = true;
    this.#errors.push({ source: this.source, field, message });
  }

  get failed(): boolean {
    return this.#failed;
  }
}

export class Output {
  readonly gateways = new Map<string, EgressGateway>();
  readonly policies: (EgressPolicy | ClusterEgressPolicy)[] = [];
  /** Which source each written object came from, to charge validation errors to it. */
  readonly findingsOf = new Map<SallyportObject, Findings>();
  readonly #policyNames = new Set<string>();

  addGateway(gateway: EgressGateway, f: Findings): void {
    this.gateways.set(gateway.metadata.name ?? "", gateway);
    this.findingsOf.set(gateway, f);
  }

  addPolicy(policy: EgressPolicy | ClusterEgressPolicy, f: Findings): void {
    this.policies.push(policy);
    this.findingsOf.set(policy, f);
  }

  /** `base`, or `base-2`, `base-3`… when an object of that kind and namespace already has it. */
  uniquePolicyName(kind: string, namespace: string | undefined, base: string): string {
    let name = base;
    for (let i = 2; this.#policyNames.has(`${kind}/${namespace ?? ""}/${name}`); i++)
      name = `${base}-${i}`;
    this.#policyNames.add(`${kind}/${namespace ?? ""}/${name}`);
    return name;
  }

  uniqueGatewayName(base: string): string {
    let name = base;
    for (let i = 2; this.gateways.has(name); i++) name = `${base}-${i}`;
    return name;
  }

  objects(): SallyportObject[] {
    return [...this.gateways.values(), ...this.policies];
  }
}

/** Metadata of a converted object: its name, the source's labels, and where it came from. */
export function convertedMeta(
  f: Findings,
  name: string,
  options: { namespace?: string | undefined; labels?: Record<string, string> | undefined } = {},
): ObjectMeta {
  return {
    name,
    ...(options.namespace === undefined ? {} : { namespace: options.namespace }),
    ...(options.labels === undefined || Object.keys(options.labels).length === 0
      ? {}
      : { labels: { ...options.labels } }),
    annotations: { [CONVERTED_FROM]: f.source },
  };
}

export function policyObject(
  kind: "EgressPolicy",
  metadata: ObjectMeta,
  spec: EgressPolicy["spec"],
): EgressPolicy;
export function policyObject(
  kind: "ClusterEgressPolicy",
  metadata: ObjectMeta,
  spec: ClusterEgressPolicy["spec"],
): ClusterEgressPolicy;
export function policyObject(
  kind: "EgressPolicy" | "ClusterEgressPolicy",
  metadata: ObjectMeta,
  spec: EgressPolicy["spec"] | ClusterEgressPolicy["spec"],
): EgressPolicy | ClusterEgressPolicy {
  return { apiVersion: API_VERSION, kind, metadata, spec } as EgressPolicy | ClusterEgressPolicy;
}

export function gatewayObject(metadata: ObjectMeta, spec: EgressGateway["spec"]): EgressGateway {
  return { apiVersion: API_VERSION, kind: "EgressGateway", metadata, spec };
}

// ---------------------------------------------------------------------------------------------
// Label selectors

export function isEmptySelector(s: UpstreamSelector | LabelSelectorSpec | undefined): boolean {
  return Object.keys(s?.matchLabels ?? {}).length === 0 && (s?.matchExpressions ?? []).length === 0;
}

/** A copy in Sallyport's shape: only the parts that are set. */
export function copySelector(s: UpstreamSelector | undefined): LabelSelectorSpec {
  const out: LabelSelectorSpec = {};
  if (Object.keys(s?.matchLabels ?? {}).length > 0) out.matchLabels = { ...s!.matchLabels };
  if ((s?.matchExpressions ?? []).length > 0)
    out.matchExpressions = s!.matchExpressions!.map((r) => ({
      key: r.key,
      operator: r.operator,
      ...(r.values === undefined || r.values.length === 0 ? {} : { values: [...r.values] }),
    }));
  return out;
}

/** Both selectors at once (AND). A key with two different values matches nothing, as it should. */
export function andSelectors(a: LabelSelectorSpec, b: LabelSelectorSpec): LabelSelectorSpec {
  const labels: Record<string, string> = { ...a.matchLabels };
  const expressions = [...(a.matchExpressions ?? [])];
  for (const [k, v] of Object.entries(b.matchLabels ?? {})) {
    if (labels[k] === undefined) labels[k] = v;
    else if (labels[k] !== v) expressions.push({ key: k, operator: "In", values: [v] });
  }
  expressions.push(...(b.matchExpressions ?? []));
  return {
    ...(Object.keys(labels).length > 0 ? { matchLabels: labels } : {}),
    ...(expressions.length > 0 ? { matchExpressions: expressions } : {}),
  };
}

/** A stable text for a selector, to recognise equal ones. */
export function selectorKey(s: LabelSelectorSpec): string {
  const labels = Object.entries(s.matchLabels ?? {}).sort(([a], [b]) => (a < b ? -1 : 1));
  const expressions = (s.matchExpressions ?? [])
    .map((r) => JSON.stringify([r.key, r.operator, [...(r.values ?? [])].sort()]))
    .sort();
  return JSON.stringify([labels, expressions]);
}
