/**
 * The agent's liveness (src/agent/liveness.ts) in a worker thread of its own, so that probes go
 * out and are judged on time however busy the agent's own thread is.
 *
 * Why a thread: the agent's thread plans and syncs; at 1,000 policies a failover replans all of
 * them on the steering nodes, and its event loop was measured stalled for longer than the
 * detection time (200 ms). Probes sent from that loop then arrived late, the holder's support
 * ran out and it released its egress IPs again and again (`npm run bench -- failover --policies
 * 1000`: 2.5-s gaps). Liveness is the node's, not the planner's: it has its own thread, at a
 * higher scheduling priority, with its own heap and collector, and it keeps the kernel fence
 * (src/kernel/neighbour_fence.ts) itself. A frozen or dead process stops both threads.
 *
 * The agent's thread pushes what liveness reads (the members, the API-side facts, the egress IPs
 * its last sync holds, what it announces) whenever they change, and at least every 250 ms; the
 * worker posts its state whenever it changes, and at least every probe interval. The agent takes
 * a state older than two intervals for "not holding" (a thread that stopped answering).
 *
 * The same file is the worker's program: in development the worker runs this .ts file; the
 * shipped bundle has it as a second file, liveness-worker.mjs (scripts/build.ts).
 */
import { setPriority } from "node:os";
import {
  isMainThread,
  MessageChannel,
  type MessagePort,
  parentPort,
  receiveMessageOnPort,
  Worker,
  workerData,
} from "node:worker_threads";
import type { HeldEgressIP } from "../kernel/datapath.ts";
import { NeighbourFence } from "../kernel/neighbour_fence.ts";
import { ExecRunner } from "../kernel/runner.ts";
import type { Clock, Timer } from "../lib/clock.ts";
import { realClock } from "../lib/clock.ts";
import { createLogger, type Logger } from "../lib/log.ts";
import { Liveness, type LivenessTiming, type Member, udpTransport } from "./liveness.ts";

const ROLE = "sallyport-liveness";

interface WorkerConfig {
  readonly role: typeof ROLE;
  readonly node: string;
  readonly port: number;
  readonly key: Uint8Array | undefined;
  readonly timing: LivenessTiming;
  readonly apiSettleMs: number | undefined;
  /** Keep the kernel fence (processes); tests of the thread alone may not. */
  readonly fence: boolean;
  /** Where the worker posts its state; the agent reads it synchronously (receiveMessageOnPort). */
  readonly states: MessagePort;
}

/** The agent's thread → the worker. */
interface Facts {
  readonly type: "facts";
  readonly members: readonly Member[];
  readonly leaseValid: boolean;
  readonly apiReachable: boolean;
  /** Wall-clock ms since which every cache has been listed. */
  readonly listedAtWall: number;
  readonly held: readonly HeldEgressIP[];
}
type ToWorker =
  | Facts
  | {
      readonly type: "announce";
      readonly down: readonly string[];
      readonly prepared: readonly string[];
    }
  | { readonly type: "renew" }
  | { readonly type: "handOver"; readonly holdMs: number };

/** The worker → the agent's thread. */
interface State {
  readonly type: "state";
  /** The worker's wall clock when it posted this. */
  readonly wall: number;
  /** When its liveness started (wall clock). */
  readonly startedWall: number;
  readonly holding: boolean;
  readonly down: readonly string[];
  readonly announced: Readonly<Record<string, readonly string[]>>;
  /** What the other nodes are taking over now (Liveness.takingBy). */
  readonly taking: Readonly<Record<string, readonly string[]>>;
  readonly version: number;
  readonly rejected: number;
  /** The other nodes' fresh claims (Liveness.claims()), only when they changed. */
  readonly claims?: Readonly<Record<string, readonly string[]>>;
}
type FromWorker =
  | { readonly type: "refresh" }
  | { readonly type: "stopped" }
  /** A state that changes a decision was posted: read it now (the agent also polls). */
  | { readonly type: "changed" };

