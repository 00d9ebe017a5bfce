/** `sallyport agent`: wires the agent, the kernel and its metrics into a process. */

import { readFileSync } from "node:fs";
import { DEFAULT_NODE_CONFIG } from "../engine/view.ts";
import type { PortRange } from "../kernel/conntrack.ts";
import { detectFilter, openDatapath } from "../kernel/open.ts";
import { SpawnerRunner } from "../kernel/spawner.ts";
import { defaultKubeConfig, KubeClient } from "../kube/client.ts";
import type { LeaseTiming } from "../kube/node_lease.ts";
import { realClock } from "../lib/clock.ts";
import { serveMetrics } from "../lib/http.ts";
import type { Family } from "../lib/ip.ts";
import { createLogger } from "../lib/log.ts";
import { datapathMetrics, gaugeOf, Registry, trafficMetrics } from "../lib/metrics.ts";
import { Agent } from "./agent.ts";
import { CniServer } from "./cni_server.ts";
import type { LivenessTiming } from "./liveness.ts";
import { nftPolicyOf, syncedPlanOf, TrafficCollector } from "./traffic.ts";
import { WorkerTrafficReader } from "./traffic_worker.ts";

export interface AgentFlags {
  kubeconfig?: string;
  node: string;
  namespace: string;
  families: Family[];
  iptablesBackend: "auto" | "nft" | "legacy";
  datapath: "auto" | "iptables" | "nftables";
  rulePref: number;
  tunnelDevice: string;
  vni: number;
  vxlanPort: number;
  tableStart: number;
  tableCount: number;
  periodMs: number;
  minSyncIntervalMs: number;
  /** Of the full resync and the traffic reads each (SyncLoop's maxShare). */
  periodicMaxShare: number;
  setElementsPeriodMs: number;
  lease: LeaseTiming;
  liveness: LivenessTiming;
  probePort: number;
  /** File with the probes' key (a mounted Secret); undefined: unauthenticated. */
  probeKeyFile?: string | undefined;
  underlayDevice?: string;
  metricsPort: number;
  noSnatBySets: boolean;
  standbyDatapath: boolean;
  restartHoldMs: number;
  /** 0: no traffic figures (src/agent/traffic.ts). */
  trafficPeriodMs: number;
  snatPortRange: PortRange;
  /** Source ports the SNAT rules name (TCP, UDP, SCTP); undefined: none, the kernel's choice. */
  snatPorts?: PortRange | undefined;
  topDestinations: number;
  /** Serve sallyport-cni on this Unix socket (src/agent/cni_server.ts); undefined: no socket. */
  cniSocket?: string | undefined;
}

/** The probes' key: the file's bytes (a mounted Secret), at least 16 of them. */
export function readProbeKey(file: string): Buffer {
  const key = readFileSync(file);
  if (key.length < 16)
    throw new Error(
      `--probe-key-file ${file}: the key has ${key.length} bytes; give at least 16 random bytes (the chart's Secret sallyport-probe-key has 32)`,
    );
  return key;
}

