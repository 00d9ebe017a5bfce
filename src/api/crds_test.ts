import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import { allCrds, renderCrdFiles } from "./crds.ts";

const dir = join(import.meta.dirname, "..", "..", "deploy", "crds");

function walk(
  schema: unknown,
  path: string,
  visit: (s: Record<string, unknown>, path: string) => void,
): void {
  if (schema === null || typeof schema !== "object") return;
  const s = schema as Record<string, unknown>;
  visit(s, path);
  for (const [k, v] of Object.entries(s.properties ?? {})) walk(v, `${path}.${k}`, visit);
  if (s.items !== undefined) walk(s.items, `${path}[]`, visit);
  if (typeof s.additionalProperties === "object") walk(s.additionalProperties, `${path}.*`, visit);
}

describe("CRDs", () => {
  it("deploy/crds is up to date with src/api/types.ts (run `node scripts/gen-crds.ts`)", () => {
    const files = renderCrdFiles();
    assert.deepEqual(
      readdirSync(dir)
        .filter((f) => f.endsWith(".yaml"))
        .sort(),
      [...files.keys()].sort(),
    );
    for (const [name, text] of files) {
      assert.equal(
        readFileSync(join(dir, name), "utf8"),
        text,
        `${name} is stale: run node scripts/gen-crds.ts`,
      );
    }
  });

  it("are structural: no const, anyOf, patternProperties or additionalProperties next to properties", () => {
    for (const crd of allCrds()) {
      const versions = (crd.spec as { versions: { schema: { openAPIV3Schema: unknown } }[] })
        .versions;
      walk(
        versions[0]!.schema.openAPIV3Schema,
        (crd.metadata as { name: string }).name,
        (s, path) => {
          for (const forbidden of ["const", "anyOf", "patternProperties", "$id", "uniqueItems"]) {
            assert.ok(!(forbidden in s), `${path} has ${forbidden}`);
          }
          assert.ok(
            !("properties" in s && "additionalProperties" in s),
            `${path} has properties and additionalProperties`,
          );
          assert.ok(
            "type" in s || "x-kubernetes-preserve-unknown-fields" in s,
            `${path} has no type`,
          );
        },
      );
    }
  });
});
