//! The checkpoint: per projection, the last stream sequence applied and the rebuild token it was applied under,
//! stored in the read model's own database and advanced with a compare-and-set in the same transaction as the
//! read model. A processor whose idea of the checkpoint is stale (another one committed meanwhile) fails the
//! compare-and-set and its transaction applies nothing.
//!
//! A partition of a partitioned projection keeps its checkpoint in a row of its own (see [`Slot`]) that also names
//! the partition's owner: the compare-and-set then also requires the owner, so a replica that lost the partition
//! (another one claimed the row) commits nothing — the claim and the checkpoint are one row, in the apply
//! transaction.

use std::collections::BTreeMap;

use projectionist_crds::partition::Layout;
use sqlx::Row;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::database::{CHECKPOINTS, Database, PARTITIONS, Tx, execute};
use crate::handler::Bound;

/// Where a projection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Last stream sequence applied; 0 before the first event.
    pub last_sequence: u64,
    /// The rebuild token the read model was built under.
    pub rebuild_token: String,
}

/// Where a checkpoint lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The row's key: the projection (`<namespace>/<name>`), or a partition (`<namespace>/<name>#<partition>`).
    pub key: String,
    /// For a partition: the owner that must hold the row for a commit to count.
    pub owner: Option<String>,
}

impl Slot {
    /// The checkpoint of an unpartitioned projection.
    pub fn projection(key: &str) -> Self {
        Self {
            key: key.to_string(),
            owner: None,
        }
    }

    /// The checkpoint of a partition, held by `owner`.
    pub fn partition(key: &str, owner: &str) -> Self {
        Self {
            key: key.to_string(),
            owner: Some(owner.to_string()),
        }
    }

    fn table(&self) -> &'static str {
        if self.owner.is_some() {
            PARTITIONS
        } else {
            CHECKPOINTS
        }
    }

    /// The row's condition (`projection = ?`, and the owner for a partition) and its values.
    fn row(&self) -> (&'static str, Vec<Bound>) {
        let mut values = vec![Bound::Text(self.key.clone())];
        match &self.owner {
            Some(owner) => {
                values.push(Bound::Text(owner.clone()));
                ("projection = ? AND owner = ?", values)
            }
            None => ("projection = ?", values),
        }
    }
}

