//! Before a projection consumes: the sidecar's tables and the read model's schema, the checkpoint (created at 0 for
//! a new read model), and a pending rebuild (a rebuild token that differs from the checkpoint's: the reset
//! statements and the checkpoint's restart at 0 commit together).
//!
//! A partitioned projection is prepared once per replica at the projection's level (schema, rebuild: the reset and
//! the restart of every partition's checkpoint commit together); each partition it then owns only reads its own
//! checkpoint ([`prepare_partition`]).

use projectionist_crds::sidecar_config::SidecarConfig;
use tracing::info;

use crate::checkpoint::{self, Checkpoint, Slot};
use crate::database::{self, Database};

/// Where a prepared projection starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// A rebuild reset the read model: everything is replayed from the start.
    pub rebuilding: bool,
}

/// The rebuild token the config asks for (empty without one).
pub fn rebuild_token(config: &SidecarConfig) -> String {
    config
        .rebuild
        .as_ref()
        .map(|r| r.token.clone())
        .unwrap_or_default()
}

async fn run_schema(db: &Database, config: &SidecarConfig) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    db.lock_schema(&mut tx).await?;
    for ddl in db.own_tables().iter().chain(config.schema.iter()) {
        database::execute_plain(&mut tx, ddl).await?;
    }
    tx.commit().await?;
    db.migrate().await
}

/// Creates the tables, reads the checkpoint and performs a pending rebuild. `partitioned`: the projection's
/// partitions restart with a rebuild too.
pub async fn prepare(
    db: &Database,
    config: &SidecarConfig,
    key: &str,
    partitioned: bool,
) -> Result<Prepared, sqlx::Error> {
    run_schema(db, config).await?;
    let token = rebuild_token(config);
    let slot = Slot::projection(key);
    loop {
        let mut tx = db.begin().await?;
        let (current, created) =
            checkpoint::load_or_init(db, &mut tx, &slot, &config.stream, &token).await?;
        if created || current.rebuild_token == token {
            tx.commit().await?;
            return Ok(Prepared {
                checkpoint: current,
                rebuilding: false,
            });
        }
        info!(projection = %key, from = %current.rebuild_token, to = %token, "rebuild: resetting the read model");
        for statement in config.rebuild.iter().flat_map(|r| r.reset.iter()) {
            database::execute_plain(&mut tx, statement).await?;
        }
        if !checkpoint::restart(db, &mut tx, &slot, &current, &token).await? {
            // Another processor rebuilt concurrently; read again.
            tx.rollback().await?;
            continue;
        }
        if partitioned {
            checkpoint::restart_partitions(db, &mut tx, key, &token).await?;
        }
        tx.commit().await?;
        run_schema(db, config).await?;
        return Ok(Prepared {
            checkpoint: Checkpoint {
                last_sequence: 0,
                rebuild_token: token,
            },
            rebuilding: true,
        });
    }
}

/// Reads a partition's checkpoint. One left under another rebuild token (its row was missed by the rebuild's
/// restart) starts again at 0: the projection-level preparation already reset the read model.
pub async fn prepare_partition(
    db: &Database,
    config: &SidecarConfig,
    slot: &Slot,
) -> Result<Prepared, sqlx::Error> {
    let token = rebuild_token(config);
    let mut tx = db.begin().await?;
    let (current, _) = checkpoint::load_or_init(db, &mut tx, slot, &config.stream, &token).await?;
    if current.rebuild_token == token {
        tx.commit().await?;
        return Ok(Prepared {
            checkpoint: current,
            rebuilding: false,
        });
    }
    checkpoint::restart(db, &mut tx, slot, &current, &token).await?;
    tx.commit().await?;
    Ok(Prepared {
        checkpoint: Checkpoint {
            last_sequence: 0,
            rebuild_token: token,
        },
        rebuilding: true,
    })
}

/// Reads the checkpoint again.
pub async fn reload(
    db: &Database,
    config: &SidecarConfig,
    slot: &Slot,
    token: &str,
) -> Result<Checkpoint, sqlx::Error> {
    let mut tx = db.begin().await?;
    let (cp, _) = checkpoint::load_or_init(db, &mut tx, slot, &config.stream, token).await?;
    tx.commit().await?;
    Ok(cp)
}
