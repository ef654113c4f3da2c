//! SQLite databases as files in a temporary directory, removed on drop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use tempfile::TempDir;

/// A directory of SQLite database files.
#[derive(Debug)]
pub struct Sqlite {
    /// Holds the files.
    dir: TempDir,
    /// Numbers the databases handed out.
    next_db: AtomicU32,
}

impl Sqlite {
    /// A new, empty directory.
    pub fn new() -> crate::Result<Self> {
        Ok(Self {
            dir: tempfile::Builder::new()
                .prefix("projectionist-sqlite-")
                .tempdir()?,
            next_db: AtomicU32::new(1),
        })
    }

    /// The path of a database file (created on first connection).
    pub fn path_for(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.db"))
    }

    /// URL of a database file, created on first connection.
    pub fn url_for(&self, name: &str) -> String {
        format!("sqlite://{}?mode=rwc", self.path_for(name).display())
    }

    /// URL of a new database file.
    pub fn fresh_database(&self) -> String {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        self.url_for(&format!("test_{n}"))
    }
}
