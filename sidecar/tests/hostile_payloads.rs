//! No event can stall a projection: hostile payloads (invalid UTF-8, NUL bytes in bodies and in JSON strings, empty
//! bodies, truncated and too deeply nested JSON, numbers beyond 64 bits, wrong types, missing fields, oversized
//! strings, messages without CloudEvents headers) interleaved with good events, on every driver. Under `deadLetter`
//! and `skip` every good event is applied and every bad one recorded with its reason (payloads the database would
//! refuse as text are recorded in base64, flagged); under `halt` the projection stops at the first with a reason.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use base64::Engine;
use common::*;
use projectionist_crds::projection::{Driver, ErrorPolicy, Handler};
use projectionist_tests::mariadb::MariaDb;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use projectionist_tests::sqlite::Sqlite;
use serde_json::json;

/// One hostile message: its name, body, whether it carries CloudEvents headers, and whether every database refuses
/// it (`false`: only some do, e.g. PostgreSQL refuses NUL in text, MariaDB and SQLite store it).
struct Hostile {
    name: &'static str,
    body: Vec<u8>,
    headers: bool,
    always_bad: bool,
}

fn measure(id: &str, amount: serde_json::Value, label: &str) -> Vec<u8> {
    json!({"id": id, "amount": amount, "label": label})
        .to_string()
        .into_bytes()
}

fn hostile() -> Vec<Hostile> {
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let bad = |name, body: Vec<u8>| Hostile {
        name,
        body,
        headers: true,
        always_bad: true,
    };
    vec![
        bad("invalid-utf8", b"\xff\xfe\x00\x01{\"id\": \x00}".to_vec()),
        bad(
            "nul-in-body",
            b"{\"id\": \"nul-in-body\",\x00 \"amount\": 1}".to_vec(),
        ),
        Hostile {
            name: "nul-in-string",
            body: measure("nul-in-string", json!(1), "before\u{0}after"),
            headers: true,
            always_bad: false,
        },
        bad("empty", Vec::new()),
        bad("truncated", b"{\"id\": \"truncated\", \"amount\": ".to_vec()),
        bad(
            "too-deep",
            format!("{{\"id\": \"too-deep\", \"amount\": 1, \"label\": {deep}}}").into_bytes(),
        ),
        bad(
            "beyond-64-bits",
            b"{\"id\": \"beyond-64-bits\", \"amount\": 123456789012345678901234567890, \"label\": \"x\"}"
                .to_vec(),
        ),
        bad(
            "wrong-type",
            measure("wrong-type", json!("twelve"), "x"),
        ),
        bad(
            "missing-field",
            json!({"id": "missing-field", "label": "x"})
                .to_string()
                .into_bytes(),
        ),
        bad(
            "oversized",
            measure(&"o".repeat(100_000), json!(1), "x"),
        ),
        Hostile {
            name: "no-cloudevents",
            body: measure("no-cloudevents", json!(1), "x"),
            headers: false,
            always_bad: true,
        },
    ]
}

fn schema(driver: Driver) -> String {
    match driver {
        Driver::Sqlite => "CREATE TABLE IF NOT EXISTS measures (id TEXT PRIMARY KEY CHECK (length(id) <= 64), \
                           amount INTEGER NOT NULL, label TEXT NOT NULL) STRICT"
            .into(),
        _ => "CREATE TABLE IF NOT EXISTS measures (id VARCHAR(64) PRIMARY KEY, amount BIGINT NOT NULL, \
              label TEXT NOT NULL)"
            .into(),
    }
}

struct Appended {
    good_ticks: Vec<Tick>,
    good_measures: BTreeMap<String, i64>,
    /// Stream sequence → the hostile message there.
    hostile: BTreeMap<u64, Hostile>,
    total: u64,
}

/// Good ticks and good measures, with one hostile message after every third good event.
async fn append(js: &async_nats::jetstream::Context) -> Appended {
    let good_ticks = ticks(40, 4, 9);
    let mut good_measures = BTreeMap::new();
    let mut messages: Vec<(String, HeaderMap, Vec<u8>)> = Vec::new();
    let mut hostile_at = BTreeMap::new();
    let mut pending = hostile().into_iter();
    for (i, t) in good_ticks.iter().enumerate() {
        let id = format!("tick-{i}");
        messages.push((
            format!("account.{}", t.account),
            event_headers(&id, "Tick"),
            json!({"account": t.account, "n": t.n})
                .to_string()
                .into_bytes(),
        ));
        let m = format!("good-{i}");
        messages.push((
            format!("measure.{m}"),
            event_headers(&m, "Measured"),
            measure(&m, json!(i), "ok"),
        ));
        good_measures.insert(m, i as i64);
        if i % 3 == 2
            && let Some(h) = pending.next()
        {
            let headers = if h.headers {
                event_headers(h.name, "Measured")
            } else {
                HeaderMap::new()
            };
            messages.push((format!("measure.{}", h.name), headers, h.body.clone()));
            hostile_at.insert(messages.len() as u64, h);
        }
    }
    assert!(pending.next().is_none(), "every hostile message placed");
    let total = messages.len() as u64;
    publish_raw(js, messages).await;
    Appended {
        good_ticks,
        good_measures,
        hostile: hostile_at,
        total,
    }
}

