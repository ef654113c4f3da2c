//! `projectionist-bench`: the sidecar against the raw ceilings and a naive projector, in one run on one machine.
//!
//! 1. JetStream ceiling: a durable pull consumer draining the stream with one acknowledgement per 500 events.
//! 2. Postgres ceiling: the same events folded per batch of 500 and written as one multi-row upsert plus a
//!    checkpoint update per transaction.
//! 3. Naive projector: one transaction (upsert + checkpoint) and one awaited acknowledgement per event.
//! 4. The sidecar (release binary, default settings) projecting the same events from a cold start.
//! 5. Freshness: events appended at a steady rate; time from append to commit, observed with Postgres
//!    `LISTEN/NOTIFY` (a notification is delivered when its transaction commits).
//! 6. The sidecar's peak RSS (`VmHWM`) over the whole run.
//! 7. The sidecar on MariaDB and on SQLite with the same events ([`drivers`]).

mod drivers;

use projectionist_bench::fixtures::{SCHEMA, UPSERT, event_store, headers};
use projectionist_bench::procs::{cpu_split, peak_rss_kib, sidecar_binary, spawn_sidecar};

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer};
use clap::Parser;
use futures::StreamExt;
use projectionist_crds::common::SecretKeyRef;
use projectionist_crds::manifest::Manifests;
use projectionist_crds::projection::{Database, Driver, Handler, ProjectionSpec};
use projectionist_crds::sidecar_config::{SecretSource, resolve};
use projectionist_crds::{EventStore, Projection};
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use sqlx::{Connection, PgConnection, Row};

/// Benchmarks the sidecar against raw ceilings and a naive projector.
#[derive(Debug, Parser)]
struct Args {
    /// Events in the throughput runs.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Distinct aggregates (accounts) the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    aggregates: usize,
    /// Events the naive projector processes (it is slow; its rate is extrapolated from these).
    #[arg(long, default_value_t = 5_000)]
    naive_events: usize,
    /// Steady append rate of the freshness run, events per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Duration of the freshness run, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// PostgreSQL without durability (`fsync`, `synchronous_commit`, `full_page_writes` off) for every contestant;
    /// by default it runs with its durable defaults.
    #[arg(long)]
    relaxed: bool,
}

struct Event {
    account: String,
    n: i64,
}

fn events(count: usize, aggregates: usize) -> Vec<Event> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..count)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Event {
                account: format!("acct-{}", x % aggregates as u64),
                n: (i % 100) as i64,
            }
        })
        .collect()
}

async fn publish(
    js: &jetstream::Context,
    evs: &[Event],
    type_: &str,
    offset: usize,
) -> anyhow::Result<()> {
    for (c, chunk) in evs.chunks(1000).enumerate() {
        let mut acks = Vec::with_capacity(chunk.len());
        for (i, e) in chunk.iter().enumerate() {
            let id = format!("{type_}-{}", offset + c * 1000 + i);
            let body = serde_json::json!({"account": e.account, "n": e.n}).to_string();
            acks.push(
                js.publish_with_headers(
                    format!("bench.store.{}", e.account),
                    headers(&id, type_),
                    body.into(),
                )
                .await?,
            );
        }
        for a in acks {
            a.await?;
        }
    }
    Ok(())
}

fn resources(nats_url: &str) -> (EventStore, Projection) {
    let store = event_store("store", nats_url);
    let mut projection = Projection::new(
        "agg",
        ProjectionSpec {
            event_store: "store".into(),
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
            handlers: vec![
                Handler {
                    event: "Tick".into(),
                    sql: vec![UPSERT.into()],
                },
                Handler {
                    event: "Probe".into(),
                    sql: vec![
                        UPSERT.into(),
                        "SELECT pg_notify('bench_fresh', :event.id)".into(),
                    ],
                },
            ],
            batch: Default::default(),
            ack_wait: "30s".into(),
            on_error: Default::default(),
            rebuild: None,
            pod_selector: None,
            workers: None,
        },
    );
    projection.metadata.namespace = Some("bench".into());
    (store, projection)
}

