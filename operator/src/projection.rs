//! The Projection controller: a Projection becomes a durable JetStream consumer on its EventStore's stream plus a
//! ConfigMap with the sidecar's resolved config, and its status follows the consumer (lag, acknowledged sequence).
//!
//! Reconcile: finalizer (the consumer lives outside Kubernetes) → the EventStore, which must be Ready → validate
//! and resolve (pure: handlers parsed, durations, filters) → ConfigMap (owned, garbage collected with the
//! Projection) → create, update in place, or refuse an immutable change of the consumer → status from consumer info.
//! Deleting a Projection deletes its consumer and (by ownership) its ConfigMap; the read model is never touched.

use std::sync::Arc;

use async_nats::jetstream::consumer;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use projectionist_crds::consumer::consumer_config;
use projectionist_crds::diff::diff_consumer;
use projectionist_crds::event_store::EventStore;
use projectionist_crds::projection::{Projection, ProjectionStatus};
use projectionist_crds::sidecar_config::{ResolveError, resolve};

use crate::conditions;
use crate::context::{Context, key};
use crate::error::Error;
use crate::lifecycle;
use crate::writes;

/// The finalizer every Projection carries until its consumer is deleted.
pub const FINALIZER: &str = "projectionist.dev/delete-consumer";
/// Label on the ConfigMaps the operator owns.
pub const PROJECTION_LABEL: &str = "projectionist.dev/projection";
pub use crate::writes::SECRETS_ANNOTATION;
use projectionist_crds::consumer::METADATA_REBUILT_TOKEN as REBUILT_METADATA;

/// The ConfigMap holding a Projection's sidecar config.
pub fn config_map_name(projection: &str) -> String {
    format!("{projection}-sidecar-config")
}

/// The key of the config file inside that ConfigMap.
pub fn config_key(projection: &str) -> String {
    format!("{projection}.yaml")
}

/// Reconciles one Projection.
pub async fn reconcile(projection: Arc<Projection>, ctx: Arc<Context>) -> Result<Action, Error> {
    lifecycle::reconcile(
        &*projection,
        projection.status.as_ref(),
        &ctx,
        FINALIZER,
        async || delete_consumer(&projection, &ctx).await,
        async |status: &mut ProjectionStatus, generation| {
            status.consumer_name = Some(projection.consumer_name());
            sync(&projection, &ctx, status, generation).await
        },
    )
    .await
}

impl lifecycle::Status for ProjectionStatus {
    fn conditions_mut(&mut self) -> &mut Vec<projectionist_crds::common::Condition> {
        &mut self.conditions
    }
    fn observe(&mut self, generation: Option<i64>) {
        self.observed_generation = generation;
    }
}

async fn delete_consumer(projection: &Projection, ctx: &Context) -> Result<(), Error> {
    let namespace = projection.namespace().unwrap_or_default();
    let Some(store) = ctx
        .event_store(&namespace, &projection.spec.event_store)
        .await?
    else {
        ctx.event(projection, EventType::Warning, "ConsumerNotDeleted", "Delete",
            format!("EventStore {} is gone, so the consumer {} could not be reached; delete it on NATS if it still exists",
                projection.spec.event_store, projection.consumer_name())).await;
        return Ok(());
    };
    let js = ctx.jetstream(&store).await?;
    let consumer = projection.consumer_name();
    if js.delete_consumer(&store.stream_name(), &consumer).await? {
        ctx.event(
            projection,
            EventType::Normal,
            "ConsumerDeleted",
            "Delete",
            format!("deleted consumer {consumer} (the read model is left as it is)"),
        )
        .await;
    }
    Ok(())
}

/// Sets `Ready=False` for a problem the user has to fix; nothing to retry until something changes.
fn not_ready(
    status: &mut ProjectionStatus,
    reason: &str,
    message: String,
    generation: Option<i64>,
) {
    conditions::set(
        &mut status.conditions,
        "Ready",
        false,
        reason,
        message,
        generation,
    );
}

/// The EventStore a Projection or Reactor reads, when its stream can be used; otherwise the `Ready=False` reason
/// and message that say why.
pub(crate) async fn usable_store(
    ctx: &Context,
    namespace: &str,
    store_name: &str,
) -> Result<Result<Arc<EventStore>, (&'static str, String)>, Error> {
    let Some(store) = ctx.event_store(namespace, store_name).await? else {
        return Ok(Err((
            "EventStoreNotFound",
            format!(
                "EventStore {store_name:?} does not exist in namespace {namespace}; create it or correct spec.eventStore"
            ),
        )));
    };
    let store_conditions = store
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    // A store whose last spec change was refused still has its stream, unchanged: readers keep working.
    let stream_usable = conditions::is_true(store_conditions, "Ready")
        || conditions::get(store_conditions, "Ready")
            .is_some_and(|c| c.reason == "ImmutableFieldChanged");
    if !stream_usable {
        let why = conditions::get(store_conditions, "Ready")
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_else(|| "not reconciled yet".into());
        return Ok(Err((
            "EventStoreNotReady",
            format!("waiting for EventStore {store_name} to be Ready ({why})"),
        )));
    }
    Ok(Ok(store))
}

