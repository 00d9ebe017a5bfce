/** Objects a kubelet and a user would create, for tests against the real API server. */
import { API_VERSION } from "../../src/api/types.ts";
import {
  CORE,
  isAlreadyExists,
  type KubeClient,
  type KubeObject,
  ours,
} from "../../src/kube/client.ts";
import { type LeaseTiming, NodeLeaseRenewer } from "../../src/kube/node_lease.ts";
import { realClock } from "../../src/lib/clock.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { SALLYPORT_NAMESPACE } from "../../src/sandbox/controlplane.ts";

export async function ensureNamespace(
  client: KubeClient,
  name: string,
  labels: Record<string, string> = {},
): Promise<void> {
  try {
    await client.create(CORE.namespaces, {
      apiVersion: "v1",
      kind: "Namespace",
      metadata: { name, labels },
    });
  } catch (e) {
    if (!isAlreadyExists(e)) throw e;
  }
}

/** A Node with the InternalIPs and pod CIDRs a kubelet would report. */
export async function createNode(
  client: KubeClient,
  name: string,
  options: { addresses: string[]; podCIDRs?: string[]; labels?: Record<string, string> },
): Promise<void> {
  await client.create(CORE.nodes, {
    apiVersion: "v1",
    kind: "Node",
    metadata: { name, labels: { "kubernetes.io/hostname": name, ...options.labels } },
    spec:
      options.podCIDRs === undefined
        ? {}
        : { podCIDR: options.podCIDRs[0], podCIDRs: options.podCIDRs },
  });
  await client.mergePatch(
    CORE.nodes,
    name,
    {
      status: {
        addresses: options.addresses.map((a) => ({ type: "InternalIP", address: a })),
        conditions: [
          {
            type: "Ready",
            status: "True",
            reason: "KubeletReady",
            message: "ready",
            lastHeartbeatTime: new Date().toISOString(),
            lastTransitionTime: new Date().toISOString(),
          },
        ],
      },
    },
    { subresource: "status" },
  );
}

/** A Pod running on `node` with `ips`, as the kubelet reports it once its sandbox is up. */
export async function createPod(
  client: KubeClient,
  namespace: string,
  name: string,
  options: { node: string; ips: string[]; labels?: Record<string, string> },
): Promise<void> {
  await client.create(CORE.pods, {
    apiVersion: "v1",
    kind: "Pod",
    metadata: { name, namespace, labels: options.labels ?? {} },
    spec: { nodeName: options.node, containers: [{ name: "app", image: "registry.invalid/app" }] },
  });
  await client.mergePatch(
    CORE.pods,
    name,
    {
      status: {
        phase: "Running",
        podIP: options.ips[0],
        podIPs: options.ips.map((ip) => ({ ip })),
      },
    },
    { namespace, subresource: "status" },
  );
}

/** Polls `get` until `ok` holds or the deadline passes; returns the last value (no timed assertion). */
export async function eventually<T>(
  get: () => Promise<T>,
  ok: (v: T) => boolean,
  deadlineMs = 15_000,
  stepMs = 100,
): Promise<T> {
  const end = Date.now() + deadlineMs;
  let last = await get();
  while (!ok(last) && Date.now() < end) {
    await new Promise((r) => setTimeout(r, stepMs));
    try {
      last = await get();
    } catch {
      // the API server may be restarting
    }
  }
  return last;
}

/** The nodes some gateway reports down (EgressNode `status.downNodes`), all reports together. */
export async function reportedDown(client: KubeClient): Promise<string[]> {
  const { items } = await client.listAll<KubeObject & { status?: { downNodes?: string[] } }>(
    ours("EgressNode"),
  );
  return items.flatMap((n) => n.status?.downNodes ?? []);
}

export type Status = {
  egressIPs?: string[];
  gatewayNode?: string;
  standbyNodes?: string[];
  matchedPods?: number;
  revision?: string;
  programmed?: string;
  shadowedBy?: { policy: string; pods: number }[];
  conditions?: { type: string; status: string; reason: string; message: string }[];
};

export function condition(s: Status | undefined, type: string) {
  return s?.conditions?.find((c) => c.type === type);
}

export type WithStatus = KubeObject & { status?: Status };

/** The gateway "edge" over the nodes labelled egress=true. */
export async function createGateway(client: KubeClient, pool: string[]): Promise<void> {
  await client.create(ours("EgressGateway"), {
    apiVersion: API_VERSION,
    kind: "EgressGateway",
    metadata: { name: "edge" },
    spec: { nodeSelector: { matchLabels: { egress: "true" } }, pool },
  });
}

/** What the agents of gateway-capable nodes do for liveness: renew their node leases. */
export function renewNodeLeases(
  client: KubeClient,
  nodes: readonly string[],
  timing: LeaseTiming,
): Map<string, NodeLeaseRenewer> {
  const renewers = new Map<string, NodeLeaseRenewer>();
  for (const node of nodes) {
    const r = new NodeLeaseRenewer({
      client,
      namespace: SALLYPORT_NAMESPACE,
      node,
      clock: realClock,
      log: silentLogger,
      timing,
    });
    r.start({ create: true });
    renewers.set(node, r);
  }
  return renewers;
}

/**
 * Mutating requests the API server served for one API group (POST, PUT, PATCH, DELETE), from its
 * own `apiserver_request_total` counters: what a writer really cost, whoever sent it.
 */
export async function apiWrites(
  admin: KubeClient,
  group = "sallyport.dev",
  resource?: string,
): Promise<number> {
  const text = await admin.request<string>("GET", "/metrics");
  let sum = 0;
  for (const line of text.split("\n")) {
    if (!line.startsWith("apiserver_request_total{")) continue;
    if (!line.includes(`group="${group}"`)) continue;
    if (resource !== undefined && !line.includes(`resource="${resource}"`)) continue;
    if (!/verb="(POST|PATCH|PUT|DELETE|APPLY)"/.test(line)) continue;
    sum += Number(line.slice(line.lastIndexOf(" ") + 1));
  }
  return sum;
}
