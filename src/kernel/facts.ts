/**
 * Facts about this host that planning needs, read from the kernel state a sync already has:
 * the underlay device (the one holding the node's address) and its MTU, the routing tables that
 * others use (TABLE_NUM avoids them), and the tables Sallyport assigned before a restart (found
 * again through our rules, so a restarted agent keeps them).
 */

import { nodeIDOfMark, PREFIX_MASK, REPLY_PREFIX } from "../engine/marks.ts";
import { REPLY_TABLE_KEY } from "../engine/node_plan.ts";
import type { LocalFacts, PeerView } from "../engine/view.ts";
import { canonicalAddress, type Family } from "../lib/ip.ts";
import { ownTables, usedTables } from "../render/iproute.ts";
import type { KernelState } from "./datapath.ts";

export class UnderlayNotFoundError extends Error {
  override readonly name = "UnderlayNotFoundError";
}

export function localFactsFrom(
  state: KernelState,
  options: {
    readonly nodeAddresses: Readonly<Partial<Record<Family, string>>>;
    readonly peers: ReadonlyMap<string, PeerView>;
    readonly rulePref: number;
    readonly random: () => number;
    /** Use this interface instead of the one holding the node's address. */
    readonly underlayDevice?: string | undefined;
  },
): LocalFacts {
  const wanted = Object.values(options.nodeAddresses).map((a) => canonicalAddress(a!));
  const link =
    options.underlayDevice !== undefined
      ? state.routing.links.find((l) => l.name === options.underlayDevice)
      : state.routing.links.find((l) => l.addresses.some((a) => wanted.includes(a.split("/")[0]!)));
  if (link === undefined) {
    throw new UnderlayNotFoundError(
      options.underlayDevice !== undefined
        ? `Cannot find the underlay interface ${options.underlayDevice} on this host`
        : `Cannot find the underlay interface: no interface holds the node's address ${wanted.join(" or ") || "(none known)"}`,
    );
  }
  const addressOf = (family: Family) =>
    link.addresses
      .map((a) => a.split("/")[0]!)
      .find((a) => (family === 4 ? !a.includes(":") : a.includes(":")) && wanted.includes(a));
  const byID = new Map([...options.peers.values()].map((p) => [p.nodeID, p.name]));
  const existing = new Map<string, number>();
  const ours = ownTables(state.routing, options.rulePref);
  for (const r of state.routing.rules) {
    if (r.pref !== options.rulePref || !ours.has(r.table)) continue;
    if (r.fwmark === REPLY_PREFIX && r.mask === PREFIX_MASK) existing.set(REPLY_TABLE_KEY, r.table);
    const id = nodeIDOfMark(r.fwmark);
    const name = id === undefined ? undefined : byID.get(id);
    if (name !== undefined) existing.set(`node/${name}`, r.table);
  }
  return {
    underlay: { device: link.name, mtu: link.mtu, ipv4: addressOf(4), ipv6: addressOf(6) },
    usedTables: usedTables(state.routing, options.rulePref),
    existingTables: existing,
    random: options.random,
  };
}
