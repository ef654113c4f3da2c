//! The real API server's admission chain calls the operator's webhook server (running in process with a generated
//! certificate) on pod create — namespace and object selectors, `failurePolicy`, `timeoutSeconds`, TLS verified
//! against the `caBundle`. The webhook is served on loopback, so the configurations reach it with a `url` client
//! config; each test has namespaces and configurations of its own (named after it) on the shared control plane.

use std::net::SocketAddr;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use kube::api::{Api, PostParams};
use kube::runtime::{reflector, watcher};
use projectionist_operator::certs;
use projectionist_operator::webhook::{self, Caches, Injection};
use projectionist_tests::control_plane::ControlPlane;
use projectionist_tests::process::free_port;
use projectionist_tests::repo;
use serde_json::json;

struct Setup {
    client: kube::Client,
    /// This test's opted-in namespace.
    ns: String,
    /// This test's namespace that did not opt in.
    other: String,
    addr: SocketAddr,
    ca: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Setup {
    /// A configuration name of this test's own.
    fn name(&self, base: &str) -> String {
        format!("{base}-{}", self.ns)
    }

    /// A `url` client config for the webhook server, trusting `ca`.
    fn url_config(&self, ca: &str) -> serde_json::Value {
        json!({"url": format!("https://{}/mutate", self.addr), "caBundle": ByteString(ca.as_bytes().to_vec())})
    }
}

/// The control plane, two namespaces of this test, and a webhook server knowing the example Projection (in the
/// opted-in namespace).
async fn setup() -> Setup {
    setup_with(&[]).await
}

/// [`setup`] with more labels on the opted-in namespace.
async fn setup_with(labels: &'static [(&'static str, &'static str)]) -> Setup {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (plane, ns, other) = tokio::task::spawn_blocking(move || {
        let plane = ControlPlane::shared().expect("control plane");
        let mut all = vec![("projectionist.dev/injection", "enabled")];
        all.extend_from_slice(labels);
        let ns = plane.fresh_namespace("adm", &all).expect("namespace");
        let other = plane.fresh_namespace("adm-other", &[]).expect("namespace");
        (plane, ns, other)
    })
    .await
    .expect("join");
    let client = plane.client().await.expect("client");
    let (mut store, mut projection) = repo::user_management_resources().expect("example");
    store.metadata.namespace = Some(ns.clone());
    projection.metadata.namespace = Some(ns.clone());
    let (projections, mut pw) = reflector::store();
    let (stores, mut sw) = reflector::store();
    for e in [
        watcher::Event::Init,
        watcher::Event::InitApply(projection),
        watcher::Event::InitDone,
    ] {
        pw.apply_watcher_event(&e);
    }
    for e in [
        watcher::Event::Init,
        watcher::Event::InitApply(store),
        watcher::Event::InitDone,
    ] {
        sw.apply_watcher_event(&e);
    }
    let mut names = certs::service_names("hook", "system");
    names.push("127.0.0.1".into());
    let cert = certs::generate(&names, Duration::from_secs(3600)).expect("cert");
    let tls = RustlsConfig::from_pem(cert.cert_pem.into_bytes(), cert.key_pem.into_bytes())
        .await
        .expect("tls");
    let port = free_port().expect("port");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = Injection {
        image: "sidecar:test".into(),
        pull_policy: "IfNotPresent".into(),
        native: true,
        admin_port: 9464,
        worker_threads: None,
        resources: ResourceRequirements::default(),
    };
    tokio::spawn(webhook::serve(
        addr,
        tls,
        Caches {
            projections,
            reactors: reflector::store().0,
            stores,
        },
        settings,
        async move {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    Setup {
        client,
        ns,
        other,
        addr,
        ca: cert.ca_bundle,
        _stop: stop,
    }
}

fn config(
    s: &Setup,
    name: &str,
    client_config: serde_json::Value,
    failure: &str,
    timeout: u64,
    object_selector: serde_json::Value,
) -> MutatingWebhookConfiguration {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": format!("{name}.projectionist.dev"),
            "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": failure, "timeoutSeconds": timeout,
            "clientConfig": client_config,
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"projectionist.dev/injection": "enabled"},
                "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": [s.ns, s.other]}]},
            "objectSelector": object_selector
        }]
    }))
    .expect("config")
}

fn app_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "user-management"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))
    .expect("pod")
}

fn injected(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == "projectionist-sidecar"))
}

