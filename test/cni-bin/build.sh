#!/usr/bin/env bash
# Builds the CNI reference plugins the sandbox's pod network uses (bridge, host-local, loopback,
# portmap) from the pinned go.mod beside this script, once per version, into a cache outside the
# repository (as test/k8s-bin/build.sh does for the Kubernetes components).
# Prints the directory holding the plugins (the sandbox's CNI_PATH) on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
plugins=$(awk '$1=="github.com/containernetworking/plugins" && $2 ~ /^v/{print $2; exit}' "$here/go.mod")
cache=${SALLYPORT_CACHE:-$HOME/.cache/sallyport}
out="$cache/cni-bin/$plugins"
declare -A package=(
  [bridge]=github.com/containernetworking/plugins/plugins/main/bridge
  [host-local]=github.com/containernetworking/plugins/plugins/ipam/host-local
  [loopback]=github.com/containernetworking/plugins/plugins/main/loopback
  [portmap]=github.com/containernetworking/plugins/plugins/meta/portmap
)
missing=()
for n in "${!package[@]}"; do [ -x "$out/$n" ] || missing+=("$n"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$out"; exit 0
fi
command -v go >/dev/null || { echo "Cannot build the CNI plugins: the go toolchain is not installed" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-trimpath
export GOMODCACHE="$cache/go-mod" GOCACHE="$cache/go-build"
# What the plugins' own build sets, so that `bridge --version` names the release.
ldflags="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$plugins"
mkdir -p "$out"
cd "$here"
echo "Building the CNI plugins ${missing[*]} $plugins into $out (first time only; about 15 s)" >&2
for n in "${missing[@]}"; do
  go build -ldflags "$ldflags" -o "$out/$n.tmp.$$" "${package[$n]}"
  mv "$out/$n.tmp.$$" "$out/$n"
done
echo "$out"
