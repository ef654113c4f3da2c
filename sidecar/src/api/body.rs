//! Events as clients send them, parsed once and without building a JSON tree: the members of an append request's
//! body and of each structured CloudEvent are read as raw JSON text borrowed from the request, each attribute
//! converted where it is used. `data` is kept as the caller wrote it — validated as JSON, insignificant whitespace
//! dropped — so its member order and the precision of its numbers survive.
//!
//! One parser for every way events come in: the API's append body ([`parse_append`]), and structured CloudEvents
//! that name their aggregate in `subject` ([`structured`]) — a reactor's emitted events and the `append` command's
//! NDJSON lines.

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{Deserializer, Visitor};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::problem::Problem;
use crate::store::{Aggregate, Expected, MAX_EVENTS, NewEvent};

/// The `source` of events that do not name one.
pub const DEFAULT_SOURCE: &str = "projectionist-sidecar";

/// A JSON string's text, borrowed from the request unless it holds escapes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Text<'a>(pub Cow<'a, str>);

impl Borrow<str> for Text<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// An object's members: names and their raw JSON values (a repeated name: the last one counts).
pub type Members<'a> = BTreeMap<Text<'a>, &'a RawValue>;

/// The members of `raw` if it is an object.
pub fn members(raw: &RawValue) -> Option<Members<'_>> {
    if !raw.get().starts_with('{') {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

/// A member's value as a string: `Ok(None)` when absent or null, `Err` with the value's JSON when not a string.
fn string<'a>(value: Option<&'a RawValue>) -> Result<Option<Cow<'a, str>>, &'a str> {
    match value.map(RawValue::get) {
        None | Some("null") => Ok(None),
        Some(json) if json.starts_with('"') => serde_json::from_str::<Text>(json)
            .map(|t| Some(t.0))
            .map_err(|_| json),
        Some(json) => Err(json),
    }
}

