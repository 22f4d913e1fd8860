//! Ordered batches: a completion marker (`[[watch]] marker`, `_SUCCESS`,
//! `manifest.json`, `*.done`) is sent only after every other file of its
//! folder and subfolders that was there when the agent took the marker up
//! is done (sent and recorded) or gone.
//!
//! It owns which files are markers, each marker's batch (listed from the
//! disk, beneath the watch and through no link, the first time the agent
//! takes the marker up, and kept in the journal's database: tables
//! `batches`, `batch_members` and `sent_checksums`, so the order survives
//! restarts and kill -9), the gate the agent asks before sending a marker,
//! the batch's manifest, and what `putonly status` shows of held markers.
//! A member is done when a version of its path that was on disk at the
//! listing, or one recorded after it, is recorded done (marked in the very
//! transaction of [`crate::journal::Journal::done`]; until the batch's
//! manifest is sent, a member done is given each newer version of its path
//! recorded done, the object the bucket holds); it no longer holds
//! the marker once it is gone: nothing at its path on two looks at least
//! `settle` apart, the marker in place after both, and its file (device
//! and inode) nowhere beneath the marker's folder. A member whose file is
//! found at another path there (renamed, or a folder of its renamed)
//! follows it, and a file made anew at its path is its new version: both
//! still hold the marker until sent. It must never let a marker through
//! while a member is neither; never hold a batch's list in memory (the
//! listing, the gate and the manifest go through it in pages); never
//! follow a link; and never talk to the network: the agent sends the
//! manifest and the marker through the engine.

mod listing;
mod manifest;
mod status;
mod tables;

use listing::*;
pub use manifest::*;
pub use status::*;
pub(crate) use tables::*;

use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::config::{AfterUpload, Filter, Markers, WatchSettings};
use crate::ground::checksum::Crc;
use crate::ground::{FileVersion, now};
use crate::journal::{Journal, JournalError, cached};
use crate::watch::files::{self, OpenError};
use crate::watch::walk::{self, Found, Tree};

/// Files listed, looked at and recorded per journal transaction.
const PAGE: usize = 512;

/// Why a marker's batch cannot be told.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(
        "marker {marker:?}: cannot list its batch: folder {folder:?}: {why}; the marker is held until the folder can be read (give the agent's user read and search permission on it)"
    )]
    Unlistable {
        marker: PathBuf,
        folder: PathBuf,
        why: String,
    },
    #[error(
        "marker {marker:?}: cannot write its manifest {path:?}: {source}; check the state folder"
    )]
    Manifest {
        marker: PathBuf,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the gate says of a marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Every member is done or gone: the marker may be sent.
    Go,
    /// `waiting` members are neither; `first` is one of them.
    Wait { waiting: u64, first: PathBuf },
    /// The marker is no longer at its path as the file the agent opened
    /// (its folder moved or removed, or it was replaced): nothing was
    /// concluded from what is missing around it.
    Moved,
}

/// What the gate found, and whether it listed the batch just now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub gate: Gate,
    /// Members listed now (`None`: the batch was listed before).
    pub listed: Option<u64>,
    /// Members found gone now, at most a page of them.
    pub gone: Vec<PathBuf>,
    /// Members whose file was found at another path beneath the marker's
    /// folder now (renamed, or a folder of theirs renamed): from, to.
    pub followed: Vec<(PathBuf, PathBuf)>,
}

