/**
 * The controller: watches the cluster, runs the engine, and writes what it decided.
 *
 * Every replica keeps informer caches (the admission webhook needs them); only the leader
 * (Lease `sallyport-controller`) reconciles. A reconcile is level-triggered and idempotent:
 * compute everything from the caches, then write only the objects whose content differs:
 *   EgressNode spec   node id / NODE_MARK, tunnel addresses and MAC, addresses, pod CIDRs
 *   slices            the pods each accepted policy matches
 *   statuses          policies, gateways, cluster info; Events on the transitions that matter
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
import { hex, nodeMark } from "../engine/marks.ts";
import type { ClusterConfig, NodeIdentity, PreviousPolicy, Snapshot } from "../engine/snapshot.ts";
import { podKey } from "../engine/snapshot.ts";
import {
  CORE,
  isAlreadyExists,
  type KubeClient,
  type KubeObject,
  ours,
  type Resource,
} from "../kube/client.ts";
import { EventRecorder, targetOf } from "../kube/events.ts";
import { LeaderElector } from "../kube/lease.ts";
import { type LeaseTiming, LeaseTracker } from "../kube/node_lease.ts";
import { type ChangeType, Reflector } from "../kube/reflector.ts";
import type { Clock } from "../lib/clock.ts";
import { type Family, normalizeCidrList } from "../lib/ip.ts";
import type { Logger } from "../lib/log.ts";
import type { ControllerMetrics } from "../lib/metrics.ts";
import { compileSelector, sameLabels } from "../lib/selector.ts";
import { SyncLoop } from "../lib/sync_loop.ts";
import {
  identityOf,
  type NodeObject,
  nodeInfo,
  type PodObject,
  podInfo,
  previousOf,
  reportOf,
} from "./inputs.ts";
import { POLICY_LABEL, planSlices, policyLabel } from "./slices.ts";
import { gatewayStatus, policyStatus, statusPatch } from "./status.ts";

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
  /** Called when leadership is lost; reconciling stops until this replica wins again. */
  readonly onLostLeadership?: () => void;
  readonly metrics?: ControllerMetrics;
}

type Cache<T extends KubeObject> = Reflector<T>;

interface ServiceCIDRObject extends KubeObject {
  spec?: { cidrs?: string[] };
}

const CLUSTER_INFO = "default";

export class Controller {
  readonly #o: ControllerOptions;
  readonly nodes: Cache<NodeObject>;
  readonly pods: Cache<PodObject>;
  readonly namespaces: Cache<KubeObject>;
  readonly gateways: Cache<EgressGateway & KubeObject>;
  readonly policies: Cache<AnyPolicy & KubeObject>;
  readonly clusterPolicies: Cache<AnyPolicy & KubeObject>;
  readonly egressNodes: Cache<EgressNode & KubeObject>;
  readonly slices: Cache<EgressEndpointSlice & KubeObject>;
  readonly clusterInfos: Cache<EgressClusterInfo & KubeObject>;
  serviceCIDRs: Cache<ServiceCIDRObject> | undefined;
  readonly #leases: LeaseTracker;
  readonly #elector: LeaderElector;
  readonly #loop: SyncLoop;
  readonly #events: EventRecorder;
  #engine: ClusterEngine | undefined;
  #inputsDirty = true;
  #leading = false;
  #outcome: ClusterOutcome | undefined;
  /** Reconciles completed, for tests and metrics. */
  reconciles = 0;

