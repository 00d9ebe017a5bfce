/**
 * A gateway node in three network namespaces, for the traffic collector's kernel test and its
 * benchmark: the datapath's chains and sets as docs/datapath.md shows them, written with
 * iptables-restore (not by the datapath, so that these tests do not depend on the planner), and
 * real traffic through them. Nothing is configured in the root namespace.
 *
 *   <p>c  client   eth0 10.1.0.2/24 fd01::2/64 (and 10.1.0.3-202 for port clashes)
 *   <p>g  gateway  eth0 10.1.0.1 fd01::1 | eth1 10.2.0.1 fd02::1, egress IPs 10.2.0.100-101
 *                  and fd02::100 on eth1
 *   <p>s  server   eth0 10.2.0.2-4 fd02::2-3, a route back to the client's network
 *
 * Policies on the gateway (one rule per protocol of their ports, as the planner writes them):
 *   EgressPolicy/default/web        to 10.2.0.2 / fd02::2, 8080/tcp and 8081/udp: this node is
 *                                   its gateway, SNAT to 10.2.0.100 / fd02::100
 *   EgressPolicy/default/narrow     to 10.2.0.2, 9090/tcp: SNAT to 10.2.0.101:5000-5009
 *   EgressPolicy/team-a/billing     to 10.2.0.3 / fd02::3: steered to node 0001
 *   ClusterEgressPolicy/no-gateway  to 10.2.0.4: fails closed (DROP)
 */
import { type ChildProcess, spawn } from "node:child_process";
import { ExecRunner, mustRun, type Runner } from "../../src/kernel/runner.ts";
import { waitForLine } from "./lab.ts";
import { TEST_PREFIX } from "./leaks.ts";

let counter = 0;

export const NEEDS_ROOT =
  process.getuid?.() === 0 ? false : "needs root (network namespaces); CI runs as root";

export const EIP = { 4: "10.2.0.100", 6: "fd02::100" } as const;
export const NARROW_EIP = "10.2.0.101";
export const NARROW_PORTS = { first: 5000, last: 5009 } as const;
export const SERVER = {
  web: { 4: "10.2.0.2", 6: "fd02::2" },
  steered: { 4: "10.2.0.3", 6: "fd02::3" },
  dropped: "10.2.0.4",
} as const;

/** The server: TCP echo on 8080 and 9090, UDP echo on 8081. */
const SERVER_JS = `
const net = require("node:net"); const dgram = require("node:dgram");
for (const port of [8080, 9090]) net.createServer((s) => { s.on("data", (d) => s.write(d)); s.on("error", () => {}); }).listen({ port, host: "::", ipv6Only: false });
const u = dgram.createSocket({ type: "udp6", ipv6Only: false }); u.on("message", (m, r) => u.send(m, r.port, r.address)); u.bind(8081);
setTimeout(() => console.log("listening"), 100);
`;

/**
 * The client: opens TCP connections and holds them until it is killed, and sends UDP datagrams;
 * prints one line when every connection was echoed and every datagram sent.
 */
const CLIENT_JS = `
const net = require("node:net"); const dgram = require("node:dgram");
const plan = JSON.parse(process.argv[1]);
let open = 0, want = 0, sent = false;
const done = () => { if (open === want && sent) console.log(JSON.stringify({ open })); };
for (const t of plan.tcp ?? []) for (let i = 0; i < t.count; i++) {
  want++;
  const local = t.localAddresses ? { localAddress: t.localAddresses[i], localPort: t.localPort } : {};
  const s = net.connect({ host: t.host, port: t.port, ...local }, () => { s.write("x\\n"); });
  s.once("data", () => { open++; done(); });
  s.on("error", (e) => console.log(JSON.stringify({ error: e.message })));
}
(async () => {
  for (const u of plan.udp ?? []) for (let p = 0; p < u.fromPorts; p++) {
    const sock = dgram.createSocket(u.host.includes(":") ? "udp6" : "udp4");
    await new Promise((r) => sock.bind(0, r));
    for (let i = 0; i < u.count; i++) await new Promise((r) => sock.send(Buffer.alloc(u.size, 120), u.port, u.host, r));
  }
  sent = true;
  done();
})();
`;

