#!/usr/bin/env bash
# A local cluster to try Projectionist on: the control plane (etcd, kube-apiserver, kube-controller-manager built from
# Go modules), a nats-server and PostgreSQL on loopback, the chart installed with helm, the operator running as a
# process with the chart's ServiceAccount, the user-management example applied. Prints the kubectl commands to try;
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --quiet --locked -p projectionist-operator -p projectionist-tests --bin projectionist-local-cluster
exec ./target/debug/projectionist-local-cluster
