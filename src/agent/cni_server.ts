/**
 * The agent's side of `sallyport-cni` (src/cni/plugin.ts): a Unix socket, owner-only, that the
 * chained CNI plugin calls while the runtime sets up or tears down a pod's network.
 *
 *  - ADD: the pod's addresses count for this node's sets at once (the Pod object exists before
 *    CNI ADD, but its status has no addresses until the runtime reports them, so the plugin's
 *    are taken as they are: only root on the node can reach the socket, and root could write
 *    the sets itself). The pod's policies are computed by the same keyed path a watch event
 *    takes (AgentState → planner → partial sync); the answer comes once a sync that started
 *    after the change succeeded, i.e. the kernel holds the sets. When the node's pod watch
 *    lags behind the API the ADD waits up to `podWaitMs` for the Pod to appear.
 *  - DEL: the pod's addresses leave the sets (even those a slice not yet rewritten names)
 *    before the answer, so that IPAM can give them to another pod safely. Then, still before
 *    the answer, the connection tracking entries of those addresses go (`conntrack -D`, original
 *    source or destination): otherwise a new pod with the address that sends from a source port
 *    of an old entry takes over the old pod's connection and its NAT binding (a steered one has
 *    none on the source node), and leaves with its raw pod address. Calico's Felix does the same.
 *    A failure of conntrack is logged and DEL still succeeds (DEL is best effort). A repeated
 *    DEL (runtimes may repeat it) leaves alone an address that a later ADD gave another pod.
 *  - CHECK: whether the sets hold the pod with these addresses. STATUS: whether the agent has
 *    programmed its kernel once.
 */
import { chmodSync, mkdirSync, rmSync } from "node:fs";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { dirname } from "node:path";
import type { AgentErrorReply, PodNetworkReply, PodNetworkRequest } from "../cni/protocol.ts";
import { CNI_PATHS } from "../cni/protocol.ts";
import { deleteConnectionsOf } from "../kernel/conntrack.ts";
import type { Runner } from "../kernel/runner.ts";
import { type Clock, realClock } from "../lib/clock.ts";
import { formatAddress, tryParseAddress } from "../lib/ip.ts";
import type { Logger } from "../lib/log.ts";
import type { AgentState } from "./view.ts";

/** What the server needs of the agent (an `Agent` has all of it). */
export interface PodNetworkAgent {
  readonly state: AgentState;
  readonly sync: {
    trigger(urgent?: boolean): number;
    readonly requested: number;
    applied(generation: number): Promise<void>;
  };
}

export interface CniServerOptions {
  readonly socket: string;
  readonly agent: PodNetworkAgent;
  /** Runs `conntrack` at DEL (the datapath's runner). */
  readonly runner: Runner;
  readonly log: Logger;
  readonly clock?: Clock;
  /** ADD: how long to wait for the Pod to appear in the node's pod watch. @default 5000 */
  readonly podWaitMs?: number;
  /** ADD, DEL: how long to wait for the kernel before answering with an error. @default 30000 */
  readonly kernelWaitMs?: number;
}

class Refusal extends Error {
  readonly status: number;
  readonly retry: boolean;
  constructor(status: number, message: string, retry: boolean) {
    super(message);
    this.status = status;
    this.retry = retry;
  }
}

export class CniServer {
  readonly #o: CniServerOptions;
  readonly #clock: Clock;
  #server: Server | undefined;
  /** Requests served, by command, for tests and metrics. */
  readonly served = { add: 0, del: 0, check: 0, status: 0 };
  /** The pod the last ADD served gave each address to (until that pod's DEL). */
  readonly #owners = new Map<string, string>();

  constructor(options: CniServerOptions) {
    this.#o = options;
    this.#clock = options.clock ?? realClock;
  }

