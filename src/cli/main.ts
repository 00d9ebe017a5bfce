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

await program.parseAsync(process.argv);
