/**
 * `sallyport convert`: the peers' egress objects rewritten as Sallyport objects, with a warning
 * for every field that has no equivalent or whose behaviour differs. Pure: parsed documents in,
 * objects and findings out; the command reads the files and prints (src/cli/convert.ts).
 *
 * Reads Cilium's CiliumEgressGatewayPolicy (cilium.ts) and spidernet-io/egressgateway's
 * EgressGateway, EgressPolicy and EgressClusterPolicy (spidernet.ts). Sallyport objects pass
 * through; `v1` Namespaces are read for spidernet's per-namespace default gateway; `List`s are
 * opened; anything else is skipped with a warning. Every object written passes `validate.ts`,
 * alone and against the gateways written with it.
 */
import { Ajv, type ErrorObject, type ValidateFunction } from "ajv";
import { type AnyPolicy, API_VERSION, type EgressGateway, KINDS, policyKey } from "../api/types.ts";
import {
  validateGatewayAgainstOthers,
  validateObject,
  validatePolicyAgainstGateway,
} from "../api/validate.ts";
import { checkLongestPrefix, convertCilium, newCiliumContext } from "./cilium.ts";
import {
  type ConversionError,
  type ConversionWarning,
  Findings,
  Output,
  type SallyportObject,
} from "./output.ts";
import {
  convertSpidernetGateway,
  convertSpidernetPolicy,
  NAMESPACE_DEFAULT_GATEWAY,
  type SpidernetContext,
} from "./spidernet.ts";
import {
  CILIUM_GROUP,
  type CiliumEgressGatewayPolicy,
  CiliumEgressGatewayPolicySchema,
  SPIDERNET_GROUP,
  SpidernetClusterPolicySchema,
  type SpidernetGateway,
  SpidernetGatewaySchema,
  type SpidernetPolicy,
  SpidernetPolicySchema,
} from "./upstream.ts";

export {
  CONVERTED_FROM,
  type ConversionError,
  type ConversionWarning,
  type SallyportObject,
  type WarningKind,
} from "./output.ts";

export interface Conversion {
  /** Gateways first, then policies, in the order of their sources. */
  readonly objects: readonly SallyportObject[];
  readonly warnings: readonly ConversionWarning[];
  /** Objects that could not be converted (nothing was written for them). */
  readonly errors: readonly ConversionError[];
}

/** What `convert` reads, for messages. */
export const SOURCE_KINDS = `CiliumEgressGatewayPolicy (${CILIUM_GROUP}), EgressGateway, EgressPolicy and EgressClusterPolicy (${SPIDERNET_GROUP})`;

/** `Warning: <source> <field>: <kind>: <message>`, one line. */
export function formatWarning(w: ConversionWarning): string {
  return `Warning: ${w.source} ${w.field}: ${w.kind}: ${w.message}`;
}

/** `Cannot convert <source>: <field>: <message>`, one line. */
export function formatConversionError(e: ConversionError): string {
  return `Cannot convert ${e.source}: ${e.field}: ${e.message}`;
}

const ajv = new Ajv({ allErrors: true, strict: false });
const schemas = {
  cilium: ajv.compile(CiliumEgressGatewayPolicySchema),
  gateway: ajv.compile(SpidernetGatewaySchema),
  EgressPolicy: ajv.compile(SpidernetPolicySchema),
  EgressClusterPolicy: ajv.compile(SpidernetClusterPolicySchema),
};

type Doc = Record<string, unknown> & {
  apiVersion?: unknown;
  kind?: unknown;
  metadata?: { name?: unknown; namespace?: unknown; labels?: Record<string, unknown> };
};

type Source =
  | { readonly kind: "cilium"; readonly doc: Doc }
  | { readonly kind: "spidernet-gateway"; readonly doc: Doc }
  | { readonly kind: "spidernet-policy"; readonly doc: Doc }
  | { readonly kind: "sallyport"; readonly doc: Doc }
  | { readonly kind: "namespace"; readonly doc: Doc }
  | { readonly kind: "other"; readonly doc: Doc };

