/**
 * The commands that run Sallyport itself: the controller and the agent (its processes), the
 * node's datapath by hand, cleanup, and the sandbox.
 */
import { readFileSync } from "node:fs";
import { type Command, InvalidArgumentError, Option } from "commander";
import { DEFAULT_LIVENESS_TIMING } from "../agent/liveness.ts";
import { DEFAULT_LEASE_TIMING } from "../kube/node_lease.ts";
import type { Family } from "../lib/ip.ts";
import { PERIODIC_MAX_SHARE } from "../lib/sync_loop.ts";
import { int } from "./program.ts";
import { sandboxCommands } from "./sandbox.ts";

const list = (v: string) =>
  v
    .split(",")
    .map((x) => x.trim())
    .filter((x) => x !== "");

/** A share of the time: more than 0, at most 1. */
function share(value: string): number {
  const n = Number(value);
  if (!(n > 0 && n <= 1)) throw new InvalidArgumentError("Expected a number above 0, at most 1.");
  return n;
}

function families(value: string): Family[] {
  return value.split(",").map((f) => {
    if (f !== "4" && f !== "6") throw new InvalidArgumentError("Expected 4, 6 or 4,6.");
    return Number(f) as Family;
  });
}

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
    .addOption(
      new Option(
        "--datapath <filter>",
        "packet filter: nftables (one table, O(1) classification), iptables (+ ipset), or auto (what the node uses; see docs/operations.md)",
      )
        .choices(["auto", "iptables", "nftables"])
        .default("iptables"),
    )
    .option("--rule-pref <n>", "ip rule preference Sallyport owns", int, 5900)
    .option("--tunnel-device <name>", "name of the VXLAN device", "sallyport");

interface KernelFlags {
  families: Family[];
  iptablesBackend: "auto" | "nft" | "legacy";
  datapath: "auto" | "iptables" | "nftables";
  rulePref: number;
  tunnelDevice: string;
}

async function open(flags: KernelFlags, datapath = flags.datapath) {
  const { openDatapath } = await import("../kernel/open.ts");
  return openDatapath({
    families: flags.families,
    backend: flags.iptablesBackend,
    datapath,
    rulePref: flags.rulePref,
    tunnelDevice: flags.tunnelDevice,
  });
}

