#!/usr/bin/env bash
# Builds the release binaries and runs the benchmark twice — PostgreSQL with its durable defaults (the headline),
# then without durability — printing a Markdown table each. Extra arguments go to both runs (see `--help`), e.g.
# `bash bench/run.sh --events 50000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build --release --locked -p projectionist-sidecar -p projectionist-bench
./target/release/projectionist-bench "$@"
echo
./target/release/projectionist-bench --relaxed "$@"
