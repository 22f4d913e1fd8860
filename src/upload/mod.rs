//! The upload engine: turns one local file into one object, by a single
//! PutObject or by a multipart upload streamed from disk.
//!
//! It owns part sizing, parallelism, pacing, retries and the "file changed
//! under us" check. Memory is bounded by design: a body's buffer exists only
//! while its request holds its bytes of the [`Budget`] (`part_size ×
//! concurrency` bytes, and `requests_in_flight` requests), so peak memory
//! is about `part_size × concurrency` whatever the file sizes, and many
//! small files go at once within it. Every part and the
//! whole object carry a CRC the server verifies. The engine never talks to
//! S3 except through an [`ObjectWriter`], never decides which files to send
//! (its callers do), and never completes an upload whose file changed while
//! it was being read. The stage holds the engine (this file), the memory
//! [`budget`] and the bandwidth [`throttle`]; it names the ground, the
//! settings, the metrics and the bucket, never the watcher or the journal
//! (a [`Checkpoint`] is how a caller keeps its progress).

pub mod budget;
pub mod throttle;

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use crate::config::{
    ChecksumKind, MAX_OBJECT_SIZE, MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, UploadSettings,
};
use crate::ground::checksum::Crc;
use crate::ground::retry::Backoff;
pub use crate::ground::{FileVersion, UNKNOWN_CTIME};
use crate::ground::{PartDone, Resume};
use crate::s3::{ObjectWriter, S3Error};
use budget::{Budget, Buffer};
use throttle::Throttle;

/// One file to send, and where.
#[derive(Debug, Clone)]
pub struct Job {
    pub path: PathBuf,
    pub key: String,
    /// The version the caller recorded; if the file opened is another one,
    /// the upload fails as changed (so a record never names other bytes).
    pub expected: Option<FileVersion>,
    /// The file, already opened for reading by the caller (the agent opens
    /// it beneath its watch and holds a lease on it); without it the engine
    /// opens `path` itself.
    pub opened: Option<Arc<File>>,
}

/// What arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub crc: Crc,
    /// 0 for a single PutObject.
    pub parts: u32,
    /// `x-amz-version-id`, when the bucket has versioning.
    pub version_id: Option<String>,
    /// `x-amz-request-id` of the PutObject or CompleteMultipartUpload.
    pub request_id: Option<String>,
}

/// Why a file did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{path:?}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path:?}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path:?}: {size} bytes is more than the 5 TiB an S3 object may hold")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path:?}: changed while it was being uploaded ({what}); the upload was abandoned")]
    Changed { path: PathBuf, what: String },
    #[error("{path:?}: {source}")]
    S3 { path: PathBuf, source: Box<S3Error> },
    #[error("{path:?}: cannot record progress: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
}

impl UploadError {
    /// Whether a later attempt at the same file may succeed unchanged.
    pub fn is_transient(&self) -> bool {
        match self {
            UploadError::S3 { source, .. } => {
                // A conflict is not retried with its upload, but the file is.
                source.is_transient() || matches!(**source, S3Error::Conflict { .. })
            }
            UploadError::Changed { .. } | UploadError::Checkpoint { .. } => true,
            // Out of descriptors or memory: nothing wrong with the file.
            UploadError::Read { source, .. } => crate::ground::is_resource_shortage(source),
            _ => false,
        }
    }

    /// Whether the key already held an object, left as it is (a write with
    /// `If-None-Match: *` answered 412): not a failure, not retried.
    pub fn is_exists(&self) -> bool {
        matches!(self, UploadError::S3 { source, .. } if source.is_exists())
    }
}

/// A part sent while its file was being written ([`crate::agent::stream`]): its
/// record, and a 128-bit hash (XXH3) of its bytes, so that the finished
/// file is compared with what was sent by more than the part's CRC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamedPart {
    pub part: PartDone,
    pub hash: u128,
}

/// A part of a file being written, read and hashed, holding its share of
/// the budget until it is sent or dropped.
pub struct ReadPart {
    _admission: budget::Admission,
    number: i32,
    body: Bytes,
    crc: Crc,
    hash: u128,
}

/// What was sent of a file while it was being written: the upload and its
/// full parts, handed to [`Engine::finish_streamed`] once it is finished.
#[derive(Debug, Clone)]
pub struct Streamed {
    pub upload_id: String,
    pub part_size: u64,
    pub checksum: ChecksumKind,
    pub parts: Vec<StreamedPart>,
}

/// Receives byte counts as data is accepted by the server.
pub type ProgressFn = Arc<dyn Fn(u64) + Send + Sync>;

/// Where a multipart upload's progress is kept between runs (the agent's
/// journal). Each method must have made its record durable when it returns:
/// the engine relies on it before the next step.
pub trait Checkpoint: Send + Sync {
    /// A multipart upload of this file version to continue, if any.
    fn resume(&self) -> Option<Resume>;
    /// After CreateMultipartUpload, before any part is sent.
    fn started(&self, upload_id: &str, part_size: u64, kind: ChecksumKind) -> Result<(), String>;
    /// After the server accepted a part.
    fn part_done(&self, part: &PartDone) -> Result<(), String>;
    /// The server no longer knows the upload; the next run starts over.
    fn forget(&self) -> Result<(), String>;
    /// An upload whose `parts` were sent while the file was written is
    /// this file's now (the journal takes it over from the streams table
    /// in the same transaction).
    fn adopt(
        &self,
        upload_id: &str,
        part_size: u64,
        kind: ChecksumKind,
        parts: &[PartDone],
    ) -> Result<(), String> {
        self.started(upload_id, part_size, kind)?;
        parts.iter().try_for_each(|p| self.part_done(p))
    }
    /// Whether a later run can continue what this one leaves unfinished.
    fn remembers(&self) -> bool {
        true
    }
}

/// No memory between runs (`putonly push`).
pub struct NoCheckpoint;

impl Checkpoint for NoCheckpoint {
    fn resume(&self) -> Option<Resume> {
        None
    }
    fn started(&self, _: &str, _: u64, _: ChecksumKind) -> Result<(), String> {
        Ok(())
    }
    fn part_done(&self, _: &PartDone) -> Result<(), String> {
        Ok(())
    }
    fn forget(&self) -> Result<(), String> {
        Ok(())
    }
    fn remembers(&self) -> bool {
        false
    }
}

/// The part size to use for a file: the configured one, grown (in whole
/// MiB) so the file fits in at most 10,000 parts.
pub fn part_size_for(file_size: u64, configured: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let needed = file_size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    configured.max(needed).min(MAX_PART_SIZE)
}

/// A request's wait for its share of the budget.
type Admitting<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<budget::Admission, tokio::sync::AcquireError>>
            + Send
            + 'a,
    >,
>;

/// Files up to this size are opened, read and checked in one trip to a
/// blocking thread.
const SMALL_FILE: u64 = 64 * 1024;

struct Inner<W> {
    writer: Arc<W>,
    settings: UploadSettings,
    budget: Budget,
    /// Multipart uploads under way at once: `concurrency`, so that large
    /// files finish one after another rather than all late together (and
    /// a crash or Ctrl-C leaves few of them unfinished), while small files
    /// still go many at once.
    multipart_files: tokio::sync::Semaphore,
    throttle: Option<Throttle>,
    backoff: Backoff,
}

/// Sends files; clone it freely, all clones share the budget and the limit.
pub struct Engine<W> {
    inner: Arc<Inner<W>>,
}