/** The processes (controller, agent), the node's datapath by hand, and the sandbox. */
export function processCommands(program: Command): void {
  kernelOptions(
    program
      .command("cleanup")
      .description(
        "remove every chain, hook, ipset, ip rule, route, tunnel and egress-IP device Sallyport created on this host, and nothing else",
      ),
  ).action(async (flags: KernelFlags) => {
    const datapath = await open(flags);
    const report = await datapath.cleanup("(cleanup)");
    // The liveness fence's tables (src/kernel/neighbour_fence.ts), outside the datapath's.
    const { removeNeighbourFence } = await import("../kernel/neighbour_fence.ts");
    // A host without nft has no fence to remove.
    const fence = await removeNeighbourFence(datapath.options.runner).catch(() => 0);
    console.log(
      JSON.stringify({
        removed: report.changes + fence,
        detail: { ...report.detail, ...(fence > 0 ? { fenceTables: fence } : {}) },
      }),
    );
  });

  const datapath = program.command("datapath").description("a node's datapath, by hand");
  kernelOptions(
    datapath
      .command("apply")
      .description("make this host's kernel hold a saved plan")
      .requiredOption("--plan <file>", "plan JSON"),
  ).action(async (flags: KernelFlags & { plan: string }) => {
    const { planFromJSON } = await import("../engine/plan.ts");
    const plan = planFromJSON(readFileSync(flags.plan, "utf8"));
    // A plan is made for one packet filter: it has an nftables part or it has iptables rules.
    const d = await open(flags, plan.nft === undefined ? "iptables" : "nftables");
    const report = await d.sync(plan);
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
        .option(
          "--kubeconfig <file>",
          "kubeconfig; default: in-cluster, $KUBECONFIG, ~/.kube/config",
        )
        .option("--namespace <ns>", "Sallyport's namespace", "sallyport-system")
        .option("--vni <n>", "VXLAN network identifier", int, 7799)
        .option("--vxlan-port <port>", "VXLAN UDP port", int, 7799)
        .option("--table-start <n>", "TABLE_NUM start s", int, 3000)
        .option("--table-count <n>", "TABLE_NUM count n", int, 100)
        .option("--period-ms <ms>", "full resync period (drift repair)", int, 10000)
        .option(
          "--min-sync-interval-ms <ms>",
          "while API changes keep coming, at most one datapath sync per this interval, each taking all that arrived meanwhile (the first 3 back to back go at once; CNI ADDs and failovers never wait); 0: a sync as soon as the last one ends",
          int,
          250,
        )
        .option(
          "--set-elements-period-ms <ms>",
          "nftables: how often a full resync also lists every set element (the others read the table's chains, rules and sets only: with nft 1.0.6 a listing of 100,000 elements takes ~1.4 s); 0: every resync",
          int,
          60000,
        )
        .option("--probe-port <port>", "UDP port for the liveness probes", int, 7800)
        .option(
          "--probe-interval-ms <ms>",
          "time between liveness probes",
          int,
          DEFAULT_LIVENESS_TIMING.intervalMs,
        )
        .option(
          "--probe-multiplier <n>",
          "probes missed before a node is not heard (detection time: interval × multiplier)",
          int,
          DEFAULT_LIVENESS_TIMING.multiplier,
        )
        .option(
          "--probe-hold-down-ms <ms>",
          "how long a gateway judged down must be heard again before it is live",
          int,
          DEFAULT_LIVENESS_TIMING.holdDownMs,
        )
        .option(
          "--probe-key-file <file>",
          "key the liveness probes are authenticated with (HMAC-SHA256; mount the Secret sallyport-probe-key); default: none, probes unauthenticated",
        )
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
        )
        .option(
          "--no-standby-datapath",
          "do not carry the sets and SNAT rules of the policies whose gateway this node belongs to before it holds their egress IPs (a takeover then programs every policy it takes: see docs/operations.md)",
        )
        .option(
          "--periodic-max-share <fraction>",
          "the largest share of the time the periodic full resync and the traffic reads may each take: after a longer one its period stretches, up to 6 times (a node with 10,000 policies read its nftables table in 0.5-2.4 s); 1: periods never stretch",
          share,
          PERIODIC_MAX_SHARE,
        )
        .option(
          "--traffic-period-ms <ms>",
          "how often a gateway reads its SNATed connections (ports in use per destination); 0: no traffic figures",
          int,
          10000,
        )
        .option(
          "--snat-port-range <first-last>",
          "source ports SNAT chooses from when its rule names none (the kernel's choice: 1024-65535)",
          "1024-65535",
        )
        .option(
          "--snat-ports <first-last>",
          "source ports the SNAT to egress IPs names for TCP, UDP and SCTP (default: none named, the kernel's choice); also the range the SNAT metrics assume",
        )
        .option(
          "--top-destinations <n>",
          "destinations named per egress IP in the SNAT metrics; the rest are one 'other' series",
          int,
          10,
        )
        .option(
          "--cni-socket <path>",
          "serve the chained CNI plugin sallyport-cni on this Unix socket (e.g. /run/sallyport/cni.sock); default: none",
        ),
    ),
  ).action(async (f) => {
    const { runAgent } = await import("../agent/main.ts");
    const { parsePortRange } = await import("../kernel/conntrack.ts");
    await runAgent({
      ...f,
      lease: timing(f),
      liveness: {
        intervalMs: f.probeIntervalMs,
        multiplier: f.probeMultiplier,
        holdDownMs: f.probeHoldDownMs,
      },
      noSnatBySets: f.exemptBySets === true,
      standbyDatapath: f.standbyDatapath !== false,
      snatPortRange: parsePortRange(f.snatPortRange),
      snatPorts: f.snatPorts === undefined ? undefined : parsePortRange(f.snatPorts),
    });
  });

  cniCommands(program);
  sandboxCommands(program);
}

