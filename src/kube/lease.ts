/**
 * coordination.k8s.io/v1 Leases: leader election for the controller (client-go's algorithm) and
 * the renewal loop gateway agents run for failure detection.
 *
 * Expiry is always judged by local observation: a candidate notes *when it saw* the lease record
 * change, on its own monotonic clock, and takes over only when it has not seen a change for the
 * lease's duration. The recorded times are for humans; trusting them would expose the algorithm
 * to clock skew between machines (client-go#448).
 */
import type { Clock, Timer } from "../lib/clock.ts";
import type { Logger } from "../lib/log.ts";
import { CORE, isConflict, isNotFound, type KubeClient, type KubeObject } from "./client.ts";

export interface Lease extends KubeObject {
  spec: {
    holderIdentity?: string | null;
    leaseDurationSeconds?: number;
    acquireTime?: string;
    renewTime?: string;
    leaseTransitions?: number;
  };
}

/** Lease times are MicroTime: exactly six fractional digits, or the API server rejects them. */
export function microTime(date = new Date()): string {
  return date.toISOString().replace(/\.(\d{3})Z$/, ".$1000Z");
}

export interface LeaderElectorOptions {
  readonly client: KubeClient;
  readonly namespace: string;
  readonly name: string;
  readonly identity: string;
  readonly clock: Clock;
  readonly log: Logger;
  /** @default 15000 */
  readonly leaseDurationMs?: number;
  /** Give up leadership when no renewal succeeded for this long. @default 10000 */
  readonly renewDeadlineMs?: number;
  /** @default 2000 */
  readonly retryPeriodMs?: number;
  readonly onStartedLeading: () => void;
  /** Leadership is lost: stop acting as leader. The elector keeps running and may win again. */
  readonly onStoppedLeading: () => void;
}

export class LeaderElector {
  readonly #o: Required<LeaderElectorOptions>;
  #timer: Timer | undefined;
  #stopped = true;
  #leading = false;
  /** The attempt under way, which stop() waits for before releasing. */
  #attempt: Promise<void> | undefined;
  /** The record as last seen and when we saw it change (monotonic ms). */
  #observed: { record: string; at: number } | undefined;
  #lastRenew = 0;

  constructor(options: LeaderElectorOptions) {
    this.#o = { leaseDurationMs: 15_000, renewDeadlineMs: 10_000, retryPeriodMs: 2000, ...options };
  }

  get leading(): boolean {
    return this.#leading;
  }

  start(): void {
    this.#stopped = false;
    void this.#tick();
  }

  /**
   * Stops; a leader releases the lease so that another replica takes over at once. An attempt
   * under way is waited for first: it could otherwise renew after the release, or make this
   * replica leader again after it stopped.
   */
  async stop(): Promise<void> {
    this.#stopped = true;
    this.#timer?.cancel();
    await this.#attempt;
    if (this.#leading) {
      this.#leading = false;
      try {
        const lease = await this.#o.client.get<Lease>(CORE.leases, this.#o.name, this.#o.namespace);
        if (lease.spec.holderIdentity === this.#o.identity) {
          lease.spec = {
            ...lease.spec,
            holderIdentity: null,
            leaseDurationSeconds: 1,
            renewTime: microTime(),
          };
          await this.#o.client.replace(CORE.leases, lease);
        }
      } catch {
        // Best effort: the lease expires on its own.
      }
    }
  }

  async #tick(): Promise<void> {
    if (this.#stopped) return;
    this.#attempt = this.#tryAcquireOrRenew().catch((e: unknown) => {
      this.#o.log.debug({ err: (e as Error).message }, "leader election attempt failed");
    });
    await this.#attempt;
    this.#attempt = undefined;
    if (this.#leading && this.#o.clock.now() - this.#lastRenew > this.#o.renewDeadlineMs) {
      this.#o.log.error(
        { lease: this.#o.name },
        "could not renew leadership before the deadline; stepping down",
      );
      this.#leading = false;
      this.#o.onStoppedLeading();
    }
    if (!this.#stopped)
      this.#timer = this.#o.clock.after(this.#o.retryPeriodMs, () => void this.#tick());
  }

  async #tryAcquireOrRenew(): Promise<void> {
    const { client, namespace, name, identity, clock } = this.#o;
    const now = clock.now();
    const durationSeconds = Math.ceil(this.#o.leaseDurationMs / 1000);
    let lease: Lease;
    try {
      lease = await client.get<Lease>(CORE.leases, name, namespace);
    } catch (e) {
      if (!isNotFound(e)) throw e;
      await client.create<Lease>(CORE.leases, {
        apiVersion: "coordination.k8s.io/v1",
        kind: "Lease",
        metadata: { name, namespace },
        spec: {
          holderIdentity: identity,
          leaseDurationSeconds: durationSeconds,
          acquireTime: microTime(),
          renewTime: microTime(),
          leaseTransitions: 0,
        },
      });
      this.#becameLeader(now);
      return;
    }
    const record = JSON.stringify([
      lease.spec.holderIdentity,
      lease.spec.renewTime,
      lease.spec.leaseTransitions,
    ]);
    if (this.#observed?.record !== record) this.#observed = { record, at: now };
    const holder = lease.spec.holderIdentity ?? "";
    const expired =
      now - this.#observed.at > (lease.spec.leaseDurationSeconds ?? durationSeconds) * 1000;
    if (holder !== identity && holder !== "" && !expired) return;
    const takeover = holder !== identity;
    lease.spec = {
      ...lease.spec,
      holderIdentity: identity,
      leaseDurationSeconds: durationSeconds,
      renewTime: microTime(),
      ...(takeover
        ? { acquireTime: microTime(), leaseTransitions: (lease.spec.leaseTransitions ?? 0) + 1 }
        : {}),
    };
    try {
      // resourceVersion makes this a compare-and-swap: a racing candidate gets 409.
      await client.replace(CORE.leases, lease);
    } catch (e) {
      if (isConflict(e)) return;
      throw e;
    }
    this.#becameLeader(now);
  }

  #becameLeader(now: number): void {
    this.#lastRenew = now;
    if (this.#leading) return;
    this.#leading = true;
    // Taken by the attempt stop() waits for: stop() releases it; nobody is told to lead.
    if (this.#stopped) return;
    this.#o.log.info({ lease: this.#o.name, identity: this.#o.identity }, "became leader");
    this.#o.onStartedLeading();
  }
}
