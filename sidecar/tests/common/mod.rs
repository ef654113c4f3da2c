//! Shared fixtures of the sidecar's tests: a "ledger" projection whose handler is order-sensitive and not
//! idempotent (a running hash and an event count per account), so a lost, reordered or doubled event shows in the
//! read model; helpers to append events, fold them by hand, read the read model, and run the sidecar in process or
//! as a child process.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use projectionist_crds::common::NatsConnection;
use projectionist_crds::common::SecretKeyRef;
use projectionist_crds::event_store::EventStoreSpec;
use projectionist_crds::projection::{
    Batch, Database, Driver, ErrorPolicy, Handler, OnError, ProjectionSpec,
};
use projectionist_crds::sidecar_config::{SecretSource, SidecarConfig, resolve};
use projectionist_crds::{EventStore, Projection};
use projectionist_sidecar::runtime::{self, Launch};
use sqlx::Row;
use tokio::task::JoinHandle;

pub const MODULUS: i64 = 1_000_000_007;

/// The upsert that folds a `Tick` into the ledger, per driver.
pub fn tick_sql(driver: Driver) -> String {
    match driver {
        Driver::Mysql => "INSERT INTO ledger (account, hash, events) VALUES (:data.account, :data.n, 1) \
             ON DUPLICATE KEY UPDATE hash = (hash * 31 + VALUES(hash)) % 1000000007, events = events + 1"
            .into(),
        _ => "INSERT INTO ledger (account, hash, events) VALUES (:data.account, :data.n, 1) \
             ON CONFLICT (account) DO UPDATE SET hash = (ledger.hash * 31 + excluded.hash) % 1000000007, \
             events = ledger.events + 1"
            .into(),
    }
}

pub fn schema() -> Vec<String> {
    vec![
        "CREATE TABLE IF NOT EXISTS ledger (account VARCHAR(64) PRIMARY KEY, hash BIGINT NOT NULL, events BIGINT NOT NULL)"
            .into(),
        "CREATE TABLE IF NOT EXISTS notes (id VARCHAR(64) PRIMARY KEY, body TEXT NOT NULL CHECK (body <> 'forbidden'))"
            .into(),
    ]
}

/// The EventStore and Projection of the ledger fixture.
pub fn ledger(
    nats_url: &str,
    driver: Driver,
    policy: ErrorPolicy,
    ack_wait: &str,
) -> (EventStore, Projection) {
    let mut store = EventStore::new(
        "bank",
        EventStoreSpec {
            nats: NatsConnection {
                servers: vec![nats_url.to_string()],
                auth: None,
                tls: None,
            },
            stream: Default::default(),
            deletion_policy: Default::default(),
        },
    );
    store.metadata.namespace = Some("test".into());
    let mut projection = Projection::new(
        "ledger",
        ProjectionSpec {
            event_store: "bank".into(),
            events: None,
            start_at: None,
            database: Database {
                driver,
                url_secret: SecretKeyRef {
                    name: "ledger-db".into(),
                    key: "url".into(),
                },
                max_connections: 4,
            },
            schema: schema(),
            handlers: vec![
                Handler {
                    event: "Tick".into(),
                    sql: vec![tick_sql(driver)],
                },
                Handler {
                    event: "Noted".into(),
                    sql: vec!["INSERT INTO notes (id, body) VALUES (:data.id, :data.body)".into()],
                },
            ],
            batch: Batch {
                max_events: 200,
                max_wait: "20ms".into(),
            },
            ack_wait: ack_wait.into(),
            on_error: OnError {
                policy,
                max_attempts: 2,
                backoff: projectionist_crds::projection::Backoff {
                    initial: "10ms".into(),
                    max: "200ms".into(),
                },
                dead_letter_subject: None,
            },
            rebuild: None,
            pod_selector: None,
            workers: None,
        },
    );
    projection.metadata.namespace = Some("test".into());
    (store, projection)
}

pub fn config_of(store: &EventStore, projection: &Projection) -> SidecarConfig {
    resolve(store, projection).expect("resolves").config
}

