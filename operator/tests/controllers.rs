//! The operator binary reconciling the examples against the real Kubernetes control plane and a real nats-server.

mod common;

use std::time::Duration;

use async_nats::jetstream::stream::{DiscardPolicy, StorageType};
use common::{
    Env, condition, config_map, consumer_info, event_reasons, eventually, projection_reason,
    store_ready, store_reason, stream_info, table,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use projectionist_crds::sidecar_config::SidecarConfig;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_become_a_stream_a_consumer_and_ready_resources() {
    let env = Env::start().await;
    let operator = env.operator("op-1").await;
    env.apply_examples().await;

    let store = store_ready(&env, &operator, "users").await;
    let projection = projection_reason(&env, &operator, "users-read-model", "ConsumerReady").await;

    // The stream matches the spec, with the event-store guardrails.
    let js = env.jetstream().await;
    let stream_name = store.stream_name();
    let info = js
        .get_stream(&stream_name)
        .await
        .expect("stream exists")
        .cached_info()
        .clone();
    assert_eq!(info.config.subjects, ["user-management.users.>"]);
    assert_eq!(info.config.storage, StorageType::File);
    assert_eq!(info.config.discard, DiscardPolicy::New);
    assert!(info.config.deny_delete && info.config.deny_purge);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(300));
    assert_eq!(info.config.max_messages_per_subject, 100_000);
    assert_eq!(
        info.config.description.as_deref(),
        Some("User lifecycle and role assignments")
    );

    // The consumer matches the spec.
    let consumer_name = projection.consumer_name();
    let consumer = js
        .get_stream(&stream_name)
        .await
        .expect("stream")
        .consumer_info(&consumer_name)
        .await
        .expect("consumer exists")
        .clone();
    assert_eq!(
        consumer.config.durable_name.as_deref(),
        Some(consumer_name.as_str())
    );
    let filters = if consumer.config.filter_subjects.is_empty() {
        vec![consumer.config.filter_subject.clone()]
    } else {
        consumer.config.filter_subjects.clone()
    };
    assert_eq!(filters, ["user-management.users.user.>"]);
    assert_eq!(
        consumer.config.ack_policy,
        async_nats::jetstream::consumer::AckPolicy::All
    );

    // The sidecar's config, owned by the Projection.
    let cm = config_map(&env, "users-read-model-sidecar-config")
        .await
        .expect("ConfigMap");
    let yaml = cm
        .data
        .as_ref()
        .and_then(|d| d.get("users-read-model.yaml"))
        .expect("config key");
    let config =
        SidecarConfig::from_yaml("users-read-model.yaml", yaml).expect("a valid SidecarConfig");
    assert_eq!(config.stream, stream_name);
    assert_eq!(config.consumer, consumer_name);
    let owner = &cm.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(owner.kind, "Projection");
    assert_eq!(owner.controller, Some(true));
    assert_eq!(config.store_subjects, ["user-management.users.>"]);

    // The store's config for the event-store API, owned by the EventStore.
    let store_cm = config_map(&env, "users-store-config")
        .await
        .expect("the store's ConfigMap");
    let store_yaml = store_cm
        .data
        .as_ref()
        .and_then(|d| d.get("users.store.yaml"))
        .expect("store config key");
    let store_config =
        projectionist_crds::store_config::StoreConfig::from_yaml("users.store.yaml", store_yaml)
            .expect("a valid StoreConfig");
    assert_eq!(store_config.stream, stream_name);
    assert_eq!(
        store_cm.metadata.owner_references.as_ref().expect("owner")[0].kind,
        "EventStore"
    );
    assert!(
        cm.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("projectionist.dev/secrets"))
    );

    // Events recorded for each change on NATS.
    let reasons = eventually(
        "events",
        Duration::from_secs(20),
        || async {
            let r = event_reasons(&env).await;
            (r.contains(&"StreamCreated".to_string()) && r.contains(&"ConsumerCreated".to_string()))
                .then_some(r)
        },
        || operator.log(),
    )
    .await;
    assert!(
        !reasons.iter().any(|r| r.contains("Immutable")),
        "{reasons:?}"
    );

    // Appended events show up as lag (no sidecar runs here), and in the printer columns.
    for i in 0..5 {
        js.publish(format!("user-management.users.user.u{i}"), "{}".into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    let projections = env.projections();
    let status = eventually(
        "lag 5",
        Duration::from_secs(30),
        || {
            let projections = projections.clone();
            async move {
                let p = projections.get("users-read-model").await.ok()?;
                let s = p.status?;
                (s.pending == Some(5)).then_some(s)
            }
        },
        || operator.log(),
    )
    .await;
    assert_eq!(
        condition(&status.conditions, "CaughtUp").map(|c| c.0),
        Some("False".into())
    );
    assert_eq!(
        status.consumer_name.as_deref(),
        Some(consumer_name.as_str())
    );

    let stores_table = eventually(
        "store messages",
        Duration::from_secs(30),
        || async {
            let t = table(&env, "eventstores").await;
            // Name, Stream, Ready, Partitions, Messages, …
            (t["rows"][0]["cells"][4] == 5).then_some(t)
        },
        || operator.log(),
    )
    .await;
    let cells = &stores_table["rows"][0]["cells"];
    assert_eq!(cells[1], stream_name.as_str());
    assert_eq!(cells[2], "True");
    let proj_table = table(&env, "projections").await;
    let cells = &proj_table["rows"][0]["cells"];
    // Name, Store, Ready, Partitions (none), Lag, Last-Seq, Age.
    assert_eq!(cells[1], "users");
    assert_eq!(cells[2], "True");
    assert_eq!(cells[3], serde_json::Value::Null);
    assert_eq!(cells[4], 5);
    assert_eq!(cells[5], 0);

    // A projection that keeps pending events without acknowledging is reported as stalled.
    let stalled = eventually(
        "Stalled",
        Duration::from_secs(30),
        || {
            let projections = projections.clone();
            async move {
                let p = projections.get("users-read-model").await.ok()?;
                let c = condition(&p.status?.conditions, "Stalled")?;
                (c.0 == "True").then_some(c)
            }
        },
        || operator.log(),
    )
    .await;
    assert_eq!(stalled.1, "NoProgress");

    // Metrics.
    assert!(
        operator
            .metric("projectionist_operator_reconciles_total{kind=\"Projection\"}")
            .await
            >= 1.0
    );
    assert!(
        operator
            .metric("projectionist_operator_nats_calls_total{operation=\"stream_create\"}")
            .await
            >= 1.0
    );
    assert_eq!(operator.metric("projectionist_operator_leader").await, 1.0);
    assert_eq!(operator.get("/readyz").await.map(|r| r.0), Some(200));
    assert_eq!(operator.get("/healthz").await.map(|r| r.0), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_mutable_changes_applied_and_immutable_ones_refused() {
    let env = Env::start().await;
    let operator = env.operator("op-1").await;
    env.apply_examples().await;
    let store = store_ready(&env, &operator, "users").await;
    let projection = projection_reason(&env, &operator, "users-read-model", "ConsumerReady").await;
    let js = env.jetstream().await;
    let stream_name = store.stream_name();
    let consumer_name = projection.consumer_name();

    // Stream deleted out of band: put back.
    js.delete_stream(&stream_name).await.expect("delete stream");
    eventually(
        "stream recreated",
        Duration::from_secs(30),
        || async { js.get_stream(&stream_name).await.ok().map(|_| ()) },
        || operator.log(),
    )
    .await;
    // Its consumer went with it: put back too.
    eventually(
        "consumer recreated",
        Duration::from_secs(30),
        || async {
            js.get_stream(&stream_name)
                .await
                .ok()?
                .consumer_info(&consumer_name)
                .await
                .ok()
                .map(|_| ())
        },
        || operator.log(),
    )
    .await;

    // Stream changed out of band (a mutable field): put back.
    let mut changed = js
        .get_stream(&stream_name)
        .await
        .expect("stream")
        .cached_info()
        .config
        .clone();
    changed.description = Some("changed by hand".into());
    changed.max_messages_per_subject = 7;
    js.update_stream(changed).await.expect("update stream");
    eventually(
        "stream repaired",
        Duration::from_secs(30),
        || async {
            let info = stream_info(&js, &stream_name).await?;
            (info.config.max_messages_per_subject == 100_000).then_some(())
        },
        || operator.log(),
    )
    .await;

    // Consumer changed out of band: put back.
    let stream = js.get_stream(&stream_name).await.expect("stream");
    let mut consumer_config = stream
        .consumer_info(&consumer_name)
        .await
        .expect("consumer")
        .config
        .clone();
    consumer_config.ack_wait = Duration::from_secs(99);
    js.update_consumer_on_stream(
        async_nats::jetstream::consumer::pull::Config {
            durable_name: consumer_config.durable_name.clone(),
            ack_wait: consumer_config.ack_wait,
            filter_subject: consumer_config.filter_subject.clone(),
            filter_subjects: consumer_config.filter_subjects.clone(),
            ack_policy: consumer_config.ack_policy,
            deliver_policy: consumer_config.deliver_policy,
            max_deliver: consumer_config.max_deliver,
            max_ack_pending: consumer_config.max_ack_pending,
            priority_policy: consumer_config.priority_policy,
            priority_groups: consumer_config.priority_groups.clone(),
            priority_timeout: consumer_config.priority_timeout,
            ..Default::default()
        },
        &stream_name,
    )
    .await
    .expect("update consumer");
    eventually(
        "consumer repaired",
        Duration::from_secs(30),
        || async {
            let info = consumer_info(&js, &stream_name, &consumer_name).await?;
            (info.config.ack_wait == Duration::from_secs(30)).then_some(())
        },
        || operator.log(),
    )
    .await;
    // The Events are recorded after the repair they report: wait for them rather than read them once.
    eventually(
        "the repairs' Events",
        Duration::from_secs(15),
        || async {
            let reasons = event_reasons(&env).await;
            ["StreamRecreated", "StreamRepaired", "ConsumerRepaired"]
                .iter()
                .all(|r| reasons.iter().any(|x| x == r))
                .then_some(())
        },
        || operator.log(),
    )
    .await;

    // The sidecar config's ConfigMap deleted: put back.
    let maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    maps.delete("users-read-model-sidecar-config", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(
        "ConfigMap recreated",
        Duration::from_secs(30),
        || async { config_map(&env, "users-read-model-sidecar-config").await },
        || operator.log(),
    )
    .await;

    // A mutable spec change is applied.
    env.stores()
        .patch(
            "users",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"stream": {"maxMsgsPerSubject": 5000}}})),
        )
        .await
        .expect("patch");
    eventually(
        "stream updated",
        Duration::from_secs(30),
        || async {
            let info = stream_info(&js, &stream_name).await?;
            (info.config.max_messages_per_subject == 5000).then_some(())
        },
        || operator.log(),
    )
    .await;
    env.projections()
        .patch(
            "users-read-model",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ackWait": "45s"}})),
        )
        .await
        .expect("patch");
    eventually(
        "consumer updated",
        Duration::from_secs(30),
        || async {
            let info = consumer_info(&js, &stream_name, &consumer_name).await?;
            (info.config.ack_wait == Duration::from_secs(45)).then_some(())
        },
        || operator.log(),
    )
    .await;

    // An immutable change (allowing deletes on a stream that denies them) is refused with a condition.
    env.stores()
        .patch(
            "users",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"stream": {"guardrails": {"allowMessageDelete": true}}}}),
            ),
        )
        .await
        .expect("patch");
    let refused = store_reason(&env, &operator, "users", "ImmutableFieldChanged").await;
    let (status, _, message) = condition(
        &refused.status.as_ref().expect("status").conditions,
        "Ready",
    )
    .expect("Ready");
    assert_eq!(status, "False");
    assert!(message.contains("deny_delete"), "{message}");
    assert!(message.contains("nothing was changed"), "{message}");
    let info = js
        .get_stream(&stream_name)
        .await
        .expect("stream")
        .cached_info()
        .clone();
    assert!(info.config.deny_delete, "nothing changed on NATS");

    // The same for a consumer: its start position cannot change.
    env.projections()
        .patch(
            "users-read-model",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"startAt": {"policy": "New"}}})),
        )
        .await
        .expect("patch");
    let refused =
        projection_reason(&env, &operator, "users-read-model", "ImmutableFieldChanged").await;
    let (_, _, message) = condition(
        &refused.status.as_ref().expect("status").conditions,
        "Ready",
    )
    .expect("Ready");
    assert!(message.contains("deliver_policy"), "{message}");
    let info = js
        .get_stream(&stream_name)
        .await
        .expect("stream")
        .consumer_info(&consumer_name)
        .await
        .expect("consumer")
        .clone();
    assert_eq!(
        info.config.deliver_policy,
        async_nats::jetstream::consumer::DeliverPolicy::All
    );
}

