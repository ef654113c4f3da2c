//! The `Reactor` custom resource: events of an EventStore delivered to an HTTP endpoint of the pod's own service, in
//! order per aggregate, at least once, with retries and a parking lot that never reorders an aggregate.
//!
//! This module holds the resource and its pure mappings: the durable consumer ([`consumer_config`]) and the parking
//! lot's stream ([`parking_stream_config`]), where the events of parked aggregates are held durably.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PriorityPolicy, ReplayPolicy, pull};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::Condition;
use crate::consumer::{self, ConsumerSpecError, PRIORITY_GROUP};
use crate::duration::{self, DURATION_PATTERN};
use crate::event_store::{EventStore, Storage};
use crate::projection::{StartAt, StartPolicy};

/// Consumer metadata key naming the reactor (`<namespace>/<name>`).
pub const METADATA_REACTOR: &str = "projectionist.dev/reactor";

/// A reactor: the store's events delivered to the service's own HTTP endpoint.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "projectionist.dev",
    version = "v1alpha1",
    kind = "Reactor",
    plural = "reactors",
    shortname = "react",
    category = "projectionist",
    namespaced,
    status = "ReactorStatus",
    printcolumn = r#"{"name":"Store","type":"string","jsonPath":".spec.eventStore"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","jsonPath":".status.pending"}"#,
    printcolumn = r#"{"name":"Parked","type":"integer","jsonPath":".status.parkedAggregates"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "Events of an EventStore delivered to an HTTP endpoint of the pod's own service, in order per aggregate, at least once."
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.eventStore == oldSelf.eventStore")
        .message("eventStore is immutable: create a new Reactor to read another store")
        .field_path(".eventStore"),
)]
pub struct ReactorSpec {
    /// Name of the EventStore (same namespace) whose events are delivered.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub event_store: String,
    /// Which events are delivered. Defaults to every event of the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<ReactorEvents>,
    /// The endpoint events are delivered to.
    pub endpoint: Endpoint,
    /// Where a new reactor starts. Defaults to `New`: a new reactor does not replay history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<ReactorStartAt>,
    /// How long the server waits for an acknowledgement before redelivering, e.g. `30s` (default). A call in
    /// progress is kept in progress past it; it matters when a sidecar dies.
    #[serde(default = "default_ack_wait")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub ack_wait: String,
    /// Concurrency and retries.
    #[serde(default)]
    pub delivery: Delivery,
    /// What happens to an event that cannot be delivered.
    #[serde(default)]
    pub on_error: ReactorOnError,
    /// Which pods of the namespace get this reactor's sidecar injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// Which events a reactor receives.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactorEvents {
    /// Subject filters within the store's subjects (filtered on the server). Empty: every subject of the store.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 255), regex(pattern = r"^[^\s]+$"))
    )]
    pub subjects: Vec<String>,
    /// Event types (`ce-type`) delivered; others are acknowledged without a call. Empty: every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 255)))]
    pub types: Vec<String>,
}

/// The HTTP endpoint of the pod's own service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `http://` URL, normally on the pod's loopback, e.g. `http://127.0.0.1:8080/events`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^http://[^\s]+$"))]
    pub url: String,
    /// How long one call may take before it counts as a transient failure, e.g. `10s` (default).
    #[serde(default = "default_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub timeout: String,
}

/// Where a new reactor starts.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.policy == 'Sequence' ? has(self.sequence) : !has(self.sequence)")
        .message("sequence is set exactly when policy is Sequence"),
    validation = Rule::new("self.policy == 'Time' ? has(self.time) : !has(self.time)")
        .message("time is set exactly when policy is Time"),
)]
pub struct ReactorStartAt {
    /// `New` (default: only events appended from now on), `All`, `Sequence` or `Time`.
    #[serde(default)]
    pub policy: ReactorStartPolicy,
    /// First stream sequence to deliver, with `policy: Sequence`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub sequence: Option<u64>,
    /// RFC 3339 time of the first event to deliver, with `policy: Time`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
    ))]
    pub time: Option<String>,
}

/// The reactor start policies.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum ReactorStartPolicy {
    /// Only events appended after the reactor is created (default).
    #[default]
    New,
    /// Every event in the store.
    All,
    /// From a given stream sequence.
    Sequence,
    /// From the first event at or after a given time.
    Time,
}

