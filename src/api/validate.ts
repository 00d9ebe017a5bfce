/**
 * Validation of Sallyport objects: structure (ajv over the TypeBox schemas) and the cross-field
 * rules that the CRDs also carry as CEL, plus the cross-object rules that only the webhook and
 * the controller can check (an egress IP outside its gateway's pool, pools of two gateways that
 * overlap).
 *
 * Every problem names the field and says what to do, e.g.
 * `spec.pool[1]: 10.0.0.0/4 is too large: IPv4 blocks may be at most /8`.
 */
import { Ajv, type ErrorObject, type ValidateFunction } from "ajv";
import {
  bits,
  cidrsOverlap,
  type Family,
  formatAddress,
  parseAddress,
  parseCidr,
  parsePoolEntry,
  type Range,
  rangeSize,
  rangesOverlap,
  tryParseCidr,
} from "../lib/ip.ts";
import {
  type AnyPolicy,
  type EgressGateway,
  KINDS,
  type KindName,
  type LabelSelectorSpec,
  MAX_EGRESS_IPS_PER_FAMILY,
  MAX_POOL_PREFIX_V4,
  MAX_POOL_PREFIX_V6,
} from "./types.ts";

export interface FieldError {
  /** Dotted path with indexes, e.g. `spec.egressIP[1]`. */
  readonly field: string;
  readonly message: string;
}

export function formatErrors(errors: readonly FieldError[]): string {
  return errors.map((e) => `${e.field}: ${e.message}`).join("; ");
}

const ajv = new Ajv({ allErrors: true, strict: false, useDefaults: false });
ajv.addFormat("date-time", /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/);
for (const keyword of [
  "x-kubernetes-validations",
  "x-kubernetes-list-type",
  "x-kubernetes-list-map-keys",
  "x-kubernetes-preserve-unknown-fields",
]) {
  ajv.addKeyword(keyword);
}

const validators = new Map<string, ValidateFunction>();
function validatorFor(kind: KindName): ValidateFunction {
  let v = validators.get(kind);
  if (v === undefined) {
    v = ajv.compile(KINDS[kind].schema);
    validators.set(kind, v);
  }
  return v;
}

function pathOf(instancePath: string): string {
  return instancePath
    .split("/")
    .slice(1)
    .map((part) =>
      /^\d+$/.test(part) ? `[${part}]` : `.${part.replace(/~1/g, "/").replace(/~0/g, "~")}`,
    )
    .join("")
    .replace(/^\./, "");
}

function ajvMessage(error: ErrorObject): FieldError {
  const base = pathOf(error.instancePath);
  const join = (child: string) => (base === "" ? child : `${base}.${child}`);
  switch (error.keyword) {
    case "additionalProperties": {
      const extra = (error.params as { additionalProperty: string }).additionalProperty;
      return { field: join(extra), message: "unknown field: remove it or check its spelling" };
    }
    case "required": {
      const missing = (error.params as { missingProperty: string }).missingProperty;
      return { field: join(missing), message: "is required" };
    }
    case "const":
      return {
        field: base,
        message: `must be ${JSON.stringify((error.params as { allowedValue: unknown }).allowedValue)}`,
      };
    case "anyOf":
      return { field: base, message: "has a value that is not allowed" };
    default:
      return { field: base || "(root)", message: error.message ?? "is invalid" };
  }
}

/** Structural and same-object validation of any Sallyport object. */
export function validateObject(obj: unknown): FieldError[] {
  if (obj === null || typeof obj !== "object") {
    return [{ field: "(root)", message: "must be an object" }];
  }
  const kind = (obj as { kind?: unknown }).kind;
  if (typeof kind !== "string" || !(kind in KINDS)) {
    return [
      {
        field: "kind",
        message: `must be one of ${Object.keys(KINDS).join(", ")}: current value is ${JSON.stringify(kind)}`,
      },
    ];
  }
  const validate = validatorFor(kind as KindName);
  if (!validate(obj)) {
    // ajv reports every branch of a union; keep the most specific message per field.
    const seen = new Map<string, FieldError>();
    for (const e of validate.errors ?? []) {
      const fe = ajvMessage(e);
      if (!seen.has(fe.field) || e.keyword !== "anyOf") seen.set(fe.field, fe);
    }
    return [...seen.values()];
  }
  switch (kind) {
    case "EgressGateway":
      return validateGatewaySpec(obj as EgressGateway);
    case "EgressPolicy":
    case "ClusterEgressPolicy":
      return validatePolicySpec(obj as AnyPolicy);
    case "EgressClusterInfo":
      return validateCidrList(
        (obj as { spec: { extraCIDRs?: string[] } }).spec.extraCIDRs,
        "spec.extraCIDRs",
      );
    default:
      return [];
  }
}

