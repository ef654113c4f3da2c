//! Where the server binaries are. `scripts/setup.sh` installs them; environment variables override.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::repo;

fn setup_hint() -> &'static str {
    "run `bash scripts/setup.sh` to install the test dependencies"
}

/// `nats-server`: `$NATS_SERVER_BIN`, else `.tools/bin/nats-server`, else the PATH.
pub fn nats_server() -> crate::Result<PathBuf> {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let local = repo::root().join(".tools/bin/nats-server");
    if local.exists() {
        return Ok(local);
    }
    which("nats-server").with_context(|| format!("nats-server not found; {}", setup_hint()))
}

/// The directory of PostgreSQL's server binaries (`initdb`, `postgres`): `$PG_BIN`, else what setup recorded, else
/// the newest `/usr/lib/postgresql/*/bin`.
pub fn postgres_bin_dir() -> crate::Result<PathBuf> {
    if let Ok(p) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(recorded) = std::fs::read_to_string(repo::root().join(".tools/pg_bin")) {
        let dir = PathBuf::from(recorded.trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.retain(|d| d.join("initdb").exists());
    candidates.sort();
    candidates
        .pop()
        .with_context(|| format!("PostgreSQL server binaries not found; {}", setup_hint()))
}

/// `mariadbd` and `mariadb-install-db`: `$MARIADB_BIN_DIR`-relative, else Debian's locations, else the PATH.
pub fn mariadb() -> crate::Result<(PathBuf, PathBuf)> {
    let find = |name: &str| -> Option<PathBuf> {
        if let Ok(dir) = std::env::var("MARIADB_BIN_DIR") {
            let p = Path::new(&dir).join(name);
            if p.exists() {
                return Some(p);
            }
        }
        ["/usr/sbin", "/usr/bin", "/usr/local/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists())
            .or_else(|| which(name).ok())
    };
    match (find("mariadbd"), find("mariadb-install-db")) {
        (Some(server), Some(install)) => Ok((server, install)),
        _ => bail!("MariaDB not found; {}", setup_hint()),
    }
}

fn which(name: &str) -> crate::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not on the PATH"))
}

/// `schemathesis` (property-based tests of an OpenAPI document): `.tools/bin/schemathesis` as setup installs it.
pub fn schemathesis() -> crate::Result<PathBuf> {
    let local = repo::root().join(".tools/bin/schemathesis");
    if local.exists() {
        return Ok(local);
    }
    which("schemathesis").with_context(|| format!("schemathesis not found; {}", setup_hint()))
}
