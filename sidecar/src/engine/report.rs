//! The report handle: what a projection tells the world — readiness (`/readyz`), the heartbeat (`/healthz`) and the
//! `projectionist_sidecar_*` metrics. The stages write through it; none reads it back to decide anything.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use projectionist_crds::projection::ErrorPolicy;

use crate::dead_letter::policy_name;
use crate::status::{Metrics, PolicyLabel, ProjectionLabel, ProjectionState};

/// One projection's reporting.
#[derive(Debug, Clone)]
pub struct Report {
    key: String,
    label: ProjectionLabel,
    metrics: Arc<Metrics>,
    state: Arc<ProjectionState>,
    /// A worker's: the projection's state, told of every partition's checkpoint.
    parent: Option<Arc<ProjectionState>>,
}

/// What one committed batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Events whose handlers ran.
    pub applied: u64,
    /// Events without a handler for their type.
    pub ignored: u64,
    /// Events applied as rows of merged multi-row statements.
    pub merged: u64,
}

impl Report {
    /// The handle of projection `key` (`<namespace>/<name>`).
    pub fn new(key: &str, metrics: Arc<Metrics>, state: Arc<ProjectionState>) -> Self {
        Self {
            key: key.to_string(),
            label: ProjectionLabel {
                projection: key.to_string(),
            },
            metrics,
            state,
            parent: None,
        }
    }

    /// The handle of a worker of a partitioned projection, which tells the projection's state `parent` its
    /// partitions' checkpoints.
    pub fn of_worker(mut self, parent: Arc<ProjectionState>) -> Self {
        self.parent = Some(parent);
        self
    }

    /// A partition's checkpoint now stands at `sequence` (metric label `<projection>#<partition>`).
    pub fn partition_checkpoint(&self, partition: u32, sequence: u64) {
        if let Some(parent) = &self.parent {
            parent.set_partition_checkpoint(partition, sequence);
            self.metrics
                .checkpoint
                .get_or_create(&ProjectionLabel {
                    projection: crate::checkpoint::partition_key(&parent.key, partition),
                })
                .set(gauge(sequence));
        }
    }

    /// `<namespace>/<name>`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The loop is alive.
    pub fn beat(&self) {
        self.state.beat();
    }

    /// Not ready for `reason` (`None`: ready again).
    pub fn waiting(&self, reason: Option<String>) {
        self.state.set_waiting(reason);
    }

    /// An error of `kind` (`database_transient`, `database_permanent`, `decode`, `bind`, `nats`, `fenced`).
    pub fn error(&self, kind: &str) {
        self.metrics.error(&self.key, kind);
    }

    /// The checkpoint now stands at `sequence`.
    pub fn checkpoint(&self, sequence: u64) {
        self.state.set_checkpoint(sequence);
        self.metrics
            .checkpoint
            .get_or_create(&self.label)
            .set(gauge(sequence));
    }

    /// The subjects the durable consumer selects (the `wait` endpoint filters with them).
    pub fn filters(&self, filters: Vec<String>) {
        self.state.set_filters(filters);
    }

    /// Events of the consumer not yet delivered.
    pub fn lag(&self, pending: u64) {
        self.state.lag.store(gauge(pending), Ordering::Relaxed);
        self.metrics
            .lag
            .get_or_create(&self.label)
            .set(gauge(pending));
    }

    /// A batch committed.
    pub fn committed(&self, counts: Counts, took: Duration) {
        self.metrics
            .events_applied
            .get_or_create(&self.label)
            .inc_by(counts.applied);
        self.metrics
            .events_ignored
            .get_or_create(&self.label)
            .inc_by(counts.ignored);
        self.metrics
            .events_merged
            .get_or_create(&self.label)
            .inc_by(counts.merged);
        self.metrics.batches.get_or_create(&self.label).inc();
        self.metrics
            .batch_duration
            .get_or_create(&self.label)
            .observe(took.as_secs_f64());
    }

    /// An event recorded under `policy`.
    pub fn dead_letter(&self, policy: ErrorPolicy) {
        self.metrics
            .dead_letters
            .get_or_create(&PolicyLabel {
                projection: self.key.clone(),
                policy: policy_name(policy).to_string(),
            })
            .inc();
    }

    /// Stopped for `reason` (`None`: a fresh start clears an earlier halt).
    pub fn halted(&self, reason: Option<String>) {
        let halted = reason.is_some();
        if let Some(reason) = reason {
            self.state.halt(reason);
        }
        self.metrics
            .halted
            .get_or_create(&self.label)
            .set(i64::from(halted));
    }

    /// A rebuild starts replaying from the beginning.
    pub fn rebuild_started(&self) {
        self.state.rebuilding.store(true, Ordering::Relaxed);
        self.metrics.rebuilding.get_or_create(&self.label).set(1);
        self.metrics
            .rebuild_replayed
            .get_or_create(&self.label)
            .set(0);
    }

    /// Whether a rebuild is replaying.
    pub fn rebuilding(&self) -> bool {
        self.state.rebuilding.load(Ordering::Relaxed)
    }

    /// `events` more replayed by the rebuild.
    pub fn rebuild_replayed(&self, events: usize) {
        if self.rebuilding() {
            self.metrics
                .rebuild_replayed
                .get_or_create(&self.label)
                .inc_by(i64::try_from(events).unwrap_or(0));
        }
    }

    /// The rebuild caught up; `true` if one was running.
    pub fn rebuild_finished(&self) -> bool {
        let was = self.state.rebuilding.swap(false, Ordering::Relaxed);
        if was {
            self.metrics.rebuilding.get_or_create(&self.label).set(0);
        }
        was
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
