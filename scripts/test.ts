/**
 * Runs the whole suite in one `node --test` invocation (one summary for CI), then checks that
 * nothing was left behind: no network namespace, process or temporary directory of ours.
 * Files run one at a time by default: the failover tests measure timing, and two sandboxes on a
 * two-core CI machine would compete for it (TEST_CONCURRENCY=2 halves the time on a bigger one).
 *
 * Tests that mostly wait (`*_slow_test.ts`, e.g. five minutes of a steady cluster that must write
 * nothing) run beside the others in a second process, so that they cost the suite no time; their
 * report is printed after the main one.
 *
 *   node scripts/test.ts           everything
 *   node scripts/test.ts --unit    only the pure tests under src/ (no root, no API server)
 */
import { spawn } from "node:child_process";
import { globSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { leftovers, TEST_PREFIX } from "../test/support/leaks.ts";

const unitOnly = process.argv.includes("--unit");
const all = [
  ...globSync("src/**/*_test.ts"),
  ...(unitOnly ? [] : globSync("test/**/*_test.ts")),
].sort();
const slow = all.filter((f) => f.endsWith("_slow_test.ts"));
const files = all.filter((f) => !slow.includes(f));
const env = { ...process.env, SALLYPORT_TEST_PREFIX: TEST_PREFIX };

/**
 * A hung test (a promise nobody settles, a handle nobody closes) would otherwise hold the suite
 * until CI gives up, with nothing said: past this limit the run is killed, with its files'
 * processes, and the output so far shows which file was running.
 */
const limitMs = Number(process.env.TEST_LIMIT_MINUTES ?? "45") * 60_000;
const children = new Set<number>();
const watchdog = setTimeout(() => {
  console.error(
    `\nThe suite ran past ${limitMs / 60_000} minutes: killed (a test hangs; see above).`,
  );
  for (const pid of children) process.kill(-pid, "SIGKILL");
  process.exit(1);
}, limitMs);
for (const signal of ["SIGINT", "SIGTERM"] as const)
  process.on(signal, () => {
    for (const pid of children) process.kill(-pid, signal);
    process.exit(1);
  });

function run(args: string[], stdio: "inherit" | "ignore"): Promise<number> {
  return new Promise((resolve) => {
    // Its own process group, so that the watchdog reaches the files' processes too.
    const child = spawn(process.execPath, ["--test", ...args], { stdio, env, detached: true });
    if (child.pid !== undefined) children.add(child.pid);
    child.on("exit", (code) => {
      if (child.pid !== undefined) children.delete(child.pid);
      resolve(code ?? 1);
    });
  });
}

const before = leftovers();
const reportDir = mkdtempSync(join(tmpdir(), "sallyport-test-report-"));
const slowReport = join(reportDir, "slow.txt");
const mainReport = join(reportDir, "main.txt");
const waiting =
  slow.length === 0
    ? Promise.resolve(0)
    : run(["--test-reporter=spec", `--test-reporter-destination=${slowReport}`, ...slow], "ignore");
const status = await run(
  [
    "--test-reporter=spec",
    "--test-reporter-destination=stdout",
    "--test-reporter=spec",
    `--test-reporter-destination=${mainReport}`,
    `--test-concurrency=${process.env.TEST_CONCURRENCY ?? "1"}`,
    ...files,
  ],
  "inherit",
);
const slowStatus = await waiting;
clearTimeout(watchdog);
if (slow.length > 0) {
  console.log(`\n--- tests that ran beside the others: ${slow.join(", ")}`);
  console.log(readFileSync(slowReport, "utf8"));
}
// The failures again, last: CI shows the end of the output, and the slow file's report and the
// leak check would otherwise push them out of it.
const failures = readFileSync(mainReport, "utf8").split(/^.*failing tests:$/m)[1];
rmSync(reportDir, { recursive: true, force: true });
const after = leftovers().filter((l) => !before.includes(l));
if (after.length > 0)
  console.error(`\nLeak check failed: the suite left these behind:\n  ${after.join("\n  ")}`);
else console.log("leak check: no namespace, process or directory left behind");
if (status !== 0 && failures !== undefined)
  console.log(`\n--- failing tests, again (their output is above):${failures}`);
process.exit(after.length > 0 ? 1 : status !== 0 ? status : slowStatus);