impl<W> Clone for Engine<W> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

/// An open file and the version it was opened as.
struct Source {
    path: PathBuf,
    file: Arc<File>,
    version: FileVersion,
}

impl Source {
    fn open(
        path: &Path,
        expected: Option<FileVersion>,
        opened: Option<Arc<File>>,
    ) -> Result<Source, UploadError> {
        let read_err = |source| UploadError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = match opened {
            Some(file) => file,
            None => {
                let meta = std::fs::metadata(path).map_err(read_err)?;
                if !meta.is_file() {
                    // Checked before opening: a FIFO or device must never be opened.
                    return Err(UploadError::NotAFile {
                        path: path.to_path_buf(),
                    });
                }
                // O_NONBLOCK: if the path became a FIFO since the check, opening it
                // must not wait for a writer. It has no effect on regular files.
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)
                    .map_err(read_err)?;
                Arc::new(file)
            }
        };
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(UploadError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let version = FileVersion::of(&meta);
        if let Some(what) = expected.and_then(|e| e.difference(&version)) {
            return Err(UploadError::Changed {
                path: path.to_path_buf(),
                what,
            });
        }
        if version.size > MAX_OBJECT_SIZE {
            return Err(UploadError::TooLarge {
                path: path.to_path_buf(),
                size: version.size,
            });
        }
        Ok(Source {
            path: path.to_path_buf(),
            file,
            version,
        })
    }

    /// Reads `len` bytes at `offset` into `buf` (a part buffer used before,
    /// or a new one) and checksums them; fails if the file is not the
    /// version it was opened as.
    fn read(
        &self,
        buf: Buffer,
        offset: u64,
        len: usize,
        kind: ChecksumKind,
    ) -> Result<(Bytes, Crc), UploadError> {
        let read = read_at(&self.file, &self.path, buf, offset, len, kind)?;
        self.check_handle()?;
        Ok(read)
    }

    fn changed(&self, what: String) -> UploadError {
        UploadError::Changed {
            path: self.path.clone(),
            what,
        }
    }

    /// The open file still has the size and mtime it was opened with.
    fn check_handle(&self) -> Result<(), UploadError> {
        let now = self.file.metadata().map_err(|source| UploadError::Read {
            path: self.path.clone(),
            source,
        })?;
        match self.version.difference(&FileVersion::of(&now)) {
            Some(what) => Err(self.changed(what)),
            None => Ok(()),
        }
    }

    /// The path still names the file that was read, unchanged.
    fn check_path(&self) -> Result<(), UploadError> {
        self.check_handle()?;
        let now = std::fs::metadata(&self.path)
            .map_err(|_| self.changed("it was removed or renamed".into()))?;
        match self.version.difference(&FileVersion::of(&now)) {
            Some(what) => Err(self.changed(what)),
            None => Ok(()),
        }
    }
}

/// Reads `len` bytes of `file` at `offset` into `buf` (a part buffer used
/// before, or a new one) and checksums them. Whether they are still the
/// bytes of the version wanted is for the caller to check.
fn read_at(
    file: &File,
    path: &Path,
    buf: Buffer,
    offset: u64,
    len: usize,
    kind: ChecksumKind,
) -> Result<(Bytes, Crc), UploadError> {
    // A used buffer keeps its (initialized) bytes: the read overwrites
    // them, and only a longer part zeroes its new tail.
    let mut buf = buf.into_inner();
    if buf.len() >= len {
        buf.truncate(len);
    } else {
        buf.resize(len, 0);
    }
    file.read_exact_at(&mut buf[..], offset)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => UploadError::Changed {
                path: path.to_path_buf(),
                what: "it became shorter".into(),
            },
            _ => UploadError::Read {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    let crc = Crc::of(kind, &buf);
    Ok((buf.freeze(), crc))
}

fn join_error(path: &Path, e: tokio::task::JoinError) -> UploadError {
    UploadError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("worker task failed: {e}")),
    }
}

