//! NATS connections: one per distinct set of servers, credentials and TLS material, reused across reconciles.
//! Credentials are read from the Secrets an EventStore names; a changed Secret yields a new connection.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, consumer, stream};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use projectionist_crds::common::{NatsConnection, SecretKeyRef};
use projectionist_crds::partition;
use tokio::sync::Mutex;

use crate::error::Error;
use crate::metrics::Metrics;

/// How long an unused connection is kept.
const IDLE: Duration = Duration::from_secs(900);

/// The connections the operator holds.
#[derive(Debug)]
pub struct Pool {
    /// Connections by a hash of servers, credentials and TLS material, with when each was last used.
    clients: Mutex<HashMap<u64, (async_nats::Client, std::time::Instant)>>,
    dir: PathBuf,
    metrics: Arc<Metrics>,
    timeout: Duration,
}

/// Credentials and TLS material read from Secrets.
#[derive(Debug, Default, Hash)]
struct Material {
    servers: Vec<String>,
    user_password: Option<(String, String)>,
    token: Option<String>,
    nkey_seed: Option<String>,
    creds: Option<String>,
    ca: Option<String>,
    client_cert: Option<(String, String)>,
}

async fn read_secret(secrets: &Api<Secret>, reference: &SecretKeyRef) -> Result<String, Error> {
    let secret = secrets
        .get_opt(&reference.name)
        .await?
        .ok_or_else(|| Error::Secret {
            name: reference.name.clone(),
            message: "not found".into(),
        })?;
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&reference.key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let from_string = secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(&reference.key))
        .cloned();
    from_data.or(from_string).ok_or_else(|| Error::Secret {
        name: reference.name.clone(),
        message: format!("has no key {:?}", reference.key),
    })
}

impl Pool {
    /// A pool writing TLS material it needs as files under `dir`.
    pub fn new(dir: PathBuf, metrics: Arc<Metrics>, timeout: Duration) -> Self {
        Self {
            clients: Mutex::new(HashMap::new()),
            dir,
            metrics,
            timeout,
        }
    }

    /// JetStream for an EventStore's `spec.nats`, connecting if needed.
    pub async fn jetstream(
        &self,
        kube: &kube::Client,
        namespace: &str,
        connection: &NatsConnection,
    ) -> Result<JetStream, Error> {
        let secrets: Api<Secret> = Api::namespaced(kube.clone(), namespace);
        let mut material = Material {
            servers: connection.servers.clone(),
            ..Material::default()
        };
        if let Some(auth) = &connection.auth {
            if let Some(up) = &auth.user_password {
                material.user_password = Some((
                    read_secret(&secrets, &up.user).await?,
                    read_secret(&secrets, &up.password).await?,
                ));
            }
            if let Some(t) = &auth.token {
                material.token = Some(read_secret(&secrets, t).await?);
            }
            if let Some(s) = &auth.nkey_seed {
                material.nkey_seed = Some(read_secret(&secrets, s).await?);
            }
            if let Some(c) = &auth.creds_file {
                material.creds = Some(read_secret(&secrets, c).await?);
            }
        }
        if let Some(tls) = &connection.tls {
            if let Some(ca) = &tls.ca {
                material.ca = Some(read_secret(&secrets, ca).await?);
            }
            if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
                material.client_cert = Some((
                    read_secret(&secrets, cert).await?,
                    read_secret(&secrets, key).await?,
                ));
            }
        }
        let mut hasher = DefaultHasher::new();
        material.hash(&mut hasher);
        let key = hasher.finish();
        let servers = material.servers.join(",");
        let mut clients = self.clients.lock().await;
        // Connections nobody used for a while (rotated credentials, deleted EventStores) are closed.
        clients.retain(|k, (_, used)| *k == key || used.elapsed() < IDLE);
        let client = match clients.get_mut(&key) {
            Some((client, used)) => {
                *used = std::time::Instant::now();
                client.clone()
            }
            None => {
                let client =
                    self.connect(key, &material)
                        .await
                        .map_err(|e| Error::NatsUnavailable {
                            servers: servers.clone(),
                            message: e.to_string(),
                        })?;
                clients.insert(key, (client.clone(), std::time::Instant::now()));
                client
            }
        };
        drop(clients);
        let mut context = jetstream::new(client.clone());
        context.set_timeout(self.timeout);
        Ok(JetStream {
            context,
            client,
            servers,
            metrics: self.metrics.clone(),
        })
    }

    async fn connect(&self, key: u64, m: &Material) -> anyhow::Result<async_nats::Client> {
        let mut options = if let Some((user, password)) = &m.user_password {
            async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
        } else if let Some(token) = &m.token {
            async_nats::ConnectOptions::with_token(token.clone())
        } else if let Some(seed) = &m.nkey_seed {
            async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
        } else if let Some(creds) = &m.creds {
            async_nats::ConnectOptions::with_credentials(creds)?
        } else {
            async_nats::ConnectOptions::new()
        };
        if m.ca.is_some() || m.client_cert.is_some() {
            let dir = self.dir.join(format!("{key:016x}"));
            std::fs::create_dir_all(&dir)?;
            if let Some(ca) = &m.ca {
                let path = dir.join("ca.crt");
                std::fs::write(&path, ca)?;
                options = options.add_root_certificates(path);
            }
            if let Some((cert, key)) = &m.client_cert {
                let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
                std::fs::write(&cert_path, cert)?;
                std::fs::write(&key_path, key)?;
                options = options.add_client_certificate(cert_path, key_path);
            }
            options = options.require_tls(true);
        }
        let client = options
            .name("projectionist-operator")
            .connection_timeout(self.timeout)
            .max_reconnects(None)
            .connect(m.servers.clone())
            .await?;
        Ok(client)
    }
}

