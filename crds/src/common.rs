//! Types both custom resources share.

use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// A reference to one key of a Secret in the resource's own namespace. Credentials are only ever named this way,
/// never written inline.
#[derive(
    Deserialize, Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, KubeSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace as the resource that refers to it.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key within the Secret's `data` whose value is used.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// How to reach the NATS servers that hold an EventStore's stream.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsConnection {
    /// NATS server URLs, e.g. `nats://nats.nats.svc:4222`. Several URLs name the members of one cluster.
    #[schemars(
        length(min = 1, max = 16),
        inner(
            length(min = 1, max = 512),
            regex(pattern = r"^(nats|tls|ws|wss)://\S+$")
        )
    )]
    pub servers: Vec<String>,
    /// Credentials, by reference to Secrets. Omit for a server without authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<NatsAuth>,
    /// TLS settings beyond the system trust store: a private CA and/or a client certificate for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<NatsTls>,
}

/// NATS credentials. Exactly one method is set; every value comes from a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.userPassword) ? 1 : 0) + (has(self.token) ? 1 : 0) + (has(self.nkeySeed) ? 1 : 0) + (has(self.credsFile) ? 1 : 0) == 1"
).message("exactly one of userPassword, token, nkeySeed or credsFile must be set"))]
pub struct NatsAuth {
    /// User name and password authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_password: Option<UserPassword>,
    /// Token authentication: the Secret key holds the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretKeyRef>,
    /// NKey authentication: the Secret key holds the NKey seed (`SU...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_seed: Option<SecretKeyRef>,
    /// Decentralised JWT authentication: the Secret key holds a `.creds` file (JWT plus NKey seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<SecretKeyRef>,
}

/// A user name and password, each from a Secret key.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserPassword {
    /// Secret key holding the user name.
    pub user: SecretKeyRef,
    /// Secret key holding the password.
    pub password: SecretKeyRef,
}

/// TLS towards NATS.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.clientCert) == has(self.clientKey)")
    .message("clientCert and clientKey must be set together"))]
pub struct NatsTls {
    /// Secret key holding a PEM CA bundle used to verify the servers, instead of the system trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<SecretKeyRef>,
    /// Secret key holding the PEM client certificate for mutual TLS (set together with `clientKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<SecretKeyRef>,
    /// Secret key holding the PEM private key of `clientCert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<SecretKeyRef>,
}

/// Free-form string labels, as in `metadata` of a stream.
pub type StringMap = BTreeMap<String, String>;

/// The value of a condition's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// It cannot be told (yet).
    Unknown,
}

impl ConditionStatus {
    /// The string Kubernetes uses for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// Finds the condition of the given type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}
