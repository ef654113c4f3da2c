//! Projection → durable pull consumer configuration.
//!
//! The consumer is how the server remembers what to deliver next; the sidecar's checkpoint in the read model's own
//! database is what decides what has been applied. The consumer is therefore configured so the server never gives up
//! on an event: `max_deliver` is unlimited and the sidecar (not the server) decides, by `spec.onError`, when an event
//! has failed for good. The retry delays of `spec.onError.backoff` are applied by the sidecar through delayed
//! negative acknowledgements, so the consumer's own `backoff` list stays empty and `ack_wait` alone governs
//! redelivery after a sidecar dies.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{
    AckPolicy, DeliverPolicy, PriorityPolicy, ReplayPolicy, pull,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::duration;
use crate::event_store::EventStore;
use crate::projection::{Projection, StartAt, StartPolicy};
use crate::subject;

/// The priority group every sidecar pulls from; the server pins one client of it at a time.
pub const PRIORITY_GROUP: &str = "projectionist";

/// Consumer metadata key naming the projection (`<namespace>/<name>`).
pub const METADATA_PROJECTION: &str = "projectionist.dev/projection";

/// Consumer metadata key the sidecar sets to the rebuild token once its rebuild has replayed every event; the
/// operator reads it to end the Projection's `Rebuilding` condition. It is the sidecar's, so the operator's diff
/// ignores it.
pub const METADATA_REBUILT_TOKEN: &str = "projectionist.dev/rebuilt-token";

/// A spec that cannot be turned into a consumer config. Each variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsumerSpecError {
    /// A duration field does not parse.
    #[error("spec.{field}: {source}")]
    Duration {
        /// The field's path under `spec`.
        field: &'static str,
        /// The parse error.
        #[source]
        source: duration::DurationError,
    },
    /// A subject filter is malformed.
    #[error("spec.events.subjects: {0}")]
    Subject(#[source] subject::SubjectError),
    /// A subject filter lies outside the EventStore's subjects, so it could never match.
    #[error(
        "spec.events.subjects: {filter:?} is not within the EventStore's subjects {stream_subjects:?}"
    )]
    FilterOutsideStream {
        /// The filter.
        filter: String,
        /// The store's subjects.
        stream_subjects: Vec<String>,
    },
    /// `startAt` is inconsistent or its time does not parse.
    #[error("spec.startAt: {0}")]
    StartAt(String),
}

/// The durable pull consumer config for a Projection reading `store`.
pub fn consumer_config(
    projection: &Projection,
    store: &EventStore,
) -> Result<pull::Config, ConsumerSpecError> {
    let spec = &projection.spec;
    let ack_wait =
        duration::parse(&spec.ack_wait).map_err(|source| ConsumerSpecError::Duration {
            field: "ackWait",
            source,
        })?;

    let filters = spec
        .events
        .as_ref()
        .map(|e| e.subjects.clone())
        .unwrap_or_default();
    let (filter_subject, filter_subjects) = server_filters(&filters, store)?;
    let deliver_policy = deliver_policy(&spec.start_at.clone().unwrap_or_default())?;

    let max_events = i64::from(spec.batch.max_events);
    let namespace = projection
        .metadata
        .namespace
        .as_deref()
        .unwrap_or("default");
    let name = projection.metadata.name.as_deref().unwrap_or("");
    Ok(pull::Config {
        durable_name: Some(projection.consumer_name()),
        description: Some(format!(
            "Projection {namespace}/{name} (managed by projectionist)"
        )),
        deliver_policy,
        // One acknowledgement per committed batch (of its last event): the checkpoint in the read model's database
        // is the truth, so acknowledging every event one by one buys nothing.
        ack_policy: AckPolicy::All,
        ack_wait,
        max_deliver: -1,
        filter_subject,
        filter_subjects,
        replay_policy: ReplayPolicy::Instant,
        max_ack_pending: max_events * 2,
        max_batch: max_events,
        max_waiting: 512,
        inactive_threshold: Duration::ZERO,
        backoff: Vec::new(),
        priority_policy: PriorityPolicy::PinnedClient,
        priority_groups: vec![PRIORITY_GROUP.to_string()],
        priority_timeout: ack_wait,
        metadata: HashMap::from([(
            METADATA_PROJECTION.to_string(),
            format!("{namespace}/{name}"),
        )]),
        ..pull::Config::default()
    })
}

/// Checks subject filters against the store and splits them the way the server takes them: one filter as
/// `filter_subject`, several as `filter_subjects`. Filters are written as publishers write subjects; on a partitioned
/// store they are turned into the stored form, across all partitions (`<prefix>.*.<rest>`).
pub fn server_filters(
    filters: &[String],
    store: &EventStore,
) -> Result<(String, Vec<String>), ConsumerSpecError> {
    let stream_subjects = store.subjects();
    for filter in filters {
        subject::validate(filter).map_err(ConsumerSpecError::Subject)?;
        if !subject::is_covered(filter, &stream_subjects) {
            return Err(ConsumerSpecError::FilterOutsideStream {
                filter: filter.clone(),
                stream_subjects,
            });
        }
    }
    let filters: Vec<String> = match store.layout() {
        Some(layout) => filters
            .iter()
            .map(|f| {
                layout
                    .stored_filter(f, None)
                    .unwrap_or_else(|| format!("{}.*.>", layout.prefix))
            })
            .collect(),
        None => filters.to_vec(),
    };
    Ok(match filters.as_slice() {
        [one] => (one.clone(), Vec::new()),
        _ => (String::new(), filters),
    })
}

