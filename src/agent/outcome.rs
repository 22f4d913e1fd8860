//! What follows an upload: the record done (with its checksum for a
//! manifest), a batch's marker held until its batch is done and its
//! manifest sent, and the after-upload action (delete or move).

use super::*;

impl Ctx {
    /// Records the upload done, trying a few times (a busy or briefly full
    /// disk): nothing may be deleted or moved before it is on record. With
    /// other files' marks, in one transaction; back once it is committed.
    pub(super) async fn record_done(&self, id: i64, up: &crate::upload::Uploaded) -> bool {
        let proof = receipts::Proof::of(&self.settings.bucket.name, up);
        self.record_outcome("an upload done", || self.commits.done(id, &proof))
            .await
    }

    /// Records that the key already held an object, left as it is (so the
    /// file is not sent again, and kept), trying a few times as
    /// [`Ctx::record_done`] does.
    pub(super) async fn record_exists(&self, id: i64, reason: &str) -> bool {
        self.record_outcome("that a key already held an object", || {
            let (j, reason) = (self.journal.clone(), reason.to_string());
            async move {
                tokio::task::spawn_blocking(move || j.exists(id, &reason))
                    .await
                    .unwrap_or_else(|e| {
                        Err(JournalError::Folder {
                            path: PathBuf::new(),
                            source: std::io::Error::other(e.to_string()),
                        })
                    })
            }
        })
        .await
    }

    /// Runs the journal write `op` up to five times with a growing pause;
    /// whether it was recorded.
    pub(super) async fn record_outcome<F, Fut>(&self, what: &'static str, op: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), JournalError>>,
    {
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        for attempt in 1..=5 {
            match op().await {
                Ok(()) => {
                    self.health.journal_write(Ok(()));
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "journal: cannot record {what}");
                    self.health.journal_write(Err(e.to_string()));
                    tokio::time::sleep(backoff.delay(attempt)).await;
                }
            }
        }
        false
    }

    /// Keeps the checksum sent for record `id` (for batch manifests),
    /// before it is recorded done; `false` when the journal cannot.
    pub(super) async fn remember_checksum(
        &self,
        id: i64,
        crc: crate::ground::checksum::Crc,
    ) -> bool {
        let j = self.journal.clone();
        let r = tokio::task::spawn_blocking(move || batches::remember_checksum(&j, id, &crc)).await;
        match r {
            Ok(r) => self.noted("the checksum sent", r).is_some(),
            Err(e) => {
                tracing::error!(error = %e, "journal: recording a checksum failed");
                false
            }
        }
    }

