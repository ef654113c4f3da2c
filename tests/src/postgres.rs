//! A throwaway PostgreSQL cluster: `initdb` once per machine into a cached template, copied per server, started on
//! a free 127.0.0.1 port with durability settings off (tests do not survive power loss, only process crashes).
//!
//! PostgreSQL refuses to run as root; when the tests run as root the server runs as the `postgres` system user.

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use sqlx::Connection;
use tempfile::TempDir;

use crate::process::{PortBound, ServerProcess, free_port, running_as_root, start_on_free_port};
use crate::tools;

/// A running (or deliberately stopped) PostgreSQL server.
#[derive(Debug)]
pub struct Postgres {
    /// Port on 127.0.0.1; kept across restarts.
    port: u16,
    /// Data directory, socket and log; kept across restarts.
    dir: TempDir,
    /// The process while it runs.
    process: Option<ServerProcess>,
    /// Numbers the databases handed out.
    next_db: AtomicU32,
    /// `fsync`, `synchronous_commit` and `full_page_writes` on.
    durable: bool,
}

/// The user and group the server runs as when the tests run as root.
fn server_user() -> crate::Result<Option<(u32, u32)>> {
    if !running_as_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")?
        .context("tests run as root and there is no `postgres` user to run PostgreSQL as; run scripts/setup.sh")?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

/// A command that runs `program` as the server user.
fn as_server_user(program: &Path) -> crate::Result<Command> {
    Ok(match server_user()? {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    })
}

fn chown_tree(path: &Path) -> crate::Result<()> {
    if let Some((uid, gid)) = server_user()? {
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(path)
            .status()?;
        if !status.success() {
            bail!("chown -R {uid}:{gid} {} failed", path.display());
        }
        chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The cached `initdb` output, created once per machine (and per PostgreSQL version).
fn template() -> crate::Result<PathBuf> {
    let bin = tools::postgres_bin_dir()?;
    let version = bin
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "local".into());
    let root = std::env::temp_dir().join("projectionist-test-templates");
    let data = root.join(format!("postgres-{version}"));
    if data.join("PG_VERSION").exists() {
        return Ok(data);
    }
    std::fs::create_dir_all(&root)?;
    let staging = tempfile::Builder::new()
        .prefix("postgres-staging-")
        .tempdir_in(&root)?;
    chown_tree(staging.path())?;
    let staging_data = staging.path().join("data");
    let output = as_server_user(&bin.join("initdb"))?
        .arg("-D")
        .arg(&staging_data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .output()
        .context("running initdb")?;
    if !output.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    // Another test may have won the race; either way a complete template is in place afterwards.
    if std::fs::rename(&staging_data, &data).is_err() && !data.join("PG_VERSION").exists() {
        bail!(
            "cannot move the PostgreSQL template into {}",
            data.display()
        );
    }
    Ok(data)
}

impl Postgres {
    /// Starts a fresh cluster and waits until it accepts connections. Tests run it without durability (`fsync`,
    /// `synchronous_commit` and `full_page_writes` off): a crash of the machine is not what they simulate.
    pub async fn start() -> crate::Result<Self> {
        Self::start_with(false).await
    }

    /// Starts a fresh cluster with PostgreSQL's durable defaults (`fsync`, `synchronous_commit` and
    /// `full_page_writes` on), as benchmarks headline.
    pub async fn start_durable() -> crate::Result<Self> {
        Self::start_with(true).await
    }

    async fn start_with(durable: bool) -> crate::Result<Self> {
        let template = tokio::task::spawn_blocking(template).await??;
        let dir = tempfile::Builder::new()
            .prefix("projectionist-pg-")
            .tempdir()?;
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(dir.path().join("data"))
            .status()?;
        if !status.success() {
            bail!("copying the PostgreSQL template failed");
        }
        chown_tree(dir.path())?;
        let pg = Self {
            port: free_port()?,
            dir,
            process: None,
            next_db: AtomicU32::new(1),
            durable,
        };
        start_on_free_port(pg).await
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the `postgres` maintenance database.
    pub fn admin_url(&self) -> String {
        self.url_for("postgres")
    }

    /// URL of a database on this server.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub async fn fresh_database(&self) -> crate::Result<String> {
        let name = format!("test_{}", self.next_db.fetch_add(1, Ordering::Relaxed));
        let mut conn = sqlx::PgConnection::connect(&self.admin_url()).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(self.url_for(&name))
    }

    /// Stops the server (fast shutdown: clients are disconnected); [`Self::start_again`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop_with(Signal::SIGINT, Duration::from_secs(10));
        }
    }

    /// Kills the server (a crash; recovery runs at the next start).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts the server again on the same port and data, and waits until it accepts connections.
    pub async fn start_again(&mut self) -> crate::Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let bin = tools::postgres_bin_dir()?;
        let mut cmd = as_server_user(&bin.join("postgres"))?;
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(if self.durable {
                [
                    "-c",
                    "fsync=on",
                    "-c",
                    "synchronous_commit=on",
                    "-c",
                    "full_page_writes=on",
                ]
            } else {
                [
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ]
            })
            .args(["-c", "max_connections=200", "-c", "shared_buffers=32MB"]);
        let log = self.dir.path().join("postgres.log");
        let mut process = ServerProcess::spawn("postgres", cmd, &log)?;
        let url = self.admin_url();
        process
            .wait_ready(self.port, Duration::from_secs(30), || async {
                sqlx::PgConnection::connect(&url).await?.close().await
            })
            .await?;
        self.process = Some(process);
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PortBound for Postgres {
    fn set_port(&mut self, port: u16) {
        self.port = port;
    }

    async fn start_again(&mut self) -> crate::Result<()> {
        Postgres::start_again(self).await
    }
}
