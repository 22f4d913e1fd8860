//! The journal: the agent's only memory of what it sent, since it may never
//! ask the bucket.
//!
//! One SQLite database (WAL mode) in the state folder, owner-only. One record
//! per file version (path, device, inode, size, mtime, key) with its state,
//! attempts, last error and timestamps; for a multipart upload in progress,
//! the upload id and every completed part's number, ETag and CRC; for each
//! done upload, its receipt (a table of its own, [`crate::agent::receipts`]). Each
//! transition is committed before the effect it announces is relied on: the
//! upload id before the first part is sent, a part before it counts as done,
//! `done` before the file is deleted or moved. `synchronous = NORMAL` keeps
//! commits across process crashes (kill -9); a power loss may lose the last
//! few transitions, which only means sending those files again (delivery is
//! at least once). This module never talks to the network and never reads
//! or changes the files it records.

use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};

use crate::agent::receipts::{self, Proof};
use crate::config::ChecksumKind;
use crate::ground::PartDone;
use crate::ground::checksum::Crc;
pub use crate::ground::{FileVersion, Resume, UNKNOWN_CTIME, now};

/// The journal's file name inside the state folder.
pub const FILE_NAME: &str = "journal.sqlite";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state folder {path} is in use by another putonly agent ({holder}); one agent per state folder: stop that one, or give this one its own [state] dir"
    )]
    Locked { path: PathBuf, holder: String },
    #[error(
        "journal {path} is damaged ({source}); move it aside with its -wal and -shm files and start again: every file still in the watched folders is then sent once more"
    )]
    Damaged {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

impl JournalError {
    /// Whether the journal file does not exist yet (the agent never ran).
    pub fn is_missing(&self) -> bool {
        matches!(self, JournalError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. }
            if e.code == rusqlite::ErrorCode::CannotOpen)
    }
}

/// Sorts SQLite errors: a damaged file gets its own message and fix.
fn sqlite_error(path: &Path, source: rusqlite::Error) -> JournalError {
    let damaged = matches!(&source, rusqlite::Error::SqliteFailure(e, _)
        if matches!(e.code, rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt));
    if damaged {
        JournalError::Damaged {
            path: path.to_path_buf(),
            source,
        }
    } else {
        JournalError::Sqlite {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An after-upload action that was not seen to its end (see
/// [`Journal::claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub id: i64,
    pub path: PathBuf,
    /// The private name the file may still have in its folder.
    pub name: String,
}

/// What the journal knows of a file version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// In the bucket already (record `id`): nothing to send. `keep`: it was
    /// taken without a close its writer was seen to make, so it is never
    /// deleted or moved.
    Done { id: i64, keep: bool },
    /// Failed for good; not tried again before `retry_at` (unix seconds).
    Failed { retry_at: i64, reason: String },
    /// To be uploaded: record id, attempts so far, and any upload to resume.
    Upload {
        id: i64,
        attempts: u32,
        resume: Option<Resume>,
    },
    /// A new record (`id`) of a version that differs from one sent (record
    /// `twin`, whose object has the CRC `sent`) only in its ctime: a chmod,
    /// a new hard link to it, a rename away and back. The agent sends it
    /// only if its bytes differ ([`Journal::done_unchanged`] otherwise).
    Touched { id: i64, twin: i64, sent: Crc },
}

/// Counts and ages for `putonly status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub pending: u64,
    /// Sent and on record (those that already existed not included).
    pub done: u64,
    pub failed: u64,
    /// Not sent: the key already held an object (overwrite = false).
    pub exists: u64,
    pub bytes_sent: u64,
    pub oldest_pending: Option<OldestPending>,
    pub last_errors: Vec<LastError>,
    pub credentials_expire_at: Option<i64>,
    pub agent_heartbeat_at: Option<i64>,
    /// Markers held back by files of their batch ([`crate::agent::batches`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held_markers: Vec<crate::agent::batches::HeldMarker>,
    /// The latest files whose key already held an object (at most 10).
    pub last_exists: Vec<Exists>,
    /// Files being written whose parts are being sent already
    /// ([`crate::agent::stream`]; at most 20).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub streaming: Vec<crate::agent::stream::Streaming>,
}

/// A file not sent because its key already held an object.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exists {
    pub path: String,
    pub key: String,
    pub reason: String,
    pub at: i64,
}

/// See [`Journal::backlog`].
#[derive(Debug, Clone, Default)]
pub struct Backlog {
    pub pending: u64,
    pub failed: u64,
    pub oldest_pending: Option<OldestPending>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OldestPending {
    pub path: String,
    pub since: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LastError {
    pub path: String,
    pub key: String,
    pub state: String,
    pub error: String,
    pub at: i64,
}

/// The lock file in the state folder that one running agent holds.
pub const LOCK_NAME: &str = "agent.lock";

/// Held while an agent runs on a state folder: an exclusive `flock` on the
/// folder itself (so deleting a file cannot undo it), released by the
/// kernel when the process ends however it ends (kill -9 included), so it
/// is never stale. [`LOCK_NAME`] in it says who holds it. `status` and
/// `check` do not take it.
#[derive(Debug)]
pub struct AgentLock {
    _folder: std::fs::File,
    _file: std::fs::File,
}

impl AgentLock {
    /// Takes the lock, or says who holds it (its pid, host and start time,
    /// as that agent wrote them).
    pub fn take(state_dir: &Path) -> Result<AgentLock, JournalError> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = state_dir.join(LOCK_NAME);
        let folder_err = |source| JournalError::Folder {
            path: path.clone(),
            source,
        };
        prepare_state_dir(state_dir).map_err(|source| JournalError::Folder {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let folder = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(state_dir)
            .map_err(folder_err)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(folder_err)?;
        match rustix::fs::flock(
            &folder,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.split_whitespace().collect::<Vec<_>>().join(" ");
                return Err(JournalError::Locked {
                    path: state_dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "it is starting".into()
                    } else {
                        holder
                    },
                });
            }
            Err(e) => {
                return Err(folder_err(std::io::Error::from_raw_os_error(
                    e.raw_os_error(),
                )));
            }
        }
        let me = format!(
            "pid {} on {} since {}\n",
            std::process::id(),
            crate::ground::hostname(),
            humantime::format_rfc3339_seconds(SystemTime::now())
        );
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()))
            .map_err(folder_err)?;
        Ok(AgentLock {
            _folder: folder,
            _file: file,
        })
    }
}

/// Creates the state folder owner-only (0700); an existing one (made by
/// systemd or by hand) is narrowed to 0700 too.
pub fn prepare_state_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The pending file waiting longest (the state index answers it).
fn oldest_pending(conn: &Connection) -> rusqlite::Result<Option<OldestPending>> {
    conn.query_row(
        "SELECT path, created_at FROM files WHERE state = 'pending' ORDER BY created_at LIMIT 1",
        [],
        |r| {
            Ok(OldestPending {
                path: lossy(&r.get::<_, Vec<u8>>(0)?),
                since: r.get(1)?,
            })
        },
    )
    .optional()
}

/// Marks every unfinished record (pending or failed) of `path` other than
/// `keep`, up to record `upto`, superseded, dropping its parts; returns
/// (key, upload id) of those that had a multipart upload under way.
fn supersede_unfinished(
    tx: &rusqlite::Transaction<'_>,
    path: &[u8],
    keep: i64,
    upto: i64,
    t: i64,
    reason: Option<&str>,
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stale = Vec::new();
    let mut q = tx.prepare_cached(
        "SELECT id, key, upload_id FROM files
         WHERE path = ?1 AND state IN ('pending', 'failed') AND id != ?2 AND id <= ?3",
    )?;
    let rows = q.query_map(params![path, keep, upto], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
        ))
    })?;
    for row in rows {
        let (id, key, upload_id) = row?;
        if let Some(u) = upload_id {
            stale.push((key, u));
        }
        cached(
            tx,
            "UPDATE files SET state = 'superseded', last_error = COALESCE(?3, last_error), updated_at = ?2 WHERE id = ?1",
            params![id, t, reason],
        )?;
        cached(tx, "DELETE FROM parts WHERE file_id = ?1", params![id])?;
    }
    Ok(stale)
}

/// Runs one statement through the connection's cache of prepared
/// statements: the statements of every file's transitions (observe, done,
/// claim) are compiled once, not once per file.
pub(crate) fn cached(
    conn: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(p)
}

/// Room in each connection's statement cache: more than the statements
/// [`cached`] runs, so none of them is ever compiled again.
const STATEMENT_CACHE: usize = 32;

fn checksum_name(kind: ChecksumKind) -> String {
    kind.to_string()
}

fn checksum_kind(name: &str) -> Option<ChecksumKind> {
    match name {
        "crc64nvme" => Some(ChecksumKind::Crc64Nvme),
        "crc32c" => Some(ChecksumKind::Crc32C),
        "crc32" => Some(ChecksumKind::Crc32),
        _ => None,
    }
}

/// The files table; `name` lets the migration build the new one beside
/// the old. `ctime_ns` is NULL in records made before it was kept (they
/// match a file of any ctime, and get it filled in when next seen).
fn files_table(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (
    id          INTEGER PRIMARY KEY,
    watch       TEXT    NOT NULL,
    path        BLOB    NOT NULL,
    dev         INTEGER NOT NULL,
    ino         INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    ctime_ns    INTEGER,
    key         TEXT    NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('pending', 'done', 'failed', 'superseded')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    upload_id   TEXT,
    part_size   INTEGER,
    checksum    TEXT,
    etag        TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    done_at     INTEGER,
    retry_at    INTEGER,
    claimed_at  INTEGER,
    claim_name  TEXT,
    keep_file   INTEGER,
    exists_reason TEXT,
    sent_crc    INTEGER,
    UNIQUE (path, dev, ino, size, mtime_ns, ctime_ns, key)
);"
    )
}

