//! Appending events: CloudEvents in structured JSON (one per NDJSON line) published in the NATS binding — `ce-*`
//! headers, the event's `data` as the body, and `Nats-Msg-Id` set to the event id so the stream drops an append
//! retried within its duplicate window.
//!
//! The NATS subject is `<store prefix>.<event subject>`, where the prefix is the EventStore's subject without its
//! trailing `.>` and the event's `subject` names the aggregate, e.g. `user.u-42`.

use async_nats::HeaderMap;
use async_nats::jetstream;
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// One event as read from NDJSON (CloudEvents structured mode).
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// `specversion`, default `1.0`.
    #[serde(default = "default_spec_version")]
    pub specversion: String,
    /// Unique event id; also the de-duplication id.
    pub id: String,
    /// The event type, e.g. `UserCreated`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Producer, default `projectionist-sidecar`.
    #[serde(default = "default_source")]
    pub source: String,
    /// The aggregate, e.g. `user.u-42`; appended to the store prefix to form the NATS subject.
    pub subject: String,
    /// RFC 3339 time; default now.
    #[serde(default)]
    pub time: Option<String>,
    /// Content type of `data`, default `application/json`.
    #[serde(default)]
    pub datacontenttype: Option<String>,
    /// The payload.
    #[serde(default)]
    pub data: Value,
}

fn default_spec_version() -> String {
    "1.0".into()
}

fn default_source() -> String {
    "projectionist-sidecar".into()
}

/// Why events cannot be appended.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// A line is not a valid event; nothing was appended.
    #[error("line {line}: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The store's subjects have no `<prefix>.>` form to append under.
    #[error("the EventStore's subject {0:?} does not end in `.>`; cannot derive where to append")]
    NoPrefix(String),
    /// Publishing failed.
    #[error("appending event {id}: {source}")]
    Publish {
        /// The event's id.
        id: String,
        /// The client error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The result of appending one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The event id.
    pub id: String,
    /// The event type.
    pub type_: String,
    /// The NATS subject it went to.
    pub subject: String,
    /// Its stream sequence.
    pub sequence: u64,
    /// Whether the stream had it already (an earlier append with the same id inside the duplicate window).
    pub duplicate: bool,
}

/// Parses NDJSON; blank lines are skipped. All lines are checked before anything is appended.
pub fn parse_ndjson(text: &str) -> Result<Vec<Event>, AppendError> {
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| AppendError::Line {
            line: i + 1,
            message,
        };
        let event: Event = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        if event.id.is_empty() || event.type_.is_empty() {
            return Err(err("id and type must not be empty".into()));
        }
        if event.subject.is_empty()
            || event
                .subject
                .split('.')
                .any(|t| t.is_empty() || t.contains(['*', '>']) || t.contains(char::is_whitespace))
        {
            return Err(err(format!(
                "subject {:?} is not a valid subject suffix",
                event.subject
            )));
        }
        if let Some(t) = &event.time
            && OffsetDateTime::parse(t, &Rfc3339).is_err()
        {
            return Err(err(format!("time {t:?} is not RFC 3339")));
        }
        events.push(event);
    }
    Ok(events)
}

/// The prefix events are appended under: the store's first subject without its trailing `.>`.
pub fn subject_prefix(store_subjects: &[String]) -> Result<String, AppendError> {
    let first = store_subjects.first().cloned().unwrap_or_default();
    first
        .strip_suffix(".>")
        .map(str::to_string)
        .ok_or(AppendError::NoPrefix(first))
}

/// Appends `events` in order under `prefix`, waiting for each acknowledgement so the order is the file's.
pub async fn append(
    js: &jetstream::Context,
    prefix: &str,
    events: &[Event],
) -> Result<Vec<Appended>, AppendError> {
    let mut out = Vec::with_capacity(events.len());
    for event in events {
        let subject = format!("{prefix}.{}", event.subject);
        let time = match &event.time {
            Some(t) => t.clone(),
            None => OffsetDateTime::now_utc()
                .format(&Rfc3339)
                .unwrap_or_default(),
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.id.as_str());
        headers.insert("ce-specversion", event.specversion.as_str());
        headers.insert("ce-id", event.id.as_str());
        headers.insert("ce-type", event.type_.as_str());
        headers.insert("ce-source", event.source.as_str());
        headers.insert("ce-subject", event.subject.as_str());
        headers.insert("ce-time", time.as_str());
        headers.insert(
            "content-type",
            event
                .datacontenttype
                .as_deref()
                .unwrap_or("application/json"),
        );
        let body = serde_json::to_vec(&event.data).unwrap_or_default();
        let publish_err = |e: Box<dyn std::error::Error + Send + Sync>| AppendError::Publish {
            id: event.id.clone(),
            source: e,
        };
        let ack = js
            .publish_with_headers(subject.clone(), headers, body.into())
            .await
            .map_err(|e| publish_err(Box::new(e)))?
            .await
            .map_err(|e| publish_err(Box::new(e)))?;
        out.push(Appended {
            id: event.id.clone(),
            type_: event.type_.clone(),
            subject,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_structured_cloudevents_and_names_the_bad_line() {
        let ok = "{\"id\":\"1\",\"type\":\"UserCreated\",\"subject\":\"user.u-1\",\"data\":{\"a\":1}}\n\n";
        assert_eq!(parse_ndjson(ok).expect("parses").len(), 1);
        let bad = format!("{ok}{{\"id\":\"2\",\"type\":\"X\",\"subject\":\"user.*\"}}\n");
        let e = parse_ndjson(&bad).expect_err("bad subject");
        assert!(e.to_string().starts_with("line 3:"), "{e}");
        let e = parse_ndjson("{\"type\":\"X\",\"subject\":\"a\"}").expect_err("no id");
        assert!(e.to_string().contains("id"), "{e}");
        let e = parse_ndjson("{\"id\":\"1\",\"type\":\"X\",\"subject\":\"a\",\"time\":\"noon\"}")
            .expect_err("time");
        assert!(e.to_string().contains("RFC 3339"), "{e}");
    }

    #[test]
    fn prefix_comes_from_the_store_subject() {
        assert_eq!(
            subject_prefix(&["ns.users.>".into()]).expect("prefix"),
            "ns.users"
        );
        assert!(subject_prefix(&["ns.users.*".into()]).is_err());
    }
}
