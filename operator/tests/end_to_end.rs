//! From YAML to rows on a real control plane: the chart installed with the real `helm install` (CRDs included), the
//! operator running with the chart's arguments and the chart's own ServiceAccount (so the chart's RBAC is what it
//! has), the example's namespace, EventStore and Projection applied, a Pod created from the example Deployment's
//! template through the API server (whose admission chain calls the operator's webhook over TLS verified against
//! the CA bundle the operator manages), the injected container started as a process with its env and mounted config
//! (there is no kubelet), the sample events appended, and the service's Postgres tables compared with a reference
//! fold of the events.
//!
//! The API server reaches the webhook served on loopback through the chart's webhook Service turned into an
//! `ExternalName` Service for `localhost` and the webhook configuration's service port set to the webhook's port:
//! the API server dials `localhost:<port>` and verifies the certificate for the Service's DNS name.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{condition, eventually};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, PostParams};
use projectionist_crds::{EventStore, Projection, Reactor};
use projectionist_tests::control_plane::ControlPlane;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use projectionist_tests::process::{ServerProcess, free_port, wait_for_port};
use projectionist_tests::release::Release;
use projectionist_tests::repo;
use serde_json::{Value, json};

const SYSTEM: &str = "projectionist-system";
const APP: &str = "user-management";

/// The example events folded by hand-written rules: what `users` and `user_roles` must hold.
fn reference_fold(events: &[Value]) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let mut users: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut roles: BTreeMap<(String, String), ()> = BTreeMap::new();
    for e in events {
        let d = &e["data"];
        let id = d["userId"].as_str().unwrap_or_default().to_string();
        match e["type"].as_str().unwrap_or_default() {
            "UserCreated" => {
                users.insert(
                    id,
                    (
                        d["email"].as_str().unwrap_or_default().into(),
                        d["name"].as_str().unwrap_or_default().into(),
                    ),
                );
            }
            "UserUpdated" => {
                if let Some(u) = users.get_mut(&id) {
                    if let Some(email) = d["email"].as_str() {
                        u.0 = email.into();
                    }
                    if let Some(name) = d["name"].as_str() {
                        u.1 = name.into();
                    }
                }
            }
            "UserDeleted" => {
                users.remove(&id);
                roles.retain(|(u, _), _| *u != id);
            }
            "RoleAssignedToUser" => {
                roles.insert((id, d["role"].as_str().unwrap_or_default().into()), ());
            }
            "RoleUnassignedFromUser" => {
                roles.remove(&(id, d["role"].as_str().unwrap_or_default().into()));
            }
            _ => {}
        }
    }
    (
        users
            .into_iter()
            .map(|(id, (email, name))| vec![id, email, name])
            .collect(),
        roles.into_keys().map(|(u, r)| vec![u, r]).collect(),
    )
}

/// The rows of a query, or `None` while the tables do not exist yet.
async fn rows(url: &str, sql: &str) -> Option<Vec<Vec<String>>> {
    use sqlx::Row;
    let pool = sqlx::PgPool::connect(url).await.ok()?;
    let out = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&pool)
        .await
        .ok()
        .map(|rows| {
            rows.iter()
                .map(|r| (0..r.len()).map(|i| r.get::<String, _>(i)).collect())
                .collect()
        });
    pool.close().await;
    out
}

/// The `users` and `user_roles` rows the reference fold describes, or `None` while the tables do not exist yet.
async fn read_model(url: &str) -> Option<(Vec<Vec<String>>, Vec<Vec<String>>)> {
    let users = rows(url, "SELECT id, email, name FROM users ORDER BY id").await?;
    let roles = rows(
        url,
        "SELECT user_id, role FROM user_roles ORDER BY user_id, role",
    )
    .await?;
    Some((users, roles))
}

