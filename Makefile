# Quiver's tasks. `make demo` and `make test` are the README's two commands.
export CARGO_TARGET_DIR ?= /var/tmp/quiver-target

.PHONY: demo demo-stop test verify fix build bench deps

## Start a local 3-node cluster, load the sample views and data, show features served.
demo:
	./scripts/demo.sh

## Stop the demo cluster.
demo-stop:
	./scripts/demo.sh stop

## The whole test suite.
test:
	./scripts/test.sh

## Read-only gate: formatting, lints, tests.
verify: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	./scripts/test.sh

## Fix what can be fixed mechanically.
fix: deps
	cargo fmt --all
	cargo clippy --workspace --all-targets --fix --allow-dirty --allow-staged

build: deps
	cargo build --workspace --bins

deps:
	./scripts/ensure-deps.sh
