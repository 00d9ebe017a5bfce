/**
 * `make image`: the Sallyport image, built here without Docker Hub or a docker daemon:
 *   1. a Debian bookworm root from Debian's own packages (mmdebstrap), cached outside the
 *      repository by its recipe ($SALLYPORT_CACHE/image/); `--fresh` makes it again with
 *      Debian's latest updates;
 *   2. Node.js: the binary of the pinned npm package `node` (package-lock.json);
 *   3. the esbuild bundle (scripts/build.ts);
 * put together by the Dockerfile (FROM scratch) with buildah, into the local container storage
 * that podman uses. The name is the chart's default image (values.yaml's repository, the chart's
 * appVersion), so that the chart installs what this builds. Nothing is rebuilt when the image of
 * that name was made from the same inputs (its label sallyport.dev/inputs, a hash of them all).
 *
 *   node scripts/image.ts [--tag NAME] [--fresh]     prints the image name
 */
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import {
  copyFileSync,
  existsSync,
  linkSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmSync,
} from "node:fs";
import { homedir } from "node:os";
import { join, relative } from "node:path";
import { parseArgs } from "node:util";
import { parse } from "yaml";
import { bundle } from "./build.ts";
import { CHART, REPO } from "./helm.ts";

export const INPUTS_LABEL = "sallyport.dev/inputs";

/** The chart's default image: what `helm install` runs without `--set image.…`. */
export function defaultImage(): string {
  const values = parse(readFileSync(join(CHART, "values.yaml"), "utf8")) as {
    image: { repository: string; tag: string };
  };
  const chart = parse(readFileSync(join(CHART, "Chart.yaml"), "utf8")) as { appVersion: string };
  return `${values.image.repository}:${values.image.tag || chart.appVersion}`;
}

function cacheDir(): string {
  const dir = join(process.env.SALLYPORT_CACHE ?? join(homedir(), ".cache", "sallyport"), "image");
  mkdirSync(dir, { recursive: true });
  return dir;
}

const DEBIAN_MIRROR = process.env.SALLYPORT_DEBIAN_MIRROR ?? "http://deb.debian.org";
/**
 * The packages of the root: what the agent spawns (iptables-{nft,legacy}-{save,restore}, ipset,
 * ip and bridge, sysctl), what an operator reaches for (nft, conntrack, modprobe), and the C++
 * library Node.js links against.
 */
const DEBIAN_PACKAGES = [
  "iptables",
  "ipset",
  "nftables",
  "iproute2",
  "conntrack",
  "kmod",
  "ca-certificates",
  "libstdc++6",
  "procps",
];

function mmdebstrapArgs(output: string): string[] {
  return [
    // Essential packages and ours, no apt: nothing in the image installs anything.
    "--variant=essential",
    // merged /usr as debootstrap makes it; otherwise apt picks usrmerge, which pulls in perl.
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    `--include=${DEBIAN_PACKAGES.join(",")}`,
    ...["/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/locale/*"].map(
      (p) => `--dpkgopt=path-exclude=${p}`,
    ),
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "bookworm",
    output,
    `deb ${DEBIAN_MIRROR}/debian bookworm main`,
    `deb ${DEBIAN_MIRROR}/debian bookworm-updates main`,
    `deb ${DEBIAN_MIRROR}/debian-security bookworm-security main`,
  ];
}

/** The Debian root as a tar file, made once per recipe. */
function rootfs(options: { fresh: boolean; log: (line: string) => void }): string {
  const recipe = createHash("sha256")
    .update(JSON.stringify(mmdebstrapArgs("OUT")))
    .digest("hex")
    .slice(0, 16);
  const tar = join(cacheDir(), `rootfs-bookworm-${recipe}.tar`);
  if (existsSync(tar) && !options.fresh) return tar;
  const tmp = `${tar}.tmp${process.pid}.tar`;
  options.log(`mmdebstrap: Debian bookworm with ${DEBIAN_PACKAGES.join(", ")}`);
  try {
    run("mmdebstrap", ["--quiet", ...mmdebstrapArgs(tmp)]);
    renameSync(tmp, tar);
    // Roots of earlier recipes: nothing uses them any more.
    for (const f of readdirSync(cacheDir()))
      if (/^rootfs-bookworm-[0-9a-f]+\.tar$/.test(f) && join(cacheDir(), f) !== tar)
        rmSync(join(cacheDir(), f), { force: true });
  } finally {
    rmSync(tmp, { force: true });
  }
  return tar;
}

