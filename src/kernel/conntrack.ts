/**
 * Connections SNATed to egress IPs, from the kernel's connection tracking table: how many, and
 * how many source ports each egress IP uses toward each destination.
 *
 * Why per destination: SNAT must give every connection a reply tuple (destination, destination
 * port, egress IP, source port) of its own, so an egress IP runs out of source ports toward one
 * destination address, port and protocol, not in general. The table is read with
 * `conntrack -L -o extended -n` (conntrack-tools 1.4.7; `-n`: SNATed entries only), one line per
 * connection, e.g.
 *
 *   ipv4     2 tcp      6 431998 ESTABLISHED src=10.1.0.2 dst=10.2.0.2 sport=43718 dport=8080 src=10.2.0.2 dst=10.2.0.100 sport=8080 dport=43718 [ASSURED] mark=0 use=1
 *
 * The original tuple comes first, the reply tuple second: the reply's `dst` is the egress IP and
 * its `dport` the source port SNAT chose. ICMP has no ports; SNAT rewrites its echo identifier
 * (`id=`) instead, so for ICMP the identifiers are counted as ports and the destination port is 0.
 * Real output, captured in network namespaces, is in testdata/traffic/conntrack-extended.txt.
 *
 * A table of 100,000 connections is ~15 MB of text and 0.2–0.6 s of parsing (bench/traffic.ts):
 * the agent reads it in a worker thread (src/agent/traffic_worker.ts), never on its event loop.
 */
import { CommandError, type Runner, type RunResult } from "./runner.ts";

export interface PortRange {
  readonly first: number;
  readonly last: number;
}

/**
 * The source ports SNAT chooses from when its rule names none (`--to-source ADDRESS` without
 * `:PORTS`), for original source ports of 1024 and above: the kernel keeps the pod's own port
 * while the reply tuple is free and otherwise picks one in 1024–65535 (nf_nat_l4proto_unique_tuple,
 * net/netfilter/nf_nat_proto.c). Not net.ipv4.ip_local_port_range, which only decides the ports
 * of sockets opened on the node itself: test/kernel/traffic_test.ts forces 200 clashes and sees
 * the kernel choose ports below 32768 and above 60999 (the default local range).
 */
export const KERNEL_SNAT_PORTS: PortRange = { first: 1024, last: 65535 };

/** ICMP identifiers are 16 bits, all of them usable. */
const ICMP_IDS = 65536;

export function portRangeSize(range: PortRange): number {
  return range.last - range.first + 1;
}

/** "1024-2047" (a single port: "1024") → PortRange; throws naming the text otherwise. */
export function parsePortRange(text: string): PortRange {
  const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(text.trim());
  const first = Number(m?.[1]);
  const last = m?.[2] === undefined ? first : Number(m[2]);
  if (m === null || first < 1 || last > 65535 || last < first) {
    throw new SyntaxError(
      `Cannot parse port range: current value is "${text}"; write FIRST-LAST within 1-65535, e.g. 1024-65535`,
    );
  }
  return { first, last };
}

/** Connections through one egress IP to one destination address, port and protocol. */
export interface SnatUse {
  readonly egressIP: string;
  readonly destination: string;
  /** 0 for protocols without ports (ICMP). */
  readonly port: number;
  /** As conntrack names it: tcp, udp, sctp, dccp, udplite, icmp, icmpv6. */
  readonly protocol: string;
  readonly connections: number;
  /** Distinct source ports (ICMP: identifiers) the egress IP uses toward this destination. */
  readonly ports: number;
}

/** How many source ports (ICMP: identifiers) exist for a destination of this protocol. */
export function portCapacity(protocol: string, range: PortRange): number {
  return protocol === "icmp" || protocol === "icmpv6" ? ICMP_IDS : portRangeSize(range);
}

interface Group {
  readonly egressIP: string;
  readonly destination: string;
  readonly port: number;
  readonly protocol: string;
  connections: number;
  readonly ports: Set<number>;
}

/** The value of `key=` (key includes the leading space and `=`) between `from` and `to`. */
function valueAt(text: string, key: string, from: number, to: number): string | undefined {
  const at = text.indexOf(key, from);
  if (at < 0 || at >= to) return undefined;
  const start = at + key.length;
  let end = text.indexOf(" ", start);
  if (end < 0 || end > to) end = to;
  return text.slice(start, end);
}

/**
 * Counts SNATed connections per (egress IP, destination, port, protocol). Lines whose reply
 * destination is not one of `egressIPs` (other NAT on the node: the CNI's masquerade, kube-proxy)
 * are skipped after one comparison.
 */
