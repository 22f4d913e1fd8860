//! The markers held back, for `putonly status`.

use super::*;

/// A marker held back, for `putonly status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldMarker {
    pub path: String,
    pub key: String,
    /// Members neither done nor gone.
    pub waiting: u64,
    /// Some of them, with what the journal knows of each.
    pub files: Vec<HeldFile>,
    /// The batch is still being listed (or the listing failed: see the
    /// marker's last error).
    pub listing: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldFile {
    pub path: String,
    /// "failed: ...", "pending", `"pending: <last error>"`, or [`NOT_TAKEN`].
    pub state: String,
}

/// The state of a held file the journal has no record of yet.
pub const NOT_TAKEN: &str = "not taken yet";

/// At most this many held markers, and files of each, are shown.
pub(super) const SHOWN: i64 = 20;
pub(super) const SHOWN_FILES: i64 = 5;

/// The markers held back by their batch (status; read-only).
pub(crate) fn held(conn: &Connection) -> rusqlite::Result<Vec<HeldMarker>> {
    let present: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'batch_members'",
        [],
        |r| r.get(0),
    )?;
    if !present {
        return Ok(Vec::new());
    }
    let mut q = conn.prepare(
        "SELECT b.marker_id, f.path, f.key, b.state,
                (SELECT COUNT(*) FROM batch_members m WHERE m.marker_id = b.marker_id AND m.state = 'waiting')
         FROM batches b JOIN files f ON f.id = b.marker_id
         WHERE f.state IN ('pending', 'failed')
         ORDER BY f.created_at LIMIT ?1",
    )?;
    let markers: Vec<(i64, Vec<u8>, String, String, i64)> = q
        .query_map([SHOWN], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    let mut files = conn.prepare(
        "SELECT m.path,
                (SELECT state || COALESCE(': ' || last_error, '') FROM files g
                 WHERE g.path = m.path AND g.state IN ('pending', 'failed') ORDER BY g.id DESC LIMIT 1)
         FROM batch_members m WHERE m.marker_id = ?1 AND m.state = 'waiting' ORDER BY m.path LIMIT ?2",
    )?;
    for (id, path, key, state, waiting) in markers {
        let listing = state == "listing";
        if waiting == 0 && !listing {
            continue;
        }
        let shown = files
            .query_map(params![id, SHOWN_FILES], |r| {
                Ok(HeldFile {
                    path: String::from_utf8_lossy(&r.get::<_, Vec<u8>>(0)?).into_owned(),
                    state: r
                        .get::<_, Option<String>>(1)?
                        .unwrap_or_else(|| NOT_TAKEN.into()),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        out.push(HeldMarker {
            path: String::from_utf8_lossy(&path).into_owned(),
            key,
            waiting: u64::try_from(waiting).unwrap_or(0),
            files: shown,
            listing,
        });
    }
    Ok(out)
}
