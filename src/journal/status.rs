//! What the file records say: the counts, ages and errors `putonly
//! status` shows, and the backlog the agent's gauges follow.

use super::*;

/// What the file records say for `putonly status`: counts and ages (the
/// agent adds what its features hold, `crate::agent::Status`).
#[derive(Debug, Clone, Default)]
pub struct FileStatus {
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
    /// The latest files whose key already held an object (at most 10).
    pub last_exists: Vec<Exists>,
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

/// The pending file waiting longest (the state index answers it).
pub(super) fn oldest_pending(conn: &Connection) -> rusqlite::Result<Option<OldestPending>> {
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

/// What the file records say for `putonly status`; `None` while the
/// agent creates the journal.
pub(crate) fn file_status(conn: &Connection) -> rusqlite::Result<Option<FileStatus>> {
    {
        let mut s = FileStatus::default();
        let initialized: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            [],
            |r| r.get(0),
        )?;
        if !initialized {
            return Ok(None); // the agent is creating it right now
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
        Ok(Some(s))
    }
}

impl Journal {
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
}
