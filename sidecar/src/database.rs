//! The read model's database: one sqlx pool whatever the driver, the sidecar's own tables (checkpoints and dead
//! letters), and the classification of database errors into transient (retry the batch) and permanent (the event is
//! at fault).

use projectionist_crds::projection::Driver;
use sqlx::any::{AnyArguments, AnyPoolOptions};
use sqlx::{Any, AnyPool, Arguments, Transaction};

use crate::handler::Bound;

/// Name of the checkpoint table.
pub const CHECKPOINTS: &str = "projectionist_checkpoints";
/// The checkpoint and owner of each partition of a partitioned projection.
pub const PARTITIONS: &str = "projectionist_partitions";
/// The live replicas of partitioned projections, each with the time its lease runs out.
pub const MEMBERS: &str = "projectionist_members";
/// Name of the dead-letter table.
pub const DEAD_LETTERS: &str = "projectionist_dead_letters";

/// A connection pool to the read model's database.
#[derive(Debug, Clone)]
pub struct Database {
    /// The pool.
    pub pool: AnyPool,
    /// Which SQL dialect to speak.
    pub driver: Driver,
}

/// The PostgreSQL advisory lock key the sidecars' schema changes take (`projsche` in ASCII).
const SCHEMA_LOCK: i64 = 0x7072_6f6a_7363_6865;

/// A transaction on it.
pub type Tx = Transaction<'static, Any>;

/// Whether a database error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Connection lost, timeout, serialization failure, deadlock, lock wait: retry the whole batch.
    Transient,
    /// The statement fails for this event's values (constraint, type, missing table...): the event is at fault.
    Permanent,
}

impl Database {
    /// Opens a pool (connections are made lazily, so this succeeds while the database is down).
    pub fn connect_lazy(
        url: &str,
        driver: Driver,
        max_connections: u32,
    ) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_lazy(url)?;
        Ok(Self { pool, driver })
    }

    /// Rewrites `?` placeholders in the sidecar's own SQL into the driver's.
    pub fn sql(&self, text: &str) -> String {
        match self.driver {
            Driver::Postgres => {
                let mut out = String::with_capacity(text.len() + 8);
                let mut n = 0;
                for c in text.chars() {
                    if c == '?' {
                        n += 1;
                        out.push_str(&format!("${n}"));
                    } else {
                        out.push(c);
                    }
                }
                out
            }
            Driver::Mysql | Driver::Sqlite => text.to_string(),
        }
    }

    /// DDL of the sidecar's tables.
    pub fn own_tables(&self) -> Vec<String> {
        let long_text = match self.driver {
            Driver::Mysql => "LONGTEXT",
            Driver::Postgres | Driver::Sqlite => "TEXT",
        };
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {CHECKPOINTS} (
                   projection VARCHAR(255) NOT NULL PRIMARY KEY,
                   stream VARCHAR(255) NOT NULL,
                   last_sequence BIGINT NOT NULL,
                   rebuild_token VARCHAR(255) NOT NULL,
                   committed_at VARCHAR(64) NOT NULL
                 )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {PARTITIONS} (
                   projection VARCHAR(255) NOT NULL PRIMARY KEY,
                   stream VARCHAR(255) NOT NULL,
                   last_sequence BIGINT NOT NULL,
                   rebuild_token VARCHAR(255) NOT NULL,
                   committed_at VARCHAR(64) NOT NULL,
                   owner VARCHAR(255) NOT NULL DEFAULT ''
                 )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {MEMBERS} (
                   projection VARCHAR(255) NOT NULL,
                   member VARCHAR(255) NOT NULL,
                   expires_ms BIGINT NOT NULL,
                   PRIMARY KEY (projection, member)
                 )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {DEAD_LETTERS} (
                   projection VARCHAR(255) NOT NULL,
                   stream_sequence BIGINT NOT NULL,
                   event_id VARCHAR(255),
                   event_type VARCHAR(255),
                   subject VARCHAR(1024) NOT NULL,
                   payload {long_text} NOT NULL,
                   payload_encoding VARCHAR(16) NOT NULL DEFAULT 'utf8',
                   error {long_text} NOT NULL,
                   policy VARCHAR(32) NOT NULL,
                   attempts INTEGER NOT NULL,
                   recorded_at VARCHAR(64) NOT NULL,
                   PRIMARY KEY (projection, stream_sequence)
                 )"
            ),
        ]
    }

    /// Serialises schema changes across the sidecars sharing the database, until `tx` ends. PostgreSQL runs two
    /// concurrent `CREATE TABLE IF NOT EXISTS` of one table into a unique violation in its catalog (both see no table,
    /// both insert its type), so replicas starting together take a transaction-scoped advisory lock first; MySQL and
    /// MariaDB serialise DDL with metadata locks, SQLite with its database lock.
    pub async fn lock_schema(&self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        if self.driver == Driver::Postgres {
            execute_plain(tx, &format!("SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")).await?;
        }
        Ok(())
    }

    /// Brings the sidecar's tables from an earlier release up to date: the dead letters' `payload_encoding`.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let probe = format!("SELECT payload_encoding FROM {DEAD_LETTERS} WHERE 1 = 0");
        if sqlx::raw_sql(sqlx::AssertSqlSafe(probe))
            .execute(&self.pool)
            .await
            .is_err()
        {
            let alter = format!(
                "ALTER TABLE {DEAD_LETTERS} ADD COLUMN payload_encoding VARCHAR(16) NOT NULL DEFAULT 'utf8'"
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(alter))
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// An INSERT that does nothing if the row exists.
    pub fn insert_ignore(&self, table: &str, columns: &str, values: &str) -> String {
        let text = match self.driver {
            Driver::Mysql => format!("INSERT IGNORE INTO {table} ({columns}) VALUES ({values})"),
            Driver::Postgres | Driver::Sqlite => {
                format!("INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT DO NOTHING")
            }
        };
        self.sql(&text)
    }

    /// Starts a transaction.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        self.pool.begin().await
    }
}

