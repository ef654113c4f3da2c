//! The live part of the source: the durable consumer (or a partition's ordered consumer) pulled, read ahead by a
//! task of its own, and cut into batches when the loop asks for one.

use std::time::Duration;

use async_nats::jetstream::Message;
use futures::StreamExt;
use tokio::sync::watch;

use super::Acks;
use super::Transient;
use crate::engine::report::Report;
use crate::event::{DecodeError, Event};

/// A batch from the durable consumer.
#[derive(Debug)]
pub struct Batch {
    /// The messages, in delivery order.
    pub messages: Vec<Message>,
    /// Set when the subscription broke while the batch filled: apply it, then resubscribe (which catches up from
    /// the stream, so messages buffered in the broken subscription are not lost).
    pub interrupted: Option<String>,
}

/// A batch from the durable consumer, already decoded.
#[derive(Debug)]
pub struct Decoded {
    /// The batch.
    pub batch: Batch,
    /// Its events, in the order of [`sequenced`].
    pub events: Vec<Result<Event, DecodeError>>,
}

/// The durable consumer read ahead by a task of its own: messages are pulled and decoded as they arrive, while the
/// current batch is applied and committed, and a batch is cut only when the loop asks for the next one — so it holds
/// everything that arrived meanwhile, up to `batch.maxEvents`, instead of what had arrived when the one before was
/// cut (which made batches smaller than the backlog allowed, and commits more frequent). At most `batch.maxEvents`
/// messages wait; dropping this stops the task and the subscription (what it held unacknowledged is redelivered,
/// and skipped where the checkpoint already covers it).
#[derive(Debug)]
pub struct ReadAhead {
    acks: Acks,
    items: tokio::sync::mpsc::Receiver<Item>,
    max_events: usize,
    max_wait: Duration,
    shutdown: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// What the read-ahead task hands over: a message with its event (`None` for a message without a stream sequence),
/// or why the subscription ended. (Held in the channel's slots as is: boxing the message would cost an allocation
/// per message.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Item {
    Message(Message, Option<Result<Event, DecodeError>>),
    Ended(String),
}

impl ReadAhead {
    /// How this consumer's batches are acknowledged.
    pub fn acks(&self) -> Acks {
        self.acks
    }

    /// The next decoded batch: waits for a first message, then takes what else has arrived, waiting up to
    /// `batch.maxWait` for the batch to fill; `None` on shutdown.
    pub async fn next_batch(&mut self) -> Result<Option<Decoded>, Transient> {
        let first = loop {
            if *self.shutdown.borrow() {
                return Ok(None);
            }
            tokio::select! {
                item = self.items.recv() => break item,
                changed = self.shutdown.changed() => if changed.is_err() {
                    return Ok(None);
                },
            }
        };
        let mut batch = Batch {
            messages: Vec::with_capacity(self.max_events),
            interrupted: None,
        };
        let mut events = Vec::with_capacity(self.max_events);
        let mut add = |item: Option<Item>, batch: &mut Batch| match item {
            Some(Item::Message(m, event)) => {
                batch.messages.push(m);
                events.extend(event);
                Ok(())
            }
            Some(Item::Ended(reason)) => Err(reason),
            None => Err("the pull subscription ended".to_string()),
        };
        add(first, &mut batch).map_err(Transient)?;
        let deadline = tokio::time::Instant::now() + self.max_wait;
        while batch.messages.len() < self.max_events {
            let item = if self.max_wait.is_zero() {
                match self.items.try_recv() {
                    Ok(item) => Some(item),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                }
            } else {
                match tokio::time::timeout_at(deadline, self.items.recv()).await {
                    Ok(item) => item,
                    Err(_) => break,
                }
            };
            if let Err(reason) = add(item, &mut batch) {
                batch.interrupted = Some(reason);
                break;
            }
        }
        Ok(Some(Decoded { batch, events }))
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The durable consumer pulled, or (a partition) an ordered consumer on the stream.
pub struct Live {
    pub(super) messages: futures::stream::BoxStream<'static, Result<Message, String>>,
    pub(super) acks: Acks,
    pub(super) max_events: usize,
    pub(super) max_wait: Duration,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) report: Report,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("acks", &self.acks)
            .finish_non_exhaustive()
    }
}

impl Live {
    /// Reads ahead on a task of its own ([`ReadAhead`]), beating the heartbeat once a second meanwhile.
    pub fn read_ahead(mut self) -> ReadAhead {
        let (tx, items) = tokio::sync::mpsc::channel(self.max_events.max(1));
        ReadAhead {
            acks: self.acks,
            items,
            max_events: self.max_events.max(1),
            max_wait: self.max_wait,
            shutdown: self.shutdown.clone(),
            task: tokio::spawn(async move {
                let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
                heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let item = tokio::select! {
                        next = self.messages.next() => match next {
                            Some(Ok(m)) => {
                                let event = super::decode_one(&m);
                                Item::Message(m, event)
                            }
                            Some(Err(e)) => Item::Ended(format!("pull: {e}")),
                            None => Item::Ended("pull subscription ended".into()),
                        },
                        _ = heartbeat.tick() => {
                            self.report.beat();
                            continue;
                        }
                    };
                    let ended = matches!(item, Item::Ended(_));
                    if tx.send(item).await.is_err() || ended {
                        return;
                    }
                }
            }),
        }
    }
}
