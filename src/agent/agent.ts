/**
 * The node agent: watches Sallyport's own kinds, Namespaces and the Pods of its own node (never
 * all Pods, never Nodes), plans this node's datapath
 * with the engine, keeps the kernel equal to it, and reports what it programmed.
 *
 * When the API server is unreachable the caches keep their last state, so the plan, and so the
 * datapath, stays as it was; periodic syncs keep repairing drift meanwhile.
 */
import type {
  AnyPolicy,
  EgressClusterInfo,
  EgressEndpointSlice,
  EgressGateway,
  EgressNode,
} from "../api/types.ts";
import { eipSetName } from "../engine/names.ts";
import { planNode } from "../engine/node_plan.ts";
import type { NodePlan } from "../engine/plan.ts";
import { type PodObject, podInfo } from "../engine/snapshot.ts";
import type { LocalFacts, NodeConfig } from "../engine/view.ts";
import type { Datapath, KernelState } from "../kernel/datapath.ts";
import { localFactsFrom } from "../kernel/facts.ts";
import { CORE, type KubeClient, type KubeObject, ours } from "../kube/client.ts";
import { DEFAULT_LEASE_TIMING, type LeaseTiming, NodeLeaseRenewer } from "../kube/node_lease.ts";
import { Reflector } from "../kube/reflector.ts";
import type { Clock } from "../lib/clock.ts";
import type { Logger } from "../lib/log.ts";
import type { DatapathMetrics } from "../lib/metrics.ts";
import { DatapathSync } from "./datapath_sync.ts";
import { Fence } from "./fence.ts";
import { buildAgentView, peerOf } from "./view.ts";

export interface AgentOptions {
  readonly client: KubeClient;
  readonly node: string;
  readonly namespace: string;
  readonly datapath: Datapath;
  readonly config: NodeConfig;
  readonly clock: Clock;
  readonly log: Logger;
  readonly metrics: DatapathMetrics;
  /** @default 10000 */
  readonly periodMs?: number;
  readonly leaseTiming?: LeaseTiming;
  /** UDP port for gateway heartbeats. @default 7800 */
  readonly fencePort?: number;
  readonly underlayDevice?: string | undefined;
}

