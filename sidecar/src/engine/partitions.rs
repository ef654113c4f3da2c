//! A partitioned projection: the live replicas share the store's partitions, each partition owned by one replica at
//! a time, each replica owning a fair share (±1).
//!
//! Everything lives in the read model's database, next to the read model:
//! - `projectionist_members`: each replica renews a lease (half the projection's `ackWait`) every few seconds; a
//!   replica whose lease ran out is dead.
//! - `projectionist_partitions`: one row per partition with its checkpoint *and its owner*. A replica claims a row
//!   by a compare-and-set on the owner it saw (free, or a dead replica); every commit of a partition's batch moves
//!   the checkpoint with a compare-and-set that also requires the owner ([`crate::checkpoint::Slot`]), so a replica
//!   that lost a partition — released it, or was declared dead while it still ran — can never commit to it.
//!
//! Each round the coordinator renews its lease, reads who is alive and who owns what, and [`rebalance`]s: above its
//! share it stops and releases its highest partitions, below it claims free or orphaned ones. The partitions it owns
//! are dealt to `workers` [`Projector`]s ([`Worker`]), each reading its partitions from their checkpoints and
//! committing one transaction per batch across them, with a compare-and-set per partition it touched; their turns at the database are the [`Gate`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use projectionist_crds::partition::{
    Layout, PROGRESS_STREAM, Progress, progress_stream, progress_subject, quota,
};
use projectionist_crds::sidecar_config::{Partitioning, SidecarConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::gate::Gate;
use super::membership::{Tables, member_name};
use super::prepare;
use super::report::Report;
use super::worker::Worker;
use super::{Exit, Projector};
use crate::database::{Database, ErrorClass, classify};
use crate::handler::Handlers;
use crate::pipeline::Pipeline;
use crate::status::{Metrics, Partitions, ProjectionState};

/// Who owns what, as one replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// This replica.
    pub me: String,
    /// The live replicas (this one included), sorted.
    pub live: Vec<String>,
    /// Each partition's owner (`""`: none).
    pub owners: BTreeMap<u32, String>,
    /// Each partition's checkpoint.
    pub checkpoints: BTreeMap<u32, u64>,
}

/// What one replica does in a round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moves {
    /// Partitions to stop and release.
    pub release: Vec<u32>,
    /// Partitions to claim, with the owner seen (the claim's compare-and-set).
    pub claim: Vec<(u32, String)>,
}

/// This replica's moves towards its fair share: above it, release the highest partitions; below it, claim free
/// partitions and those of replicas no longer alive, lowest first.
pub fn rebalance(view: &View, total: u32) -> Moves {
    let rank = view
        .live
        .iter()
        .position(|m| *m == view.me)
        .unwrap_or(view.live.len());
    let members = view.live.len().max(rank + 1);
    let share = usize::try_from(quota(total, members, rank)).unwrap_or(usize::MAX);
    let mine: Vec<u32> = view
        .owners
        .iter()
        .filter(|(_, o)| **o == view.me)
        .map(|(p, _)| *p)
        .collect();
    let mut moves = Moves::default();
    if mine.len() > share {
        moves.release = mine[share..].iter().rev().copied().collect();
        moves.release.sort_unstable();
    } else if mine.len() < share {
        let live: BTreeSet<&str> = view.live.iter().map(String::as_str).collect();
        let mut orphans: Vec<(u32, String)> = view
            .owners
            .iter()
            .filter(|(_, o)| o.is_empty() || !live.contains(o.as_str()))
            .map(|(p, o)| (*p, o.clone()))
            .collect();
        // Free partitions before those of replicas that may only be slow.
        orphans.sort_by_key(|(p, o)| (!o.is_empty(), *p));
        moves.claim = orphans.into_iter().take(share - mine.len()).collect();
    }
    moves
}

/// What a coordinator needs to run the partitions it owns.
#[derive(Debug)]
pub struct Parts {
    /// The projection's config.
    pub config: SidecarConfig,
    /// Its handlers.
    pub handlers: Handlers,
    /// The read model's database.
    pub db: Database,
    /// The database URL (for the fast-path connections).
    pub url: String,
    /// NATS.
    pub nats: async_nats::Client,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The projection's state (`/readyz`, the `wait` endpoint).
    pub state: Arc<ProjectionState>,
}

/// One worker as it runs.
struct Running {
    partitions: Vec<u32>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Exit>,
    state: Arc<ProjectionState>,
}

