/**
 * What the engine reads of each input, and whether two versions differ in it. The controller
 * feeds the engine every watch event, most of which change nothing the engine reads (a status the
 * controller itself wrote, a resourceVersion, a condition on a Pod); these comparisons let those
 * events cost nothing. Values are compared as values, never as serialized text: the API server
 * returns objects with their keys in its own order.
 */
import type { AnyPolicy, EgressGateway } from "../api/types.ts";
import { sameLabels } from "../lib/selector.ts";
import type { NodeInfo, NodeReport, PodInfo } from "./snapshot.ts";

/** Structural equality of JSON-like values; an absent key equals an undefined one. */
export function sameValue(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a)) {
    if (!Array.isArray(b) || a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (!sameValue(a[i], b[i])) return false;
    return true;
  }
  if (Array.isArray(b)) return false;
  const x = a as Record<string, unknown>;
  const y = b as Record<string, unknown>;
  for (const k in x) if (!sameValue(x[k], y[k])) return false;
  for (const k in y) if (!(k in x) && y[k] !== undefined) return false;
  return true;
}

/** Whether two arrays hold the same items in the same order (each compared with ===). */
export function sameItems<T>(a: readonly T[], b: readonly T[]): boolean {
  if (a === b) return true;
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/**
 * The parts of a policy the engine reads: its spec, and of its metadata the name, namespace,
 * generation (reported back as observedGeneration), creation time (precedence and allocation
 * order) and labels (validated). Status, resourceVersion and managedFields are not read.
 */
export function samePolicy(a: AnyPolicy, b: AnyPolicy): boolean {
  const m = a.metadata;
  const n = b.metadata;
  return (
    a.apiVersion === b.apiVersion &&
    a.kind === b.kind &&
    m.name === n.name &&
    m.namespace === n.namespace &&
    m.generation === n.generation &&
    m.creationTimestamp === n.creationTimestamp &&
    sameLabels(m.labels, n.labels) &&
    sameValue(a.spec, b.spec)
  );
}

/** The object the engine validates: exactly the parts `samePolicy` compares. */
export function readPartOfPolicy(policy: AnyPolicy): AnyPolicy {
  const m = policy.metadata;
  const metadata: AnyPolicy["metadata"] = {};
  if (m.name !== undefined) metadata.name = m.name;
  if (m.namespace !== undefined) metadata.namespace = m.namespace;
  if (m.generation !== undefined) metadata.generation = m.generation;
  if (m.creationTimestamp !== undefined) metadata.creationTimestamp = m.creationTimestamp;
  if (m.labels !== undefined) metadata.labels = m.labels;
  return {
    apiVersion: policy.apiVersion,
    kind: policy.kind,
    metadata,
    spec: policy.spec,
  } as AnyPolicy;
}

/** A gateway is read for its name and spec only. */
export function sameGateway(a: EgressGateway, b: EgressGateway): boolean {
  return a.metadata.name === b.metadata.name && sameValue(a.spec, b.spec);
}

export function sameNodeInfo(a: NodeInfo, b: NodeInfo): boolean {
  return (
    a.name === b.name &&
    a.addresses[4] === b.addresses[4] &&
    a.addresses[6] === b.addresses[6] &&
    sameItems(a.podCIDRs, b.podCIDRs) &&
    sameLabels(a.labels, b.labels)
  );
}

export function samePodInfo(a: PodInfo, b: PodInfo): boolean {
  return (
    a.namespace === b.namespace &&
    a.name === b.name &&
    a.nodeName === b.nodeName &&
    finished(a) === finished(b) &&
    a.hostNetwork === b.hostNetwork &&
    sameItems(a.ips, b.ips) &&
    sameLabels(a.labels, b.labels)
  );
}

/** Of the phase, the engine reads only whether the pod has finished (see isEligiblePod). */
function finished(pod: PodInfo): boolean {
  return pod.phase === "Succeeded" || pod.phase === "Failed";
}

export function sameReport(a: NodeReport | undefined, b: NodeReport | undefined): boolean {
  if (a === b) return true;
  if (a === undefined || b === undefined) return false;
  if (a.underlay?.ipv4 !== b.underlay?.ipv4 || a.underlay?.ipv6 !== b.underlay?.ipv6) return false;
  if ((a.tunnelClasses === true) !== (b.tunnelClasses === true)) return false;
  if (a.interfaces.size !== b.interfaces.size) return false;
  for (const [name, list] of a.interfaces) {
    const other = b.interfaces.get(name);
    if (other === undefined || !sameItems(list, other)) return false;
  }
  return true;
}
