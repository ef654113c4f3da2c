//! The apply step: runs a batch in one transaction together with the checkpoint's compare-and-set, so the read model
//! and the checkpoint move together or not at all.
//!
//! - [`Apply::batch`]: the whole batch at once, consecutive events of a single-`INSERT` handler merged into
//!   multi-row statements (PostgreSQL, MySQL/MariaDB) — on PostgreSQL over plain TCP pipelined
//!   ([`crate::pipeline`]), otherwise statement by statement over sqlx.
//! - [`Apply::isolated`]: when the batch fails for a reason that is not transient, one savepoint per event, so the
//!   event at fault is found, tried again and settled by the [`Policy`]; the events before and after it commit.
//!
//! Errors are sorted by [`crate::database::classify`] (SQLSTATE classes, on both clients): a transient one rolls the
//! whole batch back for the loop to retry; anything else is the event's fault.

use std::collections::HashMap;

use projectionist_crds::projection::Driver;
use tracing::warn;

use super::plan::{self, Plan};
use super::policy::{Decision, Fault, Policy};
use super::report::{Counts, Report};
use super::source::{Incoming, Transient};
use crate::checkpoint::{Cursor, Move};
use crate::database::{self, Database, ErrorClass, Tx, classify};
use crate::dead_letter::{self, DeadLetter};
use crate::event::{DecodeError, Event};
use crate::handler::{self, Handlers};
use crate::merge::Mergeable;
use crate::pipeline::{self, Pipeline};

/// A committed transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// The last sequence committed.
    pub upto: u64,
    /// The checkpoints moved.
    pub moves: Vec<Move>,
    /// What it applied.
    pub counts: Counts,
    /// The events recorded under `deadLetter` or `skip`.
    pub dead: Vec<DeadLetter>,
}

/// What applying a batch came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every event at or below `upto` is in the read model (or recorded).
    Committed(Committed),
    /// Stopped at an event: what came before it committed (if anything), the rest was not applied.
    Halted {
        /// The commit before the event at fault.
        committed: Option<Committed>,
        /// Why.
        reason: String,
    },
    /// Another processor moved the checkpoint: nothing was applied.
    Fenced,
}

/// Why the whole-batch path gave up.
#[derive(Debug)]
pub enum BatchFailure {
    /// Retry the batch later.
    Transient(String),
    /// Some event is at fault: find it with [`Apply::isolated`].
    AtFault(String),
}

/// Runs plans against the read model.
#[derive(Debug)]
pub struct Apply {
    db: Database,
    handlers: Handlers,
    pipeline: Option<Pipeline>,
    mergeable: HashMap<String, Mergeable>,
    key: String,
}

/// One statement failure.
enum StepError {
    Db(sqlx::Error),
    Bind(handler::BindError),
}

impl Apply {
    /// Applies `handlers` to `db` for projection `key` (dead letters are recorded under it); `pipeline` is the
    /// PostgreSQL fast path, if usable.
    pub fn new(db: Database, handlers: Handlers, pipeline: Option<Pipeline>, key: &str) -> Self {
        let pipeline = pipeline.filter(|_| db.driver == Driver::Postgres);
        let mergeable = plan::mergeable(&handlers, db.driver);
        Self {
            db,
            handlers,
            pipeline,
            mergeable,
            key: key.to_string(),
        }
    }

    /// Swaps the fast-path connection (a partition borrows one from its worker's turn).
    pub fn swap_pipeline(&mut self, pipeline: Option<Pipeline>) -> Option<Pipeline> {
        let pipeline = pipeline.filter(|_| self.db.driver == Driver::Postgres);
        std::mem::replace(&mut self.pipeline, pipeline)
    }

    /// The read model's database.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// The whole batch (every event decoded) in one transaction, with the compare-and-sets that move `cursor`'s
    /// checkpoints past it.
    pub async fn batch(
        &mut self,
        cursor: &Cursor,
        events: &[Event],
    ) -> Result<Outcome, BatchFailure> {
        let at_fault = |e: &dyn std::fmt::Display| BatchFailure::AtFault(e.to_string());
        let moves = cursor.moves(events.iter().map(|e| (e.sequence, e.nats_subject.as_str())));
        if let Some(pipeline) = self.pipeline.as_mut() {
            let plan =
                plan::plan(events, &self.handlers, &self.mergeable).map_err(|e| at_fault(&e))?;
            return pipelined(pipeline, &self.db, cursor, moves, plan).await;
        }
        let plan = plan::plan(events, &self.handlers, &self.mergeable).map_err(|e| at_fault(&e))?;
        let db_failure = |e: sqlx::Error| match classify(&e) {
            ErrorClass::Transient => BatchFailure::Transient(format!("database: {e}")),
            ErrorClass::Permanent => BatchFailure::AtFault(e.to_string()),
        };
        let counts = Counts {
            applied: plan.applied,
            ignored: plan.ignored,
            merged: plan.merged,
        };
        let mut tx = self.db.begin().await.map_err(db_failure)?;
        for step in plan.steps {
            let sql = step.sql().into_owned();
            execute(&self.db, &mut tx, &sql, step.into_values())
                .await
                .map_err(db_failure)?;
        }
        self.commit(tx, cursor, moves, counts, Vec::new())
            .await
            .map_err(db_failure)
    }

