//! What a sidecar pulls: the reactor's consumer or, on a partitioned store, the consumers of its share of the
//! partitions ([`super::share`]), merged into one stream of messages; and what it gives up when the share changes or
//! the sidecar stops.

use async_nats::jetstream::{self, consumer::PullConsumer};
use std::time::Duration;
use tokio::sync::watch;
use tracing::info;

use super::Reactor;
use super::share;

/// The events of the consumers a sidecar pulls, merged.
pub(super) type Messages =
    futures::stream::SelectAll<std::pin::Pin<Box<jetstream::consumer::pull::Stream>>>;

impl Reactor {
    /// The consumers this sidecar pulls: the reactor's, or on a partitioned store those of its partitions.
    pub(super) fn consumer_names(&self) -> Vec<String> {
        if self.config.store_partitions.is_some() {
            self.owned
                .iter()
                .map(|p| self.config.partition_consumer(*p))
                .collect()
        } else {
            vec![self.config.consumer.clone()]
        }
    }

    pub(super) async fn consumers(&self) -> Result<Vec<PullConsumer>, String> {
        let stream = self
            .js
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| format!("stream {}: {e}", self.config.stream))?;
        let mut consumers = Vec::new();
        for name in self.consumer_names() {
            consumers.push(
                stream
                    .get_consumer(&name)
                    .await
                    .map_err(|e| format!("consumer {name}: {e}"))?,
            );
        }
        Ok(consumers)
    }

    /// Pulls every consumer; `None` when there is none to pull.
    pub(super) async fn subscribe(
        &self,
        consumers: &[PullConsumer],
    ) -> Result<Option<Messages>, String> {
        if consumers.is_empty() {
            return Ok(None);
        }
        let mut all = Vec::with_capacity(consumers.len());
        for consumer in consumers {
            all.push(Box::pin(
                consumer
                    .stream()
                    .group(self.config.priority_group.clone())
                    .max_messages_per_batch(256)
                    .expires(Duration::from_secs(5))
                    .heartbeat(Duration::from_secs(2))
                    .messages()
                    .await
                    .map_err(|e| format!("subscribing: {e}"))?,
            ));
        }
        Ok(Some(futures::stream::select_all(all)))
    }

    /// On a partitioned store: the partitions this sidecar is assigned, once the first round went through.
    pub(super) async fn assigned(&mut self) -> Result<Option<Vec<u32>>, String> {
        let Some(sharing) = &mut self.sharing else {
            return Ok(None);
        };
        let wait = tokio::time::timeout(
            Duration::from_secs(10),
            sharing.assigned.wait_for(Option::is_some),
        );
        match wait.await {
            Ok(Ok(assigned)) => Ok(assigned.clone()),
            _ => Err("cannot report to the other sidecars of the reactor".into()),
        }
    }

    /// Gives up what this sidecar pulls: its report (on shutdown), and the pins of its partitions.
    pub(super) async fn leave(&mut self) {
        if let Some(sharing) = self.sharing.take() {
            if *self.shutdown.borrow() {
                sharing.stop().await;
            } else {
                // Halted: the partitions stay this sidecar's, so that the others do not go past the event.
                self.sharing = Some(sharing);
                return;
            }
            let released = std::mem::take(&mut self.owned);
            self.release(&released).await;
        }
    }

    pub(super) async fn release(&self, partitions: &[u32]) {
        for p in partitions {
            share::unpin(
                &self.js,
                &self.config.stream,
                &self.config.partition_consumer(*p),
                &self.config.priority_group,
            )
            .await;
        }
    }

    /// On a partitioned store: takes the partitions assigned now — releases the pins of those that went to another
    /// sidecar, and reports the ones it pulls from now on.
    pub(super) async fn take_assignment(&mut self) -> Result<(), String> {
        if let Some(assigned) = self.assigned().await? {
            let released: Vec<u32> = self
                .owned
                .iter()
                .copied()
                .filter(|p| !assigned.contains(p))
                .collect();
            self.release(&released).await;
            if let Some(sharing) = &self.sharing {
                if assigned != self.owned {
                    info!(reactor = %self.key(), member = %sharing.member, partitions = ?assigned, "pulling this sidecar's share of the partitions");
                }
                sharing.owned.send_replace(assigned.clone());
            }
            self.owned = assigned;
        }
        Ok(())
    }
}

/// Resolves when the assignment changes; never without one.
pub(super) async fn reassigned(
    assigned: &mut Option<watch::Receiver<Option<Vec<u32>>>>,
) -> Option<()> {
    match assigned {
        Some(a) => a.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// When to pull again after the subscription failed: at once the first time (a dropped connection, a missed
/// heartbeat), then after a delay doubling from 100 ms to 5 s while every new subscription fails too (a consumer
/// that refuses the pull) — never in a tight loop. A message received resets it.
#[derive(Debug, Default)]
pub(super) struct Repull {
    failures: u32,
    due: Option<tokio::time::Instant>,
}

impl Repull {
    /// The subscription failed: when to subscribe again.
    pub(super) fn failed(&mut self) -> Duration {
        let delay = match self.failures {
            0 => Duration::ZERO,
            n => (Duration::from_millis(100) * 2u32.saturating_pow(n - 1))
                .min(Duration::from_secs(5)),
        };
        self.failures = self.failures.saturating_add(1);
        self.due = Some(tokio::time::Instant::now() + delay);
        delay
    }

    /// A message came through: the subscription works.
    pub(super) fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Resolves when a new subscription is due; never while none is.
    pub(super) async fn due(&self) {
        match self.due {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// The subscription is being made again.
    pub(super) fn take(&mut self) {
        self.due = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_again_at_once_then_backs_off_until_a_message_comes() {
        let mut r = Repull::default();
        let delays: Vec<u128> = (0..9).map(|_| r.failed().as_millis()).collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        r.take();
        assert!(r.due.is_none());
        r.succeeded();
        assert_eq!(r.failed(), Duration::ZERO);
        assert!(r.due.is_some());
    }
}
