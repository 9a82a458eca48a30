# runbridge — the two set-up commands are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
# Every crate of the workspace; the crash tests and the chaos harness need
# runbridge's failpoints compiled in (never in a release build).
TEST_FEATURES ?= --workspace --features runbridge-harness/failpoints
# The harnesses (crates/harness) and the runbridge binary they drive, built
# side by side in target/<profile>/.
HARNESS = -p runbridge -p runbridge-harness --bins

.PHONY: all build release test lint fmt services node demo compose-config k8s-check k8s-check-deps k8s-rules chaos chaos-small bench bench-smoke bench-venv notebook-test sdk-test airflow-test bundle-test docs docs-test ui-test-deps resonate-sdk-deps ui-screenshot cluster-test fuzz clean

# Fault-injection run (see crates/harness/src/bin/chaos): N triggers and
# PARENTS parent triggers of CHILDREN children each among them, every fault
# on, a seed to replay it. `make chaos SEED=42 N=10000`.
N ?= 10000
RATE ?= 100
PARENTS ?= 100
CHILDREN ?= 20
SEED ?=

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

services:
	@bash scripts/ensure-services.sh

# The whole suite: the 1,000-trigger fault-injection profile, then unit and
# integration tests against the real RabbitMQ and Redis on this machine and
# the emulator over HTTP (last, so the test runner's summary closes the output).
test: services compose-config k8s-check chaos-small bench-smoke notebook-test sdk-test airflow-test bundle-test docs-test ui-test-deps resonate-sdk-deps
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run $(TEST_FEATURES) --no-fail-fast; \
	else \
		echo "[test] cargo-nextest not found; using cargo test"; \
		$(CARGO) test $(TEST_FEATURES) --no-fail-fast; \
	fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets $(TEST_FEATURES) -- -D warnings
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# The main job end to end against the emulator; stops what it starts.
demo: services build
	@bash scripts/demo.sh

