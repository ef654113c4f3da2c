//! Reactors against a real nats-server and a real HTTP endpoint written for the test: a flaky endpoint still gets
//! every event, in order per aggregate, one call per aggregate at a time; a poison event parks its aggregate while
//! others go on, and the parking lot's retry and skip work through the API; an emitting reactor's events exist once
//! despite forced redeliveries; a consumer that refuses every pull is retried with back-off, not in a tight loop.

mod common;
mod reactor_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::api;
use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_tests::nats::NatsServer;
use reactor_support::{Endpoint, Reply, append, provision, reactor};
use serde_json::json;

/// A nats-server, an endpoint that takes every event, and a reactor of the ledger store delivering to it, provisioned.
struct Provisioned {
    nats: NatsServer,
    js: async_nats::jetstream::Context,
    endpoint: Endpoint,
    store: projectionist_crds::EventStore,
    reactor: projectionist_crds::Reactor,
}

async fn provisioned() -> Provisioned {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let (store, _) = common::ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "1s");
    let reactor = reactor(&endpoint.url(), json!({}));
    provision(&js, &store, &reactor).await;
    Provisioned {
        nats,
        js,
        endpoint,
        store,
        reactor,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_endpoint_gets_every_event_in_order_per_aggregate_one_call_at_a_time() {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let counter = AtomicU64::new(0);
    let mut endpoint = Endpoint::start(move |call| {
        // Deterministic flakiness: 500s, a 429 with Retry-After, answers slower than ackWait.
        let n = counter.fetch_add(1, Ordering::Relaxed);
        match n % 17 {
            3 | 8 | 13 => Reply::status(500),
            5 => Reply {
                status: 429,
                retry_after: Some(1),
                ..Default::default()
            },
            11 if call.attempt == 1 => Reply {
                status: 204,
                delay: Duration::from_millis(1500),
                ..Default::default()
            },
            _ => Reply::ok(),
        }
    })
    .await;
    let (store, _) = common::ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "1s");
    let reactor = reactor(&endpoint.url(), json!({}));
    provision(&js, &store, &reactor).await;
    let sidecar = reactor_support::start_sidecar(&nats, &store, &reactor).await;

    let (aggregates, per_aggregate) = (12, 10);
    let mut restarted = None;
    for round in 0..per_aggregate {
        for a in 0..aggregates {
            append(
                &js,
                &store,
                &endpoint,
                &format!("a{a}"),
                &format!("e-{a}-{round}"),
                json!({"n": round}),
            )
            .await;
        }
        if round == 4 {
            // The endpoint restarts: connections are refused for a while.
            let stopped = std::time::Instant::now();
            endpoint.stop();
            tokio::time::sleep(Duration::from_millis(800)).await;
            endpoint.restart().await;
            restarted = Some((stopped, std::time::Instant::now()));
        }
    }
    let restarted = restarted.expect("restarted");
    let total = aggregates * per_aggregate;
    let all = common::wait_until(Duration::from_secs(120), || async {
        endpoint
            .shared
            .delivered()
            .values()
            .map(Vec::len)
            .sum::<usize>()
            == total
    })
    .await;
    assert!(
        all,
        "delivered {} of {total}",
        endpoint
            .shared
            .delivered()
            .values()
            .map(Vec::len)
            .sum::<usize>()
    );
    assert!(
        endpoint.violations().is_empty(),
        "{:?}",
        endpoint.violations()
    );
    let expected = endpoint.shared.expected.lock().expect("lock").clone();
    for (aggregate, ids) in endpoint.shared.delivered() {
        assert_eq!(ids, expected[&aggregate], "order of {aggregate}");
    }
    // A slow answer was never delivered twice while it ran, and a 429's Retry-After was waited out.
    let calls = endpoint.shared.calls.lock().expect("lock").clone();
    // (A call whose connection the restart cut is a failed call, rightly tried again.)
    let (stopped, restarted) = restarted;
    let cut = |c: &&reactor_support::Call| c.started < restarted && c.ended > stopped;
    for slow in calls
        .iter()
        .filter(|c| c.ended - c.started >= Duration::from_millis(1400))
        .filter(|c| !cut(c))
    {
        let others = calls
            .iter()
            .filter(|c| c.id == slow.id && c.attempt > slow.attempt)
            .count();
        let all: Vec<_> = calls
            .iter()
            .filter(|c| c.id == slow.id)
            .map(|c| (c.attempt, c.status, c.started, c.ended))
            .collect();
        assert_eq!(
            others, 0,
            "{} was delivered again after its slow answer: {all:?}",
            slow.id
        );
    }
    for limited in calls.iter().filter(|c| c.status == 429) {
        let next = calls
            .iter()
            .filter(|c| c.id == limited.id && c.attempt == limited.attempt + 1)
            .map(|c| c.started)
            .next()
            .expect("retried");
        assert!(
            next - limited.ended >= Duration::from_millis(900),
            "Retry-After honoured"
        );
    }
    counted_at_least(&sidecar, total as f64).await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_parks_its_aggregate_others_go_on_and_retry_and_skip_work() {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let endpoint = Endpoint::start(reactor_support::refuse_poison).await;
    let (store, _) = common::ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "1s");
    let reactor = reactor(&endpoint.url(), json!({}));
    provision(&js, &store, &reactor).await;
    let sidecar = reactor_support::start_sidecar(&nats, &store, &reactor).await;
    let dead_letters = nats
        .connect()
        .await
        .expect("client")
        .subscribe(reactor.dead_letter_subject())
        .await
        .expect("subscribe");

    append(&js, &store, &endpoint, "a", "a1", json!({})).await;
    append(&js, &store, &endpoint, "a", "a2", json!({"poison": true})).await;
    append(&js, &store, &endpoint, "a", "a3", json!({})).await;
    append(&js, &store, &endpoint, "c", "c1", json!({"poison": true})).await;
    append(&js, &store, &endpoint, "c", "c2", json!({})).await;
    for i in 0..5 {
        append(&js, &store, &endpoint, "b", &format!("b{i}"), json!({})).await;
    }
    let others = common::wait_until(Duration::from_secs(30), || async {
        endpoint.shared.succeeded("b4") && endpoint.shared.succeeded("a1")
    })
    .await;
    assert!(others, "other aggregates go on");
    let parked = common::wait_until(Duration::from_secs(30), || async {
        let (_, body) = api(&sidecar, "GET", "/v1/reactors/notifier/parked").await;
        body["parked"].as_array().is_some_and(|p| p.len() == 2)
    })
    .await;
    assert!(parked, "a and c parked");
    // A later event of a parked aggregate is held too.
    append(&js, &store, &endpoint, "a", "a4", json!({})).await;
    let held = common::wait_until(Duration::from_secs(30), || async {
        let (_, body) = api(&sidecar, "GET", "/v1/reactors/notifier/parked").await;
        body["parked"][0]["events"] == json!(3)
    })
    .await;
    let (_, body) = api(&sidecar, "GET", "/v1/reactors/notifier/parked").await;
    assert!(held, "{body}");
    assert_eq!(body["parked"][0]["aggregate"], "acct.a");
    assert!(
        body["parked"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("422"),
        "{body}"
    );
    assert!(!endpoint.shared.succeeded("a3") && !endpoint.shared.succeeded("a4"));

    // Retried while still failing: it stays parked, nothing reordered.
    let (code, _) = api(
        &sidecar,
        "POST",
        "/v1/reactors/notifier/parked/acct.a/retry",
    )
    .await;
    assert_eq!(code, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, body) = api(&sidecar, "GET", "/v1/reactors/notifier/parked").await;
    assert_eq!(body["parked"][0]["events"], json!(3), "{body}");

    // Fixed: the held events arrive in order, and the aggregate goes on.
    endpoint.shared.set(|_| Reply::ok());
    let (code, _) = api(
        &sidecar,
        "POST",
        "/v1/reactors/notifier/parked/acct.a/retry",
    )
    .await;
    assert_eq!(code, 202);
    append(&js, &store, &endpoint, "a", "a5", json!({})).await;
    let drained = common::wait_until(Duration::from_secs(30), || async {
        endpoint.shared.succeeded("a5")
    })
    .await;
    assert!(drained);
    assert_eq!(
        endpoint.shared.delivered()["acct.a"],
        ["a1", "a2", "a3", "a4", "a5"]
    );

    // Skip drops exactly the head, with a record on the dead-letter subject.
    let (code, body) = api(&sidecar, "POST", "/v1/reactors/notifier/parked/acct.c/skip").await;
    assert_eq!(code, 200, "{body}");
    endpoint
        .shared
        .expected
        .lock()
        .expect("lock")
        .insert("acct.c".into(), vec!["c2".into()]);
    assert_eq!(body["skipped"]["id"], "c1");
    assert_eq!(body["skipped"]["remaining"], 1);
    let mut dead_letters = dead_letters;
    let letter = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut dead_letters),
    )
    .await
    .expect("a record")
    .expect("message");
    assert_eq!(
        letter
            .headers
            .as_ref()
            .and_then(|h| h.get("ce-id"))
            .map(|v| v.as_str()),
        Some("c1")
    );
    let (code, _) = api(
        &sidecar,
        "POST",
        "/v1/reactors/notifier/parked/acct.c/retry",
    )
    .await;
    assert_eq!(code, 202);
    assert!(
        common::wait_until(Duration::from_secs(30), || async {
            endpoint.shared.succeeded("c2")
        })
        .await
    );
    assert!(!endpoint.shared.succeeded("c1"));
    let emptied = common::wait_until(Duration::from_secs(30), || async {
        api(&sidecar, "GET", "/v1/reactors/notifier/parked").await.1["parked"] == json!([])
    })
    .await;
    assert!(
        emptied,
        "the parking lot is empty once every held event is done"
    );
    let (code, body) = api(&sidecar, "POST", "/v1/reactors/notifier/parked/acct.c/skip").await;
    assert_eq!(code, 404, "{body}");
    let (code, _) = api(&sidecar, "GET", "/v1/reactors/nobody/parked").await;
    assert_eq!(code, 404);
    assert!(
        endpoint.violations().is_empty(),
        "{:?}",
        endpoint.violations()
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emitting_reactor_appends_its_events_once_despite_redeliveries() {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let endpoint = Endpoint::start(|call| Reply {
        status: 200,
        emit: Some(
            json!([
                {"type": "WelcomeSent", "subject": format!("mail.{}", call.id), "data": {"for": call.id}},
                {"type": "Audited", "subject": format!("audit.{}", call.id)},
            ])
            .to_string(),
        ),
        ..Default::default()
    })
    .await;
    let (store, _) = common::ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "1s");
    let reactor = reactor(
        &endpoint.url(),
        json!({"events": {"subjects": ["test.bank.acct.>"]}}),
    );
    provision(&js, &store, &reactor).await;
    let events = 30;
    for i in 0..events {
        append(
            &js,
            &store,
            &endpoint,
            &format!("u{}", i % 7),
            &format!("u-{i}"),
            json!({}),
        )
        .await;
    }
    let sidecar = reactor_support::start_sidecar(&nats, &store, &reactor).await;
    let calls = || endpoint.shared.calls.lock().expect("lock").len();
    assert!(common::wait_until(Duration::from_secs(30), || async { calls() >= events }).await);
    sidecar.stop().await;

    // Forced redelivery of everything: the consumer is created again from the first event.
    let stream = js.get_stream(store.stream_name()).await.expect("stream");
    stream
        .delete_consumer(&reactor.consumer_name())
        .await
        .expect("deleted");
    provision(&js, &store, &reactor).await;
    let sidecar = reactor_support::start_sidecar(&nats, &store, &reactor).await;
    assert!(common::wait_until(Duration::from_secs(30), || async { calls() >= 2 * events }).await);
    sidecar.stop().await;

    let mut info = js.get_stream(store.stream_name()).await.expect("stream");
    let count = |filter: &'static str| {
        let stream = info.clone();
        async move {
            let mut subjects = stream.info_with_subjects(filter).await.expect("info");
            let mut n = 0;
            while let Some((_, c)) = futures::TryStreamExt::try_next(&mut subjects)
                .await
                .expect("subjects")
            {
                n += c;
            }
            n
        }
    };
    assert_eq!(count("test.bank.mail.>").await, events);
    assert_eq!(count("test.bank.audit.>").await, events);
    let first = info
        .get_last_raw_message_by_subject("test.bank.mail.u-0")
        .await
        .expect("emitted");
    assert_eq!(
        first.headers.get("ce-id").map(|v| v.as_str().to_string()),
        Some("test/notifier/u-0/0".to_string())
    );
    assert_eq!(
        first.headers.get("ce-type").map(|v| v.as_str()),
        Some("WelcomeSent")
    );
    let _ = info.info().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_delivers_at_a_time_and_another_takes_over_when_it_stops() {
    let Provisioned {
        nats,
        js,
        endpoint,
        store,
        reactor,
    } = provisioned().await;
    let first = reactor_support::start_sidecar(&nats, &store, &reactor).await;
    let second = reactor_support::start_sidecar(&nats, &store, &reactor).await;
    for i in 0..60 {
        append(
            &js,
            &store,
            &endpoint,
            &format!("r{}", i % 6),
            &format!("r-{i}"),
            json!({}),
        )
        .await;
    }
    let calls = || endpoint.shared.calls.lock().expect("lock").len();
    assert!(common::wait_until(Duration::from_secs(30), || async { calls() >= 60 }).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        calls(),
        60,
        "every event delivered once: one replica delivers at a time"
    );

    // The delivering replica stops (or dies): the other takes over.
    let (_, m1) = first.get("/metrics").await;
    let active_first =
        common::metric(&m1, "projectionist_sidecar_reactor_delivered_total").unwrap_or(0.0) > 0.0;
    let (active, standby) = if active_first {
        (first, second)
    } else {
        (second, first)
    };
    active.stop().await;
    for i in 60..90 {
        append(
            &js,
            &store,
            &endpoint,
            &format!("r{}", i % 6),
            &format!("r-{i}"),
            json!({}),
        )
        .await;
    }
    assert!(
        common::wait_until(Duration::from_secs(30), || async {
            endpoint
                .shared
                .delivered()
                .values()
                .map(Vec::len)
                .sum::<usize>()
                == 90
        })
        .await
    );
    counted_at_least(&standby, 30.0).await;
    let expected = endpoint.shared.expected.lock().expect("lock").clone();
    for (aggregate, ids) in endpoint.shared.delivered() {
        assert_eq!(ids, expected[&aggregate], "order of {aggregate}");
    }
    assert!(
        endpoint.violations().is_empty(),
        "{:?}",
        endpoint.violations()
    );
    standby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reactor_on_a_partitioned_store_parks_and_delivers_by_aggregate() {
    let nats = NatsServer::start().await.expect("nats");
    let js = nats.jetstream().await.expect("js");
    let endpoint = Endpoint::start(reactor_support::refuse_poison).await;
    let (mut store, _) = common::ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "1s");
    store.spec.stream.partitions = Some(4);
    let reactor = reactor(
        &endpoint.url(),
        json!({"events": {"subjects": ["test.bank.acct.>"]}}),
    );
    provision(&js, &store, &reactor).await;
    let sidecar = reactor_support::start_sidecar(&nats, &store, &reactor).await;
    for i in 0..4 {
        append(
            &js,
            &store,
            &endpoint,
            "a",
            &format!("a{i}"),
            json!({"poison": i == 1}),
        )
        .await;
        append(&js, &store, &endpoint, "b", &format!("b{i}"), json!({})).await;
    }
    let parked = common::wait_until(Duration::from_secs(30), || async {
        let (_, body) = api(&sidecar, "GET", "/v1/reactors/notifier/parked").await;
        body["parked"][0]["events"] == json!(3) && endpoint.shared.succeeded("b3")
    })
    .await;
    let (_, body) = api(&sidecar, "GET", "/v1/reactors/notifier/parked").await;
    assert!(parked, "{body}");
    // The aggregate is `<type>.<id>`, whatever partition it is stored in.
    assert_eq!(body["parked"][0]["aggregate"], "acct.a");
    endpoint.shared.set(|_| Reply::ok());
    let (code, _) = api(
        &sidecar,
        "POST",
        "/v1/reactors/notifier/parked/acct.a/retry",
    )
    .await;
    assert_eq!(code, 202);
    assert!(
        common::wait_until(Duration::from_secs(30), || async {
            endpoint.shared.succeeded("a3")
        })
        .await
    );
    assert_eq!(
        endpoint.shared.delivered()["acct.a"],
        ["a0", "a1", "a2", "a3"]
    );
    assert_eq!(
        endpoint.shared.delivered()["acct.b"],
        ["b0", "b1", "b2", "b3"]
    );
    assert!(
        endpoint.violations().is_empty(),
        "{:?}",
        endpoint.violations()
    );
    sidecar.stop().await;
}

