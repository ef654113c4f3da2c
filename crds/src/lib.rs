//! Projectionist's API and the pure logic around it.
//!
//! - [`event_store`]: the `EventStore` custom resource — a JetStream stream that behaves like an append-only ledger.
//! - [`projection`]: the `Projection` custom resource — a durable consumer plus SQL handlers for one read model.
//! - [`reactor`]: the `Reactor` custom resource — events delivered to the service's own HTTP endpoint, in order per
//!   aggregate, with a parking lot; [`reactor_config`] is its resolved file in the sidecar.
//! - [`common`]: types both resources share: Secret references, NATS connection settings, conditions.
//! - [`duration`]: the Go/Kubernetes duration strings (`30s`, `1m30s`) used throughout the API.
//! - [`stream`]: EventStore → JetStream stream config, with the event-store guardrails as defaults.
//! - [`consumer`]: Projection → durable pull consumer config.
//! - [`diff`]: desired vs actual stream/consumer config, split into in-place and immutable changes.
//! - [`sidecar_config`]: the resolved, versioned config file the sidecar runs from (`resolve`).
//! - [`secret_sources`]: Secret keys as the environment variables and mounted files the sidecar reads them from.
//! - [`store_config`]: the config file of the sidecar's event-store API for one EventStore (`resolve_store`).
//! - [`template`]: the SQL handler template parser (named parameters → driver placeholders).
//! - [`partition`]: the subject layout and hash of partitioned stores, and fair shares of partitions.
//! - [`subject`]: NATS subject syntax and subset checks.
//! - [`crd`]: the generated CustomResourceDefinitions as YAML, as `crdgen` writes them.
//!
//! Everything here is pure: no I/O, no clients. The operator and the sidecar both build on it.

pub mod common;
pub mod consumer;
pub mod crd;
pub mod diff;
pub mod duration;
pub mod event_store;
pub mod projection;
pub mod reactor;
pub mod reactor_config;
pub mod secret_sources;
pub mod sidecar_config;
pub mod store_config;
pub mod stream;
pub mod subject;
pub mod template;

pub use event_store::{EventStore, EventStoreSpec, EventStoreStatus};
pub use projection::{Projection, ProjectionSpec, ProjectionStatus};
pub use reactor::{Reactor, ReactorSpec, ReactorStatus};
pub use sidecar_config::SidecarConfig;

/// The API group of both custom resources.
pub const GROUP: &str = "projectionist.dev";
/// The API version of both custom resources.
pub const VERSION: &str = "v1alpha1";

pub mod manifest;
pub mod partition;