async fn create(setup: &Setup, namespace: &str, pod: &Pod) -> Result<Pod, kube::Error> {
    Api::<Pod>::namespaced(setup.client.clone(), namespace)
        .create(&PostParams::default(), pod)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_decide_which_pods_reach_the_webhook() {
    let s = setup().await;
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(s.client.clone());
    hooks
        .create(
            &PostParams::default(),
            &config(
                &s,
                &s.name("inject"),
                s.url_config(&s.ca),
                "Fail",
                5,
                json!({"matchExpressions": [{"key": "skip", "operator": "DoesNotExist"}]}),
            ),
        )
        .await
        .expect("config");
    assert!(
        injected(&create(&s, &s.ns, &app_pod("a")).await.expect("create")),
        "opted-in namespace"
    );
    assert!(
        !injected(&create(&s, &s.other, &app_pod("b")).await.expect("create")),
        "namespace not opted in"
    );
    let mut skipped = app_pod("c");
    skipped
        .metadata
        .labels
        .get_or_insert_default()
        .insert("skip".into(), "yes".into());
    assert!(
        !injected(&create(&s, &s.ns, &skipped).await.expect("create")),
        "objectSelector"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_bundle_is_verified_and_failure_policy_decides() {
    let s = setup().await;
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(s.client.clone());
    // A bundle of another CA: the TLS handshake fails verification.
    let other = certs::generate(
        &certs::service_names("hook", "system"),
        Duration::from_secs(3600),
    )
    .expect("cert");
    hooks
        .create(
            &PostParams::default(),
            &config(
                &s,
                &s.name("strict"),
                s.url_config(&other.ca_bundle),
                "Fail",
                5,
                json!({}),
            ),
        )
        .await
        .expect("config");
    match create(&s, &s.ns, &app_pod("a")).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 500);
            assert!(
                e.message.contains(&format!(
                    "failed calling webhook \"{}.projectionist.dev\"",
                    s.name("strict")
                )),
                "{}",
                e.message
            );
            assert!(e.message.contains("certificate"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The same with failurePolicy Ignore: the pod is created, unmutated.
    let mut lenient = hooks.get(&s.name("strict")).await.expect("get");
    lenient.metadata.managed_fields = None;
    if let Some(w) = lenient.webhooks.as_mut().and_then(|w| w.first_mut()) {
        w.failure_policy = Some("Ignore".into());
    }
    hooks
        .replace(&s.name("strict"), &PostParams::default(), &lenient)
        .await
        .expect("replace");
    let pod = create(&s, &s.ns, &app_pod("b"))
        .await
        .expect("created despite the failing webhook");
    assert!(!injected(&pod));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_does_not_answer_in_time_fails_the_create() {
    let s = setup().await;
    // A listener that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(s.client.clone());
    let client_config = json!({"url": format!("https://{silent_addr}/mutate"), "caBundle": ByteString(s.ca.as_bytes().to_vec())});
    hooks
        .create(
            &PostParams::default(),
            &config(&s, &s.name("slow"), client_config, "Fail", 1, json!({})),
        )
        .await
        .expect("config");
    match create(&s, &s.ns, &app_pod("a")).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 500);
            assert!(e.message.contains("deadline"), "{}", e.message);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_annotated_with_event_stores_gets_the_sidecar_with_the_api_and_no_projection() {
    let s = setup().await;
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(s.client.clone());
    hooks
        .create(
            &PostParams::default(),
            &config(
                &s,
                &s.name("inject"),
                s.url_config(&s.ca),
                "Fail",
                5,
                json!({}),
            ),
        )
        .await
        .expect("config");
    // A command service: no Projection selects it, the annotation asks for the API on the `users` store.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "commands", "labels": {"app.kubernetes.io/name": "user-commands"},
            "annotations": {"projectionist.dev/event-stores": "users"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))
    .expect("pod");
    let created = create(&s, &s.ns, &pod).await.expect("create");
    assert!(injected(&created), "annotated pod");
    let spec = created.spec.expect("spec");
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "projectionist-sidecar")
        .expect("sidecar");
    let env = sidecar.env.clone().unwrap_or_default();
    let secret_refs: Vec<String> = env
        .iter()
        .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
        .map(|r| format!("{}/{}", r.name, r.key))
        .collect();
    assert!(
        secret_refs
            .iter()
            .any(|r| r.starts_with("nats-user-management/")),
        "the store's NATS credentials: {secret_refs:?}"
    );
    let volumes = serde_json::to_value(spec.volumes.unwrap_or_default()).expect("json");
    assert!(
        volumes.to_string().contains("users-store-config"),
        "the store's config is mounted: {volumes}"
    );
    let annotations = created.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations
            .get("projectionist.dev/injected-event-stores")
            .map(String::as_str),
        Some("users")
    );
    assert!(
        !injected(
            &create(&s, &s.ns, &app_pod_named_elsewhere())
                .await
                .expect("create")
        ),
        "neither selected nor annotated"
    );
}

fn app_pod_named_elsewhere() -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "plain", "labels": {"app.kubernetes.io/name": "unrelated"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))
    .expect("pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_security_restricted_admits_the_injected_sidecar_and_refuses_a_weakened_one() {
    let s = setup_with(&[("pod-security.kubernetes.io/enforce", "restricted")]).await;
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(s.client.clone());
    hooks
        .create(
            &PostParams::default(),
            &config(
                &s,
                &s.name("inject"),
                s.url_config(&s.ca),
                "Fail",
                5,
                json!({}),
            ),
        )
        .await
        .expect("config");
    let hardened = json!({"runAsNonRoot": true, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}});
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "restricted", "labels": {"app.kubernetes.io/name": "user-management"}},
        "spec": {"containers": [{"name": "app", "image": "app:1", "securityContext": hardened}]}
    }))
    .expect("pod");
    let created = create(&s, &s.ns, &pod)
        .await
        .expect("PodSecurity (restricted) admits the pod with the injected sidecar");
    assert!(injected(&created));

    // The same pod carrying a sidecar that may escalate privileges: the webhook leaves it, PodSecurity refuses it.
    let weakened: Pod = serde_json::from_value(json!({
        "metadata": {"name": "weakened", "labels": {"app.kubernetes.io/name": "user-management"}},
        "spec": {"containers": [{"name": "app", "image": "app:1", "securityContext": hardened}],
            "initContainers": [{"name": "projectionist-sidecar", "image": "sidecar:test", "restartPolicy": "Always",
                "securityContext": {"runAsNonRoot": true, "allowPrivilegeEscalation": true,
                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}]}
    }))
    .expect("pod");
    match create(&s, &s.ns, &weakened).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{}", e.message);
            assert!(
                e.message.contains("allowPrivilegeEscalation"),
                "{}",
                e.message
            );
        }
        other => panic!("expected PodSecurity to refuse, got {other:?}"),
    }
}
