//! `putonly push`: plan keys for the named paths, refuse what the prefix
//! guard refuses before any request, then send the rest through the upload
//! engine with progress bars, plain lines or JSON, and a summary.
//!
//! Planning is local only: no request leaves before every key is known and
//! checked, and if nothing is left to send no credentials are even asked
//! for. This module never talks to S3 except through the engine.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, PushArgs, report_error};

/// Exit status after Ctrl-C, as shells report a SIGINT death (128 + 2).
const EXIT_INTERRUPTED: u8 = 130;
use crate::agent::receipts::Receipt;
use crate::config::{ConfigError, Settings};
use crate::credentials::{CredentialSource, load_sdk_config};
use crate::ground::keys::{folder_prefix, key_for};
use crate::s3::WriteOnlyBucket;
use crate::upload::{Engine, Job, ProgressFn, UploadError, Uploaded};

/// A path that could not become a job (or was not sent), and why.
struct Skipped {
    path: PathBuf,
    reason: String,
}

/// A file to send, and for one found inside a named folder, the (device,
/// inode) the walk saw there: the file opened for it must be that one
/// (not a link or another file swapped in since).
struct Planned {
    job: Job,
    walked: Option<(u64, u64)>,
}

/// What planning made of the named paths.
#[derive(Default)]
struct Plan {
    jobs: Vec<Planned>,
    /// Could not be sent: each is a failure.
    failed: Vec<Skipped>,
    /// Left out by rule (links inside a named folder): reported, not failures.
    skipped: Vec<Skipped>,
}

