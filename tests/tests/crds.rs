//! The generated CRDs: in sync with the types, valid Kubernetes objects, and enforcing what the API promises
//! (schema bounds, enums, Secret references, CEL rules) on the examples and on malformed resources.

use std::process::Command;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use projectionist_crds::crd;
use projectionist_tests::control_plane::ControlPlane;
use projectionist_tests::repo;
use serde_json::{Value, json};

/// One field the API server refused, and why.
#[derive(Debug)]
struct Violation {
    field: String,
    message: String,
}

fn example(file: &str) -> Value {
    let text =
        std::fs::read_to_string(repo::user_management_example().join(file)).expect("example");
    serde_yaml::from_str(&text).expect("example YAML")
}

/// The real API server, with the CRDs installed, and a namespace of the calling test's own.
async fn server() -> (kube::Client, String) {
    let (plane, ns) = tokio::task::spawn_blocking(|| {
        let plane = ControlPlane::shared().expect("control plane");
        plane.install_crds().expect("CRDs");
        let ns = plane.fresh_namespace("crds", &[]).expect("namespace");
        (plane, ns)
    })
    .await
    .expect("join");
    (plane.client().await.expect("client"), ns)
}

fn api(client: &kube::Client, ns: &str, object: &Value) -> (Api<DynamicObject>, String) {
    let kind = object["kind"].as_str().expect("kind");
    let resource = ApiResource {
        group: "projectionist.dev".into(),
        version: "v1alpha1".into(),
        api_version: "projectionist.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: format!("{}s", kind.to_lowercase()),
    };
    let name = object["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    (Api::namespaced_with(client.clone(), ns, &resource), name)
}

/// Server-side apply with strict field validation: the object as stored (defaults applied), or every field refused.
async fn apply(
    client: &kube::Client,
    ns: &str,
    object: &Value,
    dry_run: bool,
) -> Result<Value, Vec<Violation>> {
    let mut object = object.clone();
    object["metadata"]["namespace"] = json!(ns);
    let (api, name) = api(client, ns, &object);
    let mut params = PatchParams::apply("crd-tests").force().validation_strict();
    if dry_run {
        params = params.dry_run();
    }
    match api.patch(&name, &params, &Patch::Apply(&object)).await {
        Ok(stored) => Ok(serde_json::to_value(stored).expect("json")),
        Err(kube::Error::Api(status)) => {
            let causes: Vec<Violation> = status
                .details
                .as_ref()
                .map(|d| {
                    d.causes
                        .iter()
                        .map(|c| Violation {
                            field: c.field.clone(),
                            message: c.message.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            if causes.is_empty() {
                Err(vec![Violation {
                    field: String::new(),
                    message: status.message,
                }])
            } else {
                Err(causes)
            }
        }
        Err(other) => panic!("the API server did not answer: {other}"),
    }
}

/// What the API server makes of creating `object` (a dry run: nothing is stored).
async fn validate_create(object: &Value) -> Result<Value, Vec<Violation>> {
    let (client, ns) = server().await;
    apply(&client, &ns, object, true).await
}

/// What the API server makes of changing `old` (stored first) into `new` (a dry run).
async fn validate_update(new: &Value, old: &Value) -> Result<Value, Vec<Violation>> {
    let (client, ns) = server().await;
    apply(&client, &ns, old, false)
        .await
        .expect("the old object is valid");
    apply(&client, &ns, new, true).await
}

fn rejected(result: Result<Value, Vec<Violation>>) -> Vec<Violation> {
    match result {
        Ok(v) => panic!("accepted: {v}"),
        Err(violations) => violations,
    }
}

fn assert_names(violations: &[Violation], field: &str) {
    assert!(
        violations.iter().any(|v| v.field == field),
        "expected a violation of {field}, got {violations:?}"
    );
}

#[test]
fn checked_in_crds_match_the_types() {
    let stale = crd::stale_files(&repo::crds());
    assert!(
        stale.is_empty(),
        "{stale:?} differ from the types; run `cargo run -p projectionist-crds --bin crdgen -- --out crds`"
    );
}

#[test]
fn crds_pass_kubernetes_validate_strict() {
    let files: Vec<_> = crd::files()
        .iter()
        .map(|f| repo::crds().join(&f.file_name))
        .collect();
    let (ok, text) = kubernetes_validate("1.37.0", &files);
    assert!(ok, "{text}");
    assert_eq!(text.matches("passed").count(), files.len(), "{text}");
}

#[test]
fn every_user_settable_field_is_documented() {
    fn walk(path: &str, schema: &Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let p = format!("{path}.{name}");
                let described = prop
                    .get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.trim().is_empty());
                // apiVersion/kind/metadata are Kubernetes' own; status is not set by users.
                let exempt = matches!(
                    p.as_str(),
                    ".apiVersion" | ".kind" | ".metadata" | ".status"
                ) || p.starts_with(".status.");
                if !described && !exempt {
                    missing.push(p.clone());
                }
                if !exempt {
                    walk(&p, prop, missing);
                }
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    for file in crd::files() {
        let schema = serde_json::to_value(&file.crd.spec.versions[0].schema).expect("schema");
        let mut missing = Vec::new();
        walk("", &schema["openAPIV3Schema"], &mut missing);
        // LabelSelector's inner fields come documented from Kubernetes' own types.
        assert!(
            missing.is_empty(),
            "{}: undocumented fields {missing:?}",
            file.file_name
        );
    }
}

#[test]
fn printer_columns_are_as_designed() {
    let cols = |crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        crd.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .map(|c| c.iter().map(|c| c.name.to_uppercase()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let crds = crd::crds();
    assert_eq!(
        cols(&crds[1]),
        ["STORE", "READY", "PARTITIONS", "LAG", "LAST-SEQ", "AGE"]
    );
    assert_eq!(
        cols(&crds[0]),
        [
            "STREAM",
            "READY",
            "PARTITIONS",
            "MESSAGES",
            "LAST-SEQ",
            "AGE"
        ]
    );
    assert_eq!(
        crds[0].spec.names.short_names,
        Some(vec!["evs".to_string()])
    );
    assert_eq!(
        crds[1].spec.names.short_names,
        Some(vec!["proj".to_string()])
    );
    for c in &crds {
        let v = &c.spec.versions[0];
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "status subresource"
        );
        assert_eq!(c.spec.scope, "Namespaced");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_are_accepted_and_defaulted() {
    let store = validate_create(&example("eventstore.yaml"))
        .await
        .expect("EventStore example");
    assert_eq!(store["spec"]["stream"]["storage"], json!("File"));
    assert_eq!(store["spec"]["stream"]["discard"], json!("New"));
    let projection = validate_create(&example("projection.yaml"))
        .await
        .expect("Projection example");
    assert_eq!(projection["spec"]["batch"]["maxEvents"], json!(500));
    // A minimal EventStore is valid too: every stream setting has a safe default.
    let minimal = json!({
        "apiVersion": "projectionist.dev/v1alpha1", "kind": "EventStore",
        "metadata": {"name": "orders", "namespace": "shop"},
        "spec": {"nats": {"servers": ["nats://nats:4222"]}}
    });
    let defaulted = validate_create(&minimal).await.expect("minimal EventStore");
    assert_eq!(defaulted["spec"]["deletionPolicy"], json!("Retain"));
    assert_eq!(defaulted["spec"]["stream"]["replicas"], json!(1));
}

#[test]
fn examples_deserialize_and_resolve() {
    let (store, projection) = repo::user_management_resources().expect("examples");
    let resolved =
        projectionist_crds::sidecar_config::resolve(&store, &projection).expect("resolves");
    assert_eq!(resolved.config.stream, "user-management_users");
    assert_eq!(resolved.config.handlers.len(), 5);
    projectionist_crds::stream::stream_config(&store).expect("stream config");
    projectionist_crds::consumer::consumer_config(&projection, &store).expect("consumer config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_enum_is_rejected_naming_the_field() {
    let mut p = example("projection.yaml");
    p["spec"]["database"]["driver"] = json!("oracle");
    assert_names(&rejected(validate_create(&p).await), "spec.database.driver");

    let mut s = example("eventstore.yaml");
    s["spec"]["deletionPolicy"] = json!("Shred");
    assert_names(&rejected(validate_create(&s).await), "spec.deletionPolicy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_bounds_are_rejected_naming_the_field() {
    let mut p = example("projection.yaml");
    p["spec"]["batch"]["maxEvents"] = json!(10_001);
    assert_names(&rejected(validate_create(&p).await), "spec.batch.maxEvents");
    p["spec"]["batch"]["maxEvents"] = json!(0);
    assert_names(&rejected(validate_create(&p).await), "spec.batch.maxEvents");

    let mut s = example("eventstore.yaml");
    s["spec"]["stream"]["replicas"] = json!(7);
    assert_names(&rejected(validate_create(&s).await), "spec.stream.replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_durations_and_urls_are_rejected() {
    let mut p = example("projection.yaml");
    p["spec"]["ackWait"] = json!("thirty seconds");
    assert_names(&rejected(validate_create(&p).await), "spec.ackWait");

    let mut s = example("eventstore.yaml");
    s["spec"]["nats"]["servers"] = json!(["http://nats:4222"]);
    assert_names(&rejected(validate_create(&s).await), "spec.nats.servers[0]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_reference_missing_its_key_is_rejected() {
    let mut p = example("projection.yaml");
    p["spec"]["database"]["urlSecret"] = json!({"name": "users-db"});
    assert_names(
        &rejected(validate_create(&p).await),
        "spec.database.urlSecret.key",
    );

    let mut s = example("eventstore.yaml");
    s["spec"]["nats"]["auth"]["userPassword"]["password"] = json!({"key": "password"});
    assert_names(
        &rejected(validate_create(&s).await),
        "spec.nats.auth.userPassword.password.name",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_rejected() {
    let mut p = example("projection.yaml");
    p["spec"]["handlers"][0]["sqll"] = json!(["SELECT 1"]);
    let v = rejected(validate_create(&p).await);
    assert!(v.iter().any(|v| v.message.contains("sqll")), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_credential_methods_are_rejected() {
    let mut s = example("eventstore.yaml");
    s["spec"]["nats"]["auth"]["token"] = json!({"name": "nats-token", "key": "token"});
    let v = rejected(validate_create(&s).await);
    assert!(
        v.iter()
            .any(|v| v.field == "spec.nats.auth" && v.message.contains("exactly one")),
        "{v:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_handler_event_types_are_rejected() {
    let mut p = example("projection.yaml");
    let first = p["spec"]["handlers"][0].clone();
    p["spec"]["handlers"]
        .as_array_mut()
        .expect("handlers")
        .push(first);
    let v = rejected(validate_create(&p).await);
    assert!(
        v.iter()
            .any(|v| v.field == "spec.handlers" && v.message.contains("only one handler")),
        "{v:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loosening_a_guardrail_needs_an_explicit_opt_in() {
    let mut s = example("eventstore.yaml");
    s["spec"]["stream"]["storage"] = json!("Memory");
    let v = rejected(validate_create(&s).await);
    assert!(
        v.iter()
            .any(|v| v.field == "spec.stream.storage" && v.message.contains("allowMemoryStorage")),
        "{v:?}"
    );

    let mut s = example("eventstore.yaml");
    s["spec"]["stream"]["maxAge"] = json!("720h");
    let v = rejected(validate_create(&s).await);
    assert!(v.iter().any(|v| v.field == "spec.stream.maxAge"), "{v:?}");
    s["spec"]["stream"]["guardrails"] = json!({"allowExpiry": true});
    validate_create(&s).await.expect("explicit opt-in accepted");

    let mut s = example("eventstore.yaml");
    s["spec"]["stream"]["discard"] = json!("Old");
    assert_names(&rejected(validate_create(&s).await), "spec.stream.discard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_at_fields_must_match_the_policy() {
    let mut p = example("projection.yaml");
    p["spec"]["startAt"] = json!({"policy": "Sequence"});
    let v = rejected(validate_create(&p).await);
    assert!(
        v.iter()
            .any(|v| v.field == "spec.startAt" && v.message.contains("sequence")),
        "{v:?}"
    );
    p["spec"]["startAt"] = json!({"policy": "Sequence", "sequence": 10});
    validate_create(&p).await.expect("consistent startAt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_stream_name_or_storage_on_update_is_rejected() {
    let mut old = example("eventstore.yaml");
    old["spec"]["stream"]["name"] = json!("USERS");
    let mut new = old.clone();
    new["spec"]["stream"]["name"] = json!("USERS_V2");
    let v = rejected(validate_update(&new, &old).await);
    assert!(
        v.iter()
            .any(|v| v.field == "spec.stream.name" && v.message.contains("immutable")),
        "{v:?}"
    );

    // Setting a name where the default was used also changes the stream.
    let unnamed = example("eventstore.yaml");
    let v = rejected(validate_update(&old, &unnamed).await);
    assert_names(&v, "spec.stream.name");

    let mut memory = old.clone();
    memory["spec"]["stream"]["storage"] = json!("Memory");
    memory["spec"]["stream"]["guardrails"] = json!({"allowMemoryStorage": true});
    let v = rejected(validate_update(&memory, &old).await);
    assert!(
        v.iter()
            .any(|v| v.field == "spec.stream.storage" && v.message.contains("immutable")),
        "{v:?}"
    );

    // A mutable change passes.
    let mut bigger = old.clone();
    bigger["spec"]["stream"]["maxBytes"] = json!(1_000_000_000);
    validate_update(&bigger, &old)
        .await
        .expect("mutable change accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_projection_event_store_on_update_is_rejected() {
    let old = example("projection.yaml");
    let mut new = old.clone();
    new["spec"]["eventStore"] = json!("orders");
    assert_names(
        &rejected(validate_update(&new, &old).await),
        "spec.eventStore",
    );
}

#[test]
fn the_examples_built_in_manifests_pass_kubernetes_validate_strict() {
    let dir = repo::user_management_example();
    let files = ["namespace.yaml", "secrets.yaml", "deployment.yaml"].map(|f| dir.join(f));
    let (ok, text) = kubernetes_validate("1.34.0", &files);
    assert!(ok, "{text}");
    assert_eq!(text.matches("passed").count(), 4, "{text}");
}

/// Runs `kubernetes-validate --strict` on `files`: whether it passed, and what it printed.
fn kubernetes_validate(version: &str, files: &[std::path::PathBuf]) -> (bool, String) {
    let bin = repo::root().join(".tools/bin/kubernetes-validate");
    assert!(
        bin.exists(),
        "kubernetes-validate missing: run scripts/setup.sh"
    );
    let out = Command::new(bin)
        .args(["--strict", "--kubernetes-version", version])
        .args(files)
        .output()
        .expect("runs kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
