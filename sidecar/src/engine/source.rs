//! The source step: where a projection's events come from and where acknowledgements go.
//!
//! - [`Source::open`] finds the stream and the durable consumer the operator (or `dev`) provisioned.
//! - [`Source::replay`] reads the events after the checkpoint straight from the stream with an ordered consumer, up
//!   to what the durable consumer already delivered (a restored backup, a new database, a rebuild, messages lost
//!   with a dropped subscription): no event is skipped because the consumer had moved on.
//! - [`Source::subscribe`] pulls the durable consumer in batches of up to `batch.maxEvents`, waiting at most
//!   `batch.maxWait` for a batch to fill. The pull stream keeps requesting ahead, so the next batch is fetched while
//!   the current one is applied.
//! - [`Live`] → [`ReadAhead`] (`source/live.rs`): messages pulled and decoded on a task of their own, cut into a
//!   batch when the loop asks for one.
//! - [`Acks`]: a committed batch is acknowledged once — with one acknowledgement of its last event on a consumer
//!   with `AckPolicy::All` (what is provisioned now), one per event on an older `Explicit` consumer. The checkpoint in
//!   the database stays the only truth; a lost acknowledgement only causes a redelivery the checkpoint skips.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, Info, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, Message, stream::Stream as JsStream};
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{info, warn};

use super::report::Report;
use crate::event::{self, DecodeError, Event};

mod live;

pub use live::{Batch, Decoded, Live, ReadAhead};

/// A failure worth retrying for (NATS unreachable, a subscription ended, a database down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transient(pub String);

/// One message as the later stages see it.
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    /// Its stream sequence.
    pub seq: u64,
    /// The subject it was stored under.
    pub subject: &'a str,
    /// Its headers.
    pub headers: Option<&'a HeaderMap>,
    /// Its body.
    pub payload: &'a [u8],
}

/// The messages of a batch that carry a stream sequence, in delivery order.
pub fn sequenced(batch: &[Message]) -> Vec<(u64, &Message)> {
    batch
        .iter()
        .filter_map(|m| m.info().ok().map(|i| (i.stream_sequence, m)))
        .collect()
}

/// The messages of a batch that carry a stream sequence, decoded, in the order of [`sequenced`].
pub fn decode(batch: &[Message]) -> Vec<Result<Event, DecodeError>> {
    batch.iter().filter_map(decode_one).collect()
}

/// A message decoded, if it carries a stream sequence (as [`sequenced`] keeps it).
pub fn decode_one(m: &Message) -> Option<Result<Event, DecodeError>> {
    let seq = m.info().ok()?.stream_sequence;
    Some(event::decode(
        seq,
        m.subject.as_str(),
        m.headers.as_ref(),
        &m.payload,
    ))
}

/// The view of a message the later stages use.
pub fn incoming(seq: u64, m: &Message) -> Incoming<'_> {
    Incoming {
        seq,
        subject: m.subject.as_str(),
        headers: m.headers.as_ref(),
        payload: &m.payload,
    }
}

/// How a batch is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// Not at all: replayed from the stream by an ordered consumer.
    None,
    /// One acknowledgement per event (a consumer with `AckPolicy::Explicit`).
    Each,
    /// One acknowledgement of the last committed event (`AckPolicy::All`).
    Last,
}

impl Acks {
    /// The acknowledgement mode of a consumer.
    pub fn of(info: &Info) -> Self {
        match info.config.ack_policy {
            AckPolicy::All => Self::Last,
            _ => Self::Each,
        }
    }

    /// Acknowledges what was committed: the messages at or below `upto`.
    pub async fn committed(self, messages: &[(u64, &Message)], upto: u64) {
        match self {
            Self::None => {}
            Self::Each => {
                for (_, m) in messages.iter().filter(|(seq, _)| *seq <= upto) {
                    let _ = m.ack().await;
                }
            }
            Self::Last => {
                if let Some((_, m)) = messages.iter().rev().find(|(seq, _)| *seq <= upto) {
                    let _ = m.ack().await;
                }
            }
        }
    }

    /// Keeps the batch from being redelivered while it is retried.
    pub async fn in_progress(self, messages: &[(u64, &Message)]) {
        if self != Self::None {
            for (_, m) in messages {
                let _ = m.ack_with(AckKind::Progress).await;
            }
        }
    }

