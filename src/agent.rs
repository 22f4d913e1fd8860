//! The agent (`putonly run`): ties the watcher, the journal and the upload
//! engine together and keeps them running for months.
//!
//! For each finished file the watcher hands over, the agent asks the journal
//! whether that version was already sent (the journal is the only memory:
//! the bucket is never asked), uploads it through the engine while the
//! journal records the multipart progress, marks it done, and only then
//! deletes or moves it if so configured. Transient failures (network, 5xx,
//! throttling, credentials) are retried forever with capped, jittered
//! backoff; permanent ones mark the file failed with the reason until it
//! changes or `failed_retry_after` passes. SIGTERM/SIGINT stop intake, let
//! in-flight uploads finish within `shutdown_timeout`, and leave the journal
//! consistent. The agent never reads the bucket and never deletes or moves a
//! file whose upload is not recorded as done.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::config::{AfterUpload, ConfigError, Settings, WatchSettings};
use crate::credentials::{CredentialError, CredentialSource, load_sdk_config};
use crate::journal::{FileVersion, Journal, JournalError, Resume, Seen, now};
use crate::keys::key_for;
use crate::metrics::{self as m, Health};
use crate::retry::Backoff;
use crate::s3::{ObjectWriter, PartDone, WriteOnlyBucket};
use crate::upload::{Checkpoint, Engine, Job, UploadError};
use crate::watch::{Candidate, Requeue, Watch};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("metrics.listen: {0}")]
    Metrics(String),
}

/// The longest pause between two attempts at a file after transient failures.
const MAX_FILE_BACKOFF: Duration = Duration::from_secs(300);

struct Ctx {
    settings: Settings,
    journal: Arc<Journal>,
    bucket: Arc<WriteOnlyBucket>,
    engine: Engine<WriteOnlyBucket>,
    requeue: mpsc::UnboundedSender<Requeue>,
    in_flight: Mutex<HashSet<PathBuf>>,
    backoff: Backoff,
    health: Arc<Health>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(mut settings: Settings) -> Result<(), AgentError> {
    // Signals first: a SIGTERM during start-up is a clean stop too.
    let mut term = signal(tokio::signal::unix::SignalKind::terminate());
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt());
    let mut hup = signal(tokio::signal::unix::SignalKind::hangup());
    let state = settings.require_agent()?.clone();
    let journal = Arc::new(Journal::open(&state.dir)?);
    let health = Arc::new(Health::new(
        settings
            .metrics
            .as_ref()
            .map_or(Duration::from_secs(600), |m| m.unhealthy_after),
    ));
    let metrics_server = match &settings.metrics {
        Some(ms) => {
            let handle = m::install().map_err(AgentError::Metrics)?;
            let server = m::serve(ms.listen, handle, health.clone())
                .await
                .map_err(|e| {
                    AgentError::Metrics(format!(
                        "cannot listen on {}: {e}; choose a free address and port",
                        ms.listen
                    ))
                })?;
            Some(server)
        }
        None => None,
    };
    tracing::info!(journal = %state.dir.display(), watches = settings.watches.len(), "putonly agent starting");
    let sdk = load_sdk_config(&settings.aws).await;
    let credentials = tokio::select! {
        c = start_credentials(&sdk, &settings) => c?,
        _ = recv(&mut term) => { tracing::info!("SIGTERM during start-up: stopping"); return Ok(()); }
        _ = recv(&mut int) => { tracing::info!("SIGINT during start-up: stopping"); return Ok(()); }
    };
    // The agent never gives up on a transient failure; the engine's own
    // attempts are a first line, after which the file is requeued.
    let bucket = Arc::new(WriteOnlyBucket::new(
        &sdk,
        credentials,
        &settings.bucket,
        settings.upload.request_timeout,
    ));
    settings.upload.max_attempts = settings.upload.max_attempts.or(Some(10));
    let engine = Engine::new(bucket.clone(), settings.upload.clone());
    let concurrency = settings.upload.concurrency;

