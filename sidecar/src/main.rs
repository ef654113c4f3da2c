//! `projectionist-sidecar`: applies a Projection's events to the service's own database, exactly once.
//!
//! `run` is what the injected container runs; `dev` is the local developer loop; the other commands are tooling.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use projectionist_crds::manifest::Manifests;
use projectionist_crds::sidecar_config::resolve;
use projectionist_sidecar::{append, dev, provision, runtime, store};

/// Projectionist's sidecar: consumes a Projection's durable JetStream consumer in order and applies each event to
/// the service's database (Postgres, MySQL/MariaDB or SQLite) with the SQL handlers declared in the Projection.
#[derive(Debug, Parser)]
#[command(name = "projectionist-sidecar", version, about, long_about = None)]
struct Cli {
    /// Log format: `plain` or `json`. The level comes from RUST_LOG (default `info`).
    #[arg(
        long,
        global = true,
        env = "PROJECTIONIST_LOG_FORMAT",
        default_value = "plain"
    )]
    log_format: LogFormat,
    /// Worker threads of the async runtime. By default two, or one where the process may use only one core (a
    /// container's CPU limit counts), however many cores the node has. One suits reactors delivering one event at a
    /// time; more suit a sidecar whose projections, reactors and API clients keep more than two cores busy
    /// (bench/README.md).
    #[arg(
        long,
        global = true,
        env = "PROJECTIONIST_WORKER_THREADS",
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    worker_threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

/// Flags of the long-running commands.
#[derive(Debug, Args)]
struct Serve {
    /// Address of the admin HTTP server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "PROJECTIONIST_ADMIN_ADDR", default_value = "0.0.0.0:9464")]
    admin_addr: String,
    /// Address of the event-store API (append, read, wait). Loopback by default: only the pod's own containers
    /// reach it. `off` serves no API.
    #[arg(long, env = "PROJECTIONIST_API_ADDR", default_value = "127.0.0.1:9465")]
    api_addr: String,
    /// How long to wait, after SIGTERM/SIGINT, for batches in flight to commit or roll back before exiting.
    #[arg(long, env = "PROJECTIONIST_GRACE_PERIOD", default_value = "25s", value_parser = parse_duration)]
    grace_period: std::time::Duration,
    /// How often config files are checked for changes (a ConfigMap update); a changed projection restarts with
    /// its new config (e.g. a new rebuild token or handlers).
    #[arg(long, env = "PROJECTIONIST_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    reload_interval: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    projectionist_crds::duration::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs every projection whose SidecarConfig is in the config directory (as mounted by the operator),
    /// concurrently and independently, until SIGTERM/SIGINT.
    Run {
        /// Directory holding one SidecarConfig YAML file per projection.
        #[arg(
            long,
            env = "PROJECTIONIST_CONFIG_DIR",
            default_value = "/etc/projectionist"
        )]
        config_dir: PathBuf,
        #[command(flatten)]
        serve: Serve,
    },
    /// The local developer loop: provisions the stream and consumers of the given EventStore/Projection YAML on a
    /// local NATS, then projects into SQLite files under --data-dir (or into --database).
    Dev {
        #[command(flatten)]
        local: Local,
        /// Database for every projection (postgres://, mysql:// or sqlite://). Default: one SQLite file per
        /// projection under --data-dir.
        #[arg(long, env = "PROJECTIONIST_DATABASE_URL")]
        database: Option<String>,
        /// Where the default SQLite files go.
        #[arg(long, env = "PROJECTIONIST_DATA_DIR", default_value = ".projectionist")]
        data_dir: PathBuf,
        #[command(flatten)]
        serve: Serve,
    },
    /// Runs one SQL query against a database and prints the rows (handy to look at a read model).
    Query {
        /// Database URL (postgres://, mysql:// or sqlite://).
        #[arg(long, env = "PROJECTIONIST_DATABASE_URL")]
        database: String,
        /// The query.
        sql: String,
    },
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
    /// Appends CloudEvents (structured JSON, one per line, `subject` = `<type>.<id>` of the aggregate; read as the
    /// event-store API reads an event, extension attributes included) to an EventStore's stream with `Nats-Msg-Id`
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
        /// Append only if the aggregate is at this version (the stream sequence of its last event; 0 = it has no
        /// events yet). The events must then all be of one aggregate; they are appended atomically.
        #[arg(long)]
        expected_version: Option<u64>,
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

