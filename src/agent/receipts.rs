//! Receipts: putonly's own proof of what arrived, since it may never read
//! the bucket back.
//!
//! This module owns the journal's `receipts` table: one row per object
//! putonly stored (when, the local path, bucket, key, size, the checksum
//! algorithm and value the server verified, the ETag, the version id when
//! the bucket has versioning, and the request id of the answer). A row is
//! written in the same transaction that records the upload done, so a done
//! file always has its receipt; it lives apart from the file records, so
//! pruning those (`state.retention`) leaves it, and only
//! `state.keep_receipts` removes it, in small batches. It also owns the
//! receipt's one shape, shared by `putonly receipts --json` and `putonly
//! push --json`, and what `--since` accepts. It never talks to the network,
//! never touches the files table or the files themselves, and never holds
//! more than one receipt in memory while listing them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};

use crate::ground::checksum::Crc;
use crate::journal::{Journal, JournalError};
use crate::upload::Uploaded;

/// The table, made in place in a journal that has none yet (the migration).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS receipts (
    id                 INTEGER PRIMARY KEY,
    at                 INTEGER NOT NULL,
    path               BLOB    NOT NULL,
    bucket             TEXT    NOT NULL,
    key                TEXT    NOT NULL,
    size               INTEGER NOT NULL,
    checksum_algorithm TEXT    NOT NULL,
    checksum           TEXT    NOT NULL,
    etag               TEXT    NOT NULL,
    version_id         TEXT,
    request_id         TEXT
);
CREATE INDEX IF NOT EXISTS receipts_at ON receipts (at);
";

/// What the server answered for one object, as the engine reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub crc: Crc,
    pub etag: String,
    pub version_id: Option<String>,
    pub request_id: Option<String>,
}

impl Proof {
    pub fn of(bucket: &str, up: &Uploaded) -> Self {
        Proof {
            bucket: bucket.to_string(),
            key: up.key.clone(),
            size: up.size,
            crc: up.crc,
            etag: up.etag.clone(),
            version_id: up.version_id.clone(),
            request_id: up.request_id.clone(),
        }
    }
}

/// One receipt, as `putonly receipts --json` prints it (one JSON object a
/// line) and as `putonly push --json` carries it for each file uploaded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Receipt {
    /// When the upload was recorded, RFC 3339 (UTC, seconds).
    pub time: String,
    pub path: String,
    pub bucket: String,
    pub key: String,
    pub size: u64,
    /// `ALGORITHM:BASE64`, as `push --json` always printed it.
    pub checksum: String,
    pub checksum_algorithm: String,
    /// The base64 value S3 shows in `x-amz-checksum-*`.
    pub checksum_value: String,
    /// Without the quotes S3 puts around it.
    pub etag: String,
    pub version_id: Option<String>,
    pub request_id: Option<String>,
}

