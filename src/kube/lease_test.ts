import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { FakeClock } from "../lib/clock.ts";
import { silentLogger } from "../lib/log.ts";
import { ApiError, type KubeClient } from "./client.ts";
import { LeaderElector, type Lease } from "./lease.ts";

/**
 * One Lease in memory, compare-and-swap on resourceVersion like the API server. While `held`,
 * every write waits until the test releases it (an attempt under way when the elector stops).
 */
class LeaseStore {
  lease: Lease | undefined;
  #version = 0;
  #held: (() => void)[] = [];
  held = false;

  release(): void {
    this.held = false;
    for (const go of this.#held.splice(0)) go();
  }

  get pending(): number {
    return this.#held.length;
  }

  async #gate(): Promise<void> {
    if (this.held) await new Promise<void>((r) => this.#held.push(r));
  }

  client(): KubeClient {
    return {
      get: async () => {
        if (this.lease === undefined) throw new ApiError("GET", "/lease", 404, {});
        return structuredClone(this.lease);
      },
      create: async (_: unknown, lease: Lease) => {
        await this.#gate();
        this.lease = {
          ...lease,
          metadata: { ...lease.metadata, resourceVersion: `${++this.#version}` },
        };
        return this.lease;
      },
      replace: async (_: unknown, lease: Lease) => {
        await this.#gate();
        if (lease.metadata.resourceVersion !== this.lease?.metadata.resourceVersion)
          throw new ApiError("PUT", "/lease", 409, {});
        this.lease = {
          ...lease,
          metadata: { ...lease.metadata, resourceVersion: `${++this.#version}` },
        };
        return this.lease;
      },
    } as unknown as KubeClient;
  }
}

function elector(store: LeaseStore, clock: FakeClock, events: string[]): LeaderElector {
  return new LeaderElector({
    client: store.client(),
    namespace: "sallyport-system",
    name: "sallyport-controller",
    identity: "replica-a",
    clock,
    log: silentLogger,
    onStartedLeading: () => events.push("started"),
    onStoppedLeading: () => events.push("stopped"),
  });
}

describe("LeaderElector", () => {
  it("takes a free lease, renews it, and releases it on stop", async () => {
    const clock = new FakeClock();
    const store = new LeaseStore();
    const events: string[] = [];
    const e = elector(store, clock, events);
    e.start();
    await clock.advance(0);
    assert.deepEqual(events, ["started"]);
    assert.equal(store.lease?.spec.holderIdentity, "replica-a");
    await clock.advance(2000);
    assert.notEqual(store.lease?.metadata.resourceVersion, "1", "renewed after the retry period");
    await e.stop();
    assert.equal(store.lease?.spec.holderIdentity, null, "released for the next replica");
    assert.deepEqual(events, ["started"], "stopping is not losing leadership");
  });

  it("never starts leading after stop, even when an acquisition under way succeeds", async () => {
    const clock = new FakeClock();
    const store = new LeaseStore();
    store.held = true;
    const events: string[] = [];
    const e = elector(store, clock, events);
    e.start();
    await clock.advance(0);
    assert.equal(store.pending, 1, "the acquisition is under way");
    const stopped = e.stop();
    store.release();
    await stopped;
    await clock.advance(10_000);
    assert.deepEqual(events, [], "told nobody to lead");
    assert.equal(store.lease?.spec.holderIdentity, null, "what the late attempt took is released");
  });

  it("releases after a renewal under way, not before it (the renewal would take it back)", async () => {
    const clock = new FakeClock();
    const store = new LeaseStore();
    const events: string[] = [];
    const e = elector(store, clock, events);
    e.start();
    await clock.advance(0);
    assert.deepEqual(events, ["started"]);
    store.held = true;
    await clock.advance(2000);
    assert.equal(store.pending, 1, "a renewal is under way");
    const stopped = e.stop();
    await clock.advance(0); // stop() does what it does before the renewal lands
    store.release();
    await stopped;
    assert.equal(store.lease?.spec.holderIdentity, null);
    assert.deepEqual(events, ["started"]);
  });
});
