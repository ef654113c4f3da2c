//! The plan step: decoded events and the parsed handlers → the ordered statements of one transaction. Pure.
//!
//! Each event's handler statements follow each other in stream order. Where a handler can take several rows
//! ([`merge::Mergeable`], PostgreSQL), a run of consecutive events of that type becomes one multi-row statement,
//! cut wherever its conflict key repeats (two rows of one statement must never touch the same row) and split into
//! power-of-two chunks so few forms get prepared. Everything else is one statement per handler statement per event.

use std::collections::{HashMap, HashSet};

use projectionist_crds::projection::Driver;

use crate::event::Event;
use crate::handler::{self, BindError, Bound, Handlers};
use crate::merge::{self, Mergeable};

/// One statement of a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Step<'h> {
    /// A handler statement for one event.
    Single {
        /// Its SQL, in the driver's placeholders.
        sql: &'h str,
        /// Its values.
        values: Vec<Bound>,
    },
    /// One merged statement for `rows` consecutive events.
    Merged {
        /// The handler's mergeable form.
        merge: &'h Mergeable,
        /// Events (rows) in it.
        rows: usize,
        /// Their values, row after row.
        values: Vec<Bound>,
    },
}

impl Step<'_> {
    /// The SQL to run.
    pub fn sql(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Self::Single { sql, .. } => (*sql).into(),
            Self::Merged { merge, rows, .. } => merge.render(*rows).into(),
        }
    }

    /// The values, moved out.
    pub fn into_values(self) -> Vec<Bound> {
        match self {
            Self::Single { values, .. } | Self::Merged { values, .. } => values,
        }
    }
}

/// The statements of one transaction and what they stand for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan<'h> {
    /// In order.
    pub steps: Vec<Step<'h>>,
    /// Events whose handlers are in the plan.
    pub applied: u64,
    /// Events without a handler for their type.
    pub ignored: u64,
    /// Events that went into merged statements of more than one row.
    pub merged: u64,
}

/// Consecutive events of one mergeable handler.
struct Run<'h> {
    merge: &'h Mergeable,
    event_type: &'h str,
    rows: Vec<Vec<Bound>>,
    keys: HashSet<String>,
}

impl<'h> Run<'h> {
    fn flush(self, plan: &mut Plan<'h>) {
        let mut rows = self.rows.into_iter();
        for size in merge::chunks(rows.len()) {
            let values: Vec<Bound> = rows.by_ref().take(size).flatten().collect();
            if size > 1 {
                plan.merged += size as u64;
            }
            plan.steps.push(Step::Merged {
                merge: self.merge,
                rows: size,
                values,
            });
        }
    }
}

/// Plans `events` (in stream order) with `handlers`, merging the handlers in `mergeable` (by event type).
pub fn plan<'h>(
    events: &[Event],
    handlers: &'h Handlers,
    mergeable: &'h HashMap<String, Mergeable>,
) -> Result<Plan<'h>, BindError> {
    let mut plan = Plan::default();
    let mut run: Option<Run<'h>> = None;
    for event in events {
        let Some(statements) = handlers.for_type(&event.type_) else {
            plan.ignored += 1;
            continue;
        };
        plan.applied += 1;
        if let Some((event_type, merge)) = mergeable.get_key_value(event.type_.as_str()) {
            let values = handler::bind_all(&statements[0], event)?;
            let key = merge.key.as_ref().map(|k| {
                k.iter()
                    .map(|i| format!("{:?}", values.get(*i)))
                    .collect::<Vec<_>>()
                    .join("\u{1f}")
            });
            let continues = run.as_ref().is_some_and(|r| {
                r.event_type == event_type && key.as_ref().is_none_or(|k| !r.keys.contains(k))
            });
            if !continues {
                if let Some(done) = run.take() {
                    done.flush(&mut plan);
                }
                run = Some(Run {
                    merge,
                    event_type,
                    rows: Vec::new(),
                    keys: HashSet::new(),
                });
            }
            if let Some(r) = run.as_mut() {
                r.rows.push(values);
                if let Some(k) = key {
                    r.keys.insert(k);
                }
            }
            continue;
        }
        if let Some(done) = run.take() {
            done.flush(&mut plan);
        }
        for statement in statements {
            plan.steps.push(Step::Single {
                sql: statement.sql.as_str(),
                values: handler::bind_all(statement, event)?,
            });
        }
    }
    if let Some(done) = run.take() {
        done.flush(&mut plan);
    }
    Ok(plan)
}

/// The handlers that can be merged on `driver`, by event type: single-statement handlers [`merge::analyze_for`]
/// accepts.
pub fn mergeable(handlers: &Handlers, driver: Driver) -> HashMap<String, Mergeable> {
    handlers
        .iter()
        .filter_map(|(event_type, statements)| match statements {
            [one] => merge::analyze_for(driver, &one.sql, one.params.len())
                .map(|m| (event_type.to_string(), m)),
            _ => None,
        })
        .collect()
}

