/**
 * Prometheus metrics (prom-client). One registry per process; components take it as an option
 * so that tests read the numbers they assert on.
 */
import { Counter, Gauge, Histogram, Registry } from "prom-client";

export function datapathMetrics(registry: Registry) {
  return {
    syncs: new Counter({
      name: "sallyport_datapath_syncs_total",
      help: "Datapath syncs by kind (full: re-read the kernel; partial: on events) and result (ok, error)",
      labelNames: ["kind", "result"],
      registers: [registry],
    }),
    eventLatency: new Histogram({
      name: "sallyport_datapath_event_to_kernel_seconds",
      help: "From the first event a sync covers to the kernel holding its result (planning included)",
      buckets: [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers: [registry],
    }),
    repairs: new Counter({
      name: "sallyport_datapath_drift_repairs_total",
      help: "Kernel objects found changed behind the agent's back and put back",
      registers: [registry],
    }),
    changes: new Counter({
      name: "sallyport_datapath_changes_total",
      help: "Kernel objects changed by syncs (desired changes and repairs)",
      registers: [registry],
    }),
    duration: new Histogram({
      name: "sallyport_datapath_sync_duration_seconds",
      help: "Duration of a datapath sync",
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers: [registry],
    }),
    lastSuccess: new Gauge({
      name: "sallyport_datapath_last_sync_timestamp_seconds",
      help: "When the datapath last matched the plan",
      registers: [registry],
    }),
  };
}

export type DatapathMetrics = ReturnType<typeof datapathMetrics>;

export function controllerMetrics(registry: Registry) {
  return {
    reconciles: new Counter({
      name: "sallyport_controller_reconciles_total",
      help: "Keys the leader processed, by result (ok, error: a write failed and the queue retries it)",
      labelNames: ["result"],
      registers: [registry],
    }),
    reconcileDuration: new Histogram({
      name: "sallyport_controller_reconcile_duration_seconds",
      help: "Duration of one engine computation (writes are counted per key)",
      buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: [registry],
    }),
    writes: new Counter({
      name: "sallyport_controller_writes_total",
      help: "Writes the leader sent to the API server (create, patch, delete), by kind of object",
      labelNames: ["kind"],
      registers: [registry],
    }),
    egressIPMoves: new Counter({
      name: "sallyport_egress_ip_moves_total",
      help: "Egress IPs moved to another gateway node, by reason (node_not_alive, rebalance)",
      labelNames: ["reason"],
      registers: [registry],
    }),
  };
}

export type ControllerMetrics = ReturnType<typeof controllerMetrics>;

// --- traffic (src/agent/traffic.ts): what the datapath carries, per policy and egress IP

/** What the traffic metrics read at each scrape (implemented by the agent's TrafficCollector). */
export interface TrafficMetricsSource {
  policyTraffic(): Promise<
    readonly {
      readonly policy: string;
      readonly egressIP: string;
      readonly kind: "steered" | "snat" | "dropped" | "connections";
      readonly packets: number;
      readonly bytes: number;
    }[]
  >;
  readonly snatEgress: readonly {
    readonly egressIP: string;
    readonly top: readonly SnatDestinationSample[];
    readonly other?: SnatDestinationSample;
  }[];
  readonly conntrackEntries: number;
}

interface SnatDestinationSample {
  readonly destination: string;
  readonly port: number;
  readonly protocol: string;
  readonly connections: number;
  readonly ports: number;
  readonly saturation: number;
}

/**
 * The traffic metrics. Per policy (counted on the node that does the work: steered on the pod's
 * node, SNAT on the gateway; sum over nodes per policy):
 *
 *   sallyport_policy_packets_total{policy,egress_ip,direction}   direction: steered, snat, dropped
 *   sallyport_policy_bytes_total{policy,egress_ip,direction}
 *   sallyport_policy_snat_connections_total{policy,egress_ip}    connections SNATed
 *
 * Per egress IP held by this node and destination (the `top` busiest destinations per egress IP
 * by name, the rest as destination="other": at most top + 1 series per egress IP):
 *
 *   sallyport_snat_connections{egress_ip,destination,port,protocol}
 *   sallyport_snat_ports_in_use{egress_ip,destination,port,protocol}
 *   sallyport_snat_port_saturation{egress_ip,destination,port,protocol}   0..1
 *
 * `source` is read lazily: the collector is built after its instruments.
 */
export function trafficMetrics(registry: Registry, source: () => TrafficMetricsSource | undefined) {
  const policyLabels = ["policy", "egress_ip", "direction"];
  const snatLabels = ["egress_ip", "destination", "port", "protocol"];
  const fromCounters = (
    pick: (t: Awaited<ReturnType<TrafficMetricsSource["policyTraffic"]>>[number]) => number,
    connections: boolean,
  ) =>
    async function (this: Counter) {
      this.reset();
      for (const t of (await source()?.policyTraffic()) ?? []) {
        if ((t.kind === "connections") !== connections) continue;
        this.inc(
          connections
            ? { policy: t.policy, egress_ip: t.egressIP }
            : { policy: t.policy, egress_ip: t.egressIP, direction: t.kind },
          pick(t),
        );
      }
    };
  new Counter({
    name: "sallyport_policy_packets_total",
    help: "Packets of a policy's traffic: steered (sent through the tunnel to the gateway, counted on the pod's node), snat (rewritten to the egress IP, counted on the gateway, where the datapath can count every packet), dropped (no reachable gateway: the policy fails closed)",
    labelNames: policyLabels,
    registers: [registry],
    collect: fromCounters((t) => t.packets, false),
  });
  new Counter({
    name: "sallyport_policy_bytes_total",
    help: "Bytes of a policy's traffic (IP headers included), by direction as sallyport_policy_packets_total",
    labelNames: policyLabels,
    registers: [registry],
    collect: fromCounters((t) => t.bytes, false),
  });
  new Counter({
    name: "sallyport_policy_snat_connections_total",
    help: "Connections of a policy SNATed to its egress IP on this gateway (the first packet of each)",
    labelNames: ["policy", "egress_ip"],
    registers: [registry],
    collect: fromCounters((t) => t.packets, true),
  });
  const perDestination = (name: string, help: string, pick: (d: SnatDestinationSample) => number) =>
    gaugeOf(
      registry,
      name,
      help,
      function* () {
        for (const e of source()?.snatEgress ?? [])
          for (const d of e.other === undefined ? e.top : [...e.top, e.other])
            yield [
              {
                egress_ip: e.egressIP,
                destination: d.destination,
                port: d.port === 0 ? "" : String(d.port),
                protocol: d.protocol,
              },
              pick(d),
            ];
      },
      snatLabels,
    );
  perDestination(
    "sallyport_snat_connections",
    'Tracked connections SNATed to an egress IP held by this node, per destination address, port and protocol (destination="other": the rest)',
    (d) => d.connections,
  );
  perDestination(
    "sallyport_snat_ports_in_use",
    "Distinct source ports an egress IP uses toward a destination address, port and protocol",
    (d) => d.ports,
  );
  perDestination(
    "sallyport_snat_port_saturation",
    "Fraction of the source ports SNAT can choose from (1024-65535 unless the rule names a range) in use toward a destination; other: the highest among the rest",
    (d) => d.saturation,
  );
  gaugeOf(
    registry,
    "sallyport_conntrack_snat_entries",
    "SNATed connections the last read of the connection tracking table listed (Sallyport's and other NAT of the node)",
    () => [[{}, source()?.conntrackEntries ?? 0]],
  );
  return {
    readDuration: new Histogram({
      name: "sallyport_traffic_read_duration_seconds",
      help: "Time to read the traffic figures from the kernel, by source (counters, conntrack), in the agent's reader thread",
      labelNames: ["source"],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers: [registry],
    }),
    readErrors: new Counter({
      name: "sallyport_traffic_read_errors_total",
      help: "Failed reads of the traffic figures, by source (counters, conntrack)",
      labelNames: ["source"],
      registers: [registry],
    }),
  };
}

export type TrafficMetrics = ReturnType<typeof trafficMetrics>;

/** A gauge read when scraped. */
export function gaugeOf(
  registry: Registry,
  name: string,
  help: string,
  read: () => Iterable<[Record<string, string>, number]>,
  labelNames: readonly string[] = [],
): Gauge {
  return new Gauge({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      for (const [labels, value] of read()) this.set(labels, value);
    },
  });
}

export { Registry };
