//! The checkpoint: per projection, the last stream sequence applied and the rebuild token it was applied under,
//! stored in the read model's own database and advanced with a compare-and-set in the same transaction as the
//! read model. A processor whose idea of the checkpoint is stale (another one committed meanwhile) fails the
//! compare-and-set and its transaction applies nothing.

use sqlx::Row;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::database::{CHECKPOINTS, Database, Tx, execute};
use crate::handler::Bound;

/// Where a projection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Last stream sequence applied; 0 before the first event.
    pub last_sequence: u64,
    /// The rebuild token the read model was built under.
    pub rebuild_token: String,
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn seq(n: u64) -> Bound {
    Bound::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Reads the checkpoint, creating it (at 0, with `token`) if the projection has none. Returns it and whether it was
/// created now.
pub async fn load_or_init(
    db: &Database,
    tx: &mut Tx,
    projection: &str,
    stream: &str,
    token: &str,
) -> Result<(Checkpoint, bool), sqlx::Error> {
    let created = execute(
        tx,
        &db.insert_ignore(
            CHECKPOINTS,
            "projection, stream, last_sequence, rebuild_token, committed_at",
            "?, ?, 0, ?, ?",
        ),
        vec![
            Bound::Text(projection.into()),
            Bound::Text(stream.into()),
            Bound::Text(token.into()),
            Bound::Text(now()),
        ],
    )
    .await?
        == 1;
    let row = sqlx::query(sqlx::AssertSqlSafe(db.sql(&format!(
        "SELECT last_sequence, rebuild_token FROM {CHECKPOINTS} WHERE projection = ?"
    ))))
    .bind(projection.to_string())
    .fetch_one(&mut **tx)
    .await?;
    let last: i64 = row.try_get(0)?;
    let rebuild_token: String = row.try_get(1)?;
    Ok((
        Checkpoint {
            last_sequence: u64::try_from(last).unwrap_or(0),
            rebuild_token,
        },
        created,
    ))
}

/// The compare-and-set that moves the checkpoint from `from` to `to`: SQL (with `?` placeholders) and values.
pub fn advance_statement(projection: &str, from: &Checkpoint, to: u64) -> (String, Vec<Bound>) {
    (
        format!(
            "UPDATE {CHECKPOINTS} SET last_sequence = ?, committed_at = ? \
             WHERE projection = ? AND last_sequence = ? AND rebuild_token = ?"
        ),
        vec![
            seq(to),
            Bound::Text(now()),
            Bound::Text(projection.into()),
            seq(from.last_sequence),
            Bound::Text(from.rebuild_token.clone()),
        ],
    )
}

/// Moves the checkpoint from `from` to `to`. `false` means another processor moved it first: roll back.
pub async fn advance(
    db: &Database,
    tx: &mut Tx,
    projection: &str,
    from: &Checkpoint,
    to: u64,
) -> Result<bool, sqlx::Error> {
    let (sql, values) = advance_statement(projection, from, to);
    Ok(execute(tx, &db.sql(&sql), values).await? == 1)
}

/// Restarts the checkpoint at 0 under a new rebuild token. `false` means another processor changed it first.
pub async fn restart(
    db: &Database,
    tx: &mut Tx,
    projection: &str,
    from: &Checkpoint,
    token: &str,
) -> Result<bool, sqlx::Error> {
    let sql = db.sql(&format!(
        "UPDATE {CHECKPOINTS} SET last_sequence = 0, rebuild_token = ?, committed_at = ? \
         WHERE projection = ? AND last_sequence = ? AND rebuild_token = ?"
    ));
    let rows = execute(
        tx,
        &sql,
        vec![
            Bound::Text(token.into()),
            Bound::Text(now()),
            Bound::Text(projection.into()),
            seq(from.last_sequence),
            Bound::Text(from.rebuild_token.clone()),
        ],
    )
    .await?;
    Ok(rows == 1)
}
