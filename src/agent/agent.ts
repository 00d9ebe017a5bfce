/**
 * The node agent: watches Sallyport's own kinds, Namespaces and the Pods of its own node (never
 * all Pods, never Nodes), keeps this node's desired datapath per key, keeps the kernel equal to
 * it, and reports what it programmed.
 *
 * Watch events update the keyed state (src/agent/view.ts): an event changes only its own key,
 * and one that changes nothing this node carries (another node's status, a policy's status)
 * costs no planning and no kernel work. The planner (engine/node_plan.ts) replans the keys that
 * changed; the datapath applies only what differs. A full sync that re-reads the kernel runs
 * every period whatever the event rate, and at once after a failure.
 *
 * When the API server is unreachable the caches keep their last state, so the plan, and so the
 * datapath, stays as it was; periodic syncs keep repairing drift meanwhile.
 */
import type {
  AnyPolicy,
  Condition,
  EgressClusterInfo,
  EgressEndpointSlice,
  EgressGateway,
  EgressNode,
  SnatSaturationReport,
} from "../api/types.ts";
import { NodePlanner } from "../engine/node_plan.ts";
import type { NodePlan } from "../engine/plan.ts";
import { type PodObject, podInfo, podKey } from "../engine/snapshot.ts";
import {
  type LocalFacts,
  type NodeConfig,
  type PolicyView,
  policyTargets,
  withGateway,
} from "../engine/view.ts";
import type { Datapath, KernelState } from "../kernel/datapath.ts";
import { localFactsFrom } from "../kernel/facts.ts";
import type { NeighbourFence } from "../kernel/neighbour_fence.ts";
import { CORE, type KubeClient, type KubeObject, ours } from "../kube/client.ts";
import { DEFAULT_LEASE_TIMING, type LeaseTiming, NodeLeaseRenewer } from "../kube/node_lease.ts";
import { type ChangeType, objectKey, Reflector } from "../kube/reflector.ts";
import type { Clock } from "../lib/clock.ts";
import { deepEqual, mergePatch } from "../lib/equal.ts";
import type { Logger } from "../lib/log.ts";
import type { DatapathMetrics } from "../lib/metrics.ts";
import { DatapathSync } from "./datapath_sync.ts";
import {
  DEFAULT_LIVENESS_TIMING,
  Liveness,
  type LivenessTiming,
  type Member,
  type ProbeTransport,
  udpTransport,
} from "./liveness.ts";
import { type LivenessHandle, WorkerLiveness } from "./liveness_worker.ts";
import { AgentState } from "./view.ts";

export interface AgentOptions {
  readonly client: KubeClient;
  readonly node: string;
  readonly namespace: string;
  readonly datapath: Datapath;
  readonly config: NodeConfig;
  readonly clock: Clock;
  readonly log: Logger;
  readonly metrics: DatapathMetrics;
  /** Time between full syncs (re-read the kernel, repair drift). @default 10000 */
  readonly periodMs?: number;
  /**
   * While API events keep coming, at most one partial sync per this interval (after a burst);
   * liveness changes and CNI ADDs go at once. @default 0
   */
  readonly minSyncIntervalMs?: number;
  /** The largest share of the time full syncs may take. @default PERIODIC_MAX_SHARE */
  readonly periodicMaxShare?: number;
  readonly leaseTiming?: LeaseTiming;
  /** Data-plane liveness (src/agent/liveness.ts). */
  readonly liveness?: LivenessTiming;
  /** UDP port for liveness probes. @default 7800 */
  readonly probePort?: number;
  /** Key the probes are authenticated with (a Secret); undefined: not authenticated. */
  readonly probeKey?: Buffer | undefined;
  /** Tests: another transport than UDP. */
  readonly probeTransport?: ProbeTransport;
  /** The kernel side of the fence: ARP/NDP answers for held egress IPs only (in-thread liveness). */
  readonly neighbourFence?: NeighbourFence | undefined;
  /**
   * Liveness in a worker thread of its own (src/agent/liveness_worker.ts), which keeps the kernel
   * fence itself; processes use it. Otherwise in this thread (tests, with `probeTransport`).
   */
  readonly livenessThread?: boolean;
  /**
   * Least time between two EgressNode status writes: while policies keep changing, the reports of
   * what the kernel holds (one entry per policy this node carries) are coalesced into one write
   * per interval; a report after a quiet interval is written at once. Each write of a node's
   * status costs the API server a decode, validation and fan-out of the whole object (measured:
   * half of its CPU while 1,000 policies were created). @default 1000
   */
  readonly reportIntervalMs?: number;
  readonly underlayDevice?: string | undefined;
}

