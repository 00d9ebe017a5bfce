/**
 * Helm, built once from the pinned module in test/helm-bin/ into ~/.cache/sallyport (like
 * kube-apiserver in test/k8s-bin/), and the chart rendered with it.
 */
import { execFileSync } from "node:child_process";
import { join } from "node:path";

export const REPO = join(import.meta.dirname, "..");
export const CHART = join(REPO, "charts", "sallyport");
/** Every value set to something other than its default, for the tests. */
export const FULL_VALUES = join(CHART, "ci", "full-values.yaml");
/** The release the plain manifests and the tests render: one per cluster, fixed names. */
export const RELEASE = { name: "sallyport", namespace: "sallyport-system" } as const;

/** Builds (once) and returns the path of the helm binary; SALLYPORT_HELM overrides it. */
export function helmBinary(): string {
  const given = process.env.SALLYPORT_HELM;
  if (given !== undefined) return given;
  const out = execFileSync(join(REPO, "test", "helm-bin", "build.sh"), {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
  });
  return out.trim().split("\n").pop()!;
}

/** Runs helm; throws with its stderr when it fails. */
export function helm(args: readonly string[]): string {
  try {
    return execFileSync(helmBinary(), args, {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "pipe"],
    });
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new Error(`helm ${args.join(" ")} failed: ${err.stderr?.trim() || err.message}`);
  }
}

/** `helm template` of the chart as release RELEASE with `--set` values and values files. */
export function template(
  options: { set?: readonly string[]; values?: readonly string[] } = {},
): string {
  return helm([
    "template",
    RELEASE.name,
    CHART,
    "--namespace",
    RELEASE.namespace,
    ...(options.values ?? []).flatMap((f) => ["--values", f]),
    ...(options.set ?? []).flatMap((s) => ["--set", s]),
  ]);
}
