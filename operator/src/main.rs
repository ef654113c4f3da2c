//! `projectionist-operator`: reconciles EventStores into JetStream streams and Projections into durable consumers
//! plus the sidecar's config.
//!
//! This binary currently offers the tooling the controllers are built around; see `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use projectionist_crds::manifest::Manifests;
use projectionist_crds::sidecar_config::{SecretSource, resolve};
use projectionist_crds::{consumer, crd, stream};

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
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
