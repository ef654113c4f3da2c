//! The sidecar's config file: everything one projection needs at run time, resolved from an EventStore and a
//! Projection by the operator (or by the sidecar's `dev` mode) and mounted into the pod.
//!
//! The file is versioned (`apiVersion: projectionist.dev/v1alpha1`, `kind: SidecarConfig`) and never holds a secret:
//! credentials appear only as the name of an environment variable or the path of a mounted file, which the webhook
//! fills from the Secret keys listed in [`Resolved::secrets`].

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::consumer::{self, ConsumerSpecError, PRIORITY_GROUP};
use crate::duration;
use crate::event_store::EventStore;
use crate::projection::{Driver, ErrorPolicy, Handler, Projection};
use crate::secret_sources::env_source;
pub use crate::secret_sources::{
    SECRET_FILES_DIR, SecretMount, nats_config, secret_env_name, secret_file_path,
};
use crate::template::{self, HandlerError};

/// `apiVersion` of the file.
pub const API_VERSION: &str = "projectionist.dev/v1alpha1";
/// `kind` of the file.
pub const KIND: &str = "SidecarConfig";

/// One projection's resolved configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// Always `projectionist.dev/v1alpha1`.
    pub api_version: String,
    /// Always `SidecarConfig`.
    pub kind: String,
    /// Which Projection this is.
    pub projection: ObjectRef,
    /// Which EventStore it reads.
    pub event_store: ObjectRef,
    /// How to reach NATS.
    pub nats: NatsConfig,
    /// The stream name.
    pub stream: String,
    /// The EventStore's subjects, so that the event-store API can serve the store this projection reads. Empty in
    /// files written before the API existed: the API then does not serve the store.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub store_subjects: Vec<String>,
    /// The durable consumer name.
    pub consumer: String,
    /// The priority group to pull from (one pinned client at a time).
    pub priority_group: String,
    /// The read model's database.
    pub database: DatabaseConfig,
    /// Idempotent DDL run at start.
    #[serde(default)]
    pub schema: Vec<String>,
    /// SQL per event type, as templates (the sidecar parses them with [`crate::template`]).
    pub handlers: Vec<Handler>,
    /// Batching.
    pub batch: BatchConfig,
    /// How long the server waits for an ack before redelivering.
    #[serde(with = "duration_text")]
    pub ack_wait: Duration,
    /// Error handling.
    pub on_error: OnErrorConfig,
    /// Rebuild request, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildConfig>,
    /// Set when the EventStore is partitioned: the live replicas share the partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitioning: Option<Partitioning>,
}

/// How a projection on a partitioned store runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Partitioning {
    /// The store's partitions.
    pub partitions: u32,
    /// The projection's subject filters as publishers write subjects (`<prefix>.<type>.<id>`); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// How many partitions one sidecar applies at once.
    pub workers: u32,
}

/// A namespaced object's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// Where a secret value is read from at run time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SecretSource {
    /// An environment variable of the sidecar container.
    Env(String),
    /// A file mounted into the sidecar container.
    File(PathBuf),
}

/// NATS connection settings with secrets as sources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs.
    pub servers: Vec<String>,
    /// Credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<NatsAuthConfig>,
    /// PEM CA bundle file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<SecretSource>,
    /// PEM client certificate file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_cert: Option<SecretSource>,
    /// PEM client key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_key: Option<SecretSource>,
}

/// NATS credentials as sources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum NatsAuthConfig {
    /// User and password.
    UserPassword {
        /// The user name.
        user: SecretSource,
        /// The password.
        password: SecretSource,
    },
    /// A token.
    Token(SecretSource),
    /// An NKey seed.
    NkeySeed(SecretSource),
    /// A `.creds` file.
    CredsFile(SecretSource),
}

/// The read model's database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The driver.
    pub driver: Driver,
    /// Where the connection URL is read from.
    pub url: SecretSource,
    /// Connection pool size.
    pub max_connections: u32,
}

/// Batching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchConfig {
    /// Most events per transaction.
    pub max_events: u32,
    /// Longest wait for a batch to fill.
    #[serde(with = "duration_text")]
    pub max_wait: Duration,
}

/// Error handling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnErrorConfig {
    /// The policy for an event that fails by itself.
    pub policy: ErrorPolicy,
    /// Attempts before the policy applies.
    pub max_attempts: u32,
    /// First retry delay.
    #[serde(with = "duration_text")]
    pub backoff_initial: Duration,
    /// Largest retry delay.
    #[serde(with = "duration_text")]
    pub backoff_max: Duration,
    /// Subject dead letters are published to.
    pub dead_letter_subject: String,
}

