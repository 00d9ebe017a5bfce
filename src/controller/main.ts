/** `sallyport controller`: wires the controller, its webhook and its metrics into a process. */
import { existsSync, readFileSync } from "node:fs";
import { hostname } from "node:os";
import { defaultKubeConfig, KubeClient } from "../kube/client.ts";
import type { LeaseTiming } from "../kube/node_lease.ts";
import { realClock } from "../lib/clock.ts";
import { serveMetrics } from "../lib/http.ts";
import type { Family } from "../lib/ip.ts";
import { createLogger } from "../lib/log.ts";
import { controllerMetrics, gaugeOf, Registry } from "../lib/metrics.ts";
import { Controller } from "./controller.ts";
import { serveWebhook } from "./webhook.ts";

export interface ControllerFlags {
  kubeconfig?: string;
  namespace: string;
  identity?: string;
  tunnelCidrs: string[];
  extraIgnoreCidrs: string[];
  lease: LeaseTiming;
  leader: { leaseDurationMs: number; renewDeadlineMs: number; retryPeriodMs: number };
  webhookPort?: number;
  webhookCert?: string;
  webhookKey?: string;
  metricsPort: number;
  bindAddress?: string;
}

export async function runController(flags: ControllerFlags): Promise<void> {
  const log = createLogger("controller");
  const client = new KubeClient(defaultKubeConfig(flags.kubeconfig));
  const tunnelCIDRs: Partial<Record<Family, string>> = {};
  for (const c of flags.tunnelCidrs) tunnelCIDRs[c.includes(":") ? 6 : 4] = c;
  const identity = flags.identity ?? process.env.POD_NAME ?? `${hostname()}-${process.pid}`;
  const registry = new Registry();
  const controller = new Controller({
    client,
    namespace: flags.namespace,
    identity,
    clock: realClock,
    log,
    cluster: { tunnelCIDRs, extraIgnoreCIDRs: flags.extraIgnoreCidrs },
    leaseTiming: flags.lease,
    leaderElection: flags.leader,
    // Losing the lease (e.g. the API server was unreachable past the renew deadline) stops
    // reconciling; the elector keeps trying and this replica resumes if it wins again. The
    // datapath does not depend on the controller, so traffic is unaffected meanwhile.
    onLostLeadership: () =>
      log.warn("lost leadership; stopped reconciling and rejoining the election"),
    metrics: controllerMetrics(registry),
  });
  stateMetrics(registry, controller);
  await serveMetrics({
    port: flags.metricsPort,
    ...(flags.bindAddress === undefined ? {} : { host: flags.bindAddress }),
    registry,
    ready: () => true,
  });
  const { webhookPort, webhookCert, webhookKey } = flags;
  if (webhookPort !== undefined && webhookCert !== undefined && webhookKey !== undefined) {
    // The certificate comes from a Secret that cert-manager (or the chart) fills, possibly after
    // this process started, and renews in place: serve as soon as it exists, and serve the
    // renewed one without a restart.
    let server: Awaited<ReturnType<typeof serveWebhook>> | undefined;
    let current: { cert: string; key: string } | undefined;
    let warned = false;
    const check = async () => {
      const missing = [webhookCert, webhookKey].filter((f) => !existsSync(f));
      if (missing.length > 0) {
        if (!warned)
          log.warn(
            { missing },
            "not serving the admission webhook until its certificate exists. The CRDs' own rules still apply at admission; what only the webhook checks (pool overlaps, egress IPs outside the pool) shows as conditions and Events",
          );
        warned = true;
        return;
      }
      try {
        const next = {
          cert: readFileSync(webhookCert, "utf8"),
          key: readFileSync(webhookKey, "utf8"),
        };
        if (next.cert === current?.cert && next.key === current?.key) return;
        if (server === undefined) {
          server = await serveWebhook({
            port: webhookPort,
            ...(flags.bindAddress === undefined ? {} : { host: flags.bindAddress }),
            ...next,
            gateways: () => controller.gateways.items(),
            log,
          });
          if (warned) log.info("webhook certificate found: serving the admission webhook");
        } else {
          server.setSecureContext(next);
          log.info("webhook certificate reloaded");
        }
        current = next;
      } catch (e) {
        log.warn({ err: (e as Error).message }, "cannot load the webhook certificate");
      }
    };
    await check();
    setInterval(() => void check(), 10_000).unref();
  }
  await controller.start();
  log.info({ identity, namespace: flags.namespace }, "controller started");
  const shutdown = async () => {
    log.info("shutting down: releasing leadership");
    await controller.stop();
    process.exit(0);
  };
  process.on("SIGTERM", () => void shutdown());
  process.on("SIGINT", () => void shutdown());
}

/** What the leader knows, read at each scrape (zero on a standby replica). */
function stateMetrics(registry: Registry, controller: Controller): void {
  gaugeOf(registry, "sallyport_controller_leader", "1 on the replica that leads", () => [
    [{}, controller.leading ? 1 : 0],
  ]);
  gaugeOf(
    registry,
    "sallyport_policies",
    "Policies by accepted and gateway_assigned",
    function* () {
      if (!controller.leading || controller.outcome === undefined) return;
      const counts = new Map<string, number>();
      for (const p of controller.outcome.policies.values()) {
        const k = `${p.accepted}/${p.gatewayNode !== undefined}`;
        counts.set(k, (counts.get(k) ?? 0) + 1);
      }
      for (const [k, n] of counts) {
        const [accepted = "", assigned = ""] = k.split("/");
        yield [{ accepted, gateway_assigned: assigned }, n];
      }
    },
    ["accepted", "gateway_assigned"],
  );
  gaugeOf(
    registry,
    "sallyport_gateway_nodes",
    "Nodes selected by each gateway, by readiness (node lease)",
    function* () {
      if (!controller.leading || controller.outcome === undefined) return;
      for (const g of controller.outcome.gateways.values()) {
        const ready = g.nodes.filter((n) => n.ready).length;
        yield [{ gateway: g.name, ready: "true" }, ready];
        yield [{ gateway: g.name, ready: "false" }, g.nodes.length - ready];
      }
    },
    ["gateway", "ready"],
  );
}
