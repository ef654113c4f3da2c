#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then formatting, lints, generated files and
# every test (unit tests, real nats-server / PostgreSQL / MariaDB / SQLite integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "[test] cargo fmt --check"
cargo fmt --all -- --check

echo "[test] cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "[test] generated CRDs are in sync"
cargo run --quiet --locked -p projectionist-crds --bin crdgen -- --check crds

echo "[test] cargo test"
cargo test --workspace --locked --no-fail-fast
