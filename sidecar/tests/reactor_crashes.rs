//! A reactor that keeps crashing: the sidecar process SIGKILLed 20 times and nats-server restarted twice while events
//! are appended and delivered. Nothing is lost, each aggregate's events arrive in stream order (a repeat is only a
//! redelivery of the same event), and a parked aggregate is still parked, with every later event held, afterwards.

mod common;
mod reactor_support;

use std::time::Duration;

use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_tests::nats::NatsServer;
use rand::Rng;
use reactor_support::{Endpoint, append, provision, reactor};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_and_nats_restarts_lose_nothing_and_keep_each_aggregate_in_order() {
    let mut nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let endpoint = Endpoint::start(reactor_support::refuse_poison).await;
    let (store, _) = common::ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "1s");
    let reactor = reactor(
        &endpoint.url(),
        json!({"delivery": {"concurrency": 8, "retry": {"initial": "20ms", "max": "500ms"}, "maxAttempts": 0}}),
    );
    provision(&js, &store, &reactor).await;
    let dir = reactor_support::config_dir(&store, &reactor);

    // The parked aggregate: its second event is poison; every later one must stay held.
    append(&js, &store, &endpoint, "p", "p0", json!({})).await;
    append(&js, &store, &endpoint, "p", "p1", json!({"poison": true})).await;

    let (aggregates, rounds) = (40, 25);
    let appender = {
        let (js, store) = (js.clone(), store.clone());
        let shared = endpoint.shared.clone();
        tokio::spawn(async move {
            for round in 0..rounds {
                reactor_support::append_round(&js, &store, &shared, aggregates, round).await;
                if round % 5 == 4 {
                    reactor_support::append_to(
                        &js,
                        &store,
                        &shared,
                        "p",
                        &format!("p-{round}"),
                        json!({}),
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    let mut sidecar = common::SidecarProcess::run(dir.path());
    for kill in 0..20 {
        let pause = rand::rng().random_range(400..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        sidecar.sigkill();
        if kill == 6 || kill == 13 {
            nats.stop();
            tokio::time::sleep(Duration::from_millis(500)).await;
            nats.start_again().await.expect("nats back");
        }
        sidecar = common::SidecarProcess::run(dir.path());
    }
    appender.await.expect("appended");

    let total = aggregates * rounds;
    let expected = endpoint.shared.expected.lock().expect("lock").clone();
    let all = common::wait_until(Duration::from_secs(120), || async {
        let delivered = endpoint.shared.delivered();
        (0..aggregates).all(|a| {
            let key = format!("acct.a{a}");
            delivered.get(&key).map(Vec::len) == Some(expected[&key].len())
        })
    })
    .await;
    let delivered = endpoint.shared.delivered();
    let count: usize = (0..aggregates)
        .map(|a| delivered.get(&format!("acct.a{a}")).map_or(0, Vec::len))
        .sum();
    assert!(all, "delivered {count} of {total}");
    endpoint.assert_order(&["acct.p"]);

    // The parked aggregate is still parked, every event after the poison one held and none delivered.
    assert!(endpoint.shared.succeeded("p0"));
    let held_ids = &expected["acct.p"][1..];
    for id in held_ids {
        assert!(
            !endpoint.shared.succeeded(id),
            "{id} was delivered past the poison event"
        );
    }
    let parking = js
        .get_stream(reactor.parking_stream())
        .await
        .expect("parking lot");
    let held = common::wait_until(Duration::from_secs(30), || async {
        let mut subjects = parking
            .info_with_subjects("projectionist.parked.test.notifier.acct.p")
            .await
            .expect("info");
        let mut n = 0;
        while let Some((_, c)) = futures::TryStreamExt::try_next(&mut subjects)
            .await
            .expect("subjects")
        {
            n += c;
        }
        n == held_ids.len()
    })
    .await;
    assert!(held, "every event of the parked aggregate is held");
    drop(sidecar);
}
