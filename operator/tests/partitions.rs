//! Partitioned EventStores and Projections through the operator, against the real control plane and nats-server:
//! the stream stores each aggregate under its partition, status and printer columns show the partitions, a change of
//! `partitions` is refused with a condition (nothing sent to NATS), and a Projection on such a store gets its
//! partitioning in the sidecar's config and no durable consumer. A Reactor on such a store gets one durable consumer
//! per partition (each reading its partition of the reactor's events, pinned to one sidecar), its spread in status,
//! and loses them all when deleted.

mod common;

use std::time::Duration;

use common::{
    Env, config_map, consumer_info, eventually, projection_reason, reactor_reason, store_ready,
    store_reason, stream_info, table,
};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use projectionist_crds::sidecar_config::SidecarConfig;
use serde_json::json;

fn columns(table: &serde_json::Value) -> Vec<String> {
    table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_store_and_its_projection_are_mapped_and_partitions_never_change() {
    let env = Env::start().await;
    let operator = env.operator("op-1").await;
    let mut store = env.example_store();
    store.spec.stream.partitions = Some(50);
    let mut projection = env.example_projection();
    projection.spec.workers = Some(2);
    env.stores()
        .create(&PostParams::default(), &store)
        .await
        .expect("create store");
    env.projections()
        .create(&PostParams::default(), &projection)
        .await
        .expect("create projection");

    let js = env.jetstream().await;
    let ready = store_ready(&env, &operator, "users").await;
    assert_eq!(ready.status.expect("status").partitions, Some(50));
    let info = stream_info(&js, &store.stream_name())
        .await
        .expect("stream");
    let prefix = store.subjects()[0].trim_end_matches(".>").to_string();
    assert_eq!(info.config.subjects, vec![format!("{prefix}.*.*")]);
    let transform = info.config.subject_transform.expect("transform");
    assert_eq!(
        transform.destination,
        format!("{prefix}.{{{{partition(50,1,2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}")
    );
    let t = table(&env, "eventstores").await;
    let cols = columns(&t);
    let at = cols.iter().position(|c| c == "Partitions").expect("column");
    assert_eq!(t["rows"][0]["cells"][at], 50);

    let name = projection.metadata.name.clone().expect("name");
    let ready = projection_reason(&env, &operator, &name, "Partitioned").await;
    let status = ready.status.expect("status");
    assert_eq!((status.partitions, status.workers), (Some(50), Some(2)));
    assert!(
        consumer_info(&js, &store.stream_name(), &projection.consumer_name())
            .await
            .is_none(),
        "no durable consumer for a partitioned projection"
    );
    let cm = config_map(&env, &format!("{name}-sidecar-config"))
        .await
        .expect("ConfigMap");
    let yaml = cm
        .data
        .as_ref()
        .and_then(|d| d.get(&format!("{name}.yaml")))
        .expect("config");
    let config = SidecarConfig::from_yaml("x.yaml", yaml).expect("config");
    let partitioning = config.partitioning.expect("partitioning");
    assert_eq!((partitioning.partitions, partitioning.workers), (50, 2));
    let t = table(&env, "projections").await;
    let at = columns(&t)
        .iter()
        .position(|c| c == "Partitions")
        .expect("column");
    assert_eq!(t["rows"][0]["cells"][at], 50);

    // The sidecars' reports give the spread and the largest lag (published here as two sidecars would).
    js.get_or_create_stream(projectionist_crds::partition::progress_stream())
        .await
        .expect("progress stream");
    let namespace = projection.metadata.namespace.clone().expect("namespace");
    for (member, partitions, lag) in [("pod-a", 25u32, 3u64), ("pod-b", 25, 7)] {
        let report = projectionist_crds::partition::Progress {
            partitions: (0..partitions).collect(),
            lag,
        };
        js.publish(
            projectionist_crds::partition::progress_subject(&namespace, &name, member),
            serde_json::to_vec(&report).expect("json").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }
    let projections = env.projections();
    let spread = eventually(
        "the spread in status",
        Duration::from_secs(30),
        || {
            let (projections, name) = (projections.clone(), name.clone());
            async move {
                let s = projections.get(&name).await.ok()?.status?;
                (s.spread.len() == 2).then_some(s)
            }
        },
        || operator.log(),
    )
    .await;
    assert_eq!(spread.spread.get("pod-b"), Some(&25));
    assert_eq!(spread.pending, Some(7), "the largest lag");

    // Changing the partitions would move aggregates between partitions: refused, the stream untouched.
    env.stores()
        .patch(
            "users",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"stream": {"partitions": 64}}})),
        )
        .await
        .expect("patch");
    let refused = store_reason(&env, &operator, "users", "ImmutableFieldChanged").await;
    let message = common::condition(&refused.status.expect("status").conditions, "Ready")
        .expect("Ready")
        .2;
    assert!(message.contains("subject_transform"), "{message}");
    let info = stream_info(&js, &store.stream_name())
        .await
        .expect("stream");
    assert!(
        info.config
            .subject_transform
            .expect("transform")
            .destination
            .contains("partition(50,")
    );
    let still = eventually(
        "status partitions still 50",
        Duration::from_secs(20),
        || {
            let stores = env.stores();
            async move {
                let s = stores.get("users").await.ok()?.status?;
                (s.partitions == Some(50)).then_some(s)
            }
        },
        || operator.log(),
    )
    .await;
    assert_eq!(still.partitions, Some(50));

    // workers on SQLite are refused with the reason.
    env.projections()
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"database": {"driver": "sqlite"}, "workers": 4}})),
        )
        .await
        .expect("patch");
    let invalid = projection_reason(&env, &operator, &name, "InvalidSpec").await;
    let message = common::condition(&invalid.status.expect("status").conditions, "Ready")
        .expect("Ready")
        .2;
    assert!(message.contains("workers"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reactor_on_a_partitioned_store_gets_a_consumer_per_partition() {
    let env = Env::start().await;
    let operator = env.operator("op-1").await;
    let mut store = env.example_store();
    store.spec.stream.partitions = Some(4);
    env.stores()
        .create(&PostParams::default(), &store)
        .await
        .expect("create store");
    let mut reactor: projectionist_crds::Reactor = serde_json::from_value(json!({
        "apiVersion": "projectionist.dev/v1alpha1", "kind": "Reactor",
        "metadata": {"name": "welcome", "namespace": env.namespace},
        "spec": {
            "eventStore": "users",
            "events": {"types": ["UserCreated"]},
            "endpoint": {"url": "http://127.0.0.1:8080/events"},
            "podSelector": {"matchLabels": {"app": "email"}},
        },
    }))
    .expect("reactor");
    reactor.metadata.namespace = Some(env.namespace.clone());
    env.reactors()
        .create(&PostParams::default(), &reactor)
        .await
        .expect("create reactor");
    store_ready(&env, &operator, "users").await;
    let ready = reactor_reason(&env, &operator, "welcome", "ConsumerReady").await;
    let status = ready.status.clone().expect("status");
    assert_eq!(status.partitions, Some(4));
    let message = common::condition(&status.conditions, "Ready")
        .expect("Ready")
        .2;
    assert!(message.contains("4 consumers"), "{message}");

    let js = env.jetstream().await;
    let base = ready.consumer_name();
    let prefix = store.subjects()[0].trim_end_matches(".>").to_string();
    assert!(
        consumer_info(&js, &store.stream_name(), &base)
            .await
            .is_none(),
        "no consumer over every partition"
    );
    for p in 0..4 {
        let name = projectionist_crds::reactor::partition_consumer(&base, p);
        let info = consumer_info(&js, &store.stream_name(), &name)
            .await
            .unwrap_or_else(|| panic!("consumer {name}"));
        let mut filters = info.config.filter_subjects.clone();
        if !info.config.filter_subject.is_empty() {
            filters.push(info.config.filter_subject.clone());
        }
        assert_eq!(filters, vec![format!("{prefix}.{p}.>")], "{name}");
        assert_eq!(
            info.config.priority_groups.len(),
            1,
            "{name} pins one sidecar"
        );
    }

    // The spread the sidecars report.
    js.get_or_create_stream(projectionist_crds::partition::progress_stream())
        .await
        .expect("progress stream");
    let namespace = env.namespace.clone();
    for (member, partitions) in [("pod-a", vec![0u32, 1]), ("pod-b", vec![2, 3])] {
        let report = projectionist_crds::partition::Progress { partitions, lag: 0 };
        js.publish(
            projectionist_crds::partition::progress_subject(
                &namespace,
                &ready.progress_name(),
                member,
            ),
            serde_json::to_vec(&report).expect("json").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }
    let reactors = env.reactors();
    let spread = eventually(
        "the spread in status",
        Duration::from_secs(30),
        || {
            let reactors = reactors.clone();
            async move {
                let s = reactors.get("welcome").await.ok()?.status?;
                (s.spread.len() == 2).then_some(s)
            }
        },
        || operator.log(),
    )
    .await;
    assert_eq!(spread.spread.get("pod-a"), Some(&2));

    // Deleting the Reactor deletes every partition's consumer.
    reactors
        .delete("welcome", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(
        "the partition consumers deleted",
        Duration::from_secs(60),
        || {
            let (js, stream, base) = (js.clone(), store.stream_name(), base.clone());
            async move {
                for p in 0..4 {
                    let name = projectionist_crds::reactor::partition_consumer(&base, p);
                    if consumer_info(&js, &stream, &name).await.is_some() {
                        return None;
                    }
                }
                Some(())
            }
        },
        || operator.log(),
    )
    .await;
}
