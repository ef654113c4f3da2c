//! A Kubernetes API emulator: an HTTP server on 127.0.0.1 that the real `kube::Client` (and `kubectl`) talks to,
//! with the semantics Projectionist's operator relies on.
//!
//! What it does, the way kube-apiserver does it:
//! - **Resources**: core `v1` Namespaces, Secrets, ConfigMaps, Pods, Services, ServiceAccounts and Events;
//!   `apps/v1` Deployments, `policy/v1` PodDisruptionBudgets, `events.k8s.io/v1` Events, `coordination.k8s.io/v1`
//!   Leases, RBAC Roles/Bindings, `admissionregistration.k8s.io/v1` MutatingWebhookConfigurations, and
//!   CustomResourceDefinitions — creating a CRD (through the API or [`KubeApi::apply_crd_yaml`]) serves its kind.
//! - **Discovery**: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}`, `/apis/{group}/{version}`.
//! - **Reads**: get; list (one namespace or all) with label and field (`metadata.name`/`metadata.namespace`)
//!   selectors and pagination (`limit`, `continue`, `remainingItemCount`), as JSON or as a `Table` with the CRD's
//!   printer columns (`Accept: …;as=Table`).
//! - **Watch** with resourceVersions: a watch replays the changes after its resourceVersion from a bounded history,
//!   then streams live ones; without a resourceVersion (or `0`) it starts with synthetic `ADDED` events; a
//!   resourceVersion older than the history gets an `ERROR` event with a `410 Gone` Status (and a list with
//!   `resourceVersionMatch=Exact` on a compacted version a `410`); `BOOKMARK` events when asked for
//!   (`allowWatchBookmarks`); `timeoutSeconds` ends the watch. With a selector, an object modified into it arrives
//!   as `ADDED` and out of it as `DELETED`.
//! - **Writes**: create (POST, with `generateName`), replace (PUT), delete; JSON merge patch, JSON patch (RFC 6902),
//!   and server-side apply (`application/apply-patch+yaml`) with `fieldManager` and `force`: field ownership is kept
//!   in `metadata.managedFields` (`FieldsV1`), a different value for a field another manager owns is a `409`
//!   Conflict unless forced, and fields a manager stops applying are removed. Other writes record their manager's
//!   fields as `Update` entries.
//! - **Status subresource**: writes to the main resource ignore `status`, writes to `/status` change only `status`;
//!   `metadata.generation` moves when anything but metadata and status changes (and when deletion starts).
//! - **Optimistic concurrency**: a write carrying a stale `metadata.resourceVersion` gets `409 Conflict`; creating an
//!   existing name `409 AlreadyExists`.
//! - **Finalizers**: deleting an object with finalizers sets `deletionTimestamp`; it is removed when the last
//!   finalizer is; no new finalizer may be added during deletion.
//! - **Garbage collection**: when an object is gone, objects whose `ownerReferences` all name gone owners (by uid)
//!   are deleted, in cascade. Deleting a Namespace deletes what is in it.
//! - **Validation of custom resources**: defaults, then the CRD's `openAPIV3Schema`, then its CEL rules (with
//!   `oldSelf` on update), through [`crate::crd_validation`]; unknown fields are pruned, or refused with
//!   `fieldValidation=Strict`; errors are `422 Invalid` Status objects with `details.causes` per field.
//!   Namespaced objects need their Namespace to exist.
//! - **Mutating admission webhooks** on pod create, with namespace and object selectors, `failurePolicy`,
//!   `timeoutSeconds` and TLS verified against the `caBundle` (see [`admission`] for how Services are reached).
//!
//! What it does not emulate: authentication and authorization (every request is allowed), admission other than
//! CRD validation (no defaults or validation for built-in kinds beyond the object name), strategic merge patch (it
//! is applied as a JSON merge patch: lists are replaced, not merged), list-type-aware apply (lists are atomic),
//! consistent pagination (a `continue` page is read from the current state, not the first page's snapshot),
//! `dryRun`, foreground/orphan deletion propagation (deletion is always background), protobuf, CRD conversion (one
//! served version per CRD), and controllers (no Deployment makes Pods).

