//! Streaming: in a watch with `stream = true`, a file still being written
//! has its full parts sent as they are written, so that once it is finished
//! only its last part is left to send (for append-only producers: logs,
//! exports, captures).
//!
//! This module owns the multipart uploads of files that are not finished:
//! one task per growing file follows it through a descriptor of its own,
//! sends each full part once the file holds it, and keeps the upload id in
//! the journal's `streams` table, so that an upload a crash leaves behind
//! is aborted at the next start ([`Streams::left_over`], [`Streams::abort_left_over`]). It never completes
//! an upload and never decides that a file is finished: the agent does, by
//! the same rule as for any file, then takes the parts sent
//! ([`Streams::take`]) and hands them to
//! [`Engine::finish_streamed`](crate::upload::Engine::finish_streamed),
//! which reads each of them again and sends the file afresh if they are not
//! its bytes (checksum and a 128-bit hash of each part). A part on its way
//! when the file is finished arrives before the hand-over (the hand-over
//! waits up to [`STOP_WAIT`], else the task keeps the upload and abandons
//! it): no part of an upload is ever being sent by two hands. It never
//! sends a part that is not full or bytes past what the file held, never
//! starts an upload for a file it has not seen grow, and abandons (aborts)
//! an upload whose file shrank, was replaced, renamed away or removed,
//! outgrew 10,000 parts, or did not grow for [`IDLE_SENT`]: the finished
//! file is then sent the ordinary way. At most [`MAX_STREAMS`] files are
//! followed at once.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use tokio::sync::{oneshot, watch};

use crate::config::{ChecksumKind, MAX_PARTS};
use crate::ground::PartDone;
use crate::ground::now;
use crate::journal::{Journal, JournalError};
use crate::s3::ObjectWriter;
use crate::upload::{Engine, Streamed, StreamedPart};
use crate::watch::files::{self, OpenError};

/// The uploads of files being written: created before their first part is
/// sent, removed once the agent has the upload on its file's record (or it
/// was abandoned).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS streams (
    upload_id  TEXT    PRIMARY KEY,
    key        TEXT    NOT NULL,
    path       BLOB    NOT NULL,
    started_at INTEGER NOT NULL
);
";

/// How often a followed file is looked at (`fstat`, and its path checked).
pub const POLL: Duration = Duration::from_millis(250);

/// A file followed that has not grown for this long, and had nothing sent,
/// is no longer followed (the watcher asks again if it is still waiting).
const IDLE: Duration = Duration::from_secs(60);

/// A file that had parts sent and then did not grow for this long (its
/// writer idle, the file held open) has its upload abandoned: the slot and
/// the descriptor are freed, and it is sent whole once finished.
pub const IDLE_SENT: Duration = Duration::from_secs(1800);

/// How long [`Streams::take`] waits for a part on its way to arrive; past
/// it, the task keeps its upload and abandons it once the part is answered,
/// and the file is sent afresh.
pub const STOP_WAIT: Duration = Duration::from_secs(30);

/// Files followed at once, at most: each holds a descriptor and a task.
pub const MAX_STREAMS: usize = 128;

/// What a followed file's task has sent so far.
#[derive(Default)]
struct Sent {
    /// The file followed (known once opened).
    dev: u64,
    ino: u64,
    key: String,
    upload_id: Option<String>,
    parts: Vec<StreamedPart>,
}

/// Where a stopped task hands what it sent; empty until a taker waits.
type Reply = Arc<Mutex<Option<oneshot::Sender<Sent>>>>;

struct Follow {
    generation: u64,
    stop: watch::Sender<bool>,
    reply: Reply,
    handle: tokio::task::JoinHandle<()>,
}

/// Why an upload is abandoned: a label for the metric, and the words for
/// the log.
struct Why {
    label: &'static str,
    text: String,
}

fn why(label: &'static str, text: impl Into<String>) -> Why {
    Why {
        label,
        text: text.into(),
    }
}

/// How a task ended.
enum End {
    /// Stopped by [`Streams::take`]: what it sent is taken over.
    Stopped,
    /// Nothing sent, and the file is not growing (or cannot be opened).
    Quiet,
    /// The upload will never make the file's object: aborted.
    Abandon(Why),
}

