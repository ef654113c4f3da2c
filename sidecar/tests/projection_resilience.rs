//! Outages and competition: NATS or the database stopped and restarted mid-stream, a database restored to an older
//! state, and two sidecars on one projection.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_tests::mariadb::MariaDb;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use projectionist_tests::sqlite::Sqlite;

#[tokio::test]
async fn nats_restarted_mid_stream_the_projection_resumes_by_itself() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    let mut nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), Driver::Postgres, ErrorPolicy::Halt, "2s");
    provision(&js, &store, &projection).await;
    let all = ticks(8000, 100, 11);
    append_ticks(&js, &all[..4000], 0).await;
    let sidecar = InProcess::start(config_of(&store, &projection), &url, &nats.url()).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_checkpoint(&url).await.unwrap_or(0) > 0
        })
        .await
    );

    nats.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, body) = sidecar.get("/healthz").await;
    assert_eq!(code, 200, "alive while NATS is down: {body}");
    nats.start_again().await.expect("nats back");
    let js = nats.jetstream().await.expect("js");
    append_ticks(&js, &all[4000..], 4000).await;

    let done = wait_until(Duration::from_secs(60), || async {
        read_checkpoint(&url).await == Some(8000)
    })
    .await;
    assert!(done, "checkpoint {:?}", read_checkpoint(&url).await);
    assert_eq!(read_ledger(&url).await, fold(&all));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            sidecar.get("/readyz").await.0 == 200
        })
        .await
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn mariadb_killed_and_restarted_mid_stream_the_projection_resumes_by_itself() {
    let mut db = MariaDb::start().await.expect("mariadb");
    let url = db.fresh_database().await.expect("db");
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), Driver::Mysql, ErrorPolicy::Halt, "2s");
    provision(&js, &store, &projection).await;
    let all = ticks(6000, 100, 15);
    append_ticks(&js, &all[..3000], 0).await;
    let sidecar = InProcess::start(config_of(&store, &projection), &url, &nats.url()).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_checkpoint(&url).await.unwrap_or(0) > 0
        })
        .await
    );
    db.kill();
    append_ticks(&js, &all[3000..], 3000).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    db.start_again().await.expect("mariadb back");
    let done = wait_until(Duration::from_secs(60), || async {
        read_checkpoint(&url).await == Some(6000)
    })
    .await;
    assert!(done, "checkpoint {:?}", read_checkpoint(&url).await);
    assert_eq!(read_ledger(&url).await, fold(&all));
    sidecar.stop().await;
}