/** What the agent needs of liveness, in its thread or in a worker. */
export interface LivenessHandle {
  start(): void;
  stop(): void;
  /** Resolves once the last probe (and the kernel fence's extension) went out. */
  handOver(holdMs: number): void | Promise<void>;
  holding(): boolean;
  /**
   * What liveness last said of holding, however long ago (a hand-over asks what the node held
   * when it was told to stop; holding() takes an old word as "no").
   */
  lastSaidHolding(): boolean;
  readonly fenced: boolean;
  readonly down: ReadonlySet<string>;
  readonly version: number;
  readonly rejected: number;
  /** Our datapath holds `down` as down, and carries `prepared`'s policies in advance. */
  announce(down: ReadonlySet<string>, prepared?: ReadonlySet<string>): void;
  announcedBy(node: string): ReadonlySet<string>;
  takingBy(node: string): ReadonlySet<string>;
  /** The node whose fresh probe says it answers for this egress IP, if any but this one. */
  claimedBy(address: string): string | undefined;
  renew(): void;
}

export interface WorkerLivenessOptions {
  readonly node: string;
  readonly port: number;
  readonly key: Buffer | undefined;
  readonly timing: LivenessTiming;
  readonly clock: Clock;
  readonly log: Logger;
  readonly members: () => ReadonlyMap<string, Member>;
  readonly leaseValid: () => boolean;
  readonly apiReachable: () => boolean;
  /** See LivenessOptions. */
  readonly apiSettleMs?: number;
  /** The egress IPs the last sync holds. */
  readonly held: () => readonly HeldEgressIP[];
  /** Clock time since which every cache has been listed. */
  readonly listedAt: () => number;
  /** Relist every cache (the API-side rule's recovery). */
  readonly refresh: () => void;
  readonly onChange: () => void;
  /** Every 250 ms while holding: what the agent renews itself (the addresses' leases). */
  readonly onHolding?: () => void;
}

function workerURL(): URL {
  const self = new URL(import.meta.url);
  return self.pathname.endsWith(".ts") ? self : new URL("./liveness-worker.mjs", self);
}

const EMPTY: ReadonlySet<string> = new Set();

export class WorkerLiveness implements LivenessHandle {
  readonly #o: WorkerLivenessOptions;
  #worker: Worker | undefined;
  #states: MessagePort | undefined;
  #state: State | undefined;
  #down: ReadonlySet<string> = EMPTY;
  #announced = new Map<string, ReadonlySet<string>>();
  #taking = new Map<string, ReadonlySet<string>>();
  #claims = new Map<string, ReadonlySet<string>>();
  #timer: Timer | undefined;
  #lastFacts = "";

  constructor(options: WorkerLivenessOptions) {
    this.#o = options;
  }

  start(): void {
    const { port1, port2 } = new MessageChannel();
    this.#states = port1;
    const config: WorkerConfig = {
      role: ROLE,
      node: this.#o.node,
      port: this.#o.port,
      key: this.#o.key === undefined ? undefined : new Uint8Array(this.#o.key),
      timing: this.#o.timing,
      apiSettleMs: this.#o.apiSettleMs,
      fence: true,
      states: port2,
    };
    const worker = new Worker(workerURL(), { workerData: config, transferList: [port2] });
    this.#worker = worker;
    worker.on("message", (m: FromWorker) => {
      if (m.type === "refresh") this.#o.refresh();
      else if (m.type === "changed") this.#drain();
    });
    worker.on("error", (e) =>
      this.#o.log.error({ err: e.message }, "the liveness thread failed; not holding"),
    );
    let ticks = 0;
    const tick = () => {
      this.#drain();
      // Every 250 ms: the facts (if they changed) and the addresses' own leases.
      if (ticks++ % 10 === 0) {
        this.#push();
        if (this.holding()) this.#o.onHolding?.();
      }
      this.#timer = this.#o.clock.after(25, tick);
    };
    tick();
  }

