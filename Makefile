# Build outputs live outside the clone so CI and every checkout reuse one warm cache.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/semantis/target
CARGO ?= cargo
DEV_BIN := $(CARGO_TARGET_DIR)/debug/semantis-dataplane

E2E_DIR ?= /tmp/semantis-e2e
export SEMANTIS_E2E_DIR := $(E2E_DIR)

.PHONY: run test e2e e2e-up e2e-down crds lint fmt setup build release bench

## Start the embedded default (LanceDB + SQLite + local model) on 127.0.0.1:8080. Uses the
## same dev build as `make test` (the model's numeric crates are optimised even there), so
## one cold build serves both; `make release` builds the optimised binary.
run: setup
	$(CARGO) build --locked -p semantis-dataplane
	$(DEV_BIN) serve --config dataplane/examples/embedded.toml

## Everything CI checks: formatting, clippy -D warnings, `crds/` drift, unit and integration
## tests (real Postgres and Redis on loopback, from scripts/services.sh) and the operator's
## end-to-end suite (a real kube-apiserver, etcd, controllers and kwok, from e2e/scripts/).
test: setup lint
	bash scripts/services.sh start
	$(CARGO) build --workspace --locked --bins
	bash e2e/scripts/control-plane.sh start
	SEMANTIS_E2E_KUBECONFIG=$(E2E_DIR)/kubeconfig $(CARGO) test --workspace --locked; \
	  rc=$$?; bash e2e/scripts/control-plane.sh stop; exit $$rc

## The operator's end-to-end suite alone (control plane built from Go modules on first use).
e2e: setup
	bash scripts/services.sh start
	$(CARGO) build --locked -p semantis-operator -p semantis-dataplane --bins
	bash e2e/scripts/control-plane.sh start
	SEMANTIS_E2E_KUBECONFIG=$(E2E_DIR)/kubeconfig $(CARGO) test --locked -p semantis-e2e; \
	  rc=$$?; bash e2e/scripts/control-plane.sh stop; exit $$rc

## Start or stop the loopback control plane by hand (prints KUBECONFIG=...).
e2e-up:
	bash e2e/scripts/control-plane.sh start
e2e-down:
	bash e2e/scripts/control-plane.sh stop

## Regenerate crds/ from the Rust types (CI fails when they drift).
crds:
	$(CARGO) run --locked -q -p semantis-operator -- crd --out crds

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

setup:
	bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --locked

release: setup
	$(CARGO) build --release --locked -p semantis-dataplane

## Reproduce BENCHMARKS.md (release build, about an hour with a million entries).
bench: release
	bash scripts/bench.sh
