//! Keeping the agent healthy while it runs: the heartbeat, gauges and
//! health every few seconds (housekeeping), and what the journal needs no
//! more (maintenance: records of files gone, receipts past their time,
//! claims a crash left).

use super::*;

/// Heartbeat (journal and systemd watchdog), credential expiry, gauges and
/// health. Nothing here may take long: the watchdog ping depends on it.
pub(super) async fn housekeeping(
    journal: Arc<Journal>,
    bucket: Arc<WriteOnlyBucket>,
    health: Arc<Health>,
    denied: Arc<Denied>,
) {
    // Twice per systemd watchdog period, and at least every 5 s.
    let period = sd_notify::watchdog_enabled()
        .map_or(Duration::from_secs(5), |w| {
            (w / 2).min(Duration::from_secs(5))
        })
        .max(Duration::from_millis(100));
    let mut beat = tokio::time::interval(period);
    let mut last_heartbeat = Instant::now() - Duration::from_secs(3600);
    // What `status` was last told of unreadable paths (none yet: the
    // first beat writes the empty list over a previous run's).
    let mut denied_written = None;
    loop {
        beat.tick().await;
        notify_systemd(&[sd_notify::NotifyState::Watchdog]);
        let expiry = bucket
            .credentials()
            .expiry()
            .and_then(|exp| exp.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        if let Some(exp) = expiry {
            ::metrics::gauge!(m::CREDENTIALS_EXPIRY).set(exp.saturating_sub(now()) as f64);
        }
        let j = journal.clone();
        match tokio::task::spawn_blocking(move || j.backlog()).await {
            Ok(Ok(st)) => {
                ::metrics::gauge!(m::QUEUE_DEPTH).set(st.pending as f64);
                ::metrics::gauge!(m::FAILED_FILES).set(st.failed as f64);
                let oldest = st.oldest_pending.map_or(0, |o| (now() - o.since).max(0));
                ::metrics::gauge!(m::OLDEST_PENDING).set(oldest as f64);
                health.observe(st.pending, expiry);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "journal: cannot read the backlog"),
            Err(e) => tracing::warn!(error = %e, "journal: the backlog query failed"),
        }
        if denied_written != Some(denied.generation()) {
            let (generation, summary) = denied.summary();
            let j = journal.clone();
            let written = tokio::task::spawn_blocking(move || {
                let text = serde_json::to_string(&summary).unwrap_or_default();
                j.set_meta(crate::watch::denied::Summary::META, &text)
            })
            .await;
            match written {
                Ok(Ok(())) => denied_written = Some(generation),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "journal: cannot record the unreadable paths")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "journal: recording the unreadable paths failed")
                }
            }
        }
        if last_heartbeat.elapsed() < Duration::from_secs(10) {
            continue;
        }
        last_heartbeat = Instant::now();
        // Also how a journal that could not be written is noticed to be
        // writable again.
        let j = journal.clone();
        let beat = tokio::task::spawn_blocking(move || {
            j.retune()?;
            j.set_meta("agent_heartbeat_at", &now().to_string())?;
            if let Some(exp) = expiry {
                j.set_meta("credentials_expire_at", &exp.to_string())?;
            }
            Ok::<(), JournalError>(())
        })
        .await;
        let result = match beat {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "journal: cannot write the heartbeat");
        }
        health.journal_write(result);
    }
}

