//! Runs every configured projection concurrently and independently (one failing projection never stops another),
//! serves the admin endpoints, and shuts down gracefully: on the shutdown signal each projection finishes or rolls
//! back its batch in flight and acknowledges only what was committed; whatever has not finished within the grace
//! period is abandoned (its open transaction is rolled back by the database when the connection closes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use projectionist_crds::SidecarConfig;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::database::Database;
use crate::handler::Handlers;
use crate::pipeline::Pipeline;
use crate::projector::{Exit, Projector};
use crate::secrets;
use crate::status::{Metrics, ProjectionState};

/// One projection to run, with local overrides.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The resolved config.
    pub config: SidecarConfig,
    /// Database URL to use instead of the config's secret (the `dev` mode).
    pub database_url: Option<String>,
    /// The file the config came from: when its content changes (a ConfigMap update), the projection stops and
    /// starts again with the new config.
    pub file: Option<PathBuf>,
    /// NATS URL to use instead of the config's servers and credentials (the `dev` mode).
    pub nats_url: Option<String>,
}

/// Reads every `*.yaml`/`*.yml` SidecarConfig in `dir` (sorted by name), with the file it came from. Any bad file
/// fails the whole start, with the file and field named.
pub fn read_config_dir(dir: &Path) -> anyhow::Result<Vec<(PathBuf, SidecarConfig)>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading config directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        anyhow::bail!("{}: no SidecarConfig files (*.yaml)", dir.display());
    }
    files
        .into_iter()
        .map(|f| {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            let config = SidecarConfig::from_yaml(&f.display().to_string(), &text)?;
            Ok((f, config))
        })
        .collect()
}

/// Binds the admin server's address.
pub async fn bind_admin(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin address {addr}"))
}

async fn start_projection(
    launch: Launch,
    state: Arc<ProjectionState>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Projector> {
    let config = launch.config;
    let handlers = Handlers::new(&config.handlers, config.database.driver)?;
    let url = match launch.database_url {
        Some(url) => url,
        None => secrets::read(&config.database.url).context("database URL")?,
    };
    let db = Database::connect_lazy(
        &url,
        config.database.driver,
        config.database.max_connections,
    )
    .context("database URL")?;
    let nats = match &launch.nats_url {
        Some(url) => {
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(url.as_str())
                .await?
        }
        None => {
            secrets::nats_options(&config.nats)
                .await?
                .connect(config.nats.servers.join(","))
                .await?
        }
    };
    let pipeline = Pipeline::new(&url);
    Ok(
        Projector::new(config, handlers, db, nats, state, metrics, shutdown)
            .with_pipeline(pipeline),
    )
}

/// Runs `launches` until `shutdown` resolves, then waits up to `grace` for them to stop.
pub async fn run(
    launches: Vec<Launch>,
    admin_listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
    reload: Duration,
) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut states = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for launch in launches {
        let key = format!(
            "{}/{}",
            launch.config.projection.namespace, launch.config.projection.name
        );
        let state = ProjectionState::new(&key);
        states.push(state.clone());
        let (metrics, stop_rx) = (metrics.clone(), stop_rx.clone());
        tasks.spawn(supervise(key, launch, state, metrics, stop_rx, reload));
    }
    let admin_state = Arc::new(AdminState {
        projections: states,
        registry,
    });
    let mut admin_stop = stop_rx.clone();
    let admin = tokio::spawn(admin::serve(admin_listener, admin_state, async move {
        let _ = admin_stop.wait_for(|s| *s).await;
    }));

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let finished = tokio::time::timeout(grace, async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((key, exit)) => info!(projection = %key, exit = ?exit, "projection stopped"),
                Err(e) => error!(error = %e, "projection task failed"),
            }
        }
    })
    .await;
    if finished.is_err() {
        warn!(grace = ?grace, "grace period over; abandoning what is still running");
        tasks.abort_all();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), admin).await;
    Ok(())
}

/// Resolves with the new config once `file`'s content differs from `current` and parses; a content that does not
/// parse is logged and waited past (the running config stays).
async fn changed_config(file: &Path, current: &str, every: Duration) -> (String, SidecarConfig) {
    let mut reported = String::new();
    loop {
        tokio::time::sleep(every).await;
        let Ok(text) = tokio::fs::read_to_string(file).await else {
            continue;
        };
        if text == current || text == reported {
            continue;
        }
        match SidecarConfig::from_yaml(&file.display().to_string(), &text) {
            Ok(config) => return (text, config),
            Err(e) => {
                error!(file = %file.display(), error = %e, "the changed config does not parse; keeping the running one");
                reported = text;
            }
        }
    }
}

/// Runs one projection until shutdown, restarting it with the new config whenever its file changes.
async fn supervise(
    key: String,
    mut launch: Launch,
    state: Arc<ProjectionState>,
    metrics: Arc<Metrics>,
    stop_rx: watch::Receiver<bool>,
    reload: Duration,
) -> (String, Exit) {
    let mut current = launch
        .file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .unwrap_or_default();
    loop {
        // This projection's own stop: the global one, or a reload.
        let (own_tx, own_rx) = watch::channel(false);
        let forward = {
            let (mut global, own) = (stop_rx.clone(), own_tx.clone());
            tokio::spawn(async move {
                let _ = global.wait_for(|s| *s).await;
                let _ = own.send(true);
            })
        };
        let running = run_once(
            key.clone(),
            launch.clone(),
            state.clone(),
            metrics.clone(),
            own_rx,
        );
        tokio::pin!(running);
        let watched = launch.file.clone();
        let change = async {
            match &watched {
                Some(file) => changed_config(file, &current, reload).await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            exit = &mut running => Err(exit),
            next = change => Ok(next),
        };
        match outcome {
            Err(exit) => {
                forward.abort();
                return (key, exit);
            }
            Ok((text, config)) => {
                info!(projection = %key, "the config changed; restarting the projection with it");
                let _ = own_tx.send(true);
                let exit = running.await;
                forward.abort();
                if *stop_rx.borrow() {
                    return (key, exit);
                }
                current = text;
                launch.config = config;
                state.resume();
            }
        }
    }
}

async fn run_once(
    key: String,
    launch: Launch,
    state: Arc<ProjectionState>,
    metrics: Arc<Metrics>,
    stop_rx: watch::Receiver<bool>,
) -> Exit {
    match start_projection(launch, state.clone(), metrics, stop_rx.clone()).await {
        Ok(projector) => projector.run().await,
        Err(e) => {
            let reason = format!("cannot start: {e:#}");
            error!(projection = %key, reason = %reason, "projection not started");
            state.halt(reason.clone());
            // Keep the halted state visible on /readyz until shutdown (or a config change).
            let mut stop_rx = stop_rx;
            while !*stop_rx.borrow() {
                state.beat();
                let _ = tokio::time::timeout(Duration::from_secs(1), stop_rx.changed()).await;
            }
            Exit::Halted(reason)
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
