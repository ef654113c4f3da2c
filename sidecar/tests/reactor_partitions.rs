//! A reactor on a partitioned store, run by several sidecar processes against a real nats-server and a real HTTP
//! endpoint: the sidecars share the partitions fairly, each partition delivered by one at a time; sidecars SIGKILLed
//! and restarted while events are appended, scaled 3 → 4 → 2: every event delivered, each aggregate in stream
//! order, never two calls for one aggregate at once, and the survivors take the dead sidecars' partitions over.
//! In-process: the parking lot's retry is refused, naming the reason, by a sidecar that does not deliver the
//! aggregate's partition, and done by the one that does.

mod common;
mod reactor_support;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use projectionist_crds::partition::{PROGRESS_STREAM, Progress, progress_filter};
use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_tests::nats::NatsServer;
use rand::Rng;
use reactor_support::{Endpoint, Reply, append, provision, reactor};
use serde_json::json;

const PARTITIONS: u32 = 8;

/// The partitions each live sidecar reports it delivers (reports older than `lease` before the newest left out).
async fn spread(js: &jetstream::Context, lease: Duration) -> BTreeMap<String, Vec<u32>> {
    use futures::TryStreamExt;
    let Ok(stream) = js.get_stream(PROGRESS_STREAM).await else {
        return BTreeMap::new();
    };
    let subjects: Vec<String> = stream
        .info_with_subjects(progress_filter("test", "reactor_notifier"))
        .await
        .expect("subjects")
        .map_ok(|(s, _)| s)
        .try_collect()
        .await
        .expect("subjects");
    let mut reports = Vec::new();
    for subject in subjects {
        if let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await {
            let progress: Progress = serde_json::from_slice(&m.payload).expect("report");
            let member = subject.rsplit('.').next().unwrap_or_default().to_string();
            reports.push((member, m.time, progress.partitions));
        }
    }
    let newest = reports.iter().map(|(_, t, _)| *t).max();
    reports
        .into_iter()
        .filter(|(_, t, _)| newest.is_some_and(|n| (n - *t).unsigned_abs() <= lease))
        .map(|(m, _, p)| (m, p))
        .collect()
}

/// Whether `spread` has `members` sidecars, fair shares (±1) and every partition delivered by exactly one.
fn fair(spread: &BTreeMap<String, Vec<u32>>, members: usize) -> bool {
    let mut all: Vec<u32> = spread.values().flatten().copied().collect();
    all.sort_unstable();
    let (least, most) = (
        spread.values().map(Vec::len).min().unwrap_or(0),
        spread.values().map(Vec::len).max().unwrap_or(0),
    );
    spread.len() == members && most - least <= 1 && all == (0..PARTITIONS).collect::<Vec<_>>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_share_the_partitions_and_take_over_from_killed_ones_in_order() {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let (mut store, _) = common::ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "1s");
    store.spec.stream.partitions = Some(PARTITIONS);
    let reactor = reactor(&endpoint.url(), json!({}));
    provision(&js, &store, &reactor).await;
    let dir = reactor_support::config_dir(&store, &reactor);
    let lease = Duration::from_millis(1500);

    let mut sidecars: Vec<_> = (0..3)
        .map(|_| common::SidecarProcess::run(dir.path()))
        .collect();
    let shared = common::wait_until(Duration::from_secs(30), || async {
        fair(&spread(&js, lease).await, 3)
    })
    .await;
    assert!(
        shared,
        "three sidecars share: {:?}",
        spread(&js, lease).await
    );

    let (aggregates, rounds) = (30, 60);
    let appender = {
        let (js, store) = (js.clone(), store.clone());
        let shared = endpoint.shared.clone();
        tokio::spawn(async move {
            for round in 0..rounds {
                reactor_support::append_round(&js, &store, &shared, aggregates, round).await;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };
    for round in 0..10 {
        let pause = rand::rng().random_range(300..900);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if round == 5 {
            // Scaled out: a fourth sidecar takes its share.
            sidecars.push(common::SidecarProcess::run(dir.path()));
            continue;
        }
        let victim = rand::rng().random_range(0..sidecars.len());
        sidecars[victim].sigkill();
        sidecars[victim] = common::SidecarProcess::run(dir.path());
    }
    // Scaled in, by SIGKILL: the other two take the partitions of two over.
    for _ in 0..2 {
        sidecars.remove(0).sigkill();
    }
    appender.await.expect("appended");

    let expected = endpoint.shared.expected.lock().expect("lock").clone();
    let all = common::wait_until(Duration::from_secs(60), || async {
        let delivered = endpoint.shared.delivered();
        expected
            .iter()
            .all(|(a, ids)| delivered.get(a).map(Vec::len) == Some(ids.len()))
    })
    .await;
    let delivered = endpoint.shared.delivered();
    let count: usize = delivered.values().map(Vec::len).sum();
    assert!(all, "delivered {count} of {}", aggregates * rounds);
    endpoint.assert_order(&[]);
    let shared = common::wait_until(Duration::from_secs(30), || async {
        fair(&spread(&js, lease).await, 2)
    })
    .await;
    assert!(shared, "two sidecars share: {:?}", spread(&js, lease).await);
    drop(sidecars);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_aggregate_is_retried_by_the_sidecar_delivering_its_partition() {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let endpoint = Endpoint::start(reactor_support::refuse_poison).await;
    let (mut store, _) = common::ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "1s");
    store.spec.stream.partitions = Some(PARTITIONS);
    let reactor = reactor(&endpoint.url(), json!({}));
    provision(&js, &store, &reactor).await;
    let sidecars = [
        reactor_support::start_sidecar(&nats, &store, &reactor).await,
        reactor_support::start_sidecar(&nats, &store, &reactor).await,
    ];
    let lease = Duration::from_millis(1500);
    assert!(
        common::wait_until(Duration::from_secs(30), || async {
            fair(&spread(&js, lease).await, 2)
        })
        .await
    );
    append(&js, &store, &endpoint, "a", "a0", json!({"poison": true})).await;
    append(&js, &store, &endpoint, "a", "a1", json!({})).await;
    let parked = common::wait_until(Duration::from_secs(30), || async {
        let (_, body) = common::api(&sidecars[0], "GET", "/v1/reactors/notifier/parked").await;
        body["parked"][0]["events"] == json!(2)
    })
    .await;
    assert!(parked);
    endpoint.shared.set(|_| Reply::ok());
    let answers = [
        common::api(
            &sidecars[0],
            "POST",
            "/v1/reactors/notifier/parked/acct.a/retry",
        )
        .await,
        common::api(
            &sidecars[1],
            "POST",
            "/v1/reactors/notifier/parked/acct.a/retry",
        )
        .await,
    ];
    let codes: Vec<u16> = answers.iter().map(|(c, _)| *c).collect();
    assert!(
        codes == [202, 409] || codes == [409, 202],
        "one sidecar delivers the partition: {answers:?}"
    );
    let refused = answers.iter().find(|(c, _)| *c == 409).expect("refused");
    assert!(
        refused.1["detail"]
            .as_str()
            .is_some_and(|d| d.contains("another sidecar")),
        "{refused:?}"
    );
    assert!(
        common::wait_until(Duration::from_secs(30), || async {
            endpoint.shared.succeeded("a1")
        })
        .await
    );
    assert_eq!(endpoint.shared.delivered()["acct.a"], ["a0", "a1"]);
    for sidecar in sidecars {
        sidecar.stop().await;
    }
}
