//! The Reactor controller: a Reactor becomes a durable JetStream consumer on its EventStore's stream, a parking-lot
//! stream, and a ConfigMap with the sidecar's resolved config; its status follows the consumer (lag, deliveries) and
//! the parking lot (parked aggregates, the oldest parked event).
//!
//! Reconcile: finalizer (the consumer and the parking lot live outside Kubernetes) → the EventStore, which must be
//! usable → validate and resolve (pure) → parking lot → ConfigMap (owned) → create, update in place, or refuse an
//! immutable change of the consumer → status. Deleting a Reactor deletes its consumer and its parking lot.

use std::sync::Arc;

use async_nats::jetstream::consumer;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use projectionist_crds::diff::{diff_consumer, diff_stream};
use projectionist_crds::event_store::EventStore;
use projectionist_crds::reactor::{
    Reactor, ReactorStatus, consumer_configs, parking_stream_config, partition_consumer,
};
use projectionist_crds::reactor_config::{ReactorResolveError, ResolvedReactor, resolve_reactor};
use time::format_description::well_known::Rfc3339;

use crate::conditions;
use crate::context::{Context, key};
use crate::error::Error;
use crate::lifecycle;
use crate::projection::{FINALIZER, progress_conditions, usable_store};
use crate::writes;

/// Label on the ConfigMaps the operator owns for reactors.
pub const REACTOR_LABEL: &str = "projectionist.dev/reactor";

/// The ConfigMap holding a Reactor's sidecar config.
pub fn config_map_name(reactor: &str) -> String {
    format!("{reactor}-reactor-config")
}

/// The key of the config file inside that ConfigMap (distinct from a Projection's of the same name).
pub fn config_key(reactor: &str) -> String {
    format!("reactor-{reactor}.yaml")
}

/// Reconciles one Reactor.
pub async fn reconcile(reactor: Arc<Reactor>, ctx: Arc<Context>) -> Result<Action, Error> {
    lifecycle::reconcile(
        &*reactor,
        reactor.status.as_ref(),
        &ctx,
        FINALIZER,
        async || delete_on_nats(&reactor, &ctx).await,
        async |status: &mut ReactorStatus, generation| {
            status.consumer_name = Some(reactor.consumer_name());
            sync(&reactor, &ctx, status, generation).await
        },
    )
    .await
}

impl lifecycle::Status for ReactorStatus {
    fn conditions_mut(&mut self) -> &mut Vec<projectionist_crds::common::Condition> {
        &mut self.conditions
    }
    fn observe(&mut self, generation: Option<i64>) {
        self.observed_generation = generation;
    }
}

fn not_ready(status: &mut ReactorStatus, reason: &str, message: String, generation: Option<i64>) {
    conditions::set(
        &mut status.conditions,
        "Ready",
        false,
        reason,
        message,
        generation,
    );
}

async fn delete_on_nats(reactor: &Reactor, ctx: &Context) -> Result<(), Error> {
    let namespace = reactor.namespace().unwrap_or_default();
    let Some(store) = ctx
        .event_store(&namespace, &reactor.spec.event_store)
        .await?
    else {
        ctx.event(reactor, EventType::Warning, "ConsumerNotDeleted", "Delete",
            format!("EventStore {} is gone, so the consumer {} and the parking lot {} could not be reached; delete them on NATS if they still exist",
                reactor.spec.event_store, reactor.consumer_name(), reactor.parking_stream())).await;
        return Ok(());
    };
    let js = ctx.jetstream(&store).await?;
    let mut consumers = vec![reactor.consumer_name()];
    if let Some(n) = store.spec.stream.partitions {
        consumers.extend((0..n).map(|p| partition_consumer(&reactor.consumer_name(), p)));
    }
    for consumer in consumers {
        if js.delete_consumer(&store.stream_name(), &consumer).await? {
            ctx.event(
                reactor,
                EventType::Normal,
                "ConsumerDeleted",
                "Delete",
                format!("deleted consumer {consumer}"),
            )
            .await;
        }
    }
    if js.delete_stream(&reactor.parking_stream()).await? {
        ctx.event(
            reactor,
            EventType::Normal,
            "ParkingLotDeleted",
            "Delete",
            format!(
                "deleted the parking lot {} with the events it held",
                reactor.parking_stream()
            ),
        )
        .await;
    }
    Ok(())
}