/// Waits until object `name` no longer exists.
async fn gone<K>(api: &Api<K>, name: &str, operator: &common::Operator)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(
        &format!("{name} gone"),
        Duration::from_secs(30),
        || async { api.get_opt(name).await.ok()?.is_none().then_some(()) },
        || operator.log(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_retains_or_deletes_the_stream_and_projections_take_only_their_consumer() {
    let env = Env::start().await;
    let operator = env.operator("op-1").await;
    env.apply_examples().await;
    let store = store_ready(&env, &operator, "users").await;
    let projection = projection_reason(&env, &operator, "users-read-model", "ConsumerReady").await;
    let js = env.jetstream().await;
    let stream_name = store.stream_name();
    let consumer_name = projection.consumer_name();

    // Deleting the Projection deletes its consumer and ConfigMap, and nothing else.
    env.projections()
        .delete("users-read-model", &DeleteParams::default())
        .await
        .expect("delete");
    gone(&env.projections(), "users-read-model", &operator).await;
    let stream = js
        .get_stream(&stream_name)
        .await
        .expect("stream still there");
    assert!(
        stream.consumer_info(&consumer_name).await.is_err(),
        "consumer deleted"
    );
    // The controller manager's garbage collector removes the owned ConfigMap (asynchronously).
    eventually(
        "the ConfigMap collected",
        Duration::from_secs(60),
        || async {
            config_map(&env, "users-read-model-sidecar-config")
                .await
                .is_none()
                .then_some(())
        },
        || operator.log(),
    )
    .await;

    // Retain (the default): the EventStore goes, the stream and its events stay.
    env.stores()
        .delete("users", &DeleteParams::default())
        .await
        .expect("delete");
    gone(&env.stores(), "users", &operator).await;
    assert!(
        js.get_stream(&stream_name).await.is_ok(),
        "Retain keeps the stream"
    );

    // Delete: the stream is deleted before the EventStore is released.
    let mut store = env.example_store();
    store.spec.deletion_policy = projectionist_crds::event_store::DeletionPolicy::Delete;
    env.stores()
        .create(&PostParams::default(), &store)
        .await
        .expect("create");
    let ready = store_ready(&env, &operator, "users").await;
    assert!(
        ready
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| !f.is_empty()),
        "a finalizer guards the stream"
    );
    env.stores()
        .delete("users", &DeleteParams::default())
        .await
        .expect("delete");
    gone(&env.stores(), "users", &operator).await;
    assert!(
        js.get_stream(&stream_name).await.is_err(),
        "Delete removes the stream"
    );
    assert!(
        event_reasons(&env)
            .await
            .contains(&"StreamDeleted".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_at_start_and_restarted_later_is_waited_out() {
    let mut env = Env::start().await;
    env.nats.stop();
    let operator = env.operator("op-1").await;
    env.apply_examples().await;
    let waiting = store_reason(&env, &operator, "users", "NatsUnavailable").await;
    let message = condition(
        &waiting.status.as_ref().expect("status").conditions,
        "Ready",
    )
    .expect("Ready")
    .2;
    assert!(message.contains(&env.nats.url()), "{message}");
    projection_reason(&env, &operator, "users-read-model", "EventStoreNotReady").await;

    env.nats.start_again().await.expect("nats back");
    store_ready(&env, &operator, "users").await;
    projection_reason(&env, &operator, "users-read-model", "ConsumerReady").await;

    // NATS goes away again: reported, no crash, and convergence when it is back.
    env.nats.stop();
    store_reason(&env, &operator, "users", "NatsUnavailable").await;
    env.nats.start_again().await.expect("nats back");
    store_ready(&env, &operator, "users").await;
    projection_reason(&env, &operator, "users-read-model", "ConsumerReady").await;
    let mut process = operator.process;
    assert!(process.is_running(), "the operator never exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resources_are_refused_or_reported_without_an_error_loop() {
    let env = Env::start().await;
    let operator = env.operator("op-1").await;

    // Refused by the API server's schema validation.
    let mut bad = serde_json::to_value(env.example_store()).expect("json");
    bad["spec"]["stream"]["replicas"] = json!(9);
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.namespace,
        &kube::api::ApiResource::erase::<projectionist_crds::event_store::EventStore>(&()),
    );
    let object: kube::api::DynamicObject = serde_json::from_value(bad).expect("object");
    match raw.create(&PostParams::default(), &object).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 422),
        other => panic!("expected 422, got {other:?}"),
    }

    // A Projection naming a missing EventStore gets a condition; creating the store makes it Ready.
    env.projections()
        .create(&PostParams::default(), &env.example_projection())
        .await
        .expect("create");
    let missing =
        projection_reason(&env, &operator, "users-read-model", "EventStoreNotFound").await;
    let message = condition(
        &missing.status.as_ref().expect("status").conditions,
        "Ready",
    )
    .expect("Ready")
    .2;
    assert!(message.contains("\"users\""), "{message}");
    env.stores()
        .create(&PostParams::default(), &env.example_store())
        .await
        .expect("create");
    projection_reason(&env, &operator, "users-read-model", "ConsumerReady").await;

    // A handler that does not parse: Ready=False with the statement and position.
    let mut broken = env.example_projection();
    broken.metadata.name = Some("broken".into());
    broken.spec.handlers[0].sql = vec!["INSERT INTO users (id) VALUES ($1)".into()];
    env.projections()
        .create(&PostParams::default(), &broken)
        .await
        .expect("create");
    let refused = projection_reason(&env, &operator, "broken", "InvalidHandler").await;
    let message = condition(
        &refused.status.as_ref().expect("status").conditions,
        "Ready",
    )
    .expect("Ready")
    .2;
    assert!(message.contains("UserCreated"), "{message}");
    assert!(message.contains("column"), "{message}");
    assert_eq!(
        operator
            .metric("projectionist_operator_reconcile_failures_total")
            .await,
        0.0,
        "a spec problem is a condition, not a failing reconcile"
    );
    let js = env.jetstream().await;
    let stream = js
        .get_stream(env.example_store().stream_name())
        .await
        .expect("stream");
    assert!(
        stream.consumer_info(&broken.consumer_name()).await.is_err(),
        "no consumer for a broken projection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_token_reaches_the_sidecar_config_and_status() {
    let env = Env::start().await;
    let operator = env.operator("op-1").await;
    let mut projection = env.example_projection();
    projection.spec.rebuild = Some(projectionist_crds::projection::Rebuild {
        token: "v1".into(),
        reset: vec!["DELETE FROM users".into()],
    });
    env.stores()
        .create(&PostParams::default(), &env.example_store())
        .await
        .expect("create");
    env.projections()
        .create(&PostParams::default(), &projection)
        .await
        .expect("create");
    let ready = projection_reason(&env, &operator, "users-read-model", "ConsumerReady").await;
    let status = ready.status.expect("status");
    assert_eq!(status.rebuild_token.as_deref(), Some("v1"));
    assert_eq!(
        condition(&status.conditions, "Rebuilding").map(|c| c.0),
        Some("False".into())
    );

    env.projections()
        .patch(
            "users-read-model",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rebuild": {"token": "v2"}}})),
        )
        .await
        .expect("patch");
    let projections = env.projections();
    let status = eventually(
        "Rebuilding",
        Duration::from_secs(30),
        || {
            let projections = projections.clone();
            async move {
                let s = projections.get("users-read-model").await.ok()?.status?;
                (condition(&s.conditions, "Rebuilding")?.0 == "True").then_some(s)
            }
        },
        || operator.log(),
    )
    .await;
    assert_eq!(status.rebuild_token.as_deref(), Some("v2"));
    let cm = config_map(&env, "users-read-model-sidecar-config")
        .await
        .expect("ConfigMap");
    let yaml = cm
        .data
        .as_ref()
        .and_then(|d| d.get("users-read-model.yaml"))
        .expect("config");
    let config = SidecarConfig::from_yaml("x.yaml", yaml).expect("config");
    assert_eq!(config.rebuild.map(|r| r.token), Some("v2".into()));

    // The sidecar records the finished rebuild on the consumer (as its rebuild test shows); the condition ends.
    let js = env.jetstream().await;
    let stream = js
        .get_stream(env.example_store().stream_name())
        .await
        .expect("stream");
    let mut consumer = stream
        .consumer_info(env.example_projection().consumer_name())
        .await
        .expect("consumer")
        .config
        .clone();
    consumer.metadata.insert(
        projectionist_crds::consumer::METADATA_REBUILT_TOKEN.into(),
        "v2".into(),
    );
    stream
        .update_consumer(consumer)
        .await
        .expect("update consumer");
    let done = eventually(
        "RebuildComplete",
        Duration::from_secs(30),
        || {
            let projections = projections.clone();
            async move {
                let s = projections.get("users-read-model").await.ok()?.status?;
                let c = condition(&s.conditions, "Rebuilding")?;
                (c.0 == "False").then_some(c)
            }
        },
        || operator.log(),
    )
    .await;
    assert_eq!(done.1, "RebuildComplete");
    assert!(
        !event_reasons(&env)
            .await
            .contains(&"ConsumerRepaired".to_string()),
        "the sidecar's key is left alone"
    );
}