/// Waits until the sidecar's metrics count at least `events` deliveries: the endpoint records a call before it
/// answers, the sidecar counts it once the answer is in.
async fn counted_at_least(sidecar: &common::InProcess, events: f64) {
    let counted = || async {
        let (_, m) = sidecar.get("/metrics").await;
        common::metric(&m, "projectionist_sidecar_reactor_delivered_total").unwrap_or(0.0)
    };
    assert!(
        common::wait_until(Duration::from_secs(10), || async {
            counted().await >= events
        })
        .await,
        "the sidecar counted {} deliveries, not {events}",
        counted().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_refuses_every_pull_is_retried_with_back_off_and_reported() {
    use futures::StreamExt;
    let Provisioned {
        nats,
        js,
        endpoint: _endpoint,
        store,
        reactor,
    } = provisioned().await;
    // The consumer is changed behind the sidecar's back: it now refuses the sidecar's pull requests.
    let stream = js.get_stream(store.stream_name()).await.expect("stream");
    let mut config = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&reactor.consumer_name())
        .await
        .expect("consumer")
        .cached_info()
        .config
        .clone();
    let max_batch = config.max_batch;
    config.max_batch = 10;
    stream
        .update_consumer(config.clone())
        .await
        .expect("updated");
    let client = async_nats::connect(nats.url()).await.expect("client");
    let mut pulls = client
        .subscribe(format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            store.stream_name(),
            reactor.consumer_name()
        ))
        .await
        .expect("subscribe");

    let sidecar = reactor_support::start_sidecar(&nats, &store, &reactor).await;
    let mut seen = 0;
    let window = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(window);
    loop {
        tokio::select! {
            Some(_) = pulls.next() => seen += 1,
            () = &mut window => break,
        }
    }
    // At once, then after 0.1, 0.2, 0.4, 0.8 and 1.6 s: a handful, not a tight loop.
    assert!((2..=12).contains(&seen), "{seen} pull requests in 3 s");
    // The reason is on /readyz while it waits to pull again (a new subscription clears it until the pull fails).
    let reported = common::wait_until(Duration::from_secs(5), || async {
        let (status, body) = sidecar.get("/readyz").await;
        status == 503 && body.contains("MaxRequestBatch")
    })
    .await;
    assert!(reported, "{:?}", sidecar.get("/readyz").await);
    // The consumer repaired: the reactor pulls again and is ready, with no event to deliver.
    config.max_batch = max_batch;
    stream.update_consumer(config).await.expect("repaired");
    let ready = common::wait_until(Duration::from_secs(15), || async {
        sidecar.get("/readyz").await.0 == 200
    })
    .await;
    assert!(ready, "{:?}", sidecar.get("/readyz").await);
    sidecar.stop().await;
}
