//! The injection webhook's decisions, on AdmissionReviews as the API server sends them.

use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use projectionist_crds::{EventStore, Projection};
use projectionist_operator::webhook::{Candidates, Injection, inject, inject_candidates, review};
use projectionist_tests::repo;
use serde_json::{Value, json};

fn settings(native: bool) -> Injection {
    Injection {
        image: "example.org/projectionist-sidecar:test".into(),
        pull_policy: "IfNotPresent".into(),
        native,
        admin_port: 9464,
        worker_threads: None,
        resources: ResourceRequirements::default(),
    }
}

fn examples() -> (EventStore, Projection) {
    repo::user_management_resources().expect("example")
}

fn pod(labels: Value, annotations: Option<Value>) -> Pod {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app-1", "namespace": "user-management", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    });
    if let Some(a) = annotations {
        pod["metadata"]["annotations"] = a;
    }
    serde_json::from_value(pod).expect("pod")
}

fn app_pod() -> Pod {
    pod(json!({"app.kubernetes.io/name": "user-management"}), None)
}

fn patched(pod: &Pod, patch: &[Value]) -> Value {
    let mut value = serde_json::to_value(pod).expect("json");
    let ops: json_patch::Patch =
        serde_json::from_value(Value::Array(patch.to_vec())).expect("patch");
    json_patch::patch(&mut value, &ops).expect("the patch applies");
    value
}

fn sidecar(pod: &Value, list: &str) -> Value {
    pod["spec"][list]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "projectionist-sidecar")
        .cloned()
        .expect("the sidecar")
}

