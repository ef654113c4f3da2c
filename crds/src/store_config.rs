//! The config file of the sidecar's event-store API for one EventStore: how to reach its stream and under which
//! subject prefix aggregates live. Mounted into pods annotated `projectionist.dev/event-stores` (command services),
//! resolved from the EventStore by the operator or by the sidecar's `dev` mode. Like [`crate::SidecarConfig`] it never
//! holds a secret: credentials appear as env var names or mounted file paths.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::event_store::EventStore;
use crate::sidecar_config::{
    API_VERSION, NatsConfig, ObjectRef, SecretMount, nats_config, parse_file, render_file,
};

/// `kind` of the file.
pub const KIND: &str = "StoreConfig";

/// The annotation a pod carries to get the event-store API for stores of its namespace: comma-separated names.
pub const EVENT_STORES_ANNOTATION: &str = "projectionist.dev/event-stores";

/// One EventStore as the event-store API serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoreConfig {
    /// Always `projectionist.dev/v1alpha1`.
    pub api_version: String,
    /// Always `StoreConfig`.
    pub kind: String,
    /// Which EventStore this is; the API names it by `name`.
    pub event_store: ObjectRef,
    /// How to reach NATS.
    pub nats: NatsConfig,
    /// The stream name.
    pub stream: String,
    /// The stream's subjects; events are appended under the first one's prefix.
    pub subjects: Vec<String>,
    /// The store's partitions, when it is partitioned (events are stored as `<prefix>.<partition>.<type>.<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
}

/// The result of [`resolve_store`]: the config and the Secret keys it expects.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedStore {
    /// The config file's content.
    pub config: StoreConfig,
    /// Every Secret key the config refers to, with the env var or file it must be provided as.
    pub secrets: BTreeSet<SecretMount>,
}

/// Resolves an EventStore into the API's config for it.
pub fn resolve_store(store: &EventStore) -> ResolvedStore {
    let mut secrets = BTreeSet::new();
    let nats = nats_config(&store.spec.nats, &mut secrets);
    let config = StoreConfig {
        api_version: API_VERSION.to_string(),
        kind: KIND.to_string(),
        event_store: ObjectRef {
            namespace: store
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: store.metadata.name.clone().unwrap_or_default(),
        },
        nats,
        stream: store.stream_name(),
        subjects: store.subjects(),
        partitions: store.spec.stream.partitions,
    };
    ResolvedStore { config, secrets }
}

/// Why a StoreConfig file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreConfigError {
    /// The YAML does not match the format.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The YAML error.
        #[source]
        source: serde_yaml::Error,
    },
    /// The file is of another kind or version.
    #[error(
        "{path}: expected apiVersion {API_VERSION} and kind {KIND}, found {api_version} {kind}"
    )]
    Version {
        /// The file.
        path: String,
        /// What the file says.
        api_version: String,
        /// What the file says.
        kind: String,
    },
}

impl StoreConfig {
    /// Renders the file (secret sources as one-key maps, as in the SidecarConfig).
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        render_file(self)
    }

    /// Parses a file's content; `path` is only used in errors.
    pub fn from_yaml(path: &str, text: &str) -> Result<Self, StoreConfigError> {
        let config: StoreConfig = parse_file(text).map_err(|source| StoreConfigError::Parse {
            path: path.to_string(),
            source,
        })?;
        if config.api_version != API_VERSION || config.kind != KIND {
            return Err(StoreConfigError::Version {
                path: path.to_string(),
                api_version: config.api_version,
                kind: config.kind,
            });
        }
        Ok(config)
    }
}

/// The store names of an `projectionist.dev/event-stores` annotation value: comma-separated, blanks ignored,
/// each once, in the order given.
pub fn annotated_stores(value: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// The kind a config file declares (`SidecarConfig`, `StoreConfig`, …), read without parsing the rest, so a
/// config directory can hold both.
pub fn kind_of(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Kind {
        kind: Option<String>,
    }
    serde_yaml::from_str::<Kind>(text).ok().and_then(|k| k.kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::{NatsAuth, NatsConnection, SecretKeyRef};
    use crate::event_store::EventStoreSpec;
    use crate::sidecar_config::{NatsAuthConfig, SecretSource, secret_env_name};

    #[test]
    fn a_store_resolves_to_its_stream_subjects_and_credential_sources() {
        let token = SecretKeyRef {
            name: "nats".into(),
            key: "token".into(),
        };
        let mut store = EventStore::new(
            "users",
            EventStoreSpec {
                nats: NatsConnection {
                    servers: vec!["nats://nats:4222".into()],
                    auth: Some(NatsAuth {
                        user_password: None,
                        token: Some(token.clone()),
                        nkey_seed: None,
                        creds_file: None,
                    }),
                    tls: None,
                },
                stream: Default::default(),
                deletion_policy: Default::default(),
            },
        );
        store.metadata.namespace = Some("shop".into());
        let resolved = resolve_store(&store);
        assert_eq!(resolved.config.event_store.name, "users");
        assert_eq!(resolved.config.subjects, vec!["shop.users.>".to_string()]);
        assert_eq!(resolved.config.stream, store.stream_name());
        assert_eq!(
            resolved.config.nats.auth,
            Some(NatsAuthConfig::Token(SecretSource::Env(secret_env_name(
                &token
            ))))
        );
        assert_eq!(resolved.secrets.len(), 1);
        let yaml = resolved.config.to_yaml().expect("yaml");
        assert_eq!(kind_of(&yaml).as_deref(), Some(KIND));
        assert_eq!(
            StoreConfig::from_yaml("f", &yaml).expect("parses"),
            resolved.config
        );
        let wrong = yaml.replace("kind: StoreConfig", "kind: Other");
        assert!(StoreConfig::from_yaml("f", &wrong).is_err());
    }

    #[test]
    fn the_annotation_lists_names_once_without_blanks() {
        assert_eq!(
            annotated_stores(" users, orders,,users "),
            ["users", "orders"]
        );
        assert!(annotated_stores(" , ").is_empty());
    }
}