/// The deliver policy of a start position.
pub fn deliver_policy(start: &StartAt) -> Result<DeliverPolicy, ConsumerSpecError> {
    Ok(match start.policy {
        StartPolicy::Beginning => DeliverPolicy::All,
        StartPolicy::New => DeliverPolicy::New,
        StartPolicy::Sequence => DeliverPolicy::ByStartSequence {
            start_sequence: start.sequence.ok_or_else(|| {
                ConsumerSpecError::StartAt("policy Sequence needs sequence".into())
            })?,
        },
        StartPolicy::Time => {
            let text = start
                .time
                .as_deref()
                .ok_or_else(|| ConsumerSpecError::StartAt("policy Time needs time".into()))?;
            let start_time = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
                ConsumerSpecError::StartAt(format!("time {text:?} is not RFC 3339: {e}"))
            })?;
            DeliverPolicy::ByStartTime { start_time }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::{NatsConnection, SecretKeyRef};
    use crate::event_store::EventStoreSpec;
    use crate::projection::{Database, Driver, EventSelection, Handler, ProjectionSpec};

    pub(crate) fn store() -> EventStore {
        let mut s = EventStore::new(
            "users",
            EventStoreSpec {
                nats: NatsConnection {
                    servers: vec!["nats://127.0.0.1:4222".into()],
                    auth: None,
                    tls: None,
                },
                stream: Default::default(),
                deletion_policy: Default::default(),
            },
        );
        s.metadata.namespace = Some("shop".into());
        s
    }

    pub(crate) fn projection() -> Projection {
        let mut p = Projection::new(
            "users-read-model",
            ProjectionSpec {
                event_store: "users".into(),
                events: None,
                start_at: None,
                database: Database {
                    driver: Driver::Postgres,
                    url_secret: SecretKeyRef {
                        name: "users-db".into(),
                        key: "url".into(),
                    },
                    max_connections: 4,
                },
                schema: vec!["CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY)".into()],
                handlers: vec![Handler {
                    event: "UserCreated".into(),
                    sql: vec!["INSERT INTO users (id) VALUES (:data.id)".into()],
                }],
                batch: Default::default(),
                ack_wait: "30s".into(),
                on_error: Default::default(),
                rebuild: None,
                pod_selector: None,
                workers: None,
            },
        );
        p.metadata.namespace = Some("shop".into());
        p
    }

    #[test]
    fn defaults_make_a_durable_explicit_ack_pinned_consumer() {
        let c = consumer_config(&projection(), &store()).expect("config");
        assert_eq!(c.durable_name.as_deref(), Some("shop_users-read-model"));
        assert_eq!(c.ack_policy, AckPolicy::All);
        assert_eq!(c.deliver_policy, DeliverPolicy::All);
        assert_eq!(c.ack_wait, Duration::from_secs(30));
        assert_eq!(c.max_deliver, -1);
        assert_eq!(c.max_ack_pending, 1000);
        assert_eq!(c.max_batch, 500);
        assert_eq!(c.priority_policy, PriorityPolicy::PinnedClient);
        assert_eq!(c.priority_groups, vec![PRIORITY_GROUP.to_string()]);
        assert!(c.filter_subject.is_empty() && c.filter_subjects.is_empty());
        assert!(c.backoff.is_empty());
    }

    #[test]
    fn filters_come_from_declared_subjects() {
        let mut p = projection();
        p.spec.events = Some(EventSelection {
            subjects: vec!["shop.users.user.>".into()],
        });
        let c = consumer_config(&p, &store()).expect("config");
        assert_eq!(c.filter_subject, "shop.users.user.>");

        p.spec.events = Some(EventSelection {
            subjects: vec!["shop.users.user.>".into(), "shop.users.role.>".into()],
        });
        let c = consumer_config(&p, &store()).expect("config");
        assert_eq!(c.filter_subjects.len(), 2);
    }

    #[test]
    fn filter_outside_the_store_is_refused() {
        let mut p = projection();
        p.spec.events = Some(EventSelection {
            subjects: vec!["shop.orders.>".into()],
        });
        let err = consumer_config(&p, &store()).expect_err("refused");
        assert!(err.to_string().contains("shop.orders.>"), "{err}");
    }

    #[test]
    fn start_positions_map_to_deliver_policies() {
        let mut p = projection();
        p.spec.start_at = Some(StartAt {
            policy: StartPolicy::Sequence,
            sequence: Some(42),
            time: None,
        });
        let c = consumer_config(&p, &store()).expect("config");
        assert_eq!(
            c.deliver_policy,
            DeliverPolicy::ByStartSequence { start_sequence: 42 }
        );

        p.spec.start_at = Some(StartAt {
            policy: StartPolicy::Time,
            sequence: None,
            time: Some("2026-01-02T03:04:05Z".into()),
        });
        let c = consumer_config(&p, &store()).expect("config");
        assert!(matches!(
            c.deliver_policy,
            DeliverPolicy::ByStartTime { .. }
        ));

        p.spec.start_at = Some(StartAt {
            policy: StartPolicy::Time,
            sequence: None,
            time: Some("yesterday".into()),
        });
        assert!(consumer_config(&p, &store()).is_err());
    }
}
