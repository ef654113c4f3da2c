//! A spawned server process: stopped by PID when the handle drops, and watched by a small shell loop that stops it
//! if the test process itself dies first (a test killed by a timeout must not leave servers behind).

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it right away), never one this process handed
/// out before: the kernel may give a just-released port to the next caller, and two tests running at once would
/// then start their servers on the same port, one of them failing to bind while its readiness check is answered by
/// the other's server.
pub fn free_port() -> crate::Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let mut handed_out = HANDED_OUT
            .lock()
            .map_err(|_| anyhow!("the port registry is poisoned"))?;
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    bail!("no port left on 127.0.0.1 that this process has not handed out already")
}

/// Waits until something accepts connections on `127.0.0.1:port`, at most `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .is_ok()
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// A server that listens on a port it is told, and can be (re)started on it.
pub trait PortBound {
    /// Moves the server to another port (while stopped).
    fn set_port(&mut self, port: u16);
    /// Starts the server on its port and waits until it is ready.
    fn start_again(&mut self) -> impl std::future::Future<Output = crate::Result<()>>;
}

/// Starts `server`, moving it to a fresh port and trying again if its port was taken in between (a free port is
/// free when picked, but another process may bind it before the server does): five attempts.
pub async fn start_on_free_port<S: PortBound>(mut server: S) -> crate::Result<S> {
    let mut attempts = 0;
    loop {
        match server.start_again().await {
            Ok(()) => return Ok(server),
            Err(e) if attempts >= 4 => return Err(e),
            Err(_) => {
                attempts += 1;
                server.set_port(free_port()?);
            }
        }
    }
}

/// Whether this process runs as root (servers that refuse root are then run as another user).
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A running server.
#[derive(Debug)]
pub struct ServerProcess {
    /// What it is, for messages.
    name: String,
    /// The child; `None` once stopped.
    child: Option<Child>,
    /// The watchdog shell loop; killed together with the server.
    watchdog: Option<Child>,
    /// Where stdout and stderr go.
    log: PathBuf,
}

impl ServerProcess {
    /// Spawns `command` with output to `log` and a watchdog.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> crate::Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {name}: {command:?}"))?;
        let watchdog = spawn_watchdog(child.id()).ok();
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            watchdog,
            log: log.to_path_buf(),
        })
    }

    /// The server's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Fails with the log's tail if the process has exited.
    pub fn ensure_running(&mut self) -> crate::Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            bail!("{} exited; log tail:\n{}", self.name, self.log_tail())
        }
    }

    /// Waits until the server listens on `port`, then until `ready` succeeds (each for at most `timeout`); fails
    /// with the log's tail otherwise, and as soon as the process exits (a server that could not bind its port must
    /// not be taken as ready because something else answers there).
    pub async fn wait_ready<F, Fut, E>(
        &mut self,
        port: u16,
        timeout: Duration,
        mut ready: F,
    ) -> crate::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            let attempt = tokio::net::TcpStream::connect(("127.0.0.1", port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), attempt).await {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not listen on {port}; log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let outcome = ready().await;
            self.ensure_running()?;
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "{} is not ready: {e}; log tail:\n{}",
                        self.name,
                        self.log_tail()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Sends `signal` and waits up to `grace` for the process to exit, then kills it.
    pub fn stop_with(&mut self, signal: Signal, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, signal);
            let deadline = Instant::now() + grace;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// Graceful stop (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        self.stop_with(Signal::SIGTERM, Duration::from_secs(10));
    }

    /// Abrupt stop (SIGKILL), as a crash.
    pub fn kill(&mut self) {
        self.stop_with(Signal::SIGKILL, Duration::from_secs(5));
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A shell loop that exits when either the test process or the server exits, and kills the server in the first case.
fn spawn_watchdog(server_pid: u32) -> std::io::Result<Child> {
    let me = std::process::id();
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {server_pid} 2>/dev/null; do sleep 1; done; \
         if kill -0 {server_pid} 2>/dev/null; then kill -TERM {server_pid}; sleep 5; kill -KILL {server_pid} 2>/dev/null; fi"
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}
