//! A marker's batch, listed from the disk beneath its watch the first
//! time the agent takes the marker up, page by page into the journal.

use super::*;

/// Lists the batch of a marker: every file the watch takes below the
/// marker's folder, the markers of that very folder excepted (they do not
/// wait for one another; those of subfolders are members). Recorded page
/// by page, the batch marked complete at the end: a listing cut short is
/// done again from the start. Returns how many members it has; `None`
/// when the marker was not in place after the walk (its folder moved or
/// removed meanwhile): the listing is then left unfinished.
pub(super) fn list(
    journal: &Journal,
    watch: &WatchSettings,
    markers: &Markers,
    watch_index: usize,
    marker_id: i64,
    rel: &Path,
    opened: FileVersion,
) -> Result<Option<u64>, BatchError> {
    let marker = watch.path.join(rel);
    let folder_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
    let folder = batch_folder(watch, rel);
    journal.with(|c| {
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO batches (marker_id, state, listed_at, folder) VALUES (?1, 'listing', ?2, ?3)
             ON CONFLICT (marker_id) DO UPDATE SET state = 'listing', listed_at = ?2, folder = ?3",
            params![marker_id, now(), folder.as_os_str().as_bytes()],
        )?;
        tx.execute(
            "DELETE FROM batch_members WHERE marker_id = ?1",
            [marker_id],
        )?;
        tx.execute(
            "UPDATE batches SET waiting = 0 WHERE marker_id = ?1",
            [marker_id],
        )?;
        tx.commit()
    })?;
    let unlistable = |folder: PathBuf, why: String| BatchError::Unlistable {
        marker: marker.clone(),
        folder,
        why,
    };
    let root =
        files::open_root(&watch.path).map_err(|e| unlistable(watch.path.clone(), e.to_string()))?;
    let filter = Filter::new(watch);
    let trees = Arc::new(vec![Tree {
        root: watch.path.clone(),
        filter: Filter::new(watch),
    }]);
    let mut rx = walk::spawn(vec![folder.clone()], trees, None);
    let mut page: Vec<PathBuf> = Vec::with_capacity(PAGE);
    loop {
        let found = rx.blocking_recv();
        let last = found.is_none();
        match found {
            Some(Found::File(path)) => {
                let Ok(member) = path.strip_prefix(&watch.path) else {
                    continue;
                };
                let same_folder = member.parent() == Some(folder_rel.as_path());
                if member == rel
                    || !filter.accepts(member)
                    || (same_folder && markers.is_marker(watch_index, member))
                {
                    continue;
                }
                page.push(path);
            }
            // Dropping the receiver stops the walk.
            Some(Found::Unreadable(u)) => return Err(unlistable(u.path, u.why)),
            Some(Found::Listed(_) | Found::Gone(_)) | None => {}
        }
        if page.len() >= PAGE || (last && !page.is_empty()) {
            record_page(journal, root.as_fd(), &watch.path, marker_id, &page).map_err(
                |e| match e {
                    Unlisted::Journal(e) => BatchError::Journal(e),
                    Unlisted::Look(f, why) => unlistable(f, why),
                },
            )?;
            page.clear();
        }
        if last {
            break;
        }
    }
    if watch.manifest && watch.after_upload != AfterUpload::Keep {
        add_history(
            journal,
            watch,
            markers,
            watch_index,
            marker_id,
            rel,
            &folder,
        )?;
    }
    // A walk of a folder that moved away finds nothing: the marker, looked
    // at after the walk, tells.
    if !marker_in_place(root.as_fd(), rel, opened) {
        return Ok(None);
    }
    let members = journal.with(|c| {
        let tx = c.transaction()?;
        tx.execute(
            &format!("{RECOUNT}, state = 'waiting' WHERE marker_id = ?1"),
            [marker_id],
        )?;
        let n: i64 = tx.query_row(
            "SELECT COUNT(*) FROM batch_members WHERE marker_id = ?1",
            [marker_id],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(n)
    })?;
    Ok(Some(u64::try_from(members).unwrap_or(0)))
}