/// One letter per bound value's type: PostgreSQL prepares a statement with fixed parameter types, so a statement
/// gets one prepared form per combination (a number and a string bound to one parameter never share one).
pub fn type_signature(values: &[Bound]) -> String {
    values
        .iter()
        .map(|v| match v {
            Bound::Null => 'n',
            Bound::Bool(_) => 'b',
            Bound::Int(_) => 'i',
            Bound::Float(_) => 'f',
            Bound::Text(_) => 't',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use projectionist_crds::projection::Handler;
    use serde_json::json;

    const UPSERT: &str = "INSERT INTO ledger (account, n) VALUES (:data.account, :data.n) \
                          ON CONFLICT (account) DO UPDATE SET n = ledger.n + excluded.n";

    fn handlers() -> Handlers {
        Handlers::new(
            &[
                Handler {
                    event: "Tick".into(),
                    sql: vec![UPSERT.into()],
                },
                Handler {
                    event: "Noted".into(),
                    sql: vec![
                        "INSERT INTO notes (id) VALUES (:data.id)".into(),
                        "UPDATE counts SET n = n + 1".into(),
                    ],
                },
            ],
            Driver::Postgres,
        )
        .expect("handlers")
    }

    fn event(sequence: u64, type_: &str, data: serde_json::Value) -> Event {
        Event {
            sequence,
            nats_subject: format!("s.{sequence}"),
            id: format!("e{sequence}"),
            type_: type_.into(),
            source: None,
            subject: None,
            time: None,
            data,
        }
    }

    fn tick(sequence: u64, account: &str) -> Event {
        event(sequence, "Tick", json!({"account": account, "n": sequence}))
    }

    fn shape(plan: &Plan) -> Vec<String> {
        plan.steps
            .iter()
            .map(|s| match s {
                Step::Single { sql, .. } => {
                    sql.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
                }
                Step::Merged { rows, .. } => format!("merged×{rows}"),
            })
            .collect()
    }

    #[test]
    fn consecutive_events_of_a_mergeable_handler_become_one_statement() {
        let h = handlers();
        let m = mergeable(&h, Driver::Postgres);
        assert!(m.contains_key("Tick") && !m.contains_key("Noted"));
        let events = [tick(1, "a"), tick(2, "b"), tick(3, "c"), tick(4, "d")];
        let p = plan(&events, &h, &m).expect("plan");
        assert_eq!(shape(&p), ["merged×4"]);
        assert_eq!((p.applied, p.ignored, p.merged), (4, 0, 4));
        assert_eq!(p.steps[0].clone().into_values().len(), 8);
        assert!(
            p.steps[0].sql().contains("($7, $8)"),
            "{}",
            p.steps[0].sql()
        );
    }

    #[test]
    fn a_repeated_conflict_key_cuts_the_run() {
        let h = handlers();
        let m = mergeable(&h, Driver::Postgres);
        let events = [tick(1, "a"), tick(2, "b"), tick(3, "a"), tick(4, "c")];
        let p = plan(&events, &h, &m).expect("plan");
        assert_eq!(shape(&p), ["merged×2", "merged×2"]);
        let first: Vec<Bound> = p.steps[0].clone().into_values();
        assert_eq!(first[0], Bound::Text("a".into()));
        assert_eq!(first[2], Bound::Text("b".into()));
    }

    #[test]
    fn other_types_cut_the_run_and_keep_stream_order() {
        let h = handlers();
        let m = mergeable(&h, Driver::Postgres);
        let events = [
            tick(1, "a"),
            tick(2, "b"),
            event(3, "Noted", json!({"id": "n"})),
            event(4, "Unknown", json!({})),
            tick(5, "c"),
        ];
        let p = plan(&events, &h, &m).expect("plan");
        assert_eq!(
            shape(&p),
            [
                "merged×2",
                "INSERT INTO notes",
                "UPDATE counts SET",
                "merged×1"
            ]
        );
        assert_eq!((p.applied, p.ignored, p.merged), (4, 1, 2));
    }

    #[test]
    fn runs_split_into_power_of_two_chunks() {
        let h = handlers();
        let m = mergeable(&h, Driver::Postgres);
        let events: Vec<Event> = (1..=200).map(|i| tick(i, &format!("a{i}"))).collect();
        let p = plan(&events, &h, &m).expect("plan");
        assert_eq!(shape(&p), ["merged×128", "merged×64", "merged×8"]);
    }

    #[test]
    fn without_mergeable_handlers_every_statement_stands_alone() {
        let h = handlers();
        let events = [tick(1, "a"), tick(2, "b")];
        let none = HashMap::new();
        let p = plan(&events, &h, &none).expect("plan");
        assert_eq!(shape(&p), ["INSERT INTO ledger", "INSERT INTO ledger"]);
        assert_eq!(p.merged, 0);
    }

    #[test]
    fn a_missing_field_fails_the_plan() {
        let h = handlers();
        let events = [tick(1, "a"), event(2, "Tick", json!({"account": "b"}))];
        assert!(plan(&events, &h, &HashMap::new()).is_err());
    }

    #[test]
    fn type_signatures_tell_value_types_apart() {
        assert_eq!(
            type_signature(&[
                Bound::Null,
                Bound::Bool(true),
                Bound::Int(1),
                Bound::Float(1.5),
                Bound::Text("x".into())
            ]),
            "nbift"
        );
    }
}
