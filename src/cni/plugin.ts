/**
 * `sallyport-cni`: a chained CNI plugin, the last of a node's configuration list (CNI spec 1.1,
 * https://github.com/containernetworking/cni/blob/main/SPEC.md). It creates no interface and
 * assigns no address; it tells the node's agent which addresses a new pod got before the runtime
 * starts the pod's containers, so that the pod's first packet is steered:
 *
 *  - ADD: the pod's addresses (from `prevResult`) and its namespace and name (`K8S_POD_*` in
 *    CNI_ARGS) go to the agent over its Unix socket; the agent answers once the kernel's sets
 *    hold the pod for every policy of this node that selects it. The result is `prevResult`,
 *    unchanged. When the agent does not answer within `timeoutMs` the ADD fails (code 11, "try
 *    again later"): the runtime tears the sandbox down and retries, and the pod never runs
 *    unsteered (fail closed). `failOpen: true` lets the pod start anyway, with a warning.
 *  - DEL: the agent removes the pod's addresses from the sets before the IPAM plugin (earlier in
 *    the list, so later in DEL's reverse order) can give them to another pod. DEL is best effort:
 *    an agent that does not answer within `delTimeoutMs` is logged and DEL succeeds, because a
 *    DEL that fails for ever keeps the runtime from ever removing the pod. The agent relists its
 *    node's pods when it comes back.
 *  - CHECK: the agent confirms it holds the pod with these addresses.
 *  - STATUS: whether the agent answers (code 50 when it does not: the runtime then reports the
 *    network not ready and schedules no pods here). GC: nothing to collect.
 *  - VERSION: the versions below.
 *
 * Errors are the spec's error object on stdout with exit code 1.
 */
import { request } from "node:http";
import {
  type AgentErrorReply,
  CNI_PATHS,
  DEFAULT_CNI_SOCKET,
  type PodNetworkReply,
  type PodNetworkRequest,
} from "./protocol.ts";

export const SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] as const;
const DEFAULT_TIMEOUT_MS = 10_000;
const DEFAULT_DEL_TIMEOUT_MS = 2_000;

/** CNI spec error codes (section "Error"), and ours from 100 on. */
export const CNI_ERRORS = {
  incompatibleVersion: 1,
  unsupportedField: 2,
  containerUnknown: 3,
  invalidEnvironment: 4,
  ioFailure: 5,
  cannotDecode: 6,
  invalidConfig: 7,
  tryAgainLater: 11,
  pluginNotAvailable: 50,
  /** The agent answered and refused (e.g. the Pod is not on this node). */
  agentRefused: 100,
  /** CHECK: the agent does not hold this pod with these addresses. */
  notProgrammed: 101,
} as const;

export interface PluginConfig {
  readonly cniVersion: string;
  readonly name: string;
  readonly type: string;
  /** The agent's socket. @default "/run/sallyport/cni.sock" */
  readonly socket?: string;
  /** ADD and CHECK: how long to wait for the agent (its kernel included). @default 10000 */
  readonly timeoutMs?: number;
  /** DEL: how long to wait for the agent before giving up (and succeeding). @default 2000 */
  readonly delTimeoutMs?: number;
  /** ADD succeeds when the agent does not answer (the pod may leave unsteered). @default false */
  readonly failOpen?: boolean;
  readonly prevResult?: PrevResult;
  readonly [key: string]: unknown;
}

interface PrevResult {
  readonly cniVersion?: string;
  readonly interfaces?: readonly { name?: string; sandbox?: string }[];
  readonly ips?: readonly { address: string; interface?: number }[];
  readonly [key: string]: unknown;
}

/** One call to the agent: POST `path` with `body`; resolves with the status and parsed body. */
export type AgentTransport = (
  socket: string,
  path: string,
  body: unknown,
  timeoutMs: number,
) => Promise<{ readonly status: number; readonly body: unknown }>;

export interface PluginInput {
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly stdin: string;
  readonly transport?: AgentTransport;
}

export interface PluginOutput {
  readonly exitCode: number;
  readonly stdout: string;
  readonly stderr: string;
}