export interface TcpPlan {
  readonly host: string;
  readonly port: number;
  readonly count: number;
  readonly localAddresses?: readonly string[];
  readonly localPort?: number;
}

export interface UdpPlan {
  readonly host: string;
  readonly port: number;
  /** Datagrams from each source port. */
  readonly count: number;
  /** Payload bytes of each datagram. */
  readonly size: number;
  /** Distinct source ports (one socket each). */
  readonly fromPorts: number;
}

function rules(family: 4 | 6): string {
  const eip = EIP[family];
  const sets = (p: string) =>
    `-m set --match-set sallyport-src${family}-${p} src -m set --match-set sallyport-dst${family}-${p} dst -m set ! --match-set sallyport-ignore${family} dst`;
  const web = (proto: string, port: number) =>
    `-p ${proto} ${sets("aaaaaaaaaaaaaaaa")} -m multiport --dports ${port} -m comment --comment "EgressPolicy/default/web"`;
  const narrow = `-p tcp ${sets("dddddddddddddddd")} -m multiport --dports 9090 -m comment --comment "EgressPolicy/default/narrow"`;
  const billing = `${sets("bbbbbbbbbbbbbbbb")} -m comment --comment "EgressPolicy/team-a/billing"`;
  const dropped = `${sets("cccccccccccccccc")} -m comment --comment "ClusterEgressPolicy/no-gateway"`;
  return `*mangle
:SALLYPORT-MARK-REQUEST - [0:0]
:SALLYPORT-RESET-MARK - [0:0]
:SALLYPORT-KEEP-MARK - [0:0]
:SALLYPORT-GATEWAY - [0:0]
:SALLYPORT-TO-0001 - [0:0]
-I PREROUTING 1 -m comment --comment "sallyport: steer egress traffic" -j SALLYPORT-MARK-REQUEST
-I FORWARD 1 -m comment --comment "sallyport: keep steered traffic" -j SALLYPORT-RESET-MARK
-I POSTROUTING 1 -m comment --comment "sallyport: keep steered traffic" -j SALLYPORT-KEEP-MARK
-A SALLYPORT-MARK-REQUEST -m conntrack --ctdir REPLY -j RETURN
-A SALLYPORT-MARK-REQUEST -m conntrack --ctstate RELATED,ESTABLISHED -m connmark ! --mark 0x26000000/0xff000000 -m comment --comment "sallyport: connections we never steered keep their path" -j RETURN
-A SALLYPORT-MARK-REQUEST ${web("tcp", 8080)} -g SALLYPORT-GATEWAY
-A SALLYPORT-MARK-REQUEST ${web("udp", 8081)} -g SALLYPORT-GATEWAY
${family === 4 ? `-A SALLYPORT-MARK-REQUEST ${narrow} -g SALLYPORT-GATEWAY\n` : ""}-A SALLYPORT-MARK-REQUEST ${billing} -g SALLYPORT-TO-0001
${family === 4 ? `-A SALLYPORT-MARK-REQUEST ${dropped} -j DROP\n` : ""}-A SALLYPORT-GATEWAY -i sallyport -m conntrack --ctstate NEW -j CONNMARK --set-xmark 0x27000000/0xff000000
-A SALLYPORT-TO-0001 -j CONNMARK --set-xmark 0x26000000/0xff000000
-A SALLYPORT-TO-0001 -j MARK --set-xmark 0x26000100/0xffffff00
-A SALLYPORT-TO-0001 -j ACCEPT
-A SALLYPORT-RESET-MARK -m mark --mark 0x26000000/0xfe000000 -j MARK --set-xmark 0x12000000/0xffffff00
-A SALLYPORT-KEEP-MARK -m mark --mark 0x12000000/0xffffff00 -j ACCEPT
COMMIT
*nat
:SALLYPORT-NO-SNAT - [0:0]
:SALLYPORT-SNAT-EIP - [0:0]
-I POSTROUTING 1 -m comment --comment "sallyport: no snat for steered traffic" -j SALLYPORT-NO-SNAT
-I POSTROUTING 2 -m comment --comment "sallyport: snat to egress IPs" -j SALLYPORT-SNAT-EIP
-A SALLYPORT-NO-SNAT -m mark --mark 0x12000000/0xffffff00 -j ACCEPT
-A SALLYPORT-SNAT-EIP ${web("tcp", 8080)} -j SNAT --to-source ${eip}
-A SALLYPORT-SNAT-EIP ${web("udp", 8081)} -j SNAT --to-source ${eip}
${family === 4 ? `-A SALLYPORT-SNAT-EIP ${narrow} -j SNAT --to-source ${NARROW_EIP}:${NARROW_PORTS.first}-${NARROW_PORTS.last}\n` : ""}COMMIT
`;
}

