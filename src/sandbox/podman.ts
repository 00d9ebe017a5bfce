/**
 * Agents from the image (`Sandbox.up({ agentImage })`): a node's agent runs in a container that
 * joins the node's network namespace, as the DaemonSet's pods join the host's (hostNetwork,
 * privileged), so the sandbox exercises the image's own iptables, ipset and ip.
 */
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";

const KUBECONFIG_IN_CONTAINER = "/etc/sallyport/kubeconfig";

/**
 * `podman run` options this machine needs: runc, because crun refuses its hybrid cgroups; and
 * explicit limits, because podman's defaults (1048576 open files) exceed what this process may
 * grant and runc refuses them. At most our own hard limits; 4096 processes are plenty.
 */
export function podmanRunOptions(): string[] {
  const limits = readFileSync("/proc/self/limits", "utf8");
  const hard = (name: string, cap: number) => {
    const value = new RegExp(`^${name}\\s+\\S+\\s+(\\S+)`, "m").exec(limits)?.[1];
    return value === undefined || value === "unlimited" ? cap : Math.min(Number(value), cap);
  };
  const nofile = hard("Max open files", 1048576);
  const nproc = hard("Max processes", 4096);
  return [
    "--runtime",
    "runc",
    "--ulimit",
    `nofile=${nofile}:${nofile}`,
    "--ulimit",
    `nproc=${nproc}:${nproc}`,
  ];
}

/** The argv that runs `sallyport agent <args>` from `image` inside network namespace `netns`. */
export function agentContainerArgv(options: {
  readonly name: string;
  readonly image: string;
  readonly netns: string;
  readonly kubeconfig: string;
  readonly args: readonly string[];
  /** More `--volume` mounts, "host:container". */
  readonly volumes?: readonly string[];
}): string[] {
  return [
    "podman",
    "run",
    "--rm",
    "--name",
    options.name,
    "--network",
    `ns:/run/netns/${options.netns}`,
    "--privileged",
    ...podmanRunOptions(),
    "--volume",
    `${options.kubeconfig}:${KUBECONFIG_IN_CONTAINER}:ro`,
    ...(options.volumes ?? []).flatMap((v) => ["--volume", v]),
    options.image,
    "agent",
    "--kubeconfig",
    KUBECONFIG_IN_CONTAINER,
    ...options.args,
  ];
}

/** Signals a container's main process; false when there is no such running container. */
export function signalContainer(name: string, signal: NodeJS.Signals): boolean {
  return spawnSync("podman", ["kill", "--signal", signal, name], { stdio: "ignore" }).status === 0;
}

/** Removes containers whatever their state; those that do not exist are no error. */
export function removeContainers(names: readonly string[]): void {
  if (names.length === 0) return;
  spawnSync("podman", ["rm", "--force", "--ignore", "--time", "0", ...names], { stdio: "ignore" });
}
