//! The agent (`putonly run`): ties the watcher, the journal and the upload
//! engine together and keeps them running for months.
//!
//! For each finished file the watcher hands over, the agent asks the journal
//! whether that version was already sent (the journal is the only memory:
//! the bucket is never asked), uploads it through the engine while the
//! journal records the multipart progress, marks it done, and only then
//! deletes or moves it if so configured ([`crate::agent::after_upload`]). Before
//! anything is recorded it opens the file beneath its watch, never through
//! a link ([`crate::watch::files`]), checks it is still the version the watcher
//! judged finished, and, under the lease rule ([`crate::watch::writers`]), takes a
//! read lease that it holds until the file is done: a lease refused or
//! broken by a writer hands the file back to the watcher at once, the upload
//! abandoned. Transient failures (network, 5xx,
//! throttling, credentials) are retried forever with capped, jittered
//! backoff; permanent ones mark the file failed with the reason until it
//! changes or `failed_retry_after` passes. SIGTERM/SIGINT stop intake, let
//! in-flight uploads finish within `shutdown_timeout`, and leave the journal
//! consistent. A task that panics (or the watcher ending) stops the agent
//! the same way, but with an error: it never exits 0 after one. The agent
//! never reads the bucket and never deletes or moves a file whose upload is
//! not recorded as done.
//!
//! The stage holds the loop and its start (this file), one file's way
//! (`worker`), what follows an upload (`outcome`), housekeeping and
//! maintenance (`upkeep`), and the features that ride on it, each owning
//! its tables and SQL in the journal: ordered batches ([`batches`]),
//! streaming ([`stream`]), receipts ([`receipts`]), the after-upload action
//! ([`after_upload`]), with [`signals`]. `store` composes the journal's
//! transactions with them (the journal knows none), `status` what
//! `putonly status` shows.

pub mod after_upload;
pub mod batches;
pub mod receipts;
pub mod signals;
mod status;
mod store;
pub mod stream;

mod outcome;
mod upkeep;
mod worker;

use upkeep::*;
use worker::*;

pub use status::Status;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::config::Markers;
use crate::config::{AfterUpload, ConfigError, Settings, WatchSettings};
use crate::credentials::{CredentialError, CredentialSource, load_sdk_config};
use crate::ground::PartDone;
use crate::ground::checksum::Crc;
use crate::ground::keys::{KeyError, key_for};
use crate::ground::retry::Backoff;
use crate::ground::{FileVersion, Resume, now};
use crate::journal::{AgentLock, GroupCommit, Journal, JournalError, Seen};
use crate::ops::metrics::{self as m, Health};
use crate::s3::{ObjectWriter, WriteOnlyBucket};
use crate::upload::{Checkpoint, Engine, Job, UploadError};
use crate::watch::denied::{self, Denied, Kind};
use crate::watch::files::{self, OpenError};
use crate::watch::lease::{Lease, Leases, Take};
use crate::watch::writers::{Mode, Support};
use crate::watch::{Candidate, Growing, Requeue, Rule, Watch, Writers};
use after_upload::Outcome;
use batches::Gate;
use signals::{recv, signal, take_stop_signals};
use stream::Streams;

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
    #[error("cannot watch for broken read leases (SIGIO handler): {0}")]
    Leases(std::io::Error),
    #[error(
        "{task} stopped: {detail}. This is a bug in putonly; the agent stopped (in-flight uploads resume from the journal at the next start). Please report it with the log"
    )]
    TaskFailed { task: &'static str, detail: String },
}

/// Debug builds only, for the tests of what a panicked task does to the
/// agent: panics when PUTONLY_DEBUG_PANIC names `task`. Release builds
/// have no such variable.
#[cfg(debug_assertions)]
fn debug_panic(task: &str) {
    if std::env::var("PUTONLY_DEBUG_PANIC").is_ok_and(|v| v == task) {
        panic!("PUTONLY_DEBUG_PANIC={task}");
    }
}

#[cfg(not(debug_assertions))]
fn debug_panic(_task: &str) {}

/// What a background task that should run until shutdown ended with.
fn task_ended(task: &'static str, joined: Result<(), tokio::task::JoinError>) -> AgentError {
    let detail = match joined {
        Ok(()) => "it ended on its own".to_string(),
        Err(e) => e.to_string(),
    };
    tracing::error!(task, %detail, "a task of the agent stopped; shutting down");
    AgentError::TaskFailed { task, detail }
}

