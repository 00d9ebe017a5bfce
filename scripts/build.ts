/**
 * `npm run build`: bundles the `sallyport` command into one ESM file for shipping
 * (dist/sallyport.mjs, what the container image runs). Development runs the .ts files directly.
 *
 *   node scripts/build.ts [--outdir DIR]
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { build } from "esbuild";

const REPO = join(import.meta.dirname, "..");

/** Writes sallyport.mjs (with its source map and licenses) to `outdir`; returns its path. */
export async function bundle(outdir = join(REPO, "dist")): Promise<string> {
  const outfile = join(outdir, "sallyport.mjs");
  await build({
    entryPoints: [join(REPO, "src", "cli", "main.ts")],
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
  return outfile;
}

if (import.meta.main) {
  const { values } = parseArgs({ options: { outdir: { type: "string" } } });
  console.log(await bundle(values.outdir));
}
