//! A partitioned EventStore at three replicas on a three-node nats-server cluster: the stream leader's node is killed
//! and started again while events are appended and projected. Nothing is lost (an append that failed is retried with
//! the same event id, which the store de-duplicates), nothing is applied twice (the ledger is order-sensitive and not
//! idempotent), and the projection resumes by itself.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_sidecar::store::{Aggregate, Expected, NewEvent, Store};
use projectionist_tests::nats_cluster::NatsCluster;
use projectionist_tests::sqlite::Sqlite;

fn tick_event(i: usize, t: &Tick) -> (Aggregate, NewEvent) {
    (
        Aggregate {
            type_: "account".into(),
            id: t.account.clone(),
        },
        NewEvent {
            id: format!("tick-{i}"),
            type_: "Tick".into(),
            source: "/tests".into(),
            time: "2026-01-01T00:00:00Z".into(),
            datacontenttype: "application/json".into(),
            extensions: BTreeMap::new(),
            data: serde_json::json!({"account": t.account, "n": t.n})
                .to_string()
                .into(),
        },
    )
}

/// Appends every tick, retrying one that failed (the server may have stored it: the retry is de-duplicated).
async fn append_all(store: &Store, ticks: &[Tick], offset: usize) {
    for (i, t) in ticks.iter().enumerate() {
        let (aggregate, event) = tick_event(offset + i, t);
        let mut attempts = 0;
        loop {
            match store
                .append(&aggregate, Expected::Any, std::slice::from_ref(&event))
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    attempts += 1;
                    assert!(attempts < 300, "append {} never succeeded: {e}", offset + i);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn leader(js: &async_nats::jetstream::Context, stream: &str) -> Option<String> {
    let mut s = js.get_stream(stream).await.ok()?;
    s.info().await.ok()?.cluster.as_ref()?.leader.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_leaders_node_killed_and_restarted_loses_and_doubles_nothing() {
    let mut cluster = NatsCluster::start(3).await.expect("cluster");
    let client = cluster.connect().await.expect("client");
    let js = async_nats::jetstream::new(client.clone());
    let (mut store, projection) = ledger(&cluster.urls(), Driver::Sqlite, ErrorPolicy::Halt, "4s");
    store.spec.stream.partitions = Some(8);
    store.spec.stream.replicas = 3;
    store.spec.nats.servers = cluster.urls().split(',').map(str::to_string).collect();
    provision(&js, &store, &projection).await;
    let files = Sqlite::new().expect("sqlite");
    let url = files.fresh_database();
    let sidecar = InProcess::start(config_of(&store, &projection), &url, &cluster.urls()).await;
    let api =
        Store::new("bank", &store.stream_name(), "test.bank", client).with_partitions(Some(8));

    let all = ticks(2000, 300, 31);
    append_all(&api, &all[..1000], 0).await;
    let stream = store.stream_name();
    let leader_name = leader(&js, &stream).await.expect("a leader");
    let victim = cluster.index_of(&leader_name).expect("leader node");
    // The leader's node dies while appends go on; it comes back a little later.
    let appending = {
        let (api, rest) = (api.clone(), all[1000..].to_vec());
        tokio::spawn(async move { append_all(&api, &rest, 1000).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.kill(victim);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start_again(victim).await.expect("restart");
    appending.await.expect("appends");
    let new_leader = leader(&js, &stream).await;
    assert!(new_leader.is_some(), "the stream has a leader again");

    assert!(
        wait_until(Duration::from_secs(90), || async {
            read_ledger(&url)
                .await
                .values()
                .map(|(_, e)| e)
                .sum::<i64>()
                == all.len() as i64
        })
        .await,
        "the projection resumed and caught up: {} of {}",
        read_ledger(&url)
            .await
            .values()
            .map(|(_, e)| e)
            .sum::<i64>(),
        all.len()
    );
    assert_eq!(read_ledger(&url).await, fold(&all));
    let mut info = js.get_stream(&stream).await.expect("stream");
    assert_eq!(
        info.info().await.expect("info").state.messages,
        all.len() as u64,
        "every append stored exactly once"
    );
    sidecar.stop().await;
}
