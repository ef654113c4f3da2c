//! `POST` and `GET /v1/stores/{store}/aggregates/{type}/{id}/events`: append with an expected version, read back.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::ApiState;
use super::body::{is_json_media_type, parse_append};
use super::problem::Problem;
use crate::store::{Aggregate, AppendError, ReadError, Store, Stored};

/// Path parameters.
#[derive(Debug, Deserialize)]
pub struct AggregatePath {
    store: String,
    #[serde(rename = "type")]
    type_: String,
    id: String,
}

fn store_and_aggregate(
    state: &ApiState,
    path: Result<Path<AggregatePath>, PathRejection>,
) -> Result<(Arc<Store>, Aggregate), Problem> {
    let Path(path) = path.map_err(|e| Problem::bad_request(e.body_text()))?;
    let store = state.stores.get(&path.store).cloned().ok_or_else(|| {
        let known: Vec<&str> = state.stores.keys().map(String::as_str).collect();
        Problem::not_found(format!(
            "this pod is not configured for the event store {:?} (configured: {})",
            path.store,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })?;
    let aggregate = Aggregate::new(&path.type_, &path.id)
        .map_err(|e| Problem::bad_request(format!("aggregate {e}")))?;
    Ok((store, aggregate))
}

/// `POST …/events`: appends the request's events to the aggregate, all or none.
pub async fn append(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<AggregatePath>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let (store, aggregate) = match store_and_aggregate(&state, path) {
        Ok(found) => found,
        Err(p) => return p.into_response(),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return Problem::new(e.status(), e.body_text()).into_response(),
    };
    if let Some(ct) = headers.get(header::CONTENT_TYPE)
        && !ct.to_str().is_ok_and(is_json_media_type)
    {
        return Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the request body must be application/json",
        )
        .into_response();
    }
    let (expected, events) = match parse_append(&body) {
        Ok(parsed) => parsed,
        Err(p) => return p.into_response(),
    };
    let outcome = store.append(&aggregate, expected, &events).await;
    if let Some(m) = &state.metrics {
        m.append(
            &store.name,
            started.elapsed(),
            matches!(outcome, Err(AppendError::Conflict { .. })),
            matches!(&outcome, Ok(a) if a.duplicate),
        );
    }
    match outcome {
        Ok(a) => (
            StatusCode::OK,
            axum::Json(Answer {
                version: a.version,
                sequences: a.sequences,
                duplicate: a.duplicate,
            }),
        )
            .into_response(),
        Err(e) => append_problem(e).into_response(),
    }
}

/// The answer to an append (members in the order the OpenAPI document lists them).
#[derive(Debug, serde::Serialize)]
struct Answer {
    version: u64,
    sequences: Vec<u64>,
    duplicate: bool,
}

fn append_problem(e: AppendError) -> Problem {
    match e {
        AppendError::Invalid(i) => Problem::bad_request(i.to_string()).with("field", i.field),
        AppendError::Conflict { expected, current } => Problem::new(
            StatusCode::CONFLICT,
            format!(
                "the aggregate is at version {current}, not {expected}: load it again, decide again, and append \
                 with expectedVersion {current}"
            ),
        )
        .with("currentVersion", current)
        .with("expectedVersion", expected),
        AppendError::IdReused(detail) => Problem::new(StatusCode::CONFLICT, detail),
        AppendError::TooLarge(detail) => Problem::new(StatusCode::PAYLOAD_TOO_LARGE, detail),
        AppendError::Unavailable(detail) => Problem::unavailable(format!(
            "NATS is unavailable; nothing was appended, retry the same request: {detail}"
        )),
        AppendError::Refused(detail) => Problem::new(StatusCode::BAD_GATEWAY, detail),
    }
}

/// Query of a read.
#[derive(Debug, Deserialize)]
pub struct ReadQuery {
    /// Only events after this version.
    #[serde(default)]
    after: u64,
    /// At most this many events.
    limit: Option<u64>,
}

/// The most events one read returns.
pub const MAX_READ_LIMIT: u64 = 100_000;

/// `GET …/events?after=V&limit=L`: the aggregate's version and its events after `V`, in stream order; streamed.
pub async fn read(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<AggregatePath>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Response {
    let (store, aggregate) = match store_and_aggregate(&state, path) {
        Ok(found) => found,
        Err(p) => return p.into_response(),
    };
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => {
            return Problem::bad_request(format!(
                "after and limit are non-negative integers: {}",
                e.body_text()
            ))
            .into_response();
        }
    };
    let limit = match query.limit {
        Some(0) => {
            return Problem::bad_request("limit must be at least 1")
                .with("field", "limit")
                .into_response();
        }
        Some(l) if l > MAX_READ_LIMIT => {
            return Problem::bad_request(format!("limit is at most {MAX_READ_LIMIT}"))
                .with("field", "limit")
                .into_response();
        }
        other => other,
    };
    if !store.connected().await {
        return Problem::unavailable("NATS is unavailable; retry shortly").into_response();
    }
    let read = match store.read(&aggregate, query.after, limit).await {
        Ok(r) => r,
        Err(ReadError::Unavailable(m)) => {
            return Problem::unavailable(format!("NATS is unavailable: {m}")).into_response();
        }
    };
    let head = Bytes::from(format!("{{\"version\":{},\"events\":[", read.version));
    let mut first = true;
    let events = read.messages.map(move |item| {
        item.map(|stored| {
            let mut chunk = if first { Vec::new() } else { vec![b','] };
            first = false;
            chunk.extend(event_json(&stored));
            Bytes::from(chunk)
        })
    });
    let body = futures::stream::once(async move { Ok::<_, ReadError>(head) })
        .chain(events)
        .chain(futures::stream::once(async {
            Ok(Bytes::from_static(b"]}"))
        }));
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

/// An event as the API shows it: its CloudEvents attributes, `data` as stored, and its stream `sequence`.
fn event_json(stored: &Stored) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Shown<'a> {
        sequence: u64,
        specversion: &'static str,
        id: &'a str,
        #[serde(rename = "type")]
        type_: &'a str,
        source: Option<&'a str>,
        subject: Option<&'a str>,
        time: Option<&'a str>,
        data: &'a RawValue,
    }
    let shown = match stored {
        Stored::Event { event: e, data } => serde_json::to_vec(&Shown {
            sequence: e.sequence,
            specversion: "1.0",
            id: &e.id,
            type_: &e.type_,
            source: e.source.as_deref(),
            subject: e.subject.as_deref(),
            time: e.time.as_deref(),
            data,
        }),
        Stored::Undecodable {
            sequence,
            id,
            reason,
        } => serde_json::to_vec(&json!({
            "sequence": sequence,
            "id": id,
            "undecodable": reason,
        })),
    };
    shown.unwrap_or_default()
}