export function convert(documents: readonly unknown[]): Conversion {
  const warnings: ConversionWarning[] = [];
  const errors: ConversionError[] = [];
  const sources: Source[] = [];
  flatten(documents).forEach((d, i) => {
    if (d === null || typeof d !== "object" || Array.isArray(d)) {
      errors.push({
        source: `document ${i + 1}`,
        field: "(root)",
        message: "is not an object: write one Kubernetes object per YAML document",
      });
      return;
    }
    const doc = withoutNulls(d) as Doc;
    sources.push({ kind: classify(doc), doc });
  });

  const out = new Output();
  const spidernetGateways = new Map<string, SpidernetGateway>();
  for (const s of sources) {
    if (s.kind === "spidernet-gateway" && typeof s.doc.metadata?.name === "string")
      spidernetGateways.set(s.doc.metadata.name, s.doc as unknown as SpidernetGateway);
  }
  const namespaceDefaults = new Map<string, string>();
  for (const s of sources) {
    const gateway = s.doc.metadata?.labels?.[NAMESPACE_DEFAULT_GATEWAY];
    if (
      s.kind === "namespace" &&
      typeof s.doc.metadata?.name === "string" &&
      typeof gateway === "string"
    )
      namespaceDefaults.set(s.doc.metadata.name, gateway);
  }
  const spidernet: SpidernetContext = {
    sources: spidernetGateways,
    converted: new Map(),
    clusterDefault: [...spidernetGateways.values()].find((g) => g.spec?.clusterDefault === true)
      ?.metadata.name,
    namespaceDefaults,
  };
  const cilium = newCiliumContext();

  // Gateways first: policies read what became of them.
  const ordered = [
    ...sources.filter((s) => s.kind === "spidernet-gateway"),
    ...sources.filter((s) => s.kind !== "spidernet-gateway"),
  ];
  for (const s of ordered) {
    const f = new Findings(sourceName(s.doc), warnings, errors);
    switch (s.kind) {
      case "cilium":
        if (checkShape(schemas.cilium, s.doc, f))
          convertCilium(s.doc as unknown as CiliumEgressGatewayPolicy, out, f, cilium);
        break;
      case "spidernet-gateway":
        if (checkVersion(s.doc, f) && checkShape(schemas.gateway, s.doc, f))
          convertSpidernetGateway(s.doc as unknown as SpidernetGateway, out, f, spidernet);
        break;
      case "spidernet-policy": {
        const schema =
          s.doc.kind === "EgressPolicy" ? schemas.EgressPolicy : schemas.EgressClusterPolicy;
        if (checkVersion(s.doc, f) && checkShape(schema, s.doc, f))
          convertSpidernetPolicy(s.doc as unknown as SpidernetPolicy, out, f, spidernet);
        break;
      }
      case "sallyport":
        if (s.doc.kind === "EgressGateway") out.addGateway(s.doc as unknown as EgressGateway, f);
        else if (s.doc.kind === "EgressPolicy" || s.doc.kind === "ClusterEgressPolicy")
          out.addPolicy(s.doc as unknown as AnyPolicy, f);
        else
          f.warn(
            "kind",
            "skipped",
            `${String(s.doc.kind)} is written by Sallyport itself, not by you`,
          );
        break;
      case "namespace":
        break;
      case "other":
        f.warn("kind", "skipped", `not a kind convert reads (${SOURCE_KINDS})`);
        break;
    }
  }
  checkLongestPrefix(cilium);
  return { objects: validated(out), warnings, errors };
}

/** Drops (and reports) objects that our own admission would refuse. */
function validated(out: Output): SallyportObject[] {
  const gateways = [...out.gateways.values()];
  const ok: SallyportObject[] = [];
  const dropped = new Set<string>();
  for (const obj of out.objects()) {
    let problems = validateObject(obj);
    if (problems.length === 0 && obj.kind === "EgressGateway")
      problems = validateGatewayAgainstOthers(obj, gateways);
    if (problems.length === 0 && obj.kind !== "EgressGateway") {
      problems = dropped.has(obj.spec.gateway)
        ? [
            {
              field: "spec.gateway",
              message: `its gateway ${obj.spec.gateway} could not be written (see above)`,
            },
          ]
        : validatePolicyAgainstGateway(obj, out.gateways.get(obj.spec.gateway));
    }
    if (problems.length === 0) {
      ok.push(obj);
      continue;
    }
    if (obj.kind === "EgressGateway") dropped.add(obj.metadata.name ?? "");
    const f = out.findingsOf.get(obj)!;
    const what =
      obj.kind === "EgressGateway" ? `EgressGateway/${obj.metadata.name}` : policyKey(obj);
    for (const p of problems) f.fail(p.field, `${p.message} (in the converted ${what})`);
  }
  return ok;
}

