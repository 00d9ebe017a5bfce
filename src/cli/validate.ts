/**
 * `sallyport validate -f FILE`: checks Sallyport manifests offline with the rules the API server
 * (CRD schema and CEL) and the webhook apply: each object alone, then policies against the
 * gateways of the same input and gateways against each other. Every problem names its field.
 */
import type { Command } from "commander";
import { type AnyPolicy, API_VERSION, type EgressGateway, KINDS } from "../api/types.ts";
import {
  type FieldError,
  validateGatewayAgainstOthers,
  validateObject,
  validatePolicyAgainstGateway,
} from "../api/validate.ts";
import type { KubeObject } from "../kube/client.ts";
import { CliError } from "./errors.ts";
import { collect, filesOf, readManifests } from "./input.ts";

function describe(o: KubeObject): string {
  const ns = o.metadata?.namespace === undefined ? "" : `${o.metadata.namespace}/`;
  return `${String(o.kind ?? "(no kind)")} ${ns}${String(o.metadata?.name ?? "(no name)")}`;
}

/** @returns one line per valid object; throws CliError listing every problem otherwise. */
export function runValidate(files: readonly string[]): string[] {
  const objects = readManifests(files);
  if (objects.length === 0)
    throw new CliError(`Cannot validate ${files.join(", ")}: it holds no object`);
  const gateways = objects.filter(
    (o): o is KubeObject & EgressGateway =>
      o.apiVersion === API_VERSION && o.kind === "EgressGateway",
  );
  const valid: string[] = [];
  const problems: string[] = [];
  for (const o of objects) {
    let errors: FieldError[];
    if (o.apiVersion !== API_VERSION || typeof o.kind !== "string" || !(o.kind in KINDS)) {
      errors = [
        {
          field: o.apiVersion !== API_VERSION ? "apiVersion" : "kind",
          message: `${String(o.apiVersion)} ${String(o.kind)} is not a Sallyport kind (${API_VERSION}: EgressGateway, EgressPolicy, ClusterEgressPolicy); for Cilium's or spidernet's, use sallyport convert`,
        },
      ];
    } else {
      errors = validateObject(o);
      if (errors.length === 0 && o.kind === "EgressGateway")
        errors = validateGatewayAgainstOthers(o as unknown as EgressGateway, gateways);
      if (errors.length === 0 && (o.kind === "EgressPolicy" || o.kind === "ClusterEgressPolicy")) {
        const p = o as unknown as AnyPolicy;
        errors = validatePolicyAgainstGateway(
          p,
          gateways.find((g) => g.metadata.name === p.spec.gateway),
        );
      }
    }
    if (errors.length === 0) valid.push(`${describe(o)} is valid`);
    else for (const e of errors) problems.push(`${describe(o)}: ${e.field}: ${e.message}`);
  }
  if (problems.length > 0)
    throw new CliError(
      `${files.join(", ")} ${problems.length === 1 ? "has a problem" : `has ${problems.length} problems`}:`,
      { details: problems },
    );
  return valid;
}

export function validateCommand(program: Command): void {
  program
    .command("validate")
    .description(
      "check Sallyport manifests without a cluster, with the rules of the API server and the webhook",
    )
    .option(
      "-f, --filename <file>",
      "YAML or JSON file, - for stdin; repeat for more (required)",
      collect,
    )
    .action((f: { filename?: string[] }) => {
      for (const line of runValidate(filesOf(f.filename, "validate"))) console.log(line);
    });
}
