/**
 * The agent's TrafficReader in a worker thread, so that reading the kernel's counters and its
 * connection tracking table never blocks the agent's event loop.
 *
 * Why a thread: a table of 100,000 connections is ~15 MB of conntrack text; taking it from a
 * helper process and parsing it costs 0.2–0.6 s of CPU with garbage-collection pauses of up to
 * 150 ms (bench/traffic.ts), which on the agent's own thread would stall the pod path it keeps at
 * ~7 ms. A worker has its own heap and its own collector; the agent receives only the summary
 * (a few hundred entries however large the table). The worker starts commands from its own small
 * helper process (SpawnerRunner): a fork of the agent for every command would copy its page
 * tables, and the agent's loop then lagged up to 43 ms per read instead of 17 (bench/traffic.ts).
 * On the nftables datapath the counters are the class maps' elements, listed and parsed here
 * too (0.55 s of nft for 1,000 classes, see NftCounters); which policy decided each element is
 * looked up on the agent's thread, where the plan is (src/agent/traffic.ts nftPolicyOf).
 *
 * The same file is the worker's program: in development the worker runs this .ts file; the
 * shipped bundle has it as a second file, traffic-worker.mjs (scripts/build.ts).
 */
import { setPriority } from "node:os";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import { SpawnerRunner } from "../kernel/spawner.ts";
import {
  InlineTrafficReader,
  type TrafficReader,
  type TrafficReaderConfig,
  type TrafficReading,
} from "./traffic.ts";

const ROLE = "sallyport-traffic-reader";

interface WorkerConfig {
  readonly role: typeof ROLE;
  readonly reader: TrafficReaderConfig;
  /** SpawnerRunner's options: tests run the commands in a network namespace. */
  readonly runner: { readonly prefix?: readonly string[]; readonly within?: readonly string[] };
}

type Request = { readonly id: number; readonly conntrack: boolean };
type Answer =
  | { readonly id: number; readonly reading: TrafficReading }
  | { readonly id: number; readonly error: string };

/** Where the worker's program is: this file, or its bundled twin next to the bundle. */
function workerURL(): URL {
  const self = new URL(import.meta.url);
  return self.pathname.endsWith(".ts") ? self : new URL("./traffic-worker.mjs", self);
}

export class WorkerTrafficReader implements TrafficReader {
  readonly #config: WorkerConfig;
  #worker: Worker | undefined;
  readonly #pending = new Map<
    number,
    { resolve: (r: TrafficReading) => void; reject: (e: Error) => void }
  >();
  #seq = 0;

  constructor(reader: TrafficReaderConfig, runner: WorkerConfig["runner"] = {}) {
    this.#config = { role: ROLE, reader, runner };
  }

  read(options: { readonly conntrack: boolean }): Promise<TrafficReading> {
    const worker = this.#ensure();
    const id = this.#seq++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      worker.ref();
      worker.postMessage({ id, conntrack: options.conntrack } satisfies Request);
    });
  }

  close(): void {
    void this.#worker?.terminate();
    this.#worker = undefined;
  }

  #ensure(): Worker {
    if (this.#worker !== undefined) return this.#worker;
    const worker = new Worker(workerURL(), { workerData: this.#config });
    this.#worker = worker;
    worker.on("message", (m: Answer) => {
      const p = this.#pending.get(m.id);
      if (p === undefined) return;
      this.#pending.delete(m.id);
      if (this.#pending.size === 0) worker.unref();
      if ("error" in m) p.reject(new Error(m.error));
      else p.resolve(m.reading);
    });
    const gone = (why: string) => {
      if (this.#worker === worker) this.#worker = undefined;
      for (const [id, p] of this.#pending) {
        this.#pending.delete(id);
        p.reject(new Error(`Cannot read traffic figures: the reader thread ${why}`));
      }
    };
    worker.on("error", (e) => gone(`failed: ${e.message}`));
    worker.on("exit", (code) => gone(`exited (${code})`));
    worker.unref();
    return worker;
  }
}

/** The worker's side: one reader, requests answered one at a time. */
function serve(config: WorkerConfig): void {
  const port = parentPort!;
  // On Linux a priority applies to the calling thread: this one, and the helper process it
  // starts (and so conntrack, iptables-save and nft) inherit it. The agent's own thread, which
  // keeps the datapath in sync, goes first when the node is busy.
  try {
    setPriority(10);
  } catch {
    // A container may forbid it; reading at the normal priority is still correct.
  }
  const runner = new SpawnerRunner({
    ...(config.runner.prefix === undefined ? {} : { prefix: config.runner.prefix }),
    ...(config.runner.within === undefined ? {} : { within: config.runner.within }),
  });
  const reader = new InlineTrafficReader(runner, config.reader);
  let queue = Promise.resolve();
  port.on("message", (m: Request) => {
    queue = queue.then(async () => {
      try {
        port.postMessage({ id: m.id, reading: await reader.read(m) } satisfies Answer);
      } catch (e) {
        port.postMessage({ id: m.id, error: (e as Error).message } satisfies Answer);
      }
    });
  });
}

if (!isMainThread && (workerData as Partial<WorkerConfig> | undefined)?.role === ROLE)
  serve(workerData as WorkerConfig);