export class SnatTally {
  readonly #egressIPs: ReadonlySet<string>;
  readonly #groups = new Map<string, Group>();
  /** Lines read, ours or not. */
  lines = 0;
  /** Lines that did not have the shape above (counted, never thrown: the table changes while it is dumped). */
  malformed = 0;

  /** @param egressIPs canonical text, as iptables-save and conntrack print addresses */
  constructor(egressIPs: Iterable<string>) {
    this.#egressIPs = new Set(egressIPs);
  }

  /** Reads every line of `text`. */
  add(text: string): void {
    let s = 0;
    while (s < text.length) {
      let e = text.indexOf("\n", s);
      if (e < 0) e = text.length;
      if (e > s) this.#line(text, s, e);
      s = e + 1;
    }
  }

  #line(text: string, s: number, e: number): void {
    this.lines++;
    const orig = text.indexOf(" src=", s);
    const reply = orig < 0 ? -1 : text.indexOf(" src=", orig + 5);
    if (reply < 0 || reply >= e) {
      this.malformed++;
      return;
    }
    const egressIP = valueAt(text, " dst=", reply, e);
    if (egressIP === undefined || !this.#egressIPs.has(egressIP)) return;
    // Connections the node opened from the egress IP itself are not SNATed.
    if (valueAt(text, " src=", orig, reply) === egressIP) return;
    const protocol = this.#protocol(text, s, orig);
    const destination = valueAt(text, " dst=", orig, reply);
    const icmp = protocol === "icmp" || protocol === "icmpv6";
    const port = icmp ? 0 : Number(valueAt(text, " dport=", orig, reply));
    const source = Number(valueAt(text, icmp ? " id=" : " dport=", reply, e));
    if (protocol === undefined || destination === undefined || !(port >= 0) || !(source >= 0)) {
      this.malformed++;
      return;
    }
    const key = `${egressIP} ${destination} ${port} ${protocol}`;
    let g = this.#groups.get(key);
    if (g === undefined) {
      g = { egressIP, destination, port, protocol, connections: 0, ports: new Set() };
      this.#groups.set(key, g);
    }
    g.connections++;
    g.ports.add(source);
  }

  /** "ipv4     2 tcp      6 431998 ESTABLISHED": the third word (the second with plain -L output). */
  #protocol(text: string, s: number, end: number): string | undefined {
    let at = s;
    const word = (): string | undefined => {
      while (at < end && text.charCodeAt(at) === 32) at++;
      if (at >= end) return undefined;
      let stop = text.indexOf(" ", at);
      if (stop < 0 || stop > end) stop = end;
      const w = text.slice(at, stop);
      at = stop;
      return w;
    };
    const first = word();
    if (first !== "ipv4" && first !== "ipv6") return first;
    word();
    return word();
  }

  result(): SnatUse[] {
    return [...this.#groups.values()].map((g) => ({
      egressIP: g.egressIP,
      destination: g.destination,
      port: g.port,
      protocol: g.protocol,
      connections: g.connections,
      ports: g.ports.size,
    }));
  }
}

/** Parses a whole `conntrack -L -o extended` text. */
export function parseConntrack(text: string, egressIPs: Iterable<string>): SnatUse[] {
  const tally = new SnatTally(egressIPs);
  tally.add(text);
  return tally.result();
}

export const CONNTRACK_LIST = ["conntrack", "-L", "-o", "extended", "-n"] as const;

/** Lists SNATed connections, both families. conntrack prints its summary line on stderr. */
export async function listSnatConnections(runner: Runner): Promise<string> {
  const result: RunResult = await runner.run(CONNTRACK_LIST, { timeoutMs: 20_000 });
  if (result.code !== 0) {
    const why = result.stderr.trim().split("\n")[0] ?? "";
    throw new Error(
      `Cannot list SNATed connections with ${CONNTRACK_LIST.join(" ")}: exit ${result.code}: ${why || "no error output"}; install conntrack-tools and load nf_conntrack_netlink`,
    );
  }
  return result.stdout;
}

/** A destination with the fraction of its egress IP's source ports in use toward it. */
export interface SnatDestination extends SnatUse {
  /** ports / the ports SNAT can choose from (0..1). */
  readonly saturation: number;
}

