#!/usr/bin/env bash
# Builds upstream Helm from the pinned go.mod beside this script, once per version, into a cache
# outside the repository (as test/k8s-bin/build.sh does for kube-apiserver).
# Prints the path of the helm binary on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
helm=$(awk '$1=="helm.sh/helm/v3" && $2 ~ /^v/{print $2; exit}' "$here/go.mod")
client=$(awk '$1=="k8s.io/client-go" && $2 ~ /^v/{print $2; exit}' "$here/go.mod")
cache=${SALLYPORT_CACHE:-$HOME/.cache/sallyport}
out="$cache/helm-bin/$helm"
if [ -x "$out/helm" ]; then
  echo "$out/helm"; exit 0
fi
command -v go >/dev/null || { echo "Cannot build helm: the go toolchain is not installed" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-trimpath
export GOMODCACHE="$cache/go-mod" GOCACHE="$cache/go-build"
# What helm's own Makefile sets: its version, and the Kubernetes version it assumes when it
# renders without a cluster (client-go v0.N.P is Kubernetes 1.N).
minor=${client#v0.}; minor=${minor%%.*}
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags="$ldflags -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
done
tmp="$out.tmp.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
cd "$here"
echo "Building helm $helm into $out (first time only; about 2 minutes)" >&2
go build -ldflags "$ldflags" -o "$tmp/helm" helm.sh/helm/v3/cmd/helm
rm -rf "$out"; mv "$tmp" "$out"; trap - EXIT
echo "$out/helm"
