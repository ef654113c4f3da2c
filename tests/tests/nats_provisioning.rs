//! The pure mappings against a real nats-server: what the examples ask for is what the server ends up with,
//! mutable changes apply in place, and the diff's idea of "immutable" agrees with the server's.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use projectionist_crds::diff::{Mutability, diff_consumer, diff_stream};
use projectionist_crds::event_store::{Guardrails, Storage};
use projectionist_crds::{
    EventStore, Projection, consumer::consumer_config, stream::stream_config,
};
use projectionist_tests::nats::NatsServer;
use projectionist_tests::repo;

fn example_for(server: &NatsServer) -> (EventStore, Projection) {
    let (mut store, projection) = repo::user_management_resources().expect("examples");
    store.spec.nats.servers = vec![server.url()];
    (store, projection)
}

async fn provision(js: &jetstream::Context, store: &EventStore) -> stream::Stream {
    js.create_stream(stream_config(store).expect("stream config"))
        .await
        .expect("stream created")
}

#[tokio::test]
async fn example_event_store_creates_a_stream_whose_config_equals_the_mapping() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = server.jetstream().await.expect("jetstream");
    let (store, _) = example_for(&server);
    let desired = stream_config(&store).expect("config");
    let mut stream = provision(&js, &store).await;
    let actual = stream.info().await.expect("info").config.clone();
    let diff = diff_stream(&desired, &actual);
    assert!(
        diff.is_empty(),
        "server config differs: {}",
        diff.describe()
    );
    assert_eq!(actual.name, "user-management_users");
    assert_eq!(actual.subjects, vec!["user-management.users.>".to_string()]);
    assert!(actual.deny_delete && actual.deny_purge);
    assert_eq!(actual.discard, stream::DiscardPolicy::New);
    assert_eq!(actual.storage, stream::StorageType::File);
}

#[tokio::test]
async fn the_ledger_drops_duplicate_appends_and_refuses_deletes_and_purges() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = server.jetstream().await.expect("jetstream");
    let (store, _) = example_for(&server);
    let stream = provision(&js, &store).await;

    let append = |id: &'static str| {
        let js = js.clone();
        async move {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            headers.insert("ce-id", id);
            headers.insert("ce-type", "UserCreated");
            js.publish_with_headers("user-management.users.user.u-1", headers, "{}".into())
                .await
                .expect("published")
                .await
                .expect("acked")
        }
    };
    let first = append("evt-1").await;
    let again = append("evt-1").await;
    assert!(
        !first.duplicate && again.duplicate,
        "a retried append is recognised"
    );
    assert_eq!(first.sequence, again.sequence);

    assert!(
        stream.delete_message(first.sequence).await.is_err(),
        "delete refused"
    );
    assert!(stream.purge().await.is_err(), "purge refused");
    let mut stream = stream;
    assert_eq!(stream.info().await.expect("info").state.messages, 1);
}

#[tokio::test]
async fn example_projection_creates_a_durable_consumer_whose_config_equals_the_mapping() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = server.jetstream().await.expect("jetstream");
    let (store, projection) = example_for(&server);
    let stream = provision(&js, &store).await;
    let desired = consumer_config(&projection, &store).expect("consumer config");
    let mut created: consumer::PullConsumer = stream
        .create_consumer(desired.clone())
        .await
        .expect("consumer");
    let info = created.info().await.expect("info").clone();
    let diff = diff_consumer(&desired, &info.config);
    assert!(
        diff.is_empty(),
        "server config differs: {}",
        diff.describe()
    );
    assert_eq!(info.name, "user-management_users-read-model");
    assert_eq!(info.config.ack_policy, consumer::AckPolicy::All);
    assert_eq!(
        info.config.priority_policy,
        consumer::PriorityPolicy::PinnedClient
    );
    assert_eq!(info.config.filter_subject, "user-management.users.user.>");
}

#[tokio::test]
async fn mutable_stream_and_consumer_changes_apply_in_place() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = server.jetstream().await.expect("jetstream");
    let (mut store, mut projection) = example_for(&server);
    let stream = provision(&js, &store).await;
    stream
        .create_consumer(consumer_config(&projection, &store).expect("config"))
        .await
        .expect("consumer");

    store.spec.stream.max_bytes = Some(512 * 1024 * 1024);
    store.spec.stream.duplicate_window = "10m".into();
    store.spec.stream.description = Some("Users, v2".into());
    let desired = stream_config(&store).expect("config");
    let before = js
        .get_stream(&desired.name)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .config
        .clone();
    let diff = diff_stream(&desired, &before);
    assert_eq!(diff.changes.len(), 3, "{}", diff.describe());
    assert!(!diff.has_immutable());
    js.update_stream(desired.clone()).await.expect("updated");
    let after = js
        .get_stream(&desired.name)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .config
        .clone();
    assert!(diff_stream(&desired, &after).is_empty());

    projection.spec.ack_wait = "45s".into();
    projection.spec.batch.max_events = 100;
    let desired = consumer_config(&projection, &store).expect("config");
    let stream = js.get_stream(&store.stream_name()).await.expect("stream");
    let name = projection.consumer_name();
    let before = stream
        .consumer_info(&name)
        .await
        .expect("info")
        .config
        .clone();
    let diff = diff_consumer(&desired, &before);
    assert!(
        !diff.is_empty() && !diff.has_immutable(),
        "{}",
        diff.describe()
    );
    stream
        .update_consumer(desired.clone())
        .await
        .expect("consumer updated");
    let after = stream
        .consumer_info(&name)
        .await
        .expect("info")
        .config
        .clone();
    assert!(
        diff_consumer(&desired, &after).is_empty(),
        "{}",
        diff_consumer(&desired, &after).describe()
    );
}