impl ReactorStartAt {
    /// The same position in the Projection's terms.
    fn as_start_at(&self) -> StartAt {
        StartAt {
            policy: match self.policy {
                ReactorStartPolicy::New => StartPolicy::New,
                ReactorStartPolicy::All => StartPolicy::Beginning,
                ReactorStartPolicy::Sequence => StartPolicy::Sequence,
                ReactorStartPolicy::Time => StartPolicy::Time,
            },
            sequence: self.sequence,
            time: self.time.clone(),
        }
    }
}

/// Concurrency and retries.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// Aggregates in flight at once (1 to 1024; default 16). Never more than one event per aggregate.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: u32,
    /// Delay between attempts after a transient failure, doubling from `initial` up to `max`; a `Retry-After`
    /// answer is honoured up to `max`.
    #[serde(default)]
    pub retry: Retry,
    /// Transient failures of one event before the `onError` policy applies (default 10; 0 retries forever).
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_attempts: u32,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            retry: Retry::default(),
            max_attempts: default_max_attempts(),
        }
    }
}

/// Retry delays.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// First delay, e.g. `1s` (default).
    #[serde(default = "default_retry_initial")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub initial: String,
    /// Largest delay, e.g. `5m` (default).
    #[serde(default = "default_retry_max")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max: String,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            initial: default_retry_initial(),
            max: default_retry_max(),
        }
    }
}

/// What happens to an event that fails for good.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactorOnError {
    /// `park` (default), `deadLetter` or `halt`.
    #[serde(default)]
    pub policy: ReactorErrorPolicy,
    /// Subject dead letters and skipped events are published to. Defaults to
    /// `projectionist.deadletter.<namespace>.<reactor>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[^\s*>]+$"))]
    pub dead_letter_subject: Option<String>,
}

/// The reactor error policies.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ReactorErrorPolicy {
    /// Hold the event and every later event of its aggregate in the parking lot; other aggregates go on (default).
    #[default]
    Park,
    /// Publish the event to the dead-letter subject and go on with its aggregate.
    DeadLetter,
    /// Stop the reactor and report why.
    Halt,
}

/// What the operator last saw.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactorStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `CaughtUp` and `Stalled`, each with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Name of the durable JetStream consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_name: Option<String>,
    /// Events not yet delivered to the reactor (its lag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    /// Events handed to the sidecar and not yet done (delivered, parked or dead-lettered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_pending: Option<u64>,
    /// Deliveries of events to the sidecar by the server, redeliveries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered: Option<u64>,
    /// Events the server delivered more than once (a sidecar died or was too slow to report progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivered: Option<u64>,
    /// Stream sequence below which every event is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_acked_sequence: Option<u64>,
    /// Aggregates in the parking lot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_aggregates: Option<u64>,
    /// Events held in the parking lot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_events: Option<u64>,
    /// When the oldest parked event was parked (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_parked: Option<String>,
    /// The sidecar currently pinned to the consumer, if any (on an unpartitioned store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_sidecar: Option<String>,
    /// On a partitioned store: its partitions, one consumer each (`<consumerName>_p<partition>`), shared by the
    /// live sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// On a partitioned store: the partitions each live sidecar delivers, by sidecar, as they last reported.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub spread: std::collections::BTreeMap<String, u32>,
}

fn default_ack_wait() -> String {
    "30s".to_string()
}
fn default_timeout() -> String {
    "10s".to_string()
}
fn default_concurrency() -> u32 {
    16
}
fn default_max_attempts() -> u32 {
    10
}
fn default_retry_initial() -> String {
    "1s".to_string()
}
fn default_retry_max() -> String {
    "5m".to_string()
}

impl Reactor {
    fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    fn token(&self) -> String {
        self.metadata
            .name
            .as_deref()
            .unwrap_or("")
            .replace('.', "-")
    }

    /// The name its sidecars report their partitions under on a partitioned store ([`progress_name`]).
    pub fn progress_name(&self) -> String {
        progress_name(self.metadata.name.as_deref().unwrap_or(""))
    }