/// Records the journal needs no more, off the watchdog's path and in small
/// batches: at start-up, pending records whose file is gone (deleted while
/// the agent was down) are closed and their uploads aborted; every hour,
/// old records are pruned, and receipts older than `keep_receipts`.
pub(super) async fn maintenance(ctx: Arc<Ctx>, retention: Duration, keep_receipts: Duration) {
    const BATCH: usize = 500;
    let mut after = 0;
    loop {
        let j = ctx.journal.clone();
        let batch = match tokio::task::spawn_blocking(move || j.pending_after(after, BATCH)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "journal: cannot list pending records");
                break;
            }
            Err(_) => break,
        };
        let Some(last) = batch.last().map(|b| b.0) else {
            break;
        };
        after = last;
        // The paths looked at are held as in flight from the look to the
        // close, so the agent does not take one up meanwhile (it hands it
        // back, to look again after `settle`); one it is taking up now is
        // left to it.
        let batch: Vec<(i64, PathBuf, u64)> = {
            let mut in_flight = ctx.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            batch
                .into_iter()
                .filter(|(_, p, _)| in_flight.insert(p.clone()))
                .collect()
        };
        let held: Vec<PathBuf> = batch.iter().map(|(_, p, _)| p.clone()).collect();
        let watches = ctx.settings.watches.clone();
        let closed: Vec<(i64, PathBuf, &'static str)> = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .filter_map(|(id, p, dev)| {
                    no_longer_work(&p, dev, &watches).map(|why| (id, p, why))
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        for (id, path, why) in closed {
            tracing::info!(path = ?path, reason = why, "a pending record is closed");
            // Only the records up to the one looked at: ids only grow while
            // the agent runs (nothing deletes file records before this pass
            // is over), so a later version of the path is never among them.
            ctx.forget_gone_through(&path, id);
        }
        let mut in_flight = ctx.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for p in &held {
            in_flight.remove(p);
        }
    }
    let mut hourly = tokio::time::interval(Duration::from_secs(3600));
    loop {
        hourly.tick().await;
        // Files a failed put-back left under a private name (not those of
        // actions running now).
        // Only claims made before the snapshot of those running: an action
        // is in the set before its claim is committed, so a claim older
        // than the snapshot whose action still runs is in it.
        let (j, watches) = (ctx.journal.clone(), ctx.settings.watches.clone());
        let before = now().saturating_sub(1);
        let running = ctx.running_claims().clone();
        let _ = tokio::task::spawn_blocking(move || recover_claims(&j, &watches, &running, before))
            .await;
        let before = now().saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
        let (mut after, mut removed) = (0, 0);
        loop {
            let (j, watches) = (ctx.journal.clone(), ctx.settings.watches.clone());
            let batch = tokio::task::spawn_blocking(move || {
                j.prune_batch(before, after, BATCH, |p, v| still_there(p, v, &watches))
            })
            .await;
            match batch {
                Ok(Ok((next, n))) => {
                    removed += n;
                    match next {
                        Some(id) => after = id,
                        None => break,
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "pruning the journal failed");
                    break;
                }
                Err(_) => break,
            }
            tokio::task::yield_now().await;
        }
        if removed > 0 {
            tracing::info!(records = removed, "pruned old journal records");
        }
        prune_receipts(&ctx.journal, keep_receipts).await;
    }
}

/// Removes the receipts older than `keep` (`state.keep_receipts`), a
/// batch at a time off the runtime; nothing else removes one.
pub(super) async fn prune_receipts(journal: &Arc<Journal>, keep: Duration) {
    const BATCH: usize = 500;
    let before = now().saturating_sub(i64::try_from(keep.as_secs()).unwrap_or(i64::MAX));
    let mut removed = 0;
    loop {
        let j = journal.clone();
        match tokio::task::spawn_blocking(move || j.prune_receipts(before, BATCH)).await {
            Ok(Ok(n)) => {
                removed += n;
                if n < BATCH {
                    break;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "pruning old receipts failed");
                break;
            }
            Err(_) => break,
        }
        tokio::task::yield_now().await;
    }
    if removed > 0 {
        tracing::info!(
            receipts = removed,
            "pruned receipts older than state.keep_receipts"
        );
    }
}

