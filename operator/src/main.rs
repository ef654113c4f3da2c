//! `projectionist-operator`: reconciles EventStores into JetStream streams and Projections into durable consumers
//! plus the sidecar's config. `run` is the operator itself; `crds` and `plan` are tooling. See `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use clap::{Parser, Subcommand};
use projectionist_crds::manifest::Manifests;
use projectionist_crds::sidecar_config::{SecretSource, resolve};
use projectionist_crds::{consumer, crd, stream};
use projectionist_operator::context::Settings;
use projectionist_operator::webhook::Injection;
use projectionist_operator::{certs, runtime};

/// Projectionist's Kubernetes operator: EventStore → JetStream stream (an append-only ledger), Projection → durable
/// consumer and the sidecar's config.
#[derive(Debug, Parser)]
#[command(name = "projectionist-operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the operator: the EventStore and Projection controllers (on the replica holding the leader Lease), and
    /// the admin endpoints (`/healthz`, `/readyz`, `/metrics`) on every replica. Reaches Kubernetes in-cluster or
    /// through `KUBECONFIG`.
    Run(Box<RunArgs>),
    /// Prints the CustomResourceDefinitions (EventStore, Projection) as YAML, ready for `kubectl apply -f -`.
    Crds,
    /// Shows what the operator would provision for EventStore/Projection YAML: the JetStream stream and consumer
    /// configs, and the Secret keys each sidecar needs.
    Plan {
        /// YAML files or directories holding the EventStore(s) and Projection(s).
        #[arg(
            short = 'f',
            long = "filename",
            env = "PROJECTIONIST_MANIFESTS",
            required = true,
            value_delimiter = ','
        )]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Address of the admin HTTP server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "PROJECTIONIST_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: std::net::SocketAddr,
    /// Name of the Lease used for leader election.
    #[arg(
        long,
        env = "PROJECTIONIST_LEASE_NAME",
        default_value = "projectionist-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease and in Events (the pod name). Defaults to the host name and PID.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a leader's Lease holds without renewal; a standby takes over after it.
    #[arg(long, env = "PROJECTIONIST_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    lease_duration: Duration,
    /// Reconcile only resources in this namespace (default: all namespaces).
    #[arg(long, env = "PROJECTIONIST_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// How often streams are re-checked for changes made outside the operator.
    #[arg(long, env = "PROJECTIONIST_RESYNC_INTERVAL", default_value = "60s", value_parser = duration)]
    resync_interval: Duration,
    /// How often a Projection's status (lag, last acknowledged sequence) is refreshed from its consumer.
    #[arg(long, env = "PROJECTIONIST_STATUS_INTERVAL", default_value = "15s", value_parser = duration)]
    status_interval: Duration,
    /// A projection with pending events that acknowledges none for this long is marked `Stalled`.
    #[arg(long, env = "PROJECTIONIST_STALL_AFTER", default_value = "5m", value_parser = duration)]
    stall_after: Duration,
    /// Reconciles run at once per controller.
    #[arg(long, env = "PROJECTIONIST_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Timeout of NATS connects and JetStream API calls.
    #[arg(long, env = "PROJECTIONIST_NATS_TIMEOUT", default_value = "5s", value_parser = duration)]
    nats_timeout: Duration,
    /// Writable directory for TLS material read from Secrets (files NATS TLS needs).
    #[arg(
        long,
        env = "PROJECTIONIST_WORK_DIR",
        default_value = "/tmp/projectionist-operator"
    )]
    work_dir: PathBuf,
    /// Log format.
    #[arg(long, env = "PROJECTIONIST_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
    #[command(flatten)]
    webhook: WebhookArgs,
}

