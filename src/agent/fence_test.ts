import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { cutOff } from "./fence.ts";

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
