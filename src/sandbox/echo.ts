/**
 * The external host's server and the pods' client, as one small program.
 *
 *   echo.ts serve  [--port 8080] [--log FILE]
 *       TCP and UDP on every address. A TCP connection first gets the source address the server
 *       saw, then every line it sends comes back prefixed with that address. A UDP datagram
 *       gets the source address back. Each connection is logged as a JSON line.
 *   echo.ts probe  --target HOST:PORT [--count N] [--interval MS] [--udp] [--timeout MS]
 *       N requests, one JSON line each: {"t":…,"ok":true,"saw":"192.168.77.100","ms":1.2}
 *   echo.ts stream --target HOST:PORT --seconds S [--interval MS] [--udp]
 *       one TCP connection carrying a line every interval; prints one JSON summary with the
 *       number of lines echoed, the source addresses seen, and whether it was reset. With
 *       --udp: one UDP socket sending a datagram every interval; `lost` = sent − answered,
 *       `maxGapMs` the longest time between two answers.
 */
import { createSocket } from "node:dgram";
import { appendFileSync } from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { parseArgs } from "node:util";

function clean(address: string | undefined): string {
  return (address ?? "").replace(/^::ffff:/, "");
}

function splitTarget(target: string): { host: string; port: number } {
  const at = target.lastIndexOf(":");
  return { host: target.slice(0, at).replace(/^\[|\]$/g, ""), port: Number(target.slice(at + 1)) };
}

function serve(port: number, log: string | undefined): void {
  const record = (entry: object) => {
    const line = `${JSON.stringify({ t: Date.now(), ...entry })}\n`;
    if (log !== undefined) appendFileSync(log, line);
  };
  const server = createServer((socket: Socket) => {
    const src = clean(socket.remoteAddress);
    record({ proto: "tcp", src, port: socket.remotePort });
    socket.write(`${src}\n`);
    let pending = "";
    socket.on("data", (chunk) => {
      pending += chunk.toString("utf8");
      let nl = pending.indexOf("\n");
      while (nl >= 0) {
        socket.write(`${src} ${pending.slice(0, nl)}\n`);
        pending = pending.slice(nl + 1);
        nl = pending.indexOf("\n");
      }
    });
    socket.on("error", () => {});
  });
  server.listen({ port, host: "::", ipv6Only: false });
  const udp = createSocket({ type: "udp6", ipv6Only: false });
  udp.on("message", (msg, rinfo) => {
    const src = clean(rinfo.address);
    record({
      proto: "udp",
      src,
      port: rinfo.port,
      data: msg.toString("utf8", 0, Math.min(msg.length, 64)).trim(),
    });
    udp.send(`${src}\n`, rinfo.port, rinfo.address);
  });
  udp.bind(port, "::");
  console.log(JSON.stringify({ listening: port }));
}

function once(target: string, udp: boolean, timeoutMs: number): Promise<string> {
  const { host, port } = splitTarget(target);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error("timeout"));
    }, timeoutMs);
    let cleanup = () => {};
    if (udp) {
      const s = createSocket(host.includes(":") ? "udp6" : "udp4");
      cleanup = () => s.close();
      s.on("message", (m) => {
        clearTimeout(timer);
        cleanup();
        resolve(m.toString("utf8").trim());
      });
      s.on("error", (e) => {
        clearTimeout(timer);
        cleanup();
        reject(e);
      });
      s.send("?\n", port, host);
      return;
    }
    const s = connect({ host, port });
    cleanup = () => s.destroy();
    let buf = "";
    s.on("data", (d) => {
      buf += d.toString("utf8");
      if (buf.includes("\n")) {
        clearTimeout(timer);
        cleanup();
        resolve(buf.split("\n")[0]!.trim());
      }
    });
    s.on("error", (e) => {
      clearTimeout(timer);
      cleanup();
      reject(e);
    });
  });
}

