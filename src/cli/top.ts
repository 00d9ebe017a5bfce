/**
 * `sallyport top` (and `kubectl sallyport top`): per policy and egress IP, what the datapath
 * carries now, from the agents' own metrics (src/lib/metrics.ts trafficMetrics):
 *
 *   STEERED    packets and bytes per second sent through the tunnel to the gateway (all nodes)
 *   SNAT       packets per second rewritten to the egress IP, where the datapath counts them
 *              ("-" on the iptables backend: its nat rules see first packets only), and new
 *              connections per second
 *   CONNS      SNATed connections through the egress IP now (all its destinations)
 *   PORT-USE   the highest share of source ports in use toward one destination, and that
 *              destination
 *
 * Rates come from two scrapes of every agent `--interval` apart. In a cluster the agents are
 * reached through the API server's pod proxy (`pods/proxy` in Sallyport's namespace: the chart's
 * Role sallyport-metrics-reader grants it); in the sandbox, inside each node's namespace.
 */

import { ExecRunner } from "../kernel/runner.ts";
import { CORE, isNotFound, type KubeClient, type KubeObject } from "../kube/client.ts";
import { CliError } from "./errors.ts";
import { type Row, table } from "./status.ts";

export const AGENT_SELECTOR = "app.kubernetes.io/name=sallyport-agent";
const DEFAULT_METRICS_PORT = 9091;

// --- the Prometheus text format, as prom-client writes it

export interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

/** Samples of a Prometheus text exposition (comments and malformed lines skipped). */
export function parseMetrics(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const m = SAMPLE.exec(line);
    if (m === null) continue;
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? "").matchAll(LABEL))
      labels[l[1]!] = l[2]!.replace(/\\n/g, "\n").replace(/\\(["\\])/g, "$1");
    out.push({ name: m[1]!, labels, value: Number(m[3]) });
  }
  return out;
}

// --- where the agents' metrics come from

export interface Scrape {
  readonly node: string;
  readonly text?: string;
  readonly error?: string;
}

export interface MetricsSource {
  /** One scrape of every agent; an agent that cannot be reached is reported, not thrown. */
  scrape(): Promise<Scrape[]>;
}

interface AgentPod extends KubeObject {
  spec?: {
    nodeName?: string;
    containers?: { ports?: { name?: string; containerPort: number }[] }[];
  };
  status?: { phase?: string };
}

/** The agents of a cluster, through the API server's pod proxy. */
export class PodProxySource implements MetricsSource {
  readonly #client: KubeClient;
  readonly #namespace: string;
  #pods: AgentPod[] | undefined;

  constructor(client: KubeClient, namespace: string) {
    this.#client = client;
    this.#namespace = namespace;
  }

  async scrape(): Promise<Scrape[]> {
    this.#pods ??= await this.#agents();
    return Promise.all(
      this.#pods.map(async (pod) => {
        const name = pod.metadata.name ?? "";
        const node = pod.spec?.nodeName ?? name;
        const port =
          pod.spec?.containers?.flatMap((c) => c.ports ?? []).find((p) => p.name === "metrics")
            ?.containerPort ?? DEFAULT_METRICS_PORT;
        try {
          const text = await this.#client.request<string>(
            "GET",
            `/api/v1/namespaces/${this.#namespace}/pods/${name}:${port}/proxy/metrics`,
            { timeoutMs: 10_000 },
          );
          return { node, text: String(text) };
        } catch (e) {
          if ((e as { status?: number }).status === 403) throw forbidden(this.#namespace, e);
          return { node, error: (e as Error).message };
        }
      }),
    );
  }

  async #agents(): Promise<AgentPod[]> {
    let pods: AgentPod[];
    try {
      pods = (
        await this.#client.listAll<AgentPod>(CORE.pods, {
          namespace: this.#namespace,
          labelSelector: AGENT_SELECTOR,
        })
      ).items;
    } catch (e) {
      if ((e as { status?: number }).status === 403) throw forbidden(this.#namespace, e);
      if (isNotFound(e)) pods = [];
      else throw e;
    }
    const running = pods.filter((p) => p.status?.phase === "Running");
    if (running.length === 0)
      throw new CliError(
        `Cannot find a running Sallyport agent: no pod labelled ${AGENT_SELECTOR} runs in namespace ${this.#namespace}`,
        { details: ["pass --sallyport-namespace if Sallyport is installed in another namespace"] },
      );
    return running;
  }
}

function forbidden(namespace: string, e: unknown): CliError {
  return new CliError(
    `Cannot read the agents' metrics: ${(e as Error).message.replace(/^GET \S+: /, "")}`,
    {
      details: [
        `your user needs get/list on pods and get on pods/proxy in namespace ${namespace}:`,
        `kubectl -n ${namespace} create rolebinding <name> --role sallyport-metrics-reader --user <you>`,
        "(or set metrics.readers in the chart's values)",
      ],
    },
  );
}

/** The sandbox's agents, each reached inside its node's network namespace. */
export class SandboxSource implements MetricsSource {
  readonly #nodes: readonly { readonly name: string; readonly netns: string }[];
  readonly #port: number;