/** The real Node.js binary of the npm package `node` (node_modules/.bin/node links to it). */
function nodeBinary(): string {
  return realpathSync(join(REPO, "node_modules", ".bin", "node"));
}

function linkOrCopy(from: string, to: string): void {
  try {
    linkSync(from, to);
  } catch {
    copyFileSync(from, to);
  }
}

/** A hash of every file of a directory, by relative path. */
function hashTree(dir: string): string {
  const h = createHash("sha256");
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true }).sort((a, b) =>
      a.name < b.name ? -1 : 1,
    )) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else h.update(`${relative(dir, p)}\0`).update(readFileSync(p));
    }
  };
  walk(dir);
  return h.digest("hex");
}

function run(cmd: string, args: readonly string[]): string {
  const r = spawnSync(cmd, args, { encoding: "utf8", maxBuffer: 64 * 1024 * 1024 });
  if (r.error !== undefined) throw new Error(`Cannot run ${cmd}: ${r.error.message}`);
  if (r.status !== 0)
    throw new Error(
      `${cmd} ${args.slice(0, 3).join(" ")} … failed (exit ${r.status}): ${(r.stderr || r.stdout).trim().split("\n").slice(-15).join("\n")}`,
    );
  return r.stdout;
}

/** The id and the inputs label of a local image, if there is one of that name. */
function localImage(name: string): { id: string; inputs: string } | undefined {
  const r = spawnSync(
    "podman",
    ["image", "inspect", "--format", `{{.Id}} {{index .Labels "${INPUTS_LABEL}"}}`, name],
    { encoding: "utf8" },
  );
  if (r.status !== 0) return undefined;
  const [id = "", inputs = ""] = r.stdout.trim().split(" ");
  return { id, inputs };
}

export interface BuiltImage {
  readonly image: string;
  /** false when the image of that name was already built from the same inputs */
  readonly built: boolean;
  readonly inputs: string;
}

/** Builds the image unless it is up to date; see the top of this file. */
export async function buildImage(
  options: { tag?: string; fresh?: boolean; log?: (line: string) => void } = {},
): Promise<BuiltImage> {
  const image = options.tag ?? defaultImage();
  const log = options.log ?? (() => {});
  const tar = rootfs({ fresh: options.fresh ?? false, log });
  // A new directory per build, always at the same depth: the bundle's source map holds paths
  // relative to it, so the same sources give the same bytes.
  const context = mkdtempSync(join(cacheDir(), "context-"));
  try {
    linkOrCopy(tar, join(context, "rootfs.tar"));
    linkOrCopy(nodeBinary(), join(context, "node"));
    copyFileSync(join(REPO, "Dockerfile"), join(context, "Dockerfile"));
    await bundle(join(context, "dist"));
    const inputs = hashTree(context);
    const existing = localImage(image);
    if (existing?.inputs === inputs) return { image, built: false, inputs };
    log(`buildah: ${image}`);
    run("buildah", [
      "build",
      "--quiet",
      "--file",
      join(context, "Dockerfile"),
      "--tag",
      image,
      "--label",
      `${INPUTS_LABEL}=${inputs}`,
      context,
    ]);
    // The image this one replaces would stay behind, nameless, at every rebuild.
    if (existing !== undefined && existing.id !== localImage(image)?.id)
      spawnSync("podman", ["rmi", existing.id], { stdio: "ignore" });
    return { image, built: true, inputs };
  } finally {
    rmSync(context, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: { tag: { type: "string" }, fresh: { type: "boolean", default: false } },
  });
  const started = Date.now();
  const result = await buildImage({
    ...(values.tag === undefined ? {} : { tag: values.tag }),
    fresh: values.fresh,
    log: (line) => console.error(line),
  });
  console.error(
    `${result.built ? "built" : "up to date:"} ${result.image} in ${((Date.now() - started) / 1000).toFixed(1)} s`,
  );
  console.log(result.image);
}
