/** Files named on the command line (`-f FILE`, `-f -` for stdin), read and parsed. */
import { readFileSync } from "node:fs";
import { parseManifests } from "../kube/apply.ts";
import type { KubeObject } from "../kube/client.ts";
import { CliError, UsageError } from "./errors.ts";

const REASONS: Readonly<Record<string, string>> = {
  ENOENT: "no such file or directory",
  EACCES: "permission denied",
  EISDIR: "it is a directory: name the YAML files in it",
};

/** The text of a file, or of stdin for "-". */
export function readInput(file: string): string {
  try {
    return readFileSync(file === "-" ? 0 : file, "utf8");
  } catch (e) {
    const code = (e as { code?: string }).code ?? "";
    throw new CliError(
      `Cannot read ${file === "-" ? "stdin" : `file ${file}`}: ${REASONS[code] ?? (e as Error).message}`,
    );
  }
}

/** Every object of every file, in order; a syntax error names the file, line and column. */
export function readManifests(files: readonly string[]): KubeObject[] {
  return files.flatMap((file) => parseManifests(readInput(file), file === "-" ? "stdin" : file));
}

/** For repeatable options: `-f a.yaml -f b.yaml`. */
export function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

/**
 * The files of `-f`, which is checked here rather than by commander so that an unknown flag is
 * reported before a missing `-f`.
 */
export function filesOf(
  filename: readonly string[] | undefined,
  command: string,
): readonly string[] {
  if (filename === undefined || filename.length === 0)
    throw new UsageError(`${command} needs -f FILE (or -f - for stdin)`);
  return filename;
}
