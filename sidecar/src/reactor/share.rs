//! The partitions of a reactor on a partitioned store, shared among the sidecars running it. Each sidecar reports
//! itself (and the partitions it pulls) on the progress stream every round; the live members — those whose last
//! report is younger than the reactor's `ackWait` by the server's clock — sorted by name deal the partitions in
//! contiguous fair ranges ([`partition::assigned`]). A sidecar pulls only its range's consumers. Every partition's
//! consumer pins one client at a time, so while two sidecars disagree about the members (for one round) the server
//! still hands each partition's events to one of them only; a released partition is unpinned at once, a dead
//! sidecar's pins run out after `ackWait`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::TryStreamExt;
use projectionist_crds::partition::{
    self, PROGRESS_STREAM, Progress, progress_filter, progress_stream, progress_subject,
};
use projectionist_crds::reactor_config::ReactorConfig;
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::warn;

use crate::status::ProjectionState;

/// One sidecar's place among the sidecars running a partitioned reactor.
#[derive(Debug)]
pub struct Share {
    js: jetstream::Context,
    /// This sidecar's member name (a subject token).
    pub member: String,
    subject: String,
    filter: String,
    partitions: u32,
    lease: Duration,
    stream_ready: bool,
}

/// What a round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    /// The live members, sorted.
    pub members: Vec<String>,
    /// The partitions this sidecar is assigned.
    pub assigned: Vec<u32>,
}

impl Share {
    /// The share of `member` in the reactor of `config`, whose store has `partitions` partitions.
    pub fn new(
        js: jetstream::Context,
        config: &ReactorConfig,
        partitions: u32,
        member: String,
    ) -> Self {
        let name = config.progress_name();
        Self {
            subject: progress_subject(&config.reactor.namespace, &name, &member),
            filter: progress_filter(&config.reactor.namespace, &name),
            js,
            member,
            partitions,
            lease: config.ack_wait,
            stream_ready: false,
        }
    }

    /// How often rounds run: a third of the lease, between 100 ms and 5 s.
    pub fn interval(&self) -> Duration {
        (self.lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Reports this sidecar (pulling `owned`, `lag` events behind) and reads the live members: the partitions it is
    /// assigned now.
    pub async fn round(&mut self, owned: &[u32], lag: u64) -> Result<Round, String> {
        if !self.stream_ready {
            self.js
                .get_or_create_stream(progress_stream())
                .await
                .map_err(|e| format!("progress stream: {e}"))?;
            self.stream_ready = true;
        }
        let report = Progress {
            partitions: owned.to_vec(),
            lag,
        };
        let payload = serde_json::to_vec(&report).map_err(|e| e.to_string())?;
        self.js
            .publish(self.subject.clone(), payload.into())
            .await
            .map_err(|e| format!("reporting: {e}"))?
            .await
            .map_err(|e| format!("reporting: {e}"))?;
        let stream = self
            .js
            .get_stream(PROGRESS_STREAM)
            .await
            .map_err(|e| format!("progress stream: {e}"))?;
        let subjects: Vec<String> = stream
            .info_with_subjects(self.filter.clone())
            .await
            .map_err(|e| format!("reading members: {e}"))?
            .map_ok(|(subject, _)| subject)
            .try_collect()
            .await
            .map_err(|e| format!("reading members: {e}"))?;
        let mut seen = Vec::new();
        for subject in subjects {
            if let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await {
                let member = subject.rsplit('.').next().unwrap_or_default().to_string();
                seen.push((member, m.time));
            }
        }
        let members = live(&seen, &self.member, self.lease);
        let rank = members.iter().position(|m| *m == self.member).unwrap_or(0);
        Ok(Round {
            assigned: partition::assigned(self.partitions, members.len(), rank).collect(),
            members,
        })
    }

    /// Takes this sidecar's report away, so that the others take its partitions over at their next round.
    pub async fn leave(&self) {
        if let Ok(stream) = self.js.get_stream(PROGRESS_STREAM).await {
            let _ = stream.purge().filter(self.subject.clone()).await;
        }
    }

    /// Runs the rounds on a task of their own (so that a busy dispatcher never looks dead to the others) until
    /// `shutdown`, then leaves. `lag`: this sidecar's lag, reported each round.
    pub fn start(
        mut self,
        lag: Arc<ProjectionState>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Sharing {
        let (assigned_tx, assigned) = watch::channel(None);
        let (owned, owned_rx) = watch::channel(Vec::new());
        let member = self.member.clone();
        let task = tokio::spawn(async move {
            let interval = self.interval();
            loop {
                let lag =
                    u64::try_from(lag.lag.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(0);
                let owned = owned_rx.borrow().clone();
                match self.round(&owned, lag).await {
                    Ok(round) => {
                        assigned_tx.send_if_modified(|a| {
                            let changed = a.as_ref() != Some(&round.assigned);
                            *a = Some(round.assigned.clone());
                            changed
                        });
                    }
                    Err(e) => {
                        warn!(member = %self.member, error = %e, "cannot report to the other sidecars of the reactor")
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    break;
                }
            }
            self.leave().await;
        });
        Sharing {
            member,
            assigned,
            owned,
            task,
        }
    }
}

/// A running [`Share`]: what this sidecar is assigned, what it pulls.
#[derive(Debug)]
pub struct Sharing {
    /// This sidecar's member name.
    pub member: String,
    /// The partitions it is assigned, once a round went through.
    pub assigned: watch::Receiver<Option<Vec<u32>>>,
    /// The partitions it pulls, as reported.
    pub owned: watch::Sender<Vec<u32>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sharing {
    /// Stops reporting and takes the report away.
    pub async fn stop(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// The live members of `seen` (member → time of its last report, by the server's clock): those reported within
/// `lease` of `me`'s report (the newest, just made), sorted; `me` is always one of them.
pub fn live(seen: &[(String, OffsetDateTime)], me: &str, lease: Duration) -> Vec<String> {
    let now = seen
        .iter()
        .find(|(m, _)| m == me)
        .or_else(|| seen.iter().max_by_key(|(_, t)| *t))
        .map(|(_, t)| *t);
    let mut members: Vec<String> = seen
        .iter()
        .filter(|(_, t)| now.is_none_or(|now| (now - *t).unsigned_abs() <= lease))
        .map(|(m, _)| m.clone())
        .collect();
    if !members.iter().any(|m| m == me) {
        members.push(me.to_string());
    }
    members.sort();
    members.dedup();
    members
}

/// Lets the server pin another client to `consumer` at once (this sidecar stopped pulling it).
pub async fn unpin(js: &jetstream::Context, stream: &str, consumer: &str, group: &str) {
    let subject = format!("CONSUMER.UNPIN.{stream}.{consumer}");
    let body = serde_json::json!({ "group": group });
    let _: Result<serde_json::Value, _> = js.request(subject, &body).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(secs)
    }

    #[test]
    fn members_whose_report_ran_out_are_not_live() {
        let seen = vec![
            ("b".to_string(), at(100)),
            ("a".to_string(), at(95)),
            ("c".to_string(), at(60)),
        ];
        assert_eq!(live(&seen, "b", Duration::from_secs(30)), ["a", "b"]);
        assert_eq!(live(&seen, "b", Duration::from_secs(60)), ["a", "b", "c"]);
    }

    #[test]
    fn a_member_is_live_before_its_report_is_read_back() {
        assert_eq!(live(&[], "me", Duration::from_secs(30)), ["me"]);
        let seen = vec![("z".to_string(), at(100))];
        assert_eq!(live(&seen, "me", Duration::from_secs(30)), ["me", "z"]);
    }
}