    async fn commit(
        &self,
        mut tx: Tx,
        cursor: &Cursor,
        moves: Vec<Move>,
        counts: Counts,
        dead: Vec<DeadLetter>,
    ) -> Result<Outcome, sqlx::Error> {
        for (sql, values) in cursor.statements(&moves) {
            if database::execute(&mut tx, &self.db.sql(&sql), values).await? != 1 {
                tx.rollback().await?;
                return Ok(Outcome::Fenced);
            }
        }
        tx.commit().await?;
        Ok(Outcome::Committed(Committed {
            upto: moves.iter().map(|m| m.to).max().unwrap_or_default(),
            moves,
            counts,
            dead,
        }))
    }

    /// Commits what came before the event at fault, then stops with `reason`.
    #[allow(clippy::too_many_arguments)]
    async fn halt(
        &self,
        tx: Tx,
        cursor: &Cursor,
        moves: Vec<Move>,
        counts: Counts,
        dead: Vec<DeadLetter>,
        reason: String,
    ) -> Result<Outcome, sqlx::Error> {
        if moves.is_empty() {
            let _ = tx.rollback().await;
            return Ok(Outcome::Halted {
                committed: None,
                reason,
            });
        }
        match self.commit(tx, cursor, moves, counts, dead).await? {
            Outcome::Committed(c) => Ok(Outcome::Halted {
                committed: Some(c),
                reason,
            }),
            other => Ok(other),
        }
    }

    /// One event's handler statements; `false` when no handler takes its type.
    async fn run_event(&self, tx: &mut Tx, event: &Event) -> Result<bool, StepError> {
        let Some(statements) = self.handlers.for_type(&event.type_) else {
            return Ok(false);
        };
        for statement in statements {
            let values = handler::bind_all(statement, event).map_err(StepError::Bind)?;
            execute(&self.db, tx, &statement.sql, values)
                .await
                .map_err(StepError::Db)?;
        }
        Ok(true)
    }

