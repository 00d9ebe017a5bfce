/**
 * CiliumEgressGatewayPolicy → Sallyport.
 *
 * One CEGP becomes one Sallyport policy per entry of `selectors` (Cilium ORs them; Sallyport's
 * policy has one pod selector), all naming one EgressGateway made from the gateway's
 * `nodeSelector`. Policies with the same gateway nodes share one gateway, whose pool holds their
 * explicit egress IPs. A selector that pins one namespace (`io.kubernetes.pod.namespace`) gives a
 * namespaced EgressPolicy; anything else a ClusterEgressPolicy.
 */
import type { EgressGateway, LabelSelectorSpec } from "../api/types.ts";
import {
  type Cidr,
  cidrsOverlap,
  formatAddress,
  formatCidr,
  tryParseAddress,
  tryParseCidr,
} from "../lib/ip.ts";
import { formatSelector } from "../lib/selector.ts";
import {
  andSelectors,
  CONVERTED_FROM,
  convertedMeta,
  copySelector,
  type Findings,
  gatewayObject,
  isEmptySelector,
  type Output,
  policyObject,
  selectorKey,
} from "./output.ts";
import type { CiliumEgressGatewayPolicy, CiliumGateway, UpstreamSelector } from "./upstream.ts";

/** Cilium's label for the pod's namespace (`k8sConst.PodNamespaceLabel`). */
const POD_NAMESPACE = "io.kubernetes.pod.namespace";
/** Cilium's prefix for the labels of the pod's namespace (`k8sConst.PodNamespaceMetaLabels`). */
const NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels.";
/** The label every Namespace carries with its own name (Kubernetes ≥ 1.21). */
const NAMESPACE_NAME = "kubernetes.io/metadata.name";
/** Label sources Cilium accepts in front of a Kubernetes label key. */
const KUBERNETES_SOURCES = ["k8s:", "any:"];

/** What the converter remembers across CEGPs. */
export interface CiliumContext {
  /** Gateways by their node selector, so that policies with the same gateway nodes share one. */
  readonly gatewayBySelector: Map<string, EgressGateway>;
  /** Explicit egress IPs: the gateway (by node selector) and the source that first named each. */
  readonly addressOwners: Map<string, { readonly selector: string; readonly source: string }>;
  readonly converted: ConvertedCegp[];
}

export function newCiliumContext(): CiliumContext {
  return { gatewayBySelector: new Map(), addressOwners: new Map(), converted: [] };
}

interface ConvertedCegp {
  readonly name: string;
  readonly findings: Findings;
  readonly destinations: readonly Cidr[];
  readonly priority: number;
  readonly policyNames: readonly string[];
}

interface Entry {
  readonly field: string;
  readonly gw: CiliumGateway;
}

interface Target {
  readonly pods: LabelSelectorSpec;
  readonly namespaces: LabelSelectorSpec | undefined;
  readonly nodes: LabelSelectorSpec | undefined;
}

