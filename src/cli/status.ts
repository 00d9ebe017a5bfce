/**
 * `sallyport status`: what the controller reports, read from the API.
 *
 *   status                  every gateway and policy, and why the ones not Ready are not
 *   status egp/NAME         one policy (NAME alone means an EgressPolicy), cegp/NAME, egw/NAME
 */
import type { Condition } from "../api/types.ts";
import { type KubeClient, type KubeObject, ours } from "../kube/client.ts";
import { UsageError } from "./errors.ts";

export interface Row {
  [column: string]: string | number | undefined;
}

/** Columns padded to their widest cell, headers in capitals, as kubectl prints. */
export function table(rows: readonly Row[]): string {
  if (rows.length === 0) return "(none)";
  const cols = Object.keys(rows[0]!);
  const width = cols.map((c) => Math.max(c.length, ...rows.map((r) => String(r[c] ?? "").length)));
  const line = (vals: string[]) =>
    vals
      .map((v, i) => v.padEnd(width[i]!))
      .join("  ")
      .trimEnd();
  return [
    line(cols.map((c) => c.toUpperCase())),
    ...rows.map((r) => line(cols.map((c) => String(r[c] ?? "")))),
  ].join("\n");
}

type Obj = KubeObject & {
  spec?: Record<string, unknown>;
  status?: Record<string, unknown> & { conditions?: Condition[] };
};

interface GatewayNode {
  name: string;
  ready: boolean;
  egressIPs?: string[];
}

function ready(o: Obj): Condition | undefined {
  return o.status?.conditions?.find((c) => c.type === "Ready");
}

function readyText(o: Obj): string {
  const r = ready(o);
  return r === undefined ? "" : `${r.status}${r.status === "True" ? "" : ` (${r.reason})`}`;
}

function policyName(p: Obj): string {
  return p.metadata.namespace === undefined
    ? `cegp/${p.metadata.name}`
    : `egp/${p.metadata.namespace}/${p.metadata.name}`;
}

/** Gateways, policies, and the reason of every policy or gateway that is not Ready. */
export async function clusterStatus(
  client: KubeClient,
  options: { namespace?: string | undefined } = {},
): Promise<string> {
  const [gateways, policies, clusterPolicies] = await Promise.all([
    client.listAll<Obj>(ours("EgressGateway")),
    client.listAll<Obj>(
      ours("EgressPolicy"),
      options.namespace === undefined ? {} : { namespace: options.namespace },
    ),
    client.listAll<Obj>(ours("ClusterEgressPolicy")),
  ]);
  const all = [...policies.items, ...clusterPolicies.items];
  const out = [
    "GATEWAYS",
    table(
      gateways.items.map((g) => ({
        name: g.metadata.name,
        ready: `${g.status?.readyNodes ?? 0}/${g.status?.totalNodes ?? 0}`,
        pool: g.status?.poolUsage as string | undefined,
        nodes: ((g.status?.nodes as GatewayNode[] | undefined) ?? [])
          .map(
            (n) =>
              `${n.name}${n.ready ? "" : "(down)"}${(n.egressIPs ?? []).length > 0 ? `[${n.egressIPs!.join(",")}]` : ""}`,
          )
          .join(" "),
      })),
    ),
    "",
    "POLICIES",
    table(
      all.map((p) => ({
        name: policyName(p),
        gateway: p.spec?.gateway as string | undefined,
        "egress-ips": ((p.status?.egressIPs as string[] | undefined) ?? []).join(","),
        node: p.status?.gatewayNode as string | undefined,
        standby: ((p.status?.standbyNodes as string[] | undefined) ?? []).join(","),
        pods: p.status?.matchedPods as number | undefined,
        programmed: p.status?.programmed as string | undefined,
        ready: readyText(p),
      })),
    ),
  ];
  const problems = [
    ...gateways.items.map((g) => ["egw", g] as const),
    ...all.map((p) => ["", p] as const),
  ]
    .filter(([, o]) => ready(o) !== undefined && ready(o)!.status !== "True")
    .map(([prefix, o]) => {
      const r = ready(o)!;
      return `${prefix === "egw" ? `egw/${o.metadata.name}` : policyName(o)}: ${r.reason}: ${r.message}`;
    });
  if (problems.length > 0) out.push("", "NOT READY", ...problems);
  return out.join("\n");
}

