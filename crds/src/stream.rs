//! EventStore → JetStream stream configuration, with the event-store guardrails as defaults.

use async_nats::jetstream::stream::{self, Config, DiscardPolicy, RetentionPolicy, StorageType};

use crate::duration;
use crate::event_store::{Compression, Discard, EventStore, Storage};
use crate::subject;

/// A spec that cannot be turned into a stream config. Each variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamSpecError {
    /// A duration field does not parse.
    #[error("spec.stream.{field}: {source}")]
    Duration {
        /// The field's name.
        field: &'static str,
        /// The parse error.
        #[source]
        source: duration::DurationError,
    },
    /// A subject is malformed.
    #[error("spec.stream.subjects: {0}")]
    Subject(#[source] subject::SubjectError),
    /// The duplicate window is longer than the maximum age, which the server refuses.
    #[error("spec.stream.duplicateWindow: {window:?} is longer than maxAge {max_age:?}")]
    DuplicateWindow {
        /// The window as written.
        window: String,
        /// The age as written.
        max_age: String,
    },
    /// A partitioned store whose subjects do not give the layout.
    #[error("spec.stream.partitions: {0}")]
    Partitions(String),
    /// A loosened guardrail without the opt-in that permits it (normally caught by the CRD's CEL rules).
    #[error("spec.stream.{field}: {message}")]
    Guardrail {
        /// The field that loosens a guardrail.
        field: &'static str,
        /// Which opt-in is missing.
        message: &'static str,
    },
}

