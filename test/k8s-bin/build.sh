#!/usr/bin/env bash
# Builds upstream kube-apiserver and etcd from the pinned go.mod beside this
# script, once per version, into a cache outside the repository.
# Prints the directory holding the two binaries on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
k8s=$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/{print $2; exit}' "$here/go.mod")
etcd=$(awk '$1=="go.etcd.io/etcd/server/v3" && $2 ~ /^v/{print $2; exit}' "$here/go.mod")
cache=${SALLYPORT_CACHE:-$HOME/.cache/sallyport}
out="$cache/k8s-bin/$k8s-etcd$etcd"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ]; then
  echo "$out"; exit 0
fi
command -v go >/dev/null || { echo "Cannot build kube-apiserver: the go toolchain is not installed" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-trimpath
export GOMODCACHE="$cache/go-mod" GOCACHE="$cache/go-build"
minor=${k8s#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $p.gitVersion=$k8s -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
tmp="$out.tmp.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
cd "$here"
echo "Building kube-apiserver $k8s and etcd $etcd into $out (first time only; several minutes)" >&2
go build -ldflags "$ldflags" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
go build -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
rm -rf "$out"; mv "$tmp" "$out"; trap - EXIT
echo "$out"
