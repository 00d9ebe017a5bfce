/**
 * The secrets the chart generates survive `helm upgrade`: a real release (helm install, then helm
 * upgrade, with the Helm of test/helm-bin/) in a real kube-apiserver (test/k8s-bin/). The chart
 * reads them back with `lookup`, which `helm template` cannot (chart_test.ts renders a new key
 * each time): the liveness probes' key must stay the one the running agents read at their start,
 * and the webhook's CA the one the API server trusts.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { parseAllDocuments } from "yaml";
import { CHART, helmBinary, RELEASE } from "../../scripts/helm.ts";
import type { KubeClient, KubeObject, Resource } from "../../src/kube/client.ts";
import { ControlPlane } from "../../src/sandbox/controlplane.ts";

const SECRETS: Resource = { group: "", version: "v1", plural: "secrets", namespaced: true };
type Secret = KubeObject & { data: Record<string, string> };

describe("the chart's generated secrets across helm upgrade", () => {
  let cp: ControlPlane;
  let admin: KubeClient;
  let env: NodeJS.ProcessEnv;

  /** helm against the control plane; its state and caches in the control plane's directory. */
  const helm = (...args: string[]): string => {
    try {
      return execFileSync(helmBinary(), [...args, "--namespace", RELEASE.namespace], {
        encoding: "utf8",
        env,
        stdio: ["ignore", "pipe", "pipe"],
      });
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      throw new Error(`helm ${args.join(" ")} failed: ${err.stderr?.trim() || err.message}`);
    }
  };
  const secret = (name: string) => admin.get<Secret>(SECRETS, name, RELEASE.namespace);
  /** The Secret as the release's manifest (what Helm rendered) has it. */
  const rendered = (name: string): Secret => {
    const o = parseAllDocuments(helm("get", "manifest", RELEASE.name))
      .map((d) => d.toJS() as Secret | null)
      .find((s) => s?.kind === "Secret" && s.metadata.name === name);
    assert.ok(o, `the release renders Secret ${name}`);
    return o;
  };

  before(async () => {
    cp = await ControlPlane.start({ tag: "chart" });
    admin = cp.client();
    env = {
      ...process.env,
      KUBECONFIG: cp.kubeconfig(),
      HELM_CACHE_HOME: join(cp.dir, "helm", "cache"),
      HELM_CONFIG_HOME: join(cp.dir, "helm", "config"),
      HELM_DATA_HOME: join(cp.dir, "helm", "data"),
      KUBECACHEDIR: join(cp.dir, "kube-cache"),
    };
  });

  after(async () => {
    await cp?.stop();
  });

  it("keeps the probes' key and the webhook's certificate; renders the new values", async () => {
    // The control plane has applied deploy/rbac.yaml (its namespace, service accounts and RBAC)
    // and the CRDs: the release adopts them.
    helm("install", RELEASE.name, CHART, "--take-ownership");
    const key = (await secret("sallyport-probe-key")).data.key!;
    assert.equal(Buffer.from(key, "base64").length, 32, "32 random bytes");
    assert.equal(rendered("sallyport-probe-key").data.key, key);
    const tls = (await secret("sallyport-webhook-tls")).data;

    helm("upgrade", RELEASE.name, CHART, "--set", "agent.probe.intervalMs=100");
    assert.equal((await secret("sallyport-probe-key")).data.key, key, "the same key");
    assert.equal(rendered("sallyport-probe-key").data.key, key);
    assert.deepEqual((await secret("sallyport-webhook-tls")).data, tls, "the same certificate");
    const agent = await admin.get<
      KubeObject & { spec: { template: { spec: { containers: { args: string[] }[] } } } }
    >(
      { group: "apps", version: "v1", plural: "daemonsets", namespaced: true },
      "sallyport-agent",
      RELEASE.namespace,
    );
    const args = agent.spec.template.spec.containers[0]!.args;
    assert.ok(args.includes("--probe-interval-ms=100"), "the upgrade took the new value");
    assert.ok(args.includes("--probe-key-file=/etc/sallyport/probe-key/key"));

    // Gone with the release, made anew by the next install: a new key.
    helm("uninstall", RELEASE.name);
    await assert.rejects(secret("sallyport-probe-key"), /404|not ?found/i);
    helm("install", RELEASE.name, CHART, "--take-ownership");
    assert.notEqual((await secret("sallyport-probe-key")).data.key, key);
  });
});
