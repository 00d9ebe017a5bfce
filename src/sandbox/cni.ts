/**
 * The sandbox's pod network, plugged the way a container runtime does it: a network
 * configuration list per node (one function builds it, so that a chained plugin can be appended
 * later), and the CNI protocol (CNI_* environment, the plugin's configuration on stdin, the
 * previous plugin's result passed on as `prevResult`, DEL in reverse order) over the reference
 * plugins built from test/cni-bin/go.mod. What libcni does, in the few lines the sandbox needs.
 */
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { Runner } from "../kernel/runner.ts";
import type { Family } from "../lib/ip.ts";
import { REPO } from "./controlplane.ts";

export const CNI_VERSION = "1.1.0";
/** The network's name: host-local's state directory and the bridge plugin's chain names use it. */
export const NETWORK_NAME = "sandbox";

/** One plugin of a configuration list: its `type` names the binary in CNI_PATH. */
export interface PluginConf {
  readonly type: string;
  readonly [key: string]: unknown;
}

export interface NetworkConfList {
  readonly cniVersion: string;
  readonly name: string;
  readonly plugins: readonly PluginConf[];
}

/** What a plugin returns (CNI spec, "Success"), the parts the sandbox reads. */
export interface CniResult {
  readonly cniVersion: string;
  readonly interfaces?: readonly { name: string; mac?: string; sandbox?: string }[];
  readonly ips?: readonly { address: string; gateway?: string; interface?: number }[];
  readonly [key: string]: unknown;
}

/** Builds (once) and returns the directory holding the plugins: the sandbox's CNI_PATH. */
export function cniBinaries(): string {
  const dir = process.env.SALLYPORT_CNI_BIN;
  if (dir !== undefined) return dir;
  const out = execFileSync(join(REPO, "test", "cni-bin", "build.sh"), {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
  });
  return out.trim().split("\n").pop()!;
}

/**
 * A node's configuration list: the bridge plugin with host-local addresses from the node's pod
 * CIDRs, the pods' default routes through the bridge, and its own masquerade chains (`ipMasq`,
 * as a plain bridge network installs them), then portmap for hostPort. `chained` plugins come
 * last, where a chained plugin (Sallyport's own, one day) sees the pod's addresses in
 * `prevResult`.
 */
export function nodeConfList(options: {
  readonly podCIDRs: Readonly<Partial<Record<Family, string>>>;
  /** host-local's state: under the sandbox's directory, not /var/lib/cni. */
  readonly ipamDataDir: string;
  readonly chained?: readonly PluginConf[];
}): NetworkConfList {
  const families = ([4, 6] as const).filter((f) => options.podCIDRs[f] !== undefined);
  return {
    cniVersion: CNI_VERSION,
    name: NETWORK_NAME,
    plugins: [
      {
        type: "bridge",
        bridge: "cni0",
        isDefaultGateway: true,
        ipMasq: true,
        hairpinMode: true,
        ipam: {
          type: "host-local",
          dataDir: options.ipamDataDir,
          ranges: families.map((f) => [{ subnet: options.podCIDRs[f] }]),
        },
      },
      { type: "portmap", capabilities: { portMappings: true } },
      ...(options.chained ?? []),
    ],
  };
}

/** CRI-O's way of bringing up a pod's loopback: a network of its own with the loopback plugin. */
export const LOOPBACK: NetworkConfList = {
  cniVersion: CNI_VERSION,
  name: "cni-loopback",
  plugins: [{ type: "loopback" }],
};

export interface CniRuntime {
  /** Runs in the namespace that owns the pod network (the node's). */
  readonly runner: Runner;
  /** CNI_PATH: where the plugin binaries are, directories separated by ":" (first match wins). */
  readonly cniPath: string;
}

export interface PodAttachment {
  /** CNI_CONTAINERID: unique per pod sandbox. */
  readonly containerId: string;
  /** CNI_NETNS: the path of the pod's network namespace. */
  readonly netns: string;
  /** CNI_IFNAME @default "eth0" */
  readonly ifname?: string;
  /** The pod, as kubelet's runtimes pass it in CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME). */
  readonly pod?: { readonly namespace: string; readonly name: string };
}

