//! Bad events never crash the sidecar and are never lost silently: each policy with poison events mixed into good
//! ones, hostile payloads stored as data, a rebuild from scratch, and a malformed config refused at start.

mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use common::*;
use futures::StreamExt;
use projectionist_crds::projection::{Driver, ErrorPolicy, Rebuild};
use projectionist_tests::mariadb::MariaDb;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use projectionist_tests::sqlite::Sqlite;

/// 30 good ticks with three poison events at known positions: an undecodable body, a missing field, and a
/// constraint violation. Returns the good ticks and the stream sequences of the poison events.
async fn append_with_poison(js: &async_nats::jetstream::Context) -> (Vec<Tick>, Vec<u64>) {
    let good = ticks(30, 5, 21);
    let mut messages: Vec<(String, HeaderMap, Vec<u8>)> = Vec::new();
    let mut poison = Vec::new();
    for (i, t) in good.iter().enumerate() {
        let id = format!("tick-{i}");
        let body = serde_json::json!({"account": t.account, "n": t.n})
            .to_string()
            .into_bytes();
        messages.push((
            format!("account.{}", t.account),
            event_headers(&id, "Tick"),
            body,
        ));
        match i {
            5 => {
                messages.push((
                    "account.x".into(),
                    event_headers("bad-json", "Tick"),
                    b"{not json".to_vec(),
                ));
                poison.push(messages.len() as u64);
            }
            12 => {
                let body = serde_json::json!({"account": "acct-0"})
                    .to_string()
                    .into_bytes();
                messages.push(("account.x".into(), event_headers("missing-n", "Tick"), body));
                poison.push(messages.len() as u64);
            }
            20 => {
                let body = serde_json::json!({"id": "n1", "body": "forbidden"})
                    .to_string()
                    .into_bytes();
                messages.push((
                    "note.n1".into(),
                    event_headers("check-violation", "Noted"),
                    body,
                ));
                poison.push(messages.len() as u64);
            }
            _ => {}
        }
    }
    publish_raw(js, messages).await;
    (good, poison)
}

async fn run_policy(policy: ErrorPolicy) {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    run_policy_on(policy, Driver::Postgres, &url).await;
}

