//! `projectionist-sidecar`: applies a Projection's events to the service's own database, exactly once.
//!
//! This binary currently offers the config tooling and the local NATS tooling (provision, append, status) the
//! sidecar is built around; see `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use projectionist_crds::SidecarConfig;
use projectionist_crds::manifest::Manifests;
use projectionist_crds::sidecar_config::resolve;
use projectionist_sidecar::{append, provision};

/// Projectionist's sidecar: consumes a Projection's durable JetStream consumer in order and applies each event to
/// the service's database (Postgres, MySQL/MariaDB or SQLite) with the SQL handlers declared in the Projection.
#[derive(Debug, Parser)]
#[command(name = "projectionist-sidecar", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks the SidecarConfig files in a directory (as mounted by the operator) and prints what each runs.
    Check {
        /// Directory holding one SidecarConfig YAML file per projection.
        #[arg(
            long,
            env = "PROJECTIONIST_CONFIG_DIR",
            default_value = "/etc/projectionist"
        )]
        config_dir: PathBuf,
    },
    /// Resolves EventStore and Projection YAML (files or directories, as for `kubectl apply -f`) into the
    /// SidecarConfig files the operator would mount, and prints them.
    Resolve {
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
    /// Creates or updates, on a NATS server, the stream of each EventStore and the durable consumer of each
    /// Projection in the given YAML, with the same mappings the operator uses. Refuses immutable changes.
    Provision(Local),
    /// Appends CloudEvents (structured JSON, one per line) to an EventStore's stream with `Nats-Msg-Id`
    /// de-duplication, and prints the stream sequence of each.
    Append {
        #[command(flatten)]
        local: Local,
        /// The EventStore to append to (by name); needed when the YAML holds several.
        #[arg(long, env = "PROJECTIONIST_EVENT_STORE")]
        store: Option<String>,
        /// NDJSON file of events; `-` reads standard input.
        #[arg(long, default_value = "-")]
        events: PathBuf,
    },
    /// Prints each EventStore's stream state and each Projection's consumer lag.
    Status(Local),
}

/// Where the YAML is and which NATS server to use, for the local commands.
#[derive(Debug, Args)]
struct Local {
    /// YAML files or directories holding the EventStore(s) and Projection(s).
    #[arg(
        short = 'f',
        long = "filename",
        env = "PROJECTIONIST_MANIFESTS",
        required = true,
        value_delimiter = ','
    )]
    files: Vec<PathBuf>,
    /// NATS server to use instead of the servers named in the EventStore (credentials from Secrets are not
    /// available outside the cluster).
    #[arg(
        long,
        env = "PROJECTIONIST_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
}

impl Local {
    fn manifests(&self) -> anyhow::Result<Manifests> {
        Ok(Manifests::read(&self.files)?)
    }

    async fn jetstream(&self) -> anyhow::Result<async_nats::jetstream::Context> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(&self.nats_url)
            .await
            .with_context(|| format!("connecting to {}", self.nats_url))?;
        Ok(async_nats::jetstream::new(client))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config_dir } => check(&config_dir),
        Command::Resolve { files } => resolve_manifests(&files),
        Command::Provision(local) => provision_cmd(&local).await,
        Command::Append {
            local,
            store,
            events,
        } => append_cmd(&local, store.as_deref(), &events).await,
        Command::Status(local) => status_cmd(&local).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        anyhow::bail!("{}: no SidecarConfig files (*.yaml)", dir.display());
    }
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let config = SidecarConfig::from_yaml(&file.display().to_string(), &text)?;
        println!(
            "{}: projection {}/{} reads stream {} through consumer {} into {} ({} handlers)",
            file.display(),
            config.projection.namespace,
            config.projection.name,
            config.stream,
            config.consumer,
            config.database.driver.as_str(),
            config.handlers.len()
        );
    }
    Ok(())
}

fn resolve_manifests(files: &[PathBuf]) -> anyhow::Result<()> {
    let manifests = Manifests::read(files)?;
    if manifests.projections.is_empty() {
        anyhow::bail!("no Projection found in {files:?}");
    }
    for projection in &manifests.projections {
        let name = projection.metadata.name.clone().unwrap_or_default();
        let store = manifests.store_of(projection)?;
        let resolved =
            resolve(store, projection).map_err(|e| anyhow::anyhow!("Projection {name}: {e}"))?;
        print!("---\n{}", resolved.config.to_yaml()?);
    }
    Ok(())
}

async fn provision_cmd(local: &Local) -> anyhow::Result<()> {
    let manifests = local.manifests()?;
    let js = local.jetstream().await?;
    for (what, outcome) in provision::provision(&js, &manifests).await? {
        match outcome {
            provision::Outcome::Created => println!("{what}: created"),
            provision::Outcome::InSync => println!("{what}: in sync"),
            provision::Outcome::Updated(changes) => println!("{what}: updated ({changes})"),
        }
    }
    Ok(())
}

async fn append_cmd(
    local: &Local,
    store: Option<&str>,
    events: &std::path::Path,
) -> anyhow::Result<()> {
    let manifests = local.manifests()?;
    let store = match store {
        Some(name) => manifests
            .event_stores
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .with_context(|| format!("EventStore {name:?} not found in the given files"))?,
        None => match manifests.event_stores.as_slice() {
            [one] => one,
            [] => anyhow::bail!("no EventStore in the given files"),
            _ => anyhow::bail!("several EventStores in the given files; choose one with --store"),
        },
    };
    let text = if events.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(events).with_context(|| format!("reading {}", events.display()))?
    };
    let parsed = append::parse_ndjson(&text).with_context(|| format!("{}", events.display()))?;
    let prefix = append::subject_prefix(&store.subjects())?;
    let js = local.jetstream().await?;
    for a in append::append(&js, &prefix, &parsed).await? {
        let note = if a.duplicate {
            "  (duplicate: already in the stream)"
        } else {
            ""
        };
        println!(
            "{:>8}  {:<24} {:<12} {}{note}",
            a.sequence, a.type_, a.id, a.subject
        );
    }
    Ok(())
}

async fn status_cmd(local: &Local) -> anyhow::Result<()> {
    let manifests = local.manifests()?;
    let js = local.jetstream().await?;
    for store in &manifests.event_stores {
        let name = store.stream_name();
        let mut stream = js
            .get_stream(&name)
            .await
            .with_context(|| format!("stream {name}"))?;
        let info = stream
            .info()
            .await
            .with_context(|| format!("stream {name}"))?;
        println!(
            "stream {name}: {} events, sequences {}..{}, {} consumers",
            info.state.messages,
            info.state.first_sequence,
            info.state.last_sequence,
            info.state.consumer_count
        );
    }
    for projection in &manifests.projections {
        let store = manifests.store_of(projection)?;
        let stream = js.get_stream(store.stream_name()).await?;
        let name = projection.consumer_name();
        let info = stream
            .consumer_info(&name)
            .await
            .with_context(|| format!("consumer {name}"))?;
        println!(
            "consumer {name}: lag {} (not yet delivered), {} awaiting ack, last acked stream sequence {}",
            info.num_pending, info.num_ack_pending, info.ack_floor.stream_sequence
        );
    }
    Ok(())
}
