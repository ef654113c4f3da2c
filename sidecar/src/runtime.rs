//! Runs every configured projection concurrently and independently (one failing projection never stops another),
//! serves the admin endpoints and the event-store API, and shuts down gracefully: on the shutdown signal each projection finishes or rolls
//! back its batch in flight and acknowledges only what was committed; whatever has not finished within the grace
//! period is abandoned (its open transaction is rolled back by the database when the connection closes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use projectionist_crds::SidecarConfig;
use projectionist_crds::reactor_config::{self, ReactorConfig};
use projectionist_crds::sidecar_config::{NatsConfig, ObjectRef};
use projectionist_crds::store_config::{self, StoreConfig};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::api;
use crate::database::Database;
use crate::engine::partitions::{Coordinator, Parts};
use crate::engine::report::Report;
use crate::engine::{Exit, Projector};
use crate::handler::Handlers;
use crate::pipeline::Pipeline;
use crate::reactor::deliver::Endpoint;
use crate::reactor::job::Deliverer;
use crate::reactor::metrics::ReactorMetrics;
use crate::reactor::{Reactor, ReactorHandle};
use crate::secrets;
use crate::status::{Metrics, ProjectionLabel, ProjectionState};
use crate::store::{self, Store};

/// One projection to run, with local overrides.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The resolved config.
    pub config: SidecarConfig,
    /// Database URL to use instead of the config's secret (the `dev` mode).
    pub database_url: Option<String>,
    /// Where the config came from, followed: when it changes (a ConfigMap update, an edited YAML file in `dev`),
    /// the projection stops and starts again with the new config.
    pub watch: Option<Watch>,
    /// NATS URL to use instead of the config's servers and credentials (the `dev` mode).
    pub nats_url: Option<String>,
}

/// A config source followed while the projection runs.
#[derive(Debug, Clone)]
pub enum Watch {
    /// A `SidecarConfig` file (a mounted ConfigMap).
    File(PathBuf),
    /// The EventStore/Projection YAML files `dev` was given.
    Manifests(crate::dev::Follow),
}

impl Watch {
    /// The source's current text (`None` while it cannot be read).
    async fn read(&self) -> Option<String> {
        match self {
            Self::File(file) => tokio::fs::read_to_string(file).await.ok(),
            Self::Manifests(follow) => follow.read().await,
        }
    }

    /// The config `text` gives.
    async fn load(&self, text: &str) -> anyhow::Result<SidecarConfig> {
        match self {
            Self::File(file) => Ok(SidecarConfig::from_yaml(&file.display().to_string(), text)?),
            Self::Manifests(follow) => follow.load().await,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::File(file) => file.display().to_string(),
            Self::Manifests(follow) => follow.describe(),
        }
    }
}

/// What a config directory holds: projections (`SidecarConfig`), reactors (`ReactorConfig`) and event stores for
/// the API (`StoreConfig`).
#[derive(Debug, Default)]
pub struct ConfigDir {
    /// Each projection's file and config.
    pub projections: Vec<(PathBuf, SidecarConfig)>,
    /// Each reactor's file and config.
    pub reactors: Vec<(PathBuf, ReactorConfig)>,
    /// Each store's file and config.
    pub stores: Vec<(PathBuf, StoreConfig)>,
}

/// Reads every `*.yaml`/`*.yml` file in `dir` (sorted by name): a `SidecarConfig`, `ReactorConfig` or `StoreConfig`, by its
/// `kind`. Any bad file fails the whole start, with the file and field named.
pub fn read_config_dir(dir: &Path) -> anyhow::Result<ConfigDir> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading config directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        anyhow::bail!(
            "{}: no SidecarConfig, ReactorConfig or StoreConfig files (*.yaml)",
            dir.display()
        );
    }
    let mut out = ConfigDir::default();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let path = f.display().to_string();
        let kind = store_config::kind_of(&text);
        if kind.as_deref() == Some(store_config::KIND) {
            out.stores.push((f, StoreConfig::from_yaml(&path, &text)?));
        } else if kind.as_deref() == Some(reactor_config::KIND) {
            out.reactors
                .push((f, ReactorConfig::from_yaml(&path, &text)?));
        } else {
            out.projections
                .push((f, SidecarConfig::from_yaml(&path, &text)?));
        }
    }
    Ok(out)
}

