#!/usr/bin/env bash
# Builds upstream Kubernetes components and etcd from the pinned go.mod beside this script, once
# per version, into a cache outside the repository. With names (kube-apiserver, etcd, kube-proxy,
# kube-controller-manager, kubectl) it builds only those that are missing; without, all of them.
# Prints the directory holding the binaries on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
k8s=$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/{print $2; exit}' "$here/go.mod")
etcd=$(awk '$1=="go.etcd.io/etcd/server/v3" && $2 ~ /^v/{print $2; exit}' "$here/go.mod")
cache=${SALLYPORT_CACHE:-$HOME/.cache/sallyport}
out="$cache/k8s-bin/$k8s-etcd$etcd"
declare -A package=(
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [etcd]=go.etcd.io/etcd/server/v3
  [kube-proxy]=k8s.io/kubernetes/cmd/kube-proxy
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(kube-apiserver etcd kube-proxy kube-controller-manager kubectl)
missing=()
for n in "${names[@]}"; do
  [ -n "${package[$n]:-}" ] || { echo "Cannot build $n: not one of ${!package[*]}" >&2; exit 2; }
  [ -x "$out/$n" ] || missing+=("$n")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$out"; exit 0
fi
command -v go >/dev/null || { echo "Cannot build ${missing[*]}: the go toolchain is not installed" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-trimpath
export GOMODCACHE="$cache/go-mod" GOCACHE="$cache/go-build"
minor=${k8s#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $p.gitVersion=$k8s -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
mkdir -p "$out"
cd "$here"
echo "Building ${missing[*]} ($k8s, etcd $etcd) into $out (first time only; several minutes)" >&2
for n in "${missing[@]}"; do
  # Each binary appears under its name only once complete: an interrupted build is redone.
  go build -ldflags "$ldflags" -o "$out/$n.tmp.$$" "${package[$n]}"
  mv "$out/$n.tmp.$$" "$out/$n"
done
echo "$out"
