import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import {
  canonicalAddress,
  canonicalCidr,
  cidrContains,
  cidrsOverlap,
  formatCidr,
  parseAddress,
  parseCidr,
  parsePoolEntry,
  rangeSize,
  rangeToCidrs,
} from "./ip.ts";

describe("parseAddress() and canonical forms", () => {
  const cases: [string, string][] = [
    ["10.6.105.150", "10.6.105.150"],
    ["FD00:0:0::1", "fd00::1"],
    ["2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"],
    ["::ffff:10.0.0.1", "::ffff:a00:1"],
  ];
  for (const [input, want] of cases) {
    it(`canonicalAddress("${input}") is "${want}"`, () =>
      assert.equal(canonicalAddress(input), want));
  }
  for (const bad of ["", "10.0.0", "10.0.0.256", "fd00:::1", "eth0", "10.0.0.1/32"]) {
    it(`parseAddress("${bad}") throws a SyntaxError naming the value`, () => {
      assert.throws(
        () => parseAddress(bad),
        (e: Error) => e instanceof SyntaxError && e.message.includes(`"${bad}"`),
      );
    });
  }
});

describe("parseCidr()", () => {
  it("clears host bits as iptables and ipset do", () =>
    assert.equal(canonicalCidr("10.1.2.3/8"), "10.0.0.0/8"));
  it("takes a bare address as a host route", () =>
    assert.equal(canonicalCidr("fd00::5"), "fd00::5/128"));
  it("rejects prefixes beyond the family width", () =>
    assert.throws(() => parseCidr("10.0.0.0/33"), SyntaxError));
  it("knows containment and overlap", () => {
    assert.ok(cidrContains(parseCidr("10.0.0.0/8"), parseCidr("10.1.0.0/16")));
    assert.ok(!cidrContains(parseCidr("10.1.0.0/16"), parseCidr("10.0.0.0/8")));
    assert.ok(cidrsOverlap(parseCidr("10.1.0.0/16"), parseCidr("10.0.0.0/8")));
    assert.ok(!cidrsOverlap(parseCidr("10.0.0.0/8"), parseCidr("fd00::/8")));
  });
});

describe("parsePoolEntry()", () => {
  it("leaves out the network and broadcast addresses of an IPv4 block", () => {
    const r = parsePoolEntry("10.168.60.0/29");
    assert.equal(rangeSize(r), 6n);
  });
  it("keeps every address of a /31 and /32", () => {
    assert.equal(rangeSize(parsePoolEntry("10.0.0.0/31")), 2n);
    assert.equal(rangeSize(parsePoolEntry("10.0.0.7")), 1n);
  });
  it("counts a /64 without expanding it", () => {
    assert.equal(rangeSize(parsePoolEntry("fd00:a::/64")), (1n << 64n) - 1n);
  });
  it("rejects ranges that mix families or run backwards", () => {
    assert.throws(() => parsePoolEntry("10.0.0.1-fd00::1"), /one family/);
    assert.throws(() => parsePoolEntry("10.0.0.9-10.0.0.1"), RangeError);
  });
});

describe("rangeToCidrs()", () => {
  it("splits a range into the fewest blocks", () => {
    const r = parsePoolEntry("10.168.60.100-10.168.60.110");
    assert.deepEqual(rangeToCidrs(r).map(formatCidr), [
      "10.168.60.100/30",
      "10.168.60.104/30",
      "10.168.60.108/31",
      "10.168.60.110/32",
    ]);
  });
  it("covers exactly the range, IPv4 and IPv6 (property)", () => {
    fc.assert(
      fc.property(
        fc.bigInt({ min: 0n, max: (1n << 32n) - 1n }),
        fc.bigInt({ min: 0n, max: 4096n }),
        (first, len) => {
          const last = first + len > (1n << 32n) - 1n ? (1n << 32n) - 1n : first + len;
          const cidrs = rangeToCidrs({ family: 4, first, last });
          let cursor = first;
          for (const c of cidrs) {
            assert.equal(c.base, cursor, "blocks are contiguous");
            cursor = c.base + (1n << BigInt(32 - c.prefix));
          }
          assert.equal(cursor - 1n, last, "and end at the last address");
        },
      ),
    );
  });
});
