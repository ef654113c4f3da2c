//! The `Projection` custom resource: one read model in a service's own database, kept up to date from an
//! EventStore by the sidecar, through a durable JetStream consumer of its own.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Condition, SecretKeyRef};
use crate::duration::DURATION_PATTERN;

/// Upper bound of `spec.batch.maxEvents`.
pub const MAX_BATCH_EVENTS: u32 = 10_000;

/// A projection of an EventStore's events into a SQL read model.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "projectionist.dev",
    version = "v1alpha1",
    kind = "Projection",
    plural = "projections",
    shortname = "proj",
    category = "projectionist",
    namespaced,
    status = "ProjectionStatus",
    printcolumn = r#"{"name":"Store","type":"string","jsonPath":".spec.eventStore"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Partitions","type":"integer","jsonPath":".status.partitions"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","jsonPath":".status.pending"}"#,
    printcolumn = r#"{"name":"Last-Seq","type":"integer","jsonPath":".status.lastAckedSequence"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "A projection of an EventStore's events into a SQL read model, applied exactly once by the sidecar."
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.eventStore == oldSelf.eventStore")
        .message("eventStore is immutable: create a new Projection to read another store")
        .field_path(".eventStore"),
)]
pub struct ProjectionSpec {
    /// Name of the EventStore (same namespace) whose events this projection reads.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub event_store: String,
    /// Which events reach the projection. Defaults to every event of the store; events whose type has no handler
    /// are acknowledged and counted as ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventSelection>,
    /// Where a new projection starts reading. Defaults to the first event of the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<StartAt>,
    /// The service's database that holds the read model.
    pub database: Database,
    /// DDL statements that create the read model. Run at every sidecar start, in one transaction with the
    /// sidecar's own tables (on PostgreSQL under an advisory lock, so replicas starting together take turns), so
    /// they must be idempotent (`CREATE TABLE IF NOT EXISTS ...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 65536)))]
    pub schema: Vec<String>,
    /// SQL to run for each event type. Named parameters such as `:data.user.id` or `:event.sequence` are bound
    /// from the event as values, never spliced into the SQL.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.all(h, self.filter(o, o.event == h.event).size() == 1)")
        .message("each event type may have only one handler"))]
    pub handlers: Vec<Handler>,
    /// How many events are applied per database transaction.
    #[serde(default)]
    pub batch: Batch,
    /// How long the server waits for an acknowledgement before redelivering an event, e.g. `30s` (default).
    #[serde(default = "default_ack_wait")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub ack_wait: String,
    /// What happens when an event cannot be applied.
    #[serde(default)]
    pub on_error: OnError,
    /// Rebuild the read model from the first event: change `token` and the sidecar runs `reset`, re-creates the
    /// schema and replays every event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<Rebuild>,
    /// Which pods of the namespace get this projection's sidecar injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// On a partitioned EventStore: how many of its partitions one sidecar applies at once, each on a connection of
    /// its own (default 1; more needs PostgreSQL or MySQL/MariaDB). Ignored on an unpartitioned store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub workers: Option<u32>,
}

/// Which events the projection's consumer receives.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventSelection {
    /// Subject filters within the store's subjects, e.g. `default.users.user.>`. Filtering happens on the server,
    /// so unwanted events are never delivered. Empty means every subject of the store.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 255), regex(pattern = r"^[^\s]+$"))
    )]
    pub subjects: Vec<String>,
}

/// Where a new projection starts.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.policy == 'Sequence' ? has(self.sequence) : !has(self.sequence)")
        .message("sequence is set exactly when policy is Sequence"),
    validation = Rule::new("self.policy == 'Time' ? has(self.time) : !has(self.time)")
        .message("time is set exactly when policy is Time"),
)]
pub struct StartAt {
    /// `Beginning` (default), `New` (only events appended from now on), `Sequence` or `Time`.
    #[serde(default)]
    pub policy: StartPolicy,
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

/// The start policies.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum StartPolicy {
    /// From the first event in the store (default).
    #[default]
    Beginning,
    /// Only events appended after the consumer is created.
    New,
    /// From a given stream sequence.
    Sequence,
    /// From the first event at or after a given time.
    Time,
}

/// The read model's database.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Database {
    /// `postgres`, `mysql` (MySQL and MariaDB) or `sqlite`.
    pub driver: Driver,
    /// Secret key holding the connection URL, e.g. `postgres://user:pass@host/db`.
    pub url_secret: SecretKeyRef,
    /// Maximum number of connections the sidecar opens to the database.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 64))]
    pub max_connections: u32,
}

/// A SQL database driver.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// PostgreSQL: parameters become `$1`, `$2`, ...
    Postgres,
    /// MySQL or MariaDB: parameters become `?`.
    Mysql,
    /// SQLite: parameters become `?`.
    Sqlite,
}

impl Driver {
    /// The name used in the API and in connection URLs' schemes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
            Self::Sqlite => "sqlite",
        }
    }
}

/// The SQL one event type runs.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Handler {
    /// The event type (`ce-type`), e.g. `UserCreated`.
    #[schemars(length(min = 1, max = 255))]
    pub event: String,
    /// Statements run in order, in the batch's transaction. Named parameters: `:data.<path>` (a field of the event's
    /// JSON data; `:data` alone is the whole document), `:event.id`, `:event.type`, `:event.source`,
    /// `:event.subject`, `:event.time`, `:event.sequence`.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 65536)))]
    pub sql: Vec<String>,
}

