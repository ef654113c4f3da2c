//! `projectionist-bench-api`: the sidecar's event-store API (release binary, `dev` mode serving one EventStore)
//! against raw JetStream publishes with the same headers from this process, on one nats-server.
//!
//! 1. Throughput at concurrency 1 and 32: single events with an expected version (each worker appends to its own
//!    aggregate, so nothing conflicts), and batches of 10 (atomic batch publish in both contestants).
//! 2. Latency at a steady 1,000 appends/s (open loop: each append is sent on schedule, latency counted from its
//!    scheduled time): p50 and p99 of the API and of the raw publish.
//!
//! Reported as ratios to the raw publish of the same run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::process::free_port;
use serde_json::json;
use tokio::sync::Mutex;

/// Benchmarks the event-store API against raw JetStream publishes.
#[derive(Debug, Parser)]
struct Args {
    /// How long each throughput measurement runs.
    #[arg(long, default_value = "5s", value_parser = duration)]
    window: Duration,
    /// Appends in the steady-rate latency measurement (at 1,000/s).
    #[arg(long, default_value_t = 5000)]
    steady: usize,
    /// The sidecar binary.
    #[arg(long, default_value = "target/release/projectionist-sidecar")]
    sidecar: PathBuf,
}

fn duration(text: &str) -> Result<Duration, String> {
    projectionist_crds::duration::parse(text).map_err(|e| e.to_string())
}

