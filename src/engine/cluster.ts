/**
 * The cluster engine: from the cluster's objects, compute
 *  - an identity per node (node id → NODE_MARK, tunnel addresses, tunnel MAC) and the peers,
 *  - per policy: accepted or not and why, egress IPs, the gateway node, matched endpoints,
 *    which higher-precedence policies shadow it, and its revision,
 *  - per gateway: nodes, their health and egress IPs, pool usage,
 *  - the cluster's ignore CIDRs.
 *
 * Pure and deterministic: no clock, kernel or API. The work is split by responsibility:
 *
 *   nodes.ts       node identities, peers, families, ignore CIDRs
 *   policies.ts    validation and admission of policies against their gateway and namespace
 *   allocation.ts  egress IPs from pools (explicit, pool, exhaustion)
 *   placement.ts   units of policies sharing addresses, and the gateway node of each
 *   membership.ts  which pods each policy selects, and which policies shadow which
 *   outcomes.ts    the outcomes and conditions the controller writes
 *
 * `ClusterEngine` owns the inputs and wires these together. Inputs are fine-grained setters that
 * return whether anything the engine reads changed; `compute()` then redoes only what those
 * changes concern (a lost gateway node re-places the units on it and rebuilds only the outcomes of
 * the policies that moved) and returns the previous outcome objects for every policy and gateway
 * whose content did not change. Allocation is stable: the previous result is kept while it is
 * still valid, so an unrelated change never moves an egress IP. "Previous" is the engine's own
 * last result; the snapshot's previousNodes/previousPolicies (what a new leader reads back from
 * the API) only seed the first computation.
 *
 * `computeCluster(snapshot)` is the same computation from scratch; the tests hold the two equal
 * after any sequence of changes.
 */
import type { AnyPolicy, EgressGateway } from "../api/types.ts";
import { policyKey } from "../api/types.ts";
import type { Family } from "../lib/ip.ts";
import { getOrInsert } from "../lib/maps.ts";
import { type Labels, sameLabels } from "../lib/selector.ts";
import { AddressAllocator, type AddressRequest } from "./allocation.ts";
import {
  sameGateway,
  sameItems,
  sameNodeInfo,
  samePolicy,
  sameReport,
  sameValue,
} from "./equality.ts";
import { FrozenMap } from "./frozen_map.ts";
import { Memberships } from "./membership.ts";
import { policySetName } from "./names.ts";
import { clusterFamilies, ignoreCidrs, NodeIdentities, peerOf, samePeer } from "./nodes.ts";
import {
  acceptedOutcome,
  type ClusterOutcome,
  cond,
  type EngineCondition,
  type GatewayOutcome,
  GatewayTally,
  gatewaySeesChange,
  type PolicyOutcome,
  rejectedOutcome,
  sameGatewayOutcome,
  samePolicyOutcome,
  withStandby,
} from "./outcomes.ts";
import { Placement } from "./placement.ts";
import {
  admitPolicy,
  compileGateway,
  type GatewayInfo,
  isPrepared,
  type Mode,
  type ParsedPolicy,
  type PreparedPolicy,
  parsePolicy,
} from "./policies.ts";
import type {
  ClusterConfig,
  NamespaceInfo,
  NodeIdentity,
  NodeInfo,
  NodeReport,
  PodInfo,
  PreviousPolicy,
  Snapshot,
} from "./snapshot.ts";
import { type ClassRequest, classRequest, shareOf, TunnelClasses } from "./tunnel_classes.ts";
import type { PeerView } from "./view.ts";

export type {
  ClusterOutcome,
  EngineCondition,
  GatewayNodeOutcome,
  GatewayOutcome,
  PolicyOutcome,
  PoolUsage,
  Shadow,
} from "./outcomes.ts";

interface PolicyInput {
  readonly object: AnyPolicy;
  readonly parsed: ParsedPolicy | EngineCondition;
  /** spec.gateway and the namespace of an EgressPolicy, for the indexes. */
  readonly gateway: string;
  readonly namespace: string | undefined;
  readonly setName: string;
}

