/**
 * spidernet-io/egressgateway → Sallyport.
 *
 * An EgressGateway keeps its name, its node selector and its `ippools` (same formats: single
 * addresses, ranges, CIDRs; IPv4 and IPv6 in one pool). EgressPolicy and EgressClusterPolicy map
 * field by field onto EgressPolicy and ClusterEgressPolicy. What spidernet decides at admission
 * (the default gateway, the default EIP) is resolved from the other objects of the input and
 * written explicitly, since Sallyport has no defaults there.
 */
import type { EgressGateway } from "../api/types.ts";
import {
  type Family,
  formatAddress,
  formatCidr,
  parsePoolEntry,
  tryParseAddress,
  tryParseCidr,
} from "../lib/ip.ts";
import {
  convertedMeta,
  copySelector,
  type Findings,
  gatewayObject,
  isEmptySelector,
  type Output,
  policyObject,
} from "./output.ts";
import type { SpidernetGateway, SpidernetPolicy } from "./upstream.ts";

/** Namespace label naming the namespace's default gateway (spidernet `labels.go`). */
export const NAMESPACE_DEFAULT_GATEWAY = "spidernet.io/egressgateway-default";

export interface SpidernetContext {
  /** Source gateways of the whole input, by name. */
  readonly sources: ReadonlyMap<string, SpidernetGateway>;
  /** Converted gateways, by source name. */
  readonly converted: Map<string, EgressGateway>;
  /** The gateway with `clusterDefault: true`, if the input has one. */
  readonly clusterDefault: string | undefined;
  /** Namespace → default gateway, from Namespace objects of the input. */
  readonly namespaceDefaults: ReadonlyMap<string, string>;
}

const FAMILY_OF_POOL = { ipv4: 4, ipv6: 6 } as const;

export function convertSpidernetGateway(
  gw: SpidernetGateway,
  out: Output,
  f: Findings,
  ctx: SpidernetContext,
): void {
  const selector = gw.spec.nodeSelector.selector;
  if (isEmptySelector(selector))
    f.fail(
      "spec.nodeSelector.selector",
      "is empty or missing (spidernet rejects it too): name the gateway nodes with matchLabels",
    );
  if (gw.spec.nodeSelector.policy !== undefined)
    f.warn(
      "spec.nodeSelector.policy",
      "no equivalent",
      "spidernet declares it but never reads it; Sallyport spreads egress IPs over the gateway's ready nodes: dropped",
    );

  const pool: string[] = [];
  for (const key of ["ipv4", "ipv6"] as const) {
    (gw.spec.ippools?.[key] ?? []).forEach((text, i) => {
      const entry = text.trim();
      // spidernet's own examples write `ipv6: [""]` for "no IPv6 pool".
      if (entry === "") return;
      const field = `spec.ippools.${key}[${i}]`;
      let family: Family;
      try {
        family = parsePoolEntry(entry).family;
      } catch (e) {
        f.fail(
          field,
          `"${text}" is not an address, a range first-last or a CIDR (${(e as Error).message})`,
        );
        return;
      }
      if (family !== FAMILY_OF_POOL[key]) {
        f.fail(field, `"${text}" is IPv${family}, in the ${key} pool`);
        return;
      }
      const cidr = entry.includes("/") ? tryParseCidr(entry) : undefined;
      if (cidr !== undefined && cidr.prefix <= (family === 4 ? 30 : 126))
        f.warn(
          field,
          "approximated",
          `Sallyport never hands out the subnet address of a CIDR entry${family === 4 ? " nor its broadcast address" : ""}; if a policy holds one of them, write ${entry} as a range first-last`,
        );
      pool.push(entry);
    });
  }
  for (const key of ["ipv4DefaultEIP", "ipv6DefaultEIP"] as const) {
    const text = gw.spec.ippools?.[key]?.trim();
    if (text === undefined || text === "") continue;
    if (tryParseAddress(text) === undefined) {
      f.fail(`spec.ippools.${key}`, `"${text}" is not an IP address`);
      continue;
    }
    f.warn(
      `spec.ippools.${key}`,
      "approximated",
      `Sallyport has no default egress IP: the policies of this input that relied on it name ${text} in spec.egressIP, and share it as they did; other policies of this gateway get their own address from the pool unless they name it`,
    );
  }
  if (gw.spec.clusterDefault === true)
    f.warn(
      "spec.clusterDefault",
      "no equivalent",
      "Sallyport policies always name their gateway: the policies of this input without egressGatewayName were given this one; name it in those you write later",
    );
  if (f.failed) return;

  const gateway = gatewayObject(
    convertedMeta(f, out.uniqueGatewayName(gw.metadata.name), { labels: gw.metadata.labels }),
    { nodeSelector: copySelector(selector), ...(pool.length > 0 ? { pool } : {}) },
  );
  ctx.converted.set(gw.metadata.name, gateway);
  out.addGateway(gateway, f);
}

