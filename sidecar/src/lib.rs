//! Projectionist's sidecar.
//!
//! - [`provision`]: creates or updates a store's stream and a projection's consumer on NATS from the same
//!   EventStore/Projection YAML a user applies (the local developer loop; in a cluster the operator does this).
//! - [`append`]: appends CloudEvents from NDJSON with `Nats-Msg-Id` de-duplication.

pub mod append;
pub mod provision;