export async function runAgent(flags: AgentFlags): Promise<void> {
  const log = createLogger("agent").child({ node: flags.node });
  const client = new KubeClient(defaultKubeConfig(flags.kubeconfig));
  // Commands start from a small helper process: a fork of the agent itself would copy its
  // page tables (7–12 ms per command at 100,000 endpoints; see src/kernel/spawner.ts).
  if (flags.datapath === "auto") {
    const { detectBackend } = await import("../kernel/iptables.ts");
    const { ExecRunner } = await import("../kernel/runner.ts");
    const probe = new ExecRunner();
    const backend =
      flags.iptablesBackend === "auto" ? await detectBackend(probe) : flags.iptablesBackend;
    const choice = await detectFilter(probe, backend);
    log.info(
      { datapath: choice.filter, reason: choice.reason, hashNetNet: choice.hashNetNet },
      "datapath chosen",
    );
    flags = { ...flags, datapath: choice.filter };
  }
  const datapath = await openDatapath({
    datapath: flags.datapath,
    runner: new SpawnerRunner(),
    families: flags.families,
    backend: flags.iptablesBackend,
    rulePref: flags.rulePref,
    tunnelDevice: flags.tunnelDevice,
    // Egress IPs lapse when the fence would drop them, even if this process is dead or frozen.
    // (whole seconds: the neighbour fence below is the sub-second one).
    eipLeaseSeconds: 1,
    setElementsEveryMs: flags.setElementsPeriodMs,
  });
  log.info(
    { datapath: datapath.options.filter, iptables: datapath.options.iptables.backend },
    "packet filter",
  );
  const registry = new Registry();
  const agent = new Agent({
    client,
    node: flags.node,
    namespace: flags.namespace,
    datapath,
    config: {
      ...DEFAULT_NODE_CONFIG,
      families: flags.families,
      tunnelDevice: flags.tunnelDevice,
      vni: flags.vni,
      port: flags.vxlanPort,
      rulePref: flags.rulePref,
      tableRange: { start: flags.tableStart, count: flags.tableCount },
      noSnatBySets: flags.noSnatBySets,
      standbyDatapath: flags.standbyDatapath,
      datapath: datapath.options.filter ?? "iptables",
      snatPorts: flags.snatPorts,
    },
    clock: realClock,
    log,
    metrics: datapathMetrics(registry),
    periodMs: flags.periodMs,
    minSyncIntervalMs: flags.minSyncIntervalMs,
    periodicMaxShare: flags.periodicMaxShare,
    leaseTiming: flags.lease,
    liveness: flags.liveness,
    probePort: flags.probePort,
    probeKey: flags.probeKeyFile === undefined ? undefined : readProbeKey(flags.probeKeyFile),
    livenessThread: true,
    underlayDevice: flags.underlayDevice,
  });
  gaugeOf(
    registry,
    "sallyport_agent_fenced",
    "1 while this node may not answer for egress IPs: no majority of the liveness voters hears it, a gateway judged it down, or its node lease expired while others reach the API server",
    () => [[{}, agent.fenced ? 1 : 0]],
  );
  gaugeOf(
    registry,
    "sallyport_liveness_down_nodes",
    "gateway nodes this node judges down by its liveness probes",
    () => [[{}, agent.down.size]],
  );
  gaugeOf(
    registry,
    "sallyport_liveness_probes_rejected",
    "liveness probes dropped since the start: not authentic, malformed or replayed",
    () => [[{}, agent.probesRejected]],
  );
  gaugeOf(
    registry,
    "sallyport_node_lease_valid",
    "1 while a node lease renewal started within the lease duration succeeded",
    () => [[{}, agent.leaseValid ? 1 : 0]],
  );
  // --- traffic (src/agent/traffic.ts): counters and SNAT use, read in a worker thread
  let traffic: TrafficCollector | undefined;
  const trafficReads = trafficMetrics(registry, () => traffic);
  if (flags.trafficPeriodMs > 0) {
    const nftables = datapath.options.filter === "nftables";
    traffic = new TrafficCollector({
      reader: new WorkerTrafficReader({
        // nftables: the class maps' element counters, whose policies the synced plan names
        counters: nftables
          ? { kind: "nftables", families: flags.families }
          : {
              kind: "iptables",
              backend: datapath.options.iptables.backend,
              families: flags.families,
            },
        // The rules' own range when they name one (the nftables counters do not read it back).
        snatPortRange: flags.snatPorts ?? flags.snatPortRange,
        topDestinations: flags.topDestinations,
      }),
      clock: realClock,
      log,
      periodMs: flags.trafficPeriodMs,
      maxShare: flags.periodicMaxShare,
      // A policy with several egress IPs of the family: all of them (its steered traffic leaves
      // with any), as one label value.
      egressIPOf: (policy, family) => agent.state.view(policy)?.snat[family]?.join(","),
      ...(nftables ? { policyOf: nftPolicyOf(syncedPlanOf(datapath)) } : {}),
      onSaturation: (list) => agent.setSnatSaturation(list),
      metrics: trafficReads,
    });
  }
  // --- end traffic
  await serveMetrics({
    port: flags.metricsPort,
    registry,
    ready: () => agent.sync.lastReport !== undefined,
  });
  await agent.start();
  log.info("agent started");
  // After the caches are filled: an ADD is answered from a complete view of the policies.
  const cni =
    flags.cniSocket === undefined || flags.cniSocket === ""
      ? undefined
      : new CniServer({ socket: flags.cniSocket, agent, runner: datapath.options.runner, log });
  await cni?.start();
  // traffic: what the last agent reported stays until measured otherwise
  traffic?.adopt(agent.egressNodes.get(flags.node)?.status?.snatSaturation ?? []);
  traffic?.start();
  if (traffic === undefined) agent.setSnatSaturation([]);
  // The datapath stays as it is on exit: a restarted agent adopts it without a flush. SIGTERM is
  // a planned restart (a rolling update): ask the controller to hold this node meanwhile.
  const shutdown = async () => {
    traffic?.stop();
    await cni?.stop();
    await agent.stop({ restartHoldMs: flags.restartHoldMs });
    process.exit(0);
  };
  process.on("SIGTERM", () => void shutdown());
  process.on("SIGINT", () => void shutdown());
}
