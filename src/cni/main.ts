/**
 * The `sallyport-cni` executable: the runtime runs it with CNI_* in the environment and the
 * network configuration on stdin (src/cni/plugin.ts). Installed as a small script that execs
 * node on this file (the sandbox), or as the bundle's `sallyport-cni.js` (the image; see
 * docs/operations.md, "The chained CNI plugin").
 */
import { readFileSync } from "node:fs";
import { runPlugin } from "./plugin.ts";

let stdin = "";
try {
  stdin = readFileSync(0, "utf8");
} catch {
  // VERSION may come without stdin
}
const out = await runPlugin({ env: process.env, stdin });
if (out.stderr !== "") process.stderr.write(out.stderr);
process.stdout.write(out.stdout, () => process.exit(out.exitCode));
