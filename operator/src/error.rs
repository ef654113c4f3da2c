//! What can go wrong in a reconcile, with a stable category for metrics and conditions.

/// A reconcile failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The NATS servers cannot be reached (or do not answer JetStream requests).
    #[error("NATS at {servers} is unavailable: {message}")]
    NatsUnavailable {
        /// The servers tried.
        servers: String,
        /// Why.
        message: String,
    },
    /// A JetStream API call was answered with an error.
    #[error("{action}: {message}")]
    JetStream {
        /// What was attempted.
        action: String,
        /// The server's answer.
        message: String,
    },
    /// A Secret the resource names is missing or lacks the key.
    #[error("Secret {name}: {message}")]
    Secret {
        /// The Secret's name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

impl Error {
    /// A stable, low-cardinality category (`kube`, `nats_unavailable`, `jetstream`, `secret`).
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::NatsUnavailable { .. } => "nats_unavailable",
            Error::JetStream { .. } => "jetstream",
            Error::Secret { .. } => "secret",
        }
    }

    /// The condition reason this error is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::NatsUnavailable { .. } => "NatsUnavailable",
            Error::JetStream { .. } => "JetStreamError",
            Error::Secret { .. } => "SecretNotFound",
        }
    }
}