fn rfc3339(at: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Receipt {
    /// The receipt of an upload that just ended (for `push --json`).
    pub fn of_upload(path: &std::path::Path, bucket: &str, up: &Uploaded, at: i64) -> Self {
        Receipt::new(
            rfc3339(at),
            path.to_string_lossy().into_owned(),
            &Proof::of(bucket, up),
        )
    }

    fn new(time: String, path: String, p: &Proof) -> Self {
        let value = p.crc.to_base64();
        Receipt {
            time,
            path,
            bucket: p.bucket.clone(),
            key: p.key.clone(),
            size: p.size,
            checksum: format!("{}:{value}", p.crc.kind),
            checksum_algorithm: p.crc.kind.to_string(),
            checksum_value: value,
            etag: p.etag.trim_matches('"').to_string(),
            version_id: p.version_id.clone(),
            request_id: p.request_id.clone(),
        }
    }

    /// One line of the table `putonly receipts` prints without --json.
    pub fn line(&self) -> String {
        crate::ground::printable::printable(&format!(
            "{}  s3://{}/{}  {} bytes  {}  etag {}  version {}  request {}  from {}",
            self.time,
            self.bucket,
            self.key,
            self.size,
            self.checksum,
            self.etag,
            self.version_id.as_deref().unwrap_or("-"),
            self.request_id.as_deref().unwrap_or("-"),
            self.path
        ))
        .into_owned()
    }
}

/// The header of that table.
pub const HEADER: &str =
    "time                  object  size  checksum  etag  version  request  from (local path)";

/// Records the receipt of file record `file_id` (its path is taken from
/// it), inside the transaction that marks it done.
pub fn insert(tx: &Connection, file_id: i64, proof: &Proof, at: i64) -> rusqlite::Result<()> {
    crate::journal::cached(
        tx,
        "INSERT INTO receipts (at, path, bucket, key, size, checksum_algorithm, checksum, etag, version_id, request_id)
         SELECT ?2, path, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10 FROM files WHERE id = ?1",
        params![
            file_id,
            at,
            proof.bucket,
            proof.key,
            i64::try_from(proof.size).unwrap_or(i64::MAX),
            proof.crc.kind.to_string(),
            proof.crc.to_base64(),
            proof.etag,
            proof.version_id,
            proof.request_id,
        ],
    )
    .map(|_| ())
}

/// Whether the journal has receipts at all (a journal an older agent still
/// runs on has no table yet; read-only openers do not migrate).
pub fn present(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'receipts'",
        [],
        |r| r.get(0),
    )
}

/// Receipts listed per read: each page is read whole and its statement
/// ended before any is handed on, so a reader that pauses (`putonly
/// receipts | less`) holds no read snapshot, which would keep the agent's
/// write-ahead log from being reset and let it grow without bound.
const PAGE: i64 = 512;

/// The receipts that follow `after` ((recorded at, id), in that order), at
/// most [`PAGE`] of them, each with its position to carry on from.
///
/// Receipts recorded after the listing began (id above `upto`) are left
/// out, so that a listing ends however fast the agent sends.
fn page_after(
    conn: &Connection,
    after: (i64, i64),
    upto: i64,
) -> rusqlite::Result<Vec<((i64, i64), Receipt)>> {
    let mut q = conn.prepare_cached(
        "SELECT at, path, bucket, key, size, checksum_algorithm, checksum, etag, version_id, request_id, id
         FROM receipts WHERE (at, id) > (?1, ?2) AND id <= ?4 ORDER BY at, id LIMIT ?3",
    )?;
    let rows = q.query_map(params![after.0, after.1, PAGE, upto], |r| {
        let value: String = r.get(6)?;
        let algorithm: String = r.get(5)?;
        let at: i64 = r.get(0)?;
        let receipt = Receipt {
            time: rfc3339(at),
            path: String::from_utf8_lossy(&r.get::<_, Vec<u8>>(1)?).into_owned(),
            bucket: r.get(2)?,
            key: r.get(3)?,
            size: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
            checksum: format!("{algorithm}:{value}"),
            checksum_algorithm: algorithm,
            checksum_value: value,
            etag: r.get::<_, String>(7)?.trim_matches('"').to_string(),
            version_id: r.get(8)?,
            request_id: r.get(9)?,
        };
        Ok(((at, r.get(10)?), receipt))
    })?;
    rows.collect()
}

/// Deletes at most `limit` receipts recorded before `before` (unix
/// seconds), oldest first; returns how many went (fewer than `limit`: the
/// pass is over).
pub fn prune_batch(conn: &Connection, before: i64, limit: usize) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM receipts WHERE id IN
           (SELECT id FROM receipts WHERE at < ?1 ORDER BY at LIMIT ?2)",
        params![before, i64::try_from(limit).unwrap_or(i64::MAX)],
    )
}

