//! The `EventStore` custom resource: one JetStream stream that behaves like an append-only ledger.
//!
//! By default the stream keeps every event forever and refuses to lose one: file storage, `discard: New` (a full
//! stream rejects appends instead of dropping old events), message deletion and purging denied, no age or count
//! limits. Each of these guardrails can be loosened only by an explicit `spec.stream.guardrails` flag, so a reader of
//! the resource sees at once that the store may forget.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Condition, NatsConnection, StringMap};
use crate::duration::DURATION_PATTERN;

/// An event store: a JetStream stream provisioned and kept in shape by the operator.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "projectionist.dev",
    version = "v1alpha1",
    kind = "EventStore",
    plural = "eventstores",
    shortname = "evs",
    category = "projectionist",
    namespaced,
    status = "EventStoreStatus",
    printcolumn = r#"{"name":"Stream","type":"string","jsonPath":".status.streamName"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Partitions","type":"integer","jsonPath":".status.partitions"}"#,
    printcolumn = r#"{"name":"Messages","type":"integer","jsonPath":".status.messages"}"#,
    printcolumn = r#"{"name":"Last-Seq","type":"integer","jsonPath":".status.lastSequence"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "An append-only event store backed by a NATS JetStream stream."
)]
#[serde(rename_all = "camelCase")]
pub struct EventStoreSpec {
    /// How to reach NATS.
    pub nats: NatsConnection,
    /// The JetStream stream that holds the events.
    #[serde(default)]
    pub stream: StreamSpec,
    /// What happens to the stream when this resource is deleted: `Retain` (default) keeps every event; `Delete`
    /// removes the stream and its events.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// The stream's settings. Everything is optional; the defaults make a safe ledger.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)")
        .message("stream.name is immutable: create a new EventStore to use another stream")
        .field_path(".name"),
    validation = Rule::new("self.storage == 'File' || (has(self.guardrails) && self.guardrails.allowMemoryStorage)")
        .message("storage: Memory loses every event when the server restarts; set guardrails.allowMemoryStorage: true to accept that")
        .field_path(".storage"),
    validation = Rule::new("self.discard == 'New' || (has(self.guardrails) && self.guardrails.allowDiscardOld)")
        .message("discard: Old drops the oldest events when a limit is reached; set guardrails.allowDiscardOld: true to accept that")
        .field_path(".discard"),
    validation = Rule::new("!has(self.maxAge) || (has(self.guardrails) && self.guardrails.allowExpiry)")
        .message("maxAge expires old events; set guardrails.allowExpiry: true to accept that")
        .field_path(".maxAge"),
)]
pub struct StreamSpec {
    /// Name of the JetStream stream. Defaults to `<namespace>_<name>` of the EventStore. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[^.*>/\\\s]+$"))]
    pub name: Option<String>,
    /// Subjects the stream captures. Defaults to `<namespace>.<name>.>`; events are appended as
    /// `<prefix>.<aggregate type>.<aggregate id>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 255), regex(pattern = r"^[^\s]+$"))
    )]
    pub subjects: Vec<String>,
    /// Partitions (1–1024): each event is stored under `<prefix>.<partition>.<type>.<id>`, the partition computed
    /// by the server from the aggregate (see [`crate::partition`]), so that the live replicas of a Projection share
    /// the partitions. Publishers keep publishing `<prefix>.<type>.<id>`; other subjects are refused. Needs a single
    /// subject of the form `<prefix>.>`. Unset: not partitioned. Immutable (a change is refused with a condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub partitions: Option<u32>,
    /// Number of replicas of the stream in a NATS cluster (1, 3 or 5 are usual; 3 for production).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: u8,
    /// `File` (default) or `Memory`. Memory needs `guardrails.allowMemoryStorage`. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage is immutable: create a new EventStore to change it"))]
    pub storage: Storage,
    /// What a full stream does: `New` (default) rejects the append; `Old` drops the oldest events and needs
    /// `guardrails.allowDiscardOld`.
    #[serde(default)]
    pub discard: Discard,
    /// Maximum age of an event, e.g. `8760h`. Unset (default) keeps events forever; needs `guardrails.allowExpiry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_age: Option<String>,
    /// Maximum total size of the stream in bytes. With `discard: New` a full stream rejects appends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<i64>,
    /// Maximum number of events in the stream. With `discard: New` a full stream rejects appends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_msgs: Option<i64>,
    /// Maximum number of events per subject (per aggregate with the default layout). With `discard: New` an append
    /// beyond it is rejected instead of dropping the aggregate's oldest event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_msgs_per_subject: Option<i64>,
    /// Maximum size of one event in bytes. Unset means the server's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 67108864))]
    pub max_msg_size: Option<i32>,
    /// Window in which an append with an already seen `Nats-Msg-Id` (the event id) is dropped as a duplicate,
    /// e.g. `2m` (default).
    #[serde(default = "default_duplicate_window")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub duplicate_window: String,
    /// On-disk compression: `None` (default) or `S2`.
    #[serde(default)]
    pub compression: Compression,
    /// Where in a NATS super-cluster the stream is placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Human-readable description stored with the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub description: Option<String>,
    /// Key/value metadata stored with the stream.
    #[serde(default, skip_serializing_if = "StringMap::is_empty")]
    pub metadata: StringMap,
    /// Explicit opt-ins that loosen the event-store guardrails. All default to `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardrails: Option<Guardrails>,
}

