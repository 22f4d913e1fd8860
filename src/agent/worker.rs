//! One file's way through the agent: opened beneath its watch as the
//! version judged finished, leased, recorded, sent (or found unchanged
//! since it was sent), handed back when it must wait.

use super::*;

/// The journal as the engine's checkpoint for one file version.
pub(super) struct JournalCheckpoint {
    journal: Arc<Journal>,
    id: i64,
    resume: Option<Resume>,
}

impl Checkpoint for JournalCheckpoint {
    fn resume(&self) -> Option<Resume> {
        self.resume.clone()
    }
    fn started(
        &self,
        upload_id: &str,
        part_size: u64,
        kind: crate::config::ChecksumKind,
    ) -> Result<(), String> {
        self.journal
            .multipart_started(self.id, upload_id, part_size, kind)
            .map_err(|e| e.to_string())
    }
    fn part_done(&self, part: &PartDone) -> Result<(), String> {
        self.journal
            .part_done(self.id, part)
            .map_err(|e| e.to_string())
    }
    fn forget(&self) -> Result<(), String> {
        self.journal
            .multipart_forgotten(self.id)
            .map_err(|e| e.to_string())
    }
    fn adopt(
        &self,
        upload_id: &str,
        part_size: u64,
        kind: crate::config::ChecksumKind,
        parts: &[PartDone],
    ) -> Result<(), String> {
        self.journal
            .multipart_adopted(self.id, upload_id, part_size, kind, parts)
            .map_err(|e| e.to_string())
    }
}

/// Counts a failed attempt under its reason.
/// Whether the open `file`, still `version`, holds the bytes whose CRC is
/// `sent`: read whole, off the runtime, in pieces of 1 MiB, until `stop`.
pub(super) async fn same_bytes(
    file: &Arc<std::fs::File>,
    version: FileVersion,
    sent: Crc,
    stop: Arc<AtomicBool>,
) -> bool {
    let file = file.clone();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Crc>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 1 << 20];
        let mut crc = Crc::empty(sent.kind);
        let mut at = 0u64;
        while at < version.size {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let want = usize::try_from((version.size - at).min(buf.len() as u64)).unwrap_or(0);
            let n = file.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Ok(None); // shorter than it was
            }
            crc = crc.then(Crc::of(sent.kind, &buf[..n]));
            at += n as u64;
        }
        // Unchanged while it was read.
        let now = FileVersion::of(&file.metadata()?);
        Ok((now == version).then_some(crc))
    })
    .await;
    match read {
        Ok(Ok(Some(crc))) => crc == sent,
        // Shorter, changed meanwhile, or stopped: sent as any new version.
        Ok(Ok(None)) => false,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the file to compare it with the object sent; it is sent again");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "comparing the file with the object sent failed; it is sent again");
            false
        }
    }
}

pub(super) fn failure(reason: &'static str) {
    ::metrics::counter!(m::FAILURES, "reason" => reason).increment(1);
}

/// The reason label of a permanent failure.
pub(super) fn permanent_reason(e: &UploadError) -> &'static str {
    match e {
        UploadError::S3 { source, .. } => match **source {
            crate::s3::S3Error::Denied { .. } => "denied",
            crate::s3::S3Error::Refused(_) => "refused",
            _ => "rejected",
        },
        UploadError::Read { .. } | UploadError::NotAFile { .. } => "unreadable",
        UploadError::TooLarge { .. } => "too_large",
        _ => "other",
    }
}

impl Ctx {
    /// A file being written in a watch with `stream = true` holds a full
    /// part: it is followed, its parts sent as they come, unless its key is
    /// refused (the finished file is then failed with the reason) or it is
    /// a batch marker.
    pub(super) fn growing(&self, g: &Growing) {
        let watch = &self.settings.watches[g.watch];
        if self.markers.is_marker(g.watch, &g.rel) {
            return;
        }
        let Ok(key) = key_for(&watch.prefix, &g.rel) else {
            return;
        };
        if self.settings.bucket.guard.check(&key).is_err() {
            return;
        }
        self.streams.start(&watch.path, &g.rel, &g.path, key);
    }

    pub(super) fn requeue(&self, path: PathBuf, after: Duration, writers: Writers) {
        self.hand_back(Requeue {
            path,
            not_before: Instant::now() + after,
            writers,
            refused: false,
        });
    }

