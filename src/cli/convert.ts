/**
 * `sallyport convert -f FILE`: Cilium's and spidernet's egress objects as Sallyport objects on
 * stdout (YAML, or JSON with -o json), a warning on stderr for every field that has no equivalent
 * or behaves differently. Exit code 0 when everything was converted (warnings or not), 1 when
 * something could not be (the rest is still written).
 */
import { type Command, Option } from "commander";
import { stringify } from "yaml";
import { convert, formatConversionError, formatWarning, SOURCE_KINDS } from "../convert/convert.ts";
import { CliError } from "./errors.ts";
import { collect, filesOf, readManifests } from "./input.ts";

export interface ConvertResult {
  readonly stdout: string;
  readonly warnings: readonly string[];
  /** Set when something could not be converted. */
  readonly error: CliError | undefined;
}

export function runConvert(files: readonly string[], output: "yaml" | "json"): ConvertResult {
  const documents = readManifests(files);
  const result = convert(documents);
  const objects = result.objects;
  const stdout =
    objects.length === 0
      ? ""
      : output === "json"
        ? `${JSON.stringify(objects.length === 1 ? objects[0] : { apiVersion: "v1", kind: "List", items: objects }, null, 2)}\n`
        : objects.map((o) => stringify(o, { lineWidth: 0 })).join("---\n");
  let error: CliError | undefined;
  if (result.errors.length === 1) {
    error = new CliError(formatConversionError(result.errors[0]!));
  } else if (result.errors.length > 1) {
    error = new CliError(`Cannot convert ${result.errors.length} things:`, {
      details: result.errors.map(formatConversionError),
    });
  } else if (objects.length === 0) {
    error = new CliError(
      `Cannot convert ${files.join(", ")}: ${documents.length === 0 ? "it holds no object" : `it holds no ${SOURCE_KINDS}`}`,
    );
  }
  return { stdout, warnings: result.warnings.map(formatWarning), error };
}

export function convertCommand(program: Command): void {
  program
    .command("convert")
    .description(
      "rewrite Cilium's CiliumEgressGatewayPolicy and spidernet egressgateway's EgressGateway, EgressPolicy and EgressClusterPolicy as Sallyport objects (stdout), with a warning for every field that has no equivalent (stderr)",
    )
    .option(
      "-f, --filename <file>",
      "YAML or JSON file, - for stdin; repeat for more (required)",
      collect,
    )
    .addOption(
      new Option("-o, --output <format>", "output format")
        .choices(["yaml", "json"])
        .default("yaml"),
    )
    .addHelpText(
      "after",
      "\nExamples:\n  sallyport convert -f cilium-egress.yaml > sallyport-egress.yaml\n  kubectl get ciliumegressgatewaypolicies -o yaml | sallyport convert -f -\n  kubectl get egressgateways.egressgateway.spidernet.io,egresspolicies.egressgateway.spidernet.io -A -o yaml | kubectl sallyport convert -f -",
    )
    .action((f: { filename?: string[]; output: "yaml" | "json" }) => {
      const r = runConvert(filesOf(f.filename, "convert"), f.output);
      process.stdout.write(r.stdout);
      for (const w of r.warnings) process.stderr.write(`${w}\n`);
      if (r.error !== undefined) throw r.error;
    });
}