async fn sync(
    projection: &Projection,
    ctx: &Context,
    status: &mut ProjectionStatus,
    generation: Option<i64>,
) -> Result<Action, Error> {
    let namespace = projection.namespace().unwrap_or_default();
    let store = match usable_store(ctx, &namespace, &projection.spec.event_store).await? {
        Ok(store) => store,
        Err((reason, message)) => {
            not_ready(status, reason, message, generation);
            return Ok(Action::requeue(ctx.settings.resync));
        }
    };
    let resolved = match resolve(&store, projection) {
        Ok(r) => r,
        Err(e) => {
            let reason = match e {
                ResolveError::Handler(_) => "InvalidHandler",
                _ => "InvalidSpec",
            };
            not_ready(status, reason, e.to_string(), generation);
            return Ok(Action::await_change());
        }
    };
    let desired = match consumer_config(projection, &store) {
        Ok(c) => c,
        Err(e) => {
            not_ready(status, "InvalidSpec", e.to_string(), generation);
            return Ok(Action::await_change());
        }
    };

    apply_config_map(projection, &resolved, ctx).await?;
    if let Some(partitioning) = &resolved.config.partitioning {
        // The sidecars read each partition from the stream and keep its checkpoint in the read model: no durable
        // consumer.
        status.partitions = Some(partitioning.partitions);
        status.workers = Some(partitioning.workers);
        status.consumer_name = None;
        let js = ctx.jetstream(&store).await?;
        let reports = js
            .partition_progress(&namespace, &projection.name_any())
            .await?;
        let (spread, lag) = projectionist_crds::partition::spread(&reports);
        status.pending = (!reports.is_empty()).then_some(lag);
        status.spread = spread;
        conditions::set(
            &mut status.conditions,
            "Ready",
            true,
            "Partitioned",
            format!(
                "{} partitions of stream {}, shared by the live sidecars; sidecar config in ConfigMap {}",
                partitioning.partitions,
                store.stream_name(),
                config_map_name(&projection.name_any())
            ),
            generation,
        );
        return Ok(Action::requeue(ctx.settings.status_interval));
    }
    status.partitions = None;
    status.workers = None;
    status.spread.clear();

    let js = ctx.jetstream(&store).await?;
    let stream = store.stream_name();
    let consumer_name = projection.consumer_name();
    let info = match js.consumer_info(&stream, &consumer_name).await? {
        None => {
            let recreated = status.last_acked_sequence.is_some();
            let info = js.put_consumer(&stream, desired, true).await?;
            if recreated {
                ctx.event(projection, EventType::Warning, "ConsumerRecreated", "Create",
                    format!("consumer {consumer_name} was missing on NATS and has been created again; the sidecar resumes from its checkpoint")).await;
            } else {
                ctx.event(
                    projection,
                    EventType::Normal,
                    "ConsumerCreated",
                    "Create",
                    format!("created consumer {consumer_name} on stream {stream}"),
                )
                .await;
            }
            info
        }
        Some(info) => {
            let diff = diff_consumer(&desired, &info.config);
            if diff.has_immutable() {
                let message = ctx
                    .refuse_immutable(
                        projection,
                        &status.conditions,
                        &format!("consumer {consumer_name}"),
                        &diff,
                        "Restore the previous value, or delete and re-create the Projection (its read model is kept; use spec.rebuild to replay it)",
                    )
                    .await;
                refresh(projection, ctx, status, &info, generation);
                not_ready(status, "ImmutableFieldChanged", message, generation);
                return Ok(Action::requeue(ctx.settings.status_interval));
            }
            if diff.is_empty() {
                info
            } else {
                let spec_changed = status.observed_generation != generation;
                let what = diff.describe();
                let info = js.put_consumer(&stream, desired, false).await?;
                if spec_changed {
                    ctx.event(
                        projection,
                        EventType::Normal,
                        "ConsumerUpdated",
                        "Update",
                        format!("updated consumer {consumer_name}: {what}"),
                    )
                    .await;
                } else {
                    ctx.event(projection, EventType::Warning, "ConsumerRepaired", "Update",
                        format!("consumer {consumer_name} was changed outside the operator and has been put back: {what}")).await;
                }
                info
            }
        }
    };
    refresh(projection, ctx, status, &info, generation);
    conditions::set(
        &mut status.conditions,
        "Ready",
        true,
        "ConsumerReady",
        format!(
            "consumer {consumer_name} on stream {stream}; sidecar config in ConfigMap {}",
            config_map_name(&projection.name_any())
        ),
        generation,
    );
    Ok(Action::requeue(ctx.settings.status_interval))
}

