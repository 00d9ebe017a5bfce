/**
 * IPv4/IPv6 addresses, CIDRs and ranges as bigints.
 *
 * Parsing is delegated to ipaddr.js; everything after parsing is integer math so that a /64 (or
 * any range) is never expanded in memory. Formatting is canonical: dotted quad for IPv4 and
 * RFC 5952 for IPv6, which is what `ip -json`, `ipset save` and `iptables-save` print, so rendered
 * and parsed kernel state compare as plain strings.
 */
import ipaddr from "ipaddr.js";

export type Family = 4 | 6;

export const FAMILIES: readonly Family[] = [4, 6];

export interface Address {
  readonly family: Family;
  readonly value: bigint;
}

export interface Cidr {
  readonly family: Family;
  /** Network address: host bits are always zero. */
  readonly base: bigint;
  readonly prefix: number;
}

export interface Range {
  readonly family: Family;
  readonly first: bigint;
  readonly last: bigint;
}

export function bits(family: Family): number {
  return family === 4 ? 32 : 128;
}

function maxValue(family: Family): bigint {
  return (1n << BigInt(bits(family))) - 1n;
}

/**
 * Strict dotted-quad IPv4 without ipaddr.js: the engine parses every pod address, and the
 * library's general parser (octal, hex and short forms) costs ~10x more per address. Returns
 * undefined for anything that is not four decimal octets without leading zeros.
 */
function parseDottedQuad(text: string): bigint | undefined {
  let value = 0;
  let octet = 0;
  let digits = 0;
  let dots = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 46) {
      if (digits === 0 || dots === 3) return undefined;
      value = value * 256 + octet;
      octet = 0;
      digits = 0;
      dots++;
    } else if (c >= 48 && c <= 57) {
      if (digits > 0 && octet === 0) return undefined;
      octet = octet * 10 + (c - 48);
      digits++;
      if (octet > 255) return undefined;
    } else {
      return undefined;
    }
  }
  if (dots !== 3 || digits === 0) return undefined;
  return BigInt(value * 256 + octet);
}

/** Parses an IPv4 or IPv6 address; throws SyntaxError naming the text on failure. */
export function parseAddress(text: string): Address {
  const fast = parseDottedQuad(text);
  if (fast !== undefined) return { family: 4, value: fast };
  const trimmed = text.trim();
  if (!ipaddr.isValid(trimmed) || (!trimmed.includes(".") && !trimmed.includes(":"))) {
    throw new SyntaxError(`Cannot parse IP address: current value is "${text}"`);
  }
  if (
    trimmed.includes(".") &&
    !trimmed.includes(":") &&
    !ipaddr.IPv4.isValidFourPartDecimal(trimmed)
  ) {
    throw new SyntaxError(`Cannot parse IP address: current value is "${text}"`);
  }
  const parsed = ipaddr.parse(trimmed);
  let value = 0n;
  for (const byte of parsed.toByteArray()) value = (value << 8n) | BigInt(byte);
  return { family: parsed.kind() === "ipv4" ? 4 : 6, value };
}

export function tryParseAddress(text: string): Address | undefined {
  try {
    return parseAddress(text);
  } catch {
    return undefined;
  }
}

