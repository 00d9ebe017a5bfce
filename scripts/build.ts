/**
 * `npm run build`: bundles the `sallyport` command into one ESM file for shipping
 * (dist/sallyport.mjs, what the container image runs), the agent's traffic reader and liveness
 * threads into dist/traffic-worker.mjs and dist/liveness-worker.mjs, and the chained CNI plugin
 * into dist/sallyport-cni.mjs beside it. Development runs the .ts files directly.
 *
 *   node scripts/build.ts [--outdir DIR]
 *   node scripts/build.ts --cni-plugin FILE     the chained CNI plugin alone (the sandbox's)
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { build } from "esbuild";

const REPO = join(import.meta.dirname, "..");

/** Writes sallyport.mjs (with its source map and licenses) to `outdir`; returns its path. */
export async function bundle(outdir = join(REPO, "dist")): Promise<string> {
  const outfile = join(outdir, "sallyport.mjs");
  await Promise.all([
    bundleOne(join(REPO, "src", "cli", "main.ts"), outfile),
    // The agent's traffic reader runs in a worker thread, whose program must be a file of its own
    // next to the bundle (src/agent/traffic_worker.ts finds it there).
    bundleOne(join(REPO, "src", "agent", "traffic_worker.ts"), join(outdir, "traffic-worker.mjs")),
    bundleOne(
      join(REPO, "src", "agent", "liveness_worker.ts"),
      join(outdir, "liveness-worker.mjs"),
    ),
    // The chained CNI plugin: the agent's init container copies it to the host (src/cni/install.ts).
    bundleOne(join(REPO, "src", "cni", "main.ts"), join(outdir, "sallyport-cni.mjs")),
  ]);
  return outfile;
}

/** The chained CNI plugin alone (the sandbox installs it on its nodes): a 10 KB file that node starts in half the time of src/cni/main.ts. */
export async function bundleCniPlugin(outfile: string): Promise<void> {
  await bundleOne(join(REPO, "src", "cni", "main.ts"), outfile);
}

async function bundleOne(entry: string, outfile: string): Promise<void> {
  await build({
    entryPoints: [entry],
    outfile,
    bundle: true,
    platform: "node",
    format: "esm",
    target: "node24",
    sourcemap: "linked",
    legalComments: "linked",
    logLevel: "warning",
    // Some dependencies are CommonJS and call require() for Node built-ins.
    banner: {
      js: "import { createRequire as __sallyportRequire } from 'node:module'; const require = __sallyportRequire(import.meta.url);",
    },
  });
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: { outdir: { type: "string" }, "cni-plugin": { type: "string" } },
  });
  if (values["cni-plugin"] !== undefined) await bundleCniPlugin(values["cni-plugin"]);
  else console.log(await bundle(values.outdir));
}
