/**
 * Forwards a Unix socket to a TCP address: run inside the sandbox's control-plane namespace, it
 * lets processes in the root namespace reach the API server without any address or route in the
 * root namespace (Unix sockets are not network-namespaced). Bytes only: TLS passes through.
 *
 *   forward.ts --listen /path/api.sock --to 192.168.77.2:6443
 */
import { rmSync } from "node:fs";
import { connect, createServer } from "node:net";
import { parseArgs } from "node:util";

const { values } = parseArgs({ options: { listen: { type: "string" }, to: { type: "string" } } });
const at = values.to!.lastIndexOf(":");
const host = values.to!.slice(0, at).replace(/^\[|\]$/g, "");
const port = Number(values.to!.slice(at + 1));
rmSync(values.listen!, { force: true });
createServer((client) => {
  const upstream = connect({ host, port });
  client.pipe(upstream).pipe(client);
  const close = () => {
    client.destroy();
    upstream.destroy();
  };
  client.on("error", close);
  upstream.on("error", close);
}).listen(values.listen!, () => console.log(JSON.stringify({ listening: values.listen })));