/** CNI_ARGS as containerd and CRI-O set them for a Kubernetes pod. */
export function k8sCniArgs(pod: PodAttachment): string | undefined {
  if (pod.pod === undefined) return undefined;
  return [
    "IgnoreUnknown=1",
    `K8S_POD_NAMESPACE=${pod.pod.namespace}`,
    `K8S_POD_NAME=${pod.pod.name}`,
    `K8S_POD_INFRA_CONTAINER_ID=${pod.containerId}`,
  ].join(";");
}

/** A plugin's binary: the first directory of CNI_PATH that holds it (libcni's FindInPath). */
function pluginBinary(cniPath: string, type: string): string {
  const dirs = cniPath.split(":").filter(Boolean);
  return join(dirs.find((d) => existsSync(join(d, type))) ?? dirs[0] ?? ".", type);
}

/** A plugin failed; the message is the plugin's own (CNI spec error codes). */
export class CniError extends Error {
  override readonly name = "CniError";
}

async function invoke(
  rt: CniRuntime,
  command: "ADD" | "DEL" | "CHECK",
  list: NetworkConfList,
  plugin: PluginConf,
  pod: PodAttachment,
  prevResult: CniResult | undefined,
): Promise<CniResult | undefined> {
  const conf = {
    ...plugin,
    cniVersion: list.cniVersion,
    name: list.name,
    ...(prevResult === undefined ? {} : { prevResult }),
  };
  const env = [
    `CNI_COMMAND=${command}`,
    `CNI_CONTAINERID=${pod.containerId}`,
    `CNI_NETNS=${pod.netns}`,
    `CNI_IFNAME=${pod.ifname ?? "eth0"}`,
    `CNI_PATH=${rt.cniPath}`,
  ];
  const args = k8sCniArgs(pod);
  if (args !== undefined) env.push(`CNI_ARGS=${args}`);
  const r = await rt.runner.run(["env", ...env, pluginBinary(rt.cniPath, plugin.type)], {
    stdin: JSON.stringify(conf),
  });
  if (r.code !== 0) {
    let msg = r.stderr.trim() || r.stdout.trim();
    try {
      const e = JSON.parse(r.stdout) as { code?: number; msg?: string; details?: string };
      msg = `${e.msg ?? "no message"}${e.details ? ` (${e.details})` : ""} [CNI error ${e.code}]`;
    } catch {
      // not the spec's error object: the raw output says more
    }
    throw new CniError(
      `Cannot ${command} pod network ${pod.containerId}: plugin ${plugin.type} of network "${list.name}" failed: ${msg}; see the plugin's configuration in the sandbox's cni/ directory`,
    );
  }
  return command === "ADD" ? (JSON.parse(r.stdout) as CniResult) : undefined;
}

/** CNI ADD of a whole list: each plugin gets the result of the one before as `prevResult`. */
export async function cniAdd(
  rt: CniRuntime,
  list: NetworkConfList,
  pod: PodAttachment,
): Promise<CniResult> {
  let result: CniResult | undefined;
  for (const plugin of list.plugins) result = await invoke(rt, "ADD", list, plugin, pod, result);
  if (result === undefined)
    throw new CniError(`Cannot ADD pod network: network "${list.name}" has no plugins`);
  return result;
}

/**
 * CNI DEL of a whole list, in reverse order, with the cached ADD result; every plugin is asked
 * even when one fails (DEL must clean up as much as it can), the first error is thrown after.
 */
export async function cniDel(
  rt: CniRuntime,
  list: NetworkConfList,
  pod: PodAttachment,
  prevResult: CniResult | undefined,
): Promise<void> {
  let first: unknown;
  for (const plugin of [...list.plugins].reverse()) {
    try {
      await invoke(rt, "DEL", list, plugin, pod, prevResult);
    } catch (e) {
      first ??= e;
    }
  }
  if (first !== undefined) throw first;
}

/** The pod's addresses from a result, by family (the interface inside the pod only). */
export function podIPs(result: CniResult, ifname = "eth0"): Partial<Record<Family, string>> {
  const ips: Partial<Record<Family, string>> = {};
  for (const ip of result.ips ?? []) {
    const iface = ip.interface === undefined ? undefined : result.interfaces?.[ip.interface];
    if (iface !== undefined && (iface.name !== ifname || iface.sandbox === undefined)) continue;
    const address = ip.address.split("/")[0]!;
    const family: Family = address.includes(":") ? 6 : 4;
    ips[family] ??= address;
  }
  return ips;
}