pub async fn run(args: PushArgs) -> ExitCode {
    let settings = match resolve(&args) {
        Ok(s) => s,
        Err(e) => {
            report_error(&e);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let prefix = match choose_prefix(&args, &settings) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("putonly: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if args.key.is_some() && (args.paths.len() != 1 || args.paths[0].is_dir()) {
        eprintln!(
            "putonly: --key names one object: give exactly one file (use --prefix for several)"
        );
        return ExitCode::from(EXIT_USAGE);
    }

    let Plan {
        jobs,
        mut failed,
        skipped,
    } = plan(&args, &prefix, &settings);
    let out = Arc::new(Output::new(&args, &settings.bucket.name));
    for f in &failed {
        out.failed(&f.path, None, &f.reason);
    }
    for s in &skipped {
        out.skipped(&s.path, &s.reason);
    }
    let started = Instant::now();
    let mut done: Vec<Uploaded> = Vec::new();
    let mut exists = 0;
    if !jobs.is_empty() {
        let sent = tokio::select! {
            r = send(jobs, &settings, out.clone()) => r,
            _ = tokio::signal::ctrl_c() => {
                out.finish();
                eprintln!(
                    "putonly: interrupted; files not reported as uploaded were not sent, except one whose \
                     last request was already on its way, which may have arrived whole (the rest of their \
                     multipart uploads are left to the bucket's AbortIncompleteMultipartUpload lifecycle rule)"
                );
                return ExitCode::from(EXIT_INTERRUPTED);
            }
        };
        match sent {
            Ok((ok, there, bad)) => {
                done = ok;
                exists = there.len();
                failed.extend(bad);
            }
            Err(e) => {
                report_error(e.as_ref());
                out.finish();
                // A refused endpoint from the AWS environment is a
                // configuration error: nothing was sent.
                return ExitCode::from(if e.is::<ConfigError>() {
                    EXIT_USAGE
                } else {
                    EXIT_FAILED
                });
            }
        }
    }
    out.finish();
    out.summary(
        &done,
        exists,
        failed.len(),
        skipped.len(),
        started.elapsed(),
    );
    ExitCode::from(
        if failed.is_empty() && (exists == 0 || !args.fail_on_exists) {
            EXIT_OK
        } else {
            EXIT_FAILED
        },
    )
}

fn resolve(args: &PushArgs) -> Result<Settings, ConfigError> {
    let mut raw = args.aws.apply()?;
    if raw.bucket.allowed_prefixes.is_none() && args.aws.config.is_none() {
        // A one-shot push without a file: the prefix asked for is the one allowed.
        if let Some(p) = &args.prefix {
            raw.bucket.allowed_prefixes = Some(vec![folder_prefix(p)]);
        }
    }
    if let Some(v) = &args.part_size {
        raw.upload.part_size = Some(v.clone());
    }
    if let Some(v) = args.concurrency {
        raw.upload.concurrency = Some(v);
    }
    if let Some(v) = args.requests_in_flight {
        raw.upload.requests_in_flight = Some(v);
    }
    if let Some(v) = &args.bandwidth_limit {
        raw.upload.bandwidth_limit = Some(v.clone());
    }
    if let Some(v) = &args.acl {
        raw.bucket.acl = Some(v.clone());
    }
    if args.no_overwrite {
        raw.bucket.overwrite = Some(false);
    }
    Settings::resolve(&raw)
}

/// The prefix files go under: --prefix, or the only allowed prefix.
fn choose_prefix(args: &PushArgs, settings: &Settings) -> Result<String, String> {
    if args.key.is_some() {
        return Ok(String::new());
    }
    match &args.prefix {
        Some(p) => Ok(folder_prefix(p)),
        None => match settings.bucket.guard.prefixes() {
            // Files go into it as into a folder, as with --prefix: an
            // allowed prefix "foo" would otherwise make "fooreport.csv".
            [only] => Ok(folder_prefix(only)),
            many => Err(format!(
                "choose where the files go with --prefix (allowed: {})",
                many.join(", ")
            )),
        },
    }
}

/// Turns paths into jobs with checked keys; what cannot be sent is listed
/// with its reason. Local work only. A path named on the command line is
/// followed if it is a link; links inside a named folder only with
/// `--follow-links`.
fn plan(args: &PushArgs, prefix: &str, settings: &Settings) -> Plan {
    let mut jobs = Vec::new();
    let mut failed = Vec::new();
    let mut skipped = Vec::new();
    let guard = &settings.bucket.guard;
    let mut add = |path: PathBuf, key: Result<String, String>, walked| match key
        .and_then(|k| guard.check(&k).map(|()| k).map_err(|e| e.to_string()))
    {
        Ok(key) => jobs.push(Planned {
            job: Job {
                path,
                key,
                expected: None,
                opened: None,
            },
            walked,
        }),
        Err(reason) => failed.push(Skipped {
            path,
            reason: format!("not uploaded: {reason}"),
        }),
    };
    for root in &args.paths {
        let meta = match std::fs::metadata(root) {
            Ok(m) => m,
            Err(e) => {
                add(root.clone(), Err(format!("cannot read: {e}")), None);
                continue;
            }
        };
        if meta.is_file() {
            let key = match &args.key {
                Some(k) => Ok(k.clone()),
                None => match root.file_name() {
                    Some(name) => key_for(prefix, Path::new(name)).map_err(|e| e.to_string()),
                    None => Err("it names no file".to_string()),
                },
            };
            add(root.clone(), key, None);
        } else if meta.is_dir() {
            for entry in walkdir::WalkDir::new(root)
                .follow_links(args.follow_links)
                .sort_by_file_name()
            {
                match entry {
                    Err(e) => {
                        let path = e.path().unwrap_or(root).to_path_buf();
                        add(path, Err(format!("cannot read: {e}")), None);
                    }
                    Ok(entry) if entry.file_type().is_dir() => {}
                    Ok(entry) if entry.file_type().is_file() => {
                        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
                        let mut key = key_for(prefix, rel).map_err(|e| e.to_string());
                        // Without --follow-links the entry is the file
                        // itself, never a link's target; it cannot be told,
                        // it is not sent.
                        let walked = if args.follow_links {
                            None
                        } else {
                            match entry.metadata() {
                                Ok(m) => Some((m.dev(), m.ino())),
                                Err(e) => {
                                    key = Err(format!("cannot read: {e}"));
                                    None
                                }
                            }
                        };
                        add(entry.path().to_path_buf(), key, walked);
                    }
                    Ok(entry) if entry.path_is_symlink() => skipped.push(Skipped {
                        path: entry.into_path(),
                        reason:
                            "symbolic link inside the folder; not followed (use --follow-links)"
                                .into(),
                    }),
                    Ok(entry) => tracing::warn!(
                        path = ?entry.path(),
                        "skipped: not a regular file (FIFO, socket or device)"
                    ),
                }
            }
        } else {
            add(
                root.clone(),
                Err("not a regular file or folder".into()),
                None,
            );
        }
    }
    Plan {
        jobs,
        failed,
        skipped,
    }
}

/// Uploaded; not sent because the key already held an object; failed.
type SendResult = (Vec<Uploaded>, Vec<Skipped>, Vec<Skipped>);

async fn send(
    jobs: Vec<Planned>,
    settings: &Settings,
    out: Arc<Output>,
) -> Result<SendResult, Box<dyn std::error::Error>> {
    let sdk = load_sdk_config(&settings.aws).await?;
    let credentials = CredentialSource::start(&sdk, settings.role.as_ref()).await?;
    let bucket = Arc::new(WriteOnlyBucket::new(
        &sdk,
        credentials,
        &settings.bucket,
        &settings.upload,
    ));
    let engine = Engine::new(bucket, settings.upload.clone());
    out.begin(jobs.iter().map(|p| &p.job));
    // The engine bounds memory by bytes in flight, so many small files go
    // at once; a file waiting its turn holds only its open descriptor.
    let files_at_once = settings.upload.requests_in_flight;
    // Each file is its own task, so uploads run on every worker thread
    // beside their connections (polled together on one thread, the SDK's
    // per-request work would use one core). Dropping this future (Ctrl-C)
    // drops the set, which aborts every upload still running.
    let mut pending = jobs.into_iter();
    let mut tasks = tokio::task::JoinSet::new();
    let mut results: Vec<(Job, Result<Uploaded, UploadError>)> = Vec::new();
    loop {
        while tasks.len() < files_at_once {
            let Some(Planned { mut job, walked }) = pending.next() else {
                break;
            };
            let (engine, out) = (engine.clone(), out.clone());
            // Boxed: the upload's future is large, and tokio copies a
            // task's future whole when it is spawned and at each change of
            // its stage; a box is copied once.
            tasks.spawn(Box::pin(async move {
                let progress = out.progress_for(&job);
                let t = Instant::now();
                let opened = match walked {
                    None => None,
                    Some(w) => {
                        let path = job.path.clone();
                        // Off the runtime: an open can hang on a network
                        // filesystem.
                        Some(
                            tokio::task::spawn_blocking(move || open_walked(&path, w))
                                .await
                                .unwrap_or_else(|e| {
                                    Err(UploadError::Read {
                                        path: job.path.clone(),
                                        source: std::io::Error::other(e.to_string()),
                                    })
                                }),
                        )
                    }
                };
                let r = match opened {
                    Some(Err(e)) => Err(e),
                    opened => {
                        job.opened = opened.and_then(Result::ok);
                        engine.upload(&job, progress).await
                    }
                };
                out.file_done(&job, &r, t.elapsed());
                (job, r)
            }));
        }
        match tasks.join_next().await {
            None => break,
            Some(Ok(r)) => results.push(r),
            Some(Err(e)) => return Err(format!("an upload task failed: {e}").into()),
        }
    }
    let mut ok = Vec::new();
    let mut exists = Vec::new();
    let mut bad = Vec::new();
    for (job, r) in results {
        match r {
            Ok(u) => ok.push(u),
            Err(e) if e.is_exists() => exists.push(Skipped {
                path: job.path,
                reason: e.to_string(),
            }),
            Err(e) => bad.push(Skipped {
                path: job.path,
                reason: e.to_string(),
            }),
        }
    }
    Ok((ok, exists, bad))
}

/// Opens a file found inside a named folder, without following a link at
/// its name, and checks it is the file the walk saw: a link or another file
/// put in its place since (by anyone who may write in that folder, or
/// above it) is refused, not sent.
///
/// The name is first opened as a handle that reads nothing (`O_PATH`), and
/// only a regular file with the walk's (device, inode) is then opened for
/// reading, through that handle: a device put in its place (a folder above
/// swapped for a link to `/dev`) is never opened.
fn open_walked(path: &Path, walked: (u64, u64)) -> Result<Arc<std::fs::File>, UploadError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| UploadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let replaced = || {
        read_err(std::io::Error::other(
            "replaced by a link or another file since its folder was listed; not sent",
        ))
    };
    let is_walked = |m: &std::fs::Metadata| m.is_file() && (m.dev(), m.ino()) == walked;
    let handle = rustix::fs::open(
        path,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map(std::fs::File::from)
    .map_err(|e| read_err(e.into()))?;
    if !is_walked(&handle.metadata().map_err(read_err)?) {
        return Err(replaced());
    }
    // O_NONBLOCK: no FIFO may hold the open (none can be here; cheap).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .or_else(|e| match e.kind() {
            // No /proc (some containers): by name, no link followed, and
            // checked again below.
            std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(path),
            _ => Err(e),
        })
        .map_err(read_err)?;
    if !is_walked(&file.metadata().map_err(read_err)?) {
        return Err(replaced());
    }
    Ok(Arc::new(file))
}