/// The files followed; one per agent, shared by its tasks.
pub struct Streams<W> {
    engine: Engine<W>,
    journal: Arc<Journal>,
    part_size: u64,
    checksum: ChecksumKind,
    running: Mutex<HashMap<PathBuf, Follow>>,
    generation: std::sync::atomic::AtomicU64,
    /// When "too many files" was last said (at most once a minute).
    full_said: Mutex<Option<Instant>>,
}

impl<W: ObjectWriter + 'static> Streams<W> {
    pub fn new(
        engine: Engine<W>,
        journal: Arc<Journal>,
        part_size: u64,
        checksum: ChecksumKind,
    ) -> Self {
        Streams {
            engine,
            journal,
            part_size,
            checksum,
            running: Mutex::new(HashMap::new()),
            generation: Default::default(),
            full_said: Mutex::new(None),
        }
    }

    /// The smallest file worth following: one full part.
    pub fn part_size(&self) -> u64 {
        self.part_size
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Follow>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Files followed right now.
    pub fn count(&self) -> usize {
        self.running().len()
    }

    fn gauge(running: &HashMap<PathBuf, Follow>) {
        ::metrics::gauge!(crate::ops::metrics::STREAMS).set(running.len() as f64);
    }

    /// Follows the file `rel` beneath `root` (at `path`), to be sent as
    /// `key` (already checked against the allowed prefixes), unless it is
    /// followed already.
    pub fn start(self: &Arc<Self>, root: &Path, rel: &Path, path: &Path, key: String) {
        let mut running = self.running();
        if running.contains_key(path) {
            return;
        }
        if running.len() >= MAX_STREAMS {
            let mut said = self.full_said.lock().unwrap_or_else(|p| p.into_inner());
            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                *said = Some(Instant::now());
                tracing::warn!(
                    max = MAX_STREAMS,
                    path = ?path,
                    "too many files being written at once to stream them all; the others are sent once finished"
                );
            }
            return;
        }
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (stop, stopped) = watch::channel(false);
        let reply: Reply = Arc::default();
        let task = Task {
            streams: self.clone(),
            root: root.to_path_buf(),
            rel: rel.to_path_buf(),
            path: path.to_path_buf(),
            sent: Sent {
                key,
                ..Sent::default()
            },
            reply: reply.clone(),
            stopped,
        };
        let handle = tokio::spawn(task.run(generation));
        running.insert(
            path.to_path_buf(),
            Follow {
                generation,
                stop,
                reply,
                handle,
            },
        );
        Self::gauge(&running);
    }

    /// Stops following `path` and takes over what was sent of it, if that
    /// is the file `dev`/`ino` and any part of it went out: the agent then
    /// finishes that upload (or it is abandoned there). Whatever cannot be
    /// taken over is aborted. Dropping this future (a lease broken
    /// meanwhile) leaves the upload to its task, which abandons it.
    pub async fn take(&self, path: &Path, dev: u64, ino: u64) -> Option<Streamed> {
        let sent = self.halt(path).await?;
        let upload_id = sent.upload_id?;
        if (sent.dev, sent.ino) != (dev, ino) || sent.parts.is_empty() {
            // Another file at that path now, or nothing of it went out.
            // In the background: this future may be dropped (a lease
            // broken) before an abort would end.
            spawn_abandon(
                self.engine.clone(),
                self.journal.clone(),
                path,
                sent.key,
                upload_id,
                why("not_sent", "the finished file is not the one followed"),
            );
            return None;
        }
        Some(Streamed {
            upload_id,
            part_size: self.part_size,
            checksum: self.checksum,
            parts: sent.parts,
        })
    }

    /// Stops following `path` (the agent will not send it: done already,
    /// failed, refused), aborting its upload if one was started.
    pub async fn stop(&self, path: &Path) {
        if let Some(Sent {
            key,
            upload_id: Some(upload_id),
            ..
        }) = self.halt(path).await
        {
            self.abandon_upload(
                path,
                &key,
                &upload_id,
                &why("not_sent", "the file is not to be sent"),
            )
            .await;
        }
    }

    /// Asks every task to stop (the agent is stopping): no part is started
    /// after this; each task abandons its upload once its part on the way
    /// is answered (or the next start aborts it, from the journal).
    pub fn stop_all(&self) {
        let mut running = self.running();
        for (_, follow) in running.drain() {
            let _ = follow.stop.send(true);
        }
        Self::gauge(&running);
    }

    /// Stops the task following `path`, letting a part on its way arrive
    /// (up to [`STOP_WAIT`]), and takes what it sent. `None` when it ended
    /// on its own meanwhile, or did not stop in time: the task keeps its
    /// upload then, and abandons it.
    async fn halt(&self, path: &Path) -> Option<Sent> {
        let follow = {
            let mut running = self.running();
            let follow = running.remove(path)?;
            Self::gauge(&running);
            follow
        };
        let (tx, rx) = oneshot::channel();
        *follow.reply.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let _ = follow.stop.send(true);
        let mut handle = follow.handle;
        // Whatever the task hands over after this future is gone (dropped,
        // or past STOP_WAIT) is abandoned by the guard, not lost.
        let mut rx = Receiving {
            rx: Some(rx),
            engine: self.engine.clone(),
            journal: self.journal.clone(),
            path: path.to_path_buf(),
        };
        let waited = tokio::time::timeout(STOP_WAIT, async {
            let r = rx.rx.as_mut()?;
            tokio::select! {
                sent = &mut *r => sent.ok(),
                // Ended: what it handed over, if anything, is there now.
                _ = &mut handle => r.try_recv().ok(),
            }
        })
        .await;
        match waited {
            Ok(sent) => {
                rx.rx = None;
                sent
            }
            Err(_) => {
                // Closed: the task keeps its upload from now on, unless it
                // handed it over in the meantime.
                let sent = rx.rx.take().and_then(|mut r| {
                    r.close();
                    r.try_recv().ok()
                });
                if sent.is_none() {
                    tracing::warn!(path = ?path, wait = ?STOP_WAIT, "a part of a file being written was not answered in time; that upload is abandoned once it is, and the file sent afresh");
                }
                sent
            }
        }
    }

    /// Takes `upload_id` off the streams table; whether it was there (not
    /// adopted by its file's record, nor abandoned already).
    pub fn release(&self, upload_id: &str) -> bool {
        match self
            .journal
            .with(|c| c.execute("DELETE FROM streams WHERE upload_id = ?1", [upload_id]))
        {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::warn!(error = %e, "journal: cannot remove the record of a streamed upload (it is aborted at the next start)");
                false
            }
        }
    }

    async fn abandon_upload(&self, path: &Path, key: &str, upload_id: &str, why: &Why) {
        abandon(&self.engine, &self.journal, path, key, upload_id, why).await;
    }

    /// The uploads a previous run left unfinished while their files were
    /// being written (read before any stream starts).
    pub fn left_over(&self) -> Result<Vec<(String, String)>, JournalError> {
        self.journal.with(|c| {
            let mut st = c.prepare("SELECT upload_id, key FROM streams")?;
            let rows =
                st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
    }

    /// Aborts the uploads [`Streams::left_over`] found (their files are
    /// sent afresh once finished); best effort, in the background.
    pub async fn abort_left_over(&self, left: Vec<(String, String)>) {
        for (upload_id, key) in &left {
            tracing::info!(key = ?key, upload_id = %upload_id, "aborting an upload left while its file was being written (the file is sent afresh once finished)");
            self.engine.abort_upload(key, upload_id).await;
            if let Err(e) = forget(&self.journal, upload_id) {
                tracing::warn!(error = %e, "journal: cannot remove the record of an upload left by a previous run");
            }
        }
    }

    /// A task ended on its own: its entry goes, unless a newer one took the
    /// path meanwhile.
    fn ended(&self, path: &Path, generation: u64) {
        let mut running = self.running();
        if running
            .get(path)
            .is_some_and(|f| f.generation == generation)
        {
            running.remove(path);
            Self::gauge(&running);
        }
    }
}

/// The taker's end of a hand-over: dropped while the task may still hand
/// its upload over, it closes the channel and abandons whatever was
/// handed over already.
struct Receiving<W: ObjectWriter + 'static> {
    rx: Option<oneshot::Receiver<Sent>>,
    engine: Engine<W>,
    journal: Arc<Journal>,
    path: PathBuf,
}