/// The longest pause between two attempts at a file after transient failures.
const MAX_FILE_BACKOFF: Duration = Duration::from_secs(300);

/// How soon a batch marker whose batch is not done yet is looked at again.
const MARKER_RECHECK: Duration = Duration::from_secs(1);

struct Ctx {
    settings: Settings,
    journal: Arc<Journal>,
    /// Done marks and claims, committed together (group commit).
    commits: GroupCommit,
    bucket: Arc<WriteOnlyBucket>,
    engine: Engine<WriteOnlyBucket>,
    requeue: mpsc::UnboundedSender<Requeue>,
    in_flight: Mutex<HashSet<PathBuf>>,
    backoff: Backoff,
    health: Arc<Health>,
    leases: Leases,
    support: Arc<Support>,
    /// Files whose after-upload action failed, and when to try again.
    after_failures: Mutex<std::collections::HashMap<PathBuf, (Instant, u32)>>,
    /// Journal records whose after-upload action runs now.
    claims_running: Mutex<HashSet<i64>>,
    /// Which files are batch markers, per watch.
    markers: Arc<Markers>,
    /// Files being written whose parts go out already (`stream = true`).
    streams: Arc<Streams<WriteOnlyBucket>>,
    /// Folders and files the agent's user may not read yet.
    denied: Arc<Denied>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(mut settings: Settings) -> Result<(), AgentError> {
    // Signals first: a SIGTERM during start-up is a clean stop too.
    let mut term = signal(tokio::signal::unix::SignalKind::terminate());
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt());
    let mut hup = signal(tokio::signal::unix::SignalKind::hangup());
    take_stop_signals();
    let state = settings.require_agent()?.clone();
    // One agent per state folder: held until the process ends.
    let _lock = AgentLock::take(&state.dir)?;
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
            if let Some(warning) = ms.exposure() {
                tracing::warn!("{warning}");
            }
            Some(server)
        }
        None => None,
    };
    tracing::info!(journal = %state.dir.display(), watches = settings.watches.len(), "putonly agent starting");
    for warning in settings.exposed_files() {
        tracing::warn!("{warning}");
    }
    let sdk = load_sdk_config(&settings.aws).await?;
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
        &settings.upload,
    ));
    settings.upload.max_attempts = settings.upload.max_attempts.or(Some(10));
    let engine = Engine::new(bucket.clone(), settings.upload.clone());
    let streams = Arc::new(Streams::new(
        engine.clone(),
        journal.clone(),
        settings.upload.part_size,
        settings.upload.checksum,
    ));
    // Read before any stream starts; aborted in the background (each abort
    // may wait on the network: start-up does not).
    let left_over = match streams.left_over() {
        Ok(left) => left,
        Err(e) => {
            tracing::warn!(error = %e, "journal: cannot read the uploads of files that were being written");
            Vec::new()
        }
    };
    if !left_over.is_empty() {
        tracing::info!(
            uploads = left_over.len(),
            "aborting the uploads of files that were being written when the agent last stopped; those files are sent afresh once finished"
        );
        let streams = streams.clone();
        tokio::spawn(async move { streams.abort_left_over(left_over).await });
    }
    // Files in flight: as many as requests may be. The engine's budget
    // bounds their memory (bytes in flight), so small files go many at once.
    let files_at_once = settings.upload.requests_in_flight;

    // Which rule tells a finished file, per watch, and why; the SIGIO
    // handler is in place before the first lease is taken.
    recover_claims(&journal, &settings.watches, &HashSet::new(), i64::MAX);
    batches::clean_manifests(&state.dir);
    let folders: Vec<&Path> = settings.watches.iter().map(|w| w.path.as_path()).collect();
    let support = Arc::new(Support::probe(&folders));
    log_rules(&support, &settings.watches);
    let leases = Leases::start().map_err(AgentError::Leases)?;

    let (ready_tx, mut ready_rx) = mpsc::channel::<Candidate>(files_at_once * 2);
    let (requeue_tx, requeue_rx) = mpsc::unbounded_channel();
    let (growing_tx, mut growing_rx) = mpsc::channel::<Growing>(256);
    let denied = Arc::new(Denied::new());
    let watch = Watch::new(
        settings.watches.clone(),
        settings.agent.rescan_interval,
        support.clone(),
        ready_tx,
        requeue_rx,
        denied.clone(),
    )
    .telling_growing(growing_tx, streams.part_size());
    let mut watcher = tokio::spawn(async move {
        debug_panic("watcher");
        watch.run().await
    });
    let shutdown_timeout = settings.agent.shutdown_timeout;
    let retention = state.retention;
    let settings_watches = settings.watches.clone();
    let keep_receipts = state.keep_receipts;
    let ctx = Arc::new(Ctx {
        settings,
        journal: journal.clone(),
        commits: journal.group_commit(),
        bucket: bucket.clone(),
        engine,
        requeue: requeue_tx,
        in_flight: Mutex::new(HashSet::new()),
        backoff: Backoff::new(Duration::from_secs(1), MAX_FILE_BACKOFF),
        health: health.clone(),
        leases,
        support,
        after_failures: Mutex::new(std::collections::HashMap::new()),
        claims_running: Mutex::new(HashSet::new()),
        markers: Arc::new(Markers::new(&settings_watches)?),
        streams,
        denied: denied.clone(),
    });
    let mut housekeeping = tokio::spawn(housekeeping(
        journal.clone(),
        bucket.clone(),
        health,
        denied,
    ));
    let mut maintenance = tokio::spawn(maintenance(ctx.clone(), retention, keep_receipts));
    // Set when a task panicked: the agent stops as on SIGTERM, then fails.
    let mut failure: Option<AgentError> = None;

    let slots = Arc::new(Semaphore::new(files_at_once));
    let mut slot = None;
    // Part buffers kept for reuse are freed when no part used them for a
    // while: a quiet agent holds no part memory.
    let mut buffer_trim = tokio::time::interval(Duration::from_secs(30));
    buffer_trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks: JoinSet<()> = JoinSet::new();
    tracing::info!("watching; ready");
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    loop {
        tokio::select! {
            _ = recv(&mut term) => { tracing::info!("SIGTERM: stopping"); break; }
            _ = recv(&mut int) => { tracing::info!("SIGINT: stopping"); break; }
            _ = recv(&mut hup) => {
                tracing::warn!("SIGHUP: the configuration is not reloaded in place; restart the agent to apply changes (safe at any time: the journal resumes every upload of a finished file; files being streamed are sent again from their first part)");
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if joined.is_err() {
                    failure = Some(task_ended("an upload task", joined));
                    break;
                }
            }
            joined = &mut watcher => { failure = Some(task_ended("the watcher", joined)); break; }
            joined = &mut housekeeping => { failure = Some(task_ended("housekeeping", joined)); break; }
            joined = &mut maintenance => { failure = Some(task_ended("journal maintenance", joined)); break; }
            Some(growing) = growing_rx.recv() => ctx.growing(&growing),
            _ = buffer_trim.tick() => {
                let freed = ctx.engine.release_idle_buffers(Duration::from_secs(30));
                if freed > 0 {
                    tracing::debug!(freed, "idle part buffers freed");
                }
            }
            // A slot first, then a candidate for it; waiting for either
            // leaves every other branch (signals, a task that ended) live.
            permit = slots.clone().acquire_owned(), if slot.is_none() => {
                let Ok(permit) = permit else { break };
                slot = Some(permit);
            }
            cand = ready_rx.recv(), if slot.is_some() => {
                let Some(cand) = cand else {
                    // Only the watcher's end closes the queue.
                    failure = Some(task_ended("the watcher", (&mut watcher).await));
                    break;
                };
                let permit = slot.take();
                let ctx = ctx.clone();
                // Boxed: the file's future is large (the whole upload, the
                // SDK's included), and a task's future is copied whole
                // when spawned and at each change of its stage; a box is
                // copied once.
                let file = Box::pin(async move { ctx.process(cand).await });
                tasks.spawn(async move {
                    let _permit = permit;
                    debug_panic("upload");
                    file.await;
                });
            }
        }
    }

    // Stop intake, then give in-flight uploads their deadline.
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    watcher.abort();
    // No part of a file being written is started from now on.
    ctx.streams.stop_all();
    if let Some(server) = metrics_server {
        server.abort();
    }
    housekeeping.abort();
    maintenance.abort();
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
    let group = ctx.commits.stats();
    tracing::debug!(
        marks = group.marks.load(std::sync::atomic::Ordering::Relaxed),
        transactions = group
            .transactions
            .load(std::sync::atomic::Ordering::Relaxed),
        "journal group commit"
    );
    if let Err(e) = journal.set_meta("agent_stopped_at", &now().to_string()) {
        tracing::warn!(error = %e, "journal: cannot record the stop");
    }
    // Nothing is tried again while the agent is stopped: status lists
    // nothing as waiting for permission (the next start finds it anew).
    let cleared =
        serde_json::to_string(&crate::watch::denied::Summary::default()).unwrap_or_default();
    if let Err(e) = journal.set_meta(crate::watch::denied::Summary::META, &cleared) {
        tracing::warn!(error = %e, "journal: cannot clear the unreadable paths");
    }
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// Logs, per watch, which rule tells a finished file and why: a warning
/// where it is the weaker one; and a warning where the kernel does not stop
/// producers from hard-linking files they cannot read (or it cannot tell).
fn log_rules(support: &Support, watches: &[WatchSettings]) {
    for (i, w) in watches.iter().enumerate() {
        let rule = support.describe(i, w.settle);
        if support.mode(i).0 == Mode::AnyFile {
            tracing::info!(watch = i, folder = ?w.path, %rule, "finished-file rule");
        } else {
            tracing::warn!(watch = i, folder = ?w.path, %rule, "finished-file rule");
        }
    }
    if let Err(warning) = files::hardlinks_verdict() {
        tracing::warn!("{warning}");
    }
    for w in watches {
        let to = match &w.after_upload {
            crate::config::AfterUpload::Move { to } => Some(to.as_path()),
            _ => None,
        };
        for path in std::iter::once(w.path.as_path()).chain(to) {
            if let Some(warning) = files::swappable_by_others(path) {
                tracing::warn!("{warning}");
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn only_no_such_file_on_its_own_filesystem_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        let file = dir.path().join("f");
        let watches = [crate::config::WatchSettings {
            path: dir.path().to_path_buf(),
            prefix: "foo/".into(),
            include: vec![],
            exclude: vec![],
            settle: Duration::from_millis(100),
            after_upload: crate::config::AfterUpload::Keep,
            marker: vec![],
            manifest: false,
            stream: false,
        }];
        // The same answers beneath a watch (no link followed) and, for a
        // path in no watch, by path.
        for w in [&watches[..], &[]] {
            let gone = |p: &Path, d: u64| is_gone(p, d, w);
            std::fs::write(&file, b"x").unwrap();
            assert!(!gone(&file, dev), "there");
            std::fs::remove_file(&file).unwrap();
            assert!(gone(&file, dev), "deleted");
            assert!(
                gone(&dir.path().join("sub/deeper/f"), dev),
                "its folder too"
            );
            // A share not mounted: the folder that exists is another filesystem.
            assert!(!gone(&file, dev.wrapping_add(1)), "not mounted");
            // Not "no such file": a file where a folder should be.
            std::fs::write(dir.path().join("plain"), b"x").unwrap();
            assert!(!gone(&dir.path().join("plain/f"), dev));
        }
        // still_there keeps a record when it cannot tell.
        let v = FileVersion {
            dev: dev.wrapping_add(1),
            ino: 1,
            size: 1,
            mtime_ns: 1,
            ctime_ns: 1,
        };
        assert!(still_there(&file, v, &watches), "cannot tell: kept");
        // A path through a folder that is now a link names no file of the
        // tree, whatever the link points to.
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::fs::write(dir.path().join("real/f"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let real = FileVersion::of(&std::fs::metadata(dir.path().join("real/f")).unwrap());
        assert!(still_there(&dir.path().join("real/f"), real, &watches));
        assert!(!still_there(&dir.path().join("link/f"), real, &watches));
        assert_eq!(
            no_longer_work(&dir.path().join("link/f"), dev, &watches),
            Some("a symbolic link is in its path now")
        );
    }
}