/// Parses an append request: `{"expectedVersion": N?, "events": [...]}`.
pub fn parse_append(body: &[u8]) -> Result<(Expected, Vec<NewEvent>), Problem> {
    let not_json =
        |e: serde_json::Error| Problem::bad_request(format!("the body is not JSON: {e}"));
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        serde_json::from_slice::<&RawValue>(body).map_err(not_json)?;
        return Err(Problem::bad_request(
            "the body must be an object with `events`",
        ));
    }
    let mut root: Members = serde_json::from_slice(body).map_err(not_json)?;
    let expected = match root.remove("expectedVersion").map(RawValue::get) {
        None | Some("null") => Expected::Any,
        Some(n) if let Ok(v) = n.parse::<u64>() => Expected::Version(v),
        Some(other) => {
            return Err(Problem::bad_request(format!(
                "expectedVersion must be a non-negative integer (the stream sequence of the aggregate's last \
                 event, 0 for none), got {other}"
            ))
            .with("field", "expectedVersion"));
        }
    };
    let events: Vec<&RawValue> = match root.remove("events") {
        Some(raw) if raw.get().starts_with('[') => {
            serde_json::from_str(raw.get()).map_err(not_json)?
        }
        _ => {
            return Err(
                Problem::bad_request("events must be an array of events").with("field", "events")
            );
        }
    };
    if let Some(unknown) = root.keys().next() {
        return Err(Problem::bad_request(format!(
            "unknown member {:?}: the body has expectedVersion and events",
            unknown.0
        )));
    }
    if events.is_empty() {
        return Err(Problem::bad_request("events must not be empty").with("field", "events"));
    }
    if events.len() > MAX_EVENTS {
        return Err(Problem::bad_request(format!(
            "at most {MAX_EVENTS} events per request, got {}",
            events.len()
        ))
        .with("field", "events"));
    }
    let now = now();
    let events = events
        .into_iter()
        .enumerate()
        .map(|(i, raw)| match members(raw) {
            Some(m) => parse_event(&format!("events[{i}]"), m, &now, None),
            None => Err(
                Problem::bad_request(format!("events[{i}] must be an object"))
                    .with("field", format!("events[{i}]")),
            ),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((expected, events))
}

/// The time events that do not name one get: now, RFC 3339.
pub fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// An event from its members; `at` names it in errors (`events[3]`). `assigned_id`, when given, is the event's id
/// whatever the members say (a reactor's emitted events).
pub fn parse_event(
    at: &str,
    mut map: Members<'_>,
    now: &str,
    assigned_id: Option<String>,
) -> Result<NewEvent, Problem> {
    let bad = |field: &str, message: String| {
        Problem::bad_request(format!("{at}.{field}: {message}"))
            .with("field", format!("{at}.{field}"))
    };
    let mut text = |name: &str, required: bool| -> Result<Option<String>, Problem> {
        match string(map.remove(name)) {
            Ok(None) if required => Err(bad(name, "is required".into())),
            Ok(Some(s)) if required && s.is_empty() => Err(bad(name, "must not be empty".into())),
            Ok(s) => Ok(s.map(Cow::into_owned)),
            Err(json) => Err(bad(name, format!("must be a string, got {json}"))),
        }
    };
    let id = match assigned_id {
        Some(id) => {
            text("id", false).ok();
            id
        }
        None => text("id", true)?.unwrap_or_default(),
    };
    let type_ = text("type", true)?.unwrap_or_default();
    let source = text("source", false)?.unwrap_or_else(|| DEFAULT_SOURCE.into());
    let time = text("time", false)?;
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
    let time = match time {
        Some(t) if OffsetDateTime::parse(&t, &Rfc3339).is_err() => {
            return Err(bad("time", format!("{t:?} is not an RFC 3339 timestamp")));
        }
        Some(t) => t,
        None => now.to_string(),
    };
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
    let data = map
        .remove("data")
        .map_or(Bytes::from_static(b"null"), |raw| compact(raw.get()));
    let extensions = map
        .into_iter()
        .map(|(name, value)| match string(Some(value)) {
            Ok(Some(s)) => Ok((name.0.into_owned(), s.into_owned())),
            Ok(None) | Err(_) => Err(bad(
                &name.0,
                format!("extension attributes are strings, got {}", value.get()),
            )),
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let event = NewEvent {
        id,
        type_,
        source,
        time,
        datacontenttype,
        extensions,
        data,
    };
    event
        .validate(at)
        .map_err(|e| Problem::bad_request(e.to_string()).with("field", e.field))?;
    Ok(event)
}

/// A structured CloudEvent that names its aggregate in `subject` (`<type>.<id>`): the aggregate and the remaining
/// members, for [`parse_event`]. The error says what is wrong, without naming the event.
pub fn structured(raw: &RawValue) -> Result<(Aggregate, Members<'_>), String> {
    let mut map = members(raw).ok_or("is not a JSON object")?;
    let subject = match string(map.remove("subject")) {
        Ok(Some(s)) => s,
        _ => {
            return Err(
                "has no subject: set it to <type>.<id> of the aggregate it belongs to".into(),
            );
        }
    };
    let (type_, id) = subject.split_once('.').unwrap_or((&subject, ""));
    let aggregate = Aggregate::new(type_, id).map_err(|e| {
        format!("subject {subject:?} is not <type>.<id> (one subject token each): {e}")
    })?;
    Ok((aggregate, map))
}

/// JSON text without insignificant whitespace (whitespace outside strings); `json` is valid JSON.
fn compact(json: &str) -> Bytes {
    let bytes = json.as_bytes();
    if !bytes.iter().any(u8::is_ascii_whitespace) {
        return Bytes::copy_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
            out.push(b);
        } else if !b.is_ascii_whitespace() {
            out.push(b);
        }
    }
    Bytes::from(out)
}

/// `application/json` or a `+json` media type, parameters aside.
pub fn is_json_media_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
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
            {"id": "e1", "type": "UserCreated", "data": {"name": "Ada Lovelace", "b": 1, "a": 2}, "traceparent": "00-1"},
            {"id": "e2", "type": "UserRenamed", "source": "svc", "time": "2026-01-01T00:00:00Z", "data": null},
            {"id": "e\u0033", "type": "T", "data": [1.50, 12345678901234567890123, "a \" b\\"]}
        ]}"#;
        let (expected, events) = parse_append(body).expect("parses");
        assert_eq!(expected, Expected::Version(0));
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].source, DEFAULT_SOURCE);
        assert_eq!(
            events[0].data.as_ref(),
            br#"{"name":"Ada Lovelace","b":1,"a":2}"#
        );
        assert_eq!(
            events[0].extensions.get("traceparent").map(String::as_str),
            Some("00-1")
        );
        assert!(OffsetDateTime::parse(&events[0].time, &Rfc3339).is_ok());
        assert_eq!(events[1].source, "svc");
        assert_eq!(events[1].time, "2026-01-01T00:00:00Z");
        assert_eq!(events[1].data.as_ref(), b"null");
        assert_eq!(events[2].id, "e3");
        assert_eq!(
            events[2].data.as_ref(),
            br#"[1.50,12345678901234567890123,"a \" b\\"]"#
        );
        let (any, events) =
            parse_append(br#" {"events":[{"id":"a","type":"T"}]}"#).expect("parses");
        assert_eq!(any, Expected::Any);
        assert_eq!(events[0].data.as_ref(), b"null");
    }

    #[test]
    fn a_bad_append_request_names_what_to_change() {
        for (body, says) in [
            (&b"not json"[..], "not JSON"),
            (b"{\"events\": [", "not JSON"),
            (br#"[]"#, "object"),
            (br#"{"events": []}"#, "must not be empty"),
            (br#"{"events": {}}"#, "array"),
            (br#"{"events": [1]}"#, "events[0] must be an object"),
            (
                br#"{"expectedVersion": -1, "events": [{"id":"a","type":"T"}]}"#,
                "expectedVersion",
            ),
            (
                br#"{"expectedVersion": "3", "events": [{"id":"a","type":"T"}]}"#,
                "expectedVersion",
            ),
            (
                br#"{"expectedVersion": 3.0, "events": [{"id":"a","type":"T"}]}"#,
                "expectedVersion",
            ),
            (br#"{"events": [{"type":"T"}]}"#, "events[0].id"),
            (
                br#"{"events": [{"id":5,"type":"T"}]}"#,
                "must be a string, got 5",
            ),
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
                br#"{"events": [{"id":"a","type":"T","ext":null}]}"#,
                "strings",
            ),
            (
                br#"{"events": [{"id":"a","type":"T","data_base64":"AA=="}]}"#,
                "data_base64",
            ),
            (
                br#"{"events": [{"id":"a","type":"T","datacontenttype":"text/plain"}]}"#,
                "JSON data",
            ),
            (
                br#"{"events": [{"id":"a","type":"T","specversion":"0.3"}]}"#,
                "1.0",
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
    fn a_structured_event_names_its_aggregate_in_subject() {
        let raw: &RawValue =
            serde_json::from_str(r#"{"subject":"user.u-1","type":"T","id":"x"}"#).expect("json");
        let (aggregate, map) = structured(raw).expect("parses");
        assert_eq!(aggregate.key(), "user.u-1");
        let event = parse_event(
            "events[0]",
            map,
            "2026-01-01T00:00:00Z",
            Some("assigned".into()),
        )
        .expect("an event");
        assert_eq!(event.id, "assigned");
        for (json, says) in [
            (r#"[]"#, "object"),
            (r#"{"type":"T"}"#, "no subject"),
            (r#"{"subject":"user","type":"T"}"#, "not <type>.<id>"),
            (r#"{"subject":"a.b.c","type":"T"}"#, "not <type>.<id>"),
        ] {
            let raw: &RawValue = serde_json::from_str(json).expect("json");
            let e = structured(raw).expect_err("refused");
            assert!(e.contains(says), "{json} → {e}");
        }
    }

    #[test]
    fn data_keeps_its_text_without_insignificant_whitespace() {
        assert_eq!(
            &compact("{\"a\": [1, 2],\n \"b\": \"x y\"}")[..],
            br#"{"a":[1,2],"b":"x y"}"#
        );
        assert_eq!(&compact(r#""a\\" "#)[..], br#""a\\""#);
        assert_eq!(&compact(r#"{"k":"\" x"}"#)[..], br#"{"k":"\" x"}"#);
    }

    #[test]
    fn json_media_types_are_recognised() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("application/json; charset=utf-8"));
        assert!(is_json_media_type("application/cloudevents+json"));
        assert!(!is_json_media_type("text/plain"));
    }
}
