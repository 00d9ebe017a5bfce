/** Builds the kernel adapters for this host: detects the iptables backend once, up front. */
import type { Family } from "../lib/ip.ts";
import { Datapath } from "./datapath.ts";
import { type Backend, detectBackend, Iptables } from "./iptables.ts";
import { ExecRunner, type Runner } from "./runner.ts";

export interface OpenOptions {
  readonly runner?: Runner;
  readonly families?: readonly Family[];
  /** @default "auto" */
  readonly backend?: Backend | "auto";
  /** @default 5900 */
  readonly rulePref?: number;
  /** @default "sallyport" */
  readonly tunnelDevice?: string;
}

export async function openDatapath(options: OpenOptions = {}): Promise<Datapath> {
  const runner = options.runner ?? new ExecRunner();
  const backend =
    options.backend === undefined || options.backend === "auto"
      ? await detectBackend(runner)
      : options.backend;
  return new Datapath({
    runner,
    iptables: new Iptables(runner, backend),
    families: options.families ?? [4, 6],
    rulePref: options.rulePref ?? 5900,
    tunnelDevice: options.tunnelDevice ?? "sallyport",
  });
}
