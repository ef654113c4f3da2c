//! The sidecar injection webhook: pods created in a namespace that opted in (the webhook configuration's
//! `namespaceSelector` on the label `projectionist.dev/injection=enabled`), without the opt-out annotation
//! `projectionist.dev/inject: "false"`, and matched by the `podSelector` of one or more Projections of their namespace,
//! get one `projectionist-sidecar` running those projections; Reactors select pods the same way and run in the same
//! sidecar. A pod annotated `projectionist.dev/event-stores:
//! "users,orders"` gets the sidecar with the event-store API for those EventStores of its namespace, whether or not a
//! Projection selects it.
//!
//! [`inject`] is the pure decision (pod + projections → JSON patch); [`serve`] is the HTTPS server every replica runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use kube::runtime::reflector::Store;
use projectionist_crds::event_store::EventStore;
use projectionist_crds::projection::Projection;
use projectionist_crds::reactor::Reactor;
use projectionist_crds::reactor_config::resolve_reactor;
use projectionist_crds::sidecar_config::{SECRET_FILES_DIR, SecretMount, SecretSource, resolve};
use projectionist_crds::store_config::{EVENT_STORES_ANNOTATION, annotated_stores, resolve_store};
use serde_json::{Value, json};

use crate::event_store::{store_config_key, store_config_map_name};
use crate::projection::{config_key, config_map_name};
use crate::reactor::{
    config_key as reactor_config_key, config_map_name as reactor_config_map_name,
};

/// Name of the injected container.
pub const CONTAINER: &str = "projectionist-sidecar";
/// Pod annotation that opts a pod out (`"false"`).
pub const INJECT_ANNOTATION: &str = "projectionist.dev/inject";
/// Pod annotation the webhook sets to the projections it injected.
pub const INJECTED_ANNOTATION: &str = "projectionist.dev/injected";
/// Pod label the webhook sets on pods it injected (`injected`), for monitoring to find the sidecars.
pub const SIDECAR_LABEL: &str = "projectionist.dev/sidecar";
/// Namespace label that opts a namespace in (`enabled`), used by the webhook configuration's `namespaceSelector`.
pub const NAMESPACE_LABEL: &str = "projectionist.dev/injection";
/// Where the sidecar's config files are mounted.
pub const CONFIG_DIR: &str = "/etc/projectionist";
/// Where Kubernetes mounts a pod's ServiceAccount token; the sidecar gets an empty directory there instead.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How the sidecar is injected.
#[derive(Debug, Clone)]
pub struct Injection {
    /// Image of `projectionist-sidecar`.
    pub image: String,
    pub pull_policy: String,
    /// As a native sidecar (init container with `restartPolicy: Always`) or a regular container.
    pub native: bool,
    /// Port of the sidecar's admin endpoints (probes, metrics).
    pub admin_port: u16,
    /// Worker threads of the sidecar's async runtime; `None`: the sidecar's default.
    pub worker_threads: Option<u16>,
    pub resources: ResourceRequirements,
}

/// The injected sidecar's arguments.
fn sidecar_args(settings: &Injection) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--config-dir", CONFIG_DIR, "--admin-addr"]
        .map(str::to_string)
        .into();
    args.push(format!("0.0.0.0:{}", settings.admin_port));
    if let Some(threads) = settings.worker_threads {
        args.extend(["--worker-threads".to_string(), threads.to_string()]);
    }
    args
}

/// Whether `selector` matches `labels` (an empty selector matches everything).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// Pod annotation the webhook sets to the reactors it injected.
pub const INJECTED_REACTORS_ANNOTATION: &str = "projectionist.dev/injected-reactors";
/// Pod annotation the webhook sets to the event stores the injected API serves.
pub const INJECTED_STORES_ANNOTATION: &str = "projectionist.dev/injected-event-stores";

/// What injection decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// JSON patch operations, empty when the pod is left alone.
    pub patch: Vec<Value>,
    /// The projections injected.
    pub projections: Vec<String>,
    /// The reactors injected.
    pub reactors: Vec<String>,
    /// The event stores the injected API serves by the pod's annotation.
    pub stores: Vec<String>,
    /// Why something was left out.
    pub warnings: Vec<String>,
}

