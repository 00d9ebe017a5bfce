/**
 * What we ship: the manifests under deploy/ and the Helm chart rendered with its defaults and
 * with every value set are accepted by a real kube-apiserver (server-side apply, dry run: its
 * own validation of Deployments, DaemonSets, Services, Secrets and webhooks applies), and the
 * bundled `sallyport` (npm run build, what the image runs) runs the controller against it.
 *
 * cert-manager's Issuer and Certificate and the Prometheus Operator's ServiceMonitor need CRDs
 * this API server does not have: minimal ones (their group, version, kind and scope, any
 * content) are installed, so those objects are checked for where they go, not for their fields.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, openSync, readFileSync, renameSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { parseAllDocuments } from "yaml";
import { FULL_VALUES, template } from "../../scripts/helm.ts";
import {
  CORE,
  type KubeClient,
  type KubeObject,
  MANIFEST_KINDS,
  ours,
  type Resource,
  resourcePath,
} from "../../src/kube/client.ts";
import type { Lease } from "../../src/kube/lease.ts";
import { ControlPlane, SALLYPORT_NAMESPACE } from "../../src/sandbox/controlplane.ts";
import { selfSignedCert } from "../../src/sandbox/pki.ts";
import { eventually } from "../support/kube.ts";
import { REPO } from "../support/lab.ts";

function objects(yaml: string): KubeObject[] {
  return parseAllDocuments(yaml)
    .map((d) => d.toJS() as KubeObject | null)
    .filter((o): o is KubeObject => o !== null);
}

/** Kinds the chart renders besides those of deploy/; the last three by their minimal CRDs. */
const MORE_KINDS: Readonly<Record<string, Resource>> = {
  Secret: { group: "", version: "v1", plural: "secrets", namespaced: true },
  ConfigMap: { group: "", version: "v1", plural: "configmaps", namespaced: true },
  Issuer: { group: "cert-manager.io", version: "v1", plural: "issuers", namespaced: true },
  Certificate: {
    group: "cert-manager.io",
    version: "v1",
    plural: "certificates",
    namespaced: true,
  },
  ServiceMonitor: {
    group: "monitoring.coreos.com",
    version: "v1",
    plural: "servicemonitors",
    namespaced: true,
  },
};

function minimalCrd(kind: string): KubeObject {
  const r = MORE_KINDS[kind]!;
  return {
    apiVersion: "apiextensions.k8s.io/v1",
    kind: "CustomResourceDefinition",
    metadata: { name: `${r.plural}.${r.group}` },
    spec: {
      group: r.group,
      scope: "Namespaced",
      names: { kind, plural: r.plural, singular: kind.toLowerCase(), listKind: `${kind}List` },
      versions: [
        {
          name: r.version,
          served: true,
          storage: true,
          schema: {
            openAPIV3Schema: { type: "object", "x-kubernetes-preserve-unknown-fields": true },
          },
        },
      ],
    },
  } as KubeObject;
}

/** `kubectl apply --server-side --dry-run=server`: creates or updates nothing, validates all. */
async function dryRunApply(client: KubeClient, obj: KubeObject): Promise<void> {
  const resource = MANIFEST_KINDS[obj.kind ?? ""] ?? MORE_KINDS[obj.kind ?? ""];
  assert.ok(resource, `a test resource for kind ${obj.kind}`);
  const path = resourcePath(resource, {
    namespace: obj.metadata.namespace,
    name: obj.metadata.name,
  });
  try {
    await client.request("PATCH", path, {
      body: obj,
      contentType: "application/apply-patch+yaml",
      query: { dryRun: "All", fieldManager: "sallyport-test", force: true },
    });
  } catch (e) {
    throw new Error(`${obj.kind}/${obj.metadata.name} is refused: ${(e as Error).message}`);
  }
}

async function dryRunAll(client: KubeClient, objs: KubeObject[]): Promise<string[]> {
  for (const obj of objs) await dryRunApply(client, obj);
  return objs.map((o) => o.kind ?? "").sort();
}

