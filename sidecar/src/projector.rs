//! One projection's loop: fetch a batch → decode → run the handlers in one transaction → advance the checkpoint
//! with a compare-and-set in that transaction → commit → acknowledge.
//!
//! - Events at or below the checkpoint are acknowledged and skipped, so a redelivery never applies twice.
//! - Before consuming (at start, and whenever the pull subscription is recreated) the projection catches up: when
//!   the consumer has delivered beyond the checkpoint (a restored backup, a new database, a rebuild, or messages
//!   lost with a dropped subscription), the events from the checkpoint on are read straight from the stream with an
//!   ordered consumer and applied in order. No event is skipped because the consumer had already moved on.
//! - A batch is first applied in one go. If a statement fails for a reason that is not transient, the batch is
//!   rolled back and applied again with a savepoint around each event, so the failing event is isolated, retried
//!   up to `maxAttempts`, and handled by the policy (`halt`, `deadLetter`, `skip`).
//! - Transient failures (database or NATS unavailable, deadlock, serialization failure) roll back and retry the
//!   batch with capped backoff; nothing is acknowledged meanwhile (in-progress acknowledgements keep the batch).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind, stream::Stream as JsStream};
use futures::StreamExt;
use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_crds::sidecar_config::SidecarConfig;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::checkpoint::{self, Checkpoint};
use crate::database::{self, Database, ErrorClass, Tx, classify};
use crate::dead_letter::{self, DeadLetter};
use crate::event::{self, DecodeError, Event};
use crate::handler::{self, BindError, Handlers};
use crate::merge;
use crate::pipeline::{self, Pipeline};
use crate::status::{Metrics, PolicyLabel, ProjectionLabel, ProjectionState};

/// How a projection's loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop.
    Shutdown,
    /// Stopped at an event under the `halt` policy (or a read model that cannot be created).
    Halted(String),
}

/// One message of a batch.
#[derive(Debug, Clone)]
struct Incoming<'a> {
    seq: u64,
    subject: &'a str,
    headers: Option<&'a HeaderMap>,
    payload: &'a [u8],
}

/// What applying a batch came to.
#[derive(Debug)]
enum Applied {
    /// Committed up to this sequence (every event of the batch is at or below it).
    Committed(u64),
    /// Committed up to the first sequence; stopped at an event.
    Halted(u64, String),
    /// Another processor moved the checkpoint; nothing was applied.
    Fenced,
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

/// A failure worth retrying the batch for.
#[derive(Debug)]
struct Transient(String);

/// A statement failure within one event.
enum StepError {
    Db(sqlx::Error),
    Bind(BindError),
    /// The pipelined fast path failed (`None`: it is not set up).
    Pipeline(Option<tokio_postgres::Error>),
}

/// Exponential backoff between `initial` and `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The next delay (doubling, capped).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to `initial`.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Everything one projection needs to run.
#[derive(Debug)]
pub struct Projector {
    /// The resolved config.
    config: SidecarConfig,
    /// `<namespace>/<name>`.
    key: String,
    /// Metric label.
    label: ProjectionLabel,
    /// Parsed handlers.
    handlers: Handlers,
    /// The read model's database.
    db: Database,
    /// NATS, for dead-letter publishing.
    nats: async_nats::Client,
    /// JetStream.
    js: jetstream::Context,
    /// Shared with the admin server.
    state: Arc<ProjectionState>,
    /// Metrics.
    metrics: Arc<Metrics>,
    /// Becomes `true` on shutdown.
    shutdown: watch::Receiver<bool>,
    /// The checkpoint as this processor last saw it.
    checkpoint: Checkpoint,
    /// Retry delays for transient failures.
    backoff: Backoff,
    /// The pipelined fast path (Postgres over plain TCP).
    pipeline: Option<Pipeline>,
    /// Handlers whose events can be merged into multi-row statements on the fast path, by event type.
    mergeable: HashMap<String, merge::Mergeable>,
}

impl Projector {
    /// Prepares a projector; nothing is contacted yet.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: SidecarConfig,
        handlers: Handlers,
        db: Database,
        nats: async_nats::Client,
        state: Arc<ProjectionState>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let key = format!("{}/{}", config.projection.namespace, config.projection.name);
        let backoff = Backoff::new(config.on_error.backoff_initial, config.on_error.backoff_max);
        Self {
            label: ProjectionLabel {
                projection: key.clone(),
            },
            key,
            handlers,
            db,
            js: jetstream::new(nats.clone()),
            nats,
            state,
            metrics,
            shutdown,
            checkpoint: Checkpoint {
                last_sequence: 0,
                rebuild_token: String::new(),
            },
            backoff,
            config,
            pipeline: None,
            mergeable: HashMap::new(),
        }
    }

