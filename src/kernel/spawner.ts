/**
 * A Runner that starts commands from a small helper process instead of from the agent itself.
 *
 * Why: Node (libuv) starts a child with fork(), which copies the parent's page tables while the
 * event loop waits. An agent holding 1,000 policies and 100,000 endpoints has ~550 MB resident,
 * and each fork then blocks it for 7–12 ms (measured with `npm run bench -- agent`), more than
 * the whole rest of a pod's sync. The helper is a few dozen lines of JavaScript with a tiny heap
 * whose forks cost ~2 ms; requests and answers travel as JSON lines over its stdin and stdout.
 * Commands are still argv arrays, never a shell, with their payload on stdin.
 *
 * The helper's source is inlined (`node -e`), so the shipped bundle needs no second file. If the
 * helper dies, the requests it held fail (and their sync is retried as usual) and the next request
 * starts a new one.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { createInterface } from "node:readline";
import type { Runner, RunOptions, RunResult } from "./runner.ts";

/** The helper: one JSON request per line in, one JSON answer per line out. */
const HELPER = `
const { spawn } = require("node:child_process");
const { createInterface } = require("node:readline");
const answer = (m) => process.stdout.write(JSON.stringify(m) + "\\n");
createInterface({ input: process.stdin }).on("line", (line) => {
  let req;
  try { req = JSON.parse(line); } catch { return; }
  let child;
  try {
    child = spawn(req.argv[0], req.argv.slice(1), {
      stdio: ["pipe", "pipe", "pipe"],
      signal: AbortSignal.timeout(req.timeoutMs),
      env: { ...process.env, LC_ALL: "C" },
    });
  } catch (e) {
    return answer({ id: req.id, error: String(e && e.message) });
  }
  const out = [];
  const err = [];
  let failed;
  child.stdout.on("data", (b) => out.push(b));
  child.stderr.on("data", (b) => err.push(b));
  child.on("error", (e) => { failed = String(e && e.message); });
  child.on("close", (code) => answer(failed !== undefined
    ? { id: req.id, error: failed }
    : { id: req.id, code: code === null ? 1 : code,
        stdout: Buffer.concat(out).toString("utf8"), stderr: Buffer.concat(err).toString("utf8") }));
  child.stdin.on("error", () => {});
  child.stdin.end(req.stdin ?? "");
});
process.stdin.on("end", () => process.exit(0));
`;

interface Pending {
  readonly argv: readonly string[];
  readonly resolve: (r: RunResult) => void;
  readonly reject: (e: Error) => void;
}

export class SpawnerRunner implements Runner {
  readonly #prefix: readonly string[];
  #helper: ChildProcess | undefined;
  readonly #pending = new Map<number, Pending>();
  #seq = 0;

  readonly #launch: readonly string[];

  /**
   * @param options.prefix prepended to every argv
   * @param options.within runs the helper itself under this command, e.g.
   *   ["nsenter", "--net=/run/netns/node-1"]: every command then starts in that network
   *   namespace without one more exec each (tests and benchmarks; an agent runs on its host)
   */
  constructor(options: { prefix?: readonly string[]; within?: readonly string[] } = {}) {
    this.#prefix = options.prefix ?? [];
    this.#launch = [...(options.within ?? []), process.execPath, "-e", HELPER];
  }

  run(argv: readonly string[], options?: RunOptions): Promise<RunResult> {
    const full = [...this.#prefix, ...argv];
    const helper = this.#ensure();
    const id = this.#seq++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { argv: full, resolve, reject });
      this.#hold(helper);
      helper.stdin?.write(
        `${JSON.stringify({ id, argv: full, stdin: options?.stdin ?? "", timeoutMs: options?.timeoutMs ?? 30_000 })}\n`,
      );
    });
  }

  /** Stops the helper (commands in flight finish first). */
  close(): void {
    this.#helper?.stdin?.end();
    this.#helper = undefined;
  }

  #ensure(): ChildProcess {
    if (this.#helper !== undefined) return this.#helper;
    const helper = spawn(this.#launch[0]!, this.#launch.slice(1), {
      stdio: ["pipe", "pipe", "inherit"],
    });
    this.#helper = helper;
    createInterface({ input: helper.stdout! }).on("line", (line) => {
      const m = JSON.parse(line) as Partial<RunResult> & { id: number; error?: string };
      const p = this.#pending.get(m.id);
      if (p === undefined) return;
      this.#pending.delete(m.id);
      this.#hold(helper);
      if (m.error !== undefined) p.reject(new Error(`Cannot run ${p.argv.join(" ")}: ${m.error}`));
      else p.resolve({ code: m.code ?? 1, stdout: m.stdout ?? "", stderr: m.stderr ?? "" });
    });
    const gone = (why: string) => {
      if (this.#helper === helper) this.#helper = undefined;
      for (const [id, p] of this.#pending) {
        this.#pending.delete(id);
        p.reject(new Error(`Cannot run ${p.argv.join(" ")}: the command helper ${why}`));
      }
    };
    helper.on("exit", (code, signal) => gone(`exited (${signal ?? code})`));
    helper.on("error", (e) => gone(`failed: ${e.message}`));
    helper.stdin?.on("error", () => {});
    this.#hold(helper);
    return helper;
  }

  /** The helper keeps this process alive only while it runs commands for it. */
  #hold(helper: ChildProcess): void {
    const busy = this.#pending.size > 0;
    for (const h of [helper, helper.stdin, helper.stdout] as unknown as ({
      ref?: () => void;
      unref?: () => void;
    } | null)[]) {
      if (busy) h?.ref?.();
      else h?.unref?.();
    }
  }
}
