/**
 * One place that turns what can go wrong on the command line into what kubectl users expect: a
 * line (or a short list) on stderr that names the thing and the field, an exit code, and no stack
 * trace.
 *
 *   0  success
 *   1  failure: the API server refused, an object is missing, a file cannot be read or parsed,
 *      an object is invalid
 *   2  usage: an unknown flag or command, a bad flag value, a missing argument
 *      (the POSIX convention; kubectl itself exits 1 for these, kubernetes/kubernetes#126070)
 *
 * Expected errors: commander's, the API's Status (ApiError), apply failures, YAML syntax,
 * unreadable files, an unreachable API server, CliError, and the project's own `Cannot …`
 * errors. Anything else is a bug: its message is printed with a hint, and its stack trace only
 * with `--debug` or `SALLYPORT_DEBUG=1`.
 */
import { type Command, CommanderError, Option } from "commander";
// Types only: the classes are recognised by name, so that commands that never reach the API
// (convert, validate) do not load the Kubernetes client to report an error.
import type { ApplyError } from "../kube/apply.ts";
import type { ApiError } from "../kube/client.ts";
import type { ManifestError } from "../kube/manifests.ts";

function isNamed<T>(e: unknown, name: string): e is T {
  return e instanceof Error && e.name === name;
}
const isApiError = (e: unknown): e is ApiError => isNamed<ApiError>(e, "ApiError");

/** An expected failure, already worded for the user. */
export class CliError extends Error {
  override readonly name: string = "CliError";
  readonly exitCode: number;
  /** Printed indented under the message: one field or item per line. */
  readonly details: readonly string[];
  constructor(message: string, options: { exitCode?: number; details?: readonly string[] } = {}) {
    super(message);
    this.exitCode = options.exitCode ?? 1;
    this.details = options.details ?? [];
  }
}

/** The command line itself is wrong (exit code 2). */
export class UsageError extends CliError {
  override readonly name = "UsageError";
  constructor(message: string, details: readonly string[] = []) {
    super(message, { exitCode: 2, details });
  }
}

export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

export interface Described {
  /** Lines for stderr (commander prints its own, so none for its errors). */
  readonly lines: readonly string[];
  readonly exitCode: number;
  /** False for bugs: the stack trace helps there. */
  readonly expected: boolean;
}

const SYSTEM_ERRORS: Readonly<Record<string, string>> = {
  ENOENT: "no such file or directory",
  EACCES: "permission denied",
  EISDIR: "it is a directory",
  ENOTDIR: "a part of the path is not a directory",
  EPERM: "operation not permitted",
};

export function describeError(e: unknown): Described {
  if (e instanceof CommanderError) {
    const ok = e.code === "commander.helpDisplayed" || e.code === "commander.version";
    return { lines: [], exitCode: ok ? 0 : EXIT_USAGE, expected: true };
  }
  if (e instanceof CliError)
    return {
      lines: [`error: ${e.message}`, ...e.details.map((d) => `  ${d}`)],
      exitCode: e.exitCode,
      expected: true,
    };
  if (isNamed<ApplyError>(e, "ApplyError")) {
    const lines = e.failures.flatMap((f) =>
      isApiError(f.error)
        ? apiErrorLines(f.error, `error when ${f.verb} ${f.what}`)
        : [`error: ${messageOf(f.error)}`],
    );
    return { lines, exitCode: EXIT_FAILURE, expected: true };
  }
  if (isApiError(e)) return { lines: apiErrorLines(e), exitCode: EXIT_FAILURE, expected: true };
  if (isNamed<ManifestError>(e, "ManifestError"))
    return {
      lines: [
        `error: ${e.message}`,
        ...(e.snippet === "" ? [] : e.snippet.split("\n").map((l) => `  ${l}`)),
      ],
      exitCode: EXIT_FAILURE,
      expected: true,
    };
  const system = systemError(e);
  if (system !== undefined)
    return { lines: [`error: ${system}`], exitCode: EXIT_FAILURE, expected: true };
  const network = networkError(e);
  if (network !== undefined)
    return { lines: [`error: ${network}`], exitCode: EXIT_FAILURE, expected: true };
  if (e instanceof Error && /^Cannot /.test(e.message))
    return { lines: [`error: ${e.message}`], exitCode: EXIT_FAILURE, expected: true };
  return {
    lines: [
      `error: ${e instanceof Error ? e.message : String(e)}`,
      "(an unexpected error: run again with --debug, or SALLYPORT_DEBUG=1, to see where it happened, and report it)",
    ],
    exitCode: EXIT_FAILURE,
    expected: false,
  };
}

function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** `Cannot read x.yaml: no such file or directory` for Node's file errors. */
function systemError(e: unknown): string | undefined {
  const s = e as { code?: unknown; path?: unknown; syscall?: unknown } | undefined;
  if (!(e instanceof Error) || typeof s?.code !== "string" || SYSTEM_ERRORS[s.code] === undefined)
    return undefined;
  const path = typeof s.path === "string" ? ` ${s.path}` : "";
  return `Cannot ${s.syscall === "open" || s.syscall === "read" || s.syscall === undefined ? "read" : String(s.syscall)}${path}: ${SYSTEM_ERRORS[s.code]}`;
}

