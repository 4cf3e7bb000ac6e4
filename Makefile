# Build outputs live outside the clone so CI and every checkout reuse one warm cache.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/semantis/target
CARGO ?= cargo
BIN := $(CARGO_TARGET_DIR)/release/semantis-dataplane

.PHONY: run test lint fmt setup build release bench-exact bench-semantic

## Start the embedded default (LanceDB + SQLite + local model) on 127.0.0.1:8080.
run: setup
	$(CARGO) build --release --locked -p semantis-dataplane
	$(BIN) serve --config dataplane/examples/embedded.toml

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