/// Opt-ins that let the stream lose or rewrite events. Each is visible in the spec and in
/// `status.loosenedGuardrails`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Guardrails {
    /// Allow `storage: Memory` (events are lost when the server restarts).
    #[serde(default)]
    pub allow_memory_storage: bool,
    /// Allow `discard: Old` (the oldest events are dropped when a limit is reached).
    #[serde(default)]
    pub allow_discard_old: bool,
    /// Allow `maxAge` (events older than it are expired).
    #[serde(default)]
    pub allow_expiry: bool,
    /// Allow deleting single events through the JetStream API (`denyDelete: false`).
    #[serde(default)]
    pub allow_message_delete: bool,
    /// Allow purging the stream through the JetStream API (`denyPurge: false`).
    #[serde(default)]
    pub allow_purge: bool,
}

impl Guardrails {
    /// The names of the guardrails that are loosened, for status and logs.
    pub fn loosened(&self) -> Vec<String> {
        [
            (self.allow_memory_storage, "allowMemoryStorage"),
            (self.allow_discard_old, "allowDiscardOld"),
            (self.allow_expiry, "allowExpiry"),
            (self.allow_message_delete, "allowMessageDelete"),
            (self.allow_purge, "allowPurge"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| name.to_string())
        .collect()
    }
}

/// Stream placement in a super-cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Name of the cluster to place the stream in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Server tags the stream's servers must carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Where the stream keeps its events.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Storage {
    /// On disk (default): survives restarts.
    #[default]
    File,
    /// In memory: lost on restart. Needs `guardrails.allowMemoryStorage`.
    Memory,
}

/// What a full stream does.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Discard {
    /// Reject the new append (default): no event is ever dropped.
    #[default]
    New,
    /// Drop the oldest events. Needs `guardrails.allowDiscardOld`.
    Old,
}

/// On-disk compression of the stream.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Compression {
    /// No compression (default).
    #[default]
    None,
    /// S2 compression.
    S2,
}

/// What deleting the EventStore does to the stream.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum DeletionPolicy {
    /// Keep the stream and its events (default).
    #[default]
    Retain,
    /// Delete the stream and all its events.
    Delete,
}

fn default_replicas() -> u8 {
    1
}

fn default_duplicate_window() -> String {
    "2m".to_string()
}

impl Default for StreamSpec {
    fn default() -> Self {
        Self {
            name: None,
            subjects: Vec::new(),
            partitions: None,
            replicas: default_replicas(),
            storage: Storage::default(),
            discard: Discard::default(),
            max_age: None,
            max_bytes: None,
            max_msgs: None,
            max_msgs_per_subject: None,
            max_msg_size: None,
            duplicate_window: default_duplicate_window(),
            compression: Compression::default(),
            placement: None,
            description: None,
            metadata: StringMap::new(),
            guardrails: None,
        }
    }
}

/// What the operator last saw of the stream.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventStoreStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and its reason (`StreamCreated`, `StreamUpdated`, `StreamInSync`, `ImmutableFieldChanged`,
    /// `NatsUnavailable`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The stream's partitions, as the server has them (unset: not partitioned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// Name of the JetStream stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_name: Option<String>,
    /// Number of events in the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    /// Bytes stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Sequence of the first event in the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_sequence: Option<u64>,
    /// Sequence of the last event appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sequence: Option<u64>,
    /// Number of consumers (projections) on the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_count: Option<u64>,
    /// Guardrails the spec loosens, e.g. `allowExpiry`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loosened_guardrails: Vec<String>,
}

impl EventStore {
    /// The stream name: `spec.stream.name`, or `<namespace>_<name>` with characters NATS forbids replaced.
    pub fn stream_name(&self) -> String {
        if let Some(name) = &self.spec.stream.name {
            return name.clone();
        }
        let namespace = self.metadata.namespace.as_deref().unwrap_or("default");
        let name = self.metadata.name.as_deref().unwrap_or("");
        format!("{namespace}_{name}").replace('.', "-")
    }

    /// The subjects the stream captures: `spec.stream.subjects`, or `<namespace>.<name>.>`.
    pub fn subjects(&self) -> Vec<String> {
        if !self.spec.stream.subjects.is_empty() {
            return self.spec.stream.subjects.clone();
        }
        let namespace = self.metadata.namespace.as_deref().unwrap_or("default");
        let name = self.metadata.name.as_deref().unwrap_or("");
        vec![format!("{namespace}.{}.>", name.replace('.', "-"))]
    }

    /// The subject layout of a partitioned store; `None` when the store is not partitioned (or its subject has no
    /// `<prefix>.>` form, which the stream config refuses).
    pub fn layout(&self) -> Option<crate::partition::Layout> {
        let partitions = self.spec.stream.partitions?;
        let subjects = self.subjects();
        let [subject] = subjects.as_slice() else {
            return None;
        };
        let prefix = subject.strip_suffix(".>")?;
        Some(crate::partition::Layout::new(prefix, partitions))
    }

    /// The guardrails the spec loosens.
    pub fn loosened_guardrails(&self) -> Vec<String> {
        self.spec
            .stream
            .guardrails
            .as_ref()
            .map(Guardrails::loosened)
            .unwrap_or_default()
    }
}
