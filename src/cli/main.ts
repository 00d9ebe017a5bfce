#!/usr/bin/env node
/**
 * sallyport: one binary for every process.
 *
 *   sallyport controller …      the controller (Deployment)
 *   sallyport agent …           the node agent (DaemonSet)
 *   sallyport cleanup           remove every kernel object Sallyport created on this host
 *   sallyport datapath …        inspect or apply a node's datapath by hand
 *   sallyport sandbox …         a whole cluster in network namespaces
 */
import { readFileSync } from "node:fs";
import { Command, Option } from "commander";
import { planFromJSON } from "../engine/plan.ts";
import { openDatapath } from "../kernel/open.ts";
import { DEFAULT_LEASE_TIMING } from "../kube/node_lease.ts";
import { sandboxCommands } from "./sandbox.ts";

const int = (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0)
    throw new Error(`expected a non-negative integer: current value is "${v}"`);
  return n;
};
const list = (v: string) =>
  v
    .split(",")
    .map((x) => x.trim())
    .filter((x) => x !== "");

const leaseOptions = (cmd: Command) =>
  cmd
    .option(
      "--lease-renew-ms <ms>",
      "how often gateway agents renew their node lease",
      int,
      DEFAULT_LEASE_TIMING.renewMs,
    )
    .option(
      "--lease-duration-ms <ms>",
      "how long a node lease lasts",
      int,
      DEFAULT_LEASE_TIMING.durationMs,
    )
    .option(
      "--lease-grace-ms <ms>",
      "extra time before the controller declares a gateway dead",
      int,
      DEFAULT_LEASE_TIMING.graceMs,
    );

interface LeaseFlags {
  leaseRenewMs: number;
  leaseDurationMs: number;
  leaseGraceMs: number;
}
const timing = (f: LeaseFlags) => ({
  renewMs: f.leaseRenewMs,
  durationMs: f.leaseDurationMs,
  graceMs: f.leaseGraceMs,
});

import type { Family } from "../lib/ip.ts";

const program = new Command("sallyport")
  .description("Egress gateway for Kubernetes")
  .showHelpAfterError();

function families(value: string): Family[] {
  return value.split(",").map((f) => {
    if (f !== "4" && f !== "6")
      throw new Error(`--families takes 4, 6 or 4,6: current value is "${value}"`);
    return Number(f) as Family;
  });
}

const kernelOptions = (cmd: Command) =>
  cmd
    .addOption(
      new Option("--families <list>", "IP families").default([4, 6], "4,6").argParser(families),
    )
    .addOption(
      new Option("--iptables-backend <backend>", "iptables backend")
        .choices(["auto", "nft", "legacy"])
        .default("auto"),
    )
    .option("--rule-pref <n>", "ip rule preference Sallyport owns", (v) => Number(v), 5900)
    .option("--tunnel-device <name>", "name of the VXLAN device", "sallyport");

interface KernelFlags {
  families: Family[];
  iptablesBackend: "auto" | "nft" | "legacy";
  rulePref: number;
  tunnelDevice: string;
}

function open(flags: KernelFlags) {
  return openDatapath({
    families: flags.families,
    backend: flags.iptablesBackend,
    rulePref: flags.rulePref,
    tunnelDevice: flags.tunnelDevice,
  });
}

kernelOptions(
  program
    .command("cleanup")
    .description(
      "remove every chain, hook, ipset, ip rule, route, tunnel and egress-IP device Sallyport created on this host, and nothing else",
    ),
).action(async (flags: KernelFlags) => {
  const datapath = await open(flags);
  const report = await datapath.cleanup("(cleanup)");
  console.log(JSON.stringify({ removed: report.changes, detail: report.detail }));
});

const datapath = program.command("datapath").description("a node's datapath, by hand");
kernelOptions(
  datapath
    .command("apply")
    .description("make this host's kernel hold a saved plan")
    .requiredOption("--plan <file>", "plan JSON"),
).action(async (flags: KernelFlags & { plan: string }) => {
  const d = await open(flags);
  const report = await d.sync(planFromJSON(readFileSync(flags.plan, "utf8")));
  console.log(JSON.stringify(report));
});