impl<W: ObjectWriter + 'static> Drop for Receiving<W> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        rx.close();
        if let Ok(Sent {
            key,
            upload_id: Some(upload_id),
            ..
        }) = rx.try_recv()
        {
            spawn_abandon(
                self.engine.clone(),
                self.journal.clone(),
                &self.path,
                key,
                upload_id,
                why("stopped", "its hand-over was cut short"),
            );
        }
    }
}

/// Abandons an upload in the background (the caller may be dropped before
/// an abort ends); without a runtime (the agent ending), the next start
/// aborts it from the journal.
fn spawn_abandon<W: ObjectWriter + 'static>(
    engine: Engine<W>,
    journal: Arc<Journal>,
    path: &Path,
    key: String,
    upload_id: String,
    why: Why,
) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let path = path.to_path_buf();
    rt.spawn(async move {
        abandon(&engine, &journal, &path, &key, &upload_id, &why).await;
    });
}

/// Aborts an upload that will never be completed (best effort) and takes
/// it off the streams table.
async fn abandon<W: ObjectWriter>(
    engine: &Engine<W>,
    journal: &Journal,
    path: &Path,
    key: &str,
    upload_id: &str,
    why: &Why,
) {
    tracing::info!(path = ?path, upload_id, reason = %why.text, "the upload of a file being written is abandoned; the file is sent afresh once finished");
    ::metrics::counter!(crate::ops::metrics::STREAMS_ABANDONED, "reason" => why.label).increment(1);
    engine.abort_upload(key, upload_id).await;
    if let Err(e) = forget(journal, upload_id) {
        tracing::warn!(error = %e, "journal: cannot remove the record of a streamed upload (it is aborted at the next start)");
    }
}

