/**
 * What the engine derives from the nodes alone: the cluster's address families, an identity per
 * node (node id → NODE_MARK, tunnel addresses, tunnel MAC), the peers agents tunnel to, and the
 * ignore CIDRs (destinations inside the cluster, never steered).
 *
 * Identities are sticky: a node keeps its id for as long as it exists, and a node that comes back
 * with an id read from its EgressNode keeps that one when it is free. New nodes get the lowest
 * free id, in name order.
 */
import {
  cidrToRange,
  FAMILIES,
  type Family,
  formatAddress,
  formatCidr,
  hostCidr,
  normalizeCidrList,
  parseAddress,
  parseCidr,
  type Range,
  rangeToCidrs,
  tryParseCidr,
} from "../lib/ip.ts";
import { sameItems } from "./equality.ts";
import { MAX_NODE_ID, tunnelMac } from "./marks.ts";
import type { ClusterConfig, NodeIdentity, NodeInfo, NodeReport } from "./snapshot.ts";
import type { PeerView } from "./view.ts";

/** The families some node has an address of; IPv4 alone when no node has any. */
export function clusterFamilies(nodes: Iterable<NodeInfo>): readonly Family[] {
  let v4 = false;
  let v6 = false;
  for (const n of nodes) {
    v4 ||= n.addresses[4] !== undefined;
    v6 ||= n.addresses[6] !== undefined;
    if (v4 && v6) break;
  }
  return v4 && v6 ? FAMILIES : v6 ? [6] : [4];
}

export class NodeIdentities {
  readonly #families: readonly Family[];
  readonly #tunnelCIDRs: ClusterConfig["tunnelCIDRs"];
  readonly #bases = new Map<Family, { first: bigint; last: bigint }>();
  readonly #identities = new Map<string, NodeIdentity>();
  readonly #used = new Set<number>();
  readonly #errors = new Map<string, string>();

  constructor(tunnelCIDRs: ClusterConfig["tunnelCIDRs"], families: readonly Family[]) {
    this.#families = families;
    this.#tunnelCIDRs = tunnelCIDRs;
    for (const family of families) {
      const text = tunnelCIDRs[family];
      if (text === undefined) continue;
      const range = cidrToRange(parseCidr(text));
      this.#bases.set(family, { first: range.first, last: range.last });
    }
  }

  get(name: string): NodeIdentity | undefined {
    return this.#identities.get(name);
  }

  /** Why a node has no identity, or no tunnel address of some family. */
  error(name: string): string | undefined {
    return this.#errors.get(name);
  }