type Obj<T> = T & KubeObject;

/** EgressNode.status as this agent writes it (lastSync aside). */
type NodeStatus = NonNullable<EgressNode["status"]>;

function snatSaturationOf(list: readonly SnatSaturationReport[] | undefined) {
  return list === undefined || list.length === 0 ? {} : { snatSaturation: [...list] };
}

export class Agent {
  readonly #o: AgentOptions;
  readonly policies: Reflector<Obj<AnyPolicy>>;
  readonly clusterPolicies: Reflector<Obj<AnyPolicy>>;
  readonly gateways: Reflector<Obj<EgressGateway>>;
  readonly egressNodes: Reflector<Obj<EgressNode>>;
  readonly slices: Reflector<Obj<EgressEndpointSlice>>;
  /** This node's pods only (a field selector), for steering new pods before their slice. */
  readonly pods: Reflector<PodObject & KubeObject>;
  readonly namespaces: Reflector<KubeObject>;
  readonly clusterInfos: Reflector<Obj<EgressClusterInfo>>;
  readonly sync: DatapathSync;
  readonly state: AgentState;
  readonly #planner: NodePlanner;
  readonly #renewer: NodeLeaseRenewer;
  readonly #liveness: LivenessHandle;
  /** Gateways the data plane judged down, as the planner has them. */
  #down: ReadonlySet<string> = new Set();
  /** The down set of the last plan: announced once its sync is done. */
  #plannedDown: ReadonlySet<string> = new Set();
  /** The gateways whose policies the plan being synced carries in advance (preparedFor). */
  #plannedPrepared: ReadonlySet<string> = new Set();
  #livenessVersion = -1;
  #lastPlan: NodePlan | undefined;
  /** Policies whose gateway this node moved on its own (to a standby), until the controller agrees. */
  readonly #moved = new Set<string>();
  /** Egress IPs given to this node that another node still answers for, and that node. */
  #withheld: ReadonlyMap<string, string> = new Map();
  #addressesRenewedAt = Number.NEGATIVE_INFINITY;
  #facts: LocalFacts | undefined;
  #links: KernelState["routing"]["links"] = [];
  #programmed: Record<string, string> = {};
  #lastError: string | undefined;
  #reporting = false;
  #reportAgain = false;
  /** The last status written, and the cached object's version then (its watch event is due). */
  #written: { readonly version: string | undefined; readonly status: NodeStatus } | undefined;
  /** When the last status write was sent (clock ms). */
  #writtenAt: number | undefined;
  /** Plans made for events (not the periodic full syncs), for tests and benchmarks: an event this node carries nothing of makes none. */
  plans = 0;
  /** Time the last watch event took to handle (its sync, if any, runs afterwards). */
  lastEventMs = 0;

