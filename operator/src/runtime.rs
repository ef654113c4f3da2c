//! The operator process: admin endpoints, leader election, and the two controllers while this replica leads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use projectionist_crds::event_store::EventStore;
use projectionist_crds::projection::Projection;
use projectionist_crds::reactor::Reactor;
use tokio::sync::watch;

use axum_server::tls_rustls::RustlsConfig;
use kube::runtime::{WatchStreamExt, reflector};

use crate::admin::{self, Health};
use crate::certs;
use crate::context::{self, Context, MANAGER, Settings, key};
use crate::error::Error;
use crate::leader::Elector;
use crate::metrics::{FailureLabels, KindLabels, Metrics};
use crate::nats::Pool;
use crate::webhook::{self, Caches, Injection};
use crate::{event_store, projection, reactor};

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Options {
    pub admin_addr: SocketAddr,
    pub lease_name: String,
    pub lease_namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    /// Only this namespace, or all.
    pub namespace: Option<String>,
    pub concurrency: u16,
    pub nats_timeout: Duration,
    pub work_dir: PathBuf,
    pub settings: Settings,
    /// The injection webhook, unless disabled.
    pub webhook: Option<WebhookOptions>,
}

/// The injection webhook's settings.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub addr: SocketAddr,
    pub certs: certs::Source,
    /// How often the certificate is re-read (and rotated when managed).
    pub cert_check_interval: Duration,
    pub injection: Injection,
}

/// A cache of `api`'s objects and the task that keeps it filled. Only specs and statuses are kept: managedFields
/// are dropped before they reach memory.
fn cache<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    reflector::Store<K>,
    impl std::future::Future<Output = ()> + Send + 'static,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let fill = reflector::reflector(
        writer,
        watcher::watcher(api, config).modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .for_each(|_| futures::future::ready(()));
    (store, fill)
}

/// Starts the webhook: caches of Projections, Reactors and EventStores, the certificate, its refresh, and the HTTPS server.
async fn start_webhook(
    client: kube::Client,
    options: WebhookOptions,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (projections, watch_projections) = cache(
        Api::<Projection>::all(client.clone()),
        watcher::Config::default(),
    );
    let (reactors, watch_reactors) = cache(
        Api::<Reactor>::all(client.clone()),
        watcher::Config::default(),
    );
    let (stores, watch_stores) = cache(
        Api::<EventStore>::all(client.clone()),
        watcher::Config::default(),
    );
    tokio::spawn(watch_projections);
    tokio::spawn(watch_reactors);
    tokio::spawn(watch_stores);
    projections.wait_until_ready().await?;
    reactors.wait_until_ready().await?;
    stores.wait_until_ready().await?;

    let mut cert = loop {
        match certs::current(&client, &options.certs).await {
            Ok(cert) => break cert,
            Err(e) => {
                tracing::warn!(error = %e, "no webhook certificate yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let tls = RustlsConfig::from_pem(
        cert.cert_pem.clone().into_bytes(),
        cert.key_pem.clone().into_bytes(),
    )
    .await?;
    let refresh_tls = tls.clone();
    let refresh_client = client.clone();
    let source = options.certs.clone();
    let interval = options.cert_check_interval;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            match certs::current(&refresh_client, &source).await {
                Ok(next) if next != cert => {
                    match refresh_tls
                        .reload_from_pem(
                            next.cert_pem.clone().into_bytes(),
                            next.key_pem.clone().into_bytes(),
                        )
                        .await
                    {
                        Ok(()) => {
                            tracing::info!("serving the renewed webhook certificate");
                            cert = next;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not load the renewed webhook certificate")
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not check the webhook certificate"),
            }
        }
    });
    let caches = Caches {
        projections,
        reactors,
        stores,
    };
    let mut stopped = stop;
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        if let Err(e) = webhook::serve(options.addr, tls, caches, options.injection, shutdown).await
        {
            tracing::error!(error = %e, "the webhook server failed");
        }
    });
    Ok(())
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(options: Options) -> anyhow::Result<()> {
    // One TLS implementation for the process (the webhook server); a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let admin = tokio::spawn(admin::serve(
        options.admin_addr,
        health.clone(),
        metrics.clone(),
        stopped(stop.clone()),
    ));

    let client = loop {
        match kube::Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes client yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stopped(stop.clone()) => return Ok(()),
                }
            }
        }
    };
    // The webhook starts on its own, so a missing certificate never holds up reconciling; readiness waits for it.
    match options.webhook.clone() {
        Some(webhook) => {
            let (client, stop, health) = (client.clone(), stop.clone(), health.clone());
            tokio::spawn(async move {
                loop {
                    match start_webhook(client.clone(), webhook.clone(), stop.clone()).await {
                        Ok(()) => {
                            health.webhook.store(true, Ordering::Relaxed);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot start the webhook yet; retrying");
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    }
                    if *stop.borrow() {
                        return;
                    }
                }
            });
        }
        None => health.webhook.store(true, Ordering::Relaxed),
    }
    let elector = Elector::new(
        client.clone(),
        &options.lease_namespace,
        &options.lease_name,
        &options.identity,
        options.lease_duration,
    );
    let reporter = Reporter {
        controller: MANAGER.to_string(),
        instance: Some(options.identity.clone()),
    };
    let pool = Pool::new(
        options.work_dir.clone(),
        metrics.clone(),
        options.nats_timeout,
    );
    let ctx = Arc::new(Context::new(
        client,
        pool,
        reporter,
        metrics.clone(),
        options.settings.clone(),
    ));
    let retry = (options.lease_duration / 8).max(Duration::from_millis(200));
    let renew_every = (options.lease_duration / 3).max(Duration::from_millis(300));

    'standby: loop {
        loop {
            match elector.try_acquire_or_renew().await {
                Ok(true) => {
                    health.ready.store(true, Ordering::Relaxed);
                    break;
                }
                Ok(false) => health.ready.store(true, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "cannot reach the lease"),
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = stopped(stop.clone()) => break 'standby,
            }
        }
        tracing::info!(
            identity = elector.identity(),
            "acquired the leader lease; reconciling"
        );
        metrics.leader.set(1);
        let controllers = run_controllers(ctx.clone(), &options, stopped(stop.clone()));
        tokio::pin!(controllers);
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                _ = &mut controllers => {
                    // The controllers only end on shutdown.
                    metrics.leader.set(0);
                    if let Err(e) = elector.release().await {
                        tracing::warn!(error = %e, "could not release the lease");
                    }
                    break 'standby;
                }
                _ = tokio::time::sleep(renew_every) => match elector.try_acquire_or_renew().await {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) => {
                        tracing::warn!("lost the leader lease; standing by");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the lease");
                        if renewed.elapsed() >= options.lease_duration {
                            tracing::warn!("the lease expired; standing by");
                            break;
                        }
                    }
                },
            }
        }
        metrics.leader.set(0);
    }
    let _ = admin.await;
    tracing::info!("stopped");
    Ok(())
}

