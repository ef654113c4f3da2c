//! What every reconcile shares: the Kubernetes client, NATS connections, the event recorder, metrics and settings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use projectionist_crds::EventStore;

use crate::metrics::Metrics;
use crate::nats::Pool;

/// The field manager the operator writes with (server-side apply).
pub const MANAGER: &str = "projectionist-operator";

/// Timing knobs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often a Ready EventStore's stream is re-checked for out-of-band changes.
    pub resync: Duration,
    /// How often a Projection's status is refreshed from its consumer.
    pub status_interval: Duration,
    /// How long a projection may have pending events without acknowledging any before it is `Stalled`.
    pub stall_after: Duration,
}

/// The controllers' caches: reads in a reconcile come from the watches the controllers keep anyway, so a steady
/// state costs the API server no requests.
#[derive(Clone)]
pub struct Caches {
    /// Every watched EventStore.
    pub stores: Store<EventStore>,
    /// The ConfigMaps the operator manages (labelled `app.kubernetes.io/managed-by`).
    pub config_maps: Store<ConfigMap>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches").finish_non_exhaustive()
    }
}

/// Whether a cache has synced, waiting a little for its first list (a cache that cannot sync, say for want of a
/// permission, must not hold reconciles up: they then read from the API server).
async fn synced<K: kube::Resource + Clone + 'static>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    matches!(
        tokio::time::timeout(Duration::from_secs(10), store.wait_until_ready()).await,
        Ok(Ok(()))
    )
}

/// Shared reconcile state.
pub struct Context {
    pub client: kube::Client,
    pub nats: Pool,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Per object: consecutive failures (for backoff).
    failures: Mutex<HashMap<String, u32>>,
    /// Per projection: the last acknowledged sequence seen and when it last moved.
    progress: Mutex<HashMap<String, (u64, Instant)>>,
    /// Set whenever the controllers start (again, after a lost leadership); until then reads go to the API server.
    caches: RwLock<Option<Caches>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: kube::Client,
        nats: Pool,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            nats,
            metrics,
            settings,
            failures: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            caches: RwLock::new(None),
        }
    }

    /// Serves reads from the controllers' caches from now on.
    pub fn use_caches(&self, caches: Caches) {
        if let Ok(mut current) = self.caches.write() {
            *current = Some(caches);
        }
    }

    fn caches(&self) -> Option<Caches> {
        self.caches.read().ok()?.clone()
    }

    /// The EventStore `namespace/name`, from the cache once it has synced when it is Ready there; one that is
    /// missing or not Ready in the cache is read from the API server, so a Projection never waits on a cache that
    /// has not yet seen its store become Ready.
    pub async fn event_store(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<EventStore>>, kube::Error> {
        if let Some(caches) = self.caches()
            && synced(&caches.stores).await
            && let Some(store) = caches.stores.get(&ObjectRef::new(name).within(namespace))
            && store.status.as_ref().is_some_and(|s| {
                crate::conditions::is_true(&s.conditions, "Ready")
                    && s.observed_generation == store.metadata.generation
            })
        {
            return Ok(Some(store));
        }
        Ok(
            Api::<EventStore>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await?
                .map(Arc::new),
        )
    }

    /// A ConfigMap the operator manages, from the cache (the operator never reads ConfigMaps one by one: `None`
    /// before the controllers run, and the caller then simply applies).
    pub async fn managed_config_map(&self, namespace: &str, name: &str) -> Option<Arc<ConfigMap>> {
        let caches = self.caches()?;
        if !synced(&caches.config_maps).await {
            return None;
        }
        caches
            .config_maps
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// JetStream on the NATS servers of `store`, with the credentials its Secrets hold.
    pub async fn jetstream(
        &self,
        store: &projectionist_crds::EventStore,
    ) -> Result<crate::nats::JetStream, crate::error::Error> {
        let namespace = store.namespace().unwrap_or_default();
        self.nats
            .jetstream(&self.client, &namespace, &store.spec.nats)
            .await
    }

    /// Records a Kubernetes Event on `object`; a failure to record is logged, never fatal.
    pub async fn event<K>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not record an event");
        }
    }

    /// For a spec change the server would refuse: the message for the `Ready` condition (which fields, what to do),
    /// recorded as a Warning Event the first time it is reported.
    pub async fn refuse_immutable<K>(
        &self,
        object: &K,
        conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
        subject: &str,
        diff: &projectionist_crds::diff::ConfigDiff,
        advice: &str,
    ) -> String
    where
        K: Resource<DynamicType = ()>,
    {
        let fields: Vec<String> = diff
            .immutable()
            .map(|c| {
                format!(
                    "{} ({} on the server, {} in the spec)",
                    c.field, c.actual, c.desired
                )
            })
            .collect();
        let message = format!(
            "{subject} cannot change {} in place; nothing was changed on NATS. {advice}",
            fields.join(", ")
        );
        if crate::conditions::get(conditions, "Ready")
            .is_none_or(|c| c.reason != "ImmutableFieldChanged")
        {
            self.event(
                object,
                EventType::Warning,
                "ImmutableFieldChanged",
                "Update",
                message.clone(),
            )
            .await;
        }
        message
    }

    /// The backoff before retrying a failed object: 1s, 2s, 4s … capped at 60s.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Duration::from_secs(1u64 << (*n - 1).min(6)).min(Duration::from_secs(60))
    }

    /// Forgets an object's failures after a success.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Records a projection's acknowledged sequence; returns how long it has not moved.
    pub fn progress(&self, key: &str, acked: u64) -> Duration {
        let mut progress = self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let entry = progress.entry(key.to_string()).or_insert((acked, now));
        if entry.0 != acked {
            *entry = (acked, now);
        }
        now.duration_since(entry.1)
    }

    /// Forgets a projection's progress (it was deleted or reset).
    pub fn forget(&self, key: &str) {
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}

/// `namespace/name` of an object, the key of the per-object state.
pub fn key<K: ResourceExt>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}
