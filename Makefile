# Sallyport: two entry points for a fresh machine.
#   make demo   build the sandbox cluster and show an egress IP working and failing over
#   make test   type-check, lint, and run every test (unit, kernel, control plane, end to end)
# Both install what they need and are safe to run again.

SHELL := /bin/bash
.DEFAULT_GOAL := help
NODE := node_modules/.bin/node
DEBIAN_PACKAGES := iptables ipset iproute2 conntrack iputils-ping iputils-arping procps kmod openssl curl ca-certificates
export SALLYPORT_CACHE ?= $(HOME)/.cache/sallyport

.PHONY: help deps debs npm k8s-bin test test-unit typecheck lint generated demo bench clean-sandbox build image

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

# `npm install`, not `npm ci`: the registry this machine reaches lacks Biome's binaries for other
# platforms (404 for @biomejs/cli-android-arm64@2.6.8 and its siblings), so the lock file cannot
# list them and `npm ci` refuses it ("Missing: @biomejs/cli-android-arm64@ from lock file").
# With the lock file present, `npm install` installs exactly the locked versions and leaves it as is.
npm: node_modules/.stamp
node_modules/.stamp: package.json package-lock.json
	npm install --no-audit --no-fund
	@touch $@

k8s-bin:
	@test/k8s-bin/build.sh >/dev/null

deps: debs npm k8s-bin

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

# Shipping: the bundle (dist/sallyport.mjs) and the image built from it (needs a container engine).
build: npm
	$(NODE) scripts/build.ts

image: build
	docker build -t sallyport:dev .
