# Quiver's tasks. `make demo` and `make test` are the README's two commands.
export CARGO_TARGET_DIR ?= /var/tmp/quiver-target
SHELL := /bin/bash

.PHONY: demo demo-stop grow test verify fix build bench deps

## Start a local 3-node cluster, load the sample views and data, show features served.
demo:
	./scripts/demo.sh

## Stop the demo cluster.
demo-stop:
	./scripts/demo.sh stop

## A cluster that grows under load: one node, two join, a fourth joins, the
## first is drained and removed, a shard splits (scripts/grow.sh stop ends it).
grow:
	./scripts/grow.sh

## The whole gate: formatting, the test suite, clippy -D warnings (what CI runs).
test:
	./scripts/test.sh

## The same gate under its usual name.
verify: test

## Fix what can be fixed mechanically.
fix:
	. ./scripts/ensure-deps.sh && cargo fmt --all && \
	    cargo clippy --workspace --all-targets --fix --allow-dirty --allow-staged

build:
	. ./scripts/ensure-deps.sh && cargo build --workspace --bins

## Install what the build needs (libclang) if it is missing.
deps:
	./scripts/ensure-deps.sh
