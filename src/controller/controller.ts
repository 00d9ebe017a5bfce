/**
 * The controller: watches the cluster, runs the engine, and writes what it decided, per key.
 *
 * Every replica keeps informer caches (the admission webhook needs them); only the leader
 * (Lease `sallyport-controller`) computes and writes. Two loops, in the manner of kube-proxy's
 * proxier and client-go's controllers:
 *
 *  - **compute**: watch events feed the incremental engine (a pod change costs the policies that
 *    select it, a lease change the egress IPs of that node); one coalesced computation then finds
 *    the keys whose outcome changed, by identity, and queues them. Every `periodMs` a full pass
 *    re-feeds every input from the caches and queues every key, so nothing missed stays missed.
 *  - **write**: a keyed, de-duplicating, rate-limited work queue (src/kube/workqueue.ts). A worker
 *    builds the one object a key stands for, compares it with the cached copy by content (typed,
 *    independent of key order) and writes only when a field the server holds would change, as a
 *    merge patch that also deletes what must go. A failed write is retried by the queue with
 *    per-key exponential backoff; the business logic never retries. Two priorities: endpoint
 *    slices and the statuses that only carry agents' reports wait behind what agents program
 *    from (statuses with allocations, EgressNode specs).
 *
 * Keys: `policy:<key>` (its status and Events), `slices:<key>` (its endpoint slices),
 * `gateway:<name>` (status), `node:<name>` (EgressNode spec), `clusterinfo`.
 *
 * Allocations live in those objects, so a restarted controller or a new leader reads them back
 * and keeps every egress IP where it is.
 */

import {
  type AnyPolicy,
  API_VERSION,
  type EgressClusterInfo,
  type EgressEndpointSlice,
  type EgressGateway,
  type EgressNode,
  policyKey,
} from "../api/types.ts";
import { ClusterEngine, type ClusterOutcome, type PolicyOutcome } from "../engine/cluster.ts";
import { onlyStandbyDiffers } from "../engine/outcomes.ts";
import type { ClusterConfig, NodeIdentity, PreviousPolicy, Snapshot } from "../engine/snapshot.ts";
import { podKey } from "../engine/snapshot.ts";
import {
  CORE,
  isAlreadyExists,
  isNotFound,
  type KubeClient,
  type KubeObject,
  ours,
  type Resource,
} from "../kube/client.ts";
import { EventRecorder, targetOf } from "../kube/events.ts";
import { LeaderElector } from "../kube/lease.ts";
import { type LeaseTiming, LeaseTracker } from "../kube/node_lease.ts";
import { type ChangeType, Reflector } from "../kube/reflector.ts";
import { runWorkers, WorkQueue } from "../kube/workqueue.ts";
import type { Clock } from "../lib/clock.ts";
import { deepEqual, mergePatch, sameSet } from "../lib/equal.ts";
import type { Family } from "../lib/ip.ts";
import type { Logger } from "../lib/log.ts";
import { getOrInsert } from "../lib/maps.ts";
import type { ControllerMetrics } from "../lib/metrics.ts";
import { type CompiledSelector, compileSelector } from "../lib/selector.ts";
import { SyncLoop } from "../lib/sync_loop.ts";
import {
  clusterInfoStatus,
  egressNodeSpec,
  identityOf,
  type NodeObject,
  nodeInfo,
  type PodObject,
  podInfo,
  previousOf,
  reportOf,
} from "./inputs.ts";
import { POLICY_LABEL, planSlices, policyLabel } from "./slices.ts";
import { gatewayStatus, onlyProgressDiffers, policyStatus } from "./status.ts";

export interface ControllerOptions {
  readonly client: KubeClient;
  readonly namespace: string;
  readonly identity: string;
  readonly clock: Clock;
  readonly log: Logger;
  readonly cluster: ClusterConfig;
  readonly leaseTiming?: LeaseTiming;
  readonly leaderElection?: {
    leaseDurationMs: number;
    renewDeadlineMs: number;
    retryPeriodMs: number;
  };
  /** @default 100 */
  readonly sliceSize?: number;
  /** Full pass: re-feed every input and check every object. @default 30000 */
  readonly periodMs?: number;
  /** Writers working the queue at once. @default 8 */
  readonly workers?: number;
  /** How long a status holds back mere progress (see PROGRESS_SETTLE_MS). @default 30000 */
  readonly progressSettleMs?: number;
  /** Called when leadership is lost; writing stops until this replica wins again. */
  readonly onLostLeadership?: () => void;
  readonly metrics?: ControllerMetrics;
}

interface ServiceCIDRObject extends KubeObject {
  spec?: { cidrs?: string[] };
}

