/**
 * Watches, from the sandbox's external host, who answers for an egress IP: ARP requests
 * broadcast several times a second (every answer of every node, not only the first, is
 * printed by `arping -b`), and the segment bridge's forwarding table polled for the egress IP's
 * MAC (which node's port a frame from that MAC last came through: a node that sends anything
 * from it, an ARP or NDP answer, a multicast report, takes the external host's traffic for the
 * egress IP to itself).
 *
 * Answers are attributed by the answering node's uplink MAC: while a node holds an IPv4 address
 * its uplink answers ARP for it too (the kernel's default arp_ignore=0), while the egress IP's
 * own MAC is the same on every node by design.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { mustRun } from "../../src/kernel/runner.ts";
import { nsRunner } from "../../src/sandbox/topology.ts";

export interface Sighting {
  /** Date.now() when it was seen. */
  readonly t: number;
  /** The node (or "egress-mac" for the shared MAC, "unknown:<mac>" otherwise). */
  readonly who: string;
  readonly via: "arp" | "fdb";
  /** fdb: the MAC whose port this is. */
  readonly mac?: string;
}

export interface WatchOptions {
  readonly externalNs: string;
  readonly bridgeNs: string;
  /** The IPv4 egress IP to ask for (none: only the bridge is watched). */
  readonly address?: string;
  /** Uplink MAC (lower case) → node name. */
  readonly macs: Readonly<Record<string, string>>;
  /** The egress IPs' own MACs (lower case), looked up in the bridge's forwarding table. */
  readonly egressMacs?: readonly string[];
  /** Bridge port name → node name (e.g. vn2 → node-2). */
  readonly ports?: Readonly<Record<string, string>>;
  /** Parallel arping processes, staggered: each sends one request a second. @default 5 */
  readonly senders?: number;
}

export class AnswerWatch {
  readonly sightings: Sighting[] = [];
  readonly #o: WatchOptions;
  readonly #children: ChildProcess[] = [];
  #stopped = false;
  #poller: Promise<void> | undefined;

  constructor(options: WatchOptions) {
    this.#o = options;
  }

  async start(): Promise<void> {
    const senders = this.#o.address === undefined ? 0 : (this.#o.senders ?? 5);
    for (let i = 0; i < senders; i++) {
      if (i > 0) await new Promise((r) => setTimeout(r, 1000 / senders));
      const child = spawn(
        "ip",
        [
          "netns",
          "exec",
          this.#o.externalNs,
          "arping",
          "-b",
          "-I",
          "eth0",
          "-i",
          "1",
          "-w",
          "600",
          this.#o.address!,
        ],
        { stdio: ["ignore", "pipe", "ignore"] },
      );
      let buf = "";
      child.stdout!.on("data", (d: Buffer) => {
        buf += d.toString();
        let nl = buf.indexOf("\n");
        while (nl >= 0) {
          const mac = /reply from \S+ \[([0-9A-F:]+)\]/i.exec(buf.slice(0, nl))?.[1]?.toLowerCase();
          // Every process hears every answer: the first sender's copy is enough.
          if (mac !== undefined && i === 0) this.#saw(mac, "arp");
          buf = buf.slice(nl + 1);
          nl = buf.indexOf("\n");
        }
      });
      this.#children.push(child);
    }
    if ((this.#o.egressMacs ?? []).length > 0) this.#poller = this.#pollFdb(this.#o.egressMacs!);
  }

  #saw(mac: string, via: Sighting["via"], port?: string): void {
    const egress = this.#o.egressMacs?.includes(mac) === true;
    const who =
      via === "fdb"
        ? (this.#o.ports?.[port ?? ""] ?? `port:${port}`)
        : (this.#o.macs[mac] ?? (egress ? "egress-mac" : `unknown:${mac}`));
    this.sightings.push({ t: Date.now(), who, via, ...(via === "fdb" ? { mac } : {}) });
  }

  /** Every 50 ms: a change of port of an egress MAC is a sighting. */
  async #pollFdb(macs: readonly string[]): Promise<void> {
    const br = nsRunner(this.#o.bridgeNs);
    const last = new Map<string, string>();
    while (!this.#stopped) {
      const out = await mustRun(br, ["bridge", "-json", "fdb", "show", "br", "br0"]);
      const entries = JSON.parse(out) as { mac: string; ifname?: string; state?: string }[];
      for (const mac of macs) {
        const port = entries.find(
          (e) => e.mac.toLowerCase() === mac && e.state !== "permanent",
        )?.ifname;
        if (port !== undefined && port !== last.get(mac)) this.#saw(mac, "fdb", port);
        if (port !== undefined) last.set(mac, port);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Sightings of `who` after `since` (by either means). */
  after(since: number, who: string): Sighting[] {
    return this.sightings.filter((s) => s.t > since && s.who === who);
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    await Promise.all(
      this.#children.map(
        (c) =>
          new Promise<void>((resolve) => {
            if (c.exitCode !== null || c.signalCode !== null) return resolve();
            c.once("exit", () => resolve());
            c.kill("SIGKILL");
          }),
      ),
    );
    await this.#poller;
  }
}
