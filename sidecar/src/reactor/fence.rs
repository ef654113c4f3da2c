//! The takeover fence. A sidecar that crashed or stopped leaves events of the consumer pending; the server brings
//! them back only once their ack wait has run out, while later events flow at once. Until then, the aggregates of
//! those events wait, so that an aggregate never gets a later event before an earlier one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Message};
use futures::StreamExt;
use tracing::{info, warn};

use super::{Dispatch, Reactor};

/// The most events between the ack floor and the last delivered event read to find a previous holder's aggregates;
/// beyond it every aggregate waits one ack wait.
const FENCE_SCAN_LIMIT: u64 = 100_000;
/// Added to the ack wait before fences go: the server's redelivery check runs on its own timer.
const FENCE_MARGIN: Duration = Duration::from_secs(2);

impl Reactor {
    /// After a takeover (a crashed or stopped sidecar held events of `consumer`), the server brings those events
    /// back only once their ack wait ran out, while later events flow at once. Aggregates with such an event are
    /// fenced until it is back (it then goes first: lanes keep sequence order) or the ack wait has surely run out.
    /// Runs on the first event of each consumer pulled (on a partitioned store a partition's consumer is taken over
    /// while the others flow) and after a quiet spell.
    pub(super) async fn fence_foreign_pending(&self, d: &mut Dispatch, consumer: &str) {
        let deadline = Instant::now() + self.config.ack_wait + FENCE_MARGIN;
        match self.foreign_pending(consumer, &d.held).await {
            Ok(None) => {}
            Ok(Some(Some(pending))) if pending.is_empty() => {}
            Ok(Some(Some(pending))) => {
                info!(reactor = %self.key(), consumer, aggregates = pending.len(), "events of a previous holder are still pending; their aggregates wait for them");
                for (aggregate, seqs) in pending {
                    d.lanes.fence(&aggregate);
                    d.fences.entry(aggregate).or_default().extend(seqs);
                }
                d.fence_deadline = Some(deadline);
            }
            Ok(Some(None)) | Err(_) => {
                warn!(reactor = %self.key(), consumer, "cannot tell which aggregates a previous holder left pending; every aggregate waits one ack wait");
                d.fence_everything = true;
                d.fence_deadline = Some(deadline);
            }
        }
    }

    /// The events of `consumer` a previous holder left pending, by aggregate: `None` when there are none,
    /// `Some(None)` when they cannot be read. `held`: the events this sidecar holds.
    #[allow(clippy::type_complexity)]
    async fn foreign_pending(
        &self,
        consumer: &str,
        held: &BTreeMap<u64, std::sync::Arc<Message>>,
    ) -> Result<Option<Option<HashMap<String, BTreeSet<u64>>>>, String> {
        let held_here = held
            .values()
            .filter(|m| m.info().is_ok_and(|i| i.consumer == consumer))
            .count();
        let stream = self
            .js
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| e.to_string())?;
        let info = stream
            .consumer_info(consumer)
            .await
            .map_err(|e| e.to_string())?;
        let (floor, delivered) = (
            info.ack_floor.stream_sequence,
            info.delivered.stream_sequence,
        );
        if info.num_ack_pending <= held_here + 1 || delivered <= floor {
            return Ok(None);
        }
        if delivered - floor > FENCE_SCAN_LIMIT {
            return Ok(Some(None));
        }
        let mut filters = info.config.filter_subjects.clone();
        if !info.config.filter_subject.is_empty() {
            filters.push(info.config.filter_subject.clone());
        }
        let mut ordered = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: floor + 1,
                },
                filter_subjects: filters,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let mut pending: HashMap<String, BTreeSet<u64>> = HashMap::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), ordered.next()).await;
            let Ok(Some(Ok(m))) = next else {
                return Ok(Some(None));
            };
            let info = m.info().map_err(|e| e.to_string())?;
            let seq = info.stream_sequence;
            if seq > delivered {
                break;
            }
            if !held.contains_key(&seq) {
                pending
                    .entry(self.aggregate_of(m.subject.as_str()))
                    .or_default()
                    .insert(seq);
            }
            if seq == delivered || info.pending == 0 {
                break;
            }
        }
        Ok(Some(Some(pending)))
    }

    /// An event of a fenced aggregate came (whatever becomes of it: delivered, ignored for its type, parked): once
    /// every event the aggregate waited for came, it goes on.
    pub(super) fn seen_behind_fence(&self, d: &mut Dispatch, aggregate: &str, seq: u64) {
        if let Some(waiting) = d.fences.get_mut(aggregate) {
            waiting.remove(&seq);
            if waiting.is_empty() {
                d.fences.remove(aggregate);
                d.lanes.unfence(aggregate);
            }
        }
    }

    /// Lifts the fences once the ack wait of a previous holder's events has surely run out.
    pub(super) fn lift_fences(&self, d: &mut Dispatch) {
        if d.fence_deadline.is_some_and(|t| Instant::now() >= t) {
            d.fence_deadline = None;
            d.fence_everything = false;
            d.fences.clear();
            d.lanes.unfence_all();
        }
    }
}
