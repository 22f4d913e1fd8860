//! What comes in: the kernel's news, what the walks find, and the files
//! the agent hands back; folders and files that cannot be read, tried
//! again; writers whose close never came, judged at last.

use super::*;

/// At most this many unwatchable folders are remembered (and each warned
/// about once); beyond that they are tried at rescans without a warning.
pub(super) const UNWATCHABLE_MAX: usize = 10_000;

/// A file a scan found quiet enough to be ready: path, watch, relative
/// path, version and rule.
pub(super) type Scanned = (PathBuf, usize, PathBuf, FileVersion, Rule);

impl Watch {
    /// Files seen being written whose close never came, and that had no
    /// news for a long time (at least 10 minutes), are judged as files of
    /// unknown history from now on: under the weak rule a close can go
    /// unseen (a file linked in from elsewhere, an O_TMPFILE made visible,
    /// writes through another hard link), and waiting for it would keep
    /// the file forever.
    pub(super) fn unstick(&self, st: &mut State, now: Instant) {
        for (path, p) in st.waiting.iter_mut() {
            let settle = self.watches[p.watch].settle;
            let stall = self
                .rescan_interval
                .max(weak_scan_quiet(settle).saturating_mul(10));
            if p.writers == Writers::Writing && now.duration_since(p.stable_since) >= stall {
                tracing::warn!(path = ?path, quiet_for = ?stall, "seen being written, but no close came; judged as a file of unknown history from now on (it will be sent but not deleted or moved)");
                p.writers = Writers::Unclosed;
                // Judged on quiet time from now on.
                let at = p.earliest(settle);
                st.due.at(path, p, at);
            }
        }
    }

    /// For a path that is no longer a regular file: if the agent handed it
    /// back, it holds a record of it, and this candidate (with no version)
    /// has it closed.
    pub(super) fn gone(&self, path: &Path, p: &Pending) -> Option<Candidate> {
        let (watch, rel) = self.locate(path).filter(|_| p.requeued)?;
        Some(Candidate {
            watch,
            path: path.to_path_buf(),
            rel,
            version: None,
            writers: p.writers,
            rule: Rule::Weak,
        })
    }

    /// A file handed back by the agent. News the watcher had of it since
    /// the hand-over is newer than what the agent knew, and wins: a file
    /// the agent was refused that changed meanwhile (a chmod on its way)
    /// does not wait out the refusal's backoff.
    pub(super) fn requeued(&self, rq: Requeue, st: &mut State) {
        let Some((watch, _)) = self.locate(&rq.path) else {
            return;
        };
        let p = st
            .waiting
            .entry(rq.path.clone())
            .or_insert_with(|| Pending::new(watch, rq.writers, Instant::now()));
        if !(rq.refused && p.news) {
            p.not_before = p.not_before.max(rq.not_before);
            p.refused = rq.refused;
        }
        p.requeued = true;
        let at = p.earliest(self.watches[watch].settle);
        st.due.at(&rq.path, p, at);
    }