/// Status from consumer info: lag, acknowledged sequence, `CaughtUp`, `Stalled`, `Rebuilding`.
fn refresh(
    projection: &Projection,
    ctx: &Context,
    status: &mut ProjectionStatus,
    info: &consumer::Info,
    generation: Option<i64>,
) {
    status.pending = Some(info.num_pending);
    status.ack_pending = Some(info.num_ack_pending as u64);
    status.redelivered = Some(info.num_redelivered as u64);
    status.last_acked_sequence = Some(info.ack_floor.stream_sequence);
    status.active_sidecar = info
        .priority_groups
        .iter()
        .find_map(|g| g.pinned_client_id.clone());
    progress_conditions(
        &mut status.conditions,
        ctx,
        &key(projection),
        info,
        "applied",
        generation,
    );
    match &projection.spec.rebuild {
        Some(rebuild) => {
            let done = info.config.metadata.get(REBUILT_METADATA) == Some(&rebuild.token);
            let changed = status
                .rebuild_token
                .as_deref()
                .is_some_and(|t| t != rebuild.token);
            let pending = conditions::is_true(&status.conditions, "Rebuilding");
            status.rebuild_token = Some(rebuild.token.clone());
            if done || !(changed || pending) {
                conditions::set(
                    &mut status.conditions,
                    "Rebuilding",
                    false,
                    "RebuildComplete",
                    format!("the read model is built for token {:?}", rebuild.token),
                    generation,
                );
            } else {
                conditions::set(
                    &mut status.conditions,
                    "Rebuilding",
                    true,
                    "RebuildRequested",
                    format!(
                        "the sidecar resets the read model and replays every event when it loads token {:?}",
                        rebuild.token
                    ),
                    generation,
                );
            }
        }
        None => {
            status.rebuild_token = None;
            status.conditions.retain(|c| c.type_ != "Rebuilding");
        }
    }
}

/// `CaughtUp` and `Stalled` from consumer info: caught up when nothing is pending or unacknowledged; stalled when
/// nothing was acknowledged for `stallAfter` while events are pending. `done` says what acknowledged means.
pub(crate) fn progress_conditions(
    conditions: &mut Vec<projectionist_crds::common::Condition>,
    ctx: &Context,
    key: &str,
    info: &consumer::Info,
    done: &str,
    generation: Option<i64>,
) {
    let caught_up = info.num_pending == 0 && info.num_ack_pending == 0;
    if caught_up {
        conditions::set(
            conditions,
            "CaughtUp",
            true,
            "CaughtUp",
            format!(
                "every event up to sequence {} is {done}",
                info.ack_floor.stream_sequence
            ),
            generation,
        );
    } else {
        conditions::set(
            conditions,
            "CaughtUp",
            false,
            "Behind",
            format!(
                "{} events pending, {} awaiting acknowledgement",
                info.num_pending, info.num_ack_pending
            ),
            generation,
        );
    }
    let still = ctx.progress(key, info.ack_floor.stream_sequence);
    if !caught_up && still >= ctx.settings.stall_after {
        conditions::set(
            conditions,
            "Stalled",
            true,
            "NoProgress",
            format!(
                "no event acknowledged for {}s while {} are pending; check the sidecar's /readyz and logs",
                still.as_secs(),
                info.num_pending + info.num_ack_pending as u64
            ),
            generation,
        );
    } else {
        conditions::set(conditions, "Stalled", false, "Progressing", "", generation);
    }
}

/// Writes the sidecar's config into the Projection's ConfigMap (server-side apply) when it differs.
async fn apply_config_map(
    projection: &Projection,
    resolved: &projectionist_crds::sidecar_config::Resolved,
    ctx: &Context,
) -> Result<(), Error> {
    let name = projection.name_any();
    let yaml = resolved.config.to_yaml().map_err(|e| Error::JetStream {
        action: "rendering the sidecar config".into(),
        message: e.to_string(),
    })?;
    writes::apply_config_map(
        ctx,
        projection,
        writes::ConfigFile {
            config_map: config_map_name(&name),
            key: config_key(&name),
            yaml,
            secrets: &resolved.secrets,
            label: (PROJECTION_LABEL, name.clone()),
        },
    )
    .await
}
