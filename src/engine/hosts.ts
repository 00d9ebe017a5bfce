/**
 * Pod addresses as host CIDRs, parsed once: a node replans the same endpoints again and again.
 */
import { type Address, type Family, hostCidr, parseAddress } from "../lib/ip.ts";

/**
 * One string instance per set member text: consecutive plans then share their members, and the
 * datapath's "is this set unchanged?" check on 100,000 members is a pointer comparison each
 * instead of a character comparison (datapath bench: one pod added, 24 → 17 ms).
 * Bounded: cleared when it outgrows any realistic node.
 */
const INTERNED = new Map<string, string>();
export function intern(text: string): string {
  const known = INTERNED.get(text);
  if (known !== undefined) return known;
  if (INTERNED.size >= 4_000_000) INTERNED.clear();
  INTERNED.set(text, text);
  return text;
}

/** A pod address as a host CIDR, parsed once: endpoints are seen again on every replan. */
export interface Host {
  readonly address: Address;
  /** Canonical host CIDR text ("10.0.0.1/32"), interned. */
  readonly cidr: string;
}

const HOSTS = new Map<string, Host>();
const BY_CIDR = new Map<string, Host>();
export function hostOf(ip: string): Host {
  let h = HOSTS.get(ip);
  if (h === undefined) {
    const address = parseAddress(ip);
    h = { address, cidr: intern(hostCidr(address)) };
    if (HOSTS.size >= 4_000_000) {
      HOSTS.clear();
      BY_CIDR.clear();
    }
    HOSTS.set(ip, h);
    BY_CIDR.set(h.cidr, h);
  }
  return h;
}

export function hostsOfFamily(ips: readonly string[], family: Family): Host[] {
  const out: Host[] = [];
  for (const ip of ips) {
    const h = hostOf(ip);
    if (h.address.family === family) out.push(h);
  }
  return out;
}

/** Host CIDRs in canonical order (the order normalizeCidrList gives them), without duplicates. */
export function sortedHosts(hosts: Iterable<Host>): string[] {
  const unique = new Map<string, Host>();
  for (const h of hosts) unique.set(h.cidr, h);
  return [...unique.values()]
    .sort((a, b) =>
      a.address.value < b.address.value ? -1 : a.address.value > b.address.value ? 1 : 0,
    )
    .map((h) => h.cidr);
}

/** The host of a host CIDR made by `hostOf` (or parsed now). */
export function hostOfCidr(cidr: string): Host {
  return BY_CIDR.get(cidr) ?? hostOf(cidr.slice(0, cidr.indexOf("/")));
}

/** Canonical order of host CIDRs: by address value. */
export function compareHostCidrs(a: string, b: string): number {
  const x = hostOfCidr(a).address.value;
  const y = hostOfCidr(b).address.value;
  return x < y ? -1 : x > y ? 1 : 0;
}
