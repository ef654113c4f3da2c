//! The workers of a partitioned projection: at most `workers` of its partitions apply a batch at once, each with a
//! PostgreSQL fast-path connection ([`Pipeline`]) of its own, lent for the batch and handed back after it.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::pipeline::Pipeline;

/// Shared by the partitions one sidecar owns of one projection.
#[derive(Debug, Clone)]
pub struct Gate {
    permits: Arc<Semaphore>,
    pipelines: Arc<Mutex<Vec<Pipeline>>>,
}

/// A worker's turn: held while one batch is applied.
#[derive(Debug)]
pub struct Turn {
    _permit: OwnedSemaphorePermit,
    pipelines: Arc<Mutex<Vec<Pipeline>>>,
    /// The fast-path connection lent for the turn, if there is one.
    pub pipeline: Option<Pipeline>,
}

impl Gate {
    /// `workers` turns at once; `pipeline` makes a fast-path connection for each (none: the sqlx path only).
    pub fn new(workers: u32, pipeline: impl Fn() -> Option<Pipeline>) -> Self {
        let workers = usize::try_from(workers.max(1)).unwrap_or(1);
        Self {
            permits: Arc::new(Semaphore::new(workers)),
            pipelines: Arc::new(Mutex::new(
                (0..workers).filter_map(|_| pipeline()).collect(),
            )),
        }
    }

    /// Waits for a turn.
    pub async fn turn(&self) -> Turn {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the gate's semaphore is never closed");
        let pipeline = self.pipelines.lock().ok().and_then(|mut p| p.pop());
        Turn {
            _permit: permit,
            pipelines: self.pipelines.clone(),
            pipeline,
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(p) = self.pipeline.take()
            && let Ok(mut pipelines) = self.pipelines.lock()
        {
            pipelines.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_most_workers_turns_at_once() {
        let gate = Gate::new(2, || None);
        let a = gate.turn().await;
        let _b = gate.turn().await;
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), gate.turn())
                .await
                .is_err()
        );
        drop(a);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), gate.turn())
                .await
                .is_ok()
        );
    }
}
