# Build outputs live outside the clone so CI and every checkout reuse one warm cache.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/semantis/target
CARGO ?= cargo
DEV_BIN := $(CARGO_TARGET_DIR)/debug/semantis-dataplane

.PHONY: run test lint fmt setup build release bench

## Start the embedded default (LanceDB + SQLite + local model) on 127.0.0.1:8080. Uses the
## same dev build as `make test` (the model's numeric crates are optimised even there), so
## one cold build serves both; `make release` builds the optimised binary.
run: setup
	$(CARGO) build --locked -p semantis-dataplane
	$(DEV_BIN) serve --config dataplane/examples/embedded.toml

## Everything CI checks: formatting, clippy -D warnings, unit and integration tests (against
## real Postgres and Redis on loopback, installed and started by scripts/services.sh).
test: setup lint
	bash scripts/services.sh start
	$(CARGO) test --workspace --locked

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
