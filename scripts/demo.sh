#!/usr/bin/env bash
# The local demo: installs what it needs, starts a real nats-server (JetStream, temporary store) on a free loopback
# port, provisions the user-management example's stream and consumer exactly as the operator maps them, appends the
# sample events (twice, to show de-duplication) and shows the stream and the projection's lag. The server is stopped
# by PID when the demo ends.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --quiet --locked -p projectionist-sidecar
sidecar=./target/debug/projectionist-sidecar
example=examples/user-management

store=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.tools/bin/nats-server --addr 127.0.0.1 --port "$port" --jetstream --store_dir "$store" >"$store/nats.log" 2>&1 &
nats_pid=$!
cleanup() { kill "$nats_pid" 2>/dev/null || true; wait "$nats_pid" 2>/dev/null || true; rm -rf "$store"; }
trap cleanup EXIT
export PROJECTIONIST_NATS_URL="nats://127.0.0.1:$port"
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

step() { printf '\n== %s\n' "$*"; }
step "nats-server $(.tools/bin/nats-server --version | awk '{print $2}') on $PROJECTIONIST_NATS_URL"
step "provision the EventStore's stream and the Projection's consumer"
"$sidecar" provision -f "$example"
step "append $(wc -l < "$example/events.ndjson") sample events"
"$sidecar" append -f "$example" --events "$example/events.ndjson"
step "append them again: the stream drops every duplicate"
"$sidecar" append -f "$example" --events "$example/events.ndjson" | tail -n 3
step "provision again: nothing to change"
"$sidecar" provision -f "$example"
step "stream and projection lag"
"$sidecar" status -f "$example"