function validateSelector(selector: LabelSelectorSpec | undefined, field: string): FieldError[] {
  const errors: FieldError[] = [];
  (selector?.matchExpressions ?? []).forEach((req, i) => {
    const hasValues = (req.values?.length ?? 0) > 0;
    if ((req.operator === "In" || req.operator === "NotIn") && !hasValues) {
      errors.push({
        field: `${field}.matchExpressions[${i}].values`,
        message: `operator ${req.operator} needs at least one value`,
      });
    }
    if ((req.operator === "Exists" || req.operator === "DoesNotExist") && hasValues) {
      errors.push({
        field: `${field}.matchExpressions[${i}].values`,
        message: `operator ${req.operator} takes no values: remove them`,
      });
    }
  });
  return errors;
}

function validateCidrList(list: readonly string[] | undefined, field: string): FieldError[] {
  const errors: FieldError[] = [];
  (list ?? []).forEach((text, i) => {
    try {
      parseCidr(text);
      if (!text.includes("/")) throw new SyntaxError("missing prefix length");
    } catch {
      errors.push({
        field: `${field}[${i}]`,
        message: `"${text}" is not a CIDR: write it as 10.0.0.0/8 or fd00::/64`,
      });
    }
  });
  return errors;
}

/** Parses pool entries, reporting bad or oversized ones; returns the good ranges with their index. */
export function parsePool(
  pool: readonly string[] | undefined,
  field = "spec.pool",
): { ranges: { index: number; range: Range }[]; errors: FieldError[] } {
  const ranges: { index: number; range: Range }[] = [];
  const errors: FieldError[] = [];
  (pool ?? []).forEach((text, index) => {
    let range: Range;
    try {
      range = parsePoolEntry(text);
    } catch (e) {
      errors.push({
        field: `${field}[${index}]`,
        message: `"${text}" is not an address, a CIDR or a range first-last of one family (${(e as Error).message})`,
      });
      return;
    }
    const limitPrefix = range.family === 4 ? MAX_POOL_PREFIX_V4 : MAX_POOL_PREFIX_V6;
    const limit = 1n << BigInt(bits(range.family) - limitPrefix);
    if (rangeSize(range) > limit) {
      errors.push({
        field: `${field}[${index}]`,
        message: `${text} is too large: IPv${range.family} blocks may be at most /${limitPrefix} (${limit} addresses)`,
      });
      return;
    }
    ranges.push({ index, range });
  });
  for (let i = 0; i < ranges.length; i++) {
    for (let j = i + 1; j < ranges.length; j++) {
      if (rangesOverlap(ranges[i]!.range, ranges[j]!.range)) {
        errors.push({
          field: `${field}[${ranges[j]!.index}]`,
          message: `overlaps ${field}[${ranges[i]!.index}]: list each address once`,
        });
      }
    }
  }
  return { ranges, errors };
}

function validateGatewaySpec(gw: EgressGateway): FieldError[] {
  const errors: FieldError[] = [];
  const sel = gw.spec.nodeSelector;
  if (
    Object.keys(sel.matchLabels ?? {}).length === 0 &&
    (sel.matchExpressions ?? []).length === 0
  ) {
    errors.push({
      field: "spec.nodeSelector",
      message:
        "must name the gateway nodes (matchLabels or matchExpressions): an empty selector would make every node a gateway",
    });
  }
  errors.push(...validateSelector(sel, "spec.nodeSelector"));
  errors.push(...validateSelector(gw.spec.namespaceSelector, "spec.namespaceSelector"));
  errors.push(...parsePool(gw.spec.pool).errors);
  return errors;
}

