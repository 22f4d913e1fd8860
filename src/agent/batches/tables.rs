//! The batches' tables in the journal's database (`batches`,
//! `batch_members`, `sent_checksums`), made and kept up to date by
//! [`create`], and a member settled in the transaction that records its
//! file done ([`on_done`]).

use super::*;

/// The batch tables, created with the journal's own.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batches (
    marker_id     INTEGER PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
    state         TEXT    NOT NULL CHECK (state IN ('listing', 'waiting')),
    listed_at     INTEGER NOT NULL,
    manifest_sent INTEGER NOT NULL DEFAULT 0,
    folder        BLOB,
    waiting       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batch_members (
    marker_id INTEGER NOT NULL REFERENCES batches (marker_id) ON DELETE CASCADE,
    path      BLOB    NOT NULL,
    dev       INTEGER NOT NULL,
    ino       INTEGER NOT NULL,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    ctime_ns  INTEGER NOT NULL,
    after_id  INTEGER NOT NULL,
    state     TEXT    NOT NULL CHECK (state IN ('waiting', 'done', 'gone')),
    sent_id   INTEGER,
    key       TEXT,
    sent_size INTEGER,
    crc_kind  TEXT,
    crc       TEXT,
    missing_since INTEGER,
    PRIMARY KEY (marker_id, path)
);
CREATE INDEX IF NOT EXISTS batch_members_waiting ON batch_members (path) WHERE state = 'waiting';
CREATE INDEX IF NOT EXISTS batch_members_done ON batch_members (path) WHERE state = 'done';
CREATE INDEX IF NOT EXISTS batch_members_marker_waiting ON batch_members (marker_id, path)
    WHERE state = 'waiting';
CREATE TABLE IF NOT EXISTS manifested (
    folder  BLOB    NOT NULL,
    file_id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    PRIMARY KEY (folder, file_id)
);
CREATE TABLE IF NOT EXISTS sent_checksums (
    file_id INTEGER PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
    kind    TEXT NOT NULL,
    value   TEXT NOT NULL
);
";

/// `batches.waiting`, how many members of the batch wait (neither done nor
/// gone), kept by the very statements that insert, delete or settle a
/// member, in their transaction: a recheck reads it instead of counting.
pub(super) const TRIGGERS: &str = "
CREATE TRIGGER IF NOT EXISTS batch_members_waiting_insert AFTER INSERT ON batch_members
WHEN NEW.state = 'waiting'
BEGIN
    UPDATE batches SET waiting = waiting + 1 WHERE marker_id = NEW.marker_id;
END;
CREATE TRIGGER IF NOT EXISTS batch_members_waiting_delete AFTER DELETE ON batch_members
WHEN OLD.state = 'waiting'
BEGIN
    UPDATE batches SET waiting = waiting - 1 WHERE marker_id = OLD.marker_id;
END;
CREATE TRIGGER IF NOT EXISTS batch_members_waiting_update AFTER UPDATE OF state ON batch_members
WHEN (OLD.state = 'waiting') != (NEW.state = 'waiting')
BEGIN
    UPDATE batches SET waiting = waiting + (NEW.state = 'waiting') - (OLD.state = 'waiting')
    WHERE marker_id = NEW.marker_id;
END;
";

/// Counts the waiting members of a batch anew (at the end of its listing,
/// and for batches of a journal made before the count was kept).
pub(super) const RECOUNT: &str = "UPDATE batches SET waiting = (SELECT COUNT(*) FROM batch_members m
                                     WHERE m.marker_id = batches.marker_id AND m.state = 'waiting')";

/// Creates the batch tables, and adds to those of an earlier version the
/// columns they lack.
pub(crate) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    for (table, column, kind) in [
        ("batch_members", "missing_since", "INTEGER"),
        ("batches", "waiting", "INTEGER NOT NULL DEFAULT 0"),
    ] {
        let has: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |r| r.get(0),
        )?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
            if column == "waiting" {
                conn.execute_batch(RECOUNT)?;
            }
        }
    }
    conn.execute_batch(TRIGGERS)
}