/// Decides the injection for `pod` given the Projections (with their EventStores) and the EventStores of its
/// namespace, no Reactors among them.
pub fn inject(
    pod: &Pod,
    projections: &[(Projection, Option<EventStore>)],
    stores: &[EventStore],
    settings: &Injection,
) -> Decision {
    let candidates = Candidates {
        projections: projections.to_vec(),
        reactors: Vec::new(),
        stores: stores.to_vec(),
    };
    inject_candidates(pod, &candidates, settings)
}

/// Decides the injection for `pod` given everything of its namespace that may select it.
pub fn inject_candidates(pod: &Pod, namespace: &Candidates, settings: &Injection) -> Decision {
    let (candidates, stores) = (&namespace.projections, &namespace.stores);
    let mut decision = Decision {
        patch: Vec::new(),
        projections: Vec::new(),
        reactors: Vec::new(),
        stores: Vec::new(),
        warnings: Vec::new(),
    };
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if annotations
        .get(INJECT_ANNOTATION)
        .is_some_and(|v| v == "false")
    {
        return decision;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let present = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == CONTAINER);
    if present {
        return decision;
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut matched: Vec<&(Projection, Option<EventStore>)> = candidates
        .iter()
        .filter(|(p, _)| {
            p.spec
                .pod_selector
                .as_ref()
                .is_some_and(|s| selector_matches(s, &labels))
        })
        .collect();
    matched.sort_by_key(|(p, _)| p.name_any());

    let mut sources = Vec::new();
    let mut env = BTreeMap::new();
    let mut file_secrets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut need = |secrets: &BTreeSet<SecretMount>| {
        for mount in secrets {
            match &mount.source {
                SecretSource::Env(var) => {
                    env.insert(
                        var.clone(),
                        (mount.secret.name.clone(), mount.secret.key.clone()),
                    );
                }
                SecretSource::File(_) => {
                    file_secrets
                        .entry(mount.secret.name.clone())
                        .or_default()
                        .insert(mount.secret.key.clone());
                }
            }
        }
    };
    for (projection, store) in matched {
        let name = projection.name_any();
        let Some(store) = store else {
            decision.warnings.push(format!(
                "projection {name} not injected: EventStore {} not found",
                projection.spec.event_store
            ));
            continue;
        };
        let resolved = match resolve(store, projection) {
            Ok(r) => r,
            Err(e) => {
                decision
                    .warnings
                    .push(format!("projection {name} not injected: {e}"));
                continue;
            }
        };
        need(&resolved.secrets);
        sources.push(json!({"configMap": {"name": config_map_name(&name),
            "items": [{"key": config_key(&name), "path": config_key(&name)}]}}));
        decision.projections.push(name);
    }
    let mut matched_reactors: Vec<&(Reactor, Option<EventStore>)> = namespace
        .reactors
        .iter()
        .filter(|(r, _)| {
            r.spec
                .pod_selector
                .as_ref()
                .is_some_and(|s| selector_matches(s, &labels))
        })
        .collect();
    matched_reactors.sort_by_key(|(r, _)| r.name_any());
    for (reactor, store) in matched_reactors {
        let name = reactor.name_any();
        let Some(store) = store else {
            decision.warnings.push(format!(
                "reactor {name} not injected: EventStore {} not found",
                reactor.spec.event_store
            ));
            continue;
        };
        match resolve_reactor(store, reactor) {
            Ok(resolved) => need(&resolved.secrets),
            Err(e) => {
                decision
                    .warnings
                    .push(format!("reactor {name} not injected: {e}"));
                continue;
            }
        }
        let (map, key) = (reactor_config_map_name(&name), reactor_config_key(&name));
        sources.push(json!({"configMap": {"name": map, "items": [{"key": key, "path": key}]}}));
        decision.reactors.push(name);
    }
    let wanted = annotations
        .get(EVENT_STORES_ANNOTATION)
        .map(|v| annotated_stores(v))
        .unwrap_or_default();
    for name in wanted {
        let Some(store) = stores.iter().find(|s| s.name_any() == name) else {
            decision.warnings.push(format!(
                "event store {name} not served by the sidecar's API: no EventStore {name} in the namespace"
            ));
            continue;
        };
        need(&resolve_store(store).secrets);
        sources.push(json!({"configMap": {"name": store_config_map_name(&name),
            "items": [{"key": store_config_key(&name), "path": store_config_key(&name)}]}}));
        decision.stores.push(name);
    }
    if decision.projections.is_empty() && decision.reactors.is_empty() && decision.stores.is_empty()
    {
        return decision;
    }

    let mut env_list: Vec<Value> = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
    ];
    env_list.extend(
        env.iter()
            .map(|(var, (secret, key))| json!({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})),
    );
    let mut volumes = vec![
        json!({"name": "projectionist-config", "projected": {"sources": sources, "defaultMode": 0o444}}),
    ];
    // An empty directory where the pod's ServiceAccount token would be mounted: the API server's ServiceAccount
    // admission then leaves the sidecar without the token (it never talks to Kubernetes).
    volumes.push(json!({"name": "projectionist-no-api-token", "emptyDir": {"sizeLimit": "1Mi"}}));
    let mut mounts = vec![
        json!({"name": "projectionist-config", "mountPath": CONFIG_DIR, "readOnly": true}),
        json!({"name": "projectionist-no-api-token", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": true}),
    ];
    for (i, (secret, keys)) in file_secrets.iter().enumerate() {
        let volume = format!("projectionist-secret-{i}");
        let items: Vec<Value> = keys.iter().map(|k| json!({"key": k, "path": k})).collect();
        volumes.push(json!({"name": volume, "secret": {"secretName": secret, "items": items, "defaultMode": 0o440}}));
        mounts.push(json!({"name": volume, "mountPath": format!("{SECRET_FILES_DIR}/{secret}"), "readOnly": true}));
    }
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": "proj-admin"}, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3});
    let mut container = json!({
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.pull_policy,
        "args": sidecar_args(settings),
        "ports": [{"name": "proj-admin", "containerPort": settings.admin_port, "protocol": "TCP"}],
        "env": env_list,
        "volumeMounts": mounts,
        "resources": settings.resources,
        "livenessProbe": probe("/healthz"),
        "readinessProbe": probe("/readyz"),
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        }
    });
    if settings.native {
        container["restartPolicy"] = json!("Always");
    }

    let patch = &mut decision.patch;
    let list = if settings.native {
        "initContainers"
    } else {
        "containers"
    };
    let existing = if settings.native {
        spec.init_containers.as_ref().map(Vec::len)
    } else {
        Some(spec.containers.len())
    };
    match existing {
        Some(n) if n > 0 || !settings.native => {
            patch.push(json!({"op": "add", "path": format!("/spec/{list}/-"), "value": container}))
        }
        _ => {
            patch.push(json!({"op": "add", "path": format!("/spec/{list}"), "value": [container]}))
        }
    }
    if spec.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
        for volume in volumes {
            patch.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
    } else {
        patch.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    if pod.metadata.labels.is_some() {
        let key = SIDECAR_LABEL.replace('~', "~0").replace('/', "~1");
        patch.push(
            json!({"op": "add", "path": format!("/metadata/labels/{key}"), "value": "injected"}),
        );
    } else {
        patch.push(
            json!({"op": "add", "path": "/metadata/labels", "value": {SIDECAR_LABEL: "injected"}}),
        );
    }
    let mut injected = BTreeMap::from([(INJECTED_ANNOTATION, decision.projections.join(","))]);
    if !decision.stores.is_empty() {
        injected.insert(INJECTED_STORES_ANNOTATION, decision.stores.join(","));
    }
    if !decision.reactors.is_empty() {
        injected.insert(INJECTED_REACTORS_ANNOTATION, decision.reactors.join(","));
    }
    if pod.metadata.annotations.is_some() {
        for (name, value) in injected {
            let key = name.replace('~', "~0").replace('/', "~1");
            patch.push(
                json!({"op": "add", "path": format!("/metadata/annotations/{key}"), "value": value}),
            );
        }
    } else {
        patch.push(json!({"op": "add", "path": "/metadata/annotations", "value": injected}));
    }
    decision
}

/// What the webhook server reads: the Projections, Reactors and EventStores of every namespace, kept current by
/// watches.
#[derive(Clone)]
pub struct Caches {
    pub projections: Store<Projection>,
    pub reactors: Store<Reactor>,
    pub stores: Store<EventStore>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct WebhookState {
    caches: Caches,
    settings: Arc<Injection>,
}

/// What of one namespace may select a pod: its Projections and Reactors (each with its EventStore, when it exists)
/// and its EventStores.
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    pub projections: Vec<(Projection, Option<EventStore>)>,
    pub reactors: Vec<(Reactor, Option<EventStore>)>,
    pub stores: Vec<EventStore>,
}

/// Answers one AdmissionReview body. A body that is not an AdmissionReview gets `400` with the reason.
pub fn review(
    body: &[u8],
    candidates: impl Fn(&str) -> Candidates,
    settings: &Injection,
) -> Result<Value, String> {
    let review: AdmissionReview<Pod> =
        serde_json::from_slice(body).map_err(|e| format!("malformed AdmissionReview: {e}"))?;
    let request: AdmissionRequest<Pod> = review
        .try_into()
        .map_err(|_| "malformed AdmissionReview: it has no request".to_string())?;
    // The response is written out here: the API server wants the patch base64-encoded.
    let mut response = json!({"uid": request.uid, "allowed": true});
    let Some(pod) = &request.object else {
        return Ok(
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
        );
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.namespace())
        .unwrap_or_else(|| "default".into());
    let decision = inject_candidates(pod, &candidates(&namespace), settings);
    if !decision.warnings.is_empty() {
        response["warnings"] = json!(decision.warnings);
    }
    if !decision.patch.is_empty() {
        use base64::Engine;
        let patch =
            serde_json::to_vec(&decision.patch).map_err(|e| format!("building the patch: {e}"))?;
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
        tracing::info!(namespace, pod = pod.metadata.name.as_deref().or(pod.metadata.generate_name.as_deref()).unwrap_or(""),
            projections = ?decision.projections, reactors = ?decision.reactors, stores = ?decision.stores, "injected the sidecar");
    }
    Ok(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    )
}

async fn mutate(State(state): State<WebhookState>, body: Bytes) -> Response {
    let candidates = |namespace: &str| {
        let stores: Vec<EventStore> = state
            .caches
            .stores
            .state()
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(namespace))
            .map(|s| (**s).clone())
            .collect();
        let store_of = |name: &str| stores.iter().find(|s| s.name_any() == name).cloned();
        let projections = state
            .caches
            .projections
            .state()
            .into_iter()
            .filter(|p| p.namespace().as_deref() == Some(namespace))
            .map(|p| ((*p).clone(), store_of(&p.spec.event_store)))
            .collect();
        let reactors = state
            .caches
            .reactors
            .state()
            .into_iter()
            .filter(|r| r.namespace().as_deref() == Some(namespace))
            .map(|r| ((*r).clone(), store_of(&r.spec.event_store)))
            .collect();
        Candidates {
            projections,
            reactors,
            stores,
        }
    };
    match review(&body, candidates, &state.settings) {
        Ok(value) => (StatusCode::OK, axum::Json(value)).into_response(),
        Err(message) => (StatusCode::BAD_REQUEST, message).into_response(),
    }
}

/// Serves `POST /mutate` over HTTPS with the certificate in `tls` (reloaded in place on rotation) until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    tls: axum_server::tls_rustls::RustlsConfig,
    caches: Caches,
    settings: Injection,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/mutate", post(mutate))
        .with_state(WebhookState {
            caches,
            settings: Arc::new(settings),
        });
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    });
    tracing::info!(%addr, "webhook listening");
    axum_server::bind_rustls(addr, tls)
        .handle(handle)
        .serve(app.into_make_service())
        .await?;
    Ok(())
}