/// JetStream on one connection, counting every API call.
#[derive(Debug, Clone)]
pub struct JetStream {
    context: jetstream::Context,
    client: async_nats::Client,
    servers: String,
    metrics: Arc<Metrics>,
}

impl JetStream {
    fn failed(&self, action: String, error: impl std::fmt::Display) -> Error {
        if self.client.connection_state() == State::Connected {
            Error::JetStream {
                action,
                message: error.to_string(),
            }
        } else {
            Error::NatsUnavailable {
                servers: self.servers.clone(),
                message: format!("{action}: {error}"),
            }
        }
    }

    /// The stream's info, or `None` when it does not exist.
    pub async fn stream_info(&self, name: &str) -> Result<Option<stream::Info>, Error> {
        self.metrics.nats_call("stream_info");
        match self.context.get_stream(name).await {
            Ok(stream) => Ok(Some(stream.cached_info().clone())),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(self.failed(format!("reading stream {name}"), e)),
            },
        }
    }

    /// Creates a stream.
    pub async fn create_stream(&self, config: stream::Config) -> Result<stream::Info, Error> {
        self.metrics.nats_call("stream_create");
        let name = config.name.clone();
        let mut stream = self
            .context
            .create_stream(config)
            .await
            .map_err(|e| self.failed(format!("creating stream {name}"), e))?;
        Ok(stream
            .info()
            .await
            .cloned()
            .unwrap_or_else(|_| stream.cached_info().clone()))
    }

    /// Updates a stream in place.
    pub async fn update_stream(&self, config: stream::Config) -> Result<stream::Info, Error> {
        self.metrics.nats_call("stream_update");
        let name = config.name.clone();
        self.context
            .update_stream(config)
            .await
            .map_err(|e| self.failed(format!("updating stream {name}"), e))
    }

    /// Deletes a stream; `false` when it did not exist.
    pub async fn delete_stream(&self, name: &str) -> Result<bool, Error> {
        self.metrics.nats_call("stream_delete");
        match self.context.delete_stream(name).await {
            Ok(_) => Ok(true),
            Err(e) => match e.kind() {
                jetstream::context::DeleteStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(false)
                }
                _ => Err(self.failed(format!("deleting stream {name}"), e)),
            },
        }
    }

    /// The reports of a partitioned projection's replicas (replica → its partitions and lag); empty when none
    /// reported (or the progress stream does not exist yet).
    pub async fn partition_progress(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<(String, partition::Progress)>, Error> {
        use futures::TryStreamExt;
        self.metrics.nats_call("progress");
        let Ok(stream) = self.context.get_stream(partition::PROGRESS_STREAM).await else {
            return Ok(Vec::new());
        };
        let filter = partition::progress_filter(namespace, name);
        let subjects: Vec<String> = stream
            .info_with_subjects(filter.clone())
            .await
            .map_err(|e| self.failed(format!("reading {filter}"), e))?
            .map_ok(|(subject, _)| subject)
            .try_collect()
            .await
            .map_err(|e| self.failed(format!("reading {filter}"), e))?;
        let mut out = Vec::new();
        for subject in subjects {
            let Ok(message) = stream.get_last_raw_message_by_subject(&subject).await else {
                continue;
            };
            if let Ok(progress) = serde_json::from_slice::<partition::Progress>(&message.payload) {
                let member = subject.rsplit('.').next().unwrap_or_default().to_string();
                out.push((member, progress));
            }
        }
        Ok(out)
    }

    /// A consumer's info, or `None` when it (or its stream) does not exist.
    pub async fn consumer_info(
        &self,
        stream: &str,
        name: &str,
    ) -> Result<Option<consumer::Info>, Error> {
        self.metrics.nats_call("consumer_info");
        let handle = self
            .context
            .get_stream_no_info(stream)
            .await
            .map_err(|e| self.failed(format!("opening stream {stream}"), e))?;
        match handle.consumer_info(name).await {
            Ok(info) => Ok(Some(info.clone())),
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(None),
            Err(e) => {
                let text = e.to_string();
                if text.contains("stream not found") {
                    Ok(None)
                } else {
                    Err(self.failed(format!("reading consumer {name} on {stream}"), e))
                }
            }
        }
    }

    /// Creates or updates a durable pull consumer.
    pub async fn put_consumer(
        &self,
        stream: &str,
        config: consumer::pull::Config,
        create: bool,
    ) -> Result<consumer::Info, Error> {
        let name = config.durable_name.clone().unwrap_or_default();
        let result = if create {
            self.metrics.nats_call("consumer_create");
            self.context
                .create_consumer_on_stream(config, stream)
                .await
                .map_err(|e| self.failed(format!("creating consumer {name} on {stream}"), e))
        } else {
            self.metrics.nats_call("consumer_update");
            self.context
                .update_consumer_on_stream(config, stream)
                .await
                .map_err(|e| self.failed(format!("updating consumer {name} on {stream}"), e))
        };
        let consumer = result?;
        Ok(consumer.cached_info().clone())
    }

    /// Deletes a consumer; `false` when it did not exist.
    pub async fn delete_consumer(&self, stream: &str, name: &str) -> Result<bool, Error> {
        self.metrics.nats_call("consumer_delete");
        match self.context.delete_consumer_from_stream(name, stream).await {
            Ok(_) => Ok(true),
            Err(e) => {
                let text = e.to_string();
                if text.contains("not found") {
                    Ok(false)
                } else {
                    Err(self.failed(format!("deleting consumer {name} on {stream}"), e))
                }
            }
        }
    }
}
