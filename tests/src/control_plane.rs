//! A real Kubernetes control plane on loopback, run the way controller-runtime's envtest runs it: `etcd` (own data
//! dir, no fsync), `kube-apiserver` (free loopback ports, RBAC, a static admin token, a service-account signing key)
//! and `kube-controller-manager` (garbage collection, namespace lifecycle, service accounts and their tokens), all
//! built from Go modules by `scripts/kube-tools.sh`. There is no kubelet: pods stay Pending.
//!
//! [`ControlPlane::shared`] starts one per test binary, shared by its tests (each in namespaces of its own); the
//! processes are stopped by the watchdog when the test process ends. [`ControlPlane::start`] gives one of its own,
//! stopped on drop. Readiness and service-account tokens go through the real `kubectl`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use tempfile::TempDir;

use crate::process::{ServerProcess, free_port, wait_for_port};
use crate::repo;

/// Prefix of the control planes' directories under the temporary directory.
const DIR_PREFIX: &str = "projectionist-kube-";
/// File in such a directory naming the process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// Removes the directories of control planes whose test process has ended (a shared control plane is never dropped:
/// the watchdog stops its servers, and the next start removes what they left).
fn remove_abandoned_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let owned_by_a_live_process = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with(DIR_PREFIX))
            || std::fs::read_to_string(path.join(OWNER_FILE))
                .ok()
                .and_then(|pid| pid.trim().parse::<i32>().ok())
                .is_none_or(|pid| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                });
        if !owned_by_a_live_process {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// The admin user's static token (member of `system:masters`).
const ADMIN_TOKEN: &str = "projectionist-admin-token";

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    /// Data, certificates, kubeconfigs and logs.
    dir: TempDir,
    /// The API server's secure port on 127.0.0.1.
    port: u16,
    /// PEM of the CA that signed the API server's serving certificate.
    ca_pem: String,
    /// The servers, stopped in reverse order on drop.
    processes: Vec<ServerProcess>,
    /// Whether [`ControlPlane::install_crds`] ran.
    crds_installed: std::sync::Mutex<bool>,
}

/// Where a tool built by `scripts/kube-tools.sh` is.
pub fn tool(name: &str) -> crate::Result<PathBuf> {
    let path = repo::root().join(".tools/bin").join(name);
    if !path.exists() {
        bail!(
            "{} not found; run `bash scripts/kube-tools.sh` (scripts/setup.sh does) to build it",
            path.display()
        );
    }
    Ok(path)
}