/// Only "no such file" means gone: an unmounted share or a permission
/// problem says nothing about the file.
///
/// And a share not mounted (yet) is not "no such file": the folder that
/// does exist nearest to the path must be on the file's own device.
///
/// Below a watched folder every folder is looked at beneath it, following
/// no link (a link there answers "not gone": the record is closed for the
/// link, by its caller); the watched folder and what is above it are the
/// configuration's and are looked at as named.
pub(super) fn is_gone(path: &Path, dev: u64, watches: &[WatchSettings]) -> bool {
    use std::os::unix::fs::MetadataExt;
    // The nearest folder that is there must be a folder on the file's own
    // filesystem (a share not mounted is not "no such file").
    let nearest_by_path_is_ours = |p: &Path| {
        p.ancestors()
            .skip(1)
            .find_map(|a| std::fs::symlink_metadata(a).ok())
            .is_some_and(|m| m.is_dir() && m.dev() == dev)
    };
    let Some((root, rel)) = in_watch(path, watches) else {
        return matches!(std::fs::symlink_metadata(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            && nearest_by_path_is_ours(path);
    };
    let root_fd = match files::open_root(root) {
        Ok(fd) => fd,
        Err(OpenError::Gone) => return nearest_by_path_is_ours(root),
        Err(_) => return false,
    };
    use std::os::fd::AsFd;
    if !matches!(files::lstat_at(root_fd.as_fd(), rel), Err(OpenError::Gone)) {
        return false;
    }
    for folder in rel.ancestors().skip(1) {
        let found = if folder.as_os_str().is_empty() {
            std::fs::metadata(root).map_err(OpenError::Io)
        } else {
            files::lstat_at(root_fd.as_fd(), folder)
        };
        match found {
            Ok(m) => return m.is_dir() && m.dev() == dev,
            Err(OpenError::Gone) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// The status (`lstat`) of `path` reached beneath the watched folder it is
/// in, following no link; [`OpenError::Link`] when a link is in its path
/// or no watch holds it.
pub(super) fn lstat_in_watch(
    path: &Path,
    watches: &[WatchSettings],
) -> Result<std::fs::Metadata, OpenError> {
    let (root, rel) = in_watch(path, watches).ok_or(OpenError::Link)?;
    files::lstat_beneath(root, rel)
}

/// The watched folder holding `path` (below it), and the path relative to it.
pub(super) fn in_watch<'a>(
    path: &'a Path,
    watches: &'a [WatchSettings],
) -> Option<(&'a Path, &'a Path)> {
    watches.iter().find_map(|w| {
        path.strip_prefix(&w.path)
            .ok()
            .filter(|rel| !rel.as_os_str().is_empty())
            .map(|rel| (w.path.as_path(), rel))
    })
}

/// Why a pending record names no work any more, if it does not: its file
/// is gone, is no longer a regular file, is behind a link now, or is no
/// longer in any watch (the configuration changed).
pub(super) fn no_longer_work(
    path: &Path,
    dev: u64,
    watches: &[WatchSettings],
) -> Option<&'static str> {
    let in_a_watch = watches.iter().any(|w| {
        path.strip_prefix(&w.path)
            .is_ok_and(|rel| crate::config::Filter::new(w).accepts(rel))
    });
    if !in_a_watch {
        return Some("it is in no watched folder, or excluded, now");
    }
    match lstat_in_watch(path, watches) {
        Ok(m) if !m.is_file() => Some("it is no longer a regular file"),
        Ok(_) => None,
        Err(OpenError::Link) => Some("a symbolic link is in its path now"),
        Err(_) if is_gone(path, dev, watches) => Some("its file is gone"),
        Err(_) => None,
    }
}

/// Whether the file version a done record names is still on disk (its record
/// must then stay, or the next scan would send it again). When that cannot
/// be told (any error but "no such file", or a share not mounted), it is.
/// A path that now leads through a link names no file of the tree.
pub(super) fn still_there(path: &Path, v: FileVersion, watches: &[WatchSettings]) -> bool {
    match lstat_in_watch(path, watches) {
        Ok(m) => m.is_file() && FileVersion::of(&m).is(&v),
        Err(OpenError::Link) => false,
        Err(_) => !is_gone(path, v.dev, watches),
    }
}

/// Puts back, under their names, files left under a private claim name by
/// an after-upload action that did not end (a crash, or a put-back that
/// failed); the journal then decides again what to do with them. The
/// claims of actions running now (`running`) are left alone.
pub(super) fn recover_claims(
    journal: &Journal,
    watches: &[WatchSettings],
    running: &HashSet<i64>,
    before: i64,
) {
    let claims = match journal.claims(before) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "journal: cannot list unfinished after_upload actions");
            return;
        }
    };
    for claim in claims.into_iter().filter(|c| !running.contains(&c.id)) {
        let path = &claim.path;
        let found = watches
            .iter()
            .find_map(|w| path.strip_prefix(&w.path).ok().map(|rel| (w, rel)));
        let Some((watch, rel)) = found else {
            tracing::warn!(path = ?path, private = %claim.name, "an after_upload action was interrupted in a folder no longer watched; look for the file under its private name");
            continue;
        };
        match after_upload::recover(&watch.path, rel, &claim.name) {
            Ok(true) => {
                tracing::info!(path = ?path, "put back a file an unfinished after_upload action had claimed")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(path = ?path, error = %e, private = %claim.name, "cannot put back a file an unfinished after_upload action had claimed");
                continue;
            }
        }
        if let Err(e) = journal.unclaim(claim.id) {
            tracing::warn!(path = ?path, error = %e, "journal: cannot record a recovered claim");
        }
    }
}