/// The gate, for the marker recorded as `marker_id` at `rel` in `watch`:
/// lists its batch if that was not done to its end yet (a first time, or a
/// crash in the middle), drops members whose file is gone, follows those
/// whose file moved within the marker's folder, and says whether the
/// marker may go. Blocking: call it off the runtime.
///
/// A member is gone only when nothing is at its path on two looks at
/// least `settle` apart (the first one is recorded: `missing_since`), the
/// marker still in place after both, and its file (device and inode) is
/// nowhere beneath the marker's folder, walked as the listing does: a
/// file replaced by unlink-then-create, or looked at while its folder was
/// being renamed, is not taken for gone. A member whose file is found at
/// another path follows it there (and still holds the marker).
pub fn check(
    journal: &Journal,
    watch: &WatchSettings,
    markers: &Markers,
    watch_index: usize,
    marker_id: i64,
    rel: &Path,
    opened: FileVersion,
) -> Result<Checked, BatchError> {
    let listed_state: Option<String> = journal.with(|c| {
        c.query_row(
            "SELECT state FROM batches WHERE marker_id = ?1",
            [marker_id],
            |r| r.get(0),
        )
        .optional()
    })?;
    let moved = |listed| Checked {
        gate: Gate::Moved,
        listed,
        gone: Vec::new(),
        followed: Vec::new(),
    };
    let listed = if listed_state.as_deref() == Some("waiting") {
        None
    } else {
        match list(journal, watch, markers, watch_index, marker_id, rel, opened)? {
            Some(n) => Some(n),
            None => return Ok(moved(None)),
        }
    };
    let filter = Filter::new(watch);
    let root = files::open_root(&watch.path).ok();
    let settle_ms = i64::try_from(watch.settle.as_millis()).unwrap_or(i64::MAX);
    let mut gone = Vec::new();
    let mut followed = Vec::new();
    let wait = |first: PathBuf,
                gone: Vec<PathBuf>,
                followed: Vec<(PathBuf, PathBuf)>|
     -> Result<Checked, BatchError> {
        // Kept with the batch: no count over its members.
        let count: i64 = journal.with(|c| {
            c.query_row(
                "SELECT waiting FROM batches WHERE marker_id = ?1",
                [marker_id],
                |r| r.get(0),
            )
            .optional()
            .map(Option::unwrap_or_default)
        })?;
        Ok(Checked {
            gate: Gate::Wait {
                waiting: u64::try_from(count).unwrap_or(0),
                first,
            },
            listed,
            gone,
            followed,
        })
    };
    // Most rechecks stop at the first member, still there: small pages
    // first, growing while members are found missing.
    let mut page = 8;
    let mut after: Vec<u8> = Vec::new();
    loop {
        let rows: Vec<Waiting> = journal.with(|c| {
            let mut q = c.prepare_cached(
                "SELECT path, missing_since, dev, ino FROM batch_members INDEXED BY batch_members_marker_waiting
                 WHERE marker_id = ?1 AND state = 'waiting' AND path > ?2
                 ORDER BY path LIMIT ?3",
            )?;
            let rows = q.query_map(params![marker_id, after, page as i64], |r| {
                Ok(Waiting {
                    path: r.get(0)?,
                    missing_since: r.get(1)?,
                    dev: r.get(2)?,
                    ino: r.get(3)?,
                })
            })?;
            rows.collect()
        })?;
        page = (page * 4).min(PAGE);
        let Some(last) = rows.last() else { break };
        after = last.path.clone();
        let mut missing = Vec::new();
        let mut still = None;
        for m in rows {
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(&m.path));
            let there = match (&root, path.strip_prefix(&watch.path)) {
                (Some(root), Ok(member)) => is_there(root.as_fd(), member, &filter),
                // The watched folder cannot be opened: cannot tell.
                (None, _) => true,
                (_, Err(_)) => false,
            };
            if there {
                if m.missing_since.is_some() {
                    // Back at its path (replaced by unlink-then-create, say):
                    // its next absence is timed afresh.
                    journal.with(|c| {
                        c.execute(
                            "UPDATE batch_members SET missing_since = NULL WHERE marker_id = ?1 AND path = ?2",
                            params![marker_id, m.path],
                        )
                    })?;
                }
                still = Some(path);
                break;
            }
            missing.push(m);
        }
        // Members missing say something only if the marker is still where
        // it was, looked at after them: a folder moved away takes both.
        if !missing.is_empty() {
            let Some(root) = root.as_ref() else {
                return Ok(moved(listed));
            };
            if !marker_in_place(root.as_fd(), rel, opened) {
                return Ok(moved(listed));
            }
            let t = now_ms();
            let (confirmed, fresh): (Vec<Waiting>, Vec<Waiting>) =
                missing.into_iter().partition(|m| {
                    m.missing_since
                        .is_some_and(|since| t.saturating_sub(since) >= settle_ms)
                });
            // (Or stamped in the future: the clock was set back.)
            let first_seen: Vec<&Waiting> = fresh
                .iter()
                .filter(|m| m.missing_since.is_none_or(|since| since > t))
                .collect();
            if !first_seen.is_empty() {
                journal.with(|c| {
                    let tx = c.transaction()?;
                    for m in &first_seen {
                        tx.execute(
                            "UPDATE batch_members SET missing_since = ?3 WHERE marker_id = ?1 AND path = ?2 AND state = 'waiting'",
                            params![marker_id, m.path, t],
                        )?;
                    }
                    tx.commit()
                })?;
            }
            if !confirmed.is_empty() {
                let settled = settle_missing(
                    journal,
                    watch,
                    markers,
                    watch_index,
                    marker_id,
                    rel,
                    root.as_fd(),
                    opened,
                    &confirmed,
                )?;
                let Some(settled) = settled else {
                    return Ok(moved(listed));
                };
                for p in settled.gone {
                    if gone.len() < PAGE {
                        gone.push(p);
                    }
                }
                for (from, to, waits) in settled.followed {
                    if waits && still.is_none() {
                        still = Some(to.clone());
                    }
                    if followed.len() < PAGE {
                        followed.push((from, to));
                    }
                }
            }
        }
        if let Some(first) = still {
            return wait(first, gone, followed);
        }
    }
    // No member is at its path: those still waiting are missing since
    // less than `settle`, or were followed to a path looked at already.
    let first: Option<Vec<u8>> = journal.with(|c| {
        c.query_row(
            "SELECT path FROM batch_members INDEXED BY batch_members_marker_waiting
             WHERE marker_id = ?1 AND state = 'waiting' ORDER BY path LIMIT 1",
            [marker_id],
            |r| r.get(0),
        )
        .optional()
    })?;
    match first {
        Some(p) => wait(
            PathBuf::from(std::ffi::OsStr::from_bytes(&p)),
            gone,
            followed,
        ),
        None => Ok(Checked {
            gate: Gate::Go,
            listed,
            gone,
            followed,
        }),
    }
}

