import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { FakeClock } from "./clock.ts";
import { MAX_STRETCH, SyncLoop } from "./sync_loop.ts";

function loop(options: {
  periodMs?: number;
  minIntervalMs?: number;
  burst?: number;
  fail?: () => boolean;
  syncMs?: number | (() => number);
  maxShare?: number;
}) {
  const clock = new FakeClock();
  const starts: number[] = [];
  const kinds: ("full" | "partial")[] = [];
  const errors: unknown[] = [];
  const l = new SyncLoop({
    clock,
    periodMs: options.periodMs ?? 10_000,
    minIntervalMs: options.minIntervalMs ?? 0,
    ...(options.burst === undefined ? {} : { burst: options.burst }),
    ...(options.maxShare === undefined ? {} : { maxShare: options.maxShare }),
    retryMs: 1000,
    onError: (e) => errors.push(e),
    sync: async ({ full }) => {
      starts.push(clock.now());
      kinds.push(full ? "full" : "partial");
      const ms = typeof options.syncMs === "function" ? options.syncMs() : options.syncMs;
      if (ms !== undefined) await new Promise<void>((r) => clock.after(ms, r));
      if (options.fail?.()) throw new Error("boom");
    },
  });
  return { clock, starts, kinds, errors, l };
}

describe("SyncLoop", () => {
  it("syncs at start and then every period even when nothing changed", async () => {
    const { clock, starts, l } = loop({ periodMs: 10_000 });
    l.start();
    await clock.advance(35_000);
    assert.deepEqual(starts, [0, 10_000, 20_000, 30_000]);
    l.stop();
  });

  it("with maxShare, stretches the period after a long full sync, at most MAX_STRETCH times, and not after a short one", async () => {
    // Each full sync takes 1 s, then two take 5 s, then 100 ms again.
    const took = [1000, 1000, 5000, 5000, 100, 100];
    const { clock, starts, l } = loop({ maxShare: 0.05, syncMs: () => took.shift() ?? 100 });
    l.start();
    await clock.advance(40_000 + 2 * MAX_STRETCH * 10_000 + 30_000);
    // 1 s is 5 % of 20 s; 5 s would need 100 s: MAX_STRETCH periods at most.
    const stretched = MAX_STRETCH * 10_000;
    assert.ok(stretched < 100_000);
    assert.deepEqual(starts.slice(0, 7), [
      0,
      20_000,
      40_000,
      40_000 + stretched,
      40_000 + 2 * stretched,
      50_000 + 2 * stretched,
      60_000 + 2 * stretched,
    ]);
    assert.equal(l.fullEveryMs, 10_000);
    l.stop();
  });

  it("coalesces triggers that arrive while a sync runs into one more sync", async () => {
    const { clock, starts, l } = loop({ syncMs: 100 });
    l.start();
    await clock.advance(10);
    l.trigger();
    l.trigger();
    l.trigger();
    await clock.advance(1000);
    assert.deepEqual(starts, [0, 100]);
    l.stop();
  });

  it("keeps at least minInterval between syncs", async () => {
    const { clock, starts, l } = loop({ minIntervalMs: 500 });
    l.start();
    await clock.advance(1);
    l.trigger();
    await clock.advance(1000);
    assert.deepEqual(starts, [0, 500]);
    l.stop();
  });

  it("syncs a burst of events at once, then one sync per interval while events keep coming", async () => {
    const { clock, starts, l } = loop({ minIntervalMs: 250, burst: 3, syncMs: 10 });
    l.start();
    await clock.advance(1000);
    // An event every 20 ms for a second.
    for (let t = 0; t < 1000; t += 20) {
      l.trigger();
      await clock.advance(20);
    }
    await clock.advance(1000);
    const during = starts.filter((t) => t >= 1000);
    // Three at once (the burst), then one when a token is back (1040 + 0.84 of 250 ms), then
    // one each 250 ms.
    assert.deepEqual(during.slice(0, 4), [1000, 1020, 1040, 1250]);
    for (let i = 4; i < during.length; i++) assert.equal(during[i]! - during[i - 1]!, 250);
    assert.ok(during.length <= 7, `${during.length} syncs for 50 events`);
    // A lone event after a quiet second is synced at once.
    const lone = clock.now();
    l.trigger();
    await clock.advance(100);
    assert.equal(starts.at(-1), lone);
    l.stop();
  });

  it("starts an urgent request as soon as no sync runs, whatever the tokens", async () => {
    const { clock, starts, l } = loop({ minIntervalMs: 250, burst: 1, syncMs: 10 });
    l.start();
    await clock.advance(20);
    l.trigger();
    await clock.advance(5);
    // The token the start-up sync used comes back at 250: the plain request waits for it.
    assert.deepEqual(starts, [0]);
    l.trigger({ urgent: true });
    await clock.advance(1);
    assert.deepEqual(starts, [0, 25]);
    // The next plain request waits for a token again (the urgent sync used it).
    await clock.advance(20);
    l.trigger();
    await clock.advance(1000);
    assert.deepEqual(starts, [0, 25, 275]);
    l.stop();
  });

  it("retries a failed sync after retryMs instead of waiting a whole period", async () => {
    let failures = 1;
    const { clock, starts, errors, l } = loop({ fail: () => failures-- > 0 });
    l.start();
    await clock.advance(1500);
    assert.deepEqual(starts, [0, 1000]);
    assert.equal(errors.length, 1);
    l.stop();
  });

  it("runs full syncs on their own clock however often events arrive", async () => {
    // A pod relabelled every second must not postpone drift repair (issue: it starved for 80 s).
    const { clock, starts, kinds, l } = loop({ periodMs: 10_000 });
    l.start();
    for (let t = 0; t < 35_000; t += 1000) {
      await clock.advance(1000);
      l.trigger();
    }
    const fullAt = starts.filter((_, i) => kinds[i] === "full");
    assert.deepEqual(fullAt, [0, 10_000, 20_000, 30_000]);
    assert.ok(kinds.filter((k) => k === "partial").length >= 30, "events still sync at once");
    l.stop();
  });

  it("makes the sync after a failure a full one, with backoff between failures", async () => {
    let failures = 3;
    const { clock, starts, kinds, l } = loop({ fail: () => failures-- > 0 });
    l.start();
    await clock.advance(8000);
    assert.deepEqual(starts, [0, 1000, 3000, 7000]);
    assert.deepEqual(kinds, ["full", "full", "full", "full"]);
    l.trigger();
    await clock.advance(1);
    assert.equal(kinds.at(-1), "partial", "after a success, events sync partially again");
    l.stop();
  });

  it("syncs partially on events between full syncs", async () => {
    const { clock, starts, kinds, l } = loop({ periodMs: 10_000 });
    l.start();
    await clock.advance(2000);
    l.trigger();
    await clock.advance(1);
    assert.deepEqual(starts, [0, 2000]);
    assert.deepEqual(kinds, ["full", "partial"]);
    l.stop();
  });

  it("counts a timer that fires a millisecond early (libuv's ms clock) as the full sync it is", async () => {
    class EarlyClock extends FakeClock {
      override after(ms: number, fn: () => void) {
        return super.after(Math.max(0, ms - 1), fn);
      }
    }
    const clock = new EarlyClock();
    const kinds: boolean[] = [];
    const l = new SyncLoop({
      clock,
      periodMs: 1000,
      sync: async ({ full }) => {
        kinds.push(full);
        // A regression would spin here (each early timer re-armed for the same deadline).
        if (kinds.length > 50) l.stop();
      },
    });
    l.start();
    await clock.advance(5500);
    l.stop();
    assert.deepEqual(kinds, [true, true, true, true, true, true], "no partial sync without events");
  });

  it("stops", async () => {
    const { clock, starts, l } = loop({});
    l.start();
    await clock.advance(1);
    l.stop();
    l.trigger();
    await clock.advance(60_000);
    assert.deepEqual(starts, [0]);
  });
});

describe("SyncLoop.idle()", () => {
  it("waits for a triggered sync that has not started yet", async () => {
    const { clock, starts, l } = loop({});
    l.start();
    let idle = false;
    void l.idle().then(() => {
      idle = true;
    });
    await Promise.resolve();
    assert.equal(idle, false, "the first sync is still to run");
    await clock.advance(1);
    assert.deepEqual(starts, [0]);
    assert.equal(idle, true);
    l.stop();
  });
});