  /** Reads every state the worker posted since the last call; the newest counts. */
  #drain(): void {
    const port = this.#states;
    if (port === undefined) return;
    let latest: State | undefined;
    let claims: State["claims"];
    for (let m = receiveMessageOnPort(port); m !== undefined; m = receiveMessageOnPort(port)) {
      latest = m.message as State;
      claims = latest.claims ?? claims;
    }
    if (latest === undefined) return;
    const before = this.#state;
    this.#state = latest;
    if (claims !== undefined)
      this.#claims = new Map(Object.entries(claims).map(([n, c]) => [n, new Set(c)]));
    if (before !== undefined && before.version === latest.version) {
      // Only the claims moved: the planner reads them (Agent#withhold).
      if (claims !== undefined) this.#o.onChange();
      return;
    }
    this.#down = new Set(latest.down);
    this.#announced = new Map(Object.entries(latest.announced).map(([n, d]) => [n, new Set(d)]));
    this.#taking = new Map(Object.entries(latest.taking).map(([n, d]) => [n, new Set(d)]));
    if (before !== undefined || latest.version > 0) this.#o.onChange();
  }

  stop(): void {
    this.#end(0);
  }

  handOver(holdMs: number): Promise<void> {
    this.#push(this.#worker, true);
    return this.#end(holdMs);
  }

  /**
   * The worker closes its sockets and waits for the kernel fence to take what it was last told
   * (the hand-over's long fence included), then says so; terminate() would cut that off.
   */
  #end(holdMs: number): Promise<void> {
    this.#timer?.cancel();
    const worker = this.#worker;
    this.#worker = undefined;
    this.#states?.close();
    this.#states = undefined;
    if (worker === undefined) return Promise.resolve();
    worker.postMessage({ type: "handOver", holdMs } satisfies ToWorker);
    // The process may exit right after: wait for the worker's word (its last probe is sent).
    return new Promise<void>((resolve) => {
      const done = setTimeout(() => {
        void worker.terminate();
        resolve();
      }, 1000);
      worker.on("message", (m: FromWorker) => {
        if (m.type === "stopped") {
          clearTimeout(done);
          void worker.terminate();
          resolve();
        }
      });
    });
  }

  /**
   * Resolves once the worker's liveness has run for `ms` (it heard its peers), or after 10 s:
   * the agent's first sync waits for it (a thread takes a while to start on a busy node).
   */
  async settled(ms: number): Promise<void> {
    const end = Date.now() + 10_000;
    for (;;) {
      this.#drain();
      const s = this.#state;
      if ((s !== undefined && Date.now() - s.startedWall >= ms) || Date.now() > end) return;
      await new Promise<void>((r) => this.#o.clock.after(20, r));
    }
  }

  /**
   * The worker's newest word, read now (not when this thread last had time for it); a word older
   * than the detection time means a thread that stopped: not holding.
   */
  holding(): boolean {
    this.#drain();
    const s = this.#state;
    const detect = this.#o.timing.intervalMs * this.#o.timing.multiplier;
    return s?.holding === true && Date.now() - s.wall < detect;
  }

  lastSaidHolding(): boolean {
    this.#drain();
    return this.#state?.holding === true;
  }

  get fenced(): boolean {
    return !this.holding();
  }

  get down(): ReadonlySet<string> {
    this.#drain();
    return this.#down;
  }

  get version(): number {
    this.#drain();
    return this.#state?.version ?? 0;
  }

  get rejected(): number {
    return this.#state?.rejected ?? 0;
  }

  announce(down: ReadonlySet<string>, prepared: ReadonlySet<string> = EMPTY): void {
    this.#worker?.postMessage({
      type: "announce",
      down: [...down],
      prepared: [...prepared],
    } satisfies ToWorker);
  }

  announcedBy(node: string): ReadonlySet<string> {
    return this.#announced.get(node) ?? EMPTY;
  }

  takingBy(node: string): ReadonlySet<string> {
    return this.#taking.get(node) ?? EMPTY;
  }

  claimedBy(address: string): string | undefined {
    this.#drain();
    for (const [n, claims] of this.#claims) if (claims.has(address)) return n;
    return undefined;
  }

  /** A sync finished: its egress IPs go to the worker, which fences them at once. */
  renew(): void {
    this.#push(this.#worker, true);
    this.#worker?.postMessage({ type: "renew" } satisfies ToWorker);
  }

  #push(worker = this.#worker, force = false): void {
    if (worker === undefined) return;
    const now = this.#o.clock.now();
    const facts: Facts = {
      type: "facts",
      members: [...this.#o.members().values()],
      leaseValid: this.#o.leaseValid(),
      apiReachable: this.#o.apiReachable(),
      listedAtWall: Date.now() - (now - this.#o.listedAt()),
      held: this.#o.held(),
    };
    // listedAtWall moves with rounding: compare the rest.
    const key = JSON.stringify({ ...facts, listedAtWall: Math.floor(facts.listedAtWall / 100) });
    if (!force && key === this.#lastFacts) return;
    this.#lastFacts = key;
    worker.postMessage(facts satisfies ToWorker);
  }
}

/** The worker's side. */
function serve(config: WorkerConfig): void {
  const port = parentPort!;
  try {
    // Before the planner when the node is busy: a late probe is a false failover.
    setPriority(-5);
  } catch {
    // Not allowed here (a container without CAP_SYS_NICE): the normal priority, still a thread.
  }
  const log = createLogger("agent").child({ node: config.node, thread: "liveness" });
  const clock: Clock = realClock;
  let facts: Facts = {
    type: "facts",
    members: [],
    leaseValid: true,
    apiReachable: true,
    listedAtWall: Number.NEGATIVE_INFINITY,
    held: [],
  };
  let members = new Map<string, Member>();
  const fence = config.fence ? new NeighbourFence({ runner: new ExecRunner(), log }) : undefined;
  const states = config.states;
  let startedWall = Number.POSITIVE_INFINITY;
  let claimsPosted = -1;
  const post = () => {
    const announced: Record<string, readonly string[]> = {};
    const taking: Record<string, readonly string[]> = {};
    for (const m of members.keys()) {
      const d = liveness.announcedBy(m);
      if (d.size > 0) announced[m] = [...d];
      const t = liveness.takingBy(m);
      if (t.size > 0) taking[m] = [...t];
    }
    states.postMessage({
      type: "state",
      wall: Date.now(),
      startedWall,
      holding: !liveness.fenced,
      down: [...liveness.down],
      announced,
      taking,
      version: liveness.version,
      rejected: liveness.rejected,
      ...(liveness.claimsVersion === claimsPosted ? {} : { claims: liveness.claims() }),
    } satisfies State);
    claimsPosted = liveness.claimsVersion;
  };
  const liveness: Liveness = new Liveness({
    node: config.node,
    clock,
    log,
    transport: udpTransport(config.port, log),
    key: config.key === undefined ? undefined : Buffer.from(config.key),
    timing: config.timing,
    members: () => members,
    leaseValid: () => facts.leaseValid,
    apiReachable: () => facts.apiReachable,
    apiSettleMs: config.apiSettleMs,
    onChange: () => {
      post();
      port.postMessage({ type: "changed" } satisfies FromWorker);
    },
    onHolding: (forMs) => fence?.hold(facts.held, forMs),
    claims: () => facts.held.map((h) => h.address),
    onRelease: () => fence?.release(),
    refresh: () => port.postMessage({ type: "refresh" } satisfies FromWorker),
    freshSince: (t) => facts.listedAtWall >= Date.now() - (clock.now() - t),
  });
  // Nothing is judged, and nothing held, before the first facts: without the members, fewer than
  // three voters would seem to exist, and such a node holds.
  let started = false;
  port.on("message", (m: ToWorker) => {
    switch (m.type) {
      case "facts":
        facts = m;
        members = new Map(m.members.map((x) => [x.name, x]));
        if (!started) {
          started = true;
          void (async () => {
            await fence?.install();
            startedWall = Date.now();
            liveness.start();
            heartbeat();
          })();
        }
        break;
      case "announce":
        liveness.announce(new Set(m.down), new Set(m.prepared));
        break;
      case "renew":
        liveness.renew();
        break;
      case "handOver":
        if (m.holdMs > 0) liveness.handOver(m.holdMs);
        else liveness.stop();
        // After the sockets closed (their last probe out) and the kernel took the last renewal.
        void Promise.all([fence?.close(), new Promise((r) => setTimeout(r, 150))]).then(() =>
          port.postMessage({ type: "stopped" } satisfies FromWorker),
        );
        break;
    }
  });
  // At least every interval, so the agent can tell a live thread from a stopped one.
  const heartbeat = () => {
    post();
    clock.after(config.timing.intervalMs, heartbeat);
  };
}

if (!isMainThread && (workerData as Partial<WorkerConfig> | undefined)?.role === ROLE)
  serve(workerData as WorkerConfig);
