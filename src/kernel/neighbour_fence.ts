/**
 * The kernel side of the liveness fence (src/agent/liveness.ts): a node speaks for an egress IP
 * only while its agent keeps saying, every probe interval, that it holds it.
 *
 * Egress-IP addresses are leased in the kernel too (`valid_lft`), but in whole seconds, longer
 * than a sub-second takeover; an agent that is frozen or dead must fall silent before a standby
 * starts to answer. So nftables sets whose elements time out (in ms) gate it:
 *
 *   `heldif`  the egress-IP devices (`spe-*`) it holds: nothing enters any other egress-IP device,
 *             so nothing makes it answer (no ARP or NDP answer, no MLD report to a query, no RST
 *             or ICMP from its address), and it sends no MLD message (the kernel sends one when
 *             a lapsed address leaves its multicast group, with the egress IP's MAC, which would
 *             move the segment's forwarding table to a frozen holder). What else such a device
 *             sends unasked comes from the agent's own syncs (announcements when a device goes
 *             up): not gated, the new holder's announcement must never wait for its fence;
 *   `held4`   the IPv4 egress IPs it holds, and `eips4` every one it ever held here: an ARP request
 *             for one that is no longer held is dropped on whatever interface it arrives (the
 *             uplink answers ARP for any local address otherwise).
 *
 * The agent renews the elements for as long as its support lasts every interval, through one
 * `nft -i` process kept open (a line per transaction): spawning `nft` 20 times a second would
 * cost a core's tenth per node. The tables are separate from the datapath's so that its full
 * syncs never touch them; `sallyport cleanup` removes them.
 *
 * Renewing an element that exists needs care: `add element` of one that is there changes
 * nothing, its timeout included, so an element renewed that way lapses at its first deadline and
 * stays away until the next renewal (checked with nft on this kernel; so every ~225 ms a holder
 * dropped what arrived for its egress IPs for up to an interval). Kernels that update an
 * element's expiry when told so (`timeout T expires T`; this machine's 6.18 does, older ones
 * may not) get that; on the others the element is added, deleted and added again with its
 * timeout in one transaction, so that no packet ever sees it missing. Which one is found out
 * when the fence is installed.
 */
import { type ChildProcess, spawn } from "node:child_process";
import type { Logger } from "../lib/log.ts";
import type { HeldEgressIP } from "./datapath.ts";
import { mustRun, type Runner } from "./runner.ts";

export const FENCE_TABLE = "sallyport-fence";

/**
 * Creates the tables, sets and chains if missing and rewrites the two rules; the elements of a
 * set that exists stay (a restarted agent's node keeps answering what the last one held, until
 * those elements lapse).
 */
