/**
 * Helpers for tests that use the real kernel: unique namespace prefixes, processes started in a
 * namespace (and always killed), the echo probe, and a fingerprint of a host's network state.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { join } from "node:path";
import { mustRun } from "../../src/kernel/runner.ts";
import { type ProbeLine, probeOnce } from "../../src/sandbox/probe.ts";
import { nsRunner } from "../../src/sandbox/topology.ts";
import { TEST_PREFIX } from "./leaks.ts";

export const ROOT = process.getuid?.() === 0;
export const NEEDS_ROOT = ROOT ? false : "needs root (network namespaces); CI runs as root";
export const REPO = join(import.meta.dirname, "..", "..");
export const ECHO = join(REPO, "src", "sandbox", "echo.ts");

let counter = 0;
/** A namespace prefix unique to this process and call: "spt<pid><n>". */
export function uniquePrefix(tag: string): string {
  counter++;
  return `${TEST_PREFIX}${process.pid % 100000}${tag}${counter}`;
}

const children = new Set<ChildProcess>();

/** Starts a long-running process inside a namespace; `stopAll()` kills it. */
export function startIn(netns: string, argv: readonly string[]): ChildProcess {
  const child = spawn("ip", ["netns", "exec", netns, ...argv], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.add(child);
  child.on("exit", () => children.delete(child));
  return child;
}

export async function stopAll(): Promise<void> {
  const waits = [...children].map(
    (c) =>
      new Promise<void>((resolve) => {
        if (c.exitCode !== null || c.signalCode !== null) return resolve();
        c.once("exit", () => resolve());
        c.kill("SIGKILL");
      }),
  );
  await Promise.all(waits);
}

/** Waits for a line on a child's stdout that satisfies `match`. */
export function waitForLine(
  child: ChildProcess,
  match: (line: string) => boolean,
  timeoutMs = 10_000,
): Promise<string> {
  return new Promise((resolve, reject) => {
    let buf = "";
    const timer = setTimeout(
      () => reject(new Error(`no matching output within ${timeoutMs} ms: ${buf}`)),
      timeoutMs,
    );
    child.stdout!.on("data", (d: Buffer) => {
      buf += d.toString();
      for (const line of buf.split("\n")) {
        if (match(line)) {
          clearTimeout(timer);
          resolve(line);
        }
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`exited (${code}) before a matching line: ${buf}`));
    });
  });
}

export function startEcho(netns: string, port = 8080): Promise<ChildProcess> {
  const child = startIn(netns, [process.execPath, ECHO, "serve", "--port", String(port)]);
  return waitForLine(child, (l) => l.includes('"listening"')).then(() => child);
}

export {
  type StreamSummary,
  stream,
  type UdpStreamSummary,
  udpStream,
} from "../../src/sandbox/probe.ts";

export type ProbeResult = ProbeLine;

/** One request from a namespace to host:port; returns the source address the server saw. */
export function probe(
  netns: string,
  target: string,
  options: { udp?: boolean; timeoutMs?: number } = {},
): Promise<ProbeResult> {
  return probeOnce(netns, target, { timeoutMs: 1500, ...options });
}

/** Probes until `ok(result)` or the deadline; returns the last result (no timed assertion). */
export async function probeUntil(
  netns: string,
  target: string,
  ok: (r: ProbeResult) => boolean,
  deadlineMs = 15_000,
): Promise<ProbeResult> {
  const end = Date.now() + deadlineMs;
  let last: ProbeResult = { t: 0, ok: false, error: "not probed" };
  while (Date.now() < end) {
    last = await probe(netns, target, { timeoutMs: 500 });
    if (ok(last)) return last;
    await new Promise((r) => setTimeout(r, 100));
  }
  return last;
}

export interface HostState {
  readonly iptables: string;
  readonly ip6tables: string;
  readonly ipset: string;
  readonly rules4: string;
  readonly rules6: string;
  readonly routes4: string;
  readonly routes6: string;
  readonly links: string;
  /** `nft list ruleset` without counters (iptables-nft's tables are in it too). */
  readonly nft: string;
}

/**
 * The nftables tables that are not iptables-nft's (those are in `iptables`/`ip6tables` above;
 * iptables-nft leaves empty built-in chains behind that iptables-save does not show), without
 * counters.
 */
function nativeTables(ruleset: string): string {
  const blocks = ruleset.split(/\n(?=table )/);
  return blocks
    .filter((b) => !/^table ip6? (filter|nat|mangle|raw|security) \{/.test(b))
    .join("\n")
    .replace(/counter packets \d+ bytes \d+/g, "counter");
}

/** The lines that would show a difference in a host's network configuration. */
export async function hostState(netns: string): Promise<HostState> {
  const r = nsRunner(netns);
  const run = (argv: string[]) => mustRun(r, argv);
  const stripSave = (text: string) =>
    text
      .split("\n")
      .filter((l) => !l.startsWith("#"))
      .map((l) => l.replace(/\[\d+:\d+\]/, "[0:0]"))
      .join("\n");
  const sortedLines = (text: string) => text.split("\n").sort().join("\n");
  return {
    iptables: stripSave(await run(["iptables-save"])),
    ip6tables: stripSave(await run(["ip6tables-save"])),
    ipset: sortedLines(await run(["ipset", "save"])),
    rules4: await run(["ip", "rule"]),
    rules6: await run(["ip", "-6", "rule"]),
    routes4: await run(["ip", "route", "show", "table", "all"]),
    routes6: sortedLines(await run(["ip", "-6", "route", "show", "table", "all"])),
    links: (await run(["ip", "-o", "link", "show"])).replace(/ qlen \d+/g, ""),
    nft: nativeTables(await run(["nft", "list", "ruleset"])),
  };
}

/** `sallyport top --sandbox PREFIX --interval 1`, run to its end: exit code and output. */
export function topOfSandbox(
  prefix: string,
  cache: string,
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(
      process.execPath,
      [join(REPO, "src", "cli", "main.ts"), "top", "--sandbox", prefix, "--interval", "1"],
      { env: { ...process.env, SALLYPORT_CACHE: cache } },
    );
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}
