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

/**
 * Waits until the machine is quiet: two consecutive seconds under 10 % busy, at most `limitMs`.
 */
export async function settle(limitMs = 180_000): Promise<{ settled: boolean; settledMs: number }> {
  const started = performance.now();
  let quiet = 0;
  let last = cpuTimes();
  while (performance.now() - started < limitMs) {
    await new Promise((r) => setTimeout(r, 1000));
    const now = cpuTimes();
    const busy = (now.busy - last.busy) / Math.max(1, now.total - last.total);
    last = now;
    quiet = busy < 0.1 ? quiet + 1 : 0;
    if (quiet >= 2) return { settled: true, settledMs: Math.round(performance.now() - started) };
  }
  return { settled: false, settledMs: Math.round(performance.now() - started) };
}