/// Batching of events into transactions.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    /// Most events applied in one transaction (1 to 10000; default 500).
    #[serde(default = "default_max_events")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_events: u32,
    /// Extra time to wait for a batch to fill once its first event has arrived. `0s` (default) applies at once
    /// whatever has arrived: under load batches fill by themselves, and a lone event is committed without delay. A
    /// few milliseconds trade freshness for larger batches at moderate rates.
    #[serde(default = "default_max_wait")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_wait: String,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            max_events: default_max_events(),
            max_wait: default_max_wait(),
        }
    }
}

/// Error handling.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OnError {
    /// What to do with an event that fails by itself (bad payload, missing field, constraint violated) once
    /// `maxAttempts` are used up: `halt` (default: stop the projection and report), `deadLetter` (record it in the
    /// dead-letter table, publish it to the dead-letter subject, go on) or `skip` (record it, go on).
    #[serde(default)]
    pub policy: ErrorPolicy,
    /// Attempts at an event that fails by itself before the policy applies (1 to 100; default 3). Transient
    /// failures (connection lost, deadlock, timeout) are retried without limit and never count.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// Delay between retries, doubling from `initial` up to `max`.
    #[serde(default)]
    pub backoff: Backoff,
    /// Subject dead letters are published to. Defaults to `projectionist.deadletter.<namespace>.<projection>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[^\s*>]+$"))]
    pub dead_letter_subject: Option<String>,
}

impl Default for OnError {
    fn default() -> Self {
        Self {
            policy: ErrorPolicy::default(),
            max_attempts: default_max_attempts(),
            backoff: Backoff::default(),
            dead_letter_subject: None,
        }
    }
}

/// The error policies.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ErrorPolicy {
    /// Stop the projection at the failing event and report why (default).
    #[default]
    Halt,
    /// Record the event in the dead-letter table and publish it to the dead-letter subject, then go on.
    DeadLetter,
    /// Record the event in the dead-letter table, then go on.
    Skip,
}

/// Exponential backoff.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// First delay, e.g. `100ms` (default).
    #[serde(default = "default_backoff_initial")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub initial: String,
    /// Largest delay, e.g. `30s` (default).
    #[serde(default = "default_backoff_max")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max: String,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
        }
    }
}

/// A rebuild request.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rebuild {
    /// Any string; changing it rebuilds the read model once.
    #[schemars(length(min = 1, max = 253))]
    pub token: String,
    /// Statements that empty the read model, e.g. `DELETE FROM users` or `DROP TABLE IF EXISTS users`. They run in
    /// the same transaction that resets the checkpoint, followed by `schema`.
    #[schemars(length(min = 1, max = 256), inner(length(min = 1, max = 65536)))]
    pub reset: Vec<String>,
}

/// What the operator and the sidecar last saw.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `CaughtUp`, `Stalled` and `Rebuilding`, each with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Name of the durable JetStream consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_name: Option<String>,
    /// Events not yet delivered to the projection (its lag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    /// Events delivered but not yet acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_pending: Option<u64>,
    /// Events delivered more than once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivered: Option<u64>,
    /// Stream sequence of the last event acknowledged (applied and committed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_acked_sequence: Option<u64>,
    /// The sidecar currently pinned to the consumer, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_sidecar: Option<String>,
    /// The rebuild token the consumer was last reset for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_token: Option<String>,
    /// On a partitioned store: its partitions, shared by the live sidecars (each reads its partitions from the
    /// stream; their owners and checkpoints are in the read model's `projectionist_partitions` table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// On a partitioned store: how many partitions one sidecar applies at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// On a partitioned store: the partitions each live sidecar owns, by sidecar, as they last reported.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub spread: std::collections::BTreeMap<String, u32>,
}

fn default_ack_wait() -> String {
    "30s".to_string()
}
fn default_max_events() -> u32 {
    500
}
fn default_max_wait() -> String {
    "0s".to_string()
}
fn default_max_attempts() -> u32 {
    3
}
fn default_backoff_initial() -> String {
    "100ms".to_string()
}
fn default_backoff_max() -> String {
    "30s".to_string()
}
fn default_max_connections() -> u32 {
    4
}

impl Projection {
    /// Name of the durable consumer: `<namespace>_<name>` (unique, since `_` never appears in either).
    pub fn consumer_name(&self) -> String {
        let namespace = self.metadata.namespace.as_deref().unwrap_or("default");
        let name = self.metadata.name.as_deref().unwrap_or("");
        format!("{namespace}_{name}").replace('.', "-")
    }

    /// The dead-letter subject: `spec.onError.deadLetterSubject` or
    /// `projectionist.deadletter.<namespace>.<name>`.
    pub fn dead_letter_subject(&self) -> String {
        if let Some(subject) = &self.spec.on_error.dead_letter_subject {
            return subject.clone();
        }
        let namespace = self.metadata.namespace.as_deref().unwrap_or("default");
        let name = self.metadata.name.as_deref().unwrap_or("");
        format!(
            "projectionist.deadletter.{namespace}.{}",
            name.replace('.', "-")
        )
    }
}