describe("what we ship", () => {
  let cp: ControlPlane;
  let admin: KubeClient;
  const scratch = mkdtempSync(join(tmpdir(), "sallyport-deploy-"));
  let controller: ChildProcess | undefined;

  before(async () => {
    cp = await ControlPlane.start({
      tag: "deploy",
      users: { controller: ["sallyport:controllers"] },
    });
    admin = cp.client();
    for (const kind of ["Issuer", "Certificate", "ServiceMonitor"]) {
      const crd = minimalCrd(kind);
      await admin.create(MANIFEST_KINDS.CustomResourceDefinition!, crd);
      await eventually(
        () =>
          admin.list(MORE_KINDS[kind]!, { namespace: SALLYPORT_NAMESPACE }).catch(() => undefined),
        (list) => list !== undefined,
      );
    }
  });

  after(async () => {
    controller?.kill("SIGKILL");
    await cp?.stop();
    rmSync(scratch, { recursive: true, force: true });
  });

  for (const file of ["rbac.yaml", "sallyport.yaml", "webhook.yaml"]) {
    it(`deploy/${file} is accepted by the API server (dry run)`, async () => {
      const kinds = await dryRunAll(
        admin,
        objects(readFileSync(join(REPO, "deploy", file), "utf8")),
      );
      assert.ok(kinds.length > 0);
    });
  }

  it("the Helm chart with its defaults is accepted by the API server (dry run)", async () => {
    const kinds = await dryRunAll(admin, objects(template()));
    assert.ok(kinds.includes("DaemonSet") && kinds.includes("Secret"), kinds.join(" "));
  });

  it("the Helm chart with every value set (ci/full-values.yaml) is accepted (dry run)", async () => {
    const kinds = await dryRunAll(admin, objects(template({ values: [FULL_VALUES] })));
    assert.ok(kinds.includes("ServiceMonitor") && kinds.includes("Certificate"), kinds.join(" "));
  });

  it("the dry run refuses what the API server would (a control for the checks above)", async () => {
    const agent = objects(template()).find((o) => o.kind === "DaemonSet") as KubeObject & {
      spec: { template: { spec: { containers: { ports: { name: string }[] }[] } } };
    };
    agent.spec.template.spec.containers[0]!.ports[0]!.name = "metrics_port_name";
    await assert.rejects(
      dryRunApply(admin, agent),
      /DaemonSet\/sallyport-agent is refused: .*port/,
    );
  });

  it("the bundled sallyport runs the controller: it leads and publishes the cluster info", async () => {
    const build = spawn(
      join(REPO, "node_modules", ".bin", "node"),
      [join(REPO, "scripts", "build.ts"), "--outdir", scratch],
      { stdio: "ignore" },
    );
    const code = await new Promise((r) => build.on("exit", r));
    assert.equal(code, 0, "npm run build succeeds");
    const log = openSync(join(scratch, "controller.log"), "a");
    controller = spawn(
      process.execPath,
      [
        join(scratch, "sallyport.mjs"),
        "controller",
        "--kubeconfig",
        cp.kubeconfig("controller"),
        "--identity",
        "bundled",
        "--metrics-port",
        "0",
        "--bind-address",
        "127.0.0.1",
        // The Deployment's flags: the certificate is missing here, as without cert-manager.
        "--webhook-port",
        "0",
        "--webhook-cert",
        join(scratch, "missing", "tls.crt"),
        "--webhook-key",
        join(scratch, "missing", "tls.key"),
      ],
      { stdio: ["ignore", log, log] },
    );
    const holder = await eventually(
      async () =>
        (
          await admin
            .get<Lease>(CORE.leases, "sallyport-controller", SALLYPORT_NAMESPACE)
            .catch(() => undefined)
        )?.spec.holderIdentity,
      (h) => h === "bundled",
      30_000,
    );
    assert.equal(holder, "bundled");
    const info = await eventually(
      () => admin.get(ours("EgressClusterInfo"), "default").catch(() => undefined),
      (i) => i !== undefined,
      30_000,
    );
    assert.ok(info, "the controller wrote the cluster info");
    assert.equal(controller.exitCode, null, "still running");
    assert.match(
      readFileSync(join(scratch, "controller.log"), "utf8"),
      /not serving the admission webhook until its certificate exists/,
    );
    // cert-manager issues the certificate after the controller started: it serves without a restart.
    const dir = join(scratch, "missing");
    mkdirSync(dir, { recursive: true });
    const cert = selfSignedCert(dir, { ips: ["127.0.0.1"] });
    renameSync(cert.certFile, join(dir, "tls.crt"));
    renameSync(cert.keyFile, join(dir, "tls.key"));
    const served = await eventually(
      async () => readFileSync(join(scratch, "controller.log"), "utf8"),
      (text) => /webhook certificate found: serving the admission webhook/.test(text),
      30_000,
      500,
    );
    assert.match(served, /webhook certificate found: serving the admission webhook/);
    assert.equal(controller.exitCode, null, "still running");
  });
});
