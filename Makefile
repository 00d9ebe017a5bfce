# Sallyport: two entry points for a fresh machine.
#   make demo   build the sandbox cluster and show an egress IP working and failing over
#   make test   type-check, lint, and run every test (unit, kernel, control plane, end to end)
# Both install what they need and are safe to run again.

SHELL := /bin/bash
.DEFAULT_GOAL := help
NODE := node_modules/.bin/node
DEBIAN_PACKAGES := iptables ipset iproute2 conntrack iputils-ping iputils-arping procps kmod openssl curl ca-certificates iperf3
# kube-proxy's nftables mode in the sandbox runs nft.
DEBIAN_PACKAGES += nftables
# The image (make image) and its test: a Debian root from Debian's packages, assembled and run
# without Docker Hub or a docker daemon.
DEBIAN_PACKAGES += mmdebstrap buildah podman runc
export SALLYPORT_CACHE ?= $(HOME)/.cache/sallyport

.PHONY: help deps debs npm k8s-bin cni-bin helm-bin test test-unit typecheck lint generated demo bench clean-sandbox build image manifests

help:
	@echo "make demo   # the sandbox: a policy, an egress IP, a gateway failure"
	@echo "make test   # the whole suite"

debs:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi

# Exactly the lock file, which lists every platform's optional packages, and never rewrites it.
npm: node_modules/.stamp
node_modules/.stamp: package.json package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

# kube-apiserver, etcd, kube-controller-manager, kube-proxy and kubectl from the pinned modules.
k8s-bin:
	@test/k8s-bin/build.sh >/dev/null

# The CNI reference plugins of the sandbox's pod network (bridge, host-local, loopback, portmap).
cni-bin:
	@test/cni-bin/build.sh >/dev/null

helm-bin:
	@test/helm-bin/build.sh >/dev/null

deps: debs npm k8s-bin cni-bin helm-bin

typecheck: npm
	node_modules/.bin/tsc --noEmit -p .

lint: npm
	node_modules/.bin/biome check .

test: deps typecheck lint
	$(NODE) scripts/test.ts

test-unit: npm
	$(NODE) scripts/test.ts --unit

demo: deps
	$(NODE) src/cli/main.ts sandbox demo

bench: deps
	$(NODE) bench/main.ts $(NAME)

clean-sandbox: npm
	$(NODE) src/cli/main.ts sandbox down

# Shipping: the bundle (dist/sallyport.mjs), the image (the chart's default image, built with
# mmdebstrap and buildah into the local container storage; see scripts/image.ts) and the plain
# manifests under deploy/, rendered from the Helm chart.
build: npm
	$(NODE) scripts/build.ts

image: debs npm
	$(NODE) scripts/image.ts

manifests: npm helm-bin
	$(NODE) scripts/gen-crds.ts
	$(NODE) scripts/gen-deploy.ts
