//! A throwaway MariaDB server: `mariadb-install-db` into a temporary datadir, started on a free 127.0.0.1 port.
//!
//! The server runs with `--skip-grant-tables` (any client is root; tests need no accounts) and relaxed flushing
//! (`innodb_flush_log_at_trx_commit=2`, which survives a process crash but not power loss).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::Connection;
use tempfile::TempDir;

use crate::process::{PortBound, ServerProcess, free_port, running_as_root, start_on_free_port};
use crate::tools;

/// A running (or deliberately stopped) MariaDB server.
#[derive(Debug)]
pub struct MariaDb {
    /// Port on 127.0.0.1; kept across restarts.
    port: u16,
    /// Datadir, socket and log; kept across restarts.
    dir: TempDir,
    /// The process while it runs.
    process: Option<ServerProcess>,
    /// Numbers the databases handed out.
    next_db: AtomicU32,
    /// `innodb_flush_log_at_trx_commit=1` (flushed at every commit) instead of `2`.
    durable: bool,
}

const INNODB_LOG_FILE_SIZE: &str = "--innodb-log-file-size=16M";

impl MariaDb {
    /// Installs a fresh datadir, starts the server and waits until it accepts connections.
    pub async fn start() -> crate::Result<Self> {
        Self::start_with(false).await
    }

    /// As [`Self::start`], with InnoDB's durable default (`innodb_flush_log_at_trx_commit=1`), as benchmarks
    /// headline.
    pub async fn start_durable() -> crate::Result<Self> {
        Self::start_with(true).await
    }

    async fn start_with(durable: bool) -> crate::Result<Self> {
        let (_, install) = tools::mariadb()?;
        // `mariadb-install-db` now and then fails when several run at once (its bootstrap server races another's
        // start-up); a fresh datadir and another try is what a person would do.
        let mut attempt = 0;
        let dir = loop {
            attempt += 1;
            let dir = tempfile::Builder::new()
                .prefix("projectionist-mariadb-")
                .tempdir()?;
            let mut cmd = Command::new(&install);
            cmd.arg("--no-defaults")
                .arg(format!("--datadir={}", dir.path().join("data").display()))
                .args([
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    "--skip-name-resolve",
                ])
                .arg(INNODB_LOG_FILE_SIZE);
            if running_as_root() {
                cmd.arg("--user=root");
            }
            let output = tokio::task::spawn_blocking(move || cmd.output())
                .await?
                .context("running mariadb-install-db")?;
            if output.status.success() {
                break dir;
            }
            if attempt >= 3 {
                bail!(
                    "mariadb-install-db failed {attempt} times; the last time: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        };
        let db = Self {
            port: free_port()?,
            dir,
            process: None,
            next_db: AtomicU32::new(1),
            durable,
        };
        start_on_free_port(db).await
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of a database on this server.
    pub fn url_for(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    /// URL of the server without a default database.
    pub fn admin_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub async fn fresh_database(&self) -> crate::Result<String> {
        let name = format!("test_{}", self.next_db.fetch_add(1, Ordering::Relaxed));
        let mut conn = sqlx::MySqlConnection::connect(&self.admin_url()).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        )))
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        Ok(self.url_for(&name))
    }

    /// Stops the server gracefully; [`Self::start_again`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop();
        }
    }

    /// Kills the server (a crash; InnoDB recovers at the next start).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts the server again on the same port and datadir, and waits until it accepts connections.
    pub async fn start_again(&mut self) -> crate::Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let (server, _) = tools::mariadb()?;
        let dir = self.dir.path();
        let mut cmd = Command::new(server);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("mariadb.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .args([
                "--skip-grant-tables",
                "--skip-name-resolve",
                "--skip-log-bin",
            ])
            .args([
                "--innodb-buffer-pool-size=64M",
                if self.durable {
                    "--innodb-flush-log-at-trx-commit=1"
                } else {
                    "--innodb-flush-log-at-trx-commit=2"
                },
                "--max-connections=300",
            ])
            .arg(INNODB_LOG_FILE_SIZE);
        if running_as_root() {
            cmd.arg("--user=root");
        }
        let log = dir.join("mariadb.log");
        let mut process = ServerProcess::spawn("mariadbd", cmd, &log)?;
        let url = self.admin_url();
        process
            .wait_ready(self.port, Duration::from_secs(30), || async {
                sqlx::MySqlConnection::connect(&url).await?.close().await
            })
            .await?;
        self.process = Some(process);
        Ok(())
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PortBound for MariaDb {
    fn set_port(&mut self, port: u16) {
        self.port = port;
    }

    async fn start_again(&mut self) -> crate::Result<()> {
        MariaDb::start_again(self).await
    }
}