    /// The gate of a batch marker (record `id`, key `key`): `true` once
    /// every file of its batch is done or gone and, with `manifest`, the
    /// manifest is in the bucket. Otherwise it is handed back (to look
    /// again after [`MARKER_RECHECK`]), or failed for good with the reason.
    pub(super) async fn marker_may_go(
        &self,
        cand: &Candidate,
        watch: &WatchSettings,
        id: i64,
        key: &str,
        attempts: u32,
        opened: FileVersion,
    ) -> bool {
        let path = &cand.path;
        let (j, w, markers, rel) = (
            self.journal.clone(),
            watch.clone(),
            self.markers.clone(),
            cand.rel.clone(),
        );
        let index = cand.watch;
        let checked = tokio::task::spawn_blocking(move || {
            batches::check(&j, &w, &markers, index, id, &rel, opened)
        })
        .await;
        let checked = match checked {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                failure("batch");
                self.noted(
                    "an attempt",
                    self.journal.attempt_failed(id, &e.to_string()),
                );
                let delay = self.backoff.delay(attempts + 1);
                tracing::warn!(path = ?path, error = %e, retry_in = ?delay, "marker held: its batch cannot be told");
                self.requeue(path.clone(), delay, cand.writers);
                return false;
            }
            Err(e) => return self.marker_task_failed(cand, &e),
        };
        for gone in &checked.gone {
            tracing::info!(marker = ?path, file = ?gone, "a file of the batch is gone before it was sent; the marker no longer waits for it");
        }
        for (from, to) in &checked.followed {
            tracing::info!(marker = ?path, file = ?from, now = ?to, "a file of the batch moved within the marker's folder; the marker waits for it at its new path");
        }
        match checked.gate {
            Gate::Wait { waiting, first } => {
                if let Some(files) = checked.listed {
                    tracing::info!(marker = ?path, files, waiting, "marker: batch listed; it is sent once every file of it is done");
                } else {
                    tracing::debug!(marker = ?path, waiting, first = ?first, "marker waits for its batch");
                }
                self.requeue(path.clone(), MARKER_RECHECK, cand.writers);
                return false;
            }
            Gate::Moved => {
                // Its folder moved or it was replaced: judged again (a
                // marker gone has its record closed by the watcher's news).
                tracing::info!(marker = ?path, "the marker moved or changed while its batch was looked at; judged again");
                self.requeue(path.clone(), watch.settle, Writers::Unknown);
                return false;
            }
            Gate::Go => {
                tracing::info!(marker = ?path, "every file of the marker's batch is done; sending the marker");
            }
        }
        !watch.manifest || self.send_manifest(cand, id, key, attempts).await
    }

    /// A worker task of a marker's gate or manifest failed: the marker is
    /// held and looked at again later. Returns `false` (it does not go).
    pub(super) fn marker_task_failed(&self, cand: &Candidate, e: &tokio::task::JoinError) -> bool {
        tracing::error!(path = ?cand.path, error = %e, "marker: a worker task failed; held, will try again");
        self.requeue(cand.path.clone(), Duration::from_secs(10), cand.writers);
        false
    }

    /// Writes and sends the manifest of a marker's complete batch, once.
    pub(super) async fn send_manifest(
        &self,
        cand: &Candidate,
        id: i64,
        key: &str,
        attempts: u32,
    ) -> bool {
        let path = &cand.path;
        let j = self.journal.clone();
        match tokio::task::spawn_blocking(move || batches::manifest_sent(&j, id)).await {
            Ok(Ok(true)) => return true,
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                self.noted("reading a batch", Err::<(), _>(e));
                self.requeue(path.clone(), Duration::from_secs(10), cand.writers);
                return false;
            }
            Err(e) => return self.marker_task_failed(cand, &e),
        }
        let manifest_key = batches::manifest_key(key);
        if let Err(e) = self.settings.bucket.guard.check(&manifest_key) {
            self.fail(id, "refused", &format!("{path:?}: its manifest: {e}"));
            return false;
        }
        match batches::batch_has_key(&self.journal, id, &manifest_key) {
            Ok(false) => {}
            Ok(true) => {
                let reason = format!(
                    "{path:?}: a file of its batch is sent as {manifest_key:?}, the key of the manifest; rename that file, or set manifest = false"
                );
                self.fail(id, "refused", &reason);
                return false;
            }
            Err(e) => {
                self.noted("reading a batch", Err::<(), _>(e));
                self.requeue(path.clone(), Duration::from_secs(10), cand.writers);
                return false;
            }
        }
        let Some(state) = self.settings.state.as_ref().map(|s| s.dir.clone()) else {
            // `run` refuses a configuration without one.
            tracing::error!(path = ?path, "state.dir is not set; the marker's manifest has nowhere to be written");
            return false;
        };
        let (j, marker_key, marker) = (self.journal.clone(), key.to_string(), path.clone());
        let written = tokio::task::spawn_blocking(move || {
            batches::write_manifest(&j, id, &marker_key, &marker, &state)
        })
        .await;
        let file = match written {
            Ok(Ok(file)) => file,
            Ok(Err(e)) => {
                failure("manifest");
                self.noted(
                    "an attempt",
                    self.journal.attempt_failed(id, &e.to_string()),
                );
                tracing::warn!(path = ?path, error = %e, "marker held: its manifest cannot be written");
                self.requeue(path.clone(), self.backoff.delay(attempts + 1), cand.writers);
                return false;
            }
            Err(e) => return self.marker_task_failed(cand, &e),
        };
        let job = Job {
            path: file.clone(),
            key: manifest_key.clone(),
            expected: None,
            opened: None,
        };
        let sent = self.engine.upload(&job, Arc::new(|_| {})).await;
        if let Err(e) = std::fs::remove_file(&file) {
            tracing::warn!(file = ?file, error = %e, "cannot remove a manifest written for upload");
        }
        match sent {
            Ok(up) => {
                tracing::info!(marker = ?path, key = ?up.key, size = up.size, "manifest sent");
                if self
                    .noted(
                        "a manifest sent",
                        batches::record_manifest_sent(&self.journal, id),
                    )
                    .is_none()
                {
                    // Sent again next time (the same bytes): at least once.
                    self.requeue(path.clone(), Duration::from_secs(10), cand.writers);
                    return false;
                }
                true
            }
            Err(e) if e.is_transient() => {
                failure("transient");
                let reason = format!("its manifest: {e}");
                self.noted("an attempt", self.journal.attempt_failed(id, &reason));
                let delay = self.backoff.delay(attempts + 1);
                tracing::warn!(path = ?path, error = %e, retry_in = ?delay, "manifest not sent; will retry");
                self.requeue(path.clone(), delay, cand.writers);
                false
            }
            Err(e) => {
                self.fail(
                    id,
                    permanent_reason(&e),
                    &format!("{path:?}: its manifest: {e}"),
                );
                false
            }
        }
    }

    /// Deletes or moves a file whose upload is recorded as done (record
    /// `id`), if it is still the version that was uploaded (checked on the
    /// open file, and with the lease still held until the action is over).
    /// The claim is recorded first, so a crash in the middle is repaired at
    /// the next start. Off the runtime: a claim pauses briefly, a move across
    /// filesystems copies.
    pub(super) async fn after_upload(
        &self,
        watch: &WatchSettings,
        cand: &Candidate,
        id: i64,
        file: Arc<std::fs::File>,
        lease: Option<Lease>,
        version: FileVersion,
    ) {
        let action = watch.after_upload.clone();
        if action == AfterUpload::Keep {
            return;
        }
        // Taken without a close its writer was seen to make, or of unknown
        // history while /proc cannot show every writer (the agent's user
        // lacks CAP_SYS_PTRACE, or runs in its own PID namespace): sent,
        // but never deleted or moved (the record says so from now on), in
        // case a writer is still at it.
        let unseen = match (cand.rule, cand.writers) {
            (Rule::Weak, Writers::Unclosed) => Some("its writer was never seen to close it"),
            (Rule::Weak, Writers::Unknown) if !self.support.proc_sees_all => Some(
                "of unknown history (found by a scan), and /proc cannot show every writer from here; with CAP_LEASE on a local filesystem (or CAP_SYS_PTRACE in the host's PID namespace) such files are deleted or moved",
            ),
            _ => None,
        };
        if let Some(why) = unseen {
            tracing::info!(path = ?cand.path, why, "uploaded; left in place for good (after_upload skipped)");
            let j = self.journal.clone();
            let kept = tokio::task::spawn_blocking(move || j.keep_file(id)).await;
            if let Ok(r) = kept {
                self.noted("that a file stays", r);
            }
            return;
        }
        if self
            .after_failures()
            .get(&cand.path)
            .is_some_and(|(next, _)| Instant::now() < *next)
        {
            return; // failed lately: tried again after its backoff
        }
        let claim = after_upload::claim_name(id);
        // Recorded (with a full sync, shared with the other marks queued
        // meanwhile) before the rename; off the runtime. Running from
        // before its claim is committed, so that the hourly recovery never
        // takes it for one a crash left.
        self.running_claims().insert(id);
        if let Err(e) = self.commits.claim(id, &claim).await {
            self.running_claims().remove(&id);
            tracing::warn!(path = ?cand.path, error = %e, "uploaded; the after_upload action is left for later: the journal cannot record it");
            self.health.journal_write(Err(e.to_string()));
            return;
        }
        let (root, rel) = (watch.path.clone(), cand.rel.clone());
        let acted = tokio::task::spawn_blocking(move || {
            let u = after_upload::Uploaded {
                root: &root,
                rel: &rel,
                file: &file,
                version,
                lease: lease.as_ref(),
                claim: &claim,
            };
            match &action {
                AfterUpload::Keep => after_upload::Report {
                    result: Ok(Outcome::Done),
                    restored_ctime: None,
                    claim_left: false,
                },
                AfterUpload::Delete => after_upload::delete(&u),
                AfterUpload::Move { to } => after_upload::move_into(&u, to),
            }
        })
        .await;
        self.running_claims().remove(&id);
        let report = acted.unwrap_or_else(|e| after_upload::Report {
            result: Err(std::io::Error::other(format!("worker task failed: {e}"))),
            restored_ctime: None,
            claim_left: true,
        });
        // Renamed away and back unchanged: only its ctime moved, and the
        // record follows so it is not sent again for that.
        let claim_left = report.claim_left;
        let j = self.journal.clone();
        let ctime = report.restored_ctime;
        let recorded = tokio::task::spawn_blocking(move || {
            if let Some(ctime) = ctime {
                j.refresh_ctime(id, ctime)?;
            }
            // The claim stays on record while the file is still under its
            // private name: maintenance puts it back later.
            if !claim_left {
                j.unclaim(id)?;
            }
            Ok::<(), JournalError>(())
        })
        .await;
        if let Ok(r) = recorded {
            self.noted("the end of an after_upload action", r);
        }
        match report.result {
            Ok(outcome) => {
                self.after_failures().remove(&cand.path);
                if let Outcome::Kept(why) = outcome {
                    tracing::info!(path = ?cand.path, reason = %why, "uploaded; left in place");
                }
            }
            Err(e) => {
                let mut failures = self.after_failures();
                let now = Instant::now();
                // Old entries (files since deleted or renamed) go.
                failures.retain(|_, (next, _)| *next + Duration::from_secs(86_400) > now);
                let n = failures
                    .get(&cand.path)
                    .map_or(1, |(_, n)| n.saturating_add(1));
                let wait = Duration::from_secs(60)
                    .saturating_mul(1 << (n - 1).min(6))
                    .min(Duration::from_secs(3600));
                failures.insert(cand.path.clone(), (now + wait, n));
                tracing::warn!(path = ?cand.path, error = %e, retry_in = ?wait, claim_left, "uploaded, but the after_upload action failed; the file stays");
            }
        }
    }

    pub(super) fn running_claims(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.claims_running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn after_failures(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<PathBuf, (Instant, u32)>> {
        self.after_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}
