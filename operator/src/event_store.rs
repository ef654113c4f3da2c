//! The EventStore controller: an EventStore becomes a JetStream stream with the event-store guardrails.
//!
//! Reconcile: finalizer per `deletionPolicy` → connect (credentials from Secrets) → desired stream config (pure) →
//! create, update in place, or refuse an immutable change with a condition (nothing sent to NATS) → status with the
//! stream's statistics. A stream changed or deleted out of band is put back on the next periodic check.

use std::sync::Arc;

use async_nats::jetstream::stream;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use projectionist_crds::diff::diff_stream;
use projectionist_crds::event_store::{DeletionPolicy, EventStore, EventStoreStatus};
use projectionist_crds::stream::stream_config;
use serde_json::json;

use crate::conditions;
use crate::context::{Context, MANAGER, key};
use crate::error::Error;

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
                let js = ctx
                    .nats
                    .jetstream(&ctx.client, &namespace, &store.spec.nats)
                    .await?;
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
            set_finalizer(&api, &store, false).await?;
        }
        return Ok(Action::await_change());
    }
    let wants_finalizer = store.spec.deletion_policy == DeletionPolicy::Delete;
    if wants_finalizer != has_finalizer {
        set_finalizer(&api, &store, wants_finalizer).await?;
    }

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
    write_status(&api, &store, &status).await?;
    result?;
    ctx.succeeded(&key(&*store));
    Ok(Action::requeue(ctx.settings.resync))
}

/// Adds or removes the finalizer, guarded by the object's resourceVersion.
async fn set_finalizer(
    api: &Api<EventStore>,
    store: &EventStore,
    present: bool,
) -> Result<(), Error> {
    let mut finalizers: Vec<String> = store
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        finalizers.push(FINALIZER.to_string());
    }
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": store.resource_version()}});
    api.patch(
        &store.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Writes the status with server-side apply when it changed.
async fn write_status(
    api: &Api<EventStore>,
    store: &EventStore,
    status: &EventStoreStatus,
) -> Result<(), Error> {
    if store.status.as_ref() == Some(status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": EventStore::api_version(&()),
        "kind": EventStore::kind(&()),
        "status": status,
    });
    api.patch_status(
        &store.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

fn statistics(status: &mut EventStoreStatus, info: &stream::Info) {
    status.stream_name = Some(info.config.name.clone());
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
    let namespace = store.namespace().unwrap_or_default();
    let js = ctx
        .nats
        .jetstream(&ctx.client, &namespace, &store.spec.nats)
        .await?;
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
        let fields: Vec<String> = diff
            .immutable()
            .map(|c| {
                format!(
                    "{} ({} on the server, {} in the spec)",
                    c.field, c.actual, c.desired
                )
            })
            .collect();
        let message = format!(
            "stream {name} cannot change {} in place; nothing was changed on NATS. Restore the previous value, or create a new EventStore with a new stream for the new setting",
            fields.join(", ")
        );
        if conditions::get(&status.conditions, "Ready")
            .is_none_or(|c| c.reason != "ImmutableFieldChanged")
        {
            ctx.event(
                store,
                EventType::Warning,
                "ImmutableFieldChanged",
                "Update",
                message.clone(),
            )
            .await;
        }
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