mod admission;
mod fields;
mod http;
pub mod select;
mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
pub use store::{ApiError, Kind};
use store::{Store, WriteOptions};
use tokio::sync::watch;

/// How a running emulator is configured.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many changes the history keeps for watches to resume from.
    pub history: usize,
    /// How often a watch that allows them gets a `BOOKMARK`.
    pub bookmark_interval: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            history: 100_000,
            bookmark_interval: std::time::Duration::from_secs(5),
        }
    }
}

pub(crate) struct Shared {
    store: Mutex<Store>,
    /// Where a Service's webhook is reached: (namespace, name) → loopback address.
    routes: Mutex<std::collections::HashMap<(String, String), SocketAddr>>,
    options: Options,
    shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("options", &self.options)
            .finish()
    }
}

impl Shared {
    fn routes(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), SocketAddr>> {
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock is a bug in the emulator; the data is still consistent enough to serve.
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running emulator. Stops when dropped.
#[derive(Debug)]
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl KubeApi {
    /// Starts an emulator on a free loopback port, serving Projectionist's CRDs.
    pub async fn start() -> crate::Result<Self> {
        let api = Self::start_with(Options::default()).await?;
        for crd in projectionist_crds::crd::files() {
            api.apply_crd_yaml(&crd.yaml)?;
        }
        Ok(api)
    }

    /// Starts an emulator with no custom resources.
    pub async fn start_with(options: Options) -> crate::Result<Self> {
        let (stop, shutdown) = watch::channel(false);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.history)),
            routes: Mutex::new(std::collections::HashMap::new()),
            options,
            shutdown: shutdown.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = http::router(shared.clone());
        let mut stopped = shutdown;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
        });
        Ok(Self { addr, shared, stop })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A real `kube::Client` talking to the emulator.
    pub fn client(&self) -> crate::Result<kube::Client> {
        let mut config = kube::Config::new(self.url().parse()?);
        config.default_namespace = "default".into();
        Ok(kube::Client::try_from(config)?)
    }

    /// Writes a kubeconfig for processes (the operator, `kubectl`) to reach the emulator.
    pub fn write_kubeconfig(&self, path: &Path) -> crate::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\ncurrent-context: emulator\nusers:\n- name: emulator\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates a CustomResourceDefinition from YAML (as `kubectl apply -f crd.yaml`), serving its kind.
    pub fn apply_crd_yaml(&self, yaml: &str) -> crate::Result<()> {
        let crd: serde_json::Value = serde_yaml::from_str(yaml)?;
        let mut store = self.shared.store();
        let kind = store
            .kind("apiextensions.k8s.io", "customresourcedefinitions")
            .map_err(|e| anyhow::anyhow!(e.message))?
            .clone();
        let name = crd
            .pointer("/metadata/name")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let options = WriteOptions {
            manager: "kubectl".into(),
            ..WriteOptions::default()
        };
        let result = match store.get(&kind, None, &name) {
            Ok(_) => store.patch(&kind, None, &name, "merge", crd, &options),
            Err(_) => store.create(&kind, None, crd, &options),
        };
        result.map(|_| ()).map_err(|e| anyhow::anyhow!(e.message))
    }

    /// Creates a namespace.
    pub fn create_namespace(&self, name: &str) -> crate::Result<()> {
        self.shared
            .store()
            .create_namespace(name)
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!(e.message))
    }

    /// Routes a Service to a loopback address: webhooks whose `clientConfig.service` names it are called there.
    pub fn route_service(&self, namespace: &str, name: &str, addr: SocketAddr) {
        self.shared
            .routes()
            .insert((namespace.to_string(), name.to_string()), addr);
    }

    /// Forgets the change history (as etcd compaction does): watches resuming from before now get `410 Gone`.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
