#!/usr/bin/env bash
# The local demo: installs what it needs, starts a real nats-server on a free loopback port, provisions the
# user-management example's stream and consumer on it exactly as the operator maps them, appends the sample events
# and shows the stream and the consumer's lag. Stops the server when done.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --quiet --locked -p projectionist-sidecar

exec ./target/debug/projectionist-sidecar demo -f examples/user-management --events examples/user-management/events.ndjson
