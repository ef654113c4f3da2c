//! What the dispatcher does with a message from the consumer: its lag and redelivery counted, the parking lot read
//! again after a quiet spell, and the event held in its aggregate's lane — or acknowledged at once when the reactor
//! does not want its type, or parked behind its aggregate's parked events.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::Message;

use super::acks::confirm_one;
use super::job::retrying;
use super::metrics::ReactorMetrics;
use super::{Dispatch, Reactor, delivery_of};

impl Reactor {
    /// A message from the consumer.
    pub(super) async fn received(&mut self, d: &mut Dispatch, m: Message) {
        let Ok(info) = m.info() else {
            return;
        };
        let (seq, delivered) = (info.stream_sequence, info.delivered);
        match d.pending.get_mut(info.consumer) {
            Some(pending) => *pending = info.pending,
            None => {
                d.pending.insert(info.consumer.to_string(), info.pending);
            }
        }
        let lag: u64 = d.pending.values().sum();
        self.state
            .lag
            .store(lag as i64, std::sync::atomic::Ordering::Relaxed);
        if delivered > 1 {
            ReactorMetrics::count(&self.deliverer.metrics.redelivered, self.key(), 1);
        }
        d.highest = d.highest.max(seq);
        // The first event of a consumer, or one after a quiet spell: another replica (or, on a partitioned store,
        // the partition's previous holder) may have been delivering and parking: read the lot again, and fence what
        // it left pending.
        let now = Instant::now();
        let quiet = match d.last_received.get_mut(info.consumer) {
            Some(last) => {
                now.duration_since(std::mem::replace(last, now)) > self.config.ack_wait / 2
            }
            None => {
                d.last_received.insert(info.consumer.to_string(), now);
                true
            }
        };
        if quiet {
            let consumer = info.consumer.to_string();
            let mut shutdown = self.shutdown.clone();
            if let Some(parked) = retrying(&mut shutdown, || d.lot.load()).await {
                d.parked = parked;
            }
            self.fence_foreign_pending(d, &consumer).await;
        }
        if let Some(held) = d.held.get_mut(&seq) {
            // Redelivered while held: keep the newest delivery, whose acknowledgement the server expects.
            *held = Arc::new(m);
            return;
        }
        let aggregate = self.aggregate_of(m.subject.as_str());
        self.seen_behind_fence(d, &aggregate, seq);
        if !self.wanted(&m) {
            // Not delivered, so not ordered: a lost acknowledgement only brings it back to be skipped again.
            let _ = m.ack().await;
            return;
        }
        if let Some(parked) = d.parked.get(&aggregate)
            && !d.lanes.is_busy(&aggregate)
        {
            if seq > parked.last_sequence {
                let reason = format!("held behind sequence {}", parked.first_sequence);
                self.park(d, &aggregate, &delivery_of(&m, seq, &aggregate), &reason)
                    .await;
            }
            confirm_one(&m, &mut self.shutdown.clone()).await;
            return;
        }
        d.held.insert(seq, Arc::new(m));
        d.lanes.push(&aggregate, seq);
    }

    /// The aggregate of a subject: what follows the store's prefix (and, on a partitioned store, the partition).
    pub(super) fn aggregate_of(&self, subject: &str) -> String {
        if let Some(partitions) = self.config.store_partitions
            && let Some(aggregate) =
                projectionist_crds::partition::Layout::new(&self.prefix, partitions)
                    .aggregate_of(subject)
        {
            return aggregate.to_string();
        }
        subject
            .strip_prefix(&self.prefix)
            .and_then(|s| s.strip_prefix('.'))
            .unwrap_or(subject)
            .to_string()
    }

    /// Whether the event's type is one the reactor wants.
    fn wanted(&self, m: &Message) -> bool {
        if self.config.types.is_empty() {
            return true;
        }
        let type_ = match m.headers.as_ref().and_then(|h| h.get("ce-type")) {
            Some(t) => t.as_str().to_string(),
            None => match serde_json::from_slice::<serde_json::Value>(&m.payload) {
                Ok(v) => v
                    .get("type")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default()
                    .to_string(),
                // Not an event at all: delivered, so that it fails and is handled by the policy, never dropped.
                Err(_) => return true,
            },
        };
        self.config.types.contains(&type_)
    }
}
