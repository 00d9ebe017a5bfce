/**
 * CustomResourceDefinitions generated from the TypeBox schemas in `types.ts`.
 *
 * TypeBox emits JSON Schema; Kubernetes wants a *structural* subset of OpenAPI v3. `toStructural`
 * rewrites the differences: `const` → `enum`, unions of literals → a string enum,
 * `patternProperties` (TypeBox records) → `additionalProperties`, and `additionalProperties: false`
 * is dropped because the API server rejects it next to `properties` (it prunes unknown fields
 * instead, and rejects them when the client asks for strict field validation).
 */
import { stringify } from "yaml";
import { GROUP, KINDS, type KindInfo, VERSION } from "./types.ts";

type Json = unknown;

const DROP_KEYS = new Set(["$id", "$schema", "title", "examples"]);

export function toStructural(schema: Json, path = ""): Json {
  if (Array.isArray(schema)) return schema.map((s) => toStructural(s, path));
  if (schema === null || typeof schema !== "object") return schema;
  const s = schema as Record<string, unknown>;

  // Unions of literals (TypeBox Type.Union([Type.Literal(...)])) → enum.
  const anyOf = s.anyOf as Record<string, unknown>[] | undefined;
  if (anyOf?.every((branch) => "const" in branch)) {
    const values = anyOf.map((branch) => branch.const);
    const out: Record<string, unknown> = { type: typeof values[0], enum: values };
    for (const key of ["description", "default"]) if (key in s) out[key] = s[key];
    return out;
  }

  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(s)) {
    if (DROP_KEYS.has(key)) continue;
    if (key === "const") {
      out.enum = [value];
      continue;
    }
    if (key === "additionalProperties" && value === false) continue;
    if (key === "patternProperties") {
      const inner = Object.values(value as Record<string, unknown>)[0];
      out.additionalProperties = toStructural(inner, `${path}.*`);
      continue;
    }
    if (key === "properties") {
      const props: Record<string, unknown> = {};
      for (const [name, sub] of Object.entries(value as Record<string, unknown>)) {
        props[name] = toStructural(sub, `${path}.${name}`);
      }
      out.properties = props;
      continue;
    }
    out[key] = typeof value === "object" ? toStructural(value, path) : value;
  }
  if (!("type" in out) && "properties" in out) out.type = "object";
  if (!("type" in out) && Object.keys(out).length === 0) {
    out["x-kubernetes-preserve-unknown-fields"] = true;
  }
  return out;
}

function kindSchema(info: KindInfo): Json {
  const structural = toStructural(info.schema) as Record<string, unknown>;
  const properties = { ...(structural.properties as Record<string, unknown>) };
  // The API server owns metadata validation; a CRD may only say it is an object.
  properties.metadata = { type: "object" };
  properties.apiVersion = { type: "string" };
  properties.kind = { type: "string" };
  return { ...structural, properties };
}

interface PrinterColumn {
  name: string;
  type: "string" | "integer" | "date" | "boolean";
  jsonPath: string;
  description?: string;
  priority?: number;
}

const READY = '.status.conditions[?(@.type=="Ready")].status';
const REASON = '.status.conditions[?(@.type=="Ready")].reason';
const AGE: PrinterColumn = { name: "Age", type: "date", jsonPath: ".metadata.creationTimestamp" };

const policyColumns: PrinterColumn[] = [
  { name: "Gateway", type: "string", jsonPath: ".spec.gateway" },
  { name: "Egress-IPs", type: "string", jsonPath: ".status.egressIPs" },
  { name: "Node", type: "string", jsonPath: ".status.gatewayNode" },
  { name: "Pods", type: "integer", jsonPath: ".status.matchedPods" },
  { name: "Programmed", type: "string", jsonPath: ".status.programmed" },
  { name: "Ready", type: "string", jsonPath: READY },
  { name: "Reason", type: "string", jsonPath: REASON, priority: 1 },
  { name: "Priority", type: "integer", jsonPath: ".spec.priority", priority: 1 },
  { name: "Standby", type: "string", jsonPath: ".status.standbyNodes", priority: 1 },
  AGE,
];

export const PRINTER_COLUMNS: Record<keyof typeof KINDS, PrinterColumn[]> = {
  EgressGateway: [
    { name: "Ready-Nodes", type: "integer", jsonPath: ".status.readyNodes" },
    { name: "Nodes", type: "integer", jsonPath: ".status.totalNodes" },
    { name: "Pool-Used", type: "string", jsonPath: ".status.poolUsage" },
    { name: "Ready", type: "string", jsonPath: READY },
    AGE,
  ],
  EgressPolicy: policyColumns,
  ClusterEgressPolicy: policyColumns,
  EgressNode: [
    { name: "ID", type: "integer", jsonPath: ".spec.nodeID" },
    { name: "Mark", type: "string", jsonPath: ".spec.mark" },
    { name: "Tunnel-IPv4", type: "string", jsonPath: ".spec.tunnel.ipv4" },
    { name: "Tunnel-IPv6", type: "string", jsonPath: ".spec.tunnel.ipv6", priority: 1 },
    { name: "Underlay", type: "string", jsonPath: ".status.underlay.interface" },
    {
      name: "Datapath",
      type: "string",
      jsonPath: '.status.conditions[?(@.type=="DatapathReady")].status',
    },
    { name: "Last-Sync", type: "date", jsonPath: ".status.lastSync" },
  ],
  EgressClusterInfo: [AGE],
  EgressEndpointSlice: [{ name: "Policy", type: "string", jsonPath: ".policy" }, AGE],
};

export function buildCrd(name: keyof typeof KINDS): Record<string, unknown> {
  const info: KindInfo = KINDS[name];
  return {
    apiVersion: "apiextensions.k8s.io/v1",
    kind: "CustomResourceDefinition",
    metadata: {
      name: `${info.plural}.${GROUP}`,
      labels: { "app.kubernetes.io/part-of": "sallyport" },
    },
    spec: {
      group: GROUP,
      names: {
        kind: info.kind,
        listKind: `${info.kind}List`,
        plural: info.plural,
        singular: info.singular,
        shortNames: [...info.shortNames],
        categories: [...info.categories],
      },
      scope: info.namespaced ? "Namespaced" : "Cluster",
      versions: [
        {
          name: VERSION,
          served: true,
          storage: true,
          schema: { openAPIV3Schema: kindSchema(info) },
          ...(info.hasStatus ? { subresources: { status: {} } } : {}),
          additionalPrinterColumns: PRINTER_COLUMNS[name],
        },
      ],
    },
  };
}

export function allCrds(): Record<string, unknown>[] {
  return (Object.keys(KINDS) as (keyof typeof KINDS)[]).map(buildCrd);
}

/** The files under deploy/crds/, keyed by file name. */
export function renderCrdFiles(): Map<string, string> {
  const files = new Map<string, string>();
  for (const crd of allCrds()) {
    const name = (crd.metadata as { name: string }).name;
    files.set(
      `${name}.yaml`,
      `# Generated by scripts/gen-crds.ts from src/api/types.ts. Do not edit.\n${stringify(crd, { lineWidth: 0 })}`,
    );
  }
  return files;
}