leaseOptions(
  program
    .command("controller")
    .description("run the controller (Deployment): allocation, statuses, admission webhook")
    .option("--kubeconfig <file>", "kubeconfig; default: in-cluster, $KUBECONFIG, ~/.kube/config")
    .option("--namespace <ns>", "Sallyport's namespace", "sallyport-system")
    .option("--identity <name>", "leader election identity (default: $POD_NAME or host-pid)")
    .option("--tunnel-cidrs <list>", "tunnel address ranges, one per family", list, [
      "100.127.0.0/16",
      "fd5a:11::/112",
    ])
    .option("--extra-ignore-cidrs <list>", "more CIDRs never sent through a gateway", list, [])
    .option("--leader-lease-ms <ms>", "leader lease duration", int, 15000)
    .option(
      "--leader-renew-deadline-ms <ms>",
      "step down when not renewed for this long",
      int,
      10000,
    )
    .option("--leader-retry-ms <ms>", "leader election retry period", int, 2000)
    .option("--webhook-port <port>", "serve the admission webhook on this port", int)
    .option("--webhook-cert <file>", "webhook TLS certificate")
    .option("--webhook-key <file>", "webhook TLS key")
    .option("--metrics-port <port>", "metrics and health port", int, 9090)
    .option("--bind-address <address>", "address for the webhook and metrics servers"),
).action(async (f) => {
  const { runController } = await import("../controller/main.ts");
  await runController({
    ...f,
    lease: timing(f),
    leader: {
      leaseDurationMs: f.leaderLeaseMs,
      renewDeadlineMs: f.leaderRenewDeadlineMs,
      retryPeriodMs: f.leaderRetryMs,
    },
  });
});

leaseOptions(
  kernelOptions(
    program
      .command("agent")
      .description("run the node agent (DaemonSet): program this node's datapath and keep it so")
      .requiredOption("--node <name>", "this node's name (the Node object)")
      .option("--kubeconfig <file>", "kubeconfig; default: in-cluster, $KUBECONFIG, ~/.kube/config")
      .option("--namespace <ns>", "Sallyport's namespace", "sallyport-system")
      .option("--vni <n>", "VXLAN network identifier", int, 7799)
      .option("--vxlan-port <port>", "VXLAN UDP port", int, 7799)
      .option("--table-start <n>", "TABLE_NUM start s", int, 3000)
      .option("--table-count <n>", "TABLE_NUM count n", int, 100)
      .option("--period-ms <ms>", "full resync period (drift repair)", int, 10000)
      .option("--fence-port <port>", "UDP port for gateway heartbeats", int, 7800)
      .option(
        "--underlay-device <name>",
        "interface for node-to-node traffic (default: the one holding the node's address)",
      )
      .option("--metrics-port <port>", "metrics and health port", int, 9091)
      .option(
        "--restart-hold-ms <ms>",
        "on SIGTERM, ask the controller to keep this node's egress IPs this long",
        int,
        10000,
      )
      .option(
        "--exempt-by-sets",
        "also exempt steered traffic from SNAT by its ipsets, for CNIs that clear marks (such as Weave)",
        false,
      ),
  ),
).action(async (f) => {
  const { runAgent } = await import("../agent/main.ts");
  await runAgent({
    ...f,
    lease: timing(f),
    noSnatBySets: f.exemptBySets === true,
  });
});

program
  .command("explain")
  .description(
    "what happens to a packet from a pod to a destination: the policy that decides, the path, the egress IP the destination sees, and the rules on each node",
  )
  .argument("<pod>", "namespace/name (default namespace: default)")
  .argument("<destination>", "an IP address")
  .option("--port <port>", "destination port", (v) => Number(v))
  .addOption(
    new Option("--protocol <protocol>", "with --port")
      .choices(["tcp", "udp", "sctp"])
      .default("tcp"),
  )
  .option("--kubeconfig <file>", "kubeconfig; default: in-cluster, $KUBECONFIG, ~/.kube/config")
  .option("--json", "print the explanation as JSON")
  .action(
    async (
      pod: string,
      destination: string,
      f: {
        port?: number;
        protocol: "tcp" | "udp" | "sctp";
        kubeconfig?: string;
        json?: boolean;
      },
    ) => {
      const { explain, formatExplanation } = await import("./explain.ts");
      const { defaultKubeConfig, KubeClient } = await import("../kube/client.ts");
      const e = await explain(new KubeClient(defaultKubeConfig(f.kubeconfig)), {
        pod,
        destination,
        ...(f.port === undefined ? {} : { port: f.port, protocol: f.protocol }),
      });
      console.log(f.json === true ? JSON.stringify(e, null, 2) : formatExplanation(e));
    },
  );

sandboxCommands(program);

await program.parseAsync(process.argv);