    /// Hands the batch back (shutting down).
    pub async fn hand_back(self, messages: &[(u64, &Message)]) {
        if self != Self::None {
            for (_, m) in messages {
                let _ = m.ack_with(AckKind::Nak(None)).await;
            }
        }
    }
}

/// The stream and durable consumer of a projection, found.
#[derive(Debug)]
pub struct Opened {
    stream: JsStream,
    consumer: PullConsumer,
    /// The consumer's info when it was found.
    pub info: Info,
}

impl Opened {
    /// The subjects the consumer selects.
    pub fn filters(&self) -> Vec<String> {
        let mut filters = self.info.config.filter_subjects.clone();
        if !self.info.config.filter_subject.is_empty() {
            filters.push(self.info.config.filter_subject.clone());
        }
        filters
    }

    /// The last stream sequence the consumer delivered.
    pub fn delivered(&self) -> u64 {
        self.info.delivered.stream_sequence
    }
}

/// Where one projection's events come from.
#[derive(Debug)]
pub struct Source {
    js: jetstream::Context,
    stream: String,
    consumer: String,
    priority_group: String,
    max_events: usize,
    max_wait: Duration,
    shutdown: watch::Receiver<bool>,
    report: Report,
}

impl Source {
    /// The source of `consumer` on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        js: jetstream::Context,
        stream: &str,
        consumer: &str,
        priority_group: &str,
        max_events: usize,
        max_wait: Duration,
        shutdown: watch::Receiver<bool>,
        report: Report,
    ) -> Self {
        Self {
            js,
            stream: stream.to_string(),
            consumer: consumer.to_string(),
            priority_group: priority_group.to_string(),
            max_events: max_events.max(1),
            max_wait,
            shutdown,
            report,
        }
    }

    /// Finds the stream and the consumer.
    pub async fn open(&self) -> Result<Opened, Transient> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| Transient(format!("stream: {e}")))?;
        let consumer: PullConsumer = stream
            .get_consumer(&self.consumer)
            .await
            .map_err(|e| Transient(format!("consumer: {e}")))?;
        let info = consumer.cached_info().clone();
        Ok(Opened {
            stream,
            consumer,
            info,
        })
    }

    /// The events after `after` up to `upto`, read from the stream; `None` when there are none to read.
    pub async fn replay(
        &self,
        opened: &Opened,
        after: u64,
        upto: u64,
    ) -> Result<Option<Replay>, Transient> {
        let deliver_policy = if after == 0 {
            match &opened.info.config.deliver_policy {
                p @ (DeliverPolicy::All
                | DeliverPolicy::ByStartSequence { .. }
                | DeliverPolicy::ByStartTime { .. }) => *p,
                other => {
                    warn!(projection = %self.report.key(), policy = ?other, "cannot replay before the consumer's start position; continuing from it");
                    return Ok(None);
                }
            }
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            }
        };
        info!(projection = %self.report.key(), from = after, upto, "catching up from the stream");
        self.report
            .waiting(Some(format!("catching up from sequence {after} to {upto}")));
        let filters = opened.filters();
        let (filter_subject, filter_subjects) = match filters.as_slice() {
            [one] => (one.clone(), Vec::new()),
            _ => (String::new(), filters),
        };
        let mut ordered = opened
            .stream
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
        let messages = ordered
            .messages()
            .await
            .map_err(|e| Transient(format!("catch-up: {e}")))?;
        Ok(Some(Replay {
            messages,
            upto,
            done: false,
            max_events: self.max_events,
            shutdown: self.shutdown.clone(),
            report: self.report.clone(),
        }))
    }

    /// Records a finished rebuild in the consumer's metadata, where the operator reads it. Best effort — a sidecar
    /// whose NATS user may not update consumers only logs it (the Projection then keeps `Rebuilding`).
    pub async fn record_rebuilt(&self, opened: &Opened, token: &str) {
        let mut config = opened.info.config.clone();
        config.metadata.insert(
            projectionist_crds::consumer::METADATA_REBUILT_TOKEN.to_string(),
            token.to_string(),
        );
        if let Err(e) = opened.stream.update_consumer(config).await {
            warn!(projection = %self.report.key(), error = %e, "could not record the finished rebuild on the consumer");
        }
    }

    /// Pulls the durable consumer.
    pub async fn subscribe(&self, opened: Opened) -> Result<Live, Transient> {
        let acks = Acks::of(&opened.info);
        let messages = opened
            .consumer
            .stream()
            .group(self.priority_group.clone())
            .max_messages_per_batch(self.max_events)
            .expires(Duration::from_secs(5))
            .heartbeat(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| Transient(format!("subscribing: {e}")))?
            .map(|m| m.map_err(|e| e.to_string()))
            .boxed();
        Ok(Live {
            messages,
            acks,
            max_events: self.max_events,
            max_wait: self.max_wait,
            shutdown: self.shutdown.clone(),
            report: self.report.clone(),
        })
    }
}

