/**
 * Gateway liveness through Leases in Sallyport's namespace, one per gateway-capable node
 * (`sallyport-node-<node>`).
 *
 * The leases are the slow, API-side half of liveness: failover is decided among the nodes in the
 * data plane (src/agent/liveness.ts), and a node the probes judge down is dead for the controller
 * at once (its EgressNode status `downNodes`). The lease covers what the probes cannot decide:
 * a cluster with fewer than three voters, and a gateway cut off from the API server alone.
 *
 * Timing (defaults, kubelet's pace; see docs/operations.md for the argument):
 *   agent renews every R = 10 s; the lease lasts D = 40 s;
 *   the agent stops answering for its egress IPs when no renewal *started* in the last D
 *     succeeded (and the API server is still reachable for others, see src/agent/liveness.ts);
 *   the controller declares the node dead when it has *seen* no renewal for D + G (G = 10 s),
 *     counted only while its own watch was connected.
 * A renewal is seen after it started, so the controller's deadline is at least G later than the
 * agent's: the old gateway has stopped answering before anyone else is told to take over, as
 * long as the two monotonic clocks drift less than G/D = 25% apart.
 */
import type { Clock, Timer } from "../lib/clock.ts";
import type { Logger } from "../lib/log.ts";
import { CORE, isNotFound, type KubeClient } from "./client.ts";
import { type Lease, microTime } from "./lease.ts";
import { Reflector } from "./reflector.ts";

export const NODE_LEASE_LABEL = "sallyport.dev/node-lease";
/**
 * Set by an agent on its last renewal before a planned restart (SIGTERM): the controller keeps
 * the node alive this long after that renewal instead of D + G, so a rolling update of the agent
 * moves no egress IP (the kernel keeps forwarding meanwhile). The next agent clears it.
 */
export const RESTART_HOLD_ANNOTATION = "sallyport.dev/restart-hold-ms";

export function nodeLeaseName(node: string): string {
  return `sallyport-node-${node}`;
}

export interface LeaseTiming {
  /** Between renewals. */
  readonly renewMs: number;
  /** A lease not renewed for this long has expired. */
  readonly durationMs: number;
  /** The controller moves a node's egress IPs this long after its lease expired. */
  readonly graceMs: number;
}

/**
 * Kubelet's pace (a node lease renewed every 10 s, lasting 40 s): failover is decided in the data
 * plane (src/agent/liveness.ts); the lease only covers a cluster with fewer than three voters and
 * a node cut off from the API server alone.
 */
export const DEFAULT_LEASE_TIMING: LeaseTiming = {
  renewMs: 10_000,
  durationMs: 40_000,
  graceMs: 10_000,
};

