#!/usr/bin/env bash
# Builds the release binaries and runs the benchmark; prints a Markdown table. Extra arguments go to the benchmark
# (see `--help`), e.g. `bash bench/run.sh --events 50000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build --release --locked -p projectionist-sidecar -p projectionist-bench
exec ./target/release/projectionist-bench "$@"