function flatten(documents: readonly unknown[]): unknown[] {
  return documents.flatMap((d) => {
    const list = d as { kind?: unknown; items?: unknown };
    if (
      d !== null &&
      typeof d === "object" &&
      typeof list.kind === "string" &&
      list.kind.endsWith("List") &&
      Array.isArray(list.items)
    )
      return flatten(list.items);
    return [d];
  });
}

/** Kubernetes treats `field: null` as unset; YAML writes it for `field:` with nothing after. */
function withoutNulls(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(withoutNulls);
  if (value === null || typeof value !== "object") return value;
  return Object.fromEntries(
    Object.entries(value)
      .filter(([, v]) => v !== null)
      .map(([k, v]) => [k, withoutNulls(v)]),
  );
}

function groupOf(doc: Doc): string {
  const apiVersion = typeof doc.apiVersion === "string" ? doc.apiVersion : "";
  return apiVersion.includes("/") ? apiVersion.slice(0, apiVersion.indexOf("/")) : "";
}

function classify(doc: Doc): Source["kind"] {
  const group = groupOf(doc);
  if (group === CILIUM_GROUP && doc.kind === "CiliumEgressGatewayPolicy") return "cilium";
  if (group === SPIDERNET_GROUP && doc.kind === "EgressGateway") return "spidernet-gateway";
  if (
    group === SPIDERNET_GROUP &&
    (doc.kind === "EgressPolicy" || doc.kind === "EgressClusterPolicy")
  )
    return "spidernet-policy";
  if (doc.apiVersion === API_VERSION && typeof doc.kind === "string" && doc.kind in KINDS)
    return "sallyport";
  if (doc.apiVersion === "v1" && doc.kind === "Namespace") return "namespace";
  return "other";
}

/** `CiliumEgressGatewayPolicy/egress-sample`, `EgressPolicy.egressgateway.spidernet.io/default/app`. */
function sourceName(doc: Doc): string {
  const kind = typeof doc.kind === "string" ? doc.kind : "(no kind)";
  const group = groupOf(doc);
  const qualified = group === "" || group === CILIUM_GROUP ? kind : `${kind}.${group}`;
  const name = typeof doc.metadata?.name === "string" ? doc.metadata.name : "(no name)";
  const ns = typeof doc.metadata?.namespace === "string" ? `${doc.metadata.namespace}/` : "";
  return `${qualified}/${ns}${name}`;
}

function checkVersion(doc: Doc, f: Findings): boolean {
  if (doc.apiVersion === `${SPIDERNET_GROUP}/v1beta1`) return true;
  f.fail(
    "apiVersion",
    `${String(doc.apiVersion)} is not ${SPIDERNET_GROUP}/v1beta1, the version convert reads (the older v1 kinds had other fields)`,
  );
  return false;
}

/**
 * Checks the shape against the peer's CRD. Fields the CRD does not have are ignored with a
 * warning (a newer version may have added them); any other mismatch stops the conversion.
 */
function checkShape(validate: ValidateFunction, doc: Doc, f: Findings): boolean {
  const kind = String(doc.kind);
  if (validate(doc)) return true;
  let ok = true;
  const seen = new Set<string>();
  const described = (validate.errors ?? [])
    .map(describe)
    .sort((a, b) => (a.field < b.field ? -1 : a.field > b.field ? 1 : 0));
  for (const { field, message, unknown } of described) {
    if (seen.has(field)) continue;
    seen.add(field);
    if (unknown) {
      if (field.startsWith("metadata.") || field === "status") continue;
      f.warn(
        field,
        "no equivalent",
        `not a field of ${kind} in the version convert knows: ignored`,
      );
    } else {
      ok = false;
      f.fail(field, message);
    }
  }
  return ok;
}

function describe(e: ErrorObject): { field: string; message: string; unknown: boolean } {
  const base = e.instancePath
    .split("/")
    .slice(1)
    .map((p) => (/^\d+$/.test(p) ? `[${p}]` : `.${p.replace(/~1/g, "/").replace(/~0/g, "~")}`))
    .join("")
    .replace(/^\./, "");
  const join = (child: string) => (base === "" ? child : `${base}.${child}`);
  switch (e.keyword) {
    case "additionalProperties":
      return {
        field: join((e.params as { additionalProperty: string }).additionalProperty),
        message: "unknown field",
        unknown: true,
      };
    case "required":
      return {
        field: join((e.params as { missingProperty: string }).missingProperty),
        message: "is required",
        unknown: false,
      };
    case "anyOf":
      return { field: base, message: "has a value that is not allowed", unknown: false };
    default:
      return { field: base || "(root)", message: e.message ?? "is invalid", unknown: false };
  }
}
