//! A real `nats-server` with JetStream, on a free 127.0.0.1 port with its own store directory.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use tempfile::TempDir;

use crate::process::{PortBound, ServerProcess, free_port, start_on_free_port};
use crate::tools;

/// A running (or deliberately stopped) nats-server. Stopped and its store removed on drop.
#[derive(Debug)]
pub struct NatsServer {
    /// Client port on 127.0.0.1; kept across restarts.
    port: u16,
    /// Holds the JetStream store and the log; kept across restarts.
    dir: TempDir,
    /// The process while it runs.
    process: Option<ServerProcess>,
    /// User and password the server requires, if any.
    auth: Option<(String, String)>,
}

impl NatsServer {
    /// Starts a server and waits until JetStream answers.
    pub async fn start() -> crate::Result<Self> {
        Self::start_inner(free_port()?, None).await
    }

    /// A server that requires this user and password.
    pub async fn start_with_user(user: &str, password: &str) -> crate::Result<Self> {
        Self::start_inner(free_port()?, Some((user.to_string(), password.to_string()))).await
    }

    /// Starts a server on `port`, or on a free port if that one is taken.
    pub async fn start_preferring(port: u16) -> crate::Result<Self> {
        Self::start_inner(port, None).await
    }

    async fn start_inner(port: u16, auth: Option<(String, String)>) -> crate::Result<Self> {
        let server = Self {
            port,
            dir: tempfile::Builder::new()
                .prefix("projectionist-nats-")
                .tempdir()?,
            process: None,
            auth,
        };
        start_on_free_port(server).await
    }

    fn options(&self) -> async_nats::ConnectOptions {
        match &self.auth {
            Some((user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            None => async_nats::ConnectOptions::new(),
        }
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's name: unique (its directory's), so that readiness is checked against this server and not
    /// another one answering on the port.
    fn name(&self) -> String {
        let dir = self.dir.path().file_name().unwrap_or_default();
        format!("test-{}", dir.to_string_lossy())
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// Connects a client.
    pub async fn connect(&self) -> crate::Result<async_nats::Client> {
        self.options()
            .connect(self.url())
            .await
            .with_context(|| format!("connecting to {}", self.url()))
    }

    /// Connects a client and returns its JetStream context.
    pub async fn jetstream(&self) -> crate::Result<async_nats::jetstream::Context> {
        Ok(async_nats::jetstream::new(self.connect().await?))
    }

    /// Stops the server gracefully (an outage); [`Self::start_again`] brings it back on the same port and store.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop();
        }
    }

    /// Kills the server (a crash).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Starts the server again on the same port and store, and waits until JetStream answers.
    pub async fn start_again(&mut self) -> crate::Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let bin = tools::nats_server()?;
        let mut cmd = Command::new(bin);
        cmd.arg("--addr")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--jetstream")
            .arg("--store_dir")
            .arg(self.store_dir())
            .arg("--server_name")
            .arg(self.name());
        if let Some((user, password)) = &self.auth {
            cmd.arg("--user").arg(user).arg("--pass").arg(password);
        }
        let log = self.dir.path().join("nats-server.log");
        let mut process = ServerProcess::spawn("nats-server", cmd, &log)?;
        let url = self.url();
        let options = || self.options();
        let name = self.name();
        process
            .wait_ready(self.port, Duration::from_secs(15), || async {
                let client = options().connect(&url).await.map_err(|e| e.to_string())?;
                let answering = client.server_info().server_name;
                if answering != name {
                    return Err(format!("{answering} answers on the port, not {name}"));
                }
                let js = async_nats::jetstream::new(client);
                js.query_account()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await?;
        self.process = Some(process);
        Ok(())
    }
}

impl PortBound for NatsServer {
    fn set_port(&mut self, port: u16) {
        self.port = port;
    }

    async fn start_again(&mut self) -> crate::Result<()> {
        NatsServer::start_again(self).await
    }
}