const SCHEMA: &str = "
CREATE INDEX IF NOT EXISTS files_state ON files (state, created_at);
CREATE INDEX IF NOT EXISTS files_done_at ON files (done_at) WHERE state = 'done';
CREATE TABLE IF NOT EXISTS parts (
    file_id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    number  INTEGER NOT NULL,
    etag    TEXT    NOT NULL,
    crc     INTEGER NOT NULL,
    len     INTEGER NOT NULL,
    PRIMARY KEY (file_id, number)
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// Makes `upload_id` record `id`'s multipart upload, with no part yet.
fn set_upload(
    conn: &Connection,
    id: i64,
    upload_id: &str,
    part_size: u64,
    checksum: ChecksumKind,
) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM parts WHERE file_id = ?1", params![id])?;
    conn.execute(
        "UPDATE files SET upload_id = ?2, part_size = ?3, checksum = ?4, updated_at = ?5 WHERE id = ?1",
        params![id, upload_id, part_size as i64, checksum_name(checksum), now()],
    )?;
    Ok(())
}

/// Records a part of record `id`'s upload (statement cached: one per part).
fn insert_part(conn: &Connection, id: i64, part: &PartDone) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO parts (file_id, number, etag, crc, len) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id, part.number, part.etag, part.crc.value as i64, part.crc.len as i64])
    .map(|_| ())
}

/// Pages of write-ahead log between checkpoints: SQLite's 1,000 (4 MiB)
/// where the disk has room, fewer (at least 16) where a sixteenth of its
/// free space is less than that. On a small disk a log left to grow to
/// 1,000 pages could hold the whole database and fill the disk, and could
/// then never be copied out (the database file would need the room the
/// log holds): the journal would stay unwritable after room was made.
fn wal_pages(free_bytes: Option<u64>) -> u64 {
    free_bytes.map_or(1000, |f| (f / 16 / 4096).clamp(16, 1000))
}

/// The room the journal's folder has for this process: the blocks free to
/// root when it runs as root, else those free to others; `None` where the
/// filesystem does not tell (a size of 0: an unlimited tmpfs, some network
/// and FUSE filesystems). Quotas are not seen.
fn room(journal: &Path) -> Option<u64> {
    let v = rustix::fs::statvfs(journal.parent()?).ok()?;
    if v.f_blocks == 0 || v.f_frsize == 0 {
        return None;
    }
    let blocks = if rustix::process::geteuid().is_root() {
        v.f_bfree
    } else {
        v.f_bavail
    };
    Some(blocks.saturating_mul(v.f_frsize))
}

/// Checkpoints every `pages` pages of log, and the log cut back to that
/// size after each.
fn tune_wal(conn: &Connection, pages: u64) -> rusqlite::Result<()> {
    let pages = i64::try_from(pages).unwrap_or(1000);
    conn.pragma_update(None, "wal_autocheckpoint", pages)?;
    conn.pragma_update(None, "journal_size_limit", pages * 4096)
}

/// A journal from before ctime was part of a version: the files table is
/// rebuilt with the column (NULL in old records) and the wider uniqueness,
/// in one transaction (SQLite cannot alter a constraint in place).
fn migrate_add_ctime(conn: &mut Connection) -> rusqlite::Result<()> {
    let has_files: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'files'",
        [],
        |r| r.get(0),
    )?;
    let has_ctime: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('files') WHERE name = 'ctime_ns'",
        [],
        |r| r.get(0),
    )?;
    if !has_files {
        return Ok(());
    }
    if has_ctime {
        // Journals of this version made before claims were recorded.
        let has_claim: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('files') WHERE name = 'claimed_at'",
            [],
            |r| r.get(0),
        )?;
        if !has_claim {
            conn.execute_batch("ALTER TABLE files ADD COLUMN claimed_at INTEGER")?;
        }
        for (column, kind) in [
            ("claim_name", "TEXT"),
            ("keep_file", "INTEGER"),
            ("exists_reason", "TEXT"),
            ("sent_crc", "INTEGER"),
        ] {
            let has: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('files') WHERE name = ?1",
                [column],
                |r| r.get(0),
            )?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE files ADD COLUMN {column} {kind}"))?;
            }
        }
        return Ok(());
    }
    let columns = "id, watch, path, dev, ino, size, mtime_ns, key, state, attempts, last_error, \
                   upload_id, part_size, checksum, etag, created_at, updated_at, done_at, retry_at";
    let tx = conn.transaction()?;
    tx.execute_batch(&files_table("files_new"))?;
    tx.execute_batch(&format!(
        "INSERT INTO files_new ({columns}) SELECT {columns} FROM files;
         DROP TABLE files;
         ALTER TABLE files_new RENAME TO files;"
    ))?;
    tx.commit()
}

/// What the journal knows of a file version, and the (key, upload id) of
/// the unfinished uploads of its path it supersedes ([`Journal::observe`]).
pub type Observed = (Seen, Vec<(String, String)>);

/// A file version to look up and record ([`Journal::observe`]).
#[derive(Debug, Clone)]
struct Observation {
    watch: String,
    path: PathBuf,
    version: FileVersion,
    key: String,
}

/// [`Journal::observe`] within a transaction.
fn observe_in(tx: &rusqlite::Transaction<'_>, o: &Observation) -> rusqlite::Result<Observed> {
    let (watch, path, v, key) = (
        o.watch.as_str(),
        o.path.as_path(),
        o.version,
        o.key.as_str(),
    );
    let p = path.as_os_str().as_bytes();
    let t = now();
    // This version's record, else one from before ctime was kept: two
    // index lookups (one statement preferring the first would sort).
    let lookup = |sql: &str, ctime: Option<i64>| {
        let (dev, ino, size) = (v.dev as i64, v.ino as i64, v.size as i64);
        let mut q = tx.prepare_cached(sql)?;
        let found = |r: &rusqlite::Row<'_>| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<i64>>(8)?.is_some_and(|k| k != 0),
            ))
        };
        match ctime {
            Some(c) => q.query_row(params![p, dev, ino, size, v.mtime_ns, key, c], found),
            None => q.query_row(params![p, dev, ino, size, v.mtime_ns, key], found),
        }
        .optional()
    };
    let mut legacy = None;
    let row = match lookup(
        "SELECT id, state, attempts, retry_at, last_error, upload_id, part_size, checksum, keep_file
         FROM files WHERE path = ?1 AND dev = ?2 AND ino = ?3 AND size = ?4
           AND mtime_ns = ?5 AND key = ?6 AND ctime_ns = ?7",
        Some(v.ctime_ns),
    )? {
        Some(row) => Some(row),
        None => lookup(
            "SELECT id, state, attempts, retry_at, last_error, upload_id, part_size, checksum, keep_file
             FROM files WHERE path = ?1 AND dev = ?2 AND ino = ?3 AND size = ?4
               AND mtime_ns = ?5 AND key = ?6 AND ctime_ns IS NULL
             LIMIT 1",
            None,
        )?
        .inspect(|(id, ..)| {
            legacy = Some(*id);
        }),
    };
    if let Some(id) = legacy {
        // A record from before ctime was kept: it is this version.
        cached(
            tx,
            "UPDATE files SET ctime_ns = ?2 WHERE id = ?1 AND ctime_ns IS NULL",
            params![id, v.ctime_ns],
        )?;
    }
    let seen = match row {
        Some((id, state, .., keep)) if state == "done" => Seen::Done { id, keep },
        Some((_, state, _, retry_at, err, ..))
            if state == "failed" && retry_at.unwrap_or(0) > t =>
        {
            Seen::Failed {
                retry_at: retry_at.unwrap_or(0),
                reason: err.unwrap_or_default(),
            }
        }
        Some((id, _, attempts, _, _, upload_id, part_size, checksum, _)) => {
            cached(
                tx,
                "UPDATE files SET state = 'pending', updated_at = ?2 WHERE id = ?1",
                params![id, t],
            )?;
            let resume = match (
                upload_id,
                part_size,
                checksum.as_deref().and_then(checksum_kind),
            ) {
                (Some(upload_id), Some(part_size), Some(kind)) => Some(Resume {
                    upload_id,
                    part_size: part_size as u64,
                    checksum: kind,
                    parts: load_parts(tx, id, kind)?,
                }),
                _ => None,
            };
            match resume {
                // Nothing sent of it yet: as for a new record.
                None if attempts == 0 => match sent_twin(tx, o)? {
                    Some((twin, sent)) => Seen::Touched { id, twin, sent },
                    None => Seen::Upload {
                        id,
                        attempts,
                        resume,
                    },
                },
                _ => Seen::Upload {
                    id,
                    attempts,
                    resume,
                },
            }
        }
        None => {
            cached(
                tx,
                "INSERT INTO files (watch, path, dev, ino, size, mtime_ns, ctime_ns, key, state, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, ?9)",
                params![watch, p, v.dev as i64, v.ino as i64, v.size as i64, v.mtime_ns, v.ctime_ns, key, t],
            )?;
            let id = tx.last_insert_rowid();
            match sent_twin(tx, o)? {
                Some((twin, sent)) => Seen::Touched { id, twin, sent },
                None => Seen::Upload {
                    id,
                    attempts: 0,
                    resume: None,
                },
            }
        }
    };
    // Older unfinished versions of this path will never be completed.
    let current = match &seen {
        Seen::Upload { id, .. } | Seen::Touched { id, .. } => *id,
        _ => -1,
    };
    let stale = supersede_unfinished(tx, p, current, i64::MAX, t, None)?;
    Ok((seen, stale))
}