/// A rebuild request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RebuildConfig {
    /// The token; a change triggers one rebuild.
    pub token: String,
    /// Statements that empty the read model.
    pub reset: Vec<String>,
}

/// The result of [`resolve`]: the config and the secrets it expects.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The config file's content.
    pub config: SidecarConfig,
    /// Every Secret key the config refers to, with the env var or file it must be provided as.
    pub secrets: BTreeSet<SecretMount>,
}

/// Why a Projection cannot be resolved against its EventStore.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The Projection names another EventStore.
    #[error("spec.eventStore: projection reads {wanted:?} but was resolved against {given:?}")]
    WrongStore {
        /// What the projection names.
        wanted: String,
        /// What was passed.
        given: String,
    },
    /// The two are in different namespaces.
    #[error("the EventStore must be in the Projection's namespace {0:?}")]
    Namespace(String),
    /// A duration field does not parse.
    #[error("spec.{field}: {source}")]
    Duration {
        /// The field's path under `spec`.
        field: &'static str,
        /// The parse error.
        #[source]
        source: duration::DurationError,
    },
    /// The consumer part of the spec is invalid.
    #[error(transparent)]
    Consumer(#[from] ConsumerSpecError),
    /// A handler template does not parse.
    #[error("spec.handlers: {0}")]
    Handler(#[from] HandlerError),
    /// A setting that does not fit a partitioned store (or needs one).
    #[error("{0}")]
    Partitioning(String),
    /// The backoff is inverted.
    #[error("spec.onError.backoff: initial {initial:?} is larger than max {max:?}")]
    Backoff {
        /// `initial` as written.
        initial: String,
        /// `max` as written.
        max: String,
    },
}

fn parse_duration(field: &'static str, text: &str) -> Result<Duration, ResolveError> {
    duration::parse(text).map_err(|source| ResolveError::Duration { field, source })
}

/// Resolves a Projection against its EventStore into the sidecar's config, validating everything the sidecar will
/// rely on (durations, subject filters, handler templates) so that a bad spec is reported before a pod runs it.
pub fn resolve(store: &EventStore, projection: &Projection) -> Result<Resolved, ResolveError> {
    let store_name = store.metadata.name.clone().unwrap_or_default();
    if projection.spec.event_store != store_name {
        return Err(ResolveError::WrongStore {
            wanted: projection.spec.event_store.clone(),
            given: store_name,
        });
    }
    let namespace = projection
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    if store.metadata.namespace.as_deref().unwrap_or("default") != namespace {
        return Err(ResolveError::Namespace(namespace));
    }
    // The consumer mapping validates filters, start position and ack wait.
    consumer::consumer_config(projection, store)?;
    let spec = &projection.spec;
    template::parse_handlers(&spec.handlers, spec.database.driver)?;

    let mut secrets = BTreeSet::new();
    let nats = nats_config(&store.spec.nats, &mut secrets);
    let database = DatabaseConfig {
        driver: spec.database.driver,
        url: env_source(&spec.database.url_secret, &mut secrets),
        max_connections: spec.database.max_connections,
    };
    let backoff_initial =
        parse_duration("onError.backoff.initial", &spec.on_error.backoff.initial)?;
    let backoff_max = parse_duration("onError.backoff.max", &spec.on_error.backoff.max)?;
    if backoff_initial > backoff_max {
        return Err(ResolveError::Backoff {
            initial: spec.on_error.backoff.initial.clone(),
            max: spec.on_error.backoff.max.clone(),
        });
    }

    let config = SidecarConfig {
        api_version: API_VERSION.to_string(),
        kind: KIND.to_string(),
        projection: ObjectRef {
            namespace: namespace.clone(),
            name: projection.metadata.name.clone().unwrap_or_default(),
        },
        event_store: ObjectRef {
            namespace,
            name: store_name,
        },
        nats,
        stream: store.stream_name(),
        store_subjects: store.subjects(),
        consumer: projection.consumer_name(),
        priority_group: PRIORITY_GROUP.to_string(),
        database,
        schema: spec.schema.clone(),
        handlers: spec.handlers.clone(),
        batch: BatchConfig {
            max_events: spec.batch.max_events,
            max_wait: parse_duration("batch.maxWait", &spec.batch.max_wait)?,
        },
        ack_wait: parse_duration("ackWait", &spec.ack_wait)?,
        on_error: OnErrorConfig {
            policy: spec.on_error.policy,
            max_attempts: spec.on_error.max_attempts,
            backoff_initial,
            backoff_max,
            dead_letter_subject: projection.dead_letter_subject(),
        },
        rebuild: spec.rebuild.as_ref().map(|r| RebuildConfig {
            token: r.token.clone(),
            reset: r.reset.clone(),
        }),
        partitioning: partitioning(store, projection)?,
    };
    Ok(Resolved { config, secrets })
}

/// The partitioning of a projection on a partitioned store; `None` on an unpartitioned one.
fn partitioning(
    store: &EventStore,
    projection: &Projection,
) -> Result<Option<Partitioning>, ResolveError> {
    let spec = &projection.spec;
    let workers = spec.workers.unwrap_or(1);
    let Some(partitions) = store.spec.stream.partitions else {
        return Ok(None);
    };
    if store.layout().is_none() {
        return Err(ResolveError::Partitioning(format!(
            "the EventStore is partitioned but its subjects {:?} have no single `<prefix>.>` form",
            store.subjects()
        )));
    }
    if workers > 1 && spec.database.driver == crate::projection::Driver::Sqlite {
        return Err(ResolveError::Partitioning(format!(
            "spec.workers: {workers} workers need PostgreSQL or MySQL/MariaDB; SQLite takes one writer at a time"
        )));
    }
    if let Some(start) = &spec.start_at
        && start.policy != crate::projection::StartPolicy::Beginning
    {
        return Err(ResolveError::Partitioning(format!(
            "spec.startAt: a projection on a partitioned store starts at the Beginning (each partition is read from \
             its checkpoint), not {:?}",
            start.policy
        )));
    }
    Ok(Some(Partitioning {
        partitions,
        filters: spec
            .events
            .as_ref()
            .map(|e| e.subjects.clone())
            .unwrap_or_default(),
        workers,
    }))
}

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The YAML does not match the format; the message names the field and position.
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
    /// A handler template does not parse.
    #[error("{path}: handlers: {source}")]
    Handler {
        /// The file.
        path: String,
        /// The parse error.
        #[source]
        source: Box<HandlerError>,
    },
}

