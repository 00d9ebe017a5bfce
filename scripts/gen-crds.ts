/**
 * Writes deploy/crds/*.yaml from the TypeBox schemas. `make test` fails when they are stale
 * (src/api/crds_test.ts), so run `npm run gen` after changing src/api/types.ts.
 */
import { readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { renderCrdFiles } from "../src/api/crds.ts";

const dir = join(import.meta.dirname, "..", "deploy", "crds");
const files = renderCrdFiles();
for (const existing of readdirSync(dir)) {
  if (existing.endsWith(".yaml") && !files.has(existing)) rmSync(join(dir, existing));
}
for (const [name, text] of files) writeFileSync(join(dir, name), text);
console.log(`wrote ${files.size} CRDs to ${dir}`);
