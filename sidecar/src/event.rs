//! Events as they arrive from JetStream, decoded from CloudEvents' NATS binding.
//!
//! Binary mode (the default for appends): `ce-id`, `ce-type`, `ce-source`, `ce-subject`, `ce-time` headers and the
//! JSON data as the body. Structured mode: a JSON envelope with `specversion`, `id`, `type`, `data`, … as the body
//! (recognised by `content-type: application/cloudevents+json`, or by a body that has `specversion`, `type` and `id`
//! when there are no `ce-` headers).

use async_nats::HeaderMap;
use serde_json::Value;

/// A decoded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Stream sequence.
    pub sequence: u64,
    /// NATS subject it was appended to.
    pub nats_subject: String,
    /// `id`.
    pub id: String,
    /// `type`.
    pub type_: String,
    /// `source`, if given.
    pub source: Option<String>,
    /// `subject`, if given (else the NATS subject is used for `:event.subject`).
    pub subject: Option<String>,
    /// `time`, if given.
    pub time: Option<String>,
    /// The data.
    pub data: Value,
}

/// Why a message is not a usable event. Deterministic: retrying never helps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No event type anywhere.
    #[error("no event type: neither a ce-type header nor a structured CloudEvent body")]
    MissingType,
    /// No event id.
    #[error("no event id (ce-id header or id field)")]
    MissingId,
    /// The body is not JSON.
    #[error("the body is not JSON: {0}")]
    Body(String),
    /// A header is not UTF-8 or an envelope field has the wrong type.
    #[error("invalid {field}: {message}")]
    Field {
        /// The attribute.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn header(headers: Option<&HeaderMap>, name: &str) -> Option<String> {
    headers
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_string())
}

/// Whether a message holds a structured-mode CloudEvent (the whole event as its JSON body) rather than a binary-mode
/// one (attributes in `ce-*` headers, the data as the body).
pub fn is_structured(headers: Option<&HeaderMap>) -> bool {
    let get = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    get("content-type").is_some_and(|ct| ct.starts_with("application/cloudevents+json"))
        || get("ce-type").is_none()
}

/// Decodes one message.
pub fn decode(
    sequence: u64,
    nats_subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Event, DecodeError> {
    let ce_type = header(headers, "ce-type");
    if is_structured(headers) {
        let body: Value =
            serde_json::from_slice(payload).map_err(|e| DecodeError::Body(e.to_string()))?;
        let Value::Object(map) = &body else {
            return Err(DecodeError::MissingType);
        };
        let text = |field: &'static str| -> Result<Option<String>, DecodeError> {
            match map.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(DecodeError::Field {
                    field,
                    message: format!("expected a string, found {other}"),
                }),
            }
        };
        let type_ = text("type")?
            .filter(|t| !t.is_empty())
            .ok_or(DecodeError::MissingType)?;
        let id = text("id")?
            .filter(|t| !t.is_empty())
            .ok_or(DecodeError::MissingId)?;
        let data = match (map.get("data"), map.get("data_base64")) {
            (Some(d), _) => d.clone(),
            (None, Some(_)) => {
                return Err(DecodeError::Field {
                    field: "data_base64",
                    message: "binary data is not supported; handlers need JSON data".into(),
                });
            }
            (None, None) => Value::Null,
        };
        return Ok(Event {
            sequence,
            nats_subject: nats_subject.to_string(),
            id,
            type_,
            source: text("source")?,
            subject: text("subject")?,
            time: text("time")?,
            data,
        });
    }
    let type_ = ce_type
        .filter(|t| !t.is_empty())
        .ok_or(DecodeError::MissingType)?;
    let id = header(headers, "ce-id")
        .or_else(|| header(headers, "Nats-Msg-Id"))
        .filter(|t| !t.is_empty())
        .ok_or(DecodeError::MissingId)?;
    let data = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(payload).map_err(|e| DecodeError::Body(e.to_string()))?
    };
    Ok(Event {
        sequence,
        nats_subject: nats_subject.to_string(),
        id,
        type_,
        source: header(headers, "ce-source"),
        subject: header(headers, "ce-subject"),
        time: header(headers, "ce-time"),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    }

    #[test]
    fn binary_mode_reads_headers_and_json_body() {
        let h = headers(&[
            ("ce-id", "e1"),
            ("ce-type", "UserCreated"),
            ("ce-subject", "user.1"),
            ("ce-time", "t"),
        ]);
        let e = decode(7, "ns.users.user.1", Some(&h), br#"{"id":"1"}"#).expect("decodes");
        assert_eq!(
            (e.sequence, e.id.as_str(), e.type_.as_str()),
            (7, "e1", "UserCreated")
        );
        assert_eq!(e.subject.as_deref(), Some("user.1"));
        assert_eq!(e.data["id"], "1");
    }

    #[test]
    fn structured_mode_reads_the_envelope() {
        let body = br#"{"specversion":"1.0","id":"e2","type":"UserDeleted","source":"/s","data":{"id":"2"}}"#;
        let e = decode(1, "x", None, body).expect("decodes");
        assert_eq!((e.id.as_str(), e.type_.as_str()), ("e2", "UserDeleted"));
        assert_eq!(e.source.as_deref(), Some("/s"));
        let h = headers(&[
            ("content-type", "application/cloudevents+json"),
            ("ce-type", "Ignored"),
        ]);
        assert_eq!(
            decode(1, "x", Some(&h), body).expect("decodes").type_,
            "UserDeleted"
        );
    }

    #[test]
    fn undecodable_messages_say_why() {
        let h = headers(&[("ce-id", "e"), ("ce-type", "T")]);
        assert!(matches!(
            decode(1, "x", Some(&h), b"not json"),
            Err(DecodeError::Body(_))
        ));
        assert_eq!(
            decode(1, "x", None, br#"{"data":1}"#),
            Err(DecodeError::MissingType)
        );
        assert_eq!(
            decode(1, "x", None, br#"{"type":"T"}"#),
            Err(DecodeError::MissingId)
        );
        assert!(decode(1, "x", None, b"").is_err());
    }
}