  constructor(options: ControllerOptions) {
    this.#o = options;
    const { client, clock, log } = options;
    const make = <T extends KubeObject>(
      resource: Resource,
      onChange?: (type: ChangeType, obj: T, old: T | undefined) => void,
      extra: { namespace?: string } = {},
    ) =>
      new Reflector<T>({
        client,
        resource,
        clock,
        log,
        ...extra,
        onChange: onChange ?? (() => this.#changed()),
      });
    const specChanged = (type: ChangeType, obj: KubeObject, old: KubeObject | undefined) =>
      type !== "update" ||
      obj.metadata.generation !== old?.metadata.generation ||
      !sameLabels(obj.metadata.labels, old?.metadata.labels);
    this.nodes = make<NodeObject>(CORE.nodes, (t, o, old) => {
      if (
        t !== "update" ||
        JSON.stringify([o.metadata.labels, o.status?.addresses, o.spec]) !==
          JSON.stringify([old?.metadata.labels, old?.status?.addresses, old?.spec])
      )
        this.#changed();
    });
    this.pods = make<PodObject>(CORE.pods, (type, pod) => {
      // Before the first reconcile the engine is built from the whole cache.
      if (this.#engine === undefined) return this.#loop.trigger();
      const info = podInfo(pod);
      const changed =
        type === "delete" ? this.#engine.deletePod(podKey(info)) : this.#engine.setPod(info);
      if (changed) this.#loop.trigger();
    });
    this.namespaces = make(CORE.namespaces);
    this.gateways = make(
      ours("EgressGateway"),
      (t, o, old) => specChanged(t, o, old) && this.#changed(),
    );
    this.policies = make(
      ours("EgressPolicy"),
      (t, o, old) => specChanged(t, o, old) && this.#changed(),
    );
    this.clusterPolicies = make(
      ours("ClusterEgressPolicy"),
      (t, o, old) => specChanged(t, o, old) && this.#changed(),
    );
    this.egressNodes = make(ours("EgressNode"), (t, o, old) => {
      // Underlay and interfaces feed the engine; programmed revisions only the statuses.
      if (
        t !== "update" ||
        JSON.stringify([o.status?.underlay, o.status?.interfaces]) !==
          JSON.stringify([old?.status?.underlay, old?.status?.interfaces])
      )
        this.#inputsDirty = true;
      this.#loop.trigger();
    });
    this.slices = make(ours("EgressEndpointSlice"), () => {});
    this.clusterInfos = make(
      ours("EgressClusterInfo"),
      (t, o, old) => specChanged(t, o, old) && this.#changed(),
    );
    this.#leases = new LeaseTracker({
      client,
      namespace: options.namespace,
      clock,
      log,
      ...(options.leaseTiming === undefined ? {} : { timing: options.leaseTiming }),
      onChange: () => this.#changed(),
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
      periodMs: 30_000,
      retryMs: 1000,
      sync: () => this.#reconcile(),
      onError: (e) => log.error({ err: (e as Error).message }, "reconcile failed; retrying"),
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
        void this.#whenSynced().then(() => this.#loop.start());
      },
      onStoppedLeading: () => {
        this.#leading = false;
        this.#loop.stop();
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
        onChange: () => this.#changed(),
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
    this.#loop.stop();
    await this.#elector.stop();
    this.#leases.stop();
    for (const c of this.#caches()) c.stop();
  }

  async #whenSynced(): Promise<void> {
    await Promise.all([...this.#caches().map((c) => c.synced), this.#leases.synced]);
  }

  #changed(): void {
    this.#inputsDirty = true;
    this.#loop.trigger();
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
    const info = this.clusterInfos.get(CLUSTER_INFO);
    const serviceCIDRs = [
      ...[...(this.serviceCIDRs?.items() ?? [])].flatMap((s) => s.spec?.cidrs ?? []),
      ...(info?.spec.serviceCIDRs ?? []),
    ];
    return {
      nodes: [...this.nodes.items()].map(nodeInfo),
      namespaces: [...this.namespaces.items()].map((n) => ({
        name: n.metadata.name ?? "",
        labels: n.metadata.labels ?? {},
      })),
      gateways: [...this.gateways.items()],
      policies,
      serviceCIDRs,
      extraCIDRs: info?.spec.extraCIDRs ?? [],
      healthy: this.#leases.healthy(),
      reports: new Map(egressNodes.map((n) => [n.metadata.name ?? "", reportOf(n)])),
      previousNodes: new Map<string, NodeIdentity>(
        egressNodes.map((n) => [n.metadata.name ?? "", identityOf(n)]),
      ),
      previousPolicies,
      config: this.#o.cluster,
    };
  }

  async #reconcile(): Promise<void> {
    if (!this.#leading) return;
    const started = this.#o.clock.now();
    if (this.#engine === undefined) {
      this.#engine = new ClusterEngine({
        ...this.#inputs(),
        pods: [...this.pods.items()].map(podInfo),
      });
      this.#inputsDirty = false;
    } else if (this.#inputsDirty) {
      this.#inputsDirty = false;
      this.#engine.setInputs(this.#inputs());
    }
    const outcome = this.#engine.compute();
    const previous = this.#outcome;
    this.#outcome = outcome;
    const failures: string[] = [];
    const guard = async (what: string, fn: () => Promise<unknown>) => {
      try {
        await fn();
      } catch (e) {
        failures.push(`${what}: ${(e as Error).message}`);
      }
    };
    await this.#writeNodes(outcome, guard);
    await this.#writeSlices(outcome, guard);
    await this.#writePolicies(outcome, previous, guard);
    await this.#writeGateways(outcome, guard);
    await this.#writeClusterInfo(outcome, guard);
    this.reconciles++;
    const ms = this.#o.clock.now() - started;
    this.#o.metrics?.reconcileDuration.observe(ms / 1000);
    this.#o.metrics?.reconciles.inc({ result: failures.length === 0 ? "ok" : "error" });
    this.#o.log.debug({ ms: Math.round(ms), failures: failures.length }, "reconciled");
    if (failures.length > 0)
      throw new Error(`${failures.length} write(s) failed: ${failures.slice(0, 3).join("; ")}`);
  }

  async #writeNodes(outcome: ClusterOutcome, guard: Guard): Promise<void> {
    const { client } = this.#o;
    const capable = new Set<string>();
    for (const gw of this.gateways.items()) {
      const sel = compileSelector(gw.spec.nodeSelector);
      for (const n of this.nodes.items())
        if (sel.matches(n.metadata.labels)) capable.add(n.metadata.name ?? "");
    }
    const tasks: (() => Promise<unknown>)[] = [];
    for (const [name, id] of outcome.identities) {
      const info = nodeInfo(this.nodes.get(name)!);
      const spec: EgressNode["spec"] = {
        nodeID: id.nodeID,
        mark: hex(nodeMark(id.nodeID)),
        tunnel: {
          mac: id.mac,
          ...(id.tunnel[4] === undefined ? {} : { ipv4: id.tunnel[4] }),
          ...(id.tunnel[6] === undefined ? {} : { ipv6: id.tunnel[6] }),
        },
        addresses: {
          ...(info.addresses[4] === undefined ? {} : { ipv4: info.addresses[4] }),
          ...(info.addresses[6] === undefined ? {} : { ipv6: info.addresses[6] }),
        },
        podCIDRs: normalizeCidrList(info.podCIDRs),
        gatewayCapable: capable.has(name),
      };
      const current = this.egressNodes.get(name);
      if (current === undefined) {
        tasks.push(() =>
          guard(`create EgressNode ${name}`, () =>
            client.create(ours("EgressNode"), {
              apiVersion: API_VERSION,
              kind: "EgressNode",
              metadata: { name, labels: { "app.kubernetes.io/part-of": "sallyport" } },
              spec,
            }),
          ),
        );
      } else if (JSON.stringify(current.spec) !== JSON.stringify(spec)) {
        tasks.push(() =>
          guard(`update EgressNode ${name}`, () =>
            client.mergePatch(ours("EgressNode"), name, { spec }),
          ),
        );
      }
    }
    for (const n of this.egressNodes.items()) {
      const name = n.metadata.name ?? "";
      if (this.nodes.get(name) === undefined)
        tasks.push(() =>
          guard(`delete EgressNode ${name}`, () => client.delete(ours("EgressNode"), name)),
        );
    }
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
    await parallel(tasks);
  }