export const FENCE_RULESET = `add table arp ${FENCE_TABLE}
add set arp ${FENCE_TABLE} heldif { type ifname; flags timeout; }
add set arp ${FENCE_TABLE} held4 { type ipv4_addr; flags timeout; }
add set arp ${FENCE_TABLE} eips4 { type ipv4_addr; }
add chain arp ${FENCE_TABLE} input { type filter hook input priority 0; policy accept; }
flush chain arp ${FENCE_TABLE} input
add rule arp ${FENCE_TABLE} input iifname "spe-*" iifname != @heldif counter drop
add rule arp ${FENCE_TABLE} input arp operation request arp daddr ip @eips4 arp daddr ip != @held4 counter drop
add table inet ${FENCE_TABLE}
add set inet ${FENCE_TABLE} heldif { type ifname; flags timeout; }
add chain inet ${FENCE_TABLE} input { type filter hook input priority -150; policy accept; }
flush chain inet ${FENCE_TABLE} input
add rule inet ${FENCE_TABLE} input iifname "spe-*" iifname != @heldif counter drop
add chain inet ${FENCE_TABLE} output { type filter hook output priority -150; policy accept; }
flush chain inet ${FENCE_TABLE} output
add rule inet ${FENCE_TABLE} output oifname "spe-*" oifname != @heldif icmpv6 type { mld-listener-report, mld-listener-done, mld2-listener-report } counter drop
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

/** An interface name no device of ours has (`spe-` and 15 characters at most). */
const PROBE_ELEMENT = '"spe-fenceprobe"';

/**
 * Whether this kernel moves an existing timeout element's expiry when it is added again with
 * `expires` (see above). Tried on the fence's own set with an element no device has.
 */
export async function updatesExpiry(runner: Runner): Promise<boolean> {
  const set = `inet ${FENCE_TABLE} heldif`;
  try {
    await mustRun(runner, ["nft", "-f", "-"], {
      stdin: `add element ${set} { ${PROBE_ELEMENT} timeout 1h }\n`,
    });
    await mustRun(runner, ["nft", "-f", "-"], {
      stdin: `add element ${set} { ${PROBE_ELEMENT} timeout 1m expires 1m }\n`,
    });
    const listed = JSON.parse(
      await mustRun(runner, ["nft", "-j", "list", "set", ...set.split(" ")]),
    ) as { nftables: { set?: { elem?: { elem?: { val?: string; timeout?: number } }[] } }[] };
    const probe = listed.nftables
      .flatMap((o) => o.set?.elem ?? [])
      .find((e) => `"${e.elem?.val}"` === PROBE_ELEMENT);
    return probe?.elem?.timeout === 60;
  } finally {
    await runner.run(["nft", "-f", "-"], {
      stdin: `delete element ${set} { ${PROBE_ELEMENT} }\n`,
    });
  }
}

export class NeighbourFence {
  readonly #runner: Runner;
  readonly #session: NftSession;
  readonly #log: Logger;
  #installed = false;
  #installing: Promise<void> | undefined;
  /** When what the last hold() renewed lapses (Date.now()); undefined once released. */
  #deadline: number | undefined;
  #lapseLoggedAt = Number.NEGATIVE_INFINITY;
  /** Renewals that came after the deadline while holding (said in the log). */
  #lapses = 0;
  /** How elements are renewed (see above); found out at install unless given. */
  #updatesExpiry: boolean | undefined;

  constructor(options: {
    runner: Runner;
    session: NftSession;
    log: Logger;
    /** Skip finding out whether the kernel updates an element's expiry (tests of both ways). */
    updatesExpiry?: boolean;
  }) {
    this.#runner = options.runner;
    this.#session = options.session;
    this.#log = options.log;
    this.#updatesExpiry = options.updatesExpiry;
  }

  /** Creates both tables if missing (see FENCE_RULESET); nothing new is answered until `hold()`. */
  install(): Promise<void> {
    this.#installing ??= (async () => {
      try {
        await mustRun(this.#runner, ["nft", "-f", "-"], {
          stdin: FENCE_RULESET,
        });
        if (this.#updatesExpiry === undefined) {
          this.#updatesExpiry = await updatesExpiry(this.#runner);
          this.#log.info(
            { updatesExpiry: this.#updatesExpiry },
            this.#updatesExpiry
              ? "neighbour fence: the kernel updates an element's expiry; renewing in place"
              : "neighbour fence: the kernel does not update an element's expiry; renewing by delete and add in one transaction",
          );
        }
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

  /** Speak for these egress IPs (and through their devices) for `timeoutMs` more. */
  hold(held: readonly HeldEgressIP[], timeoutMs: number): void {
    if (!this.#installed || held.length === 0) {
      // Nothing held: nothing can lapse until something is.
      this.#deadline = undefined;
      return;
    }
    const ms = Math.max(1, Math.round(timeoutMs));
    // Renewed after the last deadline while holding all along: the kernel stopped answering
    // meanwhile (this thread or its supporters' probes came late). Said, counted, not hidden.
    const now = Date.now();
    if (this.#deadline !== undefined && now > this.#deadline) {
      this.#lapses++;
      if (now - this.#lapseLoggedAt > 10_000) {
        this.#lapseLoggedAt = now;
        this.#log.warn(
          { lapsedMs: now - this.#deadline, lapses: this.#lapses },
          "neighbour fence lapsed while holding: renewed after its deadline",
        );
      }
    }
    this.#deadline = now + ms;
    const devices = [...new Set(held.map((h) => `"${h.device}"`))];
    this.#renew(`arp ${FENCE_TABLE} heldif`, devices, ms);
    this.#renew(`inet ${FENCE_TABLE} heldif`, devices, ms);
    const v4 = held.filter((h) => !h.address.includes(":")).map((h) => h.address);
    if (v4.length > 0) {
      this.#renew(`arp ${FENCE_TABLE} held4`, v4, ms);
      this.#session.write(`add element arp ${FENCE_TABLE} eips4 { ${v4.join(", ")} }`);
    }
  }

  /** One transaction that leaves `elements` in `set` with `ms` to live (see above). */
  #renew(set: string, elements: readonly string[], ms: number): void {
    const timed = (extra: string) => elements.map((e) => `${e} timeout ${ms}ms${extra}`).join(", ");
    const plain = elements.join(", ");
    this.#session.write(
      this.#updatesExpiry === true
        ? `add element ${set} { ${timed(` expires ${ms}ms`)} }`
        : `add element ${set} { ${plain} }; delete element ${set} { ${plain} }; add element ${set} { ${timed("")} }`,
    );
  }

  /** Stop answering for every egress IP now. */
  release(): void {
    this.#deadline = undefined;
    this.#session.write(`flush set arp ${FENCE_TABLE} heldif`);
    this.#session.write(`flush set arp ${FENCE_TABLE} held4`);
    this.#session.write(`flush set inet ${FENCE_TABLE} heldif`);
  }

  close(): void {
    this.#session.close();
  }
}

/** For `sallyport cleanup`: removes the fence's tables; returns how many there were. */
export async function removeNeighbourFence(runner: Runner): Promise<number> {
  const listed = await mustRun(runner, ["nft", "list", "tables"]);
  const ours = listed
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l === `table arp ${FENCE_TABLE}` || l === `table inet ${FENCE_TABLE}`);
  if (ours.length === 0) return 0;
  await mustRun(runner, ["nft", "-f", "-"], {
    stdin: ours.map((t) => `delete ${t}\n`).join(""),
  });
  return ours.length;
}