function ipsets(): string {
  const out: string[] = [];
  const set = (name: string, family: 4 | 6, members: string[]) => {
    out.push(
      `create ${name} hash:net family ${family === 4 ? "inet" : "inet6"} hashsize 1024 maxelem 1048576`,
      ...members.map((m) => `add ${name} ${m}`),
    );
  };
  for (const family of [4, 6] as const) {
    const client = family === 4 ? "10.1.0.0/24" : "fd01::/64";
    const host = (a: string) => `${a}/${family === 4 ? 32 : 128}`;
    set(`sallyport-src${family}-aaaaaaaaaaaaaaaa`, family, [client]);
    set(`sallyport-dst${family}-aaaaaaaaaaaaaaaa`, family, [host(SERVER.web[family])]);
    set(`sallyport-src${family}-bbbbbbbbbbbbbbbb`, family, [client]);
    set(`sallyport-dst${family}-bbbbbbbbbbbbbbbb`, family, [host(SERVER.steered[family])]);
    set(`sallyport-ignore${family}`, family, []);
  }
  set("sallyport-src4-cccccccccccccccc", 4, ["10.1.0.0/24"]);
  set("sallyport-dst4-cccccccccccccccc", 4, [`${SERVER.dropped}/32`]);
  set("sallyport-src4-dddddddddddddddd", 4, ["10.1.0.0/24"]);
  set("sallyport-dst4-dddddddddddddddd", 4, [`${SERVER.web[4]}/32`]);
  return `${out.join("\n")}\n`;
}

export class SnatLab {
  readonly prefix: string;
  readonly #children = new Set<ChildProcess>();

  constructor(tag: string) {
    counter++;
    this.prefix = `${TEST_PREFIX}${process.pid % 100000}${tag}${counter}`;
  }

  get client(): string {
    return `${this.prefix}c`;
  }
  get gateway(): string {
    return `${this.prefix}g`;
  }
  get server(): string {
    return `${this.prefix}s`;
  }

  runner(netns: string): Runner {
    return new ExecRunner(["ip", "netns", "exec", netns]);
  }