impl ControlPlane {
    /// The control plane of this test binary, started on first use.
    pub fn shared() -> crate::Result<&'static ControlPlane> {
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Self::start().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("the control plane did not start: {e}"))
    }

    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until the API server is ready.
    pub fn start() -> crate::Result<Self> {
        remove_abandoned_dirs();
        let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
        let d = dir.path().to_path_buf();
        std::fs::write(d.join(OWNER_FILE), std::process::id().to_string())?;
        let ca = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "projectionist-test-ca");
        let ca_cert = ca_params.self_signed(&ca)?;
        let serving_key = rcgen::KeyPair::generate()?;
        let mut serving = rcgen::CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        serving
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca);
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;
        let sa_key = rcgen::KeyPair::generate()?;
        std::fs::write(d.join("ca.crt"), ca_cert.pem())?;
        std::fs::write(d.join("apiserver.crt"), serving_cert.pem())?;
        std::fs::write(d.join("apiserver.key"), serving_key.serialize_pem())?;
        std::fs::write(d.join("sa.key"), sa_key.serialize_pem())?;
        std::fs::write(d.join("sa.pub"), sa_key.public_key_pem())?;
        // Requests of ServiceAccounts are audited (metadata only), so tests can list what a component used.
        std::fs::write(
            d.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
             - level: Metadata\n  userGroups: [\"system:serviceaccounts\"]\n- level: None\n",
        )?;
        std::fs::write(
            d.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n"),
        )?;

        let (etcd_port, peer_port, port) = (free_port()?, free_port()?, free_port()?);
        let mut processes = Vec::new();
        let mut etcd = Command::new(tool("etcd")?);
        etcd.arg("--data-dir")
            .arg(d.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=default=http://127.0.0.1:{peer_port}"
            ))
            .args(["--unsafe-no-fsync", "--log-level=warn"]);
        processes.push(ServerProcess::spawn("etcd", etcd, &d.join("etcd.log"))?);
        if !wait_for_port(etcd_port, Duration::from_secs(30)) {
            bail!("etcd did not listen on {etcd_port}");
        }

        let mut apiserver = Command::new(tool("kube-apiserver")?);
        apiserver
            .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={port}"))
            .arg(format!(
                "--tls-cert-file={}",
                d.join("apiserver.crt").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                d.join("apiserver.key").display()
            ))
            .arg(format!("--client-ca-file={}", d.join("ca.crt").display()))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg(format!(
                "--audit-policy-file={}",
                d.join("audit-policy.yaml").display()
            ))
            .arg(format!(
                "--audit-log-path={}",
                d.join("audit.log").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .args([
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                "--profiling=false",
                // A loopback address cannot be published as the `kubernetes` Service's endpoint.
                "--endpoint-reconciler-type=none",
                "--v=1",
            ])
            .arg(format!(
                "--cert-dir={}",
                d.join("apiserver-certs").display()
            ));
        processes.push(ServerProcess::spawn(
            "kube-apiserver",
            apiserver,
            &d.join("kube-apiserver.log"),
        )?);
        let plane = Self {
            dir,
            port,
            ca_pem: ca_cert.pem(),
            processes,
            crds_installed: std::sync::Mutex::new(false),
        };
        plane.write_kubeconfig(&plane.admin_kubeconfig(), "admin", ADMIN_TOKEN)?;
        plane.wait_ready(Duration::from_secs(120))?;

        let mut controller_manager = Command::new(tool("kube-controller-manager")?);
        controller_manager
            .arg(format!("--kubeconfig={}", plane.admin_kubeconfig().display()))
            .arg("--controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller")
            .arg(format!("--service-account-private-key-file={}", d.join("sa.key").display()))
            .arg(format!("--root-ca-file={}", d.join("ca.crt").display()))
            .args(["--leader-elect=false", "--secure-port=0", "--v=1"]);
        let mut plane = plane;
        plane.processes.push(ServerProcess::spawn(
            "kube-controller-manager",
            controller_manager,
            &d.join("kube-controller-manager.log"),
        )?);
        // The service-account controller has created `default` in `default` once the controllers run.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !plane
            .kubectl(&["get", "serviceaccount", "default", "-n", "default"])
            .is_ok_and(|o| o.status.success())
        {
            if Instant::now() > deadline {
                bail!(
                    "kube-controller-manager did not create the default ServiceAccount:\n{}",
                    plane.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(plane)
    }

    /// Applies the CRDs of `crds/` (server-side) and waits until they are established; once per control plane.
    pub fn install_crds(&self) -> crate::Result<()> {
        let mut installed = self
            .crds_installed
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        if *installed {
            return Ok(());
        }
        let crds = repo::root().join("crds").display().to_string();
        let out = self.kubectl(&["apply", "--server-side", "-f", &crds])?;
        if !out.status.success() {
            bail!(
                "applying the CRDs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/eventstores.projectionist.dev",
            "crd/projections.projectionist.dev",
            "--timeout=60s",
        ])?;
        if !out.status.success() {
            bail!(
                "the CRDs are not established: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        *installed = true;
        Ok(())
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The admin kubeconfig (a `system:masters` token).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// A kube client with the admin kubeconfig.
    pub async fn client(&self) -> crate::Result<kube::Client> {
        Self::client_from(&self.admin_kubeconfig()).await
    }

    /// A kube client from a kubeconfig file.
    pub async fn client_from(kubeconfig: &Path) -> crate::Result<kube::Client> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(config, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A kubeconfig for a ServiceAccount, with a real token for it from the TokenRequest API.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> crate::Result<PathBuf> {
        let out = self.kubectl(&["create", "token", name, "-n", namespace, "--duration=24h"])?;
        if !out.status.success() {
            bail!(
                "kubectl create token {namespace}/{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let path = self
            .dir
            .path()
            .join(format!("sa-{namespace}-{name}.kubeconfig"));
        self.write_kubeconfig(
            &path,
            &format!("system:serviceaccount:{namespace}:{name}"),
            &token,
        )?;
        Ok(path)
    }

    /// Runs the real `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> crate::Result<std::process::Output> {
        self.kubectl_as(&self.admin_kubeconfig(), args)
    }

    /// Runs the real `kubectl` with `kubeconfig`.
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
    ) -> crate::Result<std::process::Output> {
        Command::new(tool("kubectl")?)
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(args)
            .output()
            .context("running kubectl")
    }

    /// Creates a namespace with `labels` and waits for its `default` ServiceAccount (pods need it).
    pub fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) -> crate::Result<()> {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let manifest = serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}});
        self.apply_json(&manifest)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .kubectl(&["get", "serviceaccount", "default", "-n", name])
            .is_ok_and(|o| o.status.success())
        {
            if Instant::now() > deadline {
                bail!("no default ServiceAccount in {name}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// A new namespace named `<prefix>-<n>` (unique in this process), with `labels`, its `default` ServiceAccount there.
    pub fn fresh_namespace(&self, prefix: &str, labels: &[(&str, &str)]) -> crate::Result<String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "{prefix}-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.create_namespace(&name, labels)?;
        Ok(name)
    }

    /// Lets the API server reach a webhook served on this machine at `port` through the webhook configuration
    /// `config`, whose client config names the Service `namespace/service`: the Service becomes an `ExternalName`
    /// Service for `localhost` and the configuration's port `port`. The API server then dials `localhost:<port>` and
    /// verifies the certificate for the Service's DNS name (a Service's endpoints cannot be a loopback address).
    pub fn route_webhook_to_localhost(
        &self,
        namespace: &str,
        service: &str,
        config: &str,
        port: u16,
    ) -> crate::Result<()> {
        let patch = format!(
            r#"[{{"op":"replace","path":"/webhooks/0/clientConfig/service/port","value":{port}}}]"#
        );
        for args in [
            vec!["delete", "service", service, "-n", namespace],
            vec![
                "create",
                "service",
                "externalname",
                service,
                "-n",
                namespace,
                "--external-name=localhost",
            ],
            vec![
                "patch",
                "mutatingwebhookconfiguration",
                config,
                "--type=json",
                "-p",
                &patch,
            ],
        ] {
            let out = self.kubectl(&args)?;
            if !out.status.success() {
                bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(())
    }

    /// `kubectl apply` of one object given as JSON.
    pub fn apply_json(&self, object: &serde_json::Value) -> crate::Result<String> {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), object.to_string())?;
        let path = file.path().display().to_string();
        let out = self.kubectl(&["apply", "--server-side", "-f", &path])?;
        if !out.status.success() {
            bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What `user` did so far, from the audit log: `(verb, apiGroup, resource[/subresource])` of every request the
    /// API server allowed (requests of ServiceAccounts are audited).
    pub fn audited(
        &self,
        user: &str,
    ) -> crate::Result<std::collections::BTreeSet<(String, String, String)>> {
        Ok(self
            .audit_requests(user)?
            .into_iter()
            .map(|r| (r.verb, r.group, r.resource))
            .collect())
    }

    /// Every request of `user` the API server allowed so far, once each (a watch is logged when it starts and when
    /// it ends), in the order they started.
    pub fn audit_requests(&self, user: &str) -> crate::Result<Vec<AuditedRequest>> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let mut requests = Vec::new();
        for line in text.lines() {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let code = event["responseStatus"]["code"].as_u64().unwrap_or(0);
            if event["user"]["username"] != user || code == 403 || event["objectRef"].is_null() {
                continue;
            }
            let id = event["auditID"].as_str().unwrap_or_default().to_string();
            if !seen.insert(id.clone()) {
                continue;
            }
            let object = &event["objectRef"];
            let mut resource = object["resource"].as_str().unwrap_or_default().to_string();
            if let Some(sub) = object["subresource"].as_str() {
                resource = format!("{resource}/{sub}");
            }
            requests.push(AuditedRequest {
                id,
                verb: event["verb"].as_str().unwrap_or_default().to_string(),
                group: object["apiGroup"].as_str().unwrap_or_default().to_string(),
                resource,
            });
        }
        Ok(requests)
    }

    /// The last lines of every server's log.
    pub fn log_tail(&self) -> String {
        self.processes
            .iter()
            .map(ServerProcess::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn write_kubeconfig(&self, path: &Path, user: &str, token: &str) -> crate::Result<()> {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let config = serde_json::json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.server(), "certificate-authority-data": ca}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
        });
        std::fs::write(path, serde_yaml::to_string(&config)?)?;
        Ok(())
    }

    fn wait_ready(&self, timeout: Duration) -> crate::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.kubectl(&["get", "--raw", "/readyz"])?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready (kubectl: {}):\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// One request in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditedRequest {
    /// The request's audit ID.
    pub id: String,
    /// `get`, `list`, `watch`, `create`, `patch`, …
    pub verb: String,
    /// The API group (`""` for the core group).
    pub group: String,
    /// The resource, with `/subresource` where there is one.
    pub resource: String,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(mut p) = self.processes.pop() {
            p.stop();
        }
    }
}
