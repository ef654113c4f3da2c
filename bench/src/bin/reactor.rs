//! `projectionist-bench-reactor`: a Reactor (release sidecar binary, `dev` mode) delivering to a trivial local HTTP
//! endpoint, against a load generator calling the same endpoint from this process, on one machine.
//!
//! 1. Deliveries per second at concurrency 1, 16 and 64: the same events over 10,000 aggregates, pre-appended; each
//!    concurrency gets a reactor (a consumer) of its own, timed from its first delivery to its last.
//! 2. The load generator: 64 connections calling the endpoint with the same CloudEvents request, as fast as it
//!    answers, just before and just after the reactor at concurrency 64: the mean of the two windows is the ceiling
//!    that reactor is measured against.
//! 3. Append→delivered latency at a steady 1,000 events/s (p50, p99), next to the endpoint's own latency (the load
//!    generator's calls at concurrency 1).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use projectionist_tests::nats::NatsServer;

/// Benchmarks reactor deliveries against a load generator on the same endpoint.
#[derive(Debug, Parser)]
struct Args {
    /// Events delivered in each throughput measurement (over 10,000 aggregates).
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Events in the steady-rate latency measurement (at 1,000/s).
    #[arg(long, default_value_t = 5_000)]
    steady: usize,
    /// How long the load generator runs.
    #[arg(long, default_value = "3s", value_parser = duration)]
    window: Duration,
    /// The reactor concurrencies measured, in order (the ratio is taken at the last).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<u32>,
    /// The sidecar binary.
    #[arg(long, default_value = "target/release/projectionist-sidecar")]
    sidecar: PathBuf,
}

fn duration(text: &str) -> Result<Duration, String> {
    projectionist_crds::duration::parse(text).map_err(|e| e.to_string())
}

const AGGREGATES: usize = 10_000;

/// What the endpoint saw: deliveries, first and last arrival, and append→delivered latencies of watched ids.
#[derive(Default)]
struct Seen {
    calls: AtomicU64,
    window: Mutex<Option<(Instant, Instant)>>,
    sent: Mutex<HashMap<String, Instant>>,
    latencies: Mutex<Vec<f64>>,
}

async fn endpoint(seen: Arc<Seen>) -> anyhow::Result<std::net::SocketAddr> {
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                let now = Instant::now();
                seen.calls.fetch_add(1, Ordering::Relaxed);
                {
                    let mut w = seen.window.lock().expect("lock");
                    let first = w.map_or(now, |(f, _)| f);
                    *w = Some((first, now));
                }
                if let Some(id) = headers.get("ce-id").and_then(|v| v.to_str().ok())
                    && let Some(sent) = seen.sent.lock().expect("lock").remove(id)
                {
                    seen.latencies
                        .lock()
                        .expect("lock")
                        .push((now - sent).as_secs_f64() * 1000.0);
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

fn headers(id: &str, aggregate: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", id);
    h.insert("ce-type", "UserCreated");
    h.insert("ce-source", "/bench");
    h.insert("ce-subject", format!("user.{aggregate}").as_str());
    h.insert("content-type", "application/json");
    h
}

const BODY: &[u8] = br#"{"userId":"u-1","email":"ada@example.com","name":"Ada Lovelace"}"#;

async fn append(
    js: &async_nats::jetstream::Context,
    id: &str,
    aggregate: usize,
) -> anyhow::Result<()> {
    let a = format!("u-{aggregate}");
    js.publish_with_headers(
        format!("bench.users.user.{a}"),
        headers(id, &a),
        Bytes::from_static(BODY),
    )
    .await?
    .await?;
    Ok(())
}

struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn files(
    dir: &std::path::Path,
    name: &str,
    url: &str,
    concurrency: u32,
    start: &str,
) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("eventstore.yaml"),
        "apiVersion: projectionist.dev/v1alpha1\nkind: EventStore\nmetadata: { name: users, namespace: bench }\n\
         spec:\n  nats: { servers: [nats://127.0.0.1:4222] }\n  stream: { subjects: [bench.users.>] }\n",
    )?;
    std::fs::write(
        dir.join("reactor.yaml"),
        format!(
            "apiVersion: projectionist.dev/v1alpha1\nkind: Reactor\nmetadata: {{ name: {name}, namespace: bench }}\n\
             spec:\n  eventStore: users\n  endpoint: {{ url: \"{url}\" }}\n  startAt: {{ policy: {start} }}\n\
             \x20 delivery: {{ concurrency: {concurrency} }}\n"
        ),
    )?;
    Ok(())
}

fn start_sidecar(args: &Args, nats: &NatsServer, dir: &std::path::Path) -> anyhow::Result<Sidecar> {
    Ok(Sidecar(
        Command::new(&args.sidecar)
            .args(["dev", "-f"])
            .arg(dir)
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--api-addr",
                "off",
                "--data-dir",
            ])
            .arg(dir.join("data"))
            .env("PROJECTIONIST_NATS_URL", nats.url())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with cargo build --release)",
                    args.sidecar.display()
                )
            })?,
    ))
}

/// Deliveries per second of a new reactor at `concurrency` over the `events` already in the store.
async fn deliveries(
    args: &Args,
    nats: &NatsServer,
    seen: &Arc<Seen>,
    url: &str,
    concurrency: u32,
) -> anyhow::Result<f64> {
    seen.calls.store(0, Ordering::Relaxed);
    *seen.window.lock().expect("lock") = None;
    let dir = tempfile::tempdir()?;
    files(
        dir.path(),
        &format!("c{concurrency}"),
        url,
        concurrency,
        "All",
    )?;
    let _sidecar = start_sidecar(args, nats, dir.path())?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen.calls.load(Ordering::Relaxed) < args.events as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the reactor did not deliver every event in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (first, last) = seen.window.lock().expect("lock").context("no delivery")?;
    Ok(args.events as f64 / (last - first).as_secs_f64())
}

