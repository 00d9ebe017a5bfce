/**
 * Many concurrent TCP connections from one pod, for the SNAT capacity test
 * (test/e2e/capacity_test.ts) and benchmark (bench/capacity.ts).
 *
 * The client opens `count` connections to the sandbox's external server, which first
 * sends every connection the source address it saw (src/sandbox/echo.ts). A connection counts as
 * open when that line arrives within `timeoutMs` (the kernel's SYN retransmissions included: a
 * SYN dropped because no source port was free is sent again after 1, 3 and 7 s), otherwise as
 * failed and is closed. The client prints one JSON line when every connection has settled, then
 * holds the open ones until it is killed: the source ports they use stay in use.
 */
import { type ChildProcess, spawn } from "node:child_process";

const CLIENT_JS = `
const net = require("node:net");
const { targets, count, timeoutMs, inFlight } = JSON.parse(process.argv[1]);
const saw = {}, byTarget = {};
let open = 0, failed = 0, retried = 0, settled = 0;
const report = () => console.log(JSON.stringify({ open, failed, retried, saw, byTarget }));
function connect(i) {
  return new Promise((settle) => {
    const { host, port } = targets[i % targets.length];
    const started = Date.now();
    const s = net.connect({ host, port });
    let finished = false;
    const fail = () => { if (finished) return; finished = true; clearTimeout(timer); failed++; s.destroy(); settle(); };
    const timer = setTimeout(fail, timeoutMs);
    s.setEncoding("utf8");
    let buf = "";
    s.on("data", (d) => {
      if (finished) return;
      buf += d;
      const nl = buf.indexOf("\\n");
      if (nl < 0) return;
      finished = true;
      clearTimeout(timer);
      const address = buf.slice(0, nl).trim();
      saw[address] = (saw[address] ?? 0) + 1;
      const t = (byTarget[host + ":" + port] ??= {});
      t[address] = (t[address] ?? 0) + 1;
      open++;
      // The first SYN is sent again after 1 s when it got no answer.
      if (Date.now() - started >= 900) retried++;
      settle();
    });
    s.on("error", fail);
  });
}
(async () => {
  let next = 0;
  const worker = async () => { while (next < count) await connect(next++); };
  await Promise.all(Array.from({ length: Math.min(inFlight, count) }, worker));
  report();
})();
`;

export interface ConnectResult {
  /** Connections the server answered. */
  readonly open: number;
  /** Connections not answered within the timeout (or refused, or reset). */
  readonly failed: number;
  /** Connections that opened only after a SYN was sent again (after 1 s or more). */
  readonly retried: number;
  /** Open connections per source address the server saw. */
  readonly saw: Readonly<Record<string, number>>;
  /** The same per destination, `host:port`. */
  readonly byTarget: Readonly<Record<string, Readonly<Record<string, number>>>>;
}

/** A client holding its connections open; `stop()` closes them. */
export interface HeldConnections {
  readonly result: ConnectResult;
  stop(): void;
}

export interface Target {
  readonly host: string;
  readonly port: number;
}

/**
 * Opens `count` TCP connections from network namespace `netns`, the i-th to `targets[i % n]`, at
 * most `inFlight` (default: all) being opened at a time; resolves when each is open or has failed,
 * the open ones still held. Bounded: `ceil(count / inFlight) × timeoutMs` plus a margin.
 */
export function connectMany(
  netns: string,
  targets: Target | readonly Target[],
  options: { readonly count: number; readonly timeoutMs: number; readonly inFlight?: number },
): Promise<HeldConnections> {
  const plan = {
    targets: Array.isArray(targets) ? targets : [targets],
    count: options.count,
    timeoutMs: options.timeoutMs,
    inFlight: Math.max(1, options.inFlight ?? options.count),
  };
  const limitMs = Math.ceil(plan.count / plan.inFlight) * plan.timeoutMs + 15_000;
  const child: ChildProcess = spawn(
    "ip",
    ["netns", "exec", netns, process.execPath, "-e", CLIENT_JS, JSON.stringify(plan)],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  const stop = () => {
    child.kill("SIGKILL");
  };
  return new Promise((resolve, reject) => {
    let out = "";
    const limit = setTimeout(() => {
      stop();
      reject(new Error(`the client did not report within ${limitMs} ms: ${out}`));
    }, limitMs);
    child.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      const line = out.split("\n").find((l) => l.startsWith("{"));
      if (line === undefined) return;
      clearTimeout(limit);
      resolve({ result: JSON.parse(line) as ConnectResult, stop });
    });
    child.on("exit", (code) => {
      clearTimeout(limit);
      reject(new Error(`the client exited (${code}) before reporting: ${out}`));
    });
  });
}
