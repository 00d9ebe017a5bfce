import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import type { IpSetPlan } from "../engine/plan.ts";
import { diffIpsets, parseIpsetSave, renderIpsets } from "./ipset.ts";

/** Captured from `ipset save` (ipset 7.17): host entries print without a prefix. */
const SAVE = `create sallyport-src4-aaaa hash:net family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0xee9562de
add sallyport-src4-aaaa 172.29.1.5
add sallyport-src4-aaaa 172.29.1.6
create sallyport-dst4-aaaa hash:net family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x1
add sallyport-dst4-aaaa 0.0.0.0/1
add sallyport-dst4-aaaa 128.0.0.0/1
add sallyport-dst4-aaaa 10.1.0.0/16 nomatch
create sallyport-old6 hash:net family inet6 hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x2
add sallyport-old6 fd00::1
create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536
add KUBE-CLUSTER-IP 10.96.0.1,tcp:443
`;

const src = (members: string[]): IpSetPlan => ({
  name: "sallyport-src4-aaaa",
  family: 4,
  members,
  nomatch: [],
});
const dst: IpSetPlan = {
  name: "sallyport-dst4-aaaa",
  family: 4,
  members: ["0.0.0.0/1", "128.0.0.0/1"],
  nomatch: ["10.1.0.0/16"],
};

describe("parseIpsetSave()", () => {
  it("reads members in canonical CIDR form, nomatch entries apart", () => {
    const sets = parseIpsetSave(SAVE);
    assert.deepEqual(
      [...sets.get("sallyport-src4-aaaa")!.members],
      ["172.29.1.5/32", "172.29.1.6/32"],
    );
    assert.deepEqual([...sets.get("sallyport-dst4-aaaa")!.nomatch], ["10.1.0.0/16"]);
    assert.equal(sets.get("sallyport-old6")!.family, 6);
  });
});

describe("diffIpsets()", () => {
  const actual = parseIpsetSave(SAVE);

  it("adds and deletes single members when the change is small", () => {
    const d = diffIpsets([src(["172.29.1.5/32", "172.29.1.6/32", "172.29.1.7/32"]), dst], actual);
    assert.equal(d.update, "add sallyport-src4-aaaa 172.29.1.7/32\n");
    assert.deepEqual(d.members, { added: 1, removed: 0 });
  });

  it("rebuilds and swaps a set when most of it changes", () => {
    const d = diffIpsets([src(["172.29.9.1/32", "172.29.9.2/32", "172.29.9.3/32"]), dst], actual);
    assert.deepEqual(d.swapped, ["sallyport-src4-aaaa"]);
    assert.match(d.update, /^swap sallyport-src4-aaaa-tmp sallyport-src4-aaaa$/m);
    assert.match(d.update, /^destroy sallyport-src4-aaaa-tmp$/m);
  });

  it("destroys our stale sets after the rules, and never names a set that is not ours", () => {
    const d = diffIpsets([src(["172.29.1.5/32", "172.29.1.6/32"]), dst], actual);
    assert.equal(d.update, "");
    assert.equal(d.destroy, "destroy sallyport-old6\n");
  });

  it("makes the kernel's sets equal to the desired ones (property over add/del sequences)", () => {
    const pool = Array.from({ length: 12 }, (_, i) => `172.29.0.${i + 1}/32`);
    fc.assert(
      fc.property(fc.subarray(pool), fc.subarray(pool), (before, after) => {
        const state = parseIpsetSave(renderIpsets([src(before)]));
        const d = diffIpsets([src(after)], state);
        // Apply the restore lines to our model of the kernel.
        const sets = new Map([...state].map(([k, v]) => [k, new Set(v.members)]));
        for (const line of d.update.split("\n").filter(Boolean)) {
          const [verb, name, arg, arg2] = line.split(" ");
          if (verb === "create") sets.set(name!, sets.get(name!) ?? new Set());
          else if (verb === "flush") sets.set(name!, new Set());
          else if (verb === "add") sets.get(name!)!.add(arg!);
          else if (verb === "del") sets.get(name!)!.delete(arg!);
          else if (verb === "swap") {
            const a = sets.get(name!)!;
            sets.set(name!, sets.get(arg!)!);
            sets.set(arg!, a);
          } else if (verb === "destroy") sets.delete(name!);
          void arg2;
        }
        assert.deepEqual([...(sets.get("sallyport-src4-aaaa") ?? [])].sort(), [...after].sort());
      }),
    );
  });
});
