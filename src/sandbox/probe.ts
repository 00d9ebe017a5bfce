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
  readonly #timeoutMs: number;
  #child: ChildProcess | undefined;

  /** A request waits `timeoutMs` for its answer: the gap is measured to about that. */
  constructor(netns: string, target: string, want: string, intervalMs = 20, timeoutMs = 200) {
    this.#netns = netns;
    this.#target = target;
    this.#want = want;
    this.#intervalMs = intervalMs;
    this.#timeoutMs = timeoutMs;
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
        String(this.#timeoutMs),
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

export interface StreamSummary {
  readonly sent: number;
  readonly echoed: number;
  readonly reset: boolean;
  readonly sources: readonly string[];
}

export interface UdpStreamSummary {
  readonly sent: number;
  readonly answered: number;
  readonly lost: number;
  /** The longest time between two answers. */
  readonly maxGapMs: number;
  readonly sources: readonly string[];
}

/**
 * One TCP connection from a namespace carrying a line every `intervalMs` for `seconds` (echo.ts
 * stream); resolves with its summary once it ended.
 */
export function stream(
  netns: string,
  target: string,
  seconds: number,
  intervalMs = 50,
): Promise<StreamSummary> {
  return streamOf(netns, target, seconds, intervalMs, []) as Promise<StreamSummary>;
}

/** The same with one UDP socket: a datagram every `intervalMs`, each answered by the server. */
export function udpStream(
  netns: string,
  target: string,
  seconds: number,
  intervalMs = 50,
): Promise<UdpStreamSummary> {
  return streamOf(netns, target, seconds, intervalMs, ["--udp"]) as Promise<UdpStreamSummary>;
}

function streamOf(
  netns: string,
  target: string,
  seconds: number,
  intervalMs: number,
  extra: readonly string[],
): Promise<unknown> {
  const argv = [
    "netns",
    "exec",
    netns,
    process.execPath,
    ECHO,
    "stream",
    "--target",
    target,
    "--seconds",
    String(seconds),
    "--interval",
    String(intervalMs),
    ...extra,
  ];
  return new Promise((resolve, reject) => {
    const child = spawn("ip", argv, { stdio: ["ignore", "pipe", "ignore"] });
    let out = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), seconds * 1000 + 10_000);
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
    });
    child.on("error", reject);
    child.on("close", () => {
      clearTimeout(timer);
      const line = out
        .split("\n")
        .reverse()
        .find((l) => l.startsWith("{"));
      if (line === undefined) reject(new Error(`echo.ts stream in ${netns} printed no summary`));
      else resolve(JSON.parse(line) as unknown);
    });
  });
}
