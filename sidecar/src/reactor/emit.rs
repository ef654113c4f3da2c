//! Events a reactor emits: the body of an `application/cloudevents-batch+json` answer — a JSON array of structured
//! CloudEvents, each with `subject` = `<type>.<id>` of the aggregate it is appended to — parsed into the events the
//! store appends atomically. Each emitted event's id is assigned here, derived from the reactor, the delivered event
//! and the position in the answer, so that appending the answer to a redelivered event again is a duplicate the
//! server drops.

use serde_json::value::RawValue;

use crate::api::body::{now, parse_event, structured};
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
    let raw: &RawValue = serde_json::from_slice(body)
        .map_err(|e| format!("the answer's events are not JSON: {e}"))?;
    let events: Vec<&RawValue> = match raw.get().starts_with('[') {
        true => serde_json::from_str(raw.get()).map_err(|e| e.to_string())?,
        false => return Err("the answer's events must be a JSON array of CloudEvents".into()),
    };
    if events.len() > MAX_EVENTS {
        return Err(format!(
            "the answer emits {} events; at most {MAX_EVENTS} are appended at once",
            events.len()
        ));
    }
    let now = now();
    events
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let (aggregate, members) =
                structured(raw).map_err(|e| format!("emitted event {i} {e}"))?;
            let id = emitted_id(reactor, delivered, i);
            let event = parse_event(&format!("events[{i}]"), members, &now, Some(id))
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
