/**
 * The kernel side of the liveness fence (src/agent/liveness.ts): a node answers ARP and NDP for
 * an egress IP only while its agent keeps saying, every probe interval, that it holds it.
 *
 * Egress-IP addresses are leased in the kernel too (`valid_lft`), but in whole seconds, longer
 * than a sub-second takeover; an agent that is frozen or dead must stop answering before a
 * standby starts to. So the answers are gated by nftables sets whose elements time out (in ms):
 *
 *   table arp sallyport-fence:   ARP requests arriving on an egress-IP device (`spe-*`) for an
 *                                address not in `held4` are dropped;
 *   table inet sallyport-fence:  so are IPv6 neighbour solicitations for a target not in `held6`.
 *
 * The agent renews the elements with a timeout of D − interval every interval, through one `nft -i`
 * process kept open (a command per line, each its own transaction): spawning `nft` 20 times a
 * second would cost a core's tenth per node. The tables are separate from the datapath's so that
 * its full syncs never touch them; `sallyport cleanup` removes them.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { parseAddress } from "../lib/ip.ts";
import type { Logger } from "../lib/log.ts";
import { mustRun, type Runner } from "./runner.ts";

export const FENCE_TABLE = "sallyport-fence";

export const FENCE_RULESET = `table arp ${FENCE_TABLE} {
  set held4 { type ipv4_addr; flags timeout; }
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "spe-*" arp operation request arp daddr ip != @held4 counter drop
  }
}
table inet ${FENCE_TABLE} {
  set held6 { typeof @th,64,128; flags timeout; }
  chain input {
    type filter hook input priority -150; policy accept;
    iifname "spe-*" icmpv6 type nd-neighbor-solicit @th,64,128 != @held6 counter drop
  }
}
`;

/** A long-lived `nft -i`: one command per line. */
export interface NftSession {
  write(line: string): void;
  close(): void;
}

/** The `nft -i` of this host, argv as an array, never a shell; `onError` gets its complaints. */
export function nftSession(prefix: readonly string[], onError: (text: string) => void): NftSession {
  let child: ChildProcess | undefined;
  const open = () => {
    const argv = [...prefix, "nft", "-i"];
    const c = spawn(argv[0]!, argv.slice(1), { stdio: ["pipe", "ignore", "pipe"] });
    c.stderr?.on("data", (b: Buffer) => onError(b.toString("utf8")));
    c.on("error", (e) => onError(e.message));
    c.on("close", () => {
      if (child === c) child = undefined;
    });
    c.stdin?.on("error", () => {});
    child = c;
    return c;
  };
  return {
    write(line) {
      (child ?? open()).stdin?.write(`${line}\n`);
    },
    close() {
      child?.stdin?.end();
      child = undefined;
    },
  };
}

/** IPv6 address → the 128-bit integer `@th,64,128` compares with. */
function hex128(address: string): string {
  return `0x${parseAddress(address).value.toString(16).padStart(32, "0")}`;
}

export class NeighbourFence {
  readonly #runner: Runner;
  readonly #session: NftSession;
  readonly #log: Logger;
  #installed = false;
  #installing: Promise<void> | undefined;

  constructor(options: { runner: Runner; session: NftSession; log: Logger }) {
    this.#runner = options.runner;
    this.#session = options.session;
    this.#log = options.log;
  }

  /** (Re)creates both tables, empty: nothing is answered until `hold()`. */
  install(): Promise<void> {
    this.#installing ??= (async () => {
      try {
        await mustRun(this.#runner, ["nft", "-f", "-"], {
          stdin: `add table arp ${FENCE_TABLE}\ndelete table arp ${FENCE_TABLE}\nadd table inet ${FENCE_TABLE}\ndelete table inet ${FENCE_TABLE}\n${FENCE_RULESET}`,
        });
        this.#installed = true;
      } catch (e) {
        this.#log.warn({ err: (e as Error).message }, "cannot install the neighbour fence");
      } finally {
        this.#installing = undefined;
      }
    })();
    return this.#installing;
  }

  /** The session reported an error (a table deleted behind our back): install again. */
  repair(): void {
    this.#installed = false;
    void this.install();
  }

  /** Answer for these addresses for `timeoutMs` more. */
  hold(addresses: readonly string[], timeoutMs: number): void {
    if (!this.#installed) return;
    const ms = Math.max(1, Math.round(timeoutMs));
    const v4 = addresses.filter((a) => !a.includes(":")).map((a) => `${a} timeout ${ms}ms`);
    const v6 = addresses.filter((a) => a.includes(":")).map((a) => `${hex128(a)} timeout ${ms}ms`);
    if (v4.length > 0)
      this.#session.write(`add element arp ${FENCE_TABLE} held4 { ${v4.join(", ")} }`);
    if (v6.length > 0)
      this.#session.write(`add element inet ${FENCE_TABLE} held6 { ${v6.join(", ")} }`);
  }

  /** Stop answering for every egress IP now. */
  release(): void {
    this.#session.write(`flush set arp ${FENCE_TABLE} held4`);
    this.#session.write(`flush set inet ${FENCE_TABLE} held6`);
  }

  close(): void {
    this.#session.close();
  }
}

/** For `sallyport cleanup`: removes the fence's tables; says whether there were any. */
export async function removeNeighbourFence(runner: Runner): Promise<boolean> {
  const listed = await mustRun(runner, ["nft", "list", "tables"]);
  const ours = listed
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l === `table arp ${FENCE_TABLE}` || l === `table inet ${FENCE_TABLE}`);
  if (ours.length === 0) return false;
  await mustRun(runner, ["nft", "-f", "-"], {
    stdin: ours.map((t) => `delete ${t}\n`).join(""),
  });
  return true;
}
