import assert from "node:assert/strict";
import { describe, it } from "node:test";
import fc from "fast-check";
import { FakeClock } from "../lib/clock.ts";
import {
  defaultRateLimiter,
  ExponentialBackoff,
  type Priority,
  type RateLimiter,
  runWorkers,
  TokenBucket,
  WorkQueue,
} from "./workqueue.ts";

function setup(rateLimiter?: (clock: FakeClock) => RateLimiter) {
  const clock = new FakeClock();
  const queue = new WorkQueue({
    clock,
    ...(rateLimiter === undefined ? {} : { rateLimiter: rateLimiter(clock) }),
  });
  return { clock, queue };
}

/** Every key ready now, in order, each marked done at once. */
async function drain(queue: WorkQueue): Promise<string[]> {
  const keys: string[] = [];
  while (queue.len > 0) {
    const key = (await queue.get())!;
    keys.push(key);
    queue.done(key);
  }
  return keys;
}

/** Resolves after `ms` of fake time: a handler that takes a while. */
const work = (clock: FakeClock, ms: number) => new Promise<void>((r) => clock.after(ms, r));

describe("WorkQueue: add, get, done", () => {
  it("holds a waiting key once however often it is added, first in first out", async () => {
    const { queue } = setup();
    for (const key of ["a", "b", "a", "c", "b", "a"]) queue.add(key);
    assert.equal(queue.len, 3);
    assert.deepEqual(await drain(queue), ["a", "b", "c"]);
  });

  it("never hands a key being processed to a second worker", async () => {
    const { queue } = setup();
    queue.add("a");
    assert.equal(await queue.get(), "a");
    queue.add("a");
    assert.equal(queue.len, 0, "a is processing: the new add waits for done()");
    let second: string | undefined;
    void queue.get().then((k) => {
      second = k;
    });
    await Promise.resolve();
    assert.equal(second, undefined);
    queue.done("a");
    await Promise.resolve();
    assert.equal(second, "a");
  });

  it("queues a key added during its processing once more at done(), however often it was added", async () => {
    const { queue } = setup();
    queue.add("a");
    await queue.get();
    queue.add("a");
    queue.add("b");
    queue.add("a");
    queue.done("a");
    assert.deepEqual(await drain(queue), ["b", "a"]);
    queue.done("a");
    assert.equal(queue.len, 0);
  });

  it("stays first in first out across thousands of keys (the ready list is compacted as it goes)", async () => {
    const { queue } = setup();
    const keys = Array.from({ length: 5000 }, (_, i) => `k${i}`);
    for (const key of keys.slice(0, 3000)) queue.add(key);
    const got: string[] = [];
    for (let i = 0; i < 2000; i++) {
      got.push((await queue.get())!);
      queue.done(got.at(-1)!);
    }
    for (const key of keys.slice(3000)) queue.add(key);
    got.push(...(await drain(queue)));
    assert.deepEqual(got, keys);
  });

  it("does not queue a key again at done() when nobody added it meanwhile", async () => {
    const { queue } = setup();
    queue.add("a");
    await queue.get();
    queue.done("a");
    queue.done("a");
    assert.equal(queue.len, 0);
  });

  it("hands out each added key once per add-since-last-start, never one processing (random operations)", () =>
    fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.oneof(
            fc.record({
              op: fc.constant("add" as const),
              key: fc.constantFrom("a", "b", "c"),
              priority: fc.constantFrom<Priority>("high", "low"),
            }),
            fc.record({ op: fc.constant("get" as const) }),
            fc.record({ op: fc.constant("done" as const), pick: fc.nat() }),
          ),
          { maxLength: 40 },
        ),
        async (ops) => {
          const { queue } = setup();
          const processing: string[] = [];
          // Keys added since their last hand-out began, at the highest priority they were added
          // at: exactly what the queue still owes.
          const owed = new Map<string, Priority>();
          const take = async () => {
            const waitingHigh = [...owed].some(([k, p]) => p === "high" && !processing.includes(k));
            const key = (await queue.get())!;
            const priority = owed.get(key);
            assert.ok(owed.delete(key), `${key} handed out without an add`);
            assert.ok(!processing.includes(key), `${key} handed out while processing`);
            assert.ok(
              !waitingHigh || priority === "high",
              `low ${key} handed out before a high key`,
            );
            processing.push(key);
          };
          for (const o of ops) {
            if (o.op === "add") {
              queue.add(o.key, o.priority);
              owed.set(o.key, owed.get(o.key) === "high" ? "high" : o.priority);
            } else if (o.op === "get" && queue.len > 0) await take();
            else if (o.op === "done" && processing.length > 0)
              queue.done(processing.splice(o.pick % processing.length, 1)[0]!);
            const waiting = [...owed.keys()].filter((k) => !processing.includes(k));
            assert.equal(
              queue.len,
              waiting.length,
              "dedup: each owed key not processing waits once",
            );
          }
          for (;;) {
            while (queue.len > 0) await take();
            const key = processing.pop();
            if (key === undefined) break;
            queue.done(key);
          }
          assert.deepEqual([...owed], [], "no add was lost");
        },
      ),
    ));
});