#[tokio::test]
async fn database_restarted_mid_stream_the_projection_resumes_by_itself() {
    let mut pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), Driver::Postgres, ErrorPolicy::Halt, "2s");
    provision(&js, &store, &projection).await;
    let all = ticks(8000, 100, 12);
    append_ticks(&js, &all[..4000], 0).await;
    let sidecar = InProcess::start(config_of(&store, &projection), &url, &nats.url()).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_checkpoint(&url).await.unwrap_or(0) > 0
        })
        .await
    );

    pg.kill();
    append_ticks(&js, &all[4000..], 4000).await;
    let not_ready = wait_until(Duration::from_secs(20), || async {
        sidecar.get("/readyz").await.0 == 503
    })
    .await;
    assert!(not_ready, "readiness reports the database outage");
    let (code, body) = sidecar.get("/readyz").await;
    assert!(code == 503 && body.contains("database"), "{body}");
    assert_eq!(sidecar.get("/healthz").await.0, 200, "behind is not dead");
    pg.start_again().await.expect("postgres back");

    let done = wait_until(Duration::from_secs(60), || async {
        read_checkpoint(&url).await == Some(8000)
    })
    .await;
    assert!(done, "checkpoint {:?}", read_checkpoint(&url).await);
    assert_eq!(read_ledger(&url).await, fold(&all));
    let (_, metrics) = sidecar.get("/metrics").await;
    assert!(
        metric(&metrics, "projectionist_sidecar_errors_total{projection=\"test/ledger\",kind=\"database_transient\"}")
            .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn a_new_database_behind_the_consumer_is_replayed_from_the_stream() {
    let dir = Sqlite::new().expect("sqlite");
    let first_db = dir.fresh_database();
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "2s");
    provision(&js, &store, &projection).await;
    let all = ticks(3000, 50, 13);
    append_ticks(&js, &all, 0).await;
    let config = config_of(&store, &projection);
    let sidecar = InProcess::start(config.clone(), &first_db, &nats.url()).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_checkpoint(&first_db).await == Some(3000)
        })
        .await
    );
    sidecar.stop().await;

    // The consumer has delivered and acknowledged everything; a fresh database must still get every event.
    let restored = dir.fresh_database();
    let sidecar = InProcess::start(config, &restored, &nats.url()).await;
    let done = wait_until(Duration::from_secs(30), || async {
        read_checkpoint(&restored).await == Some(3000)
    })
    .await;
    assert!(done, "checkpoint {:?}", read_checkpoint(&restored).await);
    assert_eq!(read_ledger(&restored).await, fold(&all));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_one_applies_and_the_other_takes_over_when_it_dies() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), Driver::Postgres, ErrorPolicy::Halt, "2s");
    provision(&js, &store, &projection).await;
    let config_dir = tempfile::tempdir().expect("dir");
    let db_env = write_config(config_dir.path(), &config_of(&store, &projection));
    let all = ticks(20_000, 200, 14);
    append_ticks(&js, &all[..2000], 0).await;

    let (port_a, port_b) = (free_port(), free_port());
    let mut a = spawn_sidecar(config_dir.path(), &db_env, &url, port_a);
    let applied = |port: u16| async move {
        let (_, body) = http_get(([127, 0, 0, 1], port).into(), "/metrics").await;
        metric(
            &body,
            "projectionist_sidecar_events_applied_total{projection=\"test/ledger\"}",
        )
        .unwrap_or(0.0)
    };
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_checkpoint(&url).await == Some(2000)
        })
        .await
    );
    // The second replica starts once the first is projecting. (Started at the same instant, the later one can find
    // the first's in-flight events delivered beyond the checkpoint and replay them from the stream; the
    // compare-and-set keeps that correct, but it is work the standby should not do — a known limitation.)
    let mut b = spawn_sidecar(config_dir.path(), &db_env, &url, port_b);
    let b_ready = wait_until(Duration::from_secs(30), || async {
        http_get(([127, 0, 0, 1], port_b).into(), "/readyz").await.0 == 200
    })
    .await;
    assert!(b_ready, "the second replica is up");
    append_ticks(&js, &all[2000..10_000], 2000).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_checkpoint(&url).await == Some(10_000)
        })
        .await
    );
    let (ea, eb) = (applied(port_a).await, applied(port_b).await);
    assert_eq!(ea + eb, 10_000.0, "a applied {ea}, b applied {eb}");
    assert!(
        ea == 0.0 || eb == 0.0,
        "only one applies at a time: a {ea}, b {eb}"
    );

    // Kill the active one; the standby takes over.
    let (active, standby_port) = if ea > 0.0 {
        (&mut a, port_b)
    } else {
        (&mut b, port_a)
    };
    kill(Pid::from_raw(active.id() as i32), Signal::SIGKILL).expect("kill");
    let _ = active.wait();
    append_ticks(&js, &all[10_000..], 10_000).await;
    let done = wait_until(Duration::from_secs(60), || async {
        read_checkpoint(&url).await == Some(20_000)
    })
    .await;
    assert!(done, "checkpoint {:?}", read_checkpoint(&url).await);
    assert!(
        applied(standby_port).await >= 10_000.0,
        "the standby applied the rest"
    );
    assert_eq!(read_ledger(&url).await, fold(&all));
    for child in [&mut a, &mut b] {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let _ = child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_creating_the_schema_at_once_on_postgres_do_not_collide() {
    use projectionist_sidecar::database::Database;
    use projectionist_sidecar::engine::prepare;

    let pg = Postgres::start().await.expect("postgres");
    let (store, projection) = ledger(
        "nats://127.0.0.1:4222",
        Driver::Postgres,
        ErrorPolicy::Halt,
        "2s",
    );
    let config = config_of(&store, &projection);
    // Each round a new database, eight replicas preparing it at once (one pool each, as in eight pods).
    for round in 0..5 {
        let url = pg.fresh_database().await.expect("db");
        let replicas = (0..8).map(|_| {
            let db = Database::connect_lazy(&url, Driver::Postgres, 1).expect("pool");
            let config = config.clone();
            tokio::spawn(async move { prepare::prepare(&db, &config, "test/ledger", false).await })
        });
        for (replica, outcome) in futures::future::join_all(replicas)
            .await
            .into_iter()
            .enumerate()
        {
            let outcome = outcome.expect("task");
            assert!(
                outcome.is_ok(),
                "round {round}, replica {replica}: {:?}",
                outcome.err()
            );
        }
    }
}