async fn pool(
    addr: std::net::SocketAddr,
    size: usize,
) -> anyhow::Result<Vec<Arc<tokio::sync::Mutex<SendRequest<Full<Bytes>>>>>> {
    let mut out = Vec::new();
    for _ in 0..size {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        out.push(Arc::new(tokio::sync::Mutex::new(sender)));
    }
    Ok(out)
}

/// The load generator: calls per second with `workers` connections for `window`, and the calls' latencies (ms).
async fn load(
    addr: std::net::SocketAddr,
    workers: usize,
    window: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let senders = pool(addr, workers).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (w, sender) in senders.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while started.elapsed() < window {
                let mut request = hyper::Request::post("/events")
                    .header(hyper::header::HOST, addr.to_string())
                    .header("content-type", "application/json")
                    .header("idempotency-key", format!("load-{w}-{n}"));
                for (name, value) in [
                    ("ce-specversion", "1.0"),
                    ("ce-type", "UserCreated"),
                    ("ce-source", "/bench"),
                ] {
                    request = request.header(name, value);
                }
                let request = request
                    .header("ce-id", format!("load-{w}-{n}"))
                    .header("ce-subject", format!("user.u-{}", n as usize % AGGREGATES))
                    .body(Full::new(Bytes::from_static(BODY)))?;
                let t = Instant::now();
                let response = sender.lock().await.send_request(request).await?;
                anyhow::ensure!(response.status().is_success(), "{}", response.status());
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                n += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as f64 / started.elapsed().as_secs_f64(), all))
}

fn percentiles(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |p: f64| values[((values.len().max(1) - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.99))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await?;
    let seen = Arc::new(Seen::default());
    let addr = endpoint(seen.clone()).await?;
    let url = format!("http://{addr}/events");

    // The store and its events.
    let dir = tempfile::tempdir()?;
    files(dir.path(), "provision", &url, 1, "New")?;
    let manifests = projectionist_crds::manifest::Manifests::read(&[dir.path().to_path_buf()])?;
    projectionist_sidecar::provision::provision(&js, &manifests).await?;
    let mut acks = Vec::new();
    for i in 0..args.events {
        let a = format!("u-{}", i % AGGREGATES);
        acks.push(
            js.publish_with_headers(
                format!("bench.users.user.{a}"),
                headers(&format!("e-{i}"), &a),
                Bytes::from_static(BODY),
            )
            .await?,
        );
        if acks.len() >= 1000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }

    println!(
        "Reactor deliveries vs a load generator on the same endpoint; nats-server 2.15.1, {} cores, {} events over {AGGREGATES} aggregates.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        args.events
    );
    println!("| measurement | value |");
    println!("|---|---|");
    // The last concurrency is compared with the load generator, run just before and just after it: the machine's
    // pace drifts over a run, and the mean of the two windows is the ceiling of the same moment.
    let (mut at64, mut before) = (0.0, 0.0);
    for (i, &concurrency) in args.concurrency.iter().enumerate() {
        if i + 1 == args.concurrency.len() {
            before = load(addr, 64, args.window).await?.0;
        }
        let rate = deliveries(&args, &nats, &seen, &url, concurrency).await?;
        println!("| reactor deliveries/s, concurrency {concurrency} | {rate:.0} |");
        at64 = rate;
    }
    let (after, _) = load(addr, 64, args.window).await?;
    let generated = (before + after) / 2.0;
    println!(
        "| load generator calls/s, 64 connections (before / after the last reactor) | {generated:.0} ({before:.0} / {after:.0}) |"
    );
    println!(
        "| reactor at 64 / load generator at 64 | {:.2} |",
        at64 / generated
    );

    // Latency: a new reactor (from new events on) at concurrency 16, events appended at 1,000/s.
    let (_, own) = load(addr, 1, Duration::from_secs(1)).await?;
    let (own50, own99) = percentiles(own);
    let dir = tempfile::tempdir()?;
    files(dir.path(), "steady", &url, 16, "New")?;
    let _sidecar = start_sidecar(&args, &nats, dir.path())?;
    // Wait until the reactor is pulling: a probe event comes through.
    let probe_deadline = Instant::now() + Duration::from_secs(60);
    let before = seen.calls.load(Ordering::Relaxed);
    let mut probe = 0;
    while seen.calls.load(Ordering::Relaxed) == before {
        anyhow::ensure!(
            Instant::now() < probe_deadline,
            "the steady reactor did not start"
        );
        append(&js, &format!("probe-{probe}"), 0).await?;
        probe += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    seen.latencies.lock().expect("lock").clear();
    let started = tokio::time::Instant::now();
    for i in 0..args.steady {
        tokio::time::sleep_until(started + Duration::from_millis(i as u64)).await;
        let id = format!("s-{i}");
        seen.sent
            .lock()
            .expect("lock")
            .insert(id.clone(), Instant::now());
        let a = format!("u-{}", i % AGGREGATES);
        let _ack = js
            .publish_with_headers(
                format!("bench.users.user.{a}"),
                headers(&id, &a),
                Bytes::from_static(BODY),
            )
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.latencies.lock().expect("lock").len() < args.steady {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every steady event was delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (p50, p99) = percentiles(seen.latencies.lock().expect("lock").clone());
    println!("| endpoint's own latency p50 / p99 (ms) | {own50:.2} / {own99:.2} |");
    println!("| append→delivered at 1k events/s, p50 / p99 (ms) | {p50:.2} / {p99:.2} |");
    println!("| p99 above the endpoint's own | +{:.2} ms |", p99 - own99);
    Ok(())
}
