#!/usr/bin/env bash
# Builds the release sidecar and runs the event-store API benchmark against raw JetStream publishes on the same
# nats-server; prints a Markdown table. Extra arguments go to the benchmark (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export PATH="$PWD/.tools/bin:$PATH"
cargo build --release --locked -p projectionist-sidecar -p projectionist-bench
exec ./target/release/projectionist-bench-api "$@"
