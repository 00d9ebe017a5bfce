/**
 * The sandbox: a whole cluster on one machine, inside network namespaces.
 *
 *   <prefix>-cp     the control plane: etcd, kube-apiserver (192.168.77.2:6443),
 *                   kube-controller-manager (EndpointSlices of Services) and the controller with
 *                   its admission webhook, on the simulated segment
 *   <prefix>-nI     node I: kube-proxy (iptables or nftables mode), the real agent process, its
 *                   kernel datapath, a bridge CNI pod network with host-gw routes between nodes
 *   <prefix>-ext    the external server: answers with the source address it saw, and logs it
 *   <prefix>-p…     pods. The sandbox plays kubelet and container runtime: it registers Node
 *                   objects, creates a Pod object first, then its network namespace and CNI ADD
 *                   with the node's configuration list, then reports it Running with the
 *                   addresses CNI gave; deleting a pod is CNI DEL and the object's removal.
 *
 * State (processes, pods) is kept in a directory so that every `sallyport sandbox` command, and
 * `down` after a crash, finds it again. Nothing is configured in the root namespace.
 */
import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  chmodSync,
  cpSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { KINDS, type KindName } from "../api/types.ts";
import { httpTransport } from "../cni/plugin.ts";
import { CNI_PATHS } from "../cni/protocol.ts";
import { mustRun } from "../kernel/runner.ts";
import { applyManifests } from "../kube/apply.ts";
import {
  CORE,
  isAlreadyExists,
  isNotFound,
  type KubeClient,
  type KubeObject,
  ours,
  type Resource,
  resourcePath,
} from "../kube/client.ts";
import { type Family, tryParseAddress } from "../lib/ip.ts";
import type { CniResult, PluginConf } from "./cni.ts";
import {
  alive,
  ControlPlane,
  kubernetesBinaries,
  REPO,
  SALLYPORT_NAMESPACE,
  SANDBOX_CONTROLLERS,
} from "./controlplane.ts";
import {
  KUBE_PROXY_HEALTHZ,
  KUBE_PROXY_USER,
  kubeProxyArgv,
  type ProxyMode,
} from "./kube_proxy.ts";
import { selfSignedCert, webhookConfiguration } from "./pki.ts";
import { agentContainerArgv, removeContainers, signalContainer } from "./podman.ts";
import {
  EIP_POOL,
  EXTERNAL,
  nodeAddress,
  nsRunner,
  POD_SUPERNET,
  type PodHandle,
  podCIDR,
  Topology,
} from "./topology.ts";

const CLI = join(REPO, "src", "cli", "main.ts");
const ECHO = join(REPO, "src", "sandbox", "echo.ts");
export const CONTROL_PLANE_ADDRESS = { 4: "192.168.77.2", 6: "fd00:77::2" } as const;
export const SERVICE_CIDR = { 4: "10.96.0.0/16", 6: "fd00:96::/112" } as const;
/** The port of the echo server a pod runs when it is added with `echo: true`. */
export const POD_ECHO_PORT = 8080;

const SERVICES: Resource = { group: "", version: "v1", plural: "services", namespaced: true };

export interface SandboxOptions {
  /** Namespace prefix; every namespace is "<prefix>-…". @default "sp" */
  readonly prefix?: string;
  /** @default 3 */
  readonly nodes?: number;
  /** @default [4] */
  readonly families?: readonly Family[];
  /** Nodes labelled egress=true (gateway-capable). @default [2, 3] */
  readonly gatewayNodes?: readonly number[];
  /** Where state, logs and the control plane's data go. @default ~/.cache/sallyport/sandbox/<prefix> */
  readonly dir?: string;
  /** Extra agent flags, e.g. a shorter period in tests. */
  readonly agentArgs?: readonly string[];
  readonly controllerArgs?: readonly string[];
  /** Run each node's agent from this image (podman, in the node's namespace), not from src/. */
  readonly agentImage?: string;
  /** kube-proxy's mode on every node. @default "iptables" */
  readonly proxyMode?: ProxyMode;
  /** Plugins appended to every node's CNI configuration list (a chained plugin). */
  readonly chainedPlugins?: readonly PluginConf[];
  /**
   * sallyport-cni last in every node's configuration list, each node's agent serving it
   * (`--cni-socket`): a pod is in its policies' sets before CNI ADD returns. @default true
   */
  readonly sallyportCni?: boolean;
}

export interface PodOptions {
  readonly node: number;
  /** @default "default" */
  readonly namespace?: string;
  readonly labels?: Record<string, string>;
  /** The pod's container is the echo server (TCP and UDP on POD_ECHO_PORT). */
  readonly echo?: boolean;
}

