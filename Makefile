# datagrid-forwarder: `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: install
install: ## Install everything (system packages if missing, uv, venv, Kafka jars, tools)
	scripts/bootstrap.sh

.PHONY: demo
demo: install ## Run the demo: broker + fake Datagrid + forwarder serve + a signed webhook
	$(PY) deploy/demo.py

.PHONY: test
test: ## Run the whole test suite against a real local broker (what CI runs)
	scripts/test.sh

.PHONY: test-unit
test-unit: ## Run the unit tests (tests/unit): no broker, seconds
	@test -x $(PY) || scripts/bootstrap.sh
	$(PY) -m pytest tests/unit

.PHONY: lint
lint: install ## ruff and mypy (strict on the package)
	$(PY) -m ruff check forwarder tests bench deploy examples
	$(PY) -m ruff format --check forwarder tests bench deploy examples
	$(PY) -m mypy forwarder

.PHONY: hotpath
hotpath: install ## Compile forwarder/hotpath.py with mypyc as wheels do (.cache/hotpath/) and test it against the source
	$(PY) -c 'from tests.support.hotpath import build_compiled; print(build_compiled())'
	$(PY) -m pytest tests/unit/test_hotpath.py

.PHONY: kafka-start
kafka-start: install ## Start a local broker on 127.0.0.1:9092
	$(PY) deploy/kafka/rig.py start

.PHONY: kafka-stop
kafka-stop: ## Stop the local broker
	$(PY) deploy/kafka/rig.py stop

.PHONY: bench
bench: install ## Benchmarks: the service against plain-library baselines (prints a table)
	$(PY) -m bench

.PHONY: tools
tools: ## Install pinned helm, kubeconform, etcd and Kubernetes into .cache/tools/bin (Go module proxy)
	deploy/tools/install.sh --kube

.PHONY: chart-files
chart-files: ## Copy the dashboard and alert rules into the Helm chart (one source: deploy/)
	cp deploy/grafana/forwarder-dashboard.json helm/forwarder/files/grafana/
	cp deploy/prometheus/forwarder-rules.yaml helm/forwarder/files/prometheus/

.PHONY: image
image: ## Build the container image (needs Docker)
	docker build -t datagrid-forwarder:dev --build-arg VERSION=$$(grep -m1 '^version' pyproject.toml | cut -d'"' -f2) \
		--build-arg REVISION=$$(git rev-parse HEAD) --build-arg CREATED=$$(date -u +%FT%TZ) .

.PHONY: release-artifacts
release-artifacts: install ## What a release publishes, built here into dist/: chart .tgz, image OCI archive, SHA256SUMS
	scripts/release-artifacts.sh dist

.PHONY: k8s-e2e
k8s-e2e: ## Real cluster: build the image, install every chart scenario, webhooks through a rolling upgrade
	scripts/test.sh tests/test_k8s_e2e.py
	@$(PY) -c 'import json; from tests.test_k8s_e2e import RESULTS, summary_line; print(summary_line(json.loads(RESULTS.read_text())))'

.PHONY: compose-up
compose-up: ## Kafka, fake Datagrid, forwarder, Prometheus and Grafana with Docker Compose
	docker compose -f deploy/compose.yaml up --build

.PHONY: reliability
reliability: install ## Run the fault, bad-input, security, edge and reconciler suites; regenerate docs/reliability.md
	scripts/test.sh tests/test_faults.py
	scripts/test.sh tests/test_bad_input.py --junitxml=.cache/reliability/bad-input.xml
	scripts/test.sh tests/test_security.py --junitxml=.cache/reliability/security.xml
	scripts/test.sh tests/test_edges.py --junitxml=.cache/reliability/edges.xml
	scripts/test.sh tests/test_reconcile.py --junitxml=.cache/reliability/reconcile.xml
	$(PY) -m tests.reliability_report

.PHONY: mutate
mutate: install ## Mutation tests of the failure policy: mutmut over tests/unit, then the curated mutants (docs/testing.md)
	$(PY) scripts/mutate.py --mutmut
	$(PY) scripts/mutate.py

.PHONY: clean
clean: ## Remove caches and build output (keeps downloaded jars and tools)
	rm -rf dist build .pytest_cache .mypy_cache .ruff_cache .hypothesis