/// The sidecar injection webhook (served by every replica).
#[derive(Debug, clap::Args)]
struct WebhookArgs {
    /// Do not serve the injection webhook.
    #[arg(long, env = "PROJECTIONIST_DISABLE_WEBHOOK")]
    disable_webhook: bool,
    /// HTTPS address of the webhook (`POST /mutate`).
    #[arg(
        long,
        env = "PROJECTIONIST_WEBHOOK_ADDR",
        default_value = "0.0.0.0:8443"
    )]
    webhook_addr: std::net::SocketAddr,
    /// Serve the certificate in this directory (`tls.crt`, `tls.key`; e.g. cert-manager's Secret mounted) instead
    /// of generating and rotating one.
    #[arg(long, env = "PROJECTIONIST_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<PathBuf>,
    /// The Service in front of the webhook (the generated certificate names its DNS names).
    #[arg(
        long,
        env = "PROJECTIONIST_WEBHOOK_SERVICE",
        default_value = "projectionist-webhook"
    )]
    webhook_service: String,
    /// The Secret, in the operator's namespace, that holds the generated certificate.
    #[arg(
        long,
        env = "PROJECTIONIST_WEBHOOK_SECRET",
        default_value = "projectionist-webhook-tls"
    )]
    webhook_secret: String,
    /// The MutatingWebhookConfiguration whose CA bundle the operator keeps current.
    #[arg(
        long,
        env = "PROJECTIONIST_WEBHOOK_CONFIG",
        default_value = "projectionist-sidecar-injector"
    )]
    webhook_config: String,
    /// Validity of a generated certificate.
    #[arg(long, env = "PROJECTIONIST_CERT_VALIDITY", default_value = "8760h", value_parser = duration)]
    cert_validity: Duration,
    /// A generated certificate is replaced when less than this is left.
    #[arg(long, env = "PROJECTIONIST_CERT_RENEW_BEFORE", default_value = "720h", value_parser = duration)]
    cert_renew_before: Duration,
    /// How often the certificate is checked (and reloaded when it changed).
    #[arg(long, env = "PROJECTIONIST_CERT_CHECK_INTERVAL", default_value = "10m", value_parser = duration)]
    cert_check_interval: Duration,
    /// Image of the injected sidecar.
    #[arg(
        long,
        env = "PROJECTIONIST_SIDECAR_IMAGE",
        default_value = "ghcr.io/projectionist/projectionist-sidecar:0.1.0"
    )]
    sidecar_image: String,
    /// Pull policy of the injected sidecar.
    #[arg(long, env = "PROJECTIONIST_SIDECAR_PULL_POLICY", default_value = "IfNotPresent",
        value_parser = ["Always", "IfNotPresent", "Never"])]
    sidecar_pull_policy: String,
    /// `native`: an init container with `restartPolicy: Always` (Kubernetes ≥ 1.29); `container`: a regular one.
    #[arg(long, env = "PROJECTIONIST_SIDECAR_MODE", default_value = "native", value_parser = ["native", "container"])]
    sidecar_mode: String,
    /// Port of the sidecar's admin endpoints (probes, metrics).
    #[arg(long, env = "PROJECTIONIST_SIDECAR_ADMIN_PORT", default_value_t = 9464)]
    sidecar_admin_port: u16,
    /// Worker threads of the sidecar's async runtime (its `--worker-threads`); unset: the sidecar's default.
    #[arg(long, env = "PROJECTIONIST_SIDECAR_WORKER_THREADS",
        value_parser = clap::value_parser!(u16).range(1..=256))]
    sidecar_worker_threads: Option<u16>,
    /// CPU request of the sidecar.
    #[arg(long, env = "PROJECTIONIST_SIDECAR_CPU_REQUEST", default_value = "50m")]
    sidecar_cpu_request: String,
    /// Memory request of the sidecar.
    #[arg(
        long,
        env = "PROJECTIONIST_SIDECAR_MEMORY_REQUEST",
        default_value = "32Mi"
    )]
    sidecar_memory_request: String,
    /// CPU limit of the sidecar (none by default).
    #[arg(long, env = "PROJECTIONIST_SIDECAR_CPU_LIMIT")]
    sidecar_cpu_limit: Option<String>,
    /// Memory limit of the sidecar.
    #[arg(
        long,
        env = "PROJECTIONIST_SIDECAR_MEMORY_LIMIT",
        default_value = "128Mi"
    )]
    sidecar_memory_limit: String,
}