export function convertSpidernetPolicy(
  p: SpidernetPolicy,
  out: Output,
  f: Findings,
  ctx: SpidernetContext,
): void {
  const cluster = p.kind === "EgressClusterPolicy";
  const namespace = cluster ? undefined : p.metadata.namespace;

  // --- the gateway: spidernet's webhook fills in a default; Sallyport needs it named
  let gatewayName = p.spec.egressGatewayName?.trim() || undefined;
  if (gatewayName === undefined) {
    const fromNamespace =
      namespace === undefined ? undefined : ctx.namespaceDefaults.get(namespace);
    gatewayName = fromNamespace ?? ctx.clusterDefault;
    if (gatewayName === undefined)
      f.fail(
        "spec.egressGatewayName",
        `is empty and the input holds no default gateway (a Namespace labelled ${NAMESPACE_DEFAULT_GATEWAY}, or an EgressGateway with clusterDefault: true): set it, or convert those objects together with this one`,
      );
    else
      f.warn(
        "spec.egressGatewayName",
        "approximated",
        `is empty: spidernet's webhook gives the policy ${fromNamespace === undefined ? "the cluster's default gateway" : `the default gateway of namespace ${namespace}`}, ${gatewayName}; the converted policy names it`,
      );
  }
  const source = gatewayName === undefined ? undefined : ctx.sources.get(gatewayName);
  const converted = gatewayName === undefined ? undefined : ctx.converted.get(gatewayName);

  // --- the egress address
  const eip = p.spec.egressIP ?? {};
  const explicit = [eip.ipv4, eip.ipv6].map((t) => t?.trim() ?? "").filter((t) => t !== "");
  const snat: { egressIP?: string[]; useNodeIP?: boolean } = {};
  if (eip.useNodeIP === true) {
    if (explicit.length > 0)
      f.fail(
        "spec.egressIP.useNodeIP",
        "is set together with ipv4/ipv6, which spidernet rejects: keep one of them",
      );
    else snat.useNodeIP = true;
  } else if (explicit.length > 0) {
    snat.egressIP = addresses(
      [
        ["ipv4", eip.ipv4, 4],
        ["ipv6", eip.ipv6, 6],
      ],
      "spec.egressIP",
      f,
    );
  } else {
    const held = [p.status?.eip?.ipv4, p.status?.eip?.ipv6]
      .map((t) => t?.trim() ?? "")
      .filter((t) => t !== "" && tryParseAddress(t) !== undefined);
    const allocator = eip.allocatorPolicy ?? "default";
    const defaults = [source?.spec.ippools?.ipv4DefaultEIP, source?.spec.ippools?.ipv6DefaultEIP]
      .map((t) => tryParseAddress(t?.trim() ?? ""))
      .filter((a) => a !== undefined)
      .map(formatAddress);
    if (held.length > 0) {
      snat.egressIP = held.map((t) => formatAddress(tryParseAddress(t)!));
      f.warn(
        "spec.egressIP",
        "approximated",
        `names no address; spidernet gave the policy ${held.join(" and ")} (status.eip), which the converted policy names so that destinations keep seeing ${held.length === 1 ? "it" : "them"}`,
      );
    } else if (allocator === "default" && defaults.length > 0) {
      // What spidernet does: the gateway's default EIP, shared by every such policy.
      snat.egressIP = defaults;
    } else if (allocator === "default") {
      f.warn(
        "spec.egressIP",
        "approximated",
        source === undefined
          ? `names no address, so spidernet gives the policy the default EIP of gateway ${gatewayName}, which is not in this input: the converted policy gets its own address from the pool; convert the gateway with it, or set spec.egressIP to the address your firewalls know`
          : `names no address and gateway ${gatewayName} has no default EIP (spidernet's webhook picks one at random): the converted policy gets its own address from the pool; set spec.egressIP to the address your firewalls know`,
      );
    } else if (allocator !== "rr") {
      f.warn(
        "spec.egressIP.allocatorPolicy",
        "no equivalent",
        `"${allocator}" is not an allocator policy spidernet knows (default, rr): the converted policy gets its own address from the pool`,
      );
    }
    if (
      snat.egressIP === undefined &&
      converted !== undefined &&
      (converted.spec.pool ?? []).length === 0
    )
      f.fail(
        "spec.egressIP",
        `names no address and gateway ${gatewayName} has no pool, which spidernet rejects too: set useNodeIP, or give the gateway a pool`,
      );
  }

  // --- the pods
  const applied = p.spec.appliedTo;
  if ((applied.podSubnet ?? []).length > 0)
    f.warn(
      "spec.appliedTo.podSubnet",
      "no equivalent",
      "Sallyport selects pods by label (spidernet declares podSubnet but never implemented it): dropped",
    );
  if (applied.podSelector === undefined)
    f.fail(
      "spec.appliedTo.podSelector",
      (applied.podSubnet ?? []).length > 0
        ? "is missing and podSubnet cannot be converted: select the pods by label"
        : "is missing: select the pods by label",
    );

  // --- destinations: each needs an egress address of its family
  const families = snat.useNodeIP
    ? undefined
    : snat.egressIP !== undefined
      ? new Set(snat.egressIP.map((t) => tryParseAddress(t)?.family))
      : converted === undefined
        ? undefined
        : new Set((converted.spec.pool ?? []).map((t) => parsePoolEntry(t).family));
  const destinations: string[] = [];
  (p.spec.destSubnet ?? []).forEach((text, i) => {
    const field = `spec.destSubnet[${i}]`;
    const cidr = text.includes("/") ? tryParseCidr(text.trim()) : undefined;
    if (cidr === undefined) {
      f.fail(field, `"${text}" is not a CIDR such as 10.0.0.0/8`);
    } else if (families !== undefined && !families.has(cidr.family)) {
      f.warn(
        field,
        "no equivalent",
        `${text} is IPv${cidr.family} but ${snat.egressIP !== undefined ? `the policy's egress IP (${snat.egressIP.join(", ")}) has` : `the pool of gateway ${gatewayName} has`} no IPv${cidr.family} address: neither spidernet nor Sallyport can give it an egress IP, so it is dropped`,
      );
    } else {
      destinations.push(formatCidr(cidr));
    }
  });
  if (!f.failed && (p.spec.destSubnet ?? []).length > 0 && destinations.length === 0)
    f.fail(
      "spec.destSubnet",
      "no destination is left (see the warnings above), and an empty list would send everything outside the cluster through the gateway",
    );

  if (p.spec.priority !== undefined)
    f.warn(
      "spec.priority",
      "no equivalent",
      "spidernet never implemented priority (its rules come in random order); Sallyport's spec.priority (0-1000, the highest wins) is left unset: set it where policies overlap",
    );
  if (f.failed || gatewayName === undefined) return;

  const podSelector = copySelector(applied.podSelector);
  const rest = {
    ...(destinations.length > 0 ? { destinationCIDRs: destinations } : {}),
    gateway: converted?.metadata.name ?? gatewayName,
    ...snat,
  };
  const labels = p.metadata.labels;
  if (cluster) {
    const name = out.uniquePolicyName("ClusterEgressPolicy", undefined, p.metadata.name);
    out.addPolicy(
      policyObject("ClusterEgressPolicy", convertedMeta(f, name, { labels }), {
        podSelector,
        namespaceSelector: copySelector(applied.namespaceSelector),
        ...rest,
      }),
      f,
    );
  } else {
    const name = out.uniquePolicyName("EgressPolicy", namespace, p.metadata.name);
    out.addPolicy(
      policyObject("EgressPolicy", convertedMeta(f, name, { namespace, labels }), {
        podSelector,
        ...rest,
      }),
      f,
    );
  }
}

function addresses(
  list: readonly (readonly [string, string | undefined, Family])[],
  field: string,
  f: Findings,
): string[] {
  const out: string[] = [];
  for (const [key, text, family] of list) {
    const t = text?.trim() ?? "";
    if (t === "") continue;
    const a = tryParseAddress(t);
    if (a === undefined || a.family !== family)
      f.fail(`${field}.${key}`, `"${text}" is not an IPv${family} address`);
    else out.push(formatAddress(a));
  }
  return out;
}
