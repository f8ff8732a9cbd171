# tenant-operator: the project's commands. `make demo` and `make test` install
# what a fresh machine lacks (scripts/setup.sh) before they run.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target

.PHONY: all setup build crds test demo clean fuzz bench-crypto image kind-up kind-down deploy

all: build

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

crds:
	$(CARGO) run -q --bin tenant-operator -- crdgen > crds/crds.yaml
	cp crds/crds.yaml charts/tenant-operator/crds/crds.yaml

test: setup
	bash scripts/test.sh

demo: setup
	bash scripts/demo.sh

# Coverage-guided fuzzing of the crypto formats, FUZZ_SECONDS per target
# (default 20); installs cargo-fuzz if missing.
fuzz:
	bash scripts/fuzz-smoke.sh $(FUZZ_SECONDS)

# Envelope, stream and HKDF throughput beside raw AES-GCM / HKDF.
bench-crypto:
	$(CARGO) bench --bench crypto

clean:
	$(CARGO) clean

# --- A local cluster with kind (needs docker, kind, kubectl and helm; see
# docs/install.md). `make kind-up deploy`: a cluster, the image, a dev
# Postgres, the chart and the example tenants.
KIND_CLUSTER ?= tenant-operator
IMAGE ?= tenant-operator:dev
KIND_CONTEXT := kind-$(KIND_CLUSTER)
KUBECTL_KIND := kubectl --context $(KIND_CONTEXT)
DEV_DATABASE_URL ?= postgresql://tenancy_admin:devpassword@postgres.tenant-dev-db.svc:5432/saas

image:
	docker build -t $(IMAGE) .

kind-up:
	@if kind get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)'; then \
	  echo "kind cluster $(KIND_CLUSTER) exists"; \
	else \
	  kind create cluster --name $(KIND_CLUSTER) --config kind-config.yaml; \
	fi

kind-down:
	kind delete cluster --name $(KIND_CLUSTER)

deploy: image
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)
	$(KUBECTL_KIND) apply -f deploy/dev/postgres.yaml
	$(KUBECTL_KIND) -n tenant-dev-db rollout status statefulset/postgres --timeout=180s
	$(KUBECTL_KIND) create namespace tenant-system --dry-run=client -o yaml | $(KUBECTL_KIND) apply -f -
	$(KUBECTL_KIND) -n tenant-system get secret tenant-operator-root-keys >/dev/null 2>&1 || \
	  docker run --rm $(IMAGE) keys new-secret --namespace tenant-system | $(KUBECTL_KIND) apply -f -
	$(KUBECTL_KIND) -n tenant-system create secret generic tenant-operator-db \
	  --from-literal=url='$(DEV_DATABASE_URL)' --dry-run=client -o yaml | $(KUBECTL_KIND) apply -f -
	helm --kube-context $(KIND_CONTEXT) upgrade --install tenant-operator charts/tenant-operator \
	  --namespace tenant-system --set image.repository=$(word 1,$(subst :, ,$(IMAGE))) \
	  --set image.tag=$(word 2,$(subst :, ,$(IMAGE))) --set image.pullPolicy=Never \
	  --wait --timeout 5m
	$(KUBECTL_KIND) apply -f examples/tenants/
	$(KUBECTL_KIND) wait --for=condition=Ready tenant --all --timeout=180s
	$(KUBECTL_KIND) get tenants
