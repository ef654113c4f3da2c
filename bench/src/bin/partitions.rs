//! `projectionist-bench-partitions`: one partitioned projection on PostgreSQL with 1, 2 and 4 workers and with 1, 2
//! and 3 sidecar processes, against the unpartitioned sidecar on the same events, in one run on one machine.
//!
//! Every contestant projects the same events from a cold start into a fresh database (the release sidecar binary,
//! default batch settings, `ackWait: 3s` so that several sidecars spread the partitions within a second), the events
//! published before it starts; the rate counts the events applied from the moment every sidecar owns partitions to
//! the last one (the steady state, not the rebalancing of a cold start). Reported: events per second, the ratio
//! to the unpartitioned sidecar, and CPU seconds per 100k events of the sidecars, PostgreSQL and nats-server — the
//! per-event costs the scaling model in `bench/README.md` is built from. A run with more partitions at one worker
//! gives the per-partition overhead.

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream;
use clap::Parser;
use projectionist_bench::fixtures::{SCHEMA, UPSERT, event_store, headers};
use projectionist_bench::procs::{cpu_seconds, sidecar_binary, spawn_sidecar};
use projectionist_crds::common::SecretKeyRef;
use projectionist_crds::manifest::Manifests;
use projectionist_crds::projection::{Batch, Database, Driver, Handler, ProjectionSpec};
use projectionist_crds::sidecar_config::{SecretSource, resolve};
use projectionist_crds::{EventStore, Projection};
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use sqlx::{Connection, PgConnection, Row};

/// Benchmarks partitioned projections.
#[derive(Debug, Parser)]
struct Args {
    /// Events per run.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Distinct aggregates.
    #[arg(long, default_value_t = 10_000)]
    aggregates: usize,
    /// Partitions of the partitioned store.
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Partitions of the per-partition-overhead run.
    #[arg(long, default_value_t = 128)]
    many_partitions: u32,
    /// PostgreSQL without durability (`fsync`, `synchronous_commit`, `full_page_writes` off); by default durable.
    #[arg(long)]
    relaxed: bool,
}

fn store(name: &str, nats_url: &str, partitions: Option<u32>) -> EventStore {
    let mut store = event_store(name, nats_url);
    store.spec.stream.partitions = partitions;
    store
}

fn projection(store: &str, workers: Option<u32>) -> Projection {
    let mut p = Projection::new(
        "agg",
        ProjectionSpec {
            event_store: store.into(),
            events: None,
            start_at: None,
            database: Database {
                driver: Driver::Postgres,
                url_secret: SecretKeyRef {
                    name: "db".into(),
                    key: "url".into(),
                },
                max_connections: 4,
            },
            schema: vec![SCHEMA.into()],
            handlers: vec![Handler {
                event: "Tick".into(),
                sql: vec![UPSERT.into()],
            }],
            batch: Batch::default(),
            // A short lease (half of ackWait) so several sidecars spread the partitions within a second.
            ack_wait: "3s".into(),
            on_error: Default::default(),
            rebuild: None,
            pod_selector: None,
            workers,
        },
    );
    p.metadata.namespace = Some("bench".into());
    p
}

