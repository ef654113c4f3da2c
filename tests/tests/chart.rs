//! The Helm chart, through Helm's own engine: lint, renders of the default values and variants, Kubernetes schema
//! validation of every manifest, least-privilege RBAC, the CRDs, and values.schema.json.

use std::collections::BTreeSet;
use std::process::Command;

use projectionist_tests::helm::{self, find};
use projectionist_tests::repo;
use serde_json::{Value, json};

const RELEASE: &str = "projectionist";
const NAMESPACE: &str = "projectionist-system";

fn variants() -> Vec<(&'static str, Value)> {
    vec![
        ("default", json!({})),
        (
            "cert-manager",
            json!({"webhook": {"certManager": {"enabled": true}}}),
        ),
        (
            "cert-manager with an issuer",
            json!({"webhook": {"certManager": {"enabled": true, "issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}}}),
        ),
        (
            "regular container",
            json!({"sidecar": {"mode": "container", "workerThreads": 3}}),
        ),
        (
            "no monitoring",
            json!({"metrics": {"dashboard": {"enabled": false}, "serviceMonitor": {"enabled": false},
                "prometheusRule": {"enabled": false}, "podMonitor": {"enabled": false}}}),
        ),
        (
            "all monitoring",
            json!({"metrics": {"serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true},
                "podMonitor": {"enabled": true}}}),
        ),
        (
            "no webhook",
            json!({"webhook": {"enabled": false}, "replicaCount": 1, "podDisruptionBudget": {"enabled": false}}),
        ),
    ]
}

#[test]
fn lint_strict_passes_for_every_variant() {
    for (name, values) in variants() {
        let report = helm::lint(&values).expect("lint runs");
        let problems: Vec<&Value> = report["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(0) >= 2)
            .collect();
        assert!(problems.is_empty(), "{name}: {problems:?}");
        assert_eq!(report["errors"], json!([]), "{name}");
    }
}

#[test]
fn every_rendered_manifest_passes_kubernetes_validate_strict() {
    let bin = repo::root().join(".tools/bin/kubernetes-validate");
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (name, values)) in variants().into_iter().enumerate() {
        let manifests = helm::render(&values, RELEASE, NAMESPACE).expect(name);
        assert!(!manifests.is_empty(), "{name}");
        // Prometheus Operator and cert-manager kinds are custom resources kubernetes-validate has no schema for.
        let builtin: Vec<&Value> = manifests
            .iter()
            .filter(|m| {
                let api = m["apiVersion"].as_str().unwrap_or_default();
                !api.starts_with("monitoring.coreos.com/") && !api.starts_with("cert-manager.io/")
            })
            .collect();
        let file = dir.path().join(format!("variant-{i}.yaml"));
        let text: String = builtin
            .iter()
            .map(|m| format!("---\n{}", serde_yaml::to_string(m).expect("yaml")))
            .collect();
        std::fs::write(&file, text).expect("write");
        let out = Command::new(&bin)
            .args(["--strict", "--kubernetes-version", "1.34.0"])
            .arg(&file)
            .output()
            .expect("runs kubernetes-validate");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{name}: {report}");
        assert_eq!(
            report.matches("passed").count(),
            builtin.len(),
            "{name}: {report}"
        );
    }
}

#[test]
fn the_default_render_has_what_a_platform_team_expects() {
    let manifests = helm::render(&json!({}), RELEASE, NAMESPACE).expect("render");
    let deployment = find(&manifests, "Deployment", "projectionist").expect("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(
        pod["topologySpreadConstraints"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"],
        "ghcr.io/projectionist/projectionist-operator:0.1.0"
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(
        container["resources"]["requests"].is_object()
            && container["resources"]["limits"].is_object()
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--sidecar-image=ghcr.io/projectionist/projectionist-sidecar:0.1.0"),
        "{args:?}"
    );
    assert!(
        args.contains(&"--webhook-config=projectionist-sidecar-injector"),
        "{args:?}"
    );
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--sidecar-worker-threads")),
        "the sidecar chooses its threads unless told: {args:?}"
    );

    let hook = find(
        &manifests,
        "MutatingWebhookConfiguration",
        "projectionist-sidecar-injector",
    )
    .expect("webhook");
    let w = &hook["webhooks"][0];
    assert_eq!(w["failurePolicy"], "Fail");
    assert_eq!(w["timeoutSeconds"], 5);
    assert_eq!(
        w["namespaceSelector"]["matchLabels"]["projectionist.dev/injection"],
        "enabled"
    );
    assert_eq!(
        w["namespaceSelector"]["matchExpressions"],
        json!([{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NAMESPACE]}]),
        "the operator's own namespace is never injected"
    );
    assert_eq!(
        w["clientConfig"]["service"]["name"],
        "projectionist-webhook"
    );
    assert!(find(&manifests, "PodDisruptionBudget", "projectionist").is_some());
    assert!(find(&manifests, "ConfigMap", "projectionist-dashboard").is_some());
    let dashboard = find(&manifests, "ConfigMap", "projectionist-dashboard").expect("dashboard");
    let json_text = dashboard["data"]["projectionist.json"]
        .as_str()
        .expect("dashboard json");
    serde_json::from_str::<Value>(json_text).expect("the dashboard is JSON");

    // Variants: configurable failure policy and timeout; container mode; cert-manager wiring.
    let custom = helm::render(
        &json!({"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 2}, "sidecar": {"mode": "container", "workerThreads": 3}}),
        RELEASE,
        NAMESPACE,
    )
    .expect("render");
    let w = &find(
        &custom,
        "MutatingWebhookConfiguration",
        "projectionist-sidecar-injector",
    )
    .expect("webhook")["webhooks"][0];
    assert_eq!(w["failurePolicy"], "Ignore");
    assert_eq!(w["timeoutSeconds"], 2);
    let args = find(&custom, "Deployment", "projectionist").expect("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert!(
        args.as_array()
            .expect("args")
            .contains(&json!("--sidecar-mode=container"))
    );
    assert!(
        args.as_array()
            .expect("args")
            .contains(&json!("--sidecar-worker-threads=3")),
        "{args}"
    );
    let cm = helm::render(
        &json!({"webhook": {"certManager": {"enabled": true}}}),
        RELEASE,
        NAMESPACE,
    )
    .expect("render");
    assert!(find(&cm, "Certificate", "projectionist-webhook-tls").is_some());
    let hook = find(
        &cm,
        "MutatingWebhookConfiguration",
        "projectionist-sidecar-injector",
    )
    .expect("webhook");
    assert_eq!(
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "projectionist-system/projectionist-webhook-tls"
    );
}

/// Every (apiGroup, resource, verb, resourceName-restricted?) the operator is allowed, in the chart's default render.
fn grants(manifests: &[Value]) -> BTreeSet<String> {
    manifests
        .iter()
        .filter(|m| m["kind"] == "ClusterRole" || m["kind"] == "Role")
        .flat_map(|role| {
            let scope = if role["kind"] == "Role" {
                "namespace"
            } else {
                "cluster"
            };
            role["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .flat_map(move |rule| {
                    let mut out = Vec::new();
                    let named = rule.get("resourceNames").is_some();
                    for group in rule["apiGroups"].as_array().cloned().unwrap_or_default() {
                        for resource in rule["resources"].as_array().cloned().unwrap_or_default() {
                            for verb in rule["verbs"].as_array().cloned().unwrap_or_default() {
                                out.push(format!(
                                    "{scope} {}/{} {}{}",
                                    group.as_str().unwrap_or_default(),
                                    resource.as_str().unwrap_or_default(),
                                    verb.as_str().unwrap_or_default(),
                                    if named { " (named)" } else { "" }
                                ));
                            }
                        }
                    }
                    out
                })
        })
        .collect()
}

#[test]
fn rbac_grants_nothing_beyond_the_operators_needs() {
    let manifests = helm::render(&json!({}), RELEASE, NAMESPACE).expect("render");
    let allowed: BTreeSet<String> = [
        "cluster projectionist.dev/eventstores get",
        "cluster projectionist.dev/eventstores list",
        "cluster projectionist.dev/eventstores watch",
        "cluster projectionist.dev/eventstores patch",
        "cluster projectionist.dev/projections list",
        "cluster projectionist.dev/projections watch",
        "cluster projectionist.dev/projections patch",
        "cluster projectionist.dev/reactors list",
        "cluster projectionist.dev/reactors watch",
        "cluster projectionist.dev/reactors patch",
        "cluster projectionist.dev/reactors/status patch",
        "cluster projectionist.dev/reactors/finalizers update",
        "cluster projectionist.dev/eventstores/status patch",
        "cluster projectionist.dev/projections/status patch",
        "cluster projectionist.dev/eventstores/finalizers update",
        "cluster projectionist.dev/projections/finalizers update",
        "cluster /configmaps list",
        "cluster /configmaps watch",
        "cluster /configmaps create",
        "cluster /configmaps patch",
        "cluster /secrets get",
        "cluster events.k8s.io/events create",
        "cluster events.k8s.io/events patch",
        "cluster admissionregistration.k8s.io/mutatingwebhookconfigurations get (named)",
        "cluster admissionregistration.k8s.io/mutatingwebhookconfigurations patch (named)",
        "namespace coordination.k8s.io/leases get",
        "namespace coordination.k8s.io/leases create",
        "namespace coordination.k8s.io/leases update",
        "namespace /secrets get",
        "namespace /secrets create",
        "namespace /secrets update",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let granted = grants(&manifests);
    let beyond: Vec<&String> = granted.difference(&allowed).collect();
    assert!(
        beyond.is_empty(),
        "grants beyond the allow-list: {beyond:?}"
    );
    assert!(!granted.iter().any(|g| g.contains('*')), "no wildcards");
    // The ServiceAccount is bound to exactly these roles.
    let bindings: Vec<&Value> = manifests
        .iter()
        .filter(|m| m["kind"] == "ClusterRoleBinding" || m["kind"] == "RoleBinding")
        .collect();
    assert_eq!(bindings.len(), 2);
    for b in bindings {
        assert_eq!(b["subjects"][0]["name"], "projectionist");
    }
}

#[test]
fn the_charts_crds_are_the_generated_ones() {
    for crd in projectionist_crds::crd::files() {
        let in_chart = std::fs::read_to_string(helm::chart().join("crds").join(&crd.file_name))
            .expect("chart CRD");
        assert_eq!(
            in_chart, crd.yaml,
            "charts/projectionist/crds/{} is stale: copy crds/ into the chart",
            crd.file_name
        );
    }
    let count = std::fs::read_dir(helm::chart().join("crds"))
        .expect("crds dir")
        .count();
    assert_eq!(count, projectionist_crds::crd::files().len());
}

#[test]
fn values_schema_rejects_bad_values() {
    assert_eq!(helm::validate(&json!({})).expect("runs"), Ok(()));
    assert_eq!(
        helm::validate(&json!({"replicaCount": 3, "sidecar": {"mode": "container"}}))
            .expect("runs"),
        Ok(())
    );
    for bad in [
        json!({"replicaCount": "two"}),
        json!({"replicaCount": 0}),
        json!({"sidecar": {"mode": "sideways"}}),
        json!({"webhook": {"failurePolicy": "Maybe"}}),
        json!({"webhook": {"timeoutSeconds": 60}}),
        json!({"operator": {"statusInterval": "often"}}),
        json!({"image": {"pullPolicy": "Sometimes"}}),
        json!({"unknownKey": true}),
    ] {
        let result = helm::validate(&bad).expect("runs");
        assert!(result.is_err(), "accepted {bad}");
    }
}

#[test]
fn the_default_images_are_the_dockerfiles() {
    let values: Value = serde_yaml::from_str(
        &std::fs::read_to_string(helm::chart().join("values.yaml")).expect("values"),
    )
    .expect("yaml");
    for (file, repository) in [
        (
            "docker/operator.Dockerfile",
            values["image"]["repository"]
                .as_str()
                .expect("operator image"),
        ),
        (
            "docker/sidecar.Dockerfile",
            values["sidecar"]["image"]["repository"]
                .as_str()
                .expect("sidecar image"),
        ),
    ] {
        let text = std::fs::read_to_string(repo::root().join(file)).expect(file);
        assert!(
            text.contains(&format!(
                "org.opencontainers.image.ref.name=\"{repository}\""
            )),
            "{file} does not declare {repository}"
        );
        assert!(text.contains("USER 65532:65532"), "{file} runs as non-root");
        assert!(text.matches("FROM ").count() >= 2, "{file} is multi-stage");
    }
}
