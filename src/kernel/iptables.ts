/**
 * iptables and ip6tables through `*-save` and `*-restore --noflush`.
 *
 * The backend (nft or legacy) is detected the way kubernetes-sigs/iptables-wrappers does it: the
 * kubelet leaves `KUBE-IPTABLES-HINT` / `KUBE-KUBELET-CANARY` chains in the backend it uses; look
 * in nft's mangle table, then in legacy's full dump; with no hint, whichever backend already has
 * rules wins (legacy on a tie of non-zero counts, as Calico's detector does); otherwise nft.
 * `-w 5 -W 100000` waits for the xtables lock that other writers hold.
 */
import type { Family } from "../lib/ip.ts";
import { mustRun, type Runner } from "./runner.ts";

export type Backend = "nft" | "legacy";

const HINT = /^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY) /m;

function bin(tool: "save" | "restore", family: Family, backend: Backend): string {
  return `${family === 4 ? "iptables" : "ip6tables"}-${backend}-${tool}`;
}

function ruleCount(save: string): number {
  return save.split("\n").filter((l) => l.startsWith("-A ")).length;
}

export async function detectBackend(runner: Runner): Promise<Backend> {
  const nftMangle = await runner.run([bin("save", 4, "nft"), "-t", "mangle"]);
  const nft6Mangle = await runner.run([bin("save", 6, "nft"), "-t", "mangle"]);
  if (HINT.test(nftMangle.stdout) || HINT.test(nft6Mangle.stdout)) return "nft";
  // Do not pass -t to legacy-save: that would load the legacy table modules.
  const legacy = await runner.run([bin("save", 4, "legacy")]);
  const legacy6 = await runner.run([bin("save", 6, "legacy")]);
  if (HINT.test(legacy.stdout) || HINT.test(legacy6.stdout)) return "legacy";
  const legacyRules = ruleCount(legacy.stdout) + ruleCount(legacy6.stdout);
  if (legacyRules === 0) return "nft";
  const nftAll = await runner.run([bin("save", 4, "nft")]);
  const nft6All = await runner.run([bin("save", 6, "nft")]);
  return legacyRules >= ruleCount(nftAll.stdout) + ruleCount(nft6All.stdout) ? "legacy" : "nft";
}

export class Iptables {
  readonly #runner: Runner;
  readonly backend: Backend;

  constructor(runner: Runner, backend: Backend) {
    this.#runner = runner;
    this.backend = backend;
  }

  /** The whole ruleset of one family, as iptables-save prints it. */
  save(family: Family): Promise<string> {
    return mustRun(this.#runner, [bin("save", family, this.backend)]);
  }

  /** Applies a payload atomically; rules and chains not named in it are left alone. */
  async restore(family: Family, payload: string): Promise<void> {
    if (payload === "") return;
    await mustRun(
      this.#runner,
      [bin("restore", family, this.backend), "--noflush", "-w", "5", "-W", "100000"],
      {
        stdin: payload,
      },
    );
  }
}
