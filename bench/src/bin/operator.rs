//! `projectionist-bench-operator`: the operator (release binary) reconciling many Projections from a cold start.
//!
//! 1. N EventStores and M Projections (spread evenly over the stores) are created on a real control plane
//!    (kube-apiserver, kube-controller-manager, etcd) before the operator starts; a real nats-server holds the streams.
//! 2. Time until every EventStore and Projection is `Ready`, counted from the operator's start.
//! 3. The operator's peak RSS (`VmHWM`), with the injection webhook serving (its caches hold every Projection and
//!    EventStore).
//! 4. Steady state: over a quiet window, the JetStream API calls by operation and the reconciles; anything beyond the
//!    status refresh (stream and consumer info) means the operator changes things when nothing changed. And the
//!    Kubernetes API requests the operator made in that window, from the API server's audit log: the chart is
//!    installed with the real `helm` and the operator runs as the chart's ServiceAccount, as in a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use kube::api::{Api, ListParams, PostParams};
use projectionist_crds::common::{NatsConnection, SecretKeyRef};
use projectionist_crds::event_store::{EventStoreSpec, StreamSpec};
use projectionist_crds::projection::{Database, Driver, EventSelection, Handler, ProjectionSpec};
use projectionist_crds::{EventStore, Projection};
use projectionist_tests::control_plane::ControlPlane;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::release::Release;

/// Benchmarks the operator's cold start and steady state.
#[derive(Debug, Parser)]
struct Args {
    /// EventStores.
    #[arg(long, default_value_t = 20)]
    stores: usize,
    /// Projections, spread evenly over the stores.
    #[arg(long, default_value_t = 1000)]
    projections: usize,
    /// Length of the steady-state window.
    #[arg(long, default_value = "40s", value_parser = duration)]
    steady: Duration,
    /// The operator's status refresh interval.
    #[arg(long, default_value = "15s", value_parser = duration)]
    status_interval: Duration,
    /// The operator binary.
    #[arg(long, default_value = "target/release/projectionist-operator")]
    operator: PathBuf,
}

fn duration(text: &str) -> Result<Duration, String> {
    projectionist_crds::duration::parse(text).map_err(|e| e.to_string())
}

const NAMESPACE: &str = "bench";

fn store(i: usize, nats: &str) -> EventStore {
    let mut store = EventStore::new(
        &format!("store-{i}"),
        EventStoreSpec {
            nats: NatsConnection {
                servers: vec![nats.to_string()],
                auth: None,
                tls: None,
            },
            stream: StreamSpec::default(),
            deletion_policy: Default::default(),
        },
    );
    store.metadata.namespace = Some(NAMESPACE.into());
    store
}

fn projection(j: usize, stores: usize) -> Projection {
    let store = j % stores;
    let mut p = Projection::new(
        &format!("proj-{j}"),
        ProjectionSpec {
            event_store: format!("store-{store}"),
            events: Some(EventSelection {
                subjects: vec![format!("{NAMESPACE}.store-{store}.p{j}.>")],
            }),
            start_at: None,
            database: Database {
                driver: Driver::Postgres,
                url_secret: SecretKeyRef {
                    name: "db".into(),
                    key: "url".into(),
                },
                max_connections: 4,
            },
            schema: vec!["CREATE TABLE IF NOT EXISTS t (id TEXT PRIMARY KEY, n BIGINT)".into()],
            handlers: vec![Handler {
                event: "Tick".into(),
                sql: vec![
                    "INSERT INTO t (id, n) VALUES (:data.id, 1) ON CONFLICT (id) DO UPDATE SET n = t.n + 1"
                        .into(),
                ],
            }],
            batch: Default::default(),
            ack_wait: "30s".into(),
            on_error: Default::default(),
            rebuild: None,
            pod_selector: None,
            workers: None,
        },
    );
    p.metadata.namespace = Some(NAMESPACE.into());
    p
}

