/**
 * What tests may create on the host, and how to find any of it left over: network namespaces
 * named with the test prefix, upstream processes (kube-apiserver, etcd, kube-controller-manager,
 * kube-proxy), containers (agents from the image) and temporary directories (also host-local's
 * state of a bare topology, sallyport-cni-<prefix>).
 */
import { execFileSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { tmpdir } from "node:os";

/** Every namespace, process tag and directory the tests create starts with this. */
export const TEST_PREFIX = "spt";
export const TMP_PREFIX = "sallyport-test-";
/** Where a Topology without a directory of its own keeps its CNI state (src/sandbox/topology.ts). */
const CNI_TMP_PREFIX = `sallyport-cni-${TEST_PREFIX}`;

function netns(): string[] {
  try {
    return execFileSync("ip", ["netns", "list"], { encoding: "utf8" })
      .split("\n")
      .map((l) => l.split(" ")[0] ?? "")
      .filter((n) => n.startsWith(TEST_PREFIX) || n.startsWith("sp-"));
  } catch {
    return [];
  }
}

function processes(): string[] {
  try {
    return execFileSync(
      "pgrep",
      ["-a", "-f", "sallyport-test-|kube-apiserver|/etcd |kube-controller-manager|kube-proxy"],
      {
        encoding: "utf8",
      },
    )
      .split("\n")
      .filter((l) => l.trim() !== "" && !l.includes("pgrep"));
  } catch {
    return [];
  }
}

function containers(): string[] {
  try {
    return execFileSync("podman", ["ps", "--all", "--format", "{{.Names}}"], { encoding: "utf8" })
      .split("\n")
      .filter((n) => n.startsWith(TEST_PREFIX) || n.startsWith("sp-"));
  } catch {
    return [];
  }
}

function tmpDirs(): string[] {
  return readdirSync(tmpdir()).filter(
    (d) => d.startsWith(TMP_PREFIX) || d.startsWith(CNI_TMP_PREFIX),
  );
}

export function leftovers(): string[] {
  return [
    ...netns().map((n) => `network namespace ${n}`),
    ...processes().map((p) => `process ${p}`),
    ...containers().map((c) => `container ${c}`),
    ...tmpDirs().map((d) => `directory ${tmpdir()}/${d}`),
  ];
}