/// Renders a config file: secret sources and NATS credentials as one-key maps (`url: {env: NAME}`).
pub(crate) fn render_file<T: Serialize>(config: &T) -> Result<String, serde_yaml::Error> {
    let mut out = Vec::new();
    let mut ser = serde_yaml::Serializer::new(&mut out);
    serde_yaml::with::singleton_map_recursive::serialize(config, &mut ser)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Parses a config file rendered by [`render_file`].
pub(crate) fn parse_file<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, serde_yaml::Error> {
    serde_yaml::with::singleton_map_recursive::deserialize(serde_yaml::Deserializer::from_str(text))
}

impl SidecarConfig {
    /// Renders the file. Secret sources and NATS credentials are written as one-key maps (`url: {env: NAME}`).
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        render_file(self)
    }

    /// Parses a file's content; `path` is only used in errors.
    pub fn from_yaml(path: &str, text: &str) -> Result<Self, ConfigFileError> {
        let config: SidecarConfig = parse_file(text).map_err(|source| ConfigFileError::Parse {
            path: path.to_string(),
            source,
        })?;
        if config.api_version != API_VERSION || config.kind != KIND {
            return Err(ConfigFileError::Version {
                path: path.to_string(),
                api_version: config.api_version,
                kind: config.kind,
            });
        }
        template::parse_handlers(&config.handlers, config.database.driver).map_err(|source| {
            ConfigFileError::Handler {
                path: path.to_string(),
                source: Box::new(source),
            }
        })?;
        Ok(config)
    }
}

