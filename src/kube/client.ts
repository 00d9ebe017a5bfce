/**
 * A small REST client over @kubernetes/client-node's KubeConfig: the library resolves the cluster,
 * authentication (token files are re-read, so projected tokens rotate) and TLS into an undici
 * dispatcher, exactly as its own Watch does; this adds generic get/list/create/patch/delete on
 * any resource path with the content type each verb needs (custom resources reject the default
 * strategic-merge patch) and the API's Status turned into an ApiError.
 */
import { KubeConfig, RequestContext } from "@kubernetes/client-node";
import { Agent, type Dispatcher, request as undiciRequest } from "undici";
import { GROUP, KINDS, type KindName, VERSION } from "../api/types.ts";

export { KubeConfig };

export class ApiError extends Error {
  override readonly name = "ApiError";
  readonly status: number;
  readonly reason: string;
  readonly details: unknown;
  constructor(method: string, path: string, status: number, body: unknown) {
    const s = body as { message?: string; reason?: string; details?: unknown } | undefined;
    super(
      `${method} ${path}: ${status} ${s?.reason ?? ""}: ${s?.message ?? JSON.stringify(body)}`.replace(
        / +/g,
        " ",
      ),
    );
    this.status = status;
    this.reason = s?.reason ?? "";
    this.details = s?.details;
  }
}

export function isNotFound(e: unknown): boolean {
  return e instanceof ApiError && e.status === 404;
}
export function isConflict(e: unknown): boolean {
  return e instanceof ApiError && e.status === 409;
}
export function isAlreadyExists(e: unknown): boolean {
  return e instanceof ApiError && e.status === 409 && e.reason === "AlreadyExists";
}

export interface KubeObject {
  apiVersion?: string;
  kind?: string;
  metadata: {
    name?: string;
    namespace?: string;
    uid?: string;
    resourceVersion?: string;
    generation?: number;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
    creationTimestamp?: string;
    deletionTimestamp?: string;
    ownerReferences?: unknown[];
    generateName?: string;
  };
  [key: string]: unknown;
}

export interface ObjectList<T> {
  metadata: { resourceVersion?: string; continue?: string };
  items: T[];
}

/** A collection of resources: where to list/watch them and how to name one of them. */
export interface Resource {
  /** "" for the core group. */
  readonly group: string;
  readonly version: string;
  readonly plural: string;
  readonly namespaced: boolean;
}

export const CORE = {
  nodes: { group: "", version: "v1", plural: "nodes", namespaced: false },
  pods: { group: "", version: "v1", plural: "pods", namespaced: true },
  namespaces: { group: "", version: "v1", plural: "namespaces", namespaced: false },
  events: { group: "", version: "v1", plural: "events", namespaced: true },
  leases: { group: "coordination.k8s.io", version: "v1", plural: "leases", namespaced: true },
  serviceCIDRs: {
    group: "networking.k8s.io",
    version: "v1",
    plural: "servicecidrs",
    namespaced: false,
  },
} as const satisfies Record<string, Resource>;

const rbac = (plural: string, namespaced: boolean): Resource => ({
  group: "rbac.authorization.k8s.io",
  version: "v1",
  plural,
  namespaced,
});

/** The built-in kinds of Sallyport's own manifests (deploy/), by kind. */
export const MANIFEST_KINDS: Readonly<Record<string, Resource>> = {
  Namespace: CORE.namespaces,
  ServiceAccount: { group: "", version: "v1", plural: "serviceaccounts", namespaced: true },
  Service: { group: "", version: "v1", plural: "services", namespaced: true },
  ClusterRole: rbac("clusterroles", false),
  ClusterRoleBinding: rbac("clusterrolebindings", false),
  Role: rbac("roles", true),
  RoleBinding: rbac("rolebindings", true),
  Deployment: { group: "apps", version: "v1", plural: "deployments", namespaced: true },
  DaemonSet: { group: "apps", version: "v1", plural: "daemonsets", namespaced: true },
  PodDisruptionBudget: {
    group: "policy",
    version: "v1",
    plural: "poddisruptionbudgets",
    namespaced: true,
  },
  ValidatingAdmissionPolicy: {
    group: "admissionregistration.k8s.io",
    version: "v1",
    plural: "validatingadmissionpolicies",
    namespaced: false,
  },
  ValidatingAdmissionPolicyBinding: {
    group: "admissionregistration.k8s.io",
    version: "v1",
    plural: "validatingadmissionpolicybindings",
    namespaced: false,
  },
  ValidatingWebhookConfiguration: {
    group: "admissionregistration.k8s.io",
    version: "v1",
    plural: "validatingwebhookconfigurations",
    namespaced: false,
  },
  CustomResourceDefinition: {
    group: "apiextensions.k8s.io",
    version: "v1",
    plural: "customresourcedefinitions",
    namespaced: false,
  },
};