async function probe(
  target: string,
  count: number,
  interval: number,
  udp: boolean,
  timeout: number,
): Promise<void> {
  for (let i = 0; i < count; i++) {
    const started = performance.now();
    const t = Date.now();
    try {
      const saw = await once(target, udp, timeout);
      console.log(
        JSON.stringify({ t, ok: true, saw, ms: Number((performance.now() - started).toFixed(2)) }),
      );
    } catch (e) {
      console.log(JSON.stringify({ t, ok: false, error: (e as Error).message }));
    }
    const spent = performance.now() - started;
    if (i + 1 < count && spent < interval)
      await new Promise((r) => setTimeout(r, interval - spent));
  }
}

async function stream(target: string, seconds: number, interval: number): Promise<void> {
  const { host, port } = splitTarget(target);
  const s = connect({ host, port });
  const seen = new Set<string>();
  let sent = 0;
  let echoed = 0;
  let reset = false;
  let buf = "";
  s.on("data", (d) => {
    buf += d.toString("utf8");
    let nl = buf.indexOf("\n");
    while (nl >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      const [src, seq] = line.split(" ");
      if (src !== undefined) seen.add(src);
      if (seq !== undefined) echoed++;
      nl = buf.indexOf("\n");
    }
  });
  s.on("error", (e) => {
    reset = true;
    console.error(`stream error: ${e.message}`);
  });
  const deadline = Date.now() + seconds * 1000;
  await new Promise<void>((resolve) => {
    const tick = setInterval(() => {
      if (Date.now() >= deadline || reset) {
        clearInterval(tick);
        resolve();
        return;
      }
      s.write(`${++sent}\n`);
    }, interval);
  });
  await new Promise((r) => setTimeout(r, 500));
  s.destroy();
  console.log(JSON.stringify({ sent, echoed, reset, sources: [...seen] }));
}

async function udpStream(target: string, seconds: number, interval: number): Promise<void> {
  const { host, port } = splitTarget(target);
  const s = createSocket(host.includes(":") ? "udp6" : "udp4");
  const seen = new Set<string>();
  let sent = 0;
  let answered = 0;
  let last: number | undefined;
  let maxGapMs = 0;
  s.on("message", (m) => {
    answered++;
    seen.add(m.toString("utf8").trim());
    const now = performance.now();
    if (last !== undefined) maxGapMs = Math.max(maxGapMs, Math.round(now - last));
    last = now;
  });
  s.on("error", () => {});
  const deadline = Date.now() + seconds * 1000;
  await new Promise<void>((resolve) => {
    const tick = setInterval(() => {
      if (Date.now() >= deadline) {
        clearInterval(tick);
        resolve();
        return;
      }
      sent++;
      s.send(`${sent}\n`, port, host);
    }, interval);
  });
  await new Promise((r) => setTimeout(r, 500));
  s.close();
  console.log(
    JSON.stringify({ sent, answered, lost: sent - answered, maxGapMs, sources: [...seen] }),
  );
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    port: { type: "string", default: "8080" },
    log: { type: "string" },
    target: { type: "string" },
    count: { type: "string", default: "1" },
    interval: { type: "string", default: "100" },
    timeout: { type: "string", default: "1000" },
    seconds: { type: "string", default: "5" },
    udp: { type: "boolean", default: false },
  },
});
const mode = positionals[0];
if (mode === "serve") serve(Number(values.port), values.log);
else if (mode === "probe" && values.target !== undefined) {
  await probe(
    values.target,
    Number(values.count),
    Number(values.interval),
    values.udp,
    Number(values.timeout),
  );
} else if (mode === "stream" && values.target !== undefined) {
  await (values.udp ? udpStream : stream)(
    values.target,
    Number(values.seconds),
    Number(values.interval),
  );
} else {
  console.error("usage: echo.ts serve|probe|stream [--target HOST:PORT] …");
  process.exit(2);
}
