/**
 * kubectl's conventions for reaching a cluster: `--kubeconfig` (else `KUBECONFIG`, a list of
 * files, else ~/.kube/config, else the pod's service account), `--context`, and `-n/--namespace`
 * (else the context's namespace, else "default").
 */
import { existsSync, readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import type { Command } from "commander";
import type { KubeClient, KubeConfig } from "../kube/client.ts";
import { CliError } from "./errors.ts";

export interface KubeFlags {
  readonly kubeconfig?: string;
  readonly context?: string;
  readonly namespace?: string;
}

export function kubeOptions(cmd: Command): Command {
  return cmd
    .option(
      "--kubeconfig <file>",
      "kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)",
    )
    .option("--context <name>", "kubeconfig context to use (default: the current context)")
    .option("-n, --namespace <namespace>", "namespace (default: the context's, else default)");
}

const SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount";

export interface Connection {
  readonly client: KubeClient;
  /** The namespace to use when none is given with the object. */
  readonly namespace: string;
  readonly config: KubeConfig;
}

export async function loadKubeConfig(
  flags: KubeFlags,
  env: NodeJS.ProcessEnv = process.env,
): Promise<KubeConfig> {
  const { KubeConfig } = await import("../kube/client.ts");
  const kc = new KubeConfig();
  const file = flags.kubeconfig ?? env.KUBECONFIG;
  try {
    if (flags.kubeconfig !== undefined) kc.loadFromFile(flags.kubeconfig);
    else if (env.KUBECONFIG !== undefined && env.KUBECONFIG !== "") kc.loadFromDefault();
    else if (existsSync(join(homedir(), ".kube", "config"))) kc.loadFromDefault();
    else if (env.KUBERNETES_SERVICE_HOST !== undefined) kc.loadFromCluster();
    else
      throw new CliError(
        "Cannot find a kubeconfig: pass --kubeconfig, set KUBECONFIG, or create ~/.kube/config",
      );
  } catch (e) {
    if (e instanceof CliError) throw e;
    const code = (e as { code?: string }).code;
    throw new CliError(
      `Cannot read kubeconfig ${file ?? "~/.kube/config"}: ${code === "ENOENT" ? "no such file" : (e as Error).message}`,
    );
  }
  if (flags.context !== undefined) {
    const names = kc.getContexts().map((c) => c.name);
    if (!names.includes(flags.context))
      throw new CliError(
        `Cannot use context "${flags.context}": the kubeconfig has ${names.length === 0 ? "no contexts" : `only ${names.join(", ")}`}`,
      );
    kc.setCurrentContext(flags.context);
  }
  if (kc.getCurrentCluster() === null)
    throw new CliError(
      `Cannot use context "${kc.getCurrentContext()}": the kubeconfig has no cluster for it; pick one with --context`,
    );
  return kc;
}

export async function connect(
  flags: KubeFlags,
  env: NodeJS.ProcessEnv = process.env,
): Promise<Connection> {
  const config = await loadKubeConfig(flags, env);
  const { KubeClient } = await import("../kube/client.ts");
  const fromContext = config.getContextObject(config.getCurrentContext())?.namespace;
  let namespace = flags.namespace ?? fromContext;
  if (namespace === undefined && existsSync(join(SERVICE_ACCOUNT, "namespace")))
    namespace = readFileSync(join(SERVICE_ACCOUNT, "namespace"), "utf8").trim();
  return { client: new KubeClient(config), namespace: namespace ?? "default", config };
}