export function ours(kind: KindName): Resource {
  const info = KINDS[kind];
  return { group: GROUP, version: VERSION, plural: info.plural, namespaced: info.namespaced };
}

/** `/api/v1/namespaces/ns/pods/name/status` and friends. */
export function resourcePath(
  r: Resource,
  options: { namespace?: string | undefined; name?: string | undefined; subresource?: string } = {},
): string {
  const base = r.group === "" ? `/api/${r.version}` : `/apis/${r.group}/${r.version}`;
  const ns =
    r.namespaced && options.namespace !== undefined
      ? `/namespaces/${encodeURIComponent(options.namespace)}`
      : "";
  const name = options.name === undefined ? "" : `/${encodeURIComponent(options.name)}`;
  const sub = options.subresource === undefined ? "" : `/${options.subresource}`;
  return `${base}${ns}/${r.plural}${name}${sub}`;
}

type Query = Record<string, string | number | boolean | undefined>;

/**
 * How long one connection pool is used before a fresh one picks up rotated TLS material
 * (client certificates and CAs read from files).
 */
const DISPATCHER_TTL_MS = 10 * 60_000;

export class KubeClient {
  readonly config: KubeConfig;
  readonly #server: string;
  readonly #dispatcher: Dispatcher | undefined;
  /** The connection pool requests share, and when it was made. */
  #shared: { dispatcher: Dispatcher; at: number } | undefined;

  /** @param options.socketPath reach the API server through a Unix socket (the sandbox's bridge) */
  constructor(config: KubeConfig, options: { socketPath?: string } = {}) {
    this.config = config;
    this.#dispatcher =
      options.socketPath === undefined
        ? undefined
        : new Agent({ connect: { socketPath: options.socketPath, rejectUnauthorized: false } });
    const cluster = config.getCurrentCluster();
    if (cluster === null)
      throw new Error("Cannot create a Kubernetes client: the kubeconfig has no current cluster");
    this.#server = cluster.server.replace(/\/$/, "");
  }

  async request<T>(
    method: "GET" | "POST" | "PUT" | "PATCH" | "DELETE",
    path: string,
    options: {
      query?: Query;
      body?: unknown;
      contentType?: string;
      signal?: AbortSignal;
      timeoutMs?: number;
    } = {},
  ): Promise<T> {
    const url = new URL(this.#server + path);
    for (const [k, v] of Object.entries(options.query ?? {}))
      if (v !== undefined) url.searchParams.set(k, String(v));
    const ctx = new RequestContext(url.toString(), method as never);
    // Headers (tokens, re-read so that projected tokens rotate) every time; the dispatcher it
    // makes is new every time too, and using it would open a new TLS connection per request
    // (a handshake, a SecureContext, a socket left open): one pool is shared instead.
    await this.config.applySecurityAuthentication(ctx);
    const dispatcher = this.#dispatcher ?? this.#sharedDispatcher(ctx);
    const headers = ctx.getHeaders() as Record<string, string>;
    headers.accept = "application/json";
    if (options.body !== undefined)
      headers["content-type"] = options.contentType ?? "application/json";
    const signal = options.signal ?? AbortSignal.timeout(options.timeoutMs ?? 30_000);
    // undici's request(), not fetch(): fetch streams every body, so a request the server refused
    // with an HTTP/2 GOAWAY (an API server restarting, a load balancer's connection age) could
    // not be sent again; with a string body undici replays it on a new connection.
    const response = await undiciRequest(url, {
      method,
      headers,
      ...(options.body === undefined ? {} : { body: JSON.stringify(options.body) }),
      ...(dispatcher === undefined ? {} : { dispatcher }),
      signal,
    });
    const text = await response.body.text();
    const json = String(response.headers["content-type"] ?? "").includes("json");
    const body = text === "" ? undefined : json ? (JSON.parse(text) as unknown) : text;
    if (response.statusCode >= 300) throw new ApiError(method, path, response.statusCode, body);
    return body as T;
  }

  #sharedDispatcher(ctx: RequestContext): Dispatcher | undefined {
    const now = performance.now();
    if (this.#shared === undefined || now - this.#shared.at > DISPATCHER_TTL_MS) {
      const fresh = ctx.getDispatcher() as Dispatcher | undefined;
      if (fresh === undefined) return undefined;
      const old = this.#shared?.dispatcher;
      this.#shared = { dispatcher: fresh, at: now };
      // Requests in flight on the old pool finish; it closes after them.
      void old?.close().catch(() => {});
    }
    return this.#shared.dispatcher;
  }