/// Creates the stream and the consumer.
pub async fn provision(js: &jetstream::Context, store: &EventStore, projection: &Projection) {
    let manifests = projectionist_crds::manifest::Manifests {
        event_stores: vec![store.clone()],
        projections: vec![projection.clone()],
        ..Default::default()
    };
    projectionist_sidecar::provision::provision(js, &manifests)
        .await
        .expect("provisioned");
}

/// A `Tick` for an account.
#[derive(Debug, Clone)]
pub struct Tick {
    pub account: String,
    pub n: i64,
}

/// `count` ticks over `accounts` accounts, interleaved pseudo-randomly (deterministic per seed).
pub fn ticks(count: usize, accounts: usize, seed: u64) -> Vec<Tick> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Tick {
                account: format!("acct-{}", x % accounts as u64),
                n: (i as i64 % 997) + 1,
            }
        })
        .collect()
}

/// Publishes raw messages (subject suffix, headers, body), pipelining the acknowledgements.
pub async fn publish_raw(js: &jetstream::Context, messages: Vec<(String, HeaderMap, Vec<u8>)>) {
    for chunk in messages.chunks(500) {
        let mut acks = Vec::with_capacity(chunk.len());
        for (subject, headers, body) in chunk {
            acks.push(
                js.publish_with_headers(
                    format!("test.bank.{subject}"),
                    headers.clone(),
                    body.clone().into(),
                )
                .await
                .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("ack");
        }
    }
}

pub fn event_headers(id: &str, type_: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", id);
    h.insert("ce-type", type_);
    h.insert("ce-source", "/tests");
    h
}

/// Appends ticks with ids `tick-<offset + i>`.
pub async fn append_ticks(js: &jetstream::Context, ticks: &[Tick], offset: usize) {
    let messages = ticks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let id = format!("tick-{}", offset + i);
            let body = serde_json::json!({"account": t.account, "n": t.n})
                .to_string()
                .into_bytes();
            (
                format!("account.{}", t.account),
                event_headers(&id, "Tick"),
                body,
            )
        })
        .collect();
    publish_raw(js, messages).await;
}

/// The read model a correct projection of `ticks` must hold: account → (hash, events).
pub fn fold(ticks: &[Tick]) -> BTreeMap<String, (i64, i64)> {
    let mut out: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for t in ticks {
        out.entry(t.account.clone())
            .and_modify(|(h, e)| {
                *h = (*h * 31 + t.n) % MODULUS;
                *e += 1;
            })
            .or_insert((t.n, 1));
    }
    out
}

async fn any_pool(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("connect")
}

/// The ledger table as account → (hash, events).
pub async fn read_ledger(url: &str) -> BTreeMap<String, (i64, i64)> {
    let pool = any_pool(url).await;
    let rows = sqlx::query("SELECT account, hash, events FROM ledger")
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
    let out = rows
        .iter()
        .map(|r| {
            let account: String = r.try_get(0).expect("account");
            let hash: i64 = r.try_get(1).expect("hash");
            let events: i64 = r.try_get(2).expect("events");
            (account, (hash, events))
        })
        .collect();
    pool.close().await;
    out
}

/// The checkpoint of the ledger projection, if any.
pub async fn read_checkpoint(url: &str) -> Option<i64> {
    let pool = any_pool(url).await;
    let row = sqlx::query(
        "SELECT last_sequence FROM projectionist_checkpoints WHERE projection = 'test/ledger'",
    )
    .fetch_optional(&pool)
    .await
    .ok()
    .flatten();
    pool.close().await;
    row.map(|r| r.try_get::<i64, _>(0).expect("sequence"))
}

/// Runs a query and returns the rows as strings (`NULL` for nulls).
pub async fn query_strings(url: &str, sql: &str) -> Vec<Vec<String>> {
    let pool = any_pool(url).await;
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&pool)
        .await
        .expect("query");
    let out = rows
        .iter()
        .map(|r| {
            (0..sqlx::Row::len(r))
                .map(|i| {
                    r.try_get::<Option<String>, _>(i)
                        .map(|v| v.unwrap_or_else(|| "NULL".into()))
                        .or_else(|_| {
                            r.try_get::<Option<i64>, _>(i)
                                .map(|v| v.map(|v| v.to_string()).unwrap_or_else(|| "NULL".into()))
                        })
                        .unwrap_or_else(|_| "?".into())
                })
                .collect()
        })
        .collect();
    pool.close().await;
    out
}

