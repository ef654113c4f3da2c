//! The config file of one reactor in the sidecar (`kind: ReactorConfig`): resolved from an EventStore and a Reactor
//! by the operator (or by the sidecar's `dev` mode) and mounted into the pod next to the projections' files. Like
//! [`crate::SidecarConfig`] it never holds a secret.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::consumer::{ConsumerSpecError, PRIORITY_GROUP};
use crate::duration;
use crate::event_store::EventStore;
use crate::reactor::{self, Reactor, ReactorErrorPolicy};
use crate::sidecar_config::{
    API_VERSION, NatsConfig, ObjectRef, SecretMount, duration_text, nats_config, parse_file,
    render_file,
};

/// `kind` of the file.
pub const KIND: &str = "ReactorConfig";

/// One reactor's resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReactorConfig {
    /// Always `projectionist.dev/v1alpha1`.
    pub api_version: String,
    /// Always `ReactorConfig`.
    pub kind: String,
    /// Which Reactor this is.
    pub reactor: ObjectRef,
    /// Which EventStore it reads.
    pub event_store: ObjectRef,
    /// How to reach NATS.
    pub nats: NatsConfig,
    /// The stream name.
    pub stream: String,
    /// The EventStore's subjects (emitted events are appended under the first one's prefix).
    pub store_subjects: Vec<String>,
    /// The store's partitions, when it is partitioned (events are stored as `<prefix>.<partition>.<type>.<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_partitions: Option<u32>,
    /// The durable consumer name (on a partitioned store, each partition's consumer is `<consumer>_p<partition>`).
    pub consumer: String,
    /// The priority group to pull from (one pinned client at a time).
    pub priority_group: String,
    /// Event types delivered; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// The endpoint's URL.
    pub url: String,
    /// How long one call may take.
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// How long the server waits for an acknowledgement before redelivering.
    #[serde(with = "duration_text")]
    pub ack_wait: Duration,
    /// Aggregates in flight at once.
    pub concurrency: u32,
    /// First retry delay.
    #[serde(with = "duration_text")]
    pub retry_initial: Duration,
    /// Largest retry delay.
    #[serde(with = "duration_text")]
    pub retry_max: Duration,
    /// Transient failures before the policy applies; 0: never.
    pub max_attempts: u32,
    /// What happens to an event that fails for good.
    pub on_error: ReactorErrorPolicy,
    /// Subject dead letters and skipped events are published to.
    pub dead_letter_subject: String,
    /// The parking lot's stream.
    pub parking_stream: String,
    /// The parking lot's subject prefix.
    pub parking_prefix: String,
}

/// The result of [`resolve_reactor`].
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedReactor {
    /// The config file's content.
    pub config: ReactorConfig,
    /// Every Secret key the config refers to.
    pub secrets: BTreeSet<SecretMount>,
}

/// Why a Reactor cannot be resolved against its EventStore.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReactorResolveError {
    /// The Reactor names another EventStore or lives in another namespace.
    #[error("spec.eventStore: the reactor reads {wanted:?} but was resolved against {given:?}")]
    WrongStore {
        /// What the reactor names.
        wanted: String,
        /// What was passed.
        given: String,
    },
    /// A duration field does not parse.
    #[error("spec.{field}: {source}")]
    Duration {
        /// The field's path under `spec`.
        field: &'static str,
        /// The parse error.
        #[source]
        source: duration::DurationError,
    },
    /// The consumer part of the spec is invalid.
    #[error(transparent)]
    Consumer(#[from] ConsumerSpecError),
    /// Something else in the spec cannot work.
    #[error("spec.{field}: {message}")]
    Invalid {
        /// The field's path under `spec`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn parse_duration(field: &'static str, text: &str) -> Result<Duration, ReactorResolveError> {
    duration::parse(text).map_err(|source| ReactorResolveError::Duration { field, source })
}

/// Resolves a Reactor against its EventStore, validating everything the sidecar relies on.
pub fn resolve_reactor(
    store: &EventStore,
    reactor: &Reactor,
) -> Result<ResolvedReactor, ReactorResolveError> {
    let store_name = store.metadata.name.clone().unwrap_or_default();
    let namespace = reactor
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    if reactor.spec.event_store != store_name
        || store.metadata.namespace.as_deref().unwrap_or("default") != namespace
    {
        return Err(ReactorResolveError::WrongStore {
            wanted: reactor.spec.event_store.clone(),
            given: store_name,
        });
    }
    reactor::consumer_configs(reactor, store)?;
    let spec = &reactor.spec;
    let url = &spec.endpoint.url;
    let rest = url.strip_prefix("http://").unwrap_or_default();
    if rest.is_empty() || rest.starts_with('/') || url.chars().any(char::is_whitespace) {
        return Err(ReactorResolveError::Invalid {
            field: "endpoint.url",
            message: format!("{url:?} is not an http:// URL with a host"),
        });
    }
    let timeout = parse_duration("endpoint.timeout", &spec.endpoint.timeout)?;
    if timeout.is_zero() {
        return Err(ReactorResolveError::Invalid {
            field: "endpoint.timeout",
            message: "must be longer than 0s".into(),
        });
    }
    let retry_initial = parse_duration("delivery.retry.initial", &spec.delivery.retry.initial)?;
    let retry_max = parse_duration("delivery.retry.max", &spec.delivery.retry.max)?;
    if retry_initial > retry_max {
        return Err(ReactorResolveError::Invalid {
            field: "delivery.retry",
            message: format!(
                "initial {:?} is larger than max {:?}",
                spec.delivery.retry.initial, spec.delivery.retry.max
            ),
        });
    }
    if spec.delivery.concurrency == 0 {
        return Err(ReactorResolveError::Invalid {
            field: "delivery.concurrency",
            message: "must be at least 1".into(),
        });
    }
    let mut secrets = BTreeSet::new();
    let config = ReactorConfig {
        api_version: API_VERSION.to_string(),
        kind: KIND.to_string(),
        reactor: ObjectRef {
            namespace: namespace.clone(),
            name: reactor.metadata.name.clone().unwrap_or_default(),
        },
        event_store: ObjectRef {
            namespace,
            name: store_name,
        },
        nats: nats_config(&store.spec.nats, &mut secrets),
        stream: store.stream_name(),
        store_subjects: store.subjects(),
        store_partitions: store.spec.stream.partitions,
        consumer: reactor.consumer_name(),
        priority_group: PRIORITY_GROUP.to_string(),
        types: spec
            .events
            .as_ref()
            .map(|e| e.types.clone())
            .unwrap_or_default(),
        url: url.clone(),
        timeout,
        ack_wait: parse_duration("ackWait", &spec.ack_wait)?,
        concurrency: spec.delivery.concurrency,
        retry_initial,
        retry_max,
        max_attempts: spec.delivery.max_attempts,
        on_error: spec.on_error.policy,
        dead_letter_subject: reactor.dead_letter_subject(),
        parking_stream: reactor.parking_stream(),
        parking_prefix: reactor.parking_prefix(),
    };
    Ok(ResolvedReactor { config, secrets })
}

/// Why a ReactorConfig file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReactorConfigError {
    /// The YAML does not match the format.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The YAML error.
        #[source]
        source: serde_yaml::Error,
    },
    /// The file is of another kind or version.
    #[error(
        "{path}: expected apiVersion {API_VERSION} and kind {KIND}, found {api_version} {kind}"
    )]
    Version {
        /// The file.
        path: String,
        /// What the file says.
        api_version: String,
        /// What the file says.
        kind: String,
    },
}