describe("WorkQueue: priorities", () => {
  it("hands out every high key waiting before any low one, each priority first in first out", async () => {
    const { queue } = setup();
    queue.add("slices-a", "low");
    queue.add("status-a");
    queue.add("slices-b", "low");
    queue.add("status-b", "high");
    assert.equal(queue.len, 4);
    assert.deepEqual(await drain(queue), ["status-a", "status-b", "slices-a", "slices-b"]);
  });

  it("raises a low key added again at high, hands it out once, and never lowers a high one", async () => {
    const { queue } = setup();
    queue.add("a", "low");
    queue.add("b", "low");
    queue.add("c");
    queue.add("b");
    queue.add("c", "low");
    assert.equal(queue.len, 3, "b is waiting once");
    assert.deepEqual(await drain(queue), ["c", "b", "a"]);
    assert.equal(queue.len, 0);
  });

  it("queues a key added during its processing at the priority it was added at", async () => {
    const { queue } = setup();
    queue.add("a");
    assert.equal(await queue.get(), "a");
    queue.add("a", "low");
    queue.add("b");
    queue.done("a");
    assert.deepEqual(await drain(queue), ["b", "a"]);
  });

  it("adds a delayed key at its priority, raised by a high add of the same key meanwhile", async () => {
    const { clock, queue } = setup();
    queue.addAfter("report-a", 100, "low");
    queue.addAfter("report-b", 100, "low");
    queue.addAfter("report-b", 200);
    queue.add("status");
    assert.equal(await queue.get(), "status", "the high key goes first");
    await clock.advance(100);
    queue.add("status-2");
    assert.deepEqual(await drain(queue), ["report-b", "status-2", "report-a"]);
    queue.done("status");
  });

  it("retries a failed key at the priority it failed at", async () => {
    const { clock, queue } = setup(() => new ExponentialBackoff({ baseMs: 10, maxMs: 10 }));
    queue.add("low", "low");
    assert.equal(await queue.get(), "low");
    queue.addRateLimited("low");
    queue.done("low");
    await clock.advance(10);
    queue.add("high");
    assert.deepEqual(await drain(queue), ["high", "low"]);
  });
});

describe("WorkQueue.addAfter()", () => {
  it("adds keys when their time comes, in order of time and then of arrival", async () => {
    const { clock, queue } = setup();
    queue.addAfter("a", 300);
    queue.addAfter("b", 100);
    queue.addAfter("c", 200);
    queue.addAfter("d", 100);
    await clock.advance(99);
    assert.equal(queue.len, 0);
    await clock.advance(1);
    assert.deepEqual(await drain(queue), ["b", "d"]);
    await clock.advance(200);
    assert.deepEqual(await drain(queue), ["c", "a"]);
  });

  it("keeps the earlier time when a waiting key is added again", async () => {
    const { clock, queue } = setup();
    queue.addAfter("a", 500);
    queue.addAfter("a", 100);
    queue.addAfter("a", 300);
    await clock.advance(100);
    assert.deepEqual(await drain(queue), ["a"]);
    await clock.advance(1000);
    assert.equal(queue.len, 0, "the superseded times add nothing");
  });

  it("adds at once without a positive delay", () => {
    const { queue } = setup();
    queue.addAfter("a", 0);
    queue.addAfter("b", -5);
    assert.equal(queue.len, 2);
  });
});

describe("rate limiters", () => {
  it("back off exponentially per key from 5 ms, doubling up to the cap", () => {
    const backoff = new ExponentialBackoff({ baseMs: 5, maxMs: 100 });
    const delays = Array.from({ length: 8 }, () => backoff.when("a"));
    assert.deepEqual(delays, [5, 10, 20, 40, 80, 100, 100, 100]);
    assert.equal(backoff.when("b"), 5, "each key has its own backoff");
    assert.equal(backoff.numRequeues("a"), 8);
  });

  it("cap at 1000 s by default, however many failures", () => {
    const clock = new FakeClock();
    const limiter = defaultRateLimiter(clock, { burst: 1e9 });
    let last = 0;
    for (let i = 0; i < 2000; i++) last = limiter.when("a");
    assert.equal(last, 1_000_000);
  });

  it("start again from the base after forget()", () => {
    const { queue } = setup();
    for (let i = 0; i < 5; i++) queue.addRateLimited("a");
    assert.equal(queue.numRequeues("a"), 5);
    queue.forget("a");
    assert.equal(queue.numRequeues("a"), 0);
    const backoff = new ExponentialBackoff({ baseMs: 5, maxMs: 1000 });
    backoff.when("a");
    backoff.when("a");
    backoff.forget("a");
    assert.equal(backoff.when("a"), 5);
  });

  it("let a burst of 100 through, then 10 per second, as a token bucket", async () => {
    const clock = new FakeClock();
    const bucket = new TokenBucket(clock, { perSecond: 10, burst: 100 });
    const delays = Array.from({ length: 103 }, () => bucket.when());
    assert.deepEqual(delays.slice(0, 100), Array(100).fill(0));
    assert.deepEqual(delays.slice(100), [100, 200, 300]);
    await clock.advance(1000);
    assert.equal(bucket.when(), 0, "a second earned 10 tokens, 3 of them already spent");
  });

  it("refuse a bucket that never refills, naming the fix", () =>
    assert.throws(
      () => new TokenBucket(new FakeClock(), { perSecond: 0, burst: 100 }),
      /0 per second.*must be positive/,
    ));
});