fn record(journal: &Journal, upload_id: &str, key: &str, path: &Path) -> Result<(), JournalError> {
    use std::os::unix::ffi::OsStrExt;
    journal.with(|c| {
        c.execute(
            "INSERT OR REPLACE INTO streams (upload_id, key, path, started_at) VALUES (?1, ?2, ?3, ?4)",
            params![upload_id, key, path.as_os_str().as_bytes(), now()],
        )
        .map(|_| ())
    })
}

fn forget(journal: &Journal, upload_id: &str) -> Result<(), JournalError> {
    journal.with(|c| {
        c.execute("DELETE FROM streams WHERE upload_id = ?1", [upload_id])
            .map(|_| ())
    })
}

/// A file being written whose parts are being sent, as `putonly status`
/// shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Streaming {
    pub path: String,
    pub key: String,
    pub since: i64,
}

/// The files being streamed (at most 20, oldest first; none in a journal
/// from before streaming).
pub fn listed(conn: &Connection) -> rusqlite::Result<Vec<Streaming>> {
    use std::os::unix::ffi::OsStrExt;
    let present: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'streams'",
        [],
        |r| r.get(0),
    )?;
    if !present {
        return Ok(Vec::new());
    }
    let mut st =
        conn.prepare("SELECT path, key, started_at FROM streams ORDER BY started_at LIMIT 20")?;
    let rows = st.query_map([], |r| {
        let path: Vec<u8> = r.get(0)?;
        Ok(Streaming {
            path: Path::new(std::ffi::OsStr::from_bytes(&path))
                .to_string_lossy()
                .into_owned(),
            key: r.get(1)?,
            since: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// One followed file.
struct Task<W> {
    streams: Arc<Streams<W>>,
    root: PathBuf,
    rel: PathBuf,
    path: PathBuf,
    sent: Sent,
    reply: Reply,
    stopped: watch::Receiver<bool>,
}

impl<W: ObjectWriter + 'static> Task<W> {
    async fn run(mut self, generation: u64) {
        let end = self.follow().await;
        let reply = self.reply.lock().unwrap_or_else(|p| p.into_inner()).take();
        let why = match end {
            // Handed over to the agent, who finishes the upload (or not).
            End::Stopped => match reply {
                Some(tx) => match tx.send(std::mem::take(&mut self.sent)) {
                    Ok(()) => return,
                    // The taker gave up waiting or was dropped (a lease
                    // broken): this task abandons the upload.
                    Err(sent) => {
                        self.sent = sent;
                        why("stopped", "no one took it over in time")
                    }
                },
                None => why("stopped", "the agent is stopping"),
            },
            End::Quiet => {
                self.streams.ended(&self.path, generation);
                return;
            }
            End::Abandon(why) => why,
        };
        match self.sent.upload_id.take() {
            Some(id) => {
                self.streams
                    .abandon_upload(&self.path, &self.sent.key, &id, &why)
                    .await
            }
            None => tracing::debug!(path = ?self.path, reason = %why.text, "no longer followed"),
        }
        self.streams.ended(&self.path, generation);
    }

    fn stop_asked(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Waits `d`; `true` when asked to stop meanwhile.
    async fn stop_within(&mut self, d: Duration) -> bool {
        if self.stop_asked() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(d) => self.stop_asked(),
            _ = self.stopped.changed() => true,
        }
    }

    async fn follow(&mut self) -> End {
        let part_size = self.streams.part_size;
        let (root, rel) = (self.root.clone(), self.rel.clone());
        let opened = tokio::task::spawn_blocking(move || {
            let root = files::open_root(&root)?;
            let opened = files::open_beneath_at(root.as_fd(), &rel)?;
            Ok::<_, OpenError>((root, opened))
        })
        .await;
        let Ok(Ok((root, opened))) = opened else {
            return End::Quiet;
        };
        let (root, file) = (Arc::new(root), Arc::new(opened.file));
        let (dev, ino) = {
            use std::os::unix::fs::MetadataExt;
            (opened.meta.dev(), opened.meta.ino())
        };
        self.sent.dev = dev;
        self.sent.ino = ino;
        let mut size = opened.meta.len();
        let mut grew = false;
        let mut changed_at = Instant::now();
        // Bytes sent: whole parts, from the start.
        let mut sent_to: u64 = 0;
        // Since when its path cannot be looked at (an error other than
        // "gone"), if it cannot.
        let mut unreachable_since: Option<Instant> = None;
        loop {
            if self.stop_within(POLL).await {
                return End::Stopped;
            }
            let (f, root, rel) = (file.clone(), root.clone(), self.rel.clone());
            let looked = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::MetadataExt;
                let now = f.metadata().map_err(OpenError::Io)?;
                let here = files::lstat_at(root.as_fd(), &rel).map(|m| (m.dev(), m.ino()));
                Ok::<_, OpenError>((now.len(), here))
            })
            .await;
            let (now_size, here) = match looked {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => {
                    return End::Abandon(why("failed", format!("it cannot be looked at: {e}")));
                }
                Err(e) => return End::Abandon(why("failed", format!("a worker task failed: {e}"))),
            };
            match here {
                Ok(here) if here == (dev, ino) => unreachable_since = None,
                Ok(_) | Err(OpenError::Gone | OpenError::Link | OpenError::NotAFile) => {
                    return End::Abandon(why("moved", "it was renamed away, replaced or removed"));
                }
                // Out of descriptors, or a passing error: the size still
                // counts, and the path is looked at again (for `IDLE` at
                // most: a file its path cannot reach is not followed).
                Err(OpenError::Io(e)) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= IDLE {
                        return End::Abandon(why(
                            "failed",
                            format!("its path cannot be looked at: {e}"),
                        ));
                    }
                    tracing::debug!(path = ?self.path, error = %e, "cannot look at the path of a file being streamed; looking again");
                }
            }
            if now_size < sent_to {
                return End::Abandon(why(
                    "shrank",
                    format!(
                        "it became shorter ({now_size} bytes) than what was sent ({sent_to} bytes)"
                    ),
                ));
            }
            if now_size != size {
                grew = true;
                size = now_size;
                changed_at = Instant::now();
            } else if sent_to == 0 && changed_at.elapsed() >= IDLE {
                return End::Quiet;
            } else if sent_to > 0 && changed_at.elapsed() >= IDLE_SENT {
                return End::Abandon(why(
                    "idle",
                    format!(
                        "it did not grow for {}",
                        humantime::format_duration(IDLE_SENT)
                    ),
                ));
            }
            // A file not seen to grow may be finished already: no upload
            // is started for it here.
            if !grew {
                continue;
            }
            if size.div_ceil(part_size) > MAX_PARTS {
                return End::Abandon(why(
                    "too_large",
                    format!("it outgrew 10,000 parts of {part_size} bytes (part_size)"),
                ));
            }
            while sent_to + part_size <= size {
                let upload_id = match self.sent.upload_id.clone() {
                    Some(id) => id,
                    None => match self.begin().await {
                        Ok(id) => id,
                        Err(end) => return end,
                    },
                };
                if self.stop_asked() {
                    return End::Stopped;
                }
                let number = i32::try_from(sent_to / part_size + 1).unwrap_or(i32::MAX);
                // Not raced against a stop: a part is answered before the
                // hand-over, so no two hands ever send one part number.
                // The wait for memory and for `bandwidth_limit`, and the
                // read, give way to a stop (nothing is sent yet); the send
                // does not: a part is answered before the hand-over, so no
                // two hands ever send one part number.
                let engine = self.streams.engine.clone();
                let read = tokio::select! {
                    read = engine.read_streamed_part(&file, &self.path, number, sent_to, part_size) => read,
                    _ = self.stopped.changed() => return End::Stopped,
                };
                let part = match read {
                    Ok(read) => {
                        engine
                            .send_streamed_part(&self.path, &self.sent.key, &upload_id, read)
                            .await
                    }
                    Err(e) => Err(e),
                };
                match part {
                    Ok(part) => {
                        tracing::debug!(path = ?self.path, number, "part sent while the file is written");
                        ::metrics::counter!(crate::ops::metrics::STREAM_PARTS).increment(1);
                        self.sent.parts.push(part);
                        sent_to += part_size;
                    }
                    Err(e) => {
                        return End::Abandon(why(
                            "failed",
                            format!("a part could not be sent: {e}"),
                        ));
                    }
                }
                if self.stop_asked() {
                    return End::Stopped;
                }
            }
        }
    }

    /// Starts the upload and puts it on record before any part is sent.
    async fn begin(&mut self) -> Result<String, End> {
        let upload_id = self
            .streams
            .engine
            .create_upload(&self.path, &self.sent.key)
            .await
            .map_err(|e| {
                End::Abandon(why("failed", format!("its upload cannot be started: {e}")))
            })?;
        if let Err(e) = record(
            &self.streams.journal,
            &upload_id,
            &self.sent.key,
            &self.path,
        ) {
            self.streams
                .engine
                .abort_upload(&self.sent.key, &upload_id)
                .await;
            return Err(End::Abandon(why(
                "failed",
                format!("the journal cannot record its upload: {e}"),
            )));
        }
        tracing::info!(path = ?self.path, key = ?self.sent.key, upload_id = %upload_id, "streaming: the file is being written; its full parts are sent as they come");
        self.sent.upload_id = Some(upload_id.clone());
        Ok(upload_id)
    }
}

