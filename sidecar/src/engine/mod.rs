//! One projection: prepare the read model, catch up from the stream, then for each batch the source delivers —
//! plan it, apply it in one transaction with the checkpoint, settle the events at fault by the policy, acknowledge
//! what was committed, and report.
//!
//! The stages hand data down and never call back up:
//! [`source`] (the durable consumer, replay from the stream, acknowledgements) → [`plan`] (events and handlers →
//! statements, pure) → [`apply`] (one transaction with the checkpoint's compare-and-set; the event at fault isolated
//! with savepoints) → [`policy`] (retry, dead letter, skip or halt, pure) → [`report`] (metrics and readiness).
//!
//! Guarantees:
//! - Events at or below the checkpoint are acknowledged and skipped, so a redelivery never applies twice; the
//!   checkpoint moves only by compare-and-set in the read model's transaction, so a second processor (or a stale
//!   one) applies nothing.
//! - Transient failures (database or NATS unavailable, deadlock, serialization failure) roll back and retry the
//!   batch with capped backoff, the reason on `/readyz`; nothing is acknowledged meanwhile (in-progress
//!   acknowledgements keep the batch).
//! - A deterministic failure never loops: the event at fault meets its policy, and an event that cannot even be
//!   recorded halts the projection with the reason on `/readyz`, in metrics and in the log.

pub mod apply;
pub mod gate;
pub mod membership;
pub mod partitions;
pub mod plan;
pub mod policy;
pub mod prepare;
pub mod report;
pub mod source;
pub mod worker;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Message};
use projectionist_crds::projection::ErrorPolicy;
use projectionist_crds::sidecar_config::SidecarConfig;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::checkpoint::{Checkpoint, Cursor, Slot};
use crate::database::{Database, ErrorClass, classify};
use crate::dead_letter;
use crate::event::{self, Event};
use crate::handler::Handlers;
use crate::pipeline::Pipeline;
use apply::{Apply, BatchFailure, Committed, Outcome};
use gate::Gate;
use policy::{Backoff, Policy};
use report::Report;
use source::{Acks, Source, Transient};
use worker::Worker;

/// How a projection's loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop.
    Shutdown,
    /// Stopped at an event under the `halt` policy (or a read model that cannot be created).
    Halted(String),
    /// A partition's commit was fenced: another replica owns it now, or a rebuild restarted it.
    Lost,
}

/// What the loop does after a batch.
#[derive(Debug)]
enum Flow {
    /// Next batch.
    Continue,
    /// Stop.
    Exit(Exit),
    /// The checkpoint went back: resubscribe, which catches up from the stream.
    Resubscribe,
}

/// Everything one projection needs to run.
#[derive(Debug)]
pub struct Projector {
    config: SidecarConfig,
    source: Source,
    apply: Apply,
    policy: Policy,
    report: Report,
    /// NATS, for publishing dead letters.
    nats: async_nats::Client,
    shutdown: watch::Receiver<bool>,
    /// The checkpoint as this processor last saw it.
    checkpoint: Checkpoint,
    /// Retry delays for transient failures.
    backoff: Backoff,
    /// A worker of a partitioned projection: its partitions, read from the stream from their checkpoints.
    partition: Option<Worker>,
    /// For a worker: the turns of the projection's workers.
    gate: Option<Gate>,
}

impl Projector {
    /// Prepares a projector; nothing is contacted yet. `pipeline` is the PostgreSQL fast path, if usable.
    pub fn new(
        config: SidecarConfig,
        handlers: Handlers,
        db: Database,
        pipeline: Option<Pipeline>,
        nats: async_nats::Client,
        report: Report,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let key = report.key().to_string();
        let source = Source::new(
            jetstream::new(nats.clone()),
            &config.stream,
            &config.consumer,
            &config.priority_group,
            usize::try_from(config.batch.max_events).unwrap_or(500),
            config.batch.max_wait,
            shutdown.clone(),
            report.clone(),
        );
        Self {
            apply: Apply::new(db, handlers, pipeline, &key),
            partition: None,
            gate: None,
            policy: Policy::new(&config.on_error),
            backoff: Backoff::new(config.on_error.backoff_initial, config.on_error.backoff_max),
            source,
            report,
            nats,
            shutdown,
            checkpoint: Checkpoint {
                last_sequence: 0,
                rebuild_token: String::new(),
            },
            config,
        }
    }

    /// A worker of a partitioned projection (its partitions owned by this replica). `projection` is the projection's
    /// key, under which dead letters are recorded.
    pub fn worker(
        mut self,
        projection: &str,
        worker: Worker,
        handlers: Handlers,
        gate: Gate,
    ) -> Self {
        let db = self.apply.db().clone();
        self.apply = Apply::new(db, handlers, None, projection);
        self.partition = Some(worker);
        self.gate = Some(gate);
        self
    }

