/**
 * Admission against the real kube-apiserver: our CRDs (schema + CEL) and our webhook for the
 * cross-object rules. Every bad manifest must be rejected with a message that names its field.
 */
import assert from "node:assert/strict";
import type { Server } from "node:https";
import { after, before, describe, it } from "node:test";
import type { EgressGateway } from "../../src/api/types.ts";
import { serveWebhook } from "../../src/controller/webhook.ts";
import {
  ApiError,
  CORE,
  type KubeClient,
  type KubeObject,
  MANIFEST_KINDS,
  ours,
} from "../../src/kube/client.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { ControlPlane } from "../../src/sandbox/controlplane.ts";
import { selfSignedCert, webhookConfiguration } from "../../src/sandbox/pki.ts";
import { BAD_MANIFESTS, CLUSTER_POLICY, GATEWAY, POLICY } from "../fixtures/manifests.ts";

function resourceOf(obj: { kind?: unknown }) {
  return ours(obj.kind as "EgressGateway" | "EgressPolicy" | "ClusterEgressPolicy");
}

describe("admission on a real kube-apiserver", () => {
  let cp: ControlPlane;
  let client: KubeClient;
  let webhook: Server;
  const gateways: EgressGateway[] = [];

  before(async () => {
    cp = await ControlPlane.start({ tag: "admission" });
    client = cp.client();
    const cert = selfSignedCert(cp.dir, { ips: ["127.0.0.1"] });
    const { readFileSync } = await import("node:fs");
    webhook = await serveWebhook({
      port: 0,
      host: "127.0.0.1",
      cert: readFileSync(cert.certFile, "utf8"),
      key: readFileSync(cert.keyFile, "utf8"),
      gateways: () => gateways,
      log: silentLogger,
    });
    const port = (webhook.address() as { port: number }).port;
    await client.create(
      MANIFEST_KINDS.ValidatingWebhookConfiguration!,
      webhookConfiguration(`https://127.0.0.1:${port}/validate`, cert.caBundle) as KubeObject,
    );
    await client
      .create(CORE.namespaces, {
        apiVersion: "v1",
        kind: "Namespace",
        metadata: { name: "default" },
      })
      .catch(() => {});
    const gw = await client.create(
      ours("EgressGateway"),
      structuredClone(GATEWAY) as unknown as KubeObject,
    );
    gateways.push(gw as unknown as EgressGateway);
    // The webhook takes a moment to be called by the API server after registration.
    for (let i = 0; i < 50; i++) {
      try {
        await client.create(
          ours("EgressGateway"),
          {
            ...structuredClone(GATEWAY),
            metadata: { name: "probe" },
            spec: { ...GATEWAY.spec, pool: ["10.168.60.105"] },
          } as unknown as KubeObject,
          { dryRun: "All" },
        );
      } catch {
        break;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  });

  after(async () => {
    webhook?.close();
    await cp?.stop();
  });

  it("installs the CRDs and accepts the good examples", async () => {
    await client.create(ours("EgressPolicy"), structuredClone(POLICY) as unknown as KubeObject);
    await client.create(
      ours("ClusterEgressPolicy"),
      structuredClone(CLUSTER_POLICY) as unknown as KubeObject,
    );
    const got = await client.get<KubeObject & { spec: { priority?: number } }>(
      ours("EgressPolicy"),
      POLICY.metadata.name,
      "default",
    );
    assert.equal(got.spec.priority, 0, "defaults are applied by the API server");
  });

  for (const bad of BAD_MANIFESTS) {
    it(`rejects ${bad.name} (${bad.by}), naming ${bad.field}`, async () => {
      const obj = structuredClone(bad.object) as KubeObject;
      try {
        await client.create(resourceOf(obj), obj, { fieldValidation: "Strict" });
      } catch (e) {
        assert.ok(e instanceof ApiError, String(e));
        assert.ok([400, 422].includes(e.status), `status ${e.status}: ${e.message}`);
        const field = bad.field.replace(/\[\d+\]$/, "");
        assert.ok(e.message.includes(field), `the message names ${bad.field}: ${e.message}`);
        return;
      }
      assert.fail("the API server accepted it");
    });
  }
});
