import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { FakeClock } from "../lib/clock.ts";
import { silentLogger } from "../lib/log.ts";
import type { KubeClient } from "./client.ts";
import { NodeLeaseRenewer } from "./node_lease.ts";

/** A client whose lease patches succeed or fail as the test says. */
function fakeClient(state: { up: boolean; patches: number }): KubeClient {
  return {
    mergePatch: async () => {
      state.patches++;
      if (!state.up) throw new Error("fetch failed");
      return {};
    },
  } as unknown as KubeClient;
}

function renewer(api: { up: boolean; patches: number }, clock: FakeClock): NodeLeaseRenewer {
  return new NodeLeaseRenewer({
    client: fakeClient(api),
    namespace: "sallyport-system",
    node: "n1",
    clock,
    log: silentLogger,
    timing: { renewMs: 250, durationMs: 1000, graceMs: 250 },
  });
}

describe("NodeLeaseRenewer", () => {
  it("reports the API server unreachable from the first failed renewal, and the lease invalid only after D", async () => {
    const clock = new FakeClock();
    const api = { up: true, patches: 0 };
    const r = renewer(api, clock);
    r.start({ create: true });
    await clock.advance(600);
    assert.ok(api.patches >= 3, `renewed every period (${api.patches} patches)`);
    assert.equal(r.valid, true);
    assert.equal(r.apiReachable, true);

    api.up = false;
    await clock.advance(260);
    assert.equal(r.apiReachable, false, "one failed attempt is reported to peers at once");
    assert.equal(r.valid, true, "the lease itself still runs");
    await clock.advance(1000);
    assert.equal(r.valid, false, "no renewal started in the last D succeeded");

    api.up = true;
    await clock.advance(260);
    assert.equal(r.apiReachable, true);
    assert.equal(r.valid, true);
    r.stop();
  });

  it("tries again within a second after a failure, at kubelet's pace while it succeeds", async () => {
    const clock = new FakeClock();
    const api = { up: true, patches: 0 };
    const r = new NodeLeaseRenewer({
      client: fakeClient(api),
      namespace: "sallyport-system",
      node: "n1",
      clock,
      log: silentLogger,
      timing: { renewMs: 10_000, durationMs: 40_000, graceMs: 10_000 },
    });
    r.start({ create: true });
    await clock.advance(30_000);
    assert.equal(api.patches, 4, "every 10 s while it succeeds");
    api.up = false;
    await clock.advance(10_000);
    const failing = api.patches;
    await clock.advance(5000);
    assert.ok(
      api.patches - failing >= 5,
      `every second while it fails (${api.patches - failing} in 5 s)`,
    );
    api.up = true;
    await clock.advance(1000);
    assert.equal(r.apiReachable, true, "renewed within a second of the API server's return");
    const back = api.patches;
    await clock.advance(9000);
    assert.equal(api.patches, back, "then at kubelet's pace again");
    r.stop();
  });

  it("counts as valid and reachable while stopped (a node that holds no egress IP)", async () => {
    const clock = new FakeClock();
    const api = { up: false, patches: 0 };
    const r = renewer(api, clock);
    r.start();
    await clock.advance(2000);
    assert.equal(r.valid, false);
    r.stop();
    assert.equal(r.valid, true);
    assert.equal(r.apiReachable, true);
    const before = api.patches;
    await clock.advance(1000);
    assert.equal(api.patches, before, "no renewals after stop()");
  });
});
