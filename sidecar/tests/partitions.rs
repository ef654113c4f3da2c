//! Partitioned stores and projections, against a real nats-server and real databases.
//!
//! - The store: the server stores each event under its partition (the hash clients compute agrees), refuses
//!   subjects outside the layout, and the event-store API appends (with expected versions, atomically) and reads
//!   unchanged.
//! - The 3 × 50 setup: three sidecar processes share 50 partitions of one projection on PostgreSQL while replicas
//!   are SIGKILLed and restarted at random, then scaled 3 → 5 → 2: the order-sensitive, non-idempotent ledger equals
//!   the reference fold, and the shares are fair once stable.
//! - `workers: 4` on PostgreSQL and MariaDB keeps the same guarantees.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use projectionist_crds::partition::Layout;
use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_crds::{EventStore, Projection};
use projectionist_sidecar::store::{Aggregate, Expected, NewEvent, Store};
use projectionist_tests::mariadb::MariaDb;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use rand::Rng;

fn partitioned(
    nats_url: &str,
    driver: Driver,
    partitions: u32,
    ack_wait: &str,
    workers: Option<u32>,
) -> (EventStore, Projection) {
    let (mut store, mut projection) = ledger(nats_url, driver, ErrorPolicy::Halt, ack_wait);
    store.spec.stream.partitions = Some(partitions);
    projection.spec.workers = workers;
    (store, projection)
}

fn event(id: &str, data: serde_json::Value) -> NewEvent {
    NewEvent {
        id: id.into(),
        type_: "Tick".into(),
        source: "/tests".into(),
        time: "2026-01-01T00:00:00Z".into(),
        datacontenttype: "application/json".into(),
        extensions: BTreeMap::new(),
        data: data.to_string().into(),
    }
}

#[tokio::test]
async fn the_server_stores_each_aggregate_in_its_partition_and_the_api_works_unchanged() {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = partitioned(&nats.url(), Driver::Sqlite, 8, "5s", None);
    provision(&js, &store, &projection).await;
    let client = nats.connect().await.expect("client");
    let api =
        Store::new("bank", &store.stream_name(), "test.bank", client).with_partitions(Some(8));
    let layout = Layout::new("test.bank", 8);

    // Appends with expectations, one by one and atomically, land where the hash says.
    let mut versions = BTreeMap::new();
    for i in 0..40 {
        let aggregate = Aggregate {
            type_: "account".into(),
            id: format!("a{}", i % 10),
        };
        let expected = versions.get(&aggregate.id).copied().unwrap_or(0);
        let appended = api
            .append(
                &aggregate,
                Expected::Version(expected),
                &[event(
                    &format!("e{i}"),
                    serde_json::json!({"account": aggregate.id, "n": 1}),
                )],
            )
            .await
            .expect("append");
        versions.insert(aggregate.id.clone(), appended.version);
        let stored = js
            .get_stream("test_bank")
            .await
            .expect("stream")
            .get_raw_message(appended.version)
            .await
            .expect("message");
        assert_eq!(
            stored.subject.as_str(),
            layout.stored("account", &aggregate.id)
        );
    }
    let a0 = Aggregate {
        type_: "account".into(),
        id: "a0".into(),
    };
    let stale = api
        .append(
            &a0,
            Expected::Version(1),
            &[event("stale", serde_json::json!({}))],
        )
        .await;
    assert!(
        matches!(
            stale,
            Err(projectionist_sidecar::store::AppendError::Conflict { .. })
        ),
        "{stale:?}"
    );
    let batch = api
        .append(
            &a0,
            Expected::Version(versions["a0"]),
            &[
                event("b1", serde_json::json!({"account": "a0", "n": 2})),
                event("b2", serde_json::json!({"account": "a0", "n": 3})),
            ],
        )
        .await
        .expect("atomic batch");
    assert_eq!(batch.sequences.len(), 2);
    let mut read = api.read(&a0, 0, None).await.expect("read");
    assert_eq!(read.version, batch.version);
    let mut count = 0;
    while let Some(e) = futures::StreamExt::next(&mut read.messages).await {
        e.expect("event");
        count += 1;
    }
    assert_eq!(count, 6, "four single appends and the batch of two");

    // A subject outside `<prefix>.<type>.<id>` is refused, never stored unpartitioned.
    let outside = js
        .publish("test.bank.account.a1.extra", "{}".into())
        .await
        .expect("publish")
        .await;
    assert!(outside.is_err(), "{outside:?}");
    let info = js
        .get_stream("test_bank")
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(info.state.messages, 42);
}

