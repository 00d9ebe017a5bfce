/**
 * The Grafana dashboard and the chart's traffic pieces: the dashboard is valid JSON, every
 * metric it queries is one Sallyport exports, deploy/grafana-dashboard.json is the chart's copy,
 * and the chart ships it (metrics.grafanaDashboard), lets readers run `kubectl sallyport top`
 * (metrics.readers) and passes the agent's traffic flags.
 */
import assert from "node:assert/strict";
import { globSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import { parseAllDocuments } from "yaml";
import { CHART, FULL_VALUES, REPO, template } from "../../scripts/helm.ts";

interface Obj {
  kind: string;
  metadata: { name: string; labels?: Record<string, string> };
  data?: Record<string, string>;
  subjects?: { kind: string; name: string; namespace?: string }[];
  rules?: { resources: string[]; verbs: string[] }[];
  spec?: { template: { spec: { containers: { args: string[] }[] } } };
}

const objects = (yaml: string) =>
  parseAllDocuments(yaml)
    .map((d) => d.toJS() as Obj | null)
    .filter((o): o is Obj => o !== null);

const DASHBOARD = readFileSync(join(CHART, "dashboards", "sallyport.json"), "utf8");

/** Every metric name the code defines (prom-client `name:` and gaugeOf's second argument). */
function definedMetrics(): Set<string> {
  const names = new Set<string>();
  for (const file of globSync("src/**/*.ts", { cwd: REPO })) {
    if (file.endsWith("_test.ts")) continue;
    for (const m of readFileSync(join(REPO, file), "utf8").matchAll(/"(sallyport_[a-z0-9_]+)"/g))
      names.add(m[1]!);
  }
  return names;
}

interface Panel {
  title: string;
  type: string;
  targets?: { expr: string }[];
  panels?: Panel[];
}

function exprs(dashboard: { panels: Panel[]; templating: { list: { query?: unknown }[] } }) {
  const out: string[] = [];
  const walk = (ps: Panel[]) => {
    for (const p of ps) {
      for (const t of p.targets ?? []) out.push(t.expr);
      walk(p.panels ?? []);
    }
  };
  walk(dashboard.panels);
  for (const v of dashboard.templating.list)
    if (typeof v.query === "object" && v.query !== null)
      out.push((v.query as { query: string }).query);
  return out;
}

describe("the Grafana dashboard", () => {
  const dashboard = JSON.parse(DASHBOARD);

  it("queries only metrics Sallyport exports", () => {
    const defined = definedMetrics();
    const used = new Set<string>();
    for (const e of exprs(dashboard))
      for (const m of e.matchAll(/\bsallyport_[a-z0-9_]+/g))
        used.add(m[0].replace(/_(bucket|sum|count)$/, ""));
    const missing = [...used].filter((m) => !defined.has(m));
    assert.deepEqual(missing, [], "metrics the dashboard uses that no code exports");
    // What the dashboard is for (docs/operations.md, "Traffic metrics").
    for (const m of [
      "sallyport_policy_packets_total",
      "sallyport_policy_bytes_total",
      "sallyport_policy_snat_connections_total",
      "sallyport_snat_connections",
      "sallyport_snat_ports_in_use",
      "sallyport_snat_port_saturation",
      "sallyport_datapath_event_to_kernel_seconds",
      "sallyport_datapath_drift_repairs_total",
      "sallyport_egress_ip_moves_total",
      "sallyport_controller_writes_total",
    ])
      assert.ok(used.has(m), `the dashboard shows ${m}`);
  });

  it("has unique panel ids, a datasource variable and no panel without a query", () => {
    const ids = (dashboard.panels as { id: number }[]).map((p) => p.id);
    assert.equal(new Set(ids).size, ids.length);
    assert.ok(
      dashboard.templating.list.some((v: { type: string }) => v.type === "datasource"),
      "the Prometheus to use is chosen on import",
    );
    for (const p of dashboard.panels as Panel[])
      if (p.type !== "row") assert.ok((p.targets ?? []).length > 0, p.title);
  });

  it("deploy/grafana-dashboard.json is the chart's copy (run `make manifests`)", () => {
    assert.equal(readFileSync(join(REPO, "deploy", "grafana-dashboard.json"), "utf8"), DASHBOARD);
  });
});

describe("the chart's traffic pieces", () => {
  const defaults = objects(template());
  const full = objects(template({ values: [FULL_VALUES] }));

  it("ships the dashboard for Grafana's sidecar only when asked, unchanged", () => {
    assert.ok(!defaults.some((o) => o.kind === "ConfigMap"));
    const cm = full.find(
      (o) => o.kind === "ConfigMap" && o.metadata.name === "sallyport-grafana-dashboard",
    );
    assert.ok(cm, "metrics.grafanaDashboard.enabled renders the ConfigMap");
    assert.equal(cm.metadata.labels?.grafana_dashboard, "1");
    assert.equal(cm.metadata.labels?.team, "platform");
    assert.deepEqual(JSON.parse(cm.data?.["sallyport.json"] ?? ""), JSON.parse(DASHBOARD));
  });

  it("grants pods/proxy in its namespace to metrics.readers only", () => {
    const role = defaults.find(
      (o) => o.kind === "Role" && o.metadata.name === "sallyport-metrics-reader",
    );
    assert.deepEqual(role?.rules, [
      { apiGroups: [""], resources: ["pods"], verbs: ["get", "list"] },
      { apiGroups: [""], resources: ["pods/proxy"], verbs: ["get"] },
    ]);
    assert.ok(
      !defaults.some((o) => o.metadata.name === "sallyport-metrics-readers"),
      "nobody by default",
    );
    const binding = full.find(
      (o) => o.kind === "RoleBinding" && o.metadata.name === "sallyport-metrics-readers",
    );
    assert.deepEqual(binding?.subjects, [
      { kind: "Group", name: "platform-team", apiGroup: "rbac.authorization.k8s.io" },
      { kind: "ServiceAccount", name: "dashboards", namespace: "monitoring" },
    ]);
  });

  it("passes the agent's traffic flags", () => {
    const args = (objs: Obj[]) =>
      objs.find((o) => o.kind === "DaemonSet")?.spec?.template.spec.containers[0]?.args ?? [];
    for (const a of [
      "--traffic-period-ms=10000",
      "--top-destinations=10",
      "--snat-port-range=1024-65535",
    ])
      assert.ok(args(defaults).includes(a), a);
    for (const a of [
      "--traffic-period-ms=30000",
      "--top-destinations=20",
      "--snat-port-range=2048-65535",
    ])
      assert.ok(args(full).includes(a), a);
  });
});
