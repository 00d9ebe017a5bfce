/**
 * Runs the whole suite in one `node --test` invocation (one summary for CI), then checks that
 * nothing was left behind: no network namespace, process or temporary directory of ours.
 * Files run one at a time by default: the failover tests measure timing, and two sandboxes on a
 * two-core CI machine would compete for it (TEST_CONCURRENCY=2 halves the time on a bigger one).
 *
 *   node scripts/test.ts           everything
 *   node scripts/test.ts --unit    only the pure tests under src/ (no root, no API server)
 */
import { spawnSync } from "node:child_process";
import { globSync } from "node:fs";
import { leftovers, TEST_PREFIX } from "../test/support/leaks.ts";

const unitOnly = process.argv.includes("--unit");
const files = [
  ...globSync("src/**/*_test.ts"),
  ...(unitOnly ? [] : globSync("test/**/*_test.ts")),
].sort();

const before = leftovers();
const run = spawnSync(
  process.execPath,
  [
    "--test",
    "--test-reporter=spec",
    `--test-concurrency=${process.env.TEST_CONCURRENCY ?? "1"}`,
    ...files,
  ],
  { stdio: "inherit", env: { ...process.env, SALLYPORT_TEST_PREFIX: TEST_PREFIX } },
);
const after = leftovers().filter((l) => !before.includes(l));
if (after.length > 0) {
  console.error(`\nLeak check failed: the suite left these behind:\n  ${after.join("\n  ")}`);
  process.exit(1);
}
console.log("leak check: no namespace, process or directory left behind");
process.exit(run.status ?? 1);
