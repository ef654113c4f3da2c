//! Test support for Projectionist: real servers, started per test, stopped on drop.
//!
//! - [`nats`]: a real `nats-server` with JetStream on a free loopback port and its own store dir; it can be stopped
//!   and started again on the same port and store to simulate an outage.
//! - [`nats_cluster`]: a three-node nats-server cluster on loopback whose nodes can be killed and started again.
//! - [`postgres`]: a throwaway PostgreSQL cluster (`initdb`), handing out a fresh database per call.
//! - [`mariadb`]: a throwaway MariaDB server, handing out a fresh database per call.
//! - [`sqlite`]: SQLite files in a temporary directory.
//! - [`http`]: a small real HTTP/1.1 client for the sidecar's servers.
//! - [`helm`]: the chart rendered, linted and its values checked by Helm's own engine.
//! - [`control_plane`]: a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager built from Go
//!   modules by `scripts/kube-tools.sh`) on loopback, with admin and ServiceAccount kubeconfigs and the real `kubectl`.
//! - [`process`]: the spawned-process handle the servers share (kill by PID on drop, a watchdog that stops the
//!   server if the test process dies first).
//! - [`tools`]: where the server binaries are found (`scripts/setup.sh` installs them).
//! - [`release`]: the chart installed with the real `helm` and the operator run as its Deployment would run it.
//! - [`repo`]: paths inside the repository (examples, CRDs).

pub mod control_plane;
pub mod helm;
pub mod http;
pub mod mariadb;
pub mod nats;
pub mod nats_cluster;
pub mod postgres;
pub mod process;
pub mod release;
pub mod repo;
pub mod sqlite;
pub mod tools;

/// Result type of the test support: errors carry the server's log tail where one exists.
pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;