export function convertCilium(
  cegp: CiliumEgressGatewayPolicy,
  out: Output,
  f: Findings,
  ctx: CiliumContext,
): void {
  const spec = cegp.spec;

  // --- the gateway nodes, and the address traffic leaves with
  const entries: Entry[] = [];
  if (spec.egressGateway !== undefined)
    entries.push({ field: "spec.egressGateway", gw: spec.egressGateway });
  (spec.egressGateways ?? []).forEach((gw, i) => {
    entries.push({ field: `spec.egressGateways[${i}]`, gw });
  });
  if (entries.length === 0)
    f.fail(
      "spec.egressGateway",
      "is required: name the gateway nodes with nodeSelector (and, optionally, egressIP or interface)",
    );
  const egressIPs: (string | undefined)[] = entries.map((e) => {
    if (e.gw.egressIP !== undefined && e.gw.interface !== undefined) {
      f.fail(
        e.field,
        "sets both egressIP and interface, so Cilium ignores this policy: keep the one you meant and convert again",
      );
      return undefined;
    }
    if (isEmptySelector(e.gw.nodeSelector)) {
      f.fail(
        `${e.field}.nodeSelector`,
        "selects every node (or is missing): Sallyport needs the gateway nodes named; label them and select them with matchLabels",
      );
    }
    if (e.gw.egressIP === undefined) return undefined;
    const address = tryParseAddress(e.gw.egressIP.trim());
    if (address === undefined) {
      f.fail(`${e.field}.egressIP`, `"${e.gw.egressIP}" is not an IP address`);
      return undefined;
    }
    return formatAddress(address);
  });
  if (f.failed) return;

  const primary = entries[0]!;
  const primaryIP = egressIPs[0];
  const snat: { egressIP?: string[]; interface?: string; useNodeIP?: boolean } = {};
  let leavesWith: string;
  if (primaryIP !== undefined) {
    snat.egressIP = [primaryIP];
    leavesWith = primaryIP;
    f.warn(
      `${primary.field}.egressIP`,
      "approximated",
      `Cilium needs ${primaryIP} configured on the gateway node's interface beforehand; Sallyport assigns it to the gateway node it picks and moves it on failover: take it off the node's interface configuration when you switch`,
    );
  } else if (primary.gw.interface !== undefined) {
    snat.interface = primary.gw.interface;
    leavesWith = `the first address of ${primary.gw.interface}`;
  } else {
    snat.useNodeIP = true;
    leavesWith = "the gateway node's address";
    f.warn(
      primary.field,
      "approximated",
      "has neither egressIP nor interface: Cilium uses the first address of the interface holding the default route; Sallyport uses the gateway node's InternalIP (useNodeIP), the same address on most clusters",
    );
  }

  let nodeSelector = copySelector(primary.gw.nodeSelector);
  if (entries.length > 1) {
    const merged = anyOf(entries.map((e) => copySelector(e.gw.nodeSelector)));
    if (merged !== undefined) {
      nodeSelector = merged;
      f.warn(
        entries.some((e) => e.field === "spec.egressGateway")
          ? "spec.egressGateways"
          : entries[1]!.field.replace(/\[\d+\]$/, ""),
        "approximated",
        `Cilium pins each pod to one of ${entries.length} gateways (by its CiliumEndpoint's UID); Sallyport sends all of the policy's pods through one gateway over the nodes of every entry (${formatSelector(merged)}), with failover between them`,
      );
    }
    entries.slice(1).forEach((e, k) => {
      if (merged === undefined)
        f.warn(
          e.field,
          "no equivalent",
          `a Sallyport policy has one gateway: the nodes of this entry (${formatSelector(copySelector(e.gw.nodeSelector))}) are not used, only those of ${primary.field}; select them all with one label to keep them`,
        );
      const ip = egressIPs[k + 1];
      if (ip !== undefined && ip !== primaryIP)
        f.warn(
          `${e.field}.egressIP`,
          "approximated",
          `${ip} goes into the gateway's pool, but every pod of this policy leaves with ${leavesWith}: Sallyport gives a policy one egress IP per family`,
        );
      else if (e.gw.interface !== undefined && e.gw.interface !== primary.gw.interface)
        f.warn(
          `${e.field}.interface`,
          "no equivalent",
          `every pod of this policy leaves with ${leavesWith}: Sallyport gives a policy one egress address`,
        );
    });
  }

  // --- destinations
  const snatFamily = primaryIP === undefined ? undefined : tryParseAddress(primaryIP)!.family;
  const destinations: Cidr[] = [];
  if (spec.destinationCIDRs.length === 0)
    f.fail("spec.destinationCIDRs", "is empty, so Cilium sends nothing through the gateway");
  spec.destinationCIDRs.forEach((text, i) => {
    const cidr = parseCidrText(text);
    if (cidr === undefined) {
      f.fail(`spec.destinationCIDRs[${i}]`, `"${text}" is not a CIDR such as 10.0.0.0/8`);
    } else if (snatFamily !== undefined && cidr.family !== snatFamily) {
      f.warn(
        `spec.destinationCIDRs[${i}]`,
        "no equivalent",
        `${text} is IPv${cidr.family} but the egressIP ${primaryIP} is IPv${snatFamily}: Sallyport needs an egress IP of each destination's family, so it is dropped (add an IPv${cidr.family} address to the policy's egressIP and the gateway's pool to keep it)`,
      );
    } else {
      destinations.push(cidr);
    }
  });
  if (!f.failed && destinations.length === 0)
    f.fail("spec.destinationCIDRs", "no destination is left: see the warnings above");

  const excluded: string[] = [];
  (spec.excludedCIDRs ?? []).forEach((text, i) => {
    const cidr = parseCidrText(text);
    if (cidr === undefined) {
      f.fail(`spec.excludedCIDRs[${i}]`, `"${text}" is not a CIDR such as 10.0.0.0/8`);
    } else if (!destinations.some((d) => cidrsOverlap(d, cidr))) {
      f.warn(
        `spec.excludedCIDRs[${i}]`,
        "no equivalent",
        `${text} lies outside every destination that is converted, so it excludes nothing: dropped`,
      );
    } else {
      excluded.push(formatCidr(cidr));
    }
  });

  // --- source pods
  if (spec.selectors.length === 0) f.fail("spec.selectors", "is empty: the policy selects no pod");
  const targets: Target[] = [];
  spec.selectors.forEach((s, i) => {
    const field = `spec.selectors[${i}]`;
    if (s.podSelector === undefined && s.namespaceSelector === undefined) {
      f.fail(
        field,
        "has neither podSelector nor namespaceSelector, which Cilium rejects: add a podSelector",
      );
      return;
    }
    const split = splitPodSelector(s.podSelector, `${field}.podSelector`, f);
    let namespaces = split.namespaces;
    if (s.namespaceSelector !== undefined) {
      const nsSel = copySelector(s.namespaceSelector);
      namespaces = namespaces === undefined ? nsSel : andSelectors(namespaces, nsSel);
    }
    const nodes = isEmptySelector(s.nodeSelector) ? undefined : copySelector(s.nodeSelector);
    targets.push({ pods: split.pods, namespaces, nodes });
  });
  if (f.failed) return;

  // An address belongs to one gateway in Sallyport; Cilium lets two policies with different
  // gateway nodes name it (each node must then hold it).
  const key = selectorKey(nodeSelector);
  egressIPs.forEach((ip, i) => {
    const owner = ip === undefined ? undefined : ctx.addressOwners.get(ip);
    if (owner !== undefined && owner.selector !== key)
      f.fail(
        `${entries[i]!.field}.egressIP`,
        `${ip} is also the egress IP of ${owner.source}, whose gateway nodes differ; Sallyport gives an address to one gateway: select the same nodes in both, or use another address`,
      );
  });
  if (f.failed) return;
  for (const ip of egressIPs)
    if (ip !== undefined && !ctx.addressOwners.has(ip))
      ctx.addressOwners.set(ip, { selector: key, source: f.source });

  // --- write: the gateway (shared by equal node selectors), then one policy per selector
  let gateway = ctx.gatewayBySelector.get(key);
  if (gateway === undefined) {
    gateway = gatewayObject(
      convertedMeta(f, out.uniqueGatewayName(gatewayName(nodeSelector, cegp.metadata.name))),
      { nodeSelector },
    );
    ctx.gatewayBySelector.set(key, gateway);
    out.addGateway(gateway, f);
  } else {
    const annotations = { ...gateway.metadata.annotations };
    annotations[CONVERTED_FROM] = `${annotations[CONVERTED_FROM]}, ${f.source}`;
    gateway.metadata.annotations = annotations;
  }
  const pool = [...(gateway.spec.pool ?? [])];
  for (const ip of egressIPs) if (ip !== undefined && !pool.includes(ip)) pool.push(ip);
  if (pool.length > 0) gateway.spec.pool = pool;

  // Cilium picks the longest destination prefix per packet; Sallyport ranks whole policies. The
  // shortest prefix of a policy as its priority lets narrower policies win as they did.
  const priority = Math.min(...destinations.map((d) => d.prefix));
  const base = {
    destinationCIDRs: destinations.map(formatCidr),
    ...(excluded.length > 0 ? { excludedCIDRs: excluded } : {}),
    gateway: gateway.metadata.name ?? "",
    ...snat,
    ...(priority > 0 ? { priority } : {}),
  };
  const names: string[] = [];
  targets.forEach((t, i) => {
    const wanted = targets.length === 1 ? cegp.metadata.name : `${cegp.metadata.name}-${i + 1}`;
    const namespace = singleNamespace(t.namespaces);
    const labels = cegp.metadata.labels;
    const common = {
      podSelector: t.pods,
      ...(t.nodes === undefined ? {} : { nodeSelector: t.nodes }),
    };
    if (namespace !== undefined) {
      const name = out.uniquePolicyName("EgressPolicy", namespace, wanted);
      names.push(`EgressPolicy/${namespace}/${name}`);
      out.addPolicy(
        policyObject("EgressPolicy", convertedMeta(f, name, { namespace, labels }), {
          ...common,
          ...base,
        }),
        f,
      );
    } else {
      const name = out.uniquePolicyName("ClusterEgressPolicy", undefined, wanted);
      names.push(`ClusterEgressPolicy/${name}`);
      out.addPolicy(
        policyObject("ClusterEgressPolicy", convertedMeta(f, name, { labels }), {
          ...common,
          namespaceSelector: t.namespaces ?? {},
          ...base,
        }),
        f,
      );
    }
  });
  if (targets.length > 1 && primaryIP === undefined)
    f.warn(
      "spec.selectors",
      "approximated",
      `became ${targets.length} policies (${names.join(", ")}); without an egressIP each is placed on its own, so they may leave through different nodes of gateway ${gateway.metadata.name}`,
    );
  ctx.converted.push({
    name: cegp.metadata.name,
    findings: f,
    destinations,
    priority,
    policyNames: names,
  });
}