    pub(super) fn hand_back(&self, rq: Requeue) {
        // Fails only once the watcher has stopped, at shutdown.
        if self.requeue.send(rq).is_err() {
            tracing::debug!("the watcher has stopped; a file handed back waits for the next start");
        }
    }

    /// The outcome of a journal write that nothing waits on: a failure is
    /// logged and turns `/healthz` unhealthy until a write succeeds.
    pub(super) fn noted<T>(&self, what: &str, r: Result<T, JournalError>) -> Option<T> {
        match r {
            Ok(v) => {
                self.health.journal_write(Ok(()));
                Some(v)
            }
            Err(e) => {
                tracing::error!(error = %e, "journal: cannot record {what}");
                self.health.journal_write(Err(e.to_string()));
                None
            }
        }
    }

    pub(super) async fn process(&self, cand: Candidate) {
        let path = cand.path.clone();
        let watch = &self.settings.watches[cand.watch];
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if !in_flight.insert(path.clone()) {
                // Being uploaded right now: look again once that is over.
                drop(in_flight);
                self.requeue(path, watch.settle, cand.writers);
                return;
            }
        }
        ::metrics::gauge!(m::IN_FLIGHT).increment(1.0);
        tracing::debug!(path = ?path, "taken");
        self.process_file(&cand, watch).await;
        ::metrics::gauge!(m::IN_FLIGHT).decrement(1.0);
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&path);
    }

    /// Opens the candidate beneath its watch (never through a link), as
    /// the version that was judged finished; `None` when there is nothing
    /// to send (gone, a link, not a file, changed since, or unreadable:
    /// each handled here).
    pub(super) async fn open(
        &self,
        cand: &Candidate,
        watch: &WatchSettings,
        judged: FileVersion,
    ) -> Option<Arc<std::fs::File>> {
        let path = &cand.path;
        let (root, rel) = (watch.path.clone(), cand.rel.clone());
        let opened = match tokio::task::spawn_blocking(move || files::open_beneath(&root, &rel))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(path = ?path, error = %e, "opening the file failed; will try again");
                self.requeue(path.clone(), Duration::from_secs(10), cand.writers);
                return None;
            }
        };
        let opened = match opened {
            Ok(o) => o,
            Err(OpenError::Gone) => {
                tracing::info!(path = ?path, "file disappeared before upload; dropped");
                self.denied.gone(path);
                self.forget_gone(path);
                return None;
            }
            Err(OpenError::Link) => {
                tracing::info!(path = ?path, "a symbolic link is in its path; not followed, skipped");
                self.forget_gone(path);
                return None;
            }
            Err(OpenError::NotAFile) => {
                self.forget_gone(path);
                return None;
            }
            Err(OpenError::Io(e)) if files::is_resource_shortage(&e) => {
                // Out of descriptors or memory: the file is fine, try later.
                tracing::warn!(path = ?path, error = %e, "cannot open the file now; will try again");
                self.requeue(path.clone(), Duration::from_secs(10), cand.writers);
                return None;
            }
            // Its mode is often set last (rsync --inplace, cp -a): tried
            // again soon, or as soon as news of it comes (a chmod).
            Err(OpenError::Io(e)) if denied::is_refusal(&e) => {
                let wait = self
                    .denied
                    .refused(Kind::File, path, &e.to_string())
                    .unwrap_or(denied::LAST_TRY);
                self.hand_back(Requeue {
                    path: path.clone(),
                    not_before: Instant::now() + wait,
                    writers: cand.writers,
                    refused: true,
                });
                return None;
            }
            Err(OpenError::Io(e)) => {
                let reason = format!("{path:?}: cannot read: {e}");
                if let Some((Seen::Upload { id, .. } | Seen::Touched { id, .. }, _)) =
                    self.record(cand, watch, judged).await
                {
                    self.fail(id, "unreadable", &reason);
                }
                return None;
            }
        };
        self.denied.readable(Kind::File, path);
        let version = FileVersion::of(&opened.meta);
        if version != judged {
            // Not what was judged finished (a backlog can make that gap
            // long): it is judged again, with what is known of its writers.
            tracing::debug!(path = ?path, "changed since it was judged finished; settling again");
            self.requeue(path.clone(), Duration::ZERO, Writers::Unknown);
            return None;
        }
        Some(Arc::new(opened.file))
    }

    /// Under the lease rule, the lease that guards the upload; `Err(())`
    /// when the file must wait (handed back to the watcher).
    pub(super) fn lease(
        &self,
        cand: &Candidate,
        watch: &WatchSettings,
        file: &Arc<std::fs::File>,
        dev: u64,
    ) -> Result<Option<Lease>, ()> {
        if cand.rule == Rule::Weak {
            return Ok(None);
        }
        match self.leases.take(file) {
            Take::Held(lease) => Ok(Some(lease)),
            Take::Busy => {
                tracing::debug!(path = ?cand.path, "a process has it open for writing; waiting until it is finished");
                self.requeue(cand.path.clone(), watch.settle, Writers::Writing);
                Err(())
            }
            Take::Unavailable(e) => {
                if self.support.downgrade(dev, &e) {
                    tracing::warn!(
                        watch = cand.watch,
                        folder = ?watch.path,
                        rule = %self.support.describe(cand.watch, watch.settle),
                        "a read lease was refused; the watch falls back to the weaker finished-file rule"
                    );
                }
                self.requeue(cand.path.clone(), watch.settle, cand.writers);
                Err(())
            }
        }
    }

    /// Records the version in the journal (aborting uploads it supersedes);
    /// returns what the journal knows of it and its key, once the record is
    /// committed (through the group commit, with other files' marks).
    /// `None` when the journal is unavailable (the file is handed back).
    pub(super) async fn record(
        &self,
        cand: &Candidate,
        watch: &WatchSettings,
        version: FileVersion,
    ) -> Option<(Seen, Result<String, KeyError>)> {
        // A path that cannot become a key (not UTF-8) is recorded under a
        // readable stand-in and marked failed, so status shows it.
        let key = key_for(&watch.prefix, &cand.rel);
        let recorded_key = match &key {
            Ok(k) => k.clone(),
            Err(_) => format!("{}{}", watch.prefix, cand.rel.to_string_lossy()),
        };
        let watch_name = watch.path.to_string_lossy().into_owned();
        match self
            .commits
            .observe(&watch_name, &cand.path, version, &recorded_key)
            .await
        {
            Ok((seen, stale)) => {
                self.abort_all(stale);
                Some((seen, key))
            }
            Err(e) => {
                tracing::error!(error = %e, "journal unavailable; will try again");
                self.health.journal_write(Err(e.to_string()));
                self.requeue(cand.path.clone(), Duration::from_secs(10), cand.writers);
                None
            }
        }
    }

    /// A permanent failure: recorded with its reason until the file
    /// changes or `failed_retry_after` passes.
    pub(super) fn fail(&self, id: i64, reason_label: &'static str, reason: &str) {
        failure(reason_label);
        let after = i64::try_from(self.settings.agent.failed_retry_after.as_secs());
        let retry_at = now().saturating_add(after.unwrap_or(i64::MAX));
        self.noted("a failure", self.journal.failed(id, reason, retry_at));
        tracing::error!(error = %reason, "not uploaded; marked failed (see putonly status)");
    }

    pub(super) async fn process_file(&self, cand: &Candidate, watch: &WatchSettings) {
        let path = &cand.path;
        let Some(judged) = cand.version else {
            // Handed back earlier, gone now: close its record.
            self.forget_gone(path);
            return;
        };
        let Some(file) = self.open(cand, watch, judged).await else {
            return;
        };
        // Held from here until the file is done: no writer can open it
        // without the upload being abandoned first.
        let Ok(lease) = self.lease(cand, watch, &file, judged.dev) else {
            return;
        };
        let version = judged;
        let Some((seen, key)) = self.record(cand, watch, version).await else {
            return;
        };
        // Not sent now: a stream of it (an earlier version, or one that
        // began just after it was finished) is abandoned.
        let (id, attempts, resume) = match seen {
            Seen::Done { id, keep } => {
                self.stop_stream(watch, path).await;
                if !keep {
                    self.after_upload(watch, cand, id, file, lease, version)
                        .await;
                }
                return;
            }
            Seen::Failed { .. } => {
                self.stop_stream(watch, path).await;
                return;
            }
            Seen::Upload {
                id,
                attempts,
                resume,
            } => (id, attempts, resume),
            // Only its ctime moved since the version last sent (a chmod,
            // a new hard link to it): sent again only if its bytes differ.
            // A batch's marker always goes through its gate and is sent.
            Seen::Touched { id, twin, sent } if !self.markers.is_marker(cand.watch, &cand.rel) => {
                let same = match &lease {
                    // A writer that opens it meanwhile is not held up by the
                    // read: the lease break wins, as over an upload.
                    Some(lease) => {
                        let stop = Arc::new(AtomicBool::new(false));
                        let read = same_bytes(&file, version, sent, stop.clone());
                        tokio::select! {
                            biased;
                            () = lease.broken() => {
                                stop.store(true, Ordering::Relaxed);
                                self.requeue(path.clone(), watch.settle, Writers::Writing);
                                return;
                            }
                            same = read => same,
                        }
                    }
                    None => same_bytes(&file, version, sent, Arc::default()).await,
                };
                if same
                    && (!watch.manifest || self.remember_checksum(id, sent).await)
                    && let Some(Some(keep)) = self.noted(
                        "an unchanged version",
                        self.journal.done_unchanged(id, twin),
                    )
                {
                    tracing::info!(path = ?path, "only its status changed since it was sent (a chmod, a new hard link); its bytes are the object's, not sent again");
                    self.stop_stream(watch, path).await;
                    if !keep {
                        self.after_upload(watch, cand, id, file, lease, version)
                            .await;
                    }
                    return;
                }
                (id, 0, None)
            }
            Seen::Touched { id, .. } => (id, 0, None),
        };
        tracing::debug!(path = ?path, "recorded; sending");
        let checked = key.and_then(|k| self.settings.bucket.guard.check(&k).map(|()| k));
        let key = match checked {
            Ok(k) => k,
            Err(e) => {
                self.stop_stream(watch, path).await;
                self.fail(id, "refused", &format!("{path:?}: {e}"));
                return;
            }
        };
        // A batch's marker goes after the rest of its batch, and after its
        // manifest; until then it is handed back.
        if self.markers.is_marker(cand.watch, &cand.rel)
            && !self
                .marker_may_go(cand, watch, id, &key, attempts, version)
                .await
        {
            return;
        }
        let job = Job {
            path: path.clone(),
            key: key.clone(),
            expected: Some(version),
            opened: Some(file.clone()),
        };
        let checkpoint = Arc::new(JournalCheckpoint {
            journal: self.journal.clone(),
            id,
            resume,
        });
        let started = Instant::now();
        // Parts sent while it was written are checked and completed; the
        // hand-over itself gives way to a lease break too (the stream's
        // task then abandons its upload).
        let streamed_id: Mutex<Option<String>> = Mutex::new(None);
        let upload = async {
            let streamed = match watch.stream {
                true => self.streams.take(path, version.dev, version.ino).await,
                false => None,
            };
            match streamed {
                Some(sent) => {
                    *streamed_id.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(sent.upload_id.clone());
                    self.engine
                        .finish_streamed(&job, Arc::new(|_| {}), checkpoint, sent)
                        .await
                }
                None => {
                    self.engine
                        .upload_with(&job, Arc::new(|_| {}), checkpoint)
                        .await
                }
            }
        };
        let result = match &lease {
            // A break wins over an upload that noticed the writer's bytes.
            Some(lease) => tokio::select! {
                biased;
                () = lease.broken() => None,
                r = upload => Some(r),
            },
            None => Some(upload.await),
        };
        let streamed_id = streamed_id.into_inner().unwrap_or_else(|p| p.into_inner());
        // The upload streamed is on the file's record now (adopted: it is
        // resumed, or aborted when a newer version supersedes it), or was
        // completed or aborted; if a lease break cut the finishing short
        // before it was adopted, it is aborted here.
        if let Some(upload_id) = &streamed_id
            && self.streams.release(upload_id)
            && result.is_none()
        {
            self.engine.abort_upload(&key, upload_id).await;
        }
        let Some(result) = result else {
            // The lease is already released: the writer goes on at once.
            failure("writer");
            let reason = "a process opened it for writing during its upload; abandoned";
            self.noted("an attempt", self.journal.attempt_failed(id, reason));
            tracing::info!(path = ?path, "a process opened it for writing during its upload; abandoned, it will be sent once finished");
            self.requeue(path.clone(), watch.settle, Writers::Writing);
            return;
        };
        match result {
            Ok(up) => {
                tracing::debug!(path = ?path, "sent; recording it done");
                if (watch.manifest && !self.remember_checksum(id, up.crc).await)
                    || !self.record_done(id, &up).await
                {
                    // Uploaded but not on record: it stays, and is sent
                    // again once the journal can be written (at least once).
                    tracing::error!(path = ?path, "uploaded, but the journal could not record it; it will be sent again");
                    self.requeue(path.clone(), MAX_FILE_BACKOFF, cand.writers);
                    return;
                }
                ::metrics::counter!(m::FILES_UPLOADED).increment(1);
                ::metrics::counter!(m::BYTES_UPLOADED).increment(up.size);
                ::metrics::histogram!(m::UPLOAD_SECONDS).record(started.elapsed().as_secs_f64());
                self.health.success();
                tracing::info!(
                    path = ?path,
                    key = ?up.key,
                    size = up.size,
                    parts = up.parts,
                    seconds = started.elapsed().as_secs_f64(),
                    "uploaded"
                );
                self.after_upload(watch, cand, id, file, lease, version)
                    .await;
            }
            Err(UploadError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                tracing::info!(path = ?path, "file disappeared before upload; dropped");
                self.forget_gone(path);
            }
            Err(e) if e.is_exists() => {
                // Not sent, and not a failure: the key already held an
                // object (overwrite = false). The file stays where it is:
                // its bytes are not known to be the object's.
                if !self.record_exists(id, &e.to_string()).await {
                    tracing::error!(path = ?path, "the key already holds an object, but the journal could not record it; it will be tried again");
                    self.requeue(path.clone(), MAX_FILE_BACKOFF, cand.writers);
                    return;
                }
                ::metrics::counter!(m::FILES_EXISTS).increment(1);
                self.health.success();
                tracing::info!(path = ?path, key = ?key, error = %e, "not sent: the key already holds an object, left as it is (overwrite = false); the file is kept");
            }
            Err(e @ UploadError::Changed { .. }) => {
                failure("changed");
                self.noted(
                    "an attempt",
                    self.journal.attempt_failed(id, &e.to_string()),
                );
                tracing::info!(path = ?path, "changed during upload; will send it once it settles");
                self.requeue(path.clone(), watch.settle, Writers::Writing);
            }
            Err(e) if e.is_transient() => {
                failure("transient");
                self.noted(
                    "an attempt",
                    self.journal.attempt_failed(id, &e.to_string()),
                );
                let delay = self.backoff.delay(attempts + 1);
                tracing::warn!(path = ?path, error = %e, retry_in = ?delay, "upload failed; will retry");
                self.requeue(path.clone(), delay, cand.writers);
            }
            Err(e) => self.fail(id, permanent_reason(&e), &e.to_string()),
        }
    }

    /// Stops following `path` if its watch streams (see [`Streams::stop`]).
    pub(super) async fn stop_stream(&self, watch: &WatchSettings, path: &Path) {
        if watch.stream {
            self.streams.stop(path).await;
        }
    }

    /// Aborts (best effort, in the background) multipart uploads that will
    /// never be completed.
    pub(super) fn abort_all(&self, stale: Vec<(String, String)>) {
        for (old_key, upload_id) in stale {
            let bucket = self.bucket.clone();
            tokio::spawn(async move { bucket.abort_multipart(&old_key, &upload_id).await });
        }
    }

    /// A file that is gone stops counting as work in the journal.
    pub(super) fn forget_gone(&self, path: &Path) {
        self.forget_gone_through(path, i64::MAX);
    }

    /// [`Ctx::forget_gone`], for the records of `path` up to record `upto`.
    pub(super) fn forget_gone_through(&self, path: &Path, upto: i64) {
        self.after_failures().remove(path);
        self.denied.gone(path);
        match self.journal.gone_through(path, upto) {
            Ok(stale) => self.abort_all(stale),
            Err(e) => {
                tracing::warn!(path = ?path, error = %e, "journal: cannot record that a file is gone")
            }
        }
    }
}