/// How results are shown: bars on a terminal, plain lines, or JSON lines.
struct Output {
    bucket: String,
    json: bool,
    bars: Option<MultiProgress>,
    total: std::sync::OnceLock<ProgressBar>,
}

impl Output {
    fn new(args: &PushArgs, bucket: &str) -> Self {
        let bars = (!args.json && !args.no_progress && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Output {
            bucket: bucket.to_string(),
            json: args.json,
            bars,
            total: std::sync::OnceLock::new(),
        }
    }

    fn begin<'a>(&self, jobs: impl ExactSizeIterator<Item = &'a Job> + Clone) {
        let Some(bars) = &self.bars else { return };
        let bytes: u64 = jobs
            .clone()
            .filter_map(|j| std::fs::metadata(&j.path).ok())
            .map(|m| m.len())
            .sum();
        let total = bars.add(ProgressBar::new(bytes));
        total.set_style(
            ProgressStyle::with_template(
                "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        total.set_message(format!("{} files", jobs.len()));
        let _ = self.total.set(total);
    }

    fn progress_for(&self, job: &Job) -> ProgressFn {
        let Some(bars) = &self.bars else {
            return Arc::new(|_| {});
        };
        let size = std::fs::metadata(&job.path).map(|m| m.len()).unwrap_or(0);
        let bar = bars.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template("{wide_msg} {bytes:>10}/{total_bytes:<10} {percent:>3}%")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(job.key.clone());
        let total = self.total.get().cloned();
        Arc::new(move |n| {
            bar.inc(n);
            if let Some(t) = &total {
                t.inc(n);
            }
            if bar.position() >= bar.length().unwrap_or(0) {
                bar.finish_and_clear();
            }
        })
    }

    fn file_done(&self, job: &Job, r: &Result<Uploaded, UploadError>, took: Duration) {
        match r {
            Ok(u) => self.uploaded(job, u, took),
            Err(e) if e.is_exists() => self.exists(job, &e.to_string()),
            Err(e) => self.failed(&job.path, Some(&job.key), &e.to_string()),
        }
    }

    fn println(&self, line: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(line);
            }
            None => {
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{line}");
            }
        }
    }

