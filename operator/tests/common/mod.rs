//! The operator binary as a process against the real Kubernetes control plane (shared by the tests of a binary, each
//! test in a namespace of its own, watched by its own operator) and a real nats-server.

#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use projectionist_crds::event_store::EventStore;
use projectionist_crds::projection::Projection;
use projectionist_tests::control_plane::ControlPlane;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::process::{ServerProcess, free_port, wait_for_port};
use projectionist_tests::repo;
use tempfile::TempDir;

/// The control plane, a nats-server requiring the example's credentials, and a namespace of the test's own with the
/// example's Secrets.
pub struct Env {
    pub plane: &'static ControlPlane,
    /// This test's namespace (the examples' resources are created in it).
    pub namespace: String,
    pub nats: NatsServer,
    pub client: kube::Client,
    pub dir: TempDir,
    pub kubeconfig: PathBuf,
}

/// A running operator process.
pub struct Operator {
    pub process: ServerProcess,
    pub admin_port: u16,
    pub identity: String,
}

impl Operator {
    /// The admin endpoint's body.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("127.0.0.1:{}", self.admin_port);
        let mut stream = tokio::net::TcpStream::connect(&url).await.ok()?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!("GET {path} HTTP/1.1\r\nHost: {url}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())?;
        Some((code, body))
    }

    /// The value of a metric line starting with `prefix` (summed over matching lines).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let Some((_, body)) = self.get("/metrics").await else {
            return 0.0;
        };
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn log(&self) -> String {
        self.process.log_tail()
    }
}

impl Env {
    pub async fn start() -> Self {
        let (plane, namespace) = tokio::task::spawn_blocking(|| {
            let plane = ControlPlane::shared().expect("control plane");
            plane.install_crds().expect("CRDs");
            let namespace = plane.fresh_namespace("um", &[]).expect("namespace");
            (plane, namespace)
        })
        .await
        .expect("join");
        let nats = NatsServer::start_with_user("user-management", "change-me")
            .await
            .expect("nats-server");
        let client = plane.client().await.expect("client");
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let text = std::fs::read_to_string(repo::user_management_example().join("secrets.yaml"))
            .expect("secrets.yaml");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut secret: Secret = serde::Deserialize::deserialize(doc).expect("secret");
            secret.metadata.namespace = Some(namespace.clone());
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .expect("create secret");
        }
        let dir = tempfile::Builder::new()
            .prefix("projectionist-operator-test-")
            .tempdir()
            .expect("tempdir");
        let kubeconfig = plane.admin_kubeconfig();
        Self {
            plane,
            namespace,
            nats,
            client,
            dir,
            kubeconfig,
        }
    }

    /// Starts an operator process with short intervals.
    pub async fn operator(&self, identity: &str) -> Operator {
        self.operator_with(identity, &["--disable-webhook"]).await
    }

    /// Starts an operator process with short intervals and `extra` arguments.
    pub async fn operator_with(&self, identity: &str, extra: &[&str]) -> Operator {
        let admin_port = free_port().expect("port");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_projectionist-operator"));
        cmd.arg("run")
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,projectionist_operator=debug,kube=warn")
            .env("POD_NAME", identity)
            .env("POD_NAMESPACE", &self.namespace)
            .args(["--watch-namespace", &self.namespace])
            .args(["--webhook-config", &self.webhook_config()])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args([
                "--lease-duration",
                "4s",
                "--resync-interval",
                "1s",
                "--status-interval",
                "1s",
            ])
            .args([
                "--stall-after",
                "3s",
                "--nats-timeout",
                "2s",
                "--log-format",
                "text",
            ])
            .arg("--work-dir")
            .arg(self.dir.path().join(format!("work-{identity}")))
            .args(extra);
        let log = self.dir.path().join(format!("operator-{identity}.log"));
        let process = ServerProcess::spawn("projectionist-operator", cmd, &log).expect("spawn");
        assert!(
            tokio::task::spawn_blocking(move || wait_for_port(admin_port, Duration::from_secs(30)))
                .await
                .expect("join"),
            "the operator's admin port never opened"
        );
        Operator {
            process,
            admin_port,
            identity: identity.to_string(),
        }
    }

    /// This test's webhook configuration (cluster-scoped, so named after the namespace).
    pub fn webhook_config(&self) -> String {
        format!("projectionist-sidecar-injector-{}", self.namespace)
    }

    pub fn stores(&self) -> Api<EventStore> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn reactors(&self) -> Api<projectionist_crds::Reactor> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn projections(&self) -> Api<Projection> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The example EventStore in this test's namespace, pointed at the test's nats-server.
    pub fn example_store(&self) -> EventStore {
        let (mut store, _) = repo::user_management_resources().expect("example");
        store.spec.nats.servers = vec![self.nats.url()];
        store.metadata.namespace = Some(self.namespace.clone());
        store
    }

    pub fn example_projection(&self) -> Projection {
        let (_, mut projection) = repo::user_management_resources().expect("example");
        projection.metadata.namespace = Some(self.namespace.clone());
        projection
    }

    pub async fn apply_examples(&self) {
        self.stores()
            .create(&PostParams::default(), &self.example_store())
            .await
            .expect("create EventStore");
        self.projections()
            .create(&PostParams::default(), &self.example_projection())
            .await
            .expect("create Projection");
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        self.nats.jetstream().await.expect("jetstream")
    }
}

