//! Looking at the files that wait: each judged finished or not by its
//! watch's rule (quiet for `settle`; under the weak rule a close, and for
//! a file of unknown history a longer quiet and `/proc`), at the moment it
//! may be, and the agent told of files still growing (`stream = true`).

use super::*;

/// At most one look through /proc for writers this often (see `judge`).
pub(super) const PROC_SCAN_GAP: Duration = Duration::from_millis(50);

/// How long ago the file last changed, content (mtime) or status (ctime);
/// zero if in the future.
pub(super) fn untouched(v: &FileVersion) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    Duration::from_nanos(u64::try_from(now.saturating_sub(v.changed_ns())).unwrap_or(0))
}

impl Watch {
    /// After a look that found `path` not finished: if its watch streams
    /// and it holds a full part, the agent is told (again after
    /// [`GROWING_AGAIN`]).
    pub(super) fn tell_growing(
        &self,
        path: &Path,
        p: &mut Pending,
        verdict: &Verdict,
        now: Instant,
    ) {
        let Some((tx, from_size)) = &self.growing else {
            return;
        };
        if !matches!(verdict, Verdict::Wait(_))
            || !self.watches[p.watch].stream
            || p.last.is_none_or(|v| v.size < *from_size)
            || p.growing_told.is_some_and(|t| now < t + GROWING_AGAIN)
        {
            return;
        }
        let Some((watch, rel)) = self.locate(path) else {
            return;
        };
        // Full: told at a later look.
        if tx
            .try_send(Growing {
                watch,
                path: path.to_path_buf(),
                rel,
            })
            .is_ok()
        {
            p.growing_told = Some(now);
        }
    }

    /// How long a file must have been quiet to be judged by `rule`, given
    /// what is known of its writers; `None`: not on quiet time at all.
    pub(super) fn quiet_needed(
        &self,
        watch: usize,
        rule: Rule,
        writers: Writers,
    ) -> Option<Duration> {
        let settle = self.watches[watch].settle;
        match (rule, writers) {
            (Rule::Lease, _) | (Rule::Weak, Writers::Closed) => Some(settle),
            (Rule::Weak, Writers::Writing) => None,
            (Rule::Weak, Writers::Unknown | Writers::Unclosed) => Some(weak_scan_quiet(settle)),
        }
    }

    /// One periodic pass: looks at every file waiting, moves those that
    /// are finished to `ready`, and asks for a look at the others when they
    /// may be finished. It catches what no look was asked for (a file
    /// waiting for room in `ready`, or for a close).
    pub(super) fn settle(&self, st: &mut State) {
        let now = Instant::now();
        let mut pass = Pass::new(
            &self.watches,
            READY_MAX.saturating_sub(st.ready.len()),
            st.proc_scanned_at,
        );
        for (path, p) in st.waiting.iter_mut() {
            if pass.full() {
                break; // the rest stay tracked and are judged at a later pass
            }
            self.look(path, p, now, &mut pass, &mut st.links, &mut st.due);
        }
        pass.end(st);
    }

    /// Looks at the files whose look is due: each file is taken at the
    /// moment it may be finished, not up to a periodic pass later.
    pub(super) fn settle_due(&self, st: &mut State) {
        let now = Instant::now();
        let mut pass = Pass::new(
            &self.watches,
            READY_MAX.saturating_sub(st.ready.len()),
            st.proc_scanned_at,
        );
        for path in st.due.take(now, &mut st.waiting) {
            if pass.full() {
                break; // the periodic pass judges the rest once there is room
            }
            let Some(p) = st.waiting.get_mut(&path) else {
                continue;
            };
            self.look(&path, p, now, &mut pass, &mut st.links, &mut st.due);
        }
        pass.end(st);
    }

    /// One look at a waiting file in a pass: judged, the agent told if it
    /// is growing (`stream = true`), and the verdict applied.
    pub(super) fn look(
        &self,
        path: &Path,
        p: &mut Pending,
        now: Instant,
        pass: &mut Pass<'_>,
        links: &mut LinkLog,
        due: &mut Due,
    ) {
        let verdict = self.judge(path, p, now, pass, links);
        self.tell_growing(path, p, &verdict, now);
        pass.apply(path, p, verdict, due);
    }

