/**
 * Traffic collector benchmark: what reading a gateway's SNATed connections costs, and whether it
 * stalls the agent's event loop. A gateway in network namespaces (test/support/snat_lab.ts)
 * carries `FLOWS` SNATed UDP flows (100,000: 2 sockets × 50,000 destination ports); then
 *
 *   conntrackMs          `conntrack -L -o extended -n` alone (the kernel's dump and the tool)
 *   inline.readMs        one read (counters and conntrack) parsed on the calling thread
 *   inline.maxLoopLagMs  the longest the calling thread's event loop was blocked meanwhile
 *   worker.readMs        the same through the agent's reader thread (src/agent/traffic_worker.ts)
 *   worker.maxLoopLagMs  ... and the longest the calling thread was blocked: the agent's figure
 *   idleMaxLoopLagMs     the same over an idle second, for comparison
 *   tally.*              parsing alone, on synthetic tables of the same size with 100 and with
 *                        100,000 distinct destinations (the worst case for the aggregation)
 *
 * `BALLAST_MB` (default 300) of live objects on the calling thread stand in for the agent's heap
 * at 100,000 endpoints, whose garbage collections an inline parse would lengthen.
 *
 *   npm run bench -- traffic     (or node bench/traffic.ts)
 */
import { monitorEventLoopDelay } from "node:perf_hooks";
import { InlineTrafficReader } from "../src/agent/traffic.ts";
import { WorkerTrafficReader } from "../src/agent/traffic_worker.ts";
import {
  KERNEL_SNAT_PORTS,
  listSnatConnections,
  SnatTally,
  summarizeSnat,
} from "../src/kernel/conntrack.ts";
import { mustRun } from "../src/kernel/runner.ts";
import { SpawnerRunner } from "../src/kernel/spawner.ts";
import { EIP, SnatLab } from "../test/support/snat_lab.ts";

const FLOWS = Number(process.env.FLOWS ?? 100_000);
const BALLAST_MB = Number(process.env.BALLAST_MB ?? 300);
const ROUNDS = 5;

const ballast: unknown[] = [];
function fillBallast(mb: number): void {
  // ~100 bytes per object: 10,000 objects per MB.
  for (let i = 0; i < mb * 10_000; i++) ballast.push({ i, s: `endpoint-${i}`, a: [i, i + 1] });
}