#[test]
fn a_matching_pod_gets_a_native_sidecar_with_config_secrets_and_hardening() {
    let (store, projection) = examples();
    let pod = app_pod();
    let decision = inject(&pod, &[(projection, Some(store))], &[], &settings(true));
    assert_eq!(decision.projections, ["users-read-model"]);
    let after = patched(&pod, &decision.patch);
    let c = sidecar(&after, "initContainers");
    assert_eq!(c["restartPolicy"], "Always");
    assert_eq!(c["image"], "example.org/projectionist-sidecar:test");
    assert_eq!(
        c["args"],
        json!([
            "run",
            "--config-dir",
            "/etc/projectionist",
            "--admin-addr",
            "0.0.0.0:9464"
        ])
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    // Secrets only as secretKeyRef env vars: the NATS user and password and the database URL.
    let refs: Vec<(String, String)> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| {
            let r = &e["valueFrom"]["secretKeyRef"];
            Some((
                r["name"].as_str()?.to_string(),
                r["key"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert!(
        refs.contains(&("nats-user-management".into(), "user".into())),
        "{refs:?}"
    );
    assert!(refs.contains(&("nats-user-management".into(), "password".into())));
    assert!(refs.contains(&("users-db".into(), "url".into())));
    assert!(
        !c["env"].to_string().contains("change-me"),
        "no secret value inline"
    );
    // The config mounted read-only from the Projection's ConfigMap.
    let mount = &c["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/etc/projectionist");
    assert_eq!(mount["readOnly"], true);
    let volume = &after["spec"]["volumes"][0];
    assert_eq!(
        volume["projected"]["sources"][0]["configMap"]["name"],
        "users-read-model-sidecar-config"
    );
    assert_eq!(
        after["metadata"]["annotations"]["projectionist.dev/injected"],
        "users-read-model"
    );
    // The application container is untouched.
    assert_eq!(
        after["spec"]["containers"],
        json!([{"name": "app", "image": "app:1"}])
    );
}

#[test]
fn regular_container_mode_appends_to_containers() {
    let (store, projection) = examples();
    let pod = app_pod();
    let decision = inject(&pod, &[(projection, Some(store))], &[], &settings(false));
    let after = patched(&pod, &decision.patch);
    let c = sidecar(&after, "containers");
    assert!(c.get("restartPolicy").is_none());
    assert_eq!(after["spec"]["containers"][0]["name"], "app");
    assert!(after["spec"].get("initContainers").is_none());
}

#[test]
fn opted_out_or_unmatched_pods_are_left_alone() {
    let (store, projection) = examples();
    let candidates = [(projection.clone(), Some(store.clone()))];
    let opted_out = pod(
        json!({"app.kubernetes.io/name": "user-management"}),
        Some(json!({"projectionist.dev/inject": "false"})),
    );
    assert!(
        inject(&opted_out, &candidates, &[], &settings(true))
            .patch
            .is_empty()
    );
    let other = pod(json!({"app.kubernetes.io/name": "billing"}), None);
    assert!(
        inject(&other, &candidates, &[], &settings(true))
            .patch
            .is_empty()
    );
    let mut no_selector = projection;
    no_selector.spec.pod_selector = None;
    assert!(
        inject(
            &app_pod(),
            &[(no_selector, Some(store))],
            &[],
            &settings(true)
        )
        .patch
        .is_empty()
    );
    assert!(
        inject(&app_pod(), &[], &[], &settings(true))
            .patch
            .is_empty()
    );
}

#[test]
fn injection_is_idempotent() {
    let (store, projection) = examples();
    let candidates = [(projection, Some(store))];
    let pod = app_pod();
    let once = patched(&pod, &inject(&pod, &candidates, &[], &settings(true)).patch);
    let once: Pod = serde_json::from_value(once).expect("pod");
    assert!(
        inject(&once, &candidates, &[], &settings(true))
            .patch
            .is_empty()
    );
}

#[test]
fn several_projections_share_one_sidecar() {
    let (store, projection) = examples();
    let mut second = projection.clone();
    second.metadata.name = Some("user-emails".into());
    let pod = app_pod();
    let decision = inject(
        &pod,
        &[(projection, Some(store.clone())), (second, Some(store))],
        &[],
        &settings(true),
    );
    assert_eq!(decision.projections, ["user-emails", "users-read-model"]);
    let after = patched(&pod, &decision.patch);
    assert_eq!(
        after["spec"]["initContainers"].as_array().map(Vec::len),
        Some(1)
    );
    let sources = after["spec"]["volumes"][0]["projected"]["sources"]
        .as_array()
        .expect("sources")
        .clone();
    assert_eq!(sources.len(), 2);
    assert_eq!(
        after["metadata"]["annotations"]["projectionist.dev/injected"],
        "user-emails,users-read-model"
    );
}

#[test]
fn a_projection_whose_store_is_missing_is_skipped_with_a_warning() {
    let (_, projection) = examples();
    let decision = inject(&app_pod(), &[(projection, None)], &[], &settings(true));
    assert!(decision.patch.is_empty());
    assert!(
        decision.warnings[0].contains("EventStore users not found"),
        "{:?}",
        decision.warnings
    );
}

#[test]
fn reviews_are_answered_and_malformed_ones_refused_with_a_reason() {
    let (store, projection) = examples();
    let candidates = |_: &str| Candidates {
        projections: vec![(projection.clone(), Some(store.clone()))],
        reactors: Vec::new(),
        stores: vec![store.clone()],
    };
    let request = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "8f3c", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "user-management", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": serde_json::to_value(app_pod()).expect("pod"),
            "dryRun": false
        }
    });
    let response =
        review(request.to_string().as_bytes(), candidates, &settings(true)).expect("answered");
    assert_eq!(response["response"]["uid"], "8f3c");
    assert_eq!(response["response"]["allowed"], true);
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    assert!(
        response["response"]["patch"]
            .as_str()
            .is_some_and(|p| !p.is_empty())
    );

    let err = review(b"{not json", candidates, &settings(true)).expect_err("malformed");
    assert!(err.contains("malformed AdmissionReview"), "{err}");
    let err = review(
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        candidates,
        &settings(true),
    )
    .expect_err("no request");
    assert!(err.contains("no request"), "{err}");
    let wrong_object = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
            "userInfo": {}, "object": {"spec": "not a pod spec"}}
    });
    assert!(
        review(
            wrong_object.to_string().as_bytes(),
            candidates,
            &settings(true)
        )
        .is_err()
    );
}