async fn ledger_events(url: &str) -> i64 {
    read_ledger(url).await.values().map(|(_, e)| e).sum()
}

/// Partition owners as the database records them: owner → partitions.
async fn shares(url: &str) -> BTreeMap<String, usize> {
    let rows = query_strings(
        url,
        "SELECT owner FROM projectionist_partitions WHERE projection LIKE 'test/ledger#%'",
    )
    .await;
    let mut out = BTreeMap::new();
    for row in rows {
        *out.entry(row[0].clone()).or_insert(0) += 1;
    }
    out
}

async fn fair(url: &str, replicas: usize, partitions: usize) -> bool {
    let s = shares(url).await;
    s.len() == replicas
        && !s.contains_key("")
        && s.values()
            .all(|n| *n == partitions / replicas || *n == partitions.div_ceil(replicas))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_fifty_partitions_through_kills_and_scaling() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = partitioned(&nats.url(), Driver::Postgres, 50, "4s", None);
    provision(&js, &store, &projection).await;
    let config_dir = tempfile::tempdir().expect("dir");
    let db_env = write_config(config_dir.path(), &config_of(&store, &projection));

    const TOTAL: usize = 30_000;
    let all = ticks(TOTAL, 5000, 11);
    let (first, rest) = all.split_at(TOTAL / 2);
    append_ticks(&js, first, 0).await;

    let spawn = || spawn_sidecar(config_dir.path(), &db_env, &url, free_port());
    let mut replicas: Vec<_> = (0..3).map(|_| spawn()).collect();
    let mut rng = rand::rng();
    let mut appended = first.len();
    for kill_no in 0..20 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        let victim = rng.random_range(0..replicas.len());
        kill(Pid::from_raw(replicas[victim].id() as i32), Signal::SIGKILL).expect("kill");
        let _ = replicas[victim].wait();
        // Meanwhile more events come in.
        let chunk = rest.len() / 20;
        let next = &rest[kill_no * chunk..(kill_no + 1) * chunk];
        append_ticks(&js, next, appended).await;
        appended += next.len();
        replicas[victim] = spawn();
    }
    append_ticks(&js, &rest[20 * (rest.len() / 20)..], appended).await;

    assert!(
        wait_until(Duration::from_secs(90), || async {
            ledger_events(&url).await == TOTAL as i64
        })
        .await,
        "caught up after the kills: {} of {TOTAL}",
        ledger_events(&url).await
    );
    assert_eq!(
        read_ledger(&url).await,
        fold(&all),
        "the read model is the fold"
    );
    assert!(
        wait_until(Duration::from_secs(30), || fair(&url, 3, 50)).await,
        "fair shares of 3: {:?}",
        shares(&url).await
    );

    // Scale to 5, then down to 2 (the others stopped cleanly or killed).
    replicas.push(spawn());
    replicas.push(spawn());
    let more = ticks(5000, 5000, 12);
    append_ticks(&js, &more, TOTAL).await;
    assert!(
        wait_until(Duration::from_secs(30), || fair(&url, 5, 50)).await,
        "fair shares of 5: {:?}",
        shares(&url).await
    );
    for mut gone in replicas.drain(2..) {
        kill(Pid::from_raw(gone.id() as i32), Signal::SIGTERM).expect("term");
        let _ = gone.wait();
    }
    let last = ticks(5000, 5000, 13);
    append_ticks(&js, &last, TOTAL + 5000).await;
    assert!(
        wait_until(Duration::from_secs(30), || fair(&url, 2, 50)).await,
        "fair shares of 2: {:?}",
        shares(&url).await
    );
    let everything: Vec<Tick> = all.iter().chain(&more).chain(&last).cloned().collect();
    assert!(
        wait_until(Duration::from_secs(60), || async {
            ledger_events(&url).await == everything.len() as i64
        })
        .await,
        "caught up after scaling"
    );
    assert_eq!(read_ledger(&url).await, fold(&everything));
}