/// Writes a projected volume's ConfigMap items (and Secret volumes) under `root`, at the container's mount paths.
async fn materialise_volumes(client: &kube::Client, pod: &Value, container: &Value, root: &Path) {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), APP);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), APP);
    for mount in container["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let name = mount["name"].as_str().expect("mount name");
        let target = root.join(
            mount["mountPath"]
                .as_str()
                .expect("path")
                .trim_start_matches('/'),
        );
        std::fs::create_dir_all(&target).expect("mount dir");
        let volume = pod["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .expect("volume");
        for source in volume["projected"]["sources"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let cm = maps
                .get(source["configMap"]["name"].as_str().expect("configMap"))
                .await
                .expect("ConfigMap");
            let data = cm.data.unwrap_or_default();
            write_items(&target, &source["configMap"]["items"], |key| {
                data.get(key).map(|v| v.clone().into_bytes())
            });
        }
        if let Some(secret) = volume["secret"]["secretName"].as_str() {
            let data = secrets
                .get(secret)
                .await
                .expect("Secret")
                .data
                .unwrap_or_default();
            write_items(&target, &volume["secret"]["items"], |key| {
                data.get(key).map(|b| b.0.clone())
            });
        }
    }
}

/// Writes a volume's `items` (key → path) under `target`, as the kubelet projects them.
fn write_items(target: &Path, items: &Value, value_of: impl Fn(&str) -> Option<Vec<u8>>) {
    for item in items.as_array().cloned().unwrap_or_default() {
        let data = value_of(item["key"].as_str().unwrap_or_default()).expect("key");
        std::fs::write(target.join(item["path"].as_str().expect("path")), data).expect("write");
    }
}

/// The container's env, resolved as the kubelet would.
async fn resolve_env(
    client: &kube::Client,
    pod: &Value,
    container: &Value,
) -> Vec<(String, String)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), APP);
    let mut out = Vec::new();
    for var in container["env"].as_array().cloned().unwrap_or_default() {
        let name = var["name"].as_str().expect("name").to_string();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_string()
        } else if let Some(r) = var["valueFrom"].get("secretKeyRef") {
            let s = secrets
                .get(r["name"].as_str().expect("secret"))
                .await
                .expect("Secret");
            let bytes = s
                .data
                .as_ref()
                .and_then(|d| d.get(r["key"].as_str().unwrap_or_default()))
                .expect("key");
            String::from_utf8(bytes.0.clone()).expect("utf-8")
        } else if let Some(f) = var["valueFrom"].get("fieldRef") {
            let pointer = format!(
                "/{}",
                f["fieldPath"]
                    .as_str()
                    .expect("fieldPath")
                    .replace('.', "/")
            );
            pod.pointer(&pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        } else {
            panic!("unsupported env source: {var}");
        };
        out.push((name, value));
    }
    out
}