#[tokio::test]
async fn diff_flags_immutable_stream_changes_that_the_server_refuses() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = server.jetstream().await.expect("jetstream");
    let (store, _) = example_for(&server);
    let mut stream = provision(&js, &store).await;
    let actual = stream.info().await.expect("info").config.clone();

    let mut memory = store.clone();
    memory.spec.stream.storage = Storage::Memory;
    memory.spec.stream.guardrails = Some(Guardrails {
        allow_memory_storage: true,
        ..Guardrails::default()
    });
    let desired = stream_config(&memory).expect("config");
    let diff = diff_stream(&desired, &actual);
    let immutable: Vec<_> = diff.immutable().map(|c| c.field).collect();
    assert_eq!(immutable, vec!["storage"]);
    assert!(
        js.update_stream(desired).await.is_err(),
        "the server refuses it too"
    );

    let mut loosened = store.clone();
    loosened.spec.stream.guardrails = Some(Guardrails {
        allow_purge: true,
        ..Guardrails::default()
    });
    let desired = stream_config(&loosened).expect("config");
    let diff = diff_stream(&desired, &actual);
    assert_eq!(
        diff.immutable().map(|c| c.field).collect::<Vec<_>>(),
        vec!["deny_purge"]
    );
    assert!(
        js.update_stream(desired).await.is_err(),
        "deny_purge cannot be cleared on the server"
    );

    let mut raw = actual.clone();
    raw.retention = stream::RetentionPolicy::WorkQueue;
    assert!(diff_stream(&raw, &actual).has_immutable());
    assert!(
        js.update_stream(raw).await.is_err(),
        "retention to work queue cannot change on the server"
    );

    // Nothing changed on the server.
    let after = stream.info().await.expect("info").config.clone();
    assert!(diff_stream(&stream_config(&store).expect("config"), &after).is_empty());

    // What the diff calls in place, the server accepts.
    let mut raw = actual.clone();
    raw.max_consumers = 10;
    raw.max_messages = 1_000_000;
    let diff = diff_stream(&raw, &actual);
    assert_eq!(diff.changes.len(), 2);
    assert!(
        diff.changes
            .iter()
            .all(|c| c.mutability == Mutability::InPlace)
    );
    js.update_stream(raw)
        .await
        .expect("in-place change accepted");
}

#[tokio::test]
async fn diff_flags_immutable_consumer_changes_that_the_server_refuses() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = server.jetstream().await.expect("jetstream");
    let (store, projection) = example_for(&server);
    let stream = provision(&js, &store).await;
    let desired = consumer_config(&projection, &store).expect("config");
    stream
        .create_consumer(desired.clone())
        .await
        .expect("consumer");
    let name = projection.consumer_name();
    let actual = stream
        .consumer_info(&name)
        .await
        .expect("info")
        .config
        .clone();

    let mut moved = projection.clone();
    moved.spec.start_at = Some(projectionist_crds::projection::StartAt {
        policy: projectionist_crds::projection::StartPolicy::Sequence,
        sequence: Some(100),
        time: None,
    });
    let changed = consumer_config(&moved, &store).expect("config");
    let diff = diff_consumer(&changed, &actual);
    assert_eq!(
        diff.immutable().map(|c| c.field).collect::<Vec<_>>(),
        vec!["deliver_policy"]
    );
    assert!(
        stream.update_consumer(changed).await.is_err(),
        "the server refuses a new start position"
    );

    for (field, change) in [
        (
            "ack_policy",
            Box::new(|c: &mut consumer::pull::Config| c.ack_policy = consumer::AckPolicy::Explicit)
                as Box<dyn Fn(&mut consumer::pull::Config)>,
        ),
        (
            "max_waiting",
            Box::new(|c: &mut consumer::pull::Config| c.max_waiting = 16),
        ),
    ] {
        let mut changed = desired.clone();
        change(&mut changed);
        let diff = diff_consumer(&changed, &actual);
        assert_eq!(
            diff.immutable().map(|c| c.field).collect::<Vec<_>>(),
            vec![field]
        );
        assert!(
            stream.update_consumer(changed).await.is_err(),
            "the server refuses a change of {field}"
        );
    }

    // What the diff calls in place, the server accepts.
    let mut changed = desired.clone();
    changed.priority_timeout = Duration::from_secs(90);
    changed.max_deliver = 1000;
    changed.max_ack_pending = 50;
    changed.priority_policy = consumer::PriorityPolicy::Overflow;
    let diff = diff_consumer(&changed, &actual);
    assert_eq!(diff.changes.len(), 4);
    assert!(!diff.has_immutable());
    stream
        .update_consumer(changed)
        .await
        .expect("in-place change accepted");
}