  /**
   * Takes the ids of nodes that are gone back and gives one to every node without: the id it
   * had before (`previous`, the engine's last outcome or the EgressNodes a new leader reads) when
   * no other node holds it, else the lowest free id.
   * @returns the nodes whose identity or identity error changed
   */
  update(
    nodes: ReadonlyMap<string, unknown>,
    previous: ReadonlyMap<string, NodeIdentity>,
  ): Set<string> {
    const changed = new Set<string>();
    for (const [name, id] of this.#identities) {
      if (nodes.has(name)) continue;
      this.#identities.delete(name);
      this.#used.delete(id.nodeID);
      changed.add(name);
    }
    for (const name of this.#errors.keys()) if (!nodes.has(name)) changed.add(name);
    const pending: string[] = [];
    for (const name of nodes.keys()) if (!this.#identities.has(name)) pending.push(name);
    if (pending.length === 0 && changed.size === 0) return changed;
    pending.sort();
    const ids = new Map<string, number>();
    for (const name of pending) {
      const id = previous.get(name)?.nodeID;
      if (id === undefined || id < 0 || id > MAX_NODE_ID || this.#used.has(id)) continue;
      this.#used.add(id);
      ids.set(name, id);
    }
    let next = 0;
    const errors = new Map<string, string>();
    for (const name of pending) {
      if (ids.has(name)) continue;
      while (this.#used.has(next)) next++;
      if (next > MAX_NODE_ID) {
        errors.set(
          name,
          `Cannot give node ${name} an id: all ${MAX_NODE_ID + 1} node ids are in use`,
        );
        continue;
      }
      this.#used.add(next);
      ids.set(name, next);
    }
    for (const [name, id] of ids) {
      const { identity, error } = this.#identityOf(name, id, previous.get(name));
      this.#identities.set(name, identity);
      if (error !== undefined) errors.set(name, error);
      changed.add(name);
    }
    for (const name of pending) {
      if (this.#errors.get(name) !== errors.get(name)) changed.add(name);
    }
    for (const name of changed) {
      const error = errors.get(name);
      if (error === undefined) this.#errors.delete(name);
      else this.#errors.set(name, error);
    }
    return changed;
  }

  #identityOf(
    name: string,
    nodeID: number,
    previous: NodeIdentity | undefined,
  ): { identity: NodeIdentity; error?: string } {
    const tunnel: Partial<Record<Family, string>> = {};
    let error: string | undefined;
    for (const [family, range] of this.#bases) {
      const value = range.first + 1n + BigInt(nodeID);
      if (value < range.last) tunnel[family] = formatAddress({ family, value });
      else {
        error = `Cannot give node ${name} an IPv${family} tunnel address: node id ${nodeID} does not fit in ${this.#tunnelCIDRs[family]}; use a larger tunnel CIDR`;
      }
    }
    const identity: NodeIdentity =
      previous !== undefined &&
      previous.nodeID === nodeID &&
      this.#families.every((f) => previous.tunnel[f] === tunnel[f]) &&
      Object.keys(previous.tunnel).length === Object.keys(tunnel).length &&
      previous.mac === tunnelMac(nodeID)
        ? previous
        : { nodeID, mac: tunnelMac(nodeID), tunnel };
    return error === undefined ? { identity } : { identity, error };
  }
}

/** The peer agents tunnel to: underlay from the agent's report, else the node's InternalIP. */
export function peerOf(
  name: string,
  identity: NodeIdentity,
  node: NodeInfo | undefined,
  report: NodeReport | undefined,
): PeerView {
  return {
    name,
    nodeID: identity.nodeID,
    mac: identity.mac,
    tunnel: identity.tunnel,
    underlay:
      report?.underlay?.ipv4 ?? node?.addresses[4] ?? report?.underlay?.ipv6 ?? node?.addresses[6],
    podCIDRs: normalizeCidrList(node?.podCIDRs ?? []),
    ...(report?.tunnelClasses === true ? { tunnelClasses: true } : {}),
  };
}

export function samePeer(a: PeerView, b: PeerView): boolean {
  return (
    a.name === b.name &&
    a.nodeID === b.nodeID &&
    a.mac === b.mac &&
    a.tunnel[4] === b.tunnel[4] &&
    a.tunnel[6] === b.tunnel[6] &&
    a.underlay === b.underlay &&
    a.tunnelClasses === b.tunnelClasses &&
    sameItems(a.podCIDRs ?? [], b.podCIDRs ?? [])
  );
}

/**
 * Destinations inside the cluster, aggregated into the fewest CIDRs, IPv4 first: node addresses,
 * pod CIDRs, service CIDRs, extra CIDRs and the tunnel CIDRs. Unparseable entries are skipped
 * (validation reports them where they are written).
 */
export function ignoreCidrs(
  nodes: Iterable<NodeInfo>,
  cidrs: readonly string[],
  config: ClusterConfig,
  families: readonly Family[],
): string[] {
  const ranges: Range[] = [];
  const add = (text: string) => {
    const c = tryParseCidr(text);
    if (c !== undefined) ranges.push(cidrToRange(c));
  };
  for (const node of nodes) {
    for (const f of FAMILIES) {
      const a = node.addresses[f];
      if (a !== undefined) add(hostCidr(parseAddress(a)));
    }
    node.podCIDRs.forEach(add);
  }
  cidrs.forEach(add);
  config.extraIgnoreCIDRs.forEach(add);
  for (const f of families) {
    const t = config.tunnelCIDRs[f];
    if (t !== undefined) add(t);
  }
  // One sort and one merge: adding ranges one by one to a RangeSet re-sorts it every time.
  ranges.sort((a, b) =>
    a.family !== b.family
      ? a.family - b.family
      : a.first < b.first
        ? -1
        : a.first > b.first
          ? 1
          : 0,
  );
  const merged: Range[] = [];
  for (const r of ranges) {
    const last = merged[merged.length - 1];
    if (last !== undefined && last.family === r.family && r.first <= last.last + 1n) {
      if (r.last > last.last) merged[merged.length - 1] = { ...last, last: r.last };
    } else merged.push(r);
  }
  return merged.flatMap((r) => rangeToCidrs(r).map(formatCidr));
}
