//! Events of many aggregates, interleaved, end up in the read model exactly as a fold of the events in stream
//! order — for each driver.

mod common;

use std::time::Duration;

use async_nats::jetstream::consumer::AckPolicy;
use common::*;
use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_tests::mariadb::MariaDb;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use projectionist_tests::sqlite::Sqlite;

async fn projects_in_order(driver: Driver, url: &str) {
    projects_in_order_with(driver, url, AckPolicy::All).await;
}

async fn projects_in_order_with(driver: Driver, url: &str, ack_policy: AckPolicy) {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), driver, ErrorPolicy::Halt, "5s");
    if ack_policy != AckPolicy::All {
        // A consumer as an earlier release provisioned it: provisioning keeps it as it is.
        let mut consumer = projectionist_crds::consumer::consumer_config(&projection, &store)
            .expect("consumer config");
        consumer.ack_policy = ack_policy;
        js.create_stream(projectionist_crds::stream::stream_config(&store).expect("stream"))
            .await
            .expect("stream");
        js.create_consumer_on_stream(consumer, store.stream_name())
            .await
            .expect("consumer");
    }
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
    // Acknowledged up to the end: once per batch (`AckPolicy::All`) or per event (`Explicit`).
    let consumer = || async {
        js.get_stream(store.stream_name())
            .await
            .expect("stream")
            .consumer_info(projection.consumer_name())
            .await
            .expect("consumer")
            .clone()
    };
    let acked = wait_until(Duration::from_secs(10), || async {
        consumer().await.ack_floor.stream_sequence == 3000
    })
    .await;
    let info = consumer().await;
    assert!(acked, "{:?}", info.ack_floor);
    assert_eq!(info.config.ack_policy, ack_policy);
    if driver != Driver::Sqlite {
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

#[tokio::test]
async fn a_consumer_with_explicit_acknowledgements_keeps_working() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    projects_in_order_with(Driver::Postgres, &url, AckPolicy::Explicit).await;
}
