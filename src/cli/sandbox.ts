/** `sallyport sandbox …`: drive the simulated cluster from the command line. */
import { readFileSync } from "node:fs";
import type { Command } from "commander";
import { ours } from "../kube/client.ts";
import type { Family } from "../lib/ip.ts";
import { Sandbox } from "../sandbox/sandbox.ts";

interface Row {
  [column: string]: string | number | undefined;
}

function table(rows: Row[]): string {
  if (rows.length === 0) return "(none)";
  const cols = Object.keys(rows[0]!);
  const width = cols.map((c) => Math.max(c.length, ...rows.map((r) => String(r[c] ?? "").length)));
  const line = (vals: string[]) =>
    vals
      .map((v, i) => v.padEnd(width[i]!))
      .join("  ")
      .trimEnd();
  return [
    line(cols.map((c) => c.toUpperCase())),
    ...rows.map((r) => line(cols.map((c) => String(r[c] ?? "")))),
  ].join("\n");
}

type Cond = { type: string; status: string; reason: string };
type Obj = {
  metadata: { name?: string; namespace?: string };
  spec: Record<string, unknown>;
  status?: Record<string, unknown> & { conditions?: Cond[] };
};

export async function printStatus(sb: Sandbox): Promise<string> {
  const admin = sb.admin();
  const out: string[] = [];
  const gws = (await admin.listAll<Obj & never>(ours("EgressGateway"))).items as Obj[];
  out.push(
    "GATEWAYS",
    table(
      gws.map((g) => ({
        name: g.metadata.name,
        ready: `${g.status?.readyNodes ?? 0}/${g.status?.totalNodes ?? 0}`,
        pool: g.status?.poolUsage as string,
        nodes: ((g.status?.nodes as { name: string; ready: boolean; egressIPs?: string[] }[]) ?? [])
          .map(
            (n) =>
              `${n.name}${n.ready ? "" : "(down)"}${(n.egressIPs ?? []).length > 0 ? `[${n.egressIPs!.join(",")}]` : ""}`,
          )
          .join(" "),
      })),
    ),
  );
  const policies = [
    ...((await admin.listAll<Obj & never>(ours("EgressPolicy"))).items as Obj[]),
    ...((await admin.listAll<Obj & never>(ours("ClusterEgressPolicy"))).items as Obj[]),
  ];
  out.push(
    "",
    "POLICIES",
    table(
      policies.map((p) => {
        const ready = p.status?.conditions?.find((c) => c.type === "Ready");
        return {
          name:
            p.metadata.namespace === undefined
              ? p.metadata.name
              : `${p.metadata.namespace}/${p.metadata.name}`,
          "egress-ips": ((p.status?.egressIPs as string[]) ?? []).join(","),
          node: p.status?.gatewayNode as string,
          pods: p.status?.matchedPods as number,
          programmed: p.status?.programmed as string,
          ready:
            ready === undefined
              ? ""
              : `${ready.status}${ready.status === "True" ? "" : ` (${ready.reason})`}`,
        };
      }),
    ),
  );
  out.push(
    "",
    "PODS",
    table(
      sb.pods().map((p) => ({
        pod: `${p.namespace}/${p.name}`,
        node: sb.nodeName(p.node),
        ips: Object.values(p.ips).join(","),
        labels: Object.entries(p.labels)
          .map(([k, v]) => `${k}=${v}`)
          .join(","),
      })),
    ),
  );
  out.push("", "PROCESSES", sb.components().join(" "));
  return out.join("\n");
}