/// Builds the arguments of a statement.
pub fn arguments(values: Vec<Bound>) -> Result<AnyArguments, sqlx::Error> {
    let mut args = AnyArguments::default();
    for v in values {
        let r = match v {
            Bound::Null => args.add(Option::<String>::None),
            Bound::Bool(b) => args.add(b),
            Bound::Int(i) => args.add(i),
            Bound::Float(f) => args.add(f),
            Bound::Text(s) => args.add(s),
        };
        r.map_err(sqlx::Error::Encode)?;
    }
    Ok(args)
}

/// Runs a statement with arguments; returns the rows affected.
pub async fn execute(tx: &mut Tx, sql: &str, values: Vec<Bound>) -> Result<u64, sqlx::Error> {
    let args = arguments(values)?;
    let result = sqlx::query_with(sqlx::AssertSqlSafe(sql.to_string()), args)
        .execute(&mut **tx)
        .await?;
    Ok(result.rows_affected())
}

/// Runs a statement without arguments.
pub async fn execute_plain(tx: &mut Tx, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Sorts a database's error code into transient or permanent, by what the code means rather than where it
/// happened. SQLSTATE classes (PostgreSQL and MySQL/MariaDB alike): connection exceptions (`08`), serialization
/// failures and deadlocks (`40001`, `40P01`), insufficient resources (`53`), operator intervention such as a server
/// shutting down or a statement timeout (`57`), system errors (`58`) and lock timeouts (`55P03`) are transient;
/// everything else — data exceptions (`22`), constraint violations (`23`), syntax and undefined objects (`42`) — is
/// the event's fault. MySQL's generic `HY000` is transient only for lock waits and lost servers. SQLite's result
/// codes (numeric): busy, locked, I/O error and full disk are transient.
pub fn classify_code(code: &str, message: &str) -> ErrorClass {
    let transient = match code {
        "HY000" => {
            message.contains("Lock wait")
                || message.contains("gone away")
                || message.contains("Lost connection")
        }
        "40001" | "40P01" | "55P03" => true,
        c if c.len() == 5
            && ["08", "53", "57", "58"]
                .iter()
                .any(|class| c.starts_with(class)) =>
        {
            true
        }
        // SQLite: SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL and their extended codes.
        c if c.len() <= 4
            && c.parse::<u32>()
                .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 10 | 13)) =>
        {
            true
        }
        _ => message.contains("Lock wait timeout") || message.contains("Deadlock found"),
    };
    if transient {
        ErrorClass::Transient
    } else {
        ErrorClass::Permanent
    }
}

/// Sorts a database error into transient or permanent.
pub fn classify(error: &sqlx::Error) -> ErrorClass {
    match error {
        sqlx::Error::Database(db) => classify_code(
            &db.code().map(|c| c.into_owned()).unwrap_or_default(),
            db.message(),
        ),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_classes_decide() {
        for code in [
            "08000", "08006", "08S01", "40001", "40P01", "53300", "53100", "57P01", "57P03",
            "57014", "58030", "55P03",
        ] {
            assert_eq!(classify_code(code, ""), ErrorClass::Transient, "{code}");
        }
        for code in [
            "22001", "22003", "22021", "22P02", "23505", "23514", "42601", "42P01", "42804",
            "42000", "XX000", "",
        ] {
            assert_eq!(classify_code(code, ""), ErrorClass::Permanent, "{code}");
        }
    }

    #[test]
    fn mysql_generic_state_is_transient_only_for_locks_and_lost_servers() {
        assert_eq!(
            classify_code(
                "HY000",
                "Lock wait timeout exceeded; try restarting transaction"
            ),
            ErrorClass::Transient
        );
        assert_eq!(
            classify_code("HY000", "MySQL server has gone away"),
            ErrorClass::Transient
        );
        assert_eq!(
            classify_code(
                "HY000",
                "Incorrect integer value: 'twelve' for column `amount`"
            ),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify_code("40001", "Deadlock found when trying to get lock"),
            ErrorClass::Transient
        );
    }

    #[test]
    fn sqlite_result_codes() {
        for code in ["5", "6", "261", "262", "517", "773", "10", "13", "3338"] {
            assert_eq!(classify_code(code, ""), ErrorClass::Transient, "{code}");
        }
        for code in ["19", "275", "1555", "2067", "3091", "1", "20"] {
            assert_eq!(classify_code(code, ""), ErrorClass::Permanent, "{code}");
        }
    }
}