# Validates docker-compose.yml without an engine (Debian's docker-compose).
compose-config:
	@if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1 \
		&& [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "[compose-config] installing Debian's docker-compose (no engine needed to validate)"; \
		apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; fi
	@if command -v docker-compose >/dev/null; then docker-compose config -q && echo "docker-compose.yml is valid"; \
	elif docker compose version >/dev/null 2>&1; then docker compose config -q && echo "docker-compose.yml is valid"; \
	else echo "no docker-compose here: apt-get install docker-compose" >&2; exit 1; fi
	@# The stack has development credentials: nothing of it may face the network.
	@if grep -nE '^[[:space:]]*-[[:space:]]*"?([0-9.]*0\.0\.0\.0:|\[::\]:)?[0-9]+:[0-9]+' docker-compose.yml; then \
		echo "docker-compose.yml publishes the ports above on every interface: bind them to 127.0.0.1" >&2; exit 1; fi

chaos: services
	$(CARGO) build $(HARNESS) --features runbridge-harness/failpoints
	target/debug/chaos --triggers $(N) --rate $(RATE) --parents $(PARENTS) --children $(CHILDREN) $(if $(SEED),--seed $(SEED),)

# The profile `make test` runs: 1,000 triggers and 10 parents of 10 children, every fault kind.
chaos-small: services
	$(CARGO) build $(HARNESS) --features runbridge-harness/failpoints
	target/debug/chaos --triggers 1000 --parents 10 --children 10 --rate 50 --fault-every 1.5 $(if $(SEED),--seed $(SEED),)

# Benchmarks against baselines measured in the same run (crates/harness/src/bin/bench):
# writes bench/results.json, bench/results.md and bench/latency.svg.
# B8's hand-written Python bridge runs in a virtualenv of its own under
# target/ (pika, redis-py, requests, Flask, gunicorn from PyPI, pinned).
BENCH_VENV = target/benchvenv
bench-venv:
	@test -x $(BENCH_VENV)/bin/gunicorn || { echo "[bench] installing the Python bridge's requirements in $(BENCH_VENV)"; python3 -m venv $(BENCH_VENV) && $(BENCH_VENV)/bin/pip install -q -r bench/baselines/python_bridge/requirements.txt; }

bench: services bench-venv
	$(CARGO) build --release $(HARNESS)
	target/release/bench --out bench

# The profile `make test` runs: every scenario with a few hundred messages,
# to keep the harness working. Its numbers mean nothing; nothing asserts them.
bench-smoke: services bench-venv
	$(CARGO) build $(HARNESS)
	target/debug/bench --smoke --out target/bench-smoke

# The Python clients' pytest suites, in a venv of their own under target/
# (pinned from PyPI): the notebook helper (standard library only) against a
# real sidecar and Redis, and the producer client (pika, aio-pika) against
# RabbitMQ, Redis, `runbridge all` and the emulator.
PY_CLIENT_DEPS = pytest pika==1.3.2 aio-pika==9.5.5 jsonschema==4.23.0
notebook-test: services
	$(CARGO) build --bins
	@test -x target/pyvenv/bin/pytest || python3 -m venv target/pyvenv
	@target/pyvenv/bin/pip install -q $(PY_CLIENT_DEPS)
	target/pyvenv/bin/pytest -q clients/python

# Databricks' own Python SDK (pinned) drives the emulator through every
# Jobs API endpoint runbridge uses (tests/databricks): the emulator is
# checked by Databricks' generated client, not by its author.
DATABRICKS_SDK ?= databricks-sdk==0.167.0
sdk-test: build
	@test -x target/pyvenv/bin/pytest || { python3 -m venv target/pyvenv && target/pyvenv/bin/pip install -q pytest; }
	@target/pyvenv/bin/pip install -q "$(DATABRICKS_SDK)"
	target/pyvenv/bin/pytest -q tests/databricks

# Airflow's Databricks provider (pinned, with the Airflow it needs, in a
# venv of its own under target/) drives the emulator unchanged
# (tests/airflow): its hook's sync calls and its deferrable trigger.
AIRFLOW_VENV = target/airflowvenv
AIRFLOW_PACKAGES ?= apache-airflow-providers-databricks==7.23.0 apache-airflow==3.3.2 pytest
airflow-test: build
	@test -x $(AIRFLOW_VENV)/bin/pytest || { echo "[airflow-test] installing $(AIRFLOW_PACKAGES) in $(AIRFLOW_VENV)"; python3 -m venv $(AIRFLOW_VENV) && $(AIRFLOW_VENV)/bin/pip install -q $(AIRFLOW_PACKAGES); }
	$(AIRFLOW_VENV)/bin/pytest -q -p no:cacheprovider tests/airflow

# examples/databricks-bundle: its job validated by Databricks' typed job
# definitions (databricks-bundles, pinned), then created in the emulator
# and triggered through `runbridge all` until its event says RESOLVED.
DATABRICKS_BUNDLES ?= databricks-bundles==1.22.1
bundle-test: services build
	@test -x target/pyvenv/bin/pytest || { python3 -m venv target/pyvenv && target/pyvenv/bin/pip install -q pytest; }
	@target/pyvenv/bin/pip install -q "$(DATABRICKS_BUNDLES)" "pyyaml==6.0.3"
	target/pyvenv/bin/pytest -q tests/bundle

# Rewrites the generated contracts under docs/ (a test fails when they are
# out of date): JSON Schemas, the sidecar's OpenAPI, the AsyncAPI document.
docs: build
	@mkdir -p docs/schemas
	target/debug/runbridge schema trigger > docs/schemas/trigger.schema.json
	target/debug/runbridge schema event > docs/schemas/event.schema.json
	target/debug/runbridge schema control > docs/schemas/control.schema.json
	target/debug/runbridge schema progress-event > docs/schemas/progress-event.schema.json
	target/debug/runbridge schema finding-event > docs/schemas/finding-event.schema.json
	target/debug/runbridge schema openapi > docs/openapi.json
	target/debug/runbridge schema asyncapi --defaults > docs/asyncapi.yaml

# The generated documents are valid by their standards' own tools:
# openapi-spec-validator and jsonschema (PyPI, in the venv under target/), and
# the AsyncAPI Initiative's parser (npm, under target/node; nodejs from apt
# when it is missing and apt is there).
ASYNCAPI_PARSER ?= @asyncapi/parser@3.6.3
docs-test: node
	@test -x target/pyvenv/bin/pytest || { python3 -m venv target/pyvenv && target/pyvenv/bin/pip install -q pytest; }
	@test -x target/pyvenv/bin/openapi-spec-validator || target/pyvenv/bin/pip install -q openapi-spec-validator
	@test -d target/node/node_modules/@asyncapi/parser || { \
		echo "[docs-test] installing $(ASYNCAPI_PARSER) under target/node"; \
		npm install --silent --no-audit --no-fund --prefix target/node $(ASYNCAPI_PARSER); }
	target/pyvenv/bin/pytest -q tests/documents

# The operator console's browser test (tests/it/ui.rs) drives Debian's
# chromium with playwright-core (npm, under target/node): no browser download.
# Node.js and npm, for the checks that use packages from npm (under
# target/node): installed with apt-get where they are missing.
node:
	@command -v node >/dev/null && command -v npm >/dev/null || { \
		echo "[node] node/npm not found; installing nodejs and npm with apt-get"; \
		apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }

# The Kubernetes manifests (deploy/kubernetes): rendered (kubectl kustomize
# where kubectl exists, else scripts/k8s-check.py's own renderer) and every
# object validated: Kubernetes' schemas by kubernetes-validate (PyPI, in a
# venv under target/), KEDA's and the Prometheus Operator's by their
# published schemas (@kubernetes-models on npm, under target/node). Then a
# copy with a wrong field must fail.
K8S_VENV = target/k8svenv
K8S_MODELS = @kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0
k8s-check-deps: node
	@test -x $(K8S_VENV)/bin/kubernetes-validate || { echo "[k8s-check] installing kubernetes-validate in $(K8S_VENV)"; python3 -m venv $(K8S_VENV) && $(K8S_VENV)/bin/pip install -q kubernetes-validate==1.37.0; }
	@test -d target/node/node_modules/@kubernetes-models/prometheus-operator || { \
		echo "[k8s-check] installing $(K8S_MODELS) under target/node"; \
		npm install --silent --no-audit --no-fund --prefix target/node $(K8S_MODELS); }
k8s-check: k8s-check-deps
	$(K8S_VENV)/bin/python scripts/k8s-check.py
	$(K8S_VENV)/bin/python scripts/k8s-check.py --self-test
# deploy/kubernetes/base/prometheus-rule.yaml from deploy/alerts.yml.
k8s-rules: k8s-check-deps
	$(K8S_VENV)/bin/python scripts/k8s-check.py --rules > deploy/kubernetes/base/prometheus-rule.yaml

PLAYWRIGHT ?= playwright-core@1.65.1
# Resonate's TypeScript SDK, driving the sidecar's Resonate protocol endpoint.
RESONATE_SDK ?= @resonatehq/sdk@0.11.5
ui-test-deps: node
	@test -x /usr/bin/chromium || { \
		echo "[ui-test-deps] chromium not found; installing it with apt-get"; \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
	@test -d target/node/node_modules/playwright-core || { \
		echo "[ui-test-deps] installing $(PLAYWRIGHT) under target/node"; \
		npm install --silent --no-audit --no-fund --prefix target/node $(PLAYWRIGHT); }
	@test -d target/node/node_modules/@resonatehq/sdk || { \
		echo "[ui-test-deps] installing $(RESONATE_SDK) under target/node (tests/it/resonate.rs)"; \
		npm install --silent --no-audit --no-fund --prefix target/node $(RESONATE_SDK); }

# Resonate's Python SDK of both lines (tests/it/resonate.rs): 0.6 (classic
# routes) and 0.8 (protocol envelopes), each in a venv of its own under
# target/. Both need Python 3.12 or later: python3.13 from the PATH or pyenv.
RESONATE_PY06 ?= resonate-sdk==0.6.7
RESONATE_PY08 ?= resonate-sdk==0.8.1
PYTHON313 ?= $(shell for p in $$HOME/.pyenv/versions/3.13*/bin/python3 $$(command -v python3.13); do "$$p" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
resonate-sdk-deps:
	@test -n "$(PYTHON313)" || { echo "[resonate-sdk-deps] Python 3.13 is needed (python3.13 on the PATH, or pyenv install 3.13)" >&2; exit 1; }
	@test -x target/resonate-py06/bin/python || { echo "[resonate-sdk-deps] installing $(RESONATE_PY06) in target/resonate-py06"; $(PYTHON313) -m venv target/resonate-py06 && target/resonate-py06/bin/pip install -q "$(RESONATE_PY06)"; }
	@test -x target/resonate-py08/bin/python || { echo "[resonate-sdk-deps] installing $(RESONATE_PY08) in target/resonate-py08"; $(PYTHON313) -m venv target/resonate-py08 && target/resonate-py08/bin/pip install -q "$(RESONATE_PY08)"; }

# The scale tests, too long for `make test`; .ci/run runs them
# after it. First the integration suite (core loop and the rest) against a
# private 6-node Redis Cluster (scripts/redis-cluster.sh; tests that bring a
# Redis of their own keep it); then the ignored tests of tests/it/scale/:
# five workers sharing 5,000 triggers; a three-node RabbitMQ cluster of
# private nodes (needs root) whose trigger-queue leader is killed with -9
# under 2,000 triggers; a Redis Sentinel failover; a Redis Cluster primary
# killed under 2,000 triggers, without and with redis.wait_replicas = 1.
REDIS_CLUSTER_DIR ?= target/redis-cluster
cluster-test: services
	@scripts/redis-cluster.sh down $(REDIS_CLUSTER_DIR)
	@scripts/redis-cluster.sh up $(REDIS_CLUSTER_DIR)
	@RUNBRIDGE_IT_REDIS_CLUSTER=$$(cat $(REDIS_CLUSTER_DIR)/seeds) \
		$(CARGO) nextest run $(TEST_FEATURES) --no-fail-fast -E 'kind(test) and not test(console_in_a_real_browser)'; \
		rc=$$?; scripts/redis-cluster.sh down $(REDIS_CLUSTER_DIR); exit $$rc
	$(CARGO) nextest run $(TEST_FEATURES) --run-ignored only -E 'test(scale::)' --no-capture

# Hostile input and the promise model at length: the property
# tests of the parsers and the model test against Redis, with 100,000 cases
# each (`make test` runs 2,000 and 10,000); then every cargo-fuzz target
# (fuzz/fuzz_targets: trigger, control, patch_body, notification, run_info)
# for FUZZ_SECONDS each, from the seed corpus in fuzz/corpus (what the fuzzer
# finds goes to target/fuzz-corpus). Longer: FUZZ_CASES=1000000
# FUZZ_SECONDS=3600 make fuzz. cargo-fuzz needs nightly flags: the stable
# toolchain takes them with RUSTC_BOOTSTRAP=1.
FUZZ_CASES ?= 100000
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = trigger control patch_body notification run_info callback error_body
fuzz: services
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) nextest run $(TEST_FEATURES) --no-fail-fast \
		-E 'test(hostile::) | test(store_agrees_with_the_promise_model)'
	@$(CARGO) fuzz --version >/dev/null 2>&1 || { \
		echo "[fuzz] installing cargo-fuzz from crates.io"; $(CARGO) install cargo-fuzz --locked; }
	RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build -O
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p target/fuzz-corpus/$$t; \
		echo "[fuzz] $$t for $(FUZZ_SECONDS) s"; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t target/fuzz-corpus/$$t fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -max_len=65536 || exit 1; \
	done

# Refreshes the console screenshot in docs/ (shown by docs/operating.md) from the browser test's.
ui-screenshot: ui-test-deps
	$(CARGO) nextest run $(TEST_FEATURES) -E 'test(console_in_a_real_browser)'
	cp target/ui/overview.png docs/ui-overview.png

clean:
	$(CARGO) clean
