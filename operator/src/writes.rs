//! The writes both controllers make: a finalizer added or removed (guarded by the resourceVersion), the status
//! applied with server-side apply when it changed, and an owned ConfigMap holding a sidecar config file.

use std::fmt::Debug;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use projectionist_crds::sidecar_config::SecretMount;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::context::MANAGER;
use crate::error::Error;

/// Adds or removes `finalizer`, guarded by the object's resourceVersion (a concurrent change makes it a conflict).
pub async fn set_finalizer<K>(
    api: &Api<K>,
    object: &K,
    finalizer: &str,
    present: bool,
) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut finalizers: Vec<String> = object
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .cloned()
        .collect();
    if present {
        finalizers.push(finalizer.to_string());
    }
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": object.resource_version()}});
    api.patch(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Applies `status` to the status subresource (server-side apply, forced, as the operator's field manager) unless
/// it equals `current`.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    object: &K,
    current: Option<&S>,
    status: &S,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Annotation on a config ConfigMap listing the Secret keys the sidecar needs (JSON), for the injection webhook.
pub const SECRETS_ANNOTATION: &str = "projectionist.dev/secrets";

/// A sidecar config file to keep in an owned ConfigMap.
#[derive(Debug)]
pub struct ConfigFile<'a> {
    /// The ConfigMap's name.
    pub config_map: String,
    /// The file's key (and name in the mounted directory).
    pub key: String,
    /// The file's content.
    pub yaml: String,
    /// The Secret keys the config refers to.
    pub secrets: &'a BTreeSet<SecretMount>,
    /// The label naming the owner (`projectionist.dev/projection: NAME`, …).
    pub label: (&'static str, String),
}

/// Writes `file` into a ConfigMap owned by `owner` (garbage collected with it), with server-side apply, when its
/// content, secret list or ownership differ.
pub async fn apply_config_map<K>(
    ctx: &crate::context::Context,
    owner: &K,
    file: ConfigFile<'_>,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + ResourceExt,
{
    let namespace = owner.namespace().unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let render = |what: &str, e: serde_json::Error| Error::JetStream {
        action: format!("rendering {what}"),
        message: e.to_string(),
    };
    let secrets = serde_json::to_string(file.secrets).map_err(|e| render("the secret list", e))?;
    let data = BTreeMap::from([(file.key.clone(), file.yaml)]);
    let annotations = BTreeMap::from([(SECRETS_ANNOTATION.to_string(), secrets)]);
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
        (file.label.0.to_string(), file.label.1),
    ]);
    if let Some(existing) = ctx.managed_config_map(&namespace, &file.config_map).await
        && existing.data.as_ref() == Some(&data)
        && existing
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SECRETS_ANNOTATION))
            == annotations.get(SECRETS_ANNOTATION)
        && existing
            .metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| !o.is_empty())
    {
        return Ok(());
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(file.config_map.clone()),
            namespace: Some(namespace),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: owner.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    };
    let mut value = serde_json::to_value(&cm).map_err(|e| render("the ConfigMap", e))?;
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("ConfigMap");
    api.patch(
        &file.config_map,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await?;
    Ok(())
}