/** `cni install|uninstall`: the agent DaemonSet's init container (src/cni/install.ts). */
function cniCommands(program: Command): void {
  const cni = program
    .command("cni")
    .description("install or remove the chained CNI plugin sallyport-cni on this node");
  const dirs = (c: Command) =>
    c
      .option("--bin-dir <dir>", "the host's CNI plugin directory, as mounted", "/host/opt/cni/bin")
      .option(
        "--conf-dir <dir>",
        "the host's CNI configuration directory, as mounted",
        "/host/etc/cni/net.d",
      );
  dirs(
    cni
      .command("install")
      .description(
        "copy node and the plugin to the host and append sallyport-cni to the configuration list the runtime uses",
      ),
  )
    .option(
      "--lib-dir <dir>",
      "where node and the plugin's bundle go, as mounted",
      "/host/opt/sallyport/cni",
    )
    .option("--host-lib-dir <dir>", "--lib-dir as the host sees it", "/opt/sallyport/cni")
    .option(
      "--bundle <file>",
      "the plugin's bundle (default: sallyport-cni.mjs beside this program)",
    )
    .option("--socket <path>", "the agent's socket, as the host sees it", "/run/sallyport/cni.sock")
    .option("--timeout-ms <ms>", "how long ADD waits for the agent", int, 10000)
    .option("--fail-open", "let pods start when the agent does not answer", false)
    .option("--wait-ms <ms>", "wait this long for the primary CNI's configuration", int, 300000)
    .option(
      "--watch-ms <ms>",
      "then keep checking the configuration list this often and put the entry back when a primary CNI rewrote it; 0: exit",
      int,
      0,
    )
    .option("--entry-only", "only the configuration list: node and the plugin are in place", false)
    .action(async (f) => {
      const { dirname, join } = await import("node:path");
      const { ensureEntry, installCni } = await import("../cni/install.ts");
      const deadline = Date.now() + f.waitMs;
      for (;;) {
        try {
          const options = {
            binDir: f.binDir,
            confDir: f.confDir,
            libDir: f.libDir,
            hostLibDir: f.hostLibDir,
            node: process.execPath,
            bundle: f.bundle ?? join(dirname(process.argv[1] ?? "."), "sallyport-cni.mjs"),
            socket: f.socket,
            timeoutMs: f.timeoutMs,
            failOpen: f.failOpen === true,
          };
          const r = f.entryOnly === true ? ensureEntry(options) : installCni(options);
          console.log(`sallyport-cni ${r.changed ? "installed in" : "already in"} ${r.confFile}`);
          if (f.watchMs === 0) return;
          for (;;) {
            await new Promise((r) => setTimeout(r, f.watchMs));
            try {
              const again = ensureEntry(options);
              if (again.changed)
                console.log(`sallyport-cni was missing: put back in ${again.confFile}`);
            } catch (e) {
              console.error((e as Error).message);
            }
          }
        } catch (e) {
          if (!/no CNI configuration/.test((e as Error).message) || Date.now() > deadline) throw e;
          await new Promise((r) => setTimeout(r, 2000));
        }
      }
    });
  dirs(
    cni.command("uninstall").description("take sallyport-cni out of every configuration list"),
  ).action(async (f) => {
    const { uninstallCni } = await import("../cni/install.ts");
    const changed = uninstallCni({ binDir: f.binDir, confDir: f.confDir });
    console.log(
      changed.length === 0
        ? "sallyport-cni was in no configuration list"
        : `sallyport-cni removed from ${changed.join(", ")}`,
    );
  });
}
