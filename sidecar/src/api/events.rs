//! `POST` and `GET /v1/stores/{store}/aggregates/{type}/{id}/events`: append with an expected version, read back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ApiState;
use super::problem::Problem;
use crate::store::{Aggregate, AppendError, Expected, NewEvent, ReadError, Store, Stored};

/// The `source` of events that do not name one.
pub const DEFAULT_SOURCE: &str = "projectionist-sidecar";

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

fn is_json_media_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// Parses an append request: `{"expectedVersion": N?, "events": [...]}`.
pub fn parse_append(body: &[u8]) -> Result<(Expected, Vec<NewEvent>), Problem> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Problem::bad_request(format!("the body is not JSON: {e}")))?;
    let Value::Object(mut root) = value else {
        return Err(Problem::bad_request(
            "the body must be an object with `events`",
        ));
    };
    let expected = match root.remove("expectedVersion") {
        None | Some(Value::Null) => Expected::Any,
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            Expected::Version(n.as_u64().unwrap_or_default())
        }
        Some(other) => {
            return Err(Problem::bad_request(format!(
                "expectedVersion must be a non-negative integer (the stream sequence of the aggregate's last \
                 event, 0 for none), got {other}"
            ))
            .with("field", "expectedVersion"));
        }
    };
    let events = match root.remove("events") {
        Some(Value::Array(events)) => events,
        _ => {
            return Err(
                Problem::bad_request("events must be an array of events").with("field", "events")
            );
        }
    };
    if let Some(unknown) = root.keys().next() {
        return Err(Problem::bad_request(format!(
            "unknown member {unknown:?}: the body has expectedVersion and events"
        )));
    }
    if events.is_empty() {
        return Err(Problem::bad_request("events must not be empty").with("field", "events"));
    }
    if events.len() > crate::store::MAX_EVENTS {
        return Err(Problem::bad_request(format!(
            "at most {} events per request, got {}",
            crate::store::MAX_EVENTS,
            events.len()
        ))
        .with("field", "events"));
    }
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    let events = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| parse_event(i, e, &now))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((expected, events))
}

pub(crate) fn parse_event(i: usize, value: Value, now: &str) -> Result<NewEvent, Problem> {
    let at = format!("events[{i}]");
    let bad = |field: &str, message: String| {
        Problem::bad_request(format!("{at}.{field}: {message}"))
            .with("field", format!("{at}.{field}"))
    };
    let Value::Object(mut map) = value else {
        return Err(Problem::bad_request(format!("{at} must be an object")).with("field", at));
    };
    let mut text = |name: &str, required: bool| -> Result<Option<String>, Problem> {
        match map.remove(name) {
            None | Some(Value::Null) if !required => Ok(None),
            None | Some(Value::Null) => Err(bad(name, "is required".into())),
            Some(Value::String(s)) if required && s.is_empty() => {
                Err(bad(name, "must not be empty".into()))
            }
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(bad(name, format!("must be a string, got {other}"))),
        }
    };
    let id = text("id", true)?.unwrap_or_default();
    let type_ = text("type", true)?.unwrap_or_default();
    let source = text("source", false)?.unwrap_or_else(|| DEFAULT_SOURCE.into());
    let time = text("time", false)?.unwrap_or_else(|| now.to_string());
    let datacontenttype =
        text("datacontenttype", false)?.unwrap_or_else(|| "application/json".into());
    let specversion = text("specversion", false)?;
    let subject = text("subject", false)?;
    if specversion.as_deref().is_some_and(|v| v != "1.0") {
        return Err(bad(
            "specversion",
            "only CloudEvents 1.0 is supported".into(),
        ));
    }
    if subject.is_some() {
        return Err(bad(
            "subject",
            "is set by the API to <type>.<id> of the aggregate in the path; leave it out".into(),
        ));
    }
    if OffsetDateTime::parse(&time, &Rfc3339).is_err() {
        return Err(bad(
            "time",
            format!("{time:?} is not an RFC 3339 timestamp"),
        ));
    }
    if !is_json_media_type(&datacontenttype) {
        return Err(bad(
            "datacontenttype",
            "events carry JSON data: application/json or a +json media type".into(),
        ));
    }
    if map.contains_key("data_base64") {
        return Err(bad(
            "data_base64",
            "events carry JSON data in `data`".into(),
        ));
    }
    let data = map.remove("data").unwrap_or(Value::Null);
    let data = serde_json::to_vec(&data).unwrap_or_default();
    let extensions = extensions(map).map_err(|(name, m)| bad(&name, m))?;
    let event = NewEvent {
        id,
        type_,
        source,
        time,
        datacontenttype,
        extensions,
        data: Bytes::from(data),
    };
    event
        .validate(&at)
        .map_err(|e| Problem::bad_request(e.to_string()).with("field", e.field))?;
    Ok(event)
}