async fn run_policy_on(policy: ErrorPolicy, driver: Driver, url: &str) {
    let url = url.to_string();
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), driver, policy, "5s");
    provision(&js, &store, &projection).await;
    let config = config_of(&store, &projection);
    let mut dead_letters = nats
        .connect()
        .await
        .expect("client")
        .subscribe(config.on_error.dead_letter_subject.clone())
        .await
        .expect("subscribe");
    let (good, poison) = append_with_poison(&js).await;
    let total = (good.len() + poison.len()) as i64;
    let sidecar = InProcess::start(config, &url, &nats.url()).await;

    if policy == ErrorPolicy::Halt {
        let halted = wait_until(Duration::from_secs(30), || async {
            sidecar.get("/readyz").await.1.contains("halted")
        })
        .await;
        let (code, body) = sidecar.get("/readyz").await;
        assert!(halted && code == 503, "{body}");
        assert!(
            body.contains("halted") && body.contains(&format!("sequence {}", poison[0])),
            "{body}"
        );
        assert!(body.contains("not JSON"), "{body}");
        // Everything before the poison event is applied, nothing after it.
        assert_eq!(read_checkpoint(&url).await, Some(poison[0] as i64 - 1));
        assert_eq!(read_ledger(&url).await, fold(&good[..6]));
        let (_, metrics) = sidecar.get("/metrics").await;
        assert_eq!(
            metric(
                &metrics,
                "projectionist_sidecar_halted{projection=\"test/ledger\"}"
            ),
            Some(1.0),
            "{metrics}"
        );
        assert_eq!(sidecar.get("/healthz").await.0, 200, "halted is not dead");
        sidecar.stop().await;
        return;
    }

    let done = wait_until(Duration::from_secs(30), || async {
        read_checkpoint(&url).await == Some(total)
    })
    .await;
    assert!(done, "checkpoint {:?}", read_checkpoint(&url).await);
    assert_eq!(
        read_ledger(&url).await,
        fold(&good),
        "every good event applied"
    );
    let rows = query_strings(
        &url,
        "SELECT stream_sequence, COALESCE(event_id, ''), policy, error \
         FROM projectionist_dead_letters ORDER BY stream_sequence",
    )
    .await;
    let sequences: Vec<u64> = rows.iter().map(|r| r[0].parse().expect("seq")).collect();
    assert_eq!(sequences, poison, "{rows:?}");
    let policy_name = if policy == ErrorPolicy::DeadLetter {
        "deadLetter"
    } else {
        "skip"
    };
    assert!(rows.iter().all(|r| r[2] == policy_name), "{rows:?}");
    assert!(rows[0][3].contains("not JSON"), "{rows:?}");
    assert!(
        rows[1][1] == "missing-n" && rows[1][3].contains(":data.n"),
        "{rows:?}"
    );
    assert!(
        rows[2][1] == "check-violation" && rows[2][3].to_lowercase().contains("constraint"),
        "{rows:?}"
    );

    let (_, metrics) = sidecar.get("/metrics").await;
    let counted = metric(
        &metrics,
        &format!(
            "projectionist_sidecar_dead_letters_total{{projection=\"test/ledger\",policy=\"{policy_name}\"}}"
        ),
    );
    assert_eq!(counted, Some(3.0), "{metrics}");

    let mut published = Vec::new();
    while let Ok(Some(m)) =
        tokio::time::timeout(Duration::from_millis(500), dead_letters.next()).await
    {
        let seq = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Projectionist-Stream-Sequence"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        published.push(seq.parse::<u64>().expect("sequence header"));
    }
    if policy == ErrorPolicy::DeadLetter {
        assert_eq!(published, poison, "published to the dead-letter subject");
    } else {
        assert!(published.is_empty(), "skip records but does not publish");
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn dead_letter_policy_records_and_publishes_poison_events_and_applies_the_rest() {
    run_policy(ErrorPolicy::DeadLetter).await;
}

#[tokio::test]
async fn dead_letter_policy_on_mariadb() {
    let db = MariaDb::start().await.expect("mariadb");
    let url = db.fresh_database().await.expect("db");
    run_policy_on(ErrorPolicy::DeadLetter, Driver::Mysql, &url).await;
}

#[tokio::test]
async fn dead_letter_policy_on_sqlite() {
    let dir = Sqlite::new().expect("sqlite");
    run_policy_on(
        ErrorPolicy::DeadLetter,
        Driver::Sqlite,
        &dir.fresh_database(),
    )
    .await;
}

#[tokio::test]
async fn skip_policy_records_poison_events_and_applies_the_rest() {
    run_policy(ErrorPolicy::Skip).await;
}

#[tokio::test]
async fn halt_policy_stops_at_the_poison_event_and_says_why() {
    run_policy(ErrorPolicy::Halt).await;
}

#[tokio::test]
async fn hostile_payloads_are_stored_as_data_never_executed() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), Driver::Postgres, ErrorPolicy::Halt, "5s");
    provision(&js, &store, &projection).await;

    let mut deep = serde_json::json!("bottom");
    for _ in 0..100 {
        deep = serde_json::json!({ "next": deep });
    }
    let bodies: Vec<(String, serde_json::Value)> = vec![
        (
            "inject-1".into(),
            serde_json::json!("'); DROP TABLE ledger; --"),
        ),
        (
            "inject-2".into(),
            serde_json::json!("$1 :data.id ? \\' \" `; DELETE FROM notes"),
        ),
        ("huge".into(), serde_json::json!("x".repeat(600_000))),
        (
            "unicode".into(),
            serde_json::json!("Grüße 👩‍💻 עִבְרִית 漢字 \u{202e}reversed"),
        ),
        ("deep".into(), deep.clone()),
        ("number".into(), serde_json::json!(12345.678)),
    ];
    let messages = bodies
        .iter()
        .map(|(id, body)| {
            let payload = serde_json::json!({"id": id, "body": body})
                .to_string()
                .into_bytes();
            (format!("note.{id}"), event_headers(id, "Noted"), payload)
        })
        .collect();
    publish_raw(&js, messages).await;
    let sidecar = InProcess::start(config_of(&store, &projection), &url, &nats.url()).await;
    let done = wait_until(Duration::from_secs(30), || async {
        read_checkpoint(&url).await == Some(6)
    })
    .await;
    assert!(done, "{:?}", sidecar.get("/readyz").await);
    let rows = query_strings(&url, "SELECT id, body FROM notes ORDER BY id").await;
    let stored: std::collections::BTreeMap<String, String> = rows
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    for (id, body) in &bodies {
        let expected = match body {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        assert_eq!(stored.get(id), Some(&expected), "{id}");
    }
    assert!(
        read_ledger(&url).await.is_empty(),
        "the ledger table still exists"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn changing_the_rebuild_token_rebuilds_the_read_model_from_scratch() {
    let dir = Sqlite::new().expect("sqlite");
    let url = dir.fresh_database();
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, mut projection) = ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "2s");
    provision(&js, &store, &projection).await;
    let all = ticks(2000, 20, 31);
    append_ticks(&js, &all, 0).await;
    let sidecar = InProcess::start(config_of(&store, &projection), &url, &nats.url()).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_checkpoint(&url).await == Some(2000)
        })
        .await
    );
    sidecar.stop().await;

    // Corrupt the read model by hand; a rebuild must throw this away.
    let pool = sqlx::SqlitePool::connect(&url).await.expect("connect");
    sqlx::query("UPDATE ledger SET hash = 0, events = 999")
        .execute(&pool)
        .await
        .expect("corrupt");
    pool.close().await;

    projection.spec.rebuild = Some(Rebuild {
        token: "v2".into(),
        reset: vec![
            "DELETE FROM ledger".into(),
            "DROP TABLE IF EXISTS notes".into(),
        ],
    });
    let sidecar = InProcess::start(config_of(&store, &projection), &url, &nats.url()).await;
    let rebuilt = wait_until(Duration::from_secs(30), || async {
        read_checkpoint(&url).await == Some(2000) && read_ledger(&url).await == fold(&all)
    })
    .await;
    assert!(
        rebuilt,
        "ledger after rebuild: {:?}",
        read_ledger(&url)
            .await
            .into_iter()
            .take(3)
            .collect::<Vec<_>>()
    );
    let token = query_strings(&url, "SELECT rebuild_token FROM projectionist_checkpoints").await;
    assert_eq!(token, vec![vec!["v2".to_string()]]);
    // The finished rebuild is recorded on the consumer, where the operator reads it.
    let consumer = js
        .get_stream(store.stream_name())
        .await
        .expect("stream")
        .consumer_info(projection.consumer_name())
        .await
        .expect("consumer")
        .clone();
    assert_eq!(
        consumer
            .config
            .metadata
            .get(projectionist_crds::consumer::METADATA_REBUILT_TOKEN)
            .map(String::as_str),
        Some("v2")
    );
    let (_, metrics) = sidecar.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "projectionist_sidecar_rebuilding{projection=\"test/ledger\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "projectionist_sidecar_rebuild_replayed_events{projection=\"test/ledger\"}"
        ),
        Some(2000.0),
        "{metrics}"
    );
    sidecar.stop().await;

    // The same token again: no second rebuild.
    let sidecar = InProcess::start(config_of(&store, &projection), &url, &nats.url()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, metrics) = sidecar.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "projectionist_sidecar_rebuild_replayed_events{projection=\"test/ledger\"}"
        ),
        None
    );
    assert_eq!(read_ledger(&url).await, fold(&all));
    sidecar.stop().await;
}

