/**
 * A throwaway serving certificate for the admission webhook in tests and the sandbox (production
 * uses cert-manager or the Helm chart's own). It is self-signed, so it is also the caBundle.
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parseAllDocuments } from "yaml";
import { REPO } from "./controlplane.ts";

export interface ServingCert {
  readonly certFile: string;
  readonly keyFile: string;
  readonly caBundle: string;
}

export function selfSignedCert(
  dir: string,
  options: { ips?: readonly string[]; dns?: readonly string[] },
): ServingCert {
  const certFile = join(dir, "webhook.crt");
  const keyFile = join(dir, "webhook.key");
  const san = [
    ...(options.ips ?? []).map((i) => `IP:${i}`),
    ...(options.dns ?? []).map((d) => `DNS:${d}`),
  ].join(",");
  execFileSync(
    "openssl",
    [
      "req",
      "-x509",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-days",
      "2",
      "-keyout",
      keyFile,
      "-out",
      certFile,
      "-subj",
      "/CN=sallyport-webhook",
      "-addext",
      `subjectAltName=${san}`,
      "-addext",
      "basicConstraints=critical,CA:TRUE",
    ],
    { stdio: "ignore" },
  );
  return { certFile, keyFile, caBundle: readFileSync(certFile).toString("base64") };
}

/**
 * The shipped ValidatingWebhookConfiguration (deploy/webhook.yaml), pointed at `url` with
 * `caBundle` instead of the in-cluster Service and cert-manager's CA injection.
 */
export function webhookConfiguration(url: string, caBundle: string): Record<string, unknown> {
  const docs = parseAllDocuments(readFileSync(join(REPO, "deploy", "webhook.yaml"), "utf8"));
  const config = docs
    .map((d) => d.toJS() as { kind?: string; metadata: { annotations?: object } } | null)
    .find((o) => o?.kind === "ValidatingWebhookConfiguration");
  if (config === undefined || config === null)
    throw new Error("Cannot find the ValidatingWebhookConfiguration in deploy/webhook.yaml");
  const webhooks = (config as unknown as { webhooks: Record<string, unknown>[] }).webhooks;
  delete config.metadata.annotations;
  return {
    ...config,
    webhooks: webhooks.map((w) => ({ ...w, clientConfig: { url, caBundle } })),
  };
}