  constructor(options: AgentOptions) {
    this.#o = options;
    const { client, clock, log, node } = options;
    const state = new AgentState(node);
    this.state = state;
    this.#planner = new NodePlanner(node, options.config);
    /** Applies a watch event to the keyed state; syncs or reports only if something changed. */
    const handle =
      <T extends KubeObject>(apply: (type: ChangeType, obj: T) => void) =>
      (type: ChangeType, obj: T) => {
        const started = performance.now();
        apply(type, obj);
        if (state.planDirty) this.sync.trigger();
        else if (state.reportDirty) this.#requestReport();
        this.lastEventMs = performance.now() - started;
      };
    const make = <T extends KubeObject>(
      kind: Parameters<typeof ours>[0],
      apply: (type: ChangeType, obj: T) => void,
    ) => new Reflector<T>({ client, resource: ours(kind), clock, log, onChange: handle(apply) });
    const policy = (type: ChangeType, p: Obj<AnyPolicy>) =>
      type === "delete" ? state.deletePolicy(p) : state.setPolicy(p);
    this.policies = make("EgressPolicy", policy);
    this.clusterPolicies = make("ClusterEgressPolicy", policy);
    this.gateways = make<Obj<EgressGateway>>("EgressGateway", (type, g) =>
      type === "delete" ? state.deleteGateway(g.metadata.name ?? "") : state.setGateway(g),
    );
    this.egressNodes = make<Obj<EgressNode>>("EgressNode", (type, n) => {
      const name = n.metadata.name ?? "";
      if (type === "delete") state.deleteEgressNode(name);
      else state.setEgressNode(n);
      if (name !== node) return;
      if (type !== "delete") this.#leaseFollowsCapability(n);
      // Our own object: a status that differs from what we hold (recreated, edited) is rewritten.
      this.#requestReport();
    });
    this.slices = make<Obj<EgressEndpointSlice>>("EgressEndpointSlice", (type, s) =>
      type === "delete" ? state.deleteSlice(s.metadata.name ?? "") : state.setSlice(s),
    );
    this.clusterInfos = make<Obj<EgressClusterInfo>>("EgressClusterInfo", (type, c) => {
      if (c.metadata.name === "default") state.setClusterInfo(type === "delete" ? undefined : c);
    });
    this.pods = new Reflector<PodObject & KubeObject>({
      client,
      resource: CORE.pods,
      fieldSelector: `spec.nodeName=${node}`,
      clock,
      log,
      onChange: handle((type, p: PodObject & KubeObject) => {
        const info = podInfo(p);
        if (type === "delete") state.deleteLocalPod(podKey(info));
        else state.setLocalPod(info);
      }),
    });
    this.namespaces = new Reflector<KubeObject>({
      client,
      resource: CORE.namespaces,
      clock,
      log,
      onChange: handle((type, n: KubeObject) => {
        const name = objectKey(n);
        if (type === "delete") state.deleteNamespace(name);
        else state.setNamespace(name, n.metadata.labels ?? {});
      }),
    });
    const timing = options.leaseTiming ?? DEFAULT_LEASE_TIMING;
    this.#renewer = new NodeLeaseRenewer({
      client,
      namespace: options.namespace,
      node,
      clock,
      log,
      timing,
    });
    const livenessTiming = options.liveness ?? DEFAULT_LIVENESS_TIMING;
    const refresh = () => {
      for (const r of this.#reflectors()) r.relist();
    };
    // What both liveness runners are told alike.
    const common = {
      node,
      clock,
      log,
      key: options.probeKey,
      timing: livenessTiming,
      members: () => this.#members(),
      leaseValid: () => this.#renewer.valid,
      apiReachable: () => this.#renewer.apiReachable,
      apiSettleMs: timing.graceMs / 2,
      refresh,
      // The data plane's own verdict (a gateway lost or back): a failover waits for nothing.
      onChange: () => this.sync.trigger(true),
    };
    this.#liveness = options.livenessThread
      ? new WorkerLiveness({
          ...common,
          port: options.probePort ?? 7800,
          held: () => options.datapath.heldEgressIPs(),
          listedAt: () => Math.min(...this.#reflectors().map((r) => r.listedAt)),
          onHolding: () => void this.#renewEgressIPs(),
        })
      : new Liveness({
          ...common,
          transport: options.probeTransport ?? udpTransport(options.probePort ?? 7800, log),
          onHolding: (forMs) => {
            // The kernel answers ARP/NDP for what we hold until our support ends (a frozen
            // agent's node falls silent by itself).
            options.neighbourFence?.hold(options.datapath.heldEgressIPs(), forMs);
            // The addresses' own leases (whole seconds) need no renewal every probe.
            const now = clock.now();
            if (now - this.#addressesRenewedAt >= 250) {
              this.#addressesRenewedAt = now;
              void this.#renewEgressIPs();
            }
          },
          onRelease: () => options.neighbourFence?.release(),
          claims: () => options.datapath.heldEgressIPs().map((h) => h.address),
          freshSince: (t) => this.#reflectors().every((r) => r.listedAt >= t),
        });
    this.sync = new DatapathSync({
      datapath: options.datapath,
      clock,
      log,
      metrics: options.metrics,
      periodMs: options.periodMs ?? 10_000,
      minIntervalMs: options.minSyncIntervalMs ?? 0,
      maxShare: options.periodicMaxShare,
      plan: (kernel) => this.#plan(kernel),
      onSynced: (plan) => this.#synced(plan),
    });
  }

  // --- traffic (src/agent/traffic.ts): SNAT port saturation, a condition in the controller.
  // Undefined until measured: a restarted agent keeps what its status says meanwhile.
  #snatSaturation: readonly SnatSaturationReport[] | undefined;

  /** Destinations past the SNAT port threshold; the collector calls this only when they change. */
  setSnatSaturation(list: readonly SnatSaturationReport[]): void {
    if (this.#snatSaturation !== undefined && deepEqual(list, this.#snatSaturation)) return;
    this.#snatSaturation = list.map((s) => ({ ...s }));
    this.#requestReport();
  }

  // --- egress-IP leases in the kernel (issue 12): renewed only while the fence lets this node
  // hold its egress IPs, so that a dead or frozen agent's node stops answering for them.
  #renewal: Promise<void> | undefined;
  #renewFailed = false;

  #renewEgressIPs(seconds?: number): Promise<void> {
    this.#renewal ??= (async () => {
      try {
        await this.#o.datapath.refreshEgressIPs(seconds);
        this.#renewFailed = false;
      } catch (e) {
        // A device the running sync deletes fails its line; the next tick tries again.
        if (!this.#renewFailed)
          this.#o.log.warn({ err: (e as Error).message }, "cannot renew the egress IPs' leases");
        this.#renewFailed = true;
      } finally {
        this.#renewal = undefined;
      }
    })();
    return this.#renewal;
  }

  get leaseValid(): boolean {
    return this.#renewer.valid;
  }

  /** A gateway-capable node that may not answer for egress IPs now (others are never fenced). */
  get fenced(): boolean {
    return (
      this.egressNodes.get(this.#o.node)?.spec.gatewayCapable === true && this.#liveness.fenced
    );
  }

  /** Liveness probes dropped: not authentic, malformed or replayed. */
  get probesRejected(): number {
    return this.#liveness.rejected;
  }

  /** Gateways the data plane judges down (src/agent/liveness.ts). */
  get down(): ReadonlySet<string> {
    return this.#liveness.down;
  }

  /** Every node with an agent, where its probes go. */
  #members(): Map<string, Member> {
    const out = new Map<string, Member>();
    for (const n of this.egressNodes.items()) {
      const name = n.metadata.name ?? "";
      const address = n.status?.underlay?.ipv4 ?? n.spec.addresses?.ipv4 ?? n.spec.addresses?.ipv6;
      if (address !== undefined)
        out.set(name, { name, gatewayCapable: n.spec.gatewayCapable === true, address });
    }
    return out;
  }

  async start(): Promise<void> {
    // A restarted agent renews an existing lease at once, before its caches are filled, so that
    // a restart shorter than the lease is not taken for a dead gateway.
    this.#renewer.start();
    for (const r of this.#reflectors()) r.start();
    await Promise.all(this.#reflectors().map((r) => r.synced));
    await this.#o.neighbourFence?.install();
    this.#liveness.start();
    // The first sync decides what this node holds: not before liveness has heard its peers for
    // a detection time (a restarted gateway is supported again at once, its peers counted it as
    // heard through the restart; without this wait its first sync would drop its egress IPs).
    if (this.#liveness instanceof WorkerLiveness) {
      const t = this.#o.liveness ?? DEFAULT_LIVENESS_TIMING;
      await this.#liveness.settled(t.intervalMs * (t.multiplier + 1));
    }
    this.sync.start();
  }

  /**
   * Stops. The datapath stays in the kernel. `restartHoldMs` announces a planned restart on the
   * node lease so that the controller moves nothing meanwhile.
   */
  async stop(options: { restartHoldMs?: number } = {}): Promise<void> {
    this.sync.stop();
    const restart =
      options.restartHoldMs !== undefined &&
      this.egressNodes.get(this.#o.node)?.spec.gatewayCapable === true;
    // Read before the liveness thread stops, and whatever its age: on a busy node the thread's
    // last word may be older than the detection time when SIGTERM comes, and the addresses'
    // 1-s leases then lapsed before the next agent's first sync. (The kernel fence, renewed by
    // the thread from its own judgement, still gates every answer.)
    const holding = this.#liveness.lastSaidHolding();
    if (restart) await this.#liveness.handOver(options.restartHoldMs!);
    else this.#liveness.stop();
    await this.#o.neighbourFence?.close();
    if (restart) {
      const asked = this.#o.clock.now();
      const held = await this.#renewer.handOver(options.restartHoldMs!);
      // The controller keeps this node's egress IPs for the hold: so does the kernel (at most).
      const seconds = Math.floor((options.restartHoldMs! - (this.#o.clock.now() - asked)) / 1000);
      await this.#renewal;
      if (held && holding && seconds >= 1) await this.#renewEgressIPs(seconds);
    } else {
      this.#renewer.stop();
    }
    for (const r of this.#reflectors()) r.stop();
  }

  #reflectors(): Reflector<KubeObject>[] {
    return [
      this.policies,
      this.clusterPolicies,
      this.gateways,
      this.egressNodes,
      this.slices,
      this.clusterInfos,
      this.pods,
      this.namespaces,
    ] as never;
  }

  /** Gateway-capable nodes renew a lease so that the controller knows they are alive. */
  #leaseFollowsCapability(self: EgressNode): void {
    if (self.spec.gatewayCapable === true) this.#renewer.start({ create: true });
    else this.#renewer.stop();
  }

  /** Feeds the planner the keys that changed, then plans (the planner keeps the rest). */
  #plan(kernel: KernelState | undefined): NodePlan {
    const state = this.state;
    const changes = state.takeChanges();
    if (kernel !== undefined) {
      this.#links = kernel.routing.links;
      const ids = this.egressNodes.get(this.#o.node)?.spec.addresses;
      this.#facts = localFactsFrom(kernel, {
        nodeAddresses: {
          ...(ids?.ipv4 === undefined ? {} : { 4: ids.ipv4 }),
          ...(ids?.ipv6 === undefined ? {} : { 6: ids.ipv6 }),
        },
        peers: state.peers,
        rulePref: this.#o.config.rulePref,
        random: Math.random,
        underlayDevice: this.#o.underlayDevice,
      });
      this.#planner.setLocal(this.#facts);
    }
    if (this.#facts === undefined) throw new Error("Cannot plan yet: the kernel has not been read");
    if (kernel === undefined) this.plans++;
    if (changes.peers) this.#planner.setPeers(state.peers);
    if (changes.ignoreCIDRs) this.#planner.setIgnoreCIDRs(state.ignoreCIDRs);
    // Gateways judged down in the data plane: their policies go to their first standby that is
    // not, on every node alike, before the controller says so (it will say the same).
    const version = this.#liveness.version;
    const livenessChanged = version !== this.#livenessVersion;
    this.#livenessVersion = version;
    this.#down = this.#liveness.down;
    const keys = livenessChanged
      ? new Set([...changes.policies, ...[...state.views()].map((v) => v.key)])
      : changes.policies;
    for (const key of keys) {
      const view = state.view(key);
      if (view === undefined) {
        this.#moved.delete(key);
        this.#planner.deletePolicy(key);
        continue;
      }
      const effective = this.#effective(view);
      if (effective === view) this.#moved.delete(key);
      else this.#moved.add(key);
      this.#planner.setPolicy(effective);
    }
    this.#plannedDown = this.#down;
    // Fenced: keep every rule (SNAT included) but stop holding the egress IPs.
    this.#planner.setHoldEgressIPs(this.#liveness.holding());
    const plan = this.#withhold();
    this.#plannedPrepared = this.#planner.preparedFor();
    // The same plan as before: the kernel holds it already (no sync follows to announce it, nor
    // to report a changed verdict, which the controller places by: report it now).
    if (plan === this.#lastPlan) {
      this.#liveness.announce(this.#plannedDown, this.#plannedPrepared);
      if (livenessChanged) this.#requestReport();
    }
    this.#lastPlan = plan;
    return plan;
  }

  /**
   * Plans, holding none of the egress IPs given to this node that another node still answers
   * for (its probes claim them; Liveness.claimedBy). In a planned move (a failback, a
   * rebalance) the controller moves an egress IP and both datapaths sync, each at its own pace:
   * the taker waits for the giver, so that never two nodes answer for it. Every rule (SNAT
   * included) is made meanwhile; the address, its device and its announcement wait.
   */
  #withhold(): NodePlan {
    const planner = this.#planner;
    if (this.#withheld.size > 0) planner.setWithheldEgressIPs(new Set());
    let plan = planner.plan();
    const held = new Set(this.#o.datapath.heldEgressIPs().map((h) => h.address));
    const waiting = new Map<string, string>();
    for (const e of plan.eips) {
      if (held.has(e.address)) continue;
      const by = this.#liveness.claimedBy(e.address);
      if (by !== undefined) waiting.set(e.address, by);
    }
    if (waiting.size > 0) {
      planner.setWithheldEgressIPs(new Set(waiting.keys()));
      plan = planner.plan();
    }
    for (const [address, by] of waiting)
      if (!this.#withheld.has(address))
        this.#o.log.info(
          { egressIP: address, claimedBy: by },
          "waiting for another node to stop answering for an egress IP given to this one",
        );
    const taken = new Set(plan.eips.map((e) => e.address));
    for (const [address, by] of this.#withheld)
      if (!waiting.has(address) && taken.has(address))
        this.#o.log.info(
          { egressIP: address, claimedBy: by },
          "the other node let the egress IP go",
        );
    this.#withheld = waiting;
    return plan;
  }

  /**
   * The view this node programs: the controller's, unless its gateway is judged down; then its
   * first standby that is not, once that standby says its datapath holds it (or if it is us), or
   * as soon as that standby judged it down when it carries the dead gateway's policies in
   * advance (takingOver: what arrives there before its own sync is dropped by its group chain).
   * Otherwise the dead gateway stays the target until then: its traffic is lost either way, and
   * nothing reaches a standby before its SNAT rules do.
   */
  #effective(view: PolicyView): PolicyView {
    const down = this.#down;
    const gateway = view.gatewayNode;
    if (gateway === undefined || !down.has(gateway)) return view;
    const standby = (view.standbyNodes ?? []).find((n) => !down.has(n));
    if (standby === undefined) return withGateway(view, undefined);
    if (
      standby === this.#o.node ||
      this.#liveness.announcedBy(standby).has(gateway) ||
      this.#liveness.takingBy(standby).has(gateway)
    )
      return withGateway(view, standby);
    return view;
  }

  #synced(plan: NodePlan): void {
    this.#liveness.announce(this.#plannedDown, this.#plannedPrepared);
    // What this sync made us hold answers ARP/NDP at once, not at the next probe.
    this.#liveness.renew();
    this.#lastError = plan.errors.length > 0 ? plan.errors.join("; ") : undefined;
    this.#programmed = this.#reportedRevisions();
    this.#requestReport();
  }

  /**
   * What this node reports programmed: per policy it carries, the last revision the controller
   * published whose view the kernel held. While this node's view and the controller's revision
   * disagree (one of them has not seen a change yet: a new pod of this node, a slice on its
   * way) the last confirmed revision stays: reporting nothing meanwhile would flip the policy to
   * Pending and back, two status writes on each side for every pod. The controller counts a
   * node only when it reports the current revision, so a kept older one never counts.
   */
  #reportedRevisions(): Record<string, string> {
    const now = this.state.programmed();
    // A policy moved here on our own is not what the controller published: not programmed.
    for (const key of this.#moved) delete now[key];
    // Nor one whose egress IP waits for another node to let it go.
    if (this.#withheld.size > 0)
      for (const key of Object.keys(now)) {
        const view = this.state.view(key);
        if (view?.gatewayNode === this.#o.node && view.floating.some((a) => this.#withheld.has(a)))
          delete now[key];
      }
    for (const [key, revision] of Object.entries(this.#programmed)) {
      if (now[key] !== undefined || this.#moved.has(key)) continue;
      const view = this.state.view(key);
      if (view !== undefined && policyTargets(view).includes(this.#o.node)) now[key] = revision;
    }
    return now;
  }

  #requestReport(): void {
    if (this.sync.lastReport === undefined) return;
    if (this.state.reportDirty) this.#programmed = this.#reportedRevisions();
    if (this.#reporting) {
      this.#reportAgain = true;
      return;
    }
    void this.#report();
  }

  /** The EgressNode status this node holds true now. */
  #desiredStatus(current: NodeStatus | undefined): NodeStatus | undefined {
    const u = this.#facts?.underlay;
    if (u === undefined) return undefined;
    const interfaces = this.#links
      .filter(
        (l) =>
          l.name !== "lo" &&
          !l.name.startsWith("spe-") &&
          l.name !== this.#o.config.tunnelDevice &&
          l.addresses.length > 0,
      )
      .map((l) => ({ name: l.name, addresses: l.addresses.map((a) => a.split("/")[0]!) }))
      .slice(0, 64);
    const ready: Omit<Condition, "lastTransitionTime"> = {
      type: "DatapathReady",
      status: this.#lastError === undefined ? "True" : "False",
      reason: this.#lastError === undefined ? "Synced" : "PartlyProgrammed",
      message: this.#lastError ?? "the kernel holds this node's plan",
    };
    const prior = current?.conditions?.find((c) => c.type === "DatapathReady");
    return {
      datapath: this.#o.config.datapath,
      underlay: {
        interface: u.device,
        mtu: u.mtu,
        ...(u.ipv4 === undefined ? {} : { ipv4: u.ipv4 }),
        ...(u.ipv6 === undefined ? {} : { ipv6: u.ipv6 }),
      },
      interfaces,
      programmed: this.#programmed,
      ...(this.#down.size === 0 ? {} : { downNodes: [...this.#down].sort() }),
      repairs: this.sync.repairs,
      // Reported once a sync made the tunnel (with VXLAN GBP): from then on peers may name
      // policies in what they steer here.
      tunnelClasses: true,
      ...snatSaturationOf(this.#snatSaturation ?? current?.snatSaturation),
      conditions: [
        {
          ...ready,
          // Only a transition moves the time.
          lastTransitionTime:
            prior !== undefined && prior.status === ready.status
              ? prior.lastTransitionTime
              : new Date().toISOString(),
        },
      ],
    };
  }

  /**
   * Writes EgressNode status when it differs from the cached object's (compared by content:
   * a recreated or edited EgressNode gets its status back). One write in flight at a time.
   */
  async #report(): Promise<void> {
    this.#reporting = true;
    try {
      do {
        // Coalesce: requests that come while we wait are served by the write after it.
        const wait =
          this.#writtenAt === undefined
            ? 0
            : this.#writtenAt + (this.#o.reportIntervalMs ?? 1000) - this.#o.clock.now();
        if (wait > 0) await new Promise<void>((r) => this.#o.clock.after(wait, r));
        this.#reportAgain = false;
        const current = this.egressNodes.get(this.#o.node);
        if (current === undefined) return;
        const { lastSync: _, ...held } = current.status ?? {};
        const desired = this.#desiredStatus(current.status);
        if (desired === undefined || deepEqual(held, desired)) continue;
        // Written already; the cache has not seen our write yet.
        const version = current.metadata.resourceVersion;
        const written = this.#written;
        if (written?.version === version && deepEqual(written?.status, desired)) continue;
        const patch = mergePatch(held, desired);
        if (patch === undefined) continue;
        try {
          this.#writtenAt = this.#o.clock.now();
          await this.#o.client.mergePatch(
            ours("EgressNode"),
            this.#o.node,
            { status: { ...patch, lastSync: new Date().toISOString() } },
            { subresource: "status" },
          );
          this.#written = { version, status: desired };
        } catch (e) {
          this.#o.log.debug({ err: (e as Error).message }, "cannot report status; retrying");
          // The next sync or watch event of our EgressNode asks again; a failed write leaves the
          // cached object unchanged, so it is retried then.
          return;
        }
      } while (this.#reportAgain);
    } finally {
      this.#reporting = false;
    }
  }
}
