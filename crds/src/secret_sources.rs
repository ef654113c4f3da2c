//! Where the sidecar finds Secret keys at run time: each key becomes an environment variable or a mounted file with a
//! stable name, recorded as a [`SecretMount`] for the webhook to provide. Shared by the sidecar's config files
//! (projections, reactors, the event-store API).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::common::{NatsConnection, SecretKeyRef};
use crate::sidecar_config::{NatsAuthConfig, NatsConfig, SecretSource};

/// Directory under which Secret keys needed as files are mounted: `<dir>/<secret>/<key>`.
pub const SECRET_FILES_DIR: &str = "/var/run/secrets/projectionist";

/// A Secret key the sidecar needs, and how it must be provided.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretMount {
    /// The Secret key.
    pub secret: SecretKeyRef,
    /// Environment variable or file it must appear as.
    pub source: SecretSource,
}

/// The environment variable a Secret key is provided as: `PROJECTIONIST_SECRET_<NAME>_<KEY>_<hash>`, upper case,
/// with a short hash of the exact names so that distinct keys never collide after sanitising.
pub fn secret_env_name(secret: &SecretKeyRef) -> String {
    let sanitize = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    // FNV-1a: stable across builds and platforms, unlike the std hasher.
    let hash = crate::partition::fnv1a32(format!("{}/{}", secret.name, secret.key).bytes());
    format!(
        "PROJECTIONIST_SECRET_{}_{}_{hash:08X}",
        sanitize(&secret.name),
        sanitize(&secret.key)
    )
}

/// The path a Secret key is mounted at when it is needed as a file.
pub fn secret_file_path(secret: &SecretKeyRef) -> PathBuf {
    PathBuf::from(SECRET_FILES_DIR)
        .join(&secret.name)
        .join(&secret.key)
}

/// A Secret key provided as an environment variable, recorded in `secrets`.
pub(crate) fn env_source(
    secret: &SecretKeyRef,
    secrets: &mut BTreeSet<SecretMount>,
) -> SecretSource {
    let source = SecretSource::Env(secret_env_name(secret));
    secrets.insert(SecretMount {
        secret: secret.clone(),
        source: source.clone(),
    });
    source
}

/// A Secret key provided as a mounted file, recorded in `secrets`.
fn file_source(secret: &SecretKeyRef, secrets: &mut BTreeSet<SecretMount>) -> SecretSource {
    let source = SecretSource::File(secret_file_path(secret));
    secrets.insert(SecretMount {
        secret: secret.clone(),
        source: source.clone(),
    });
    source
}

/// An EventStore's NATS connection with its credentials as sources (env vars; creds files and TLS material as
/// files), every Secret key it needs recorded in `secrets`. Shared by projections and the event-store API.
pub fn nats_config(spec: &NatsConnection, secrets: &mut BTreeSet<SecretMount>) -> NatsConfig {
    let auth = spec.auth.as_ref().and_then(|a| {
        if let Some(up) = &a.user_password {
            Some(NatsAuthConfig::UserPassword {
                user: env_source(&up.user, secrets),
                password: env_source(&up.password, secrets),
            })
        } else if let Some(t) = &a.token {
            Some(NatsAuthConfig::Token(env_source(t, secrets)))
        } else if let Some(s) = &a.nkey_seed {
            Some(NatsAuthConfig::NkeySeed(env_source(s, secrets)))
        } else {
            a.creds_file
                .as_ref()
                .map(|c| NatsAuthConfig::CredsFile(file_source(c, secrets)))
        }
    });
    let tls = spec.tls.as_ref();
    NatsConfig {
        servers: spec.servers.clone(),
        auth,
        tls_ca: tls
            .and_then(|t| t.ca.as_ref())
            .map(|s| file_source(s, secrets)),
        tls_client_cert: tls
            .and_then(|t| t.client_cert.as_ref())
            .map(|s| file_source(s, secrets)),
        tls_client_key: tls
            .and_then(|t| t.client_key.as_ref())
            .map(|s| file_source(s, secrets)),
    }
}
