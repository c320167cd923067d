//! The SQLite engine: every repository over one database file in the data folder, through one
//! writer thread that group-commits jobs (every acknowledged write is fsync'ed) and a pool of read
//! connections (see [`writer`]). The only place besides `store/` (migrations, backup) that speaks
//! SQL.

mod audit;
mod binding;
mod changes;
mod documents;
mod egress;
mod keyring;
mod oauth;
mod policies;
mod replay;
mod sign_configs;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::Connection;

use super::{Setting, Settings, Storage, StorageResult};
pub use writer::{CommitObserver, CommitStats, Db, DATABASE_FILE};

/// The SQLite engine.
pub struct SqliteStorage {
    db: Db,
    replay: replay::MarkTables,
}

impl SqliteStorage {
    /// Opens (creating and migrating if needed) the database in `data_dir` and starts the writer.
    pub fn open(data_dir: &Path) -> StorageResult<SqliteStorage> {
        Self::open_observed(data_dir, None)
    }

    /// Like [`SqliteStorage::open`], reporting every group commit to `observer`.
    pub fn open_observed(
        data_dir: &Path,
        observer: Option<Arc<dyn CommitObserver>>,
    ) -> StorageResult<SqliteStorage> {
        Ok(SqliteStorage {
            db: Db::open_observed(data_dir, observer)?,
            replay: replay::MarkTables::default(),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// Group-commit counters so far.
    pub fn commit_stats(&self) -> CommitStats {
        self.db.commit_stats()
    }
}

impl Storage for SqliteStorage {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    fn close(&self) {
        self.db.close();
    }
}

fn setting(conn: &Connection, setting: Setting) -> StorageResult<Option<String>> {
    writer::get_setting(conn, setting.name())
}

fn put_setting(conn: &Connection, setting: Setting, value: &str) -> StorageResult<()> {
    writer::put_setting(conn, setting.name(), value)
}

/// Bumps the owner generation inside the caller's transaction; returns the new value.
fn bump_generation(conn: &Connection) -> StorageResult<u64> {
    conn.execute(
        "INSERT INTO settings(name, value) VALUES (?1, '1')
         ON CONFLICT(name) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
        [Setting::OwnerGeneration.name()],
    )?;
    read_generation(conn)
}

fn read_generation(conn: &Connection) -> StorageResult<u64> {
    Ok(setting(conn, Setting::OwnerGeneration)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

#[async_trait]
impl Settings for SqliteStorage {
    async fn setting(&self, which: Setting) -> StorageResult<Option<String>> {
        self.db.read(move |conn| setting(conn, which)).await
    }

    async fn settings(&self, which: &[Setting]) -> StorageResult<Vec<Option<String>>> {
        let which = which.to_vec();
        self.db
            .read(move |conn| which.iter().map(|s| setting(conn, *s)).collect())
            .await
    }

    async fn put_setting(&self, which: Setting, value: &str) -> StorageResult<()> {
        let value = value.to_string();
        self.db
            .write(move |conn| put_setting(conn, which, &value))
            .await
    }

    async fn owner_generation(&self) -> StorageResult<u64> {
        self.db.read(read_generation).await
    }

    async fn bump_owner_generation(&self) -> StorageResult<u64> {
        self.db.write(bump_generation).await
    }
}

/// `?` over an i64 column read as u64 (negative values as 0).
fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Converts a count to the i64 SQLite binds.
fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
