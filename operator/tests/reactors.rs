//! The Reactor controller against the real Kubernetes control plane and a real nats-server: a Reactor becomes a
//! consumer, a parking lot, a ConfigMap and a status; specs that cannot work get a condition that says why; deleting
//! it removes what it had on NATS.

mod common;

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use common::{Env, config_map, event_reasons, eventually, reactor_reason, store_ready, table};
use kube::api::{DeleteParams, PostParams};
use projectionist_crds::Reactor;
use projectionist_crds::reactor_config::ReactorConfig;
use serde_json::json;

fn reactor(env: &Env, name: &str, spec: serde_json::Value) -> Reactor {
    let mut r: Reactor = serde_json::from_value(json!({
        "apiVersion": "projectionist.dev/v1alpha1", "kind": "Reactor",
        "metadata": {"name": name, "namespace": env.namespace},
        "spec": spec,
    }))
    .expect("reactor");
    r.metadata.namespace = Some(env.namespace.clone());
    r
}

fn example(env: &Env) -> Reactor {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/reactors/welcome-email.yaml"
    ))
    .expect("example");
    let mut r: Reactor = serde_yaml::from_str(&text).expect("reactor");
    r.metadata.namespace = Some(env.namespace.clone());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reactor_becomes_a_consumer_a_parking_lot_a_config_map_and_a_status() {
    let env = Env::start().await;
    let operator = env.operator("op-1").await;
    env.apply_examples().await;
    let store = store_ready(&env, &operator, "users").await;
    let reactors = env.reactors();
    reactors
        .create(&PostParams::default(), &example(&env))
        .await
        .expect("create Reactor");
    let ready = reactor_reason(&env, &operator, "welcome-email", "ConsumerReady").await;
    let status = ready.status.clone().expect("status");
    let consumer_name = ready.consumer_name();
    assert_eq!(
        status.consumer_name.as_deref(),
        Some(consumer_name.as_str())
    );
    assert_eq!(status.pending, Some(0));
    assert_eq!(status.parked_aggregates, Some(0));
    assert_eq!(status.parked_events, Some(0));

    // The consumer: explicit acks, starting with new events, pinned to one sidecar.
    let js = env.jetstream().await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(store.stream_name())
        .await
        .expect("stream")
        .get_consumer(&consumer_name)
        .await
        .expect("consumer");
    let info = consumer.info().await.expect("info");
    assert_eq!(info.config.ack_policy, AckPolicy::Explicit);
    assert_eq!(info.config.deliver_policy, DeliverPolicy::New);
    assert_eq!(info.config.ack_wait, Duration::from_secs(30));
    // The parking lot.
    let parking = js
        .get_stream(ready.parking_stream())
        .await
        .expect("parking lot");
    assert_eq!(
        parking.cached_info().config.subjects,
        vec![format!("{}.>", ready.parking_prefix())]
    );
    // The sidecar's config, in a ConfigMap of its own.
    let map = config_map(&env, "welcome-email-reactor-config")
        .await
        .expect("ConfigMap");
    let yaml = map
        .data
        .as_ref()
        .and_then(|d| d.get("reactor-welcome-email.yaml"))
        .expect("config file");
    let config = ReactorConfig::from_yaml("map", yaml).expect("a ReactorConfig");
    assert_eq!(config.consumer, consumer_name);
    assert_eq!(config.types, vec!["UserCreated"]);
    assert_eq!(config.url, "http://127.0.0.1:8080/events");
    // The Events are recorded after what they report: wait for them rather than read them once.
    eventually(
        "the Reactor's Events",
        Duration::from_secs(15),
        || async {
            let reasons = event_reasons(&env).await;
            ["ConsumerCreated", "ParkingLotCreated"]
                .iter()
                .all(|r| reasons.iter().any(|x| x == r))
                .then_some(())
        },
        || operator.log(),
    )
    .await;
    // kubectl get react: STORE, READY, LAG, PARKED, AGE.
    let t = table(&env, "reactors").await;
    let columns: Vec<String> = t["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(columns, ["Name", "Store", "Ready", "Lag", "Parked", "Age"]);
    assert_eq!(t["rows"][0]["cells"][2], "True");

    // Deleting the Reactor deletes its consumer and its parking lot.
    reactors
        .delete("welcome-email", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(
        "the consumer and the parking lot deleted",
        Duration::from_secs(60),
        || {
            let (js, store, consumer_name, reactors) = (
                js.clone(),
                store.clone(),
                consumer_name.clone(),
                reactors.clone(),
            );
            let parking = ready.parking_stream();
            async move {
                let stream = js.get_stream(store.stream_name()).await.ok()?;
                let gone = stream.consumer_info(&consumer_name).await.is_err()
                    && js.get_stream(&parking).await.is_err()
                    && reactors.get_opt("welcome-email").await.ok()?.is_none();
                gone.then_some(())
            }
        },
        || operator.log(),
    )
    .await;
    assert!(js.get_stream(ready.parking_stream()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactors_that_cannot_work_get_a_condition_that_says_why() {
    let env = Env::start().await;
    let operator = env.operator("op-1").await;
    env.apply_examples().await;
    store_ready(&env, &operator, "users").await;
    let reactors = env.reactors();
    let create = |r: Reactor| {
        let reactors = reactors.clone();
        async move { reactors.create(&PostParams::default(), &r).await }
    };
    create(reactor(
        &env,
        "no-store",
        json!({"eventStore": "orders",
        "endpoint": {"url": "http://127.0.0.1:8080/e"}}),
    ))
    .await
    .expect("created");
    create(reactor(
        &env,
        "zero-timeout",
        json!({"eventStore": "users",
        "endpoint": {"url": "http://127.0.0.1:8080/e", "timeout": "0s"}}),
    ))
    .await
    .expect("created");
    create(reactor(
        &env,
        "outside",
        json!({"eventStore": "users",
        "endpoint": {"url": "http://127.0.0.1:8080/e"}, "events": {"subjects": ["elsewhere.>"]}}),
    ))
    .await
    .expect("created");
    let r = reactor_reason(&env, &operator, "no-store", "EventStoreNotFound").await;
    let message = &r.status.expect("status").conditions[0].message;
    assert!(message.contains("\"orders\""), "{message}");
    let r = reactor_reason(&env, &operator, "zero-timeout", "InvalidSpec").await;
    let message = &r.status.expect("status").conditions[0].message;
    assert!(message.contains("spec.endpoint.timeout"), "{message}");
    let r = reactor_reason(&env, &operator, "outside", "InvalidSpec").await;
    let message = &r.status.expect("status").conditions[0].message;
    assert!(message.contains("elsewhere.>"), "{message}");
    // What the schema can refuse, the API server refuses.
    let refused = create(reactor(
        &env,
        "ftp",
        json!({"eventStore": "users",
        "endpoint": {"url": "ftp://example.org/e"}}),
    ))
    .await
    .expect_err("refused");
    assert!(
        refused.to_string().contains("spec.endpoint.url"),
        "{refused}"
    );
    let refused = create(reactor(
        &env,
        "wide",
        json!({"eventStore": "users",
        "endpoint": {"url": "http://127.0.0.1/e"}, "delivery": {"concurrency": 0}}),
    ))
    .await
    .expect_err("refused");
    assert!(refused.to_string().contains("concurrency"), "{refused}");
}
