//! The journal: the agent's only memory of what it sent, since it may never
//! ask the bucket.
//!
//! One SQLite database (WAL mode) in the state folder, owner-only. One record
//! per file version (path, device, inode, size, mtime, ctime, key) with its
//! state, attempts, last error and timestamps; for a multipart upload in
//! progress, the upload id and every completed part's number, ETag and CRC.
//! Each transition is committed before the effect it announces is relied
//! on: the upload id before the first part is sent, a part before it counts
//! as done, `done` before the file is deleted or moved. `synchronous =
//! NORMAL` keeps commits across process crashes (kill -9); a power loss may
//! lose the last few transitions, which only means sending those files
//! again (delivery is at least once).
//!
//! It is a store that knows no feature: it owns the state folder and its
//! lock ([`AgentLock`]), the connection, its own tables (`files`, `parts`,
//! `meta`) and their migration, the file records' transitions, and the
//! group commit. A feature that keeps state (the agent's batches, streams,
//! receipts) brings its own tables and SQL: it hands its table maker to
//! `Journal::open_with` (a `Schema`), runs its writes inside the journal's
//! transactions (a `Step`, or `Journal::with`) and adds its own methods to
//! [`Journal`] from its own module. This module never names one, never
//! talks to the network, and never reads or changes the files it records.

use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};

use crate::ground::PartDone;
use crate::ground::checksum::ChecksumKind;
use crate::ground::checksum::Crc;
pub use crate::ground::{FileVersion, Resume, UNKNOWN_CTIME, now};

mod error;
mod group;
mod records;
mod schema;
mod state_dir;
mod status;

pub use error::*;
pub use group::*;
pub use records::*;
use schema::*;
pub use state_dir::*;
pub use status::*;

/// The journal's file name inside the state folder.
pub const FILE_NAME: &str = "journal.sqlite";

/// Room in each connection's statement cache: more than the statements
/// [`cached`] runs, so none of them is ever compiled again.
const STATEMENT_CACHE: usize = 32;

/// A feature's tables in the journal's database: made, or brought up to
/// date, by [`Journal::open_with`] after the journal's own, in the order
/// given (idempotent: `CREATE ... IF NOT EXISTS`, migrations that look
/// first).
pub(crate) type Schema = fn(&Connection) -> rusqlite::Result<()>;

/// The journal; cheap operations, safe to share between tasks.
pub struct Journal {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Pages of write-ahead log between checkpoints now ([`wal_pages`]).
    wal_pages: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

impl Journal {
    /// Opens (creating if needed) the journal in `state_dir`, which is
    /// created owner-only (0700) and the database file 0600, with the
    /// tables of `schemas` beside its own.
    pub(crate) fn open_with(state_dir: &Path, schemas: &[Schema]) -> Result<Self, JournalError> {
        let folder_err = |source| JournalError::Folder {
            path: state_dir.to_path_buf(),
            source,
        };
        prepare_state_dir(state_dir).map_err(folder_err)?;
        let path = state_dir.join(FILE_NAME);
        let conn = Self::connect(&path, Some(schemas))?;
        for suffix in ["", "-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", path.display()));
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .map_err(folder_err)?;
            }
        }
        let pages = wal_pages(room(&path));
        Ok(Journal {
            path,
            conn: Mutex::new(conn),
            wal_pages: std::sync::atomic::AtomicU64::new(pages),
        })
    }

    /// Opens an existing journal read-only (for `putonly status`).
    pub fn open_read_only(state_dir: &Path) -> Result<Self, JournalError> {
        let path = state_dir.join(FILE_NAME);
        let conn = Self::connect(&path, None)?;
        let pages = wal_pages(room(&path));
        Ok(Journal {
            path,
            conn: Mutex::new(conn),
            wal_pages: std::sync::atomic::AtomicU64::new(pages),
        })
    }

    /// Opens the database: read-only when `schemas` is `None` (it then
    /// creates or migrates nothing), else read-write with them made.
    fn connect(path: &Path, schemas: Option<&[Schema]>) -> Result<Connection, JournalError> {
        let read_only = schemas.is_none();
        let err = |source| sqlite_error(path, source);
        let conn = if read_only {
            Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        } else {
            Connection::open(path)
        }
        .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // The query planner stability guarantee: a statement's plan does
        // not depend on the values bound to it. Without it, SQLite (built
        // with STAT4) marks statements whose parameters meet an index
        // (observe's lookup, the batch updates of every done mark) to be
        // compiled again each time new values are bound, which was half of
        // the agent's instructions on a backlog. The journal never runs
        // ANALYZE and compares its partial indexes' states with literals,
        // so no plan changes (EXPLAIN QUERY PLAN is the same either way).
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )
        .map_err(err)?;
        let mut conn = conn;
        if let Some(schemas) = schemas {
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(err)?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(err)?;
            // See [`wal_pages`]; looked at again by [`Journal::retune`].
            tune_wal(&conn, wal_pages(room(path))).map_err(err)?;
            // Off while the files table may be rebuilt, so parts stay.
            conn.pragma_update(None, "foreign_keys", "OFF")
                .map_err(err)?;
            migrate_add_ctime(&mut conn).map_err(err)?;
            conn.pragma_update(None, "foreign_keys", "ON")
                .map_err(err)?;
            conn.execute_batch(&files_table("files")).map_err(err)?;
            conn.execute_batch(SCHEMA).map_err(err)?;
            for schema in schemas {
                schema(&conn).map_err(err)?;
            }
        }
        Ok(conn)
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, JournalError> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = f(&mut conn);
        if let Err(e) = &result
            && e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
        {
            // The write-ahead log is copied into the database and cut back
            // only once it holds 1,000 pages (4 MiB): on a disk with less
            // room than that it would stay full for good. Copied back and
            // truncated now, the next write reuses its room. (Best effort:
            // if it fails, the error above stands and the write is retried.)
            let truncated = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            // And kept small until there is room again ([`Journal::retune`]).
            if tune_wal(&conn, 16).is_ok() {
                self.wal_pages
                    .store(16, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::debug!(?truncated, "journal full: write-ahead log checkpointed");
        }
        result.map_err(|source| sqlite_error(&self.path, source))
    }

    /// Sizes the write-ahead log again from the room on its disk (see
    /// `wal_pages`): the agent calls it every few seconds, so a disk that
    /// fills while it runs, or gets room back, is followed.
    pub fn retune(&self) -> Result<(), JournalError> {
        let pages = wal_pages(room(&self.path));
        let was = self.wal_pages.load(std::sync::atomic::Ordering::Relaxed);
        if pages == was {
            return Ok(());
        }
        self.with(|c| tune_wal(c, pages))?;
        self.wal_pages
            .store(pages, std::sync::atomic::Ordering::Relaxed);
        if pages < 1000 || was < 1000 {
            tracing::info!(
                pages,
                "journal: the write-ahead log is copied into the database every {pages} pages ({} KiB), after the room left on its disk",
                pages * 4
            );
        }
        Ok(())
    }

    /// A value kept by [`Journal::set_meta`], if any.
    pub fn meta(&self, name: &str) -> Result<Option<String>, JournalError> {
        self.with(|conn| {
            conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    pub fn set_meta(&self, name: &str, value: &str) -> Result<(), JournalError> {
        self.with(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)",
                params![name, value],
            )
            .map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests;
