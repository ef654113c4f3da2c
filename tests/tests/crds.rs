//! The generated CRDs: in sync with the types, valid Kubernetes objects, and enforcing what the API promises
//! (schema bounds, enums, Secret references, CEL rules) on the examples and on malformed resources.

use std::process::Command;

use projectionist_crds::crd;
use projectionist_tests::crd_validation::{CrdValidator, Violation};
use projectionist_tests::repo;
use serde_json::{Value, json};

fn validator(file: &str) -> CrdValidator {
    let text = std::fs::read_to_string(repo::crds().join(file)).expect("CRD file");
    CrdValidator::from_yaml(&text).expect("CRD compiles")
}

fn eventstores() -> CrdValidator {
    validator("projectionist.dev_eventstores.yaml")
}

fn projections() -> CrdValidator {
    validator("projectionist.dev_projections.yaml")
}

fn example(file: &str) -> Value {
    let text =
        std::fs::read_to_string(repo::user_management_example().join(file)).expect("example");
    serde_yaml::from_str(&text).expect("example YAML")
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
    assert_eq!(text.matches("passed").count(), 2, "{text}");
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
    assert_eq!(cols(&crds[1]), ["STORE", "READY", "LAG", "LAST-SEQ", "AGE"]);
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

#[test]
fn examples_are_accepted_and_defaulted() {
    let store = eventstores()
        .validate_create(&example("eventstore.yaml"))
        .expect("EventStore example");
    assert_eq!(store["spec"]["stream"]["storage"], json!("File"));
    assert_eq!(store["spec"]["stream"]["discard"], json!("New"));
    let projection = projections()
        .validate_create(&example("projection.yaml"))
        .expect("Projection example");
    assert_eq!(projection["spec"]["batch"]["maxEvents"], json!(500));
    // A minimal EventStore is valid too: every stream setting has a safe default.
    let minimal = json!({
        "apiVersion": "projectionist.dev/v1alpha1", "kind": "EventStore",
        "metadata": {"name": "orders", "namespace": "shop"},
        "spec": {"nats": {"servers": ["nats://nats:4222"]}}
    });
    let defaulted = eventstores()
        .validate_create(&minimal)
        .expect("minimal EventStore");
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

#[test]
fn bad_enum_is_rejected_naming_the_field() {
    let mut p = example("projection.yaml");
    p["spec"]["database"]["driver"] = json!("oracle");
    assert_names(
        &rejected(projections().validate_create(&p)),
        "spec.database.driver",
    );

    let mut s = example("eventstore.yaml");
    s["spec"]["deletionPolicy"] = json!("Shred");
    assert_names(
        &rejected(eventstores().validate_create(&s)),
        "spec.deletionPolicy",
    );
}

#[test]
fn out_of_range_bounds_are_rejected_naming_the_field() {
    let mut p = example("projection.yaml");
    p["spec"]["batch"]["maxEvents"] = json!(10_001);
    assert_names(
        &rejected(projections().validate_create(&p)),
        "spec.batch.maxEvents",
    );
    p["spec"]["batch"]["maxEvents"] = json!(0);
    assert_names(
        &rejected(projections().validate_create(&p)),
        "spec.batch.maxEvents",
    );

    let mut s = example("eventstore.yaml");
    s["spec"]["stream"]["replicas"] = json!(7);
    assert_names(
        &rejected(eventstores().validate_create(&s)),
        "spec.stream.replicas",
    );
}

#[test]
fn malformed_durations_and_urls_are_rejected() {
    let mut p = example("projection.yaml");
    p["spec"]["ackWait"] = json!("thirty seconds");
    assert_names(&rejected(projections().validate_create(&p)), "spec.ackWait");

    let mut s = example("eventstore.yaml");
    s["spec"]["nats"]["servers"] = json!(["http://nats:4222"]);
    assert_names(
        &rejected(eventstores().validate_create(&s)),
        "spec.nats.servers.0",
    );
}

#[test]
fn secret_reference_missing_its_key_is_rejected() {
    let mut p = example("projection.yaml");
    p["spec"]["database"]["urlSecret"] = json!({"name": "users-db"});
    assert_names(
        &rejected(projections().validate_create(&p)),
        "spec.database.urlSecret.key",
    );

    let mut s = example("eventstore.yaml");
    s["spec"]["nats"]["auth"]["userPassword"]["password"] = json!({"key": "password"});
    assert_names(
        &rejected(eventstores().validate_create(&s)),
        "spec.nats.auth.userPassword.password.name",
    );
}

#[test]
fn unknown_fields_are_rejected() {
    let mut p = example("projection.yaml");
    p["spec"]["handlers"][0]["sqll"] = json!(["SELECT 1"]);
    let v = rejected(projections().validate_create(&p));
    assert!(
        v.iter()
            .any(|v| v.field == "spec.handlers.0" && v.message.contains("sqll")),
        "{v:?}"
    );
}

#[test]
fn two_credential_methods_are_rejected() {
    let mut s = example("eventstore.yaml");
    s["spec"]["nats"]["auth"]["token"] = json!({"name": "nats-token", "key": "token"});
    let v = rejected(eventstores().validate_create(&s));
    assert!(
        v.iter()
            .any(|v| v.field == "spec.nats.auth" && v.message.contains("exactly one")),
        "{v:?}"
    );
}

#[test]
fn duplicate_handler_event_types_are_rejected() {
    let mut p = example("projection.yaml");
    let first = p["spec"]["handlers"][0].clone();
    p["spec"]["handlers"]
        .as_array_mut()
        .expect("handlers")
        .push(first);
    let v = rejected(projections().validate_create(&p));
    assert!(
        v.iter()
            .any(|v| v.field == "spec.handlers" && v.message.contains("only one handler")),
        "{v:?}"
    );
}

#[test]
fn loosening_a_guardrail_needs_an_explicit_opt_in() {
    let mut s = example("eventstore.yaml");
    s["spec"]["stream"]["storage"] = json!("Memory");
    let v = rejected(eventstores().validate_create(&s));
    assert!(
        v.iter()
            .any(|v| v.field == "spec.stream.storage" && v.message.contains("allowMemoryStorage")),
        "{v:?}"
    );

    let mut s = example("eventstore.yaml");
    s["spec"]["stream"]["maxAge"] = json!("720h");
    let v = rejected(eventstores().validate_create(&s));
    assert!(v.iter().any(|v| v.field == "spec.stream.maxAge"), "{v:?}");
    s["spec"]["stream"]["guardrails"] = json!({"allowExpiry": true});
    eventstores()
        .validate_create(&s)
        .expect("explicit opt-in accepted");

    let mut s = example("eventstore.yaml");
    s["spec"]["stream"]["discard"] = json!("Old");
    assert_names(
        &rejected(eventstores().validate_create(&s)),
        "spec.stream.discard",
    );
}

#[test]
fn start_at_fields_must_match_the_policy() {
    let mut p = example("projection.yaml");
    p["spec"]["startAt"] = json!({"policy": "Sequence"});
    let v = rejected(projections().validate_create(&p));
    assert!(
        v.iter()
            .any(|v| v.field == "spec.startAt" && v.message.contains("sequence")),
        "{v:?}"
    );
    p["spec"]["startAt"] = json!({"policy": "Sequence", "sequence": 10});
    projections()
        .validate_create(&p)
        .expect("consistent startAt");
}

#[test]
fn changing_the_stream_name_or_storage_on_update_is_rejected() {
    let mut old = example("eventstore.yaml");
    old["spec"]["stream"]["name"] = json!("USERS");
    let mut new = old.clone();
    new["spec"]["stream"]["name"] = json!("USERS_V2");
    let v = rejected(eventstores().validate_update(&new, &old));
    assert!(
        v.iter()
            .any(|v| v.field == "spec.stream.name" && v.message.contains("immutable")),
        "{v:?}"
    );

    // Setting a name where the default was used also changes the stream.
    let unnamed = example("eventstore.yaml");
    let v = rejected(eventstores().validate_update(&old, &unnamed));
    assert_names(&v, "spec.stream.name");

    let mut memory = old.clone();
    memory["spec"]["stream"]["storage"] = json!("Memory");
    memory["spec"]["stream"]["guardrails"] = json!({"allowMemoryStorage": true});
    let v = rejected(eventstores().validate_update(&memory, &old));
    assert!(
        v.iter()
            .any(|v| v.field == "spec.stream.storage" && v.message.contains("immutable")),
        "{v:?}"
    );

    // A mutable change passes.
    let mut bigger = old.clone();
    bigger["spec"]["stream"]["maxBytes"] = json!(1_000_000_000);
    eventstores()
        .validate_update(&bigger, &old)
        .expect("mutable change accepted");
}

#[test]
fn changing_the_projection_event_store_on_update_is_rejected() {
    let old = example("projection.yaml");
    let mut new = old.clone();
    new["spec"]["eventStore"] = json!("orders");
    assert_names(
        &rejected(projections().validate_update(&new, &old)),
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
