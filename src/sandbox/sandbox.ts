/**
 * The sandbox: a whole cluster on one machine, inside network namespaces.
 *
 *   <prefix>-cp     the control plane: etcd, kube-apiserver (192.168.77.2:6443) and the
 *                   controller with its admission webhook, on the simulated segment
 *   <prefix>-nI     node I: the real agent process, its kernel datapath, a CNI-like pod network
 *   <prefix>-ext    the external server: answers with the source address it saw, and logs it
 *   <prefix>-p…     pods (the sandbox plays kubelet: it registers Node and Pod objects)
 *
 * State (processes, pods) is kept in a directory so that every `sallyport sandbox` command, and
 * `down` after a crash, finds it again. Nothing is configured in the root namespace.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { KINDS, type KindName } from "../api/types.ts";
import { mustRun } from "../kernel/runner.ts";
import { applyManifests } from "../kube/apply.ts";
import { CORE, isAlreadyExists, type KubeClient, type KubeObject, ours } from "../kube/client.ts";
import { type Family, tryParseAddress } from "../lib/ip.ts";
import { alive, ControlPlane, REPO, SALLYPORT_NAMESPACE } from "./controlplane.ts";
import { selfSignedCert, webhookConfiguration } from "./pki.ts";
import { agentContainerArgv, removeContainers, signalContainer } from "./podman.ts";
import { EIP_POOL, EXTERNAL, nodeAddress, nsRunner, podCIDR, Topology } from "./topology.ts";

const CLI = join(REPO, "src", "cli", "main.ts");
const ECHO = join(REPO, "src", "sandbox", "echo.ts");
export const CONTROL_PLANE_ADDRESS = { 4: "192.168.77.2", 6: "fd00:77::2" } as const;

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
}

export interface SandboxPod {
  readonly name: string;
  readonly namespace: string;
  readonly node: number;
  readonly netns: string;
  readonly ips: Partial<Record<Family, string>>;
  readonly labels: Record<string, string>;
}

interface SandboxState {
  prefix: string;
  nodes: number;
  families: Family[];
  gatewayNodes: number[];
  pids: Record<string, number>;
  pods: {
    name: string;
    namespace: string;
    node: number;
    netns: string;
    ips: Partial<Record<Family, string>>;
    labels: Record<string, string>;
  }[];
  apiserver: string;
  cpDir: string;
  agentArgs: string[];
  controllerArgs: string[];
  agentImage?: string;
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
    });
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
    return new Sandbox(dir, JSON.parse(readFileSync(file, "utf8")) as SandboxState);
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
      apiserver: "",
      cpDir: join(dir, "controlplane"),
      agentArgs: [...(options.agentArgs ?? [])],
      controllerArgs: [...(options.controllerArgs ?? [])],
      ...(options.agentImage === undefined ? {} : { agentImage: options.agentImage }),
    };
    const sb = new Sandbox(dir, state);
    try {
      log(`network: ${state.nodes} nodes, an external host, IPv${families.join("+IPv")}`);
      await sb.#topology.up();
      await sb.#controlPlaneNamespace();
      log("control plane: etcd and kube-apiserver");
      const apiFamily: Family = families.includes(4) ? 4 : 6;
      sb.#cp = await ControlPlane.start({
        netns: sb.cpNs,
        address: CONTROL_PLANE_ADDRESS[apiFamily],
        dir: state.cpDir,
        detached: true,
        users: {
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
      await sb.#startEcho();
      log("controller");
      await sb.#startController();
      log("agents");
      for (let i = 1; i <= state.nodes; i++) sb.startAgent(i);
      sb.#save();
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

  /** Starts (or restarts) the agent of node `i` inside its namespace. */
  startAgent(i: number): void {
    const kubeconfig = this.#controlPlane().kubeconfig(`sallyport-agent-${i}`);
    const args = [
      "--node",
      this.nodeName(i),
      "--families",
      this.families.join(","),
      ...this.#state.agentArgs,
    ];
    const image = this.#state.agentImage;
    if (image === undefined) {
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
    this.#spawn(
      `agent-${i}`,
      undefined,
      agentContainerArgv({ name, image, netns: this.nodeNs(i), kubeconfig, args }),
    );
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

  /** A pod: its namespace on node `node`, and its Pod object, Running with its IPs. */
  async addPod(
    name: string,
    options: { node: number; namespace?: string; labels?: Record<string, string> },
  ): Promise<SandboxPod> {
    const pod = await this.addPodNetwork(name, options);
    await this.registerPod(pod);
    return pod;
  }

  /** The pod's network only (as a CNI ADD would do), before the kubelet reports it. */
  async addPodNetwork(
    name: string,
    options: { node: number; namespace?: string; labels?: Record<string, string> },
  ): Promise<SandboxPod> {
    const namespace = options.namespace ?? "default";
    const handle = await this.#topology.addPod(`${namespace}/${name}`, options.node);
    const pod = {
      name,
      namespace,
      node: options.node,
      netns: handle.netns,
      ips: handle.ips,
      labels: options.labels ?? {},
    };
    this.#state.pods.push(pod);
    this.#save();
    return pod;
  }

  /** Reports the pod to the API server as the kubelet does: the Pod object, Running with its IPs. */
  /** Creates the Pod, then reports it Running with its IPs; returns when that report was sent. */
  async registerPod(pod: SandboxPod): Promise<number> {
    const admin = this.admin();
    try {
      await admin.create(CORE.namespaces, {
        apiVersion: "v1",
        kind: "Namespace",
        metadata: { name: pod.namespace },
      });
    } catch (e) {
      if (!isAlreadyExists(e)) throw e;
    }
    const ips = this.families.map((f) => pod.ips[f]).filter((ip): ip is string => ip !== undefined);
    await admin.create(CORE.pods, {
      apiVersion: "v1",
      kind: "Pod",
      metadata: { name: pod.name, namespace: pod.namespace, labels: pod.labels },
      spec: {
        nodeName: this.nodeName(pod.node),
        containers: [{ name: "app", image: "sandbox.invalid/app" }],
      },
    });
    const running = Date.now();
    await admin.mergePatch(
      CORE.pods,
      pod.name,
      { status: { phase: "Running", podIP: ips[0], podIPs: ips.map((ip) => ({ ip })) } },
      { namespace: pod.namespace, subresource: "status" },
    );
    return running;
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
