/**
 * A throwaway serving certificate for the admission webhook in tests and the sandbox (production
 * uses cert-manager or the Helm chart's own). It is self-signed, so it is also the caBundle.
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";

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

/** The ValidatingWebhookConfiguration for a webhook served at `url`. */
export function webhookConfiguration(url: string, caBundle: string): Record<string, unknown> {
  return {
    apiVersion: "admissionregistration.k8s.io/v1",
    kind: "ValidatingWebhookConfiguration",
    metadata: { name: "sallyport.dev" },
    webhooks: [
      {
        name: "validate.sallyport.dev",
        clientConfig: { url, caBundle },
        rules: [
          {
            apiGroups: ["sallyport.dev"],
            apiVersions: ["v1alpha1"],
            operations: ["CREATE", "UPDATE"],
            resources: ["egressgateways", "egresspolicies", "clusteregresspolicies"],
          },
        ],
        admissionReviewVersions: ["v1"],
        sideEffects: "None",
        failurePolicy: "Ignore",
        timeoutSeconds: 2,
      },
    ],
  };
}
