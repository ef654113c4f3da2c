//! A reactor on a thread of its own. Its dispatcher polls the deliveries, and each delivery hands its request to an
//! HTTP connection's task and waits for the answer: on a multi-threaded runtime each of those hand-offs may wake
//! another thread, which at one event at a time is most of a delivery's latency. On a current-thread runtime of its
//! own the reactor's tasks take turns on one thread, while projections and the API keep the sidecar's worker
//! threads. The reactor also opens a NATS connection of its own there, so that its messages, acknowledgements and
//! confirmations do not cross to the shared connection's task on another thread either (one connection more per
//! reactor; if it cannot be set up, the shared one serves). Appending emitted events and dead letters stay on the
//! store's shared connection.

use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{error, warn};

use super::Reactor;
use crate::engine::Exit;

impl Reactor {
    /// Runs the reactor on a thread of its own until it exits; a reactor whose thread cannot start, or that panics,
    /// ends halted with the reason.
    pub async fn run_on_own_thread(self) -> Exit {
        let (tx, rx) = oneshot::channel();
        let key = self.key().to_string();
        let started = std::thread::Builder::new()
            .name("reactor".to_string())
            .spawn(move || {
                let exit = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|runtime| runtime.block_on(self.run_on_own_connection()))
                    .map_err(|e| format!("the reactor's runtime cannot start: {e}"));
                let _ = tx.send(exit);
            });
        let ended = match started {
            Ok(_) => rx.await.unwrap_or_else(|_| {
                Err("the reactor's thread ended without an exit (a panic)".to_string())
            }),
            Err(e) => Err(format!("the reactor's thread cannot start: {e}")),
        };
        ended.unwrap_or_else(|reason| {
            error!(reactor = %key, reason = %reason, "the reactor stopped");
            Exit::Halted(reason)
        })
    }

    /// Runs with a NATS connection of the reactor's own, made on the current runtime; what it sent is flushed
    /// before the connection goes with the runtime (a lost acknowledgement is only a redelivery, but needless).
    async fn run_on_own_connection(mut self) -> Exit {
        let own = match crate::runtime::connect_nats(&self.config.nats, self.local_nats.as_deref())
            .await
        {
            Ok(client) => {
                self.js = async_nats::jetstream::new(client.clone());
                self.nats = client.clone();
                Some(client)
            }
            Err(e) => {
                warn!(reactor = %self.key(), error = %format!("{e:#}"), "no NATS connection of the reactor's own; it shares the store's");
                None
            }
        };
        let exit = self.run().await;
        if let Some(client) = own {
            let _ = tokio::time::timeout(FLUSH_WAIT, client.flush()).await;
        }
        exit
    }
}

/// How long a stopping reactor waits for its own connection to send what it has buffered.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