    /// Uses the pipelined fast path for batches (Postgres only).
    pub fn with_pipeline(mut self, pipeline: Option<Pipeline>) -> Self {
        self.pipeline = pipeline.filter(|_| self.db.driver == Driver::Postgres);
        if self.pipeline.is_some() {
            self.mergeable = self
                .handlers
                .iter()
                .filter_map(|(event_type, statements)| match statements {
                    [one] => merge::analyze(&one.sql, one.params.len())
                        .map(|m| (event_type.to_string(), m)),
                    _ => None,
                })
                .collect();
        }
        self
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
            self.state.beat();
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
        self.metrics.halted.get_or_create(&self.label).set(0);
        let exit = self.run_inner().await;
        if let Exit::Halted(reason) = &exit {
            error!(projection = %self.key, reason = %reason, "projection halted");
            self.state.halt(reason.clone());
            self.metrics.halted.get_or_create(&self.label).set(1);
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
                    warn!(projection = %self.key, reason = %reason, "consumption interrupted; retrying");
                    self.metrics.error(&self.key, "nats");
                    self.state.set_waiting(Some(reason));
                    let d = self.backoff.next_delay();
                    if self.pause(d).await {
                        return Exit::Shutdown;
                    }
                }
            }
        }
    }

    /// Creates the sidecar's tables and the read model, reads the checkpoint and performs a pending rebuild.
    async fn prepare(&mut self) -> Option<Exit> {
        let mut permanent_failures = 0;
        loop {
            match self.try_prepare().await {
                Ok(()) => {
                    self.backoff.reset();
                    return None;
                }
                Err(e) => {
                    let class = classify(&e);
                    self.metrics.error(
                        &self.key,
                        if class == ErrorClass::Transient {
                            "database_transient"
                        } else {
                            "database_permanent"
                        },
                    );
                    // Concurrent `CREATE TABLE IF NOT EXISTS` can collide once; a real schema error repeats.
                    if class == ErrorClass::Permanent {
                        permanent_failures += 1;
                        if permanent_failures >= 3 {
                            return Some(Exit::Halted(format!(
                                "cannot prepare the read model: {e}"
                            )));
                        }
                    }
                    warn!(projection = %self.key, error = %e, "database not ready; retrying");
                    self.state.set_waiting(Some(format!("database: {e}")));
                    let d = self.backoff.next_delay();
                    if self.pause(d).await {
                        return Some(Exit::Shutdown);
                    }
                }
            }
        }
    }

    async fn run_schema(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        for ddl in self.db.own_tables().iter().chain(self.config.schema.iter()) {
            database::execute_plain(&mut tx, ddl).await?;
        }
        tx.commit().await?;
        self.db.migrate().await
    }

    async fn try_prepare(&mut self) -> Result<(), sqlx::Error> {
        self.run_schema().await?;
        let token = self
            .config
            .rebuild
            .as_ref()
            .map(|r| r.token.clone())
            .unwrap_or_default();
        let mut tx = self.db.begin().await?;
        let (current, created) =
            checkpoint::load_or_init(&self.db, &mut tx, &self.key, &self.config.stream, &token)
                .await?;
        if created || current.rebuild_token == token {
            tx.commit().await?;
            self.checkpoint = current;
        } else {
            info!(projection = %self.key, from = %current.rebuild_token, to = %token, "rebuild: resetting the read model");
            for statement in self.config.rebuild.iter().flat_map(|r| r.reset.iter()) {
                database::execute_plain(&mut tx, statement).await?;
            }
            if !checkpoint::restart(&self.db, &mut tx, &self.key, &current, &token).await? {
                // Another processor rebuilt concurrently; read again.
                tx.rollback().await?;
                return Box::pin(self.try_prepare()).await;
            }
            tx.commit().await?;
            self.run_schema().await?;
            self.checkpoint = Checkpoint {
                last_sequence: 0,
                rebuild_token: token,
            };
            self.state.rebuilding.store(true, Ordering::Relaxed);
            self.metrics.rebuilding.get_or_create(&self.label).set(1);
            self.metrics
                .rebuild_replayed
                .get_or_create(&self.label)
                .set(0);
        }
        self.publish_checkpoint();
        info!(projection = %self.key, checkpoint = self.checkpoint.last_sequence, "read model ready");
        Ok(())
    }

    fn publish_checkpoint(&self) {
        let seq = self.checkpoint.last_sequence;
        self.state.set_checkpoint(seq);
        self.metrics
            .checkpoint
            .get_or_create(&self.label)
            .set(i64::try_from(seq).unwrap_or(i64::MAX));
    }

    /// Re-reads the checkpoint. `true` when it went back (the database lost commits, or was restored): the events
    /// after it must then be read again from the stream, since the consumer has moved past them.
    async fn reload_checkpoint(&mut self) -> Result<bool, sqlx::Error> {
        let token = self.checkpoint.rebuild_token.clone();
        let mut tx = self.db.begin().await?;
        let (cp, _) =
            checkpoint::load_or_init(&self.db, &mut tx, &self.key, &self.config.stream, &token)
                .await?;
        tx.commit().await?;
        let went_back =
            cp.last_sequence < self.checkpoint.last_sequence || cp.rebuild_token != token;
        if went_back {
            warn!(
                projection = %self.key,
                from = self.checkpoint.last_sequence,
                to = cp.last_sequence,
                "the database's checkpoint went back; catching up from it"
            );
        }
        self.checkpoint = cp;
        self.publish_checkpoint();
        Ok(went_back)
    }

    /// Tells the operator the rebuild is done: the rebuild token goes into the consumer's metadata. Best effort — a
    /// sidecar whose NATS user may not update consumers only logs it (the Projection then keeps `Rebuilding`).
    async fn report_rebuilt(
        &self,
        stream: &jetstream::stream::Stream,
        info: &jetstream::consumer::Info,
    ) {
        let mut config = info.config.clone();
        let token = self.checkpoint.rebuild_token.clone();
        config.metadata.insert(
            projectionist_crds::consumer::METADATA_REBUILT_TOKEN.to_string(),
            token,
        );
        if let Err(e) = stream.update_consumer(config).await {
            warn!(projection = %self.key, error = %e, "could not record the finished rebuild on the consumer");
        }
    }

    /// Catches up from the stream, then consumes the durable consumer until shutdown, a halt, or an interruption.
    async fn consume(&mut self) -> Result<Exit, Transient> {
        self.state.set_waiting(Some("connecting to NATS".into()));
        let stream = self
            .js
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| Transient(format!("stream: {e}")))?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&self.config.consumer)
            .await
            .map_err(|e| Transient(format!("consumer: {e}")))?;
        let info = consumer.cached_info().clone();
        let mut filters = info.config.filter_subjects.clone();
        if !info.config.filter_subject.is_empty() {
            filters.push(info.config.filter_subject.clone());
        }
        self.state.set_filters(filters);

        let delivered = info.delivered.stream_sequence;
        if self.checkpoint.last_sequence < delivered
            && let Some(exit) = self.catch_up(&stream, &info, delivered).await?
        {
            return Ok(exit);
        }
        if self.state.rebuilding.swap(false, Ordering::Relaxed) {
            self.metrics.rebuilding.get_or_create(&self.label).set(0);
            info!(projection = %self.key, checkpoint = self.checkpoint.last_sequence, "rebuild replay finished");
            self.report_rebuilt(&stream, &info).await;
        }

        let max_events = usize::try_from(self.config.batch.max_events).unwrap_or(500);
        let mut messages = consumer
            .stream()
            .group(self.config.priority_group.clone())
            .max_messages_per_batch(max_events)
            .expires(Duration::from_secs(5))
            .heartbeat(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| Transient(format!("subscribing: {e}")))?;
        self.state.set_waiting(None);
        self.backoff.reset();
        info!(projection = %self.key, checkpoint = self.checkpoint.last_sequence, "consuming");

        loop {
            let mut batch: Vec<jetstream::Message> = Vec::new();
            let mut interrupted = None;
            // Wait for the first message, beating the heartbeat while idle.
            loop {
                if self.stopping() {
                    return Ok(Exit::Shutdown);
                }
                self.state.beat();
                tokio::select! {
                    next = messages.next() => match next {
                        Some(Ok(m)) => { batch.push(m); break; }
                        Some(Err(e)) => return Err(Transient(format!("pull: {e}"))),
                        None => return Err(Transient("pull subscription ended".into())),
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = self.shutdown.changed() => {}
                }
            }
            let deadline = tokio::time::Instant::now() + self.config.batch.max_wait;
            while batch.len() < max_events {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Err(_) => break,
                    Ok(Some(Ok(m))) => batch.push(m),
                    Ok(Some(Err(e))) => {
                        interrupted = Some(format!("pull: {e}"));
                        break;
                    }
                    Ok(None) => {
                        interrupted = Some("pull subscription ended".into());
                        break;
                    }
                }
            }
            match self.process(&batch, true).await {
                Flow::Continue => {}
                Flow::Exit(exit) => return Ok(exit),
                Flow::Resubscribe => {
                    return Err(Transient("the checkpoint went back; catching up".into()));
                }
            }
            if let Some(pending) = batch.last().and_then(|m| m.info().ok()).map(|i| i.pending) {
                self.state.lag.store(
                    i64::try_from(pending).unwrap_or(i64::MAX),
                    Ordering::Relaxed,
                );
                self.metrics
                    .lag
                    .get_or_create(&self.label)
                    .set(i64::try_from(pending).unwrap_or(i64::MAX));
            }
            if let Some(reason) = interrupted {
                // Dropping the subscription may lose buffered messages; the catch-up on resubscription reads them
                // from the stream.
                return Err(Transient(reason));
            }
        }
    }

    /// Applies events from the checkpoint up to `upto` by reading the stream with an ordered consumer.
    async fn catch_up(
        &mut self,
        stream: &JsStream,
        durable: &jetstream::consumer::Info,
        upto: u64,
    ) -> Result<Option<Exit>, Transient> {
        let deliver_policy = if self.checkpoint.last_sequence == 0 {
            match &durable.config.deliver_policy {
                p @ (DeliverPolicy::All
                | DeliverPolicy::ByStartSequence { .. }
                | DeliverPolicy::ByStartTime { .. }) => *p,
                other => {
                    warn!(projection = %self.key, policy = ?other, "cannot replay before the consumer's start position; continuing from it");
                    return Ok(None);
                }
            }
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: self.checkpoint.last_sequence + 1,
            }
        };
        info!(projection = %self.key, from = self.checkpoint.last_sequence, upto, "catching up from the stream");
        self.state.set_waiting(Some(format!(
            "catching up from sequence {} to {upto}",
            self.checkpoint.last_sequence
        )));
        let mut filters = durable.config.filter_subjects.clone();
        if !durable.config.filter_subject.is_empty() {
            filters.push(durable.config.filter_subject.clone());
        }
        let (filter_subject, filter_subjects) = match filters.as_slice() {
            [one] => (one.clone(), Vec::new()),
            _ => (String::new(), filters),
        };
        let mut ordered = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy,
                filter_subject,
                filter_subjects,
                ..Default::default()
            })
            .await
            .map_err(|e| Transient(format!("catch-up consumer: {e}")))?;
        let pending = ordered
            .info()
            .await
            .map_err(|e| Transient(format!("catch-up consumer: {e}")))?
            .num_pending;
        if pending == 0 {
            return Ok(None);
        }
        let mut messages = ordered
            .messages()
            .await
            .map_err(|e| Transient(format!("catch-up: {e}")))?;
        let max_events = usize::try_from(self.config.batch.max_events).unwrap_or(500);
        let mut done = false;
        while !done {
            let mut batch = Vec::new();
            while batch.len() < max_events {
                if self.stopping() {
                    return Ok(Some(Exit::Shutdown));
                }
                self.state.beat();
                let next = tokio::time::timeout(Duration::from_secs(30), messages.next())
                    .await
                    .map_err(|_| Transient("catch-up: no message within 30s".into()))?;
                let m = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(Transient(format!("catch-up: {e}"))),
                    None => return Err(Transient("catch-up ended early".into())),
                };
                let info = m.info().map_err(|e| Transient(format!("catch-up: {e}")))?;
                let (seq, remaining) = (info.stream_sequence, info.pending);
                batch.push(m);
                if seq >= upto || remaining == 0 {
                    done = true;
                    break;
                }
            }
            let replayed = batch.len();
            match self.process(&batch, false).await {
                Flow::Continue => {}
                Flow::Exit(exit) => return Ok(Some(exit)),
                Flow::Resubscribe => {
                    return Err(Transient("the checkpoint went back; catching up".into()));
                }
            }
            if self.state.rebuilding.load(Ordering::Relaxed) {
                self.metrics
                    .rebuild_replayed
                    .get_or_create(&self.label)
                    .inc_by(i64::try_from(replayed).unwrap_or(0));
            }
        }
        Ok(None)
    }

    /// Applies a batch of messages and, for the durable consumer (`ack`), acknowledges what was committed.
    async fn process(&mut self, batch: &[jetstream::Message], ack: bool) -> Flow {
        let sequenced: Vec<(u64, &jetstream::Message)> = batch
            .iter()
            .filter_map(|m| m.info().ok().map(|i| (i.stream_sequence, m)))
            .collect();
        let items: Vec<Incoming<'_>> = sequenced.iter().map(|(seq, m)| incoming(m, *seq)).collect();
        let acks = if ack {
            Some(sequenced.as_slice())
        } else {
            None
        };
        self.process_incoming(items, acks).await
    }

    async fn process_incoming(
        &mut self,
        items: Vec<Incoming<'_>>,
        acks: Option<&[(u64, &jetstream::Message)]>,
    ) -> Flow {
        loop {
            let started = Instant::now();
            match self.apply(&items).await {
                Ok(Applied::Committed(upto)) => {
                    self.backoff.reset();
                    self.metrics
                        .batch_duration
                        .get_or_create(&self.label)
                        .observe(started.elapsed().as_secs_f64());
                    ack_upto(acks, upto).await;
                    return Flow::Continue;
                }
                Ok(Applied::Halted(upto, reason)) => {
                    ack_upto(acks, upto).await;
                    return Flow::Exit(Exit::Halted(reason));
                }
                Ok(Applied::Fenced) => {
                    warn!(projection = %self.key, "checkpoint moved by another processor; re-reading it");
                    self.metrics.error(&self.key, "fenced");
                    match self.reload_checkpoint().await {
                        Ok(true) => return Flow::Resubscribe,
                        Ok(false) => {}
                        Err(e) => {
                            warn!(projection = %self.key, error = %e, "cannot re-read the checkpoint")
                        }
                    }
                }
                Err(Transient(reason)) => {
                    warn!(projection = %self.key, reason = %reason, "batch rolled back; retrying");
                    self.metrics.error(&self.key, "database_transient");
                    self.state.set_waiting(Some(reason));
                    for (_, m) in acks.unwrap_or_default() {
                        let _ = m.ack_with(AckKind::Progress).await;
                    }
                    let d = self.backoff.next_delay();
                    if self.pause(d).await {
                        for (_, m) in acks.unwrap_or_default() {
                            let _ = m.ack_with(AckKind::Nak(None)).await;
                        }
                        return Flow::Exit(Exit::Shutdown);
                    }
                    match self.reload_checkpoint().await {
                        Ok(true) => return Flow::Resubscribe,
                        Ok(false) => self.state.set_waiting(None),
                        Err(e) => {
                            debug!(projection = %self.key, error = %e, "checkpoint not readable yet")
                        }
                    }
                }
            }
        }
    }

    async fn apply(&mut self, items: &[Incoming<'_>]) -> Result<Applied, Transient> {
        let todo: Vec<&Incoming> = items
            .iter()
            .filter(|i| i.seq > self.checkpoint.last_sequence)
            .collect();
        if todo.is_empty() {
            return Ok(Applied::Committed(self.checkpoint.last_sequence));
        }
        let decoded: Vec<(&Incoming<'_>, Result<Event, DecodeError>)> = todo
            .iter()
            .map(|i| (*i, event::decode(i.seq, i.subject, i.headers, i.payload)))
            .collect();
        if decoded.iter().all(|(_, d)| d.is_ok()) {
            match self.apply_fast(&decoded).await {
                Ok(applied) => return Ok(applied),
                Err(StepError::Db(e)) if classify(&e) == ErrorClass::Transient => {
                    return Err(Transient(format!("database: {e}")));
                }
                Err(StepError::Db(e)) => {
                    debug!(projection = %self.key, error = %e, "batch failed; isolating events");
                }
                Err(StepError::Bind(e)) => {
                    debug!(projection = %self.key, error = %e, "batch failed; isolating events");
                }
                Err(StepError::Pipeline(Some(e))) if pipeline::is_transient(&e) => {
                    return Err(Transient(format!("database: {e}")));
                }
                Err(StepError::Pipeline(e)) => {
                    debug!(projection = %self.key, error = ?e, "batch failed; isolating events");
                }
            }
        }
        self.apply_isolated(&decoded).await
    }

    async fn run_event(&self, tx: &mut Tx, event: &Event) -> Result<bool, StepError> {
        let Some(statements) = self.handlers.for_type(&event.type_) else {
            return Ok(false);
        };
        for statement in statements {
            let values = handler::bind_all(statement, event).map_err(StepError::Bind)?;
            if self.db.driver == Driver::Postgres {
                // Postgres prepares a statement with fixed parameter types, and sqlx caches it by its text: a
                // statement gets one prepared form per combination of value types, so a number and a string bound
                // to the same parameter by different events never share (and corrupt) one.
                let sql = format!(
                    "{}\n/* projectionist:{} */",
                    statement.sql,
                    type_signature(&values)
                );
                database::execute(tx, &sql, values)
                    .await
                    .map_err(StepError::Db)?;
            } else {
                database::execute(tx, &statement.sql, values)
                    .await
                    .map_err(StepError::Db)?;
            }
        }
        Ok(true)
    }

    /// The whole batch in one transaction, no savepoints.
    async fn apply_fast(
        &mut self,
        decoded: &[(&Incoming<'_>, Result<Event, DecodeError>)],
    ) -> Result<Applied, StepError> {
        if self.pipeline.is_some() {
            return self.apply_pipelined(decoded).await;
        }
        let mut tx = self.db.begin().await.map_err(StepError::Db)?;
        let (mut applied, mut ignored) = (0u64, 0u64);
        let mut upto = self.checkpoint.last_sequence;
        for (inc, ev) in decoded {
            if let Ok(ev) = ev {
                if self.run_event(&mut tx, ev).await? {
                    applied += 1;
                } else {
                    ignored += 1;
                }
            }
            upto = inc.seq;
        }
        self.commit(tx, upto, applied, ignored, Vec::new())
            .await
            .map_err(StepError::Db)
    }

    /// The fast path on Postgres: every statement of the batch pipelined in one transaction.
    async fn apply_pipelined(
        &mut self,
        decoded: &[(&Incoming<'_>, Result<Event, DecodeError>)],
    ) -> Result<Applied, StepError> {
        /// One statement of the plan: a handler statement for one event, or a merged run of events.
        enum Step<'s> {
            Single(&'s str, Vec<handler::Bound>),
            Merged(&'s merge::Mergeable, usize, Vec<handler::Bound>),
        }
        /// Consecutive events of one mergeable handler.
        struct Run<'s> {
            merge: &'s merge::Mergeable,
            event_type: &'s str,
            rows: Vec<Vec<handler::Bound>>,
            keys: HashSet<String>,
        }
        fn flush<'s>(run: &mut Option<Run<'s>>, plan: &mut Vec<Step<'s>>) {
            let Some(run) = run.take() else { return };
            let mut rows = run.rows.into_iter();
            for size in merge::chunks(rows.len()) {
                let values: Vec<handler::Bound> = rows.by_ref().take(size).flatten().collect();
                plan.push(Step::Merged(run.merge, size, values));
            }
        }

        let (mut applied, mut ignored) = (0u64, 0u64);
        let mut upto = self.checkpoint.last_sequence;
        let mut plan: Vec<Step> = Vec::new();
        let mut run: Option<Run> = None;
        for (inc, ev) in decoded {
            upto = inc.seq;
            let Ok(ev) = ev else { continue };
            let Some(statements) = self.handlers.for_type(&ev.type_) else {
                ignored += 1;
                continue;
            };
            applied += 1;
            if let Some((event_type, merge)) = self.mergeable.get_key_value(ev.type_.as_str()) {
                let values = handler::bind_all(&statements[0], ev).map_err(StepError::Bind)?;
                let key = merge.key.as_ref().map(|k| {
                    k.iter()
                        .map(|i| format!("{:?}", values.get(*i)))
                        .collect::<Vec<_>>()
                        .join("\u{1f}")
                });
                let continues = run.as_ref().is_some_and(|r| {
                    r.event_type == event_type && key.as_ref().is_none_or(|k| !r.keys.contains(k))
                });
                if !continues {
                    flush(&mut run, &mut plan);
                    run = Some(Run {
                        merge,
                        event_type,
                        rows: Vec::new(),
                        keys: HashSet::new(),
                    });
                }
                if let Some(r) = run.as_mut() {
                    r.rows.push(values);
                    if let Some(k) = key {
                        r.keys.insert(k);
                    }
                }
                continue;
            }
            flush(&mut run, &mut plan);
            for statement in statements {
                let values = handler::bind_all(statement, ev).map_err(StepError::Bind)?;
                plan.push(Step::Single(statement.sql.as_str(), values));
            }
        }
        flush(&mut run, &mut plan);

        let merged: u64 = plan
            .iter()
            .map(|step| match step {
                Step::Merged(_, rows, _) if *rows > 1 => *rows as u64,
                _ => 0,
            })
            .sum();
        let rendered: Vec<Option<String>> = plan
            .iter()
            .map(|step| match step {
                Step::Merged(m, rows, _) => Some(m.render(*rows)),
                Step::Single(..) => None,
            })
            .collect();
        let steps: Vec<(&str, Vec<handler::Bound>)> = plan
            .into_iter()
            .zip(&rendered)
            .map(|(step, sql)| match step {
                Step::Single(text, values) => (text, values),
                Step::Merged(_, _, values) => (sql.as_deref().unwrap_or_default(), values),
            })
            .collect();
        let (cas_sql, cas_values) =
            checkpoint::advance_statement(&self.key, &self.checkpoint, upto);
        let cas_sql = self.db.sql(&cas_sql);
        let Some(pipeline) = self.pipeline.as_mut() else {
            return Err(StepError::Pipeline(None));
        };
        match pipeline.run(&steps, (&cas_sql, cas_values)).await {
            Ok(pipeline::Outcome::Committed) => {
                self.metrics
                    .events_merged
                    .get_or_create(&self.label)
                    .inc_by(merged);
                Ok(self.committed(upto, applied, ignored, Vec::new()).await)
            }
            Ok(pipeline::Outcome::Fenced) => Ok(Applied::Fenced),
            Err(e) => Err(StepError::Pipeline(Some(e))),
        }
    }

    async fn commit(
        &mut self,
        mut tx: Tx,
        upto: u64,
        applied: u64,
        ignored: u64,
        dead: Vec<DeadLetter>,
    ) -> Result<Applied, sqlx::Error> {
        if !checkpoint::advance(&self.db, &mut tx, &self.key, &self.checkpoint, upto).await? {
            tx.rollback().await?;
            return Ok(Applied::Fenced);
        }
        tx.commit().await?;
        Ok(self.committed(upto, applied, ignored, dead).await)
    }

    /// Bookkeeping after a commit: the checkpoint, metrics, dead-letter publishing.
    async fn committed(
        &mut self,
        upto: u64,
        applied: u64,
        ignored: u64,
        dead: Vec<DeadLetter>,
    ) -> Applied {
        self.checkpoint.last_sequence = upto;
        self.publish_checkpoint();
        self.metrics
            .events_applied
            .get_or_create(&self.label)
            .inc_by(applied);
        self.metrics
            .events_ignored
            .get_or_create(&self.label)
            .inc_by(ignored);
        self.metrics.batches.get_or_create(&self.label).inc();
        for letter in dead {
            self.metrics
                .dead_letters
                .get_or_create(&PolicyLabel {
                    projection: self.key.clone(),
                    policy: dead_letter::policy_name(letter.policy).to_string(),
                })
                .inc();
            if letter.policy == ErrorPolicy::DeadLetter {
                self.publish_dead_letter(&letter).await;
            }
        }
        debug!(projection = %self.key, checkpoint = upto, applied, ignored, "batch committed");
        Applied::Committed(upto)
    }

    async fn publish_dead_letter(&self, letter: &DeadLetter) {
        let mut headers = HeaderMap::new();
        headers.insert("Projectionist-Projection", self.key.as_str());
        headers.insert(
            "Projectionist-Stream-Sequence",
            letter.sequence.to_string().as_str(),
        );
        headers.insert("Projectionist-Subject", letter.subject.as_str());
        headers.insert(
            "Projectionist-Error",
            letter.error.replace(['\r', '\n'], " ").as_str(),
        );
        if let Some(id) = &letter.event_id {
            headers.insert("ce-id", id.as_str());
        }
        if let Some(t) = &letter.event_type {
            headers.insert("ce-type", t.as_str());
        }
        let subject = self.config.on_error.dead_letter_subject.clone();
        let body = letter.payload.clone();
        if let Err(e) = self
            .nats
            .publish_with_headers(subject, headers, body.into())
            .await
        {
            // The dead-letter table holds the record either way.
            warn!(projection = %self.key, sequence = letter.sequence, error = %e, "cannot publish a dead letter");
            self.metrics.error(&self.key, "nats");
        }
    }

    /// Commits what came before the event at fault, then stops with `reason`.
    async fn halt(
        &mut self,
        tx: Tx,
        upto: u64,
        applied: u64,
        ignored: u64,
        dead: Vec<DeadLetter>,
        reason: String,
    ) -> Result<Applied, sqlx::Error> {
        if upto > self.checkpoint.last_sequence {
            match self.commit(tx, upto, applied, ignored, dead).await? {
                Applied::Committed(_) => {}
                other => return Ok(other),
            }
        } else {
            let _ = tx.rollback().await;
        }
        Ok(Applied::Halted(upto, reason))
    }

    /// One savepoint per event: a failing event is retried, then handled by the policy.
    async fn apply_isolated(
        &mut self,
        decoded: &[(&Incoming<'_>, Result<Event, DecodeError>)],
    ) -> Result<Applied, Transient> {
        let db_err = |e: sqlx::Error| Transient(format!("database: {e}"));
        let mut tx = self.db.begin().await.map_err(db_err)?;
        let (mut applied, mut ignored) = (0u64, 0u64);
        let mut upto = self.checkpoint.last_sequence;
        let mut dead = Vec::new();
        let max_attempts = self.config.on_error.max_attempts.max(1);
        for (inc, ev) in decoded {
            let failure: Option<(String, u32, &'static str)> = match ev {
                Err(e) => Some((format!("undecodable: {e}"), 1, "decode")),
                Ok(ev) => {
                    let mut attempt = 0;
                    let mut backoff = Backoff::new(
                        self.config.on_error.backoff_initial,
                        self.config.on_error.backoff_max,
                    );
                    loop {
                        attempt += 1;
                        database::execute_plain(&mut tx, "SAVEPOINT projectionist_event")
                            .await
                            .map_err(db_err)?;
                        match self.run_event(&mut tx, ev).await {
                            Ok(ran) => {
                                database::execute_plain(
                                    &mut tx,
                                    "RELEASE SAVEPOINT projectionist_event",
                                )
                                .await
                                .map_err(db_err)?;
                                if ran {
                                    applied += 1;
                                } else {
                                    ignored += 1;
                                }
                                break None;
                            }
                            Err(StepError::Db(e)) if classify(&e) == ErrorClass::Transient => {
                                return Err(db_err(e));
                            }
                            Err(err) => {
                                database::execute_plain(
                                    &mut tx,
                                    "ROLLBACK TO SAVEPOINT projectionist_event",
                                )
                                .await
                                .map_err(db_err)?;
                                database::execute_plain(
                                    &mut tx,
                                    "RELEASE SAVEPOINT projectionist_event",
                                )
                                .await
                                .map_err(db_err)?;
                                let (message, kind, deterministic) = match err {
                                    StepError::Bind(b) => (b.to_string(), "bind", true),
                                    StepError::Pipeline(_) => (
                                        "database: the pipelined path failed".to_string(),
                                        "database_permanent",
                                        false,
                                    ),
                                    StepError::Db(d) => {
                                        (format!("database: {d}"), "database_permanent", false)
                                    }
                                };
                                self.metrics.error(&self.key, kind);
                                if deterministic || attempt >= max_attempts {
                                    break Some((message, attempt, kind));
                                }
                                let d = backoff.next_delay();
                                self.state.beat();
                                tokio::time::sleep(d).await;
                            }
                        }
                    }
                }
            };
            if let Some((message, attempts, kind)) = failure {
                let (event_id, event_type) = match ev {
                    Ok(e) => (Some(e.id.clone()), Some(e.type_.clone())),
                    Err(_) => (None, None),
                };
                if kind == "decode" {
                    self.metrics.error(&self.key, kind);
                }
                let described = format!(
                    "event at sequence {} ({}{}): {message}",
                    inc.seq,
                    event_type.as_deref().unwrap_or("unknown type"),
                    event_id
                        .as_deref()
                        .map(|i| format!(" {i}"))
                        .unwrap_or_default()
                );
                match self.config.on_error.policy {
                    ErrorPolicy::Halt => {
                        return self
                            .halt(tx, upto, applied, ignored, dead, described)
                            .await
                            .map_err(db_err);
                    }
                    policy @ (ErrorPolicy::DeadLetter | ErrorPolicy::Skip) => {
                        let letter = DeadLetter {
                            sequence: inc.seq,
                            event_id,
                            event_type,
                            subject: inc.subject.to_string(),
                            payload: inc.payload.to_vec(),
                            error: message,
                            policy,
                            attempts,
                        };
                        database::execute_plain(&mut tx, "SAVEPOINT projectionist_letter")
                            .await
                            .map_err(db_err)?;
                        match dead_letter::record(&self.db, &mut tx, &self.key, &letter).await {
                            Ok(()) => {
                                database::execute_plain(
                                    &mut tx,
                                    "RELEASE SAVEPOINT projectionist_letter",
                                )
                                .await
                                .map_err(db_err)?;
                                warn!(projection = %self.key, sequence = inc.seq, policy = dead_letter::policy_name(policy), error = %described, "event recorded as a dead letter");
                                dead.push(letter);
                            }
                            Err(e) if classify(&e) == ErrorClass::Transient => {
                                return Err(db_err(e));
                            }
                            Err(e) => {
                                // Retrying cannot help and skipping without a record would lose the event: stop here.
                                database::execute_plain(
                                    &mut tx,
                                    "ROLLBACK TO SAVEPOINT projectionist_letter",
                                )
                                .await
                                .map_err(db_err)?;
                                let reason =
                                    format!("{described}; cannot record it as a dead letter: {e}");
                                return self
                                    .halt(tx, upto, applied, ignored, dead, reason)
                                    .await
                                    .map_err(db_err);
                            }
                        }
                    }
                }
            }
            upto = inc.seq;
        }
        self.commit(tx, upto, applied, ignored, dead)
            .await
            .map_err(db_err)
    }
}

/// One letter per bound value's type.
fn type_signature(values: &[handler::Bound]) -> String {
    values
        .iter()
        .map(|v| match v {
            handler::Bound::Null => 'n',
            handler::Bound::Bool(_) => 'b',
            handler::Bound::Int(_) => 'i',
            handler::Bound::Float(_) => 'f',
            handler::Bound::Text(_) => 't',
        })
        .collect()
}

fn incoming(m: &jetstream::Message, seq: u64) -> Incoming<'_> {
    Incoming {
        seq,
        subject: m.subject.as_str(),
        headers: m.headers.as_ref(),
        payload: &m.payload,
    }
}

/// Acknowledges the messages at or below `upto`.
async fn ack_upto(acks: Option<&[(u64, &jetstream::Message)]>, upto: u64) {
    for (seq, m) in acks.unwrap_or_default() {
        if *seq <= upto {
            // A lost ack only causes a redelivery, which the checkpoint skips.
            let _ = m.ack().await;
        }
    }
}