/// Makes the streams table ([`SCHEMA`]), for the agent's journal.
pub(crate) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)
}

impl Journal {
    /// Records an upload whose `parts` were sent while the file was being
    /// written as this record's, and takes it off the streams table
    /// ([`crate::agent::stream`]), in one transaction: a crash leaves it either
    /// for the next start to abort or on this record to resume, never both.
    pub fn multipart_adopted(
        &self,
        id: i64,
        upload_id: &str,
        part_size: u64,
        checksum: ChecksumKind,
        parts: &[PartDone],
    ) -> Result<(), JournalError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            crate::journal::set_upload(&tx, id, upload_id, part_size, checksum)?;
            for part in parts {
                crate::journal::insert_part(&tx, id, part)?;
            }
            tx.execute(
                "DELETE FROM streams WHERE upload_id = ?1",
                params![upload_id],
            )?;
            tx.commit()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UploadSettings;
    use crate::ground::checksum::Crc;
    use crate::s3::{PartDone, S3Error, Written};
    use bytes::Bytes;
    use std::io::Write;

    const MIB: u64 = 1024 * 1024;

    /// Holds every part at a gate until the test opens it.
    struct Gated {
        calls: Mutex<Vec<String>>,
        gate: tokio::sync::Semaphore,
    }

    impl Default for Gated {
        fn default() -> Self {
            Gated {
                calls: Mutex::default(),
                gate: tokio::sync::Semaphore::new(0),
            }
        }
    }

