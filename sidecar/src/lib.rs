//! Projectionist's sidecar: applies a Projection's events to the service's own database, exactly once.
//!
//! - [`runtime`]: runs every configured projection concurrently and independently, the admin HTTP server, and
//!   graceful shutdown.
//! - [`engine`]: one projection as stages — source (the durable consumer, replay, acknowledgements) → plan → apply
//!   (one transaction with the checkpoint) → policy (retry, dead letter, skip, halt) → report (metrics, readiness).
//! - [`reactor`]: one reactor — events delivered to the service's own HTTP endpoint in order per aggregate, with
//!   retries and a parking lot in NATS.
//! - [`allocator`]: mimalloc's run-time settings (how soon freed memory goes back to the OS).
//! - [`event`]: CloudEvents decoding from JetStream messages.
//! - [`handler`]: parsed SQL handlers and the values they bind from an event.
//! - [`database`]: the pool, the sidecar's own tables, error classification.
//! - [`pipeline`]: the Postgres fast path (a batch's statements pipelined in one transaction).
//! - [`checkpoint`]: the checkpoint row and its compare-and-set.
//! - [`dead_letter`]: the dead-letter table.
//! - [`status`]: liveness, readiness and Prometheus metrics.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`api`]: the event-store API for the pod's own containers (append, read an aggregate, wait for a projection).
//! - [`store`]: the event store on JetStream — appends with expected versions (atomic batches); `store::read`: aggregate reads.
//! - [`secrets`]: reading credentials from the env vars and files the config names.
//! - [`provision`] and [`append`]: the local developer tooling (stream/consumer provisioning, appending NDJSON events).
//! - [`dev`]: the local developer loop.

pub mod admin;
pub mod allocator;
pub mod api;
pub mod append;
pub mod checkpoint;
pub mod database;
pub mod dead_letter;
pub mod dev;
pub mod engine;
pub mod event;
pub mod handler;
pub mod merge;
pub mod pipeline;
pub mod provision;
pub mod reactor;
pub mod runtime;
pub mod secrets;
pub mod status;
pub mod store;