const CLUSTER_INFO = "default";
/** How long the statuses wait for more agents' reports after one arrives. */
const REPORTS_SETTLE_MS = 250;
/**
 * How long a policy whose standby list alone changed waits for its status write. A gateway node
 * lost or back changes the lists of a large share of the policies (those that list it); their
 * writes queue behind those of the policies that moved, which agents wait for, and a node that
 * flaps within this time costs one write instead of two.
 */
const STANDBY_SETTLE_MS = 1000;
/**
 * How long a policy's status holds back news that more (not yet all) of its nodes report its
 * revision, from the moment there first was such news. When many policies arrive at once their
 * nodes program each of them tens of seconds apart (1,000 policies: the status of one went from
 * "0 of 2" to "1 of 2" and "2 of 2" ~1,700 and ~1,000 writes apart), and each such write costs
 * the API server as much as any other (at 10,000 policies it spent most of a core on policy
 * statuses for 15 minutes). Held back, "0 of 2" becomes "2 of 2" in one write. Programmed
 * turning True, or anything else changing, is written at once.
 */
const PROGRESS_SETTLE_MS = 30_000;

const selectors = new WeakMap<EgressGateway, CompiledSelector>();
/** A gateway's node selector, compiled once per object. */
function selectorOf(gw: EgressGateway): CompiledSelector {
  let s = selectors.get(gw);
  if (s === undefined) {
    s = compileSelector(gw.spec.nodeSelector);
    selectors.set(gw, s);
  }
  return s;
}

/** The cache key of a policy object from its policy key. */
function cacheKeyOf(key: string): { kind: "EgressPolicy" | "ClusterEgressPolicy"; name: string } {
  const [kind, ...rest] = key.split("/");
  return { kind: kind as "EgressPolicy" | "ClusterEgressPolicy", name: rest.join("/") };
}

export class Controller {
  readonly #o: ControllerOptions;
  readonly nodes: Reflector<NodeObject>;
  readonly pods: Reflector<PodObject>;
  readonly namespaces: Reflector<KubeObject>;
  readonly gateways: Reflector<EgressGateway & KubeObject>;
  readonly policies: Reflector<AnyPolicy & KubeObject>;
  readonly clusterPolicies: Reflector<AnyPolicy & KubeObject>;
  readonly egressNodes: Reflector<EgressNode & KubeObject>;
  readonly slices: Reflector<EgressEndpointSlice & KubeObject>;
  readonly clusterInfos: Reflector<EgressClusterInfo & KubeObject>;
  serviceCIDRs: Reflector<ServiceCIDRObject> | undefined;
  readonly #leases: LeaseTracker;
  readonly #elector: LeaderElector;
  readonly #loop: SyncLoop;
  readonly #events: EventRecorder;
  /** policy label → names of its slices */
  readonly #slicesByPolicy = new Map<string, Set<string>>();
  #engine: ClusterEngine | undefined;
  #queue: WorkQueue | undefined;
  #workers: Promise<void> | undefined;
  #leading = false;
  #outcome: ClusterOutcome | undefined;
  /** Per policy, the outcome its Events were last decided on. */
  readonly #evented = new Map<string, PolicyOutcome>();
  /** Policies whose SNATPortsSaturated Event was recorded and whose write may not be back yet. */
  readonly #saturationEvented = new Set<string>();
  /** Per object, what was last written and the cached version then (its watch event is due). */
  readonly #written = new Map<string, { version: string | undefined; value: unknown }>();
  /** Per policy whose status holds back progress (PROGRESS_SETTLE_MS): since when. */
  readonly #progressSince = new Map<string, number>();
  /** Keys processed by the leader, for tests and metrics. */
  reconciles = 0;
  /** Writes sent to the API server (create, patch, delete), for tests and benchmarks. */
  writes = 0;