/**
 * Warns where the priorities cannot reproduce Cilium's longest-prefix match: policy A has a
 * destination narrower than one of B's that it overlaps, yet A does not outrank B.
 */
export function checkLongestPrefix(ctx: CiliumContext): void {
  for (const a of ctx.converted) {
    for (const b of ctx.converted) {
      if (a === b) continue;
      const pair = a.destinations
        .flatMap((da) => b.destinations.map((db) => [da, db] as const))
        .find(
          ([da, db]) => da.family === db.family && da.prefix > db.prefix && cidrsOverlap(da, db),
        );
      if (pair === undefined || a.priority > b.priority) continue;
      a.findings.warn(
        "spec.destinationCIDRs",
        "approximated",
        `Cilium sends ${formatCidr(pair[0])} through this policy (the longest prefix wins) even for pods that CiliumEgressGatewayPolicy/${b.name} (${formatCidr(pair[1])}) also selects; Sallyport ranks whole policies by priority, and ${a.priority} does not exceed ${b.priority}: if they select the same pods, raise spec.priority of ${a.policyNames.join(", ")}`,
      );
    }
  }
}

/**
 * A gateway is named after the nodes it selects when one label does that (`node2` for
 * node.kubernetes.io/name=node2, `egress` for egress=true, `role-egress` for role=egress), since
 * several policies may share it; else after the first policy that uses it.
 */
