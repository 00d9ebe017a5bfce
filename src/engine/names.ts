/**
 * Names of every kernel object Sallyport creates. Everything we own is recognizable by name (or,
 * for ip rules, by preference), which is how we find it again after a restart and how cleanup
 * removes exactly what is ours.
 */
import { hashName } from "../lib/hash.ts";
import type { Family } from "../lib/ip.ts";

export const CHAIN_PREFIX = "SALLYPORT-";
export const CHAIN_MARK_REQUEST = "SALLYPORT-MARK-REQUEST";
export const CHAIN_RESET_MARK = "SALLYPORT-RESET-MARK";
export const CHAIN_KEEP_MARK = "SALLYPORT-KEEP-MARK";
export const CHAIN_NO_SNAT = "SALLYPORT-NO-SNAT";
export const CHAIN_SNAT_EIP = "SALLYPORT-SNAT-EIP";
export const CHAIN_GATEWAY = "SALLYPORT-GATEWAY";
export const CHAIN_REPLY = "SALLYPORT-REPLY";
/** filter INPUT: tunnel packets from any host that is no peer node are dropped (and counted). */
export const CHAIN_TUNNEL_IN = "SALLYPORT-TUNNEL-IN";

/**
 * The chain of a gateway group (the policies that always move together: those with the same
 * egress IPs): SALLYPORT-G-<hash>. Its content says where the group's traffic goes now (this
 * node's SNAT, a peer's tunnel, or nowhere), so that a failover rewrites this one chain on every
 * node, not one rule per policy.
 */
export function groupChain(group: string): string {
  return `SALLYPORT-G-${hashName(group, 10)}`;
}

/**
 * The chain of a policy's tunnel class: it writes the class into the connection mark, then goes
 * to the policy's group chain: SALLYPORT-C-0005 (class in hex).
 */
export function classChain(tunnelClass: number): string {
  return `SALLYPORT-C-${tunnelClass.toString(16).padStart(4, "0")}`;
}

export const IPSET_PREFIX = "sallyport-";

/**
 * ipset names are at most 31 characters. "sallyport-src4-" is 15, leaving 16 base32 characters
 * (80 bits) of SHA-256 of the policy key: stable across restarts, and the engine checks that no
 * two policies collide.
 */
export function policySetName(kind: "src" | "dst", family: Family, policyKey: string): string {
  return `${IPSET_PREFIX}${kind}${family}-${hashName(policyKey, 16)}`;
}

export function ignoreSetName(family: Family): string {
  return `${IPSET_PREFIX}ignore${family}`;
}

export function eipSetName(family: Family): string {
  return `${IPSET_PREFIX}eip${family}`;
}

/** The underlay addresses of this node's peers: the only sources its tunnel accepts. */
export function peersSetName(family: Family): string {
  return `${IPSET_PREFIX}peers${family}`;
}

/** True for names of sets Sallyport owns (including swap temporaries). */
export function isOwnedSet(name: string): boolean {
  return name.startsWith(IPSET_PREFIX);
}

/** Interface names are at most 15 characters. */
export const EIP_DEVICE_PREFIX = "spe-";

export function eipDeviceName(address: string): string {
  return `${EIP_DEVICE_PREFIX}${hashName(address, 11)}`;
}

/** Locally administered MAC for an EIP's device: the same on whichever node holds the EIP. */
export function eipMac(address: string): string {
  const h = hashName(`mac:${address}`, 8);
  let n = 0n;
  for (const ch of h) n = (n << 5n) | BigInt("abcdefghijklmnopqrstuvwxyz234567".indexOf(ch));
  const bytes = [0x02];
  for (let i = 4; i >= 0; i--) bytes.push(Number((n >> BigInt(i * 8)) & 0xffn));
  return bytes.map((b) => b.toString(16).padStart(2, "0")).join(":");
}

export const DEFAULT_TUNNEL_DEVICE = "sallyport";
export const DEFAULT_RULE_PREF = 5900;
