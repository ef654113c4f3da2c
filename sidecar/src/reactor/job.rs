//! The jobs a lane runs: one event delivered until it is done (retried with backoff or `Retry-After` while the
//! failures are transient, up to `maxAttempts`), its emitted events appended; or a parked aggregate's held events
//! delivered again in order, each removed from the parking lot once delivered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, warn};

use super::deliver::{self, Answer, Delivery, Endpoint};
use super::emit;
use super::metrics::ReactorMetrics;
use super::parking::{self, ParkingLot};
use crate::store::{AppendError, Store};

/// What delivering one event came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The endpoint took it (and its emitted events are in the store).
    Delivered,
    /// It failed for good: a permanent answer, or `maxAttempts` transient ones.
    Failed(String),
    /// The sidecar is shutting down.
    Interrupted,
}

/// What retrying a parked aggregate came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Drained {
    /// Every held event was delivered; the aggregate is no longer parked.
    Emptied,
    /// A held event failed again; it and the rest stay parked.
    Stuck(String),
    /// The sidecar is shutting down.
    Interrupted,
}

/// Everything a job needs, shared by the reactor's jobs.
#[derive(Debug)]
pub struct Deliverer {
    /// `<namespace>/<name>`.
    pub key: String,
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The store emitted events are appended to.
    pub store: Arc<Store>,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Largest retry delay (and largest `Retry-After` honoured).
    pub retry_max: Duration,
    /// Transient failures before giving up; 0: never.
    pub max_attempts: u32,
    /// Metrics.
    pub metrics: Arc<ReactorMetrics>,
}

impl Deliverer {
    fn delay(&self, attempt: u32, after: Option<Duration>) -> Duration {
        delay(self.retry_initial, self.retry_max, attempt, after)
    }

    /// Delivers one event until it is done.
    pub async fn deliver(
        &self,
        delivery: &Delivery<'_>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let attributes = match deliver::attributes(delivery) {
            Ok(a) => a,
            Err(reason) => return Outcome::Failed(reason),
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let started = Instant::now();
            let answer = self
                .endpoint
                .call(&attributes, delivery.sequence, attempt)
                .await;
            let took = started.elapsed();
            let (after, reason) = match answer {
                Answer::Delivered { emitted } => {
                    self.metrics.call(&self.key, took, None);
                    let Some(body) = emitted else {
                        return Outcome::Delivered;
                    };
                    match self.append_emitted(&body, attributes.id(), shutdown).await {
                        Ok(()) => return Outcome::Delivered,
                        Err(outcome) => return outcome,
                    }
                }
                Answer::Permanent { reason } => {
                    self.metrics.call(&self.key, took, Some("permanent"));
                    return Outcome::Failed(reason);
                }
                Answer::Retry { after, reason } => {
                    self.metrics.call(&self.key, took, Some("transient"));
                    (after, reason)
                }
            };
            if self.max_attempts > 0 && attempt >= self.max_attempts {
                return Outcome::Failed(format!("{reason} ({attempt} attempts)"));
            }
            let delay = self.delay(attempt, after);
            debug!(reactor = %self.key, sequence = delivery.sequence, attempt, reason = %reason, delay = ?delay, "delivery failed; retrying");
            if sleep_or_stop(delay, shutdown).await {
                return Outcome::Interrupted;
            }
        }
    }

    /// Appends an answer's events, retrying while NATS is unavailable; an answer that cannot be appended fails
    /// the delivered event.
    async fn append_emitted(
        &self,
        body: &[u8],
        delivered_id: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Outcome> {
        let events = emit::parse(body, &self.key, delivered_id).map_err(Outcome::Failed)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.store.append_all(&events).await {
                Ok(sequences) => {
                    ReactorMetrics::count(&self.metrics.emitted, &self.key, sequences.len() as u64);
                    return Ok(());
                }
                Err(AppendError::Unavailable(reason)) => {
                    warn!(reactor = %self.key, reason = %reason, "cannot append the emitted events yet; retrying");
                    if sleep_or_stop(self.delay(attempt, None), shutdown).await {
                        return Err(Outcome::Interrupted);
                    }
                }
                Err(e) => {
                    return Err(Outcome::Failed(format!(
                        "the emitted events cannot be appended: {e}"
                    )));
                }
            }
        }
    }

    /// Delivers a parked aggregate's held events again, in order, removing each once delivered.
    pub async fn drain(
        &self,
        lot: &ParkingLot,
        aggregate: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Drained {
        let mut after = 0;
        loop {
            let held = match retrying(shutdown, || lot.next_after(aggregate, after)).await {
                Some(held) => held,
                None => return Drained::Interrupted,
            };
            let Some(held) = held else {
                return Drained::Emptied;
            };
            match self.deliver(&parking::delivery_of(&held), shutdown).await {
                Outcome::Delivered => {}
                Outcome::Failed(reason) => return Drained::Stuck(reason),
                Outcome::Interrupted => return Drained::Interrupted,
            }
            if retrying(shutdown, || lot.remove(held.sequence))
                .await
                .is_none()
            {
                return Drained::Interrupted;
            }
            after = held.sequence;
        }
    }
}

/// The delay before attempt `attempt + 1`: `Retry-After` if given, else doubling from `initial`; at most `max`.
pub fn delay(initial: Duration, max: Duration, attempt: u32, after: Option<Duration>) -> Duration {
    let doubled = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    after.unwrap_or(doubled).min(max)
}

/// Sleeps `delay`; `true` when shutdown was asked meanwhile.
pub async fn sleep_or_stop(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    let stopped = tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = shutdown.wait_for(|s| *s) => true,
    };
    stopped || *shutdown.borrow()
}

/// Runs a NATS operation until it succeeds (backing off up to 5 s); `None` on shutdown.
pub async fn retrying<T, F, Fut>(shutdown: &mut watch::Receiver<bool>, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                warn!(error = %e, "NATS operation failed; retrying");
                if sleep_or_stop(delay, shutdown).await {
                    return None;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_max_and_retry_after_wins_within_it() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(delay(initial, max, 1, None), Duration::from_millis(100));
        assert_eq!(delay(initial, max, 2, None), Duration::from_millis(200));
        assert_eq!(delay(initial, max, 5, None), Duration::from_secs(1));
        let after = Some(Duration::from_millis(300));
        assert_eq!(delay(initial, max, 1, after), Duration::from_millis(300));
        assert_eq!(delay(initial, max, 1, Some(Duration::from_secs(60))), max);
    }
}