class CniFailure extends Error {
  readonly code: number;
  readonly details: string | undefined;
  constructor(code: number, msg: string, details?: string) {
    super(msg);
    this.code = code;
    this.details = details;
  }
}

/** Runs one CNI command; never throws (an error is the spec's error object). */
export async function runPlugin(input: PluginInput): Promise<PluginOutput> {
  const log: string[] = [];
  const command = input.env.CNI_COMMAND ?? "";
  let version = "1.1.0";
  try {
    if (command === "VERSION") return ok(JSON.stringify(versionInfo(input.stdin)), log);
    version = supportedVersionOf(input.stdin) ?? version;
    const config = parseConfig(input.stdin);
    version = config.cniVersion;
    const transport = input.transport ?? httpTransport;
    switch (command) {
      case "ADD":
        return ok(JSON.stringify(await add(config, input.env, transport, log)), log);
      case "DEL":
        await del(config, input.env, transport, log);
        return ok("", log);
      case "CHECK":
        await check(config, input.env, transport);
        return ok("", log);
      case "STATUS":
        await status(config, transport);
        return ok("", log);
      case "GC":
        return ok("", log);
      default:
        throw new CniFailure(
          CNI_ERRORS.invalidEnvironment,
          `Cannot run CNI_COMMAND "${command}": sallyport-cni knows ADD, DEL, CHECK, STATUS, GC and VERSION`,
        );
    }
  } catch (e) {
    const failure =
      e instanceof CniFailure
        ? e
        : new CniFailure(CNI_ERRORS.ioFailure, `sallyport-cni failed: ${(e as Error).message}`);
    const error = {
      cniVersion: version,
      code: failure.code,
      msg: failure.message,
      ...(failure.details === undefined ? {} : { details: failure.details }),
    };
    return { exitCode: 1, stdout: `${JSON.stringify(error)}\n`, stderr: lines(log) };
  }
}

function ok(stdout: string, log: readonly string[]): PluginOutput {
  return { exitCode: 0, stdout: stdout === "" ? "" : `${stdout}\n`, stderr: lines(log) };
}

function lines(log: readonly string[]): string {
  return log.map((l) => `sallyport-cni: ${l}\n`).join("");
}

function versionInfo(stdin: string) {
  // VERSION's stdin holds {"cniVersion": …} at most; an older runtime sends nothing.
  let asked = "1.1.0";
  try {
    asked = (JSON.parse(stdin) as { cniVersion?: string }).cniVersion ?? asked;
  } catch {
    // nothing to read
  }
  return { cniVersion: asked, supportedVersions: [...SUPPORTED_VERSIONS] };
}

/** The configuration's cniVersion when it is one we speak (errors answer in it). */
function supportedVersionOf(stdin: string): string | undefined {
  try {
    const v = (JSON.parse(stdin) as { cniVersion?: unknown }).cniVersion;
    return (SUPPORTED_VERSIONS as readonly unknown[]).includes(v) ? (v as string) : undefined;
  } catch {
    return undefined;
  }
}

function parseConfig(stdin: string): PluginConfig {
  let raw: unknown;
  try {
    raw = JSON.parse(stdin);
  } catch (e) {
    throw new CniFailure(
      CNI_ERRORS.cannotDecode,
      "Cannot parse the network configuration on stdin",
      (e as Error).message,
    );
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw))
    throw new CniFailure(CNI_ERRORS.invalidConfig, "The network configuration is not an object");
  const c = raw as Record<string, unknown>;
  if (typeof c.cniVersion !== "string")
    throw new CniFailure(CNI_ERRORS.invalidConfig, "The network configuration has no cniVersion");
  if (!(SUPPORTED_VERSIONS as readonly string[]).includes(c.cniVersion))
    throw new CniFailure(
      CNI_ERRORS.incompatibleVersion,
      `Cannot use cniVersion ${c.cniVersion}: sallyport-cni supports ${SUPPORTED_VERSIONS.join(", ")}`,
    );
  for (const [field, type] of [
    ["socket", "string"],
    ["timeoutMs", "number"],
    ["delTimeoutMs", "number"],
    ["failOpen", "boolean"],
  ] as const) {
    if (c[field] !== undefined && typeof c[field] !== type)
      throw new CniFailure(
        CNI_ERRORS.invalidConfig,
        `Cannot use the plugin's field "${field}": current value is ${JSON.stringify(c[field])}, expected a ${type}`,
      );
  }
  return c as PluginConfig;
}

