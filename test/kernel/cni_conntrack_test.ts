/**
 * CNI DEL's cleanup of a pod's connection tracking entries (src/agent/cni_server.ts →
 * deleteConnectionsOf in src/kernel/conntrack.ts) with the real conntrack tool, on entries the
 * kernel holds in a network namespace of its own: those whose original source or destination is
 * one of the pod's addresses go, in both families; another pod's stay; nothing to delete is no
 * failure.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { deleteConnectionsOf } from "../../src/kernel/conntrack.ts";
import { ExecRunner, mustRun } from "../../src/kernel/runner.ts";
import { nsRunner } from "../../src/sandbox/topology.ts";
import { NEEDS_ROOT, uniquePrefix } from "../support/lab.ts";

const POD = { 4: "10.244.1.9", 6: "fd00:244:1::9" };
const OTHER = { 4: "10.244.1.10", 6: "fd00:244:1::10" };
const REMOTE = { 4: "192.168.77.200", 6: "fd00:77::200" };

describe("conntrack -D of a deleted pod's addresses", { skip: NEEDS_ROOT }, () => {
  const ns = `${uniquePrefix("ct")}-n`;
  const host = new ExecRunner();
  const inNs = nsRunner(ns);

  before(async () => {
    await mustRun(host, ["ip", "netns", "add", ns]);
  });
  after(async () => {
    await host.run(["ip", "netns", "del", ns]);
  });

  /** An entry as `conntrack -I` makes it: UDP, unreplied, 120 s. */
  const insert = (src: string, dst: string, sport: number) =>
    mustRun(inNs, [
      "conntrack",
      "-I",
      "-p",
      "udp",
      "-s",
      src,
      "-d",
      dst,
      "--sport",
      String(sport),
      "--dport",
      "8081",
      "-t",
      "120",
    ]);
  const table = async () => {
    const lines: string[] = [];
    for (const family of ["ipv4", "ipv6"]) {
      const out = await mustRun(inNs, ["conntrack", "-L", "-f", family]);
      for (const l of out.split("\n")) {
        const m = /src=(\S+) dst=(\S+) sport=(\d+)/.exec(l);
        if (m !== null) lines.push(`${m[1]} ${m[2]} ${m[3]}`);
      }
    }
    return lines.sort();
  };

  it("deletes the entries from and to the pod's addresses, both families, and no other", async () => {
    for (const f of [4, 6] as const) {
      await insert(POD[f], REMOTE[f], 40001);
      await insert(REMOTE[f], POD[f], 40002);
      await insert(OTHER[f], REMOTE[f], 40003);
    }
    assert.equal((await table()).length, 6);
    assert.equal(await deleteConnectionsOf(inNs, POD[4]), 2);
    assert.equal(await deleteConnectionsOf(inNs, POD[6]), 2);
    assert.deepEqual(await table(), [
      `${OTHER[4]} ${REMOTE[4]} 40003`,
      `${OTHER[6]} ${REMOTE[6]} 40003`,
    ]);
    // conntrack exits 1 when nothing matched: a second DEL is no failure.
    assert.equal(await deleteConnectionsOf(inNs, POD[4]), 0);
    assert.equal(await deleteConnectionsOf(inNs, POD[6]), 0);
  });
});
