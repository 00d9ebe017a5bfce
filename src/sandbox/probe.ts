/** Clients in pods: a single request, and a continuous probe that measures failover gaps. */
import { type ChildProcess, spawn } from "node:child_process";
import { join } from "node:path";
import { mustRun } from "../kernel/runner.ts";
import { nsRunner } from "./topology.ts";

const ECHO = join(import.meta.dirname, "echo.ts");

export interface ProbeLine {
  readonly t: number;
  readonly ok: boolean;
  readonly saw?: string;
  readonly error?: string;
}

export async function probeOnce(
  netns: string,
  target: string,
  options: { udp?: boolean; timeoutMs?: number } = {},
): Promise<ProbeLine> {
  const out = await mustRun(nsRunner(netns), [
    process.execPath,
    ECHO,
    "probe",
    "--target",
    target,
    "--timeout",
    String(options.timeoutMs ?? 1000),
    ...(options.udp ? ["--udp"] : []),
  ]);
  return JSON.parse(out.trim().split("\n").pop()!) as ProbeLine;
}

/**
 * A request every `intervalMs` from a pod; remembers every answer. The gap of a failover is the
 * time from the last request answered from `want` before the failure to the first one answered
 * from `want` after it, as the client saw them.
 */
export class FailoverProbe {
  readonly lines: ProbeLine[] = [];
  readonly #netns: string;
  readonly #target: string;
  readonly #want: string;
  readonly #intervalMs: number;
  #child: ChildProcess | undefined;

  constructor(netns: string, target: string, want: string, intervalMs = 20) {
    this.#netns = netns;
    this.#target = target;
    this.#want = want;
    this.#intervalMs = intervalMs;
  }

  async start(): Promise<void> {
    this.#child = spawn(
      "ip",
      [
        "netns",
        "exec",
        this.#netns,
        process.execPath,
        ECHO,
        "probe",
        "--target",
        this.#target,
        "--count",
        "100000",
        "--interval",
        String(this.#intervalMs),
        "--timeout",
        "200",
      ],
      { stdio: ["ignore", "pipe", "ignore"] },
    );
    let buf = "";
    this.#child.stdout!.on("data", (d: Buffer) => {
      buf += d.toString();
      let nl = buf.indexOf("\n");
      while (nl >= 0) {
        try {
          this.lines.push(JSON.parse(buf.slice(0, nl)) as ProbeLine);
        } catch {
          // partial line
        }
        buf = buf.slice(nl + 1);
        nl = buf.indexOf("\n");
      }
    });
    const end = Date.now() + 10_000;
    while (!this.lines.some((l) => l.saw === this.#want) && Date.now() < end)
      await new Promise((r) => setTimeout(r, 20));
  }

  /** Waits for answers from `want` again after `since`; returns the gap in ms, or undefined. */
  async gapAfter(since: number, deadlineMs: number): Promise<number | undefined> {
    const end = Date.now() + deadlineMs;
    for (;;) {
      const lastBefore = [...this.lines]
        .reverse()
        .find((l) => l.t <= since && l.saw === this.#want);
      const failed = this.lines.find((l) => l.t > since && l.saw !== this.#want);
      const back =
        failed === undefined
          ? undefined
          : this.lines.find((l) => l.t > failed.t && l.saw === this.#want);
      if (back !== undefined && lastBefore !== undefined) return back.t - lastBefore.t;
      if (
        failed === undefined &&
        this.lines.some((l) => l.t > since + 3000 && l.saw === this.#want)
      )
        return 0;
      if (Date.now() > end) return undefined;
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Requests answered from an address other than `want` after `since` (leaks). */
  leaksAfter(since: number): ProbeLine[] {
    return this.lines.filter((l) => l.t > since && l.ok && l.saw !== this.#want);
  }

  async stop(): Promise<void> {
    const c = this.#child;
    if (c === undefined || c.exitCode !== null) return;
    await new Promise<void>((resolve) => {
      c.once("exit", () => resolve());
      c.kill("SIGKILL");
    });
  }
}
