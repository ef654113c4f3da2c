//! `projectionist-operator`: reconciles EventStores into JetStream streams and Projections into durable consumers
//! plus the sidecar's config.
//!
//! - [`event_store`] and [`projection`]: the two controllers.
//! - [`runtime`]: the process — admin endpoints, leader election on a Lease ([`leader`]), the controllers while
//!   leading, graceful shutdown.
//! - [`webhook`] and [`certs`]: the sidecar injection webhook every replica serves, and its certificate.
//! - [`nats`]: NATS connections per distinct servers and credentials, and the counted JetStream calls.

pub mod admin;
pub mod certs;
pub mod conditions;
pub mod context;
pub mod error;
pub mod event_store;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod nats;
pub mod projection;
pub mod reactor;
pub mod runtime;
pub mod webhook;
pub mod writes;
