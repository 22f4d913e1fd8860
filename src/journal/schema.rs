//! The journal's own tables (files, parts, meta), their migration, and
//! the size of its write-ahead log.

use super::*;

/// The files table; `name` lets the migration build the new one beside
/// the old. `ctime_ns` is NULL in records made before it was kept (they
/// match a file of any ctime, and get it filled in when next seen).
pub(super) fn files_table(name: &str) -> String {
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

pub(super) const SCHEMA: &str = "
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

/// Pages of write-ahead log between checkpoints: SQLite's 1,000 (4 MiB)
/// where the disk has room, fewer (at least 16) where a sixteenth of its
/// free space is less than that. On a small disk a log left to grow to
/// 1,000 pages could hold the whole database and fill the disk, and could
/// then never be copied out (the database file would need the room the
/// log holds): the journal would stay unwritable after room was made.
pub(super) fn wal_pages(free_bytes: Option<u64>) -> u64 {
    free_bytes.map_or(1000, |f| (f / 16 / 4096).clamp(16, 1000))
}

/// The room the journal's folder has for this process: the blocks free to
/// root when it runs as root, else those free to others; `None` where the
/// filesystem does not tell (a size of 0: an unlimited tmpfs, some network
/// and FUSE filesystems). Quotas are not seen.
pub(super) fn room(journal: &Path) -> Option<u64> {
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
pub(super) fn tune_wal(conn: &Connection, pages: u64) -> rusqlite::Result<()> {
    let pages = i64::try_from(pages).unwrap_or(1000);
    conn.pragma_update(None, "wal_autocheckpoint", pages)?;
    conn.pragma_update(None, "journal_size_limit", pages * 4096)
}

/// A journal from before ctime was part of a version: the files table is
/// rebuilt with the column (NULL in old records) and the wider uniqueness,
/// in one transaction (SQLite cannot alter a constraint in place).
pub(super) fn migrate_add_ctime(conn: &mut Connection) -> rusqlite::Result<()> {
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