const PREFIX: &str = "bench.orders";
const STORE_YAML: &str = "apiVersion: projectionist.dev/v1alpha1
kind: EventStore
metadata: { name: orders, namespace: bench }
spec:
  nats: { servers: [nats://127.0.0.1:4222] }
  stream: { subjects: [bench.orders.>] }
";

/// One contestant: appends `events` events to aggregate `id` on top of `version`; returns the new version.
#[derive(Clone)]
enum Contestant {
    Raw(async_nats::Client),
    Api(Arc<Vec<Mutex<SendRequest<Full<Bytes>>>>>, String),
}

fn headers(id: &str, aggregate: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", id);
    h.insert("ce-type", "OrderPlaced");
    h.insert("ce-source", "/bench");
    h.insert("ce-subject", format!("order.{aggregate}").as_str());
    h.insert("ce-time", "2026-12-01T00:00:00Z");
    h.insert("content-type", "application/json");
    h
}

static IDS: AtomicU64 = AtomicU64::new(0);

fn payload() -> Bytes {
    Bytes::from_static(
        br#"{"order":"o-1","amount":1250,"currency":"EUR","lines":[{"sku":"a","qty":2}]}"#,
    )
}

impl Contestant {
    async fn append(
        &self,
        slot: usize,
        aggregate: &str,
        version: u64,
        events: usize,
    ) -> anyhow::Result<u64> {
        match self {
            Contestant::Raw(client) => {
                let subject = format!("{PREFIX}.order.{aggregate}");
                let batch = format!("b{}", IDS.fetch_add(1, Ordering::Relaxed));
                let mut reply = None;
                for i in 0..events {
                    let id = format!("e{}", IDS.fetch_add(1, Ordering::Relaxed));
                    let mut h = headers(&id, aggregate);
                    if i == 0 {
                        h.insert(
                            "Nats-Expected-Last-Subject-Sequence",
                            version.to_string().as_str(),
                        );
                    }
                    if events > 1 {
                        h.insert("Nats-Batch-Id", batch.as_str());
                        h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
                    }
                    if i + 1 == events {
                        if events > 1 {
                            h.insert("Nats-Batch-Commit", "1");
                        }
                        reply = Some(
                            client
                                .request_with_headers(subject.clone(), h, payload())
                                .await?,
                        );
                    } else {
                        client
                            .publish_with_headers(subject.clone(), h, payload())
                            .await?;
                    }
                }
                let ack: serde_json::Value =
                    serde_json::from_slice(&reply.context("no ack")?.payload)?;
                ack["seq"]
                    .as_u64()
                    .with_context(|| format!("refused: {ack}"))
            }
            Contestant::Api(pool, host) => {
                let list: Vec<serde_json::Value> = (0..events)
                    .map(|_| {
                        json!({"id": format!("e{}", IDS.fetch_add(1, Ordering::Relaxed)), "type": "OrderPlaced",
                            "source": "/bench", "time": "2026-12-01T00:00:00Z",
                            "data": {"order":"o-1","amount":1250,"currency":"EUR","lines":[{"sku":"a","qty":2}]}})
                    })
                    .collect();
                let body = json!({"expectedVersion": version, "events": list}).to_string();
                let request = hyper::Request::post(format!(
                    "/v1/stores/orders/aggregates/order/{aggregate}/events"
                ))
                .header(hyper::header::HOST, host.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))?;
                let mut sender = pool[slot % pool.len()].lock().await;
                let response = sender.send_request(request).await?;
                let status = response.status();
                let bytes = response.into_body().collect().await?.to_bytes();
                anyhow::ensure!(
                    status.is_success(),
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
                let answer: serde_json::Value = serde_json::from_slice(&bytes)?;
                answer["version"].as_u64().context("no version")
            }
        }
    }
}

/// Events per second with `workers` concurrent appenders of `events`-event requests for `window`.
async fn throughput(
    c: &Contestant,
    tag: &str,
    workers: usize,
    events: usize,
    window: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let c = c.clone();
        let aggregate = format!("{tag}-{w}");
        tasks.push(tokio::spawn(async move {
            let mut version = 0;
            let mut appended = 0u64;
            while started.elapsed() < window {
                version = c.append(w, &aggregate, version, events).await?;
                appended += events as u64;
            }
            anyhow::Ok(appended)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// p50 and p99 latency (ms) of `count` single-event appends sent at 1,000/s, each to its own aggregate.
async fn steady(c: &Contestant, tag: &str, count: usize) -> anyhow::Result<(f64, f64)> {
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..count {
        let due = started + Duration::from_millis(i as u64);
        tokio::time::sleep_until(due).await;
        let c = c.clone();
        let aggregate = format!("{tag}-{i}");
        tasks.push(tokio::spawn(async move {
            c.append(i, &aggregate, 0, 1).await?;
            anyhow::Ok(due.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.push(t.await??);
    }
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Ok((at(0.5), at(0.99)))
}

async fn api_pool(
    addr: std::net::SocketAddr,
    size: usize,
) -> anyhow::Result<Arc<Vec<Mutex<SendRequest<Full<Bytes>>>>>> {
    let mut pool = Vec::new();
    for _ in 0..size {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        pool.push(Mutex::new(sender));
    }
    Ok(Arc::new(pool))
}

struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nats = NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("eventstore.yaml"), STORE_YAML)?;
    let api_port = free_port()?;
    let _sidecar = Sidecar(
        Command::new(&args.sidecar)
            .args(["dev", "-f"])
            .arg(dir.path())
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--api-addr",
                &format!("127.0.0.1:{api_port}"),
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .env("PROJECTIONIST_NATS_URL", nats.url())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", args.sidecar.display()))?,
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{api_port}").parse()?;
    let mut up = false;
    for _ in 0..200 {
        if let Ok(r) = projectionist_tests::http::request(
            addr,
            "GET",
            "/v1/stores/orders/aggregates/order/probe/events",
            None,
            Duration::from_secs(5),
        )
        .await
            && r.status == 200
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(up, "the sidecar's API did not come up");
    let raw = Contestant::Raw(nats.connect().await?);
    let api = Contestant::Api(api_pool(addr, 64).await?, addr.to_string());

    println!(
        "Event-store API vs raw JetStream publish; nats-server 2.15.1, {} cores, window {:?}.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        args.window
    );
    println!("| measurement | raw publish | API | API / raw |");
    println!("|---|---|---|---|");
    for (workers, events) in [(1, 1), (32, 1), (1, 10), (32, 10)] {
        let tag = format!("c{workers}b{events}");
        let r = throughput(&raw, &format!("raw-{tag}"), workers, events, args.window).await?;
        let a = throughput(&api, &format!("api-{tag}"), workers, events, args.window).await?;
        println!(
            "| events/s, concurrency {workers}, {} | {r:.0} | {a:.0} | {:.2} |",
            if events == 1 {
                "single events with expected version".to_string()
            } else {
                format!("batches of {events}")
            },
            a / r
        );
    }
    let (r50, r99) = steady(&raw, "raw-steady", args.steady).await?;
    let (a50, a99) = steady(&api, "api-steady", args.steady).await?;
    println!(
        "| p50 latency at 1k appends/s (ms) | {r50:.2} | {a50:.2} | +{:.2} ms |",
        a50 - r50
    );
    println!(
        "| p99 latency at 1k appends/s (ms) | {r99:.2} | {a99:.2} | +{:.2} ms |",
        a99 - r99
    );
    Ok(())
}
