/**
 * When a gateway must stop answering for its egress IPs (fencing), without split brain and
 * without dropping traffic when the API server is down for everyone.
 *
 * Gateway-capable agents send each other a heartbeat over the underlay every renewal period:
 * "my last lease renewal reached the API server: yes/no". A gateway is fenced when
 *   - its own lease is no longer valid (no renewal started in the last D succeeded), and
 *   - another gateway-capable node exists (someone could take its egress IPs over), and
 *   - it is not the case that it hears at least one peer and every peer it hears says its
 *     renewals fail too (then the API server is down for everyone: nobody can take over, so
 *     keeping the egress IPs is safe and keeps traffic flowing).
 * So: cut off from the API server alone → fenced before the controller moves its IPs (see
 * src/kube/node_lease.ts for the timing); cut off from everything → fenced; the API server down
 * for all → nobody fenced, the datapath stays as it was.
 */
import { createSocket, type Socket } from "node:dgram";
import type { Clock, Timer } from "../lib/clock.ts";
import type { Logger } from "../lib/log.ts";

export interface FenceInputs {
  /** Our lease is valid. */
  readonly leaseValid: boolean;
  /** Other gateway-capable nodes exist (someone could take our egress IPs). */
  readonly peers: number;
  /** What the peers we heard within the lease duration say: did their API calls succeed? */
  readonly heard: readonly boolean[];
}

/** Cut off from the API server while others reach it (or cut off from everything). */
export function cutOff(i: FenceInputs): boolean {
  const apiDownForAll = i.heard.length > 0 && i.heard.every((ok) => !ok);
  return !i.leaseValid && i.peers > 0 && !apiDownForAll;
}

export interface FenceOptions {
  readonly node: string;
  readonly clock: Clock;
  readonly log: Logger;
  /** UDP port for heartbeats. @default 7800 */
  readonly port: number;
  /** Address to listen on (the node's underlay address); default: every address. */
  readonly listenAddress?: string | undefined;
  readonly periodMs: number;
  readonly durationMs: number;
  /** Is our own lease valid? */
  readonly leaseValid: () => boolean;
  /** Did our last renewal attempt reach the API server? (what we tell peers) */
  readonly apiReachable: () => boolean;
  /** Gateway-capable peers (not this node) and where to reach them. */
  readonly peers: () => ReadonlyMap<string, string>;
  readonly onChange: (fenced: boolean) => void;
  /**
   * Called on every tick on which this node is not fenced: it may go on answering for the
   * egress IPs its last synced plan holds (the agent renews their leases in the kernel).
   */
  readonly onHolding?: () => void;
  /**
   * After the lease recovers, our caches are stale (the watches were cut too) and may still say
   * we hold egress IPs the controller has moved meanwhile. `refresh` relists them; we stay fenced
   * until `freshSince(t)` says every cache was relisted after t.
   */
  readonly refresh: () => void;
  readonly freshSince: (t: number) => boolean;
}

export class Fence {
  readonly #o: FenceOptions;
  readonly #heard = new Map<string, { at: number; ok: boolean }>();
  #socket4: Socket | undefined;
  #socket6: Socket | undefined;
  #timer: Timer | undefined;
  #fenced = false;
  #recoveringSince: number | undefined;

  constructor(options: FenceOptions) {
    this.#o = options;
  }

  get fenced(): boolean {
    return this.#fenced;
  }

  start(): void {
    const onMessage = (msg: Buffer) => {
      try {
        const m = JSON.parse(msg.toString("utf8")) as { n?: string; ok?: boolean };
        if (typeof m.n === "string" && m.n !== this.#o.node)
          this.#heard.set(m.n, { at: this.#o.clock.now(), ok: m.ok === true });
      } catch {
        // not ours
      }
    };
    this.#socket4 = createSocket({ type: "udp4", reuseAddr: true });
    this.#socket4.on("message", onMessage);
    this.#socket4.on("error", (e) => this.#o.log.warn({ err: e.message }, "fence socket error"));
    this.#socket4.bind(this.#o.port);
    this.#socket6 = createSocket({ type: "udp6", ipv6Only: true, reuseAddr: true });
    this.#socket6.on("message", onMessage);
    this.#socket6.on("error", () => {});
    this.#socket6.bind(this.#o.port);
    const tick = () => {
      try {
        this.#beat();
        this.#evaluate();
      } catch (e) {
        this.#o.log.error({ err: (e as Error).message }, "fence tick failed");
      }
      this.#timer = this.#o.clock.after(this.#o.periodMs, tick);
    };
    tick();
  }

  /**
   * Whether this node may hold its egress IPs now, evaluated now rather than at the last tick:
   * an agent that was frozen (or starved) for longer than the lease must not act on the verdict
   * it reached before, e.g. put back an egress IP whose lease in the kernel ended meanwhile.
   */
  holding(): boolean {
    this.#evaluate();
    return !this.#fenced;
  }

  stop(): void {
    this.#timer?.cancel();
    this.#socket4?.close();
    this.#socket6?.close();
  }

  #beat(): void {
    const msg = Buffer.from(JSON.stringify({ n: this.#o.node, ok: this.#o.apiReachable() }));
    for (const address of this.#o.peers().values()) {
      const socket = address.includes(":") ? this.#socket6 : this.#socket4;
      socket?.send(msg, this.#o.port, address, () => {});
    }
  }

  #evaluate(): void {
    const now = this.#o.clock.now();
    const peers = this.#o.peers();
    const heard = [...this.#heard.entries()].filter(
      ([n, h]) => peers.has(n) && now - h.at < this.#o.durationMs,
    );
    const apiDownForAll = heard.length > 0 && heard.every(([, h]) => !h.ok);
    const isCutOff = cutOff({
      leaseValid: this.#o.leaseValid(),
      peers: peers.size,
      heard: heard.map(([, h]) => h.ok),
    });
    let fenced = isCutOff;
    if (this.#fenced && !isCutOff) {
      // Recovering: stay fenced until every cache was relisted after the recovery.
      if (this.#recoveringSince === undefined) {
        this.#recoveringSince = now;
        this.#o.refresh();
      }
      fenced = !this.#o.freshSince(this.#recoveringSince);
    }
    if (!fenced || isCutOff) this.#recoveringSince = undefined;
    if (fenced !== this.#fenced) {
      this.#fenced = fenced;
      this.#o.log.warn(
        {
          fenced,
          peersHeard: heard.length,
          apiDownForAll,
          heard: heard.map(([n, h]) => ({ n, ok: h.ok, ageMs: Math.round(now - h.at) })),
        },
        fenced
          ? "fenced: the node lease expired while others can reach the API server; no longer answering for egress IPs"
          : "no longer fenced: the lease is renewed and the caches are fresh",
      );
      this.#o.onChange(fenced);
    }
    if (!fenced) this.#o.onHolding?.();
  }
}
