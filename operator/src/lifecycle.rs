//! The reconcile skeleton of a resource that owns something outside Kubernetes (a consumer, a parking lot): a
//! finalizer while it exists; on deletion, what it owns is deleted and the finalizer removed; otherwise the sync, its
//! error as `Ready=False` with the error's reason, the status applied when it changed.

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::conditions;
use crate::context::{Context, key};
use crate::error::Error;
use crate::writes;

/// A status the skeleton writes: its conditions and observed generation.
pub trait Status: Default + Clone + Serialize + PartialEq {
    /// The conditions.
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    /// Records the generation the status describes.
    fn observe(&mut self, generation: Option<i64>);
}

/// Runs the skeleton for `object` (whose status is `current`): `delete` when it is being deleted, `sync` otherwise.
pub async fn reconcile<K, S>(
    object: &K,
    current: Option<&S>,
    ctx: &Context,
    finalizer: &str,
    delete: impl AsyncFnOnce() -> Result<(), Error>,
    sync: impl AsyncFnOnce(&mut S, Option<i64>) -> Result<Action, Error>,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
    S: Status,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    let has_finalizer = object.finalizers().iter().any(|f| f == finalizer);
    if object.meta().deletion_timestamp.is_some() {
        if has_finalizer {
            delete().await?;
            writes::set_finalizer(&api, object, finalizer, false).await?;
        }
        ctx.forget(&key(object));
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        writes::set_finalizer(&api, object, finalizer, true).await?;
    }
    let generation = object.meta().generation;
    let mut status = current.cloned().unwrap_or_default();
    let result = sync(&mut status, generation).await;
    let action = match &result {
        Ok(action) => action.clone(),
        Err(e) => {
            conditions::set(
                status.conditions_mut(),
                "Ready",
                false,
                e.reason(),
                e.to_string(),
                generation,
            );
            Action::await_change()
        }
    };
    status.observe(generation);
    writes::apply_status(&api, object, current, &status).await?;
    result?;
    ctx.succeeded(&key(object));
    Ok(action)
}