/// Publishes one tick and returns its sequence.
async fn append_one(js: &async_nats::jetstream::Context, account: &str, n: i64, id: &str) -> u64 {
    js.publish_with_headers(
        format!("test.bank.account.{account}"),
        event_headers(id, "Tick"),
        serde_json::json!({"account": account, "n": n})
            .to_string()
            .into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack")
    .sequence
}

async fn workers_keep_the_guarantees(driver: Driver, url: &str) {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = partitioned(&nats.url(), driver, 16, "4s", Some(4));
    provision(&js, &store, &projection).await;
    let all = ticks(20_000, 2000, 21);
    append_ticks(&js, &all[..10_000], 0).await;
    let a = InProcess::start(config_of(&store, &projection), url, &nats.url()).await;
    let b = InProcess::start(config_of(&store, &projection), url, &nats.url()).await;
    append_ticks(&js, &all[10_000..], 10_000).await;
    assert!(
        wait_until(Duration::from_secs(60), || async {
            ledger_events(url).await == all.len() as i64
        })
        .await,
        "caught up: {}",
        ledger_events(url).await
    );
    assert_eq!(read_ledger(url).await, fold(&all));
    // Each replica reports its share and lag for the operator's status.
    let mut progress = js
        .get_stream(projectionist_crds::partition::PROGRESS_STREAM)
        .await
        .expect("progress stream");
    let reported = progress.info().await.expect("info").state.messages;
    assert_eq!(reported, 2, "one report per replica");
    // Read-your-writes across replicas: an event appended now is applied (by whichever replica owns its partition)
    // when `wait` answers.
    let last = append_one(&js, "acct-new", 5, "late").await;
    let (status, body) = http_get(
        a.api,
        &format!("/v1/projections/ledger/wait?sequence={last}&timeout=10s"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(read_ledger(url).await.get("acct-new"), Some(&(5, 1)));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            a.get("/readyz").await.0 == 200
        })
        .await,
        "ready: {:?}",
        a.get("/readyz").await
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_on_postgres_keep_every_aggregate_in_order() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    workers_keep_the_guarantees(Driver::Postgres, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_on_mariadb_keep_every_aggregate_in_order() {
    let db = MariaDb::start().await.expect("mariadb");
    let url = db.fresh_database().await.expect("db");
    workers_keep_the_guarantees(Driver::Mysql, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_projection_dead_letters_and_rebuilds_every_partition() {
    use projectionist_crds::projection::Rebuild;
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let db = projectionist_tests::sqlite::Sqlite::new().expect("sqlite");
    let url = db.fresh_database();
    let (mut store, mut projection) =
        ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::DeadLetter, "4s");
    store.spec.stream.partitions = Some(8);
    provision(&js, &store, &projection).await;
    let all = ticks(2000, 200, 41);
    append_ticks(&js, &all[..1000], 0).await;
    // An event the read model refuses (a CHECK constraint): recorded as a dead letter, the others go on.
    publish_raw(
        &js,
        vec![(
            "note.n1".into(),
            event_headers("bad-note", "Noted"),
            serde_json::json!({"id": "n1", "body": "forbidden"})
                .to_string()
                .into_bytes(),
        )],
    )
    .await;
    append_ticks(&js, &all[1000..], 1000).await;
    let sidecar = InProcess::start(config_of(&store, &projection), &url, &nats.url()).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            ledger_events(&url).await == all.len() as i64
        })
        .await,
        "caught up"
    );
    let letters = query_strings(
        &url,
        "SELECT projection, event_id FROM projectionist_dead_letters",
    )
    .await;
    assert_eq!(
        letters,
        vec![vec!["test/ledger".to_string(), "bad-note".to_string()]]
    );
    sidecar.stop().await;

    // A rebuild resets the read model once and restarts every partition's checkpoint.
    let pool = sqlx::SqlitePool::connect(&url).await.expect("connect");
    sqlx::query("UPDATE ledger SET hash = 0, events = 999")
        .execute(&pool)
        .await
        .expect("corrupt");
    pool.close().await;
    projection.spec.rebuild = Some(Rebuild {
        token: "v2".into(),
        reset: vec!["DELETE FROM ledger".into()],
    });
    let sidecar = InProcess::start(config_of(&store, &projection), &url, &nats.url()).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_ledger(&url).await == fold(&all)
        })
        .await,
        "rebuilt"
    );
    let tokens = query_strings(
        &url,
        "SELECT DISTINCT rebuild_token FROM projectionist_partitions",
    )
    .await;
    assert_eq!(tokens, vec![vec!["v2".to_string()]]);
    sidecar.stop().await;
}
