/**
 * The Helm chart (charts/sallyport) with upstream Helm built from test/helm-bin/go.mod: it
 * lints clean, renders with its defaults and with every value set (ci/full-values.yaml), its
 * schema rejects what it should, the flags it passes are ones `sallyport` knows, and the plain
 * manifests under deploy/ are what it renders (scripts/gen-deploy.ts). The API server's verdict
 * on the rendered objects is in test/controlplane/deploy_test.ts; what `lookup` keeps across
 * `helm upgrade` (the generated secrets) in upgrade_test.ts.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import { parse, parseAllDocuments } from "yaml";
import { renderDeployFiles } from "../../scripts/gen-deploy.ts";
import { CHART, FULL_VALUES, helm, REPO, template } from "../../scripts/helm.ts";
import { defaultImage } from "../../scripts/image.ts";
import { renderCrdFiles } from "../../src/api/crds.ts";

interface Obj {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string> } & Record<
    string,
    unknown
  >;
  [key: string]: unknown;
}
interface Container {
  image: string;
  imagePullPolicy: string;
  args: string[];
  ports?: { name: string; containerPort: number; protocol?: string }[];
  volumeMounts?: { name: string; mountPath: string; readOnly?: boolean }[];
}
interface PodSpec {
  containers: Container[];
  volumes?: unknown[];
  tolerations?: unknown[];
  nodeSelector?: Record<string, string>;
  priorityClassName?: string;
}
type Workload = Obj & { spec: { replicas?: number; template: { spec: PodSpec } } };

function objects(yaml: string): Obj[] {
  return parseAllDocuments(yaml)
    .map((d) => d.toJS() as Obj | null)
    .filter((o): o is Obj => o !== null);
}

const kinds = (objs: Obj[]) => objs.map((o) => `${o.kind}/${o.metadata.name}`).sort();
const find = <T extends Obj = Obj>(objs: Obj[], kind: string, name?: string): T => {
  const o = objs.find((x) => x.kind === kind && (name === undefined || x.metadata.name === name));
  assert.ok(o, `${kind} ${name ?? ""} is rendered`);
  return o as T;
};
const container = (w: Workload) => w.spec.template.spec.containers[0]!;

/** The long options `sallyport <command> --help` lists. */
function flagsOf(command: string): Set<string> {
  const help = execFileSync(
    join(REPO, "node_modules", ".bin", "node"),
    [join(REPO, "src", "cli", "main.ts"), ...command.split(" "), "--help"],
    { encoding: "utf8" },
  );
  return new Set(help.match(/--[a-z][a-z0-9-]*/g) ?? []);
}