    impl Gated {
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
        fn saw(&self, what: &str) -> bool {
            self.calls.lock().unwrap().iter().any(|c| c == what)
        }
    }

    impl ObjectWriter for Gated {
        async fn put_object(&self, _: &str, _: Bytes, _: Crc) -> Result<Written, S3Error> {
            unreachable!("no whole object is sent here")
        }
        async fn create_multipart(&self, key: &str, _: ChecksumKind) -> Result<String, S3Error> {
            self.log(format!("create {key}"));
            Ok("up-1".into())
        }
        async fn upload_part(
            &self,
            _: &str,
            _: &str,
            number: i32,
            _: Bytes,
            crc: Crc,
        ) -> Result<PartDone, S3Error> {
            self.log(format!("part {number} sent"));
            self.gate.acquire().await.unwrap().forget();
            self.log(format!("part {number} answered"));
            Ok(PartDone {
                number,
                etag: format!("e{number}"),
                crc,
            })
        }
        async fn complete_multipart(
            &self,
            _: &str,
            _: &str,
            _: &[PartDone],
            _: Crc,
        ) -> Result<Written, S3Error> {
            unreachable!("streams never complete")
        }
        async fn abort_multipart(&self, key: &str, _: &str) {
            self.log(format!("abort {key}"));
        }
    }