/** Codes of a connection that failed: the socket's (refused, unknown host) and undici's own. */
const NETWORK_CODE =
  /^(UND_ERR_|E(CONNREFUSED|CONNRESET|HOSTUNREACH|NETUNREACH|TIMEDOUT|PIPE|AI_AGAIN)$|ENOTFOUND$)|CERT|SELF_SIGNED|UNABLE_TO/;

/** A connection that failed (refused, unknown host, TLS), fetch's or undici's, and timeouts. */
function networkError(e: unknown): string | undefined {
  if (!(e instanceof Error)) return undefined;
  if (e.name === "TimeoutError" || e.name === "AbortError")
    return `Cannot reach the API server: no answer in time (${e.message}); check --kubeconfig, --context or KUBECONFIG`;
  const cause = e instanceof TypeError && e.message === "fetch failed" ? e.cause : e;
  const code = (cause as { code?: unknown } | undefined)?.code;
  if (cause === e && (typeof code !== "string" || !NETWORK_CODE.test(code))) return undefined;
  return `Cannot reach the API server: ${cause instanceof Error ? cause.message : "the connection failed"}; check --kubeconfig, --context or KUBECONFIG`;
}

/** The Status message of an ApiError, without the method and path ApiError puts in front. */
export function serverMessage(e: ApiError): { path: string; message: string } {
  const m = /^[A-Z]+ (\S+): \d+ (.*)$/s.exec(e.message);
  if (m === null) return { path: "", message: e.message };
  let rest = m[2]!;
  if (e.reason !== "" && rest.startsWith(`${e.reason}: `)) rest = rest.slice(e.reason.length + 2);
  else if (rest.startsWith(": ")) rest = rest.slice(2);
  return { path: m[1]!, message: rest };
}

/**
 * `Error from server (NotFound): egresspolicies.sallyport.dev "x" not found`, as kubectl prints
 * it, then one line per cause when the Status lists several fields.
 */
export function apiErrorLines(e: ApiError, context?: string): string[] {
  const { path, message } = serverMessage(e);
  const lines = [
    `Error from server (${e.reason || e.status}): ${context === undefined ? "" : `${context}: `}${message}`,
  ];
  const details = e.details as
    | { name?: string; causes?: { field?: string; message?: string }[] }
    | undefined;
  const causes = (details?.causes ?? []).filter((c) => c.message !== undefined);
  if (causes.length > 1)
    for (const c of causes)
      lines.push(`  ${c.field === undefined ? "" : `${c.field}: `}${c.message}`);
  // Strict field validation names the field but not the fix.
  const kind = /^(\w+) in version /.exec(message)?.[1]?.toLowerCase();
  for (const m of message.matchAll(/unknown field "([^"]+)"/g)) {
    const parent = m[1]!.includes(".") ? m[1]!.slice(0, m[1]!.lastIndexOf(".")) : "";
    lines.push(
      `  ${m[1]}: unknown field: remove it or check its spelling${kind === undefined ? "" : ` (kubectl explain ${kind}${parent === "" ? "" : `.${parent}`} lists the fields)`}`,
    );
  }
  if (e.status === 404 && details?.name === undefined && path.includes("/sallyport.dev/"))
    lines.push(
      "  (the API server has no Sallyport kinds: install the CRDs of deploy/crds, then check with kubectl get crd egresspolicies.sallyport.dev)",
    );
  return lines;
}

/** `--debug` anywhere before a `--`, or SALLYPORT_DEBUG=1. */
export function debugRequested(argv: readonly string[], env: NodeJS.ProcessEnv): boolean {
  if (env.SALLYPORT_DEBUG === "1" || env.SALLYPORT_DEBUG === "true") return true;
  const end = argv.indexOf("--");
  return (end < 0 ? argv : argv.slice(0, end)).includes("--debug");
}

function commandPath(cmd: Command): string {
  const names: string[] = [];
  for (let c: Command | null = cmd; c !== null; c = c.parent) names.unshift(c.name());
  return names.join(" ");
}

/**
 * Gives every command of the tree the same conventions: commander throws instead of exiting, a
 * usage error ends with a pointer to the command's help (as kubectl's "See '… --help'"), and
 * `--debug` is accepted everywhere (shown in the top-level help only).
 */
export function applyConventions(program: Command): void {
  const walk = (cmd: Command) => {
    cmd.exitOverride();
    cmd.showHelpAfterError(`See '${commandPath(cmd)} --help' for usage.`);
    if (!cmd.options.some((o) => o.long === "--debug")) {
      const debug = new Option(
        "--debug",
        "print the stack trace of unexpected errors (also SALLYPORT_DEBUG=1)",
      );
      cmd.addOption(cmd === program ? debug : debug.hideHelp());
    }
    for (const sub of cmd.commands) walk(sub);
  };
  walk(program);
}

export interface CliIO {
  readonly stderr: (line: string) => void;
  readonly env: NodeJS.ProcessEnv;
}

/** Parses and runs; returns the exit code. Never throws. */
export async function runCli(
  program: Command,
  argv: readonly string[],
  io: CliIO = { stderr: (l) => process.stderr.write(`${l}\n`), env: process.env },
): Promise<number> {
  try {
    await program.parseAsync([...argv]);
    return typeof process.exitCode === "number" ? process.exitCode : 0;
  } catch (e) {
    const d = describeError(e);
    for (const line of d.lines) io.stderr(line);
    if (debugRequested(argv.slice(2), io.env) && e instanceof Error && e.stack !== undefined)
      io.stderr(e.stack);
    return d.exitCode;
  }
}
