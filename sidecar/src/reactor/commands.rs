//! What the event-store API asks of a running reactor: list its parked aggregates, retry one, skip one's first held
//! event. The dispatcher answers them between events, so they never race its lanes.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::parking::{self, Parked};
use super::{Dispatch, Done, Reactor};
use crate::status::ProjectionState;

/// A request of the API to a running reactor.
#[derive(Debug)]
pub enum Command {
    /// List the parked aggregates.
    List(oneshot::Sender<Result<Vec<Parked>, String>>),
    /// Deliver an aggregate's held events again.
    Retry(String, oneshot::Sender<Result<Parked, Refusal>>),
    /// Drop an aggregate's first held event, with a record on the dead-letter subject.
    Skip(String, oneshot::Sender<Result<Skipped, Refusal>>),
}

/// Why a parking-lot request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The aggregate is not parked.
    NotParked(String),
    /// A retry of the aggregate is running.
    Busy(String),
    /// NATS could not be reached.
    Unavailable(String),
    /// On a partitioned store: the aggregate's partition is pulled by another sidecar, which must be asked.
    NotOwned(String),
}

/// The event a skip dropped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    /// Its original stream sequence.
    pub sequence: u64,
    /// Its event id.
    pub id: Option<String>,
    /// Held events left for the aggregate.
    pub remaining: u64,
}

/// How the API reaches a reactor.
#[derive(Debug, Clone)]
pub struct ReactorHandle {
    /// `<namespace>/<name>`.
    pub key: String,
    /// Its state (halted, waiting).
    pub state: Arc<ProjectionState>,
    pub(super) commands: mpsc::Sender<Command>,
}

impl ReactorHandle {
    /// Sends a command; `None` when the reactor is not running.
    pub async fn send(&self, command: Command) -> Option<()> {
        self.commands.send(command).await.ok()
    }
}

impl Reactor {
    pub(super) async fn command(&mut self, d: &mut Dispatch, command: Command) {
        let refresh = d.lot.load().await;
        if let Ok(parked) = &refresh {
            // The lot is the truth; entries of aggregates being retried are kept as they are.
            let busy: HashMap<String, Parked> = d
                .parked
                .iter()
                .filter(|(a, _)| d.lanes.is_busy(a))
                .map(|(a, p)| (a.clone(), p.clone()))
                .collect();
            d.parked = parked.clone();
            d.parked.extend(busy);
        }
        match command {
            Command::List(reply) => {
                let _ = reply.send(refresh.map(|_| d.parked.values().cloned().collect()));
            }
            Command::Retry(aggregate, reply) => {
                let answer = match (&refresh, d.parked.get(&aggregate)) {
                    _ if !self.owns(&aggregate) => Err(self.not_owned(&aggregate)),
                    (Err(e), _) => Err(Refusal::Unavailable(e.clone())),
                    (_, None) => Err(Refusal::NotParked(aggregate.clone())),
                    (_, Some(_)) if !d.lanes.occupy(&aggregate) => {
                        Err(Refusal::Busy(aggregate.clone()))
                    }
                    (_, Some(parked)) => {
                        let parked = parked.clone();
                        info!(reactor = %self.key(), aggregate = %aggregate, events = parked.events, "retrying a parked aggregate");
                        let (deliverer, lot, mut shutdown) =
                            (self.deliverer.clone(), d.lot.clone(), self.shutdown.clone());
                        let name = aggregate.clone();
                        d.jobs.push(Box::pin(async move {
                            let outcome = deliverer.drain(&lot, &name, &mut shutdown).await;
                            Done::Drain {
                                aggregate: name,
                                outcome,
                            }
                        }));
                        Ok(parked)
                    }
                };
                let _ = reply.send(answer);
            }
            Command::Skip(aggregate, reply) => {
                let answer = self.skip(d, &aggregate).await;
                let _ = reply.send(answer);
            }
        }
    }

    /// Whether this sidecar pulls the partition of `aggregate` (`<type>.<id>`); always on an unpartitioned store.
    fn owns(&self, aggregate: &str) -> bool {
        match (self.config.store_partitions, aggregate.split_once('.')) {
            (Some(n), Some((kind, id))) => self
                .owned
                .contains(&projectionist_crds::partition::partition_of(kind, id, n)),
            _ => true,
        }
    }

    fn not_owned(&self, aggregate: &str) -> Refusal {
        let partition = match (self.config.store_partitions, aggregate.split_once('.')) {
            (Some(n), Some((kind, id))) => projectionist_crds::partition::partition_of(kind, id, n),
            _ => 0,
        };
        Refusal::NotOwned(format!(
            "the aggregate {aggregate:?} is in partition {partition}, which another sidecar of this reactor delivers \
             (this one delivers partitions {:?}); send the request to the sidecar of that pod",
            self.owned
        ))
    }

    async fn skip(&self, d: &mut Dispatch, aggregate: &str) -> Result<Skipped, Refusal> {
        if !self.owns(aggregate) {
            return Err(self.not_owned(aggregate));
        }
        if d.lanes.is_busy(aggregate) {
            return Err(Refusal::Busy(aggregate.to_string()));
        }
        let Some(parked) = d.parked.get(aggregate).cloned() else {
            return Err(Refusal::NotParked(aggregate.to_string()));
        };
        let head = d
            .lot
            .head(aggregate)
            .await
            .map_err(Refusal::Unavailable)?
            .ok_or_else(|| Refusal::NotParked(aggregate.to_string()))?;
        let delivery = parking::delivery_of(&head);
        let reason = format!(
            "skipped from the parking lot on request; it was parked because: {}",
            head.headers
                .get(parking::REASON)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        );
        self.dead_letter(&delivery, &reason).await;
        d.lot
            .remove(head.sequence)
            .await
            .map_err(Refusal::Unavailable)?;
        let remaining = parked.events.saturating_sub(1);
        info!(reactor = %self.key(), aggregate = %aggregate, sequence = delivery.sequence, remaining, "skipped a parked event");
        match d.lot.describe(aggregate, remaining).await {
            Ok(Some(p)) => {
                d.parked.insert(aggregate.to_string(), p);
            }
            Ok(None) => {
                d.parked.remove(aggregate);
            }
            Err(e) => {
                warn!(reactor = %self.key(), error = %e, "cannot read the parking lot after a skip")
            }
        }
        Ok(Skipped {
            sequence: delivery.sequence,
            id: delivery
                .headers
                .get("ce-id")
                .map(|v| v.as_str().to_string()),
            remaining,
        })
    }
}