  constructor(nodes: readonly { name: string; netns: string }[], port = DEFAULT_METRICS_PORT) {
    this.#nodes = nodes;
    this.#port = port;
  }

  scrape(): Promise<Scrape[]> {
    // Node's own HTTP client, started in the namespace: no curl needed on the host. 10 s, as
    // Prometheus waits by default (an agent answers within ~2 s, from its last read if need be).
    const script = `fetch(process.argv[1], { signal: AbortSignal.timeout(10000) }).then(async (r) => { if (!r.ok) throw new Error("HTTP " + r.status); process.stdout.write(await r.text()); }).catch((e) => { process.stderr.write(String(e.cause?.message ?? e.message)); process.exit(1); });`;
    return Promise.all(
      this.#nodes.map(async ({ name, netns }) => {
        const r = await new ExecRunner(["ip", "netns", "exec", netns]).run([
          process.execPath,
          "-e",
          script,
          `http://127.0.0.1:${this.#port}/metrics`,
        ]);
        return r.code === 0
          ? { node: name, text: r.stdout }
          : { node: name, error: r.stderr.trim() || `exit ${r.code}` };
      }),
    );
  }
}

// --- the figures

export interface TopRow {
  readonly policy: string;
  readonly egressIP: string;
  /** Nodes whose agent SNATs to the egress IP (the gateway; two during a failover). */
  readonly gateways: readonly string[];
  readonly steeredPps: number;
  readonly steeredBps: number;
  /** undefined: the datapath cannot count every SNATed packet (iptables). */
  readonly snatPps: number | undefined;
  readonly snatBps: number | undefined;
  readonly newConnectionsPerSecond: number;
  readonly droppedPps: number;
  readonly connections: number;
  /** The most saturated destination of the egress IP. */
  readonly top?: { readonly destination: string; readonly saturation: number };
}

type Counters = Map<string, number>;

function counterKey(node: string, s: Sample): string {
  return `${node}\n${s.name}\n${s.labels.policy}\n${s.labels.egress_ip}\n${s.labels.direction ?? ""}`;
}

const COUNTERS = new Set([
  "sallyport_policy_packets_total",
  "sallyport_policy_bytes_total",
  "sallyport_policy_snat_connections_total",
]);

function countersOf(scrapes: readonly Scrape[]): Counters {
  const out: Counters = new Map();
  for (const s of scrapes)
    for (const sample of parseMetrics(s.text ?? ""))
      if (COUNTERS.has(sample.name)) out.set(counterKey(s.node, sample), sample.value);
  return out;
}

/**
 * Rows from two scrapes `seconds` apart: per (policy, egress IP), counter rates summed over the
 * nodes, and the egress IP's connections and port use from the second scrape.
 */
export function topRows(
  first: readonly Scrape[],
  second: readonly Scrape[],
  seconds: number,
): TopRow[] {
  const before = countersOf(first);
  interface Acc {
    policy: string;
    egressIP: string;
    steeredPackets: number;
    steeredBytes: number;
    snatPackets: number | undefined;
    snatBytes: number | undefined;
    connections: number;
    dropped: number;
  }
  const rows = new Map<string, Acc>();
  const byEgress = new Map<
    string,
    {
      connections: number;
      gateways: Set<string>;
      top?: { destination: string; saturation: number };
    }
  >();
  for (const s of second) {
    for (const sample of parseMetrics(s.text ?? "")) {
      const l = sample.labels;
      if (COUNTERS.has(sample.name)) {
        const was = before.get(counterKey(s.node, sample));
        // A series new in the second scrape, or lower (its agent restarted): no rate this time.
        const increase = was === undefined || sample.value < was ? 0 : sample.value - was;
        const key = `${l.policy}\n${l.egress_ip ?? ""}`;
        let row = rows.get(key);
        if (row === undefined) {
          row = {
            policy: l.policy ?? "",
            egressIP: l.egress_ip ?? "",
            steeredPackets: 0,
            steeredBytes: 0,
            snatPackets: undefined,
            snatBytes: undefined,
            connections: 0,
            dropped: 0,
          };
          rows.set(key, row);
        }
        const packets = sample.name === "sallyport_policy_packets_total";
        const bytes = sample.name === "sallyport_policy_bytes_total";
        if (sample.name === "sallyport_policy_snat_connections_total") row.connections += increase;
        else if (l.direction === "steered") {
          if (packets) row.steeredPackets += increase;
          if (bytes) row.steeredBytes += increase;
        } else if (l.direction === "snat") {
          if (packets) row.snatPackets = (row.snatPackets ?? 0) + increase;
          if (bytes) row.snatBytes = (row.snatBytes ?? 0) + increase;
        } else if (l.direction === "dropped" && packets) row.dropped += increase;
        continue;
      }
      if (
        sample.name === "sallyport_snat_connections" ||
        sample.name === "sallyport_snat_port_saturation"
      ) {
        const ip = l.egress_ip ?? "";
        const e = byEgress.get(ip) ?? { connections: 0, gateways: new Set<string>() };
        byEgress.set(ip, e);
        e.gateways.add(s.node);
        if (sample.name === "sallyport_snat_connections") e.connections += sample.value;
        else if (e.top === undefined || sample.value > e.top.saturation) {
          const port = l.port === "" || l.port === undefined ? "" : `:${l.port}`;
          e.top = {
            destination:
              l.destination === "other" ? "other" : `${l.destination}${port}/${l.protocol}`,
            saturation: sample.value,
          };
        }
      }
    }
  }
  const rate = (n: number) => n / seconds;
  return [...rows.values()]
    .map((r) => {
      // A policy with several egress IPs of a family labels its policy counters with all of
      // them ("a,b"); its connections and port use are those of each address.
      const parts = r.egressIP
        .split(",")
        .map((ip) => byEgress.get(ip))
        .filter((x) => x !== undefined);
      const e =
        parts.length <= 1
          ? parts[0]
          : {
              connections: parts.reduce((n, p) => n + p.connections, 0),
              gateways: new Set(parts.flatMap((p) => [...p.gateways])),
              top: parts
                .map((p) => p.top)
                .filter((t) => t !== undefined)
                .reduce<{ destination: string; saturation: number } | undefined>(
                  (a, t) => (a === undefined || t.saturation > a.saturation ? t : a),
                  undefined,
                ),
            };
      const row: TopRow = {
        policy: r.policy,
        egressIP: r.egressIP,
        gateways: [...(e?.gateways ?? [])].sort(),
        steeredPps: rate(r.steeredPackets),
        steeredBps: rate(r.steeredBytes),
        snatPps: r.snatPackets === undefined ? undefined : rate(r.snatPackets),
        snatBps: r.snatBytes === undefined ? undefined : rate(r.snatBytes),
        newConnectionsPerSecond: rate(r.connections),
        droppedPps: rate(r.dropped),
        connections: e?.connections ?? 0,
        ...(e?.top === undefined ? {} : { top: e.top }),
      };
      return row;
    })
    .sort((a, b) =>
      a.policy < b.policy ? -1 : a.policy > b.policy ? 1 : a.egressIP < b.egressIP ? -1 : 1,
    );
}

