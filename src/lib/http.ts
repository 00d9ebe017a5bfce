/** /metrics, /healthz and /readyz for a process. */
import { createServer, type Server } from "node:http";
import type { Registry } from "prom-client";

export function serveMetrics(options: {
  port: number;
  host?: string;
  registry: Registry;
  ready: () => boolean;
}): Promise<Server> {
  const server = createServer((req, res) => {
    if (req.url === "/metrics") {
      options.registry
        .metrics()
        .then((text) =>
          res.writeHead(200, { "content-type": options.registry.contentType }).end(text),
        )
        .catch(() => res.writeHead(500).end());
    } else if (req.url === "/healthz") {
      res.writeHead(200).end("ok");
    } else if (req.url === "/readyz") {
      const ok = options.ready();
      res.writeHead(ok ? 200 : 503).end(ok ? "ok" : "not ready");
    } else {
      res.writeHead(404).end();
    }
  });
  return new Promise((resolve) =>
    server.listen(options.port, options.host ?? "0.0.0.0", () => resolve(server)),
  );
}