/// Durations written as Go-style text (`30s`) in the file.
pub(crate) mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::duration::format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        crate::duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::{NatsAuth, NatsConnection, NatsTls, SecretKeyRef, UserPassword};
    use crate::event_store::EventStoreSpec;
    use crate::projection::{Database, ProjectionSpec};

    fn secret(name: &str, key: &str) -> SecretKeyRef {
        SecretKeyRef {
            name: name.into(),
            key: key.into(),
        }
    }

    fn store() -> EventStore {
        let mut s = EventStore::new(
            "users",
            EventStoreSpec {
                nats: NatsConnection {
                    servers: vec!["nats://nats:4222".into()],
                    auth: Some(NatsAuth {
                        user_password: Some(UserPassword {
                            user: secret("nats-creds", "user"),
                            password: secret("nats-creds", "password"),
                        }),
                        token: None,
                        nkey_seed: None,
                        creds_file: None,
                    }),
                    tls: Some(NatsTls {
                        ca: Some(secret("nats-ca", "ca.crt")),
                        client_cert: None,
                        client_key: None,
                    }),
                },
                stream: Default::default(),
                deletion_policy: Default::default(),
            },
        );
        s.metadata.namespace = Some("shop".into());
        s
    }

    fn projection() -> Projection {
        let mut p = Projection::new(
            "users-view",
            ProjectionSpec {
                event_store: "users".into(),
                events: None,
                start_at: None,
                database: Database {
                    driver: Driver::Postgres,
                    url_secret: secret("users-db", "url"),
                    max_connections: 4,
                },
                schema: vec!["CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY)".into()],
                handlers: vec![Handler {
                    event: "UserCreated".into(),
                    sql: vec!["INSERT INTO users (id) VALUES (:data.id)".into()],
                }],
                batch: Default::default(),
                ack_wait: "30s".into(),
                on_error: Default::default(),
                rebuild: None,
                pod_selector: None,
                workers: None,
            },
        );
        p.metadata.namespace = Some("shop".into());
        p
    }

    #[test]
    fn resolves_names_and_secret_references_without_values() {
        let resolved = resolve(&store(), &projection()).expect("resolves");
        let c = &resolved.config;
        assert_eq!(c.stream, "shop_users");
        assert_eq!(c.consumer, "shop_users-view");
        assert_eq!(
            c.on_error.dead_letter_subject,
            "projectionist.deadletter.shop.users-view"
        );
        let db_env = secret_env_name(&secret("users-db", "url"));
        assert!(
            db_env.starts_with("PROJECTIONIST_SECRET_USERS_DB_URL_"),
            "{db_env}"
        );
        assert_eq!(c.database.url, SecretSource::Env(db_env));
        assert_eq!(
            c.nats.tls_ca,
            Some(SecretSource::File(
                "/var/run/secrets/projectionist/nats-ca/ca.crt".into()
            ))
        );
        assert_eq!(resolved.secrets.len(), 4);
        let yaml = c.to_yaml().expect("renders");
        assert!(
            yaml.starts_with("apiVersion: projectionist.dev/v1alpha1\nkind: SidecarConfig\n"),
            "{yaml}"
        );
        assert_eq!(
            SidecarConfig::from_yaml("x.yaml", &yaml).expect("round trip"),
            *c
        );
    }

    #[test]
    fn env_names_do_not_collide_after_sanitising() {
        assert_ne!(
            secret_env_name(&secret("a-b", "c")),
            secret_env_name(&secret("a", "b-c"))
        );
        assert_ne!(
            secret_env_name(&secret("a.b", "c")),
            secret_env_name(&secret("a-b", "c"))
        );
    }

    #[test]
    fn bad_handler_and_wrong_store_are_refused() {
        let mut p = projection();
        p.spec.handlers[0].sql[0] = "INSERT INTO users VALUES (:dta.id)".into();
        let e = resolve(&store(), &p).expect_err("bad template");
        assert!(
            e.to_string()
                .contains("spec.handlers: handler for \"UserCreated\", statement 1"),
            "{e}"
        );

        let mut p = projection();
        p.spec.event_store = "orders".into();
        assert!(matches!(
            resolve(&store(), &p),
            Err(ResolveError::WrongStore { .. })
        ));
    }

    #[test]
    fn malformed_file_names_file_and_field() {
        let e = SidecarConfig::from_yaml(
            "/etc/p/users.yaml",
            "apiVersion: projectionist.dev/v1alpha1\nkind: SidecarConfig\nprojection: 3\n",
        )
        .expect_err("bad");
        let text = e.to_string();
        assert!(text.starts_with("/etc/p/users.yaml: projection"), "{text}");

        let yaml = resolve(&store(), &projection())
            .expect("ok")
            .config
            .to_yaml()
            .expect("yaml");
        let e =
            SidecarConfig::from_yaml("f.yaml", &yaml.replace("maxEvents: 500", "maxEvents: many"))
                .expect_err("bad");
        assert!(e.to_string().contains("batch.maxEvents"), "{e}");
    }
}
