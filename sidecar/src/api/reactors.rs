//! A reactor's parking lot: `GET /v1/reactors/{name}/parked` lists the parked aggregates;
//! `POST /v1/reactors/{name}/parked/{aggregate}/retry` delivers an aggregate's held events again, in order;
//! `POST …/skip` drops its first held event, with a record on the dead-letter subject. `{aggregate}` is
//! `<type>.<id>`, the event's subject after the store's prefix.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::oneshot;

use super::ApiState;
use super::problem::Problem;
use crate::reactor::{Command, ReactorHandle, Refusal};

/// How long a request waits for the reactor to take it.
const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn reactor(state: &ApiState, name: &str) -> Result<ReactorHandle, Problem> {
    state.reactors.get(name).cloned().ok_or_else(|| {
        let known: Vec<&str> = state.reactors.keys().map(String::as_str).collect();
        Problem::not_found(format!(
            "this pod runs no reactor {name:?} (running: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

fn stopped(handle: &ReactorHandle) -> Problem {
    match handle.state.halted() {
        Some(reason) => Problem::new(
            StatusCode::CONFLICT,
            format!("the reactor is halted: {reason}"),
        ),
        None => Problem::unavailable("the reactor is not running; retry shortly"),
    }
}

async fn ask<T>(
    handle: &ReactorHandle,
    command: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, Problem> {
    let (tx, rx) = oneshot::channel();
    let asked = async {
        handle.send(command(tx)).await?;
        rx.await.ok()
    };
    // A reactor waiting for NATS answers nothing; the caller hears so instead of hanging.
    match tokio::time::timeout(ASK_TIMEOUT, asked).await {
        Ok(Some(answer)) => Ok(answer),
        Ok(None) | Err(_) => Err(stopped(handle)),
    }
}

fn refused(refusal: Refusal) -> Problem {
    match refusal {
        Refusal::NotParked(a) => Problem::not_found(format!("the aggregate {a:?} is not parked")),
        Refusal::Busy(a) => Problem::new(
            StatusCode::CONFLICT,
            format!("the aggregate {a:?} is being retried; wait until it is done"),
        ),
        Refusal::Unavailable(detail) => {
            Problem::unavailable(format!("NATS is unavailable: {detail}"))
        }
        Refusal::NotOwned(detail) => Problem::new(StatusCode::CONFLICT, detail),
    }
}

/// `GET /v1/reactors/{name}/parked`.
pub async fn list(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let answer = async {
        let Path(name) = path.map_err(|e| Problem::bad_request(e.body_text()))?;
        let handle = reactor(&state, &name)?;
        let parked = ask(&handle, Command::List)
            .await?
            .map_err(|e| Problem::unavailable(format!("NATS is unavailable: {e}")))?;
        Ok::<_, Problem>(axum::Json(json!({ "reactor": name, "parked": parked })))
    };
    match answer.await {
        Ok(json) => json.into_response(),
        Err(p) => p.into_response(),
    }
}

/// `POST /v1/reactors/{name}/parked/{aggregate}/retry`.
pub async fn retry(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    on_aggregate(&state, path, Command::Retry, |parked| {
        (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "retrying": parked })),
        )
    })
    .await
}

/// `POST /v1/reactors/{name}/parked/{aggregate}/skip`.
pub async fn skip(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    on_aggregate(&state, path, Command::Skip, |skipped| {
        (StatusCode::OK, axum::Json(json!({ "skipped": skipped })))
    })
    .await
}

/// Sends a command about one parked aggregate and answers with `ok` of its result.
async fn on_aggregate<T, R: IntoResponse>(
    state: &ApiState,
    path: Result<Path<(String, String)>, PathRejection>,
    command: fn(String, oneshot::Sender<Result<T, Refusal>>) -> Command,
    ok: impl FnOnce(T) -> R,
) -> Response {
    let answer = async {
        let Path((name, aggregate)) = path.map_err(|e| Problem::bad_request(e.body_text()))?;
        let handle = reactor(state, &name)?;
        ask(&handle, |tx| command(aggregate, tx))
            .await?
            .map_err(refused)
    };
    match answer.await {
        Ok(value) => ok(value).into_response(),
        Err(p) => p.into_response(),
    }
}
