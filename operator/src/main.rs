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
use projectionist_operator::runtime;

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
    let options = runtime::Options {
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
    Ok(())
}
