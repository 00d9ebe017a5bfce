/**
 * A whole NodePlan as the text the kernel tools receive on a fresh node: what golden files hold
 * and what `sallyport explain --plan` prints.
 */

import type { NodePlan } from "../engine/plan.ts";
import { type RoutingOptions, renderRouting } from "./iproute.ts";
import { renderIpsets } from "./ipset.ts";
import { renderRules } from "./iptables.ts";
import { desiredTable, renderNftTable } from "./nftables.ts";

export function renderPlan(plan: NodePlan, options: RoutingOptions): string {
  const parts: string[] = [`# node ${plan.node}`];
  if (plan.nft !== undefined) {
    const families = ([4, 6] as const).filter((f) => plan.rules[f] !== undefined);
    parts.push(
      "## nft -f -",
      renderNftTable(
        desiredTable(plan, { families, tunnelDevice: options.tunnelDevice }),
      ).trimEnd(),
    );
  } else {
    parts.push("## ipset restore", renderIpsets(plan.ipsets).trimEnd());
    for (const family of [4, 6] as const) {
      const rules = plan.rules[family];
      if (rules === undefined) continue;
      parts.push(
        `## ${family === 4 ? "iptables" : "ip6tables"}-restore --noflush`,
        renderRules(rules).trimEnd(),
      );
    }
  }
  parts.push(renderRouting(plan, options).trimEnd());
  if (plan.sysctls.length > 0)
    parts.push("## sysctl", ...plan.sysctls.map((s) => `${s.path}=${s.value}`));
  if (plan.errors.length > 0) parts.push("## errors", ...plan.errors);
  return `${parts.join("\n")}\n`;
}