  async #writeSlices(outcome: ClusterOutcome, guard: Guard): Promise<void> {
    const { client } = this.#o;
    const byPolicy = new Map<string, (EgressEndpointSlice & KubeObject)[]>();
    for (const s of this.slices.items()) {
      const label = s.metadata.labels?.[POLICY_LABEL] ?? "";
      byPolicy.set(label, [...(byPolicy.get(label) ?? []), s]);
    }
    const tasks: (() => Promise<unknown>)[] = [];
    const live = new Set<string>();
    for (const p of outcome.policies.values()) {
      if (!p.accepted) continue;
      const label = policyLabel(p.key);
      live.add(label);
      const existing = byPolicy.get(label) ?? [];
      const endpoints = p.endpoints.map((e) => ({ pod: e.pod, node: e.node, ips: [...e.ips] }));
      const plan = planSlices(
        p.key,
        endpoints,
        existing.map((s) => ({ name: s.metadata.name ?? "", endpoints: s.endpoints })),
        this.#o.sliceSize ?? 100,
      );
      for (const w of plan.write) {
        const exists = existing.some((s) => s.metadata.name === w.name);
        tasks.push(() =>
          guard(`write slice ${w.name}`, () =>
            exists
              ? client.mergePatch(ours("EgressEndpointSlice"), w.name, { endpoints: w.endpoints })
              : client.create(ours("EgressEndpointSlice"), {
                  apiVersion: API_VERSION,
                  kind: "EgressEndpointSlice",
                  metadata: {
                    name: w.name,
                    labels: { [POLICY_LABEL]: label, "app.kubernetes.io/part-of": "sallyport" },
                  },
                  policy: p.key,
                  endpoints: [...w.endpoints],
                }),
          ),
        );
      }
      for (const d of plan.delete)
        tasks.push(() =>
          guard(`delete slice ${d}`, () => client.delete(ours("EgressEndpointSlice"), d)),
        );
    }
    for (const [label, list] of byPolicy) {
      if (live.has(label)) continue;
      for (const s of list)
        tasks.push(() =>
          guard(`delete slice ${s.metadata.name}`, () =>
            client.delete(ours("EgressEndpointSlice"), s.metadata.name ?? ""),
          ),
        );
    }
    await parallel(tasks);
  }

  async #writePolicies(
    outcome: ClusterOutcome,
    previous: ClusterOutcome | undefined,
    guard: Guard,
  ): Promise<void> {
    const { client } = this.#o;
    const now = new Date().toISOString();
    const programmed = (key: string, revision: string, targets: readonly string[]) =>
      targets.filter((n) => this.egressNodes.get(n)?.status?.programmed?.[key] === revision);
    const tasks: (() => Promise<unknown>)[] = [];
    for (const obj of [...this.policies.items(), ...this.clusterPolicies.items()]) {
      const key = policyKey(obj);
      const o = outcome.policies.get(key);
      if (o === undefined) continue;
      const desired = policyStatus(o, obj.status, { programmedOn: programmed }, now);
      const patch = statusPatch(desired, obj.status);
      if (patch === undefined) continue;
      const resource = ours(obj.kind);
      tasks.push(() =>
        guard(`status of ${key}`, () =>
          client.mergePatch(
            resource,
            obj.metadata.name ?? "",
            { status: patch },
            { namespace: obj.metadata.namespace, subresource: "status" },
          ),
        ),
      );
      this.#policyEvents(obj, o, previous?.policies.get(key));
    }
    await parallel(tasks);
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
      const alive = this.#leases.healthy().has(before.gatewayNode);
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

  async #writeGateways(outcome: ClusterOutcome, guard: Guard): Promise<void> {
    const now = new Date().toISOString();
    const tasks: (() => Promise<unknown>)[] = [];
    for (const gw of this.gateways.items()) {
      const o = outcome.gateways.get(gw.metadata.name ?? "");
      if (o === undefined) continue;
      const desired = gatewayStatus(o, gw.status, gw.metadata.generation ?? 0, now);
      const patch = statusPatch(desired, gw.status);
      if (patch === undefined) continue;
      const ready = desired.conditions?.find((c) => c.type === "Ready");
      const wasReady = gw.status?.conditions?.find((c) => c.type === "Ready");
      if (ready?.status === "False" && wasReady?.status !== "False")
        void this.#events.record(targetOf(gw), "Warning", ready.reason, ready.message);
      tasks.push(() =>
        guard(`status of gateway ${gw.metadata.name}`, () =>
          this.#o.client.mergePatch(
            ours("EgressGateway"),
            gw.metadata.name ?? "",
            { status: patch },
            { subresource: "status" },
          ),
        ),
      );
    }
    await parallel(tasks);
  }

  async #writeClusterInfo(outcome: ClusterOutcome, guard: Guard): Promise<void> {
    const { client } = this.#o;
    const nodes = [...this.nodes.items()].map(nodeInfo);
    const status = {
      nodeIPs: normalizeCidrList(
        nodes.flatMap((n) =>
          Object.values(n.addresses).filter((a): a is string => a !== undefined),
        ),
      ),
      podCIDRs: normalizeCidrList(nodes.flatMap((n) => n.podCIDRs)),
      serviceCIDRs: normalizeCidrList(
        [...(this.serviceCIDRs?.items() ?? [])].flatMap((s) => s.spec?.cidrs ?? []),
      ),
      ignoredCIDRs: [...outcome.ignoreCIDRs],
    };
    let info = this.clusterInfos.get(CLUSTER_INFO);
    if (info === undefined) {
      await guard("create EgressClusterInfo", async () => {
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
    const patch = statusPatch(status, info?.status);
    if (patch !== undefined) {
      await guard("status of EgressClusterInfo", () =>
        client.mergePatch(
          ours("EgressClusterInfo"),
          CLUSTER_INFO,
          { status: patch },
          { subresource: "status" },
        ),
      );
    }
  }
}

type Guard = (what: string, fn: () => Promise<unknown>) => Promise<void>;

/** Runs writes with at most `limit` in flight. */
async function parallel(tasks: readonly (() => Promise<unknown>)[], limit = 16): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < tasks.length) await tasks[next++]!();
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
}

export type { Family };