/// The remaining members: CloudEvents extension attributes (and `dataschema`), string values only.
fn extensions(map: Map<String, Value>) -> Result<BTreeMap<String, String>, (String, String)> {
    map.into_iter()
        .map(|(name, value)| match value {
            Value::String(s) => Ok((name, s)),
            other => Err((
                name,
                format!("extension attributes are strings, got {other}"),
            )),
        })
        .collect()
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
            chunk.extend(serde_json::to_vec(&event_json(&stored)).unwrap_or_default());
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

/// An event as the API shows it: its CloudEvents attributes, `data`, and its stream `sequence`.
fn event_json(stored: &Stored) -> Value {
    match stored {
        Stored::Event(e) => json!({
            "sequence": e.sequence,
            "specversion": "1.0",
            "id": e.id,
            "type": e.type_,
            "source": e.source,
            "subject": e.subject,
            "time": e.time,
            "data": e.data,
        }),
        Stored::Undecodable {
            sequence,
            id,
            reason,
        } => json!({
            "sequence": sequence,
            "id": id,
            "undecodable": reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(p: Problem) -> String {
        p.detail
    }

    #[test]
    fn an_append_request_parses_with_defaults_and_extensions() {
        let body = br#"{"expectedVersion": 0, "events": [
            {"id": "e1", "type": "UserCreated", "data": {"name": "Ada"}, "traceparent": "00-1"},
            {"id": "e2", "type": "UserRenamed", "source": "svc", "time": "2026-01-01T00:00:00Z", "data": null}
        ]}"#;
        let (expected, events) = parse_append(body).expect("parses");
        assert_eq!(expected, Expected::Version(0));
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].source, DEFAULT_SOURCE);
        assert_eq!(events[0].data.as_ref(), br#"{"name":"Ada"}"#);
        assert_eq!(
            events[0].extensions.get("traceparent").map(String::as_str),
            Some("00-1")
        );
        assert_eq!(events[1].source, "svc");
        assert_eq!(events[1].data.as_ref(), b"null");
        let (any, _) = parse_append(br#"{"events":[{"id":"a","type":"T"}]}"#).expect("parses");
        assert_eq!(any, Expected::Any);
    }

    #[test]
    fn a_bad_append_request_names_what_to_change() {
        for (body, says) in [
            (&b"not json"[..], "not JSON"),
            (br#"[]"#, "object"),
            (br#"{"events": []}"#, "must not be empty"),
            (br#"{"events": {}}"#, "array"),
            (
                br#"{"expectedVersion": -1, "events": [{"id":"a","type":"T"}]}"#,
                "expectedVersion",
            ),
            (
                br#"{"expectedVersion": "3", "events": [{"id":"a","type":"T"}]}"#,
                "expectedVersion",
            ),
            (br#"{"events": [{"type":"T"}]}"#, "events[0].id"),
            (br#"{"events": [{"id":"a","type":""}]}"#, "events[0].type"),
            (
                br#"{"events": [{"id":"a","type":"T","time":"noon"}]}"#,
                "RFC 3339",
            ),
            (
                br#"{"events": [{"id":"a","type":"T","subject":"x"}]}"#,
                "subject",
            ),
            (br#"{"events": [{"id":"a","type":"T","ext":1}]}"#, "strings"),
            (
                br#"{"events": [{"id":"a","type":"T","data_base64":"AA=="}]}"#,
                "data_base64",
            ),
            (
                br#"{"events": [{"id":"a","type":"T","datacontenttype":"text/plain"}]}"#,
                "JSON data",
            ),
            (br#"{"events": [{"id":"a\nb","type":"T"}]}"#, "control"),
            (
                br#"{"events": [{"id":"a","type":"T"}], "extra": 1}"#,
                "unknown member",
            ),
        ] {
            let d = detail(parse_append(body).expect_err("refused"));
            assert!(d.contains(says), "{} → {d}", String::from_utf8_lossy(body));
        }
        let many = format!(
            "{{\"events\": [{}]}}",
            vec![r#"{"id":"a","type":"T"}"#; 1001].join(",")
        );
        assert!(detail(parse_append(many.as_bytes()).expect_err("too many")).contains("at most"));
    }

    #[test]
    fn json_media_types_are_recognised() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("application/json; charset=utf-8"));
        assert!(is_json_media_type("application/cloudevents+json"));
        assert!(!is_json_media_type("text/plain"));
    }
}