const KIND_ALIASES: Readonly<
  Record<string, "EgressPolicy" | "ClusterEgressPolicy" | "EgressGateway">
> = {
  egp: "EgressPolicy",
  egresspolicy: "EgressPolicy",
  egresspolicies: "EgressPolicy",
  cegp: "ClusterEgressPolicy",
  clusteregresspolicy: "ClusterEgressPolicy",
  clusteregresspolicies: "ClusterEgressPolicy",
  egw: "EgressGateway",
  egressgateway: "EgressGateway",
  egressgateways: "EgressGateway",
};

/** `egp/NAME`, `cegp/NAME`, `egw/NAME` or `NAME` (an EgressPolicy). */
export function parseRef(ref: string): {
  kind: "EgressPolicy" | "ClusterEgressPolicy" | "EgressGateway";
  name: string;
} {
  const slash = ref.indexOf("/");
  if (slash < 0) return { kind: "EgressPolicy", name: ref };
  const alias = ref.slice(0, slash).toLowerCase();
  const kind = KIND_ALIASES[alias.replace(/\.sallyport\.dev$/, "")];
  const name = ref.slice(slash + 1);
  if (kind === undefined || name === "" || name.includes("/"))
    throw new UsageError(
      `Cannot show "${ref}": write egp/NAME (or NAME), cegp/NAME or egw/NAME, with the namespace in -n`,
    );
  return { kind, name };
}

/** One object in detail: what it got, and every condition with its message. */
export async function objectStatus(
  client: KubeClient,
  ref: string,
  namespace: string,
): Promise<string> {
  const { kind, name } = parseRef(ref);
  const o = await client.get<Obj>(
    ours(kind),
    name,
    kind === "EgressPolicy" ? namespace : undefined,
  );
  const s = o.status ?? {};
  const lines = [
    `${kind} ${o.metadata.namespace === undefined ? "" : `${o.metadata.namespace}/`}${o.metadata.name}`,
  ];
  const field = (label: string, value: unknown) => {
    if (value !== undefined && value !== "")
      lines.push(`  ${`${label}:`.padEnd(13)}${String(value)}`);
  };
  if (kind === "EgressGateway") {
    field("Nodes", `${s.readyNodes ?? 0}/${s.totalNodes ?? 0} ready`);
    field("Pool", s.poolUsage);
    for (const n of (s.nodes as GatewayNode[] | undefined) ?? [])
      lines.push(
        `    ${n.name}${n.ready ? "" : " (down)"}${(n.egressIPs ?? []).length > 0 ? `: ${n.egressIPs!.join(", ")}` : ""}`,
      );
  } else {
    field("Gateway", o.spec?.gateway);
    const ips = ((s.egressIPs as string[] | undefined) ?? []).join(", ");
    field(
      "Egress IPs",
      ips === "" ? "(none)" : `${ips}${s.gatewayNode === undefined ? "" : ` on ${s.gatewayNode}`}`,
    );
    const standby = (s.standbyNodes as string[] | undefined) ?? [];
    if (s.gatewayNode !== undefined)
      field(
        "Standby",
        standby.length === 0
          ? "(none: no other node of the gateway qualifies)"
          : `${standby.join(", ")} (the first live one takes over if ${s.gatewayNode} is lost)`,
      );
    field("Pods", s.matchedPods);
    field("Programmed", s.programmed);
    field("Priority", o.spec?.priority ?? 0);
    for (const sh of (s.shadowedBy as { policy: string; pods: number }[] | undefined) ?? [])
      lines.push(`  Shadowed by ${sh.policy} for ${sh.pods} pod(s)`);
  }
  const conditions = s.conditions ?? [];
  lines.push(
    "Conditions:",
    conditions.length === 0
      ? "  (none yet: is the controller running?)"
      : table(
          conditions.map((c) => ({
            type: c.type,
            status: c.status,
            reason: c.reason,
            message: c.message,
          })),
        )
          .split("\n")
          .map((l) => `  ${l}`)
          .join("\n"),
  );
  return lines.join("\n");
}
