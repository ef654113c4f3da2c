//! Events a reactor emits: the body of an `application/cloudevents-batch+json` answer — a JSON array of structured
//! CloudEvents, each with `subject` = `<type>.<id>` of the aggregate it is appended to — parsed into the events the
//! store appends atomically. Each emitted event's id is assigned here, derived from the reactor, the delivered event
//! and the position in the answer, so that appending the answer to a redelivered event again is a duplicate the
//! server drops.

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::api::events::parse_event;
use crate::store::{Aggregate, MAX_EVENTS, NewEvent};

/// The id of the `position`-th event emitted for `delivered` by `reactor`.
pub fn emitted_id(reactor: &str, delivered: &str, position: usize) -> String {
    format!("{reactor}/{delivered}/{position}")
}

/// Parses an answer's events; the error says what is wrong with the answer.
pub fn parse(
    body: &[u8],
    reactor: &str,
    delivered: &str,
) -> Result<Vec<(Aggregate, NewEvent)>, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the answer's events are not JSON: {e}"))?;
    let Value::Array(events) = value else {
        return Err("the answer's events must be a JSON array of CloudEvents".into());
    };
    if events.len() > MAX_EVENTS {
        return Err(format!(
            "the answer emits {} events; at most {MAX_EVENTS} are appended at once",
            events.len()
        ));
    }
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let Value::Object(mut map) = event else {
                return Err(format!("emitted event {i} is not a JSON object"));
            };
            let subject = match map.remove("subject") {
                Some(Value::String(s)) => s,
                _ => {
                    return Err(format!(
                        "emitted event {i} has no subject: set it to <type>.<id> of the aggregate it belongs to"
                    ));
                }
            };
            let (type_, id) = subject.split_once('.').unwrap_or((subject.as_str(), ""));
            let aggregate = Aggregate::new(type_, id)
                .map_err(|e| format!("emitted event {i}: subject {subject:?}: {e}"))?;
            map.insert(
                "id".into(),
                Value::String(emitted_id(reactor, delivered, i)),
            );
            let event = parse_event(i, Value::Object(map), &now)
                .map_err(|p| format!("emitted event {i}: {}", p.detail))?;
            Ok((aggregate, event))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_get_derived_ids_and_their_aggregate_from_the_subject() {
        let body = br#"[
            {"type": "WelcomeSent", "subject": "mail.m-1", "data": {"to": "ada@example.com"}},
            {"type": "Audited", "subject": "audit.a-9", "id": "ignored", "source": "mailer"}
        ]"#;
        let events = parse(body, "shop/welcome", "e-1").expect("parses");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].0.key(), "mail.m-1");
        assert_eq!(events[0].1.id, "shop/welcome/e-1/0");
        assert_eq!(events[1].1.id, "shop/welcome/e-1/1");
        assert_eq!(events[1].1.source, "mailer");
        assert_eq!(&events[0].1.data[..], br#"{"to":"ada@example.com"}"#);
    }

    #[test]
    fn answers_that_cannot_be_appended_say_why() {
        for (body, says) in [
            (&b"{}"[..], "array"),
            (br#"[{"type": "T"}]"#, "no subject"),
            (br#"[{"type": "T", "subject": "a.b.c"}]"#, "subject"),
            (br#"[{"subject": "a.b"}]"#, "type"),
            (b"not json", "not JSON"),
        ] {
            let e = parse(body, "r", "e").expect_err("refused");
            assert!(e.contains(says), "{e}");
        }
        assert!(parse(b"[]", "r", "e").expect("empty").is_empty());
    }
}