  async start(): Promise<void> {
    const socket = this.#o.socket;
    mkdirSync(dirname(socket), { recursive: true, mode: 0o700 });
    // A socket left by an agent that died: nothing listens on it any more.
    rmSync(socket, { force: true });
    const server = createServer((req, res) => void this.#handle(req, res));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(socket, () => {
        server.off("error", reject);
        resolve();
      });
    });
    // Root only: whoever can connect decides which addresses a pod has.
    chmodSync(socket, 0o600);
    this.#server = server;
    this.#o.log.info({ socket }, "CNI socket listening");
  }

  async stop(): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    if (server === undefined) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    rmSync(this.#o.socket, { force: true });
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const started = performance.now();
    try {
      if (req.method !== "POST") throw new Refusal(405, `${req.method} is not served`, false);
      const body = await readBody(req);
      let reply: PodNetworkReply;
      switch (req.url) {
        case CNI_PATHS.add:
          reply = await this.#add(requestOf(body));
          break;
        case CNI_PATHS.del:
          reply = await this.#del(requestOf(body));
          break;
        case CNI_PATHS.check:
          reply = this.#check(requestOf(body));
          break;
        case CNI_PATHS.status:
          this.served.status++;
          await this.#kernel(this.#o.agent.sync.requested, "the first datapath sync");
          reply = { policies: [] };
          break;
        default:
          throw new Refusal(404, `${req.url} is not served`, false);
      }
      send(res, 200, reply);
    } catch (e) {
      const r =
        e instanceof Refusal ? e : new Refusal(500, (e as Error).message ?? String(e), true);
      this.#o.log.warn(
        { url: req.url, err: r.message, ms: Math.round(performance.now() - started) },
        "CNI request refused",
      );
      send(res, r.status, { error: r.message, retry: r.retry } satisfies AgentErrorReply);
    }
  }

  async #add(r: PodNetworkRequest): Promise<PodNetworkReply> {
    this.served.add++;
    const started = performance.now();
    const { state } = this.#o.agent;
    const key = `${r.namespace}/${r.name}`;
    for (const ip of r.ips) this.#owners.set(ip, key);
    if (!state.attachPodNetwork(key, r.containerId, r.ips)) await this.#podAppears(key);
    await this.#kernel(this.#changed(), `pod ${key}'s sets`);
    const policies = state.selecting(key);
    this.#o.log.info(
      { pod: key, ips: r.ips, policies, ms: Math.round(performance.now() - started) },
      "CNI ADD: the kernel holds the pod's sets",
    );
    return { policies };
  }

  async #del(r: PodNetworkRequest): Promise<PodNetworkReply> {
    this.served.del++;
    const started = performance.now();
    const key = `${r.namespace}/${r.name}`;
    const { state } = this.#o.agent;
    // What the sets held (a Pod's status, or an ADD before a restart of the agent) and what the
    // plugin says: until IPAM releases them after this DEL, no other pod has these addresses.
    const ips = [...new Set([...state.localPodAddresses(key), ...r.ips])].filter(
      (ip) => (this.#owners.get(ip) ?? key) === key,
    );
    if (!state.detachPodNetwork(key, r.containerId)) {
      this.#o.log.info(
        { pod: key, containerId: r.containerId },
        "CNI DEL of a sandbox the pod no longer has: nothing to remove",
      );
      return { policies: [] };
    }
    for (const ip of ips) this.#owners.delete(ip);
    await this.#kernel(this.#changed(), `the removal of pod ${key}'s addresses`);
    const connections = await this.#forgetConnections(key, ips);
    this.#o.log.info(
      { pod: key, ips, connections, ms: Math.round(performance.now() - started) },
      "CNI DEL: the pod's addresses left this node's sets and its connection tracking",
    );
    return { policies: [] };
  }

  /** Deletes the addresses' conntrack entries; how many went (failures are logged, not thrown). */
  async #forgetConnections(key: string, ips: readonly string[]): Promise<number> {
    const counts = await Promise.all(
      ips.map((ip) =>
        deleteConnectionsOf(this.#o.runner, ip).catch((e: unknown) => {
          this.#o.log.warn(
            { pod: key, ip, err: (e as Error).message ?? String(e) },
            "CNI DEL: cannot delete the connection tracking entries of a pod address; a new pod that gets it may take over its old connections until they time out",
          );
          return 0;
        }),
      ),
    );
    return counts.reduce((a, b) => a + b, 0);
  }

  #check(r: PodNetworkRequest): PodNetworkReply {
    this.served.check++;
    const key = `${r.namespace}/${r.name}`;
    const { state } = this.#o.agent;
    const held = state.localPodAddresses(key);
    const missing = r.ips.filter((ip) => !held.includes(ip));
    if (!state.hasLocalPod(key) || missing.length > 0)
      throw new Refusal(
        404,
        `pod ${key} is not held with ${missing.join(", ") || "its addresses"} (held: ${held.join(", ") || "none"})`,
        false,
      );
    return { policies: state.selecting(key) };
  }

  /** The generation of the change just made (or of everything requested so far). */
  #changed(): number {
    const { state, sync } = this.#o.agent;
    return state.planDirty ? sync.trigger(true) : sync.requested;
  }

  async #kernel(generation: number, what: string): Promise<void> {
    const ms = this.#o.kernelWaitMs ?? 30_000;
    const timedOut = await within(this.#clock, ms, this.#o.agent.sync.applied(generation));
    if (timedOut)
      throw new Refusal(
        503,
        `the kernel does not hold ${what} after ${ms} ms: datapath syncs fail (see this agent's log, "datapath sync failed")`,
        true,
      );
  }

  async #podAppears(key: string): Promise<void> {
    const ms = this.#o.podWaitMs ?? 5000;
    const deadline = this.#clock.now() + ms;
    while (!this.#o.agent.state.hasLocalPod(key)) {
      if (this.#clock.now() >= deadline)
        throw new Refusal(
          404,
          `pod ${key} is not among this node's pods after ${ms} ms (is it scheduled to this node? is the agent's watch of Pods failing?)`,
          true,
        );
      await new Promise<void>((resolve) => this.#clock.after(10, resolve));
    }
  }
}

/** Resolves true when `ms` passed before `promise` settled. */
function within(clock: Clock, ms: number, promise: Promise<void>): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const timer = clock.after(ms, () => resolve(true));
    promise.then(
      () => {
        timer.cancel();
        resolve(false);
      },
      (e: unknown) => {
        timer.cancel();
        reject(e);
      },
    );
  });
}

function readBody(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("error", reject);
    req.on("end", () => {
      const text = Buffer.concat(chunks).toString("utf8");
      try {
        resolve(text === "" ? {} : JSON.parse(text));
      } catch (e) {
        reject(new Refusal(400, `Cannot parse the request: ${(e as Error).message}`, false));
      }
    });
  });
}

function requestOf(body: unknown): PodNetworkRequest {
  const b = (typeof body === "object" && body !== null ? body : {}) as Record<string, unknown>;
  for (const field of ["containerId", "ifname", "namespace", "name"] as const)
    if (typeof b[field] !== "string" || b[field] === "")
      throw new Refusal(400, `Cannot serve the request: "${field}" is missing`, false);
  if (!Array.isArray(b.ips))
    throw new Refusal(400, 'Cannot serve the request: "ips" is missing', false);
  const ips = b.ips.map((ip) => {
    const a = typeof ip === "string" ? tryParseAddress(ip) : undefined;
    if (a === undefined)
      throw new Refusal(
        400,
        `Cannot parse pod address: current value is ${JSON.stringify(ip)}`,
        false,
      );
    return formatAddress(a);
  });
  return { ...(b as unknown as PodNetworkRequest), ips };
}

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(text),
  });
  res.end(text);
}
