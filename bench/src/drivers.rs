//! The sidecar on MariaDB and SQLite with the same events: a projection of its own (its own consumer, from the
//! start of the stream) per driver, the same fold in each dialect, from a cold start to its checkpoint at the end of
//! the stream.

use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream;
use projectionist_crds::manifest::Manifests;
use projectionist_crds::projection::{Driver, Handler};
use projectionist_crds::sidecar_config::{SecretSource, resolve};
use projectionist_crds::{EventStore, Projection};
use projectionist_tests::mariadb::MariaDb;
use projectionist_tests::sqlite::Sqlite;

/// One driver's run.
pub struct DriverRun {
    /// `MariaDB …` or `SQLite …`.
    pub label: String,
    /// Events per second, cold start to the last commit.
    pub rate: f64,
    /// Events applied.
    pub events: u64,
}

fn projection_for(base: &Projection, driver: Driver) -> Projection {
    let mut p = base.clone();
    let name = format!("agg-{}", driver.as_str());
    p.metadata.name = Some(name);
    p.spec.database.driver = driver;
    let (schema, upsert) = match driver {
        Driver::Mysql => (
            "CREATE TABLE IF NOT EXISTS agg (account VARCHAR(64) PRIMARY KEY, events BIGINT NOT NULL, \
             total BIGINT NOT NULL)",
            "INSERT INTO agg (account, events, total) VALUES (:data.account, 1, :data.n) \
             ON DUPLICATE KEY UPDATE events = events + 1, total = total + VALUES(total)",
        ),
        _ => (
            "CREATE TABLE IF NOT EXISTS agg (account TEXT PRIMARY KEY, events BIGINT NOT NULL, total BIGINT NOT NULL)",
            "INSERT INTO agg (account, events, total) VALUES (:data.account, 1, :data.n) \
             ON CONFLICT (account) DO UPDATE SET events = agg.events + 1, total = agg.total + excluded.total",
        ),
    };
    p.spec.schema = vec![schema.into()];
    p.spec.handlers = ["Tick", "Probe"]
        .into_iter()
        .map(|event| Handler {
            event: event.into(),
            sql: vec![upsert.into()],
        })
        .collect();
    p
}

async fn checkpoint(url: &str) -> i64 {
    use sqlx::Row;
    sqlx::any::install_default_drivers();
    let Ok(pool) = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
    else {
        return 0;
    };
    let value = sqlx::query("SELECT last_sequence FROM projectionist_checkpoints")
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten()
        .and_then(|r| r.try_get::<i64, _>(0).ok())
        .unwrap_or(0);
    pool.close().await;
    value
}

/// Runs the sidecar for `driver` over the whole stream of `store`.
pub async fn run(
    js: &jetstream::Context,
    store: &EventStore,
    base: &Projection,
    driver: Driver,
    durable: bool,
) -> anyhow::Result<DriverRun> {
    let (label, url, _keep_mariadb, _keep_sqlite) = match driver {
        Driver::Mysql => {
            let db = if durable {
                MariaDb::start_durable().await?
            } else {
                MariaDb::start().await?
            };
            let url = db.fresh_database().await?;
            let label = format!(
                "MariaDB (innodb_flush_log_at_trx_commit={})",
                if durable { 1 } else { 2 }
            );
            (label, url, Some(db), None)
        }
        Driver::Sqlite => {
            let dir = Sqlite::new()?;
            let url = dir.fresh_database();
            (
                "SQLite (one file, the sidecar's defaults)".to_string(),
                url,
                None,
                Some(dir),
            )
        }
        Driver::Postgres => bail!("PostgreSQL is the main run"),
    };
    let projection = projection_for(base, driver);
    let manifests = Manifests {
        event_stores: vec![store.clone()],
        projections: vec![projection.clone()],
        ..Default::default()
    };
    projectionist_sidecar::provision::provision(js, &manifests).await?;
    let total = js
        .get_stream(store.stream_name())
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    let config = resolve(store, &projection)?.config;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("agg.yaml"), config.to_yaml()?)?;
    let SecretSource::Env(env) = &config.database.url else {
        bail!("database URL is not an env var")
    };
    let mut child = crate::spawn_sidecar(&crate::sidecar_binary()?, dir.path(), env, &url)?;
    let started = Instant::now();
    while checkpoint(&url).await < total as i64 {
        if started.elapsed() > Duration::from_secs(900) {
            let _ = child.kill();
            bail!("the sidecar on {label} did not finish within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    Ok(DriverRun {
        label,
        rate,
        events: total,
    })
}
