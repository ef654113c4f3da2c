//! The EventStore controller: an EventStore becomes a JetStream stream with the event-store guardrails.
//!
//! Reconcile: finalizer per `deletionPolicy` → the owned ConfigMap with the store's config for the sidecar's
//! event-store API → connect (credentials from Secrets) → desired stream config (pure) →
//! create, update in place, or refuse an immutable change with a condition (nothing sent to NATS) → status with the
//! stream's statistics. A stream changed or deleted out of band is put back on the next periodic check.

use std::sync::Arc;

use async_nats::jetstream::stream;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use projectionist_crds::diff::diff_stream;
use projectionist_crds::event_store::{DeletionPolicy, EventStore, EventStoreStatus};
use projectionist_crds::store_config::resolve_store;
use projectionist_crds::stream::stream_config;

use crate::conditions;
use crate::context::{Context, key};
use crate::error::Error;
use crate::writes;

/// The finalizer an EventStore with `deletionPolicy: Delete` carries until its stream is deleted.
pub const FINALIZER: &str = "projectionist.dev/delete-stream";

/// Reconciles one EventStore.
pub async fn reconcile(store: Arc<EventStore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = store.namespace().unwrap_or_default();
    let api: Api<EventStore> = Api::namespaced(ctx.client.clone(), &namespace);
    let has_finalizer = store.finalizers().iter().any(|f| f == FINALIZER);

    if store.meta().deletion_timestamp.is_some() {
        if has_finalizer {
            if store.spec.deletion_policy == DeletionPolicy::Delete {
                let js = ctx.jetstream(&store).await?;
                let stream = store.stream_name();
                if js.delete_stream(&stream).await? {
                    ctx.event(
                        &*store,
                        EventType::Normal,
                        "StreamDeleted",
                        "Delete",
                        format!("deleted stream {stream} (deletionPolicy: Delete)"),
                    )
                    .await;
                }
            }
            writes::set_finalizer(&api, &*store, FINALIZER, false).await?;
        }
        return Ok(Action::await_change());
    }
    let wants_finalizer = store.spec.deletion_policy == DeletionPolicy::Delete;
    if wants_finalizer != has_finalizer {
        writes::set_finalizer(&api, &*store, FINALIZER, wants_finalizer).await?;
    }

    apply_store_config(&store, &ctx).await?;
    let generation = store.meta().generation;
    let mut status = store.status.clone().unwrap_or_default();
    let result = sync_stream(&store, &ctx, &mut status, generation).await;
    if let Err(e) = &result {
        conditions::set(
            &mut status.conditions,
            "Ready",
            false,
            e.reason(),
            e.to_string(),
            generation,
        );
    }
    status.observed_generation = generation;
    status.loosened_guardrails = store.loosened_guardrails();
    writes::apply_status(&api, &*store, store.status.as_ref(), &status).await?;
    result?;
    ctx.succeeded(&key(&*store));
    Ok(Action::requeue(ctx.settings.resync))
}

/// Label on the ConfigMap holding an EventStore's config for the sidecar's event-store API.
pub const EVENT_STORE_LABEL: &str = "projectionist.dev/event-store";

/// The ConfigMap holding an EventStore's config for the event-store API (mounted into annotated pods).
pub fn store_config_map_name(store: &str) -> String {
    format!("{store}-store-config")
}

/// The key of the config file inside that ConfigMap.
pub fn store_config_key(store: &str) -> String {
    format!("{store}.store.yaml")
}

/// Keeps the EventStore's StoreConfig in its owned ConfigMap, for pods that get the event-store API.
async fn apply_store_config(store: &EventStore, ctx: &Context) -> Result<(), Error> {
    let name = store.name_any();
    let resolved = resolve_store(store);
    let yaml = resolved.config.to_yaml().map_err(|e| Error::JetStream {
        action: "rendering the store config".into(),
        message: e.to_string(),
    })?;
    writes::apply_config_map(
        ctx,
        store,
        writes::ConfigFile {
            config_map: store_config_map_name(&name),
            key: store_config_key(&name),
            yaml,
            secrets: &resolved.secrets,
            label: (EVENT_STORE_LABEL, name.clone()),
        },
    )
    .await
}

fn statistics(status: &mut EventStoreStatus, info: &stream::Info) {
    status.stream_name = Some(info.config.name.clone());
    status.partitions = info
        .config
        .subject_transform
        .as_ref()
        .and_then(|t| projectionist_crds::partition::partitions_of(&t.destination));
    status.messages = Some(info.state.messages);
    status.bytes = Some(info.state.bytes);
    status.first_sequence = Some(info.state.first_sequence);
    status.last_sequence = Some(info.state.last_sequence);
    status.consumer_count = Some(info.state.consumer_count as u64);
}

async fn sync_stream(
    store: &EventStore,
    ctx: &Context,
    status: &mut EventStoreStatus,
    generation: Option<i64>,
) -> Result<(), Error> {
    let desired = match stream_config(store) {
        Ok(config) => config,
        Err(e) => {
            conditions::set(
                &mut status.conditions,
                "Ready",
                false,
                "InvalidSpec",
                e.to_string(),
                generation,
            );
            return Ok(());
        }
    };
    let js = ctx.jetstream(store).await?;
    let name = desired.name.clone();
    let Some(info) = js.stream_info(&name).await? else {
        let recreated = status.stream_name.as_deref() == Some(name.as_str());
        let info = js.create_stream(desired).await?;
        if recreated {
            ctx.event(store, EventType::Warning, "StreamRecreated", "Create",
                format!("stream {name} was missing on NATS and has been created again (its events are gone unless restored)")).await;
        } else {
            ctx.event(
                store,
                EventType::Normal,
                "StreamCreated",
                "Create",
                format!("created stream {name}"),
            )
            .await;
        }
        statistics(status, &info);
        let reason = if recreated {
            "StreamRecreated"
        } else {
            "StreamCreated"
        };
        conditions::set(
            &mut status.conditions,
            "Ready",
            true,
            reason,
            format!("stream {name} created"),
            generation,
        );
        return Ok(());
    };
    statistics(status, &info);
    let diff = diff_stream(&desired, &info.config);
    if diff.has_immutable() {
        let message = ctx
            .refuse_immutable(
                store,
                &status.conditions,
                &format!("stream {name}"),
                &diff,
                "Restore the previous value, or create a new EventStore with a new stream for the new setting",
            )
            .await;
        conditions::set(
            &mut status.conditions,
            "Ready",
            false,
            "ImmutableFieldChanged",
            message,
            generation,
        );
        return Ok(());
    }
    if !diff.is_empty() {
        let spec_changed = status.observed_generation != generation;
        let info = js.update_stream(desired).await?;
        statistics(status, &info);
        let what = diff.describe();
        if spec_changed {
            ctx.event(
                store,
                EventType::Normal,
                "StreamUpdated",
                "Update",
                format!("updated stream {name}: {what}"),
            )
            .await;
        } else {
            ctx.event(
                store,
                EventType::Warning,
                "StreamRepaired",
                "Update",
                format!(
                    "stream {name} was changed outside the operator and has been put back: {what}"
                ),
            )
            .await;
        }
        conditions::set(
            &mut status.conditions,
            "Ready",
            true,
            "StreamUpdated",
            format!("stream {name} updated: {what}"),
            generation,
        );
        return Ok(());
    }
    conditions::set(
        &mut status.conditions,
        "Ready",
        true,
        "StreamInSync",
        format!("stream {name} matches the spec"),
        generation,
    );
    Ok(())
}