export interface ServicePort {
  readonly port: number;
  /** @default port */
  readonly targetPort?: number;
  /** @default "TCP" */
  readonly protocol?: "TCP" | "UDP";
  readonly nodePort?: number;
  /** @default "<protocol>-<port>" */
  readonly name?: string;
}

export interface ServiceOptions {
  /** @default "default" */
  readonly namespace?: string;
  readonly selector: Record<string, string>;
  readonly ports: readonly ServicePort[];
  /** @default "ClusterIP" */
  readonly type?: "ClusterIP" | "NodePort";
  /** @default "Cluster" */
  readonly externalTrafficPolicy?: "Cluster" | "Local";
}

export interface SandboxService {
  readonly name: string;
  readonly namespace: string;
  readonly clusterIPs: Partial<Record<Family, string>>;
  /** By port: the node port the API server allocated (NodePort services). */
  readonly nodePorts: Record<number, number>;
}

export interface SandboxPod {
  readonly name: string;
  readonly namespace: string;
  readonly node: number;
  readonly netns: string;
  readonly ips: Partial<Record<Family, string>>;
  readonly labels: Record<string, string>;
  /** CNI_CONTAINERID and the ADD result (for DEL). */
  readonly cni?: { readonly containerId: string; readonly result: CniResult };
  readonly echo?: boolean;
}

interface SandboxState {
  prefix: string;
  nodes: number;
  families: Family[];
  gatewayNodes: number[];
  pids: Record<string, number>;
  pods: SandboxPod[];
  /** The number in the next pod namespace's name, `<prefix>-p<node>x<n>`. */
  nextPod: number;
  apiserver: string;
  cpDir: string;
  agentArgs: string[];
  controllerArgs: string[];
  agentImage?: string;
  proxyMode: ProxyMode;
  chainedPlugins?: PluginConf[];
  sallyportCni?: boolean;
}

export function sandboxDir(prefix: string): string {
  return join(
    process.env.SALLYPORT_CACHE ?? join(homedir(), ".cache", "sallyport"),
    "sandbox",
    prefix,
  );
}

export class Sandbox {
  readonly dir: string;
  #state: SandboxState;
  #cp: ControlPlane | undefined;
  #topology: Topology;
  readonly #children = new Map<string, ChildProcess>();

  private constructor(dir: string, state: SandboxState) {
    this.dir = dir;
    this.#state = state;
    this.#topology = new Topology({
      prefix: state.prefix,
      nodes: state.nodes,
      families: state.families,
      podNetwork: "cni",
      cniDir: join(dir, "cni"),
      chainedPlugins: (i) => [
        ...(state.chainedPlugins ?? []),
        ...(state.sallyportCni === true ? [this.#sallyportPlugin(i)] : []),
      ],
      ...(state.sallyportCni === true ? { extraCniPath: join(dir, "cni", "bin") } : {}),
    });
  }

  /** Where node `i`'s agent serves sallyport-cni (a directory of its own: podman mounts it). */
  cniSocketDir(i: number): string {
    return join(this.dir, "run", `node-${i}`);
  }

