//! Events of many aggregates, interleaved, end up in the read model exactly as a fold of the events in stream
//! order — for each driver.

mod common;

use std::time::Duration;

use common::*;
use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_tests::mariadb::MariaDb;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use projectionist_tests::sqlite::Sqlite;

async fn projects_in_order(driver: Driver, url: &str) {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), driver, ErrorPolicy::Halt, "5s");
    provision(&js, &store, &projection).await;
    let first = ticks(1500, 40, 1);
    append_ticks(&js, &first, 0).await;
    let sidecar = InProcess::start(config_of(&store, &projection), url, &nats.url()).await;
    // More events while it runs.
    let second = ticks(1500, 40, 2);
    append_ticks(&js, &second, first.len()).await;
    let all: Vec<Tick> = first.iter().chain(second.iter()).cloned().collect();
    let expected = fold(&all);
    let done = wait_until(Duration::from_secs(60), || async {
        read_checkpoint(url).await == Some(3000)
    })
    .await;
    assert!(done, "checkpoint reached {:?}", read_checkpoint(url).await);
    assert_eq!(read_ledger(url).await, expected);

    let (code, body) = sidecar.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("checkpoint 3000"), "{body}");
    let (code, metrics) = sidecar.get("/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        metric(
            &metrics,
            "projectionist_sidecar_events_applied_total{projection=\"test/ledger\"}"
        ),
        Some(3000.0),
        "{metrics}"
    );
    if driver == Driver::Postgres {
        let merged = metric(
            &metrics,
            "projectionist_sidecar_events_merged_total{projection=\"test/ledger\"}",
        );
        assert!(
            merged.unwrap_or(0.0) > 1000.0,
            "the upserts were merged into multi-row statements: {merged:?}"
        );
    }
    assert_eq!(sidecar.get("/healthz").await.0, 200);
    sidecar.stop().await;
}

#[tokio::test]
async fn postgres_read_model_equals_the_fold_of_interleaved_events() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    projects_in_order(Driver::Postgres, &url).await;
}

#[tokio::test]
async fn mariadb_read_model_equals_the_fold_of_interleaved_events() {
    let db = MariaDb::start().await.expect("mariadb");
    let url = db.fresh_database().await.expect("db");
    projects_in_order(Driver::Mysql, &url).await;
}

#[tokio::test]
async fn sqlite_read_model_equals_the_fold_of_interleaved_events() {
    let dir = Sqlite::new().expect("sqlite");
    let url = dir.fresh_database();
    projects_in_order(Driver::Sqlite, &url).await;
}