    struct World {
        _dir: tempfile::TempDir,
        root: PathBuf,
        path: PathBuf,
        file: std::fs::File,
        fake: Arc<Gated>,
        journal: Arc<Journal>,
        streams: Arc<Streams<Gated>>,
    }

    /// A file of 6 MiB being written, followed, grown to 11 MiB: its first
    /// part is sent and held at the gate.
    async fn part_on_its_way() -> World {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        std::fs::create_dir_all(&root).unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let path = root.join("f");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![1u8; (6 * MIB) as usize]).unwrap();
        let fake = Arc::new(Gated::default());
        let settings = UploadSettings {
            part_size: 5 * MIB,
            ..UploadSettings::default()
        };
        let journal = Arc::new(Journal::open(&state).unwrap());
        let streams = Arc::new(Streams::new(
            Engine::new(fake.clone(), settings.clone()),
            journal.clone(),
            5 * MIB,
            settings.checksum,
        ));
        streams.start(&root, Path::new("f"), &path, "foo/f".into());
        tokio::time::sleep(POLL * 2).await;
        file.write_all(&vec![2u8; (5 * MIB) as usize]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fake.saw("part 1 sent") {
            assert!(Instant::now() < deadline, "no part sent: {:?}", fake.calls);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        World {
            _dir: dir,
            root,
            path,
            file,
            fake,
            journal,
            streams,
        }
    }

    fn rows(journal: &Journal) -> usize {
        journal.with(|c| listed(c)).unwrap().len()
    }

    fn id(path: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_part_on_its_way_is_answered_before_the_hand_over_and_kept() {
        let w = part_on_its_way().await;
        let (dev, ino) = id(&w.path);
        let streams = w.streams.clone();
        let path = w.path.clone();
        let take = tokio::spawn(async move { streams.take(&path, dev, ino).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!take.is_finished(), "the hand-over waits for the part");
        w.fake.gate.add_permits(10);
        let sent = take.await.unwrap().expect("the upload is handed over");
        assert_eq!(sent.upload_id, "up-1");
        let numbers: Vec<i32> = sent.parts.iter().map(|p| p.part.number).collect();
        assert_eq!(numbers, vec![1], "the part on its way is in, none after");
        assert!(!w.fake.saw("part 2 sent"));
        assert!(!w.fake.saw("abort foo/f"));
        // Still on the streams table until the file's record adopts it.
        assert_eq!(rows(&w.journal), 1);
        assert_eq!(w.streams.count(), 0);
        let _ = (&w.root, &w.file);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_hand_over_cut_short_leaves_the_upload_to_be_abandoned_not_lost() {
        let w = part_on_its_way().await;
        let (dev, ino) = id(&w.path);
        let streams = w.streams.clone();
        let path = w.path.clone();
        // The taker goes away (a lease broken) while the part is on its way.
        let take = tokio::spawn(async move { streams.take(&path, dev, ino).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        take.abort();
        let _ = take.await;
        w.fake.gate.add_permits(10);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(w.fake.saw("abort foo/f") && rows(&w.journal) == 0) {
            assert!(
                Instant::now() < deadline,
                "the upload was neither handed over nor abandoned: {:?}",
                w.fake.calls
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!w.fake.saw("part 2 sent"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_file_that_shrinks_below_what_was_sent_has_its_upload_abandoned() {
        let w = part_on_its_way().await;
        w.fake.gate.add_permits(10);
        w.file.set_len(MIB).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(w.fake.saw("abort foo/f") && rows(&w.journal) == 0 && w.streams.count() == 0) {
            assert!(Instant::now() < deadline, "{:?}", w.fake.calls);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (dev, ino) = id(&w.path);
        assert!(w.streams.take(&w.path, dev, ino).await.is_none());
    }
}
