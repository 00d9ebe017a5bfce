/**
 * Golden files: compare text with `testdata/<name>`; `UPDATE_GOLDEN=1 make test` rewrites them.
 * A mismatch fails with a line diff so that the change is readable in the test output.
 */
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";

export function assertGolden(path: string, actual: string): void {
  if (process.env.UPDATE_GOLDEN === "1") {
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, actual);
    return;
  }
  assert.ok(existsSync(path), `golden file ${path} is missing: run UPDATE_GOLDEN=1 make test once`);
  const expected = readFileSync(path, "utf8");
  if (expected === actual) return;
  const e = expected.split("\n");
  const a = actual.split("\n");
  const diff: string[] = [];
  for (let i = 0; i < Math.max(e.length, a.length); i++) {
    if (e[i] !== a[i])
      diff.push(`line ${i + 1}:\n  - ${e[i] ?? "<none>"}\n  + ${a[i] ?? "<none>"}`);
    if (diff.length >= 20) break;
  }
  assert.fail(`${path} differs (UPDATE_GOLDEN=1 to accept):\n${diff.join("\n")}`);
}