async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; lagMs: number; value: T }> {
  const h = monitorEventLoopDelay({ resolution: 1 });
  h.enable();
  const t0 = performance.now();
  const value = await fn();
  const ms = performance.now() - t0;
  // A loop blocked until fn's end records its delay when its timer fires next: let it fire.
  await new Promise((r) => setTimeout(r, 20));
  h.disable();
  return { ms, lagMs: h.max / 1e6, value };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const round1 = (x: number) => Math.round(x * 10) / 10;

function synthetic(n: number, destinations: number): string {
  const lines: string[] = [];
  for (let i = 0; i < n; i++) {
    const d = i % destinations;
    const dst = `10.${100 + (d >> 16)}.${(d >> 8) & 255}.${d & 255}`;
    const sport = 1024 + (i % 64000);
    lines.push(
      `ipv4     2 tcp      6 431998 ESTABLISHED src=10.1.${(i >> 8) & 255}.${i & 255} dst=${dst} sport=${sport} dport=443 src=${dst} dst=${EIP[4]} sport=443 dport=${sport} [ASSURED] mark=0 use=1`,
    );
  }
  return `${lines.join("\n")}\n`;
}

export async function run(): Promise<unknown> {
  const lab = new SnatLab("b");
  const counters = { kind: "iptables", backend: "nft", families: [4, 6] } as const;
  try {
    await lab.up();
    const g = lab.runner(lab.gateway);
    await mustRun(g, ["sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600"]);
    await mustRun(g, ["iptables-restore", "--noflush"], {
      stdin: `*nat\n-A SALLYPORT-SNAT-EIP -s 10.1.0.0/24 -d 10.2.0.2/32 -p udp -m multiport --dports 10000:60000 -m comment --comment "EgressPolicy/default/bulk" -j SNAT --to-source ${EIP[4]}\nCOMMIT\n`,
    });
    // 2 sockets × FLOWS/2 destination ports, one datagram each.
    await mustRun(lab.runner(lab.client), [
      process.execPath,
      "-e",
      `const d = require("node:dgram"); (async () => { for (let s = 0; s < 2; s++) { const u = d.createSocket("udp4"); await new Promise((r) => u.bind(0, r)); for (let p = 0; p < ${FLOWS / 2}; p++) { u.send("x", 10000 + p, "10.2.0.2"); if (p % 500 === 0) await new Promise((r) => setTimeout(r, 2)); } await new Promise((r) => setTimeout(r, 200)); u.close(); } })();`,
    ]);
    const entries = (await listSnatConnections(g)).split("\n").filter(Boolean).length;

    fillBallast(BALLAST_MB);
    const conntrackMs: number[] = [];
    for (let i = 0; i < ROUNDS; i++)
      conntrackMs.push((await timed(() => listSnatConnections(g))).ms);

    const spawner = new SpawnerRunner({ within: ["nsenter", `--net=/run/netns/${lab.gateway}`] });
    const inline = new InlineTrafficReader(spawner, { counters });
    const worker = new WorkerTrafficReader(
      { counters },
      { within: ["nsenter", `--net=/run/netns/${lab.gateway}`] },
    );
    await worker.read({ conntrack: true }); // starts the thread and its helper
    // Let the collections that filling the ballast started finish.
    await new Promise((r) => setTimeout(r, 3000));
    const idle = await timed(() => new Promise((r) => setTimeout(r, 1000)));
    const results = {
      inline: { ms: [] as number[], lag: [] as number[] },
      worker: { ms: [] as number[], lag: [] as number[] },
    };
    let listed = 0;
    // The worker's rounds first: garbage an inline read leaves on this thread would be collected
    // during the next measurement, whatever it measures.
    for (const [name, reader] of [
      ["worker", worker],
      ["inline", inline],
    ] as const) {
      for (let i = 0; i < ROUNDS; i++) {
        const r = await timed(() => reader.read({ conntrack: true }));
        results[name].ms.push(r.ms);
        results[name].lag.push(r.lagMs);
        listed = r.value.snat?.entries ?? 0;
      }
    }
    spawner.close();
    worker.close();

    const tally: Record<string, { ms: number }> = {};
    for (const destinations of [100, FLOWS]) {
      const text = synthetic(FLOWS, destinations);
      const ms: number[] = [];
      for (let i = 0; i < ROUNDS; i++) {
        const t0 = performance.now();
        const t = new SnatTally([EIP[4]]);
        t.add(text);
        summarizeSnat(t.result(), new Map([[EIP[4], KERNEL_SNAT_PORTS]]), 10);
        ms.push(performance.now() - t0);
      }
      tally[`destinations${destinations}`] = { ms: round1(median(ms)) };
    }
    return {
      flows: FLOWS,
      conntrackEntries: entries,
      listedByReader: listed,
      ballastMB: BALLAST_MB,
      conntrackMs: round1(median(conntrackMs)),
      idleMaxLoopLagMs: round1(idle.lagMs),
      inline: {
        readMs: round1(median(results.inline.ms)),
        maxLoopLagMs: round1(Math.max(...results.inline.lag)),
      },
      worker: {
        readMs: round1(median(results.worker.ms)),
        maxLoopLagMs: round1(Math.max(...results.worker.lag)),
        lags: results.worker.lag.map(round1),
      },
      tally,
    };
  } finally {
    await lab.down();
  }
}

if (import.meta.main) console.log(JSON.stringify(await run()));