/// Polls `check` every 200 ms until it yields a value; panics after `timeout` with `what` and `context()`.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
    context: impl Fn() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for {what}\n{}", context());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The condition `type_` of a status's conditions: (status, reason, message).
pub fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

type Conditions = Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>;

/// Waits until object `name`'s `Ready` condition is accepted by `accept` (status, reason).
async fn wait_ready<K>(
    api: Api<K>,
    name: &str,
    what: String,
    conditions: fn(&K) -> Conditions,
    accept: impl Fn(&str, &str) -> bool,
    operator: &Operator,
) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(
        &what,
        Duration::from_secs(60),
        || {
            let api = api.clone();
            let accept = &accept;
            async move {
                let object = api.get_opt(name).await.ok()??;
                let (status, reason, _) = condition(&conditions(&object), "Ready")?;
                accept(&status, &reason).then_some(object)
            }
        },
        || operator.log(),
    )
    .await
}

fn store_conditions(store: &EventStore) -> Conditions {
    store
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

fn projection_conditions(projection: &Projection) -> Conditions {
    projection
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

/// Waits until the EventStore's `Ready` condition has `reason`.
pub async fn store_reason(env: &Env, operator: &Operator, name: &str, reason: &str) -> EventStore {
    let what = format!("EventStore {name} with Ready reason {reason}");
    wait_ready(
        env.stores(),
        name,
        what,
        store_conditions,
        |_, r| r == reason,
        operator,
    )
    .await
}

/// Waits until the Projection's `Ready` condition has `reason`.
pub async fn projection_reason(
    env: &Env,
    operator: &Operator,
    name: &str,
    reason: &str,
) -> Projection {
    let what = format!("Projection {name} with Ready reason {reason}");
    wait_ready(
        env.projections(),
        name,
        what,
        projection_conditions,
        |_, r| r == reason,
        operator,
    )
    .await
}

fn reactor_conditions(reactor: &projectionist_crds::Reactor) -> Conditions {
    reactor
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

/// Waits until the Reactor's `Ready` condition has `reason`.
pub async fn reactor_reason(
    env: &Env,
    operator: &Operator,
    name: &str,
    reason: &str,
) -> projectionist_crds::Reactor {
    let what = format!("Reactor {name} with Ready reason {reason}");
    wait_ready(
        env.reactors(),
        name,
        what,
        reactor_conditions,
        |_, r| r == reason,
        operator,
    )
    .await
}

/// Waits until a store is Ready (any ready reason).
pub async fn store_ready(env: &Env, operator: &Operator, name: &str) -> EventStore {
    let what = format!("EventStore {name} Ready");
    wait_ready(
        env.stores(),
        name,
        what,
        store_conditions,
        |s, _| s == "True",
        operator,
    )
    .await
}

/// The stream's info, if it exists.
pub async fn stream_info(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Option<async_nats::jetstream::stream::Info> {
    Some(js.get_stream(stream).await.ok()?.cached_info().clone())
}

/// The consumer's info, if it exists.
pub async fn consumer_info(
    js: &async_nats::jetstream::Context,
    stream: &str,
    consumer: &str,
) -> Option<async_nats::jetstream::consumer::Info> {
    Some(
        js.get_stream(stream)
            .await
            .ok()?
            .consumer_info(consumer)
            .await
            .ok()?
            .clone(),
    )
}

/// A helper shared by the controller tests.
pub async fn config_map(env: &Env, name: &str) -> Option<k8s_openapi::api::core::v1::ConfigMap> {
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(env.client.clone(), &env.namespace);
    maps.get_opt(name).await.ok().flatten()
}

/// A helper shared by the controller tests.
pub async fn event_reasons(env: &Env) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), &env.namespace);
    events
        .list(&kube::api::ListParams::default())
        .await
        .map(|l| l.items.into_iter().filter_map(|e| e.reason).collect())
        .unwrap_or_default()
}

/// A helper shared by the controller tests.
pub async fn table(env: &Env, plural: &str) -> serde_json::Value {
    let request = http::Request::get(format!(
        "/apis/projectionist.dev/v1alpha1/namespaces/{}/{plural}",
        env.namespace
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .expect("request");
    env.client.request(request).await.expect("table")
}