impl ReactorConfig {
    /// The durable consumer of partition `p` on a partitioned store.
    pub fn partition_consumer(&self, p: u32) -> String {
        reactor::partition_consumer(&self.consumer, p)
    }

    /// The name its sidecars report their partitions under on a partitioned store.
    pub fn progress_name(&self) -> String {
        reactor::progress_name(&self.reactor.name)
    }

    /// Renders the file.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        render_file(self)
    }

    /// Parses a file's content; `path` is only used in errors.
    pub fn from_yaml(path: &str, text: &str) -> Result<Self, ReactorConfigError> {
        let config: ReactorConfig =
            parse_file(text).map_err(|source| ReactorConfigError::Parse {
                path: path.to_string(),
                source,
            })?;
        if config.api_version != API_VERSION || config.kind != KIND {
            return Err(ReactorConfigError::Version {
                path: path.to_string(),
                api_version: config.api_version,
                kind: config.kind,
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::NatsConnection;
    use crate::event_store::EventStoreSpec;
    use crate::store_config::kind_of;

    fn store() -> EventStore {
        let mut s = EventStore::new(
            "users",
            EventStoreSpec {
                nats: NatsConnection {
                    servers: vec!["nats://nats:4222".into()],
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

    fn reactor(spec: serde_json::Value) -> Reactor {
        let mut r = Reactor::new("welcome-email", serde_json::from_value(spec).expect("spec"));
        r.metadata.namespace = Some("shop".into());
        r
    }

    #[test]
    fn resolves_and_round_trips() {
        let r = reactor(serde_json::json!({
            "eventStore": "users",
            "events": {"types": ["UserCreated"]},
            "endpoint": {"url": "http://127.0.0.1:8080/events", "timeout": "2s"},
            "delivery": {"concurrency": 4, "retry": {"initial": "100ms", "max": "1s"}, "maxAttempts": 0},
            "onError": {"policy": "deadLetter"},
        }));
        let c = resolve_reactor(&store(), &r).expect("resolves").config;
        assert_eq!(c.consumer, "shop_reactor_welcome-email");
        assert_eq!(c.types, vec!["UserCreated"]);
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.max_attempts, 0);
        assert_eq!(c.on_error, ReactorErrorPolicy::DeadLetter);
        let yaml = c.to_yaml().expect("yaml");
        assert_eq!(kind_of(&yaml).as_deref(), Some(KIND));
        assert_eq!(ReactorConfig::from_yaml("f", &yaml).expect("parses"), c);
    }

    #[test]
    fn specs_that_cannot_work_name_the_field() {
        for (spec, field) in [
            (
                serde_json::json!({"eventStore": "users", "endpoint": {"url": "http:///x"}}),
                "spec.endpoint.url",
            ),
            (
                serde_json::json!({"eventStore": "users", "endpoint": {"url": "http://a", "timeout": "0s"}}),
                "spec.endpoint.timeout",
            ),
            (
                serde_json::json!({"eventStore": "users", "endpoint": {"url": "http://a"},
                    "delivery": {"retry": {"initial": "1m", "max": "1s"}}}),
                "spec.delivery.retry",
            ),
            (
                serde_json::json!({"eventStore": "orders", "endpoint": {"url": "http://a"}}),
                "spec.eventStore",
            ),
        ] {
            let e = resolve_reactor(&store(), &reactor(spec)).expect_err("refused");
            assert!(e.to_string().starts_with(field), "{e}");
        }
    }
}
