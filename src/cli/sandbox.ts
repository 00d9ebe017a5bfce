/** `sallyport sandbox …`: drive the simulated cluster from the command line. */
import { readFileSync } from "node:fs";
import { type Command, Option } from "commander";
import type { Family } from "../lib/ip.ts";
import type { Sandbox as SandboxType } from "../sandbox/sandbox.ts";
import { UsageError } from "./errors.ts";
import { readManifests } from "./input.ts";
import { int, port } from "./program.ts";

const CONTROL_PLANE_LOGS = ["kube-apiserver", "etcd", "kube-controller-manager"] as const;

/** Loaded on use: the sandbox brings the Kubernetes client and the kernel layer. */
async function sandboxModule() {
  return import("../sandbox/sandbox.ts");
}

async function openSandbox(prefix: string): Promise<SandboxType> {
  return (await sandboxModule()).Sandbox.open(prefix);
}

/** The cluster's status (status.ts), then the sandbox's pods and processes. */
export async function printStatus(sb: SandboxType): Promise<string> {
  const { clusterStatus, table } = await import("./status.ts");
  const out = [await clusterStatus(sb.admin())];
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

/**
 * `k=v,k2=v2` (and `k-`, which removes k) as kubectl's label arguments; throws a UsageError that
 * names `what` for anything else.
 */
export function parseLabels(text: string, what: string): Record<string, string | null> {
  const labels: Record<string, string | null> = {};
  for (const item of text.split(",").filter(Boolean)) {
    const eq = item.indexOf("=");
    if (eq > 0) labels[item.slice(0, eq)] = item.slice(eq + 1);
    else if (item.endsWith("-") && item.length > 1) labels[item.slice(0, -1)] = null;
    else throw new UsageError(`Cannot parse ${what}: "${item}" is neither k=v nor k-`);
  }
  return labels;
}

/** `80`, `80:8080`, `53:8080/udp`, comma-separated. */
export function parsePorts(
  text: string,
): { port: number; targetPort: number; protocol: "TCP" | "UDP" }[] {
  return text
    .split(",")
    .filter(Boolean)
    .map((item) => {
      const m = /^(\d+)(?::(\d+))?(?:\/(tcp|udp))?$/i.exec(item.trim());
      const port = Number(m?.[1]);
      const targetPort = Number(m?.[2] ?? m?.[1]);
      if (m === null || !(port >= 1 && port <= 65535 && targetPort >= 1 && targetPort <= 65535))
        throw new UsageError(
          `Cannot parse --port: "${item}" is not port[:targetPort][/udp] (e.g. 80:8080 or 53:8080/udp)`,
        );
      return { port, targetPort, protocol: m[3]?.toLowerCase() === "udp" ? "UDP" : "TCP" };
    });
}

/** `sandbox exec POD -- CMD …`: the `--` is commander's to keep, not the command's. */
export function commandOf(args: readonly string[]): string[] {
  return args[0] === "--" ? args.slice(1) : [...args];
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
    .option("--nodes <n>", "number of nodes", int, 3)
    .option("--ipv6", "IPv6 only")
    .option("--dual-stack", "IPv4 and IPv6")
    .option("--agent-image <image>", "run the node agents from this image (podman; make image)")
    .addOption(
      new Option("--proxy-mode <mode>", "kube-proxy's mode on every node")
        .choices(["iptables", "nftables"])
        .default("iptables"),
    )
    .action(
      async (f: {
        prefix: string;
        nodes: number;
        ipv6?: boolean;
        dualStack?: boolean;
        agentImage?: string;
        proxyMode: "iptables" | "nftables";
      }) => {
        const families: Family[] = f.dualStack ? [4, 6] : f.ipv6 ? [6] : [4];
        const s = await (await sandboxModule()).Sandbox.up(
          {
            prefix: f.prefix,
            nodes: f.nodes,
            families,
            proxyMode: f.proxyMode,
            ...(f.agentImage === undefined ? {} : { agentImage: f.agentImage }),
          },
          (l) => console.log(`- ${l}`),
        );
        console.log(
          `sandbox "${s.prefix}" is up: API server ${s.controlPlane?.url}; try "sallyport sandbox status"`,
        );
        process.exit(0);
      },
    );

  prefixOpt(
    sb.command("down").description("remove everything of the sandbox (also after a crash)"),
  ).action(async (f: { prefix: string }) => {
    const removed = await (await sandboxModule()).Sandbox.down(f.prefix);
    console.log(`removed ${removed.length} namespaces`);
  });

  prefixOpt(sb.command("status").description("gateways, policies, pods and processes")).action(
    async (f: { prefix: string }) => {
      console.log(await printStatus(await openSandbox(f.prefix)));
    },
  );

  prefixOpt(
    sb
      .command("apply")
      .description(
        "create or update Sallyport objects from a YAML file; the API server rejects unknown fields (strict field validation, as kubectl apply)",
      ),
  )
    .requiredOption("-f, --filename <file>", "YAML file, - for stdin")
    .action(async (f: { prefix: string; filename: string }) => {
      const objects = readManifests([f.filename]);
      const { applyObjects } = await import("../kube/apply.ts");
      await applyObjects((await openSandbox(f.prefix)).admin(), objects, "replace", {
        onApplied: (line) => console.log(line),
      });
    });

  prefixOpt(
    sb
      .command("add-pod")
      .description(
        "add a pod as kubelet and a container runtime do: the Pod object, its network namespace plugged by CNI ADD, then Running with its addresses",
      )
      .argument("<name>"),
  )
    .requiredOption("--node <i>", "node number", int)
    .option("--namespace <ns>", "Kubernetes namespace", "default")
    .option("--labels <k=v,…>", "labels", "")
    .option("--echo", `its container is the echo server (TCP and UDP port 8080)`)
    .action(
      async (
        name: string,
        f: { prefix: string; node: number; namespace: string; labels: string; echo?: boolean },
      ) => {
        const labels = parseLabels(f.labels, "--labels");
        for (const [k, v] of Object.entries(labels))
          if (v === null)
            throw new UsageError(`Cannot add pod ${name}: label ${k}- removes a label`);
        const p = await (await openSandbox(f.prefix)).addPod(name, {
          node: f.node,
          namespace: f.namespace,
          labels: labels as Record<string, string>,
          echo: f.echo === true,
        });
        console.log(
          `pod ${p.namespace}/${p.name} on node-${p.node}: ${Object.values(p.ips).join(", ")}`,
        );
      },
    );

  prefixOpt(
    sb
      .command("delete-pod")
      .description(
        "delete a pod: the object is marked for deletion, CNI DEL, its namespace and its object go",
      )
      .argument("<pod>", "NAME or NAMESPACE/NAME"),
  ).action(async (pod: string, f: { prefix: string }) => {
    const p = await (await openSandbox(f.prefix)).deletePod(pod);
    console.log(`pod ${p.namespace}/${p.name} deleted`);
  });

  prefixOpt(
    sb
      .command("label-pod")
      .description("set or remove labels of a pod, as kubectl label does: k=v sets, k- removes")
      .argument("<pod>", "NAME or NAMESPACE/NAME")
      .argument("<labels...>", "k=v or k-"),
  ).action(async (pod: string, labels: string[], f: { prefix: string }) => {
    const changes = parseLabels(labels.join(","), "label-pod");
    const p = await (await openSandbox(f.prefix)).labelPod(pod, changes);
    const text = Object.entries(p.labels)
      .map(([k, v]) => `${k}=${v}`)
      .join(",");
    console.log(`pod ${p.namespace}/${p.name} labelled: ${text || "(no labels)"}`);
  });

  prefixOpt(
    sb
      .command("add-service")
      .description(
        "add a Service; kube-controller-manager makes its EndpointSlices, kube-proxy its rules",
      )
      .argument("<name>"),
  )
    .requiredOption("--selector <k=v,…>", "the pods it selects")
    .requiredOption("--port <port[:target][/udp]…>", "ports, comma-separated: 80:8080, 53:8080/udp")
    .option("--namespace <ns>", "Kubernetes namespace", "default")
    .addOption(
      new Option("--type <type>", "Service type")
        .choices(["ClusterIP", "NodePort"])
        .default("ClusterIP"),
    )
    .addOption(
      new Option("--external-traffic-policy <policy>", "of a NodePort Service")
        .choices(["Cluster", "Local"])
        .default("Cluster"),
    )
    .action(
      async (
        name: string,
        f: {
          prefix: string;
          selector: string;
          port: string;
          namespace: string;
          type: "ClusterIP" | "NodePort";
          externalTrafficPolicy: "Cluster" | "Local";
        },
      ) => {
        const selector = parseLabels(f.selector, "--selector");
        if (Object.keys(selector).length === 0 || Object.values(selector).includes(null))
          throw new UsageError(`Cannot add service ${name}: --selector needs k=v pairs`);
        const ports = parsePorts(f.port);
        const svc = await (await openSandbox(f.prefix)).addService(name, {
          namespace: f.namespace,
          selector: selector as Record<string, string>,
          ports,
          type: f.type,
          externalTrafficPolicy: f.externalTrafficPolicy,
        });
        const nodePorts = Object.entries(svc.nodePorts).map(([p, n]) => `${p}→node port ${n}`);
        console.log(
          `service ${svc.namespace}/${svc.name}: ${Object.values(svc.clusterIPs).join(", ")}${nodePorts.length > 0 ? `; ${nodePorts.join(", ")}` : ""}`,
        );
      },
    );

  prefixOpt(
    sb
      .command("kubectl")
      .description(
        "the real kubectl (built from the pinned Kubernetes) against the sandbox's API server: kubectl get egp -o wide",
      )
      .argument("<args...>")
      // Everything after `kubectl` is kubectl's own, flags included.
      .passThroughOptions()
      .allowUnknownOption(),
  ).action(async (args: string[], f: { prefix: string }) => {
    const { spawnSync } = await import("node:child_process");
    const argv = (await openSandbox(f.prefix)).kubectlArgv(commandOf(args));
    const r = spawnSync(argv[0]!, argv.slice(1), { stdio: "inherit" });
    process.exit(r.status ?? 1);
  });

  prefixOpt(
    sb
      .command("exec")
      .description(
        "run a command in a pod's network namespace; its options are its own: exec POD curl -s URL, or exec POD -- curl -s URL",
      )
      .argument("<pod>")
      .argument("<command...>")
      // Everything after POD belongs to the command, options included (kubectl exec's habit).
      .passThroughOptions(),
  ).action(async (pod: string, args: string[], f: { prefix: string }) => {
    const command = commandOf(args);
    if (command.length === 0) throw new UsageError("Cannot exec: name the command after the pod");
    const { spawnSync } = await import("node:child_process");
    const p = (await openSandbox(f.prefix)).pod(pod);
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
      const s = await openSandbox(f.prefix);
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
    .option("--port <port>", "destination port (TCP)", port)
    .action(async (pod: string, destination: string, f: { prefix: string; port?: number }) => {
      const { explain, formatExplanation } = await import("./explain.ts");
      const e = await explain((await openSandbox(f.prefix)).admin(), {
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
    await (await openSandbox(f.prefix)).killNode(Number(i));
    console.log(`node-${i} is cut off`);
  });

  prefixOpt(
    sb.command("revive-node").description("reconnect a node and restart its agent").argument("<i>"),
  ).action(async (i: string, f: { prefix: string }) => {
    await (await openSandbox(f.prefix)).reviveNode(Number(i));
    console.log(`node-${i} is back`);
  });

  prefixOpt(
    sb
      .command("logs")
      .description(
        "logs of a component (controller, agent-N, kube-proxy-N, external, kube-apiserver, kube-controller-manager)",
      )
      .argument("[component]"),
  ).action(async (component: string | undefined, f: { prefix: string }) => {
    const s = await openSandbox(f.prefix);
    if (component === undefined)
      console.log(`components: ${[...s.components(), ...CONTROL_PLANE_LOGS].join(", ")}`);
    else if ((CONTROL_PLANE_LOGS as readonly string[]).includes(component))
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