function gatewayName(selector: LabelSelectorSpec, policy: string): string {
  const labels = Object.entries(selector.matchLabels ?? {});
  if (labels.length !== 1 || (selector.matchExpressions ?? []).length > 0) return policy;
  const [key, value] = labels[0]!;
  const last = key.slice(key.lastIndexOf("/") + 1);
  const raw =
    last === "hostname" || last === "name" ? value : value === "true" ? last : `${last}-${value}`;
  const name = raw
    .toLowerCase()
    .replace(/[^a-z0-9.-]+/g, "-")
    .replace(/^[-.]+|[-.]+$/g, "")
    .slice(0, 63);
  return name === "" ? policy : name;
}

function parseCidrText(text: string): Cidr | undefined {
  return text.includes("/") ? tryParseCidr(text.trim()) : undefined;
}

function stripSource(key: string): string {
  for (const source of KUBERNETES_SOURCES)
    if (key.startsWith(source)) return key.slice(source.length);
  return key;
}

/**
 * Splits Cilium's pod selector into what selects pods and what selects their namespace (Cilium
 * puts both in pod labels: `io.kubernetes.pod.namespace` and `io.cilium.k8s.namespace.labels.*`).
 */
function splitPodSelector(
  selector: UpstreamSelector | undefined,
  field: string,
  f: Findings,
): { pods: LabelSelectorSpec; namespaces: LabelSelectorSpec | undefined } {
  const podLabels: Record<string, string> = {};
  const podExpressions: NonNullable<LabelSelectorSpec["matchExpressions"]> = [];
  const nsLabels: Record<string, string> = {};
  const nsExpressions: NonNullable<LabelSelectorSpec["matchExpressions"]> = [];
  const route = (
    key: string,
    where: string,
  ): { kind: "namespace"; key: string } | { kind: "pod"; key: string } => {
    const k = stripSource(key);
    if (k === POD_NAMESPACE) return { kind: "namespace", key: NAMESPACE_NAME };
    if (k.startsWith(NAMESPACE_LABELS))
      return { kind: "namespace", key: k.slice(NAMESPACE_LABELS.length) };
    if (k.startsWith("io.cilium.") || k.includes(":")) {
      f.warn(
        where,
        "no equivalent",
        `${k} is a label Cilium derives for its identities (service account, cluster, or a non-Kubernetes source); Sallyport matches the Pod's own labels, which never hold it, so this selector selects no pod until you replace it with a pod label`,
      );
      return { kind: "pod", key };
    }
    return { kind: "pod", key: k };
  };
  for (const [key, value] of Object.entries(selector?.matchLabels ?? {})) {
    const r = route(key, `${field}.matchLabels.${key}`);
    if (r.kind === "namespace") nsLabels[r.key] = value;
    else podLabels[r.key] = value;
  }
  (selector?.matchExpressions ?? []).forEach((req, i) => {
    const r = route(req.key, `${field}.matchExpressions[${i}].key`);
    // Every pod has a namespace: "namespace exists" selects every pod, as it does in Cilium.
    if (r.kind === "namespace" && r.key === NAMESPACE_NAME && req.operator === "Exists") return;
    const copy = {
      key: r.key,
      operator: req.operator,
      ...(req.values === undefined || req.values.length === 0 ? {} : { values: [...req.values] }),
    };
    (r.kind === "namespace" ? nsExpressions : podExpressions).push(copy);
  });
  const pods: LabelSelectorSpec = {
    ...(Object.keys(podLabels).length > 0 ? { matchLabels: podLabels } : {}),
    ...(podExpressions.length > 0 ? { matchExpressions: podExpressions } : {}),
  };
  const hasNamespace = Object.keys(nsLabels).length > 0 || nsExpressions.length > 0;
  return {
    pods,
    namespaces: hasNamespace
      ? {
          ...(Object.keys(nsLabels).length > 0 ? { matchLabels: nsLabels } : {}),
          ...(nsExpressions.length > 0 ? { matchExpressions: nsExpressions } : {}),
        }
      : undefined,
  };
}