/// Polls `check` until it is true, at most `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A sidecar runtime running in this process.
pub struct InProcess {
    pub admin: SocketAddr,
    /// The event-store API.
    pub api: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    pub async fn start(config: SidecarConfig, database_url: &str, nats_url: &str) -> Self {
        let launch = Launch {
            config,
            watch: None,
            database_url: Some(database_url.to_string()),
            nats_url: Some(nats_url.to_string()),
        };
        Self::run(runtime::Workload {
            projections: vec![launch],
            stores: Vec::new(),
            ..Default::default()
        })
        .await
    }

    /// Runs a whole workload, the admin server and the API on free loopback ports.
    pub async fn run(workload: runtime::Workload) -> Self {
        let bind = || async {
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind")
        };
        let (listener, api_listener) = (bind().await, bind().await);
        let admin = listener.local_addr().expect("addr");
        let api = api_listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(runtime::run(
            workload,
            runtime::Listeners {
                admin: listener,
                api: Some(api_listener),
            },
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(10),
            Duration::from_secs(5),
        ));
        Self {
            admin,
            api,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), h).await;
        }
    }
}

/// A request without a body to the sidecar's event-store API: the status and the JSON body (`Null` if none).
#[allow(dead_code)]
pub async fn api(sidecar: &InProcess, method: &str, path: &str) -> (u16, serde_json::Value) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let (code, body) = exchange(sidecar.api, &req, Duration::from_secs(15))
        .await
        .expect("connect");
    (
        code,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A minimal HTTP GET (the admin server speaks HTTP/1.1).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    exchange(addr, &req, Duration::from_secs(5))
        .await
        .unwrap_or((0, String::new()))
}

/// Sends one HTTP/1.1 request and reads the answer (`None` when the connection fails): its status and body.
async fn exchange(addr: SocketAddr, req: &str, wait: Duration) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// The value of a metric series (first line starting with `prefix`).
pub fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Writes `config` into `dir` and returns the env var the database URL must be given in.
pub fn write_config(dir: &Path, config: &SidecarConfig) -> String {
    std::fs::write(dir.join("ledger.yaml"), config.to_yaml().expect("yaml")).expect("write config");
    match &config.database.url {
        SecretSource::Env(name) => name.clone(),
        SecretSource::File(_) => panic!("database URL is an env var"),
    }
}

/// A sidecar child process, killed by PID when dropped (also when a test panics).
pub struct SidecarProcess(Child);

impl std::ops::Deref for SidecarProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for SidecarProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl SidecarProcess {
    /// Spawns `command` (quiet unless it fails) as a sidecar process.
    pub fn spawn(command: &mut Command) -> Self {
        Self(
            command
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn sidecar"),
        )
    }

    /// `run` on the configs in `config_dir`, both servers on ports of their own.
    pub fn run(config_dir: &Path) -> Self {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
                .arg("run")
                .arg("--config-dir")
                .arg(config_dir)
                .arg("--admin-addr")
                .arg("127.0.0.1:0")
                .env("PROJECTIONIST_API_ADDR", "127.0.0.1:0"),
        )
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn sigkill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the sidecar binary with `run`.
pub fn spawn_sidecar(
    config_dir: &Path,
    db_env: &str,
    db_url: &str,
    admin_port: u16,
) -> SidecarProcess {
    SidecarProcess(
        Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
            .arg("run")
            .arg("--config-dir")
            .arg(config_dir)
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin_port}"))
            .env("PROJECTIONIST_API_ADDR", "127.0.0.1:0")
            .env(db_env, db_url)
            .env(
                "RUST_LOG",
                std::env::var("SIDECAR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("PROJECTIONIST_RELOAD_INTERVAL", "500ms")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sidecar"),
    )
}

pub fn free_port() -> u16 {
    projectionist_tests::process::free_port().expect("port")
}
