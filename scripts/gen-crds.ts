/**
 * Writes the CRDs from the TypeBox schemas to deploy/crds/ and to the Helm chart's crds/
 * (charts/sallyport/crds/), the same files. `make test` fails when either is stale
 * (src/api/crds_test.ts, test/chart/chart_test.ts), so run it after changing src/api/types.ts.
 */
import { readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { renderCrdFiles } from "../src/api/crds.ts";

const REPO = join(import.meta.dirname, "..");
const CRD_DIRS = [join(REPO, "deploy", "crds"), join(REPO, "charts", "sallyport", "crds")];

const files = renderCrdFiles();
for (const dir of CRD_DIRS) {
  for (const existing of readdirSync(dir)) {
    if (existing.endsWith(".yaml") && !files.has(existing)) rmSync(join(dir, existing));
  }
  for (const [name, text] of files) writeFileSync(join(dir, name), text);
  console.log(`wrote ${files.size} CRDs to ${dir}`);
}
