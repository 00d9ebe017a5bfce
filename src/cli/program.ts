/**
 * The `sallyport` command tree. As a kubectl plugin (`kubectl sallyport …`, bin/kubectl-sallyport)
 * it holds only the commands that read or write the cluster's API the way kubectl does: explain,
 * status, top, convert and validate.
 */
import { Command, InvalidArgumentError, Option } from "commander";
import { convertCommand } from "./convert.ts";
import { applyConventions } from "./errors.ts";
import { connect, type KubeFlags, kubeOptions } from "./kube.ts";
import { validateCommand } from "./validate.ts";

/** Commands that run Sallyport itself (processes.ts), loaded only when asked for. */
export const PROCESS_COMMANDS = ["cleanup", "datapath", "controller", "agent", "sandbox", "cni"];

export const int = (v: string): number => {
  const n = Number(v);
  if (v.trim() === "" || !Number.isInteger(n) || n < 0)
    throw new InvalidArgumentError("Expected a non-negative integer.");
  return n;
};

export const port = (v: string): number => {
  const n = Number(v);
  if (v.trim() === "" || !Number.isInteger(n) || n < 1 || n > 65535)
    throw new InvalidArgumentError("Expected a port number from 1 to 65535.");
  return n;
};

/** `explain` and `status`: the cluster's API, reached as kubectl reaches it. */
function clusterCommands(program: Command): void {
  kubeOptions(
    program
      .command("explain")
      .description(
        "what happens to a packet from a pod to a destination: the policy that decides, the path, the egress IP the destination sees, and the rules on each node",
      )
      .argument("<pod>", "NAME (in -n, or the context's namespace) or NAMESPACE/NAME")
      .argument("<destination>", "an IP address")
      .option("--port <port>", "destination port", port)
      .addOption(
        new Option("--protocol <protocol>", "with --port")
          .choices(["tcp", "udp", "sctp"])
          .default("tcp"),
      )
      .option("--json", "print the explanation as JSON"),
  ).action(
    async (
      pod: string,
      destination: string,
      f: KubeFlags & { port?: number; protocol: "tcp" | "udp" | "sctp"; json?: boolean },
    ) => {
      const { explain, formatExplanation } = await import("./explain.ts");
      const c = await connect(f);
      const e = await explain(c.client, {
        pod: pod.includes("/") ? pod : `${c.namespace}/${pod}`,
        destination,
        ...(f.port === undefined ? {} : { port: f.port, protocol: f.protocol }),
      });
      console.log(f.json === true ? JSON.stringify(e, null, 2) : formatExplanation(e));
    },
  );

  kubeOptions(
    program
      .command("status")
      .description(
        "gateways and policies as the controller reports them, and why those not Ready are not; or one of them in detail",
      )
      .argument("[object]", "egp/NAME (or NAME), cegp/NAME or egw/NAME")
      .option("-A, --all-namespaces", "EgressPolicies of every namespace (the default without -n)"),
  ).action(async (ref: string | undefined, f: KubeFlags & { allNamespaces?: boolean }) => {
    const { clusterStatus, objectStatus } = await import("./status.ts");
    const c = await connect(f);
    console.log(
      ref === undefined
        ? await clusterStatus(c.client, {
            namespace: f.allNamespaces === true ? undefined : f.namespace,
          })
        : await objectStatus(c.client, ref, c.namespace),
    );
  });
}

/** `top`: the agents' traffic figures per policy and egress IP (src/cli/top.ts). */
function topCommand(program: Command, plugin: boolean): void {
  const cmd = kubeOptions(
    program
      .command("top")
      .description(
        "per policy and egress IP: packets, bytes and connections per second steered and SNATed, connections through the egress IP and its busiest destination's source-port use, from the agents' metrics",
      )
      .option(
        "--interval <seconds>",
        "time between the two scrapes rates are computed from",
        seconds,
        2,
      )
      .option(
        "--sallyport-namespace <namespace>",
        "where the agents run (their metrics are read through the API server's pod proxy)",
        "sallyport-system",
      ),
  );
  if (!plugin)
    cmd.option(
      "--sandbox <prefix>",
      "read the agents of the sandbox with this prefix (in their nodes' namespaces) instead",
    );
  cmd.action(
    async (f: KubeFlags & { interval: number; sallyportNamespace: string; sandbox?: string }) => {
      const { formatTop, PodProxySource, SandboxSource, top } = await import("./top.ts");
      let source: import("./top.ts").MetricsSource;
      if (f.sandbox !== undefined) {
        const { Sandbox } = await import("../sandbox/sandbox.ts");
        const sb = Sandbox.open(f.sandbox);
        source = new SandboxSource(
          Array.from({ length: sb.nodeCount }, (_, i) => ({
            name: sb.nodeName(i + 1),
            netns: sb.nodeNs(i + 1),
          })),
        );
      } else {
        source = new PodProxySource((await connect(f)).client, f.sallyportNamespace);
      }
      const rows = await top(source, {
        intervalMs: f.interval * 1000,
        namespace: f.namespace,
        warn: (line) => console.error(line),
      });
      console.log(formatTop(rows));
    },
  );
}

const seconds = (v: string): number => {
  const n = Number(v);
  if (v.trim() === "" || !Number.isFinite(n) || n <= 0 || n > 3600)
    throw new InvalidArgumentError(
      "Expected seconds, more than 0 and at most 3600 (e.g. 2 or 0.5).",
    );
  return n;
};

/**
 * @param options.argv the command line: the process commands (and the Kubernetes client and
 *   kernel layer they load) are added only when it names one of them or asks for the full help
 */
export async function buildProgram(
  options: { plugin?: boolean; argv?: readonly string[] } = {},
): Promise<Command> {
  const plugin = options.plugin === true;
  const program = new Command(plugin ? "kubectl sallyport" : "sallyport")
    .description(
      plugin
        ? "Sallyport, the egress gateway, from kubectl: the flags --kubeconfig, --context and -n work as in kubectl"
        : "Egress gateway for Kubernetes",
    )
    .enablePositionalOptions();

  clusterCommands(program);
  topCommand(program, plugin);
  convertCommand(program);
  validateCommand(program);
  const first = options.argv?.slice(2).find((a) => !a.startsWith("-"));
  if (!plugin && (first === undefined || first === "help" || PROCESS_COMMANDS.includes(first))) {
    const { processCommands } = await import("./processes.ts");
    processCommands(program);
  }
  applyConventions(program);
  return program;
}