/// A waiting member, as the gate reads it.
struct Waiting {
    path: Vec<u8>,
    missing_since: Option<i64>,
    dev: i64,
    ino: i64,
}

/// Milliseconds since the epoch: when a member was first found missing.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What became of members missing from their path for `settle`.
struct Settled {
    /// Their file is nowhere beneath the marker's folder.
    gone: Vec<PathBuf>,
    /// Found at another path: from, to, and whether it still waits there
    /// (no version of it at its new path is recorded done yet).
    followed: Vec<(PathBuf, PathBuf, bool)>,
}

/// Members missing from their path since at least `settle` ago: each is
/// looked for by device and inode beneath the marker's folder, walked as
/// the listing walks it (beneath the watch, through no link, files the
/// watch takes, the markers of that very folder excepted). A member whose
/// file is found follows it: its path becomes the file's, with the
/// version there now, and it still holds the marker until a version of
/// its new path recorded after the listing (of its very inode, if it was
/// done before it was found there) is done. A path that is a member of
/// the batch already and waits is left to that member (ours waits, and
/// is looked for again at the next check); one done or gone is replaced.
/// The others are gone. `None`: the marker was not in place after the
/// walk (its folder moved meanwhile), and nothing was concluded.
#[allow(clippy::too_many_arguments)]
fn settle_missing(
    journal: &Journal,
    watch: &WatchSettings,
    markers: &Markers,
    watch_index: usize,
    marker_id: i64,
    rel: &Path,
    root: std::os::fd::BorrowedFd<'_>,
    opened: FileVersion,
    missing: &[Waiting],
) -> Result<Option<Settled>, BatchError> {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    let folder = batch_folder(watch, rel);
    let folder_rel = rel.parent().unwrap_or(Path::new(""));
    let mut wanted: HashMap<(i64, i64), &[u8]> = missing
        .iter()
        .map(|m| ((m.dev, m.ino), m.path.as_slice()))
        .collect();
    let mut found: Vec<(&[u8], PathBuf, FileVersion)> = Vec::new();
    let filter = Filter::new(watch);
    let trees = Arc::new(vec![Tree {
        root: watch.path.clone(),
        filter: Filter::new(watch),
    }]);
    let mut rx = walk::spawn(vec![folder], trees, None);
    while !wanted.is_empty() {
        let Some(f) = rx.blocking_recv() else { break };
        match f {
            Found::File(path) => {
                let Ok(member) = path.strip_prefix(&watch.path) else {
                    continue;
                };
                if member == rel
                    || !filter.accepts(member)
                    || (member.parent() == Some(folder_rel)
                        && markers.is_marker(watch_index, member))
                {
                    continue;
                }
                let Ok(m) = files::lstat_at(root, member) else {
                    continue;
                };
                if !m.is_file() {
                    continue;
                }
                // Stored as the listing stores them.
                let at = (m.dev() as i64, m.ino() as i64);
                if let Some(p) = wanted.remove(&at) {
                    found.push((p, path, FileVersion::of(&m)));
                }
            }
            // Cannot tell whether a member is in there: nothing concluded.
            Found::Unreadable(u) => {
                return Err(BatchError::Unlistable {
                    marker: watch.path.join(rel),
                    folder: u.path,
                    why: u.why,
                });
            }
            Found::Listed(_) | Found::Gone(_) => {}
        }
    }
    drop(rx);
    if !marker_in_place(root, rel, opened) {
        return Ok(None);
    }
    let gone: Vec<&[u8]> = wanted.into_values().collect();
    let followed = journal.with(|c| {
        let tx = c.transaction()?;
        for p in &gone {
            tx.execute(
                "UPDATE batch_members SET state = 'gone' WHERE marker_id = ?1 AND path = ?2 AND state = 'waiting'",
                params![marker_id, p],
            )?;
        }
        let mut followed = Vec::new();
        for (from, to, v) in &found {
            let to_bytes = to.as_os_str().as_bytes();
            let state = |path: &[u8]| -> rusqlite::Result<Option<String>> {
                tx.query_row(
                    "SELECT state FROM batch_members WHERE marker_id = ?1 AND path = ?2",
                    params![marker_id, path],
                    |r| r.get(0),
                )
                .optional()
            };
            // Settled meanwhile (a version of its old path recorded done),
            // or its new path is waited for already.
            if state(from)?.as_deref() != Some("waiting")
                || state(to_bytes)?.as_deref() == Some("waiting")
            {
                continue;
            }
            tx.execute(
                "DELETE FROM batch_members WHERE marker_id = ?1 AND path = ?2",
                params![marker_id, to_bytes],
            )?;
            tx.execute(
                "UPDATE batch_members SET path = ?3, dev = ?4, ino = ?5, size = ?6, mtime_ns = ?7,
                        ctime_ns = ?8, missing_since = NULL
                 WHERE marker_id = ?1 AND path = ?2 AND state = 'waiting'",
                params![
                    marker_id,
                    from,
                    to_bytes,
                    v.dev as i64,
                    v.ino as i64,
                    v.size as i64,
                    v.mtime_ns,
                    v.ctime_ns
                ],
            )?;
            // Already sent from its new path, after the listing.
            let settled = tx.execute(
                "UPDATE batch_members SET state = 'done', sent_id = f.id, key = f.key, sent_size = f.size,
                        crc_kind = (SELECT kind FROM sent_checksums WHERE file_id = f.id),
                        crc = (SELECT value FROM sent_checksums WHERE file_id = f.id)
                 FROM (SELECT id, key, size FROM files
                       WHERE path = ?2 AND state = 'done' AND dev = ?3 AND ino = ?4
                       ORDER BY id DESC LIMIT 1) f
                 WHERE batch_members.marker_id = ?1 AND batch_members.path = ?2
                   AND batch_members.state = 'waiting' AND batch_members.after_id < f.id",
                params![marker_id, to_bytes, v.dev as i64, v.ino as i64],
            )?;
            followed.push((
                PathBuf::from(std::ffi::OsStr::from_bytes(from)),
                to.clone(),
                settled == 0,
            ));
        }
        tx.commit()?;
        Ok(followed)
    })?;
    Ok(Some(Settled {
        gone: gone
            .into_iter()
            .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p)))
            .collect(),
        followed,
    }))
}

