/**
 * The controller and agents of the control-plane tests, as those tests run them: in this
 * process, on a test control plane (src/sandbox/controlplane.ts), IPv4, logs silent; agents on a
 * FakeKernel host (src/testing/fake_host.ts) with the nftables backend.
 */
import { Agent, type AgentOptions } from "../../src/agent/agent.ts";
import { Controller, type ControllerOptions } from "../../src/controller/controller.ts";
import { DEFAULT_NODE_CONFIG } from "../../src/engine/view.ts";
import { openDatapath } from "../../src/kernel/open.ts";
import type { Runner } from "../../src/kernel/runner.ts";
import { realClock } from "../../src/lib/clock.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { datapathMetrics, Registry } from "../../src/lib/metrics.ts";
import { type ControlPlane, SALLYPORT_NAMESPACE } from "../../src/sandbox/controlplane.ts";

/** The real controller with a short leader lease (3 s), started. */
export function startController(
  cp: ControlPlane,
  identity: string,
  options: Partial<ControllerOptions> = {},
): Controller {
  const controller = new Controller({
    client: cp.client("controller"),
    namespace: SALLYPORT_NAMESPACE,
    identity,
    clock: realClock,
    log: silentLogger,
    cluster: { tunnelCIDRs: { 4: "100.127.0.0/16" }, extraIgnoreCIDRs: [] },
    leaderElection: { leaseDurationMs: 3000, renewDeadlineMs: 2000, retryPeriodMs: 500 },
    ...options,
  });
  void controller.start();
  return controller;
}

/** The real agent of `node` on `host` (a FakeKernel), not started yet. */
export async function fakeHostAgent(
  cp: ControlPlane,
  node: string,
  host: Runner,
  options: Partial<AgentOptions> = {},
): Promise<Agent> {
  return new Agent({
    client: cp.client("agent"),
    node,
    namespace: SALLYPORT_NAMESPACE,
    datapath: await openDatapath({ runner: host, families: [4], backend: "nft" }),
    config: { ...DEFAULT_NODE_CONFIG, families: [4] },
    clock: realClock,
    log: silentLogger,
    metrics: datapathMetrics(new Registry()),
    ...options,
  });
}