/** The namespace a selector pins by name and nothing else, if it does. */
function singleNamespace(selector: LabelSelectorSpec | undefined): string | undefined {
  if (selector === undefined) return undefined;
  const labels = Object.entries(selector.matchLabels ?? {});
  const expressions = selector.matchExpressions ?? [];
  if (labels.length === 1 && expressions.length === 0 && labels[0]![0] === NAMESPACE_NAME)
    return labels[0]![1];
  const only = expressions[0];
  if (
    labels.length === 0 &&
    expressions.length === 1 &&
    only!.key === NAMESPACE_NAME &&
    only!.operator === "In" &&
    only!.values?.length === 1
  )
    return only!.values[0];
  return undefined;
}

/**
 * One selector that selects what any of `selectors` selects, when that can be written: equal
 * selectors, or matchLabels that differ in the value of one key (that key becomes `In`).
 */
function anyOf(selectors: readonly LabelSelectorSpec[]): LabelSelectorSpec | undefined {
  const first = selectors[0]!;
  if (selectors.every((s) => selectorKey(s) === selectorKey(first))) return first;
  if (selectors.some((s) => (s.matchExpressions ?? []).length > 0)) return undefined;
  const keys = Object.keys(first.matchLabels ?? {}).sort();
  if (
    !selectors.every(
      (s) => JSON.stringify(Object.keys(s.matchLabels ?? {}).sort()) === JSON.stringify(keys),
    )
  )
    return undefined;
  const varying = keys.filter((k) =>
    selectors.some((s) => s.matchLabels![k] !== first.matchLabels![k]),
  );
  if (varying.length !== 1) return undefined;
  const key = varying[0]!;
  const common = Object.fromEntries(Object.entries(first.matchLabels!).filter(([k]) => k !== key));
  return {
    ...(Object.keys(common).length > 0 ? { matchLabels: common } : {}),
    matchExpressions: [
      { key, operator: "In", values: [...new Set(selectors.map((s) => s.matchLabels![key]!))] },
    ],
  };
}
