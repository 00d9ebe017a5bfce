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
