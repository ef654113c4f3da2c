//! A worker of a partitioned projection: the partitions one of its connections applies, read through one consumer
//! per partition (one on the whole stream when it owns them all and the projection reads everything), their messages
//! merged into one batch, committed in one transaction per batch with one compare-and-set per partition the batch
//! touched — each on the partition's own row, owner included ([`crate::checkpoint::Cursor::Parts`]).

use std::collections::BTreeMap;

use projectionist_crds::partition::Layout;
use projectionist_crds::sidecar_config::SidecarConfig;

use super::prepare;
use crate::checkpoint::{Checkpoint, Cursor, Slot, partition_key};
use crate::database::Database;

/// The partitions a worker reads and where each stands.
#[derive(Debug, Clone)]
pub struct Worker {
    /// What one consumer reads: some partitions, by their stored subjects.
    pub groups: Vec<(Vec<u32>, Vec<String>)>,
    /// Each partition's checkpoint.
    pub cursor: Cursor,
}

impl Worker {
    /// A worker of `partitions` of projection `key`, owned by `owner`, reading the projection's `filters`
    /// (publishers' form; empty: all).
    pub fn new(
        key: &str,
        owner: &str,
        layout: Layout,
        partitions: &[u32],
        filters: &[String],
    ) -> Self {
        // Every partition of a projection that reads everything (a lone replica with one worker): one consumer on
        // the whole stream. Otherwise one consumer per partition, on subjects that begin with the partition: the
        // server serves those far faster than a wildcard in the middle (`<prefix>.*.…`).
        let groups = if partitions.len() == layout.partitions as usize && filters.is_empty() {
            vec![(partitions.to_vec(), Vec::new())]
        } else {
            partitions
                .iter()
                .map(|p| (vec![*p], layout.partition_filters(filters, *p)))
                .collect()
        };
        let parts = partitions
            .iter()
            .map(|p| {
                (
                    *p,
                    (
                        Slot::partition(&partition_key(key, *p), owner),
                        Checkpoint {
                            last_sequence: 0,
                            rebuild_token: String::new(),
                        },
                    ),
                )
            })
            .collect::<BTreeMap<_, _>>();
        Self {
            groups,
            cursor: Cursor::Parts(layout, parts),
        }
    }

    /// What each consumer reads: after the lowest checkpoint of its partitions, their subjects.
    pub fn reads(&self) -> Vec<(u64, Vec<String>)> {
        let Cursor::Parts(_, parts) = &self.cursor else {
            return Vec::new();
        };
        self.groups
            .iter()
            .map(|(partitions, filters)| {
                let after = partitions
                    .iter()
                    .filter_map(|p| parts.get(p).map(|(_, at)| at.last_sequence))
                    .min()
                    .unwrap_or_default();
                (after, filters.clone())
            })
            .collect()
    }

    /// The stored subjects it reads.
    pub fn filters(&self) -> Vec<String> {
        self.groups.iter().flat_map(|(_, f)| f.clone()).collect()
    }

    /// Reads every partition's checkpoint.
    pub async fn prepare(
        &mut self,
        db: &Database,
        config: &SidecarConfig,
    ) -> Result<(), sqlx::Error> {
        if let Cursor::Parts(_, parts) = &mut self.cursor {
            for (slot, at) in parts.values_mut() {
                *at = prepare::prepare_partition(db, config, slot)
                    .await?
                    .checkpoint;
            }
        }
        Ok(())
    }

    /// Reads every partition's checkpoint again; `true` when one went back (read again from the stream).
    pub async fn reload(
        &mut self,
        db: &Database,
        config: &SidecarConfig,
    ) -> Result<bool, sqlx::Error> {
        let mut went_back = false;
        if let Cursor::Parts(_, parts) = &mut self.cursor {
            for (slot, at) in parts.values_mut() {
                let now = prepare::reload(db, config, slot, &at.rebuild_token).await?;
                went_back |=
                    now.last_sequence < at.last_sequence || now.rebuild_token != at.rebuild_token;
                *at = now;
            }
        }
        Ok(went_back)
    }
}
