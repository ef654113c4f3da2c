//! Credentials, read from the environment variables and files a SidecarConfig names.

use projectionist_crds::sidecar_config::{NatsAuthConfig, NatsConfig, SecretSource};

/// A secret that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is not set.
    #[error("environment variable {0} is not set")]
    Env(String),
    /// The file cannot be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads a secret's value.
pub fn read(source: &SecretSource) -> Result<String, SecretError> {
    match source {
        SecretSource::Env(name) => std::env::var(name).map_err(|_| SecretError::Env(name.clone())),
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|source| SecretError::File {
                path: path.display().to_string(),
                source,
            }),
    }
}

/// Builds NATS connect options from the config: credentials and TLS. Connection attempts are retried from the start,
/// so a NATS outage at start-up is waited out instead of failing.
pub async fn nats_options(config: &NatsConfig) -> anyhow::Result<async_nats::ConnectOptions> {
    let mut opts = match &config.auth {
        None => async_nats::ConnectOptions::new(),
        Some(NatsAuthConfig::UserPassword { user, password }) => {
            async_nats::ConnectOptions::with_user_and_password(read(user)?, read(password)?)
        }
        Some(NatsAuthConfig::Token(t)) => async_nats::ConnectOptions::with_token(read(t)?),
        Some(NatsAuthConfig::NkeySeed(s)) => async_nats::ConnectOptions::with_nkey(read(s)?),
        Some(NatsAuthConfig::CredsFile(c)) => {
            let path = match c {
                SecretSource::File(p) => p.clone(),
                SecretSource::Env(_) => anyhow::bail!("a creds file must be mounted as a file"),
            };
            async_nats::ConnectOptions::with_credentials_file(path).await?
        }
    };
    if let Some(SecretSource::File(ca)) = &config.tls_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(SecretSource::File(cert)), Some(SecretSource::File(key))) =
        (&config.tls_client_cert, &config.tls_client_key)
    {
        opts = opts
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    Ok(opts
        .retry_on_initial_connect()
        .connection_timeout(std::time::Duration::from_secs(5)))
}