    /// The checkpoints a batch moves.
    fn cursor(&self) -> Cursor {
        match &self.partition {
            Some(worker) => worker.cursor.clone(),
            None => Cursor::One(Slot::projection(self.report.key()), self.checkpoint.clone()),
        }
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sleeps, or returns `true` early on shutdown. Keeps the heartbeat going.
    async fn pause(&mut self, d: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if self.stopping() {
                return true;
            }
            self.report.beat();
            let step = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .min(Duration::from_secs(1));
            if step.is_zero() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(step) => {}
                _ = self.shutdown.changed() => {}
            }
        }
    }

    /// Runs until shutdown or a halt.
    pub async fn run(mut self) -> Exit {
        // A restart (a new config) starts afresh.
        self.report.halted(None);
        let exit = self.run_inner().await;
        if let Exit::Halted(reason) = &exit {
            error!(projection = %self.report.key(), reason = %reason, "projection halted");
            self.report.halted(Some(reason.clone()));
            // Stay alive (liveness is fine, readiness says why) until shutdown; a restart retries.
            while !self.pause(Duration::from_secs(3600)).await {}
        }
        exit
    }

    async fn run_inner(&mut self) -> Exit {
        if let Some(exit) = self.prepare().await {
            return exit;
        }
        loop {
            match self.consume().await {
                Ok(exit) => return exit,
                Err(Transient(reason)) => {
                    warn!(projection = %self.report.key(), reason = %reason, "consumption interrupted; retrying");
                    self.report.error("nats");
                    self.report.waiting(Some(reason));
                    let d = self.backoff.next_delay();
                    if self.pause(d).await {
                        return Exit::Shutdown;
                    }
                }
            }
        }
    }

    /// Prepares the read model, retrying while the database is unavailable.
    async fn prepare(&mut self) -> Option<Exit> {
        let mut permanent_failures = 0;
        loop {
            if let Some(worker) = &mut self.partition {
                match worker.prepare(self.apply.db(), &self.config).await {
                    Ok(()) => {
                        self.backoff.reset();
                        self.report.checkpoint(worker.cursor.position());
                        return None;
                    }
                    Err(e) => {
                        warn!(projection = %self.report.key(), error = %e, "database not ready; retrying");
                        self.report.waiting(Some(format!("database: {e}")));
                        let d = self.backoff.next_delay();
                        if self.pause(d).await {
                            return Some(Exit::Shutdown);
                        }
                        continue;
                    }
                }
            }
            let prepared =
                prepare::prepare(self.apply.db(), &self.config, self.report.key(), false).await;
            match prepared {
                Ok(prepared) => {
                    self.backoff.reset();
                    self.checkpoint = prepared.checkpoint;
                    if prepared.rebuilding {
                        self.report.rebuild_started();
                    }
                    self.report.checkpoint(self.checkpoint.last_sequence);
                    info!(projection = %self.report.key(), checkpoint = self.checkpoint.last_sequence, "read model ready");
                    return None;
                }
                Err(e) => {
                    let class = classify(&e);
                    self.report.error(match class {
                        ErrorClass::Transient => "database_transient",
                        ErrorClass::Permanent => "database_permanent",
                    });
                    // Three tries before halting: a race that can still lose once (two replicas upgrading the sidecar's
                    // tables; creating them is serialised) passes; a real schema error repeats.
                    if class == ErrorClass::Permanent {
                        permanent_failures += 1;
                        if permanent_failures >= 3 {
                            return Some(Exit::Halted(format!(
                                "cannot prepare the read model: {e}"
                            )));
                        }
                    }
                    warn!(projection = %self.report.key(), error = %e, "database not ready; retrying");
                    self.report.waiting(Some(format!("database: {e}")));
                    let d = self.backoff.next_delay();
                    if self.pause(d).await {
                        return Some(Exit::Shutdown);
                    }
                }
            }
        }
    }

    /// Re-reads the checkpoint. `true` when it went back (the database lost commits, or was restored): the events
    /// after it must then be read again from the stream, since the consumer has moved past them.
    async fn reload_checkpoint(&mut self) -> Result<bool, sqlx::Error> {
        if let Some(worker) = &mut self.partition {
            return worker.reload(self.apply.db(), &self.config).await;
        }
        let token = self.checkpoint.rebuild_token.clone();
        let slot = Slot::projection(self.report.key());
        let cp = prepare::reload(self.apply.db(), &self.config, &slot, &token).await?;
        let went_back =
            cp.last_sequence < self.checkpoint.last_sequence || cp.rebuild_token != token;
        if went_back {
            warn!(
                projection = %self.report.key(),
                from = self.checkpoint.last_sequence,
                to = cp.last_sequence,
                "the database's checkpoint went back; catching up from it"
            );
        }
        self.checkpoint = cp;
        self.report.checkpoint(self.checkpoint.last_sequence);
        Ok(went_back)
    }

    /// Catches up from the stream, then consumes the durable consumer until shutdown, a halt, or an interruption.
    /// A partition reads the stream from its checkpoint on.
    async fn consume(&mut self) -> Result<Exit, Transient> {
        self.report.waiting(Some("connecting to NATS".into()));
        if let Some(worker) = &self.partition {
            self.report.filters(worker.filters());
            let live = self.source.tail(&worker.reads()).await?.read_ahead();
            return self.consume_live(live).await;
        }
        let opened = self.source.open().await?;
        self.report.filters(opened.filters());

        let delivered = opened.delivered();
        if self.checkpoint.last_sequence < delivered
            && let Some(mut replay) = self
                .source
                .replay(&opened, self.checkpoint.last_sequence, delivered)
                .await?
        {
            while let Some(batch) = replay.next_batch().await? {
                let flow = self.process(&batch, None, Acks::None).await;
                self.report.rebuild_replayed(batch.len());
                match flow {
                    Flow::Continue => {}
                    Flow::Exit(exit) => return Ok(exit),
                    Flow::Resubscribe => {
                        return Err(Transient("the checkpoint went back; catching up".into()));
                    }
                }
            }
            if self.stopping() {
                return Ok(Exit::Shutdown);
            }
        }
        if self.report.rebuild_finished() {
            info!(projection = %self.report.key(), checkpoint = self.checkpoint.last_sequence, "rebuild replay finished");
            self.source
                .record_rebuilt(&opened, &self.checkpoint.rebuild_token)
                .await;
        }

        let live = self.source.subscribe(opened).await?.read_ahead();
        self.consume_live(live).await
    }

    /// Applies what `live` delivers until shutdown, a halt, or an interruption.
    async fn consume_live(&mut self, mut live: source::ReadAhead) -> Result<Exit, Transient> {
        self.report.waiting(None);
        self.backoff.reset();
        info!(projection = %self.report.key(), checkpoint = self.checkpoint.last_sequence, "consuming");
        loop {
            let Some(next) = live.next_batch().await? else {
                return Ok(Exit::Shutdown);
            };
            if self.stopping() {
                // A batch read ahead is left unacknowledged: it is delivered again after the restart.
                return Ok(Exit::Shutdown);
            }
            let batch = next.batch;
            match self
                .process(&batch.messages, Some(next.events), live.acks())
                .await
            {
                Flow::Continue => {}
                Flow::Exit(exit) => return Ok(exit),
                Flow::Resubscribe => {
                    return Err(Transient("the checkpoint went back; catching up".into()));
                }
            }
            if let Some(pending) = batch
                .messages
                .last()
                .and_then(|m| m.info().ok())
                .map(|i| i.pending)
            {
                self.report.lag(pending);
            }
            if let Some(reason) = batch.interrupted {
                return Err(Transient(reason));
            }
        }
    }

    /// Applies a batch (its events decoded already, or now) until it commits (retrying transient failures), then
    /// acknowledges what was committed.
    async fn process(
        &mut self,
        batch: &[Message],
        decoded: Option<Vec<Result<Event, event::DecodeError>>>,
        acks: Acks,
    ) -> Flow {
        let sequenced = source::sequenced(batch);
        let mut decoded = decoded.unwrap_or_else(|| source::decode(batch));
        let items: Vec<source::Incoming<'_>> = sequenced
            .iter()
            .map(|(seq, m)| source::incoming(*seq, m))
            .collect();
        loop {
            let started = Instant::now();
            // A retry decodes again: the first try may have moved the events on to the apply step.
            let events = std::mem::take(&mut decoded);
            let events = if events.len() == items.len() {
                events
            } else {
                source::decode(batch)
            };
            let turn = match &self.gate {
                Some(gate) => {
                    let mut turn = gate.turn().await;
                    self.apply.swap_pipeline(turn.pipeline.take());
                    Some(turn)
                }
                None => None,
            };
            let applied = self.apply_batch(&items, events).await;
            if let Some(mut turn) = turn {
                turn.pipeline = self.apply.swap_pipeline(None);
            }
            match applied {
                Ok(Some(Outcome::Committed(committed))) => {
                    self.backoff.reset();
                    let upto = committed.upto;
                    self.committed(committed, started).await;
                    acks.committed(&sequenced, upto).await;
                    return Flow::Continue;
                }
                Ok(None) => {
                    acks.committed(&sequenced, self.checkpoint.last_sequence)
                        .await;
                    return Flow::Continue;
                }
                Ok(Some(Outcome::Halted { committed, reason })) => {
                    if let Some(committed) = committed {
                        let upto = committed.upto;
                        self.committed(committed, started).await;
                        acks.committed(&sequenced, upto).await;
                    }
                    return Flow::Exit(Exit::Halted(reason));
                }
                Ok(Some(Outcome::Fenced)) if self.partition.is_some() => {
                    // The partition has another owner now (or was rebuilt): its coordinator decides what next.
                    warn!(projection = %self.report.key(), "the partition's row moved on without this replica; stopping here");
                    self.report.error("fenced");
                    return Flow::Exit(Exit::Lost);
                }
                Ok(Some(Outcome::Fenced)) => {
                    warn!(projection = %self.report.key(), "checkpoint moved by another processor; re-reading it");
                    self.report.error("fenced");
                    match self.reload_checkpoint().await {
                        Ok(true) => return Flow::Resubscribe,
                        Ok(false) => {}
                        Err(e) => {
                            warn!(projection = %self.report.key(), error = %e, "cannot re-read the checkpoint")
                        }
                    }
                }
                Err(Transient(reason)) => {
                    warn!(projection = %self.report.key(), reason = %reason, "batch rolled back; retrying");
                    self.report.error("database_transient");
                    self.report.waiting(Some(reason));
                    acks.in_progress(&sequenced).await;
                    let d = self.backoff.next_delay();
                    if self.pause(d).await {
                        acks.hand_back(&sequenced).await;
                        return Flow::Exit(Exit::Shutdown);
                    }
                    match self.reload_checkpoint().await {
                        Ok(true) => return Flow::Resubscribe,
                        Ok(false) => self.report.waiting(None),
                        Err(e) => {
                            debug!(projection = %self.report.key(), error = %e, "checkpoint not readable yet")
                        }
                    }
                }
            }
        }
    }

    /// Decodes the events after the checkpoint and applies them: the whole batch at once, or event by event when
    /// one is at fault. `None`: every event was already applied.
    async fn apply_batch(
        &mut self,
        items: &[source::Incoming<'_>],
        decoded: Vec<Result<Event, event::DecodeError>>,
    ) -> Result<Option<Outcome>, Transient> {
        let cursor = self.cursor();
        let (todo, decoded): (Vec<&source::Incoming>, Vec<_>) = items
            .iter()
            .zip(decoded)
            .filter(|(i, _)| cursor.pending(i.seq, i.subject))
            .unzip();
        if todo.is_empty() {
            return Ok(None);
        }
        let decoded = if decoded.iter().all(Result::is_ok) {
            let events: Vec<Event> = decoded.into_iter().flatten().collect();
            match self.apply.batch(&cursor, &events).await {
                Ok(outcome) => return Ok(Some(outcome)),
                Err(BatchFailure::Transient(reason)) => return Err(Transient(reason)),
                Err(BatchFailure::AtFault(e)) => {
                    debug!(projection = %self.report.key(), error = %e, "batch failed; isolating events");
                }
            }
            events.into_iter().map(Ok).collect()
        } else {
            decoded
        };
        let paired: Vec<_> = todo.into_iter().zip(decoded).collect();
        self.apply
            .isolated(&cursor, &paired, &self.policy, &self.report)
            .await
            .map(Some)
    }

    /// Bookkeeping after a commit: the checkpoint, metrics, dead-letter publishing.
    async fn committed(&mut self, committed: Committed, started: Instant) {
        match &mut self.partition {
            Some(worker) => {
                worker.cursor.apply(&committed.moves);
                for m in &committed.moves {
                    if let Some(p) = m.partition {
                        self.report.partition_checkpoint(p, m.to);
                    }
                }
                self.report.checkpoint(worker.cursor.position());
            }
            None => {
                self.checkpoint.last_sequence = committed.upto;
                self.report.checkpoint(committed.upto);
            }
        }
        self.report.committed(committed.counts, started.elapsed());
        for letter in &committed.dead {
            self.report.dead_letter(letter.policy);
            if letter.policy == ErrorPolicy::DeadLetter
                && let Err(e) = dead_letter::publish(
                    &self.nats,
                    &self.config.on_error.dead_letter_subject,
                    self.report.key(),
                    letter,
                )
                .await
            {
                // The dead-letter table holds the record either way.
                warn!(projection = %self.report.key(), sequence = letter.sequence, error = %e, "cannot publish a dead letter");
                self.report.error("nats");
            }
        }
        debug!(projection = %self.report.key(), checkpoint = committed.upto, applied = committed.counts.applied, "batch committed");
    }
}
