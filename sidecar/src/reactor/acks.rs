//! Confirmed acknowledgements, batched. An aggregate's next event is delivered only once the server has recorded
//! the one before as done — otherwise a crash could bring back an earlier event after a later one. Confirming each
//! acknowledgement costs a round trip; here the acknowledgements waiting at one moment go out as plain
//! acknowledgements followed by one confirmed acknowledgement of the last: the server handles a consumer's
//! acknowledgements in the order they arrive on the connection, so the confirmation covers them all. A reconnection
//! in between (plain acknowledgements may have been lost with the old connection) falls back to confirming each.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use super::job::sleep_or_stop;

/// Most acknowledgements covered by one confirmation.
const MAX_BATCH: usize = 512;

type Waiting = (Arc<Message>, oneshot::Sender<()>);

/// The confirmer of one reactor's acknowledgements.
#[derive(Debug, Clone)]
pub struct Confirmer {
    tx: mpsc::UnboundedSender<Waiting>,
}

impl Confirmer {
    /// Starts the confirmer's task on `client` (the connection the messages came on).
    pub fn start(client: async_nats::Client, shutdown: watch::Receiver<bool>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiting>();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let mut shutdown = shutdown.clone();
                confirm_batch(&client, &batch, &mut shutdown).await;
                for (_, done) in batch.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        Self { tx }
    }

    /// Acknowledges `message` and returns once the server confirmed it (or gave up trying: a redelivery then follows).
    pub async fn confirm(&self, message: Arc<Message>) {
        let (done, confirmed) = oneshot::channel();
        if self.tx.send((message, done)).is_ok() {
            let _ = confirmed.await;
        }
    }
}

async fn confirm_batch(
    client: &async_nats::Client,
    batch: &[Waiting],
    shutdown: &mut watch::Receiver<bool>,
) {
    let Some(((last, _), rest)) = batch.split_last() else {
        return;
    };
    let stats: Arc<async_nats::Statistics> = client.statistics();
    let connects = stats.connects.load(Ordering::Relaxed);
    let mut plain_ok = true;
    for (m, _) in rest {
        plain_ok &= m.ack().await.is_ok();
    }
    let confirmed = confirm_one(last, shutdown).await;
    if confirmed && plain_ok && stats.connects.load(Ordering::Relaxed) == connects {
        return;
    }
    for (m, _) in rest {
        confirm_one(m, shutdown).await;
    }
}

/// Acknowledges one message and waits for the server to confirm it, a few times while NATS is unreachable (an
/// acknowledgement that never gets through only means a redelivery of an event that was done).
pub async fn confirm_one(message: &Message, shutdown: &mut watch::Receiver<bool>) -> bool {
    let mut delay = Duration::from_millis(100);
    for _ in 0..8 {
        match message.double_ack().await {
            Ok(()) => return true,
            Err(e) => {
                warn!(error = %e, "acknowledgement not confirmed; retrying");
                if sleep_or_stop(delay, shutdown).await {
                    return false;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    false
}