/// The record last sent to `o`'s key from its path, if it has the same
/// content (device, inode, size, mtime) as `o` but another ctime, and its
/// object's CRC. Only the last: a version sent earlier has the same
/// device, inode, size and mtime when it is linked or renamed back after
/// another was sent, and the object holds the other.
fn sent_twin(
    tx: &rusqlite::Transaction<'_>,
    o: &Observation,
) -> rusqlite::Result<Option<(i64, Crc)>> {
    let v = o.version;
    let mut q = tx.prepare_cached(
        "SELECT id, checksum, sent_crc FROM files
         WHERE id = (SELECT MAX(id) FROM files WHERE path = ?1 AND key = ?6 AND state = 'done')
           AND dev = ?2 AND ino = ?3 AND size = ?4 AND mtime_ns = ?5 AND sent_crc IS NOT NULL",
    )?;
    let row = q
        .query_row(
            params![
                o.path.as_os_str().as_bytes(),
                v.dev as i64,
                v.ino as i64,
                v.size as i64,
                v.mtime_ns,
                o.key
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            },
        )
        .optional()?;
    Ok(row.and_then(|(id, kind, crc)| {
        let kind = kind.as_deref().and_then(checksum_kind)?;
        Some((
            id,
            Crc {
                kind,
                value: crc as u64,
                len: v.size,
            },
        ))
    }))
}

/// The answer to an observation made through [`Journal::commit`].
fn observed(r: Result<Option<Observed>, JournalError>) -> Result<Observed, JournalError> {
    r?.ok_or_else(|| JournalError::Folder {
        path: PathBuf::new(),
        source: std::io::Error::other("the journal gave no answer to an observation"),
    })
}

/// A transition that may be committed with others (see
/// [`Journal::group_commit`]).
#[derive(Debug, Clone)]
enum Mark {
    /// The object is complete in the bucket; its receipt is kept with it.
    Done { id: i64, proof: Box<Proof> },
    /// An after-upload action is about to rename the file to `name`.
    Claim { id: i64, name: String },
    /// A file version is looked up, and recorded if new: its answer is
    /// the mark's outcome.
    Observe(Box<Observation>),
}

impl Mark {
    fn apply(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Option<Observed>> {
        match self {
            Mark::Done { id, proof } => {
                let t = now();
                cached(tx, "DELETE FROM parts WHERE file_id = ?1", params![id])?;
                cached(
                    tx,
                    "UPDATE files SET state = 'done', etag = ?2, done_at = ?3, updated_at = ?3,
                            upload_id = NULL, last_error = NULL, attempts = attempts + 1,
                            checksum = ?4, sent_crc = ?5 WHERE id = ?1",
                    params![
                        id,
                        proof.etag,
                        t,
                        proof.crc.kind.to_string(),
                        proof.crc.value as i64
                    ],
                )?;
                crate::agent::batches::on_done(tx, *id)?;
                receipts::insert(tx, *id, proof, t)?;
            }
            Mark::Claim { id, name } => {
                cached(
                    tx,
                    "UPDATE files SET claimed_at = ?2, claim_name = ?3 WHERE id = ?1",
                    params![id, now(), name],
                )?;
            }
            Mark::Observe(o) => return observe_in(tx, o).map(Some),
        }
        Ok(None)
    }
}

/// At most this many marks in one transaction of the group commit.
const GROUP_MAX: usize = 512;
/// Under load, a transaction with fewer marks than this waits
/// [`GROUP_LINGER`] for more before it commits.
const GROUP_LINGER_BELOW: usize = 32;
const GROUP_LINGER: Duration = Duration::from_millis(1);
/// After a wait that brought fewer than two marks, the next this many
/// transactions that would wait do not.
const GROUP_LINGER_SKIP: u32 = 16;

/// When the group commit waits for more marks before committing: only
/// under load, which is when at least two marks came while the last
/// transaction was being committed (the marks its own callers send once
/// answered do not count: they come after; so one or two callers that each
/// wait for their answer never wait), never for a lone mark, and not again
/// for a while after a wait that brought fewer than two marks (it cost
/// more than it saved).
#[derive(Debug, Default)]
struct Linger {
    queued_at_end: usize,
    skip: u32,
}

impl Linger {
    /// Whether a transaction of `len` marks so far waits for more.
    fn waits(&mut self, len: usize) -> bool {
        if self.queued_at_end < 2 || len >= GROUP_LINGER_BELOW {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// A wait is over: it brought `gained` marks.
    fn waited(&mut self, gained: usize) {
        if gained < 2 {
            self.skip = GROUP_LINGER_SKIP;
        }
    }

    /// A transaction was committed, and `queued` marks came meanwhile
    /// (counted before any of its callers is answered).
    fn committed(&mut self, queued: usize) {
        self.queued_at_end = queued;
    }
}

/// Waits [`GROUP_LINGER`], then takes what came meanwhile.
fn linger(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Queued>, batch: &mut Vec<Queued>) {
    std::thread::sleep(GROUP_LINGER);
    drain_into(rx, batch);
}

/// Moves what is queued into `batch`, up to [`GROUP_MAX`] marks.
fn drain_into(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Queued>, batch: &mut Vec<Queued>) {
    while batch.len() < GROUP_MAX {
        match rx.try_recv() {
            Ok(q) => batch.push(q),
            Err(_) => break,
        }
    }
}

struct Queued {
    mark: Mark,
    reply: tokio::sync::oneshot::Sender<Result<Option<Observed>, JournalError>>,
}

/// How many transactions the group commit ran, for how many marks.
#[derive(Debug, Default)]
pub struct GroupStats {
    pub transactions: AtomicU64,
    pub marks: AtomicU64,
    /// Transactions that waited for more marks first.
    pub lingers: AtomicU64,
}

/// Group commit (see [`Journal::group_commit`]): many files' done marks,
/// claims and observations committed in one transaction, and one sync for
/// the claims among them, instead of one each. Each caller's future ends
/// only once its own mark is committed (or failed), so nothing is deleted
/// or moved before its done is on record, and nothing is sent before its
/// pending record is; a mark is never acknowledged from a transaction that
/// did not commit.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    journal: Arc<Journal>,
    /// `None` when the thread could not be started: each mark is then
    /// committed on its own, off the runtime.
    queue: Option<tokio::sync::mpsc::UnboundedSender<Queued>>,
    stats: Arc<GroupStats>,
}

impl GroupCommit {
    /// [`Journal::done`], committed with whatever else is queued.
    pub async fn done(&self, id: i64, proof: &Proof) -> Result<(), JournalError> {
        self.commit(Mark::Done {
            id,
            proof: Box::new(proof.clone()),
        })
        .await
        .map(|_| ())
    }

    /// [`Journal::claim`] (a full sync), committed with whatever else is
    /// queued.
    pub async fn claim(&self, id: i64, name: &str) -> Result<(), JournalError> {
        self.commit(Mark::Claim {
            id,
            name: name.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// [`Journal::observe`], committed with whatever else is queued: the
    /// answer comes once the version's record is committed.
    pub async fn observe(
        &self,
        watch: &str,
        path: &Path,
        v: FileVersion,
        key: &str,
    ) -> Result<Observed, JournalError> {
        observed(
            self.commit(Mark::Observe(Box::new(Observation {
                watch: watch.to_string(),
                path: path.to_path_buf(),
                version: v,
                key: key.to_string(),
            })))
            .await,
        )
    }

    pub fn stats(&self) -> &GroupStats {
        &self.stats
    }

    async fn commit(&self, mark: Mark) -> Result<Option<Observed>, JournalError> {
        if let Some(queue) = &self.queue {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if queue
                .send(Queued {
                    mark: mark.clone(),
                    reply,
                })
                .is_ok()
                && let Ok(r) = answer.await
            {
                return r;
            }
            // The thread is gone (it cannot be, short of a panic): the
            // mark is committed on its own below. Committing it twice is
            // harmless.
        }
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || {
            journal
                .commit(std::slice::from_ref(&mark))
                .map(|mut r| r.pop().flatten())
        })
        .await
        .unwrap_or_else(|e| {
            Err(JournalError::Folder {
                path: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            })
        })
    }
}

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
    /// created owner-only (0700) and the database file 0600.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let folder_err = |source| JournalError::Folder {
            path: state_dir.to_path_buf(),
            source,
        };
        prepare_state_dir(state_dir).map_err(folder_err)?;
        let path = state_dir.join(FILE_NAME);
        let conn = Self::connect(&path, false)?;
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
        let conn = Self::connect(&path, true)?;
        let pages = wal_pages(room(&path));
        Ok(Journal {
            path,
            conn: Mutex::new(conn),
            wal_pages: std::sync::atomic::AtomicU64::new(pages),
        })
    }