/// `--since`: an RFC 3339 time (`2026-11-29T06:00:00Z`) or a duration
/// back from `now` (`1h`, `90m`, `7d`); unix seconds.
pub fn parse_since(text: &str, now: SystemTime) -> Result<i64, String> {
    let secs = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    };
    if let Ok(t) = humantime::parse_rfc3339_weak(text.trim()) {
        return Ok(secs(t));
    }
    match humantime::parse_duration(text.trim()) {
        Ok(d) => Ok(secs(now.checked_sub(d).unwrap_or(UNIX_EPOCH))),
        Err(_) => Err(format!(
            "--since {text:?} is neither an RFC 3339 time nor a duration; give e.g. --since 2026-11-29T06:00:00Z or --since 1h"
        )),
    }
}

/// Makes the receipts table ([`SCHEMA`]), for the agent's journal.
pub(crate) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)
}

impl Journal {
    /// Calls `each` with every receipt recorded at or after `since` (unix
    /// seconds), oldest first, one at a time (a page at a time, no read snapshot held
    /// while `each` runs);
    /// `None` when the journal has no receipts table yet.
    pub fn receipts_since<E>(
        &self,
        since: i64,
        mut each: impl FnMut(Receipt) -> Result<(), E>,
    ) -> Result<Option<Result<(), E>>, JournalError> {
        if !self.with(|conn| present(conn))? {
            return Ok(None);
        }
        let upto: i64 = self.with(|conn| {
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM receipts", [], |r| {
                r.get(0)
            })
        })?;
        let mut after = (since, i64::MIN);
        loop {
            // Read whole, the statement ended: no snapshot is held while
            // `each` writes (see PAGE).
            let page = self.with(|conn| page_after(conn, after, upto))?;
            let Some((last, _)) = page.last() else {
                return Ok(Some(Ok(())));
            };
            after = *last;
            for (_, receipt) in page {
                if let Err(e) = each(receipt) {
                    return Ok(Some(Err(e)));
                }
            }
        }
    }

    /// One batch of receipt pruning: at most `limit` receipts older than
    /// `before` (unix seconds) go; returns how many did.
    pub fn prune_receipts(&self, before: i64, limit: usize) -> Result<usize, JournalError> {
        self.with(|conn| prune_batch(conn, before, limit))
    }
}

#[cfg(test)]
impl Proof {
    /// A proof for unit tests of what reads the journal.
    pub fn for_test(etag: &str) -> Self {
        Proof {
            bucket: "b-1".into(),
            key: "k".into(),
            size: 1,
            crc: Crc::of(crate::config::ChecksumKind::Crc64Nvme, b"x"),
            etag: etag.into(),
            version_id: None,
            request_id: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChecksumKind;

    #[test]
    fn since_takes_a_time_or_a_duration_back_from_now() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_since("1h", now), Ok(1_000_000 - 3600));
        assert_eq!(parse_since("90m", now), Ok(1_000_000 - 5400));
        assert_eq!(parse_since("1970-01-01T00:16:40Z", now), Ok(1000));
        assert_eq!(parse_since("100y", now), Ok(0), "before the epoch: all");
        let err = parse_since("yesterday", now).unwrap_err();
        assert!(err.contains("--since \"yesterday\""), "{err}");
    }

    #[test]
    fn a_receipt_carries_the_checksum_three_ways_and_the_etag_unquoted() {
        let crc = Crc::of(ChecksumKind::Crc32C, b"abc");
        let up = Uploaded {
            key: "foo/a".into(),
            size: 3,
            etag: "\"e-1\"".into(),
            crc,
            parts: 0,
            version_id: Some("v-1".into()),
            request_id: None,
        };
        let r = Receipt::of_upload(std::path::Path::new("/x/a"), "b-1", &up, 0);
        assert_eq!(r.time, "1970-01-01T00:00:00Z");
        assert_eq!(r.checksum, format!("crc32c:{}", crc.to_base64()));
        assert_eq!(r.checksum_algorithm, "crc32c");
        assert_eq!(r.checksum_value, crc.to_base64());
        assert_eq!(r.etag, "e-1");
        let line = r.line();
        assert!(
            line.contains("s3://b-1/foo/a") && line.contains("request -"),
            "{line}"
        );
    }
}