/** 950, 1.2k, 34M: three significant figures at most. */
export function human(n: number): string {
  if (n < 1000)
    return n < 10 && n > 0 && !Number.isInteger(n) ? n.toFixed(1) : String(Math.round(n));
  for (const [unit, size] of [
    ["k", 1e3],
    ["M", 1e6],
    ["G", 1e9],
    ["T", 1e12],
  ] as const) {
    const v = n / size;
    if (v < 1000 || unit === "T") return `${v < 10 ? v.toFixed(1) : Math.round(v)}${unit}`;
  }
  return String(n);
}

function shortPolicy(key: string): string {
  const [kind, ...rest] = key.split("/");
  if (kind === "EgressPolicy") return `egp/${rest.join("/")}`;
  if (kind === "ClusterEgressPolicy") return `cegp/${rest.join("/")}`;
  return key;
}

export function formatTop(rows: readonly TopRow[]): string {
  if (rows.length === 0)
    return "No traffic figures yet: no policy is programmed on a node whose agent reports them";
  const dropping = rows.some((r) => r.droppedPps > 0);
  return table(
    rows.map(
      (r): Row => ({
        policy: shortPolicy(r.policy),
        "egress-ip": r.egressIP === "" ? "-" : r.egressIP,
        gateway: r.gateways.join(",") || "-",
        "steered(pkt/s)": human(r.steeredPps),
        "steered(B/s)": human(r.steeredBps),
        "snat(pkt/s)": r.snatPps === undefined ? "-" : human(r.snatPps),
        "snat(conn/s)": human(r.newConnectionsPerSecond),
        conns: human(r.connections),
        "port-use": r.top === undefined ? "-" : `${Math.floor(r.top.saturation * 1000) / 10}%`,
        destination: r.top?.destination ?? "",
        // Only when a policy fails closed (no reachable gateway): its traffic is dropped.
        ...(dropping ? { "dropped(pkt/s)": human(r.droppedPps) } : {}),
      }),
    ),
  );
}

/** Two scrapes `intervalMs` apart; fails only when no agent could be read at all. */
export async function top(
  source: MetricsSource,
  options: { intervalMs: number; namespace?: string | undefined; warn?: (line: string) => void },
): Promise<TopRow[]> {
  const first = await source.scrape();
  await new Promise((r) => setTimeout(r, options.intervalMs));
  const second = await source.scrape();
  const failed = second.filter((s) => s.error !== undefined);
  if (failed.length === second.length)
    throw new CliError(`Cannot read the metrics of any Sallyport agent (${second.length} tried)`, {
      details: failed.map((f) => `${f.node}: ${f.error}`),
    });
  for (const f of failed)
    options.warn?.(`warning: no figures from the agent on ${f.node}: ${f.error}`);
  const rows = topRows(first, second, options.intervalMs / 1000);
  const ns = options.namespace;
  return ns === undefined
    ? rows
    : rows.filter(
        (r) => !r.policy.startsWith("EgressPolicy/") || r.policy.startsWith(`EgressPolicy/${ns}/`),
      );
}