    /// Looks at one waiting file (beneath its watched folder, no link
    /// followed) and judges whether it is finished.
    pub(super) fn judge(
        &self,
        path: &Path,
        p: &mut Pending,
        now: Instant,
        pass: &mut Pass<'_>,
        links: &mut LinkLog,
    ) -> Verdict {
        let settle = self.watches[p.watch].settle;
        if p.not_before > now {
            return Verdict::Wait(Some(p.earliest(settle)));
        }
        // lstat beneath the watched folder: no symbolic link followed,
        // in the file's name or in its folders'.
        let meta = match self.lstat(path, &mut pass.roots) {
            Ok(m) if m.is_file() => m,
            Ok(m) => {
                if m.file_type().is_symlink() {
                    links.skipped(path, "symbolic link; not followed, skipped");
                }
                // A folder, FIFO, socket or device now.
                self.denied.gone(path);
                return Verdict::Drop(self.gone(path, p));
            }
            Err(OpenError::Link) => {
                links.skipped(
                    path,
                    "a symbolic link is in its path; not followed, skipped",
                );
                self.denied.gone(path);
                return Verdict::Drop(self.gone(path, p));
            }
            Err(OpenError::Gone) => {
                self.denied.gone(path);
                return Verdict::Drop(self.gone(path, p));
            }
            // Out of descriptors or memory: the file is fine, look again
            // at a later pass.
            Err(OpenError::Io(e)) if files::is_resource_shortage(&e) => {
                return Verdict::Wait(None);
            }
            // A folder of its path may not be searched yet (its mode set
            // last): looked at again soon, or when news of it comes.
            Err(OpenError::Io(e)) if denied::is_refusal(&e) => {
                let wait = self
                    .denied
                    .refused(Kind::File, path, &e.to_string())
                    .unwrap_or(denied::LAST_TRY);
                p.refused = true;
                p.not_before = now + wait;
                return Verdict::Wait(Some(now + wait));
            }
            Err(e) => {
                tracing::warn!(path = ?path, error = %e, "cannot look at file; skipped");
                return Verdict::Drop(None);
            }
        };
        // Its folders let the agent look at it now; whether it may be read
        // is the agent's open to tell (it alone says it readable).
        p.refused = false;
        let v = FileVersion::of(&meta);
        let rule = self.support.rule(path, &meta);
        let quiet = self.quiet_needed(p.watch, rule, p.writers);
        if p.last != Some(v) {
            // First look, or it changed. A file of unknown history is
            // stable since it last changed (at most `quiet` ago); any
            // other since the latest news of it, or since it last changed
            // (its ctime, which no one can set) if that is later: a change
            // whose news has not come yet. Not from the look itself, or a
            // file first looked at while being written would wait up to a
            // periodic pass more than `settle` after its close.
            let changed = now.checked_sub(untouched(&v));
            p.stable_since = match quiet {
                Some(q)
                    if p.last.is_none()
                        && matches!(p.writers, Writers::Unknown | Writers::Unclosed) =>
                {
                    now.checked_sub(untouched(&v).min(q)).unwrap_or(now)
                }
                // Changed since the last look with no news of it (a writer
                // on another host of a network filesystem, or news still
                // on its way): quiet starts now. Its timestamps may come
                // from another clock, one that runs behind.
                _ if p.last.is_some() && !p.news => now,
                // Its timestamps can only make the wait longer than the
                // news says, never shorter.
                _ => changed.map_or(p.stable_since, |c| c.max(p.stable_since)),
            };
            p.last = Some(v);
        }
        p.news = false;
        // Under the weak rule a file seen being written waits for its
        // close (or a rename), never for quiet time alone.
        let Some(quiet) = quiet else {
            return Verdict::Wait(None);
        };
        let finished_at = p.stable_since + quiet;
        if now < finished_at {
            return Verdict::Wait(Some(finished_at));
        }
        // /proc is cheap and catches the writers it can see, even of a
        // file closed or renamed in while someone else still writes.
        if rule == Rule::Weak {
            // One look through /proc serves every file due within
            // PROC_SCAN_GAP: a close every few milliseconds must not cost a
            // scan of every process each.
            if pass.writers.is_none()
                && let Some(at) = pass.proc_scanned_at
                && now < at + PROC_SCAN_GAP
            {
                return Verdict::Wait(Some(at + PROC_SCAN_GAP));
            }
            let scanned_at = &mut pass.proc_scanned_at;
            let w = pass.writers.get_or_insert_with(|| {
                *scanned_at = Some(now);
                open_for_writing()
            });
            if w.contains(&(meta.dev(), meta.ino())) {
                p.stable_since = now;
                return Verdict::Wait(Some(now + quiet));
            }
        }
        match self.locate(path) {
            Some((watch, rel)) => Verdict::Ready(Candidate {
                watch,
                path: path.to_path_buf(),
                rel,
                version: Some(v),
                writers: p.writers,
                rule,
            }),
            None => Verdict::Drop(None),
        }
    }
}
