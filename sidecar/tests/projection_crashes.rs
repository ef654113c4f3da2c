//! Exactly once under crashes: the sidecar binary is killed with SIGKILL at random moments while it projects tens of
//! thousands of events with a handler that is not idempotent. After every kill the read model holds exactly the
//! events up to its checkpoint, and after the last restart it equals the fold of all events. SIGTERM finishes the
//! batch in flight and exits cleanly.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use rand::Rng;

async fn events_in_ledger(url: &str) -> i64 {
    read_ledger(url).await.values().map(|(_, e)| e).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_loses_or_doubles_an_event() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), Driver::Postgres, ErrorPolicy::Halt, "1s");
    provision(&js, &store, &projection).await;
    let config_dir = tempfile::tempdir().expect("dir");
    let db_env = write_config(config_dir.path(), &config_of(&store, &projection));

    const TOTAL: usize = 60_000;
    let total_ticks = ticks(TOTAL, 1000, 7);
    append_ticks(&js, &total_ticks, 0).await;
    let mut rng = rand::rng();
    let mut progress_at_kills = Vec::new();
    let mut last = 0;
    for kill_no in 1..=20 {
        let mut child = spawn_sidecar(config_dir.path(), &db_env, &url, free_port());
        // Kill while it is projecting: once the checkpoint moves, at a random moment soon after.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while read_checkpoint(&url).await.unwrap_or(0) <= last
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..120))).await;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill");
        let _ = child.wait();
        // The invariant at every crash point: the ledger holds exactly the events up to the checkpoint.
        let checkpoint = read_checkpoint(&url).await.unwrap_or(0);
        assert_eq!(
            events_in_ledger(&url).await,
            checkpoint,
            "after kill {kill_no}"
        );
        progress_at_kills.push(checkpoint);
        last = checkpoint;
    }
    let mid_stream = progress_at_kills
        .iter()
        .filter(|c| **c > 0 && (**c as usize) < TOTAL)
        .count();
    assert!(
        mid_stream >= 15,
        "kills should land while projecting: {progress_at_kills:?}"
    );

    let admin_port = free_port();
    let mut child = spawn_sidecar(config_dir.path(), &db_env, &url, admin_port);
    let done = wait_until(Duration::from_secs(120), || async {
        read_checkpoint(&url).await == Some(TOTAL as i64)
    })
    .await;
    assert!(done, "checkpoint {:?}", read_checkpoint(&url).await);
    assert_eq!(read_ledger(&url).await, fold(&total_ticks));

    // Graceful stop.
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("term");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    eprintln!("checkpoint at each of 20 kills: {progress_at_kills:?}");
}

#[tokio::test]
async fn sigterm_mid_stream_commits_or_rolls_back_and_exits_within_the_grace_period() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let (store, projection) = ledger(&nats.url(), Driver::Postgres, ErrorPolicy::Halt, "2s");
    provision(&js, &store, &projection).await;
    let config_dir = tempfile::tempdir().expect("dir");
    let db_env = write_config(config_dir.path(), &config_of(&store, &projection));
    let all = ticks(20_000, 100, 3);
    append_ticks(&js, &all, 0).await;

    let mut child = spawn_sidecar(config_dir.path(), &db_env, &url, free_port());
    assert!(
        wait_until(Duration::from_secs(30), || async {
            read_checkpoint(&url).await.unwrap_or(0) > 0
        })
        .await
    );
    let started = std::time::Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("term");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "exits within the default grace period"
    );
    let checkpoint = read_checkpoint(&url).await.expect("checkpoint");
    assert_eq!(events_in_ledger(&url).await, checkpoint);

    // The consumer's acknowledgements never run ahead of what was committed.
    let stream = js.get_stream("test_bank").await.expect("stream");
    let info = stream.consumer_info("test_ledger").await.expect("consumer");
    assert!(
        info.ack_floor.stream_sequence <= checkpoint as u64,
        "acked {} > committed {checkpoint}",
        info.ack_floor.stream_sequence
    );
}
