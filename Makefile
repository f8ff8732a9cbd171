# tenant-operator: the project's commands. `make demo` and `make test` install
# what a fresh machine lacks (scripts/setup.sh) before they run.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target

.PHONY: all setup build crds test demo clean fuzz bench-crypto

all: build

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

crds:
	$(CARGO) run -q --bin tenant-operator -- crdgen > crds/crds.yaml

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
