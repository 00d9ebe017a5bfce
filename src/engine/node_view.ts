/**
 * The NodeView of one node, built from the cluster engine's outcome. Agents build the same view
 * from the API objects they watch (src/agent/view.ts); this path serves the controller, tests,
 * benchmarks and `sallyport explain`.
 */
import type { ClusterOutcome } from "./cluster.ts";
import {
  DEFAULT_NODE_CONFIG,
  type LocalFacts,
  type NodeConfig,
  type NodeView,
  type PolicyView,
} from "./view.ts";

export function nodeViewFromOutcome(
  outcome: ClusterOutcome,
  node: string,
  options: { readonly local: LocalFacts; readonly config?: Partial<NodeConfig> },
): NodeView {
  // Each policy with its gateway's nodes, as an agent reads them from the gateway's status.
  const names = new Map<string, readonly string[]>();
  const policies: PolicyView[] = [];
  for (const p of outcome.policies.values()) {
    if (p.view === undefined) continue;
    let gatewayNodes = names.get(p.gateway);
    if (gatewayNodes === undefined) {
      gatewayNodes = (outcome.gateways.get(p.gateway)?.nodes ?? []).map((n) => n.name).sort();
      names.set(p.gateway, gatewayNodes);
    }
    policies.push({ ...p.view, gatewayNodes });
  }
  return {
    node,
    peers: outcome.peers,
    policies,
    ignoreCIDRs: outcome.ignoreCIDRs,
    config: { ...DEFAULT_NODE_CONFIG, families: outcome.families, ...options.config },
    local: options.local,
  };
}
