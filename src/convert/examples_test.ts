/**
 * The migration examples of examples/migration/ and what `sallyport convert` prints for them
 * (`*.converted.yaml` on stdout, `*.warnings.txt` on stderr): docs/operations.md quotes them.
 * `UPDATE_GOLDEN=1` rewrites the outputs.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, it } from "node:test";
import { runConvert } from "../cli/convert.ts";
import { runValidate } from "../cli/validate.ts";
import { assertGolden } from "../testing/golden.ts";

const EXAMPLES = join(import.meta.dirname, "..", "..", "examples", "migration");

describe("examples/migration", () => {
  for (const name of ["cilium", "spidernet"]) {
    it(`${name}.yaml converts to ${name}.converted.yaml, which validates`, () => {
      const r = runConvert([join(EXAMPLES, `${name}.yaml`)], "yaml");
      assert.equal(r.error, undefined);
      assertGolden(join(EXAMPLES, `${name}.converted.yaml`), r.stdout);
      assertGolden(
        join(EXAMPLES, `${name}.warnings.txt`),
        r.warnings.map((w) => `${w}\n`).join(""),
      );
      const valid = runValidate([join(EXAMPLES, `${name}.converted.yaml`)]);
      assert.ok(valid.length >= 2);
    });
  }
});