impl<W: ObjectWriter> Engine<W> {
    pub fn new(writer: Arc<W>, settings: UploadSettings) -> Self {
        Engine {
            inner: Arc::new(Inner {
                writer,
                budget: Budget::new(&settings),
                multipart_files: tokio::sync::Semaphore::new(settings.concurrency.max(1)),
                throttle: settings.bandwidth_limit.map(Throttle::new),
                backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(20)),
                settings,
            }),
        }
    }

    /// Frees the part buffers kept for reuse that no part has used for
    /// `idle` (the agent calls it when quiet); returns how many.
    pub fn release_idle_buffers(&self, idle: Duration) -> usize {
        self.inner.budget.release_idle(idle)
    }

    /// Uploads one file. `progress` is told how many bytes the server
    /// accepted, as parts complete.
    pub async fn upload(&self, job: &Job, progress: ProgressFn) -> Result<Uploaded, UploadError> {
        self.upload_with(job, progress, Arc::new(NoCheckpoint))
            .await
    }

    /// Uploads one file, continuing the multipart upload `checkpoint`
    /// remembers and recording progress in it.
    pub async fn upload_with(
        &self,
        job: &Job,
        progress: ProgressFn,
        checkpoint: Arc<dyn Checkpoint>,
    ) -> Result<Uploaded, UploadError> {
        let inner = &self.inner;
        // A small file takes one trip off the runtime (open, read, check),
        // not three: per file, the thread hand-offs cost more than the I/O.
        // Its share of the budget is taken first; a larger file gives it
        // back and takes its own.
        let admission = inner
            .budget
            .admit(SMALL_FILE)
            .await
            .map_err(|_| closed(&job.path))?;
        let (path, expected, opened) = (job.path.clone(), job.expected, job.opened.clone());
        let kind = inner.settings.checksum;
        let small_up_to = SMALL_FILE.min(inner.settings.multipart_threshold);
        let (source, small) = tokio::task::spawn_blocking(move || {
            let source = Source::open(&path, expected, opened)?;
            let size = source.version.size;
            if size > small_up_to {
                return Ok((source, None));
            }
            let body = source.read(Buffer::Exact(Default::default()), 0, size as usize, kind)?;
            source.check_path()?;
            Ok::<_, UploadError>((source, Some(body)))
        })
        .await
        .map_err(|e| join_error(&job.path, e))??;
        let size = source.version.size;
        if let Some((body, crc)) = small {
            if let Some(t) = &inner.throttle {
                t.take(size).await;
            }
            let uploaded = self.send_whole(job, size, body, crc, progress).await;
            drop(admission);
            return uploaded;
        }
        drop(admission);
        let source = Arc::new(source);
        if size <= inner.settings.multipart_threshold {
            self.put_whole(job, source, progress).await
        } else {
            let resume = checkpoint.resume();
            self.multipart(job, source, progress, &checkpoint, resume)
                .await
        }
    }

    /// A multipart upload, in its turn among those under way: `resume`
    /// continued if it still fits, else a new one. A lost or conflicting
    /// upload is started over once.
    async fn multipart(
        &self,
        job: &Job,
        source: Arc<Source>,
        progress: ProgressFn,
        checkpoint: &Arc<dyn Checkpoint>,
        resume: Option<Resume>,
    ) -> Result<Uploaded, UploadError> {
        let _turn = self
            .inner
            .multipart_files
            .acquire()
            .await
            .map_err(|_| closed(&job.path))?;
        let resumed = resume.is_some();
        match self
            .put_multipart(job, source.clone(), progress.clone(), checkpoint, resume)
            .await
        {
            // The server lost the upload (a lifecycle rule aborted it, or
            // the one remembered is gone), or a concurrent conditional
            // write made it one that cannot complete: start over, once.
            Err(UploadError::S3 { source: e, .. })
                if matches!(*e, S3Error::NoSuchUpload { .. } | S3Error::Conflict { .. }) =>
            {
                tracing::info!(key = ?job.key, resumed, reason = %e, "the multipart upload cannot be completed; starting over with a new one");
                checkpoint
                    .forget()
                    .map_err(|reason| UploadError::Checkpoint {
                        path: job.path.clone(),
                        reason,
                    })?;
                self.put_multipart(job, source, progress, checkpoint, None)
                    .await
            }
            other => other,
        }
    }

    /// Starts a multipart upload for a file still being written (see
    /// [`crate::agent::stream`]); the caller has checked the key.
    pub async fn create_upload(&self, path: &Path, key: &str) -> Result<String, UploadError> {
        let inner = &self.inner;
        inner
            .retry(|| inner.writer.create_multipart(key, inner.settings.checksum))
            .await
            .map_err(|source| UploadError::S3 {
                path: path.to_path_buf(),
                source: Box::new(source),
            })
    }

    /// Reads bytes `offset..offset + len` of a file still being written,
    /// within the budget and paced by `bandwidth_limit`, as part `number`.
    /// No version is checked here: whether these are still the file's bytes
    /// is decided when it is finished ([`Engine::finish_streamed`]).
    /// Nothing is sent yet: dropping this future (or its result) sends
    /// nothing.
    pub async fn read_streamed_part(
        &self,
        file: &Arc<File>,
        path: &Path,
        number: i32,
        offset: u64,
        len: u64,
    ) -> Result<ReadPart, UploadError> {
        let inner = &self.inner;
        let admission = inner
            .budget
            .admit(inner.budget.charge(len))
            .await
            .map_err(|_| closed(path))?;
        if let Some(t) = &inner.throttle {
            t.take(len).await;
        }
        let (f, p, kind, buf) = (
            file.clone(),
            path.to_path_buf(),
            inner.settings.checksum,
            inner.budget.buffer(len),
        );
        let (body, crc, hash) = tokio::task::spawn_blocking(move || {
            let (body, crc) = read_at(&f, &p, buf, offset, len as usize, kind)?;
            let hash = xxhash_rust::xxh3::xxh3_128(&body);
            Ok::<_, UploadError>((body, crc, hash))
        })
        .await
        .map_err(|e| join_error(path, e))??;
        Ok(ReadPart {
            _admission: admission,
            number,
            body,
            crc,
            hash,
        })
    }

    /// Sends a part read by [`Engine::read_streamed_part`], with retries.
    pub async fn send_streamed_part(
        &self,
        path: &Path,
        key: &str,
        upload_id: &str,
        read: ReadPart,
    ) -> Result<StreamedPart, UploadError> {
        let inner = &self.inner;
        let (number, crc) = (read.number, read.crc);
        let part = inner
            .retry(|| {
                inner
                    .writer
                    .upload_part(key, upload_id, number, read.body.clone(), crc)
            })
            .await
            .map_err(|source| UploadError::S3 {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        let hash = read.hash;
        inner.budget.give_back(read.body);
        Ok(StreamedPart { part, hash })
    }

    /// Aborts a multipart upload that will never be completed (best effort).
    pub async fn abort_upload(&self, key: &str, upload_id: &str) {
        self.inner.writer.abort_multipart(key, upload_id).await;
    }

    /// Completes an upload whose first parts (`sent`, all full) went out
    /// while the file was being written. Every part sent is read again from
    /// the finished file, as the version the caller judged finished, and
    /// must have the checksum and the hash it was sent with; then the
    /// upload is on record in `checkpoint` and goes on as any resumed one
    /// (the rest of the parts, the file's version checked unchanged,
    /// Complete with the whole file's CRC). If the file is not what was
    /// sent (truncated, rewritten in place, grown past 10,000 parts), that
    /// upload is aborted and the file sent afresh: never an object of mixed
    /// bytes.
    pub async fn finish_streamed(
        &self,
        job: &Job,
        progress: ProgressFn,
        checkpoint: Arc<dyn Checkpoint>,
        sent: Streamed,
    ) -> Result<Uploaded, UploadError> {
        let (path, expected, opened) = (job.path.clone(), job.expected, job.opened.clone());
        let looked = async {
            let source = tokio::task::spawn_blocking(move || Source::open(&path, expected, opened))
                .await
                .map_err(|e| join_error(&job.path, e))??;
            let source = Arc::new(source);
            let differs = self.differs(&source, &sent).await?;
            Ok::<_, UploadError>((source, differs))
        };
        // Until the upload is on the file's record, no later attempt knows
        // of it: it is aborted on the way out.
        let (source, differs) = match looked.await {
            Ok(l) => l,
            Err(e) => {
                self.abort_upload(&job.key, &sent.upload_id).await;
                return Err(e);
            }
        };
        if let Some(why) = differs {
            tracing::info!(path = ?job.path, key = ?job.key, upload_id = %sent.upload_id, reason = %why, "the parts sent while the file was written are not its bytes now; that upload is abandoned and the file is sent afresh");
            ::metrics::counter!(crate::ops::metrics::STREAMS_ABANDONED, "reason" => "differs")
                .increment(1);
            self.abort_upload(&job.key, &sent.upload_id).await;
            return self.upload_with(job, progress, checkpoint).await;
        }
        // An upload an earlier attempt at this version left on its record
        // is replaced: it will never be completed.
        if let Some(old) = checkpoint.resume()
            && old.upload_id != sent.upload_id
        {
            self.abort_upload(&job.key, &old.upload_id).await;
        }
        let parts: Vec<PartDone> = sent.parts.into_iter().map(|p| p.part).collect();
        if let Err(reason) =
            checkpoint.adopt(&sent.upload_id, sent.part_size, sent.checksum, &parts)
        {
            self.abort_upload(&job.key, &sent.upload_id).await;
            return Err(UploadError::Checkpoint {
                path: job.path.clone(),
                reason,
            });
        }
        tracing::debug!(key = ?job.key, upload_id = %sent.upload_id, parts = parts.len(), "the parts sent while the file was written are its bytes; finishing that upload");
        let resume = Resume {
            upload_id: sent.upload_id,
            part_size: sent.part_size,
            checksum: sent.checksum,
            parts,
        };
        self.multipart(job, source, progress, &checkpoint, Some(resume))
            .await
    }

    /// How the finished file differs from the parts `sent` while it was
    /// written; `None` when each of them is its bytes. The parts are read
    /// again `concurrency` at a time, within the memory budget and not
    /// paced by `bandwidth_limit` (nothing is sent).
    async fn differs(
        &self,
        source: &Arc<Source>,
        sent: &Streamed,
    ) -> Result<Option<String>, UploadError> {
        let inner = &self.inner;
        let size = source.version.size;
        if sent.checksum != inner.settings.checksum {
            return Ok(Some("the checksum setting changed".into()));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&sent.part_size)
            || size.div_ceil(sent.part_size) > MAX_PARTS
        {
            return Ok(Some(format!(
                "it is {size} bytes, more than 10,000 parts of {} bytes",
                sent.part_size
            )));
        }
        let mut checks: JoinSet<Result<Option<String>, UploadError>> = JoinSet::new();
        for p in &sent.parts {
            let offset = u64::try_from(p.part.number - 1)
                .unwrap_or(u64::MAX)
                .saturating_mul(sent.part_size);
            let len = p.part.crc.len;
            if p.part.number < 1 || len != sent.part_size || offset.saturating_add(len) > size {
                return Ok(Some(format!(
                    "it is {size} bytes, shorter than the parts sent"
                )));
            }
            while checks.len() >= inner.settings.concurrency.max(1) {
                if let Some(found) = next_check(&mut checks, &source.path).await? {
                    return Ok(Some(found));
                }
            }
            let (engine, source, p) = (self.clone(), source.clone(), p.clone());
            checks.spawn(async move {
                let inner = &engine.inner;
                let _admission = inner
                    .budget
                    .admit(inner.budget.charge(len))
                    .await
                    .map_err(|_| closed(&source.path))?;
                let (s, buf, kind) = (
                    source.clone(),
                    inner.budget.buffer(len),
                    inner.settings.checksum,
                );
                let (body, crc, hash) = tokio::task::spawn_blocking(move || {
                    let (body, crc) = s.read(buf, offset, len as usize, kind)?;
                    let hash = xxhash_rust::xxh3::xxh3_128(&body);
                    Ok::<_, UploadError>((body, crc, hash))
                })
                .await
                .map_err(|e| join_error(&source.path, e))??;
                inner.budget.give_back(body);
                Ok((crc != p.part.crc || hash != p.hash).then(|| {
                    format!(
                        "part {} (bytes {offset}..{}) is no longer what was sent",
                        p.part.number,
                        offset + len
                    )
                }))
            });
        }
        while !checks.is_empty() {
            if let Some(found) = next_check(&mut checks, &source.path).await? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    async fn put_whole(
        &self,
        job: &Job,
        source: Arc<Source>,
        progress: ProgressFn,
    ) -> Result<Uploaded, UploadError> {
        let inner = &self.inner;
        let size = source.version.size;
        let _admission = inner
            .budget
            .admit(inner.budget.charge(size))
            .await
            .map_err(|_| closed(&job.path))?;
        let (body, crc) = inner.read_part(&source, 0, size).await?;
        {
            let source = source.clone();
            tokio::task::spawn_blocking(move || source.check_path())
                .await
                .map_err(|e| join_error(&job.path, e))??;
        }
        self.send_whole(job, size, body, crc, progress).await
    }

    /// Sends a file read whole in one PutObject.
    async fn send_whole(
        &self,
        job: &Job,
        size: u64,
        body: Bytes,
        crc: Crc,
        progress: ProgressFn,
    ) -> Result<Uploaded, UploadError> {
        let inner = &self.inner;
        let written = inner
            .retry(|| inner.writer.put_object(&job.key, body.clone(), crc))
            .await
            .map_err(|source| UploadError::S3 {
                path: job.path.clone(),
                source: Box::new(source),
            })?;
        inner.budget.give_back(body);
        progress(size);
        Ok(Uploaded {
            key: job.key.clone(),
            size,
            etag: written.etag,
            crc,
            parts: 0,
            version_id: written.version_id,
            request_id: written.request_id,
        })
    }

    async fn put_multipart(
        &self,
        job: &Job,
        source: Arc<Source>,
        progress: ProgressFn,
        checkpoint: &Arc<dyn Checkpoint>,
        resume: Option<Resume>,
    ) -> Result<Uploaded, UploadError> {
        let inner = &self.inner;
        let s3_err = |source| UploadError::S3 {
            path: job.path.clone(),
            source: Box::new(source),
        };
        let cp_err = |reason| UploadError::Checkpoint {
            path: job.path.clone(),
            reason,
        };
        let size = source.version.size;
        let kind = inner.settings.checksum;
        // A remembered upload is continued only if it fits this file as is.
        let resume = resume.filter(|r| {
            r.checksum == kind
                && (MIN_PART_SIZE..=MAX_PART_SIZE).contains(&r.part_size)
                && size.div_ceil(r.part_size) <= MAX_PARTS
        });
        let (upload_id, part_size, mut parts) = match resume {
            Some(r) => {
                tracing::info!(key = ?job.key, upload_id = %r.upload_id, parts_done = r.parts.len(), "resuming multipart upload");
                (r.upload_id, r.part_size, r.parts)
            }
            None => {
                let part_size = part_size_for(size, inner.settings.part_size);
                let upload_id = inner
                    .retry(|| inner.writer.create_multipart(&job.key, kind))
                    .await
                    .map_err(s3_err)?;
                checkpoint
                    .started(&upload_id, part_size, kind)
                    .map_err(cp_err)?;
                (upload_id, part_size, Vec::new())
            }
        };
        let count = size.div_ceil(part_size);
        parts.retain(|p| p.number >= 1 && (p.number as u64) <= count);
        let already: std::collections::HashSet<i32> = parts.iter().map(|p| p.number).collect();
        progress(parts.iter().map(|p| p.crc.len).sum());
        tracing::debug!(key = ?job.key, %upload_id, parts = count, part_size, "multipart upload started");

        let mut tasks: JoinSet<Result<PartDone, UploadError>> = JoinSet::new();
        let mut next: u64 = 0;
        let mut failure: Option<UploadError> = None;
        // The next part's wait for the budget, kept across turns of the
        // loop (a part of this file finishing does not send it to the back
        // of the queue).
        let mut waiting: Option<(u64, u64, Admitting<'_>)> = None;
        while failure.is_none() && (next < count || waiting.is_some() || !tasks.is_empty()) {
            while next < count && already.contains(&((next + 1) as i32)) {
                next += 1;
            }
            if waiting.is_none() && next < count {
                let offset = next * part_size;
                let len = part_size.min(size.saturating_sub(offset));
                let admit = Box::pin(inner.budget.admit(inner.budget.charge(len)));
                waiting = Some((offset, len, admit));
                next += 1;
            }
            if waiting.is_none() && tasks.is_empty() {
                break;
            }
            tokio::select! {
                admission = async { match waiting.as_mut() {
                    Some((_, _, admit)) => admit.await,
                    None => std::future::pending().await,
                } }, if waiting.is_some() => {
                    let Some((offset, len, _)) = waiting.take() else { continue };
                    let Ok(admission) = admission else {
                        failure = Some(closed(&job.path));
                        break;
                    };
                    let number = (offset / part_size + 1) as i32;
                    let (engine, source, key, id, progress, checkpoint) = (
                        self.clone(), source.clone(), job.key.clone(), upload_id.clone(), progress.clone(), checkpoint.clone(),
                    );
                    tasks.spawn(async move {
                        let _admission = admission;
                        let inner = &engine.inner;
                        let (body, crc) = inner.read_part(&source, offset, len).await?;
                        let done = inner
                            .retry(|| inner.writer.upload_part(&key, &id, number, body.clone(), crc))
                            .await
                            .map_err(|e| UploadError::S3 { path: source.path.clone(), source: Box::new(e) })?;
                        // Used again for a next part (of any file): no new
                        // mapping and page faults for each part.
                        inner.budget.give_back(body);
                        checkpoint.part_done(&done).map_err(|reason| UploadError::Checkpoint { path: source.path.clone(), reason })?;
                        progress(len);
                        Ok(done)
                    });
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    match joined {
                        Ok(Ok(part)) => parts.push(part),
                        Ok(Err(e)) => failure = Some(e),
                        Err(e) => failure = Some(join_error(&job.path, e)),
                    }
                }
            }
        }
        if failure.is_none() {
            let source = source.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || source.check_path())
                .await
                .map_err(|e| join_error(&job.path, e))
                .and_then(|r| r)
            {
                failure = Some(e);
            }
        }
        if let Some(e) = failure {
            tasks.abort_all();
            // A changed file or a lost upload will never complete this upload
            // id; other failures (the network, credentials) leave it for the
            // next attempt to continue.
            let hopeless = matches!(
                e,
                UploadError::Changed { .. } | UploadError::NotAFile { .. }
            ) || matches!(&e, UploadError::S3 { source, .. } if !source.is_transient());
            if hopeless || !checkpoint.remembers() {
                inner.writer.abort_multipart(&job.key, &upload_id).await;
                checkpoint.forget().map_err(cp_err)?;
            }
            return Err(e);
        }
        parts.sort_by_key(|p| p.number);
        let whole = Crc::combine(kind, parts.iter().map(|p| p.crc));
        let written = match inner
            .retry(|| {
                inner
                    .writer
                    .complete_multipart(&job.key, &upload_id, &parts, whole)
            })
            .await
        {
            Ok(written) => written,
            Err(e) => {
                // Refused for good (InvalidPart, EntityTooSmall, ...), or
                // the key exists (412: not overwritten) or a concurrent
                // conditional write won (409): this upload id will never
                // complete, so it is aborted and the next try starts afresh
                // instead of sending the same Complete forever. (A lost
                // upload, NoSuchUpload, is started over by the caller.)
                if refuses_these_parts(&e)
                    || matches!(e, S3Error::Exists { .. } | S3Error::Conflict { .. })
                {
                    inner.writer.abort_multipart(&job.key, &upload_id).await;
                    checkpoint.forget().map_err(cp_err)?;
                }
                return Err(s3_err(e));
            }
        };
        Ok(Uploaded {
            key: job.key.clone(),
            size,
            etag: written.etag,
            crc: whole,
            parts: count as u32,
            version_id: written.version_id,
            request_id: written.request_id,
        })
    }
}

/// The next part check of [`Engine::differs`] to end: what differs, if
/// anything (the others are dropped with the set).
async fn next_check(
    checks: &mut JoinSet<Result<Option<String>, UploadError>>,
    path: &Path,
) -> Result<Option<String>, UploadError> {
    match checks.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(join_error(path, e)),
        None => Ok(None),
    }
}

/// Whether a CompleteMultipartUpload answer says this upload's parts will
/// never make an object (so the upload is abandoned). An access denied or
/// a KMS problem may be fixed meanwhile: the upload is kept for then.
fn refuses_these_parts(e: &S3Error) -> bool {
    matches!(e, S3Error::Rejected { code, .. }
        if ["InvalidPart", "InvalidPartOrder", "EntityTooSmall", "MalformedXML", "InvalidDigest", "BadDigest"]
            .contains(&code.as_str()))
}

fn closed(path: &Path) -> UploadError {
    UploadError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::other("the upload engine is shutting down"),
    }
}

impl<W: ObjectWriter> Inner<W> {
    /// Paces, then reads and checksums one part off the async runtime, into
    /// a pooled part buffer when one is free (see [`Budget::buffer`]).
    async fn read_part(
        &self,
        source: &Arc<Source>,
        offset: u64,
        len: u64,
    ) -> Result<(Bytes, Crc), UploadError> {
        if let Some(t) = &self.throttle {
            t.take(len).await;
        }
        let kind = self.settings.checksum;
        let s = source.clone();
        let buf = self.budget.buffer(len);
        tokio::task::spawn_blocking(move || s.read(buf, offset, len as usize, kind))
            .await
            .map_err(|e| join_error(&source.path, e))?
    }

    /// Runs `op` until it succeeds, fails for good, or runs out of attempts.
    async fn retry<T, F, Fut>(&self, mut op: F) -> Result<T, S3Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, S3Error>>,
    {
        let mut attempt: u32 = 1;
        let started = Instant::now();
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e)
                    if e.is_transient()
                        && self.settings.max_attempts.is_none_or(|m| attempt < m) =>
                {
                    let delay = self.backoff.delay(attempt);
                    tracing::warn!(error = %e, attempt, retry_in = ?delay, elapsed = ?started.elapsed(), "transient failure; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::Written;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_read_that_ran_out_of_descriptors_is_transient_a_refused_one_is_not() {
        let read = |errno| UploadError::Read {
            path: PathBuf::from("f"),
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert!(read(libc::EMFILE).is_transient(), "{}", read(libc::EMFILE));
        assert!(read(libc::ENFILE).is_transient(), "{}", read(libc::ENFILE));
        assert!(!read(libc::EACCES).is_transient(), "{}", read(libc::EACCES));
        assert!(!read(libc::EIO).is_transient(), "{}", read(libc::EIO));
    }

    #[test]
    fn a_used_part_buffer_holds_shorter_and_longer_parts_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let source = Source::open(&path, None, None).unwrap();
        let used = |n: usize| Buffer::Pooled(bytes::BytesMut::from(&vec![7u8; n][..]));
        let (a, crc_a) = source.read(used(0), 0, 2000, ChecksumKind::Crc32C).unwrap();
        assert_eq!(&a[..], &data[..2000]);
        assert_eq!(crc_a, Crc::of(ChecksumKind::Crc32C, &data[..2000]));
        // A used buffer (2000 bytes of part one) holds the shorter last
        // part exactly, its checksum that of those bytes alone.
        let (b, crc_b) = source
            .read(used(2000), 2000, 1000, ChecksumKind::Crc32C)
            .unwrap();
        assert_eq!(&b[..], &data[2000..]);
        assert_eq!(crc_b, Crc::of(ChecksumKind::Crc32C, &data[2000..]));
        // And a longer part than the buffer held.
        let (c, _) = source
            .read(used(1000), 0, 3000, ChecksumKind::Crc32C)
            .unwrap();
        assert_eq!(&c[..], &data[..]);
    }

    #[test]
    fn part_size_grows_to_fit_ten_thousand_parts() {
        assert_eq!(part_size_for(1, 8 * MIB), 8 * MIB);
        assert_eq!(part_size_for(80_000 * MIB, 8 * MIB), 8 * MIB);
        let big = 80_001 * MIB;
        let p = part_size_for(big, 8 * MIB);
        assert!(big.div_ceil(p) <= MAX_PARTS, "{p}");
        assert_eq!(p % MIB, 0);
        let max = MAX_OBJECT_SIZE;
        assert!(max.div_ceil(part_size_for(max, 5 * MIB)) <= MAX_PARTS);
    }

    /// Records calls and keeps objects in memory; fails on demand.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
        parts: Mutex<Vec<(i32, Bytes)>>,
        objects: Mutex<Vec<(String, Vec<u8>, Crc)>>,
        fail_part_times: AtomicUsize,
        deny_parts: bool,
        /// Refuse this many CompleteMultipartUpload with InvalidPart.
        refuse_complete_times: AtomicUsize,
        /// The key already holds an object (a conditional write's 412).
        exists: bool,
        /// Answer this many CompleteMultipartUpload with a 409 conflict.
        conflict_complete_times: AtomicUsize,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
    }

    impl Fake {
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
    }

    impl ObjectWriter for Fake {
        async fn put_object(&self, key: &str, body: Bytes, crc: Crc) -> Result<Written, S3Error> {
            self.log(format!("put {key}"));
            if self.exists {
                return Err(S3Error::Exists {
                    op: "PutObject",
                    key: key.into(),
                    message: "At least one of the pre-conditions you specified did not hold".into(),
                });
            }
            assert_eq!(Crc::of(crc.kind, &body), crc);
            self.objects
                .lock()
                .unwrap()
                .push((key.into(), body.to_vec(), crc));
            Ok(Written {
                etag: "etag".into(),
                ..Written::default()
            })
        }
        async fn create_multipart(&self, key: &str, _: ChecksumKind) -> Result<String, S3Error> {
            self.log(format!("create {key}"));
            Ok("up-1".into())
        }
        async fn upload_part(
            &self,
            key: &str,
            _: &str,
            number: i32,
            body: Bytes,
            crc: Crc,
        ) -> Result<PartDone, S3Error> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.log(format!("part {number}"));
            if self.deny_parts {
                return Err(S3Error::Denied {
                    op: "UploadPart",
                    key: key.into(),
                    code: "AccessDenied".into(),
                    message: String::new(),
                });
            }
            if self
                .fail_part_times
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(S3Error::Transient {
                    op: "UploadPart",
                    key: key.into(),
                    detail: "503 SlowDown".into(),
                });
            }
            assert_eq!(Crc::of(crc.kind, &body), crc);
            self.parts.lock().unwrap().push((number, body));
            Ok(PartDone {
                number,
                etag: format!("e{number}"),
                crc,
            })
        }
        async fn complete_multipart(
            &self,
            key: &str,
            _: &str,
            parts: &[PartDone],
            whole: Crc,
        ) -> Result<Written, S3Error> {
            self.log(format!("complete {key}"));
            if self.exists {
                return Err(S3Error::Exists {
                    op: "CompleteMultipartUpload",
                    key: key.into(),
                    message: "At least one of the pre-conditions you specified did not hold".into(),
                });
            }
            if self
                .conflict_complete_times
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(S3Error::Conflict {
                    key: key.into(),
                    upload_id: "up-1".into(),
                });
            }
            if self
                .refuse_complete_times
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(S3Error::Rejected {
                    op: "CompleteMultipartUpload",
                    key: key.into(),
                    status: 400,
                    code: "InvalidPart".into(),
                    message: "One or more of the specified parts could not be found".into(),
                });
            }
            let numbers: Vec<i32> = parts.iter().map(|p| p.number).collect();
            assert_eq!(numbers, (1..=parts.len() as i32).collect::<Vec<_>>());
            let mut stored = self.parts.lock().unwrap().clone();
            stored.sort_by_key(|p| p.0);
            let data: Vec<u8> = stored.iter().flat_map(|p| p.1.to_vec()).collect();
            assert_eq!(Crc::of(whole.kind, &data), whole, "whole-object CRC");
            // A completed upload's parts are gone (the next upload's own).
            self.parts.lock().unwrap().clear();
            self.objects.lock().unwrap().push((key.into(), data, whole));
            Ok(Written {
                etag: "etag-mpu".into(),
                ..Written::default()
            })
        }
        async fn abort_multipart(&self, key: &str, _: &str) {
            self.log(format!("abort {key}"));
            // The server drops the parts of an aborted upload.
            self.parts.lock().unwrap().clear();
        }
    }

    fn settings() -> UploadSettings {
        UploadSettings {
            part_size: 5 * MIB,
            multipart_threshold: 5 * MIB,
            concurrency: 3,
            max_attempts: Some(5),
            ..UploadSettings::default()
        }
    }

    fn file_of(dir: &Path, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
        let p = dir.join(name);
        std::fs::write(&p, &data).unwrap();
        (p, data)
    }

    fn no_progress() -> ProgressFn {
        Arc::new(|_| {})
    }

    #[tokio::test]
    async fn small_file_is_one_put() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = file_of(dir.path(), "a", 1000);
        let fake = Arc::new(Fake::default());
        let engine = Engine::new(fake.clone(), settings());
        let job = Job {
            path,
            key: "foo/a".into(),
            expected: None,
            opened: None,
        };
        let up = engine.upload(&job, no_progress()).await.unwrap();
        assert_eq!(up.parts, 0);
        assert_eq!(*fake.calls.lock().unwrap(), vec!["put foo/a"]);
        assert_eq!(fake.objects.lock().unwrap()[0].1, data);
    }

    #[tokio::test]
    async fn large_file_is_parts_in_parallel_with_bounded_slots() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = file_of(dir.path(), "b", (5 * MIB * 4 + 17) as usize);
        let fake = Arc::new(Fake::default());
        let engine = Engine::new(fake.clone(), settings());
        let seen = Arc::new(AtomicUsize::new(0));
        let s2 = seen.clone();
        let progress: ProgressFn = Arc::new(move |n| {
            s2.fetch_add(n as usize, Ordering::SeqCst);
        });
        let job = Job {
            path,
            key: "foo/b".into(),
            expected: None,
            opened: None,
        };
        let up = engine.upload(&job, progress).await.unwrap();
        assert_eq!(up.parts, 5);
        assert_eq!(fake.objects.lock().unwrap()[0].1, data);
        assert_eq!(seen.load(Ordering::SeqCst), data.len());
        let max = fake.max_in_flight.load(Ordering::SeqCst);
        assert!((2..=3).contains(&max), "parts in flight: {max}");
    }

    #[tokio::test]
    async fn transient_part_failures_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = file_of(dir.path(), "c", (11 * MIB) as usize);
        let fake = Arc::new(Fake {
            fail_part_times: AtomicUsize::new(3),
            ..Fake::default()
        });
        let engine = Engine::new(fake.clone(), settings());
        let job = Job {
            path,
            key: "foo/c".into(),
            expected: None,
            opened: None,
        };
        engine.upload(&job, no_progress()).await.unwrap();
        assert_eq!(fake.objects.lock().unwrap()[0].1, data);
    }

    #[tokio::test]
    async fn large_files_take_turns_while_their_parts_share_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let engine = Engine::new(
            fake.clone(),
            UploadSettings {
                concurrency: 1,
                ..settings()
            },
        );
        let jobs: Vec<Job> = ["a", "b"]
            .iter()
            .map(|n| Job {
                path: file_of(dir.path(), n, (11 * MIB) as usize).0,
                key: format!("foo/{n}"),
                expected: None,
                opened: None,
            })
            .collect();
        let (a, b) = tokio::join!(
            engine.upload(&jobs[0], no_progress()),
            engine.upload(&jobs[1], no_progress())
        );
        a.unwrap();
        b.unwrap();
        // One multipart upload at a time (concurrency 1): the second is
        // created only after the first completed.
        let calls = fake.calls.lock().unwrap().clone();
        let creates: Vec<usize> = (0..calls.len())
            .filter(|&i| calls[i].starts_with("create"))
            .collect();
        let completes: Vec<usize> = (0..calls.len())
            .filter(|&i| calls[i].starts_with("complete"))
            .collect();
        assert!(completes[0] < creates[1], "{calls:?}");
    }

    #[tokio::test]
    async fn denied_part_aborts_without_retry() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = file_of(dir.path(), "d", (6 * MIB) as usize);
        let fake = Arc::new(Fake {
            deny_parts: true,
            ..Fake::default()
        });
        let engine = Engine::new(fake.clone(), settings());
        let job = Job {
            path,
            key: "foo/d".into(),
            expected: None,
            opened: None,
        };
        let err = engine.upload(&job, no_progress()).await.unwrap_err();
        assert!(!err.is_transient(), "{err}");
        let calls = fake.calls.lock().unwrap().clone();
        // No part was sent twice: AccessDenied is not retried.
        let parts: Vec<&String> = calls.iter().filter(|c| c.starts_with("part")).collect();
        let unique: std::collections::HashSet<&&String> = parts.iter().collect();
        assert_eq!(parts.len(), unique.len(), "{calls:?}");
        assert_eq!(calls.last().unwrap(), "abort foo/d");
        assert!(fake.objects.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_file_changed_during_upload_is_not_completed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = file_of(dir.path(), "e", (30 * MIB) as usize);
        let fake = Arc::new(Fake::default());
        let mut s = settings();
        s.concurrency = 1;
        s.bandwidth_limit = Some(20 * MIB);
        let engine = Engine::new(fake.clone(), s);
        let job = Job {
            path: path.clone(),
            key: "foo/e".into(),
            expected: None,
            opened: None,
        };
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            f.write_all(b"more").unwrap();
        });
        let err = engine.upload(&job, no_progress()).await.unwrap_err();
        writer.await.unwrap();
        assert!(matches!(err, UploadError::Changed { .. }), "{err}");
        assert!(fake.objects.lock().unwrap().is_empty());
        assert_eq!(fake.calls.lock().unwrap().last().unwrap(), "abort foo/e");
    }

    /// Remembers in memory, as the journal does on disk.
    #[derive(Default)]
    struct MemoryCheckpoint {
        state: Mutex<Option<Resume>>,
    }

    impl Checkpoint for MemoryCheckpoint {
        fn resume(&self) -> Option<Resume> {
            self.state.lock().unwrap().clone()
        }
        fn started(
            &self,
            upload_id: &str,
            part_size: u64,
            kind: ChecksumKind,
        ) -> Result<(), String> {
            *self.state.lock().unwrap() = Some(Resume {
                upload_id: upload_id.into(),
                part_size,
                checksum: kind,
                parts: vec![],
            });
            Ok(())
        }
        fn part_done(&self, part: &PartDone) -> Result<(), String> {
            if let Some(r) = self.state.lock().unwrap().as_mut() {
                r.parts.push(part.clone());
            }
            Ok(())
        }
        fn forget(&self) -> Result<(), String> {
            *self.state.lock().unwrap() = None;
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_interrupted_upload_resumes_with_its_parts() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = file_of(dir.path(), "r", (5 * MIB * 6) as usize);
        // First run: the network fails for good after two parts.
        let fake = Arc::new(Fake::default());
        let mut s = settings();
        s.max_attempts = Some(1);
        s.concurrency = 1;
        let cp = Arc::new(MemoryCheckpoint::default());
        let job = Job {
            path,
            key: "foo/r".into(),
            expected: None,
            opened: None,
        };
        let engine = Engine::new(fake.clone(), s.clone());
        let fail_after_two = fake.clone();
        let progress: ProgressFn = Arc::new(move |_| {
            if fail_after_two.parts.lock().unwrap().len() >= 2 {
                fail_after_two
                    .fail_part_times
                    .store(usize::MAX, Ordering::SeqCst);
            }
        });
        let err = engine
            .upload_with(&job, progress, cp.clone())
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        let remembered = cp.resume().expect("the upload is remembered");
        assert_eq!(remembered.parts.len(), 2);
        assert!(
            !fake
                .calls
                .lock()
                .unwrap()
                .iter()
                .any(|c| c.starts_with("abort"))
        );

        // Second run: only the missing parts are sent, on the same upload.
        fake.fail_part_times.store(0, Ordering::SeqCst);
        let before = fake.calls.lock().unwrap().len();
        engine
            .upload_with(&job, no_progress(), cp.clone())
            .await
            .unwrap();
        let calls: Vec<String> = fake.calls.lock().unwrap()[before..].to_vec();
        assert!(!calls.iter().any(|c| c.starts_with("create")), "{calls:?}");
        assert!(
            !calls.contains(&"part 1".to_string()) && !calls.contains(&"part 2".to_string()),
            "{calls:?}"
        );
        assert_eq!(fake.objects.lock().unwrap()[0].1, data);
    }

    #[tokio::test]
    async fn a_complete_refused_for_good_forgets_the_upload() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = file_of(dir.path(), "ip", (5 * MIB * 2 + 3) as usize);
        let fake = Arc::new(Fake {
            refuse_complete_times: AtomicUsize::new(1),
            ..Fake::default()
        });
        let engine = Engine::new(fake.clone(), settings());
        let cp = Arc::new(MemoryCheckpoint::default());
        let job = Job {
            path,
            key: "foo/ip".into(),
            expected: None,
            opened: None,
        };
        let err = engine
            .upload_with(&job, no_progress(), cp.clone())
            .await
            .unwrap_err();
        assert!(!err.is_transient(), "{err}");
        assert!(cp.resume().is_none(), "the refused upload is forgotten");
        assert_eq!(fake.calls.lock().unwrap().last().unwrap(), "abort foo/ip");
        // The next try starts a new upload rather than completing the old one.
        engine
            .upload_with(&job, no_progress(), cp.clone())
            .await
            .unwrap();
        let creates = fake
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("create"))
            .count();
        assert_eq!(creates, 2);
        assert_eq!(fake.objects.lock().unwrap()[0].1, data);
    }

    #[tokio::test]
    async fn an_existing_key_is_reported_once_not_retried_and_its_upload_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let (small, _) = file_of(dir.path(), "s", 100);
        let (big, _) = file_of(dir.path(), "m", (5 * MIB * 2 + 1) as usize);
        let fake = Arc::new(Fake {
            exists: true,
            ..Fake::default()
        });
        let engine = Engine::new(fake.clone(), settings());
        let job = |path: &PathBuf, key: &str| Job {
            path: path.clone(),
            key: key.into(),
            expected: None,
            opened: None,
        };
        let err = engine
            .upload(&job(&small, "foo/s"), no_progress())
            .await
            .unwrap_err();
        assert!(err.is_exists() && !err.is_transient(), "{err}");
        assert_eq!(*fake.calls.lock().unwrap(), vec!["put foo/s"], "sent once");
        let cp = Arc::new(MemoryCheckpoint::default());
        let err = engine
            .upload_with(&job(&big, "foo/m"), no_progress(), cp.clone())
            .await
            .unwrap_err();
        assert!(err.is_exists() && !err.is_transient(), "{err}");
        let calls = fake.calls.lock().unwrap().clone();
        assert_eq!(
            calls.iter().filter(|c| c.starts_with("complete")).count(),
            1,
            "{calls:?}"
        );
        assert_eq!(calls.last().unwrap(), "abort foo/m", "{calls:?}");
        assert!(cp.resume().is_none(), "the upload is forgotten");
        assert!(fake.objects.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_conflicting_complete_starts_a_new_upload_once() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = file_of(dir.path(), "c", (5 * MIB * 2 + 1) as usize);
        let fake = Arc::new(Fake {
            conflict_complete_times: AtomicUsize::new(1),
            ..Fake::default()
        });
        let engine = Engine::new(fake.clone(), settings());
        let job = Job {
            path,
            key: "foo/c".into(),
            expected: None,
            opened: None,
        };
        let cp = Arc::new(MemoryCheckpoint::default());
        engine
            .upload_with(&job, no_progress(), cp.clone())
            .await
            .unwrap();
        let calls = fake.calls.lock().unwrap().clone();
        let count = |p: &str| calls.iter().filter(|c| c.starts_with(p)).count();
        assert_eq!(
            (count("create"), count("complete"), count("abort")),
            (2, 2, 1),
            "{calls:?}"
        );
        assert_eq!(fake.objects.lock().unwrap()[0].1, data);
        // Twice in a row: the file fails for now, as a transient failure.
        fake.conflict_complete_times.store(2, Ordering::SeqCst);
        let err = engine
            .upload_with(&job, no_progress(), Arc::new(MemoryCheckpoint::default()))
            .await
            .unwrap_err();
        assert!(err.is_transient() && !err.is_exists(), "{err}");
    }

    #[tokio::test]
    async fn a_file_that_is_not_the_recorded_version_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = file_of(dir.path(), "v", 100);
        let recorded = FileVersion::of(&std::fs::metadata(&path).unwrap());
        std::fs::write(&path, b"a newer version").unwrap();
        let fake = Arc::new(Fake::default());
        let engine = Engine::new(fake.clone(), settings());
        let job = Job {
            path,
            key: "foo/v".into(),
            expected: Some(recorded),
            opened: None,
        };
        let err = engine.upload(&job, no_progress()).await.unwrap_err();
        assert!(matches!(err, UploadError::Changed { .. }), "{err}");
        assert!(fake.calls.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn fifo_is_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(status.success());
        let engine = Engine::new(Arc::new(Fake::default()), settings());
        let job = Job {
            path: p,
            key: "foo/fifo".into(),
            expected: None,
            opened: None,
        };
        let err = tokio::time::timeout(Duration::from_secs(5), engine.upload(&job, no_progress()))
            .await
            .expect("must not block on a FIFO")
            .unwrap_err();
        assert!(matches!(err, UploadError::NotAFile { .. }), "{err}");
    }

    /// Remembers what the engine put on record.
    #[derive(Default)]
    struct Remembered {
        started: Mutex<Option<String>>,
        parts: Mutex<Vec<i32>>,
    }

    impl Checkpoint for Remembered {
        fn resume(&self) -> Option<Resume> {
            None
        }
        fn started(&self, upload_id: &str, _: u64, _: ChecksumKind) -> Result<(), String> {
            *self.started.lock().unwrap() = Some(upload_id.into());
            Ok(())
        }
        fn part_done(&self, part: &PartDone) -> Result<(), String> {
            self.parts.lock().unwrap().push(part.number);
            Ok(())
        }
        fn forget(&self) -> Result<(), String> {
            *self.started.lock().unwrap() = None;
            Ok(())
        }
    }

    /// Sends the first `parts` full parts of `path` as a stream would.
    async fn stream_parts(engine: &Engine<Fake>, path: &Path, key: &str, parts: u64) -> Streamed {
        let file = Arc::new(File::open(path).unwrap());
        let upload_id = engine.create_upload(path, key).await.unwrap();
        let mut done = Vec::new();
        for n in 0..parts {
            let read = engine
                .read_streamed_part(&file, path, n as i32 + 1, n * 5 * MIB, 5 * MIB)
                .await
                .unwrap();
            let part = engine
                .send_streamed_part(path, key, &upload_id, read)
                .await
                .unwrap();
            done.push(part);
        }
        Streamed {
            upload_id,
            part_size: 5 * MIB,
            checksum: settings().checksum,
            parts: done,
        }
    }

    fn job_for(path: &Path, key: &str) -> Job {
        Job {
            path: path.to_path_buf(),
            key: key.into(),
            expected: None,
            opened: None,
        }
    }

    #[tokio::test]
    async fn parts_sent_while_written_are_kept_when_they_are_the_finished_files_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = file_of(dir.path(), "s", (12 * MIB + 5) as usize);
        let fake = Arc::new(Fake::default());
        let engine = Engine::new(fake.clone(), settings());
        let sent = stream_parts(&engine, &path, "foo/s", 2).await;
        let cp = Arc::new(Remembered::default());
        let up = engine
            .finish_streamed(&job_for(&path, "foo/s"), no_progress(), cp.clone(), sent)
            .await
            .unwrap();
        assert_eq!(up.parts, 3);
        assert_eq!(fake.objects.lock().unwrap()[0].1, data);
        // Parts 1 and 2 went once (while written), only part 3 after.
        assert_eq!(
            *fake.calls.lock().unwrap(),
            vec![
                "create foo/s",
                "part 1",
                "part 2",
                "part 3",
                "complete foo/s"
            ]
        );
        assert_eq!(cp.started.lock().unwrap().as_deref(), Some("up-1"));
        assert_eq!(*cp.parts.lock().unwrap(), vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn parts_sent_while_written_that_are_not_the_finished_bytes_are_abandoned() {
        for change in ["rewritten in place", "truncated and written shorter"] {
            let dir = tempfile::tempdir().unwrap();
            let (path, _) = file_of(dir.path(), "s", (12 * MIB + 5) as usize);
            let fake = Arc::new(Fake::default());
            let engine = Engine::new(fake.clone(), settings());
            let sent = stream_parts(&engine, &path, "foo/s", 2).await;
            let finished: Vec<u8> = match change {
                "rewritten in place" => {
                    let mut d = std::fs::read(&path).unwrap();
                    d[(5 * MIB + 3) as usize] ^= 0xff;
                    d
                }
                _ => vec![9u8; (7 * MIB) as usize],
            };
            std::fs::write(&path, &finished).unwrap();
            let cp = Arc::new(Remembered::default());
            engine
                .finish_streamed(&job_for(&path, "foo/s"), no_progress(), cp, sent)
                .await
                .unwrap();
            let objects = fake.objects.lock().unwrap();
            assert_eq!(objects.len(), 1, "{change}");
            assert!(
                objects[0].1 == finished,
                "{change}: the object is the finished bytes"
            );
            let calls = fake.calls.lock().unwrap();
            let abort = calls.iter().position(|c| c == "abort foo/s");
            let created: Vec<usize> = calls
                .iter()
                .enumerate()
                .filter(|(_, c)| *c == "create foo/s")
                .map(|(i, _)| i)
                .collect();
            assert!(
                abort.is_some_and(|a| created.len() == 2 && a < created[1]),
                "{change}: the streamed upload is aborted before a new one: {calls:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_part_whose_crc_still_matches_but_whose_bytes_differ_is_not_kept() {
        // As if a rewrite kept the part's CRC (a collision): its hash tells.
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = file_of(dir.path(), "s", (12 * MIB + 5) as usize);
        let fake = Arc::new(Fake::default());
        let engine = Engine::new(fake.clone(), settings());
        let mut sent = stream_parts(&engine, &path, "foo/s", 2).await;
        sent.parts[1].hash ^= 1;
        let cp = Arc::new(Remembered::default());
        engine
            .finish_streamed(&job_for(&path, "foo/s"), no_progress(), cp, sent)
            .await
            .unwrap();
        assert_eq!(fake.objects.lock().unwrap()[0].1, data);
        let calls = fake.calls.lock().unwrap();
        assert!(calls.contains(&"abort foo/s".to_string()), "{calls:?}");
        assert_eq!(calls.iter().filter(|c| *c == "create foo/s").count(), 2);
    }
}