  constructor(options: ControllerOptions) {
    this.#o = options;
    const { client, clock, log } = options;
    const make = <T extends KubeObject>(
      resource: Resource,
      onChange: (type: ChangeType, obj: T, old: T | undefined) => void,
    ) => new Reflector<T>({ client, resource, clock, log, onChange });

    this.nodes = make<NodeObject>(CORE.nodes, (type, n) => {
      const name = n.metadata.name ?? "";
      this.#input(() =>
        type === "delete" ? this.#engine!.deleteNode(name) : this.#engine!.setNode(nodeInfo(n)),
      );
      this.#enqueue(`node:${name}`);
    });
    this.pods = make<PodObject>(CORE.pods, (type, pod) => {
      const info = podInfo(pod);
      this.#input(() =>
        type === "delete" ? this.#engine!.deletePod(podKey(info)) : this.#engine!.setPod(info),
      );
    });
    this.namespaces = make<KubeObject>(CORE.namespaces, (type, n) => {
      const name = n.metadata.name ?? "";
      this.#input(() =>
        type === "delete"
          ? this.#engine!.deleteNamespace(name)
          : this.#engine!.setNamespace({ name, labels: n.metadata.labels ?? {} }),
      );
    });
    this.gateways = make<EgressGateway & KubeObject>(ours("EgressGateway"), (type, g, old) => {
      const name = g.metadata.name ?? "";
      this.#input(() =>
        type === "delete" ? this.#engine!.deleteGateway(name) : this.#engine!.setGateway(g),
      );
      this.#enqueue(`gateway:${name}`);
      // Which nodes are gateway-capable follows the gateways' node selectors.
      if (type !== "update" || !deepEqual(g.spec.nodeSelector, old?.spec.nodeSelector))
        for (const n of this.nodes.items()) this.#enqueue(`node:${n.metadata.name}`);
    });
    const policy = (type: ChangeType, p: AnyPolicy & KubeObject) => {
      const key = policyKey(p);
      this.#input(() =>
        type === "delete" ? this.#engine!.deletePolicy(key) : this.#engine!.setPolicy(p),
      );
      // Level-triggered: its status is compared again (our own writes come back here too).
      this.#enqueue(`policy:${key}`);
      if (type === "delete") this.#enqueue(`slices:${key}`);
    };
    this.policies = make(ours("EgressPolicy"), policy);
    this.clusterPolicies = make(ours("ClusterEgressPolicy"), policy);
    this.egressNodes = make<EgressNode & KubeObject>(ours("EgressNode"), (type, n, old) => {
      const name = n.metadata.name ?? "";
      this.#input(() => this.#engine!.setReport(name, type === "delete" ? undefined : reportOf(n)));
      this.#enqueue(`node:${name}`);
      // What an agent reports programmed feeds the statuses of those policies only.
      const now = type === "delete" ? {} : (n.status?.programmed ?? {});
      const before = type === "add" ? {} : (old?.status?.programmed ?? {});
      // Agents report within moments of each other: one status write for all their reports,
      // after the writes agents wait for (a report changes only what people read).
      for (const key of new Set([...Object.keys(now), ...Object.keys(before)]))
        if (now[key] !== before[key])
          this.#queue?.addAfter(`policy:${key}`, REPORTS_SETTLE_MS, "low");
      // Gateways the data plane judged down (src/agent/liveness.ts): dead for placement now.
      if (this.#reportedDown > 0 || (n.status?.downNodes ?? []).length > 0) {
        const before = this.#lastHealthy;
        const healthy = this.#healthy();
        if (!sameSet(healthy, before)) this.#input(() => this.#engine!.setHealthy(healthy));
      }
      // SNAT port saturation (src/agent/traffic.ts) concerns the policies this node holds.
      if (
        !deepEqual(
          n.status?.snatSaturation,
          type === "add" ? undefined : old?.status?.snatSaturation,
        )
      )
        for (const [key, p] of this.#outcome?.policies ?? [])
          if (p.gatewayNode === name) this.#enqueue(`policy:${key}`);
    });
    this.slices = make<EgressEndpointSlice & KubeObject>(ours("EgressEndpointSlice"), (type, s) => {
      const label = s.metadata.labels?.[POLICY_LABEL] ?? "";
      const name = s.metadata.name ?? "";
      const set = this.#slicesByPolicy.get(label) ?? new Set<string>();
      if (type === "delete") set.delete(name);
      else set.add(name);
      if (set.size === 0) this.#slicesByPolicy.delete(label);
      else this.#slicesByPolicy.set(label, set);
      this.#enqueue(`slices:${s.policy}`);
    });
    this.clusterInfos = make<EgressClusterInfo & KubeObject>(ours("EgressClusterInfo"), () => {
      this.#input(() => this.#engine!.setClusterCIDRs(this.#clusterCIDRs()));
      this.#enqueue("clusterinfo");
    });
    this.#leases = new LeaseTracker({
      client,
      namespace: options.namespace,
      clock,
      log,
      ...(options.leaseTiming === undefined ? {} : { timing: options.leaseTiming }),
      onChange: () => this.#input(() => this.#engine!.setHealthy(this.#healthy())),
    });
    this.#events = new EventRecorder({
      client,
      component: "sallyport-controller",
      instance: options.identity,
      namespace: options.namespace,
      log,
    });
    this.#loop = new SyncLoop({
      clock,
      periodMs: options.periodMs ?? 30_000,
      retryMs: 1000,
      sync: ({ full }) => this.#compute(full),
      onError: (e) => log.error({ err: (e as Error).message }, "computation failed; retrying"),
    });
    const le = options.leaderElection;
    this.#elector = new LeaderElector({
      client,
      namespace: options.namespace,
      name: "sallyport-controller",
      identity: options.identity,
      clock,
      log,
      ...(le === undefined
        ? {}
        : {
            leaseDurationMs: le.leaseDurationMs,
            renewDeadlineMs: le.renewDeadlineMs,
            retryPeriodMs: le.retryPeriodMs,
          }),
      onStartedLeading: () => {
        this.#leading = true;
        void this.#whenSynced().then(() => this.#startLeading());
      },
      onStoppedLeading: () => {
        this.#stopLeading();
        this.#o.onLostLeadership?.();
      },
    });
  }

  get leading(): boolean {
    return this.#leading;
  }

  /** The last outcome the leader computed (for tests and the explain command). */
  get outcome(): ClusterOutcome | undefined {
    return this.#outcome;
  }

  #caches(): Reflector<KubeObject>[] {
    const list: Reflector<KubeObject>[] = [
      this.nodes,
      this.pods,
      this.namespaces,
      this.gateways,
      this.policies,
      this.clusterPolicies,
      this.egressNodes,
      this.slices,
      this.clusterInfos,
    ] as never;
    if (this.serviceCIDRs !== undefined) list.push(this.serviceCIDRs as never);
    return list;
  }

  async start(): Promise<void> {
    // ServiceCIDR objects exist from Kubernetes 1.33 (GA); older API servers have none.
    try {
      await this.#o.client.list(CORE.serviceCIDRs, { limit: 1 });
      this.serviceCIDRs = new Reflector<ServiceCIDRObject>({
        client: this.#o.client,
        resource: CORE.serviceCIDRs,
        clock: this.#o.clock,
        log: this.#o.log,
        onChange: () => {
          this.#input(() => this.#engine!.setClusterCIDRs(this.#clusterCIDRs()));
          this.#enqueue("clusterinfo");
        },
      });
    } catch (e) {
      this.#o.log.info(
        { err: (e as Error).message },
        "no ServiceCIDR API: service CIDRs come from EgressClusterInfo.spec.serviceCIDRs",
      );
    }
    for (const c of this.#caches()) c.start();
    this.#leases.start();
    this.#elector.start();
  }

  async stop(): Promise<void> {
    this.#stopLeading();
    await this.#elector.stop();
    this.#leases.stop();
    for (const c of this.#caches()) c.stop();
    await this.#workers;
  }

  async #whenSynced(): Promise<void> {
    await Promise.all([...this.#caches().map((c) => c.synced), this.#leases.synced]);
  }

  #startLeading(): void {
    if (!this.#leading || this.#queue !== undefined) return;
    this.#engine = new ClusterEngine({
      ...this.#inputs(),
      pods: [...this.pods.items()].map(podInfo),
    });
    this.#outcome = undefined;
    this.#evented.clear();
    this.#saturationEvented.clear();
    this.#written.clear();
    this.#progressSince.clear();
    const queue = new WorkQueue({ clock: this.#o.clock });
    this.#queue = queue;
    this.#workers = runWorkers(queue, {
      workers: this.#o.workers ?? 8,
      handle: (key) => this.#process(key),
      onError: (key, error, requeues) => {
        this.#o.metrics?.reconciles.inc({ result: "error" });
        this.#o.log.warn(
          { key, err: (error as Error).message, requeues },
          "write failed; the queue retries it with backoff",
        );
      },
    });
    // The first computation is a full pass: every key is checked once.
    this.#loop.start();
  }

  #stopLeading(): void {
    this.#leading = false;
    this.#loop.stop();
    this.#queue?.shutDown();
    this.#queue = undefined;
    this.#engine = undefined;
  }

  /** An input changed: feed the engine (when leading) and compute soon if it read anything. */
  #input(apply: () => boolean): void {
    if (this.#engine === undefined) return;
    if (apply()) this.#loop.trigger();
  }

  /**
   * Queues `key`. Endpoint slices go after every other key waiting: an agent programs a policy
   * from its status and its own node's pods (a gateway SNATs by tunnel class a pod it has not
   * heard of), so under a backlog, a thousand policies applied at once, the statuses that let
   * traffic flow are written first.
   */
  #enqueue(key: string): void {
    this.#queue?.add(key, key.startsWith("slices:") ? "low" : "high");
  }

  #clusterCIDRs(): { serviceCIDRs: string[]; extraCIDRs: string[] } {
    const info = this.clusterInfos.get(CLUSTER_INFO);
    return {
      serviceCIDRs: [
        ...[...(this.serviceCIDRs?.items() ?? [])].flatMap((s) => s.spec?.cidrs ?? []),
        ...(info?.spec.serviceCIDRs ?? []),
      ],
      extraCIDRs: info?.spec.extraCIDRs ?? [],
    };
  }

  /** Everything but pods, from the caches. */
  #inputs(): Omit<Snapshot, "pods"> {
    const egressNodes = [...this.egressNodes.items()];
    const policies = [...this.policies.items(), ...this.clusterPolicies.items()];
    const previousPolicies = new Map<string, PreviousPolicy>();
    for (const p of policies) {
      const prev = previousOf(p.status);
      if (prev !== undefined) previousPolicies.set(policyKey(p), prev);
    }
    return {
      nodes: [...this.nodes.items()].map(nodeInfo),
      namespaces: [...this.namespaces.items()].map((n) => ({
        name: n.metadata.name ?? "",
        labels: n.metadata.labels ?? {},
      })),
      gateways: [...this.gateways.items()],
      policies,
      ...this.#clusterCIDRs(),
      healthy: this.#healthy(),
      reports: new Map(egressNodes.map((n) => [n.metadata.name ?? "", reportOf(n)])),
      previousNodes: new Map<string, NodeIdentity>(
        egressNodes.map((n) => [n.metadata.name ?? "", identityOf(n)]),
      ),
      previousPolicies,
      config: this.#o.cluster,
    };
  }

  /**
   * Runs the engine and queues the keys whose outcome changed. A full pass first re-feeds every
   * input from the caches (the engine ignores what it already has) and then queues every key.
   */
  async #compute(full: boolean): Promise<void> {
    const engine = this.#engine;
    if (engine === undefined || !this.#leading) return;
    const started = this.#o.clock.now();
    if (full && this.#outcome !== undefined) engine.setInputs(this.#inputs());
    const outcome = engine.compute();
    const previous = full ? undefined : this.#outcome;
    this.#outcome = outcome;
    const add = (key: string) => this.#enqueue(key);
    for (const [key, p] of outcome.policies) {
      const before = previous?.policies.get(key);
      if (before === p) continue;
      if (before !== undefined && onlyStandbyDiffers(before, p)) {
        this.#queue?.addAfter(`policy:${key}`, STANDBY_SETTLE_MS);
        continue;
      }
      add(`policy:${key}`);
      add(`slices:${key}`);
    }
    for (const key of previous?.policies.keys() ?? [])
      if (!outcome.policies.has(key)) add(`slices:${key}`);
    for (const [name, g] of outcome.gateways)
      if (previous?.gateways.get(name) !== g) add(`gateway:${name}`);
    if (previous?.identities !== outcome.identities) {
      for (const [name, id] of outcome.identities)
        if (previous?.identities.get(name) !== id) add(`node:${name}`);
      for (const name of previous?.identities.keys() ?? [])
        if (!outcome.identities.has(name)) add(`node:${name}`);
    }
    if (previous?.identityErrors !== outcome.identityErrors) this.#identityEvents(outcome);
    if (previous === undefined || previous.ignoreCIDRs !== outcome.ignoreCIDRs) add("clusterinfo");
    if (full) {
      for (const n of this.nodes.items()) add(`node:${n.metadata.name}`);
      for (const n of this.egressNodes.items()) add(`node:${n.metadata.name}`);
      for (const s of this.slices.items()) add(`slices:${s.policy}`);
      add("clusterinfo");
    }
    const ms = this.#o.clock.now() - started;
    this.#o.metrics?.reconcileDuration.observe(ms / 1000);
    this.#o.log.debug({ ms: Math.round(ms), full }, "computed");
  }

  // --- the business logic of one key: build, compare, write when different

  async #process(key: string): Promise<void> {
    if (!this.#leading || this.#outcome === undefined) return;
    const at = key.indexOf(":");
    const kind = at < 0 ? key : key.slice(0, at);
    const name = at < 0 ? "" : key.slice(at + 1);
    if (kind === "policy") await this.#syncPolicy(name);
    else if (kind === "slices") await this.#syncSlices(name);
    else if (kind === "gateway") await this.#syncGateway(name);
    else if (kind === "node") await this.#syncEgressNode(name);
    else if (kind === "clusterinfo") await this.#syncClusterInfo();
    this.reconciles++;
    this.#o.metrics?.reconciles.inc({ result: "ok" });
  }

  /**
   * The status an object will have once our last write to it lands: what we wrote, while the
   * cache still holds the version we wrote against (its watch event has not arrived yet). Built
   * on the stale copy instead, a status would get new transition times and be written again.
   */
  #settled<T>(id: string, version: string | undefined, current: T): T {
    const prior = this.#written.get(id);
    return prior !== undefined && prior.version === version ? (prior.value as T) : current;
  }

  /**
   * Writes `patch` unless the same value was already written against this very version of the
   * cached object (the write is done; its watch event has not arrived yet).
   */
  async #write(
    id: string,
    version: string | undefined,
    desired: unknown,
    send: () => Promise<unknown>,
  ): Promise<void> {
    const prior = this.#written.get(id);
    if (prior !== undefined && prior.version === version && deepEqual(prior.value, desired)) return;
    this.writes++;
    this.#o.metrics?.writes.inc({ kind: id.slice(0, id.indexOf(":")) });
    await send();
    this.#written.set(id, { version, value: desired });
  }

  async #syncPolicy(key: string): Promise<void> {
    const { kind, name } = cacheKeyOf(key);
    const obj = (kind === "EgressPolicy" ? this.policies : this.clusterPolicies).get(name);
    const o = this.#outcome?.policies.get(key);
    if (obj === undefined || o === undefined) {
      this.#evented.delete(key);
      this.#saturationEvented.delete(key);
      this.#progressSince.delete(key);
      return;
    }
    const id = `policy:${key}`;
    const settled = this.#settled(id, obj.metadata.resourceVersion, obj.status);
    const desired = policyStatus(
      o,
      settled,
      {
        programmedOn: (k, revision, targets) =>
          targets.filter((n) => this.egressNodes.get(n)?.status?.programmed?.[k] === revision),
        snatSaturation: (node) => this.egressNodes.get(node)?.status?.snatSaturation,
      },
      new Date().toISOString(),
    );
    if (this.#evented.get(key) !== o) {
      this.#policyEvents(obj, o, this.#evented.get(key));
      this.#evented.set(key, o);
    }
    this.#saturationEvent(key, obj, settled, desired);
    const current = obj.status ?? {};
    if (deepEqual(current, desired)) {
      this.#progressSince.delete(key);
      return;
    }
    // Against what the object holds once our last write lands: the cached copy may predate it.
    if (onlyProgressDiffers(settled ?? {}, desired)) {
      const now = this.#o.clock.now();
      const waited = now - getOrInsert(this.#progressSince, key, () => now);
      const settleMs = this.#o.progressSettleMs ?? PROGRESS_SETTLE_MS;
      if (waited < settleMs) {
        this.#queue?.addAfter(id, settleMs - waited, "low");
        return;
      }
    }
    this.#progressSince.delete(key);
    const patch = mergePatch(current, desired);
    if (patch === undefined) return;
    await this.#write(id, obj.metadata.resourceVersion, desired, () =>
      this.#o.client.mergePatch(
        ours(obj.kind),
        obj.metadata.name ?? "",
        { status: patch },
        { namespace: obj.metadata.namespace, subresource: "status" },
      ),
    );
  }

  async #syncSlices(key: string): Promise<void> {
    const { client } = this.#o;
    const label = policyLabel(key);
    const existing = [...(this.#slicesByPolicy.get(label) ?? [])]
      .map((n) => this.slices.get(n))
      .filter((s): s is EgressEndpointSlice & KubeObject => s !== undefined && s.policy === key);
    const o = this.#outcome?.policies.get(key);
    const endpoints =
      o?.accepted === true
        ? o.endpoints.map((e) => ({ pod: e.pod, node: e.node, ips: [...e.ips] }))
        : [];
    const plan = planSlices(
      key,
      endpoints,
      existing.map((s) => ({ name: s.metadata.name ?? "", endpoints: s.endpoints })),
      this.#o.sliceSize ?? 100,
    );
    for (const w of plan.write) {
      const current = existing.find((s) => s.metadata.name === w.name);
      await this.#write(`slice:${w.name}`, current?.metadata.resourceVersion, w.endpoints, () =>
        current !== undefined
          ? client.mergePatch(ours("EgressEndpointSlice"), w.name, { endpoints: w.endpoints })
          : client
              .create(ours("EgressEndpointSlice"), {
                apiVersion: API_VERSION,
                kind: "EgressEndpointSlice",
                metadata: {
                  name: w.name,
                  labels: { [POLICY_LABEL]: label, "app.kubernetes.io/part-of": "sallyport" },
                },
                policy: key,
                endpoints: [...w.endpoints],
              })
              .catch((e) => {
                if (!isAlreadyExists(e)) throw e;
              }),
      );
    }
    for (const d of plan.delete) {
      const current = existing.find((s) => s.metadata.name === d);
      await this.#write(`slice:${d}`, current?.metadata.resourceVersion, null, () =>
        client.delete(ours("EgressEndpointSlice"), d).catch((e) => {
          if (!isNotFound(e)) throw e;
        }),
      );
    }
  }

  async #syncGateway(name: string): Promise<void> {
    const gw = this.gateways.get(name);
    const o = this.#outcome?.gateways.get(name);
    if (gw === undefined || o === undefined) return;
    const settled = this.#settled(`gateway:${name}`, gw.metadata.resourceVersion, gw.status);
    const desired = gatewayStatus(
      o,
      settled,
      gw.metadata.generation ?? 0,
      new Date().toISOString(),
    );
    const current = gw.status ?? {};
    if (deepEqual(current, desired)) return;
    const ready = desired.conditions?.find((c) => c.type === "Ready");
    const wasReady = settled?.conditions?.find((c) => c.type === "Ready");
    if (ready?.status === "False" && wasReady?.status !== "False")
      void this.#events.record(targetOf(gw), "Warning", ready.reason, ready.message);
    const patch = mergePatch(current, desired);
    if (patch === undefined) return;
    await this.#write(`gateway:${name}`, gw.metadata.resourceVersion, desired, () =>
      this.#o.client.mergePatch(
        ours("EgressGateway"),
        name,
        { status: patch },
        { subresource: "status" },
      ),
    );
  }

  /** Nodes the data plane reported down, as of the last #healthy(). */
  #reportedDown = 0;
  #lastHealthy: ReadonlySet<string> = new Set();

  /**
   * Alive for placement: a valid node lease, and not judged down by the liveness probes of a
   * gateway node whose own lease is valid (it reports them in its EgressNode status `downNodes`;
   * the probes decide by a majority of the voters, src/agent/liveness.ts), unless that node
   * reports the reporter down in a newer status. The units of such a node go to their first live
   * standby: the node the data plane already moved them to.
   */
  #healthy(): Set<string> {
    const leases = this.#leases.healthy();
    const down = new Set<string>();
    const lastWord = (name: string) => {
      const t = Date.parse(this.egressNodes.get(name)?.status?.lastSync ?? "");
      return Number.isNaN(t) ? Number.NEGATIVE_INFINITY : t;
    };
    for (const n of this.egressNodes.items()) {
      const name = n.metadata.name ?? "";
      if (n.spec.gatewayCapable !== true || !leases.has(name)) continue;
      // Two nodes that report each other: the newer report wins (a reporter that died since,
      // its lease not run out yet, reported the other during its hold-down, before it came back).
      const reportedAt = lastWord(name);
      for (const d of n.status?.downNodes ?? []) {
        const answer = this.egressNodes.get(d)?.status?.downNodes ?? [];
        if (d !== name && !(answer.includes(name) && lastWord(d) > reportedAt)) down.add(d);
      }
    }
    this.#reportedDown = down.size;
    const healthy = new Set([...leases].filter((n) => !down.has(n)));
    const lost = [...this.#lastHealthy].filter((n) => !healthy.has(n));
    const found = [...healthy].filter((n) => !this.#lastHealthy.has(n));
    if (lost.length > 0 || found.length > 0)
      this.#o.log.info(
        {
          lost: lost.map(
            (n) => `${n} (${leases.has(n) ? "judged down by a gateway" : "node lease expired"})`,
          ),
          found,
        },
        "the nodes alive for placement changed",
      );
    this.#lastHealthy = healthy;
    return new Set(healthy);
  }

  async #syncEgressNode(name: string): Promise<void> {
    const { client } = this.#o;
    const node = this.nodes.get(name);
    const current = this.egressNodes.get(name);
    const id = this.#outcome?.identities.get(name);
    if (node === undefined) {
      if (current !== undefined)
        await this.#write(`node:${name}`, current.metadata.resourceVersion, null, () =>
          client.delete(ours("EgressNode"), name).catch((e) => {
            if (!isNotFound(e)) throw e;
          }),
        );
      return;
    }
    if (id === undefined) return;
    const capable = [...this.gateways.items()].some((gw) =>
      selectorOf(gw).matches(node.metadata.labels),
    );
    const spec = egressNodeSpec(id, nodeInfo(node), capable);
    if (current === undefined) {
      await this.#write(`node:${name}`, undefined, spec, () =>
        client
          .create(ours("EgressNode"), {
            apiVersion: API_VERSION,
            kind: "EgressNode",
            metadata: { name, labels: { "app.kubernetes.io/part-of": "sallyport" } },
            spec,
          })
          .catch((e) => {
            if (!isAlreadyExists(e)) throw e;
          }),
      );
      return;
    }
    if (deepEqual(current.spec, spec)) return;
    const patch = mergePatch(current.spec, spec);
    if (patch === undefined) return;
    await this.#write(`node:${name}`, current.metadata.resourceVersion, spec, () =>
      client.mergePatch(ours("EgressNode"), name, { spec: patch }),
    );
  }

  async #syncClusterInfo(): Promise<void> {
    const { client } = this.#o;
    const outcome = this.#outcome;
    if (outcome === undefined) return;
    let info = this.clusterInfos.get(CLUSTER_INFO);
    if (info === undefined) {
      await this.#write("clusterinfo:create", undefined, true, async () => {
        try {
          info = await client.create<EgressClusterInfo & KubeObject>(ours("EgressClusterInfo"), {
            apiVersion: API_VERSION,
            kind: "EgressClusterInfo" as const,
            metadata: { name: CLUSTER_INFO },
            spec: {},
          });
        } catch (e) {
          if (!isAlreadyExists(e)) throw e;
        }
      });
    }
    const desired = clusterInfoStatus(
      [...this.nodes.items()].map(nodeInfo),
      [...(this.serviceCIDRs?.items() ?? [])].flatMap((s) => s.spec?.cidrs ?? []),
      outcome.ignoreCIDRs,
    );
    const current = info?.status ?? {};
    if (deepEqual(current, desired)) return;
    const patch = mergePatch(current, desired);
    if (patch === undefined) return;
    await this.#write("clusterinfo:status", info?.metadata.resourceVersion, desired, () =>
      client.mergePatch(
        ours("EgressClusterInfo"),
        CLUSTER_INFO,
        { status: patch },
        { subresource: "status" },
      ),
    );
  }

  // --- Events on the transitions that matter

  /** SNATPortsSaturated turning True: one Warning, not one per pass. */
  #saturationEvent(
    key: string,
    obj: AnyPolicy & KubeObject,
    settled: AnyPolicy["status"],
    desired: NonNullable<AnyPolicy["status"]>,
  ): void {
    const now = desired.conditions?.find((c) => c.type === "SNATPortsSaturated");
    const before = settled?.conditions?.find((c) => c.type === "SNATPortsSaturated");
    if (now?.status !== "True") {
      this.#saturationEvented.delete(key);
      return;
    }
    if (before?.status === "True" || this.#saturationEvented.has(key)) return;
    this.#saturationEvented.add(key);
    void this.#events.record(targetOf(obj), "Warning", "SNATPortsSaturated", now.message);
  }

  #identityEvents(outcome: ClusterOutcome): void {
    for (const [name, reason] of outcome.identityErrors) {
      const node = this.nodes.get(name);
      if (node !== undefined)
        void this.#events.record(
          { ...targetOf(node), apiVersion: "v1", kind: "Node" },
          "Warning",
          "NoEgressIdentity",
          reason,
        );
    }
  }

  #policyEvents(
    obj: AnyPolicy & KubeObject,
    now: PolicyOutcome,
    before: PolicyOutcome | undefined,
  ): void {
    const target = targetOf(obj);
    const accepted = now.conditions.find((c) => c.type === "Accepted");
    const wasAccepted = before?.conditions.find((c) => c.type === "Accepted");
    if (
      accepted?.status === "False" &&
      (wasAccepted?.status !== "False" || wasAccepted.reason !== accepted.reason)
    ) {
      void this.#events.record(target, "Warning", accepted.reason, accepted.message);
    }
    const assigned = now.conditions.find((c) => c.type === "GatewayAssigned");
    const wasAssigned = before?.conditions.find((c) => c.type === "GatewayAssigned");
    if (assigned?.status === "False" && wasAssigned?.status !== "False") {
      void this.#events.record(target, "Warning", assigned.reason, assigned.message);
    }
    if (
      before?.gatewayNode !== undefined &&
      now.gatewayNode !== undefined &&
      before.gatewayNode !== now.gatewayNode
    ) {
      const alive = this.#healthy().has(before.gatewayNode);
      this.#o.metrics?.egressIPMoves.inc(
        { reason: alive ? "rebalance" : "node_not_alive" },
        now.egressIPs.length,
      );
      void this.#events.record(
        target,
        "Normal",
        "EgressIPMoved",
        `${now.egressIPs.join(", ")} moved from ${before.gatewayNode} to ${now.gatewayNode}${alive ? "" : `: ${before.gatewayNode} is not alive`}`,
      );
    }
  }
}

export type { Family };