/// The same events into a store: `bench.<store>.account.<id>`.
async fn publish(js: &jetstream::Context, store: &str, args: &Args) -> anyhow::Result<()> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut acks = Vec::with_capacity(1000);
    for i in 0..args.events {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let account = format!("acct-{}", x % args.aggregates as u64);
        let body = serde_json::json!({"account": account, "n": i % 100}).to_string();
        acks.push(
            js.publish_with_headers(
                format!("bench.{store}.account.{account}"),
                headers(&format!("{store}-{i}"), "Tick"),
                body.into(),
            )
            .await?,
        );
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

/// One contestant's result.
struct Run {
    name: String,
    rate: f64,
    cpu: [f64; 3],
}

async fn applied(url: &str) -> i64 {
    let Ok(mut conn) = PgConnection::connect(url).await else {
        return 0;
    };
    let n = sqlx::query("SELECT COALESCE(SUM(events), 0)::BIGINT FROM agg")
        .fetch_one(&mut conn)
        .await
        .and_then(|r| r.try_get::<i64, _>(0))
        .unwrap_or(0);
    let _ = conn.close().await;
    n
}

/// Stops the sidecars of a run however it ends.
struct Sidecars(Vec<Child>);

impl Drop for Sidecars {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `processes` sidecars on a fresh store of `partitions` and a fresh database: once the partitions are spread
/// over every sidecar, the events are published and the run lasts until every one is applied.
#[allow(clippy::too_many_arguments)]
async fn run(
    name: &str,
    pg: &Postgres,
    nats: &NatsServer,
    store_name: &str,
    partitions: Option<u32>,
    workers: Option<u32>,
    processes: usize,
    args: &Args,
) -> anyhow::Result<Run> {
    let url = pg.fresh_database().await?;
    let js = nats.jetstream().await?;
    let store = store(store_name, &nats.url(), partitions);
    let projection = projection(store_name, workers);
    let manifests = Manifests {
        event_stores: vec![store.clone()],
        projections: vec![projection.clone()],
        ..Default::default()
    };
    projectionist_sidecar::provision::provision(&js, &manifests).await?;
    let config = resolve(&store, &projection)?.config;
    let SecretSource::Env(env) = &config.database.url else {
        bail!("database URL is not an env var")
    };
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("agg.yaml"), config.to_yaml()?)?;
    publish(&js, store_name, args).await?;
    let bin = sidecar_binary()?;
    let sidecars = Sidecars(
        (0..processes)
            .map(|_| spawn_sidecar(&bin, dir.path(), env, &url))
            .collect::<anyhow::Result<_>>()?,
    );
    let pids: Vec<u32> = sidecars.0.iter().map(Child::id).collect();
    // Measured from the moment the partitions are spread over every sidecar (a cold start of several sidecars
    // rebalances once first, within a round of a third of the lease): the steady state, not the rebalancing.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut from = None;
    let done = loop {
        if Instant::now() > deadline {
            bail!("{name}: not finished within 10 minutes");
        }
        let done = applied(&url).await;
        if from.is_none() && spread(&url).await >= processes {
            from = Some((Instant::now(), done, cpu_now(&pids)));
        }
        if done >= args.events as i64 {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Some((started, before_done, before)) = from else {
        bail!("{name}: finished before the partitions were spread; use more --events");
    };
    let took = started.elapsed().as_secs_f64();
    let after = cpu_now(&pids);
    drop(sidecars);
    let measured = (done - before_done) as f64;
    let per = args.events as f64 / measured.max(1.0);
    Ok(Run {
        name: name.into(),
        rate: measured / took,
        cpu: [
            (after[0] - before[0]) * per,
            (after[1] - before[1]) * per,
            (after[2] - before[2]) * per,
        ],
    })
}

/// How many sidecars own partitions (1 for an unpartitioned projection).
async fn spread(url: &str) -> usize {
    let Ok(mut conn) = PgConnection::connect(url).await else {
        return 0;
    };
    // An unpartitioned projection is ready once its checkpoint exists; a partitioned one once its partitions
    // have owners.
    let owners = sqlx::query(
        "SELECT (SELECT COUNT(*) FROM projectionist_checkpoints)::BIGINT, \
         (SELECT COUNT(DISTINCT owner) FROM projectionist_partitions WHERE owner <> '')::BIGINT",
    )
    .fetch_one(&mut conn)
    .await
    .and_then(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)))
    .unwrap_or((0, 0));
    let _ = conn.close().await;
    usize::try_from(owners.1.max(owners.0.min(1))).unwrap_or(0)
}

/// CPU seconds of `sidecars` (together), PostgreSQL and nats-server.
fn cpu_now(sidecars: &[u32]) -> [f64; 3] {
    [
        cpu_seconds(|pid, _| sidecars.contains(&pid)),
        cpu_seconds(|_, comm| comm == "postgres"),
        cpu_seconds(|_, comm| comm == "nats-server"),
    ]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pg = if args.relaxed {
        Postgres::start().await?
    } else {
        Postgres::start_durable().await?
    };
    let nats = NatsServer::start().await?;
    let p = Some(args.partitions);
    let many = Some(args.many_partitions);
    let mut runs = Vec::new();
    for (i, (name, partitions, workers, processes)) in [
        ("unpartitioned, 1 sidecar".to_string(), None, None, 1),
        (
            format!("{} partitions, 1 worker, 1 sidecar", args.partitions),
            p,
            Some(1),
            1,
        ),
        (
            format!("{} partitions, 2 workers, 1 sidecar", args.partitions),
            p,
            Some(2),
            1,
        ),
        (
            format!("{} partitions, 4 workers, 1 sidecar", args.partitions),
            p,
            Some(4),
            1,
        ),
        (
            format!("{} partitions, 1 worker, 2 sidecars", args.partitions),
            p,
            Some(1),
            2,
        ),
        (
            format!("{} partitions, 1 worker, 3 sidecars", args.partitions),
            p,
            Some(1),
            3,
        ),
        (
            format!("{} partitions, 1 worker, 1 sidecar", args.many_partitions),
            many,
            Some(1),
            1,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let store_name = format!("s{i}");
        runs.push(
            run(
                &name,
                &pg,
                &nats,
                &store_name,
                partitions,
                workers,
                processes,
                &args,
            )
            .await?,
        );
    }
    let base = runs[0].rate;
    println!(
        "PostgreSQL {}; {} events over {} aggregates\n",
        if args.relaxed {
            "relaxed (fsync off)"
        } else {
            "durable (defaults)"
        },
        args.events,
        args.aggregates
    );
    println!(
        "| run | events/s | × unpartitioned | CPU s per 100k: sidecars | PostgreSQL | nats-server |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &runs {
        let per = |s: f64| s * 100_000.0 / args.events as f64;
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.name,
            r.rate,
            r.rate / base,
            per(r.cpu[0]),
            per(r.cpu[1]),
            per(r.cpu[2])
        );
    }
    Ok(())
}