export function sandboxCommands(program: Command): void {
  const sb = program
    .command("sandbox")
    .description("a whole cluster in network namespaces on this machine");
  const prefixOpt = (c: Command) =>
    c.option("--prefix <p>", "namespace prefix of the sandbox", "sp");

  prefixOpt(
    sb
      .command("up")
      .description(
        "build the network, start kube-apiserver, the controller and one agent per node",
      ),
  )
    .option("--nodes <n>", "number of nodes", (v) => Number(v), 3)
    .option("--ipv6", "IPv6 only")
    .option("--dual-stack", "IPv4 and IPv6")
    .action(async (f: { prefix: string; nodes: number; ipv6?: boolean; dualStack?: boolean }) => {
      const families: Family[] = f.dualStack ? [4, 6] : f.ipv6 ? [6] : [4];
      const s = await Sandbox.up({ prefix: f.prefix, nodes: f.nodes, families }, (l) =>
        console.log(`- ${l}`),
      );
      console.log(
        `sandbox "${s.prefix}" is up: API server ${s.controlPlane?.url}; try "sallyport sandbox status"`,
      );
      process.exit(0);
    });

  prefixOpt(
    sb.command("down").description("remove everything of the sandbox (also after a crash)"),
  ).action(async (f: { prefix: string }) => {
    const removed = await Sandbox.down(f.prefix);
    console.log(`removed ${removed.length} namespaces`);
  });

  prefixOpt(sb.command("status").description("gateways, policies, pods and processes")).action(
    async (f: { prefix: string }) => {
      console.log(await printStatus(Sandbox.open(f.prefix)));
    },
  );

  prefixOpt(sb.command("apply").description("create or update Sallyport objects from a YAML file"))
    .requiredOption("-f, --file <file>", "YAML file")
    .action(async (f: { prefix: string; file: string }) => {
      for (const line of await Sandbox.open(f.prefix).apply(readFileSync(f.file, "utf8")))
        console.log(line);
    });

  prefixOpt(
    sb
      .command("add-pod")
      .description("add a pod (a namespace on a node, and its Pod object)")
      .argument("<name>"),
  )
    .requiredOption("--node <i>", "node number", (v) => Number(v))
    .option("--namespace <ns>", "Kubernetes namespace", "default")
    .option("--labels <k=v,…>", "labels", "")
    .action(
      async (
        name: string,
        f: { prefix: string; node: number; namespace: string; labels: string },
      ) => {
        const labels = Object.fromEntries(
          f.labels
            .split(",")
            .filter(Boolean)
            .map((kv) => kv.split("=") as [string, string]),
        );
        const p = await Sandbox.open(f.prefix).addPod(name, {
          node: f.node,
          namespace: f.namespace,
          labels,
        });
        console.log(
          `pod ${p.namespace}/${p.name} on node-${p.node}: ${Object.values(p.ips).join(", ")}`,
        );
      },
    );

  prefixOpt(
    sb
      .command("exec")
      .description("run a command in a pod's network namespace")
      .argument("<pod>")
      .argument("<command...>"),
  ).action(async (pod: string, command: string[], f: { prefix: string }) => {
    const { spawnSync } = await import("node:child_process");
    const p = Sandbox.open(f.prefix).pod(pod);
    const r = spawnSync("ip", ["netns", "exec", p.netns, ...command], { stdio: "inherit" });
    process.exit(r.status ?? 1);
  });

  prefixOpt(
    sb
      .command("probe")
      .description(
        "connect from a pod to the external server, which answers with the source address it saw",
      )
      .argument("<pod>"),
  )
    .option("--ipv6", "over IPv6")
    .option("--udp", "a UDP datagram instead of a TCP connection")
    .action(async (pod: string, f: { prefix: string; ipv6?: boolean; udp?: boolean }) => {
      const { probeOnce } = await import("../sandbox/probe.ts");
      const s = Sandbox.open(f.prefix);
      const target = s.externalTarget(f.ipv6 ? 6 : 4);
      const r = await probeOnce(s.pod(pod).netns, target, { udp: f.udp === true });
      console.log(r.ok ? `${target} saw ${r.saw}` : `${target}: ${r.error}`);
      process.exit(r.ok ? 0 : 1);
    });

  prefixOpt(
    sb
      .command("explain")
      .description("sallyport explain, against the sandbox's API server")
      .argument("<pod>")
      .argument("<destination>"),
  )
    .option("--port <port>", "destination port (TCP)", (v) => Number(v))
    .action(async (pod: string, destination: string, f: { prefix: string; port?: number }) => {
      const { explain, formatExplanation } = await import("./explain.ts");
      const e = await explain(Sandbox.open(f.prefix).admin(), {
        pod,
        destination,
        ...(f.port === undefined ? {} : { port: f.port, protocol: "tcp" as const }),
      });
      console.log(formatExplanation(e));
    });

  prefixOpt(
    sb
      .command("kill-node")
      .description("cut a node off completely: its agent dies and its uplink goes down")
      .argument("<i>"),
  ).action(async (i: string, f: { prefix: string }) => {
    await Sandbox.open(f.prefix).killNode(Number(i));
    console.log(`node-${i} is cut off`);
  });

  prefixOpt(
    sb.command("revive-node").description("reconnect a node and restart its agent").argument("<i>"),
  ).action(async (i: string, f: { prefix: string }) => {
    await Sandbox.open(f.prefix).reviveNode(Number(i));
    console.log(`node-${i} is back`);
  });

  prefixOpt(
    sb
      .command("logs")
      .description("logs of a component (controller, agent-N, external, kube-apiserver)")
      .argument("[component]"),
  ).action(async (component: string | undefined, f: { prefix: string }) => {
    const s = Sandbox.open(f.prefix);
    if (component === undefined)
      console.log(`components: ${[...s.components(), "kube-apiserver", "etcd"].join(", ")}`);
    else if (component === "kube-apiserver" || component === "etcd")
      console.log(readFileSync(`${s.dir}/controlplane/${component}.log`, "utf8"));
    else process.stdout.write(s.log(component));
  });

  prefixOpt(
    sb.command("demo").description("seed 003's verification and a gateway failover, end to end"),
  ).action(async (f: { prefix: string }) => {
    const { demo } = await import("../sandbox/demo.ts");
    process.exit((await demo(f.prefix)) ? 0 : 1);
  });
}
