//! The Projection's SQL handlers, parsed once, and the values each statement binds from an event.

use std::collections::HashMap;

use projectionist_crds::projection::{Driver, Handler};
use projectionist_crds::template::{self, EventField, HandlerError, ParamPath, Statement};
use serde_json::Value;

use crate::event::Event;

/// A value bound to a placeholder.
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    /// SQL NULL (a JSON null, or an absent optional envelope attribute).
    Null,
    /// A JSON boolean.
    Bool(bool),
    /// A JSON integer, or the stream sequence.
    Int(i64),
    /// A JSON number that is not an `i64`.
    Float(f64),
    /// A JSON string, an envelope attribute, or a JSON object/array as JSON text.
    Text(String),
}

/// A parameter the event cannot supply. Deterministic for the event: retrying never helps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param} is not in the event: {reason}")]
pub struct BindError {
    /// The parameter as written.
    pub param: String,
    /// Why.
    pub reason: String,
}

/// The handlers of one projection, by event type.
#[derive(Debug, Clone)]
pub struct Handlers {
    /// Parsed statements per event type.
    by_type: HashMap<String, Vec<Statement>>,
}

impl Handlers {
    /// Parses every handler for `driver`.
    pub fn new(handlers: &[Handler], driver: Driver) -> Result<Self, HandlerError> {
        Ok(Self {
            by_type: template::parse_handlers(handlers, driver)?
                .into_iter()
                .collect(),
        })
    }

    /// Every event type with its statements.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Statement])> {
        self.by_type.iter().map(|(t, s)| (t.as_str(), s.as_slice()))
    }

    /// The statements for an event type, if it has a handler.
    pub fn for_type(&self, event_type: &str) -> Option<&[Statement]> {
        self.by_type.get(event_type).map(Vec::as_slice)
    }
}

/// The value of one parameter for `event`.
pub fn bind(path: &ParamPath, event: &Event) -> Result<Bound, BindError> {
    let text_or_null = |v: &Option<String>| v.clone().map(Bound::Text).unwrap_or(Bound::Null);
    match path {
        ParamPath::Event(field) => Ok(match field {
            EventField::Id => Bound::Text(event.id.clone()),
            EventField::Type => Bound::Text(event.type_.clone()),
            EventField::Source => text_or_null(&event.source),
            EventField::Subject => Bound::Text(
                event
                    .subject
                    .clone()
                    .unwrap_or_else(|| event.nats_subject.clone()),
            ),
            EventField::Time => text_or_null(&event.time),
            EventField::Sequence => Bound::Int(i64::try_from(event.sequence).unwrap_or(i64::MAX)),
        }),
        ParamPath::Data(segments) => {
            let mut value = &event.data;
            for (i, segment) in segments.iter().enumerate() {
                let next = match value {
                    Value::Object(map) => map.get(segment),
                    Value::Array(items) => segment.parse::<usize>().ok().and_then(|n| items.get(n)),
                    _ => None,
                };
                value = next.ok_or_else(|| BindError {
                    param: path.to_string(),
                    reason: format!("no `{}` in the data", segments[..=i].join(".")),
                })?;
            }
            Ok(json_to_bound(value))
        }
    }
}

/// The values of every parameter of `statement`, in binding order.
pub fn bind_all(statement: &Statement, event: &Event) -> Result<Vec<Bound>, BindError> {
    statement.params.iter().map(|p| bind(p, event)).collect()
}

fn json_to_bound(value: &Value) -> Bound {
    match value {
        Value::Null => Bound::Null,
        Value::Bool(b) => Bound::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Bound::Int(i),
            None => Bound::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Bound::Text(s.clone()),
        other => Bound::Text(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(data: Value) -> Event {
        Event {
            sequence: 9,
            nats_subject: "ns.users.user.1".into(),
            id: "e".into(),
            type_: "T".into(),
            source: None,
            subject: None,
            time: Some("2026-01-01T00:00:00Z".into()),
            data,
        }
    }

    fn data(path: &[&str]) -> ParamPath {
        ParamPath::Data(path.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn binds_json_values_by_type() {
        let e = event(
            json!({"user": {"id": "u1", "age": 3, "score": 1.5, "ok": true, "tags": ["a"], "none": null}}),
        );
        assert_eq!(
            bind(&data(&["user", "id"]), &e),
            Ok(Bound::Text("u1".into()))
        );
        assert_eq!(bind(&data(&["user", "age"]), &e), Ok(Bound::Int(3)));
        assert_eq!(bind(&data(&["user", "score"]), &e), Ok(Bound::Float(1.5)));
        assert_eq!(bind(&data(&["user", "ok"]), &e), Ok(Bound::Bool(true)));
        assert_eq!(
            bind(&data(&["user", "tags"]), &e),
            Ok(Bound::Text("[\"a\"]".into()))
        );
        assert_eq!(
            bind(&data(&["user", "tags", "0"]), &e),
            Ok(Bound::Text("a".into()))
        );
        assert_eq!(bind(&data(&["user", "none"]), &e), Ok(Bound::Null));
        assert_eq!(
            bind(&ParamPath::Event(EventField::Sequence), &e),
            Ok(Bound::Int(9))
        );
        assert_eq!(
            bind(&ParamPath::Event(EventField::Subject), &e),
            Ok(Bound::Text("ns.users.user.1".into()))
        );
    }

    #[test]
    fn a_missing_path_names_the_parameter() {
        let e = event(json!({"user": {}}));
        let err = bind(&data(&["user", "id"]), &e).expect_err("missing");
        assert_eq!(
            err.to_string(),
            ":data.user.id is not in the event: no `user.id` in the data"
        );
    }
}