fn record(metrics: &Metrics, kind: &str, started: Instant, result: &Result<Action, Error>) {
    let labels = KindLabels {
        kind: kind.to_string(),
    };
    metrics.reconciles.get_or_create(&labels).inc();
    metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        metrics
            .failures
            .get_or_create(&FailureLabels {
                kind: kind.to_string(),
                category: e.category().to_string(),
            })
            .inc();
    }
}

fn error_policy<K: ResourceExt>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(&key(&*object));
    tracing::warn!(object = %key(&*object), category = error.category(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn run_controllers(
    ctx: Arc<Context>,
    options: &Options,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (stores, projections, reactors, maps): (
        Api<EventStore>,
        Api<Projection>,
        Api<Reactor>,
        Api<ConfigMap>,
    ) = match &options.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client),
        ),
    };
    let config = controller::Config::default().concurrency(options.concurrency);
    let (shutdown_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let trigger = shutdown_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = trigger.send(());
    });
    let on_shutdown = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };

    // The caches reconciles read from, each filled by its own task so that a reconcile waiting for one never
    // holds up the controller streams (an owned stream only advances while its controller has a free slot).
    let managed = format!("app.kubernetes.io/managed-by={MANAGER}");
    let (store_cache, fill_stores) = cache(stores.clone(), watcher::Config::default());
    let (map_cache, fill_maps) = cache(maps.clone(), watcher::Config::default().labels(&managed));
    let fillers = [tokio::spawn(fill_stores), tokio::spawn(fill_maps)];
    ctx.use_caches(context::Caches {
        stores: store_cache,
        config_maps: map_cache,
    });
    let store_controller = Controller::new(stores.clone(), watcher::Config::default())
        .with_config(config.clone())
        .graceful_shutdown_on(on_shutdown(&shutdown_tx))
        .run(
            |object, ctx: Arc<Context>| async move {
                let started = Instant::now();
                let result = event_store::reconcile(object, ctx.clone()).await;
                record(&ctx.metrics, "EventStore", started, &result);
                result
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "EventStore controller");
            }
        });

    let reactor_controller = Controller::new(reactors, watcher::Config::default());
    let reactor_cache = reactor_controller.store();
    let reactor_controller = reactor_controller
        .owns(maps.clone(), watcher::Config::default().labels(&managed))
        .watches(
            stores.clone(),
            watcher::Config::default(),
            move |store: EventStore| {
                let namespace = store.namespace();
                let name = store.name_any();
                reactor_cache
                    .state()
                    .into_iter()
                    .filter(|r| r.namespace() == namespace && r.spec.event_store == name)
                    .map(|r| ObjectRef::from_obj(&*r))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(config.clone())
        .graceful_shutdown_on(on_shutdown(&shutdown_tx))
        .run(
            |object, ctx: Arc<Context>| async move {
                let started = Instant::now();
                let result = reactor::reconcile(object, ctx.clone()).await;
                record(&ctx.metrics, "Reactor", started, &result);
                result
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "Reactor controller");
            }
        });

    let projection_controller = Controller::new(projections, watcher::Config::default());
    let cache = projection_controller.store();
    let projection_controller = projection_controller
        .owns(maps, watcher::Config::default().labels(&managed))
        .watches(
            stores,
            watcher::Config::default(),
            move |store: EventStore| {
                let namespace = store.namespace();
                let name = store.name_any();
                cache
                    .state()
                    .into_iter()
                    .filter(|p| p.namespace() == namespace && p.spec.event_store == name)
                    .map(|p| ObjectRef::from_obj(&*p))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(config)
        .graceful_shutdown_on(on_shutdown(&shutdown_tx))
        .run(
            |object, ctx: Arc<Context>| async move {
                let started = Instant::now();
                let result = projection::reconcile(object, ctx.clone()).await;
                record(&ctx.metrics, "Projection", started, &result);
                result
            },
            error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "Projection controller");
            }
        });
    futures::join!(store_controller, projection_controller, reactor_controller);
    for filler in fillers {
        filler.abort();
    }
}