/// A durable pull consumer acknowledged once per batch (`AckPolicy::All`).
async fn batch_acked_consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
) -> anyhow::Result<consumer::PullConsumer> {
    Ok(js
        .get_stream(stream)
        .await?
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.into()),
            ack_policy: consumer::AckPolicy::All,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?)
}

async fn jetstream_ceiling(js: &jetstream::Context, stream: &str, n: usize) -> anyhow::Result<f64> {
    let c = batch_acked_consumer(js, stream, "ceiling").await?;
    let started = Instant::now();
    let mut messages = c.stream().max_messages_per_batch(500).messages().await?;
    let mut count = 0;
    while count < n {
        let m = messages.next().await.context("stream ended")??;
        count += 1;
        if count % 500 == 0 || count == n {
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn checkpoint_table(conn: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::query(SCHEMA).execute(&mut *conn).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS cp (id INT PRIMARY KEY, seq BIGINT NOT NULL)")
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO cp VALUES (1, 0) ON CONFLICT DO NOTHING")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// One transaction: the folded batch as one multi-row upsert, and the checkpoint.
async fn write_folded(
    conn: &mut PgConnection,
    folded: HashMap<String, (i64, i64)>,
    seq: i64,
) -> anyhow::Result<()> {
    let (accounts, (counts, totals)): (Vec<String>, (Vec<i64>, Vec<i64>)) =
        folded.into_iter().unzip();
    let mut tx = conn.begin().await?;
    sqlx::query(
        "INSERT INTO agg (account, events, total) SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) \
         ON CONFLICT (account) DO UPDATE SET events = agg.events + excluded.events, total = agg.total + excluded.total",
    )
    .bind(accounts)
    .bind(counts)
    .bind(totals)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE cp SET seq = $1 WHERE id = 1")
        .bind(seq)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

async fn postgres_ceiling(url: &str, evs: &[Event]) -> anyhow::Result<f64> {
    let mut conn = PgConnection::connect(url).await?;
    checkpoint_table(&mut conn).await?;
    let started = Instant::now();
    let mut seq = 0i64;
    for batch in evs.chunks(500) {
        let mut folded: HashMap<&str, (i64, i64)> = HashMap::new();
        for e in batch {
            let entry = folded.entry(&e.account).or_default();
            entry.0 += 1;
            entry.1 += e.n;
        }
        let folded: HashMap<String, (i64, i64)> = folded
            .into_iter()
            .map(|(a, v)| (a.to_string(), v))
            .collect();
        seq += batch.len() as i64;
        write_folded(&mut conn, folded, seq).await?;
    }
    Ok(evs.len() as f64 / started.elapsed().as_secs_f64())
}

/// The best hand-written projector for this one workload: pull with one ack per batch, fold the batch in memory,
/// one multi-row upsert and a checkpoint update per transaction. Both servers busy at once, as for the sidecar.
async fn combined(
    js: &jetstream::Context,
    stream: &str,
    url: &str,
    n: usize,
) -> anyhow::Result<f64> {
    let mut conn = PgConnection::connect(url).await?;
    checkpoint_table(&mut conn).await?;
    let c = batch_acked_consumer(js, stream, "combined").await?;
    let started = Instant::now();
    let mut messages = c.stream().max_messages_per_batch(500).messages().await?;
    let mut done = 0;
    while done < n {
        let mut batch = Vec::with_capacity(500);
        while batch.len() < 500 && done + batch.len() < n {
            batch.push(messages.next().await.context("stream ended")??);
        }
        let mut folded: HashMap<String, (i64, i64)> = HashMap::new();
        for m in &batch {
            let data: serde_json::Value = serde_json::from_slice(&m.payload)?;
            let entry = folded
                .entry(data["account"].as_str().unwrap_or_default().to_string())
                .or_default();
            entry.0 += 1;
            entry.1 += data["n"].as_i64().unwrap_or_default();
        }
        let last = batch.last().context("empty batch")?;
        let seq = last
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence as i64;
        write_folded(&mut conn, folded, seq).await?;
        last.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        done += batch.len();
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn naive(js: &jetstream::Context, stream: &str, url: &str, n: usize) -> anyhow::Result<f64> {
    let mut conn = PgConnection::connect(url).await?;
    checkpoint_table(&mut conn).await?;
    let s = js.get_stream(stream).await?;
    let c: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("naive".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut messages = c.messages().await?;
    let started = Instant::now();
    for _ in 0..n {
        let m = messages.next().await.context("stream ended")??;
        let seq = m
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence as i64;
        let data: serde_json::Value = serde_json::from_slice(&m.payload)?;
        let mut tx = conn.begin().await?;
        sqlx::query(
            "INSERT INTO agg (account, events, total) VALUES ($1, 1, $2) \
             ON CONFLICT (account) DO UPDATE SET events = agg.events + 1, total = agg.total + excluded.total",
        )
        .bind(data["account"].as_str().unwrap_or_default().to_string())
        .bind(data["n"].as_i64().unwrap_or_default())
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE cp SET seq = $1 WHERE id = 1")
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        m.double_ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn checkpoint(conn: &mut PgConnection) -> i64 {
    sqlx::query("SELECT last_sequence FROM projectionist_checkpoints")
        .fetch_optional(&mut *conn)
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<i64, _>(0))
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
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
    let js = nats.jetstream().await?;
    let (store, projection) = resources(&nats.url());
    let manifests = Manifests {
        event_stores: vec![store.clone()],
        projections: vec![projection.clone()],
        ..Default::default()
    };
    projectionist_sidecar::provision::provision(&js, &manifests).await?;
    let stream = store.stream_name();

    let evs = events(args.events, args.aggregates);
    eprintln!(
        "appending {} events over {} aggregates",
        evs.len(),
        args.aggregates
    );
    let t = Instant::now();
    publish(&js, &evs, "Tick", 0).await?;
    let append_rate = evs.len() as f64 / t.elapsed().as_secs_f64();

    eprintln!("JetStream ceiling");
    let js_ceiling = jetstream_ceiling(&js, &stream, evs.len()).await?;
    eprintln!("Postgres ceiling");
    let pg_ceiling = postgres_ceiling(&pg.fresh_database().await?, &evs).await?;
    eprintln!("hand-written batch projector");
    let combined_rate = combined(&js, &stream, &pg.fresh_database().await?, evs.len()).await?;
    eprintln!("naive projector ({} events)", args.naive_events);
    let naive_rate = naive(
        &js,
        &stream,
        &pg.fresh_database().await?,
        args.naive_events.min(evs.len()),
    )
    .await?;

    eprintln!("sidecar");
    let url = pg.fresh_database().await?;
    let config = resolve(&store, &projection)?.config;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("agg.yaml"), config.to_yaml()?)?;
    let SecretSource::Env(env) = &config.database.url else {
        bail!("database URL is not an env var")
    };
    let mut child = spawn_sidecar(&sidecar_binary()?, dir.path(), env, &url)?;
    let started = Instant::now();
    let cpu_before = cpu_split(child.id());
    let mut conn = PgConnection::connect(&url).await?;
    while checkpoint(&mut conn).await < evs.len() as i64 {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the sidecar did not finish within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sidecar_elapsed = started.elapsed().as_secs_f64();
    let sidecar_rate = evs.len() as f64 / sidecar_elapsed;
    let cpu_after = cpu_split(child.id());
    let cpu: Vec<f64> = cpu_after
        .iter()
        .zip(cpu_before)
        .map(|(a, b)| a - b)
        .collect();

    eprintln!("freshness at {} events/s for {}s", args.rate, args.seconds);
    let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
    listener.listen("bench_fresh").await?;
    let probes = events((args.rate * args.seconds) as usize, args.aggregates);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let js2 = js.clone();
    let rate = args.rate;
    let sender = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for (i, e) in probes.iter().enumerate() {
            tokio::time::sleep_until(start + Duration::from_micros(i as u64 * 1_000_000 / rate))
                .await;
            let id = format!("Probe-{i}");
            let body = serde_json::json!({"account": e.account, "n": e.n}).to_string();
            let sent = Instant::now();
            let ack = js2
                .publish_with_headers(
                    format!("bench.store.{}", e.account),
                    headers(&id, "Probe"),
                    body.into(),
                )
                .await;
            if ack.is_ok() {
                let _ = tx.send((id, sent));
            }
        }
        probes.len()
    });
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let expected = (args.rate * args.seconds) as usize;
    let deadline = Instant::now() + Duration::from_secs(args.seconds + 30);
    while latencies.len() < expected && Instant::now() < deadline {
        tokio::select! {
            Some((id, at)) = rx.recv() => { sent_at.insert(id, at); }
            n = listener.recv() => {
                let n = n?;
                let now = Instant::now();
                // The notification can overtake the sender's bookkeeping by a hair; wait for it.
                let id = n.payload().to_string();
                let at = loop {
                    if let Some(at) = sent_at.remove(&id) { break Some(at); }
                    match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                        Ok(Some((i, a))) => { sent_at.insert(i, a); }
                        _ => break None,
                    }
                };
                if let Some(at) = at {
                    latencies.push(now.duration_since(at).as_secs_f64() * 1000.0);
                }
            }
        }
    }
    sender.await?;
    latencies.sort_by(|a, b| a.total_cmp(b));
    let rss_kib = peak_rss_kib(child.id()).unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();

    let mut others = Vec::new();
    for driver in [Driver::Mysql, Driver::Sqlite] {
        eprintln!("sidecar on {}", driver.as_str());
        others.push(drivers::run(&js, &store, &projection, driver, !args.relaxed).await?);
    }

    let min_ceiling = js_ceiling.min(pg_ceiling);
    println!(
        "## PostgreSQL {}\n",
        if args.relaxed {
            "without durability (fsync, synchronous_commit, full_page_writes off)"
        } else {
            "with its durable defaults (fsync, synchronous_commit, full_page_writes on)"
        }
    );
    println!(
        "Events: {} over {} aggregates into PostgreSQL 15; {} cores.\n",
        evs.len(),
        args.aggregates,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("| measurement | value |");
    println!("|---|---|");
    println!("| append rate (pipelined publish, for reference) | {append_rate:.0} events/s |");
    println!("| JetStream ceiling (pull, one ack per 500) | {js_ceiling:.0} events/s |");
    println!(
        "| Postgres ceiling (multi-row upsert + checkpoint per 500) | {pg_ceiling:.0} events/s |"
    );
    println!(
        "| hand-written batch projector for this workload (fold + one upsert + one ack per 500) | {combined_rate:.0} events/s |"
    );
    println!("| naive projector (transaction + ack per event) | {naive_rate:.0} events/s |");
    println!("| **sidecar** (cold start to last commit) | **{sidecar_rate:.0} events/s** |");
    println!(
        "| CPU during the sidecar run ({sidecar_elapsed:.1} s wall) | sidecar {:.1} s, postgres {:.1} s, nats-server {:.1} s |",
        cpu[0], cpu[1], cpu[2]
    );
    println!(
        "| sidecar / min(ceilings) | {:.2} |",
        sidecar_rate / min_ceiling
    );
    println!(
        "| sidecar / hand-written batch projector | {:.2} (target ≥ 0.8) |",
        sidecar_rate / combined_rate
    );
    println!(
        "| sidecar / naive | {:.1}× (target ≥ 100×) |",
        sidecar_rate / naive_rate
    );
    println!(
        "| freshness p50 at {} events/s | {:.2} ms |",
        args.rate,
        percentile(&latencies, 0.5)
    );
    println!(
        "| freshness p99 at {} events/s | {:.2} ms (target ≤ 20 ms) |",
        args.rate,
        percentile(&latencies, 0.99)
    );
    println!("| freshness samples | {} of {expected} |", latencies.len());
    println!(
        "| sidecar peak RSS | {:.1} MiB (target ≤ 32 MiB) |",
        rss_kib as f64 / 1024.0
    );
    for other in &others {
        println!(
            "| sidecar on {}, {} events (cold start to last commit) | {:.0} events/s ({:.2} × the sidecar on PostgreSQL) |",
            other.label,
            other.events,
            other.rate,
            other.rate / sidecar_rate
        );
    }
    Ok(())
}
