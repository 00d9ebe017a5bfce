/**
 * kube-proxy on each sandbox node, in the node's network namespace (as the DaemonSet runs it with
 * hostNetwork), from the pinned k8s.io/kubernetes: real Services, real EndpointSlices, real
 * iptables or nftables rules beside Sallyport's.
 */
import { writeFileSync } from "node:fs";

export type ProxyMode = "iptables" | "nftables";
export const PROXY_MODES: readonly ProxyMode[] = ["iptables", "nftables"];

/** The token user of kube-proxy: the name the bootstrap binding `system:node-proxier` expects. */
export const KUBE_PROXY_USER = "system:kube-proxy";

export const KUBE_PROXY_HEALTHZ = "127.0.0.1:10256";

/**
 * Writes the KubeProxyConfiguration of one node and returns kube-proxy's argv.
 *
 * Conntrack limits are left alone (`maxPerCore: 0`, timeouts 0): they are global sysctls that a
 * network namespace other than the host's cannot set, and the sandbox's nodes share one kernel.
 */
export function kubeProxyArgv(options: {
  readonly binary: string;
  readonly configFile: string;
  readonly kubeconfig: string;
  readonly node: string;
  readonly mode: ProxyMode;
  readonly clusterCIDRs: readonly string[];
}): string[] {
  const config = {
    apiVersion: "kubeproxy.config.k8s.io/v1alpha1",
    kind: "KubeProxyConfiguration",
    clientConnection: { kubeconfig: options.kubeconfig },
    hostnameOverride: options.node,
    mode: options.mode,
    clusterCIDR: options.clusterCIDRs.join(","),
    detectLocalMode: "ClusterCIDR",
    nodePortAddresses: ["primary"],
    healthzBindAddress: KUBE_PROXY_HEALTHZ,
    metricsBindAddress: "127.0.0.1:10249",
    oomScoreAdj: 0,
    conntrack: {
      maxPerCore: 0,
      min: 0,
      tcpEstablishedTimeout: "0s",
      tcpCloseWaitTimeout: "0s",
    },
  };
  writeFileSync(options.configFile, JSON.stringify(config, null, 2));
  return [options.binary, `--config=${options.configFile}`];
}