    fn connect(path: &Path, read_only: bool) -> Result<Connection, JournalError> {
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
        if !read_only {
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
            crate::agent::batches::create(&conn).map_err(err)?;
            conn.execute_batch(crate::agent::receipts::SCHEMA)
                .map_err(err)?;
            conn.execute_batch(crate::agent::stream::SCHEMA)
                .map_err(err)?;
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
    /// [`wal_pages`]): the agent calls it every few seconds, so a disk that
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

    /// Looks a file version up, recording it as pending if it is new. Older
    /// unfinished versions of the same path are marked superseded; their
    /// upload ids are returned so the caller may abort them.
    pub fn observe(
        &self,
        watch: &str,
        path: &Path,
        v: FileVersion,
        key: &str,
    ) -> Result<Observed, JournalError> {
        let mark = Mark::Observe(Box::new(Observation {
            watch: watch.to_string(),
            path: path.to_path_buf(),
            version: v,
            key: key.to_string(),
        }));
        observed(
            self.commit(std::slice::from_ref(&mark))
                .map(|mut r| r.pop().flatten()),
        )
    }

    /// Records a new multipart upload; committed before any part is sent.
    pub fn multipart_started(
        &self,
        id: i64,
        upload_id: &str,
        part_size: u64,
        checksum: ChecksumKind,
    ) -> Result<(), JournalError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            set_upload(&tx, id, upload_id, part_size, checksum)?;
            tx.commit()
        })
    }