fn sidecar_binary() -> PathBuf {
    let operator = PathBuf::from(env!("CARGO_BIN_EXE_projectionist-operator"));
    let path = operator.with_file_name("projectionist-sidecar");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p projectionist-sidecar` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// The service's own endpoint for the Reactor: records the `ce-id` of every event it is given, answers 204.
async fn welcome_endpoint() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let delivered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = delivered.clone();
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let record = record.clone();
            async move {
                if let Some(id) = headers.get("ce-id").and_then(|v| v.to_str().ok()) {
                    record.lock().expect("lock").push(id.to_string());
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, delivered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gets_the_sidecar_and_the_read_model_equals_the_reference_fold() {
    let sidecar_bin = sidecar_binary();
    let plane = tokio::task::spawn_blocking(|| ControlPlane::shared().expect("control plane"))
        .await
        .expect("join");
    let client = plane.client().await.expect("client");
    let dir = tempfile::tempdir().expect("tempdir");

    // Platform team: the chart, with the real helm (its CRDs first, as helm does); the operator with the
    // Deployment's arguments (ports on loopback, a writable work dir), as the chart's ServiceAccount: a verb the
    // chart's RBAC lacks fails this test.
    let release = {
        let work = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || Release::install(plane, SYSTEM, &work, &[]))
            .await
            .expect("join")
            .expect("helm install")
    };
    assert!(
        release.notes.contains("STATUS: deployed"),
        "{}",
        release.notes
    );
    for (kind, name) in [
        ("ClusterRole", "projectionist"),
        (
            "MutatingWebhookConfiguration",
            "projectionist-sidecar-injector",
        ),
        ("Deployment", "projectionist"),
    ] {
        assert!(
            release.find(kind, name).is_some(),
            "{kind}/{name} not installed"
        );
    }
    assert_eq!(
        release.arg("--webhook-service").as_deref(),
        Some("projectionist-webhook")
    );
    let webhook_port = release.webhook_port;
    let mut cmd = release.operator_command(
        Path::new(env!("CARGO_BIN_EXE_projectionist-operator")),
        "projectionist-7d9f-abcde",
    );
    cmd.env("RUST_LOG", "info,kube=warn");
    let operator = ServerProcess::spawn(
        "projectionist-operator",
        cmd,
        &dir.path().join("operator.log"),
    )
    .expect("operator");
    assert!(
        tokio::task::spawn_blocking(move || wait_for_port(webhook_port, Duration::from_secs(60)))
            .await
            .expect("join"),
        "the webhook never listened:\n{}",
        operator.log_tail()
    );
    // The webhook Service points at this machine; the configuration's port at the webhook's.
    tokio::task::spawn_blocking(move || {
        plane.route_webhook_to_localhost(
            SYSTEM,
            "projectionist-webhook",
            "projectionist-sidecar-injector",
            webhook_port,
        )
    })
    .await
    .expect("join")
    .expect("the webhook routed");
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    eventually(
        "the CA bundle in the webhook configuration",
        Duration::from_secs(30),
        || async {
            let config = hooks.get("projectionist-sidecar-injector").await.ok()?;
            config
                .webhooks?
                .first()?
                .client_config
                .ca_bundle
                .as_ref()
                .map(|_| ())
        },
        || operator.log_tail(),
    )
    .await;

    // Service team: NATS and Postgres, the namespace opted in, Secrets, EventStore and Projection.
    let nats = NatsServer::start_with_user("user-management", "change-me")
        .await
        .expect("nats");
    let postgres = Postgres::start().await.expect("postgres");
    let db_url = postgres.fresh_database().await.expect("database");
    let ns: Namespace = repo::read_yaml(&repo::user_management_example().join("namespace.yaml"))
        .expect("namespace.yaml");
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    tokio::task::spawn_blocking(move || {
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        plane.create_namespace(APP, &labels)
    })
    .await
    .expect("join")
    .expect("namespace");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), APP);
    for secret in [
        json!({"metadata": {"name": "nats-user-management"}, "stringData": {"user": "user-management", "password": "change-me"}}),
        json!({"metadata": {"name": "users-db"}, "stringData": {"url": db_url}}),
    ] {
        let s: Secret = serde_json::from_value(secret).expect("secret");
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("secret");
    }
    let (mut store, projection) = repo::user_management_resources().expect("example");
    store.spec.nats.servers = vec![nats.url()];
    let stores: Api<EventStore> = Api::namespaced(client.clone(), APP);
    let projections: Api<Projection> = Api::namespaced(client.clone(), APP);
    stores
        .create(&PostParams::default(), &store)
        .await
        .expect("EventStore");
    projections
        .create(&PostParams::default(), &projection)
        .await
        .expect("Projection");
    // A Reactor of the same service: UserCreated delivered to an endpoint of the pod (here, of the test).
    let (endpoint, delivered) = welcome_endpoint().await;
    let mut reactor: Reactor =
        repo::read_yaml(&repo::user_management_example().join("../reactors/welcome-email.yaml"))
            .expect("welcome-email.yaml");
    reactor.spec.endpoint.url = format!("http://{endpoint}/events");
    reactor.spec.pod_selector = projection.spec.pod_selector.clone();
    let reactors: Api<Reactor> = Api::namespaced(client.clone(), APP);
    reactors
        .create(&PostParams::default(), &reactor)
        .await
        .expect("Reactor");
    eventually(
        "Reactor Ready",
        Duration::from_secs(60),
        || async {
            let r = reactors.get("welcome-email").await.ok()?;
            (condition(&r.status?.conditions, "Ready")?.0 == "True").then_some(())
        },
        || operator.log_tail(),
    )
    .await;
    eventually(
        "Projection Ready",
        Duration::from_secs(60),
        || async {
            let p = projections.get("users-read-model").await.ok()?;
            (condition(&p.status?.conditions, "Ready")?.0 == "True").then_some(())
        },
        || operator.log_tail(),
    )
    .await;

    // What a platform team sees through the real kubectl: printer columns and conditions.
    let waited = plane
        .kubectl(&[
            "wait",
            "--for=condition=Ready",
            "proj/users-read-model",
            "-n",
            APP,
            "--timeout=60s",
        ])
        .expect("kubectl");
    assert!(
        waited.status.success(),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    let listed = plane.kubectl(&["get", "evs,proj", "-A"]).expect("kubectl");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    for column in ["STREAM", "READY", "MESSAGES", "LAST-SEQ", "STORE", "LAG"] {
        assert!(listed.contains(column), "{column} in:\n{listed}");
    }
    assert!(
        listed.contains("users-read-model") && listed.contains("True"),
        "{listed}"
    );
    // The Events the operator recorded and the Lease it holds, as kubectl shows them.
    let events = plane
        .kubectl(&[
            "get",
            "events",
            "-n",
            APP,
            "-o",
            "custom-columns=REASON:.reason,KIND:.involvedObject.kind,NAME:.involvedObject.name",
        ])
        .expect("kubectl");
    let events = String::from_utf8_lossy(&events.stdout).into_owned();
    for (reason, kind, name) in [
        ("StreamCreated", "EventStore", "users"),
        ("ConsumerCreated", "Projection", "users-read-model"),
    ] {
        assert!(
            events.lines().any(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                cells == [reason, kind, name]
            }),
            "{reason} for {kind}/{name} in:\n{events}"
        );
    }
    let holder = plane
        .kubectl(&[
            "get",
            "lease",
            "projectionist",
            "-n",
            SYSTEM,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .expect("kubectl");
    assert_eq!(
        String::from_utf8_lossy(&holder.stdout),
        "projectionist-7d9f-abcde",
        "{}",
        String::from_utf8_lossy(&holder.stderr)
    );

    // The service's Deployment, unchanged; a Pod from its template, created through the API as the ReplicaSet
    // controller would (no Deployment controller runs here): it comes back with the sidecar.
    let deployment: Deployment =
        repo::read_yaml(&repo::user_management_example().join("deployment.yaml"))
            .expect("deployment.yaml");
    Api::<Deployment>::namespaced(client.clone(), APP)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("Deployment");
    let template = deployment.spec.template;
    let pods: Api<Pod> = Api::namespaced(client.clone(), APP);
    let pod = Pod {
        metadata: kube::api::ObjectMeta {
            generate_name: Some("user-management-".into()),
            ..template.metadata.unwrap_or_default()
        },
        spec: template.spec,
        ..Pod::default()
    };
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let created = serde_json::to_value(&created).expect("json");
    let injected = created["spec"]["initContainers"]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == "projectionist-sidecar"))
        .cloned()
        .unwrap_or_else(|| panic!("no sidecar injected: {created}\n{}", operator.log_tail()));
    assert_eq!(injected["restartPolicy"], "Always");
    // The API server's ServiceAccount admission gave the app the pod's token, and the sidecar none.
    let token_mount = |c: &Value| {
        c["volumeMounts"].as_array().into_iter().flatten().any(|m| {
            m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
                && m["name"] != "projectionist-no-api-token"
        })
    };
    assert!(token_mount(&created["spec"]["containers"][0]), "{created}");
    assert!(!token_mount(&injected), "{injected}");
    assert_eq!(
        injected["image"],
        "ghcr.io/projectionist/projectionist-sidecar:0.1.0"
    );

    // The injected container, as a process: its args and env, its mounts under a temporary root.
    let root = dir.path().join("pod-root");
    materialise_volumes(&client, &created, &injected, &root).await;
    let env = resolve_env(&client, &created, &injected).await;
    let sidecar_admin = free_port().expect("port");
    let args: Vec<String> = injected["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg").to_string())
        .map(|a| {
            if a.starts_with('/') {
                root.join(a.trim_start_matches('/'))
                    .to_string_lossy()
                    .into_owned()
            } else {
                a
            }
        })
        .map(|a| {
            if a.starts_with("0.0.0.0:") {
                format!("127.0.0.1:{sidecar_admin}")
            } else {
                a
            }
        })
        .collect();
    let mut cmd = Command::new(&sidecar_bin);
    cmd.args(&args)
        .env_clear()
        .envs(env)
        // Tests run side by side: the API on a free port instead of the pod's fixed one.
        .env("PROJECTIONIST_API_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    let sidecar = ServerProcess::spawn(
        "projectionist-sidecar",
        cmd,
        &dir.path().join("sidecar.log"),
    )
    .expect("sidecar");

    // The sample events.
    let text = std::fs::read_to_string(repo::user_management_example().join("events.ndjson"))
        .expect("events");
    let events: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("event"))
        .collect();
    let js = nats.jetstream().await.expect("js");
    for e in &events {
        let mut headers = async_nats::HeaderMap::new();
        for (h, f) in [
            ("ce-specversion", "specversion"),
            ("ce-id", "id"),
            ("ce-type", "type"),
            ("ce-source", "source"),
            ("ce-subject", "subject"),
            ("ce-time", "time"),
        ] {
            headers.insert(h, e[f].as_str().expect("field"));
        }
        headers.insert("Nats-Msg-Id", e["id"].as_str().expect("id"));
        headers.insert("content-type", "application/json");
        let subject = format!(
            "user-management.users.{}",
            e["subject"].as_str().expect("subject")
        );
        js.publish_with_headers(subject, headers, e["data"].to_string().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }

    let (users, roles) = reference_fold(&events);
    eventually(
        "the read model equal to the reference fold",
        Duration::from_secs(60),
        || async {
            let (got_users, got_roles) = read_model(&db_url).await?;
            (got_users == users && got_roles == roles).then_some(())
        },
        || {
            format!(
                "sidecar:\n{}\noperator:\n{}",
                sidecar.log_tail(),
                operator.log_tail()
            )
        },
    )
    .await;
    assert_eq!(
        rows(&db_url, "SELECT event_id FROM projectionist_dead_letters").await,
        Some(vec![])
    );
    // Every UserCreated reached the service's endpoint (each user has one), and the Reactor is caught up.
    let mut created_ids: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "UserCreated")
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    created_ids.sort();
    eventually(
        "every UserCreated delivered to the endpoint",
        Duration::from_secs(60),
        || async {
            let mut unique = delivered.lock().expect("lock").clone();
            unique.sort();
            unique.dedup();
            (unique == created_ids).then_some(())
        },
        || format!("sidecar:\n{}", sidecar.log_tail()),
    )
    .await;
    eventually(
        "the Reactor caught up with nothing parked",
        Duration::from_secs(60),
        || async {
            let s = reactors.get("welcome-email").await.ok()?.status?;
            (s.pending == Some(0)
                && s.ack_pending == Some(0)
                && s.parked_aggregates == Some(0)
                && condition(&s.conditions, "CaughtUp")?.0 == "True")
                .then_some(())
        },
        || operator.log_tail(),
    )
    .await;
    let listed = plane
        .kubectl(&["get", "react", "-n", APP])
        .expect("kubectl");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    for column in ["STORE", "READY", "LAG", "PARKED", "AGE", "welcome-email"] {
        assert!(listed.contains(column), "{column} in:\n{listed}");
    }

    // The Projection's status: lag 0, every event acknowledged, CaughtUp.
    let status = eventually(
        "CaughtUp with lag 0",
        Duration::from_secs(60),
        || async {
            let s = projections.get("users-read-model").await.ok()?.status?;
            (s.pending == Some(0)
                && s.last_acked_sequence == Some(events.len() as u64)
                && condition(&s.conditions, "CaughtUp")?.0 == "True")
                .then_some(s)
        },
        || operator.log_tail(),
    )
    .await;
    assert_eq!(status.ack_pending, Some(0));
    assert!(
        status.active_sidecar.is_some(),
        "the pinned sidecar is shown"
    );

    // A rebuild: the token changes on the Projection; the operator updates the ConfigMap, the kubelet would update
    // the mounted file (done here by writing the volume again), the running sidecar reloads it, rebuilds, and records
    // it on the consumer; the Projection's Rebuilding condition goes True, then False with RebuildComplete.
    projections
        .patch(
            "users-read-model",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"rebuild": {"token": "2026-12-01"}}})),
        )
        .await
        .expect("patch");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), APP);
    eventually(
        "the ConfigMap with the new token",
        Duration::from_secs(30),
        || async {
            let cm = maps.get("users-read-model-sidecar-config").await.ok()?;
            cm.data?
                .get("users-read-model.yaml")?
                .contains("2026-12-01")
                .then_some(())
        },
        || operator.log_tail(),
    )
    .await;
    eventually(
        "Rebuilding",
        Duration::from_secs(30),
        || async {
            let s = projections.get("users-read-model").await.ok()?.status?;
            (condition(&s.conditions, "Rebuilding")?.0 == "True").then_some(())
        },
        || operator.log_tail(),
    )
    .await;
    materialise_volumes(&client, &created, &injected, &root).await;
    eventually(
        "RebuildComplete",
        Duration::from_secs(60),
        || async {
            let s = projections.get("users-read-model").await.ok()?.status?;
            let c = condition(&s.conditions, "Rebuilding")?;
            (c.0 == "False" && c.1 == "RebuildComplete").then_some(())
        },
        || {
            format!(
                "sidecar:\n{}\noperator:\n{}",
                sidecar.log_tail(),
                operator.log_tail()
            )
        },
    )
    .await;
    assert_eq!(
        rows(
            &db_url,
            "SELECT rebuild_token FROM projectionist_checkpoints"
        )
        .await,
        Some(vec![vec!["2026-12-01".to_string()]])
    );
    assert_eq!(
        read_model(&db_url).await,
        Some((users, roles)),
        "the rebuilt read model is the fold again"
    );

    // An opted-out pod is left alone.
    let opted_out: Pod = serde_json::from_value(json!({
        "metadata": {"name": "user-management-debug", "labels": {"app.kubernetes.io/name": "user-management"},
            "annotations": {"projectionist.dev/inject": "false"}},
        "spec": {"containers": [{"name": "app", "image": "example.org/user-management:1.0"}]}
    }))
    .expect("pod");
    let created = pods
        .create(&PostParams::default(), &opted_out)
        .await
        .expect("create pod");
    assert!(created.spec.expect("spec").init_containers.is_none());

    // Least privilege: what the chart grants the operator, against what it used in this run (the API server's audit
    // log). A verb the chart lacked would have failed the steps above.
    let used = plane.audited(&release.user()).expect("audit log");
    let mut granted = std::collections::BTreeSet::new();
    for role in release
        .manifests
        .iter()
        .filter(|m| m["kind"] == "ClusterRole" || m["kind"] == "Role")
    {
        for rule in role["rules"].as_array().into_iter().flatten() {
            let list = |field: &str| -> Vec<String> {
                rule[field]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            };
            for group in list("apiGroups") {
                for resource in list("resources") {
                    for verb in list("verbs") {
                        granted.insert((verb, group.clone(), resource.clone()));
                    }
                }
            }
        }
    }
    // Granted, and needed on paths this run does not take.
    let explained: BTreeMap<(&str, &str, &str), &str> = [
        (("update", "projectionist.dev", "eventstores/finalizers"), "blockOwnerDeletion on an owned ConfigMap, where owner-reference permissions are enforced"),
        (("update", "projectionist.dev", "projections/finalizers"), "blockOwnerDeletion on an owned ConfigMap, where owner-reference permissions are enforced"),
        (("update", "projectionist.dev", "reactors/finalizers"), "blockOwnerDeletion on an owned ConfigMap, where owner-reference permissions are enforced"),
        (("patch", "projectionist.dev", "eventstores"), "the finalizer of deletionPolicy: Delete"),
        (("patch", "events.k8s.io", "events"), "a repeated Event becomes a series"),
        (("get", "projectionist.dev", "eventstores"), "a Projection whose EventStore the cache does not yet show Ready reads it from the API server"),
        (("update", "", "secrets"), "rotating the webhook certificate"),
        (("create", "", "configmaps"), "server-side apply of a new ConfigMap: audited as patch, authorized as create"),
    ]
    .into_iter()
    .collect();
    let unneeded: Vec<_> = granted
        .difference(&used)
        .filter(|(v, g, r)| !explained.contains_key(&(v.as_str(), g.as_str(), r.as_str())))
        .collect();
    assert!(
        unneeded.is_empty(),
        "the chart grants the operator more than it uses: {unneeded:?}"
    );
}
