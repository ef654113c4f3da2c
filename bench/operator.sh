#!/usr/bin/env bash
# Builds the release operator and runs the operator benchmark (1,000 Projections over 20 EventStores by default);
# prints a Markdown table. Extra arguments go to the benchmark (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export PATH="$PWD/.tools/bin:$PATH"
cargo build --release --locked -p projectionist-operator -p projectionist-bench
exec ./target/release/projectionist-bench-operator "$@"