const NO_KEYS: ReadonlySet<string> = new Set();
const NO_NODES: ReadonlyMap<string, NodeIdentity> = new Map();
const NO_POLICIES: ReadonlyMap<string, PreviousPolicy> = new Map();

export class ClusterEngine {
  // Inputs.
  readonly #nodes = new Map<string, NodeInfo>();
  readonly #namespaces = new Map<string, Labels>();
  readonly #gateways = new Map<string, GatewayInfo>();
  readonly #policies = new Map<string, PolicyInput>();
  #healthy = new Set<string>();
  readonly #reports = new Map<string, NodeReport>();
  #serviceCIDRs: readonly string[] = [];
  #extraCIDRs: readonly string[] = [];
  #config: ClusterConfig;
  /** What a new leader read back; used by the first computation only. */
  #seed: {
    nodes: ReadonlyMap<string, NodeIdentity>;
    policies: ReadonlyMap<string, PreviousPolicy>;
  };

  readonly #policiesByGateway = new Map<string, Set<string>>();
  readonly #policiesByNamespace = new Map<string, Set<string>>();
  readonly #setNames = new Map<string, string>();

  // Derived state.
  #families: readonly Family[] = [4];
  #identities: NodeIdentities;
  #allocator = new AddressAllocator();
  #placement = new Placement();
  readonly #members = new Memberships();
  readonly #admitted = new Map<string, PreparedPolicy | EngineCondition>();

  // The last result.
  #outcome: ClusterOutcome | undefined;
  #policyMap = FrozenMap.empty<string, PolicyOutcome>();
  #gatewayMap = FrozenMap.empty<string, GatewayOutcome>();
  #identityMap = FrozenMap.empty<string, NodeIdentity>();
  #errorMap = FrozenMap.empty<string, string>();
  #peerMap = FrozenMap.empty<string, PeerView>();
  #ignoreCIDRs: readonly string[] = [];
  /** Per gateway, its accepted policies in the last result, counted. */
  readonly #tallies = new Map<string, GatewayTally>();

  // What changed since the last computation.
  #reset = true;
  readonly #dirtyNodes = new Set<string>();
  /** Nodes whose addresses changed: the source address of nodeIP policies placed there. */
  readonly #dirtyNodeAddresses = new Set<string>();
  /** Nodes whose report changed: the source address of interface policies placed there. */
  readonly #dirtyNodeReports = new Set<string>();
  /** Gateways whose announce interface or node selector (shown in conditions) changed. */
  readonly #dirtyGatewayViews = new Set<string>();
  #dirtyCIDRs = true;
  readonly #dirtyGatewaySpecs = new Set<string>();
  readonly #dirtyPolicies = new Set<string>();
  readonly #toActivate = new Set<string>();
  #classes = new TunnelClasses();
  /** Accepted policies without a tunnel class, gathered while activating. */
  readonly #classRequests: ClassRequest[] = [];
  readonly #dirtyOutcomes = new Set<string>();
  /** Policies whose standby list alone changed: their outcome is copied, not rebuilt. */
  readonly #standbyOutcomes = new Set<string>();
  readonly #dirtyGateways = new Set<string>();

  constructor(snapshot: Snapshot) {
    this.#config = snapshot.config;
    this.#identities = new NodeIdentities(snapshot.config.tunnelCIDRs, this.#families);
    this.#seed = { nodes: snapshot.previousNodes, policies: snapshot.previousPolicies };
    this.setInputs(snapshot);
    for (const pod of snapshot.pods) this.#members.setPod(pod);
  }

  /**
   * Replaces everything but the pods, dispatching what differs to the fine-grained setters.
   * previousNodes/previousPolicies count only before the first computation.
   * @returns whether anything the engine reads changed
   */
  setInputs(snapshot: Omit<Snapshot, "pods">): boolean {
    let changed = false;
    const sync = <T>(
      items: readonly T[],
      nameOf: (item: T) => string,
      known: ReadonlyMap<string, unknown>,
      set: (item: T) => boolean,
      remove: (name: string) => boolean,
    ) => {
      const names = new Set<string>();
      for (const item of items) {
        names.add(nameOf(item));
        if (set(item)) changed = true;
      }
      for (const name of [...known.keys()]) if (!names.has(name) && remove(name)) changed = true;
    };
    sync(
      snapshot.nodes,
      (n) => n.name,
      this.#nodes,
      (n) => this.setNode(n),
      (n) => this.deleteNode(n),
    );
    sync(
      snapshot.namespaces,
      (n) => n.name,
      this.#namespaces,
      (n) => this.setNamespace(n),
      (n) => this.deleteNamespace(n),
    );
    sync(
      snapshot.gateways,
      (g) => g.metadata.name ?? "",
      this.#gateways,
      (g) => this.setGateway(g),
      (n) => this.deleteGateway(n),
    );
    sync(
      snapshot.policies,
      policyKey,
      this.#policies,
      (p) => this.setPolicy(p),
      (k) => this.deletePolicy(k),
    );
    if (this.setHealthy(snapshot.healthy)) changed = true;
    for (const [name, report] of snapshot.reports) if (this.setReport(name, report)) changed = true;
    for (const name of [...this.#reports.keys()]) {
      if (!snapshot.reports.has(name) && this.setReport(name, undefined)) changed = true;
    }
    if (this.setClusterCIDRs(snapshot)) changed = true;
    if (!sameValue(this.#config, snapshot.config)) {
      this.#config = snapshot.config;
      this.#reset = true;
      changed = true;
    }
    if (this.#outcome === undefined) {
      this.#seed = { nodes: snapshot.previousNodes, policies: snapshot.previousPolicies };
    }
    return changed;
  }

  // --- pods

  /**
   * A pod added or changed. A change the engine does not read (most Pod updates) costs nothing.
   * @returns whether anything the engine reads changed
   */
  setPod(pod: PodInfo): boolean {
    return this.#members.setPod(pod);
  }

  /** @returns whether the engine knew the pod */
  deletePod(key: string): boolean {
    return this.#members.deletePod(key);
  }

  // --- nodes

  setNode(node: NodeInfo): boolean {
    const before = this.#nodes.get(node.name);
    if (before !== undefined && sameNodeInfo(before, node)) return false;
    this.#nodes.set(node.name, node);
    if (before === undefined || !sameLabels(before.labels, node.labels))
      this.#members.setNode(node.name, node.labels);
    if (
      before === undefined ||
      before.addresses[4] !== node.addresses[4] ||
      before.addresses[6] !== node.addresses[6]
    ) {
      this.#dirtyNodeAddresses.add(node.name);
      this.#dirtyCIDRs = true;
    }
    if (before !== undefined && !sameItems(before.podCIDRs, node.podCIDRs)) this.#dirtyCIDRs = true;
    this.#dirtyNodes.add(node.name);
    return true;
  }

  deleteNode(name: string): boolean {
    if (!this.#nodes.delete(name)) return false;
    this.#members.setNode(name, undefined);
    this.#dirtyNodes.add(name);
    this.#dirtyCIDRs = true;
    return true;
  }

  /** The nodes whose agent is alive (their Lease was observed renewing). */
  setHealthy(healthy: ReadonlySet<string>): boolean {
    let changed = false;
    for (const name of this.#healthy) {
      if (healthy.has(name)) continue;
      this.#dirtyNodes.add(name);
      changed = true;
    }
    for (const name of healthy) {
      if (this.#healthy.has(name)) continue;
      this.#dirtyNodes.add(name);
      changed = true;
    }
    if (changed) this.#healthy = new Set(healthy);
    return changed;
  }

  setNodeHealthy(name: string, healthy: boolean): boolean {
    if (this.#healthy.has(name) === healthy) return false;
    this.#healthy = new Set(this.#healthy);
    if (healthy) this.#healthy.add(name);
    else this.#healthy.delete(name);
    this.#dirtyNodes.add(name);
    return true;
  }

  /** What a node's agent reports (EgressNode status); undefined when there is none. */
  setReport(name: string, report: NodeReport | undefined): boolean {
    if (sameReport(this.#reports.get(name), report)) return false;
    if (report === undefined) this.#reports.delete(name);
    else this.#reports.set(name, report);
    this.#dirtyNodes.add(name);
    this.#dirtyNodeReports.add(name);
    return true;
  }

  /** Service CIDRs and EgressClusterInfo's extra CIDRs: destinations never steered. */
  setClusterCIDRs(cidrs: {
    readonly serviceCIDRs: readonly string[];
    readonly extraCIDRs: readonly string[];
  }): boolean {
    const { serviceCIDRs, extraCIDRs } = cidrs;
    if (sameItems(serviceCIDRs, this.#serviceCIDRs) && sameItems(extraCIDRs, this.#extraCIDRs))
      return false;
    this.#serviceCIDRs = serviceCIDRs;
    this.#extraCIDRs = extraCIDRs;
    this.#dirtyCIDRs = true;
    return true;
  }

  // --- namespaces, gateways, policies

  /** A namespace's labels (cluster policies' namespace selectors, gateways' namespace guards). */
  setNamespace(namespace: NamespaceInfo): boolean {
    const { name, labels } = namespace;
    const before = this.#namespaces.get(name);
    this.#namespaces.set(name, labels);
    if (sameLabels(before, labels)) return false;
    this.#namespaceChanged(name, labels);
    return true;
  }

  deleteNamespace(name: string): boolean {
    const before = this.#namespaces.get(name);
    if (!this.#namespaces.delete(name)) return false;
    if (sameLabels(before, undefined)) return false;
    this.#namespaceChanged(name, undefined);
    return true;
  }

  #namespaceChanged(name: string, labels: Labels | undefined): void {
    this.#members.setNamespace(name, labels);
    // The namespace guards of gateways: re-admission is cheap and a no-op when nothing flips.
    for (const key of this.#policiesByNamespace.get(name) ?? NO_KEYS) this.#dirtyPolicies.add(key);
  }

  setGateway(gateway: EgressGateway): boolean {
    const name = gateway.metadata.name ?? "";
    const before = this.#gateways.get(name);
    if (before !== undefined && sameGateway(before.object, gateway)) return false;
    this.#gateways.set(name, compileGateway(gateway));
    this.#gatewayChanged(name);
    // A gateway deleted and made again between two computations is new here too: its policies
    // may still be placed by the old one's name.
    if (
      before === undefined ||
      before.object.spec.interface !== gateway.spec.interface ||
      !sameValue(before.nodeSelector, gateway.spec.nodeSelector)
    )
      this.#dirtyGatewayViews.add(name);
    return true;
  }

  deleteGateway(name: string): boolean {
    if (!this.#gateways.delete(name)) return false;
    this.#gatewayChanged(name);
    this.#dirtyGatewayViews.add(name);
    return true;
  }

  #gatewayChanged(name: string): void {
    this.#dirtyGatewaySpecs.add(name);
    this.#dirtyGateways.add(name);
    for (const key of this.#policiesByGateway.get(name) ?? NO_KEYS) this.#dirtyPolicies.add(key);
  }

  /**
   * A policy added or changed. An update of what the engine does not read (its status, which
   * the controller writes, or its resourceVersion) costs nothing.
   * @returns whether anything the engine reads changed
   */
  setPolicy(policy: AnyPolicy): boolean {
    const key = policyKey(policy);
    const before = this.#policies.get(key);
    if (before !== undefined && samePolicy(before.object, policy)) return false;
    const setName = before?.setName ?? policySetName("src", 4, key);
    // The engine checks the promise that set names never collide.
    const owner = this.#setNames.get(setName);
    if (owner !== undefined && owner !== key)
      throw new Error(`ipset name collision between ${owner} and ${key}`);
    this.#setNames.set(setName, key);
    if (before !== undefined) this.#unindexPolicy(key, before);
    const input: PolicyInput = {
      object: policy,
      parsed: parsePolicy(policy, key),
      gateway: policy.spec.gateway,
      namespace: policy.kind === "EgressPolicy" ? (policy.metadata.namespace ?? "") : undefined,
      setName,
    };
    this.#policies.set(key, input);
    getOrInsert(this.#policiesByGateway, input.gateway, () => new Set()).add(key);
    if (input.namespace !== undefined)
      getOrInsert(this.#policiesByNamespace, input.namespace, () => new Set()).add(key);
    this.#dirtyPolicies.add(key);
    return true;
  }

  /** @returns whether the engine knew the policy */
  deletePolicy(key: string): boolean {
    const before = this.#policies.get(key);
    if (before === undefined) return false;
    this.#policies.delete(key);
    this.#setNames.delete(before.setName);
    this.#unindexPolicy(key, before);
    this.#dirtyPolicies.add(key);
    return true;
  }

  #unindexPolicy(key: string, input: PolicyInput): void {
    deleteFrom(this.#policiesByGateway, input.gateway, key);
    if (input.namespace !== undefined) deleteFrom(this.#policiesByNamespace, input.namespace, key);
  }

  // --- computing

  compute(): ClusterOutcome {
    if (this.#dirtyNodes.size > 0 && !this.#reset) {
      const families = clusterFamilies(this.#nodes.values());
      // Families change every policy's reach and wanted addresses: recompute everything.
      if (!sameFamilies(families, this.#families)) this.#reset = true;
    }
    if (this.#reset) this.#rebuild();
    this.#updateNodes();
    for (const name of this.#dirtyGatewaySpecs) {
      const gw = this.#gateways.get(name);
      this.#placement.setGateway(
        name,
        gw === undefined ? undefined : { nodeSelector: gw.nodeSelector, failback: gw.failback },
      );
    }
    this.#dirtyGatewaySpecs.clear();
    this.#admit();
    for (const key of this.#allocator.run((k) => this.#previous(k)?.egressIPs)) {
      this.#toActivate.add(key);
      this.#dirtyOutcomes.add(key);
    }
    for (const key of this.#toActivate) this.#activate(key);
    this.#toActivate.clear();
    for (const key of this.#classes.assign(this.#classRequests)) this.#dirtyOutcomes.add(key);
    this.#classRequests.length = 0;
    for (const key of this.#placement.place((k) => this.#previous(k)?.gatewayNode))
      this.#dirtyOutcomes.add(key);
    for (const key of this.#placement.standbyChanged()) this.#standbyOutcomes.add(key);
    for (const name of this.#dirtyGatewayViews)
      for (const key of this.#placement.placedBy(name)) this.#dirtyOutcomes.add(key);
    this.#dirtyGatewayViews.clear();
    for (const key of this.#members.takeDirty()) this.#dirtyOutcomes.add(key);
    for (const name of this.#placement.takeChangedGateways()) this.#dirtyGateways.add(name);
    this.#updatePolicyOutcomes();
    this.#updateGatewayOutcomes();

    const last = this.#outcome;
    if (
      last !== undefined &&
      last.families === this.#families &&
      last.identities === this.#identityMap &&
      last.identityErrors === this.#errorMap &&
      last.peers === this.#peerMap &&
      last.policies === this.#policyMap &&
      last.gateways === this.#gatewayMap &&
      last.ignoreCIDRs === this.#ignoreCIDRs
    )
      return last;
    const outcome: ClusterOutcome = {
      families: this.#families,
      identities: this.#identityMap,
      identityErrors: this.#errorMap,
      peers: this.#peerMap,
      policies: this.#policyMap,
      gateways: this.#gatewayMap,
      ignoreCIDRs: this.#ignoreCIDRs,
    };
    this.#outcome = outcome;
    // From now on "previous" is this engine's own last result.
    this.#seed = { nodes: NO_NODES, policies: NO_POLICIES };
    return outcome;
  }

  /** What a policy had in the last result (or, before the first, what a new leader read back). */
  #previous(key: string): PreviousPolicy | undefined {
    return this.#outcome === undefined ? this.#seed.policies.get(key) : this.#policyMap.get(key);
  }

  /** Drops all derived state, for the first computation or when families or config change. */
  #rebuild(): void {
    const families = clusterFamilies(this.#nodes.values());
    if (!sameFamilies(families, this.#families)) this.#families = families;
    this.#identities = new NodeIdentities(this.#config.tunnelCIDRs, this.#families);
    this.#allocator = new AddressAllocator();
    this.#placement = new Placement();
    this.#classes = new TunnelClasses();
    this.#members.clearPolicies();
    this.#admitted.clear();
    for (const map of [this.#nodes, this.#identityMap, this.#errorMap, this.#peerMap])
      for (const name of map.keys()) this.#dirtyNodes.add(name);
    for (const name of this.#gateways.keys()) this.#dirtyGatewaySpecs.add(name);
    for (const map of [this.#gateways, this.#gatewayMap])
      for (const name of map.keys()) this.#dirtyGateways.add(name);
    for (const key of this.#policies.keys()) this.#dirtyPolicies.add(key);
    for (const key of this.#policyMap.keys()) this.#dirtyOutcomes.add(key);
    this.#dirtyCIDRs = true;
    this.#reset = false;
  }

  #updateNodes(): void {
    if (this.#dirtyNodes.size > 0) {
      const last = this.#outcome === undefined ? this.#seed.nodes : this.#identityMap;
      for (const name of this.#identities.update(this.#nodes, last ?? NO_NODES))
        this.#dirtyNodes.add(name);
      const identities = new Map<string, NodeIdentity | undefined>();
      const errors = new Map<string, string | undefined>();
      const peers = new Map<string, PeerView | undefined>();
      for (const name of this.#dirtyNodes) {
        const node = this.#nodes.get(name);
        const identity = node === undefined ? undefined : this.#identities.get(name);
        this.#placement.setNode(name, node?.labels);
        this.#placement.setInterfaces(name, interfacesOf(this.#reports.get(name)));
        this.#placement.setUsable(
          name,
          node !== undefined && this.#healthy.has(name) && identity !== undefined,
        );
        for (const gateway of this.#placement.gatewaysOf(name)) this.#dirtyGateways.add(gateway);
        if (this.#identityMap.get(name) !== identity) identities.set(name, identity);
        const error = node === undefined ? undefined : this.#identities.error(name);
        if (this.#errorMap.get(name) !== error) errors.set(name, error);
        const before = this.#peerMap.get(name);
        const peer =
          identity === undefined
            ? undefined
            : peerOf(name, identity, node, this.#reports.get(name));
        if (
          peer === undefined
            ? before !== undefined
            : before === undefined || !samePeer(before, peer)
        )
          peers.set(name, peer);
      }
      this.#identityMap = this.#identityMap.with(identities);
      this.#errorMap = this.#errorMap.with(errors);
      this.#peerMap = this.#peerMap.with(peers);
      this.#dirtyNodes.clear();
    }
    // The source address of nodeIP and interface policies is the gateway node's.
    this.#nodeFactsChanged(this.#dirtyNodeAddresses, "nodeIP");
    this.#nodeFactsChanged(this.#dirtyNodeReports, "interface");
    if (this.#dirtyCIDRs) {
      const cidrs = ignoreCidrs(
        this.#nodes.values(),
        [...this.#serviceCIDRs, ...this.#extraCIDRs],
        this.#config,
        this.#families,
      );
      if (!sameItems(cidrs, this.#ignoreCIDRs)) this.#ignoreCIDRs = cidrs;
      this.#dirtyCIDRs = false;
    }
  }

  #nodeFactsChanged(nodes: Set<string>, mode: Mode): void {
    for (const name of nodes) {
      for (const key of this.#placement.placedOn(name)) {
        const p = this.#admitted.get(key);
        if (isPrepared(p) && p.mode === mode) this.#dirtyOutcomes.add(key);
      }
    }
    nodes.clear();
  }

  /** Re-admits the policies whose policy, gateway or namespace changed. */
  #admit(): void {
    for (const key of this.#dirtyPolicies) {
      const input = this.#policies.get(key);
      const gateway = input === undefined ? undefined : this.#gateways.get(input.gateway);
      const admitted =
        input === undefined
          ? undefined
          : admitPolicy(
              input.parsed,
              gateway,
              input.namespace === undefined ? undefined : this.#namespaces.get(input.namespace),
              this.#families,
              this.#admitted.get(key),
            );
      // A re-admission that changes nothing returns the same object: its outcome stays.
      if (admitted !== this.#admitted.get(key)) this.#dirtyOutcomes.add(key);
      if (admitted === undefined) this.#admitted.delete(key);
      else this.#admitted.set(key, admitted);
      this.#allocator.set(key, requestOf(admitted, gateway));
      this.#toActivate.add(key);
    }
    this.#dirtyPolicies.clear();
  }

  /**
   * Hands an accepted policy to membership and placement, or takes a rejected one back; both
   * report what that changes (takeDirty(), place()).
   */
  #activate(key: string): void {
    const admitted = this.#admitted.get(key);
    const p = isPrepared(admitted) ? admitted : undefined;
    const allocation = p !== undefined && needsAddresses(p) ? this.#allocator.get(key) : undefined;
    const active = p !== undefined && (allocation === undefined || allocation.ok) ? p : undefined;
    // Policies with the same egress IPs share a tunnel class (tunnel_classes.ts).
    const egressIPs = allocation?.ok ? allocation.addresses : undefined;
    const share = active === undefined ? undefined : shareOf(key, egressIPs);
    if (this.#classes.share(key) !== share && this.#classes.release(key))
      this.#dirtyOutcomes.add(key);
    if (active !== undefined && this.#classes.get(key) === undefined)
      this.#classRequests.push(classRequest(key, egressIPs, active.createdAt, this.#previous(key)));
    this.#members.setPolicy(key, active);
    this.#placement.setMember(
      key,
      active === undefined
        ? undefined
        : {
            key,
            createdAt: active.createdAt,
            gateway: active.gateway,
            iface: active.mode === "interface" ? active.policy.spec.interface : undefined,
            addresses: allocation?.ok ? allocation.addresses : [],
            shared: active.mode === "explicit",
          },
    );
  }

  #updatePolicyOutcomes(): void {
    const changes = new Map<string, PolicyOutcome | undefined>();
    for (const key of this.#dirtyOutcomes) {
      const before = this.#policyMap.get(key);
      const after = this.#outcomeOf(key);
      if (
        after === undefined
          ? before === undefined
          : before !== undefined && samePolicyOutcome(before, after)
      )
        continue;
      changes.set(key, after);
      if (gatewaySeesChange(before, after)) {
        if (before?.accepted) {
          this.#tally(before.gateway).count(before, -1);
          this.#dirtyGateways.add(before.gateway);
        }
        if (after?.accepted) {
          this.#tally(after.gateway).count(after, 1);
          this.#dirtyGateways.add(after.gateway);
        }
      }
    }
    for (const key of this.#standbyOutcomes) {
      if (this.#dirtyOutcomes.has(key)) continue;
      const before = this.#policyMap.get(key);
      const standby = this.#placement.standbyOf(key);
      if (before === undefined || !before.accepted || sameItems(before.standbyNodes, standby))
        continue;
      changes.set(key, withStandby(before, standby));
    }
    this.#dirtyOutcomes.clear();
    this.#standbyOutcomes.clear();
    this.#policyMap = this.#policyMap.with(changes);
  }

  #outcomeOf(key: string): PolicyOutcome | undefined {
    const input = this.#policies.get(key);
    if (input === undefined) return undefined;
    const admitted = this.#admitted.get(key)!;
    if (!isPrepared(admitted)) return rejectedOutcome(input.object, key, admitted);
    const allocation = needsAddresses(admitted) ? this.#allocator.get(key)! : undefined;
    if (allocation !== undefined && !allocation.ok) {
      return rejectedOutcome(
        input.object,
        key,
        cond("Accepted", "False", allocation.reason, allocation.message),
      );
    }
    const node = this.#placement.nodeOf(key);
    return acceptedOutcome({
      policy: admitted,
      addresses: allocation?.addresses ?? [],
      short: allocation?.short,
      gateway: this.#gateways.get(this.#placement.gatewayOf(key)!)!.object,
      node,
      standbyNodes: this.#placement.standbyOf(key),
      tunnelClass: this.#classes.get(key),
      nodeAddresses: node === undefined ? undefined : this.#nodes.get(node)?.addresses,
      interfaceAddresses:
        node === undefined || admitted.mode !== "interface"
          ? undefined
          : this.#reports.get(node)?.interfaces.get(admitted.policy.spec.interface ?? ""),
      endpoints: this.#members.endpoints(key),
      endpointNodes: this.#members.endpointNodes(key),
      shadows: this.#members.shadows(key),
    });
  }

  #tally(gateway: string): GatewayTally {
    return getOrInsert(this.#tallies, gateway, () => new GatewayTally());
  }

  #updateGatewayOutcomes(): void {
    const changes = new Map<string, GatewayOutcome | undefined>();
    for (const name of this.#dirtyGateways) {
      const gw = this.#gateways.get(name);
      const before = this.#gatewayMap.get(name);
      if (gw === undefined) {
        if (before !== undefined) changes.set(name, undefined);
        continue;
      }
      const after = this.#tally(name).outcome(
        gw.object,
        gw.pool,
        this.#placement.gatewayNodes(name),
        this.#healthy,
      );
      if (before === undefined || !sameGatewayOutcome(before, after)) changes.set(name, after);
    }
    this.#dirtyGateways.clear();
    this.#gatewayMap = this.#gatewayMap.with(changes);
  }
}

function sameFamilies(a: readonly Family[], b: readonly Family[]): boolean {
  return a.length === b.length && a.every((f, i) => f === b[i]);
}

function needsAddresses(p: PreparedPolicy): boolean {
  return p.mode === "explicit" || p.mode === "pool";
}

function requestOf(
  admitted: PreparedPolicy | EngineCondition | undefined,
  gateway: GatewayInfo | undefined,
): AddressRequest | undefined {
  if (!isPrepared(admitted) || !needsAddresses(admitted) || gateway === undefined) return undefined;
  return {
    key: admitted.key,
    createdAt: admitted.createdAt,
    gateway: gateway.name,
    pool: gateway.pool,
    explicit: admitted.mode === "explicit" ? admitted.explicit : undefined,
    families: admitted.families,
    count: admitted.egressIPCount,
  };
}

function interfacesOf(report: NodeReport | undefined): ReadonlySet<string> {
  const out = new Set<string>();
  for (const [name, addresses] of report?.interfaces ?? []) if (addresses.length > 0) out.add(name);
  return out;
}

function deleteFrom<K, V>(map: Map<K, Set<V>>, key: K, value: V): void {
  const set = map.get(key);
  if (set === undefined) return;
  set.delete(value);
  if (set.size === 0) map.delete(key);
}

/** The whole computation from scratch. */
export function computeCluster(snapshot: Snapshot): ClusterOutcome {
  return new ClusterEngine(snapshot).compute();
}
