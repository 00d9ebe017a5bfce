/**
 * The validating admission webhook: only what the CRD schemas and their CEL rules cannot check,
 * because it needs other objects: a gateway pool that overlaps another gateway's, an egress IP
 * outside its gateway's pool; plus pool ordering/overlap within one gateway, which CEL cannot
 * express for ranges. Everything the object alone decides is rejected by the API server before
 * this is called (and is checked again here, so that the answer does not depend on the order).
 *
 * failurePolicy is Ignore (docs/operations.md): when the webhook is down, creation still works
 * and the controller reports the same problems as conditions and Events, instead of every policy
 * change failing cluster-wide (spidernet-io/egressgateway#839, #902).
 */
import { createServer, type Server } from "node:https";
import type { AnyPolicy, EgressGateway } from "../api/types.ts";
import {
  type FieldError,
  formatErrors,
  validateGatewayAgainstOthers,
  validateObject,
  validatePolicyAgainstGateway,
} from "../api/validate.ts";
import type { Logger } from "../lib/log.ts";

interface AdmissionReview {
  apiVersion: string;
  kind: "AdmissionReview";
  request?: { uid: string; operation: string; object?: unknown };
}

export function review(body: AdmissionReview, gateways: () => Iterable<EgressGateway>): object {
  const request = body.request;
  if (request === undefined) throw new Error("AdmissionReview without request");
  let errors: FieldError[] = [];
  const obj = request.object as { kind?: string } | undefined;
  if (request.operation !== "DELETE" && obj !== undefined) {
    errors = validateObject(obj);
    if (errors.length === 0 && obj.kind === "EgressGateway") {
      errors = validateGatewayAgainstOthers(obj as EgressGateway, [...gateways()]);
    } else if (
      errors.length === 0 &&
      (obj.kind === "EgressPolicy" || obj.kind === "ClusterEgressPolicy")
    ) {
      const policy = obj as AnyPolicy;
      const gateway = [...gateways()].find((g) => g.metadata.name === policy.spec.gateway);
      errors = validatePolicyAgainstGateway(policy, gateway);
    }
  }
  return {
    apiVersion: "admission.k8s.io/v1",
    kind: "AdmissionReview",
    response: {
      uid: request.uid,
      allowed: errors.length === 0,
      ...(errors.length === 0
        ? {}
        : { status: { code: 422, reason: "Invalid", message: formatErrors(errors) } }),
    },
  };
}

export function serveWebhook(options: {
  port: number;
  host?: string;
  cert: string;
  key: string;
  gateways: () => Iterable<EgressGateway>;
  log: Logger;
}): Promise<Server> {
  const server = createServer({ cert: options.cert, key: options.key }, (req, res) => {
    if (req.method !== "POST" || !req.url?.startsWith("/validate")) {
      res.writeHead(404).end();
      return;
    }
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      try {
        const answer = review(
          JSON.parse(Buffer.concat(chunks).toString("utf8")) as AdmissionReview,
          options.gateways,
        );
        res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(answer));
      } catch (e) {
        options.log.warn({ err: (e as Error).message }, "bad admission request");
        res.writeHead(400).end();
      }
    });
  });
  return new Promise((resolve) =>
    server.listen(options.port, options.host ?? "0.0.0.0", () => resolve(server)),
  );
}