async fn sync(
    reactor: &Reactor,
    ctx: &Context,
    status: &mut ReactorStatus,
    generation: Option<i64>,
) -> Result<Action, Error> {
    let namespace = reactor.namespace().unwrap_or_default();
    let store = match usable_store(ctx, &namespace, &reactor.spec.event_store).await? {
        Ok(store) => store,
        Err((reason, message)) => {
            not_ready(status, reason, message, generation);
            return Ok(Action::requeue(ctx.settings.resync));
        }
    };
    let resolved = match resolve_reactor(&store, reactor) {
        Ok(r) => r,
        Err(e) => {
            let reason = match e {
                ReactorResolveError::Invalid {
                    field: "endpoint.url",
                    ..
                } => "InvalidEndpoint",
                _ => "InvalidSpec",
            };
            not_ready(status, reason, e.to_string(), generation);
            return Ok(Action::await_change());
        }
    };
    let desired = match consumer_configs(reactor, &store) {
        Ok(c) => c,
        Err(e) => {
            not_ready(status, "InvalidSpec", e.to_string(), generation);
            return Ok(Action::await_change());
        }
    };
    let js = ctx.jetstream(&store).await?;
    let parking = parking_stream_config(reactor, &store);
    match js.stream_info(&parking.name).await? {
        None => {
            js.create_stream(parking.clone()).await?;
            ctx.event(
                reactor,
                EventType::Normal,
                "ParkingLotCreated",
                "Create",
                format!("created the parking lot {}", parking.name),
            )
            .await;
        }
        Some(info) => {
            let diff = diff_stream(&parking, &info.config);
            if !diff.is_empty() && !diff.has_immutable() {
                js.update_stream(parking.clone()).await?;
            }
        }
    }
    apply_config_map(reactor, &resolved, ctx).await?;

    let stream = store.stream_name();
    let mut infos = Vec::with_capacity(desired.len());
    let mut refused = None;
    for desired in desired {
        match ensure_consumer(reactor, ctx, &js, &stream, desired, status).await? {
            Ok(info) => infos.push(info),
            Err((info, message)) => {
                infos.push(info);
                refused.get_or_insert(message);
            }
        }
    }
    refresh(reactor, ctx, &store, status, &combined(&infos), generation).await?;
    if let Some(message) = refused {
        not_ready(status, "ImmutableFieldChanged", message, generation);
        return Ok(Action::requeue(ctx.settings.status_interval));
    }
    let consumers = match store.spec.stream.partitions {
        Some(n) => {
            status.partitions = Some(n);
            let reports = js
                .partition_progress(&namespace, &reactor.progress_name())
                .await?;
            status.spread = projectionist_crds::partition::spread(&reports).0;
            status.active_sidecar = None;
            format!(
                "{n} consumers {}_p0…{} on stream {stream} (one per partition, shared by the live sidecars)",
                reactor.consumer_name(),
                n - 1
            )
        }
        None => {
            status.partitions = None;
            status.spread.clear();
            format!("consumer {} on stream {stream}", reactor.consumer_name())
        }
    };
    conditions::set(
        &mut status.conditions,
        "Ready",
        true,
        "ConsumerReady",
        format!(
            "{consumers}, parking lot {}; sidecar config in ConfigMap {}",
            reactor.parking_stream(),
            config_map_name(&reactor.name_any())
        ),
        generation,
    );
    Ok(Action::requeue(ctx.settings.status_interval))
}

