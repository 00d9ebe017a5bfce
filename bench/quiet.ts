/** Waiting for a quiet machine before a figure is taken (shared by the benchmarks). */
import { readFileSync } from "node:fs";

/** Busy CPU time of the whole machine (jiffies) and all of it, from /proc/stat. */
function cpuTimes(): { busy: number; total: number } {
  const f = readFileSync("/proc/stat", "utf8")
    .split("\n")[0]!
    .trim()
    .split(/\s+/)
    .slice(1)
    .map(Number);
  const idle = f[3]! + f[4]!;
  const total = f.reduce((a, b) => a + b, 0);
  return { busy: total - idle, total };
}

/** The busy share of the whole machine over each of `seconds` one-second samples. */
async function busySamples(seconds: number): Promise<number[]> {
  const out: number[] = [];
  let last = cpuTimes();
  for (let i = 0; i < seconds; i++) {
    await new Promise((r) => setTimeout(r, 1000));
    const now = cpuTimes();
    out.push((now.busy - last.busy) / Math.max(1, now.total - last.total));
    last = now;
  }
  return out;
}

/**
 * The machine's busy share while it only does its steady work (a running sandbox: the agents'
 * liveness probes and fence renewals, the API server's watches): the median of `seconds`
 * one-second samples. `settle` then waits for that level, not for an idle machine.
 */
export async function steadyShare(seconds = 20): Promise<number> {
  const s = (await busySamples(seconds)).sort((a, b) => a - b);
  return Math.round(s[Math.floor(s.length / 2)]! * 1000) / 1000;
}

/**
 * Waits until the machine is quiet: two consecutive seconds under `busyBelow` (10 % by default;
 * a benchmark that runs a sandbox passes its steady share plus a margin), at most `limitMs`.
 */
export async function settle(
  limitMs = 180_000,
  busyBelow = 0.1,
): Promise<{ settled: boolean; settledMs: number }> {
  const started = performance.now();
  let quiet = 0;
  while (performance.now() - started < limitMs) {
    const [busy] = await busySamples(1);
    quiet = busy! < busyBelow ? quiet + 1 : 0;
    if (quiet >= 2) return { settled: true, settledMs: Math.round(performance.now() - started) };
  }
  return { settled: false, settledMs: Math.round(performance.now() - started) };
}