    let (ready_tx, mut ready_rx) = mpsc::channel::<Candidate>(concurrency * 2);
    let (requeue_tx, requeue_rx) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(
        Watch::new(
            settings.watches.clone(),
            settings.agent.rescan_interval,
            ready_tx,
            requeue_rx,
        )
        .run(),
    );
    let shutdown_timeout = settings.agent.shutdown_timeout;
    let retention = state.retention;
    let ctx = Arc::new(Ctx {
        settings,
        journal: journal.clone(),
        bucket: bucket.clone(),
        engine,
        requeue: requeue_tx,
        in_flight: Mutex::new(HashSet::new()),
        backoff: Backoff::new(Duration::from_secs(1), MAX_FILE_BACKOFF),
        health: health.clone(),
    });
    let housekeeping = tokio::spawn(housekeeping(
        journal.clone(),
        bucket.clone(),
        retention,
        health,
    ));

    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks: JoinSet<()> = JoinSet::new();
    tracing::info!("watching; ready");
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    loop {
        tokio::select! {
            _ = recv(&mut term) => { tracing::info!("SIGTERM: stopping"); break; }
            _ = recv(&mut int) => { tracing::info!("SIGINT: stopping"); break; }
            _ = recv(&mut hup) => {
                tracing::warn!("SIGHUP: the configuration is not reloaded in place; restart the agent to apply changes (safe at any time: the journal resumes every upload)");
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "an upload task failed");
                }
            }
            permit = slots.clone().acquire_owned() => {
                let Ok(permit) = permit else { break };
                let cand = tokio::select! {
                    c = ready_rx.recv() => c,
                    _ = recv(&mut term) => { tracing::info!("SIGTERM: stopping"); break; }
                    _ = recv(&mut int) => { tracing::info!("SIGINT: stopping"); break; }
                };
                let Some(cand) = cand else { break };
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    ctx.process(cand).await;
                });
            }
        }
    }

    // Stop intake, then give in-flight uploads their deadline.
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    watcher.abort();
    if let Some(server) = metrics_server {
        server.abort();
    }
    housekeeping.abort();
    drop(ready_rx);
    let in_flight = tasks.len();
    if in_flight > 0 {
        tracing::info!(in_flight, timeout = ?shutdown_timeout, "waiting for in-flight uploads");
    }
    let drained = tokio::time::timeout(shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            unfinished = tasks.len(),
            "shutdown deadline passed; unfinished uploads resume from the journal on the next start"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    let _ = journal.set_meta("agent_stopped_at", &now().to_string());
    tracing::info!("stopped");
    Ok(())
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).ok()
}

