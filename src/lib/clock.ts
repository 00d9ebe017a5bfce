/** Time, injected: the real one in processes, a fake one in tests so that no test sleeps. */
export interface Timer {
  cancel(): void;
}

export interface Clock {
  /** Milliseconds, monotonic. */
  now(): number;
  after(ms: number, fn: () => void): Timer;
}

export const realClock: Clock = {
  now: () => performance.now(),
  after(ms, fn) {
    // A deadline computed a moment ago may have passed: now, not Node's warning about it.
    const t = setTimeout(fn, Math.max(0, ms));
    return { cancel: () => clearTimeout(t) };
  },
};

/** A clock that only moves when told to. */
export class FakeClock implements Clock {
  #now = 0;
  #timers: { at: number; fn: () => void; seq: number }[] = [];
  #seq = 0;

  now(): number {
    return this.#now;
  }

  after(ms: number, fn: () => void): Timer {
    const entry = { at: this.#now + Math.max(0, ms), fn, seq: this.#seq++ };
    this.#timers.push(entry);
    return { cancel: () => (this.#timers = this.#timers.filter((t) => t !== entry)) };
  }

  /** Moves time forward, running due timers in order and letting promises settle between them. */
  async advance(ms: number): Promise<void> {
    const target = this.#now + ms;
    for (;;) {
      await settle();
      this.#timers.sort((a, b) => a.at - b.at || a.seq - b.seq);
      const next = this.#timers[0];
      if (next === undefined || next.at > target) break;
      this.#timers.shift();
      this.#now = next.at;
      next.fn();
    }
    this.#now = target;
    await settle();
  }
}

async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await Promise.resolve();
  await new Promise((r) => setImmediate(r));
}
