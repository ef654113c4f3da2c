//! `projectionist-sidecar`: applies a Projection's events to the service's own database, exactly once.
//!
//! This binary currently offers the config tooling the sidecar is built around; see `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use projectionist_crds::SidecarConfig;
use projectionist_crds::manifest::Manifests;
use projectionist_crds::sidecar_config::resolve;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config_dir } => check(&config_dir),
        Command::Resolve { files } => resolve_manifests(&files),
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
        let store = manifests.store_of(projection).ok_or_else(|| {
            anyhow::anyhow!(
                "Projection {name}: EventStore {:?} not found in the given files",
                projection.spec.event_store
            )
        })?;
        let resolved =
            resolve(store, projection).map_err(|e| anyhow::anyhow!("Projection {name}: {e}"))?;
        print!("---\n{}", resolved.config.to_yaml()?);
    }
    Ok(())
}
