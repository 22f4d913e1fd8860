//! The manifest of a batch: its keys, sizes and checksums, written page by
//! page into the state folder before its marker is sent, and what the
//! journal keeps of it.

use super::*;

/// Removes manifests left in the state folder by an agent that stopped
/// between writing one and sending it (each is written afresh when needed).
pub fn clean_manifests(state_dir: &Path) {
    let folder = state_dir.join("manifests");
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return;
    };
    for e in entries.flatten() {
        if let Err(err) = std::fs::remove_file(e.path()) {
            tracing::warn!(file = ?e.path(), error = %err, "cannot remove a manifest left by an earlier run");
        }
    }
}

/// Keeps the checksum of what was sent for record `id`, for manifests;
/// committed before the record is marked done.
pub fn remember_checksum(journal: &Journal, id: i64, crc: &Crc) -> Result<(), JournalError> {
    journal.with(|c| {
        c.execute(
            "INSERT OR REPLACE INTO sent_checksums (file_id, kind, value) VALUES (?1, ?2, ?3)",
            params![id, crc.kind.to_string(), crc.to_base64()],
        )
        .map(|_| ())
    })
}

/// The key of a marker's manifest: beside it, `<marker key>.manifest.json`.
pub fn manifest_key(marker_key: &str) -> String {
    format!("{marker_key}.manifest.json")
}

/// Whether the manifest of this marker's batch was sent already.
pub fn manifest_sent(journal: &Journal, marker_id: i64) -> Result<bool, JournalError> {
    journal.with(|c| {
        c.query_row(
            "SELECT manifest_sent FROM batches WHERE marker_id = ?1",
            [marker_id],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|v| v.is_some_and(|v| v != 0))
    })
}

/// The manifest of this marker's batch was sent: not again for it, and
/// the files it listed (and older versions of them) are not listed again
/// by a later manifest of its folder (see `add_history`).
pub fn record_manifest_sent(journal: &Journal, marker_id: i64) -> Result<(), JournalError> {
    journal.with(|c| {
        let tx = c.transaction()?;
        tx.execute(
            "UPDATE batches SET manifest_sent = 1 WHERE marker_id = ?1",
            [marker_id],
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO manifested (folder, file_id)
             SELECT b.folder, f.id FROM batch_members m JOIN batches b ON b.marker_id = m.marker_id
               JOIN files f ON f.path = m.path AND f.state = 'done' AND f.id <= m.sent_id
             WHERE m.marker_id = ?1 AND m.state = 'done' AND m.sent_id IS NOT NULL AND b.folder IS NOT NULL",
            [marker_id],
        )?;
        tx.commit()
    })
}

/// Whether a member of the batch was sent under `key` (a producer's file
/// named like the manifest).
pub fn batch_has_key(journal: &Journal, marker_id: i64, key: &str) -> Result<bool, JournalError> {
    journal.with(|c| {
        c.query_row(
            "SELECT COUNT(*) > 0 FROM batch_members WHERE marker_id = ?1 AND key = ?2",
            params![marker_id, key],
            |r| r.get(0),
        )
    })
}

/// Writes the manifest of a complete batch into `dir` (the state folder),
/// page by page, and returns its path. One JSON object, the same bytes
/// whenever it is written again (no time in it):
/// `{"marker": KEY, "files": [{"key", "size", "checksum_algorithm",
/// "checksum"}...], "count": N}`, files in path order. Blocking.
pub fn write_manifest(
    journal: &Journal,
    marker_id: i64,
    marker_key: &str,
    marker: &Path,
    dir: &Path,
) -> Result<PathBuf, BatchError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let folder = dir.join("manifests");
    let path = folder.join(format!("{marker_id}.json"));
    let err = |source| BatchError::Manifest {
        marker: marker.to_path_buf(),
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&folder)
        .map_err(err)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(err)?;
    let mut out = std::io::BufWriter::new(file);
    let json = |v: &str| serde_json::Value::from(v).to_string();
    write!(out, "{{\"marker\":{},\"files\":[", json(marker_key)).map_err(err)?;
    let mut after: Vec<u8> = Vec::new();
    let mut count = 0u64;
    loop {
        type Row = (
            Vec<u8>,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = journal.with(|c| {
            let mut q = c.prepare_cached(
                "SELECT path, key, sent_size, crc_kind, crc FROM batch_members
                 WHERE marker_id = ?1 AND state = 'done' AND path > ?2 ORDER BY path LIMIT ?3",
            )?;
            let rows = q.query_map(params![marker_id, after, PAGE as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            rows.collect()
        })?;
        let Some(last) = rows.last() else { break };
        after = last.0.clone();
        for (_, key, size, kind, crc) in rows {
            let entry = serde_json::json!({
                "key": key,
                "size": size,
                "checksum_algorithm": kind.map(|k| k.to_uppercase()),
                "checksum": crc,
            });
            if count > 0 {
                out.write_all(b",").map_err(err)?;
            }
            write!(out, "{entry}").map_err(err)?;
            count += 1;
        }
    }
    writeln!(out, "],\"count\":{count}}}").map_err(err)?;
    let file = out.into_inner().map_err(|e| err(e.into_error()))?;
    file.sync_all().map_err(err)?;
    Ok(path)
}