/// Creates one consumer, updates it in place, or refuses an immutable change: `Err` with the consumer as it is and
/// the refusal's message.
async fn ensure_consumer(
    reactor: &Reactor,
    ctx: &Context,
    js: &crate::nats::JetStream,
    stream: &str,
    desired: consumer::pull::Config,
    status: &ReactorStatus,
) -> Result<Result<consumer::Info, (consumer::Info, String)>, Error> {
    let consumer_name = desired.durable_name.clone().unwrap_or_default();
    let Some(info) = js.consumer_info(stream, &consumer_name).await? else {
        let info = js.put_consumer(stream, desired, true).await?;
        ctx.event(
            reactor,
            EventType::Normal,
            "ConsumerCreated",
            "Create",
            format!("created consumer {consumer_name} on stream {stream}"),
        )
        .await;
        return Ok(Ok(info));
    };
    let diff = diff_consumer(&desired, &info.config);
    if diff.has_immutable() {
        let message = ctx
            .refuse_immutable(
                reactor,
                &status.conditions,
                &format!("consumer {consumer_name}"),
                &diff,
                "Restore the previous value, or delete and re-create the Reactor",
            )
            .await;
        return Ok(Err((info, message)));
    }
    if diff.is_empty() {
        return Ok(Ok(info));
    }
    let what = diff.describe();
    let info = js.put_consumer(stream, desired, false).await?;
    ctx.event(
        reactor,
        EventType::Normal,
        "ConsumerUpdated",
        "Update",
        format!("updated consumer {consumer_name}: {what}"),
    )
    .await;
    Ok(Ok(info))
}

/// The reactor's consumers seen as one: counts summed, the ack floor the highest, the pinned sidecar the first's.
fn combined(infos: &[consumer::Info]) -> consumer::Info {
    let mut all = infos[0].clone();
    for info in &infos[1..] {
        all.num_pending += info.num_pending;
        all.num_ack_pending += info.num_ack_pending;
        all.num_redelivered += info.num_redelivered;
        all.delivered.consumer_sequence += info.delivered.consumer_sequence;
        all.ack_floor.stream_sequence = all
            .ack_floor
            .stream_sequence
            .max(info.ack_floor.stream_sequence);
    }
    all
}

/// Status from consumer info and the parking lot.
async fn refresh(
    reactor: &Reactor,
    ctx: &Context,
    store: &EventStore,
    status: &mut ReactorStatus,
    info: &consumer::Info,
    generation: Option<i64>,
) -> Result<(), Error> {
    status.pending = Some(info.num_pending);
    status.ack_pending = Some(info.num_ack_pending as u64);
    status.delivered = Some(info.delivered.consumer_sequence);
    status.redelivered = Some(info.num_redelivered as u64);
    status.last_acked_sequence = Some(info.ack_floor.stream_sequence);
    status.active_sidecar = info
        .priority_groups
        .iter()
        .find_map(|g| g.pinned_client_id.clone());
    progress_conditions(
        &mut status.conditions,
        ctx,
        &key(reactor),
        info,
        "done",
        generation,
    );
    let js = ctx.jetstream(store).await?;
    if let Some(parking) = js.stream_info(&reactor.parking_stream()).await? {
        let state = &parking.state;
        status.parked_aggregates = Some(state.subjects_count);
        status.parked_events = Some(state.messages);
        status.oldest_parked = (state.messages > 0)
            .then(|| state.first_timestamp.format(&Rfc3339).ok())
            .flatten();
    }
    Ok(())
}

async fn apply_config_map(
    reactor: &Reactor,
    resolved: &ResolvedReactor,
    ctx: &Context,
) -> Result<(), Error> {
    let name = reactor.name_any();
    let yaml = resolved.config.to_yaml().map_err(|e| Error::JetStream {
        action: "rendering the reactor config".into(),
        message: e.to_string(),
    })?;
    writes::apply_config_map(
        ctx,
        reactor,
        writes::ConfigFile {
            config_map: config_map_name(&name),
            key: config_key(&name),
            yaml,
            secrets: &resolved.secrets,
            label: (REACTOR_LABEL, name.clone()),
        },
    )
    .await
}
