//! A reactor on a thread of its own. Its dispatcher polls the deliveries, and each delivery hands its request to an
//! HTTP connection's task and waits for the answer: on a multi-threaded runtime each of those hand-offs may wake
//! another thread, which at one event at a time is most of a delivery's latency. On a current-thread runtime of its
//! own the reactor's tasks take turns on one thread, while projections and the API keep the sidecar's worker
//! threads; the NATS client stays shared (its messages and acknowledgements cross between the threads in batches).

use tokio::sync::oneshot;
use tracing::error;

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
                    .map(|runtime| runtime.block_on(self.run()))
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
}
