//! Membership and ownership of a partitioned projection's partitions, in the read model's database: each replica's
//! lease (`projectionist_members`) and each partition's owner and checkpoint (`projectionist_partitions`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::Row;

use super::partitions::View;
use crate::checkpoint::{self, partition_key, partition_range};
use crate::database::{Database, MEMBERS, PARTITIONS, execute};
use crate::handler::Bound;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The membership and ownership tables of one projection.
#[derive(Debug, Clone)]
pub struct Tables {
    pub db: Database,
    pub projection: String,
    pub stream: String,
}

impl Tables {
    pub async fn run(&self, sql: &str, values: Vec<Bound>) -> Result<u64, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let n = execute(&mut tx, &self.db.sql(sql), values).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Creates the partitions' rows (free, at 0, under `token`) where missing.
    pub async fn ensure(&self, total: u32, token: &str) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        for p in 0..total {
            execute(
                &mut tx,
                &self.db.insert_ignore(
                    PARTITIONS,
                    "projection, stream, last_sequence, rebuild_token, committed_at, owner",
                    "?, ?, 0, ?, ?, ''",
                ),
                vec![
                    Bound::Text(partition_key(&self.projection, p)),
                    Bound::Text(self.stream.clone()),
                    Bound::Text(token.into()),
                    Bound::Text(checkpoint::now()),
                ],
            )
            .await?;
        }
        tx.commit().await
    }

    /// Renews `member`'s lease for `lease`.
    pub async fn renew(&self, member: &str, lease: Duration) -> Result<(), sqlx::Error> {
        let expires = now_ms() + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        let key = || {
            vec![
                Bound::Int(expires),
                Bound::Text(self.projection.clone()),
                Bound::Text(member.into()),
            ]
        };
        let updated = self
            .run(
                &format!("UPDATE {MEMBERS} SET expires_ms = ? WHERE projection = ? AND member = ?"),
                key(),
            )
            .await?;
        if updated == 0 {
            let mut tx = self.db.begin().await?;
            execute(
                &mut tx,
                &self
                    .db
                    .insert_ignore(MEMBERS, "expires_ms, projection, member", "?, ?, ?"),
                key(),
            )
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// Ends `member`'s lease (a clean shutdown: the others take over at once).
    pub async fn leave(&self, member: &str) -> Result<(), sqlx::Error> {
        self.run(
            &format!("DELETE FROM {MEMBERS} WHERE projection = ? AND member = ?"),
            vec![
                Bound::Text(self.projection.clone()),
                Bound::Text(member.into()),
            ],
        )
        .await
        .map(|_| ())
    }

    /// Who is alive and who owns what.
    pub async fn view(&self, me: &str, total: u32) -> Result<View, sqlx::Error> {
        let members = sqlx::query(sqlx::AssertSqlSafe(self.db.sql(&format!(
            "SELECT member FROM {MEMBERS} WHERE projection = ? AND expires_ms > ?"
        ))))
        .bind(self.projection.clone())
        .bind(now_ms())
        .fetch_all(&self.db.pool)
        .await?;
        let mut live: BTreeSet<String> = members
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect();
        live.insert(me.to_string());
        let (low, high) = partition_range(&self.projection);
        let rows = sqlx::query(sqlx::AssertSqlSafe(self.db.sql(&format!(
            "SELECT projection, owner, last_sequence FROM {PARTITIONS} WHERE projection > ? AND projection < ?"
        ))))
        .bind(low)
        .bind(high)
        .fetch_all(&self.db.pool)
        .await?;
        let mut owners = BTreeMap::new();
        let mut checkpoints = BTreeMap::new();
        for r in &rows {
            let (Ok(key), Ok(owner), Ok(last)) = (
                r.try_get::<String, _>(0),
                r.try_get::<String, _>(1),
                r.try_get::<i64, _>(2),
            ) else {
                continue;
            };
            let Some(p) = key.rsplit('#').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if p < total {
                owners.insert(p, owner);
                checkpoints.insert(p, u64::try_from(last).unwrap_or(0));
            }
        }
        Ok(View {
            me: me.to_string(),
            live: live.into_iter().collect(),
            owners,
            checkpoints,
        })
    }

    /// Moves partition `p` from `seen` to `to`; `false` when someone else moved it first.
    pub async fn hand_over(&self, p: u32, seen: &str, to: &str) -> Result<bool, sqlx::Error> {
        self.run(
            &format!("UPDATE {PARTITIONS} SET owner = ? WHERE projection = ? AND owner = ?"),
            vec![
                Bound::Text(to.into()),
                Bound::Text(partition_key(&self.projection, p)),
                Bound::Text(seen.into()),
            ],
        )
        .await
        .map(|n| n == 1)
    }
}

/// A name for this replica: the pod's (or host's) name and a random suffix, so a restarted pod is a new member.
pub fn member_name() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "sidecar".into());
    format!("{host}-{:08x}", rand_suffix())
}

fn rand_suffix() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    nanos ^ std::process::id().rotate_left(16)
}
