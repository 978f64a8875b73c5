# emailqueue-operator — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
# The pinned tools (built by testbed-bins, cached by version).
tool = $(shell $(PY) -c 'from emailqueue_testbed.state import binary; print(binary("$(1)"))' 2>/dev/null)

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^##@/ {printf "\n%s\n", substr($$0, 5)} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

##@ Setup
# Three distributions (worker/, operator/, testbed/), each with its own pyproject.toml; exact
# versions with hashes in requirements/*.lock, made from requirements/*.in by `make lock`.
PACKAGES := worker/pyproject.toml operator/pyproject.toml testbed/pyproject.toml
LOCKS    := $(patsubst %.in,%.lock,$(wildcard requirements/*.in))
# `make lock LOCK_FLAGS=--upgrade` (or --upgrade-package NAME) moves versions; plain `make lock`
# keeps every pin the lock has and only adds or drops what the inputs changed.
LOCK_FLAGS ?=
UV_COMPILE = $(VENV)/bin/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock' --no-emit-package email-worker \
	--no-emit-package emailqueue-operator --no-emit-package emailqueue-testbed $(LOCK_FLAGS)

$(VENV)/.stamp: requirements/dev.lock $(PACKAGES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements/dev.lock
	@# operator first: it replaces the single pre-0.2 distribution of that name, whose uninstall
	@# would also delete the email-worker and emailqueue-testbed scripts installed before it.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e operator
	$(PY) -m pip install -q --no-deps --no-build-isolation -e worker -e testbed
	$(PY) -m pip check
	touch $@

.PHONY: venv
venv: $(VENV)/.stamp ## create .venv from requirements/dev.lock (hashes) with the three packages editable

.PHONY: lock
lock: $(VENV)/.stamp ## regenerate requirements/*.lock (exact versions, hashes) from requirements/*.in and the pyproject.toml files
	@for lock in $(LOCKS); do echo "$$lock"; $(UV_COMPILE) $${lock%.lock}.in -o $$lock || exit 1; done

.PHONY: deps
deps: ## install system packages the test bed needs (rabbitmq-server), if missing
	testbed/install-deps.sh

.PHONY: testbed-bins
testbed-bins: ## build kube-apiserver, kubectl, etcd, helm, promtool from pinned Go modules (cached)
	testbed/build-bins.sh all

.PHONY: testbed-build
testbed-build: deps ## testbed-bins and testbed-brokers side by side (cold: the Go builds and debootstrap overlap)
	@mkdir -p .testbed; testbed/build-rabbitmq4.sh > .testbed/brokers-build.log 2>&1 & brokers=$$!; \
	testbed/build-bins.sh all; bins=$$?; \
	wait $$brokers; status=$$?; \
	if [ $$status -ne 0 ]; then cat .testbed/brokers-build.log; echo "testbed-brokers failed ($$status)"; fi; \
	[ $$bins -eq 0 ] && [ $$status -eq 0 ]

.PHONY: cluster-build
cluster-build: deps testbed-brokers ## what e2e-cluster needs: the cluster's Debian packages, its binaries (Go) and the images (buildah); cached
	testbed/install-deps.sh cluster
	testbed/build-bins.sh cluster
	testbed/build-images.sh

.PHONY: testbed-brokers
testbed-brokers: ## build the Debian trixie root for the RabbitMQ 4.0 broker of the test matrix (cached)
	testbed/build-rabbitmq4.sh

##@ Demo
.PHONY: demo
CLUSTER ?=
demo: venv deps testbed-bins ## replay the 2023-09-20 surge live on the test bed (out/demo/); CLUSTER=real: on real pods in the test bed's own cluster (out/demo-real/)
	@if [ "$(CLUSTER)" = real ]; then $(MAKE) --no-print-directory cluster-deps && testbed/cluster-e2e.sh --demo; \
	else $(PY) -m emailqueue_testbed.demo; fi

.PHONY: demo-quick
demo-quick: venv deps testbed-bins ## the same in about 3 minutes
	$(PY) -m emailqueue_testbed.demo --quick

##@ Test bed
.PHONY: testbed-up
testbed-up: venv deps testbed-bins ## start apiserver+etcd, RabbitMQ, SMTP; writes .testbed/env
	$(PY) -m emailqueue_testbed up

.PHONY: testbed-down
testbed-down: ## stop everything testbed-up started (and the real cluster this checkout started)
	@if [ -x $(PY) ]; then $(PY) -m emailqueue_testbed down; fi

.PHONY: cluster-deps
cluster-deps: venv deps testbed-bins cluster-build ## the real cluster's Debian packages, binaries and images (runc, CNI, iptables, buildah; kubelet, containerd, ...: cached)

.PHONY: cluster-up
cluster-up: cluster-deps ## a real single-node cluster (kubelet, containerd, our images) in namespaces of its own; writes .testbed/cluster.kubeconfig
	$(PY) -m emailqueue_testbed.cluster up --images $$(testbed/build-images.sh --list | cut -d= -f2)

.PHONY: cluster-down
cluster-down: ## stop the real cluster and remove every process, mount, cgroup and namespace it made
	@if [ -x $(PY) ]; then $(PY) -m emailqueue_testbed.cluster down; fi

.PHONY: testbed-status
testbed-status: ## show which test bed components are running
	$(PY) -m emailqueue_testbed status

##@ Test
.PHONY: test
# The cluster's build (cold: kubelet and friends, the images) runs at the lowest CPU priority while
# the pytest suite runs (mostly waiting on brokers and pods); e2e-cluster then runs on its own.
test: venv check-code deps testbed-build ## ruff and mypy --strict, every test but the soak run of make chaos (unit, integration, e2e, short chaos), then e2e-cluster (real pods); starts what it needs
	@mkdir -p .testbed; nice -n 19 $(MAKE) --no-print-directory cluster-build > .testbed/cluster-build.log 2>&1 & build=$$!; \
	$(PYTEST) tests -m "not soak and not kind and not cluster" --durations=30; status=$$?; \
	wait $$build; built=$$?; \
	if [ $$built -ne 0 ]; then cat .testbed/cluster-build.log; echo "cluster-build failed ($$built)"; fi; \
	[ $$status -eq 0 ] && [ $$built -eq 0 ] && testbed/cluster-e2e.sh

.PHONY: check-code
check-code: venv ## ruff (operator, worker, testbed, tests, bench) and mypy --strict (operator/, worker/: mypy.ini)
	$(VENV)/bin/ruff check operator worker testbed tests bench
	$(VENV)/bin/mypy

.PHONY: test-unit
test-unit: venv ## fast tests without the test bed (builds helm once: the chart and deploy/ sync tests render with it)
	testbed/build-bins.sh helm
	$(PYTEST) tests/unit -q

.PHONY: lint
lint: venv testbed-bins check-code ## ruff, mypy, hadolint, helm lint --strict, promtool check/test rules, deploy/ rendered from the chart, static chart/alert/dashboard checks
	$(VENV)/bin/hadolint operator/Dockerfile worker/Dockerfile
	$(PY) deploy/render.py --check
	$(call tool,helm) lint --strict charts/emailqueue-operator
	$(call tool,promtool) check rules deploy/monitoring/rules/*.yaml
	cd deploy/monitoring/tests && $(call tool,promtool) test rules *.yaml
	$(PYTEST) tests/unit/test_alerts.py tests/unit/test_dashboard.py tests/unit/test_chart_static.py -q

##@ Ship
.PHONY: manifests
manifests: venv ## regenerate the PrometheusRule, the chart's and the package's copies of the CRD, rules and dashboard, deploy/operator and deploy/worker (rendered from the chart), and the chart README
	testbed/build-bins.sh helm
	$(PY) deploy/monitoring/sync.py
	$(PY) deploy/render.py
	$(PY) charts/emailqueue-operator/readme.py

.PHONY: images
images: VERSION  = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' operator/emailqueue_operator/__init__.py)
images: REVISION = $(shell git rev-parse HEAD)
images: ## both images from requirements/*.lock: docker build with a Docker engine, else testbed/build-images.sh (buildah tarballs, plus the SMTP sink and RabbitMQ)
	@if docker info >/dev/null 2>&1; then \
	  set -x; \
	  docker build -f operator/Dockerfile --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) -t emailqueue-operator:$(VERSION) . && \
	  docker build -f worker/Dockerfile --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) -t email-worker:$(VERSION) .; \
	else \
	  echo "no Docker engine: testbed/build-images.sh (buildah)"; \
	  testbed/build-images.sh; \
	fi

.PHONY: e2e-cluster
e2e-cluster: cluster-deps ## the chart on real pods: cluster up, helm install (operator + worker), RabbitMQ and SMTP sink as pods, the surge (pytest -m kind), cluster down
	testbed/cluster-e2e.sh

.PHONY: e2e-kind
e2e-kind: venv ## needs Docker: build images, kind cluster, the same install and tests as e2e-cluster (pytest -m kind)
	testbed/kind-e2e.sh

##@ Simulate and plan
.PHONY: simulate
simulate: venv ## replay every shipped surge scenario against every policy (table + out/sim/*.png)
	@mkdir -p out/sim
	$(PY) -m emailqueue_operator simulate --all --plot out/sim/all.png

.PHONY: plan
plan: venv ## capacity plan for the 2023-09-20 incident (20/s base, 400/s peak, 10/s per replica, 30 s start-up)
	$(PY) -m emailqueue_operator plan --peak-rate 400 --base-rate 20 --rate-per-replica 10 --startup-seconds 30 --drain-seconds 60

##@ Benchmarks
.PHONY: bench
bench: venv deps testbed-bins ## run every benchmark; writes out/bench/ and docs/benchmarks.md
	$(PY) bench/run.py

.PHONY: chaos
chaos: venv deps testbed-bins ## the fault suite, long form (bigger loads, longer faults); regenerates docs/reliability.md
	$(PY) bench/chaos.py
