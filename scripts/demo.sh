#!/usr/bin/env bash
# The local demo: a real nats-server on a free loopback port, the sidecar in `dev` mode on the user-management
# example (stream and consumer provisioned from the same YAML a cluster would get, read model in SQLite), the sample
# events appended, then the resulting tables and the projection's lag. Everything started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --quiet --locked -p projectionist-sidecar
sidecar=./target/debug/projectionist-sidecar
example=examples/user-management

work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
nats_port=$(free_port)
admin_port=$(free_port)
api_port=$(free_port)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

.tools/bin/nats-server --addr 127.0.0.1 --port "$nats_port" --jetstream --store_dir "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
export PROJECTIONIST_NATS_URL="nats://127.0.0.1:$nats_port"
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break; sleep 0.1; done

step() { printf '\n== %s\n' "$*"; }
step "nats-server $(.tools/bin/nats-server --version | awk '{print $2}') on $PROJECTIONIST_NATS_URL"

step "projectionist-sidecar dev -f $example   (read model: SQLite under $work/data)"
"$sidecar" dev -f "$example" --data-dir "$work/data" --admin-addr "127.0.0.1:$admin_port" \
  --api-addr "127.0.0.1:$api_port" >"$work/dev.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$admin_port") 2>/dev/null && break; sleep 0.1; done

step "append $(wc -l < "$example/events.ndjson") sample events"
"$sidecar" append -f "$example" --events "$example/events.ndjson"
step "append them again: the stream drops every duplicate"
"$sidecar" append -f "$example" --events "$example/events.ndjson" | tail -n 2

last=$(wc -l < "$example/events.ndjson")
for _ in $(seq 1 100); do
  ready=$(python3 -c "import urllib.request,sys
try: print(urllib.request.urlopen('http://127.0.0.1:$admin_port/readyz', timeout=2).read().decode())
except Exception as e: print(e)")
  case "$ready" in *"checkpoint $last,"*) break ;; esac
  sleep 0.2
done
step "/readyz"
printf '%s\n' "$ready"

# The command side through the event-store API: append with an expected version, lose a race, read your write.
api() { # METHOD PATH [JSON]
  python3 - "$1" "http://127.0.0.1:$api_port$2" "${3:-}" <<'PY'
import sys, urllib.request, urllib.error
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, method=method, data=body.encode() if body else None,
                             headers={"content-type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=10) as r: print(r.status, r.read().decode())
except urllib.error.HTTPError as e: print(e.code, e.read().decode())
PY
}
created='{"expectedVersion": 0, "events": [{"id": "demo-barbara-1", "type": "UserCreated", "source": "/demo",
  "data": {"userId": "u-barbara", "email": "barbara@example.com", "name": "Barbara Liskov"}}]}'
step "POST /v1/stores/users/aggregates/user/u-barbara/events  (expectedVersion 0: the user does not exist yet)"
answer=$(api POST /v1/stores/users/aggregates/user/u-barbara/events "$created")
printf '%s\n' "$answer"
version=$(printf '%s' "$answer" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read().split(" ",1)[1])["version"])')
step "the same create with another event id: 409, the user exists (currentVersion $version)"
api POST /v1/stores/users/aggregates/user/u-barbara/events "${created/demo-barbara-1/demo-barbara-2}"
step "GET /v1/projections/users-read-model/wait?sequence=$version  (read-your-writes)"
api GET "/v1/projections/users-read-model/wait?sequence=$version&timeout=5s"
step "GET /v1/stores/users/aggregates/user/u-barbara/events"
api GET /v1/stores/users/aggregates/user/u-barbara/events

db="sqlite://$work/data/user-management_users-read-model.db"
step "users"
"$sidecar" query --database "$db" "SELECT id, email, name, version FROM users ORDER BY id"
step "user_roles"
"$sidecar" query --database "$db" "SELECT user_id, role, assigned_at FROM user_roles ORDER BY user_id, role"
step "stream and lag"
"$sidecar" status -f "$example"
step "metrics (excerpt)"
python3 -c "import urllib.request
for line in urllib.request.urlopen('http://127.0.0.1:$admin_port/metrics').read().decode().splitlines():
    if line.startswith(('projectionist_sidecar_events_applied_total', 'projectionist_sidecar_checkpoint_sequence', 'projectionist_sidecar_dead_letters_total')): print(line)"
