//! `projectionist-local-cluster`: a local cluster to try Projectionist on, all processes on loopback — the control
//! plane (etcd, kube-apiserver, kube-controller-manager), a nats-server and PostgreSQL; the chart installed with
//! `helm`; the operator run as a process with the chart's ServiceAccount; the example applied. It prints the
//! `kubectl` commands to try and runs until Ctrl-C, then stops everything it started.
//!
//! Run it with `bash scripts/local-cluster.sh`.

use std::time::Duration;

use anyhow::bail;
use projectionist_tests::control_plane::{ControlPlane, tool};
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use projectionist_tests::process::{ServerProcess, wait_for_port};
use projectionist_tests::release::Release;
use projectionist_tests::repo;

const SYSTEM: &str = "projectionist-system";
const APP: &str = "user-management";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("projectionist-local-")
        .tempdir()?;
    println!("starting the control plane (etcd, kube-apiserver, kube-controller-manager)…");
    let plane = tokio::task::spawn_blocking(ControlPlane::start).await??;
    let kubeconfig = plane.admin_kubeconfig();
    let nats = NatsServer::start_with_user("user-management", "change-me").await?;
    let postgres = Postgres::start().await?;
    let db_url = postgres.fresh_database().await?;

    println!("installing the chart with helm…");
    let release = Release::install(&plane, SYSTEM, &work.path().join("operator"), &[])?;
    let (admin_port, webhook_port) = (release.admin_port, release.webhook_port);
    let mut operator = release.operator_command(
        &repo::root().join("target/debug/projectionist-operator"),
        "projectionist-local",
    );
    operator.env("RUST_LOG", "info,kube=warn");
    let operator = ServerProcess::spawn(
        "projectionist-operator",
        operator,
        &work.path().join("operator.log"),
    )?;
    if !wait_for_port(admin_port, Duration::from_secs(30)) {
        bail!("the operator did not start:\n{}", operator.log_tail());
    }
    // The API server reaches the webhook on this machine.
    plane.route_webhook_to_localhost(
        SYSTEM,
        "projectionist-webhook",
        "projectionist-sidecar-injector",
        webhook_port,
    )?;

    println!("applying the example…");
    let example = repo::user_management_example();
    let kubectl = |args: &[&str]| plane.kubectl(args);
    for file in ["namespace.yaml", "eventstore.yaml", "projection.yaml"] {
        let text = std::fs::read_to_string(example.join(file))?
            .replace("nats://nats.nats.svc.cluster.local:4222", &nats.url());
        let path = work.path().join(file);
        std::fs::write(&path, text)?;
        let out = kubectl(&["apply", "-f", &path.display().to_string()])?;
        if !out.status.success() {
            bail!(
                "kubectl apply {file}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for (name, pairs) in [
        (
            "nats-user-management",
            vec![
                "--from-literal=user=user-management",
                "--from-literal=password=change-me",
            ],
        ),
        ("users-db", vec![]),
    ] {
        let url = format!("--from-literal=url={db_url}");
        let mut args = vec!["create", "secret", "generic", name, "-n", APP];
        args.extend(pairs.iter().copied());
        if name == "users-db" {
            args.push(&url);
        }
        let out = kubectl(&args)?;
        if !out.status.success() {
            bail!(
                "kubectl create secret {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let ready = kubectl(&[
        "wait",
        "--for=condition=Ready",
        "proj/users-read-model",
        "-n",
        APP,
        "--timeout=60s",
    ])?;
    if !ready.status.success() {
        bail!(
            "the Projection did not become Ready: {}\n{}",
            String::from_utf8_lossy(&ready.stderr),
            operator.log_tail()
        );
    }

    println!(
        "\nA local cluster is running. There is no kubelet or scheduler: pods stay Pending, but a pod created in \
         {APP} (kubectl run probe -n {APP} --image=x --labels=app.kubernetes.io/name=user-management) comes back \
         with the injected sidecar. Try:\n\n  export KUBECONFIG={}\n  {} get evs,proj -A\n  \
         {} describe proj users-read-model -n {APP}\n  {} explain projection.spec.onError\n  \
         {} get events -n {APP}\n\nNATS: {}  PostgreSQL (read model): {db_url}\nOperator log: {}\n\nCtrl-C stops \
         everything.",
        kubeconfig.display(),
        tool("kubectl")?.display(),
        tool("kubectl")?.display(),
        tool("kubectl")?.display(),
        tool("kubectl")?.display(),
        nats.url(),
        work.path().join("operator.log").display()
    );
    tokio::signal::ctrl_c().await?;
    println!("stopping…");
    drop(operator);
    drop(plane);
    Ok(())
}
