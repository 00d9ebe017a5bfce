/**
 * What `sallyport-cni` (the chained CNI plugin, src/cni/plugin.ts) and the node's agent
 * (src/agent/cni_server.ts) say to each other: HTTP with JSON bodies over a Unix socket that
 * only root on the node can open (`curl --unix-socket /run/sallyport/cni.sock
 * http://agent/v1/status` works for a look by hand).
 *
 * The socket is the trust boundary: whoever can connect is the container runtime (or root),
 * so the agent takes the pod's addresses from the plugin as they are. The Pod object's status
 * has no addresses yet when CNI ADD runs: the runtime reports them after the network exists.
 */

export const DEFAULT_CNI_SOCKET = "/run/sallyport/cni.sock";

export const CNI_PATHS = {
  add: "/v1/add",
  del: "/v1/del",
  check: "/v1/check",
  status: "/v1/status",
} as const;

/** One pod network attachment, as the runtime names it (CNI_CONTAINERID, CNI_IFNAME). */
export interface PodNetworkRequest {
  readonly containerId: string;
  readonly ifname: string;
  readonly namespace: string;
  readonly name: string;
  /** The pod's own addresses from the previous plugin's result, without prefix length. */
  readonly ips: readonly string[];
}

/** ADD and CHECK: the policies of this node that select the pod (their keys). */
export interface PodNetworkReply {
  readonly policies: readonly string[];
}

/** Any request the agent could not serve: `retry` says whether trying again may help. */
export interface AgentErrorReply {
  readonly error: string;
  readonly retry: boolean;
}