async fn run(driver: Driver, url: &str, policy: ErrorPolicy) {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, mut projection) = ledger(&nats.url(), driver, policy, "5s");
    projection.spec.schema.push(schema(driver));
    projection.spec.handlers.push(Handler {
        event: "Measured".into(),
        sql: vec![
            "INSERT INTO measures (id, amount, label) VALUES (:data.id, :data.amount, :data.label)"
                .into(),
        ],
    });
    provision(&js, &store, &projection).await;
    let appended = append(&js).await;
    let sidecar = InProcess::start(config_of(&store, &projection), url, &nats.url()).await;

    if policy == ErrorPolicy::Halt {
        let first = *appended.hostile.keys().next().expect("hostile");
        let halted = wait_until(Duration::from_secs(60), || async {
            sidecar.get("/readyz").await.1.contains("halted")
        })
        .await;
        let (code, body) = sidecar.get("/readyz").await;
        assert!(halted && code == 503, "{body}");
        assert!(body.contains(&format!("sequence {first}")), "{body}");
        assert_eq!(read_checkpoint(url).await, Some(first as i64 - 1));
        sidecar.stop().await;
        return;
    }

    let done = wait_until(Duration::from_secs(90), || async {
        read_checkpoint(url).await == Some(appended.total as i64)
    })
    .await;
    assert!(
        done,
        "stalled at {:?}: {:?}",
        read_checkpoint(url).await,
        sidecar.get("/readyz").await
    );
    assert_eq!(read_ledger(url).await, fold(&appended.good_ticks));
    let measures: BTreeMap<String, i64> =
        query_strings(url, "SELECT id, amount FROM measures WHERE label = 'ok'")
            .await
            .into_iter()
            .map(|r| (r[0].clone(), r[1].parse().expect("amount")))
            .collect();
    assert_eq!(measures, appended.good_measures, "every good event applied");

    let letters: BTreeMap<u64, Vec<String>> = query_strings(
        url,
        "SELECT stream_sequence, policy, error, payload, payload_encoding FROM projectionist_dead_letters",
    )
    .await
    .into_iter()
    .map(|r| (r[0].parse().expect("sequence"), r[1..].to_vec()))
    .collect();
    let policy_name = if policy == ErrorPolicy::DeadLetter {
        "deadLetter"
    } else {
        "skip"
    };
    for (seq, h) in &appended.hostile {
        match letters.get(seq) {
            Some(letter) => {
                assert_eq!(letter[0], policy_name, "{}", h.name);
                assert!(!letter[1].is_empty(), "{}: a reason", h.name);
                let payload = match letter[3].as_str() {
                    "base64" => base64::engine::general_purpose::STANDARD
                        .decode(&letter[2])
                        .expect("base64"),
                    "utf8" => letter[2].clone().into_bytes(),
                    other => panic!("{}: payload encoding {other}", h.name),
                };
                assert_eq!(payload, h.body, "{}: the payload as it was", h.name);
            }
            None => {
                assert!(!h.always_bad, "{} (sequence {seq}) not recorded", h.name);
                let applied = query_strings(
                    url,
                    &format!("SELECT COUNT(*) FROM measures WHERE id = '{}'", h.name),
                )
                .await;
                assert_eq!(applied, vec![vec!["1".to_string()]], "{}: applied", h.name);
            }
        }
    }
    assert_eq!(
        letters
            .keys()
            .filter(|s| !appended.hostile.contains_key(s))
            .count(),
        0,
        "only hostile events recorded: {letters:?}"
    );
    let invalid = appended
        .hostile
        .iter()
        .find(|(_, h)| h.name == "invalid-utf8")
        .map(|(s, _)| *s)
        .expect("placed");
    assert_eq!(letters[&invalid][3], "base64", "not text: stored as base64");
    let (_, metrics) = sidecar.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            &format!(
                "projectionist_sidecar_dead_letters_total{{projection=\"test/ledger\",policy=\"{policy_name}\"}}"
            ),
        ),
        Some(letters.len() as f64),
        "{metrics}"
    );
    assert_eq!(sidecar.get("/readyz").await.0, 200);
    sidecar.stop().await;
}

#[tokio::test]
async fn postgres_dead_letters_every_hostile_event_and_applies_the_rest() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    run(Driver::Postgres, &url, ErrorPolicy::DeadLetter).await;
}

#[tokio::test]
async fn postgres_skips_every_hostile_event_and_applies_the_rest() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    run(Driver::Postgres, &url, ErrorPolicy::Skip).await;
}

#[tokio::test]
async fn postgres_halts_at_the_first_hostile_event() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    run(Driver::Postgres, &url, ErrorPolicy::Halt).await;
}

#[tokio::test]
async fn mariadb_dead_letters_every_hostile_event_and_applies_the_rest() {
    let db = MariaDb::start().await.expect("mariadb");
    let url = db.fresh_database().await.expect("db");
    run(Driver::Mysql, &url, ErrorPolicy::DeadLetter).await;
}

#[tokio::test]
async fn mariadb_halts_at_the_first_hostile_event() {
    let db = MariaDb::start().await.expect("mariadb");
    let url = db.fresh_database().await.expect("db");
    run(Driver::Mysql, &url, ErrorPolicy::Halt).await;
}

#[tokio::test]
async fn sqlite_dead_letters_every_hostile_event_and_applies_the_rest() {
    let dir = Sqlite::new().expect("sqlite");
    run(
        Driver::Sqlite,
        &dir.fresh_database(),
        ErrorPolicy::DeadLetter,
    )
    .await;
}

#[tokio::test]
async fn sqlite_skips_every_hostile_event_and_applies_the_rest() {
    let dir = Sqlite::new().expect("sqlite");
    run(Driver::Sqlite, &dir.fresh_database(), ErrorPolicy::Skip).await;
}
