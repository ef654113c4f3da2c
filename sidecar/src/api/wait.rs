//! `GET /v1/projections/{name}/wait?sequence=N&timeout=2s`: read-your-writes. Answers as soon as every event of the
//! projection's filter with a sequence ≤ N is applied — at once when none is due (N is on a subject the projection
//! does not read, or already applied). A waiter sleeps on the projection's checkpoint in memory: many waiters cost
//! no database queries, and one stream lookup each per event they wait for.
//!
//! A partitioned projection answers once every partition is past its events at or below N: this replica's own
//! partitions as they commit, the others' as the database showed them at the last rebalancing round (a wait on an
//! event another replica applies can take up to one round longer, a third of the lease).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::problem::Problem;
use super::{ApiState, WaitTarget};
use crate::status::Partitions;

/// The longest wait a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// The wait when the request names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Query of a wait.
#[derive(Debug, Deserialize)]
pub struct WaitQuery {
    /// The sequence to wait for (e.g. the `version` an append answered).
    sequence: u64,
    /// How long to wait, e.g. `2s`, `500ms`.
    timeout: Option<String>,
}

/// `GET /v1/projections/{name}/wait`.
pub async fn wait(
    State(state): State<Arc<ApiState>>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Response {
    match wait_for(&state, name, query).await {
        Ok(checkpoint) => (
            StatusCode::OK,
            axum::Json(json!({ "checkpoint": checkpoint })),
        )
            .into_response(),
        Err(p) => p.into_response(),
    }
}

async fn wait_for(
    state: &ApiState,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<u64, Problem> {
    let Path(name) = name.map_err(|e| Problem::bad_request(e.body_text()))?;
    let target = state.projections.get(&name).ok_or_else(|| {
        Problem::not_found(format!(
            "this pod runs no projection {name:?} (it runs: {})",
            state
                .projections
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let Query(query) = query.map_err(|e| {
        Problem::bad_request(format!(
            "sequence is a required non-negative integer, timeout a duration such as 2s: {}",
            e.body_text()
        ))
    })?;
    let timeout = match &query.timeout {
        None => DEFAULT_TIMEOUT,
        Some(text) => projectionist_crds::duration::parse(text)
            .map_err(|e| Problem::bad_request(format!("timeout: {e}")).with("field", "timeout"))?,
    };
    if timeout > MAX_TIMEOUT {
        return Err(
            Problem::bad_request(format!("timeout is at most {}s", MAX_TIMEOUT.as_secs()))
                .with("field", "timeout"),
        );
    }
    match tokio::time::timeout(timeout, applied(target, query.sequence)).await {
        Ok(outcome) => outcome,
        Err(_) => {
            let checkpoint = target.state.checkpoint();
            Err(Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the projection has not applied sequence {} within {timeout:?} (checkpoint {checkpoint}); \
                     retry, or read anyway",
                    query.sequence
                ),
            )
            .with("checkpoint", checkpoint))
        }
    }
}

/// Resolves with the checkpoint once nothing the projection reads is due at or below `sequence`.
async fn applied(target: &WaitTarget, sequence: u64) -> Result<u64, Problem> {
    let mut changes = target.state.subscribe();
    loop {
        if let Some(partitions) = target.state.partitions() {
            // Partitioned: every partition must be past its events at or below `sequence`.
            if let Some(reason) = target.state.halted() {
                return Err(halted(sequence, lowest(&partitions), reason));
            }
            match partition_due(target, &partitions, sequence).await? {
                None => return Ok(lowest(&partitions).max(sequence)),
                Some((p, due)) => {
                    let reached = changes
                        .wait_for(|_| {
                            target.state.halted().is_some()
                                || target
                                    .state
                                    .partitions()
                                    .and_then(|s| s.checkpoints.get(&p).copied())
                                    .is_some_and(|c| c >= due)
                        })
                        .await;
                    if reached.is_err() {
                        return Err(Problem::unavailable("the projection stopped"));
                    }
                    continue;
                }
            }
        }
        if let Some(reason) = target.state.halted() {
            return Err(halted(sequence, target.state.checkpoint(), reason));
        }
        let checkpoint = target.state.checkpoint();
        if checkpoint >= sequence {
            return Ok(checkpoint);
        }
        let due = next_due(target, checkpoint).await?;
        match due {
            Some(due) if due <= sequence => {
                // Sleep until the checkpoint reaches the due event (or a halt), then look again.
                let reached = changes
                    .wait_for(|_| {
                        target.state.checkpoint() >= due || target.state.halted().is_some()
                    })
                    .await;
                if reached.is_err() {
                    return Err(Problem::unavailable("the projection stopped"));
                }
            }
            _ => return Ok(checkpoint),
        }
    }
}

fn halted(sequence: u64, checkpoint: u64, reason: String) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        format!("the projection is halted and will not apply sequence {sequence}: {reason}"),
    )
    .with("checkpoint", checkpoint)
    .with("reason", reason)
}

/// The lowest checkpoint of a partitioned projection's partitions.
fn lowest(partitions: &Partitions) -> u64 {
    partitions
        .checkpoints
        .values()
        .min()
        .copied()
        .unwrap_or_default()
}

/// A partition that still has an event at or below `sequence` to apply, and that event's sequence.
async fn partition_due(
    target: &WaitTarget,
    partitions: &Partitions,
    sequence: u64,
) -> Result<Option<(u32, u64)>, Problem> {
    for p in 0..partitions.layout.partitions {
        let checkpoint = partitions.checkpoints.get(&p).copied().unwrap_or(0);
        if checkpoint >= sequence {
            continue;
        }
        if let Some(due) = first_after(target, &partitions.filters_of(p), checkpoint).await?
            && due <= sequence
        {
            return Ok(Some((p, due)));
        }
    }
    Ok(None)
}

/// The sequence of the first event after `checkpoint` that the projection reads, if any.
async fn next_due(target: &WaitTarget, checkpoint: u64) -> Result<Option<u64>, Problem> {
    let unavailable = |e: String| Problem::unavailable(format!("NATS is unavailable: {e}"));
    let js = target.store.jetstream();
    let stream = js
        .get_stream_no_info(&target.store.stream)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let filters = match target.state.filters() {
        Some(f) => f,
        None => {
            let info = stream
                .consumer_info(&target.consumer)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let mut f = info.config.filter_subjects.clone();
            if !info.config.filter_subject.is_empty() {
                f.push(info.config.filter_subject.clone());
            }
            f
        }
    };
    let filters = if filters.is_empty() {
        vec![">".to_string()]
    } else {
        filters
    };
    first_after(target, &filters, checkpoint).await
}

/// The sequence of the first event after `checkpoint` on any of `filters`, if any.
async fn first_after(
    target: &WaitTarget,
    filters: &[String],
    checkpoint: u64,
) -> Result<Option<u64>, Problem> {
    let unavailable = |e: String| Problem::unavailable(format!("NATS is unavailable: {e}"));
    let stream = target
        .store
        .jetstream()
        .get_stream_no_info(&target.store.stream)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut first: Option<u64> = None;
    for filter in filters {
        match stream
            .raw_message_builder()
            .sequence(checkpoint + 1)
            .next_by_subject(filter.clone())
            .send()
            .await
        {
            Ok(m) => first = Some(first.map_or(m.sequence, |f| f.min(m.sequence))),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(unavailable(e.to_string())),
        }
    }
    Ok(first)
}