/// Runs this replica's share of a partitioned projection.
pub struct Coordinator {
    parts: Parts,
    key: String,
    me: String,
    layout: Layout,
    /// The projection's settings on the partitioned store.
    partitioning: Partitioning,
    tables: Tables,
    gate: Gate,
    running: Vec<Running>,
    shutdown: watch::Receiver<bool>,
    /// The progress stream exists (or was created).
    progress_ready: bool,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("key", &self.key)
            .field("me", &self.me)
            .field("owned", &self.owned())
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// The coordinator of `parts`, a projection on a store of `layout`. `None` when the config is not partitioned.
    pub fn new(parts: Parts, shutdown: watch::Receiver<bool>) -> Option<Self> {
        let partitioning = parts.config.partitioning.clone()?;
        let prefix = crate::store::subject_prefix(&parts.config.store_subjects)?;
        let key = format!(
            "{}/{}",
            parts.config.projection.namespace, parts.config.projection.name
        );
        let url = parts.url.clone();
        let gate = Gate::new(partitioning.workers, || Pipeline::new(&url));
        let tables = Tables {
            db: parts.db.clone(),
            projection: key.clone(),
            stream: parts.config.stream.clone(),
        };
        Some(Self {
            layout: Layout::new(&prefix, partitioning.partitions),
            partitioning,
            me: member_name(),
            key,
            tables,
            gate,
            running: Vec::new(),
            progress_ready: false,
            parts,
            shutdown,
        })
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// How often a replica renews its lease and rebalances, and how long a lease lasts.
    fn timing(&self) -> (Duration, Duration) {
        let lease = (self.parts.config.ack_wait / 2).max(Duration::from_secs(1));
        (lease / 3, lease)
    }

    /// Runs until shutdown.
    pub async fn run(mut self) -> Exit {
        let state = self.parts.state.clone();
        state.set_waiting(Some("preparing the read model".into()));
        if let Some(exit) = self.prepare().await {
            if let Exit::Halted(reason) = &exit {
                error!(projection = %self.key, reason = %reason, "projection halted");
                state.halt(reason.clone());
                // Alive (liveness is fine, readiness says why) until shutdown; a restart retries.
                let mut shutdown = self.shutdown.clone();
                while !*shutdown.borrow() {
                    state.beat();
                    let _ = tokio::time::timeout(Duration::from_secs(1), shutdown.changed()).await;
                }
            }
            return exit;
        }
        info!(projection = %self.key, member = %self.me, partitions = self.layout.partitions, "sharing the partitions");
        let (tick, lease) = self.timing();
        // The lease is renewed on a task of its own, so a long round (partitions finishing their batches) never lets
        // it lapse.
        let renewal = {
            let (tables, me, mut shutdown) =
                (self.tables.clone(), self.me.clone(), self.shutdown.clone());
            tokio::spawn(async move {
                while !*shutdown.borrow() {
                    if let Err(e) = tables.renew(&me, lease).await {
                        warn!(projection = %tables.projection, error = %e, "cannot renew the lease");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(tick) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            })
        };
        while !self.stopping() {
            state.beat();
            if let Err(e) = self.round().await {
                warn!(projection = %self.key, error = %e, "cannot rebalance the partitions; retrying");
                state.set_waiting(Some(format!("database: {e}")));
            }
            self.summarize();
            self.report_progress().await;
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => {}
            }
        }
        renewal.abort();
        let owned = self.owned();
        self.stop_all().await;
        for p in owned {
            let _ = self.tables.hand_over(p, &self.me, "").await;
        }
        let _ = self.tables.leave(&self.me).await;
        // This replica's report goes with it.
        let js = async_nats::jetstream::new(self.parts.nats.clone());
        if let Ok(stream) = js.get_stream(PROGRESS_STREAM).await {
            let subject = progress_subject(
                &self.parts.config.projection.namespace,
                &self.parts.config.projection.name,
                &self.me,
            );
            let _ = stream.purge().filter(subject).await;
        }
        Exit::Shutdown
    }

    /// The projection-level preparation (schema, a rebuild), then the partitions' rows.
    async fn prepare(&mut self) -> Option<Exit> {
        let mut delay = Duration::from_millis(200);
        let mut permanent = 0;
        loop {
            let prepared = async {
                prepare::prepare(&self.parts.db, &self.parts.config, &self.key, true).await?;
                self.tables
                    .ensure(
                        self.layout.partitions,
                        &prepare::rebuild_token(&self.parts.config),
                    )
                    .await
            }
            .await;
            match prepared {
                Ok(()) => return None,
                Err(e) => {
                    // Three tries before halting: a race that can still lose once (two replicas upgrading the
                    // sidecar's tables; creating them is serialised) passes; a real schema error repeats, and halts
                    // the projection with the reason.
                    if classify(&e) == ErrorClass::Permanent {
                        permanent += 1;
                        if permanent >= 3 {
                            return Some(Exit::Halted(format!(
                                "cannot prepare the read model: {e}"
                            )));
                        }
                    }
                    warn!(projection = %self.key, error = %e, "database not ready; retrying");
                    self.parts.state.set_waiting(Some(format!("database: {e}")));
                }
            }
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
            if self.stopping() {
                return Some(Exit::Shutdown);
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// The partitions this replica's workers run.
    fn owned(&self) -> BTreeSet<u32> {
        self.running
            .iter()
            .flat_map(|r| r.partitions.iter().copied())
            .collect()
    }

    /// One round: stop what was lost, release above the share, claim below it, and run the workers on what is owned
    /// now (restarted only when that changed).
    async fn round(&mut self) -> Result<(), sqlx::Error> {
        let view = self.tables.view(&self.me, self.layout.partitions).await?;
        self.publish(&view);
        let running = self.owned();
        for p in running
            .iter()
            .filter(|p| view.owners.get(p) != Some(&self.me))
        {
            warn!(projection = %self.key, partition = p, "partition taken over by another replica; stopping it here");
        }
        let moves = rebalance(&view, self.layout.partitions);
        let mut target: BTreeSet<u32> = view
            .owners
            .iter()
            .filter(|(p, o)| **o == self.me && !moves.release.contains(p))
            .map(|(p, _)| *p)
            .collect();
        let ended = self.running.iter().any(|r| r.task.is_finished());
        if !moves.release.is_empty() {
            self.stop_all().await;
            for p in &moves.release {
                if self.tables.hand_over(*p, &self.me, "").await? {
                    info!(projection = %self.key, partition = p, "partition released");
                }
            }
        }
        for (p, seen) in &moves.claim {
            if self.tables.hand_over(*p, seen, &self.me).await? {
                info!(projection = %self.key, partition = p, from = %seen, "partition claimed");
                target.insert(*p);
            }
        }
        if target != self.owned() || ended {
            self.stop_all().await;
            self.start(&target);
        }
        Ok(())
    }

    /// Runs `workers` workers over `partitions`, dealt round-robin.
    fn start(&mut self, partitions: &BTreeSet<u32>) {
        let workers = self.partitioning.workers.max(1) as usize;
        let mut groups: Vec<Vec<u32>> = vec![Vec::new(); workers];
        for (i, p) in partitions.iter().enumerate() {
            groups[i % workers].push(*p);
        }
        let filters = &self.partitioning.filters;
        for (w, group) in groups.into_iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let key = format!("{}@{w}", self.key);
            let state = ProjectionState::new(&key);
            let (stop, stop_rx) = watch::channel(false);
            let report = Report::new(&key, self.parts.metrics.clone(), state.clone())
                .of_worker(self.parts.state.clone());
            let worker = Worker::new(&self.key, &self.me, self.layout.clone(), &group, filters);
            let projector = Projector::new(
                self.parts.config.clone(),
                self.parts.handlers.clone(),
                self.parts.db.clone(),
                None,
                self.parts.nats.clone(),
                report,
                stop_rx,
            )
            .worker(
                &self.key,
                worker,
                self.parts.handlers.clone(),
                self.gate.clone(),
            );
            let task = tokio::spawn(projector.run());
            self.running.push(Running {
                partitions: group,
                stop,
                task,
                state,
            });
        }
    }

    /// Stops every worker (each finishes or rolls back its batch).
    async fn stop_all(&mut self) {
        let stopping = std::mem::take(&mut self.running);
        for running in &stopping {
            let _ = running.stop.send(true);
        }
        for running in stopping {
            let mut task = running.task;
            if tokio::time::timeout(Duration::from_secs(30), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    /// Every partition's checkpoint, for the `wait` endpoint: the database's, or this replica's own where it is ahead.
    fn publish(&self, view: &View) {
        let mut checkpoints = view.checkpoints.clone();
        if let Some(known) = self.parts.state.partitions() {
            for p in self.owned() {
                if let (Some(local), Some(db)) =
                    (known.checkpoints.get(&p), checkpoints.get_mut(&p))
                {
                    *db = (*db).max(*local);
                }
            }
        }
        self.parts.state.set_partitions(Partitions {
            layout: self.layout.clone(),
            filters: self.partitioning.filters.clone(),
            checkpoints,
        });
    }

    /// Tells the operator (through the progress stream) which partitions this replica owns and its largest lag. Best
    /// effort: a NATS user that may not publish there only leaves the status without them.
    async fn report_progress(&mut self) {
        let js = async_nats::jetstream::new(self.parts.nats.clone());
        if !self.progress_ready {
            self.progress_ready = js.get_or_create_stream(progress_stream()).await.is_ok();
        }
        let progress = Progress {
            partitions: self.owned().into_iter().collect(),
            lag: u64::try_from(
                self.parts
                    .state
                    .lag
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
            .unwrap_or(0),
        };
        let subject = progress_subject(
            &self.parts.config.projection.namespace,
            &self.parts.config.projection.name,
            &self.me,
        );
        let Ok(body) = serde_json::to_vec(&progress) else {
            return;
        };
        match js.publish(subject, body.into()).await {
            Ok(ack) => {
                if let Err(e) = ack.await {
                    debug!(projection = %self.key, error = %e, "cannot report the partitions' progress");
                }
            }
            Err(e) => {
                debug!(projection = %self.key, error = %e, "cannot report the partitions' progress")
            }
        }
    }

    /// The projection's state from its workers': ready when every worker is; halted when one is; the checkpoint the
    /// lowest of them.
    fn summarize(&self) {
        let state = &self.parts.state;
        let mut waiting = None;
        let mut halted = None;
        for (w, running) in self.running.iter().enumerate() {
            if let Some(reason) = running.state.halted() {
                halted.get_or_insert(format!("worker {w}: {reason}"));
            }
            if let Some(reason) = running.state.waiting() {
                waiting.get_or_insert(format!("worker {w}: {reason}"));
            }
        }
        if let Some(reason) = halted {
            state.halt(reason);
        }
        state.set_waiting(waiting);
        let low = self
            .running
            .iter()
            .map(|r| r.state.checkpoint())
            .min()
            .unwrap_or_default();
        state.set_checkpoint(low);
        let lag = self
            .running
            .iter()
            .map(|r| r.state.lag.load(std::sync::atomic::Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        state.lag.store(lag, std::sync::atomic::Ordering::Relaxed);
        let owned: Vec<String> = self.owned().iter().map(u32::to_string).collect();
        state.set_filters(vec![format!("partitions {}", owned.join(","))]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(me: &str, live: &[&str], owners: &[(u32, &str)]) -> View {
        View {
            me: me.into(),
            live: live.iter().map(|s| s.to_string()).collect(),
            owners: owners.iter().map(|(p, o)| (*p, o.to_string())).collect(),
            checkpoints: BTreeMap::new(),
        }
    }

    #[test]
    fn a_lone_replica_claims_everything_free() {
        let v = view("a", &["a"], &[(0, ""), (1, ""), (2, "")]);
        let m = rebalance(&v, 3);
        assert_eq!(
            m.claim,
            vec![(0, "".into()), (1, "".into()), (2, "".into())]
        );
        assert!(m.release.is_empty());
    }

    #[test]
    fn a_new_replica_makes_the_others_release_their_surplus() {
        let owners: Vec<(u32, &str)> = (0..5).map(|p| (p, "a")).collect();
        let v = view("a", &["a", "b"], &owners);
        let m = rebalance(&v, 5);
        assert_eq!(m.release, vec![3, 4]);
        let v = view("b", &["a", "b"], &owners);
        assert_eq!(rebalance(&v, 5), Moves::default());
        let freed: Vec<(u32, &str)> = (0..5).map(|p| (p, if p < 3 { "a" } else { "" })).collect();
        let m = rebalance(&view("b", &["a", "b"], &freed), 5);
        assert_eq!(m.claim, vec![(3, "".into()), (4, "".into())]);
    }

    #[test]
    fn a_dead_replicas_partitions_are_claimed_free_ones_first() {
        let owners = [(0, "a"), (1, "dead"), (2, "dead"), (3, "")];
        let m = rebalance(&view("a", &["a"], &owners), 4);
        assert_eq!(
            m.claim,
            vec![(3, "".into()), (1, "dead".into()), (2, "dead".into())]
        );
    }

    #[test]
    fn shares_settle_fairly_whatever_the_order_of_rounds() {
        let members = ["a", "b", "c"];
        let mut owners: BTreeMap<u32, String> = (0..50).map(|p| (p, String::new())).collect();
        for round in 0..10 {
            for me in members.iter().cycle().skip(round).take(3) {
                let v = View {
                    me: me.to_string(),
                    live: members.iter().map(|s| s.to_string()).collect(),
                    owners: owners.clone(),
                    checkpoints: BTreeMap::new(),
                };
                let moves = rebalance(&v, 50);
                for p in moves.release {
                    owners.insert(p, String::new());
                }
                for (p, _) in moves.claim {
                    owners.insert(p, me.to_string());
                }
            }
        }
        let counts: Vec<usize> = members
            .iter()
            .map(|m| owners.values().filter(|o| o == m).count())
            .collect();
        assert_eq!(counts.iter().sum::<usize>(), 50);
        assert!(counts.iter().all(|c| *c == 16 || *c == 17), "{counts:?}");
    }
}
