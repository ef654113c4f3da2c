//! The Postgres fast path: a batch's statements sent pipelined — all of them written before any answer is read —
//! in one transaction together with the checkpoint's compare-and-set, so a batch costs a few round trips instead of
//! one per statement. Any failure rolls the whole transaction back and the caller falls back to the one-by-one path
//! (which isolates a failing event with a savepoint).
//!
//! Statements are prepared with the parameter types of the values bound (text, bigint, double precision, boolean;
//! NULL as text), one prepared form per combination, exactly as on the one-by-one path. The fast path speaks plain
//! TCP; a URL that asks for TLS (`sslmode=require`, `verify-ca`, `verify-full`) uses the one-by-one path only.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::join_all;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls, Statement};

use crate::handler::Bound;

/// A pipelined connection to Postgres.
#[derive(Debug)]
pub struct Pipeline {
    /// Where to connect.
    config: tokio_postgres::Config,
    /// The connection, once made; replaced when it breaks.
    client: Option<Arc<Client>>,
    /// Prepared statements by SQL text and parameter types.
    prepared: HashMap<(String, Vec<Type>), Statement>,
}

/// What a pipelined batch came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Committed.
    Committed,
    /// A checkpoint's compare-and-set matched no row: rolled back.
    Fenced,
}

fn pg_type(v: &Bound) -> Type {
    match v {
        Bound::Null | Bound::Text(_) => Type::TEXT,
        Bound::Bool(_) => Type::BOOL,
        Bound::Int(_) => Type::INT8,
        Bound::Float(_) => Type::FLOAT8,
    }
}

impl ToSql for Bound {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Bound::Null => Ok(IsNull::Yes),
            Bound::Bool(b) => b.to_sql(ty, out),
            Bound::Int(i) => i.to_sql(ty, out),
            Bound::Float(f) => f.to_sql(ty, out),
            Bound::Text(s) => s.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <String as ToSql>::accepts(ty)
            || <i64 as ToSql>::accepts(ty)
            || <f64 as ToSql>::accepts(ty)
            || <bool as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

impl Pipeline {
    /// A pipeline for `url`, or `None` when the URL needs what the fast path does not do (TLS) or does not parse.
    pub fn new(url: &str) -> Option<Self> {
        let wants_tls = [
            "sslmode=require",
            "sslmode=verify-ca",
            "sslmode=verify-full",
        ]
        .iter()
        .any(|m| url.contains(m));
        if wants_tls {
            return None;
        }
        let config: tokio_postgres::Config = url.parse().ok()?;
        Some(Self {
            config,
            client: None,
            prepared: HashMap::new(),
        })
    }

    async fn client(&mut self) -> Result<Arc<Client>, tokio_postgres::Error> {
        if let Some(c) = &self.client
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            // Ends when the connection breaks or the client is dropped; the next batch reconnects.
            let _ = connection.await;
        });
        self.prepared.clear();
        let client = Arc::new(client);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Runs `steps` (SQL with `$n` placeholders, values) and the compare-and-set `cas` in one transaction.
    pub async fn run(
        &mut self,
        steps: &[(&str, Vec<Bound>)],
        cas: &[(&str, Vec<Bound>)],
    ) -> Result<Outcome, tokio_postgres::Error> {
        let client = self.client().await?;
        let all: Vec<(&str, &Vec<Bound>)> =
            steps.iter().chain(cas).map(|(sql, v)| (*sql, v)).collect();
        let first_cas = steps.len();
        let keys: Vec<(String, Vec<Type>)> = all
            .iter()
            .map(|(sql, v)| (sql.to_string(), v.iter().map(pg_type).collect()))
            .collect();
        let mut missing: Vec<&(String, Vec<Type>)> = Vec::new();
        for key in &keys {
            if !self.prepared.contains_key(key) && !missing.contains(&key) {
                missing.push(key);
            }
        }
        let prepared = join_all(
            missing
                .iter()
                .map(|(sql, types)| client.prepare_typed(sql, types)),
        )
        .await;
        for (key, statement) in missing.into_iter().zip(prepared) {
            self.prepared.insert(key.clone(), statement?);
        }

        client.batch_execute("BEGIN").await?;
        let executions = keys.iter().zip(&all).map(|(key, (_, values))| {
            let refs: Vec<&(dyn ToSql + Sync)> =
                values.iter().map(|b| b as &(dyn ToSql + Sync)).collect();
            let statement = &self.prepared[key];
            let client = &client;
            async move { client.execute(statement, &refs).await }
        });
        let results = join_all(executions).await;
        let mut fenced = false;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(rows) if i >= first_cas => fenced |= rows != 1,
                Ok(_) => {}
                Err(e) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(e);
                }
            }
        }
        if fenced {
            client.batch_execute("ROLLBACK").await?;
            return Ok(Outcome::Fenced);
        }
        client.batch_execute("COMMIT").await?;
        Ok(Outcome::Committed)
    }
}

/// Whether a failure is worth retrying the batch for (connection trouble, deadlock, serialization failure,
/// shutdown) rather than the fault of an event.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => {
            crate::database::classify_code(db.code().code(), db.message())
                == crate::database::ErrorClass::Transient
        }
    }
}