/// Whether the marker is still at `rel` beneath the watch, the very file
/// the agent opened (same device and inode).
fn marker_in_place(root: std::os::fd::BorrowedFd<'_>, rel: &Path, opened: FileVersion) -> bool {
    use std::os::unix::fs::MetadataExt;
    files::lstat_at(root, rel)
        .is_ok_and(|m| m.is_file() && (m.dev(), m.ino()) == (opened.dev, opened.ino))
}

/// Whether a member still names a file that will be sent: a regular file,
/// reached beneath the watch through no link, that the watch takes,
/// whichever it is (one made anew at its path is its new version, sent
/// after the listing). Any answer but "not there" (a permission problem,
/// say) keeps it.
fn is_there(root: std::os::fd::BorrowedFd<'_>, rel: &Path, filter: &Filter) -> bool {
    if !filter.accepts(rel) {
        return false;
    }
    match files::lstat_at(root, rel) {
        Ok(m) => m.is_file(),
        Err(OpenError::Gone | OpenError::Link | OpenError::NotAFile) => false,
        Err(OpenError::Io(_)) => true,
    }
}

/// The folder of the marker at `rel`, as the files below it are named in
/// the journal, without a trailing separator: a marker at the top of the
/// watch has the watched folder itself (`Path::join("")` would add a `/`,
/// and [`add_history`]'s range `("<folder>/", "<folder>0")` would then
/// miss every file of the batch).
fn batch_folder(watch: &WatchSettings, rel: &Path) -> PathBuf {
    watch
        .path
        .join(rel.parent().unwrap_or(Path::new("")))
        .components()
        .collect()
}