function required(env: PluginInput["env"], name: string): string {
  const v = env[name];
  if (v === undefined || v === "")
    throw new CniFailure(CNI_ERRORS.invalidEnvironment, `Cannot run without ${name} set`);
  return v;
}

/** K8S_POD_NAMESPACE and K8S_POD_NAME from CNI_ARGS ("K=V;K=V"); undefined: not a Kubernetes pod. */
export function podIdentity(
  cniArgs: string | undefined,
): { namespace: string; name: string } | undefined {
  const args = new Map<string, string>();
  for (const pair of (cniArgs ?? "").split(";")) {
    const at = pair.indexOf("=");
    if (at > 0) args.set(pair.slice(0, at), pair.slice(at + 1));
  }
  const namespace = args.get("K8S_POD_NAMESPACE");
  const name = args.get("K8S_POD_NAME");
  return namespace && name ? { namespace, name } : undefined;
}

/** The pod's own addresses: those on an interface inside the pod's namespace (or unassigned). */
export function podAddresses(result: PrevResult | undefined): string[] {
  const out: string[] = [];
  for (const ip of result?.ips ?? []) {
    const iface = ip.interface === undefined ? undefined : result?.interfaces?.[ip.interface];
    if (iface !== undefined && (iface.sandbox === undefined || iface.sandbox === "")) continue;
    const address = ip.address.split("/")[0]!;
    if (!out.includes(address)) out.push(address);
  }
  return out;
}

function requestOf(
  config: PluginConfig,
  env: PluginInput["env"],
  pod: { namespace: string; name: string },
): PodNetworkRequest {
  return {
    containerId: required(env, "CNI_CONTAINERID"),
    ifname: required(env, "CNI_IFNAME"),
    namespace: pod.namespace,
    name: pod.name,
    ips: podAddresses(config.prevResult),
  };
}

async function add(
  config: PluginConfig,
  env: PluginInput["env"],
  transport: AgentTransport,
  log: string[],
): Promise<PrevResult> {
  required(env, "CNI_CONTAINERID");
  required(env, "CNI_NETNS");
  required(env, "CNI_IFNAME");
  if (config.prevResult === undefined)
    throw new CniFailure(
      CNI_ERRORS.invalidConfig,
      "Cannot ADD without prevResult: sallyport-cni is a chained plugin; put it last in a configuration list, after the plugin that assigns the pod's addresses",
    );
  const result = { ...config.prevResult, cniVersion: config.cniVersion };
  const pod = podIdentity(env.CNI_ARGS);
  // Not a Kubernetes pod (no K8S_POD_* arguments) or no address: no policy can select it.
  if (pod === undefined) return result;
  const body = requestOf(config, env, pod);
  if (body.ips.length === 0) return result;
  const socket = config.socket ?? DEFAULT_CNI_SOCKET;
  try {
    await call(transport, socket, CNI_PATHS.add, body, config.timeoutMs ?? DEFAULT_TIMEOUT_MS);
  } catch (e) {
    if (!(e instanceof CniFailure) || e.code !== CNI_ERRORS.tryAgainLater || !config.failOpen)
      throw e;
    log.push(
      `${pod.namespace}/${pod.name} (${body.ips.join(", ")}) starts unsteered: ${e.message} (failOpen is set)`,
    );
  }
  return result;
}

