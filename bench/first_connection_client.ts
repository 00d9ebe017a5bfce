/**
 * The pod's side of `npm run bench -- first-connection`, started in the pod's namespace before
 * the trial so that node's start-up is not measured. Prints {"ready":true}, waits for a line on
 * stdin, then opens TCP connections to the target one after another, at once, until one is
 * answered from `--want` (the echo server's first line is the source address it saw) or the
 * bounds are reached. Prints one JSON line: every connection's start, the moment it was
 * established and the source the server saw, and the namespace's TCP retransmission counters
 * (`/proc/net/snmp` RetransSegs, `/proc/net/netstat` TCPSynRetrans) before and after.
 */
import { readFileSync } from "node:fs";
import { connect } from "node:net";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    target: { type: "string" },
    want: { type: "string" },
    "max-ms": { type: "string", default: "10000" },
    "max-connections": { type: "string", default: "200" },
    "connect-timeout-ms": { type: "string", default: "5000" },
  },
});
const [host, port] = (values.target ?? "").split(":");
const maxMs = Number(values["max-ms"]);
const maxConnections = Number(values["max-connections"]);
const connectTimeoutMs = Number(values["connect-timeout-ms"]);

/** A counter from /proc/net/snmp or /proc/net/netstat: a header line, then a value line. */
function counter(file: string, group: string, name: string): number {
  const lines = readFileSync(file, "utf8").split("\n");
  for (let i = 0; i + 1 < lines.length; i++) {
    const head = lines[i]!.split(/\s+/);
    const vals = lines[i + 1]!.split(/\s+/);
    if (head[0] !== `${group}:` || vals[0] !== `${group}:`) continue;
    const at = head.indexOf(name);
    if (at > 0) return Number(vals[at]);
  }
  return Number.NaN;
}

const counters = () => ({
  retransSegs: counter("/proc/net/snmp", "Tcp", "RetransSegs"),
  synRetrans: counter("/proc/net/netstat", "TcpExt", "TCPSynRetrans"),
});

interface Connection {
  start: number;
  established?: number;
  saw?: string;
  error?: string;
}

function once(): Promise<Connection> {
  const c: Connection = { start: Date.now() };
  return new Promise((resolve) => {
    const socket = connect({ host: host!, port: Number(port) });
    const timer = setTimeout(() => {
      c.error = "timeout";
      socket.destroy();
      resolve(c);
    }, connectTimeoutMs);
    let buf = "";
    socket.on("connect", () => {
      c.established = Date.now();
    });
    socket.on("data", (d) => {
      buf += d.toString("utf8");
      const nl = buf.indexOf("\n");
      if (nl < 0) return;
      c.saw = buf.slice(0, nl).trim();
      clearTimeout(timer);
      socket.destroy();
      resolve(c);
    });
    socket.on("error", (e) => {
      c.error = e.message;
      clearTimeout(timer);
      resolve(c);
    });
  });
}

console.log(JSON.stringify({ ready: true }));
process.stdin.once("data", async () => {
  const before = counters();
  const go = Date.now();
  const connections: Connection[] = [];
  while (connections.length < maxConnections && Date.now() - go < maxMs) {
    const c = await once();
    connections.push(c);
    if (c.saw === values.want) break;
    // A refused or failed connection returns at once: do not spin on it.
    if (c.saw === undefined) await new Promise((r) => setTimeout(r, 5));
  }
  console.log(JSON.stringify({ go, connections, before, after: counters() }));
  process.exit(0);
});