    /// One savepoint per event: the event at fault is tried again and settled by `policy`.
    pub async fn isolated(
        &mut self,
        cursor: &Cursor,
        decoded: &[(&Incoming<'_>, Result<Event, DecodeError>)],
        policy: &Policy,
        report: &Report,
    ) -> Result<Outcome, Transient> {
        let db_err = |e: sqlx::Error| Transient(format!("database: {e}"));
        let mut tx = self.db.begin().await.map_err(db_err)?;
        let mut counts = Counts::default();
        // The events settled so far (applied, ignored or recorded): what a commit covers.
        let mut done: Vec<(u64, &str)> = Vec::with_capacity(decoded.len());
        let mut dead = Vec::new();
        for (inc, ev) in decoded {
            let failure = match ev {
                Err(e) => {
                    let fault = Fault::Decode(e.to_string());
                    let decision = policy.decide(&fault, 1);
                    Some((fault, 1, decision))
                }
                Ok(ev) => {
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        savepoint(&mut tx, "SAVEPOINT projectionist_event").await?;
                        let fault = match self.run_event(&mut tx, ev).await {
                            Ok(ran) => {
                                savepoint(&mut tx, "RELEASE SAVEPOINT projectionist_event").await?;
                                if ran {
                                    counts.applied += 1;
                                } else {
                                    counts.ignored += 1;
                                }
                                break None;
                            }
                            Err(StepError::Db(e)) if classify(&e) == ErrorClass::Transient => {
                                return Err(db_err(e));
                            }
                            Err(StepError::Db(e)) => Fault::Database(e.to_string()),
                            Err(StepError::Bind(e)) => Fault::Bind(e.to_string()),
                        };
                        savepoint(&mut tx, "ROLLBACK TO SAVEPOINT projectionist_event").await?;
                        savepoint(&mut tx, "RELEASE SAVEPOINT projectionist_event").await?;
                        report.error(fault.kind());
                        match policy.decide(&fault, attempts) {
                            Decision::Retry(delay) => {
                                report.beat();
                                tokio::time::sleep(delay).await;
                            }
                            decision => break Some((fault, attempts, decision)),
                        }
                    }
                }
            };
            if let Some((fault, attempts, decision)) = failure {
                if matches!(fault, Fault::Decode(_)) {
                    report.error(fault.kind());
                }
                let (event_id, event_type) = match ev {
                    Ok(e) => (Some(e.id.clone()), Some(e.type_.clone())),
                    Err(_) => (None, None),
                };
                let described = format!(
                    "event at sequence {} ({}{}): {}",
                    inc.seq,
                    event_type.as_deref().unwrap_or("unknown type"),
                    event_id
                        .as_deref()
                        .map(|i| format!(" {i}"))
                        .unwrap_or_default(),
                    fault.message()
                );
                let policy = match decision {
                    Decision::Record(p) => p,
                    Decision::Halt | Decision::Retry(_) => {
                        return self
                            .halt(tx, cursor, cursor.moves(done), counts, dead, described)
                            .await
                            .map_err(db_err);
                    }
                };
                let letter = DeadLetter {
                    sequence: inc.seq,
                    event_id,
                    event_type,
                    subject: inc.subject.to_string(),
                    payload: inc.payload.to_vec(),
                    error: fault.message(),
                    policy,
                    attempts,
                };
                savepoint(&mut tx, "SAVEPOINT projectionist_letter").await?;
                match dead_letter::record(&self.db, &mut tx, &self.key, &letter).await {
                    Ok(()) => {
                        savepoint(&mut tx, "RELEASE SAVEPOINT projectionist_letter").await?;
                        warn!(projection = %self.key, sequence = inc.seq, policy = dead_letter::policy_name(policy), error = %described, "event recorded as a dead letter");
                        dead.push(letter);
                    }
                    Err(e) if classify(&e) == ErrorClass::Transient => return Err(db_err(e)),
                    Err(e) => {
                        // Retrying cannot help and going on without a record would lose the event: stop here.
                        savepoint(&mut tx, "ROLLBACK TO SAVEPOINT projectionist_letter").await?;
                        let reason = format!("{described}; cannot record it as a dead letter: {e}");
                        return self
                            .halt(tx, cursor, cursor.moves(done), counts, dead, reason)
                            .await
                            .map_err(db_err);
                    }
                }
            }
            done.push((inc.seq, inc.subject));
        }
        self.commit(tx, cursor, cursor.moves(done), counts, dead)
            .await
            .map_err(db_err)
    }
}

/// The whole plan pipelined on PostgreSQL, with the checkpoints' compare-and-sets, in one transaction.
async fn pipelined(
    pipeline: &mut Pipeline,
    db: &Database,
    cursor: &Cursor,
    moves: Vec<Move>,
    plan: Plan<'_>,
) -> Result<Outcome, BatchFailure> {
    let counts = Counts {
        applied: plan.applied,
        ignored: plan.ignored,
        merged: plan.merged,
    };
    let rendered: Vec<String> = plan.steps.iter().map(|s| s.sql().into_owned()).collect();
    let steps: Vec<(&str, Vec<handler::Bound>)> = rendered
        .iter()
        .map(String::as_str)
        .zip(plan.steps.into_iter().map(plan::Step::into_values))
        .collect();
    let cas: Vec<(String, Vec<handler::Bound>)> = cursor
        .statements(&moves)
        .into_iter()
        .map(|(sql, values)| (db.sql(&sql), values))
        .collect();
    let cas: Vec<(&str, Vec<handler::Bound>)> = cas
        .iter()
        .map(|(sql, v)| (sql.as_str(), v.clone()))
        .collect();
    match pipeline.run(&steps, &cas).await {
        Ok(pipeline::Outcome::Committed) => Ok(Outcome::Committed(Committed {
            upto: moves.iter().map(|m| m.to).max().unwrap_or_default(),
            moves,
            counts,
            dead: Vec::new(),
        })),
        Ok(pipeline::Outcome::Fenced) => Ok(Outcome::Fenced),
        Err(e) if pipeline::is_transient(&e) => {
            Err(BatchFailure::Transient(format!("database: {e}")))
        }
        Err(e) => Err(BatchFailure::AtFault(e.to_string())),
    }
}

/// A savepoint statement; failing one is transient (the connection went).
async fn savepoint(tx: &mut Tx, sql: &str) -> Result<(), Transient> {
    database::execute_plain(tx, sql)
        .await
        .map_err(|e| Transient(format!("database: {e}")))
}

/// Runs a handler statement. On PostgreSQL a statement is prepared with fixed parameter types and sqlx caches it
/// by its text, so the text carries the value types ([`plan::type_signature`]): a number and a string bound to the
/// same parameter by different events never share (and corrupt) one prepared form.
async fn execute(
    db: &Database,
    tx: &mut Tx,
    sql: &str,
    values: Vec<handler::Bound>,
) -> Result<u64, sqlx::Error> {
    if db.driver == Driver::Postgres {
        let sql = format!(
            "{sql}\n/* projectionist:{} */",
            plan::type_signature(&values)
        );
        database::execute(tx, &sql, values).await
    } else {
        database::execute(tx, sql, values).await
    }
}