/// Binds a server's address; `what` names it in the error.
pub async fn bind(what: &str, addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr}"))
}

/// An event store the API serves, with a local override.
#[derive(Debug, Clone)]
pub struct StoreLaunch {
    /// The resolved config.
    pub config: StoreConfig,
    /// NATS URL to use instead of the config's servers and credentials (the `dev` mode).
    pub nats_url: Option<String>,
}

/// A reactor to run, with a local override.
#[derive(Debug, Clone)]
pub struct ReactorLaunch {
    /// The resolved config.
    pub config: ReactorConfig,
    /// NATS URL to use instead of the config's servers and credentials (the `dev` mode).
    pub nats_url: Option<String>,
}

/// Everything one sidecar runs.
#[derive(Debug, Default)]
pub struct Workload {
    /// Projections.
    pub projections: Vec<Launch>,
    /// Reactors.
    pub reactors: Vec<ReactorLaunch>,
    /// Event stores for the API, besides those of the projections.
    pub stores: Vec<StoreLaunch>,
}

/// The servers' listeners.
#[derive(Debug)]
pub struct Listeners {
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin: TcpListener,
    /// The event-store API; `None` serves no API.
    pub api: Option<TcpListener>,
}

/// Connects to NATS as a config says, or to a local URL; the connection is retried in the background, so a NATS
/// outage never fails the start.
/// `nats://a:4222,nats://b:4222` as the list of servers a client fails over between.
fn server_list(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

pub(crate) async fn connect_nats(
    nats: &projectionist_crds::sidecar_config::NatsConfig,
    local: Option<&str>,
) -> anyhow::Result<async_nats::Client> {
    Ok(match local {
        Some(url) => {
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(server_list(url))
                .await?
        }
        None => {
            secrets::nats_options(nats)
                .await?
                .connect(nats.servers.clone())
                .await?
        }
    })
}

/// The stores the API serves: those named by StoreConfigs, and those the projections read. One connection per
/// store; a store whose connection cannot even be set up (a missing credential) is logged and left out.
async fn api_stores(workload: &Workload) -> BTreeMap<String, Arc<Store>> {
    let store_of = |c: (&str, &ObjectRef, &NatsConfig, &str, &[String], Option<u32>),
                    nats_url: &Option<String>| StoreLaunch {
        config: StoreConfig {
            api_version: c.0.to_string(),
            kind: store_config::KIND.to_string(),
            event_store: c.1.clone(),
            nats: c.2.clone(),
            stream: c.3.to_string(),
            subjects: c.4.to_vec(),
            partitions: c.5,
        },
        nats_url: nats_url.clone(),
    };
    let from_projections = workload.projections.iter().filter_map(|l| {
        let c = &l.config;
        (!c.store_subjects.is_empty()).then(|| {
            store_of(
                (
                    &c.api_version,
                    &c.event_store,
                    &c.nats,
                    &c.stream,
                    &c.store_subjects,
                    c.partitioning.as_ref().map(|p| p.partitions),
                ),
                &l.nats_url,
            )
        })
    });
    let from_reactors = workload.reactors.iter().map(|l| {
        let c = &l.config;
        store_of(
            (
                &c.api_version,
                &c.event_store,
                &c.nats,
                &c.stream,
                &c.store_subjects,
                c.store_partitions,
            ),
            &l.nats_url,
        )
    });
    let mut stores = BTreeMap::new();
    for launch in workload
        .stores
        .iter()
        .cloned()
        .chain(from_projections)
        .chain(from_reactors)
    {
        let name = launch.config.event_store.name.clone();
        if stores.contains_key(&name) {
            continue;
        }
        let Some(prefix) = store::subject_prefix(&launch.config.subjects) else {
            warn!(store = %name, subjects = ?launch.config.subjects, "the store's subject has no `<prefix>.>` form; the API does not serve it");
            continue;
        };
        match connect_nats(&launch.config.nats, launch.nats_url.as_deref()).await {
            Ok(client) => {
                let store = Store::new(&name, &launch.config.stream, &prefix, client)
                    .with_partitions(launch.config.partitions);
                stores.insert(name, Arc::new(store));
            }
            Err(e) => {
                error!(store = %name, error = %format!("{e:#}"), "cannot connect to the store's NATS; the API does not serve it")
            }
        }
    }
    stores
}

async fn start_projection(
    launch: Launch,
    state: Arc<ProjectionState>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Runner> {
    let config = launch.config;
    let handlers = Handlers::new(&config.handlers, config.database.driver)?;
    let url = match launch.database_url {
        Some(url) => url,
        None => secrets::read(&config.database.url).context("database URL")?,
    };
    // A partitioned projection's workers each need a connection, and the coordinator one more.
    let connections = config
        .partitioning
        .as_ref()
        .map_or(config.database.max_connections, |p| {
            config.database.max_connections.max(p.workers + 1)
        });
    let db = Database::connect_lazy(&url, config.database.driver, connections)
        .context("database URL")?;
    let nats = connect_nats(&config.nats, launch.nats_url.as_deref()).await?;
    if config.partitioning.is_some() {
        let parts = Parts {
            config,
            handlers,
            db,
            url,
            nats,
            metrics,
            state,
        };
        return Coordinator::new(parts, shutdown)
            .map(|c| Runner::Shared(Box::new(c)))
            .context("the EventStore is partitioned but its subject has no `<prefix>.>` form");
    }
    let pipeline = Pipeline::new(&url);
    let key = format!("{}/{}", config.projection.namespace, config.projection.name);
    let report = Report::new(&key, metrics, state);
    Ok(Runner::One(Box::new(Projector::new(
        config, handlers, db, pipeline, nats, report, shutdown,
    ))))
}

/// A projection as it runs: alone, or sharing a partitioned store's partitions with its other replicas.
#[derive(Debug)]
enum Runner {
    One(Box<Projector>),
    Shared(Box<Coordinator>),
}

impl Runner {
    async fn run(self) -> Exit {
        match self {
            Self::One(projector) => projector.run().await,
            Self::Shared(coordinator) => coordinator.run().await,
        }
    }
}

fn start_reactor(
    launch: ReactorLaunch,
    key: String,
    store: Arc<Store>,
    state: Arc<ProjectionState>,
    metrics: Arc<ReactorMetrics>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(Reactor, ReactorHandle)> {
    let config = launch.config;
    let deliverer = Deliverer {
        key: key.clone(),
        endpoint: Endpoint::new(&config.url, config.timeout, &key)?,
        store: store.clone(),
        retry_initial: config.retry_initial,
        retry_max: config.retry_max,
        max_attempts: config.max_attempts,
        metrics,
    };
    let nats = store.client().clone();
    Ok(Reactor::new(
        config,
        nats,
        launch.nats_url,
        deliverer,
        state,
        shutdown,
    ))
}

/// Runs `workload` until `shutdown` resolves, then waits up to `grace` for the projections to stop.
pub async fn run(
    workload: Workload,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
    reload: Duration,
) -> anyhow::Result<()> {
    if workload.projections.is_empty() && workload.stores.is_empty() && workload.reactors.is_empty()
    {
        anyhow::bail!("nothing to run: no projection, reactor or event store configured");
    }
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let reactor_metrics = ReactorMetrics::new(&mut registry);
    let api_metrics = api::ApiMetrics::new(&mut registry);
    let stores = api_stores(&workload).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut states = Vec::new();
    let mut waits = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    for launch in workload.projections {
        let key = format!(
            "{}/{}",
            launch.config.projection.namespace, launch.config.projection.name
        );
        let state = ProjectionState::new(&key);
        states.push(state.clone());
        if let Some(store) = stores.get(&launch.config.event_store.name) {
            waits
                .entry(launch.config.projection.name.clone())
                .or_insert_with(|| api::WaitTarget {
                    state: state.clone(),
                    store: store.clone(),
                    consumer: launch.config.consumer.clone(),
                });
        }
        let (metrics, stop_rx) = (metrics.clone(), stop_rx.clone());
        tasks.spawn(supervise(key, launch, state, metrics, stop_rx, reload));
    }
    let mut reactors = BTreeMap::new();
    for launch in workload.reactors {
        let Some(store) = stores.get(&launch.config.event_store.name).cloned() else {
            error!(reactor = %launch.config.reactor.name, store = %launch.config.event_store.name, "the reactor's store cannot be reached; the reactor does not run");
            continue;
        };
        let key = format!(
            "{}/{}",
            launch.config.reactor.namespace, launch.config.reactor.name
        );
        let state = ProjectionState::new(&format!("reactor {key}"));
        states.push(state.clone());
        match start_reactor(
            launch,
            key.clone(),
            store,
            state,
            reactor_metrics.clone(),
            stop_rx.clone(),
        ) {
            Ok((reactor, handle)) => {
                reactors.insert(
                    handle
                        .key
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                    handle,
                );
                tasks.spawn(async move { (key, reactor.run_on_own_thread().await) });
            }
            Err(e) => error!(reactor = %key, error = %format!("{e:#}"), "cannot start the reactor"),
        }
    }
    let api_task = listeners.api.map(|listener| {
        info!(api = ?listener.local_addr().ok(), stores = ?stores.keys().collect::<Vec<_>>(), "event-store API listening");
        let state = Arc::new(api::ApiState {
            stores,
            projections: waits,
            reactors,
            metrics: Some(api_metrics),
        });
        let mut api_stop = stop_rx.clone();
        tokio::spawn(api::serve(listener, state, async move {
            let _ = api_stop.wait_for(|s| *s).await;
        }))
    });
    let admin_state = Arc::new(AdminState {
        projections: states,
        registry,
    });
    let mut admin_stop = stop_rx.clone();
    let admin = tokio::spawn(admin::serve(listeners.admin, admin_state, async move {
        let _ = admin_stop.wait_for(|s| *s).await;
    }));

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let finished = tokio::time::timeout(grace, async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((key, exit)) => info!(name = %key, exit = ?exit, "stopped"),
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
    if let Some(api) = api_task {
        let _ = tokio::time::timeout(Duration::from_secs(1), api).await;
    }
    Ok(())
}

/// Resolves with the new config once the source's text differs from `current` and gives a config; a text that
/// does not is logged and waited past (the running config stays).
async fn changed_config(watch: &Watch, current: &str, every: Duration) -> (String, SidecarConfig) {
    let mut reported = String::new();
    loop {
        tokio::time::sleep(every).await;
        let Some(text) = watch.read().await else {
            continue;
        };
        if text == current || text == reported {
            continue;
        }
        match watch.load(&text).await {
            Ok(config) => return (text, config),
            Err(e) => {
                error!(source = %watch.describe(), error = format!("{e:#}"), "the changed config is not usable; keeping the running one");
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
    let mut current = match &launch.watch {
        Some(watch) => watch.read().await.unwrap_or_default(),
        None => String::new(),
    };
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
        let watched = launch.watch.clone();
        let change = async {
            match &watched {
                Some(watch) => changed_config(watch, &current, reload).await,
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
    use futures::FutureExt;
    let reason =
        match start_projection(launch, state.clone(), metrics.clone(), stop_rx.clone()).await {
            // A panic is a bug; it stops this projection only, with the reason where a halt shows it.
            Ok(projector) => match std::panic::AssertUnwindSafe(projector.run())
                .catch_unwind()
                .await
            {
                Ok(exit) => return exit,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    metrics
                        .halted
                        .get_or_create(&ProjectionLabel {
                            projection: key.clone(),
                        })
                        .set(1);
                    format!("stopped by an internal error (please report it): {message}")
                }
            },
            Err(e) => format!("cannot start: {e:#}"),
        };
    error!(projection = %key, reason = %reason, "projection not running");
    state.halt(reason.clone());
    // Keep the halted state visible on /readyz until shutdown (or a config change).
    let mut stop_rx = stop_rx;
    while !*stop_rx.borrow() {
        state.beat();
        let _ = tokio::time::timeout(Duration::from_secs(1), stop_rx.changed()).await;
    }
    Exit::Halted(reason)
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
