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
 * The agent renews the elements for as long as its support lasts. A renewal is one `nft -f -`
 * transaction, spawned when it is due: when what the kernel holds has less than half of the
 * asked time left, when it should end sooner, or when the held egress IPs changed (at most one
 * in flight; what is asked meanwhile replaces what waits, and its time to live is counted when it
 * is spawned). An earlier design kept one `nft -i` open and wrote it a line per renewal, ~40 a
 * second: nft 1.0.6 spends ~10 ms of CPU on each line it reads interactively (a spawned `nft -f`
 * of one line costs ~4 ms in all), so on a busy node its lines queued up and every renewal took
 * effect later than decided: a frozen holder kept answering ARP for ~300 ms after its support
 * ended, while the node that took over already answered (seen by test/e2e/revive_test.ts). The
 * tables are separate from the datapath's so that its full syncs never touch them; `sallyport
 * cleanup` removes them.
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

/** What the kernel is to be told next. */
type Renewal =
  | { readonly kind: "hold"; readonly held: readonly HeldEgressIP[]; readonly deadline: number }
  | { readonly kind: "release" };

export class NeighbourFence {
  readonly #runner: Runner;
  readonly #log: Logger;
  #installed = false;
  #installing: Promise<void> | undefined;
  /**
   * When what the kernel was last told (or is being told) lapses (Date.now()), and for which
   * egress IPs; undefined once released or when nothing is held.
   */
  #told: { readonly deadline: number; readonly key: string } | undefined;
  #pending: Renewal | undefined;
  #running: Promise<void> | undefined;
  #lapseLoggedAt = Number.NEGATIVE_INFINITY;
  /** Renewals that came after the deadline while holding (said in the log). */
  #lapses = 0;
  /** How elements are renewed (see above); found out at install unless given. */
  #updatesExpiry: boolean | undefined;
  #transactions = 0;

  constructor(options: {
    runner: Runner;
    log: Logger;
    /** Skip finding out whether the kernel updates an element's expiry (tests of both ways). */
    updatesExpiry?: boolean;
  }) {
    this.#runner = options.runner;
    this.#log = options.log;
    this.#updatesExpiry = options.updatesExpiry;
  }

  /** Transactions spawned so far (renewals and releases). */
  get transactions(): number {
    return this.#transactions;
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

  /** Speak for these egress IPs (and through their devices) for `timeoutMs` more. */
  hold(held: readonly HeldEgressIP[], timeoutMs: number): void {
    if (!this.#installed || held.length === 0) {
      // Nothing held: nothing can lapse until something is.
      this.#told = undefined;
      return;
    }
    const ms = Math.max(1, Math.round(timeoutMs));
    // Renewed after the last deadline while holding all along: the kernel stopped answering
    // meanwhile (this thread or its supporters' probes came late). Said, counted, not hidden.
    const now = Date.now();
    const told = this.#told;
    if (told !== undefined && now > told.deadline) {
      this.#lapses++;
      if (now - this.#lapseLoggedAt > 10_000) {
        this.#lapseLoggedAt = now;
        this.#log.warn(
          { lapsedMs: now - told.deadline, lapses: this.#lapses },
          "neighbour fence lapsed while holding: renewed after its deadline",
        );
      }
    }
    const deadline = now + ms;
    const key = held.map((h) => `${h.device} ${h.address}`).join(",");
    // Due: other egress IPs, an earlier end, or less than half of the time asked for left.
    if (
      told !== undefined &&
      told.key === key &&
      told.deadline <= deadline &&
      told.deadline - now >= ms / 2
    )
      return;
    this.#told = { deadline, key };
    this.#pending = { kind: "hold", held, deadline };
    this.#next();
  }

  /** Stop answering for every egress IP now. */
  release(): void {
    this.#told = undefined;
    this.#pending = { kind: "release" };
    this.#next();
  }

  /** Resolves once the kernel has been told everything asked so far (a hand-over's long fence). */
  async close(): Promise<void> {
    while (this.#running !== undefined) await this.#running;
  }

  /** One transaction at a time; the newest request replaces the one waiting. */
  #next(): void {
    if (this.#running !== undefined || this.#pending === undefined) return;
    const renewal = this.#pending;
    this.#pending = undefined;
    this.#running = this.#apply(renewal).finally(() => {
      this.#running = undefined;
      this.#next();
    });
  }

  async #apply(renewal: Renewal): Promise<void> {
    let payload: string;
    if (renewal.kind === "release")
      payload = `flush set arp ${FENCE_TABLE} heldif\nflush set arp ${FENCE_TABLE} held4\nflush set inet ${FENCE_TABLE} heldif\n`;
    else {
      // Counted now, not when asked: a renewal that waited must not reach past its deadline.
      const ms = Math.round(renewal.deadline - Date.now());
      if (ms < 1) return;
      const devices = [...new Set(renewal.held.map((h) => `"${h.device}"`))];
      const v4 = renewal.held.filter((h) => !h.address.includes(":")).map((h) => h.address);
      payload = [
        this.#renew(`arp ${FENCE_TABLE} heldif`, devices, ms),
        this.#renew(`inet ${FENCE_TABLE} heldif`, devices, ms),
        ...(v4.length === 0
          ? []
          : [
              this.#renew(`arp ${FENCE_TABLE} held4`, v4, ms),
              `add element arp ${FENCE_TABLE} eips4 { ${v4.join(", ")} }\n`,
            ]),
      ].join("");
    }
    this.#transactions++;
    // (A hung nft holds back the renewals after it: the fence lapses, the safe way.)
    const r = await this.#runner
      .run(["nft", "-f", "-"], { stdin: payload, timeoutMs: 5000 })
      .catch((e: Error) => ({ code: 1, stdout: "", stderr: e.message }));
    if (r.code !== 0) {
      // A table deleted behind our back: install again; the next renewal fills it.
      this.#log.warn(
        { err: r.stderr.trim().slice(0, 300) },
        "neighbour fence: nft refused a renewal; reinstalling",
      );
      this.#told = undefined;
      this.#installed = false;
      await this.install();
    }
  }

  /** The commands that leave `elements` in `set` with `ms` to live (see above). */
  #renew(set: string, elements: readonly string[], ms: number): string {
    const timed = (extra: string) => elements.map((e) => `${e} timeout ${ms}ms${extra}`).join(", ");
    const plain = elements.join(", ");
    return this.#updatesExpiry === true
      ? `add element ${set} { ${timed(` expires ${ms}ms`)} }\n`
      : `add element ${set} { ${plain} }\ndelete element ${set} { ${plain} }\nadd element ${set} { ${timed("")} }\n`;
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