    /// Name of the durable consumer: `<namespace>_reactor_<name>`. A Projection's is `<namespace>_<name>`, and
    /// neither name holds `_`, so the two never collide.
    pub fn consumer_name(&self) -> String {
        format!("{}_reactor_{}", self.namespace(), self.token())
    }

    /// The dead-letter subject: `spec.onError.deadLetterSubject` or `projectionist.deadletter.<namespace>.<name>`.
    pub fn dead_letter_subject(&self) -> String {
        self.spec
            .on_error
            .dead_letter_subject
            .clone()
            .unwrap_or_else(|| {
                format!(
                    "projectionist.deadletter.{}.{}",
                    self.namespace(),
                    self.token()
                )
            })
    }

    /// The parking lot: a stream of its own, `PARKED_<namespace>_<name>`.
    pub fn parking_stream(&self) -> String {
        format!("PARKED_{}_{}", self.namespace(), self.token())
    }

    /// The parking lot's subject prefix: `projectionist.parked.<namespace>.<name>`; an aggregate's held events
    /// live under `<prefix>.<aggregate>`.
    pub fn parking_prefix(&self) -> String {
        format!("projectionist.parked.{}.{}", self.namespace(), self.token())
    }
}

/// The durable pull consumer config for a Reactor reading `store`: explicit acknowledgements (events of different
/// aggregates finish out of order), pinned to one sidecar at a time, never given up on by the server.
pub fn consumer_config(
    reactor: &Reactor,
    store: &EventStore,
) -> Result<pull::Config, ConsumerSpecError> {
    let filters = event_subjects(reactor);
    let (filter_subject, filter_subjects) = consumer::server_filters(&filters, store)?;
    partition_consumer_config(
        reactor,
        reactor.consumer_name(),
        filter_subject,
        filter_subjects,
    )
}

/// The subjects a reactor's events are filtered to (empty: every subject of the store).
fn event_subjects(reactor: &Reactor) -> Vec<String> {
    reactor
        .spec
        .events
        .as_ref()
        .map(|e| e.subjects.clone())
        .unwrap_or_default()
}

/// The durable consumers of a reactor: one ([`consumer_config`]) on an unpartitioned store; on a partitioned store
/// one per partition (`<consumer>_p<partition>`, filtered to that partition's stored subjects), so that the
/// sidecars running the reactor can share the partitions, each pinned to one sidecar at a time.
pub fn consumer_configs(
    reactor: &Reactor,
    store: &EventStore,
) -> Result<Vec<pull::Config>, ConsumerSpecError> {
    let one = consumer_config(reactor, store)?;
    let Some(layout) = store.layout() else {
        return Ok(vec![one]);
    };
    let filters = event_subjects(reactor);
    (0..layout.partitions)
        .map(|p| {
            let mut stored = layout.partition_filters(&filters, p);
            let (subject, subjects) = if stored.len() == 1 {
                (stored.remove(0), Vec::new())
            } else {
                (String::new(), stored)
            };
            partition_consumer_config(
                reactor,
                partition_consumer(&reactor.consumer_name(), p),
                subject,
                subjects,
            )
        })
        .collect()
}

/// The name the sidecars of reactor `name` report under on [`crate::partition::PROGRESS_STREAM`]: `reactor_<name>`
/// (dots made dashes). A Projection reports under its own name, which never holds `_`.
pub fn progress_name(name: &str) -> String {
    format!("reactor_{}", name.replace('.', "-"))
}

/// The durable consumer of partition `p` of a reactor whose consumer on an unpartitioned store is `base`.
pub fn partition_consumer(base: &str, p: u32) -> String {
    format!("{base}_p{p}")
}

