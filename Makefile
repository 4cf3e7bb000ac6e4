# Build outputs live outside the clone so CI and every checkout reuse one warm cache.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/semantis/target
CARGO ?= cargo
DEV_BIN := $(CARGO_TARGET_DIR)/debug/semantis-dataplane

E2E_DIR ?= /tmp/semantis-e2e
export SEMANTIS_E2E_DIR := $(E2E_DIR)
NODE_DIR ?= /tmp/semantis-node
export SEMANTIS_NODE_DIR := $(NODE_DIR)

.PHONY: fake-openai run test e2e e2e-up e2e-down node-up node-down images crds manifests lint fmt setup build release release-dataplane release-serve release-operator bench

## Start the embedded default (LanceDB + SQLite + local model) on 127.0.0.1:8080. Builds
## exactly what `make test` builds (same packages, same features: `cargo build -p` would
## unify features differently and recompile lancedb), so one cold build serves both; the
## model's numeric crates are optimised even there. `make release` builds the optimised binary.
run: setup
	$(CARGO) test --workspace --locked --no-run
	$(DEV_BIN) serve --config dataplane/examples/embedded.toml

## A fake OpenAI-compatible LLM on 127.0.0.1:9100, the upstream `make run`'s tenant forwards
## gateway misses to (dataplane/examples/embedded.toml).
fake-openai:
	$(CARGO) test --workspace --locked --no-run
	$(DEV_BIN) fake-openai --listen 127.0.0.1:9100

## Everything CI checks: formatting, clippy -D warnings, `crds/` drift, unit and integration
## tests (real Postgres and Redis on loopback, from scripts/services.sh), the chart, kustomize
## and monitoring assets (validate-manifests.sh), and the operator's end-to-end suite: a real
## kube-apiserver, etcd, controllers and kwok, and a second cluster with a real node (kubelet,
## containerd, CNI, kube-proxy, CoreDNS) running the images `make images` builds.
test: setup lint
	bash scripts/services.sh start
	$(CARGO) test --workspace --locked --no-run
	bash e2e/scripts/control-plane.sh start
	bash e2e/scripts/node.sh start
	SEMANTIS_E2E_KUBECONFIG=$(E2E_DIR)/kubeconfig bash e2e/scripts/validate-manifests.sh
	SEMANTIS_E2E_KUBECONFIG=$(E2E_DIR)/kubeconfig SEMANTIS_NODE_KUBECONFIG=$(NODE_DIR)/kubeconfig \
	  $(CARGO) test --workspace --locked; \
	  rc=$$?; bash e2e/scripts/node.sh stop; bash e2e/scripts/control-plane.sh stop; exit $$rc

## The operator's end-to-end suite alone (control plane and node built from Go modules on
## first use, images from the debug binaries).
e2e: setup
	bash scripts/services.sh start
	$(CARGO) test --workspace --locked --no-run
	bash e2e/scripts/control-plane.sh start
	bash e2e/scripts/node.sh start
	SEMANTIS_E2E_KUBECONFIG=$(E2E_DIR)/kubeconfig SEMANTIS_NODE_KUBECONFIG=$(NODE_DIR)/kubeconfig \
	  $(CARGO) test --locked -p semantis-e2e; \
	  rc=$$?; bash e2e/scripts/node.sh stop; bash e2e/scripts/control-plane.sh stop; exit $$rc

## Start or stop the kwok control plane by hand (prints KUBECONFIG=...).
e2e-up:
	bash e2e/scripts/control-plane.sh start
e2e-down:
	bash e2e/scripts/control-plane.sh stop

## Start or stop the cluster with a real node by hand (prints KUBECONFIG=...); its images are
## rebuilt from the debug binaries when they changed.
node-up:
	$(CARGO) test --workspace --locked --no-run
	bash e2e/scripts/node.sh start
node-down:
	bash e2e/scripts/node.sh stop

## The images from Dockerfile.dataplane and Dockerfile.operator, plus pause and Redis, built
## with buildah from Debian's packages and the debug binaries (no registry), saved under
## ~/.cache/semantis/e2e/images/.
images:
	$(CARGO) test --workspace --locked --no-run
	bash e2e/scripts/images.sh build

## Regenerate crds/ from the Rust types, plus its copies in the chart and config/crd (CI fails
## when any of them drifts), and the monitoring assets config/prometheus renders from the chart.
crds:
	$(CARGO) run --locked -q -p semantis-operator -- crd --out crds
	cp crds/semanticcaches.semantis.dev.yaml charts/semantis-operator/files/crds/
	cp crds/semanticcaches.semantis.dev.yaml config/crd/bases/
	bash scripts/render-monitoring.sh

## Validate the chart, kustomize output and monitoring assets offline (helm lint, kubeconform,
## promtool) and against the end-to-end API server (server-side dry run); needs `make e2e-up`.
manifests:
	bash e2e/scripts/validate-manifests.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

setup:
	bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --locked

release: setup release-dataplane

## The optimised dataplane with its developer tools (`bench`, `eval`): what scripts/bench.sh
## measures.
release-dataplane:
	$(CARGO) build --release --locked -p semantis-dataplane
## The images' build commands (Dockerfile.dataplane, Dockerfile.operator run exactly these):
## the serving binary without `bench` and `eval`, so it links neither plotters nor the load
## generator.
release-serve:
	$(CARGO) build --release --locked -p semantis-dataplane --no-default-features
release-operator:
	$(CARGO) build --release --locked -p semantis-operator

## Reproduce BENCHMARKS.md (release build, about an hour with a million entries).
bench: release
	bash scripts/bench.sh
