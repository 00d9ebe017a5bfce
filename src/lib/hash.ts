/**
 * Short, stable, collision-resistant names derived from keys (ipset names, device names).
 */
import { createHash } from "node:crypto";

const ALPHABET = "abcdefghijklmnopqrstuvwxyz234567";

/** Lower-case RFC 4648 base32 of the SHA-256 of `text`, cut to `length` characters. */
export function hashName(text: string, length: number): string {
  const digest = createHash("sha256").update(text).digest();
  let out = "";
  let buffer = 0;
  let bitCount = 0;
  for (const byte of digest) {
    buffer = (buffer << 8) | byte;
    bitCount += 8;
    while (bitCount >= 5 && out.length < length) {
      out += ALPHABET[(buffer >> (bitCount - 5)) & 31];
      bitCount -= 5;
    }
    buffer &= (1 << bitCount) - 1;
    if (out.length >= length) break;
  }
  return out;
}

/** Hex SHA-256 prefix, for revisions shown to users. */
export function hashHex(text: string, length = 16): string {
  return createHash("sha256").update(text).digest("hex").slice(0, length);
}