impl WebhookArgs {
    fn options(self, namespace: &str) -> Option<runtime::WebhookOptions> {
        if self.disable_webhook {
            return None;
        }
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let mut limits = std::collections::BTreeMap::from([(
            "memory".to_string(),
            Quantity(self.sidecar_memory_limit),
        )]);
        if let Some(cpu) = self.sidecar_cpu_limit {
            limits.insert("cpu".into(), Quantity(cpu));
        }
        let requests = std::collections::BTreeMap::from([
            ("cpu".to_string(), Quantity(self.sidecar_cpu_request)),
            ("memory".to_string(), Quantity(self.sidecar_memory_request)),
        ]);
        let certs = match self.webhook_cert_dir {
            Some(dir) => certs::Source::Files(dir),
            None => certs::Source::Managed {
                namespace: namespace.to_string(),
                secret: self.webhook_secret,
                service: self.webhook_service,
                webhook_config: self.webhook_config,
                validity: self.cert_validity,
                renew_before: self.cert_renew_before,
            },
        };
        Some(runtime::WebhookOptions {
            addr: self.webhook_addr,
            certs,
            cert_check_interval: self.cert_check_interval,
            injection: Injection {
                image: self.sidecar_image,
                pull_policy: self.sidecar_pull_policy,
                native: self.sidecar_mode == "native",
                admin_port: self.sidecar_admin_port,
                worker_threads: self.sidecar_worker_threads,
                resources: k8s_openapi::api::core::v1::ResourceRequirements {
                    limits: Some(limits),
                    requests: Some(requests),
                    ..Default::default()
                },
            },
        })
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    projectionist_crds::duration::parse(text).map_err(|e| e.to_string())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let webhook = args.webhook.options(&args.lease_namespace);
    let options = runtime::Options {
        webhook,
        admin_addr: args.admin_addr,
        lease_name: args.lease_name,
        lease_namespace: args.lease_namespace,
        identity,
        lease_duration: args.lease_duration,
        namespace: args.watch_namespace,
        concurrency: args.concurrency,
        nats_timeout: args.nats_timeout,
        work_dir: args.work_dir,
        settings: Settings {
            resync: args.resync_interval,
            status_interval: args.status_interval,
            stall_after: args.stall_after,
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(runtime::run(options))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Crds => {
            for file in crd::files() {
                print!("---\n{}", file.yaml);
            }
            Ok(())
        }
        Command::Plan { files } => plan(&files),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn plan(files: &[PathBuf]) -> anyhow::Result<()> {
    let manifests = Manifests::read(files)?;
    for store in &manifests.event_stores {
        let name = store.metadata.name.clone().unwrap_or_default();
        let config =
            stream::stream_config(store).map_err(|e| anyhow::anyhow!("EventStore {name}: {e}"))?;
        println!(
            "EventStore {name}: stream {} on {:?}, subjects {:?}, storage {:?}, discard {:?}, deny delete {}, deny purge {}",
            config.name,
            store.spec.nats.servers,
            config.subjects,
            config.storage,
            config.discard,
            config.deny_delete,
            config.deny_purge
        );
        let loosened = store.loosened_guardrails();
        if !loosened.is_empty() {
            println!("  loosened guardrails: {}", loosened.join(", "));
        }
    }
    for projection in &manifests.projections {
        let name = projection.metadata.name.clone().unwrap_or_default();
        let store = manifests.store_of(projection)?;
        let config = consumer::consumer_config(projection, store)
            .map_err(|e| anyhow::anyhow!("Projection {name}: {e}"))?;
        let resolved =
            resolve(store, projection).map_err(|e| anyhow::anyhow!("Projection {name}: {e}"))?;
        println!(
            "Projection {name}: durable consumer {} on stream {}, deliver {:?}, ack wait {:?}",
            config.durable_name.unwrap_or_default(),
            store.stream_name(),
            config.deliver_policy,
            config.ack_wait
        );
        for mount in &resolved.secrets {
            let as_what = match &mount.source {
                SecretSource::Env(var) => format!("env {var}"),
                SecretSource::File(path) => format!("file {}", path.display()),
            };
            println!(
                "  needs Secret {}/{} as {as_what}",
                mount.secret.name, mount.secret.key
            );
        }
    }
    for reactor in &manifests.reactors {
        let name = reactor.metadata.name.clone().unwrap_or_default();
        let store = manifests.store_of_reactor(reactor)?;
        let resolved = projectionist_crds::reactor_config::resolve_reactor(store, reactor)
            .map_err(|e| anyhow::anyhow!("Reactor {name}: {e}"))?;
        let c = &resolved.config;
        println!(
            "Reactor {name}: durable consumer {} on stream {}, parking lot {}, delivering to {} ({} aggregates at once, on error {:?})",
            c.consumer, c.stream, c.parking_stream, c.url, c.concurrency, c.on_error
        );
    }
    Ok(())
}
