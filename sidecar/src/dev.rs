//! The local developer loop: the same EventStore/Projection YAML a user would `kubectl apply`, provisioned on a
//! local NATS and projected into a local database — SQLite files under a data directory by default.

use std::path::{Path, PathBuf};

use anyhow::Context;
use projectionist_crds::manifest::Manifests;
use projectionist_crds::projection::Driver;
use projectionist_crds::sidecar_config::resolve;
use projectionist_crds::store_config::resolve_store;

use crate::runtime::{Launch, StoreLaunch, Workload};

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

/// What `dev` runs for `manifests`: every Projection (each with `database`, or its own SQLite file under
/// `data_dir`) and every EventStore for the event-store API, all on `nats_url`.
pub fn workload(
    manifests: &Manifests,
    database: Option<&str>,
    data_dir: &Path,
    nats_url: &str,
) -> anyhow::Result<Workload> {
    if manifests.projections.is_empty() && manifests.event_stores.is_empty() {
        anyhow::bail!("no EventStore or Projection in the given files");
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
            let store = manifests.store_of(projection)?;
            let mut config = resolve(store, projection)?.config;
            let url = match database {
                Some(url) => url.to_string(),
                None => {
                    let file: PathBuf = data_dir.join(format!(
                        "{}_{}.db",
                        config.projection.namespace, config.projection.name
                    ));
                    format!("sqlite://{}?mode=rwc", file.display())
                }
            };
            config.database.driver = driver_of(&url)?;
            // The handlers are parsed again for the local driver when the projection starts.
            projectionist_crds::template::parse_handlers(&config.handlers, config.database.driver)
                .with_context(|| {
                    format!(
                        "handlers of {} for {}",
                        config.projection.name,
                        config.database.driver.as_str()
                    )
                })?;
            Ok(Launch {
                config,
                file: None,
                database_url: Some(url),
                nats_url: Some(nats_url.to_string()),
            })
        })
        .collect::<anyhow::Result<Vec<Launch>>>()?;
    Ok(Workload {
        projections,
        stores,
    })
}