/// With `after_upload = "delete"` or `"move"` the files of a batch may be
/// sent and gone before its marker is even seen; for its manifest, the
/// batch also takes every file of its folder (and subfolders) recorded
/// done that no earlier manifest of that folder listed. They are done:
/// they change nothing to when the marker goes. Files on disk were
/// listed already and are not replaced. Returns how many were added.
pub(super) fn add_history(
    journal: &Journal,
    watch: &WatchSettings,
    markers: &Markers,
    watch_index: usize,
    marker_id: i64,
    rel: &Path,
    folder: &Path,
) -> Result<u64, BatchError> {
    let folder_rel = rel.parent().unwrap_or(Path::new(""));
    let filter = Filter::new(watch);
    let f = folder.as_os_str().as_bytes();
    let (low, high) = ([f, b"/"].concat(), [f, b"0"].concat());
    let mut after = 0i64;
    let mut added = 0u64;
    loop {
        let rows: Vec<(i64, Vec<u8>)> = journal.with(|c| {
            let mut q = c.prepare_cached(
                "SELECT id, path FROM files f
                 WHERE path > ?1 AND path < ?2 AND state = 'done' AND id > ?3 AND id != ?4
                   AND NOT EXISTS (SELECT 1 FROM manifested m WHERE m.folder = ?5 AND m.file_id = f.id)
                 ORDER BY id LIMIT ?6",
            )?;
            let rows = q.query_map(
                params![low, high, after, marker_id, f, PAGE as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            rows.collect()
        })?;
        let Some(last) = rows.last() else {
            return Ok(added);
        };
        after = last.0;
        let taken: Vec<i64> = rows
            .into_iter()
            .filter(|(_, p)| {
                let path = Path::new(std::ffi::OsStr::from_bytes(p));
                path.strip_prefix(&watch.path).is_ok_and(|member| {
                    member != rel
                        && filter.accepts(member)
                        && !(member.parent() == Some(folder_rel)
                            && markers.is_marker(watch_index, member))
                })
            })
            .map(|(id, _)| id)
            .collect();
        added += journal.with(|c| {
            let tx = c.transaction()?;
            let mut n = 0u64;
            {
                // Marked by after_id -1. In id order: per path, the last
                // version sent (the object) wins; files listed on disk stay.
                let mut insert = tx.prepare_cached(
                    "INSERT INTO batch_members
                       (marker_id, path, dev, ino, size, mtime_ns, ctime_ns, after_id, state,
                        sent_id, key, sent_size, crc_kind, crc)
                     SELECT ?1, f.path, f.dev, f.ino, f.size, f.mtime_ns, COALESCE(f.ctime_ns, 0), -1, 'done',
                            f.id, f.key, f.size, s.kind, s.value
                     FROM files f LEFT JOIN sent_checksums s ON s.file_id = f.id WHERE f.id = ?2
                     ON CONFLICT (marker_id, path) DO UPDATE SET
                        sent_id = excluded.sent_id, key = excluded.key, sent_size = excluded.sent_size,
                        crc_kind = excluded.crc_kind, crc = excluded.crc
                     WHERE batch_members.after_id = -1",
                )?;
                for id in &taken {
                    n += insert.execute(params![marker_id, id])? as u64;
                }
            }
            tx.commit()?;
            Ok(n)
        })?;
    }
}

/// Why a page of members was not recorded.
pub(super) enum Unlisted {
    Journal(JournalError),
    /// A file listed could not be looked at (not "no such file").
    Look(PathBuf, String),
}

/// Records one page of members, each with the version on disk now. The
/// journal's newest record id is read before the files are looked at: a
/// version recorded after that was on disk after the look, and counts.
pub(super) fn record_page(
    journal: &Journal,
    root: std::os::fd::BorrowedFd<'_>,
    root_path: &Path,
    marker_id: i64,
    page: &[PathBuf],
) -> Result<u64, Unlisted> {
    let after: i64 = journal
        .with(|c| c.query_row("SELECT COALESCE(MAX(id), 0) FROM files", [], |r| r.get(0)))
        .map_err(Unlisted::Journal)?;
    let mut looked: Vec<(&PathBuf, FileVersion)> = Vec::with_capacity(page.len());
    for p in page {
        let Ok(rel) = p.strip_prefix(root_path) else {
            continue;
        };
        match files::lstat_at(root, rel) {
            Ok(m) if m.is_file() => looked.push((p, FileVersion::of(&m))),
            // Gone since it was listed, or no longer a file: not a member.
            Ok(_) | Err(OpenError::Gone | OpenError::Link | OpenError::NotAFile) => {}
            // Cannot tell (out of descriptors, a permission changed): the
            // listing is not complete, and the marker waits.
            Err(OpenError::Io(e)) => return Err(Unlisted::Look(p.clone(), e.to_string())),
        }
    }
    journal
        .with(|c| {
            let tx = c.transaction()?;
            let mut n = 0u64;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR REPLACE INTO batch_members
                   (marker_id, path, dev, ino, size, mtime_ns, ctime_ns, after_id, state,
                    sent_id, key, sent_size, crc_kind, crc)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8,
                        CASE WHEN f.id IS NULL THEN 'waiting' ELSE 'done' END,
                        f.id, f.key, f.size, s.kind, s.value
                 FROM (SELECT 1) LEFT JOIN (
                     SELECT id, key, size FROM files
                     WHERE path = ?2 AND state = 'done'
                       AND (id > ?8 OR (dev = ?3 AND ino = ?4 AND size = ?5 AND mtime_ns = ?6
                                        AND (ctime_ns = ?7 OR ctime_ns IS NULL)))
                     ORDER BY id DESC LIMIT 1
                 ) f LEFT JOIN sent_checksums s ON s.file_id = f.id",
                )?;
                for (p, v) in &looked {
                    n += insert.execute(params![
                        marker_id,
                        p.as_os_str().as_bytes(),
                        v.dev as i64,
                        v.ino as i64,
                        v.size as i64,
                        v.mtime_ns,
                        v.ctime_ns,
                        after
                    ])? as u64;
                }
            }
            tx.commit()?;
            Ok(n)
        })
        .map_err(Unlisted::Journal)
}