/// The JetStream stream config for an EventStore.
///
/// Guardrails: limits retention, `discard: new` (with `discard_new_per_subject` when a per-subject limit is set, so
/// an aggregate's oldest events are never dropped), `deny_delete` and `deny_purge`, no rollups, no age or count
/// limits unless the spec sets them. Loosening any of these needs its `guardrails` opt-in; without one this returns
/// an error instead of a config.
pub fn stream_config(store: &EventStore) -> Result<Config, StreamSpecError> {
    let spec = &store.spec.stream;
    let guardrails = spec.guardrails.clone().unwrap_or_default();

    let mut subjects = store.subjects();
    for s in &subjects {
        subject::validate(s).map_err(StreamSpecError::Subject)?;
    }
    let mut subject_transform = None;
    if let Some(partitions) = spec.partitions {
        if !(1..=crate::partition::MAX_PARTITIONS).contains(&partitions) {
            return Err(StreamSpecError::Partitions(format!(
                "{partitions} is outside 1–{}",
                crate::partition::MAX_PARTITIONS
            )));
        }
        let layout = store.layout().ok_or_else(|| {
            StreamSpecError::Partitions(format!(
                "a partitioned store needs a single subject of the form `<prefix>.>`, got {subjects:?}"
            ))
        })?;
        subjects = vec![layout.captured()];
        subject_transform = Some(stream::SubjectTransform {
            source: layout.captured(),
            destination: layout.destination(),
        });
    }
    if spec.storage == Storage::Memory && !guardrails.allow_memory_storage {
        return Err(StreamSpecError::Guardrail {
            field: "storage",
            message: "Memory storage needs guardrails.allowMemoryStorage",
        });
    }
    if spec.discard == Discard::Old && !guardrails.allow_discard_old {
        return Err(StreamSpecError::Guardrail {
            field: "discard",
            message: "discard: Old needs guardrails.allowDiscardOld",
        });
    }
    if spec.max_age.is_some() && !guardrails.allow_expiry {
        return Err(StreamSpecError::Guardrail {
            field: "maxAge",
            message: "maxAge needs guardrails.allowExpiry",
        });
    }
    let max_age = match &spec.max_age {
        Some(s) => duration::parse(s).map_err(|source| StreamSpecError::Duration {
            field: "maxAge",
            source,
        })?,
        None => std::time::Duration::ZERO,
    };
    let duplicate_window =
        duration::parse(&spec.duplicate_window).map_err(|source| StreamSpecError::Duration {
            field: "duplicateWindow",
            source,
        })?;

    if !max_age.is_zero() && duplicate_window > max_age {
        return Err(StreamSpecError::DuplicateWindow {
            window: spec.duplicate_window.clone(),
            max_age: spec.max_age.clone().unwrap_or_default(),
        });
    }

    let discard = match spec.discard {
        Discard::New => DiscardPolicy::New,
        Discard::Old => DiscardPolicy::Old,
    };
    Ok(Config {
        name: store.stream_name(),
        description: spec.description.clone(),
        subjects,
        retention: RetentionPolicy::Limits,
        storage: match spec.storage {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        },
        num_replicas: usize::from(spec.replicas),
        discard,
        discard_new_per_subject: discard == DiscardPolicy::New
            && spec.max_msgs_per_subject.is_some(),
        max_age,
        max_bytes: spec.max_bytes.unwrap_or(-1),
        max_messages: spec.max_msgs.unwrap_or(-1),
        max_messages_per_subject: spec.max_msgs_per_subject.unwrap_or(-1),
        max_message_size: spec.max_msg_size.unwrap_or(-1),
        max_consumers: -1,
        duplicate_window,
        compression: Some(match spec.compression {
            Compression::None => stream::Compression::None,
            Compression::S2 => stream::Compression::S2,
        }),
        placement: spec.placement.as_ref().map(|p| stream::Placement {
            cluster: p.cluster.clone(),
            tags: p.tags.clone(),
        }),
        metadata: spec
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        deny_delete: !guardrails.allow_message_delete,
        deny_purge: !guardrails.allow_purge,
        allow_rollup: false,
        allow_direct: true,
        // Several events of one append request are stored all or none (the sidecar's event-store API).
        allow_atomic_publish: true,
        subject_transform,
        ..Config::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::NatsConnection;
    use crate::event_store::{EventStoreSpec, Guardrails, StreamSpec};

    fn store(stream: StreamSpec) -> EventStore {
        let mut s = EventStore::new(
            "users",
            EventStoreSpec {
                nats: NatsConnection {
                    servers: vec!["nats://127.0.0.1:4222".into()],
                    auth: None,
                    tls: None,
                },
                stream,
                deletion_policy: Default::default(),
            },
        );
        s.metadata.namespace = Some("shop".into());
        s
    }

    #[test]
    fn a_partitioned_store_captures_the_aggregate_form_and_stores_the_partition() {
        let config = stream_config(&store(StreamSpec {
            partitions: Some(50),
            ..StreamSpec::default()
        }))
        .expect("config");
        assert_eq!(config.subjects, vec!["shop.users.*.*".to_string()]);
        let transform = config.subject_transform.expect("transform");
        assert_eq!(transform.source, "shop.users.*.*");
        assert_eq!(
            transform.destination,
            "shop.users.{{partition(50,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}"
        );
        for subjects in [
            vec!["a.>".to_string(), "b.>".to_string()],
            vec!["a.*".to_string()],
        ] {
            let err = stream_config(&store(StreamSpec {
                partitions: Some(4),
                subjects,
                ..StreamSpec::default()
            }))
            .expect_err("refused");
            assert!(matches!(err, StreamSpecError::Partitions(_)), "{err}");
        }
        let err = stream_config(&store(StreamSpec {
            partitions: Some(0),
            ..StreamSpec::default()
        }))
        .expect_err("refused");
        assert!(err.to_string().contains("outside"), "{err}");
    }

    #[test]
    fn defaults_make_an_append_only_ledger() {
        let config = stream_config(&store(StreamSpec::default())).expect("config");
        assert_eq!(config.name, "shop_users");
        assert_eq!(config.subjects, vec!["shop.users.>".to_string()]);
        assert_eq!(config.storage, StorageType::File);
        assert_eq!(config.retention, RetentionPolicy::Limits);
        assert_eq!(config.discard, DiscardPolicy::New);
        assert!(config.deny_delete && config.deny_purge && !config.allow_rollup);
        assert_eq!(config.max_age, std::time::Duration::ZERO);
        assert_eq!(
            (
                config.max_bytes,
                config.max_messages,
                config.max_messages_per_subject
            ),
            (-1, -1, -1)
        );
        assert_eq!(config.duplicate_window, std::time::Duration::from_secs(120));
        assert_eq!(config.num_replicas, 1);
    }

    #[test]
    fn per_subject_limit_rejects_instead_of_dropping() {
        let config = stream_config(&store(StreamSpec {
            max_msgs_per_subject: Some(1000),
            ..StreamSpec::default()
        }))
        .expect("config");
        assert!(config.discard_new_per_subject);
        assert_eq!(config.max_messages_per_subject, 1000);
    }

    #[test]
    fn loosening_a_guardrail_needs_its_opt_in() {
        let expiring = StreamSpec {
            max_age: Some("720h".into()),
            ..StreamSpec::default()
        };
        let err = stream_config(&store(expiring.clone())).expect_err("refused");
        assert!(err.to_string().contains("maxAge"), "{err}");

        let allowed = StreamSpec {
            guardrails: Some(Guardrails {
                allow_expiry: true,
                allow_purge: true,
                ..Guardrails::default()
            }),
            ..expiring
        };
        let config = stream_config(&store(allowed)).expect("config");
        assert_eq!(config.max_age, std::time::Duration::from_secs(720 * 3600));
        assert!(!config.deny_purge && config.deny_delete);

        let too_short = StreamSpec {
            max_age: Some("1m".into()),
            guardrails: Some(Guardrails {
                allow_expiry: true,
                ..Guardrails::default()
            }),
            ..StreamSpec::default()
        };
        let err = stream_config(&store(too_short)).expect_err("window longer than age");
        assert!(err.to_string().contains("duplicateWindow"), "{err}");

        let memory = StreamSpec {
            storage: Storage::Memory,
            ..StreamSpec::default()
        };
        assert!(stream_config(&store(memory)).is_err());
        let old = StreamSpec {
            discard: Discard::Old,
            ..StreamSpec::default()
        };
        assert!(stream_config(&store(old)).is_err());
    }

    #[test]
    fn bad_duration_names_the_field() {
        let err = stream_config(&store(StreamSpec {
            duplicate_window: "two minutes".into(),
            ..StreamSpec::default()
        }))
        .expect_err("refused");
        assert!(
            err.to_string().starts_with("spec.stream.duplicateWindow"),
            "{err}"
        );
    }
}
