//! The local developer loop: the same EventStore/Projection YAML a user would `kubectl apply`, provisioned on a
//! local NATS and projected into a local database — SQLite files under a data directory by default.
//!
//! `dev` follows its files like `run` follows its config directory: an edit that changes a projection (its
//! handlers, schema, rebuild token, events…) provisions again and restarts that projection with the new config, so
//! a developer can edit SQL, bump the rebuild token and watch the read model rebuild; a file that no longer parses
//! is reported and the running config kept.

use std::path::{Path, PathBuf};

use anyhow::Context;
use projectionist_crds::Projection;
use projectionist_crds::manifest::Manifests;
use projectionist_crds::projection::Driver;
use projectionist_crds::reactor_config::resolve_reactor;
use projectionist_crds::sidecar_config::{SidecarConfig, resolve};
use projectionist_crds::store_config::resolve_store;

use crate::runtime::{Launch, ReactorLaunch, StoreLaunch, Watch, Workload};

/// The driver a connection URL speaks, from its scheme.
pub fn driver_of(url: &str) -> anyhow::Result<Driver> {
    let scheme = url.split(':').next().unwrap_or_default();
    Ok(match scheme {
        "postgres" | "postgresql" => Driver::Postgres,
        "mysql" | "mariadb" => Driver::Mysql,
        "sqlite" => Driver::Sqlite,
        other => anyhow::bail!(
            "unsupported database URL scheme {other:?}: use postgres://, mysql:// or sqlite://"
        ),
    })
}

/// A projection's sidecar config from the manifests, for the database at `url` (its driver from the scheme, the
/// handlers checked for it).
pub fn projection_config(
    manifests: &Manifests,
    projection: &Projection,
    url: &str,
) -> anyhow::Result<SidecarConfig> {
    let store = manifests.store_of(projection)?;
    let mut config = resolve(store, projection)?.config;
    config.database.driver = driver_of(url)?;
    // The handlers are parsed again for the local driver when the projection starts.
    projectionist_crds::template::parse_handlers(&config.handlers, config.database.driver)
        .with_context(|| {
            format!(
                "handlers of {} for {}",
                config.projection.name,
                config.database.driver.as_str()
            )
        })?;
    Ok(config)
}

/// One projection of `dev`, followed in its files.
#[derive(Debug, Clone)]
pub struct Follow {
    files: Vec<PathBuf>,
    namespace: String,
    name: String,
    database_url: String,
    nats_url: String,
}

impl Follow {
    /// The files' contents (a directory's YAML files by name), together.
    pub async fn read(&self) -> Option<String> {
        let mut text = String::new();
        for path in &self.files {
            let mut files = vec![path.clone()];
            if path.is_dir() {
                files = std::fs::read_dir(path)
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                    .collect();
                files.sort();
            }
            for file in files {
                text.push_str(&format!("# {}\n", file.display()));
                text.push_str(&tokio::fs::read_to_string(&file).await.ok()?);
                text.push('\n');
            }
        }
        Some(text)
    }

    /// The projection's config from the files as they are now, its stream and consumer provisioned again.
    pub async fn load(&self) -> anyhow::Result<SidecarConfig> {
        let manifests = Manifests::read(&self.files)?;
        let projection = manifests
            .projections
            .iter()
            .find(|p| {
                p.metadata.name.as_deref() == Some(self.name.as_str())
                    && p.metadata.namespace.as_deref().unwrap_or("default") == self.namespace
            })
            .with_context(|| {
                format!(
                    "Projection {}/{} is no longer in the files",
                    self.namespace, self.name
                )
            })?;
        let config = projection_config(&manifests, projection, &self.database_url)?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(&self.nats_url)
            .await
            .with_context(|| format!("connecting to {}", self.nats_url))?;
        crate::provision::provision(&async_nats::jetstream::new(client), &manifests).await?;
        Ok(config)
    }

    /// For the log.
    pub fn describe(&self) -> String {
        let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        format!("{}/{} in {}", self.namespace, self.name, files.join(", "))
    }
}

/// What `dev` runs for `manifests` (read from `files`, which it follows): every Projection (each with `database`,
/// or its own SQLite file under `data_dir`), every Reactor, and every EventStore for the event-store API, all on
/// `nats_url`.
pub fn workload(
    files: &[PathBuf],
    manifests: &Manifests,
    database: Option<&str>,
    data_dir: &Path,
    nats_url: &str,
) -> anyhow::Result<Workload> {
    if manifests.projections.is_empty() && manifests.event_stores.is_empty() {
        anyhow::bail!("no EventStore, Projection or Reactor in the given files");
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let stores = manifests
        .event_stores
        .iter()
        .map(|store| StoreLaunch {
            config: resolve_store(store).config,
            nats_url: Some(nats_url.to_string()),
        })
        .collect();
    let projections = manifests
        .projections
        .iter()
        .map(|projection| {
            let url = match database {
                Some(url) => url.to_string(),
                None => {
                    let file: PathBuf = data_dir.join(format!(
                        "{}_{}.db",
                        projection
                            .metadata
                            .namespace
                            .as_deref()
                            .unwrap_or("default"),
                        projection.metadata.name.as_deref().unwrap_or_default()
                    ));
                    format!("sqlite://{}?mode=rwc", file.display())
                }
            };
            let config = projection_config(manifests, projection, &url)?;
            Ok(Launch {
                watch: Some(Watch::Manifests(Follow {
                    files: files.to_vec(),
                    namespace: config.projection.namespace.clone(),
                    name: config.projection.name.clone(),
                    database_url: url.clone(),
                    nats_url: nats_url.to_string(),
                })),
                config,
                database_url: Some(url),
                nats_url: Some(nats_url.to_string()),
            })
        })
        .collect::<anyhow::Result<Vec<Launch>>>()?;
    let reactors = manifests
        .reactors
        .iter()
        .map(|reactor| {
            let store = manifests.store_of_reactor(reactor)?;
            Ok(ReactorLaunch {
                config: resolve_reactor(store, reactor)?.config,
                nats_url: Some(nats_url.to_string()),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Workload {
        projections,
        reactors,
        stores,
    })
}
