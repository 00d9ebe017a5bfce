/** Helpers for the converter's tests: run a fixture of testdata/ and look into the result. */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { AnyPolicy, EgressGateway } from "../api/types.ts";
import { validateObject } from "../api/validate.ts";
import { parseManifests } from "../kube/apply.ts";
import { type Conversion, type ConversionWarning, convert } from "./convert.ts";

const TESTDATA = join(import.meta.dirname, "testdata");

export interface Converted extends Conversion {
  gateway(name: string): EgressGateway;
  policy(kind: "EgressPolicy" | "ClusterEgressPolicy", name: string): AnyPolicy;
  /** The warnings of one source object, as `field: kind` (the message checked apart). */
  warningsOf(source: string): string[];
  warning(source: string, field: string): ConversionWarning;
}

export function convertText(text: string, name = "(test)"): Converted {
  return wrap(convert(parseManifests(text, name)));
}

export function convertFixture(file: string): Converted {
  return convertText(readFileSync(join(TESTDATA, file), "utf8"), file);
}

function wrap(r: Conversion): Converted {
  for (const o of r.objects)
    assert.deepEqual(validateObject(o), [], `${o.kind}/${o.metadata.name}`);
  return {
    ...r,
    gateway(name) {
      const g = r.objects.find((o) => o.kind === "EgressGateway" && o.metadata.name === name);
      assert.ok(
        g,
        `no EgressGateway ${name} in ${r.objects.map((o) => o.metadata.name).join(", ")}`,
      );
      return g as EgressGateway;
    },
    policy(kind, name) {
      const p = r.objects.find((o) => o.kind === kind && o.metadata.name === name);
      assert.ok(
        p,
        `no ${kind} ${name} in ${r.objects.map((o) => `${o.kind}/${o.metadata.name}`).join(", ")}`,
      );
      return p as AnyPolicy;
    },
    warningsOf(source) {
      return r.warnings.filter((w) => w.source === source).map((w) => `${w.field}: ${w.kind}`);
    },
    warning(source, field) {
      const w = r.warnings.find((x) => x.source === source && x.field === field);
      assert.ok(w, `no warning for ${source} ${field}: ${JSON.stringify(r.warnings, null, 1)}`);
      return w;
    },
  };
}
