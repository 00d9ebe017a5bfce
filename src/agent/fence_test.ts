import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { FakeClock } from "../lib/clock.ts";
import { silentLogger } from "../lib/log.ts";
import { cutOff, Fence } from "./fence.ts";

describe("cutOff() (when a gateway must stop answering for its egress IPs)", () => {
  it("not while its lease is valid", () => {
    assert.equal(cutOff({ leaseValid: true, peers: 1, heard: [true] }), false);
  });
  it("yes when its lease expired and a peer still reaches the API server (a partition)", () => {
    assert.equal(cutOff({ leaseValid: false, peers: 1, heard: [true] }), true);
  });
  it("not when every peer it hears fails to reach the API server too (an outage for all)", () => {
    assert.equal(cutOff({ leaseValid: false, peers: 2, heard: [false, false] }), false);
  });
  it("yes when it hears no peer at all (cut off from everything)", () => {
    assert.equal(cutOff({ leaseValid: false, peers: 1, heard: [] }), true);
  });
  it("not when no other node could take its egress IPs over", () => {
    assert.equal(cutOff({ leaseValid: false, peers: 0, heard: [] }), false);
  });
  it("yes as soon as one peer reaches the API server", () => {
    assert.equal(cutOff({ leaseValid: false, peers: 2, heard: [false, true] }), true);
  });
});

describe("Fence.holding() (what a plan may hold, decided when the plan is made)", () => {
  it("says no as soon as the lease is no longer valid, without waiting for a tick, and renews nothing then", async () => {
    const clock = new FakeClock();
    let leaseValid = true;
    let holdingTicks = 0;
    const changes: boolean[] = [];
    const fence = new Fence({
      node: "node-2",
      clock,
      log: silentLogger,
      port: 7800,
      periodMs: 250,
      durationMs: 1000,
      leaseValid: () => leaseValid,
      apiReachable: () => true,
      peers: () => new Map([["node-3", "192.0.2.3"]]),
      onChange: (fenced) => changes.push(fenced),
      onHolding: () => holdingTicks++,
      refresh: () => {},
      freshSince: () => true,
    });
    // Never started: no tick ever runs, as for an agent frozen since its last one.
    assert.equal(fence.holding(), true);
    assert.equal(holdingTicks, 1, "a confirmed holder renews its egress IPs' leases");
    await clock.advance(5000);
    leaseValid = false;
    assert.equal(fence.holding(), false, "the lease ended while it was frozen");
    assert.deepEqual(changes, [true]);
    assert.equal(holdingTicks, 1, "and renews nothing");
  });
});
