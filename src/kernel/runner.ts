/**
 * The one seam between Sallyport and the kernel's tools: run a program with arguments as an
 * array and an optional payload on stdin, never through a shell. Everything that reads or writes
 * the kernel (iptables, ipset, ip, bridge, sysctl) goes through a Runner, so that tests can
 * record and script it and so that a failed command can always be logged with its input.
 */
import { spawn } from "node:child_process";

export interface RunResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export interface RunOptions {
  readonly stdin?: string;
  /** @default 30000 */
  readonly timeoutMs?: number;
}

export interface Runner {
  run(argv: readonly string[], options?: RunOptions): Promise<RunResult>;
}

/** A command exited non-zero. Carries the command, its stdin and the tool's own error text. */
export class CommandError extends Error {
  override readonly name = "CommandError";
  readonly argv: readonly string[];
  readonly stdin: string | undefined;
  readonly result: RunResult;
  constructor(argv: readonly string[], stdin: string | undefined, result: RunResult) {
    const firstLine = result.stderr.trim().split("\n").slice(0, 3).join(" | ");
    super(`Cannot run ${argv.join(" ")}: exit ${result.code}: ${firstLine || "no error output"}`);
    this.argv = argv;
    this.stdin = stdin;
    this.result = result;
  }
}

/** Runs programs on this host (or, with a prefix, in a network namespace). */
export class ExecRunner implements Runner {
  readonly #prefix: readonly string[];

  /** @param prefix prepended to every argv, e.g. ["ip", "netns", "exec", "node-1"] */
  constructor(prefix: readonly string[] = []) {
    this.#prefix = prefix;
  }

  run(argv: readonly string[], options?: RunOptions): Promise<RunResult> {
    const full = [...this.#prefix, ...argv];
    return new Promise((resolve, reject) => {
      const child = spawn(full[0]!, full.slice(1), {
        stdio: ["pipe", "pipe", "pipe"],
        signal: AbortSignal.timeout(options?.timeoutMs ?? 30_000),
        env: { ...process.env, LC_ALL: "C" },
      });
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      child.stdout.on("data", (b: Buffer) => out.push(b));
      child.stderr.on("data", (b: Buffer) => err.push(b));
      child.on("error", (e) => reject(new Error(`Cannot run ${full.join(" ")}: ${e.message}`)));
      child.on("close", (code) =>
        resolve({
          code: code ?? 1,
          stdout: Buffer.concat(out).toString("utf8"),
          stderr: Buffer.concat(err).toString("utf8"),
        }),
      );
      // A tool that exits before reading stdin closes the pipe; that is reported by its exit code.
      child.stdin.on("error", () => {});
      child.stdin.end(options?.stdin ?? "");
    });
  }
}

/** Runs and throws CommandError unless the exit code is 0. */
export async function mustRun(
  runner: Runner,
  argv: readonly string[],
  options?: RunOptions,
): Promise<string> {
  const result = await runner.run(argv, options);
  if (result.code !== 0) throw new CommandError(argv, options?.stdin, result);
  return result.stdout;
}
