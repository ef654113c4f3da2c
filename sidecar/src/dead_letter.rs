//! Dead letters: events the projection could not apply, recorded in the read model's database in the same
//! transaction that moves the checkpoint past them, so that no event is ever skipped without a record.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use base64::Engine;
use projectionist_crds::projection::ErrorPolicy;

use crate::database::{DEAD_LETTERS, Database, Tx, execute};
use crate::handler::Bound;

/// How a payload is kept in the `payload` column (`payload_encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadEncoding {
    /// The body as it was: UTF-8 text without NUL characters.
    Utf8,
    /// Standard base64 of the body: it is not UTF-8 or holds a NUL, which text columns refuse (PostgreSQL).
    Base64,
}

impl PayloadEncoding {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Utf8 => "utf8",
            Self::Base64 => "base64",
        }
    }
}

/// The payload in a form every database's text column accepts, and how it was encoded.
pub fn encode_payload(body: &[u8]) -> (String, PayloadEncoding) {
    match std::str::from_utf8(body) {
        Ok(text) if !text.contains('\0') => (text.to_string(), PayloadEncoding::Utf8),
        _ => (
            base64::engine::general_purpose::STANDARD.encode(body),
            PayloadEncoding::Base64,
        ),
    }
}

/// A text attribute made storable: NUL characters replaced, cut to `max` characters (the column's size).
fn storable(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| if c == '\0' { '\u{fffd}' } else { c })
        .take(max)
        .collect()
}

/// The policy's name, as recorded and in metrics.
pub fn policy_name(policy: ErrorPolicy) -> &'static str {
    match policy {
        ErrorPolicy::DeadLetter => "deadLetter",
        ErrorPolicy::Skip => "skip",
        ErrorPolicy::Halt => "halt",
    }
}

/// One event that could not be applied.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Stream sequence.
    pub sequence: u64,
    /// Event id, if it could be read.
    pub event_id: Option<String>,
    /// Event type, if it could be read.
    pub event_type: Option<String>,
    /// NATS subject.
    pub subject: String,
    /// The message body, as it was.
    pub payload: Vec<u8>,
    /// Why it failed.
    pub error: String,
    /// The policy that recorded it.
    pub policy: ErrorPolicy,
    /// How many times it was tried.
    pub attempts: u32,
}

/// Records a dead letter (once per projection and sequence).
pub async fn record(
    db: &Database,
    tx: &mut Tx,
    projection: &str,
    letter: &DeadLetter,
) -> Result<(), sqlx::Error> {
    let sql = db.insert_ignore(
        DEAD_LETTERS,
        "projection, stream_sequence, event_id, event_type, subject, payload, payload_encoding, error, policy, \
         attempts, recorded_at",
        "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?",
    );
    let opt = |v: &Option<String>| {
        v.as_deref()
            .map(|t| Bound::Text(storable(t, 255)))
            .unwrap_or(Bound::Null)
    };
    let (payload, encoding) = encode_payload(&letter.payload);
    execute(
        tx,
        &sql,
        vec![
            Bound::Text(projection.into()),
            Bound::Int(i64::try_from(letter.sequence).unwrap_or(i64::MAX)),
            opt(&letter.event_id),
            opt(&letter.event_type),
            Bound::Text(storable(&letter.subject, 1024)),
            Bound::Text(payload),
            Bound::Text(encoding.as_str().into()),
            Bound::Text(storable(&letter.error, 65_535)),
            Bound::Text(policy_name(letter.policy).into()),
            Bound::Int(i64::from(letter.attempts)),
            Bound::Text(
                OffsetDateTime::now_utc()
                    .format(&Rfc3339)
                    .unwrap_or_default(),
            ),
        ],
    )
    .await?;
    Ok(())
}

/// Publishes a dead letter to `subject`: the body as it was, the projection, sequence, subject, error and the
/// event's id and type in headers.
pub async fn publish(
    nats: &async_nats::Client,
    subject: &str,
    projection: &str,
    letter: &DeadLetter,
) -> Result<(), async_nats::PublishError> {
    publish_from(
        nats,
        subject,
        "Projectionist-Projection",
        projection,
        letter,
    )
    .await
}

/// Publishes a dead letter of `owner` (a projection or a reactor, named in the `owner_header`).
pub async fn publish_from(
    nats: &async_nats::Client,
    subject: &str,
    owner_header: &str,
    owner: &str,
    letter: &DeadLetter,
) -> Result<(), async_nats::PublishError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(owner_header, owner);
    headers.insert(
        "Projectionist-Stream-Sequence",
        letter.sequence.to_string().as_str(),
    );
    headers.insert("Projectionist-Subject", letter.subject.as_str());
    headers.insert(
        "Projectionist-Error",
        letter.error.replace(['\r', '\n'], " ").as_str(),
    );
    if let Some(id) = &letter.event_id {
        headers.insert("ce-id", id.as_str());
    }
    if let Some(t) = &letter.event_type {
        headers.insert("ce-type", t.as_str());
    }
    nats.publish_with_headers(subject.to_string(), headers, letter.payload.clone().into())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_without_nul_is_kept_as_is() {
        assert_eq!(
            encode_payload("{\"a\": \"Grüße\"}".as_bytes()),
            ("{\"a\": \"Grüße\"}".to_string(), PayloadEncoding::Utf8)
        );
        assert_eq!(encode_payload(b""), (String::new(), PayloadEncoding::Utf8));
    }

    #[test]
    fn invalid_utf8_and_nul_are_base64() {
        assert_eq!(
            encode_payload(b"\xff\x00"),
            ("/wA=".to_string(), PayloadEncoding::Base64)
        );
        assert_eq!(
            encode_payload(b"a\x00b"),
            ("YQBi".to_string(), PayloadEncoding::Base64)
        );
    }

    #[test]
    fn attributes_lose_nul_and_fit_their_column() {
        assert_eq!(storable("a\0b", 10), "a\u{fffd}b");
        assert_eq!(storable(&"é".repeat(300), 255).chars().count(), 255);
    }
}