/// mimalloc: the sidecar allocates per event (messages, headers, HTTP requests) on many threads, where it is
/// measurably cheaper than the system allocator (bench/README.md, Reactors).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    projectionist_sidecar::allocator::tune();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let workers = cli.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get().min(2)),
        usize::from,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(command(cli)),
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn command(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run { config_dir, serve } => run_cmd(&config_dir, &serve).await,
        Command::Dev {
            local,
            database,
            data_dir,
            serve,
        } => dev_cmd(&local, database.as_deref(), &data_dir, &serve).await,
        Command::Query { database, sql } => query_cmd(&database, &sql).await,
        Command::Check { config_dir } => check(&config_dir),
        Command::Resolve { files } => resolve_manifests(&files),
        Command::Provision(local) => provision_cmd(&local).await,
        Command::Append {
            local,
            store,
            events,
            expected_version,
        } => append_cmd(&local, store.as_deref(), &events, expected_version).await,
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run_cmd(config_dir: &std::path::Path, serve: &Serve) -> anyhow::Result<()> {
    let dir = runtime::read_config_dir(config_dir)?;
    let workload = runtime::Workload {
        projections: dir
            .projections
            .into_iter()
            .map(|(file, config)| runtime::Launch {
                config,
                watch: Some(runtime::Watch::File(file)),
                database_url: None,
                nats_url: None,
            })
            .collect(),
        reactors: dir
            .reactors
            .into_iter()
            .map(|(_, config)| runtime::ReactorLaunch {
                config,
                nats_url: None,
            })
            .collect(),
        stores: dir
            .stores
            .into_iter()
            .map(|(_, config)| runtime::StoreLaunch {
                config,
                nats_url: None,
            })
            .collect(),
    };
    serve_workload(workload, serve).await
}

async fn serve_workload(workload: runtime::Workload, serve: &Serve) -> anyhow::Result<()> {
    let listeners = runtime::Listeners {
        admin: runtime::bind("admin", &serve.admin_addr).await?,
        api: match serve.api_addr.as_str() {
            "off" => None,
            addr => Some(runtime::bind("event-store API", addr).await?),
        },
    };
    runtime::run(
        workload,
        listeners,
        runtime::shutdown_signal(),
        serve.grace_period,
        serve.reload_interval,
    )
    .await
}

async fn dev_cmd(
    local: &Local,
    database: Option<&str>,
    data_dir: &std::path::Path,
    serve: &Serve,
) -> anyhow::Result<()> {
    let manifests = local.manifests()?;
    let workload = dev::workload(
        &local.files,
        &manifests,
        database,
        data_dir,
        &local.nats_url,
    )?;
    let js = local.jetstream().await?;
    for (what, outcome) in provision::provision(&js, &manifests).await? {
        tracing::info!(what = %what, outcome = ?outcome, "provisioned");
    }
    tracing::info!(admin = %serve.admin_addr, api = %serve.api_addr, "dev mode running; Ctrl-C to stop");
    serve_workload(workload, serve).await
}

async fn query_cmd(url: &str, sql: &str) -> anyhow::Result<()> {
    use sqlx::{Column, Row};
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&pool)
        .await?;
    let Some(first) = rows.first() else {
        println!("(no rows)");
        return Ok(());
    };
    let header: Vec<String> = first
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let cell = |row: &sqlx::any::AnyRow, i: usize| -> String {
        if let Ok(v) = row.try_get::<Option<String>, _>(i) {
            return v.unwrap_or_else(|| "NULL".into());
        }
        if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
            return v.map(|v| v.to_string()).unwrap_or_else(|| "NULL".into());
        }
        if let Ok(v) = row.try_get::<Option<f64>, _>(i) {
            return v.map(|v| v.to_string()).unwrap_or_else(|| "NULL".into());
        }
        if let Ok(v) = row.try_get::<Option<bool>, _>(i) {
            return v.map(|v| v.to_string()).unwrap_or_else(|| "NULL".into());
        }
        "?".into()
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| (0..header.len()).map(|i| cell(r, i)).collect())
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(&header));
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  ")
    );
    for r in &table {
        println!("{}", line(r));
    }
    pool.close().await;
    Ok(())
}

fn check(dir: &std::path::Path) -> anyhow::Result<()> {
    let configs = runtime::read_config_dir(dir)?;
    for (file, config) in &configs.stores {
        println!(
            "{}: event store {}/{} (stream {}, subjects {}) for the event-store API",
            file.display(),
            config.event_store.namespace,
            config.event_store.name,
            config.stream,
            config.subjects.join(", ")
        );
    }
    for (file, config) in &configs.reactors {
        println!(
            "{}: reactor {}/{} delivers stream {} through consumer {} to {}",
            file.display(),
            config.reactor.namespace,
            config.reactor.name,
            config.stream,
            config.consumer,
            config.url
        );
    }
    for (file, config) in configs.projections {
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
    if manifests.projections.is_empty() && manifests.reactors.is_empty() {
        anyhow::bail!("no Projection or Reactor found in {files:?}");
    }
    for projection in &manifests.projections {
        let name = projection.metadata.name.clone().unwrap_or_default();
        let store = manifests.store_of(projection)?;
        let resolved =
            resolve(store, projection).map_err(|e| anyhow::anyhow!("Projection {name}: {e}"))?;
        print!("---\n{}", resolved.config.to_yaml()?);
    }
    for reactor in &manifests.reactors {
        let name = reactor.metadata.name.clone().unwrap_or_default();
        let store = manifests.store_of_reactor(reactor)?;
        let resolved = projectionist_crds::reactor_config::resolve_reactor(store, reactor)
            .map_err(|e| anyhow::anyhow!("Reactor {name}: {e}"))?;
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
    expected_version: Option<u64>,
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
    let subjects = store.subjects();
    let prefix = store::subject_prefix(&subjects).with_context(|| {
        format!("the EventStore's subject {subjects:?} does not end in `.>`; cannot derive where to append")
    })?;
    let js = local.jetstream().await?;
    let target = store::Store::new(
        store.metadata.name.as_deref().unwrap_or_default(),
        &store.stream_name(),
        &prefix,
        js.client(),
    )
    .with_partitions(store.spec.stream.partitions);
    for (e, sequence, duplicate) in append::append(&target, &parsed, expected_version).await? {
        let note = if duplicate {
            "  (duplicate: already in the stream)"
        } else {
            ""
        };
        println!(
            "{:>8}  {:<24} {:<12} {}.{}{note}",
            sequence,
            e.event.type_,
            e.event.id,
            prefix,
            e.aggregate.key()
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
