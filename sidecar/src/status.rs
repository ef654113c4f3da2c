//! What each projection reports: liveness, readiness, and Prometheus metrics.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of per-projection series: `<namespace>/<name>`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabel {
    /// The projection.
    pub projection: String,
}

/// Label of error series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// The projection.
    pub projection: String,
    /// `database_transient`, `database_permanent`, `decode`, `bind`, `nats`, `fenced`.
    pub kind: String,
}

/// Label of dead-letter series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    /// The projection.
    pub projection: String,
    /// `deadLetter` or `skip`.
    pub policy: String,
}

/// A histogram family with the batch-duration buckets.
type HistogramFamily = Family<ProjectionLabel, Histogram, fn() -> Histogram>;

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The sidecar's metrics, `projectionist_sidecar_*`.
#[derive(Debug)]
pub struct Metrics {
    /// Events applied (handlers ran and committed).
    pub events_applied: Family<ProjectionLabel, Counter>,
    /// Events acknowledged without a handler for their type.
    pub events_ignored: Family<ProjectionLabel, Counter>,
    /// Events applied as rows of merged multi-row statements (Postgres fast path).
    pub events_merged: Family<ProjectionLabel, Counter>,
    /// Batches committed.
    pub batches: Family<ProjectionLabel, Counter>,
    /// Time to apply and commit a batch.
    pub batch_duration: HistogramFamily,
    /// Checkpoint (last applied stream sequence).
    pub checkpoint: Family<ProjectionLabel, Gauge>,
    /// Events of the consumer not yet delivered.
    pub lag: Family<ProjectionLabel, Gauge>,
    /// Dead letters recorded.
    pub dead_letters: Family<PolicyLabel, Counter>,
    /// Errors by kind.
    pub errors: Family<ErrorLabel, Counter>,
    /// 1 while a rebuild replays events.
    pub rebuilding: Family<ProjectionLabel, Gauge>,
    /// Events replayed by the current or last rebuild.
    pub rebuild_replayed: Family<ProjectionLabel, Gauge>,
    /// 1 when the projection stopped at an event under `halt`.
    pub halted: Family<ProjectionLabel, Gauge>,
}

impl Metrics {
    /// Registers every series with a registry.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            events_applied: Family::default(),
            events_ignored: Family::default(),
            events_merged: Family::default(),
            batches: Family::default(),
            batch_duration: Family::new_with_constructor(batch_histogram as fn() -> Histogram),
            checkpoint: Family::default(),
            lag: Family::default(),
            dead_letters: Family::default(),
            errors: Family::default(),
            rebuilding: Family::default(),
            rebuild_replayed: Family::default(),
            halted: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("projectionist_sidecar");
        r.register(
            "events_applied",
            "Events applied and committed",
            m.events_applied.clone(),
        );
        r.register(
            "events_ignored",
            "Events without a handler for their type",
            m.events_ignored.clone(),
        );
        r.register(
            "events_merged",
            "Events applied as rows of merged multi-row statements",
            m.events_merged.clone(),
        );
        r.register("batches", "Batches committed", m.batches.clone());
        r.register(
            "batch_duration_seconds",
            "Time to apply and commit a batch",
            m.batch_duration.clone(),
        );
        r.register(
            "checkpoint_sequence",
            "Last stream sequence applied",
            m.checkpoint.clone(),
        );
        r.register(
            "lag_events",
            "Events of the consumer not yet delivered",
            m.lag.clone(),
        );
        r.register(
            "dead_letters",
            "Events recorded as dead letters",
            m.dead_letters.clone(),
        );
        r.register("errors", "Errors by kind", m.errors.clone());
        r.register(
            "rebuilding",
            "1 while a rebuild replays events",
            m.rebuilding.clone(),
        );
        r.register(
            "rebuild_replayed_events",
            "Events replayed by the current or last rebuild",
            m.rebuild_replayed.clone(),
        );
        r.register(
            "halted",
            "1 when the projection stopped under the halt policy",
            m.halted.clone(),
        );
        Arc::new(m)
    }

    /// Counts an error.
    pub fn error(&self, projection: &str, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                projection: projection.into(),
                kind: kind.into(),
            })
            .inc();
    }
}

/// The live state of one projection, shared with the admin server.
#[derive(Debug)]
pub struct ProjectionState {
    /// `<namespace>/<name>`.
    pub key: String,
    /// When the loop last made progress or idled normally.
    heartbeat: Mutex<Instant>,
    /// Connected to NATS and the database, and positioned.
    pub connected: AtomicBool,
    /// Why the projection halted, if it did.
    halted: Mutex<Option<String>>,
    /// What it is waiting for, when not ready.
    waiting: Mutex<Option<String>>,
    /// A rebuild is replaying.
    pub rebuilding: AtomicBool,
    /// Checkpoint.
    pub checkpoint: AtomicU64,
    /// Consumer lag at the last batch (-1 unknown).
    pub lag: AtomicI64,
    /// Wakes the event-store API's waiters when the checkpoint moves or the projection halts.
    changes: tokio::sync::watch::Sender<u64>,
    /// The consumer's filter subjects, once known: which events the projection applies.
    filters: Mutex<Option<Vec<String>>>,
    /// A partitioned projection: every partition's checkpoint as this replica knows it.
    partitions: Mutex<Option<Partitions>>,
}