impl Source {
    /// Reads the stream itself, one consumer per `(after, filters)`: the events on `filters` after `after`, the
    /// consumers' messages merged (each one's order kept) — how a worker of a partitioned projection reads its
    /// partitions. Nothing is shared with another replica (a stale owner takes no message from the new one), and the
    /// checkpoints in the database are the only position. Nothing is acknowledged.
    pub async fn tail(&self, reads: &[(u64, Vec<String>)]) -> Result<Live, Transient> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| Transient(format!("stream: {e}")))?;
        let mut all = Vec::with_capacity(reads.len());
        for (after, filters) in reads {
            all.push(self.read_from(&stream, *after, filters).await?);
        }
        Ok(Live {
            messages: futures::stream::select_all(all).boxed(),
            acks: Acks::None,
            max_events: self.max_events,
            max_wait: self.max_wait,
            shutdown: self.shutdown.clone(),
            report: self.report.clone(),
        })
    }

    /// An ephemeral consumer without acknowledgements on `filters` after `after`, pulled in batches of
    /// `batch.maxEvents`; a message that never arrives (a gap in the consumer's sequence) ends the subscription, and
    /// the projector reads again from its checkpoints. (One filter per consumer: the server serves several filters
    /// of one consumer far more slowly than as many consumers of one filter.)
    async fn read_from(
        &self,
        stream: &JsStream,
        after: u64,
        filters: &[String],
    ) -> Result<futures::stream::BoxStream<'static, Result<Message, String>>, Transient> {
        let (filter_subject, filter_subjects) = match filters {
            [one] => (one.clone(), Vec::new()),
            _ => (String::new(), filters.to_vec()),
        };
        let consumer: PullConsumer = stream
            .create_consumer(pull::Config {
                deliver_policy: if after == 0 {
                    DeliverPolicy::All
                } else {
                    DeliverPolicy::ByStartSequence {
                        start_sequence: after + 1,
                    }
                },
                ack_policy: AckPolicy::None,
                filter_subject,
                filter_subjects,
                inactive_threshold: Duration::from_secs(60),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| Transient(format!("partition consumer: {e}")))?;
        Ok(consumer
            .stream()
            .max_messages_per_batch(self.max_events)
            .expires(Duration::from_secs(5))
            .heartbeat(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| Transient(format!("partition consumer: {e}")))?
            .scan(0u64, |last, m| {
                let next = match m {
                    Ok(m) => match m.info().map(|i| i.consumer_sequence) {
                        Ok(seq) if *last == 0 || seq == *last + 1 => {
                            *last = seq;
                            Ok(m)
                        }
                        Ok(seq) => Err(format!(
                            "message {} of the partition consumer never arrived (got {seq})",
                            *last + 1
                        )),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                futures::future::ready(Some(next))
            })
            .boxed())
    }
}

/// Events read from the stream up to a sequence.
pub struct Replay {
    messages: pull::Ordered,
    upto: u64,
    done: bool,
    max_events: usize,
    shutdown: watch::Receiver<bool>,
    report: Report,
}

impl Replay {
    /// The next batch; `None` once `upto` was reached or on shutdown.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Message>>, Transient> {
        if self.done {
            return Ok(None);
        }
        let mut batch = Vec::new();
        while batch.len() < self.max_events {
            if *self.shutdown.borrow() {
                return Ok(None);
            }
            self.report.beat();
            let next = tokio::time::timeout(Duration::from_secs(30), self.messages.next())
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
            if seq >= self.upto || remaining == 0 {
                self.done = true;
                break;
            }
        }
        Ok(Some(batch))
    }
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("upto", &self.upto)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}