/// The current time as the checkpoint tables record it.
pub fn now() -> String {
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
    slot: &Slot,
    stream: &str,
    token: &str,
) -> Result<(Checkpoint, bool), sqlx::Error> {
    let projection = slot.key.as_str();
    let created = execute(
        tx,
        &db.insert_ignore(
            slot.table(),
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
        "SELECT last_sequence, rebuild_token FROM {} WHERE projection = ?",
        slot.table()
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
pub fn advance_statement(slot: &Slot, from: &Checkpoint, to: u64) -> (String, Vec<Bound>) {
    let (row, row_values) = slot.row();
    let mut values = vec![seq(to), Bound::Text(now())];
    values.extend(row_values);
    values.push(seq(from.last_sequence));
    values.push(Bound::Text(from.rebuild_token.clone()));
    (
        format!(
            "UPDATE {} SET last_sequence = ?, committed_at = ? \
             WHERE {row} AND last_sequence = ? AND rebuild_token = ?",
            slot.table()
        ),
        values,
    )
}

/// Restarts the checkpoint at 0 under a new rebuild token. `false` means another processor changed it first.
pub async fn restart(
    db: &Database,
    tx: &mut Tx,
    slot: &Slot,
    from: &Checkpoint,
    token: &str,
) -> Result<bool, sqlx::Error> {
    let (row, row_values) = slot.row();
    let sql = db.sql(&format!(
        "UPDATE {} SET last_sequence = 0, rebuild_token = ?, committed_at = ? \
         WHERE {row} AND last_sequence = ? AND rebuild_token = ?",
        slot.table()
    ));
    let mut values = vec![Bound::Text(token.into()), Bound::Text(now())];
    values.extend(row_values);
    values.push(seq(from.last_sequence));
    values.push(Bound::Text(from.rebuild_token.clone()));
    Ok(execute(tx, &sql, values).await? == 1)
}

/// Restarts every partition checkpoint of `projection` at 0 under a new rebuild token (the read model was reset for
/// a rebuild); their owners' next commits fail the compare-and-set and catch up from the start.
pub async fn restart_partitions(
    db: &Database,
    tx: &mut Tx,
    projection: &str,
    token: &str,
) -> Result<u64, sqlx::Error> {
    let sql = db.sql(&format!(
        "UPDATE {PARTITIONS} SET last_sequence = 0, rebuild_token = ?, committed_at = ? \
         WHERE projection > ? AND projection < ?"
    ));
    let (low, high) = partition_range(projection);
    execute(
        tx,
        &sql,
        vec![
            Bound::Text(token.into()),
            Bound::Text(now()),
            Bound::Text(low),
            Bound::Text(high),
        ],
    )
    .await
}

/// The checkpoints a batch moves: an unpartitioned projection's one, or those of the partitions a worker reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// One checkpoint.
    One(Slot, Checkpoint),
    /// One checkpoint per partition, the partition of an event read from its stored subject.
    Parts(Layout, BTreeMap<u32, (Slot, Checkpoint)>),
}

/// One checkpoint moved by a commit: `partition` (`None`: the projection's) to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// Which checkpoint.
    pub partition: Option<u32>,
    /// Its new last sequence.
    pub to: u64,
}

impl Cursor {
    /// Where reading resumes: after the lowest checkpoint.
    pub fn position(&self) -> u64 {
        match self {
            Self::One(_, at) => at.last_sequence,
            Self::Parts(_, parts) => parts
                .values()
                .map(|(_, at)| at.last_sequence)
                .min()
                .unwrap_or_default(),
        }
    }

    /// Whether the event at `seq` on `subject` is still to be applied (after its checkpoint, in a partition read).
    pub fn pending(&self, seq: u64, subject: &str) -> bool {
        match self {
            Self::One(_, at) => seq > at.last_sequence,
            Self::Parts(layout, parts) => layout
                .partition_in(subject)
                .and_then(|p| parts.get(&p))
                .is_some_and(|(_, at)| seq > at.last_sequence),
        }
    }

    /// The checkpoints that committing the events `(seq, subject)` moves, each to its last event among them.
    pub fn moves<'a>(&self, committed: impl IntoIterator<Item = (u64, &'a str)>) -> Vec<Move> {
        match self {
            Self::One(_, at) => committed
                .into_iter()
                .map(|(seq, _)| seq)
                .max()
                .filter(|to| *to > at.last_sequence)
                .map(|to| {
                    vec![Move {
                        partition: None,
                        to,
                    }]
                })
                .unwrap_or_default(),
            Self::Parts(layout, _) => {
                let mut last: BTreeMap<u32, u64> = BTreeMap::new();
                for (seq, subject) in committed {
                    if let Some(p) = layout.partition_in(subject) {
                        let e = last.entry(p).or_default();
                        *e = (*e).max(seq);
                    }
                }
                last.into_iter()
                    .map(|(p, to)| Move {
                        partition: Some(p),
                        to,
                    })
                    .collect()
            }
        }
    }

    /// The compare-and-sets of `moves` (SQL with `?` placeholders), each of which must match one row.
    pub fn statements(&self, moves: &[Move]) -> Vec<(String, Vec<Bound>)> {
        moves
            .iter()
            .filter_map(|m| {
                let (slot, at) = self.checkpoint(m.partition)?;
                Some(advance_statement(slot, at, m.to))
            })
            .collect()
    }

    fn checkpoint(&self, partition: Option<u32>) -> Option<(&Slot, &Checkpoint)> {
        match (self, partition) {
            (Self::One(slot, at), None) => Some((slot, at)),
            (Self::Parts(_, parts), Some(p)) => parts.get(&p).map(|(s, a)| (s, a)),
            _ => None,
        }
    }

    /// Records committed `moves`.
    pub fn apply(&mut self, moves: &[Move]) {
        for m in moves {
            match (&mut *self, m.partition) {
                (Self::One(_, at), None) => at.last_sequence = m.to,
                (Self::Parts(_, parts), Some(p)) => {
                    if let Some((_, at)) = parts.get_mut(&p) {
                        at.last_sequence = m.to;
                    }
                }
                _ => {}
            }
        }
    }
}

