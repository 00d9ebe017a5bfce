/**
 * What we ship: the manifests under deploy/ are accepted by a real kube-apiserver (server-side
 * dry run, so its own validation of Deployments, DaemonSets, Services and webhooks applies), and
 * the bundled `sallyport` (npm run build, what the image runs) runs the controller against it.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { parseAllDocuments } from "yaml";
import {
  CORE,
  type KubeClient,
  type KubeObject,
  MANIFEST_KINDS,
  ours,
} from "../../src/kube/client.ts";
import type { Lease } from "../../src/kube/lease.ts";
import { ControlPlane, SALLYPORT_NAMESPACE } from "../../src/sandbox/controlplane.ts";
import { eventually } from "../support/kube.ts";
import { REPO } from "../support/lab.ts";

function manifests(file: string): KubeObject[] {
  return parseAllDocuments(readFileSync(join(REPO, "deploy", file), "utf8"))
    .map((d) => d.toJS() as KubeObject | null)
    .filter((o): o is KubeObject => o !== null);
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
  });

  after(async () => {
    controller?.kill("SIGKILL");
    await cp?.stop();
    rmSync(scratch, { recursive: true, force: true });
  });

  for (const file of ["sallyport.yaml", "webhook.yaml"]) {
    it(`deploy/${file} is accepted by the API server (dry run)`, async () => {
      let checked = 0;
      for (const obj of manifests(file)) {
        const resource = MANIFEST_KINDS[obj.kind ?? ""];
        // cert-manager's kinds need cert-manager's CRDs, which this API server does not have.
        if (resource === undefined && obj.apiVersion?.startsWith("cert-manager.io/")) continue;
        assert.ok(resource, `${file}: a test resource for kind ${obj.kind}`);
        await admin.create(resource, obj, { dryRun: "All" });
        checked++;
      }
      assert.ok(checked > 0);
    });
  }

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
      /not serving the admission webhook: its certificate is missing/,
    );
  });
});