function validatePolicySpec(policy: AnyPolicy): FieldError[] {
  const spec = policy.spec;
  const errors: FieldError[] = [];
  errors.push(...validateSelector(spec.podSelector, "spec.podSelector"));
  errors.push(...validateSelector(spec.nodeSelector, "spec.nodeSelector"));
  if ("namespaceSelector" in spec) {
    errors.push(...validateSelector(spec.namespaceSelector, "spec.namespaceSelector"));
  }
  errors.push(...validateCidrList(spec.destinationCIDRs, "spec.destinationCIDRs"));
  errors.push(...validateCidrList(spec.excludedCIDRs, "spec.excludedCIDRs"));

  if (spec.egressIP !== undefined && spec.interface !== undefined) {
    errors.push({
      field: "spec.egressIP",
      message:
        "egressIP and interface cannot be set together: keep egressIP to use a pool address, or interface to use that interface's address",
    });
  }
  if (spec.useNodeIP === true && (spec.egressIP !== undefined || spec.interface !== undefined)) {
    errors.push({
      field: "spec.useNodeIP",
      message: "useNodeIP cannot be combined with egressIP or interface",
    });
  }
  if (spec.egressIPCount !== undefined) {
    if (
      !Number.isInteger(spec.egressIPCount) ||
      spec.egressIPCount < 1 ||
      spec.egressIPCount > MAX_EGRESS_IPS_PER_FAMILY
    ) {
      errors.push({
        field: "spec.egressIPCount",
        message: `must be between 1 and ${MAX_EGRESS_IPS_PER_FAMILY}: the number of pool addresses per family`,
      });
    }
    if (spec.egressIP !== undefined || spec.interface !== undefined || spec.useNodeIP === true) {
      errors.push({
        field: "spec.egressIPCount",
        message:
          "egressIPCount sets how many pool addresses to allocate: remove it, or remove egressIP, interface and useNodeIP to take addresses from the pool",
      });
    }
  }
  const families = new Map<Family, number>();
  const seen = new Map<string, number>();
  (spec.egressIP ?? []).forEach((text, i) => {
    try {
      const a = parseAddress(text);
      const canonical = formatAddress(a);
      const first = seen.get(canonical);
      if (first !== undefined) {
        errors.push({
          field: `spec.egressIP[${i}]`,
          message: `${canonical} is listed twice (also spec.egressIP[${first}]): list each address once`,
        });
        return;
      }
      seen.set(canonical, i);
      const n = (families.get(a.family) ?? 0) + 1;
      if (n === MAX_EGRESS_IPS_PER_FAMILY + 1) {
        errors.push({
          field: `spec.egressIP[${i}]`,
          message: `egressIP may hold at most ${MAX_EGRESS_IPS_PER_FAMILY} IPv${a.family} addresses: ${canonical} is one too many`,
        });
      }
      families.set(a.family, n);
    } catch {
      errors.push({ field: `spec.egressIP[${i}]`, message: `"${text}" is not an IP address` });
    }
  });
  const destinations = (spec.destinationCIDRs ?? []).flatMap((t) => {
    try {
      return [parseCidr(t)];
    } catch {
      return [];
    }
  });
  if (spec.egressIP !== undefined && families.size > 0) {
    spec.destinationCIDRs?.forEach((text, i) => {
      const d = tryParseCidr(text);
      if (d !== undefined && !families.has(d.family)) {
        errors.push({
          field: `spec.destinationCIDRs[${i}]`,
          message: `${text} is IPv${d.family} but egressIP has no IPv${d.family} address: add one or drop this destination`,
        });
      }
    });
  }
  if (destinations.length > 0) {
    spec.excludedCIDRs?.forEach((text, i) => {
      let excluded: ReturnType<typeof parseCidr>;
      try {
        excluded = parseCidr(text);
      } catch {
        return;
      }
      if (!destinations.some((d) => cidrsOverlap(d, excluded))) {
        errors.push({
          field: `spec.excludedCIDRs[${i}]`,
          message: `${text} lies outside every destinationCIDR, so it would exclude nothing: remove it or fix the destination`,
        });
      }
    });
  }
  (spec.ports ?? []).forEach((p, i) => {
    if (p.endPort !== undefined && p.port === undefined) {
      errors.push({ field: `spec.ports[${i}].endPort`, message: "endPort needs port" });
    } else if (p.endPort !== undefined && p.port !== undefined && p.endPort < p.port) {
      errors.push({ field: `spec.ports[${i}].endPort`, message: `must be >= port (${p.port})` });
    }
  });
  return errors;
}

/**
 * Cross-object rule for a gateway: its pool must not overlap another gateway's, or two nodes
 * could answer for the same address.
 */
export function validateGatewayAgainstOthers(
  gateway: EgressGateway,
  others: readonly EgressGateway[],
): FieldError[] {
  const mine = parsePool(gateway.spec.pool).ranges;
  const errors: FieldError[] = [];
  for (const other of others) {
    if (other.metadata.name === gateway.metadata.name) continue;
    const theirs = parsePool(other.spec.pool).ranges;
    for (const m of mine) {
      const clash = theirs.find((t) => rangesOverlap(m.range, t.range));
      if (clash !== undefined) {
        errors.push({
          field: `spec.pool[${m.index}]`,
          message: `overlaps pool entry "${other.spec.pool?.[clash.index]}" of EgressGateway ${other.metadata.name}: give each gateway its own addresses`,
        });
      }
    }
  }
  return errors;
}

/** Cross-object rule for a policy: explicit egress IPs must come from its gateway's pool. */
export function validatePolicyAgainstGateway(
  policy: AnyPolicy,
  gateway: EgressGateway | undefined,
): FieldError[] {
  if (gateway === undefined || policy.spec.egressIP === undefined) return [];
  const pool = parsePool(gateway.spec.pool).ranges.map((r) => r.range);
  const errors: FieldError[] = [];
  policy.spec.egressIP.forEach((text, i) => {
    let a: ReturnType<typeof parseAddress>;
    try {
      a = parseAddress(text);
    } catch {
      return;
    }
    if (!pool.some((r) => r.family === a.family && r.first <= a.value && a.value <= r.last)) {
      errors.push({
        field: `spec.egressIP[${i}]`,
        message: `${text} is not in the pool of EgressGateway ${gateway.metadata.name} (${(gateway.spec.pool ?? []).join(", ") || "empty"}): pick an address from the pool or add it there`,
      });
    }
  });
  return errors;
}
