//! The file records: one per file version, and its transitions (pending,
//! a multipart upload and its parts, done, failed, claimed for an
//! after-upload action, superseded by a newer version, gone).

use super::*;

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

/// Marks every unfinished record (pending or failed) of `path` other than
/// `keep`, up to record `upto`, superseded, dropping its parts; returns
/// (key, upload id) of those that had a multipart upload under way.
pub(super) fn supersede_unfinished(
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

pub(super) fn checksum_name(kind: ChecksumKind) -> String {
    kind.to_string()
}

pub(super) fn checksum_kind(name: &str) -> Option<ChecksumKind> {
    match name {
        "crc64nvme" => Some(ChecksumKind::Crc64Nvme),
        "crc32c" => Some(ChecksumKind::Crc32C),
        "crc32" => Some(ChecksumKind::Crc32),
        _ => None,
    }
}

/// Makes `upload_id` record `id`'s multipart upload, with no part yet.
pub(crate) fn set_upload(
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
pub(crate) fn insert_part(conn: &Connection, id: i64, part: &PartDone) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO parts (file_id, number, etag, crc, len) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id, part.number, part.etag, part.crc.value as i64, part.crc.len as i64])
    .map(|_| ())
}

/// What the journal knows of a file version, and the (key, upload id) of
/// the unfinished uploads of its path it supersedes ([`Journal::observe`]).
pub type Observed = (Seen, Vec<(String, String)>);

/// A file version to look up and record ([`Journal::observe`]).
#[derive(Debug, Clone)]
pub(super) struct Observation {
    pub(super) watch: String,
    pub(super) path: PathBuf,
    pub(super) version: FileVersion,
    pub(super) key: String,
}

/// [`Journal::observe`] within a transaction.
pub(super) fn observe_in(
    tx: &rusqlite::Transaction<'_>,
    o: &Observation,
) -> rusqlite::Result<Observed> {
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
    let row_id = row.as_ref().map(|r| r.0);
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
    // Older unfinished versions of this path will never be completed. A
    // failed record waiting for its retry time is this version: it stays
    // failed (shown by status, tried again at its time).
    let current = match &seen {
        Seen::Upload { id, .. } | Seen::Touched { id, .. } => *id,
        Seen::Failed { .. } => row_id.unwrap_or(-1),
        Seen::Done { .. } => -1,
    };
    let stale = supersede_unfinished(tx, p, current, i64::MAX, t, None)?;
    Ok((seen, stale))
}

/// The record last sent to `o`'s key from its path, if it has the same
/// content (device, inode, size, mtime) as `o` but another ctime, and its
/// object's CRC. Only the last: a version sent earlier has the same
/// device, inode, size and mtime when it is linked or renamed back after
/// another was sent, and the object holds the other.
pub(super) fn sent_twin(
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
pub(super) fn observed(
    r: Result<Option<Observed>, JournalError>,
) -> Result<Observed, JournalError> {
    r?.ok_or_else(|| JournalError::Folder {
        path: PathBuf::new(),
        source: std::io::Error::other("the journal gave no answer to an observation"),
    })
}

/// Inside a transaction: record `id` is done, its object's ETag and CRC
/// kept, its parts dropped (`at`: now, in unix seconds). The agent's done
/// transaction adds the features' part (its batch, its receipt).
pub(crate) fn done_in(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    etag: &str,
    crc: Crc,
    at: i64,
) -> rusqlite::Result<()> {
    cached(tx, "DELETE FROM parts WHERE file_id = ?1", params![id])?;
    cached(
        tx,
        "UPDATE files SET state = 'done', etag = ?2, done_at = ?3, updated_at = ?3,
                upload_id = NULL, last_error = NULL, attempts = attempts + 1,
                checksum = ?4, sent_crc = ?5 WHERE id = ?1",
        params![id, etag, at, crc.kind.to_string(), crc.value as i64],
    )?;
    Ok(())
}

/// Whether record `id`'s file is to be kept whatever its watch's
/// after-upload action (its writer was never seen to close it, or its key
/// already held an object).
pub(crate) fn keeps_file(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    let keep: Option<i64> =
        conn.query_row("SELECT keep_file FROM files WHERE id = ?1", [id], |r| {
            r.get(0)
        })?;
    Ok(keep.is_some_and(|k| k != 0))
}

/// Inside a transaction: record `id` holds the same bytes as record
/// `twin`, whose object is in the bucket (the agent compared their CRCs;
/// only the ctime differs): `id` is done as `twin` was (its ETag, CRC and
/// whether its file is kept), without a write, and `twin` superseded by
/// it. Returns `false`, changing nothing, when that no longer holds:
/// `twin` is not the record last sent to its key any more (another version
/// was sent, or it was pruned), or `id` is no longer waiting to be sent.
pub(crate) fn done_unchanged_in(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    twin: i64,
    at: i64,
) -> rusqlite::Result<bool> {
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
        params![id, twin, at],
    )?;
    if done == 0 {
        return Ok(false);
    }
    tx.execute(
        "UPDATE files SET state = 'superseded', updated_at = ?2 WHERE id = ?1",
        params![twin, at],
    )?;
    Ok(true)
}

pub(super) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub(super) fn load_parts(
    conn: &Connection,
    id: i64,
    kind: ChecksumKind,
) -> rusqlite::Result<Vec<PartDone>> {
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

impl Journal {
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
}