type Obj<T> = T & KubeObject;

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
  readonly #renewer: NodeLeaseRenewer;
  readonly #fence: Fence;
  #facts: LocalFacts | undefined;
  #lastState: KernelState | undefined;
  #reported = "";
  #reportedProgrammed: Record<string, string> = {};
  #reporting = false;
  #revisions: ReadonlyMap<
    string,
    { readonly local: string; readonly controller: string | undefined }
  > = new Map();
  #programmed: Record<string, string> = {};
  #lastError: string | undefined;

  constructor(options: AgentOptions) {
    this.#o = options;
    const { client, clock, log } = options;
    const onChange = () => this.sync.trigger();
    const make = <T extends KubeObject>(kind: Parameters<typeof ours>[0]) =>
      new Reflector<T>({ client, resource: ours(kind), clock, log, onChange });
    this.policies = make("EgressPolicy");
    this.clusterPolicies = make("ClusterEgressPolicy");
    this.gateways = make("EgressGateway");
    this.egressNodes = new Reflector<Obj<EgressNode>>({
      client,
      resource: ours("EgressNode"),
      clock,
      log,
      onChange: (_t, n) => {
        if (n.metadata.name === options.node) this.#leaseFollowsCapability(n);
        onChange();
      },
    });
    this.slices = make("EgressEndpointSlice");
    this.clusterInfos = make("EgressClusterInfo");
    this.pods = new Reflector<PodObject & KubeObject>({
      client,
      resource: CORE.pods,
      fieldSelector: `spec.nodeName=${options.node}`,
      clock,
      log,
      onChange,
    });
    this.namespaces = new Reflector<KubeObject>({
      client,
      resource: CORE.namespaces,
      clock,
      log,
      onChange,
    });
    const timing = options.leaseTiming ?? DEFAULT_LEASE_TIMING;
    this.#renewer = new NodeLeaseRenewer({
      client,
      namespace: options.namespace,
      node: options.node,
      clock,
      log,
      timing,
    });
    this.#fence = new Fence({
      node: options.node,
      clock,
      log,
      port: options.fencePort ?? 7800,
      periodMs: timing.renewMs,
      durationMs: timing.durationMs,
      leaseValid: () => this.#renewer.valid,
      apiReachable: () => this.#renewer.apiReachable,
      peers: () => {
        const out = new Map<string, string>();
        for (const n of this.egressNodes.items()) {
          const name = n.metadata.name ?? "";
          const address =
            n.status?.underlay?.ipv4 ?? n.spec.addresses?.ipv4 ?? n.spec.addresses?.ipv6;
          if (name !== options.node && n.spec.gatewayCapable === true && address !== undefined)
            out.set(name, address);
        }
        return out;
      },
      onChange: () => this.sync.trigger(),
      refresh: () => {
        for (const r of this.#reflectors()) r.relist();
      },
      freshSince: (t) => this.#reflectors().every((r) => r.listedAt >= t),
    });
    this.sync = new DatapathSync({
      datapath: options.datapath,
      clock,
      log,
      metrics: options.metrics,
      periodMs: options.periodMs ?? 10_000,
      plan: (state) => this.#plan(state),
      onSynced: (plan) => this.#synced(plan),
    });
  }

  get leaseValid(): boolean {
    return this.#renewer.valid;
  }

  get fenced(): boolean {
    return this.#fence.fenced;
  }

  async start(): Promise<void> {
    // A restarted agent renews an existing lease at once, before its caches are filled, so that
    // a restart shorter than the lease is not taken for a dead gateway.
    this.#renewer.start();
    for (const r of this.#reflectors()) r.start();
    await Promise.all(this.#reflectors().map((r) => r.synced));
    this.#fence.start();
    this.sync.start();
  }

  /**
   * Stops. The datapath stays in the kernel. `restartHoldMs` announces a planned restart on the
   * node lease so that the controller moves nothing meanwhile.
   */
  async stop(options: { restartHoldMs?: number } = {}): Promise<void> {
    this.sync.stop();
    this.#fence.stop();
    if (
      options.restartHoldMs !== undefined &&
      this.egressNodes.get(this.#o.node)?.spec.gatewayCapable === true
    ) {
      await this.#renewer.handOver(options.restartHoldMs);
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

  #plan(state: KernelState | undefined): NodePlan {
    if (state !== undefined) this.#lastState = state;
    const kernel = this.#lastState;
    if (kernel === undefined) throw new Error("Cannot plan yet: the kernel has not been read");
    if (state !== undefined || this.#facts === undefined) {
      const peers = new Map(
        [...this.egressNodes.items()].map((n) => [n.metadata.name ?? "", peerOf(n)]),
      );
      const self = this.egressNodes.get(this.#o.node)?.spec.addresses;
      this.#facts = localFactsFrom(kernel, {
        nodeAddresses: {
          ...(self?.ipv4 === undefined ? {} : { 4: self.ipv4 }),
          ...(self?.ipv6 === undefined ? {} : { 6: self.ipv6 }),
        },
        peers,
        rulePref: this.#o.config.rulePref,
        random: Math.random,
        underlayDevice: this.#o.underlayDevice,
      });
    }
    const { view, revisions } = buildAgentView({
      node: this.#o.node,
      policies: [...this.policies.items(), ...this.clusterPolicies.items()],
      gateways: this.gateways.items(),
      egressNodes: this.egressNodes.items(),
      slices: this.slices.items(),
      localPods: [...this.pods.items()].map(podInfo),
      namespaceLabels: new Map(
        [...this.namespaces.items()].map((n) => [n.metadata.name ?? "", n.metadata.labels ?? {}]),
      ),
      clusterInfo: this.clusterInfos.get("default"),
      config: this.#o.config,
      local: this.#facts,
    });
    this.#revisions = revisions;
    const plan = planNode(view);
    if (!this.#fence.fenced) return plan;
    // Fenced: keep every rule (SNAT included) but stop holding the egress IPs.
    return {
      ...plan,
      eips: [],
      ipsets: plan.ipsets.map((s) =>
        s.name === eipSetName(4) || s.name === eipSetName(6) ? { ...s, members: [] } : s,
      ),
    };
  }

  #synced(plan: NodePlan): void {
    this.#lastError = plan.errors.length > 0 ? plan.errors.join("; ") : undefined;
    const programmed: Record<string, string> = {};
    for (const [key, r] of this.#revisions) {
      // Report only what matches the controller's revision: that is what "programmed" means.
      if (r.controller !== undefined && r.local === r.controller) programmed[key] = r.local;
    }
    this.#programmed = programmed;
    void this.#report();
  }

  /** EgressNode status: underlay, interfaces, what is programmed; written when it changes. */
  async #report(): Promise<void> {
    if (this.#reporting || this.#facts === undefined) return;
    const u = this.#facts.underlay;
    const interfaces = (this.#lastState?.routing.links ?? [])
      .filter(
        (l) =>
          l.name !== "lo" &&
          !l.name.startsWith("spe-") &&
          l.name !== this.#o.config.tunnelDevice &&
          l.addresses.length > 0,
      )
      .map((l) => ({ name: l.name, addresses: l.addresses.map((a) => a.split("/")[0]!) }))
      .slice(0, 64);
    const status = {
      underlay: {
        interface: u.device,
        mtu: u.mtu,
        ...(u.ipv4 === undefined ? {} : { ipv4: u.ipv4 }),
        ...(u.ipv6 === undefined ? {} : { ipv6: u.ipv6 }),
      },
      interfaces,
      programmed: this.#programmed,
      repairs: this.sync.repairs,
      conditions: [
        {
          type: "DatapathReady",
          status: this.#lastError === undefined ? "True" : "False",
          reason: this.#lastError === undefined ? "Synced" : "PartlyProgrammed",
          message: this.#lastError ?? "the kernel holds this node's plan",
          lastTransitionTime: new Date().toISOString(),
        },
      ],
    };
    const key = JSON.stringify({
      ...status,
      conditions: status.conditions.map(({ lastTransitionTime: _, ...c }) => c),
    });
    if (key === this.#reported) return;
    this.#reporting = true;
    try {
      // A merge patch merges maps: keys no longer programmed must be set to null explicitly.
      const programmed: Record<string, string | null> = { ...status.programmed };
      for (const k of Object.keys(this.#reportedProgrammed))
        if (!(k in programmed)) programmed[k] = null;
      await this.#o.client.mergePatch(
        ours("EgressNode"),
        this.#o.node,
        { status: { ...status, programmed, lastSync: new Date().toISOString() } },
        { subresource: "status" },
      );
      this.#reported = key;
      this.#reportedProgrammed = status.programmed;
    } catch (e) {
      this.#o.log.debug({ err: (e as Error).message }, "cannot report status");
    } finally {
      this.#reporting = false;
    }
  }
}