async function del(
  config: PluginConfig,
  env: PluginInput["env"],
  transport: AgentTransport,
  log: string[],
): Promise<void> {
  required(env, "CNI_CONTAINERID");
  required(env, "CNI_IFNAME");
  const pod = podIdentity(env.CNI_ARGS);
  if (pod === undefined) return;
  const body = requestOf(config, env, pod);
  const socket = config.socket ?? DEFAULT_CNI_SOCKET;
  try {
    await call(
      transport,
      socket,
      CNI_PATHS.del,
      body,
      config.delTimeoutMs ?? DEFAULT_DEL_TIMEOUT_MS,
    );
  } catch (e) {
    // DEL must not fail for ever; the agent relists this node's pods when it is back.
    log.push(
      `DEL of ${pod.namespace}/${pod.name} (${body.ips.join(", ") || "no addresses"}) went on without the agent: ${(e as Error).message}; its addresses stay in this node's sets until the agent sees the Pod gone`,
    );
  }
}

async function check(
  config: PluginConfig,
  env: PluginInput["env"],
  transport: AgentTransport,
): Promise<void> {
  required(env, "CNI_NETNS");
  if (config.prevResult === undefined)
    throw new CniFailure(CNI_ERRORS.invalidConfig, "Cannot CHECK without prevResult");
  const pod = podIdentity(env.CNI_ARGS);
  if (pod === undefined) return;
  const body = requestOf(config, env, pod);
  if (body.ips.length === 0) return;
  await call(
    transport,
    config.socket ?? DEFAULT_CNI_SOCKET,
    CNI_PATHS.check,
    body,
    config.timeoutMs ?? DEFAULT_TIMEOUT_MS,
  );
}

async function status(config: PluginConfig, transport: AgentTransport): Promise<void> {
  try {
    await call(
      transport,
      config.socket ?? DEFAULT_CNI_SOCKET,
      CNI_PATHS.status,
      {},
      config.timeoutMs ?? DEFAULT_TIMEOUT_MS,
    );
  } catch (e) {
    throw new CniFailure(CNI_ERRORS.pluginNotAvailable, (e as Error).message);
  }
}

async function call(
  transport: AgentTransport,
  socket: string,
  path: string,
  body: unknown,
  timeoutMs: number,
): Promise<PodNetworkReply> {
  let reply: { status: number; body: unknown };
  try {
    reply = await transport(socket, path, body, timeoutMs);
  } catch (e) {
    throw new CniFailure(
      CNI_ERRORS.tryAgainLater,
      `Cannot reach the Sallyport agent at ${socket}: ${(e as Error).message}; the pod's network is not set up until the agent answers (fail closed: the runtime retries). Is the agent running on this node (kubectl -n sallyport-system get pods -o wide)?`,
    );
  }
  if (reply.status === 200) return reply.body as PodNetworkReply;
  const refusal = reply.body as Partial<AgentErrorReply> | undefined;
  const msg = refusal?.error ?? `HTTP ${reply.status}`;
  if (path === CNI_PATHS.check && reply.status === 404)
    throw new CniFailure(
      CNI_ERRORS.notProgrammed,
      `The Sallyport agent does not hold this pod: ${msg}`,
    );
  throw new CniFailure(
    refusal?.retry === false ? CNI_ERRORS.agentRefused : CNI_ERRORS.tryAgainLater,
    `The Sallyport agent refused: ${msg}`,
  );
}

/** POST over the agent's Unix socket; rejects on a connection error or after `timeoutMs`. */
export const httpTransport: AgentTransport = (socket, path, body, timeoutMs) =>
  new Promise((resolve, reject) => {
    const payload = JSON.stringify(body);
    const req = request(
      {
        socketPath: socket,
        // One request per connection: a pooled socket the agent closed meanwhile fails with EPIPE.
        agent: false,
        path,
        method: "POST",
        headers: {
          "content-type": "application/json",
          "content-length": Buffer.byteLength(payload),
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          clearTimeout(timer);
          const text = Buffer.concat(chunks).toString("utf8");
          let parsed: unknown;
          try {
            parsed = text === "" ? undefined : JSON.parse(text);
          } catch {
            parsed = { error: text };
          }
          resolve({ status: res.statusCode ?? 0, body: parsed });
        });
        res.on("error", (e) => {
          clearTimeout(timer);
          reject(e);
        });
      },
    );
    const timer = setTimeout(() => {
      req.destroy(new Error(`no answer within ${timeoutMs} ms`));
    }, timeoutMs);
    req.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    req.end(payload);
  });
