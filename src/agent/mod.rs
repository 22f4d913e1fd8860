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

pub mod after_upload;
pub mod batches;
pub mod receipts;
pub mod signals;
mod status;
mod store;
pub mod stream;

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

/// Heartbeat (journal and systemd watchdog), credential expiry, gauges and
/// health. Nothing here may take long: the watchdog ping depends on it.
async fn housekeeping(
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
async fn maintenance(ctx: Arc<Ctx>, retention: Duration, keep_receipts: Duration) {
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
async fn prune_receipts(journal: &Arc<Journal>, keep: Duration) {
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
fn is_gone(path: &Path, dev: u64, watches: &[WatchSettings]) -> bool {
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
fn lstat_in_watch(path: &Path, watches: &[WatchSettings]) -> Result<std::fs::Metadata, OpenError> {
    let (root, rel) = in_watch(path, watches).ok_or(OpenError::Link)?;
    files::lstat_beneath(root, rel)
}

/// The watched folder holding `path` (below it), and the path relative to it.
fn in_watch<'a>(path: &'a Path, watches: &'a [WatchSettings]) -> Option<(&'a Path, &'a Path)> {
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
fn no_longer_work(path: &Path, dev: u64, watches: &[WatchSettings]) -> Option<&'static str> {
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
fn still_there(path: &Path, v: FileVersion, watches: &[WatchSettings]) -> bool {
    match lstat_in_watch(path, watches) {
        Ok(m) => m.is_file() && FileVersion::of(&m).is(&v),
        Err(OpenError::Link) => false,
        Err(_) => !is_gone(path, v.dev, watches),
    }
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

impl Ctx {
    /// A file being written in a watch with `stream = true` holds a full
    /// part: it is followed, its parts sent as they come, unless its key is
    /// refused (the finished file is then failed with the reason) or it is
    /// a batch marker.
    fn growing(&self, g: &Growing) {
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

    fn requeue(&self, path: PathBuf, after: Duration, writers: Writers) {
        self.hand_back(Requeue {
            path,
            not_before: Instant::now() + after,
            writers,
            refused: false,
        });
    }

    fn hand_back(&self, rq: Requeue) {
        // Fails only once the watcher has stopped, at shutdown.
        if self.requeue.send(rq).is_err() {
            tracing::debug!("the watcher has stopped; a file handed back waits for the next start");
        }
    }

    /// The outcome of a journal write that nothing waits on: a failure is
    /// logged and turns `/healthz` unhealthy until a write succeeds.
    fn noted<T>(&self, what: &str, r: Result<T, JournalError>) -> Option<T> {
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

    /// Records the upload done, trying a few times (a busy or briefly full
    /// disk): nothing may be deleted or moved before it is on record. With
    /// other files' marks, in one transaction; back once it is committed.
    async fn record_done(&self, id: i64, up: &crate::upload::Uploaded) -> bool {
        let proof = receipts::Proof::of(&self.settings.bucket.name, up);
        self.record_outcome("an upload done", || self.commits.done(id, &proof))
            .await
    }

    /// Records that the key already held an object, left as it is (so the
    /// file is not sent again, and kept), trying a few times as
    /// [`Ctx::record_done`] does.
    async fn record_exists(&self, id: i64, reason: &str) -> bool {
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
    async fn record_outcome<F, Fut>(&self, what: &'static str, op: F) -> bool
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
    async fn remember_checksum(&self, id: i64, crc: crate::ground::checksum::Crc) -> bool {
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
    async fn marker_may_go(
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
    fn marker_task_failed(&self, cand: &Candidate, e: &tokio::task::JoinError) -> bool {
        tracing::error!(path = ?cand.path, error = %e, "marker: a worker task failed; held, will try again");
        self.requeue(cand.path.clone(), Duration::from_secs(10), cand.writers);
        false
    }

    /// Writes and sends the manifest of a marker's complete batch, once.
    async fn send_manifest(&self, cand: &Candidate, id: i64, key: &str, attempts: u32) -> bool {
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

    async fn process(&self, cand: Candidate) {
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
    async fn open(
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
    fn lease(
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
    async fn record(
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
    fn fail(&self, id: i64, reason_label: &'static str, reason: &str) {
        failure(reason_label);
        let after = i64::try_from(self.settings.agent.failed_retry_after.as_secs());
        let retry_at = now().saturating_add(after.unwrap_or(i64::MAX));
        self.noted("a failure", self.journal.failed(id, reason, retry_at));
        tracing::error!(error = %reason, "not uploaded; marked failed (see putonly status)");
    }

    async fn process_file(&self, cand: &Candidate, watch: &WatchSettings) {
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
    async fn stop_stream(&self, watch: &WatchSettings, path: &Path) {
        if watch.stream {
            self.streams.stop(path).await;
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
        self.forget_gone_through(path, i64::MAX);
    }

    /// [`Ctx::forget_gone`], for the records of `path` up to record `upto`.
    fn forget_gone_through(&self, path: &Path, upto: i64) {
        self.after_failures().remove(path);
        self.denied.gone(path);
        match self.journal.gone_through(path, upto) {
            Ok(stale) => self.abort_all(stale),
            Err(e) => {
                tracing::warn!(path = ?path, error = %e, "journal: cannot record that a file is gone")
            }
        }
    }

    /// Deletes or moves a file whose upload is recorded as done (record
    /// `id`), if it is still the version that was uploaded (checked on the
    /// open file, and with the lease still held until the action is over).
    /// The claim is recorded first, so a crash in the middle is repaired at
    /// the next start. Off the runtime: a claim pauses briefly, a move across
    /// filesystems copies.
    async fn after_upload(
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
        if cand.rule == Rule::Weak && cand.writers == Writers::Unclosed {
            // Taken without a close its writer was seen to make: sent, but
            // never deleted or moved (the record says so from now on), in
            // case that writer is still at it.
            tracing::info!(path = ?cand.path, "uploaded; left in place for good (after_upload skipped): its writer was never seen to close it");
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

    fn running_claims(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.claims_running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn after_failures(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<PathBuf, (Instant, u32)>> {
        self.after_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Puts back, under their names, files left under a private claim name by
/// an after-upload action that did not end (a crash, or a put-back that
/// failed); the journal then decides again what to do with them. The
/// claims of actions running now (`running`) are left alone.
fn recover_claims(
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

/// Counts a failed attempt under its reason.
/// Whether the open `file`, still `version`, holds the bytes whose CRC is
/// `sent`: read whole, off the runtime, in pieces of 1 MiB, until `stop`.
async fn same_bytes(
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