/// The key of partition `partition` of `projection`.
pub fn partition_key(projection: &str, partition: u32) -> String {
    format!("{projection}#{partition}")
}

/// Keys strictly between these two are the partitions of `projection` (`#` is followed by `$` in ASCII).
pub fn partition_range(projection: &str) -> (String, String) {
    (format!("{projection}#"), format!("{projection}$"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_commits_only_while_it_holds_the_row() {
        let from = Checkpoint {
            last_sequence: 7,
            rebuild_token: "t".into(),
        };
        let (sql, values) = advance_statement(&Slot::partition("ns/p#3", "pod-a"), &from, 9);
        assert!(sql.contains(PARTITIONS), "{sql}");
        assert!(sql.contains("owner = ?"), "{sql}");
        assert_eq!(values.len(), 6);
        assert_eq!(values[3], Bound::Text("pod-a".into()));
        let (sql, values) = advance_statement(&Slot::projection("ns/p"), &from, 9);
        assert!(sql.contains(CHECKPOINTS) && !sql.contains("owner"), "{sql}");
        assert_eq!(values.len(), 5);
    }

    fn at(n: u64) -> Checkpoint {
        Checkpoint {
            last_sequence: n,
            rebuild_token: String::new(),
        }
    }

    #[test]
    fn a_worker_moves_each_partition_it_touched_to_its_last_event() {
        let layout = Layout::new("ns.s", 4);
        let parts = BTreeMap::from([
            (1, (Slot::partition("ns/p#1", "me"), at(5))),
            (2, (Slot::partition("ns/p#2", "me"), at(9))),
        ]);
        let mut cursor = Cursor::Parts(layout, parts);
        assert_eq!(cursor.position(), 5);
        assert!(cursor.pending(6, "ns.s.1.a.x"));
        assert!(
            !cursor.pending(8, "ns.s.2.a.y"),
            "at or below partition 2's checkpoint"
        );
        assert!(
            !cursor.pending(20, "ns.s.3.a.z"),
            "a partition the worker does not own"
        );
        let moves = cursor.moves([(6, "ns.s.1.a.x"), (10, "ns.s.2.a.y"), (12, "ns.s.1.a.x")]);
        assert_eq!(
            moves,
            vec![
                Move {
                    partition: Some(1),
                    to: 12
                },
                Move {
                    partition: Some(2),
                    to: 10
                }
            ]
        );
        let statements = cursor.statements(&moves);
        assert_eq!(statements.len(), 2);
        assert!(statements.iter().all(|(sql, _)| sql.contains("owner = ?")));
        cursor.apply(&moves);
        assert_eq!(cursor.position(), 10);
    }

    #[test]
    fn one_checkpoint_moves_to_the_batchs_last_event() {
        let cursor = Cursor::One(Slot::projection("ns/p"), at(3));
        assert_eq!(
            cursor.moves([(4, "a"), (7, "b")]),
            vec![Move {
                partition: None,
                to: 7
            }]
        );
        assert!(cursor.moves([(2, "a")]).is_empty());
    }

    #[test]
    fn partition_keys_fall_in_their_projections_range() {
        let (low, high) = partition_range("ns/p");
        for p in [0, 7, 1023] {
            let key = partition_key("ns/p", p);
            assert!(low < key && key < high, "{key}");
        }
        assert!(!(low.as_str() < "ns/p2#1" && "ns/p2#1" < high.as_str()));
        assert!(!(low.as_str() < "ns/p" && "ns/p" < high.as_str()));
    }
}