  /** The namespaces, addresses, sets and rules; then the server. */
  async up(): Promise<void> {
    await this.down();
    const root = new ExecRunner();
    const ip = (...args: string[]) => mustRun(root, ["ip", ...args]);
    for (const ns of [this.client, this.gateway, this.server]) {
      await ip("netns", "add", ns);
      await ip("-n", ns, "link", "set", "lo", "up");
    }
    await ip(
      "-n",
      this.client,
      "link",
      "add",
      "eth0",
      "type",
      "veth",
      "peer",
      "name",
      "eth0",
      "netns",
      this.gateway,
    );
    await ip(
      "-n",
      this.server,
      "link",
      "add",
      "eth0",
      "type",
      "veth",
      "peer",
      "name",
      "eth1",
      "netns",
      this.gateway,
    );
    const batch = (ns: string, lines: string[]) =>
      mustRun(root, ["ip", "-n", ns, "-batch", "-"], { stdin: `${lines.join("\n")}\n` });
    await batch(this.client, [
      "addr add 10.1.0.2/24 dev eth0",
      ...Array.from({ length: 200 }, (_, i) => `addr add 10.1.0.${i + 3}/24 dev eth0`),
      "addr add fd01::2/64 dev eth0 nodad",
      "link set eth0 up",
      "route add default via 10.1.0.1",
      "route add ::/0 via fd01::1",
    ]);
    await batch(this.gateway, [
      "addr add 10.1.0.1/24 dev eth0",
      "addr add fd01::1/64 dev eth0 nodad",
      "addr add 10.2.0.1/24 dev eth1",
      "addr add fd02::1/64 dev eth1 nodad",
      `addr add ${EIP[4]}/32 dev eth1`,
      `addr add ${NARROW_EIP}/32 dev eth1`,
      `addr add ${EIP[6]}/128 dev eth1 nodad`,
      "link set eth0 up",
      "link set eth1 up",
    ]);
    await batch(this.server, [
      "addr add 10.2.0.2/24 dev eth0",
      "addr add 10.2.0.3/24 dev eth0",
      "addr add 10.2.0.4/24 dev eth0",
      "addr add fd02::2/64 dev eth0 nodad",
      "addr add fd02::3/64 dev eth0 nodad",
      "link set eth0 up",
      "route add 10.1.0.0/24 via 10.2.0.1",
      "route add fd01::/64 via fd02::1",
    ]);
    const g = this.runner(this.gateway);
    await mustRun(g, ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
    // The server reaches the egress IPs without neighbour discovery (the datapath's own
    // announcement is not what these tests are about).
    const mac = JSON.parse(await mustRun(g, ["ip", "-json", "link", "show", "eth1"]))[0].address;
    await batch(this.server, [
      `neigh replace ${EIP[4]} lladdr ${mac} dev eth0 nud permanent`,
      `neigh replace ${NARROW_EIP} lladdr ${mac} dev eth0 nud permanent`,
      `neigh replace ${EIP[6]} lladdr ${mac} dev eth0 nud permanent`,
    ]);
    await mustRun(g, ["ipset", "restore"], { stdin: ipsets() });
    await mustRun(g, ["iptables-restore", "--noflush"], { stdin: rules(4) });
    await mustRun(g, ["ip6tables-restore", "--noflush"], { stdin: rules(6) });
    const server = this.#start(this.server, [process.execPath, "-e", SERVER_JS]);
    await waitForLine(server, (l) => l === "listening", 15_000);
  }

  /** Opens what `plan` says from the client; resolves once every TCP connection echoed. */
  async send(plan: TrafficPlan): Promise<void> {
    await clientReady(this.#start(this.client, clientArgv(plan)));
  }

  /** Empties the gateway's connection tracking table and zeroes its rule counters. */
  async reset(): Promise<void> {
    await this.stopClients();
    const g = this.runner(this.gateway);
    await g.run(["conntrack", "-F"]);
    for (const tool of ["iptables", "ip6tables"])
      for (const table of ["mangle", "nat"]) await mustRun(g, [tool, "-t", table, "-Z"]);
  }

  /** Ends every client (their connections close). */
  async stopClients(): Promise<void> {
    await this.#kill((c) => c.spawnargs.includes(this.client));
  }

  async down(): Promise<void> {
    await this.#kill(() => true);
    const root = new ExecRunner();
    for (const ns of [this.client, this.gateway, this.server])
      await root.run(["ip", "netns", "del", ns]);
  }

  #start(netns: string, argv: readonly string[]): ChildProcess {
    const child = spawn("ip", ["netns", "exec", netns, ...argv], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    this.#children.add(child);
    child.on("exit", () => this.#children.delete(child));
    return child;
  }

  async #kill(which: (c: ChildProcess) => boolean): Promise<void> {
    await Promise.all(
      [...this.#children].filter(which).map(
        (c) =>
          new Promise<void>((resolve) => {
            if (c.exitCode !== null || c.signalCode !== null) return resolve();
            c.once("exit", () => resolve());
            c.kill("SIGKILL");
          }),
      ),
    );
  }
}

export interface TrafficPlan {
  readonly tcp?: readonly TcpPlan[];
  readonly udp?: readonly UdpPlan[];
}

/** The client's command: run it in a namespace (`ip netns exec NS …`). */
export function clientArgv(plan: TrafficPlan): string[] {
  return [process.execPath, "-e", CLIENT_JS, JSON.stringify(plan)];
}

/** Resolves when the client has every connection open and every datagram sent. */
export async function clientReady(child: ChildProcess): Promise<void> {
  const line = await waitForLine(child, (l) => l.startsWith("{"), 15_000);
  const m = JSON.parse(line) as { error?: string };
  if (m.error !== undefined) throw new Error(`Cannot connect from the client: ${m.error}`);
}