/// The journal's hook, inside the transaction that records `id` done:
/// members of other markers' batches that this version settles are done
/// (with its key, size and checksum for the manifest); members done
/// already with an older version of its path are given this one (the
/// object now in the bucket) until their batch's manifest is sent; a
/// marker's own batch is over.
pub(crate) fn on_done(tx: &Transaction<'_>, id: i64) -> rusqlite::Result<()> {
    // Most files belong to no batch: two index lookups say so, and the two
    // updates below (each materializing its FROM) are skipped.
    let member: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM batch_members m, files f
                            WHERE f.id = ?1 AND m.path = f.path AND m.state = 'waiting')
                 OR EXISTS (SELECT 1 FROM batch_members m, files f
                            WHERE f.id = ?1 AND m.path = f.path AND m.state = 'done')",
        )?
        .query_row([id], |r| r.get(0))?;
    if !member {
        cached(tx, "DELETE FROM batches WHERE marker_id = ?1", [id])?;
        return Ok(());
    }
    cached(
        tx,
        "UPDATE batch_members SET sent_id = f.id, key = f.key, sent_size = f.size,
                crc_kind = (SELECT kind FROM sent_checksums WHERE file_id = f.id),
                crc = (SELECT value FROM sent_checksums WHERE file_id = f.id)
         FROM (SELECT id, path, key, size FROM files WHERE id = ?1) f
         WHERE batch_members.state = 'done' AND batch_members.path = f.path
           AND COALESCE(batch_members.sent_id, 0) < f.id
           AND EXISTS (SELECT 1 FROM batches b
                       WHERE b.marker_id = batch_members.marker_id AND b.manifest_sent = 0)",
        [id],
    )?;
    cached(
        tx,
        "UPDATE batch_members SET state = 'done', sent_id = f.id, key = f.key, sent_size = f.size,
                crc_kind = (SELECT kind FROM sent_checksums WHERE file_id = f.id),
                crc = (SELECT value FROM sent_checksums WHERE file_id = f.id)
         FROM (SELECT id, path, key, size, dev, ino, mtime_ns, ctime_ns FROM files WHERE id = ?1) f
         WHERE batch_members.state = 'waiting' AND batch_members.path = f.path
           AND (batch_members.after_id < f.id
                OR (batch_members.dev = f.dev AND batch_members.ino = f.ino
                    AND batch_members.size = f.size AND batch_members.mtime_ns = f.mtime_ns
                    AND (f.ctime_ns IS NULL OR batch_members.ctime_ns = f.ctime_ns)))",
        [id],
    )?;
    cached(tx, "DELETE FROM batches WHERE marker_id = ?1", [id])?;
    Ok(())
}

#[cfg(test)]
mod tests;
