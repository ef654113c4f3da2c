//! Provisioning on NATS from manifests: the stream of each EventStore, the durable consumer of each Projection (none
//! on a partitioned store), and
//! the durable consumer and parking-lot stream of each Reactor,
//! created or updated in place with the same mappings the operator uses. An immutable difference is refused with the
//! fields named, never sent to fail on the server.

use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, stream};
use projectionist_crds::diff::{diff_consumer, diff_stream};
use projectionist_crds::manifest::Manifests;
use projectionist_crds::{consumer, reactor as reactor_mapping, stream as stream_mapping};

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A resource's spec cannot be mapped.
    #[error("{kind} {name}: {message}")]
    Spec {
        /// `EventStore` or `Projection`.
        kind: &'static str,
        /// The resource's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The manifests are incomplete (a Projection without its EventStore).
    #[error(transparent)]
    Manifest(#[from] projectionist_crds::manifest::ManifestError),
    /// The server has a config that cannot be changed into the desired one.
    #[error(
        "{kind} {name}: cannot change {changes} on the server; delete it or restore the old spec"
    )]
    Immutable {
        /// `stream` or `consumer`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The differences.
        changes: String,
    },
    /// A JetStream API call failed.
    #[error("{action}: {source}")]
    Nats {
        /// What was attempted.
        action: String,
        /// The client error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn nats_err<E: std::error::Error + Send + Sync + 'static>(
    action: String,
) -> impl FnOnce(E) -> ProvisionError {
    move |e| ProvisionError::Nats {
        action,
        source: Box::new(e),
    }
}

/// What was done to one stream or consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It did not exist and was created.
    Created,
    /// It differed and was updated in place; the differences.
    Updated(String),
    /// It already matched.
    InSync,
}

/// Creates or updates every EventStore's stream, every Projection's consumer and every Reactor's consumer and
/// parking lot in `manifests`.
pub async fn provision(
    js: &jetstream::Context,
    manifests: &Manifests,
) -> Result<Vec<(String, Outcome)>, ProvisionError> {
    let mut report = Vec::new();
    for store in &manifests.event_stores {
        let name = store.metadata.name.clone().unwrap_or_default();
        let desired = stream_mapping::stream_config(store).map_err(|e| ProvisionError::Spec {
            kind: "EventStore",
            name: name.clone(),
            message: e.to_string(),
        })?;
        let outcome = ensure_stream(js, &desired).await?;
        report.push((format!("stream {}", desired.name), outcome));
    }
    for projection in &manifests.projections {
        let store = manifests.store_of(projection)?;
        let desired =
            consumer::consumer_config(projection, store).map_err(|e| ProvisionError::Spec {
                kind: "Projection",
                name: projection.metadata.name.clone().unwrap_or_default(),
                message: e.to_string(),
            })?;
        if store.spec.stream.partitions.is_some() {
            // Each partition is read from the stream by its owner: no durable consumer.
            continue;
        }
        let outcome = ensure_consumer(js, &store.stream_name(), desired).await?;
        report.push((format!("consumer {}", projection.consumer_name()), outcome));
    }
    for reactor in &manifests.reactors {
        let store = manifests.store_of_reactor(reactor)?;
        let name = reactor.metadata.name.clone().unwrap_or_default();
        let spec_err = |message: String| ProvisionError::Spec {
            kind: "Reactor",
            name: name.clone(),
            message,
        };
        projectionist_crds::reactor_config::resolve_reactor(store, reactor)
            .map_err(|e| spec_err(e.to_string()))?;
        let parking = reactor_mapping::parking_stream_config(reactor, store);
        let outcome = ensure_stream(js, &parking).await?;
        report.push((format!("stream {}", parking.name), outcome));
        for desired in reactor_mapping::consumer_configs(reactor, store)
            .map_err(|e| spec_err(e.to_string()))?
        {
            let name = desired.durable_name.clone().unwrap_or_default();
            let outcome = ensure_consumer(js, &store.stream_name(), desired).await?;
            report.push((format!("consumer {name}"), outcome));
        }
    }
    Ok(report)
}

/// Creates the stream, or updates it in place when it differs.
async fn ensure_stream(
    js: &jetstream::Context,
    desired: &stream::Config,
) -> Result<Outcome, ProvisionError> {
    match js.get_stream(&desired.name).await {
        Ok(mut existing) => {
            let actual = existing
                .info()
                .await
                .map_err(nats_err(format!("reading stream {}", desired.name)))?
                .config
                .clone();
            apply_stream(js, desired, &actual).await
        }
        Err(e)
            if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            js.create_stream(desired.clone())
                .await
                .map_err(nats_err(format!("creating stream {}", desired.name)))?;
            Ok(Outcome::Created)
        }
        Err(e) => Err(nats_err(format!("looking up stream {}", desired.name))(e)),
    }
}

/// Creates the durable consumer on `stream_name`, or updates it in place when it differs.
async fn ensure_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    desired: jetstream::consumer::pull::Config,
) -> Result<Outcome, ProvisionError> {
    let consumer_name = desired.durable_name.clone().unwrap_or_default();
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(nats_err(format!("looking up stream {stream_name}")))?;
    match stream.consumer_info(&consumer_name).await {
        Ok(info) => {
            let diff = diff_consumer(&desired, &info.config);
            if diff.is_empty() {
                Ok(Outcome::InSync)
            } else if diff.has_immutable() {
                Err(ProvisionError::Immutable {
                    kind: "consumer",
                    name: consumer_name,
                    changes: diff.describe(),
                })
            } else {
                stream
                    .update_consumer(desired)
                    .await
                    .map_err(nats_err(format!("updating consumer {consumer_name}")))?;
                Ok(Outcome::Updated(diff.describe()))
            }
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            stream
                .create_consumer(desired)
                .await
                .map_err(nats_err(format!("creating consumer {consumer_name}")))?;
            Ok(Outcome::Created)
        }
        Err(e) => Err(nats_err(format!("reading consumer {consumer_name}"))(e)),
    }
}

async fn apply_stream(
    js: &jetstream::Context,
    desired: &stream::Config,
    actual: &stream::Config,
) -> Result<Outcome, ProvisionError> {
    let diff = diff_stream(desired, actual);
    if diff.is_empty() {
        return Ok(Outcome::InSync);
    }
    if diff.has_immutable() {
        return Err(ProvisionError::Immutable {
            kind: "stream",
            name: desired.name.clone(),
            changes: diff.describe(),
        });
    }
    js.update_stream(desired.clone())
        .await
        .map_err(nats_err(format!("updating stream {}", desired.name)))?;
    Ok(Outcome::Updated(diff.describe()))
}