    fn uploaded(&self, job: &Job, u: &Uploaded, took: Duration) {
        if self.json {
            // The receipt's fields (those of `putonly receipts --json`),
            // plus how it went.
            let receipt = Receipt::of_upload(&job.path, &self.bucket, u, crate::ground::now());
            // Strings and numbers only: this cannot fail, but if it did the
            // line says so rather than dropping the receipt unseen.
            let mut line = serde_json::to_value(&receipt).unwrap_or_else(|e| {
                json!({
                    "path": job.path.to_string_lossy(),
                    "key": u.key,
                    "error": format!("cannot show the receipt: {e}"),
                })
            });
            if let Some(fields) = line.as_object_mut() {
                fields.insert("status".into(), json!("uploaded"));
                fields.insert("parts".into(), json!(u.parts));
                fields.insert("seconds".into(), json!(took.as_secs_f64()));
            }
            self.println(&line.to_string());
        } else {
            self.println(&crate::ground::printable::printable(&format!(
                "uploaded {} -> s3://{}/{} ({}, {:.1}s)",
                job.path.display(),
                self.bucket,
                u.key,
                bytesize::ByteSize(u.size).display().iec(),
                took.as_secs_f64()
            )));
        }
    }

    /// Not sent: the key already held an object, left as it is.
    fn exists(&self, job: &Job, reason: &str) {
        if self.json {
            self.println(
                &json!({
                    "path": job.path.to_string_lossy(),
                    "bucket": self.bucket,
                    "key": job.key,
                    "status": "exists",
                    "reason": reason,
                })
                .to_string(),
            );
        } else {
            self.println(&crate::ground::printable::printable(&format!(
                "exists {} -> s3://{}/{}: not sent, the key already holds an object (left as it is)",
                job.path.display(),
                self.bucket,
                job.key,
            )));
        }
    }

    fn failed(&self, path: &Path, key: Option<&str>, reason: &str) {
        if self.json {
            self.println(
                &json!({
                    "path": path.to_string_lossy(),
                    "bucket": self.bucket,
                    "key": key,
                    "status": "failed",
                    "error": reason,
                })
                .to_string(),
            );
        } else {
            let line = crate::ground::printable::printable(&format!(
                "putonly: failed: {}: {reason}",
                path.display()
            ))
            .into_owned();
            match &self.bars {
                Some(bars) => {
                    let _ = bars.println(&line);
                }
                None => eprintln!("{line}"),
            }
        }
    }

    fn skipped(&self, path: &Path, reason: &str) {
        if self.json {
            self.println(
                &json!({
                    "path": path.to_string_lossy(),
                    "bucket": self.bucket,
                    "status": "skipped",
                    "reason": reason,
                })
                .to_string(),
            );
        } else {
            let line = crate::ground::printable::printable(&format!(
                "putonly: skipped: {:?}: {reason}",
                path
            ))
            .into_owned();
            match &self.bars {
                Some(bars) => {
                    let _ = bars.println(&line);
                }
                None => eprintln!("{line}"),
            }
        }
    }