fn ready<K>(
    conditions: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
    _: &K,
) -> bool {
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn metrics(port: u16) -> anyhow::Result<BTreeMap<String, f64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect())
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plane = tokio::task::spawn_blocking(|| -> anyhow::Result<ControlPlane> {
        let plane = ControlPlane::start()?;
        plane.create_namespace(NAMESPACE, &[])?;
        Ok(plane)
    })
    .await??;
    let plane: &'static ControlPlane = Box::leak(Box::new(plane));
    // The chart, with the real helm (CRDs included); the operator runs as its ServiceAccount.
    let dir = tempfile::tempdir()?;
    let release = {
        let work = dir.path().to_path_buf();
        let interval = format!(
            "operator.statusInterval={}",
            projectionist_crds::duration::format(args.status_interval)
        );
        tokio::task::spawn_blocking(move || {
            Release::install(plane, "projectionist-system", &work, &["--set", &interval])
        })
        .await??
    };
    let nats = NatsServer::start().await?;
    let client = plane.client().await?;
    let stores: Api<EventStore> = Api::namespaced(client.clone(), NAMESPACE);
    let projections: Api<Projection> = Api::namespaced(client.clone(), NAMESPACE);
    for i in 0..args.stores {
        stores
            .create(&PostParams::default(), &store(i, &nats.url()))
            .await?;
    }
    for j in 0..args.projections {
        projections
            .create(&PostParams::default(), &projection(j, args.stores))
            .await?;
    }
    let log = std::fs::File::create(dir.path().join("operator.log"))?;
    let started = Instant::now();
    let mut child = release
        .operator_command(&args.operator, "projectionist-bench")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with cargo build --release)",
                args.operator.display()
            )
        })?;
    let pid = child.id();

    let deadline = Instant::now() + Duration::from_secs(600);
    let (all_ready, ready_after) = loop {
        let s = stores.list(&ListParams::default()).await?;
        let p = projections.list(&ListParams::default()).await?;
        let stores_ready = s
            .items
            .iter()
            .filter(|x| ready(x.status.as_ref().map(|s| s.conditions.as_slice()), x))
            .count();
        let projections_ready = p
            .items
            .iter()
            .filter(|x| ready(x.status.as_ref().map(|s| s.conditions.as_slice()), x))
            .count();
        if stores_ready == args.stores && projections_ready == args.projections {
            break (true, started.elapsed());
        }
        if Instant::now() > deadline {
            eprintln!(
                "only {stores_ready} stores and {projections_ready} projections Ready after 600 s"
            );
            break (false, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Let the first refreshes settle, then measure a quiet window.
    tokio::time::sleep(args.status_interval).await;
    let before = metrics(release.admin_port).await?;
    let api_before: BTreeSet<String> = plane
        .audit_requests(&release.user())?
        .into_iter()
        .map(|r| r.id)
        .collect();
    tokio::time::sleep(args.steady).await;
    let after = metrics(release.admin_port).await?;
    let mut api_calls: BTreeMap<String, usize> = BTreeMap::new();
    for r in plane.audit_requests(&release.user())? {
        if !api_before.contains(&r.id) {
            *api_calls
                .entry(format!("{} {}", r.verb, r.resource))
                .or_default() += 1;
        }
    }
    let rss_kib = peak_rss_kib(pid).unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();

    let delta = |prefix: &str| -> BTreeMap<String, f64> {
        after
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, d)| *d > 0.0)
            .collect()
    };
    let calls = delta("projectionist_operator_nats_calls_total");
    let reconciles: f64 = delta("projectionist_operator_reconciles_total")
        .values()
        .sum();
    let total_calls: f64 = calls.values().sum();
    let changes: f64 = calls
        .iter()
        .filter(|(k, _)| !k.contains("_info"))
        .map(|(_, v)| v)
        .sum::<f64>()
        + 0.0;

    println!("| Measure | Result | Target |");
    println!("|---|---|---|");
    println!(
        "| {} EventStores + {} Projections all Ready from a cold start | {:.1} s{} | ≤ 30 s |",
        args.stores,
        args.projections,
        ready_after.as_secs_f64(),
        if all_ready { "" } else { " (not all Ready)" }
    );
    println!(
        "| Operator peak RSS | {:.1} MiB | ≤ 64 MiB |",
        rss_kib as f64 / 1024.0
    );
    println!(
        "| Steady state ({} s): reconciles / NATS calls / calls per reconcile | {reconciles:.0} / {total_calls:.0} / {:.2} | — |",
        args.steady.as_secs(),
        if reconciles > 0.0 {
            total_calls / reconciles
        } else {
            0.0
        }
    );
    println!("| Steady state: NATS calls other than stream/consumer info | {changes:.0} | 0 |");
    for (name, value) in &calls {
        println!("|   {name} | {value:.0} | |");
    }
    let api_total: usize = api_calls.values().sum();
    println!(
        "| Steady state: Kubernetes API requests (audit log, as the chart's ServiceAccount) | {api_total} | — |"
    );
    println!(
        "| Steady state: Kubernetes API writes other than status, Lease and Events | {} | 0 |",
        api_calls
            .iter()
            .filter(|(k, _)| {
                !k.starts_with("get ")
                    && !k.starts_with("list ")
                    && !k.starts_with("watch ")
                    && !k.ends_with("/status")
                    && !k.ends_with(" leases")
                    && !k.ends_with(" events")
            })
            .map(|(_, v)| v)
            .sum::<usize>()
    );
    for (name, value) in &api_calls {
        println!("|   {name} | {value} | |");
    }
    Ok(())
}