describe("the Helm chart", () => {
  const defaults = objects(template());
  const full = objects(template({ values: [FULL_VALUES] }));

  it("lints clean (helm lint --strict), with its defaults and with every value set", () => {
    for (const args of [[], ["--values", FULL_VALUES]]) {
      const out = helm(["lint", "--strict", CHART, ...args]);
      assert.match(out, /1 chart\(s\) linted, 0 chart\(s\) failed/);
      assert.doesNotMatch(out, /\[(WARNING|ERROR)\]/, out);
    }
  });

  it("renders, by default, the workloads, RBAC, metrics Services and a webhook with a certificate of its own", () => {
    assert.deepEqual(kinds(defaults), [
      "ClusterRole/sallyport-agent",
      "ClusterRole/sallyport-controller",
      "ClusterRoleBinding/sallyport-agent",
      "ClusterRoleBinding/sallyport-controller",
      "DaemonSet/sallyport-agent",
      "Deployment/sallyport-controller",
      "PodDisruptionBudget/sallyport-controller",
      "Role/sallyport-leases",
      "Role/sallyport-metrics-reader",
      "RoleBinding/sallyport-leases",
      "Secret/sallyport-probe-key",
      "Secret/sallyport-webhook-tls",
      "Service/sallyport-agent-metrics",
      "Service/sallyport-controller-metrics",
      "Service/sallyport-webhook",
      "ServiceAccount/sallyport-agent",
      "ServiceAccount/sallyport-controller",
      "ValidatingAdmissionPolicy/sallyport-agent-own-node",
      "ValidatingAdmissionPolicyBinding/sallyport-agent-own-node",
      "ValidatingWebhookConfiguration/sallyport.dev",
    ]);
    for (const o of defaults)
      if (!o.kind.startsWith("Cluster") && !o.kind.startsWith("Validating"))
        assert.equal(o.metadata.namespace, "sallyport-system", `${o.kind}/${o.metadata.name}`);
  });

  it("runs by default the image `make image` builds", () => {
    for (const [kind, name] of [
      ["Deployment", "sallyport-controller"],
      ["DaemonSet", "sallyport-agent"],
    ] as const) {
      assert.equal(container(find<Workload>(defaults, kind, name)).image, defaultImage());
    }
    const chart = parse(readFileSync(join(CHART, "Chart.yaml"), "utf8")) as { appVersion: string };
    const pkg = JSON.parse(readFileSync(join(REPO, "package.json"), "utf8")) as { version: string };
    assert.equal(chart.appVersion, pkg.version, "the chart's appVersion is Sallyport's version");
  });

  it("generates a webhook certificate the API server can trust for the webhook's Service", () => {
    const secret = find<Obj & { data: Record<string, string> }>(
      defaults,
      "Secret",
      "sallyport-webhook-tls",
    );
    const pem = (k: string) => Buffer.from(secret.data[k]!, "base64").toString();
    const ca = new X509Certificate(pem("ca.crt"));
    const cert = new X509Certificate(pem("tls.crt"));
    assert.ok(ca.ca, "ca.crt is a CA");
    assert.ok(cert.verify(ca.publicKey), "tls.crt is signed by ca.crt");
    assert.ok(cert.checkPrivateKey(createPrivateKey(pem("tls.key"))), "tls.key is its key");
    assert.match(cert.subjectAltName ?? "", /DNS:sallyport-webhook\.sallyport-system\.svc\b/);
    assert.ok(new Date(cert.validTo).getTime() > Date.now() + 365 * 86_400_000);
    const config = find<Obj & { webhooks: { clientConfig: { caBundle?: string } }[] }>(
      defaults,
      "ValidatingWebhookConfiguration",
    );
    assert.equal(config.webhooks[0]!.clientConfig.caBundle, secret.data["ca.crt"]);
  });

  it("renders every value: images, scheduling, flags, cert-manager, a ServiceMonitor", () => {
    const controller = find<Workload>(full, "Deployment");
    const agent = find<Workload>(full, "DaemonSet");
    assert.equal(controller.spec.replicas, 3);
    for (const w of [controller, agent]) {
      assert.equal(container(w).image, "registry.example.com/platform/sallyport:0.1.0-rc.1");
      assert.equal(container(w).imagePullPolicy, "Always");
    }
    assert.deepEqual(controller.spec.template.spec.nodeSelector, {
      "node-role.kubernetes.io/control-plane": "",
    });
    assert.equal(controller.spec.template.spec.priorityClassName, undefined);
    assert.equal(agent.spec.template.spec.priorityClassName, "egress-critical");
    assert.deepEqual(agent.spec.template.spec.tolerations, [
      { key: "dedicated", operator: "Equal", value: "egress", effect: "NoSchedule" },
    ]);
    for (const arg of [
      "--families=4",
      "--iptables-backend=legacy",
      "--vxlan-port=4789",
      "--underlay-device=eth1",
      "--exempt-by-sets",
      "--snat-ports=20000-29999",
      "--metrics-port=9191",
      "--lease-duration-ms=4000",
      "--probe-port=7900",
      "--probe-interval-ms=100",
      "--probe-multiplier=5",
      "--probe-hold-down-ms=10000",
      "--probe-key-file=/etc/sallyport/probe-key/key",
    ])
      assert.ok(container(agent).args.includes(arg), `agent ${arg}`);
    assert.ok(
      container(agent).ports?.some((p) => p.name === "probe" && p.containerPort === 7900),
      "the probe port",
    );
    for (const arg of [
      "--lease-duration-ms=4000",
      "--webhook-port=10443",
      "--identity=$(POD_NAME)",
    ])
      assert.ok(container(controller).args.includes(arg), `controller ${arg}`);
    assert.deepEqual(
      (find(full, "Certificate") as Obj & { spec: { issuerRef: unknown } }).spec.issuerRef,
      { name: "cluster-ca", kind: "ClusterIssuer", group: "cert-manager.io" },
    );
    assert.ok(!full.some((o) => o.kind === "Issuer" || o.kind === "Secret"));
    const config = find(full, "ValidatingWebhookConfiguration") as Obj & {
      metadata: { annotations: Record<string, string> };
      webhooks: { failurePolicy: string }[];
    };
    assert.equal(
      config.metadata.annotations["cert-manager.io/inject-ca-from"],
      "sallyport-system/sallyport-webhook",
    );
    assert.equal(config.webhooks[0]!.failurePolicy, "Fail");
    const monitor = find(full, "ServiceMonitor") as Obj & {
      spec: { endpoints: { port: string; interval: string }[] };
    };
    assert.equal(monitor.metadata.labels?.release, "prometheus");
    assert.deepEqual(monitor.spec.endpoints, [
      { port: "metrics", path: "/metrics", interval: "15s" },
    ]);
    assert.ok(!defaults.some((o) => o.kind === "ServiceMonitor"), "only when enabled");
  });

  it("without the webhook: no certificate, no configuration, no webhook flags", () => {
    const objs = objects(template({ set: ["webhook.enabled=false"] }));
    assert.ok(!objs.some((o) => /webhook/i.test(`${o.kind}/${o.metadata.name}`)));
    const controller = find<Workload>(objs, "Deployment");
    assert.ok(!container(controller).args.some((a) => a.startsWith("--webhook")));
    assert.equal(controller.spec.template.spec.volumes, undefined);
  });

  it("passes only flags that `sallyport controller` and `sallyport agent` know", () => {
    for (const [command, kind] of [
      ["controller", "Deployment"],
      ["agent", "DaemonSet"],
    ] as const) {
      const known = flagsOf(command);
      for (const objs of [defaults, full]) {
        const [sub, ...args] = container(find<Workload>(objs, kind)).args;
        assert.equal(sub, command);
        for (const arg of args) {
          const flag = /^--[a-z0-9-]+/.exec(arg)?.[0];
          assert.ok(flag !== undefined && known.has(flag), `${command}: unknown flag in "${arg}"`);
        }
      }
    }
  });

  it("agent.cni.mode: an init container installs sallyport-cni, or removes it; the agent serves it", () => {
    type InitSpec = Omit<PodSpec, "volumes"> & {
      initContainers?: (Container & { name: string; volumeMounts: { mountPath: string }[] })[];
      volumes?: { name: string; hostPath?: { path: string } }[];
    };
    const spec = (objs: Obj[]) => find<Workload>(objs, "DaemonSet").spec.template.spec as InitSpec;
    assert.equal(spec(defaults).initContainers, undefined, "disabled by default");
    assert.ok(
      !container(find<Workload>(defaults, "DaemonSet")).args.some((a) => a.startsWith("--cni")),
    );
    const chained = spec(full);
    const init = chained.initContainers?.[0];
    assert.equal(init?.name, "install-cni");
    assert.deepEqual(init?.args.slice(0, 2), ["cni", "install"]);
    const known = flagsOf("cni install");
    for (const arg of init?.args.slice(2) ?? []) {
      const flag = /^--[a-z0-9-]+/.exec(arg)?.[0];
      assert.ok(flag !== undefined && known.has(flag), `cni install: unknown flag in "${arg}"`);
    }
    assert.ok(init?.args.includes("--fail-open"));
    assert.ok(init?.args.includes("--timeout-ms=5000"));
    assert.ok(
      container(find<Workload>(full, "DaemonSet")).args.includes(
        "--cni-socket=/run/sallyport/cni.sock",
      ),
    );
    const watch = find<Workload>(full, "DaemonSet").spec.template.spec.containers[1];
    assert.deepEqual(watch?.args.slice(0, 4), [
      "cni",
      "install",
      "--entry-only",
      "--watch-ms=5000",
    ]);
    for (const arg of watch?.args.slice(2) ?? []) {
      const flag = /^--[a-z0-9-]+/.exec(arg)?.[0];
      assert.ok(flag !== undefined && known.has(flag), `cni-watch: unknown flag in "${arg}"`);
    }
    const hostPaths = Object.fromEntries(
      (chained.volumes ?? []).map((v) => [v.name, v.hostPath?.path]),
    );
    assert.equal(hostPaths["cni-bin"], "/var/lib/rancher/k3s/data/current/bin");
    assert.equal(hostPaths["cni-conf"], "/var/lib/rancher/k3s/agent/etc/cni/net.d");
    assert.equal(hostPaths["cni-socket"], "/run/sallyport");
    const removing = spec(objects(template({ set: ["agent.cni.mode=remove"] })));
    assert.deepEqual(removing.initContainers?.[0]?.args, [
      "cni",
      "uninstall",
      "--bin-dir=/host/cni/bin",
      "--conf-dir=/host/cni/net.d",
    ]);
    assert.equal(removing.initContainers?.[0]?.name, "remove-cni");
    assert.throws(() => template({ set: ["agent.cni.mode=sometimes"] }), /\/agent\/cni\/mode/);
  });

  it("node leases at kubelet's pace by default, the same for the controller and the agents", () => {
    for (const kind of ["Deployment", "DaemonSet"]) {
      const args = container(find<Workload>(defaults, kind)).args;
      for (const arg of [
        "--lease-renew-ms=10000",
        "--lease-duration-ms=40000",
        "--lease-grace-ms=10000",
      ])
        assert.ok(args.includes(arg), `${kind} ${arg}`);
    }
  });

  it("authenticates the agents' liveness probes with a key of its own, mounted read-only", () => {
    const agent = find<Workload>(defaults, "DaemonSet");
    const args = container(agent).args;
    for (const arg of [
      "--probe-port=7800",
      "--probe-interval-ms=50",
      "--probe-multiplier=4",
      "--probe-hold-down-ms=5000",
      "--probe-key-file=/etc/sallyport/probe-key/key",
    ])
      assert.ok(args.includes(arg), `agent ${arg}`);
    assert.ok(!args.some((a) => a.startsWith("--fence-port")));
    assert.deepEqual(
      container(agent).ports?.find((p) => p.name === "probe"),
      { name: "probe", containerPort: 7800, protocol: "UDP" },
    );
    assert.ok(!container(agent).ports?.some((p) => p.name === "fence"));
    // The Secret, generated: 32 random bytes (the agent wants at least 16), new at every render
    // without a cluster to read the earlier one back from (upgrade_test.ts: kept across upgrades).
    type Secret = Obj & { type: string; data: Record<string, string> };
    const keyOf = (objs: Obj[]) => {
      const secret = find<Secret>(objs, "Secret", "sallyport-probe-key");
      assert.equal(secret.metadata.namespace, "sallyport-system");
      assert.equal(secret.type, "Opaque");
      assert.deepEqual(Object.keys(secret.data), ["key"]);
      return Buffer.from(secret.data.key!, "base64");
    };
    const key = keyOf(defaults);
    assert.equal(key.length, 32);
    assert.notDeepEqual(keyOf(objects(template())), key, "random");
    // Mounted read-only where --probe-key-file points, readable by the agent (root) only.
    const mount = container(agent).volumeMounts?.find((m) => m.name === "probe-key");
    assert.deepEqual(mount, {
      name: "probe-key",
      mountPath: "/etc/sallyport/probe-key",
      readOnly: true,
    });
    assert.deepEqual(
      (agent.spec.template.spec.volumes as { name: string }[]).find((v) => v.name === "probe-key"),
      { name: "probe-key", secret: { secretName: "sallyport-probe-key", defaultMode: 0o400 } },
    );
    // The kubelet mounts it: no role of the chart, the agent's included, grants Secrets.
    for (const role of defaults.filter((o) => /^(Cluster)?Role$/.test(o.kind))) {
      const rules = (role as Obj & { rules: { resources?: string[] }[] }).rules;
      assert.ok(
        !rules.some((r) => r.resources?.includes("secrets")),
        `${role.kind}/${role.metadata.name}`,
      );
    }
    // agent.probe.keySource external (ci/full-values.yaml): the same mount, no Secret rendered.
    const fullAgent = find<Workload>(full, "DaemonSet");
    assert.ok(!full.some((o) => o.kind === "Secret"));
    assert.deepEqual(
      container(fullAgent).volumeMounts?.find((m) => m.name === "probe-key"),
      mount,
    );
  });

  it("its schema rejects unknown keys and bad values, with the path", () => {
    for (const [set, message] of [
      ["controler.replicas=3", /additional properties 'controler' not allowed/],
      ["agent.families={4,5}", /\/agent\/families\/1.*4, 6/],
      ["webhook.certificate.source=vault", /\/webhook\/certificate\/source/],
      ["image.pullPolicy=Sometimes", /\/image\/pullPolicy/],
      ["leases.renewMs=0", /\/leases\/renewMs/],
      ["agent.fencePort=7800", /additional properties 'fencePort' not allowed/],
      ["agent.probe.interval=50", /additional properties 'interval' not allowed/],
      ["agent.probe.port=70000", /\/agent\/probe\/port/],
      ["agent.probe.multiplier=1", /\/agent\/probe\/multiplier/],
      ["agent.probe.keySource=vault", /\/agent\/probe\/keySource/],
    ] as const) {
      assert.throws(() => template({ set: [set] }), message, set);
    }
    assert.throws(
      () =>
        template({ set: ["metrics.service.enabled=false", "metrics.serviceMonitor.enabled=true"] }),
      /metrics.serviceMonitor.enabled needs metrics.service.enabled/,
    );
  });

  it("deploy/ is what the chart renders (run `make manifests`)", () => {
    for (const [name, text] of renderDeployFiles()) {
      assert.equal(
        readFileSync(join(REPO, "deploy", name), "utf8"),
        text,
        `deploy/${name} is stale: run make manifests`,
      );
    }
  });

  it("the chart's CRDs are deploy/crds/, generated from src/api (run `make manifests`)", () => {
    const files = renderCrdFiles();
    const dir = join(CHART, "crds");
    assert.deepEqual(readdirSync(dir).sort(), [...files.keys()].sort());
    for (const [name, text] of files)
      assert.equal(readFileSync(join(dir, name), "utf8"), text, `charts/sallyport/crds/${name}`);
  });
});
