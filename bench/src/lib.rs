//! What the benchmark binaries share: finding and starting the sidecar binary, and reading processes' CPU time and
//! memory from `/proc`.

pub mod procs {
    //! Processes: the sidecar binary next to the benchmark's, CPU seconds and peak RSS from `/proc`.

    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    use anyhow::bail;

    /// The peak resident set size of `pid`, KiB.
    pub fn peak_rss_kib(pid: u32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// CPU seconds (user + system) used so far by every process whose command name is `name`, or by `pid`.
    pub fn cpu_seconds(select: impl Fn(u32, &str) -> bool) -> f64 {
        let ticks_per_second = 100.0; // USER_HZ on Linux
        let mut total = 0.0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = &stat[open + 1..close];
            if !select(pid, comm) {
                continue;
            }
            let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            total += (utime + stime) / ticks_per_second;
        }
        total
    }

    /// CPU seconds of the sidecar, Postgres and nats-server.
    pub fn cpu_split(sidecar: u32) -> [f64; 3] {
        [
            cpu_seconds(|pid, _| pid == sidecar),
            cpu_seconds(|_, comm| comm == "postgres"),
            cpu_seconds(|_, comm| comm == "nats-server"),
        ]
    }

    /// The release sidecar binary next to this benchmark's.
    pub fn sidecar_binary() -> anyhow::Result<PathBuf> {
        let exe = std::env::current_exe()?;
        let bin = exe.with_file_name("projectionist-sidecar");
        if !bin.exists() {
            bail!(
                "{} not found: build it with `cargo build --release -p projectionist-sidecar`",
                bin.display()
            );
        }
        Ok(bin)
    }

    /// Starts `bin run` on the config files in `dir`, the database URL in env var `env`.
    pub fn spawn_sidecar(bin: &Path, dir: &Path, env: &str, url: &str) -> anyhow::Result<Child> {
        Ok(Command::new(bin)
            .args(["run", "--admin-addr", "127.0.0.1:0", "--config-dir"])
            .env("PROJECTIONIST_API_ADDR", "127.0.0.1:0")
            .arg(dir)
            .env(env, url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?)
    }
}

pub mod fixtures {
    //! What the benchmarks project: an EventStore in namespace `bench`, the upsert that folds `Tick`s per account,
    //! and the headers of an event.

    use async_nats::HeaderMap;
    use projectionist_crds::EventStore;
    use projectionist_crds::common::NatsConnection;
    use projectionist_crds::event_store::EventStoreSpec;

    /// The read model's table.
    pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS agg (account TEXT PRIMARY KEY, events BIGINT NOT NULL, total BIGINT NOT NULL)";
    /// The handler that folds a `Tick`.
    pub const UPSERT: &str = "INSERT INTO agg (account, events, total) VALUES (:data.account, 1, :data.n) \
        ON CONFLICT (account) DO UPDATE SET events = agg.events + 1, total = agg.total + excluded.total";

    /// EventStore `bench/<name>` on the server at `nats_url`.
    pub fn event_store(name: &str, nats_url: &str) -> EventStore {
        let mut store = EventStore::new(
            name,
            EventStoreSpec {
                nats: NatsConnection {
                    servers: vec![nats_url.into()],
                    auth: None,
                    tls: None,
                },
                stream: Default::default(),
                deletion_policy: Default::default(),
            },
        );
        store.metadata.namespace = Some("bench".into());
        store
    }

    /// The headers of event `id` of `type_` (binary CloudEvents, de-duplicated by id).
    pub fn headers(id: &str, type_: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", id);
        h.insert("ce-specversion", "1.0");
        h.insert("ce-id", id);
        h.insert("ce-type", type_);
        h
    }
}
