//! What an append carries, checked before anything is sent: the aggregate (type and id, each one subject token) and
//! its new events (CloudEvents attributes that fit NATS headers), and the headers each event is published with.

use std::collections::BTreeMap;
use std::fmt::Display;

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use bytes::Bytes;

/// An aggregate: its type and id, each one subject token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// The aggregate type, e.g. `user`.
    pub type_: String,
    /// The aggregate id, e.g. `u-42`.
    pub id: String,
}

/// Input that can never be appended or read; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// Where the problem is, e.g. `events[2].id`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Aggregate {
    /// Checks that `type_` and `id` are each one NATS subject token.
    pub fn new(type_: &str, id: &str) -> Result<Self, Invalid> {
        token("type", type_)?;
        token("id", id)?;
        Ok(Self {
            type_: type_.to_string(),
            id: id.to_string(),
        })
    }

    /// `<type>.<id>`: the event's CloudEvents `subject` and the NATS subject after the store's prefix.
    pub fn key(&self) -> String {
        format!("{}.{}", self.type_, self.id)
    }
}

/// One subject token: not empty, no `.`, `*`, `>`, whitespace or control characters.
fn token(field: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            field,
            format!("{value:?} is not one subject token ({c:?} is not allowed)"),
        ));
    }
    Ok(())
}

/// The attribute `name` of the event `at` as a header value: not empty where required, no control characters (they
/// would break the NATS protocol). The field is named only when it is refused.
fn header_text(at: &dyn Display, name: &str, value: &str, required: bool) -> Result<(), Invalid> {
    let problem = if required && value.is_empty() {
        "must not be empty"
    } else if value.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(invalid(format!("{at}.{name}"), problem))
}

/// An event to append, with its CloudEvents attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// `id`: unique per event; also the de-duplication id (`Nats-Msg-Id`).
    pub id: String,
    /// `type`, e.g. `UserCreated`.
    pub type_: String,
    /// `source`.
    pub source: String,
    /// `time`, RFC 3339.
    pub time: String,
    /// `datacontenttype`.
    pub datacontenttype: String,
    /// Extension attributes and `dataschema`, sent as `ce-<name>` headers.
    pub extensions: BTreeMap<String, String>,
    /// The data: a JSON document.
    pub data: Bytes,
}

impl NewEvent {
    /// Checks the attributes that become headers; `at` names the event in errors (`events[3]`).
    pub fn validate(&self, at: impl Display) -> Result<(), Invalid> {
        let at: &dyn Display = &at;
        header_text(at, "id", &self.id, true)?;
        header_text(at, "type", &self.type_, true)?;
        header_text(at, "source", &self.source, true)?;
        header_text(at, "time", &self.time, true)?;
        header_text(at, "datacontenttype", &self.datacontenttype, true)?;
        for (name, value) in &self.extensions {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            {
                return Err(invalid(
                    format!("{at}.{name}"),
                    "extension attribute names are lower-case letters and digits",
                ));
            }
            header_text(at, name, value, false)?;
        }
        Ok(())
    }

    /// The headers of the CloudEvents NATS binding, with `Nats-Msg-Id` = the event id.
    pub(super) fn headers(&self, aggregate: &Aggregate) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(MSG_ID, self.id.as_str());
        h.insert(CE_SPECVERSION, "1.0");
        h.insert(CE_ID, self.id.as_str());
        h.insert(CE_TYPE, self.type_.as_str());
        h.insert(CE_SOURCE, self.source.as_str());
        h.insert(CE_SUBJECT, aggregate.key());
        h.insert(CE_TIME, self.time.as_str());
        for (name, value) in &self.extensions {
            h.insert(format!("ce-{name}"), value.as_str());
        }
        h.insert(CONTENT_TYPE, self.datacontenttype.as_str());
        h
    }
}

// Header names, built once (a name from a `&str` is parsed and copied on every insert).
const MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");
const CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
const CE_ID: HeaderName = HeaderName::from_static("ce-id");
const CE_TYPE: HeaderName = HeaderName::from_static("ce-type");
const CE_SOURCE: HeaderName = HeaderName::from_static("ce-source");
const CE_SUBJECT: HeaderName = HeaderName::from_static("ce-subject");
const CE_TIME: HeaderName = HeaderName::from_static("ce-time");
const CONTENT_TYPE: HeaderName = HeaderName::from_static("content-type");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::header_size;

    fn event(id: &str) -> NewEvent {
        NewEvent {
            id: id.into(),
            type_: "UserCreated".into(),
            source: "test".into(),
            time: "2026-01-01T00:00:00Z".into(),
            datacontenttype: "application/json".into(),
            extensions: BTreeMap::new(),
            data: Bytes::from_static(b"{}"),
        }
    }
    #[test]
    fn aggregate_type_and_id_are_single_subject_tokens() {
        assert_eq!(Aggregate::new("user", "u-1").expect("ok").key(), "user.u-1");
        for (t, id) in [
            ("", "1"),
            ("user", ""),
            ("us.er", "1"),
            ("user", "a*"),
            ("user", ">"),
            ("user", "a b"),
            ("user", "a\u{0}"),
        ] {
            let e = Aggregate::new(t, id).expect_err("refused");
            assert!(e.field == "type" || e.field == "id", "{e}");
        }
    }

    #[test]
    fn headers_carry_the_cloudevents_binding_and_the_dedup_id() {
        let mut e = event("e-1");
        e.extensions.insert("traceparent".into(), "00-abc".into());
        let h = e.headers(&Aggregate::new("user", "u-1").expect("ok"));
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_string());
        assert_eq!(get("Nats-Msg-Id").as_deref(), Some("e-1"));
        assert_eq!(get("ce-id").as_deref(), Some("e-1"));
        assert_eq!(get("ce-type").as_deref(), Some("UserCreated"));
        assert_eq!(get("ce-subject").as_deref(), Some("user.u-1"));
        assert_eq!(get("ce-traceparent").as_deref(), Some("00-abc"));
        assert!(header_size(&h) > 100);
    }

    #[test]
    fn attributes_that_would_break_headers_are_refused() {
        let mut e = event("e\r\n1");
        assert_eq!(
            e.validate("events[0]").expect_err("bad").field,
            "events[0].id"
        );
        e = event("e-1");
        e.type_ = String::new();
        assert_eq!(
            e.validate("events[0]").expect_err("bad").field,
            "events[0].type"
        );
        e = event("e-1");
        e.extensions.insert("Bad-Name".into(), "x".into());
        assert!(e.validate("events[0]").is_err());
        assert!(event("e-1").validate("events[0]").is_ok());
    }
}