  #sallyportPlugin(i: number): PluginConf {
    return {
      type: "sallyport-cni",
      socket: join(this.cniSocketDir(i), "cni.sock"),
      timeoutMs: 10_000,
    };
  }

  /**
   * The plugin's executable, as `sallyport cni install` makes it on a host: a script that execs
   * node on the plugin's bundle (bundled from src/cni/ here: node starts it in about half the
   * time of the .ts files, 80 against 180 ms on a busy 2-core machine).
   */
  #installSallyportCni(): void {
    const bin = join(this.dir, "cni", "bin");
    mkdirSync(bin, { recursive: true });
    const bundle = join(bin, "sallyport-cni.mjs");
    // A process of its own: esbuild must not end up in the CLI's own bundle.
    execFileSync(process.execPath, [join(REPO, "scripts", "build.ts"), "--cni-plugin", bundle], {
      stdio: ["ignore", "ignore", "inherit"],
    });
    const file = join(bin, "sallyport-cni");
    writeFileSync(file, `#!/bin/sh\nexec '${process.execPath}' '${bundle}' "$@"\n`);
    chmodSync(file, 0o755);
  }

  get prefix(): string {
    return this.#state.prefix;
  }
  get families(): readonly Family[] {
    return this.#state.families;
  }
  get topology(): Topology {
    return this.#topology;
  }
  get nodeCount(): number {
    return this.#state.nodes;
  }
  get proxyMode(): ProxyMode {
    return this.#state.proxyMode;
  }
  get controlPlane(): ControlPlane | undefined {
    return this.#cp;
  }
  nodeName(i: number): string {
    return `node-${i}`;
  }
  nodeNs(i: number): string {
    return this.#topology.nodeNs(i);
  }
  get externalNs(): string {
    return this.#topology.externalNs;
  }
  get cpNs(): string {
    return `${this.prefix}-cp`;
  }
  externalTarget(family: Family, port = 8080): string {
    return family === 4 ? `${EXTERNAL[4]}:${port}` : `[${EXTERNAL[6]}]:${port}`;
  }

  static open(prefix = "sp"): Sandbox {
    const dir = sandboxDir(prefix);
    const file = join(dir, "state.json");
    if (!existsSync(file))
      throw new Error(`Cannot find sandbox "${prefix}": run "sallyport sandbox up" first`);
    const state = JSON.parse(readFileSync(file, "utf8")) as SandboxState;
    // A sandbox brought up by an older version: its pods came before these fields.
    state.nextPod ??= state.pods.length;
    state.proxyMode ??= "iptables";
    return new Sandbox(dir, state);
  }

  /** Builds the network, starts the control plane, the controller and every agent. */
  static async up(
    options: SandboxOptions = {},
    log: (line: string) => void = () => {},
  ): Promise<Sandbox> {
    const prefix = options.prefix ?? "sp";
    const dir = options.dir ?? sandboxDir(prefix);
    await Sandbox.down(prefix, dir);
    mkdirSync(dir, { recursive: true });
    const families = [...(options.families ?? [4])];
    const state: SandboxState = {
      prefix,
      nodes: options.nodes ?? 3,
      families,
      gatewayNodes: [...(options.gatewayNodes ?? [2, 3])],
      pids: {},
      pods: [],
      nextPod: 0,
      apiserver: "",
      cpDir: join(dir, "controlplane"),
      agentArgs: [...(options.agentArgs ?? [])],
      controllerArgs: [...(options.controllerArgs ?? [])],
      ...(options.agentImage === undefined ? {} : { agentImage: options.agentImage }),
      proxyMode: options.proxyMode ?? "iptables",
      ...(options.chainedPlugins === undefined
        ? {}
        : { chainedPlugins: [...options.chainedPlugins] }),
      sallyportCni: options.sallyportCni ?? true,
    };
    const sb = new Sandbox(dir, state);
    try {
      if (state.sallyportCni === true) sb.#installSallyportCni();
      log(`network: ${state.nodes} nodes, an external host, IPv${families.join("+IPv")}`);
      await sb.#topology.up();
      await sb.#controlPlaneNamespace();
      log("control plane: etcd, kube-apiserver, kube-controller-manager");
      const apiFamily: Family = families.includes(4) ? 4 : 6;
      sb.#cp = await ControlPlane.start({
        netns: sb.cpNs,
        address: CONTROL_PLANE_ADDRESS[apiFamily],
        dir: state.cpDir,
        detached: true,
        serviceCIDRs: families.map((f) => SERVICE_CIDR[f]),
        controllers: SANDBOX_CONTROLLERS,
        users: {
          [KUBE_PROXY_USER]: [],
          "sallyport-controller": ["sallyport:controllers"],
          ...Object.fromEntries(
            Array.from({ length: state.nodes }, (_, i) => [
              `sallyport-agent-${i + 1}`,
              ["sallyport:agents"],
            ]),
          ),
        },
      });
      state.apiserver = sb.#cp.url;
      sb.#save();
      const admin = sb.#cp.client();
      await sb.#registerNodes(admin);
      log(`kube-proxy (${state.proxyMode} mode) on every node`);
      await sb.#startKubeProxies();
      await sb.#startEcho();
      log("controller");
      await sb.#startController();
      log("agents");
      for (let i = 1; i <= state.nodes; i++) sb.startAgent(i);
      sb.#save();
      // As kubelet waits for the network plugin to be ready before it starts pods.
      for (let i = 1; i <= state.nodes; i++) await sb.waitCniReady(i);
      return sb;
    } catch (e) {
      await sb.destroy();
      throw e;
    }
  }

  async #controlPlaneNamespace(): Promise<void> {
    await this.#topology.addHost(this.cpNs, "vcp", CONTROL_PLANE_ADDRESS);
  }

  async #registerNodes(admin: KubeClient): Promise<void> {
    for (let i = 1; i <= this.#state.nodes; i++) {
      const addresses = this.families.map((f) => nodeAddress(i, f));
      const labels = this.#state.gatewayNodes.includes(i) ? { egress: "true" } : {};
      await admin.create(CORE.nodes, {
        apiVersion: "v1",
        kind: "Node",
        metadata: {
          name: this.nodeName(i),
          labels: { "kubernetes.io/hostname": this.nodeName(i), ...labels },
        },
        spec: {
          podCIDR: podCIDR(i, this.families[0]!),
          podCIDRs: this.families.map((f) => podCIDR(i, f)),
        },
      });
      await admin.mergePatch(
        CORE.nodes,
        this.nodeName(i),
        {
          status: {
            addresses: addresses.map((a) => ({ type: "InternalIP", address: a })),
            conditions: [
              {
                type: "Ready",
                status: "True",
                reason: "KubeletReady",
                message: "sandbox node",
                lastHeartbeatTime: new Date().toISOString(),
                lastTransitionTime: new Date().toISOString(),
              },
            ],
          },
        },
        { subresource: "status" },
      );
    }
  }

  /**
   * kube-proxy on every node, started before the agents and waited for until its first sync:
   * its jump rules go to the top of the built-in chains when it creates them, and the agents'
   * then come above (the agents move theirs back to the top; kube-proxy only adds a missing one).
   */
  async #startKubeProxies(): Promise<void> {
    const bin = kubernetesBinaries(["kube-proxy"]);
    const kubeconfig = this.#controlPlane().kubeconfig(KUBE_PROXY_USER);
    for (let i = 1; i <= this.#state.nodes; i++) {
      this.#spawn(
        `kube-proxy-${i}`,
        this.nodeNs(i),
        kubeProxyArgv({
          binary: join(bin, "kube-proxy"),
          configFile: join(this.dir, `kube-proxy-${i}.json`),
          kubeconfig,
          node: this.nodeName(i),
          mode: this.#state.proxyMode,
          clusterCIDRs: this.families.map((f) => POD_SUPERNET[f]),
        }),
      );
    }
    for (let i = 1; i <= this.#state.nodes; i++) await this.#waitKubeProxy(i);
  }

  async #waitKubeProxy(i: number): Promise<void> {
    const deadline = Date.now() + 60_000;
    const node = nsRunner(this.nodeNs(i));
    for (;;) {
      const r = await node.run(["curl", "-sf", "-m", "1", `http://${KUBE_PROXY_HEALTHZ}/healthz`]);
      if (r.code === 0) return;
      const pid = this.#state.pids[`kube-proxy-${i}`];
      if (pid === undefined || !alive(pid) || Date.now() > deadline) {
        const tail = this.log(`kube-proxy-${i}`).split("\n").slice(-6).join("\n");
        throw new Error(
          `kube-proxy on ${this.nodeName(i)} is not healthy (${pid !== undefined && alive(pid) ? "no successful sync within 60 s" : "it exited"}); its log ${join(this.dir, `kube-proxy-${i}.log`)} ends with:\n${tail}`,
        );
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /** Starts a process of the sandbox in `netns`, or as it is when `netns` is undefined. */
  #spawn(name: string, netns: string | undefined, argv: readonly string[]): ChildProcess {
    const log = openSync(join(this.dir, `${name}.log`), "a");
    const full = netns === undefined ? argv : ["ip", "netns", "exec", netns, ...argv];
    const child = spawn(full[0]!, full.slice(1), {
      stdio: ["ignore", log, log],
      detached: true,
    });
    child.unref();
    this.#children.set(name, child);
    this.#state.pids[name] = child.pid!;
    this.#save();
    return child;
  }

  async #startEcho(): Promise<void> {
    this.#spawn("external", this.externalNs, [
      process.execPath,
      ECHO,
      "serve",
      "--port",
      "8080",
      "--log",
      join(this.dir, "external-requests.log"),
    ]);
  }

  async #startController(): Promise<void> {
    const cp = this.#controlPlane();
    const address = CONTROL_PLANE_ADDRESS[this.families.includes(4) ? 4 : 6];
    const cert = selfSignedCert(this.dir, { ips: [address] });
    this.#spawn("controller", this.cpNs, [
      process.execPath,
      CLI,
      "controller",
      "--kubeconfig",
      cp.kubeconfig("sallyport-controller"),
      "--identity",
      "sandbox-controller",
      "--webhook-port",
      "9443",
      "--webhook-cert",
      cert.certFile,
      "--webhook-key",
      cert.keyFile,
      "--bind-address",
      address,
      ...this.#state.controllerArgs,
    ]);
    const admin = cp.client();
    try {
      await admin.create(
        {
          group: "admissionregistration.k8s.io",
          version: "v1",
          plural: "validatingwebhookconfigurations",
          namespaced: false,
        },
        webhookConfiguration(
          `https://${address.includes(":") ? `[${address}]` : address}:9443/validate`,
          cert.caBundle,
        ) as KubeObject,
      );
    } catch (e) {
      if (!isAlreadyExists(e)) throw e;
    }
  }

  /**
   * Starts (or restarts) the agent of node `i` inside its namespace; `extraArgs` follow the
   * sandbox's agent flags for this start only (e.g. a switch turned on for one node).
   */
  startAgent(i: number, extraArgs: readonly string[] = []): void {
    const kubeconfig = this.#controlPlane().kubeconfig(`sallyport-agent-${i}`);
    const args = [
      "--node",
      this.nodeName(i),
      "--families",
      this.families.join(","),
      ...this.#state.agentArgs,
      ...extraArgs,
    ];
    const image = this.#state.agentImage;
    const cni = this.#state.sallyportCni === true;
    if (cni) mkdirSync(this.cniSocketDir(i), { recursive: true, mode: 0o700 });
    // The liveness probes' key, as the chart's Secret sallyport-probe-key gives it to agents.
    const key = join(this.dir, "probe.key");
    if (!existsSync(key)) writeFileSync(key, randomBytes(32), { mode: 0o600 });
    if (image === undefined) {
      args.push("--probe-key-file", key);
      if (cni) args.push("--cni-socket", join(this.cniSocketDir(i), "cni.sock"));
      this.#spawn(`agent-${i}`, this.nodeNs(i), [
        process.execPath,
        CLI,
        "agent",
        "--kubeconfig",
        kubeconfig,
        ...args,
      ]);
      return;
    }
    const name = this.#agentContainer(i);
    removeContainers([name]);
    // In the container the socket is where the chart puts it: /run/sallyport from the host.
    args.push("--probe-key-file", "/etc/sallyport/probe-key/key");
    if (cni) args.push("--cni-socket", "/run/sallyport/cni.sock");
    this.#spawn(
      `agent-${i}`,
      undefined,
      agentContainerArgv({
        name,
        image,
        netns: this.nodeNs(i),
        kubeconfig,
        args,
        volumes: [
          `${key}:/etc/sallyport/probe-key/key:ro`,
          ...(cni ? [`${this.cniSocketDir(i)}:/run/sallyport`] : []),
        ],
      }),
    );
  }

  /**
   * Resolves when node `i`'s agent answers sallyport-cni (its first datapath sync is done):
   * until then CNI ADD on the node fails closed. At once when the plugin is not installed.
   */
  async waitCniReady(i: number, timeoutMs = 60_000): Promise<void> {
    if (this.#state.sallyportCni !== true) return;
    const socket = join(this.cniSocketDir(i), "cni.sock");
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const r = await httpTransport(socket, CNI_PATHS.status, {}, 2000).catch(() => undefined);
      if (r?.status === 200) return;
      if (Date.now() > deadline)
        throw new Error(
          `The agent of ${this.nodeName(i)} does not answer sallyport-cni at ${socket} after ${timeoutMs} ms; see its log ${join(this.dir, `agent-${i}.log`)}`,
        );
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  #agentContainer(i: number): string {
    return `${this.prefix}-agent-${i}`;
  }

  async stopAgent(i: number, signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
    await this.#kill(`agent-${i}`, signal);
  }

  async stopController(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    await this.#kill("controller", signal);
  }

  async startController(): Promise<void> {
    await this.#startController();
  }

  async #kill(name: string, signal: NodeJS.Signals): Promise<void> {
    const pid = this.#state.pids[name];
    if (pid === undefined) return;
    // An agent from the image: the pid is `podman run`, which forwards SIGTERM but cannot
    // forward SIGKILL; the container's own process is signalled.
    const node = /^agent-(\d+)$/.exec(name)?.[1];
    const container =
      this.#state.agentImage === undefined || node === undefined
        ? undefined
        : this.#agentContainer(Number(node));
    // `ip netns exec` execs the program, so the pid is the process itself.
    if (container === undefined || !signalContainer(container, signal)) {
      try {
        process.kill(pid, signal);
      } catch {
        // gone already
      }
    }
    for (let i = 0; i < 100 && alive(pid); i++) await new Promise((r) => setTimeout(r, 50));
    if (alive(pid)) process.kill(pid, "SIGKILL");
    if (container !== undefined) removeContainers([container]);
    delete this.#state.pids[name];
    this.#children.delete(name);
    this.#save();
  }

  /** Cuts node `i` off completely: its agent dies and its uplink goes down. */
  async killNode(i: number): Promise<void> {
    await mustRun(nsRunner(this.#topology.bridgeNs), ["ip", "link", "set", `vn${i}`, "down"]);
    await this.stopAgent(i, "SIGKILL");
  }

  async reviveNode(i: number): Promise<void> {
    await mustRun(nsRunner(this.#topology.bridgeNs), ["ip", "link", "set", `vn${i}`, "up"]);
    this.startAgent(i);
  }

  #controlPlane(): ControlPlane {
    this.#cp ??= ControlPlane.attach(this.#state.cpDir);
    return this.#cp;
  }

  async stopApiServer(): Promise<void> {
    await this.#controlPlane().stopApiServer();
  }

  async startApiServer(): Promise<void> {
    await this.#controlPlane().startApiServer();
  }

  admin(): KubeClient {
    return this.#controlPlane().client();
  }

  pods(): SandboxPod[] {
    return this.#state.pods;
  }

  pod(name: string): SandboxPod {
    const p = this.#state.pods.find((x) => x.name === name || `${x.namespace}/${x.name}` === name);
    if (p === undefined)
      throw new Error(`Cannot find pod ${name} in the sandbox: see "sallyport sandbox status"`);
    return p;
  }

  /**
   * A pod, the way kubelet and a container runtime make it: the Pod object, then its network
   * namespace and CNI ADD, then (its container, if any, started) the report that it is Running
   * with the addresses CNI gave.
   */
  async addPod(name: string, options: PodOptions): Promise<SandboxPod> {
    const pod = await this.addPodNetwork(name, options);
    await this.registerPod(pod);
    return pod;
  }

  /** The Pod object and the pod's network (CNI ADD), before the kubelet reports it Running. */
  async addPodNetwork(name: string, options: PodOptions): Promise<SandboxPod> {
    const namespace = options.namespace ?? "default";
    if (options.node < 1 || options.node > this.#state.nodes || !Number.isInteger(options.node))
      throw new Error(
        `Cannot add pod ${namespace}/${name}: there is no node ${options.node} (nodes 1-${this.#state.nodes})`,
      );
    if (this.#state.pods.some((p) => p.name === name && p.namespace === namespace))
      throw new Error(
        `Cannot add pod ${namespace}/${name}: it exists already; delete it first ("sallyport sandbox delete-pod ${namespace}/${name}") or choose another name`,
      );
    const admin = this.admin();
    try {
      await admin.create(CORE.namespaces, {
        apiVersion: "v1",
        kind: "Namespace",
        metadata: { name: namespace },
      });
    } catch (e) {
      if (!isAlreadyExists(e)) throw e;
    }
    const labels = options.labels ?? {};
    await admin.create(CORE.pods, {
      apiVersion: "v1",
      kind: "Pod",
      metadata: { name, namespace, labels },
      spec: {
        nodeName: this.nodeName(options.node),
        containers: [
          {
            name: "app",
            image: options.echo ? "sandbox.invalid/echo" : "sandbox.invalid/app",
            ...(options.echo
              ? {
                  ports: [
                    { name: "tcp", containerPort: POD_ECHO_PORT, protocol: "TCP" },
                    { name: "udp", containerPort: POD_ECHO_PORT, protocol: "UDP" },
                  ],
                }
              : {}),
          },
        ],
        terminationGracePeriodSeconds: 0,
      },
    });
    const netns = `${this.prefix}-p${options.node}x${this.#state.nextPod++}`;
    this.#save();
    let handle: PodHandle;
    try {
      handle = await this.#topology.addPod(`${namespace}/${name}`, options.node, { netns });
    } catch (e) {
      await this.#deletePodObject(name, namespace, 0);
      throw e;
    }
    const pod: SandboxPod = {
      name,
      namespace,
      node: options.node,
      netns,
      ips: handle.ips,
      labels,
      ...(handle.cni === undefined ? {} : { cni: handle.cni }),
      ...(options.echo ? { echo: true } : {}),
    };
    this.#state.pods.push(pod);
    this.#save();
    if (options.echo)
      this.#spawn(this.#podProcess(pod), netns, [
        process.execPath,
        ECHO,
        "serve",
        "--port",
        String(POD_ECHO_PORT),
      ]);
    return pod;
  }

  #podProcess(pod: { namespace: string; name: string }): string {
    return `pod-${pod.namespace}-${pod.name}`;
  }

  /**
   * Reports the pod to the API server as the kubelet does once its containers run: Running and
   * Ready, with its IPs. Returns when that report was sent.
   */
  async registerPod(pod: SandboxPod): Promise<number> {
    const ips = this.families.map((f) => pod.ips[f]).filter((ip): ip is string => ip !== undefined);
    const hostIPs = this.families.map((f) => nodeAddress(pod.node, f));
    const now = new Date().toISOString();
    const condition = (type: string) => ({ type, status: "True", lastTransitionTime: now });
    const running = Date.now();
    await this.admin().mergePatch(
      CORE.pods,
      pod.name,
      {
        status: {
          phase: "Running",
          podIP: ips[0],
          podIPs: ips.map((ip) => ({ ip })),
          hostIP: hostIPs[0],
          hostIPs: hostIPs.map((ip) => ({ ip })),
          startTime: now,
          conditions: ["PodScheduled", "Initialized", "ContainersReady", "Ready"].map(condition),
          containerStatuses: [
            {
              name: "app",
              image: pod.echo ? "sandbox.invalid/echo" : "sandbox.invalid/app",
              imageID: "",
              ready: true,
              started: true,
              restartCount: 0,
              state: { running: { startedAt: now } },
            },
          ],
        },
      },
      { namespace: pod.namespace, subresource: "status" },
    );
    return running;
  }

  /**
   * Deletes a pod as the API server and kubelet do: the object is marked for deletion (its
   * endpoints stop being ready), its container stops, CNI DEL, its namespace goes, and the
   * kubelet's final delete removes the object.
   */
  async deletePod(name: string): Promise<SandboxPod> {
    const pod = this.pod(name);
    await this.#deletePodObject(pod.name, pod.namespace, undefined);
    if (this.#state.pids[this.#podProcess(pod)] !== undefined)
      await this.#kill(this.#podProcess(pod), "SIGKILL");
    await this.#topology.deletePod({ ...pod, name: `${pod.namespace}/${pod.name}` });
    this.#state.pods = this.#state.pods.filter((p) => p !== pod);
    this.#save();
    await this.#deletePodObject(pod.name, pod.namespace, 0);
    return pod;
  }

  /**
   * What a runtime does when a pod's sandbox goes while its Pod object stays (it dies, or the
   * kubelet tears it down before the API server has removed the object): the container stops,
   * CNI DEL, the namespace goes. The object keeps its status addresses until `deletePod`.
   */
  async removePodNetwork(name: string): Promise<SandboxPod> {
    const pod = this.pod(name);
    if (this.#state.pids[this.#podProcess(pod)] !== undefined)
      await this.#kill(this.#podProcess(pod), "SIGKILL");
    await this.#topology.deletePod({ ...pod, name: `${pod.namespace}/${pod.name}` });
    return pod;
  }

  async #deletePodObject(
    name: string,
    namespace: string,
    gracePeriodSeconds: number | undefined,
  ): Promise<void> {
    try {
      await this.admin().request("DELETE", resourcePath(CORE.pods, { namespace, name }), {
        ...(gracePeriodSeconds === undefined ? {} : { query: { gracePeriodSeconds } }),
      });
    } catch (e) {
      if (!isNotFound(e)) throw e;
    }
  }

  /**
   * Sets labels of a pod (merged into its labels; a null value removes the label), as
   * `kubectl label` does.
   */
  async labelPod(name: string, labels: Record<string, string | null>): Promise<SandboxPod> {
    const pod = this.pod(name);
    await this.admin().mergePatch(
      CORE.pods,
      pod.name,
      { metadata: { labels } },
      { namespace: pod.namespace },
    );
    const merged = { ...pod.labels };
    for (const [k, v] of Object.entries(labels)) {
      if (v === null) delete merged[k];
      else merged[k] = v;
    }
    const updated = { ...pod, labels: merged };
    this.#state.pods = this.#state.pods.map((p) => (p === pod ? updated : p));
    this.#save();
    return updated;
  }

  /**
   * A Service of the sandbox's families (dual stack when the sandbox is); kube-controller-manager
   * makes its EndpointSlices and kube-proxy on every node its rules.
   */
  async addService(name: string, options: ServiceOptions): Promise<SandboxService> {
    const namespace = options.namespace ?? "default";
    const type = options.type ?? "ClusterIP";
    type Service = KubeObject & {
      spec: {
        clusterIPs?: string[];
        ports?: { port: number; protocol: string; nodePort?: number }[];
      };
    };
    const created = await this.admin().create<Service>(SERVICES, {
      apiVersion: "v1",
      kind: "Service",
      metadata: { name, namespace },
      spec: {
        type,
        selector: options.selector,
        ipFamilyPolicy: this.families.length > 1 ? "RequireDualStack" : "SingleStack",
        ipFamilies: this.families.map((f) => `IPv${f}`),
        ports: options.ports.map((p) => ({
          name: p.name ?? `${(p.protocol ?? "TCP").toLowerCase()}-${p.port}`,
          port: p.port,
          targetPort: p.targetPort ?? p.port,
          protocol: p.protocol ?? "TCP",
          ...(p.nodePort === undefined ? {} : { nodePort: p.nodePort }),
        })),
        ...(type === "NodePort"
          ? { externalTrafficPolicy: options.externalTrafficPolicy ?? "Cluster" }
          : {}),
      },
    } as Service);
    const clusterIPs: Partial<Record<Family, string>> = {};
    for (const ip of created.spec.clusterIPs ?? []) clusterIPs[ip.includes(":") ? 6 : 4] = ip;
    const nodePorts: Record<number, number> = {};
    for (const p of created.spec.ports ?? [])
      if (p.nodePort !== undefined) nodePorts[p.port] = p.nodePort;
    return { name, namespace, clusterIPs, nodePorts };
  }

  async deleteService(name: string, namespace = "default"): Promise<void> {
    await this.admin().delete(SERVICES, name, namespace);
  }

  /**
   * The argv of the real kubectl against the sandbox's API server (as admin), run in the
   * control plane's namespace: the API server has no address outside the sandbox.
   */
  kubectlArgv(args: readonly string[]): string[] {
    const bin = kubernetesBinaries(["kubectl"]);
    return [
      "ip",
      "netns",
      "exec",
      this.cpNs,
      join(bin, "kubectl"),
      `--kubeconfig=${this.#controlPlane().kubeconfig()}`,
      `--cache-dir=${join(this.dir, "kubectl-cache")}`,
      ...args,
    ];
  }

  /** Runs kubectl (see kubectlArgv) and returns what it printed; throws when it fails. */
  kubectl(args: readonly string[]): string {
    const argv = this.kubectlArgv(args);
    const r = spawnSync(argv[0]!, argv.slice(1), { encoding: "utf8" });
    if (r.status !== 0)
      throw new Error(`Cannot run kubectl ${args.join(" ")}: ${r.stderr.trim() || r.error}`);
    return r.stdout;
  }

  /** Creates or replaces every object of a YAML file (kubectl apply, without the merge logic). */
  async apply(yaml: string): Promise<string[]> {
    return applyManifests(this.admin(), yaml, "replace");
  }

  async delete(kind: KindName, name: string, namespace?: string): Promise<void> {
    await this.admin().delete(
      ours(kind),
      name,
      KINDS[kind].namespaced ? (namespace ?? "default") : undefined,
    );
  }

  #save(): void {
    mkdirSync(this.dir, { recursive: true });
    writeFileSync(join(this.dir, "state.json"), JSON.stringify(this.#state, null, 2));
  }

  /** Stops every process and deletes every namespace of this sandbox. */
  async destroy(): Promise<void> {
    for (const name of Object.keys(this.#state.pids)) await this.#kill(name, "SIGKILL");
    if (existsSync(join(this.#state.cpDir, "controlplane.json"))) await this.#controlPlane().stop();
    // A test or benchmark that failed leaves no sandbox behind, but its logs may be wanted.
    const keep = process.env.SALLYPORT_KEEP_LOGS;
    if (keep !== undefined && keep !== "")
      cpSync(this.dir, join(keep, this.prefix), { recursive: true });
    await Sandbox.down(this.prefix, this.dir);
  }

  /** Removes a sandbox by prefix, whatever state it is in (also after a crash). */
  static async down(prefix: string, dir = sandboxDir(prefix)): Promise<string[]> {
    const file = join(dir, "state.json");
    if (existsSync(file)) {
      const state = JSON.parse(readFileSync(file, "utf8")) as SandboxState;
      for (const pid of Object.values(state.pids)) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // gone
        }
      }
      // Killing `podman run` leaves its container running, in a namespace about to go away.
      if (state.agentImage !== undefined)
        removeContainers(
          Array.from({ length: state.nodes }, (_, i) => `${state.prefix}-agent-${i + 1}`),
        );
    }
    await ControlPlane.killRecorded(join(dir, "controlplane"));
    const removed = await Topology.down(prefix);
    rmSync(dir, { recursive: true, force: true });
    return removed;
  }

  /** The external server's log: one JSON line per connection with the source it saw. */
  externalRequests(): { t: number; proto: string; src: string; data?: string }[] {
    const file = join(this.dir, "external-requests.log");
    if (!existsSync(file)) return [];
    return readFileSync(file, "utf8")
      .split("\n")
      .filter(Boolean)
      .map((l) => JSON.parse(l) as { t: number; proto: string; src: string; data?: string });
  }

  log(component: string): string {
    const file = join(this.dir, `${component}.log`);
    return existsSync(file) ? readFileSync(file, "utf8") : "";
  }

  components(): string[] {
    return Object.keys(this.#state.pids);
  }

  familyOf(address: string): Family | undefined {
    return tryParseAddress(address)?.family;
  }

  static readonly EIP_POOL = EIP_POOL;
  static readonly SALLYPORT_NAMESPACE = SALLYPORT_NAMESPACE;
}
