//! The `append` command's input: CloudEvents in structured JSON, one per NDJSON line, each naming its aggregate in
//! `subject` (`<type>.<id>`, e.g. `user.u-42`). They are appended through the same path as the event-store API
//! ([`crate::store::Store::append`]): the NATS binding's `ce-*` headers, the data as the body, `Nats-Msg-Id` = the
//! event id, on `<store prefix>.<type>.<id>`.

use serde_json::value::RawValue;

use crate::api::body::{now, parse_event, structured};
use crate::store::{Aggregate, Appended, Expected, NewEvent, Store};

/// An event of the file with its aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct FileEvent {
    /// The aggregate, from `subject`.
    pub aggregate: Aggregate,
    /// The event.
    pub event: NewEvent,
}

/// Why events cannot be appended.
#[derive(Debug, thiserror::Error)]
pub enum AppendFileError {
    /// A line is not a valid event; nothing was appended.
    #[error("line {line}: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// `--expected-version` needs the events of one aggregate.
    #[error("--expected-version applies to one aggregate, but the events name {0} and {1}")]
    SeveralAggregates(String, String),
    /// The append failed.
    #[error(transparent)]
    Append(#[from] crate::store::AppendError),
}

/// Parses NDJSON; blank lines are skipped. All lines are checked before anything is appended. Each line is read
/// as the event-store API reads an event (attributes, extensions, `data`), with `subject` naming its aggregate.
pub fn parse_ndjson(text: &str) -> Result<Vec<FileEvent>, AppendFileError> {
    let now = now();
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| AppendFileError::Line {
            line: i + 1,
            message,
        };
        let raw: &RawValue = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        let (aggregate, members) = structured(raw).map_err(|e| err(format!("the event {e}")))?;
        let event = parse_event("event", members, &now, None).map_err(|p| err(p.detail))?;
        events.push(FileEvent { aggregate, event });
    }
    Ok(events)
}

/// Appends the file's events. Without an expected version each event is appended on its own, in file order; with
/// one, the events must all be of one aggregate and are appended atomically, if the aggregate is at that version.
pub async fn append(
    store: &Store,
    events: &[FileEvent],
    expected: Option<u64>,
) -> Result<Vec<(FileEvent, u64, bool)>, AppendFileError> {
    let mut out = Vec::with_capacity(events.len());
    let Some(version) = expected else {
        for e in events {
            let a = store
                .append(&e.aggregate, Expected::Any, std::slice::from_ref(&e.event))
                .await?;
            out.push((e.clone(), a.version, a.duplicate));
        }
        return Ok(out);
    };
    let Some(first) = events.first() else {
        return Ok(out);
    };
    if let Some(other) = events.iter().find(|e| e.aggregate != first.aggregate) {
        return Err(AppendFileError::SeveralAggregates(
            first.aggregate.key(),
            other.aggregate.key(),
        ));
    }
    let batch: Vec<NewEvent> = events.iter().map(|e| e.event.clone()).collect();
    let Appended {
        sequences,
        duplicate,
        ..
    } = store
        .append(&first.aggregate, Expected::Version(version), &batch)
        .await?;
    Ok(events
        .iter()
        .cloned()
        .zip(sequences)
        .map(|(e, s)| (e, s, duplicate))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_structured_cloudevents_and_names_the_bad_line() {
        let ok = "{\"id\":\"1\",\"type\":\"UserCreated\",\"subject\":\"user.u-1\",\"data\":{\"a\":1}}\n\n";
        let parsed = parse_ndjson(ok).expect("parses");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].aggregate.key(), "user.u-1");
        assert_eq!(parsed[0].event.data.as_ref(), b"{\"a\":1}");
        let bad = format!("{ok}{{\"id\":\"2\",\"type\":\"X\",\"subject\":\"user.*\"}}\n");
        let e = parse_ndjson(&bad).expect_err("bad subject");
        assert!(e.to_string().starts_with("line 3:"), "{e}");
        let e =
            parse_ndjson("{\"id\":\"2\",\"type\":\"X\",\"subject\":\"user\"}").expect_err("no id");
        assert!(e.to_string().contains("<type>.<id>"), "{e}");
        let e = parse_ndjson("{\"type\":\"X\",\"subject\":\"a.b\"}").expect_err("no id");
        assert!(e.to_string().contains("id"), "{e}");
        let e = parse_ndjson("{\"id\":\"1\",\"type\":\"X\",\"subject\":\"a.b\",\"time\":\"noon\"}")
            .expect_err("time");
        assert!(e.to_string().contains("RFC 3339"), "{e}");
        let with_extension =
            "{\"id\":\"1\",\"type\":\"X\",\"subject\":\"a.b\",\"traceparent\":\"00-1\"}";
        let parsed = parse_ndjson(with_extension).expect("parses");
        assert_eq!(
            parsed[0]
                .event
                .extensions
                .get("traceparent")
                .map(String::as_str),
            Some("00-1")
        );
    }
}