async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Credentials at start-up: a refused role stops the agent (systemd shows
/// why); an unreachable STS is waited for.
async fn start_credentials(
    sdk: &aws_types::SdkConfig,
    settings: &Settings,
) -> Result<CredentialSource, AgentError> {
    let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut attempt = 0;
    loop {
        match CredentialSource::start(sdk, settings.role.as_ref()).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_transient() => {
                attempt += 1;
                let delay = backoff.delay(attempt);
                tracing::warn!(error = %e, retry_in = ?delay, "cannot get credentials yet");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Tells systemd (Type=notify) how the agent is doing; nothing without
/// NOTIFY_SOCKET.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// Heartbeat (journal and systemd watchdog), credential expiry, gauges and
/// health; journal pruning.
async fn housekeeping(
    journal: Arc<Journal>,
    bucket: Arc<WriteOnlyBucket>,
    retention: Duration,
    health: Arc<Health>,
) {
    // Twice per systemd watchdog period, and at least every 5 s.
    let period = sd_notify::watchdog_enabled()
        .map_or(Duration::from_secs(5), |w| {
            (w / 2).min(Duration::from_secs(5))
        })
        .max(Duration::from_millis(100));
    let mut beat = tokio::time::interval(period);
    let mut last_heartbeat = Instant::now() - Duration::from_secs(3600);
    let mut last_prune = Instant::now() - Duration::from_secs(3600);
    loop {
        beat.tick().await;
        notify_systemd(&[sd_notify::NotifyState::Watchdog]);
        let expiry = bucket
            .credentials()
            .expiry()
            .and_then(|exp| exp.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64);
        if let Some(exp) = expiry {
            ::metrics::gauge!(m::CREDENTIALS_EXPIRY).set((exp - now()) as f64);
        }
        let j = journal.clone();
        if let Ok(Ok(st)) = tokio::task::spawn_blocking(move || j.backlog()).await {
            ::metrics::gauge!(m::QUEUE_DEPTH).set(st.pending as f64);
            ::metrics::gauge!(m::FAILED_FILES).set(st.failed as f64);
            let oldest = st.oldest_pending.map_or(0, |o| (now() - o.since).max(0));
            ::metrics::gauge!(m::OLDEST_PENDING).set(oldest as f64);
            health.observe(st.pending, expiry);
        }
        if last_heartbeat.elapsed() < Duration::from_secs(10) {
            continue;
        }
        last_heartbeat = Instant::now();
        let _ = journal.set_meta("agent_heartbeat_at", &now().to_string());
        if let Some(exp) = expiry {
            let _ = journal.set_meta("credentials_expire_at", &exp.to_string());
        }
        if last_prune.elapsed() >= Duration::from_secs(3600) {
            last_prune = Instant::now();
            let before = now() - retention.as_secs() as i64;
            let j = journal.clone();
            let pruned = tokio::task::spawn_blocking(move || j.prune(before, still_there)).await;
            match pruned {
                Ok(Ok(n)) if n > 0 => tracing::info!(records = n, "pruned old journal records"),
                Ok(Err(e)) => tracing::warn!(error = %e, "pruning the journal failed"),
                _ => {}
            }
        }
    }
}

/// Whether the file version a done record names is still on disk (its record
/// must then stay, or the next scan would send it again).
fn still_there(path: &Path, v: FileVersion) -> bool {
    std::fs::metadata(path).is_ok_and(|m| FileVersion::of(&m) == v)
}

/// The journal as the engine's checkpoint for one file version.
struct JournalCheckpoint {
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
}

impl Ctx {
    fn requeue(&self, path: PathBuf, after: Duration) {
        let _ = self.requeue.send(Requeue {
            path,
            not_before: Instant::now() + after,
        });
    }

    async fn process(&self, cand: Candidate) {
        let path = cand.path.clone();
        let watch = &self.settings.watches[cand.watch];
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if !in_flight.insert(path.clone()) {
                // Being uploaded right now: look again once that is over.
                drop(in_flight);
                self.requeue(path, watch.settle);
                return;
            }
        }
        ::metrics::gauge!(m::IN_FLIGHT).increment(1.0);
        self.process_file(&cand, watch).await;
        ::metrics::gauge!(m::IN_FLIGHT).decrement(1.0);
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&path);
    }

    async fn process_file(&self, cand: &Candidate, watch: &WatchSettings) {
        let path = &cand.path;
        // lstat: a symbolic link is never followed (it could point anywhere,
        // /etc included); the engine later opens only this very inode.
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_file() => m,
            Ok(m) => {
                if m.file_type().is_symlink() {
                    tracing::info!(path = ?path, "symbolic link; not followed, skipped");
                }
                return;
            }
            Err(e) => {
                tracing::info!(path = ?path, error = %e, "file disappeared before upload; dropped");
                if e.kind() == std::io::ErrorKind::NotFound {
                    self.forget_gone(path);
                }
                return;
            }
        };
        let version = FileVersion::of(&meta);
        // A path that cannot become a key (not UTF-8) is recorded under a
        // readable stand-in and marked failed below, so status shows it.
        let key = key_for(&watch.prefix, &cand.rel);
        let recorded_key = match &key {
            Ok(k) => k.clone(),
            Err(_) => format!("{}{}", watch.prefix, cand.rel.to_string_lossy()),
        };
        let watch_name = watch.path.to_string_lossy().into_owned();
        let observed = self
            .journal
            .observe(&watch_name, path, version, &recorded_key);
        let (seen, stale) = match observed {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "journal unavailable; will try again");
                self.requeue(path.clone(), Duration::from_secs(10));
                return;
            }
        };
        self.abort_all(stale);
        let (id, attempts, resume) = match seen {
            Seen::Done => {
                self.after_upload(watch, cand, version);
                return;
            }
            Seen::Failed { .. } => return,
            Seen::Upload {
                id,
                attempts,
                resume,
            } => (id, attempts, resume),
        };
        let checked = key.and_then(|k| self.settings.bucket.guard.check(&k).map(|()| k));
        let key = match checked {
            Ok(k) => k,
            Err(e) => {
                failure("refused");
                let retry_at = now() + self.settings.agent.failed_retry_after.as_secs() as i64;
                let _ = self.journal.failed(id, &e.to_string(), retry_at);
                tracing::error!(path = ?path, error = %e, "refused; marked failed (see putonly status)");
                return;
            }
        };
        let job = Job {
            path: path.clone(),
            key: key.clone(),
            expected: Some(version),
        };
        let checkpoint = Arc::new(JournalCheckpoint {
            journal: self.journal.clone(),
            id,
            resume,
        });
        let started = Instant::now();
        match self
            .engine
            .upload_with(&job, Arc::new(|_| {}), checkpoint)
            .await
        {
            Ok(up) => {
                if let Err(e) = self.journal.done(id, &up.etag) {
                    // Uploaded but not recorded: it will be sent again (at least once).
                    tracing::error!(path = ?path, error = %e, "uploaded, but the journal could not record it");
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
                self.after_upload(watch, cand, version);
            }
            Err(UploadError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                tracing::info!(path = ?path, "file disappeared before upload; dropped");
                self.forget_gone(path);
            }
            Err(e @ UploadError::Changed { .. }) => {
                failure("changed");
                let _ = self.journal.attempt_failed(id, &e.to_string());
                tracing::info!(path = ?path, "changed during upload; will send it once it settles");
                self.requeue(path.clone(), watch.settle);
            }
            Err(e) if e.is_transient() => {
                failure("transient");
                let _ = self.journal.attempt_failed(id, &e.to_string());
                let delay = self.backoff.delay(attempts + 1);
                tracing::warn!(path = ?path, error = %e, retry_in = ?delay, "upload failed; will retry");
                self.requeue(path.clone(), delay);
            }
            Err(e) => {
                failure(permanent_reason(&e));
                let retry_at = now() + self.settings.agent.failed_retry_after.as_secs() as i64;
                let _ = self.journal.failed(id, &e.to_string(), retry_at);
                tracing::error!(path = ?path, error = %e, "upload failed for good; marked failed (see putonly status)");
            }
        }
    }

    /// Aborts (best effort, in the background) multipart uploads that will
    /// never be completed.
    fn abort_all(&self, stale: Vec<(String, String)>) {
        for (old_key, upload_id) in stale {
            let bucket = self.bucket.clone();
            tokio::spawn(async move { bucket.abort_multipart(&old_key, &upload_id).await });
        }
    }

    /// A file that is gone stops counting as work in the journal.
    fn forget_gone(&self, path: &Path) {
        match self.journal.gone(path) {
            Ok(stale) => self.abort_all(stale),
            Err(e) => {
                tracing::warn!(path = ?path, error = %e, "journal: cannot record that a file is gone")
            }
        }
    }

    /// Deletes or moves a file whose upload is recorded as done, if it is
    /// still the version that was uploaded.
    fn after_upload(&self, watch: &WatchSettings, cand: &Candidate, version: FileVersion) {
        if watch.after_upload == AfterUpload::Keep {
            return;
        }
        let unchanged = std::fs::metadata(&cand.path).is_ok_and(|m| FileVersion::of(&m) == version);
        if !unchanged {
            return; // a newer version: it gets its own upload
        }
        let result = match &watch.after_upload {
            AfterUpload::Keep => Ok(()),
            AfterUpload::Delete => std::fs::remove_file(&cand.path),
            AfterUpload::Move { to } => move_file(&cand.path, &to.join(&cand.rel)),
        };
        if let Err(e) = result {
            tracing::warn!(path = ?cand.path, error = %e, "uploaded, but the after_upload action failed");
        }
    }
}

/// Counts a failed attempt under its reason.
fn failure(reason: &'static str) {
    ::metrics::counter!(m::FAILURES, "reason" => reason).increment(1);
}

/// The reason label of a permanent failure.
fn permanent_reason(e: &UploadError) -> &'static str {
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

fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(from, to)?;
            std::fs::File::open(to)?.sync_all()?;
            std::fs::remove_file(from)
        }
        other => other,
    }
}