#[test]
fn an_annotated_pod_gets_the_sidecar_with_the_api_for_its_stores_and_their_credentials() {
    let (store, _) = examples();
    let pod = pod(
        json!({"app.kubernetes.io/name": "user-commands"}),
        Some(json!({"projectionist.dev/event-stores": "users, missing"})),
    );
    let decision = inject(&pod, &[], std::slice::from_ref(&store), &settings(true));
    assert!(decision.projections.is_empty());
    assert_eq!(decision.stores, vec!["users".to_string()]);
    assert!(
        decision.warnings.iter().any(|w| w.contains("missing")),
        "{:?}",
        decision.warnings
    );
    let patched = patched(&pod, &decision.patch);
    let sidecar = sidecar(&patched, "initContainers");
    let sources = patched["spec"]["volumes"][0]["projected"]["sources"].clone();
    assert_eq!(sources[0]["configMap"]["name"], "users-store-config");
    assert_eq!(
        sources[0]["configMap"]["items"][0]["path"],
        "users.store.yaml"
    );
    let env: Vec<&Value> = sidecar["env"].as_array().expect("env").iter().collect();
    assert!(
        env.iter()
            .any(|e| e["valueFrom"]["secretKeyRef"]["name"].is_string()),
        "the store's NATS credentials come from its Secrets: {env:?}"
    );
    assert_eq!(
        patched["metadata"]["annotations"]["projectionist.dev/injected-event-stores"],
        "users"
    );

    let unknown = pod_with_stores("nothing-here");
    let decision = inject(&unknown, &[], std::slice::from_ref(&store), &settings(true));
    assert!(decision.patch.is_empty());
}

fn pod_with_stores(stores: &str) -> Pod {
    pod(
        json!({"app.kubernetes.io/name": "user-commands"}),
        Some(json!({"projectionist.dev/event-stores": stores})),
    )
}

fn example_reactor() -> projectionist_crds::Reactor {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/reactors/welcome-email.yaml"
    ))
    .expect("example");
    serde_yaml::from_str(&text).expect("reactor")
}

#[test]
fn a_pod_selected_by_a_reactor_gets_the_sidecar_with_the_reactors_config_next_to_projections() {
    let (store, projection) = examples();
    let reactor = example_reactor();
    let email = pod(json!({"app.kubernetes.io/name": "email-service"}), None);
    let candidates = Candidates {
        projections: vec![(projection.clone(), Some(store.clone()))],
        reactors: vec![(reactor.clone(), Some(store.clone()))],
        stores: vec![store.clone()],
    };
    let decision = inject_candidates(&email, &candidates, &settings(true));
    assert_eq!(decision.reactors, ["welcome-email"]);
    assert!(decision.projections.is_empty());
    let pod = patched(&email, &decision.patch);
    assert_eq!(
        pod["metadata"]["annotations"]["projectionist.dev/injected-reactors"],
        "welcome-email"
    );
    let sources = pod["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "projectionist-config")
        .expect("config volume")["projected"]["sources"]
        .clone();
    assert_eq!(
        sources[0]["configMap"]["name"],
        "welcome-email-reactor-config"
    );
    assert_eq!(
        sources[0]["configMap"]["items"][0]["path"],
        "reactor-welcome-email.yaml"
    );
    // The NATS credentials of the store reach the sidecar.
    let container = sidecar(&pod, "initContainers");
    assert!(
        container["env"].as_array().expect("env").len() > 2,
        "{container}"
    );

    // A pod selected by both gets one sidecar running both.
    let mut both = reactor.clone();
    both.spec.pod_selector = projection.spec.pod_selector.clone();
    let candidates = Candidates {
        reactors: vec![(both, Some(store.clone()))],
        ..candidates
    };
    let decision = inject_candidates(&app_pod(), &candidates, &settings(true));
    assert_eq!(decision.projections, ["users-read-model"]);
    assert_eq!(decision.reactors, ["welcome-email"]);

    // A reactor whose store is missing is left out with a warning.
    let orphan = Candidates {
        projections: Vec::new(),
        reactors: vec![(reactor, None)],
        stores: Vec::new(),
    };
    let decision = inject_candidates(&email, &orphan, &settings(true));
    assert!(decision.patch.is_empty());
    assert!(
        decision.warnings[0].contains("reactor welcome-email not injected"),
        "{:?}",
        decision.warnings
    );
}

#[test]
fn the_sidecar_gets_the_worker_threads_it_is_configured_with() {
    let (store, projection) = examples();
    let mut threads = settings(true);
    threads.worker_threads = Some(3);
    let decision = inject(&app_pod(), &[(projection, Some(store))], &[], &threads);
    let after = patched(&app_pod(), &decision.patch);
    let args = sidecar(&after, "initContainers")["args"].clone();
    let args = args.as_array().expect("args");
    assert_eq!(args[5..], [json!("--worker-threads"), json!("3")]);
}