/** The agent side: renew this node's lease; know whether the last renewals succeeded. */
export class NodeLeaseRenewer {
  readonly #o: {
    client: KubeClient;
    namespace: string;
    node: string;
    clock: Clock;
    log: Logger;
    timing: LeaseTiming;
  };
  #timer: Timer | undefined;
  #stopped = true;
  /** Clock time at which the last successful renewal was *sent*. */
  #lastSuccessStart = Number.NEGATIVE_INFINITY;
  #attempted = false;
  /** Create the lease when missing (the node is known to be gateway-capable). */
  #create = false;
  /** The hold of a previous process has been cleared. */
  #holdSent = false;
  #lastAttemptOk = false;

  constructor(options: {
    client: KubeClient;
    namespace: string;
    node: string;
    clock: Clock;
    log: Logger;
    timing?: LeaseTiming;
  }) {
    this.#o = { ...options, timing: options.timing ?? DEFAULT_LEASE_TIMING };
  }

  /**
   * True while a renewal that started less than D ago succeeded: our lease is valid. Before the
   * first attempt has finished (a freshly started agent) and while not renewing at all (a node
   * that holds no egress IP) nothing has been lost, so it is valid too.
   */
  get valid(): boolean {
    if (this.#stopped || !this.#attempted) return true;
    return this.#o.clock.now() - this.#lastSuccessStart < this.#o.timing.durationMs;
  }

  /**
   * @param options.create also create the lease if missing; without it only an existing lease is
   *   renewed, which lets a restarted agent renew before it knows anything else.
   */
  start(options: { create?: boolean } = {}): void {
    if (options.create === true) this.#create = true;
    if (!this.#stopped) return;
    this.#stopped = false;
    void this.#renew();
  }

  stop(): void {
    this.#stopped = true;
    this.#timer?.cancel();
  }

  /**
   * Did the last renewal attempt reach the API server? This is what peers hear in heartbeats:
   * when the API server goes down for everyone, every agent's next attempt fails within one
   * period, well before any lease expires, so no gateway mistakes an outage for a partition.
   */
  get apiReachable(): boolean {
    return this.#stopped || !this.#attempted || this.#lastAttemptOk;
  }

  /**
   * A planned restart: one last renewal asking the controller to hold the node for `holdMs`.
   * Returns whether the API server took it.
   */
  async handOver(holdMs: number): Promise<boolean> {
    this.stop();
    try {
      await this.#o.client.mergePatch(
        CORE.leases,
        nodeLeaseName(this.#o.node),
        {
          metadata: { annotations: { [RESTART_HOLD_ANNOTATION]: String(holdMs) } },
          spec: { renewTime: microTime() },
        },
        { namespace: this.#o.namespace },
      );
      return true;
    } catch (e) {
      this.#o.log.warn(
        { err: (e as Error).message },
        "cannot announce the restart on the node lease",
      );
      return false;
    }
  }

  async #renew(): Promise<void> {
    if (this.#stopped) return;
    const started = this.#o.clock.now();
    const { client, namespace, node, timing } = this.#o;
    const name = nodeLeaseName(node);
    try {
      try {
        // The first renewal of this process clears a restart hold left by its predecessor.
        const clear = this.#holdSent
          ? {}
          : { metadata: { annotations: { [RESTART_HOLD_ANNOTATION]: null } } };
        await client.mergePatch(
          CORE.leases,
          name,
          { ...clear, spec: { holderIdentity: node, renewTime: microTime() } },
          // A black-holed API server must count as a failed attempt within about one period
          // (at most 5 s: a renewal in flight when the API server comes back must not keep this
          // node from renewing for long, see LivenessOptions.apiSettleMs).
          { namespace, timeoutMs: Math.max(300, Math.min(timing.renewMs * 2, 5000)) },
        );
        this.#holdSent = true;
      } catch (e) {
        // Without `create`, only a lease that exists is renewed (see start()).
        if (!isNotFound(e) || !this.#create) throw e;
        await client.create<Lease>(CORE.leases, {
          apiVersion: "coordination.k8s.io/v1",
          kind: "Lease",
          metadata: {
            name,
            namespace,
            labels: { [NODE_LEASE_LABEL]: "true", "sallyport.dev/node": node },
          },
          spec: {
            holderIdentity: node,
            leaseDurationSeconds: Math.max(1, Math.ceil(timing.durationMs / 1000)),
            renewTime: microTime(),
            acquireTime: microTime(),
          },
        });
      }
      this.#lastSuccessStart = Math.max(this.#lastSuccessStart, started);
      if (this.#attempted && !this.#lastAttemptOk)
        this.#o.log.info("node lease renewals succeed again");
      this.#lastAttemptOk = true;
    } catch (e) {
      if (!this.#attempted || this.#lastAttemptOk)
        this.#o.log.warn({ err: (e as Error).message }, "cannot renew the node lease");
      this.#lastAttemptOk = false;
    }
    this.#attempted = true;
    if (!this.#stopped) {
      const spent = this.#o.clock.now() - started;
      // After a failure, try again within a second (a failed attempt writes nothing): when the
      // API server comes back, this node renews before its peers' word fences it.
      const next = this.#lastAttemptOk ? timing.renewMs : Math.min(timing.renewMs, 1000);
      this.#timer = this.#o.clock.after(Math.max(0, next - spent), () => void this.#renew());
    }
  }
}

/** The controller side: which gateway-capable nodes are alive, judged by what it observes. */
export class LeaseTracker {
  readonly #reflector: Reflector<Lease>;
  readonly #observed = new Map<string, number>();
  /** Restart holds announced on the last observed renewal, in ms. */
  readonly #hold = new Map<string, number>();
  readonly #clock: Clock;
  readonly #timing: LeaseTiming;
  readonly #onChange: () => void;
  #healthy = new Set<string>();
  #timer: Timer | undefined;

  constructor(options: {
    client: KubeClient;
    namespace: string;
    clock: Clock;
    log: Logger;
    timing?: LeaseTiming;
    onChange: () => void;
  }) {
    this.#clock = options.clock;
    this.#timing = options.timing ?? DEFAULT_LEASE_TIMING;
    this.#onChange = options.onChange;
    this.#reflector = new Reflector<Lease>({
      client: options.client,
      resource: CORE.leases,
      namespace: options.namespace,
      labelSelector: `${NODE_LEASE_LABEL}=true`,
      clock: options.clock,
      log: options.log,
      onChange: (type, lease) => {
        const node = lease.metadata.labels?.["sallyport.dev/node"];
        if (node === undefined) return;
        if (type === "delete") {
          this.#observed.delete(node);
          this.#hold.delete(node);
        } else if (type !== "sync") {
          this.#observed.set(node, this.#clock.now());
          const hold = Number(lease.metadata.annotations?.[RESTART_HOLD_ANNOTATION] ?? 0);
          if (hold > 0) this.#hold.set(node, Math.min(hold, 60_000));
          else this.#hold.delete(node);
        }
        this.#check();
      },
    });
  }

  get synced(): Promise<void> {
    return this.#reflector.synced;
  }

  start(): void {
    this.#reflector.start();
    const tick = () => {
      this.#check();
      this.#timer = this.#clock.after(50, tick);
    };
    tick();
  }

  stop(): void {
    this.#reflector.stop();
    this.#timer?.cancel();
  }

  healthy(): ReadonlySet<string> {
    return this.#healthy;
  }

  #check(): void {
    const now = this.#clock.now();
    // While our watch is down we cannot know; judge nobody dead for time we did not watch.
    const watchingSince = this.#reflector.connectedAt;
    const limit = this.#timing.durationMs + this.#timing.graceMs;
    const next = new Set<string>();
    for (const [node, at] of this.#observed) {
      const since = Math.max(at, watchingSince === Number.POSITIVE_INFINITY ? now : watchingSince);
      if (now - since <= Math.max(limit, this.#hold.get(node) ?? 0)) next.add(node);
    }
    const changed =
      next.size !== this.#healthy.size || [...next].some((n) => !this.#healthy.has(n));
    this.#healthy = next;
    if (changed) this.#onChange();
  }
}