/// Every partition's checkpoint of a partitioned projection as one replica knows it: its own partitions as they
/// commit, the others' as the database showed them at the last rebalancing round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    /// The store's layout.
    pub layout: projectionist_crds::partition::Layout,
    /// The projection's filters as publishers write subjects (empty: everything).
    pub filters: Vec<String>,
    /// Checkpoint by partition.
    pub checkpoints: std::collections::BTreeMap<u32, u64>,
}

impl Partitions {
    /// The stored subjects partition `p` reads.
    pub fn filters_of(&self, p: u32) -> Vec<String> {
        self.layout.partition_filters(&self.filters, p)
    }
}

impl ProjectionState {
    /// A fresh state.
    pub fn new(key: &str) -> Arc<Self> {
        Arc::new(Self {
            key: key.to_string(),
            heartbeat: Mutex::new(Instant::now()),
            connected: AtomicBool::new(false),
            halted: Mutex::new(None),
            waiting: Mutex::new(Some("starting".into())),
            rebuilding: AtomicBool::new(false),
            checkpoint: AtomicU64::new(0),
            lag: AtomicI64::new(-1),
            changes: tokio::sync::watch::Sender::new(0),
            filters: Mutex::new(None),
            partitions: Mutex::new(None),
        })
    }

    /// Declares the projection partitioned, with every partition's checkpoint as the database has it.
    pub fn set_partitions(&self, partitions: Partitions) {
        if let Ok(mut p) = self.partitions.lock() {
            *p = Some(partitions);
        }
        self.changes.send_modify(|_| {});
    }

    /// One partition's checkpoint moved (this replica committed it).
    pub fn set_partition_checkpoint(&self, partition: u32, sequence: u64) {
        if let Ok(mut p) = self.partitions.lock()
            && let Some(p) = p.as_mut()
        {
            p.checkpoints.insert(partition, sequence);
        }
        self.changes.send_modify(|_| {});
    }

    /// The partitions, when the projection is partitioned.
    pub fn partitions(&self) -> Option<Partitions> {
        self.partitions.lock().ok().and_then(|p| p.clone())
    }

    /// The loop is alive.
    pub fn beat(&self) {
        if let Ok(mut h) = self.heartbeat.lock() {
            *h = Instant::now();
        }
    }

    /// Time since the last heartbeat.
    pub fn since_beat(&self) -> Duration {
        self.heartbeat
            .lock()
            .map(|h| h.elapsed())
            .unwrap_or_default()
    }

    /// Marks the projection halted.
    pub fn halt(&self, reason: String) {
        if let Ok(mut h) = self.halted.lock() {
            *h = Some(reason);
        }
        self.changes.send_modify(|_| {});
    }

    /// The last applied stream sequence.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint.load(Ordering::Relaxed)
    }

    /// Records the checkpoint and wakes waiters.
    pub fn set_checkpoint(&self, sequence: u64) {
        self.checkpoint.store(sequence, Ordering::Relaxed);
        self.changes.send_replace(sequence);
    }

    /// A receiver that sees every checkpoint move and halt.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records the consumer's filter subjects.
    pub fn set_filters(&self, filters: Vec<String>) {
        if let Ok(mut f) = self.filters.lock() {
            *f = Some(filters);
        }
    }

    /// The consumer's filter subjects, once the projection has read them.
    pub fn filters(&self) -> Option<Vec<String>> {
        self.filters.lock().ok().and_then(|f| f.clone())
    }

    /// Clears a halt (the projection is started again with a new config).
    pub fn resume(&self) {
        if let Ok(mut h) = self.halted.lock() {
            *h = None;
        }
    }

    /// Why it halted.
    pub fn halted(&self) -> Option<String> {
        self.halted.lock().ok().and_then(|h| h.clone())
    }

    /// Says what the projection waits for (`None` when it runs).
    pub fn set_waiting(&self, reason: Option<String>) {
        self.connected.store(reason.is_none(), Ordering::Relaxed);
        if let Ok(mut w) = self.waiting.lock() {
            *w = reason;
        }
    }

    /// What it waits for.
    pub fn waiting(&self) -> Option<String> {
        self.waiting.lock().ok().and_then(|w| w.clone())
    }
}