export function formatAddress(address: Address): string {
  if (address.family === 4) {
    const v = Number(address.value);
    return `${(v >>> 24) & 255}.${(v >>> 16) & 255}.${(v >>> 8) & 255}.${v & 255}`;
  }
  const bytes: number[] = new Array(16);
  let v = address.value;
  for (let i = 15; i >= 0; i--) {
    bytes[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  return (ipaddr.fromByteArray(bytes) as ipaddr.IPv6).toRFC5952String();
}

/** Canonical text of an address given as text (e.g. "FD00:0::1" → "fd00::1"). */
export function canonicalAddress(text: string): string {
  return formatAddress(parseAddress(text));
}

export function hostMask(family: Family, prefix: number): bigint {
  return (1n << BigInt(bits(family) - prefix)) - 1n;
}

/**
 * Parses "a.b.c.d/n", "x::/n" or a bare address (taken as /32 or /128). Host bits are cleared,
 * as iptables and ipset do, so "10.1.2.3/8" is 10.0.0.0/8.
 */
export function parseCidr(text: string): Cidr {
  const trimmed = text.trim();
  const slash = trimmed.indexOf("/");
  const address = parseAddress(slash < 0 ? trimmed : trimmed.slice(0, slash));
  const width = bits(address.family);
  let prefix = width;
  if (slash >= 0) {
    const prefixText = trimmed.slice(slash + 1);
    if (!/^\d{1,3}$/.test(prefixText) || Number(prefixText) > width) {
      throw new SyntaxError(
        `Cannot parse CIDR as the prefix length must be 0-${width}: current value is "${text}"`,
      );
    }
    prefix = Number(prefixText);
  }
  return {
    family: address.family,
    base: address.value & ~hostMask(address.family, prefix),
    prefix,
  };
}

export function tryParseCidr(text: string): Cidr | undefined {
  try {
    return parseCidr(text);
  } catch {
    return undefined;
  }
}

export function formatCidr(cidr: Cidr): string {
  return `${formatAddress({ family: cidr.family, value: cidr.base })}/${cidr.prefix}`;
}

export function canonicalCidr(text: string): string {
  return formatCidr(parseCidr(text));
}

export function cidrLast(cidr: Cidr): bigint {
  return cidr.base | hostMask(cidr.family, cidr.prefix);
}

export function cidrToRange(cidr: Cidr): Range {
  return { family: cidr.family, first: cidr.base, last: cidrLast(cidr) };
}

export function cidrContainsAddress(cidr: Cidr, address: Address): boolean {
  return (
    cidr.family === address.family &&
    (address.value & ~hostMask(cidr.family, cidr.prefix)) === cidr.base
  );
}

export function cidrsOverlap(a: Cidr, b: Cidr): boolean {
  if (a.family !== b.family) return false;
  const prefix = Math.min(a.prefix, b.prefix);
  const mask = ~hostMask(a.family, prefix);
  return (a.base & mask) === (b.base & mask);
}

/** True when `outer` contains all of `inner`. */
export function cidrContains(outer: Cidr, inner: Cidr): boolean {
  return (
    outer.family === inner.family && outer.prefix <= inner.prefix && cidrsOverlap(outer, inner)
  );
}

export function rangeSize(range: Range): bigint {
  return range.last - range.first + 1n;
}

export function rangesOverlap(a: Range, b: Range): boolean {
  return a.family === b.family && a.first <= b.last && b.first <= a.last;
}

/**
 * Parses a pool entry: a single address, "first-last" or a CIDR. For CIDRs the network address
 * (and the IPv4 broadcast address) are left out when the prefix leaves room for hosts, because
 * handing out the subnet address breaks networking on most segments (antrea#7868 hit this).
 */
export function parsePoolEntry(text: string): Range {
  const trimmed = text.trim();
  const dash = trimmed.indexOf("-");
  if (dash >= 0) {
    const first = parseAddress(trimmed.slice(0, dash));
    const last = parseAddress(trimmed.slice(dash + 1));
    if (first.family !== last.family) {
      throw new SyntaxError(
        `Cannot parse address range as both ends must be of one family: current value is "${text}"`,
      );
    }
    if (first.value > last.value) {
      throw new RangeError(
        `Cannot parse address range as the first address is after the last: current value is "${text}"`,
      );
    }
    return { family: first.family, first: first.value, last: last.value };
  }
  if (trimmed.includes("/")) {
    const cidr = parseCidr(trimmed);
    const range = cidrToRange(cidr);
    const width = bits(cidr.family);
    if (cidr.family === 4 && cidr.prefix <= 30) {
      return { family: 4, first: range.first + 1n, last: range.last - 1n };
    }
    if (cidr.family === 6 && cidr.prefix <= width - 2) {
      return { family: 6, first: range.first + 1n, last: range.last };
    }
    return range;
  }
  const address = parseAddress(trimmed);
  return { family: address.family, first: address.value, last: address.value };
}

/**
 * Splits an inclusive range into the fewest CIDRs covering it exactly (for ipset and routes).
 */
export function rangeToCidrs(range: Range): Cidr[] {
  const out: Cidr[] = [];
  const width = bits(range.family);
  let start = range.first;
  while (start <= range.last) {
    let prefix = width;
    // Grow the block while it stays aligned and inside the range.
    while (prefix > 0) {
      const bigger = prefix - 1;
      const mask = hostMask(range.family, bigger);
      if ((start & mask) !== 0n || (start | mask) > range.last) break;
      prefix = bigger;
    }
    out.push({ family: range.family, base: start, prefix });
    const next = (start | hostMask(range.family, prefix)) + 1n;
    if (next > maxValue(range.family)) break;
    start = next;
  }
  return out;
}

const FAMILIES_OF_TEXT = new Map<string, Family | undefined>();
/** The family of an address or CIDR text, undefined if it is neither; remembered per text. */
export function familyOfText(text: string): Family | undefined {
  if (FAMILIES_OF_TEXT.has(text)) return FAMILIES_OF_TEXT.get(text);
  const slash = text.indexOf("/");
  const family = tryParseAddress(slash < 0 ? text : text.slice(0, slash))?.family;
  // Planners ask for the same policies' addresses on every plan; bounded like hosts.ts's caches.
  if (FAMILIES_OF_TEXT.size >= 1_000_000) FAMILIES_OF_TEXT.clear();
  FAMILIES_OF_TEXT.set(text, family);
  return family;
}

export function compareAddresses(a: Address, b: Address): number {
  if (a.family !== b.family) return a.family - b.family;
  return a.value < b.value ? -1 : a.value > b.value ? 1 : 0;
}

export function compareCidrs(a: Cidr, b: Cidr): number {
  if (a.family !== b.family) return a.family - b.family;
  if (a.base !== b.base) return a.base < b.base ? -1 : 1;
  return a.prefix - b.prefix;
}

/**
 * Sorts and de-duplicates address texts into canonical form: IPv4 first, each family in address
 * order (10.0.0.9 before 10.0.0.10).
 */
export function normalizeAddressList(texts: Iterable<string>): string[] {
  const seen = new Map<string, Address>();
  for (const text of texts) {
    const a = parseAddress(text);
    seen.set(formatAddress(a), a);
  }
  return [...seen.values()].sort(compareAddresses).map(formatAddress);
}

/** Sorts and de-duplicates CIDR texts into canonical form. */
export function normalizeCidrList(texts: Iterable<string>): string[] {
  const seen = new Map<string, Cidr>();
  for (const text of texts) {
    const cidr = parseCidr(text);
    seen.set(formatCidr(cidr), cidr);
  }
  return [...seen.values()].sort(compareCidrs).map(formatCidr);
}

/** The host route form of an address: "10.0.0.1/32", "fd00::1/128". */
export function hostCidr(address: Address): string {
  return `${formatAddress(address)}/${bits(address.family)}`;
}