    /// Takes `first` and what else the scan has found so far, up to
    /// [`SCAN_READY_HIGH`] files waiting in `ready`. Scanned files untouched
    /// long enough for their rule skip the wait: they are ready at once
    /// (under the weak rule unless `/proc` shows a writer).
    pub(super) fn take_scanned(&self, first: Found, st: &mut State) {
        let mut settled = Vec::new();
        let mut roots = RootHandles::new(&self.watches);
        self.found(first, st, &mut settled, &mut roots);
        while st.ready.len() + settled.len() < SCAN_READY_HIGH {
            let Some(rx) = st.scans.current.as_mut() else {
                break;
            };
            match rx.try_recv() {
                Ok(found) => self.found(found, st, &mut settled, &mut roots),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    st.scans.finished();
                    break;
                }
            }
        }
        if settled.is_empty() {
            return;
        }
        let writers = settled
            .iter()
            .any(|s| s.4 == Rule::Weak)
            .then(open_for_writing)
            .unwrap_or_default();
        let now = Instant::now();
        for (path, watch, rel, v, rule) in settled {
            if rule == Rule::Weak && writers.contains(&(v.dev, v.ino)) {
                let mut p = Pending::new(watch, Writers::Unknown, now);
                p.last = Some(v);
                let at = p.earliest(self.watches[watch].settle);
                st.due.at(&path, &mut p, at);
                st.waiting.insert(path, p);
            } else {
                st.make_ready(Candidate {
                    watch,
                    path,
                    rel,
                    version: Some(v),
                    writers: Writers::Unknown,
                    rule,
                });
            }
        }
    }

    /// What a scan found: a folder to watch, one it cannot read, or a file
    /// (of unknown history).
    pub(super) fn found(
        &self,
        found: Found,
        st: &mut State,
        settled: &mut Vec<Scanned>,
        roots: &mut RootHandles,
    ) {
        let path = match found {
            Found::File(path) => path,
            Found::Unreadable(u) => return self.unreadable(st, u),
            Found::Listed(folder) => {
                st.unwatchable.remove(&folder);
                return self.denied.readable(Kind::Folder, &folder);
            }
            // A folder tried again is gone, or a link now.
            Found::Gone(folder) => return self.denied.gone(&folder),
        };
        if st.waiting.contains_key(&path) || st.queued.contains(&path) {
            return;
        }
        let Some((watch, rel)) = self.locate(&path) else {
            return;
        };
        if !self.filters[watch].accepts(&rel) {
            return;
        }
        if let Ok(meta) = roots.lstat(watch, &rel)
            && meta.is_file()
        {
            let v = FileVersion::of(&meta);
            let rule = self.support.rule(&path, &meta);
            if self
                .quiet_needed(watch, rule, Writers::Unknown)
                .is_some_and(|q| untouched(&v) >= q)
            {
                settled.push((path, watch, rel, v, rule));
                return;
            }
        }
        if st.room_for(&path) {
            let mut p = Pending::new(watch, Writers::Unknown, Instant::now());
            let at = p.earliest(self.watches[watch].settle);
            st.due.at(&path, &mut p, at);
            st.waiting.insert(path, p);
        }
    }

    pub(super) fn intake(&self, item: Intake, st: &mut State) {
        match item {
            Intake::Rescan => {
                tracing::warn!(
                    "file events were lost (queue overflow); rescanning every watched folder"
                );
                // A close may have been among the lost events.
                for (path, p) in st.waiting.iter_mut() {
                    if p.writers == Writers::Writing {
                        p.writers = Writers::Unknown;
                        let at = p.earliest(self.watches[p.watch].settle);
                        st.due.at(path, p, at);
                    }
                }
                st.scans.request(self.roots());
            }
            Intake::Folder(path) => {
                if let Some((i, rel)) = self.locate(&path)
                    && !self.filters[i].skips_dir(&rel)
                {
                    // Watched now (walks wait their turn), then walked:
                    // a file made before the watch is listed, one made
                    // after has an event. Its subfolders likewise, each
                    // watched by the walk before it is listed.
                    if let Some(events) = &st.scans.events {
                        watch_now(events, &self.watches[i].path, &rel, &path);
                    }
                    st.scans.request([path]);
                }
            }
            Intake::FolderChanged(path) => {
                // Its mode, owner or ACL may let the agent in now: a
                // folder refused is walked again, files refused below it
                // are looked at again, at once.
                if self.denied.is_empty() {
                    return;
                }
                let (folders, files) = self.denied.below(&path);
                st.scans.request(folders);
                let now = Instant::now();
                for file in files {
                    if let Some(p) = st.waiting.get_mut(&file) {
                        p.refused = false;
                        p.not_before = now;
                        let at = p.earliest(self.watches[p.watch].settle);
                        st.due.at(&file, p, at);
                    }
                }
            }
            Intake::Removed(path) => {
                self.denied.gone(&path);
                // A file the agent handed back (a retry waiting out its
                // backoff) has a pending record: the agent must hear that
                // it is gone, to close it and abort its upload.
                if let Some(c) = st.waiting.remove(&path).and_then(|p| self.gone(&path, &p)) {
                    st.make_ready(c);
                }
            }
            Intake::Changed { path, change } => {
                let Some((watch, rel)) = self.locate(&path) else {
                    return;
                };
                if !self.filters[watch].accepts(&rel) || !st.room_for(&path) {
                    return;
                }
                let now = Instant::now();
                let writers = match change {
                    // A new hard link announces no writer; a new file does.
                    Change::Created => Some(
                        if files::lstat_beneath(&self.watches[watch].path, &rel)
                            .is_ok_and(|m| m.nlink() > 1)
                        {
                            Writers::Unknown
                        } else {
                            Writers::Writing
                        },
                    ),
                    Change::Written => Some(Writers::Writing),
                    Change::Closed => Some(Writers::Closed),
                    // A chmod or touch after the close is not a writer.
                    Change::Touched => None,
                };
                let p = st
                    .waiting
                    .entry(path.clone())
                    .or_insert_with(|| Pending::new(watch, Writers::Unknown, now));
                if let Some(w) = writers {
                    p.writers = w;
                }
                p.stable_since = now;
                p.news = true;
                // Waiting for permission: news of it may be that.
                if p.refused {
                    p.refused = false;
                    p.not_before = now;
                }
                let at = p.earliest(self.watches[watch].settle);
                st.due.at(&path, p, at);
            }
        }
    }

    /// A folder a walk could not read: one its permissions refused is
    /// tried again soon ([`Denied`]); any other is warned about once and
    /// tried again at every rescan.
    pub(super) fn unreadable(&self, st: &mut State, u: Unreadable) {
        // Refused, and remembered: tried again soon. (Beyond what is
        // remembered, left to the rescans like any other.)
        if u.refused && self.denied.refused(Kind::Folder, &u.path, &u.why).is_some() {
            return;
        }
        if st.unwatchable.contains(&u.path) || st.unwatchable_full {
            return;
        }
        if st.unwatchable.len() >= UNWATCHABLE_MAX {
            st.unwatchable_full = true;
            tracing::warn!(
                folders = UNWATCHABLE_MAX,
                "so many folders cannot be watched or read that no more are reported; their files are found by rescans"
            );
            return;
        }
        tracing::warn!(folder = ?u.path, error = u.why, "cannot watch or read this folder; its siblings are watched, it is tried again at every rescan");
        st.unwatchable.insert(u.path);
    }

    /// Walks again the refused folders whose next try has come, and
    /// forgets, once a minute, those nobody reported for long.
    pub(super) fn retry_denied(&self, st: &mut State) {
        let now = Instant::now();
        if st
            .denied_pruned
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            st.denied_pruned = Some(now);
            self.denied.prune(now);
        }
        let due = self.denied.folders_due(now);
        if !due.is_empty() {
            st.scans.request(due);
        }
    }
}
