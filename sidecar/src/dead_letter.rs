//! Dead letters: events the projection could not apply, recorded in the read model's database in the same
//! transaction that moves the checkpoint past them, so that no event is ever skipped without a record.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::database::{DEAD_LETTERS, Database, Tx, execute};
use crate::handler::Bound;

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
    /// The message body, as text (lossy for non-UTF-8 bytes).
    pub payload: String,
    /// Why it failed.
    pub error: String,
    /// `deadLetter` or `skip`.
    pub policy: &'static str,
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
        "projection, stream_sequence, event_id, event_type, subject, payload, error, policy, attempts, recorded_at",
        "?, ?, ?, ?, ?, ?, ?, ?, ?, ?",
    );
    let opt = |v: &Option<String>| v.clone().map(Bound::Text).unwrap_or(Bound::Null);
    execute(
        tx,
        &sql,
        vec![
            Bound::Text(projection.into()),
            Bound::Int(i64::try_from(letter.sequence).unwrap_or(i64::MAX)),
            opt(&letter.event_id),
            opt(&letter.event_type),
            Bound::Text(letter.subject.clone()),
            Bound::Text(letter.payload.clone()),
            Bound::Text(letter.error.clone()),
            Bound::Text(letter.policy.into()),
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
