//! Reactors: a reactor pulls its durable consumer, queues each event in its aggregate's lane, delivers the heads of
//! up to `concurrency` lanes to the endpoint at once, acknowledges each event once it is done, keeps every event it
//! holds in progress on the server, and parks what fails for good together with the rest of its aggregate.
//!
//! - [`acks`]: acknowledgements confirmed by the server, batched.
//! - [`lanes`]: per-aggregate lanes (pure): one job per aggregate at a time, in stream order.
//! - [`deliver`]: one call to the endpoint (CloudEvents HTTP binary mode) and its answer classified; `pool`: the
//!   endpoint's keep-alive connections.
//! - [`job`]: an event delivered until done (retries, emitted events appended); a parked aggregate drained.
//! - [`emit`]: the events an answer emits.
//! - `commands`: the parking-lot requests of the API, answered by the dispatcher; `fence`: the takeover fence;
//!   `intake`: a message from the consumer held in its aggregate's lane (or acknowledged, or parked).
//! - [`share`]: on a partitioned store, the partitions shared among the sidecars running the reactor; `pulling`:
//!   the consumers this sidecar pulls (its share), merged, what it gives up when the share changes, and when it
//!   pulls again after a failure (at once, then backing off: never a tight loop).
//! - `thread`: each reactor runs on a thread of its own (a current-thread runtime).
//! - [`parking`]: the parking lot in a JetStream stream.
//! - [`metrics`]: Prometheus series.
//!
//! The dispatcher (this module) is the only owner of the lanes, the held messages and the parked set; its jobs are
//! futures it polls itself (no task and no channel per delivery: the HTTP connections run on tasks of their own), each
//! ending in what it came to. The event-store API reaches it through a [`ReactorHandle`].

pub mod acks;
mod commands;
pub mod deliver;
pub mod emit;
mod fence;
mod intake;
pub mod job;
pub mod lanes;
pub mod metrics;
pub mod parking;
mod pool;
mod pulling;
pub mod share;
mod thread;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind, Message};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use projectionist_crds::reactor::ReactorErrorPolicy;
use projectionist_crds::reactor_config::ReactorConfig;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::dead_letter::{self, DeadLetter};
use crate::engine::Exit;
use crate::status::ProjectionState;
use acks::{Confirmer, confirm_one};
pub use commands::{Command, ReactorHandle, Refusal, Skipped};
use deliver::Delivery;
use job::{Deliverer, Drained, Outcome, retrying, sleep_or_stop};
use lanes::Lanes;
use metrics::ReactorMetrics;
use parking::{Parked, ParkingLot};
use pulling::{Messages, Repull, reassigned};
use share::{Share, Sharing};

/// A job of the dispatcher's, polled by it.
type Job = BoxFuture<'static, Done>;

/// What a job came to.
enum Done {
    /// An event's delivery is over. A delivered event's slot goes to another aggregate at once; its acknowledgement
    /// is confirmed next, and only then does its aggregate go on.
    Live {
        aggregate: String,
        seq: u64,
        outcome: Outcome,
        message: Arc<Message>,
    },
    /// A delivered event's acknowledgement is recorded by the server.
    Confirmed {
        aggregate: String,
        seq: u64,
    },
    Drain {
        aggregate: String,
        outcome: Drained,
    },
}

/// One reactor.
#[derive(Debug)]
pub struct Reactor {
    config: ReactorConfig,
    nats: async_nats::Client,
    js: jetstream::Context,
    deliverer: Arc<Deliverer>,
    state: Arc<ProjectionState>,
    shutdown: watch::Receiver<bool>,
    commands: mpsc::Receiver<Command>,
    prefix: String,
    /// On a partitioned store: this sidecar's share of the partitions, before `run` starts it.
    share: Option<Share>,
    /// On a partitioned store: this sidecar's share of the partitions, running.
    sharing: Option<Sharing>,
    /// The partitions it pulls (on a partitioned store).
    owned: Vec<u32>,
    /// NATS URL to use instead of the config's servers and credentials (the `dev` mode).
    local_nats: Option<String>,
}