/** What one egress IP uses, with the busiest destinations named and the rest aggregated. */
export interface SnatEgress {
  readonly egressIP: string;
  /** The source ports SNAT chooses from toward one destination (TCP, UDP, SCTP). */
  readonly portRange: PortRange;
  readonly connections: number;
  /** Distinct (destination, port, protocol) in use. */
  readonly destinations: number;
  /** The `topN` destinations with the highest saturation, highest first. */
  readonly top: readonly SnatDestination[];
  /**
   * The other destinations together (destination "other", port 0, protocol ""): connections and
   * ports summed, saturation the highest among them. Undefined when `top` holds them all.
   */
  readonly other?: SnatDestination;
}

/**
 * Per egress IP, the `topN` destinations closest to running out of source ports and one
 * aggregate for the rest: this bounds the metrics' series per egress IP to topN + 1 however
 * many destinations its pods talk to. Every egress IP of `portRanges` is listed, idle or not.
 */
export function summarizeSnat(
  uses: readonly SnatUse[],
  portRanges: ReadonlyMap<string, PortRange>,
  topN: number,
): SnatEgress[] {
  const byEgress = new Map<string, SnatDestination[]>();
  for (const ip of portRanges.keys()) byEgress.set(ip, []);
  for (const u of uses) {
    const range = portRanges.get(u.egressIP);
    if (range === undefined) continue;
    byEgress.get(u.egressIP)!.push({ ...u, saturation: u.ports / portCapacity(u.protocol, range) });
  }
  const out: SnatEgress[] = [];
  for (const [egressIP, list] of byEgress) {
    list.sort(
      (a, b) =>
        b.saturation - a.saturation ||
        b.connections - a.connections ||
        (a.destination < b.destination ? -1 : a.destination > b.destination ? 1 : 0) ||
        a.port - b.port ||
        (a.protocol < b.protocol ? -1 : a.protocol > b.protocol ? 1 : 0),
    );
    const top = list.slice(0, topN);
    const rest = list.slice(topN);
    let connections = 0;
    for (const d of list) connections += d.connections;
    const summary: SnatEgress = {
      egressIP,
      portRange: portRanges.get(egressIP)!,
      connections,
      destinations: list.length,
      top,
    };
    if (rest.length === 0) {
      out.push(summary);
      continue;
    }
    let restConnections = 0;
    let restPorts = 0;
    for (const d of rest) {
      restConnections += d.connections;
      restPorts += d.ports;
    }
    out.push({
      ...summary,
      other: {
        egressIP,
        destination: "other",
        port: 0,
        protocol: "",
        connections: restConnections,
        ports: restPorts,
        saturation: rest[0]!.saturation,
      },
    });
  }
  return out.sort((a, b) => (a.egressIP < b.egressIP ? -1 : a.egressIP > b.egressIP ? 1 : 0));
}

/**
 * Deletes the connections whose original source or original destination is `address`:
 * `conntrack -D -f ipv4|ipv6 -s ADDRESS`, then the same with `-d` (conntrack ANDs its filters, so
 * one command cannot say "or"). Returns how many entries went; throws a CommandError with
 * conntrack's own message otherwise.
 */
export function deleteConnectionsOf(runner: Runner, address: string): Promise<number> {
  return deleteConnections(runner, address, ["-s", "-d"]);
}

/**
 * Deletes the connections SNATed to `egressIP` (their replies go to it: `--reply-dst`). A node
 * that takes an egress IP it held before (revived, or a failback) still tracks the connections it
 * carried then, with their state of then: the connections that come back with the egress IP
 * would be judged by it and stall. Without those entries the kernel picks each connection up
 * again from its next packet, mapped to the same source port when that port is free.
 */
export function deleteConnectionsTo(runner: Runner, egressIP: string): Promise<number> {
  return deleteConnections(runner, egressIP, ["--reply-dst"]);
}

/**
 * One `conntrack -D` per filter (conntrack ANDs the filters of one command). conntrack exits 1
 * with "0 flow entries have been deleted." when nothing matched: that is no failure.
 */
async function deleteConnections(
  runner: Runner,
  address: string,
  filters: readonly string[],
): Promise<number> {
  const family = address.includes(":") ? "ipv6" : "ipv4";
  let deleted = 0;
  for (const flag of filters) {
    const argv = ["conntrack", "-D", "-f", family, flag, address];
    const result = await runner.run(argv, { timeoutMs: 10_000 });
    const count = /(\d+) flow entries have been deleted/.exec(result.stderr)?.[1];
    if (result.code !== 0 && !(result.code === 1 && count === "0"))
      throw new CommandError(argv, undefined, result);
    deleted += Number(count ?? 0);
  }
  return deleted;
}