fn partition_consumer_config(
    reactor: &Reactor,
    durable: String,
    filter_subject: String,
    filter_subjects: Vec<String>,
) -> Result<pull::Config, ConsumerSpecError> {
    let spec = &reactor.spec;
    let ack_wait =
        duration::parse(&spec.ack_wait).map_err(|source| ConsumerSpecError::Duration {
            field: "ackWait",
            source,
        })?;
    let start = spec.start_at.clone().unwrap_or_default().as_start_at();
    let deliver_policy = consumer::deliver_policy(&start)?;
    let key = format!(
        "{}/{}",
        reactor.namespace(),
        reactor.metadata.name.as_deref().unwrap_or("")
    );
    // Events of an aggregate whose event before is still in flight are held by the sidecar; the held events count
    // against max_ack_pending, so it leaves room well beyond the aggregates in flight.
    let max_ack_pending = (i64::from(spec.delivery.concurrency) * 64).max(1000);
    Ok(pull::Config {
        durable_name: Some(durable),
        description: Some(format!("Reactor {key} (managed by projectionist)")),
        deliver_policy,
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        filter_subject,
        filter_subjects,
        replay_policy: ReplayPolicy::Instant,
        max_ack_pending,
        max_batch: 256,
        max_waiting: 512,
        inactive_threshold: Duration::ZERO,
        backoff: Vec::new(),
        priority_policy: PriorityPolicy::PinnedClient,
        priority_groups: vec![PRIORITY_GROUP.to_string()],
        priority_timeout: ack_wait,
        metadata: HashMap::from([(METADATA_REACTOR.to_string(), key)]),
        ..pull::Config::default()
    })
}

/// The parking lot's stream: file storage (memory when the store is in memory), as many replicas as the store,
/// no limits, direct gets for reading an aggregate's first and last held event.
pub fn parking_stream_config(reactor: &Reactor, store: &EventStore) -> stream::Config {
    stream::Config {
        name: reactor.parking_stream(),
        description: Some(format!(
            "Parked events of Reactor {}/{} (managed by projectionist)",
            reactor.namespace(),
            reactor.metadata.name.as_deref().unwrap_or("")
        )),
        subjects: vec![format!("{}.>", reactor.parking_prefix())],
        retention: RetentionPolicy::Limits,
        storage: match store.spec.stream.storage {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        },
        num_replicas: usize::from(store.spec.stream.replicas),
        discard: DiscardPolicy::New,
        max_age: Duration::ZERO,
        max_bytes: -1,
        max_messages: -1,
        max_messages_per_subject: -1,
        duplicate_window: Duration::from_secs(120),
        allow_direct: true,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::NatsConnection;
    use crate::event_store::EventStoreSpec;

    pub(crate) fn reactor() -> Reactor {
        let mut r = Reactor::new(
            "welcome.email",
            serde_json::from_value(serde_json::json!({
                "eventStore": "users",
                "endpoint": {"url": "http://127.0.0.1:8080/events"},
            }))
            .expect("spec"),
        );
        r.metadata.namespace = Some("shop".into());
        r
    }

    fn store() -> EventStore {
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

    #[test]
    fn defaults_start_new_with_explicit_acks_and_a_parking_lot() {
        let r = reactor();
        assert_eq!(r.spec.delivery.concurrency, 16);
        assert_eq!(r.spec.delivery.max_attempts, 10);
        assert_eq!(r.spec.on_error.policy, ReactorErrorPolicy::Park);
        assert_eq!(r.spec.endpoint.timeout, "10s");
        let c = consumer_config(&r, &store()).expect("config");
        assert_eq!(
            c.durable_name.as_deref(),
            Some("shop_reactor_welcome-email")
        );
        assert_eq!(
            c.deliver_policy,
            async_nats::jetstream::consumer::DeliverPolicy::New
        );
        assert_eq!(c.ack_policy, AckPolicy::Explicit);
        assert_eq!(c.max_ack_pending, 1024);
        assert_eq!(r.parking_stream(), "PARKED_shop_welcome-email");
        let p = parking_stream_config(&r, &store());
        assert_eq!(
            p.subjects,
            vec!["projectionist.parked.shop.welcome-email.>"]
        );
        assert!(p.allow_direct);
        assert_eq!(
            r.dead_letter_subject(),
            "projectionist.deadletter.shop.welcome-email"
        );
    }

    #[test]
    fn start_all_replays_and_filters_must_lie_in_the_store() {
        let mut r = reactor();
        r.spec.start_at = Some(ReactorStartAt {
            policy: ReactorStartPolicy::All,
            ..Default::default()
        });
        let c = consumer_config(&r, &store()).expect("config");
        assert_eq!(
            c.deliver_policy,
            async_nats::jetstream::consumer::DeliverPolicy::All
        );
        r.spec.events = Some(ReactorEvents {
            subjects: vec!["shop.orders.>".into()],
            types: vec![],
        });
        assert!(consumer_config(&r, &store()).is_err());
    }
}
