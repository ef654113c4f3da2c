//! The API through a real control plane (etcd, kube-apiserver, kube-controller-manager built from Go modules) and the
//! real `kubectl`: the CRDs are accepted (structural schema, CEL within the cost budget), explained and defaulted by
//! the API server, immutable changes are refused by its CEL transition rules, owned objects are garbage collected by
//! the controller manager, and a ServiceAccount has exactly what RBAC grants it.

use std::time::{Duration, Instant};

use projectionist_tests::control_plane::ControlPlane;
use serde_json::{Value, json};

fn plane() -> &'static ControlPlane {
    let plane = ControlPlane::shared().expect("control plane");
    plane
        .install_crds()
        .expect("the real API server accepts the CRDs");
    plane
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn get_json(plane: &ControlPlane, args: &[&str]) -> Value {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&ok(plane.kubectl(&all).expect("kubectl"))).expect("json")
}

fn store(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "projectionist.dev/v1alpha1", "kind": "EventStore",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nats": {"servers": ["nats://nats:4222"]}}})
}

/// `kubectl explain`, retried while the API server publishes a new CRD's OpenAPI document (a few seconds).
fn explain(plane: &ControlPlane, field: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = plane.kubectl(&["explain", field]).expect("kubectl");
        if out.status.success() || Instant::now() > deadline {
            return ok(out);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn kubectl_explain_prints_the_field_docs_of_the_crds() {
    let plane = plane();
    let out = explain(plane, "projection.spec.onError");
    assert!(
        out.contains("What happens when an event cannot be applied"),
        "{out}"
    );
    let out = explain(plane, "eventstore.spec.deletionPolicy");
    assert!(out.contains("Retain"), "{out}");
}

#[test]
fn the_api_server_applies_defaults_and_its_cel_rules_refuse_immutable_changes() {
    let plane = plane();
    plane
        .create_namespace("cp-defaults", &[])
        .expect("namespace");
    plane
        .apply_json(&store("cp-defaults", "orders"))
        .expect("created");
    let created = get_json(plane, &["eventstore", "orders", "-n", "cp-defaults"]);
    assert_eq!(created["spec"]["deletionPolicy"], "Retain");
    assert_eq!(created["spec"]["stream"]["storage"], "File");

    // storage is immutable (a transition rule); the server refuses and nothing changes.
    let patch = json!({"spec": {"stream": {"storage": "Memory", "guardrails": {"allowMemoryStorage": true}}}});
    let out = plane
        .kubectl(&[
            "patch",
            "eventstore",
            "orders",
            "-n",
            "cp-defaults",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])
        .expect("kubectl");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("storage is immutable"), "{err}");

    // A loosened guardrail without its opt-in is refused on create.
    let mut memory = store("cp-defaults", "memory");
    memory["spec"]["stream"] = json!({"storage": "Memory"});
    let err = plane.apply_json(&memory).expect_err("refused");
    assert!(err.to_string().contains("allowMemoryStorage"), "{err:#}");
}

#[test]
fn objects_owned_by_a_deleted_object_are_garbage_collected() {
    let plane = plane();
    plane.create_namespace("cp-gc", &[]).expect("namespace");
    plane.apply_json(&store("cp-gc", "owner")).expect("owner");
    let uid = get_json(plane, &["eventstore", "owner", "-n", "cp-gc"])["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    plane
        .apply_json(&json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "owned", "namespace": "cp-gc", "ownerReferences": [{
                "apiVersion": "projectionist.dev/v1alpha1", "kind": "EventStore", "name": "owner", "uid": uid,
                "controller": true, "blockOwnerDeletion": true}]},
            "data": {"k": "v"}}))
        .expect("owned");
    ok(plane
        .kubectl(&["delete", "eventstore", "owner", "-n", "cp-gc"])
        .expect("kubectl"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = plane
            .kubectl(&["get", "configmap", "owned", "-n", "cp-gc"])
            .expect("kubectl");
        if !out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the garbage collector deletes the owned ConfigMap"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_service_account_can_do_what_rbac_grants_and_nothing_else() {
    let plane = plane();
    plane.create_namespace("cp-rbac", &[]).expect("namespace");
    ok(plane
        .kubectl(&["create", "serviceaccount", "robot", "-n", "cp-rbac"])
        .expect("kubectl"));
    let kubeconfig = plane
        .service_account_kubeconfig("cp-rbac", "robot")
        .expect("kubeconfig");
    let can = |verb: &str, resource: &str| {
        let out = plane
            .kubectl_as(
                &kubeconfig,
                &["auth", "can-i", verb, resource, "-n", "cp-rbac"],
            )
            .expect("kubectl");
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(!can("list", "eventstores.projectionist.dev"));
    ok(plane
        .kubectl(&[
            "create",
            "role",
            "reader",
            "-n",
            "cp-rbac",
            "--verb=get,list,watch",
            "--resource=eventstores.projectionist.dev",
        ])
        .expect("kubectl"));
    ok(plane
        .kubectl(&[
            "create",
            "rolebinding",
            "robot-reads",
            "-n",
            "cp-rbac",
            "--role=reader",
            "--serviceaccount=cp-rbac:robot",
        ])
        .expect("kubectl"));
    assert!(can("list", "eventstores.projectionist.dev"));
    assert!(!can("delete", "eventstores.projectionist.dev"));
    assert!(!can("list", "secrets"));
    let listed = plane
        .kubectl_as(&kubeconfig, &["get", "eventstores", "-n", "cp-rbac"])
        .expect("kubectl");
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
}