    fn finish(&self) {
        if let Some(bars) = &self.bars {
            let _ = bars.clear();
        }
    }

    fn summary(
        &self,
        done: &[Uploaded],
        exists: usize,
        failed: usize,
        skipped: usize,
        took: Duration,
    ) {
        let bytes: u64 = done.iter().map(|u| u.size).sum();
        let rate = bytes as f64 / took.as_secs_f64().max(0.001);
        let mut line = format!(
            "{} uploaded ({} in {:.1}s, {}/s), {} failed",
            done.len(),
            bytesize::ByteSize(bytes).display().iec(),
            took.as_secs_f64(),
            bytesize::ByteSize(rate as u64).display().iec(),
            failed
        );
        if exists > 0 {
            line.push_str(&format!(", {exists} exists (not overwritten)"));
        }
        if skipped > 0 {
            line.push_str(&format!(", {skipped} skipped"));
        }
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Line {
        #[command(flatten)]
        push: PushArgs,
    }

    fn prefix_for(allowed: &str, line: &[&str]) -> Result<String, String> {
        let text = format!("[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = {allowed}\n");
        let raw = crate::config::RawConfig::parse(&text)?;
        let settings = Settings::resolve(&raw).map_err(|e| e.to_string())?;
        let args = Line::try_parse_from(std::iter::once("push").chain(line.iter().copied()))
            .map_err(|e| e.to_string())?;
        choose_prefix(&args.push, &settings)
    }

    #[test]
    fn files_go_into_the_prefix_as_into_a_folder() {
        // The only allowed prefix, given without its slash: "foo/report.csv",
        // never "fooreport.csv".
        assert_eq!(prefix_for("[\"foo\"]", &["a.csv"]).unwrap(), "foo/");
        assert_eq!(prefix_for("[\"foo/\"]", &["a.csv"]).unwrap(), "foo/");
        assert_eq!(
            prefix_for(
                "[\"foo/\", \"fighters/\"]",
                &["--prefix", "fighters", "a.csv"]
            )
            .unwrap(),
            "fighters/"
        );
        let err = prefix_for("[\"foo/\", \"fighters/\"]", &["a.csv"]).unwrap_err();
        assert!(err.contains("--prefix"), "{err}");
    }

    /// A file swapped for a link or another file between the folder's walk
    /// and its upload is refused; the file the walk saw is opened.
    #[test]
    fn a_file_replaced_since_the_walk_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (a, secret) = (dir.path().join("a.csv"), dir.path().join("secret"));
        std::fs::write(&a, b"rows").unwrap();
        std::fs::write(&secret, b"not for the bucket").unwrap();
        let m = std::fs::metadata(&a).unwrap();
        let walked = (m.dev(), m.ino());
        assert!(open_walked(&a, walked).is_ok());
        std::fs::remove_file(&a).unwrap();
        std::os::unix::fs::symlink(&secret, &a).unwrap();
        let err = open_walked(&a, walked).unwrap_err().to_string();
        assert!(err.contains("replaced by a link or another file"), "{err}");
        std::fs::remove_file(&a).unwrap();
        std::fs::hard_link(&secret, &a).unwrap();
        let err = open_walked(&a, walked).unwrap_err().to_string();
        assert!(err.contains("replaced by a link or another file"), "{err}");
    }

    /// A file found in a named folder is planned with the (device, inode)
    /// the walk saw, unless links are followed.
    #[test]
    fn files_in_a_named_folder_are_planned_with_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.csv"), b"rows").unwrap();
        let m = std::fs::metadata(dir.path().join("a.csv")).unwrap();
        let folder = dir.path().to_str().unwrap();
        let planned = |line: &[&str]| {
            let text = "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n";
            let settings =
                Settings::resolve(&crate::config::RawConfig::parse(text).unwrap()).unwrap();
            let args =
                Line::try_parse_from(std::iter::once("push").chain(line.iter().copied())).unwrap();
            let p = plan(&args.push, "foo/", &settings);
            assert_eq!(p.jobs.len(), 1);
            (p.jobs[0].job.key.clone(), p.jobs[0].walked)
        };
        assert_eq!(
            planned(&[folder]),
            ("foo/a.csv".to_string(), Some((m.dev(), m.ino())))
        );
        assert_eq!(
            planned(&["--follow-links", folder]),
            ("foo/a.csv".to_string(), None)
        );
    }
}