#[test]
fn a_malformed_config_file_names_the_file_and_field_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("dir");
    let (store, projection) = ledger(
        "nats://127.0.0.1:4222",
        Driver::Sqlite,
        ErrorPolicy::Halt,
        "5s",
    );
    let yaml = config_of(&store, &projection)
        .to_yaml()
        .expect("yaml")
        .replace("maxEvents: 200", "maxEvents: -3");
    let file = dir.path().join("ledger.yaml");
    std::fs::write(&file, yaml).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
        .arg("run")
        .arg("--config-dir")
        .arg(dir.path())
        .arg("--admin-addr")
        .arg("127.0.0.1:0")
        .env("PROJECTIONIST_API_ADDR", "127.0.0.1:0")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&file.display().to_string()) && err.contains("batch.maxEvents"),
        "{err}"
    );

    std::fs::write(
        &file,
        "apiVersion: projectionist.dev/v1alpha1\nkind: SidecarConfig\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
        .args(["run", "--admin-addr", "127.0.0.1:0", "--config-dir"])
        .env("PROJECTIONIST_API_ADDR", "127.0.0.1:0")
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing field"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_file_restarts_the_projection_with_it() {
    let dir = Sqlite::new().expect("sqlite");
    let url = dir.fresh_database();
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, mut projection) = ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "2s");
    provision(&js, &store, &projection).await;
    let all = ticks(1000, 10, 5);
    append_ticks(&js, &all, 0).await;
    let config_dir = tempfile::tempdir().expect("dir");
    let db_env = write_config(config_dir.path(), &config_of(&store, &projection));
    let admin_port = free_port();
    let _sidecar = spawn_sidecar(config_dir.path(), &db_env, &url, admin_port);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_checkpoint(&url).await == Some(1000)
        })
        .await
    );

    // A broken file is refused; the running projection carries on.
    std::fs::write(config_dir.path().join("ledger.yaml"), "apiVersion: nope\n").expect("write");
    tokio::time::sleep(Duration::from_secs(2)).await;
    append_ticks(&js, &ticks(10, 10, 6), 1000).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_checkpoint(&url).await == Some(1010)
        })
        .await,
        "still projecting with the old config"
    );

    // The ConfigMap gets a new rebuild token: the running sidecar rebuilds without a restart.
    projection.spec.rebuild = Some(Rebuild {
        token: "after-reload".into(),
        reset: vec!["DELETE FROM ledger".into()],
    });
    write_config(config_dir.path(), &config_of(&store, &projection));
    let rebuilt = wait_until(Duration::from_secs(30), || async {
        query_strings(&url, "SELECT rebuild_token FROM projectionist_checkpoints").await
            == vec![vec!["after-reload".to_string()]]
            && read_checkpoint(&url).await == Some(1010)
    })
    .await;
    assert!(rebuilt, "rebuilt after the config changed");
    let mut expected = all.clone();
    expected.extend(ticks(10, 10, 6));
    assert_eq!(read_ledger(&url).await, fold(&expected));
    let (_, metrics) = http_get(([127, 0, 0, 1], admin_port).into(), "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "projectionist_sidecar_rebuild_replayed_events{projection=\"test/ledger\"}"
        ),
        Some(1010.0),
        "{metrics}"
    );
}
