//! The operator's own machinery against the real Kubernetes control plane and a real nats-server: leader election
//! over a Lease (only the leader reconciles; a standby takes over; the Lease is given up on shutdown) and the
//! injection webhook's certificate (issued, kept in a Secret, rotated before expiry, or read from files as
//! cert-manager mounts them).

mod common;

use std::time::Duration;

use common::{Env, consumer_info, eventually, projection_reason, store_ready};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// The chart's MutatingWebhookConfiguration, for the Service `projectionist-webhook` in `default`, with a CA
/// bundle (as cert-manager's injector writes it) or without (the operator patches it in).
/// The webhook configuration the chart installs, for this test's namespace only. The API server reaches the webhook
/// served on loopback through a `url` client config (a Service cannot point at 127.0.0.1).
async fn create_injector_config(env: &Env, port: u16, ca_bundle: Option<&str>) {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let mut client_config = json!({"url": format!("https://127.0.0.1:{port}/mutate")});
    if let Some(ca) = ca_bundle {
        client_config["caBundle"] = json!(k8s_openapi::ByteString(ca.as_bytes().to_vec()));
    }
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": env.webhook_config()},
        "webhooks": [{"name": "sidecar.projectionist.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "clientConfig": client_config,
            "namespaceSelector": {"matchLabels": {"projectionist.dev/injection": "enabled",
                "kubernetes.io/metadata.name": env.namespace}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]}]
    }))
    .expect("config");
    Api::<MutatingWebhookConfiguration>::all(env.client.clone())
        .create(&PostParams::default(), &config)
        .await
        .expect("create");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    let env = Env::start().await;
    let first = env.operator("op-a").await;
    let second = env.operator("op-b").await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), &env.namespace);
    let holder = eventually(
        "a lease holder",
        Duration::from_secs(30),
        || async {
            leases
                .get_opt("projectionist-operator")
                .await
                .ok()??
                .spec?
                .holder_identity
        },
        || first.log(),
    )
    .await;
    let (leader, standby) = if holder == "op-a" {
        (first, second)
    } else {
        (second, first)
    };
    env.apply_examples().await;
    store_ready(&env, &leader, "users").await;
    projection_reason(&env, &leader, "users-read-model", "ConsumerReady").await;
    assert_eq!(leader.metric("projectionist_operator_leader").await, 1.0);
    assert_eq!(standby.metric("projectionist_operator_leader").await, 0.0);
    assert_eq!(
        standby
            .metric("projectionist_operator_reconciles_total")
            .await,
        0.0,
        "the standby reconciles nothing"
    );
    assert_eq!(standby.get("/readyz").await.map(|r| r.0), Some(200));

    let mut leader = leader;
    leader.process.kill();
    let new_holder = eventually(
        "a new lease holder",
        Duration::from_secs(30),
        || async {
            let h = leases
                .get_opt("projectionist-operator")
                .await
                .ok()??
                .spec?
                .holder_identity?;
            (h == standby.identity).then_some(h)
        },
        || standby.log(),
    )
    .await;
    assert_eq!(new_holder, standby.identity);
    // The new leader reconciles: a change made now is applied.
    env.projections()
        .patch(
            "users-read-model",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ackWait": "50s"}})),
        )
        .await
        .expect("patch");
    let js = env.jetstream().await;
    let stream_name = env.example_store().stream_name();
    let consumer_name = env.example_projection().consumer_name();
    eventually(
        "consumer updated by the new leader",
        Duration::from_secs(30),
        || async {
            let info = consumer_info(&js, &stream_name, &consumer_name).await?;
            (info.config.ack_wait == Duration::from_secs(50)).then_some(())
        },
        || standby.log(),
    )
    .await;
    assert!(
        standby
            .metric("projectionist_operator_reconciles_total")
            .await
            > 0.0
    );

    // SIGTERM: the new leader stops cleanly and gives the Lease up at once.
    let mut standby = standby;
    standby.process.stop();
    let lease = leases.get("projectionist-operator").await.expect("lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        None,
        "released on shutdown"
    );
    assert!(standby.log().contains("stopped"), "{}", standby.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_certificate_is_issued_kept_in_a_secret_and_rotated_before_expiry() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::Secret;
    let env = Env::start().await;
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    let port = projectionist_tests::process::free_port().expect("port");
    create_injector_config(&env, port, None).await;
    let operator = env
        .operator_with(
            "op-1",
            &[
                "--webhook-addr",
                &format!("127.0.0.1:{port}"),
                "--cert-validity",
                "60s",
                "--cert-renew-before",
                "50s",
                "--cert-check-interval",
                "1s",
            ],
        )
        .await;
    // The operator keeps the certificate in its own namespace.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let read = || async {
        let s = secrets.get_opt("projectionist-webhook-tls").await.ok()??;
        let not_after = s
            .metadata
            .annotations
            .as_ref()?
            .get("projectionist.dev/not-after")?
            .clone();
        let ca = String::from_utf8(s.data.as_ref()?.get("ca.crt")?.0.clone()).ok()?;
        Some((not_after, ca))
    };
    let (first_expiry, first_ca) = eventually(
        "the certificate Secret",
        Duration::from_secs(30),
        read,
        || operator.log(),
    )
    .await;
    let bundle = || async {
        let c = hooks.get(&env.webhook_config()).await.ok()?;
        let b = c.webhooks?.first()?.client_config.ca_bundle.clone()?;
        String::from_utf8(b.0).ok()
    };
    let served = eventually(
        "the CA bundle patched",
        Duration::from_secs(30),
        || async { bundle().await.filter(|b| b.contains(first_ca.trim())) },
        || operator.log(),
    )
    .await;
    assert!(served.starts_with("-----BEGIN CERTIFICATE-----"));

    // Less than renewBefore is left from the start: the next check rotates it; the bundle keeps the old CA too.
    let (second_expiry, second_ca) = eventually(
        "a rotated certificate",
        Duration::from_secs(30),
        || async { read().await.filter(|(expiry, _)| *expiry != first_expiry) },
        || operator.log(),
    )
    .await;
    assert!(second_expiry > first_expiry);
    let new_ca = second_ca
        .split("-----END CERTIFICATE-----")
        .next()
        .expect("first CA")
        .to_string();
    let rotated = eventually(
        "the new CA in the bundle",
        Duration::from_secs(30),
        || async { bundle().await.filter(|b| b.contains(new_ca.trim())) },
        || operator.log(),
    )
    .await;
    assert!(
        rotated.contains(first_ca.trim()),
        "the old CA stays trusted during the rotation"
    );
    eventually(
        "the renewed certificate served",
        Duration::from_secs(30),
        || async {
            operator
                .log()
                .contains("serving the renewed webhook certificate")
                .then_some(())
        },
        || operator.log(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_files_is_served_as_with_cert_manager() {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let env = Env::start().await;
    // What cert-manager would write into the mounted Secret.
    let mut names =
        projectionist_operator::certs::service_names("projectionist-webhook", "default");
    names.push("127.0.0.1".into());
    let cert =
        projectionist_operator::certs::generate(&names, Duration::from_secs(3600)).expect("cert");
    let cert_dir = env.dir.path().join("webhook-tls");
    std::fs::create_dir_all(&cert_dir).expect("dir");
    std::fs::write(cert_dir.join("tls.crt"), &cert.cert_pem).expect("write");
    std::fs::write(cert_dir.join("tls.key"), &cert.key_pem).expect("write");
    std::fs::write(cert_dir.join("ca.crt"), &cert.ca_bundle).expect("write");
    // cert-manager's CA injector fills the bundle.
    let port = projectionist_tests::process::free_port().expect("port");
    create_injector_config(&env, port, Some(&cert.ca_bundle)).await;
    let operator = env
        .operator_with(
            "op-1",
            &[
                "--webhook-addr",
                &format!("127.0.0.1:{port}"),
                "--webhook-cert-dir",
                &cert_dir.to_string_lossy(),
            ],
        )
        .await;
    env.apply_examples().await;
    projection_reason(&env, &operator, "users-read-model", "ConsumerReady").await;
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    namespaces
        .patch(
            &env.namespace,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"projectionist.dev/injection": "enabled"}}}),
            ),
        )
        .await
        .expect("label");
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app", "labels": {"app.kubernetes.io/name": "user-management"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))
    .expect("pod");
    // The webhook answers once its cache has the Projection.
    let created = eventually(
        "an injected pod",
        Duration::from_secs(30),
        || {
            let (pods, pod) = (pods.clone(), pod.clone());
            async move {
                let created = pods.create(&PostParams::default(), &pod).await.ok()?;
                let injected = created
                    .spec
                    .as_ref()
                    .and_then(|s| s.init_containers.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.name == "projectionist-sidecar"));
                if !injected {
                    let _ = pods.delete("app", &DeleteParams::default()).await;
                }
                injected.then_some(created)
            }
        },
        || operator.log(),
    )
    .await;
    assert_eq!(
        created
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("projectionist.dev/sidecar"))
            .map(String::as_str),
        Some("injected")
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.client.clone(), "default");
    assert!(
        secrets
            .get_opt("projectionist-webhook-tls")
            .await
            .expect("get")
            .is_none(),
        "no self-issued certificate"
    );
}