    /// Records an upload whose `parts` were sent while the file was being
    /// written as this record's, and takes it off the streams table
    /// ([`crate::agent::stream`]), in one transaction: a crash leaves it either
    /// for the next start to abort or on this record to resume, never both.
    pub fn multipart_adopted(
        &self,
        id: i64,
        upload_id: &str,
        part_size: u64,
        checksum: ChecksumKind,
        parts: &[PartDone],
    ) -> Result<(), JournalError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            set_upload(&tx, id, upload_id, part_size, checksum)?;
            for part in parts {
                insert_part(&tx, id, part)?;
            }
            tx.execute(
                "DELETE FROM streams WHERE upload_id = ?1",
                params![upload_id],
            )?;
            tx.commit()
        })
    }

    /// Records a part the server accepted.
    pub fn part_done(&self, id: i64, part: &PartDone) -> Result<(), JournalError> {
        self.with(|conn| insert_part(conn, id, part))
    }

    /// The server no longer knows the upload: start over next time.
    pub fn multipart_forgotten(&self, id: i64) -> Result<(), JournalError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            tx.execute("DELETE FROM parts WHERE file_id = ?1", params![id])?;
            tx.execute(
                "UPDATE files SET upload_id = NULL, part_size = NULL, checksum = NULL, updated_at = ?2 WHERE id = ?1",
                params![id, now()],
            )?;
            tx.commit()
        })
    }

    /// The object is complete in the bucket; its receipt is kept with it,
    /// in the same transaction.
    pub fn done(&self, id: i64, proof: &Proof) -> Result<(), JournalError> {
        self.commit(&[Mark::Done {
            id,
            proof: Box::new(proof.clone()),
        }])
        .map(|_| ())
    }

    /// Calls `each` with every receipt recorded at or after `since` (unix
    /// seconds), oldest first, one at a time (see [`receipts::each_since`]);
    /// `None` when the journal has no receipts table yet.
    pub fn receipts_since<E>(
        &self,
        since: i64,
        each: impl FnMut(receipts::Receipt) -> Result<(), E>,
    ) -> Result<Option<Result<(), E>>, JournalError> {
        self.with(|conn| {
            if !receipts::present(conn)? {
                return Ok(None);
            }
            receipts::each_since(conn, since, each).map(Some)
        })
    }

    /// One batch of receipt pruning: at most `limit` receipts older than
    /// `before` (unix seconds) go; returns how many did.
    pub fn prune_receipts(&self, before: i64, limit: usize) -> Result<usize, JournalError> {
        self.with(|conn| receipts::prune_batch(conn, before, limit))
    }

    /// The key already held an object, which the server left as it is (a
    /// write with `If-None-Match: *` answered 412): the record is done (the
    /// file is not sent again) with the server's reason, and its file is
    /// kept for good, since its bytes are not known to be the object's.
    pub fn exists(&self, id: i64, reason: &str) -> Result<(), JournalError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let t = now();
            tx.execute("DELETE FROM parts WHERE file_id = ?1", params![id])?;
            tx.execute(
                "UPDATE files SET state = 'done', exists_reason = ?2, keep_file = 1, etag = NULL,
                        done_at = ?3, updated_at = ?3, upload_id = NULL, last_error = NULL,
                        attempts = attempts + 1 WHERE id = ?1",
                params![id, reason, t],
            )?;
            tx.commit()
        })
    }

    /// Record `id` holds the same bytes as record `twin`, whose object is
    /// in the bucket (the agent compared their CRCs; only the ctime
    /// differs): `id` is done as `twin` was, without a write, and `twin`
    /// superseded by it. Returns whether the file is to be kept (as
    /// `twin`'s was: no after-upload action), or `None`, changing nothing,
    /// when that no longer holds: `twin` is not the record last sent to
    /// its key any more (another version was sent, or it was pruned), or
    /// `id` is no longer waiting to be sent.
    pub fn done_unchanged(&self, id: i64, twin: i64) -> Result<Option<bool>, JournalError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let t = now();
            let done = tx.execute(
                "UPDATE files SET state = 'done', done_at = ?3, updated_at = ?3, upload_id = NULL,
                        last_error = NULL, etag = s.etag, checksum = s.checksum,
                        sent_crc = s.sent_crc, keep_file = s.keep_file
                 FROM (SELECT etag, checksum, sent_crc, keep_file FROM files
                       WHERE id = ?2 AND state = 'done' AND sent_crc IS NOT NULL
                         AND id = (SELECT MAX(l.id) FROM files l, files t
                                   WHERE t.id = ?2 AND l.path = t.path AND l.key = t.key
                                     AND l.state = 'done')) s
                 WHERE files.id = ?1 AND files.state = 'pending'",
                params![id, twin, t],
            )?;
            if done == 0 {
                return Ok(None);
            }
            tx.execute(
                "UPDATE files SET state = 'superseded', updated_at = ?2 WHERE id = ?1",
                params![twin, t],
            )?;
            crate::agent::batches::on_done(&tx, id)?;
            let keep: Option<i64> =
                tx.query_row("SELECT keep_file FROM files WHERE id = ?1", [id], |r| {
                    r.get(0)
                })?;
            tx.commit()?;
            Ok(Some(keep.is_some_and(|k| k != 0)))
        })
    }

    /// Before an after-upload action renames the file to its private claim
    /// name `name`: committed with a full sync (the rename may reach the
    /// disk before a merely written WAL frame), so that a crash in the
    /// middle, power loss included, is repaired at the next start.
    pub fn claim(&self, id: i64, name: &str) -> Result<(), JournalError> {
        self.commit(&[Mark::Claim {
            id,
            name: name.to_string(),
        }])
        .map(|_| ())
    }

    /// Commits `marks` in one transaction, with a full sync if one of
    /// them is a claim; the observations' answers, in order (`None` for
    /// the other marks).
    fn commit(&self, marks: &[Mark]) -> Result<Vec<Option<Observed>>, JournalError> {
        let full = marks.iter().any(|m| matches!(m, Mark::Claim { .. }));
        self.with(|conn| {
            if full {
                conn.pragma_update(None, "synchronous", "FULL")?;
            }
            let committed = (|| {
                let tx = conn.transaction()?;
                let answers = marks
                    .iter()
                    .map(|mark| mark.apply(&tx))
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                tx.commit()?;
                Ok(answers)
            })();
            if full {
                // Should this fail, commits stay fully synced: slower, as safe.
                let _ = conn.pragma_update(None, "synchronous", "NORMAL");
            }
            committed
        })
    }

    /// Starts the journal's group commit: one thread that commits, in one
    /// transaction, every mark queued while the previous transaction ran.
    pub fn group_commit(self: &Arc<Self>) -> GroupCommit {
        let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<Queued>();
        let stats = Arc::new(GroupStats::default());
        let (journal, counts) = (self.clone(), stats.clone());
        let started = std::thread::Builder::new()
            .name("putonly-journal".into())
            .spawn(move || {
                let mut waits = Linger::default();
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    drain_into(&mut rx, &mut batch);
                    // Under load, a moment's wait fills this transaction:
                    // fewer, larger ones, each writing its pages to the log
                    // once.
                    if waits.waits(batch.len()) {
                        counts.lingers.fetch_add(1, Ordering::Relaxed);
                        let before = batch.len();
                        linger(&mut rx, &mut batch);
                        waits.waited(batch.len() - before);
                    }
                    let marks: Vec<Mark> = batch.iter().map(|q| q.mark.clone()).collect();
                    counts.transactions.fetch_add(1, Ordering::Relaxed);
                    counts
                        .marks
                        .fetch_add(marks.len() as u64, Ordering::Relaxed);
                    let committed = journal.commit(&marks);
                    waits.committed(rx.len());
                    match committed {
                        Ok(answers) => {
                            for (q, answer) in batch.into_iter().zip(answers) {
                                let _ = q.reply.send(Ok(answer));
                            }
                        }
                        // Each on its own then, so each caller has its
                        // own answer.
                        Err(e) if batch.len() == 1 => {
                            if let Some(q) = batch.pop() {
                                let _ = q.reply.send(Err(e));
                            }
                        }
                        Err(_) => {
                            for q in batch {
                                counts.transactions.fetch_add(1, Ordering::Relaxed);
                                let r = journal
                                    .commit(std::slice::from_ref(&q.mark))
                                    .map(|mut r| r.pop().flatten());
                                let _ = q.reply.send(r);
                            }
                        }
                    }
                }
            });
        if let Err(e) = &started {
            tracing::warn!(error = %e, "journal: no group commit thread; each mark commits on its own");
        }
        GroupCommit {
            journal: self.clone(),
            queue: started.ok().map(|_| queue),
            stats,
        }
    }

    /// The after-upload action is over (done, or the file put back).
    pub fn unclaim(&self, id: i64) -> Result<(), JournalError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE files SET claimed_at = NULL, claim_name = NULL WHERE id = ?1",
                [id],
            )
            .map(|_| ())
        })
    }

    /// The file of this record stays where it is after its upload (its
    /// writer was never seen to close it): no after-upload action, ever.
    pub fn keep_file(&self, id: i64) -> Result<(), JournalError> {
        self.with(|conn| {
            conn.execute("UPDATE files SET keep_file = 1 WHERE id = ?1", [id])
                .map(|_| ())
        })
    }

    /// The file of a done record was renamed away and back by an
    /// after-upload action that did not go through: same content, a new
    /// ctime. The record follows, so the file is not sent again for it.
    pub fn refresh_ctime(&self, id: i64, ctime_ns: i64) -> Result<(), JournalError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE files SET ctime_ns = ?2 WHERE id = ?1",
                params![id, ctime_ns],
            )
            .map(|_| ())
        })
    }

    /// Claims not released, made before `before` (unix seconds): record
    /// id, path and private name.
    pub fn claims(&self, before: i64) -> Result<Vec<Claim>, JournalError> {
        self.with(|conn| {
            let mut q = conn.prepare(
                "SELECT id, path, claim_name FROM files
                 WHERE claimed_at IS NOT NULL AND claimed_at < ?1 AND claim_name IS NOT NULL",
            )?;
            let rows = q.query_map([before], |r| {
                Ok(Claim {
                    id: r.get(0)?,
                    path: PathBuf::from(std::ffi::OsStr::from_bytes(&r.get::<_, Vec<u8>>(1)?)),
                    name: r.get(2)?,
                })
            })?;
            rows.collect()
        })
    }

    /// A transient failure: counted and kept for status; still pending.
    pub fn attempt_failed(&self, id: i64, error: &str) -> Result<(), JournalError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE files SET attempts = attempts + 1, last_error = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, error, now()],
            )
            .map(|_| ())
        })
    }

    /// A permanent failure: not retried before `retry_at` unless the file changes.
    pub fn failed(&self, id: i64, error: &str, retry_at: i64) -> Result<(), JournalError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE files SET state = 'failed', attempts = attempts + 1, last_error = ?2,
                        retry_at = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, error, retry_at, now()],
            )
            .map(|_| ())
        })
    }

    /// The file at `path` is gone: its unfinished records (pending or
    /// failed) will never complete and stop counting as work. Returns the
    /// multipart uploads to abort.
    pub fn gone(&self, path: &Path) -> Result<Vec<(String, String)>, JournalError> {
        self.gone_through(path, i64::MAX)
    }

    /// [`Journal::gone`], for the records of `path` up to record `upto`
    /// only: those a look found without a file. A version recorded after
    /// that look (a new file at the same path) is not touched.
    pub fn gone_through(
        &self,
        path: &Path,
        upto: i64,
    ) -> Result<Vec<(String, String)>, JournalError> {
        let p = path.as_os_str().as_bytes();
        self.with(|conn| {
            let tx = conn.transaction()?;
            let stale =
                supersede_unfinished(&tx, p, -1, upto, now(), Some("the file disappeared"))?;
            tx.commit()?;
            Ok(stale)
        })
    }

    /// One batch of pruning, over the records with an id above `after`:
    /// of those last changed before `before` (unix seconds), deletes every
    /// superseded one, and every done or failed one whose file version is
    /// gone from disk (`still_there` says, outside the journal's lock). A
    /// done record of a file that is still there stays, or the next scan
    /// would send the file again; a failed one stays in status while its
    /// file is there to be fixed. Returns the id to continue after (None:
    /// the pass is over) and how many records went. Batches keep the lock
    /// short and the memory flat however big the journal.
    pub fn prune_batch(
        &self,
        before: i64,
        after: i64,
        limit: usize,
        still_there: impl Fn(&Path, FileVersion) -> bool,
    ) -> Result<(Option<i64>, usize), JournalError> {
        type Row = (i64, String, Vec<u8>, FileVersion);
        let rows: Vec<Row> = self.with(|conn| {
            let mut q = conn.prepare(
                "SELECT id, state, path, dev, ino, size, mtime_ns, ctime_ns FROM files
                 WHERE id > ?1 AND updated_at < ?2 AND state IN ('done', 'failed', 'superseded')
                   AND claimed_at IS NULL
                 ORDER BY id LIMIT ?3",
            )?;
            let rows = q.query_map(params![after, before, limit as i64], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    FileVersion {
                        dev: r.get::<_, i64>(3)? as u64,
                        ino: r.get::<_, i64>(4)? as u64,
                        size: r.get::<_, i64>(5)? as u64,
                        mtime_ns: r.get(6)?,
                        ctime_ns: r.get::<_, Option<i64>>(7)?.unwrap_or(UNKNOWN_CTIME),
                    },
                ))
            })?;
            rows.collect()
        })?;
        let next = (rows.len() == limit)
            .then(|| rows.last().map(|r| r.0))
            .flatten();
        let gone: Vec<i64> = rows
            .into_iter()
            .filter(|(_, state, p, v)| {
                state == "superseded" || !still_there(Path::new(std::ffi::OsStr::from_bytes(p)), *v)
            })
            .map(|(id, ..)| id)
            .collect();
        let removed = self.with(|conn| {
            let tx = conn.transaction()?;
            let mut n = 0;
            {
                let mut delete = tx.prepare_cached("DELETE FROM files WHERE id = ?1")?;
                for id in &gone {
                    n += delete.execute([id])?;
                }
            }
            tx.commit()?;
            Ok(n)
        })?;
        Ok((next, removed))
    }

    /// Pending records with an id above `after`, at most `limit`: (id,
    /// path, device of the file recorded).
    pub fn pending_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, PathBuf, u64)>, JournalError> {
        self.with(|conn| {
            let mut q = conn.prepare(
                "SELECT id, path, dev FROM files WHERE state = 'pending' AND id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = q.query_map(params![after, limit as i64], |r| {
                Ok((
                    r.get(0)?,
                    PathBuf::from(std::ffi::OsStr::from_bytes(&r.get::<_, Vec<u8>>(1)?)),
                    r.get::<_, i64>(2)? as u64,
                ))
            })?;
            rows.collect()
        })
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

    /// What waits, cheaply enough to ask every few seconds: pending and
    /// failed counts and the oldest pending file, from the state index only
    /// (no scan of the done records, unlike [`Journal::status`]).
    pub fn backlog(&self) -> Result<Backlog, JournalError> {
        self.with(|conn| {
            let count = |state: &str| {
                conn.query_row(
                    "SELECT COUNT(*) FROM files WHERE state = ?1",
                    [state],
                    |r| r.get::<_, i64>(0),
                )
            };
            Ok(Backlog {
                pending: count("pending")? as u64,
                failed: count("failed")? as u64,
                oldest_pending: oldest_pending(conn)?,
            })
        })
    }

    /// What `putonly status` shows; from the journal alone.
    pub fn status(&self) -> Result<Status, JournalError> {
        self.with(|conn| {
            let mut s = Status::default();
            let initialized: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                [],
                |r| r.get(0),
            )?;
            if !initialized {
                return Ok(s); // the agent is creating it right now
            }
            // A journal an older agent still runs on has no such column
            // yet (status never migrates: it opens the journal read-only).
            let has_exists: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('files') WHERE name = 'exists_reason'",
                [],
                |r| r.get(0),
            )?;
            let exists = if has_exists {
                "exists_reason IS NOT NULL"
            } else {
                "0"
            };
            let mut q = conn.prepare(&format!(
                "SELECT state, {exists}, COUNT(*), COALESCE(SUM(size), 0) FROM files GROUP BY 1, 2"
            ))?;
            let rows = q.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            for row in rows {
                let (state, exists, n, bytes) = row?;
                match (state.as_str(), exists) {
                    ("pending", _) => s.pending += n as u64,
                    ("done", true) => s.exists += n as u64,
                    ("done", false) => {
                        s.done += n as u64;
                        s.bytes_sent += bytes as u64;
                    }
                    ("failed", _) => s.failed += n as u64,
                    _ => {}
                }
            }
            let mut q = conn.prepare(if has_exists {
                "SELECT path, key, exists_reason, done_at FROM files
                 WHERE state = 'done' AND exists_reason IS NOT NULL
                 ORDER BY done_at DESC LIMIT 10"
            } else {
                "SELECT path, key, '', done_at FROM files WHERE 0"
            })?;
            s.last_exists = q
                .query_map([], |r| {
                    Ok(Exists {
                        path: lossy(&r.get::<_, Vec<u8>>(0)?),
                        key: r.get(1)?,
                        reason: r.get(2)?,
                        at: r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            s.oldest_pending = oldest_pending(conn)?;
            let mut q = conn.prepare(
                "SELECT path, key, state, last_error, updated_at FROM files
                 WHERE last_error IS NOT NULL AND state IN ('pending', 'failed')
                 ORDER BY updated_at DESC LIMIT 10",
            )?;
            s.last_errors = q
                .query_map([], |r| {
                    Ok(LastError {
                        path: lossy(&r.get::<_, Vec<u8>>(0)?),
                        key: r.get(1)?,
                        state: r.get(2)?,
                        error: r.get(3)?,
                        at: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let meta = |name: &str| -> rusqlite::Result<Option<i64>> {
                conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
                    r.get::<_, String>(0)
                })
                .optional()
                .map(|v| v.and_then(|v| v.parse().ok()))
            };
            s.credentials_expire_at = meta("credentials_expire_at")?;
            s.agent_heartbeat_at = meta("agent_heartbeat_at")?;
            s.held_markers = crate::agent::batches::held(conn)?;
            s.streaming = crate::agent::stream::listed(conn)?;
            Ok(s)
        })
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn load_parts(conn: &Connection, id: i64, kind: ChecksumKind) -> rusqlite::Result<Vec<PartDone>> {
    let mut q = conn
        .prepare("SELECT number, etag, crc, len FROM parts WHERE file_id = ?1 ORDER BY number")?;
    let rows = q.query_map([id], |r| {
        Ok(PartDone {
            number: r.get(0)?,
            etag: r.get(1)?,
            crc: Crc {
                kind,
                value: r.get::<_, i64>(2)? as u64,
                len: r.get::<_, i64>(3)? as u64,
            },
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_ahead_log_is_kept_small_on_a_small_disk() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(wal_pages(Some(MIB)), 16, "a 1 MiB disk: 64 KiB of log");
        assert_eq!(wal_pages(Some(8 * MIB)), 128);
        assert_eq!(wal_pages(Some(64 * MIB)), 1000);
        assert_eq!(wal_pages(Some(0)), 16);
        assert_eq!(wal_pages(None), 1000);
        // This machine's state folder has room (or says nothing).
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.retune().unwrap();
        let pages = j.wal_pages.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(pages, wal_pages(room(&j.path)));
        let limit: i64 = j
            .with(|c| c.query_row("PRAGMA journal_size_limit", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(limit, pages as i64 * 4096);
    }

    fn proof(key: &str, etag: &str) -> Proof {
        Proof {
            bucket: "b-1".into(),
            key: key.into(),
            size: 1,
            crc: Crc::of(ChecksumKind::Crc64Nvme, b"x"),
            etag: etag.into(),
            version_id: None,
            request_id: Some("req-1".into()),
        }
    }

    fn v(size: u64, mtime: i64) -> FileVersion {
        FileVersion {
            dev: 1,
            ino: 2,
            size,
            mtime_ns: mtime,
            ctime_ns: mtime,
        }
    }

    /// Observes version `v` of `path` (key `key`), which must be new or
    /// unfinished work: its record's id.
    fn record(j: &Journal, path: &str, v: FileVersion, key: &str) -> i64 {
        match j.observe("w", Path::new(path), v, key).unwrap().0 {
            Seen::Upload { id, .. } => id,
            other => panic!("{path}: {other:?}"),
        }
    }

    /// A version whose ctime alone moved since it was sent (a chmod, a new
    /// hard link) is told with the sent record and its CRC; recorded done
    /// unchanged, it supersedes that record (status counts the file once)
    /// and is not sent again. Anything else about it changed, it is new
    /// work; a record sent before CRCs were kept has none to offer.
    #[test]
    fn a_version_whose_ctime_alone_moved_is_told_with_the_one_sent() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let sent = v(10, 100);
        let first = record(&j, "/w/a", sent, "k/a");
        j.done(first, &proof("k/a", "e1")).unwrap();
        let chmod = FileVersion {
            ctime_ns: 200,
            ..sent
        };
        let (id, twin, crc) = match j.observe("w", Path::new("/w/a"), chmod, "k/a").unwrap().0 {
            Seen::Touched { id, twin, sent } => (id, twin, sent),
            other => panic!("{other:?}"),
        };
        assert_eq!(twin, first);
        assert_eq!(
            (crc.kind, crc.value, crc.len),
            (ChecksumKind::Crc64Nvme, proof("k/a", "e1").crc.value, 10)
        );
        assert_eq!(j.done_unchanged(id, twin).unwrap(), Some(false), "not kept");
        let st = j.status().unwrap();
        assert_eq!((st.done, st.pending), (1, 0), "{st:?}");
        assert!(matches!(
            j.observe("w", Path::new("/w/a"), chmod, "k/a").unwrap().0,
            Seen::Done { .. }
        ));
        // Another key, or other content: new work.
        record(&j, "/w/a", chmod, "k/other");
        let other = record(&j, "/w/a", v(11, 100), "k/a");
        // Once another version was sent to the key, the one before it
        // linked back (same inode, size and mtime, another ctime) is new
        // work: the object holds the other.
        j.done(other, &proof("k/a", "e3")).unwrap();
        let back = FileVersion {
            ctime_ns: 300,
            ..sent
        };
        record(&j, "/w/a", back, "k/a");
        // And a twin that stopped being the last sent while the agent
        // compared: nothing is changed.
        let c = v(20, 500);
        let c_id = record(&j, "/w/c", c, "k/c");
        j.done(c_id, &proof("k/c", "e4")).unwrap();
        let c2 = FileVersion { ctime_ns: 600, ..c };
        let Seen::Touched {
            id: c2_id, twin, ..
        } = j.observe("w", Path::new("/w/c"), c2, "k/c").unwrap().0
        else {
            panic!("not a twin");
        };
        let newer = record(&j, "/w/c", v(21, 700), "k/c");
        j.done(newer, &proof("k/c", "e5")).unwrap();
        assert_eq!(j.done_unchanged(c2_id, twin).unwrap(), None);
        // Told again while still pending, with nothing sent: a twin again
        // (here none, since another version was sent since).
        record(&j, "/w/c", c2, "k/c");
        // A record done before sent_crc was kept offers nothing.
        let old = record(&j, "/w/b", sent, "k/b");
        j.done(old, &proof("k/b", "e2")).unwrap();
        j.with(|c| c.execute("UPDATE files SET sent_crc = NULL WHERE id = ?1", [old]))
            .unwrap();
        record(&j, "/w/b", chmod, "k/b");
    }

    /// The statements every file goes through (observe, done with its
    /// receipt and batch updates) are compiled once, then reused: none is
    /// compiled again when new values are bound.
    #[test]
    fn a_files_statements_are_compiled_once() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for i in 0..5 {
            let path = PathBuf::from(format!("/d/f{i}"));
            let Seen::Upload { id, .. } = j.observe("w", &path, v(1, i), "foo/f").unwrap().0 else {
                panic!("not to be uploaded");
            };
            j.done(id, &proof("k", "e")).unwrap();
        }
        let conn = j.conn.lock().unwrap();
        let (mut cached, mut again) = (0, Vec::new());
        // SAFETY: the connection is locked and its statements outlive the
        // loop (they stay in its cache); sqlite3_next_stmt, sqlite3_sql and
        // sqlite3_stmt_status only read them.
        unsafe {
            use rusqlite::ffi;
            let db = conn.handle();
            let mut st = ffi::sqlite3_next_stmt(db, std::ptr::null_mut());
            while !st.is_null() {
                let runs = ffi::sqlite3_stmt_status(st, ffi::SQLITE_STMTSTATUS_RUN, 0);
                let n = ffi::sqlite3_stmt_status(st, ffi::SQLITE_STMTSTATUS_REPREPARE, 0);
                if runs >= 5 {
                    cached += 1;
                }
                if n > 0 {
                    let sql = std::ffi::CStr::from_ptr(ffi::sqlite3_sql(st));
                    again.push(format!("{n}x {}", sql.to_string_lossy()));
                }
                st = ffi::sqlite3_next_stmt(db, st);
            }
        }
        assert!(cached >= 9, "only {cached} statements were reused");
        assert!(again.is_empty(), "compiled again: {again:#?}");
    }

    #[test]
    fn a_damaged_journal_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join(FILE_NAME), [7u8; 4096]).unwrap();
        let err = Journal::open(&state).unwrap_err();
        assert!(matches!(err, JournalError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("move it aside"), "{err}");
        let missing = Journal::open_read_only(&dir.path().join("never")).unwrap_err();
        assert!(missing.is_missing(), "{missing}");
    }

    /// Start-up maintenance closes the records a look found without a
    /// file, not a version of the same path recorded after that look.
    #[test]
    fn a_gone_file_s_records_are_closed_up_to_the_one_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("state")).unwrap();
        let looked_at = record(&j, "/c", v(1, 1), "foo/c");
        // Meanwhile a new file at the path is recorded (and sent).
        let newer = record(&j, "/c", v(2, 2), "foo/c");
        j.multipart_started(newer, "up-new", 5, ChecksumKind::Crc64Nvme)
            .unwrap();
        assert_eq!(j.gone_through(Path::new("/c"), looked_at).unwrap(), vec![]);
        let s = j.status().unwrap();
        assert_eq!(s.pending, 1, "the newer version is still pending");
        // `gone` (the file itself disappeared) closes every version.
        assert_eq!(
            j.gone(Path::new("/c")).unwrap(),
            vec![("foo/c".to_string(), "up-new".to_string())]
        );
        assert_eq!(j.status().unwrap().pending, 0);
        // The record looked at itself is closed, its upload returned.
        let id = record(&j, "/d", v(3, 3), "foo/d");
        j.multipart_started(id, "up-d", 5, ChecksumKind::Crc64Nvme)
            .unwrap();
        assert_eq!(
            j.gone_through(Path::new("/d"), id).unwrap(),
            vec![("foo/d".to_string(), "up-d".to_string())]
        );
        assert_eq!(j.status().unwrap().pending, 0);
    }

    #[test]
    fn a_gone_file_and_a_replaced_failed_version_stop_counting() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("state")).unwrap();
        // A failed version, then a new version of the same path: the failed
        // one no longer counts.
        let id = record(&j, "/a", v(1, 1), "foo/a");
        j.failed(id, "AccessDenied", now() + 3600).unwrap();
        let id = record(&j, "/a", v(2, 2), "foo/a");
        j.done(id, &proof("foo/a", "etag")).unwrap();
        // A pending multipart upload whose file is deleted.
        let id = record(&j, "/b", v(9, 1), "foo/b");
        j.multipart_started(id, "up-1", 5, ChecksumKind::Crc64Nvme)
            .unwrap();
        assert_eq!(
            j.gone(Path::new("/b")).unwrap(),
            vec![("foo/b".to_string(), "up-1".to_string())]
        );
        let s = j.status().unwrap();
        assert_eq!((s.done, s.pending, s.failed), (1, 0, 0));
        let b = j.backlog().unwrap();
        assert_eq!(
            (b.pending, b.failed, b.oldest_pending.is_none()),
            (0, 0, true)
        );
        let id = record(&j, "/c", v(3, 3), "foo/c");
        j.failed(id, "denied", now() + 60).unwrap();
        record(&j, "/d", v(4, 4), "foo/d");
        let b = j.backlog().unwrap();
        assert_eq!((b.pending, b.failed), (1, 1));
        assert_eq!(b.oldest_pending.unwrap().path, "/d");
    }

    #[test]
    fn a_done_version_is_not_sent_again_but_a_new_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("state")).unwrap();
        let (seen, _) = j.observe("w", Path::new("/a"), v(10, 1), "foo/a").unwrap();
        let Seen::Upload {
            id, resume: None, ..
        } = seen
        else {
            panic!("{seen:?}")
        };
        j.done(id, &proof("foo/a", "etag")).unwrap();
        drop(j);
        let j = Journal::open(&dir.path().join("state")).unwrap();
        assert_eq!(
            j.observe("w", Path::new("/a"), v(10, 1), "foo/a")
                .unwrap()
                .0,
            Seen::Done { id, keep: false }
        );
        assert!(matches!(
            j.observe("w", Path::new("/a"), v(11, 2), "foo/a")
                .unwrap()
                .0,
            Seen::Upload { .. }
        ));
        let s = j.status().unwrap();
        assert_eq!((s.done, s.pending, s.bytes_sent), (1, 1, 10));
    }

    #[test]
    fn a_key_that_existed_is_done_kept_and_counted_apart() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let (Seen::Upload { id, .. }, _) =
            j.observe("w", Path::new("/x"), v(7, 1), "foo/x").unwrap()
        else {
            panic!()
        };
        j.multipart_started(id, "up-9", 5 << 20, ChecksumKind::Crc32C)
            .unwrap();
        j.exists(id, "PutObject \"foo/x\": 412").unwrap();
        // Not sent again, and never deleted or moved.
        assert_eq!(
            j.observe("w", Path::new("/x"), v(7, 1), "foo/x").unwrap().0,
            Seen::Done { id, keep: true }
        );
        let s = j.status().unwrap();
        assert_eq!((s.done, s.exists, s.pending, s.bytes_sent), (0, 1, 0, 0));
        assert_eq!(s.last_exists.len(), 1);
        assert_eq!(s.last_exists[0].key, "foo/x");
        assert!(s.last_exists[0].reason.contains("412"));
        drop(j);
        let ro = Journal::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.status().unwrap().exists, 1);
    }

    #[test]
    fn a_multipart_upload_resumes_with_its_parts() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let (Seen::Upload { id, .. }, _) =
            j.observe("w", Path::new("/b"), v(100, 1), "foo/b").unwrap()
        else {
            panic!()
        };
        j.multipart_started(id, "up-1", 5 << 20, ChecksumKind::Crc64Nvme)
            .unwrap();
        let part = PartDone {
            number: 1,
            etag: "\"e1\"".into(),
            crc: Crc {
                kind: ChecksumKind::Crc64Nvme,
                value: u64::MAX - 3,
                len: 5 << 20,
            },
        };
        j.part_done(id, &part).unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let (seen, _) = j.observe("w", Path::new("/b"), v(100, 1), "foo/b").unwrap();
        let Seen::Upload {
            resume: Some(r), ..
        } = seen
        else {
            panic!("{seen:?}")
        };
        assert_eq!(r.upload_id, "up-1");
        assert_eq!(r.parts, vec![part]);
        j.multipart_forgotten(id).unwrap();
        let (seen, _) = j.observe("w", Path::new("/b"), v(100, 1), "foo/b").unwrap();
        assert!(matches!(seen, Seen::Upload { resume: None, .. }));
    }

    #[test]
    fn a_new_version_supersedes_an_unfinished_upload() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let (Seen::Upload { id, .. }, _) =
            j.observe("w", Path::new("/c"), v(100, 1), "foo/c").unwrap()
        else {
            panic!()
        };
        j.multipart_started(id, "up-old", 5 << 20, ChecksumKind::Crc32C)
            .unwrap();
        let (_, stale) = j.observe("w", Path::new("/c"), v(200, 2), "foo/c").unwrap();
        assert_eq!(stale, vec![("foo/c".to_string(), "up-old".to_string())]);
        assert_eq!(j.status().unwrap().pending, 1);
    }

    #[test]
    fn failures_wait_for_their_retry_time() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let (Seen::Upload { id, .. }, _) =
            j.observe("w", Path::new("/d"), v(1, 1), "foo/d").unwrap()
        else {
            panic!()
        };
        j.failed(id, "AccessDenied", now() + 3600).unwrap();
        assert!(matches!(
            j.observe("w", Path::new("/d"), v(1, 1), "foo/d").unwrap().0,
            Seen::Failed { .. }
        ));
        j.failed(id, "AccessDenied", now() - 1).unwrap();
        assert!(matches!(
            j.observe("w", Path::new("/d"), v(1, 1), "foo/d").unwrap().0,
            Seen::Upload { attempts: 2, .. }
        ));
        let s = j.status().unwrap();
        assert_eq!(s.last_errors.len(), 1);
    }

    #[test]
    fn a_journal_from_before_ctime_is_migrated_and_sends_nothing_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            // The schema of the previous release, with one done record and
            // one multipart upload in progress.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                &files_table("files")
                    .replace("    ctime_ns    INTEGER,\n", "")
                    .replace("    claimed_at  INTEGER,\n", "")
                    .replace("ctime_ns, key)", "key)"),
            )
            .unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute_batch(
                "INSERT INTO files (id, watch, path, dev, ino, size, mtime_ns, key, state, created_at, updated_at)
                 VALUES (1, 'w', X'2F61', 1, 2, 10, 1, 'foo/a', 'done', 0, 0),
                        (2, 'w', X'2F62', 1, 3, 99, 1, 'foo/b', 'pending', 0, 0);
                 UPDATE files SET upload_id = 'up-1', part_size = 5, checksum = 'crc32c' WHERE id = 2;
                 INSERT INTO parts VALUES (2, 1, 'e1', 7, 5);",
            )
            .unwrap();
        }
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.with(|c| receipts::present(c)).unwrap(), "receipts added");
        // The done record matches its file whatever its ctime, once; the
        // ctime is then kept.
        let a = FileVersion {
            dev: 1,
            ino: 2,
            size: 10,
            mtime_ns: 1,
            ctime_ns: 555,
        };
        assert_eq!(
            j.observe("w", Path::new("/a"), a, "foo/a").unwrap().0,
            Seen::Done { id: 1, keep: false }
        );
        let rewritten = FileVersion { ctime_ns: 556, ..a };
        assert!(matches!(
            j.observe("w", Path::new("/a"), rewritten, "foo/a")
                .unwrap()
                .0,
            Seen::Upload { .. }
        ));
        // The upload in progress kept its parts.
        let b = FileVersion {
            dev: 1,
            ino: 3,
            size: 99,
            mtime_ns: 1,
            ctime_ns: 9,
        };
        let (
            Seen::Upload {
                resume: Some(r), ..
            },
            _,
        ) = j.observe("w", Path::new("/b"), b, "foo/b").unwrap()
        else {
            panic!("the upload in progress was lost")
        };
        assert_eq!((r.upload_id.as_str(), r.parts.len()), ("up-1", 1));
        j.keep_file(1).unwrap();
        assert_eq!(
            j.observe("w", Path::new("/a"), a, "foo/a").unwrap().0,
            Seen::Done { id: 1, keep: true },
            "a file taken without its close stays for good"
        );
        j.claim(1, ".putonly-claim-1-x").unwrap();
        let claim = Claim {
            id: 1,
            path: PathBuf::from("/a"),
            name: ".putonly-claim-1-x".into(),
        };
        assert_eq!(j.claims(now() + 1).unwrap(), vec![claim]);
        assert!(j.claims(now() - 60).unwrap().is_empty(), "too recent");
        j.unclaim(1).unwrap();
        assert!(j.claims(now() + 1).unwrap().is_empty());
        let fk: i64 = j
            .with(|c| {
                c.query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
                    r.get(0)
                })
            })
            .unwrap();
        assert_eq!(fk, 0, "foreign keys hold after the migration");
    }

    /// Observations through the group commit: committed when answered
    /// (another connection sees them), answered as by `Journal::observe`,
    /// and committed together with other files' done marks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn observations_go_through_the_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        let group = j.group_commit();
        let observe = |i: usize| {
            let group = group.clone();
            async move {
                let path = PathBuf::from(format!("/o{i}"));
                group.observe("w", &path, v(1, 1), "foo/o").await.unwrap()
            }
        };
        let mut ids = Vec::new();
        for i in 0..10 {
            match observe(i).await {
                (
                    Seen::Upload {
                        id,
                        attempts: 0,
                        resume: None,
                    },
                    stale,
                ) if stale.is_empty() => ids.push(id),
                other => panic!("{other:?}"),
            }
        }
        let reader = Journal::open_read_only(dir.path()).unwrap();
        assert_eq!(reader.backlog().unwrap().pending, 10);
        // Done marks and new observations queued together.
        let mut callers = tokio::task::JoinSet::new();
        for (i, id) in ids.iter().copied().enumerate() {
            let group = group.clone();
            callers.spawn(async move { group.done(id, &proof("k", "e")).await.unwrap() });
            let next = observe(10 + i);
            callers.spawn(async move {
                assert!(matches!(next.await.0, Seen::Upload { .. }));
            });
        }
        while let Some(r) = callers.join_next().await {
            r.unwrap();
        }
        assert_eq!(reader.backlog().unwrap().pending, 10);
        assert_eq!(reader.status().unwrap().done, 10);
        // A version done is not sent again; the same answer as observe's.
        let (seen, _) = observe(0).await;
        assert_eq!(
            seen,
            j.observe("w", Path::new("/o0"), v(1, 1), "foo/o")
                .unwrap()
                .0
        );
        assert!(matches!(seen, Seen::Done { keep: false, .. }), "{seen:?}");
    }

    #[test]
    fn the_group_commit_waits_only_under_load_and_not_in_vain() {
        let mut w = Linger::default();
        // Nothing committed yet, or fewer than two marks came during the
        // last commit (a lone mark, or callers waiting for answers): no wait.
        assert!(!w.waits(1));
        w.committed(1);
        assert!(!w.waits(1));
        // Two marks or more came while the last one was committed: wait.
        w.committed(2);
        assert!(w.waits(1));
        w.committed(5);
        assert!(w.waits(5));
        // Not when this one is full enough already.
        assert!(!w.waits(GROUP_LINGER_BELOW));
        // A wait that brought fewer than two marks: the next chances are
        // skipped.
        assert!(w.waits(2));
        w.waited(1);
        for _ in 0..GROUP_LINGER_SKIP {
            assert!(!w.waits(2));
        }
        assert!(w.waits(2), "tried again after the skipped ones");
        // A wait that brought marks: the next one waits too.
        w.waited(2);
        assert!(w.waits(2));
    }

    /// Two callers that each wait for their answer before their next mark:
    /// when a transaction is committed, at most the other one's mark is
    /// queued, so no transaction waits for more (each such wait would cost
    /// them 1 ms and bring nothing).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn callers_waiting_for_their_answers_are_not_made_to_wait() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        let ids: Vec<i64> = (0..200)
            .map(|i| record(&j, &format!("/w{i}"), v(1, 1), "foo/w"))
            .collect();
        let group = j.group_commit();
        let mut callers = tokio::task::JoinSet::new();
        for half in ids.chunks(100) {
            let (group, mine) = (group.clone(), half.to_vec());
            callers.spawn(async move {
                for id in mine {
                    group.done(id, &proof("k", "etag")).await.unwrap();
                }
            });
        }
        while let Some(r) = callers.join_next().await {
            r.unwrap();
        }
        let stats = group.stats();
        assert_eq!(stats.marks.load(Ordering::Relaxed), 200);
        assert_eq!(stats.lingers.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn group_commit_puts_marks_queued_together_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        let n = 100;
        let ids: Vec<i64> = (0..n)
            .map(|i| record(&j, &format!("/g{i}"), v(1, 1), "foo/g"))
            .collect();
        let group = j.group_commit();
        // The journal busy (as with a transaction under way): marks queue.
        let (held_tx, held) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let busy = {
            let j = j.clone();
            std::thread::spawn(move || {
                let _conn = j.conn.lock().unwrap();
                held_tx.send(()).unwrap();
                let _ = release_rx.recv();
            })
        };
        held.recv().unwrap();
        let mut callers = tokio::task::JoinSet::new();
        for (i, id) in ids.iter().copied().enumerate() {
            let (group, state) = (group.clone(), dir.path().to_path_buf());
            callers.spawn(async move {
                // Done marks, and a few claims (a full sync) among them.
                let claim = i % 10 == 0;
                if claim {
                    group.claim(id, "private").await.unwrap();
                } else {
                    group.done(id, &proof("k", "etag")).await.unwrap();
                }
                // Back only once committed: another connection sees it.
                let reader = Journal::open_read_only(&state).unwrap();
                let (state, claimed) = reader
                    .with(|c| {
                        c.query_row(
                            "SELECT state, claim_name IS NOT NULL FROM files WHERE id = ?1",
                            [id],
                            |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)),
                        )
                    })
                    .unwrap();
                if claim { claimed } else { state == "done" }
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(group.stats().transactions.load(Ordering::Relaxed), 1);
        release.send(()).unwrap();
        busy.join().unwrap();
        while let Some(committed) = callers.join_next().await {
            assert!(
                committed.unwrap(),
                "a caller was answered before its commit"
            );
        }
        let (transactions, marks) = (
            group.stats().transactions.load(Ordering::Relaxed),
            group.stats().marks.load(Ordering::Relaxed),
        );
        assert_eq!(marks, n as u64);
        // The one under way when the journal was busy, then the rest.
        assert!(transactions <= 3, "{transactions} transactions");
        assert_eq!(j.claims(now() + 1).unwrap().len(), 10);
        assert_eq!(j.status().unwrap().done, n as u64 - 10);
    }

    #[test]
    fn one_agent_per_state_folder() {
        let dir = tempfile::tempdir().unwrap();
        let first = AgentLock::take(dir.path()).unwrap();
        // flock locks belong to the open file: a second open is refused
        // even in the same process, as another agent would be.
        let err = AgentLock::take(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id()))
                && msg.contains("one agent per state folder"),
            "{msg}"
        );
        // Deleting the lock file does not let a second agent in.
        std::fs::remove_file(dir.path().join(LOCK_NAME)).unwrap();
        assert!(AgentLock::take(dir.path()).is_err());
        drop(first);
        AgentLock::take(dir.path()).unwrap();
    }

    #[test]
    fn state_folder_and_file_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let _j = Journal::open(&state).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(FILE_NAME)), 0o600);
    }

    #[test]
    fn prune_removes_old_done_and_failed_records_of_files_gone() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let upload = |path: &str| {
            let (Seen::Upload { id, .. }, _) =
                j.observe("w", Path::new(path), v(1, 1), "foo/e").unwrap()
            else {
                panic!("{path} is new")
            };
            id
        };
        let done = upload("/e");
        j.done(done, &proof("foo/e", "e")).unwrap();
        let failed = upload("/f");
        j.failed(failed, "AccessDenied", i64::MAX).unwrap();
        let pending = upload("/p");
        // A whole pass, batch by batch as the agent runs it.
        let prune = |before: i64, limit: usize, there: bool| {
            let (mut after, mut removed, mut batches) = (0, 0, 0);
            loop {
                let (next, n) = j.prune_batch(before, after, limit, |_, _| there).unwrap();
                removed += n;
                batches += 1;
                match next {
                    Some(id) => after = id,
                    None => return (removed, batches),
                }
            }
        };
        assert_eq!(prune(now() - 10, 1, false).0, 0, "too recent");
        assert_eq!(prune(now() + 10, 1, true).0, 0, "the files are still there");
        assert_eq!(prune(now() + 10, 1, false), (2, 3), "one record a batch");
        // The done record went; its receipt stays until keep_receipts.
        let mut receipts = Vec::new();
        j.receipts_since(0, |r| {
            receipts.push(r);
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(receipts.len(), 1);
        assert_eq!(
            (receipts[0].path.as_str(), receipts[0].key.as_str()),
            ("/e", "foo/e")
        );
        assert_eq!(j.prune_receipts(now() - 10, 10).unwrap(), 0, "too recent");
        assert_eq!(j.prune_receipts(now() + 10, 10).unwrap(), 1);
        let mut left = 0;
        j.receipts_since(0, |_| {
            left += 1;
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(left, 0);
        let st = j.status().unwrap();
        assert_eq!((st.done, st.failed, st.pending), (0, 0, 1), "{pending}");
        assert_eq!(
            j.pending_after(0, 10).unwrap(),
            vec![(pending, PathBuf::from("/p"), 1)]
        );
        assert!(j.pending_after(pending, 10).unwrap().is_empty());
    }
}