describe("WorkQueue.addRateLimited()", () => {
  it("limits a burst of failing keys overall: 100 at once, then 10 per second", async () => {
    const { clock, queue } = setup();
    for (let i = 0; i < 150; i++) queue.addRateLimited(`k${i}`);
    await clock.advance(5);
    assert.equal(queue.len, 100, "the burst, after the 5 ms base backoff");
    await clock.advance(95);
    assert.equal(queue.len, 101);
    await clock.advance(900);
    assert.equal(queue.len, 110);
    assert.deepEqual((await drain(queue)).slice(98), [
      "k98",
      "k99",
      ...Array.from({ length: 10 }, (_, i) => `k${100 + i}`),
    ]);
  });

  it("uses the rate limiter it is given", async () => {
    const { clock, queue } = setup(() => new ExponentialBackoff({ baseMs: 1000, maxMs: 4000 }));
    queue.addRateLimited("a");
    await clock.advance(999);
    assert.equal(queue.len, 0);
    await clock.advance(1);
    assert.equal(queue.len, 1);
  });
});

describe("WorkQueue.shutDown()", () => {
  it("hands out nothing more, ignores adds and ends pending gets", async () => {
    const { clock, queue } = setup();
    const pending = queue.get();
    queue.shutDown();
    assert.equal(await pending, undefined);
    queue.add("a");
    queue.addAfter("b", 10);
    queue.addRateLimited("c");
    await clock.advance(1000);
    assert.equal(queue.len, 0);
    assert.equal(await queue.get(), undefined);
  });

  it("drops what was still queued or delayed: a replica that lost leadership writes nothing more", async () => {
    const { clock, queue } = setup();
    queue.add("a");
    queue.addAfter("b", 10);
    queue.shutDown();
    await clock.advance(100);
    assert.equal(queue.len, 0);
    assert.equal(await queue.get(), undefined);
  });
});

describe("runWorkers()", () => {
  it("processes keys on N workers, one key by one worker at a time", async () => {
    const { clock, queue } = setup();
    const active = new Set<string>();
    let most = 0;
    const handled: string[] = [];
    const finished = runWorkers(queue, {
      workers: 3,
      handle: async (key) => {
        assert.ok(!active.has(key), `${key} processed twice at once`);
        active.add(key);
        most = Math.max(most, active.size);
        await work(clock, 100);
        handled.push(key);
        active.delete(key);
      },
    });
    for (const key of ["a", "b", "c", "d"]) queue.add(key);
    await clock.advance(10);
    queue.add("a"); // processing: once more after it is done
    queue.add("a");
    await clock.advance(1000);
    assert.equal(most, 3);
    assert.deepEqual(handled, ["a", "b", "c", "d", "a"]);
    queue.shutDown();
    await finished;
  });

  it("retries a failing key with a growing delay, and forgets its failures once it succeeds", async () => {
    const { clock, queue } = setup();
    const attempts: number[] = [];
    const errors: [string, string, number][] = [];
    let failures = 3;
    const finished = runWorkers(queue, {
      workers: 2,
      handle: (key) => {
        attempts.push(clock.now());
        if (failures-- > 0) throw new Error(`cannot sync ${key}`);
      },
      onError: (key, error, requeues) => errors.push([key, (error as Error).message, requeues]),
    });
    queue.add("a");
    await clock.advance(1000);
    assert.deepEqual(attempts, [0, 5, 15, 35], "5, 10 then 20 ms after each failure");
    assert.deepEqual(errors, [
      ["a", "cannot sync a", 1],
      ["a", "cannot sync a", 2],
      ["a", "cannot sync a", 3],
    ]);
    assert.equal(queue.numRequeues("a"), 0, "success forgot the failures");
    queue.shutDown();
    await finished;
  });

  it("ends after shutDown() once the keys being processed are done", async () => {
    const { clock, queue } = setup();
    const handled: string[] = [];
    const finished = runWorkers(queue, {
      workers: 2,
      handle: async (key) => {
        await work(clock, 1000);
        handled.push(key);
      },
    });
    for (const key of ["a", "b", "c"]) queue.add(key);
    await clock.advance(10);
    let ended = false;
    void finished.then(() => {
      ended = true;
    });
    queue.shutDown();
    await clock.advance(500);
    assert.equal(ended, false, "a and b are still being processed");
    await clock.advance(500);
    assert.equal(ended, true);
    assert.deepEqual(handled, ["a", "b"], "c was never started");
  });

  it("refuses a number of workers that is not a whole number of at least 1", () => {
    const { queue } = setup();
    assert.throws(
      () => runWorkers(queue, { workers: 0, handle: () => {} }),
      /Cannot run 0 workers/,
    );
  });
});