impl Reactor {
    /// A reactor and the handle the API uses to reach it. `nats` is the store's shared connection; `local_nats`
    /// the URL that replaces the config's servers and credentials (the `dev` mode) when the reactor opens its own.
    pub fn new(
        config: ReactorConfig,
        nats: async_nats::Client,
        local_nats: Option<String>,
        deliverer: Deliverer,
        state: Arc<ProjectionState>,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, ReactorHandle) {
        let (tx, commands) = mpsc::channel(16);
        let handle = ReactorHandle {
            key: deliverer.key.clone(),
            state: state.clone(),
            commands: tx,
        };
        let prefix = crate::store::subject_prefix(&config.store_subjects).unwrap_or_default();
        let js = jetstream::new(nats.clone());
        let share = config.store_partitions.map(|partitions| {
            Share::new(
                js.clone(),
                &config,
                partitions,
                crate::engine::membership::member_name(),
            )
        });
        let reactor = Self {
            config,
            js,
            nats,
            deliverer: Arc::new(deliverer),
            state,
            shutdown,
            commands,
            prefix,
            share,
            sharing: None,
            owned: Vec::new(),
            local_nats,
        };
        (reactor, handle)
    }

    fn key(&self) -> &str {
        &self.deliverer.key
    }

    /// Runs until shutdown or a halt, reconnecting after NATS failures.
    pub async fn run(mut self) -> Exit {
        if let Some(share) = self.share.take() {
            self.sharing = Some(share.start(self.state.clone(), self.shutdown.clone()));
        }
        let mut delay = Duration::from_millis(200);
        loop {
            match self.run_connected().await {
                // The partitions this sidecar pulls changed: pull the new ones at once.
                Ok(Exit::Lost) => delay = Duration::from_millis(200),
                Ok(exit) => {
                    self.leave().await;
                    return exit;
                }
                Err(reason) => {
                    warn!(reactor = %self.key(), reason = %reason, "reactor not running; retrying");
                    self.state.set_waiting(Some(reason));
                    let mut shutdown = self.shutdown.clone();
                    if sleep_or_stop(delay, &mut shutdown).await {
                        self.leave().await;
                        return Exit::Shutdown;
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn run_connected(&mut self) -> Result<Exit, String> {
        self.take_assignment().await?;
        let consumers = self.consumers().await?;
        let lot = ParkingLot::open(
            &self.js,
            &self.config.parking_stream,
            &self.config.parking_prefix,
        )
        .await?;
        let parked = lot.load().await?;
        let messages = self.subscribe(&consumers).await?;
        info!(reactor = %self.key(), parked = parked.len(), consumers = consumers.len(), "reactor running");
        self.state.set_waiting(None);
        let mut dispatch = Dispatch {
            held: BTreeMap::new(),
            lanes: Lanes::new(self.config.concurrency as usize),
            parked,
            lot,
            jobs: FuturesUnordered::new(),
            last_received: HashMap::new(),
            highest: 0,
            confirmer: Confirmer::start(self.nats.clone(), self.shutdown.clone()),
            fences: HashMap::new(),
            fence_deadline: None,
            fence_everything: false,
            pending: HashMap::new(),
        };
        let exit = self.dispatch(&mut dispatch, &consumers, messages).await;
        if exit == Exit::Lost {
            // Partitions move to another sidecar: the calls in progress end first (at most one call's timeout),
            // and what they delivered is recorded as done, so that the next holder's call to an aggregate never
            // overlaps this one's and never repeats an event this one delivered.
            let settled = async {
                while let Some(done) = dispatch.jobs.next().await {
                    dispatch.settle(done);
                }
            };
            let _ = tokio::time::timeout(self.config.timeout, settled).await;
        }
        dispatch.jobs.clear();
        // What is still held goes back to the server at once (for this sidecar after a restart, or another replica).
        for held in dispatch.held.values() {
            let _ = held.ack_with(AckKind::Nak(None)).await;
        }
        Ok(exit)
    }

    async fn dispatch(
        &mut self,
        d: &mut Dispatch,
        consumers: &[PullConsumer],
        mut messages: Option<Messages>,
    ) -> Exit {
        let progress =
            (self.config.ack_wait / 3).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(progress);
        let mut assigned = self.sharing.as_ref().map(|s| s.assigned.clone());
        let mut shutdown = self.shutdown.clone();
        let mut repull = Repull::default();
        loop {
            self.start_ready(d);
            let event = tokio::select! {
                next = next_message(&mut messages) => Wake::Message(next.map(|r| r.map(Box::new))),
                () = repull.due() => Wake::Repull,
                Some(done) = d.jobs.next() => Wake::Done(done),
                Some(command) = self.commands.recv() => Wake::Command(command),
                _ = tick.tick() => Wake::Tick,
                Some(()) = reassigned(&mut assigned) => Wake::Reassigned,
                _ = shutdown.changed() => Wake::Tick,
            };
            if *shutdown.borrow() {
                return Exit::Shutdown;
            }
            match event {
                Wake::Message(Some(Ok(m))) => {
                    repull.succeeded();
                    self.received(d, *m).await;
                }
                Wake::Message(ended) => {
                    let reason = match ended {
                        Some(Err(e)) => e,
                        _ => "the subscription ended".to_string(),
                    };
                    let delay = repull.failed();
                    warn!(reactor = %self.key(), error = %reason, retry_in = ?delay, "pull failed; subscribing again");
                    if !delay.is_zero() {
                        self.state
                            .set_waiting(Some(format!("pull failed: {reason}")));
                    }
                    messages = None;
                }
                Wake::Repull => {
                    repull.take();
                    match self.subscribe(consumers).await {
                        Ok(m) => {
                            messages = m;
                            self.state.set_waiting(None);
                        }
                        Err(e) => {
                            let delay = repull.failed();
                            warn!(reactor = %self.key(), error = %e, retry_in = ?delay, "cannot subscribe");
                            self.state.set_waiting(Some(e));
                        }
                    }
                }
                Wake::Done(done) => {
                    if let Some(exit) = self.finished(d, done).await {
                        return exit;
                    }
                }
                Wake::Command(command) => self.command(d, command).await,
                Wake::Reassigned => {
                    let now = assigned.as_ref().and_then(|a| a.borrow().clone());
                    if now.is_some_and(|now| now != self.owned) {
                        return Exit::Lost;
                    }
                }
                Wake::Tick => {
                    for held in d.held.values() {
                        let _ = held.ack_with(AckKind::Progress).await;
                    }
                    self.deliverer.endpoint.close_idle();
                    self.report(d);
                }
            }
        }
    }

    fn report(&self, d: &Dispatch) {
        self.state.beat();
        let floor = d.held.keys().next().map_or(d.highest, |first| first - 1);
        self.state.set_checkpoint(floor);
        let m = &self.deliverer.metrics;
        ReactorMetrics::set(&m.in_flight, self.key(), d.lanes.busy() as i64);
        ReactorMetrics::set(&m.parked_aggregates, self.key(), d.parked.len() as i64);
    }

    /// Starts the jobs lanes are free for.
    fn start_ready(&self, d: &mut Dispatch) {
        self.lift_fences(d);
        while !d.fence_everything
            && let Some((aggregate, seq)) = d.lanes.next_job()
        {
            let Some(held) = d.held.get(&seq) else {
                d.lanes.done(&aggregate);
                continue;
            };
            let message = Arc::clone(held);
            let (deliverer, mut shutdown) = (self.deliverer.clone(), self.shutdown.clone());
            d.jobs.push(Box::pin(async move {
                let outcome = deliverer
                    .deliver(&delivery_of(&message, seq, &aggregate), &mut shutdown)
                    .await;
                Done::Live {
                    aggregate,
                    seq,
                    outcome,
                    message,
                }
            }));
        }
    }

    /// Moves one event to the parking lot (retrying until NATS takes it).
    async fn park(&self, d: &mut Dispatch, aggregate: &str, delivery: &Delivery<'_>, reason: &str) {
        let mut shutdown = self.shutdown.clone();
        if retrying(&mut shutdown, || d.lot.park(delivery, reason))
            .await
            .is_none()
        {
            return;
        }
        ReactorMetrics::count(&self.deliverer.metrics.parked, self.key(), 1);
        let entry = d
            .parked
            .entry(aggregate.to_string())
            .or_insert_with(|| Parked {
                aggregate: aggregate.to_string(),
                events: 0,
                first_sequence: delivery.sequence,
                last_sequence: 0,
                reason: reason.to_string(),
                parked_at: now(),
            });
        entry.events += 1;
        entry.last_sequence = entry.last_sequence.max(delivery.sequence);
    }

    /// Parks the events queued behind a failed one, and acknowledges them.
    async fn park_queue(&self, d: &mut Dispatch, aggregate: &str, first: u64) {
        for seq in d.lanes.take_queue(aggregate) {
            if let Some(held) = d.held.remove(&seq) {
                let reason = format!("held behind sequence {first}");
                self.park(d, aggregate, &delivery_of(&held, seq, aggregate), &reason)
                    .await;
                confirm_one(&held, &mut self.shutdown.clone()).await;
            }
        }
    }

    /// A job finished; `Some` when the reactor stops.
    async fn finished(&mut self, d: &mut Dispatch, done: Done) -> Option<Exit> {
        match d.settle(done)? {
            // Settled above.
            Done::Confirmed { .. }
            | Done::Live {
                outcome: Outcome::Delivered,
                ..
            } => {}
            Done::Live {
                seq,
                outcome: Outcome::Interrupted,
                ..
            } => return d.held.contains_key(&seq).then_some(Exit::Shutdown),
            Done::Live {
                aggregate,
                seq,
                outcome: Outcome::Failed(reason),
                ..
            } => {
                let held = d.held.remove(&seq)?;
                match self.config.on_error {
                    ReactorErrorPolicy::Park => {
                        warn!(reactor = %self.key(), sequence = seq, aggregate = %aggregate, reason = %reason, "parking the aggregate");
                        let delivery = delivery_of(&held, seq, &aggregate);
                        self.park(d, &aggregate, &delivery, &reason).await;
                        confirm_one(&held, &mut self.shutdown.clone()).await;
                        self.park_queue(d, &aggregate, seq).await;
                    }
                    ReactorErrorPolicy::DeadLetter => {
                        warn!(reactor = %self.key(), sequence = seq, reason = %reason, "dead-lettering the event");
                        self.dead_letter(&delivery_of(&held, seq, &aggregate), &reason)
                            .await;
                        confirm_one(&held, &mut self.shutdown.clone()).await;
                    }
                    ReactorErrorPolicy::Halt => {
                        let reason = format!("halted at sequence {seq} ({aggregate}): {reason}");
                        error!(reactor = %self.key(), reason = %reason, "reactor halted");
                        ReactorMetrics::set(&self.deliverer.metrics.halted, self.key(), 1);
                        d.held.insert(seq, held);
                        self.state.halt(reason.clone());
                        return Some(Exit::Halted(reason));
                    }
                }
                d.lanes.done(&aggregate);
            }
            Done::Drain { aggregate, outcome } => {
                match outcome {
                    Drained::Emptied => {
                        info!(reactor = %self.key(), aggregate = %aggregate, "parked events delivered; the aggregate goes on");
                        d.parked.remove(&aggregate);
                    }
                    Drained::Stuck(reason) => {
                        warn!(reactor = %self.key(), aggregate = %aggregate, reason = %reason, "a parked event failed again; the aggregate stays parked");
                        let mut shutdown = self.shutdown.clone();
                        let lot = d.lot.clone();
                        let described = retrying(&mut shutdown, || lot.entry(&aggregate))
                            .await
                            .flatten();
                        match described {
                            Some(p) => {
                                let first = p.first_sequence;
                                d.parked.insert(aggregate.clone(), p);
                                self.park_queue(d, &aggregate, first).await;
                            }
                            None => {
                                d.parked.remove(&aggregate);
                            }
                        }
                    }
                    Drained::Interrupted => return Some(Exit::Shutdown),
                }
                d.lanes.done(&aggregate);
            }
        }
        None
    }

    async fn dead_letter(&self, delivery: &Delivery<'_>, reason: &str) {
        let header = |n: &str| delivery.headers.get(n).map(|v| v.as_str().to_string());
        let letter = DeadLetter {
            sequence: delivery.sequence,
            event_id: header("ce-id"),
            event_type: header("ce-type"),
            subject: format!("{}.{}", self.prefix, delivery.aggregate),
            payload: delivery.payload.to_vec(),
            error: reason.to_string(),
            policy: projectionist_crds::projection::ErrorPolicy::DeadLetter,
            attempts: 0,
        };
        let client = self.deliverer.store.client();
        let mut shutdown = self.shutdown.clone();
        let subject = self.config.dead_letter_subject.clone();
        let published = retrying(&mut shutdown, || async {
            dead_letter::publish_from(
                client,
                &subject,
                "Projectionist-Reactor",
                self.key(),
                &letter,
            )
            .await
            .map_err(|e| e.to_string())?;
            client.flush().await.map_err(|e| e.to_string())
        })
        .await;
        if published.is_some() {
            ReactorMetrics::count(&self.deliverer.metrics.dead_letters, self.key(), 1);
        }
    }
}

/// What woke the dispatcher.
enum Wake {
    Message(Option<Result<Box<Message>, String>>),
    Done(Done),
    Command(Command),
    Tick,
    /// Time to subscribe again after a failed pull.
    Repull,
    /// The partitions this sidecar is assigned may have changed.
    Reassigned,
}

/// The dispatcher's state while connected.
struct Dispatch {
    /// Shared with the job delivering it, which acknowledges it once its call is over.
    held: BTreeMap<u64, Arc<Message>>,
    lanes: Lanes,
    parked: BTreeMap<String, Parked>,
    lot: ParkingLot,
    /// Deliveries, confirmations and drains in progress.
    jobs: FuturesUnordered<Job>,
    last_received: HashMap<String, Instant>,
    highest: u64,
    confirmer: Confirmer,
    /// Aggregates waiting for events a previous holder left pending, with those events' sequences.
    fences: HashMap<String, BTreeSet<u64>>,
    /// When the fences go at the latest.
    fence_deadline: Option<Instant>,
    /// Every aggregate waits (the pending events could not be read).
    fence_everything: bool,
    /// Events not yet delivered, per consumer pulled.
    pending: HashMap<String, u64>,
}

impl Dispatch {
    /// The common ends of jobs: a delivered event's call is over, so its slot goes to another aggregate, while this
    /// aggregate's next event starts only once the server has recorded this one as done (a crash can then never
    /// bring back an event after a later one of its aggregate); a confirmed one frees its aggregate. Any other end
    /// is handed back.
    fn settle(&mut self, done: Done) -> Option<Done> {
        match done {
            Done::Live {
                aggregate,
                seq,
                outcome: Outcome::Delivered,
                message,
            } => {
                self.lanes.release(&aggregate);
                self.confirm(aggregate, seq, message);
                None
            }
            Done::Confirmed { aggregate, seq } => {
                if self.held.remove(&seq).is_some() {
                    self.lanes.done(&aggregate);
                }
                None
            }
            other => Some(other),
        }
    }

    /// Confirms a delivered event's acknowledgement, as a job.
    fn confirm(&mut self, aggregate: String, seq: u64, message: Arc<Message>) {
        let confirmer = self.confirmer.clone();
        self.jobs.push(Box::pin(async move {
            confirmer.confirm(message).await;
            Done::Confirmed { aggregate, seq }
        }));
    }
}

async fn next_message(messages: &mut Option<Messages>) -> Option<Result<Message, String>> {
    match messages {
        Some(m) => m.next().await.map(|r| r.map_err(|e| e.to_string())),
        None => std::future::pending().await,
    }
}

/// The message as a delivery, borrowing its headers.
fn delivery_of<'a>(m: &'a Message, sequence: u64, aggregate: &'a str) -> Delivery<'a> {
    Delivery {
        sequence,
        aggregate: Cow::Borrowed(aggregate),
        headers: m
            .headers
            .as_ref()
            .map_or_else(|| Cow::Owned(async_nats::HeaderMap::new()), Cow::Borrowed),
        payload: m.payload.clone(),
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
