/**
 * KubeClient against a local HTTP/2 server that behaves as API servers and load balancers do when
 * they retire a connection: a GOAWAY that refuses the streams it has not taken yet.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createSecureServer, constants as h2 } from "node:http2";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { selfSignedCert } from "../sandbox/pki.ts";
import { KubeClient, KubeConfig } from "./client.ts";

describe("KubeClient", () => {
  const dir = mkdtempSync(join(tmpdir(), "sallyport-test-kubeclient-"));
  const cert = selfSignedCert(dir, { ips: ["127.0.0.1"] });
  const taken: string[] = [];
  let refuseNext = 0;
  const server = createSecureServer({
    cert: readFileSync(cert.certFile),
    key: readFileSync(cert.keyFile),
  });
  server.on("stream", (stream, headers) => {
    stream.on("error", () => {}); // the client resets the stream it gives up on
    if (refuseNext > 0) {
      refuseNext--;
      // Retired before this stream was taken: the last stream it processed is the one before.
      stream.session?.goaway(h2.NGHTTP2_NO_ERROR, (stream.id ?? 3) - 2);
      return;
    }
    let body = "";
    stream.on("data", (c: Buffer) => {
      body += c.toString();
    });
    stream.on("end", () => {
      taken.push(`${headers[":method"]} ${body}`);
      stream.respond({ ":status": 201, "content-type": "application/json" });
      stream.end(JSON.stringify({ kind: "ConfigMap", metadata: { name: "x" } }));
    });
  });
  let client: KubeClient;

  before(async () => {
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const config = new KubeConfig();
    config.loadFromOptions({
      clusters: [
        {
          name: "c",
          server: `https://127.0.0.1:${(server.address() as AddressInfo).port}`,
          skipTLSVerify: true,
        },
      ],
      users: [{ name: "u", token: "t" }],
      contexts: [{ name: "x", cluster: "c", user: "u" }],
      currentContext: "x",
    });
    client = new KubeClient(config);
  });

  after(async () => {
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("sends a create again on a new connection when the server refused it with a GOAWAY, and only once", async () => {
    // One request served on the connection first: a GOAWAY names the last stream the server
    // took, and node's server can only name a stream it received (not "none").
    await client.request("GET", "/api/v1/namespaces/d/configmaps/x");
    taken.length = 0;
    refuseNext = 1;
    const created = await client.request<{ kind: string }>(
      "POST",
      "/api/v1/namespaces/d/configmaps",
      {
        body: { kind: "ConfigMap", metadata: { name: "x" } },
      },
    );
    assert.equal(created.kind, "ConfigMap");
    assert.deepEqual(taken, [
      `POST ${JSON.stringify({ kind: "ConfigMap", metadata: { name: "x" } })}`,
    ]);
    assert.equal(refuseNext, 0, "the first attempt was refused");
  });
});