  get<T extends KubeObject>(r: Resource, name: string, namespace?: string): Promise<T> {
    return this.request("GET", resourcePath(r, { namespace, name }));
  }

  /** One page; use `listAll` for everything. */
  list<T extends KubeObject>(
    r: Resource,
    query: Query & { namespace?: string } = {},
  ): Promise<ObjectList<T>> {
    const { namespace, ...rest } = query;
    return this.request("GET", resourcePath(r, { namespace }), { query: rest });
  }

  async listAll<T extends KubeObject>(
    r: Resource,
    query: { labelSelector?: string; fieldSelector?: string; namespace?: string } = {},
  ): Promise<{ items: T[]; resourceVersion: string }> {
    const items: T[] = [];
    let cont: string | undefined;
    let resourceVersion = "";
    do {
      const page = await this.list<T>(r, { ...query, limit: 500, continue: cont });
      items.push(...page.items);
      cont = page.metadata.continue || undefined;
      resourceVersion = page.metadata.resourceVersion ?? "";
    } while (cont !== undefined);
    return { items, resourceVersion };
  }

  create<T extends KubeObject>(r: Resource, obj: T, query: Query = {}): Promise<T> {
    return this.request("POST", resourcePath(r, { namespace: obj.metadata.namespace }), {
      body: obj,
      query,
    });
  }

  replace<T extends KubeObject>(r: Resource, obj: T, subresource?: string): Promise<T> {
    return this.request(
      "PUT",
      resourcePath(r, {
        namespace: obj.metadata.namespace,
        name: obj.metadata.name,
        ...(subresource === undefined ? {} : { subresource }),
      }),
      { body: obj },
    );
  }

  /** JSON merge patch (RFC 7386), on the object or a subresource such as "status". */
  mergePatch<T extends KubeObject>(
    r: Resource,
    name: string,
    patch: unknown,
    options: { namespace?: string | undefined; subresource?: string; timeoutMs?: number } = {},
  ): Promise<T> {
    const path = resourcePath(r, {
      namespace: options.namespace,
      name,
      ...(options.subresource === undefined ? {} : { subresource: options.subresource }),
    });
    return this.request("PATCH", path, {
      body: patch,
      contentType: "application/merge-patch+json",
      ...(options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs }),
    });
  }

  async delete(r: Resource, name: string, namespace?: string): Promise<void> {
    try {
      await this.request("DELETE", resourcePath(r, { namespace, name }));
    } catch (e) {
      if (!isNotFound(e)) throw e;
    }
  }
}

/** A KubeConfig for a server and a bearer token (tests, the sandbox, `--server/--token` flags). */
export function kubeConfigFor(options: {
  server: string;
  token: string;
  caFile?: string;
  insecure?: boolean;
}): KubeConfig {
  const kc = new KubeConfig();
  kc.loadFromOptions({
    clusters: [
      {
        name: "cluster",
        server: options.server,
        ...(options.caFile === undefined ? {} : { caFile: options.caFile }),
        skipTLSVerify: options.insecure ?? options.caFile === undefined,
      },
    ],
    users: [{ name: "user", token: options.token }],
    contexts: [{ name: "ctx", cluster: "cluster", user: "user" }],
    currentContext: "ctx",
  });
  return kc;
}

/** In a pod: the service account; else $KUBECONFIG or ~/.kube/config. */
export function defaultKubeConfig(kubeconfig?: string): KubeConfig {
  const kc = new KubeConfig();
  if (kubeconfig !== undefined) kc.loadFromFile(kubeconfig);
  else if (process.env.KUBERNETES_SERVICE_HOST !== undefined) kc.loadFromCluster();
  else kc.loadFromDefault();
  return kc;
}
