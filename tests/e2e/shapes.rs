//! "Finished" where putonly is deployed: the agent runs as root, as an
//! unprivileged user with and without `CAP_LEASE`, and in its own PID
//! namespace, against producers that are another user in the host
//! namespace (see `support::shape`). In every shape: a writer that pauses
//! with the file open for several times `settle`, a writer that reopens a
//! finished file during its upload, a file rewritten (and held open) while
//! it waits in a backlog, a file found open by the start-up scan, a
//! same-size rewrite with the mtime restored, and folder links present at
//! start-up and moved in later. No object may ever hold the content of a
//! file still open for writing (checked during the pauses, and from every
//! write the proxy saw), every byte written arrives with
//! `after_upload = "delete"`, and nothing behind a link is sent.
//!
//! Where the test process is not root these tests are skipped with a
//! message; CI runs as root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

use crate::agent::{Agent, BUCKET};
use crate::support::moto::Moto;
use crate::support::proxy::Proxy;
use crate::support::shape::{self, Shape, WRITER_USER};
use crate::support::{bytes, putonly};

const MIB: usize = 1024 * 1024;

struct World {
    shape: Shape,
    moto: Moto,
    proxy: Proxy,
    work: tempfile::TempDir,
    keep: PathBuf,
    del: PathBuf,
    /// Watched with `stream = true`.
    stream: PathBuf,
    src: PathBuf,
    config: PathBuf,
    creds: PathBuf,
    log: PathBuf,
    /// Every broken case, reported together at the end.
    failures: std::sync::Mutex<Vec<String>>,
}

impl World {
    async fn new(shape: Shape) -> World {
        let moto = Moto::start();
        let proxy = Proxy::start(&moto.url).await;
        let work = tempfile::tempdir().unwrap();
        shape::chmod(work.path(), 0o755);
        let writer = shape::user(WRITER_USER);
        let out = work.path().join("out");
        let (keep, del, stream) = (out.join("keep"), out.join("del"), out.join("stream"));
        for d in [&keep, &del, &stream] {
            std::fs::create_dir_all(d).unwrap();
            shape::chown(d, writer);
            // The agent may rename and delete in them (after_upload).
            shape::chmod(d, 0o777);
        }
        shape::chmod(&out, 0o755);
        let src = work.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let state = work.path().join("agent").join("state");
        let (agent_dir, config) = shape::agent_folder(
            &moto,
            &proxy.url,
            work.path(),
            &format!(
                "[bucket]\nname = \"{BUCKET}\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n\
                 [state]\ndir = \"{state}\"\n\
                 [[watch]]\npath = \"{keep}\"\nprefix = \"fighters/keep/\"\nsettle = \"1s\"\n\
                 [[watch]]\npath = \"{del}\"\nprefix = \"fighters/del/\"\nsettle = \"1s\"\nafter_upload = \"delete\"\n\
                 [[watch]]\npath = \"{stream}\"\nprefix = \"fighters/stream/\"\nsettle = \"1s\"\nstream = true\n\
                 [agent]\nrescan_interval = \"1h\"\nshutdown_timeout = \"10s\"\n\
                 [upload]\nconcurrency = 2\npart_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nbandwidth_limit = \"6MiB/s\"\n",
                state = state.display(),
                keep = keep.display(),
                del = del.display(),
                stream = stream.display(),
            ),
            shape,
        );
        let log = work.path().join("agent.log");
        World {
            shape,
            moto,
            proxy,
            keep,
            del,
            stream,
            src,
            creds: agent_dir,
            config,
            log,
            work,
            failures: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Records a broken case (with the agent's log tail) and goes on.
    fn check(&self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            let msg = format!("[{}] {}", self.shape.name(), what());
            eprintln!("FAILED CASE: {msg}");
            self.failures.lock().unwrap().push(msg);
        }
        ok
    }

    /// Panics with every broken case, if any.
    fn verdict(&self) {
        let failures = self.failures.lock().unwrap();
        assert!(
            failures.is_empty(),
            "{} case(s) broken:\n{}\n--- agent log tail\n{}",
            failures.len(),
            failures.join("\n"),
            self.log_tail()
        );
    }

    /// A source file for the writer, `len` pseudo-random bytes.
    fn source(&self, name: &str, len: usize, seed: u64) -> (String, Vec<u8>) {
        let data = bytes(len, seed);
        let p = self.src.join(name);
        std::fs::write(&p, &data).unwrap();
        shape::chmod(&p, 0o644);
        (format!("write:{}", p.display()), data)
    }

    /// Runs the writer script on `path` and returns its output lines as
    /// they come.
    fn write(&self, path: &Path, ops: &[&str]) -> Producer {
        let ops: Vec<String> = ops.iter().map(|s| s.to_string()).collect();
        let mut child = shape::writer(path, &ops).spawn().expect("start the writer");
        let stdout = child.stdout.take().expect("writer stdout");
        Producer {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    fn agent_cmd(&self) -> tokio::process::Command {
        let mut cmd = putonly(Some(&self.creds));
        cmd.env("HOME", &self.creds);
        cmd
    }

    async fn start_agent(&self) -> Agent {
        Agent::spawn_in(self.agent_cmd(), self.shape, &self.config, &self.log).await
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Successful writes of `key` and the object size each announced.
    fn writes_of(&self, key: &str) -> Vec<Option<u64>> {
        crate::support::proxy::sizes_written(&self.proxy.records(), key)
    }

    async fn object(&self, key: &str) -> Option<Vec<u8>> {
        self.moto.object(BUCKET, key).await
    }

    /// Waits until `key` holds exactly `data`; a broken case if it does not
    /// within `limit`.
    async fn wait_object(&self, key: &str, data: &[u8], limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.object(key).await;
            if now.as_deref() == Some(data) {
                return true;
            }
            if Instant::now() > deadline {
                return self.check(false, || {
                    format!(
                        "{key} did not arrive as written ({} bytes) within {limit:?}: it holds {:?} bytes; writes of it announced {:?}",
                        data.len(),
                        now.map(|d| d.len()),
                        self.writes_of(key)
                    )
                });
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until the proxy saw `op` for `key` answered 200.
    async fn wait_request(&self, op: &str, key: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self
            .proxy
            .records()
            .iter()
            .any(|r| r.op == op && r.status == 200 && r.key.as_deref() == Some(key))
        {
            if Instant::now() > deadline {
                return self.check(false, || format!("no {op} for {key} within {limit:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// While a writer holds the file open: nothing of it in the bucket, and
    /// no write of it crossed the wire.
    async fn assert_not_sent(&self, key: &str, when: &str) {
        let object = self.object(key).await.map(|d| d.len());
        let writes = self.writes_of(key);
        self.check(object.is_none() && writes.is_empty(), || {
            format!("{key} was uploaded {when}: object of {object:?} bytes, writes announcing {writes:?}")
        });
    }
}

struct Producer {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Producer {
    /// The next line the writer printed.
    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .expect("the writer answers")
            .expect("read the writer")
            .expect("the writer ended early")
    }

    /// Waits for `mark`, returning the lines before it.
    async fn until(&mut self, mark: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let l = self.line().await;
            if l == mark {
                return seen;
            }
            seen.push(l);
        }
    }

    async fn finish(mut self) {
        let status = self.child.wait().await.unwrap();
        assert!(status.success(), "the writer failed");
    }
}

/// Seconds an `open` took, from the writer's `opened S` lines.
fn open_seconds(lines: &[String]) -> Vec<f64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("opened "))
        .filter_map(|s| s.parse().ok())
        .collect()
}

async fn each_case_in(shape: Shape) {
    if let Some(why) = shape::unavailable() {
        eprintln!("skipped ({}): {why}", shape.name());
        return;
    }
    let w = World::new(shape).await;
    let mut finals: BTreeMap<String, Vec<u8>> = BTreeMap::new();

    // Present at start-up: a link to a folder outside the tree, and a file
    // its writer holds open (found by the scan, its history unknown).
    let outside1 = w.work.path().join("outside1");
    std::fs::create_dir_all(&outside1).unwrap();
    shape::chmod(&outside1, 0o755);
    std::fs::write(outside1.join("before.txt"), b"outside, before").unwrap();
    std::os::unix::fs::symlink(&outside1, w.keep.join("linked")).unwrap();
    let (e1, e1_data) = w.source("early-1", MIB, 1);
    let (e2, e2_data) = w.source("early-2", MIB, 2);
    let mut early = w.write(
        &w.keep.join("early.bin"),
        &["open:trunc", &e1, "mark:open", "sleep:10", &e2, "close"],
    );
    early.until("open").await;
    finals.insert(
        "fighters/keep/early.bin".into(),
        [e1_data, e2_data].concat(),
    );
    // Found open at start-up where files are deleted after upload, its
    // writer silent for longer than the weak rule's quiet time and then
    // writing on: where the weak rule sends it meanwhile, the file must
    // stay (the /proc check cannot see another user's writer), or the rest
    // goes into a deleted file.
    let (h1, h1_data) = w.source("held-1", MIB, 40);
    let (h2, h2_data) = w.source("held-2", MIB, 41);
    let held = w.del.join("held.bin");
    let mut held_writer = w.write(
        &held,
        &[
            "open:trunc",
            &h1,
            "mark:open",
            "sleep:80",
            &h2,
            "close",
            "mark:closed",
        ],
    );
    held_writer.until("open").await;

    let agent = w.start_agent().await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Files appearing behind links: one present at start-up, one inside a
    // folder moved into the tree.
    std::fs::write(outside1.join("late.txt"), b"outside, late").unwrap();
    shape::chmod(&outside1.join("late.txt"), 0o644);
    let outside2 = w.work.path().join("outside2");
    std::fs::create_dir_all(&outside2).unwrap();
    shape::chmod(&outside2, 0o755);
    std::fs::write(outside2.join("pre.txt"), b"outside2, before the move").unwrap();
    let staging = w.work.path().join("staging/sub");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("real.txt"), b"a real file, moved in").unwrap();
    std::os::unix::fs::symlink(&outside2, staging.join("inner")).unwrap();
    std::fs::rename(&staging, w.keep.join("sub")).unwrap();
    finals.insert(
        "fighters/keep/sub/real.txt".into(),
        b"a real file, moved in".to_vec(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::write(outside2.join("late2.txt"), b"outside2, after the move").unwrap();

    // Found open at start-up: not sent while open (4 s of quiet so far).
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.assert_not_sent(
        "fighters/keep/early.bin",
        "while its writer (found by the scan) had it open",
    )
    .await;

    // A writer pausing 6 s (6 × settle) with the file open; deleted after.
    let (a1, a1_data) = w.source("paused-1", MIB, 3);
    let (a2, a2_data) = w.source("paused-2", MIB, 4);
    let paused = w.del.join("paused.bin");
    let mut p = w.write(
        &paused,
        &[
            "open:trunc",
            &a1,
            "mark:paused",
            "sleep:6",
            &a2,
            "close",
            "mark:closed",
        ],
    );
    p.until("paused").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    w.assert_not_sent("fighters/del/paused.bin", "during its writer's pause")
        .await;
    p.until("closed").await;
    p.finish().await;
    let paused_data = [a1_data, a2_data].concat();
    w.wait_object(
        "fighters/del/paused.bin",
        &paused_data,
        Duration::from_secs(60),
    )
    .await;
    finals.insert("fighters/del/paused.bin".into(), paused_data);
    let deadline = Instant::now() + Duration::from_secs(20);
    while paused.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.check(!paused.exists(), || {
        "paused.bin was not deleted after its upload".into()
    });
    early.finish().await;

    // A finished file reopened by its writer during its upload.
    let (big, big_data) = w.source("big16", 16 * MIB, 5);
    let (more, more_data) = w.source("more", MIB, 6);
    let reopened = w.keep.join("reopened.bin");
    let mut r = w.write(&reopened, &["open:trunc", &big, "close", "mark:closed"]);
    r.until("closed").await;
    r.finish().await;
    w.wait_request(
        "CreateMultipartUpload",
        "fighters/keep/reopened.bin",
        Duration::from_secs(30),
    )
    .await;
    let mut r = w.write(&reopened, &["open:append", &more, "close", "mark:done"]);
    let opened = open_seconds(&r.until("done").await);
    r.finish().await;
    let reopened_data = [big_data, more_data].concat();
    w.wait_object(
        "fighters/keep/reopened.bin",
        &reopened_data,
        Duration::from_secs(60),
    )
    .await;
    finals.insert("fighters/keep/reopened.bin".into(), reopened_data);
    // The upload under way was abandoned (a second multipart upload sent
    // the final file), by the lease break where there is a lease.
    let creates = w
        .proxy
        .records()
        .iter()
        .filter(|r| {
            r.op == "CreateMultipartUpload"
                && r.status == 200
                && r.key.as_deref() == Some("fighters/keep/reopened.bin")
        })
        .count();
    w.check(creates >= 2, || {
        format!("the upload of reopened.bin was not abandoned ({creates} multipart uploads)")
    });
    let log = std::fs::read_to_string(&w.log).unwrap_or_default();
    if shape.has_lease() {
        w.check(
            log.contains("a process opened it for writing during its upload"),
            || "the lease break did not abandon the upload".into(),
        );
        // The lease was broken and released at once, not after the
        // kernel's lease-break-time (45 s).
        w.check(opened.iter().all(|s| *s < 2.0), || {
            format!("the writer's open was held up {opened:?} s")
        });
    }

    // A file rewritten, and held open, while it waits behind a backlog.
    let (ba, ba_data) = w.source("big-a", 12 * MIB, 7);
    let (bb, bb_data) = w.source("big-b", 12 * MIB, 8);
    for (name, op) in [("big-a.bin", &ba), ("big-b.bin", &bb)] {
        w.write(&w.keep.join(name), &["open:trunc", op, "close"])
            .finish()
            .await;
    }
    finals.insert("fighters/keep/big-a.bin".into(), ba_data);
    finals.insert("fighters/keep/big-b.bin".into(), bb_data);
    w.wait_request(
        "CreateMultipartUpload",
        "fighters/keep/big-a.bin",
        Duration::from_secs(30),
    )
    .await;
    w.wait_request(
        "CreateMultipartUpload",
        "fighters/keep/big-b.bin",
        Duration::from_secs(30),
    )
    .await;
    let (old, _) = w.source("old", 100_000, 9);
    let backlog = w.keep.join("backlog.txt");
    w.write(&backlog, &["open:trunc", &old, "close"])
        .finish()
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // judged finished, queued
    let (half, half_data) = w.source("half", 150_000, 10);
    let (rest, rest_data) = w.source("rest", 150_000, 11);
    let mut b = w.write(
        &backlog,
        &[
            "open:trunc",
            &half,
            "mark:half",
            "sleep:5",
            &rest,
            "close",
            "mark:closed",
        ],
    );
    b.until("half").await;
    b.until("closed").await;
    b.finish().await;
    let backlog_data = [half_data.clone(), rest_data].concat();
    w.wait_object(
        "fighters/keep/backlog.txt",
        &backlog_data,
        Duration::from_secs(60),
    )
    .await;
    // Only finished versions: the old one (100,000 bytes, if it went before
    // the rewrite) or the new one, never the half written during the pause.
    let sizes = w.writes_of("fighters/keep/backlog.txt");
    w.check(
        sizes
            .iter()
            .all(|s| *s == Some(100_000) || *s == Some(300_000)),
        || format!("a half-rewritten backlog.txt was sent (writes announcing {sizes:?})"),
    );
    finals.insert("fighters/keep/backlog.txt".into(), backlog_data);

    // Rewritten with the same size and its mtime restored (cp -p, rsync -t).
    let (sa, sa_data) = w.source("same-a", 4096, 12);
    let (sb, sb_data) = w.source("same-b", 4096, 13);
    let same = w.keep.join("same.txt");
    w.write(&same, &["open:trunc", &sa, "close"]).finish().await;
    w.wait_object("fighters/keep/same.txt", &sa_data, Duration::from_secs(30))
        .await;
    let mtime = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&same).unwrap();
        m.mtime() * 1_000_000_000 + m.mtime_nsec()
    };
    let utime = format!("utime:{mtime}");
    w.write(&same, &["open:trunc", &sb, "close", &utime])
        .finish()
        .await;
    w.wait_object("fighters/keep/same.txt", &sb_data, Duration::from_secs(30))
        .await;
    finals.insert("fighters/keep/same.txt".into(), sb_data);

    // Written over about 6 s where stream = true: parts go during the
    // write, and the upload they went to is the one completed.
    let mut pieces = Vec::new();
    let mut streamed_data = Vec::new();
    for (i, len) in [5 * MIB, 5 * MIB, 5 * MIB, 5 * MIB, MIB + 7]
        .into_iter()
        .enumerate()
    {
        let (op, data) = w.source(&format!("stream-{i}"), len, 20 + i as u64);
        pieces.push(op);
        streamed_data.extend(data);
    }
    let mut ops: Vec<&str> = vec!["open:trunc"];
    for op in &pieces {
        ops.extend([op.as_str(), "sleep:1.5"]);
    }
    ops.extend(["mark:written", "close"]);
    let mut st = w.write(&w.stream.join("log.bin"), &ops);
    st.until("written").await;
    let written_at = std::time::SystemTime::now();
    st.finish().await;
    let stream_key = "fighters/stream/log.bin";
    w.wait_object(stream_key, &streamed_data, Duration::from_secs(60))
        .await;
    let records = w.proxy.records();
    let parts: Vec<_> = records
        .iter()
        .filter(|r| r.op == "UploadPart" && r.status == 200 && r.key.as_deref() == Some(stream_key))
        .collect();
    let during = parts.iter().filter(|r| r.at < written_at).count();
    let completed = records.iter().find(|r| {
        r.op == "CompleteMultipartUpload" && r.status == 200 && r.key.as_deref() == Some(stream_key)
    });
    w.check(during >= 2, || {
        format!("only {during} parts of {stream_key} were sent while it was written")
    });
    w.check(
        completed.is_some_and(|c| parts.first().is_some_and(|p| p.upload_id == c.upload_id)),
        || format!("{stream_key} was not completed as the upload its parts streamed to"),
    );
    finals.insert(stream_key.into(), streamed_data);

    // The file held open from start-up: whole in the bucket, and deleted
    // only once whole.
    held_writer.until("closed").await;
    held_writer.finish().await;
    let held_key = "fighters/del/held.bin";
    let held_data = [h1_data, h2_data].concat();
    w.wait_object(held_key, &held_data, Duration::from_secs(90))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while held.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.check(!held.exists(), || {
        "held.bin was not deleted after its whole upload".into()
    });
    if !shape.has_lease() {
        // Sent by the weak rule while held open: kept, and said why.
        let sizes = w.writes_of(held_key);
        let log = std::fs::read_to_string(&w.log).unwrap_or_default();
        w.check(
            sizes.len() < 2
                || log
                    .lines()
                    .any(|l| l.contains("held.bin") && l.contains("/proc cannot show every writer")),
            || format!("held.bin was sent while held open ({sizes:?}) and the log does not say why it stayed"),
        );
    }
    finals.insert(held_key.into(), held_data);

    // Everything written arrived, and no write of a file ever announced
    // another size than its final one (same.txt and backlog.txt had other
    // finished versions before; held.bin, under the weak rule, may too).
    for (key, data) in &finals {
        w.wait_object(key, data, Duration::from_secs(60)).await;
        if !key.ends_with("same.txt") && !key.ends_with("backlog.txt") && !key.ends_with("held.bin")
        {
            let sizes = w.writes_of(key);
            w.check(sizes.iter().all(|s| *s == Some(data.len() as u64)), || {
                format!(
                    "{key} was written with sizes {sizes:?}, finished at {}",
                    data.len()
                )
            });
        }
    }
    let code = agent.stop().await;
    w.check(code == Some(0), || {
        format!("the agent stopped with {code:?}")
    });
    w.proxy.assert_only_writes();
    let behind_links: Vec<String> = w
        .proxy
        .records()
        .into_iter()
        .filter_map(|r| r.key)
        .filter(|k| k.contains("/linked/") || k.contains("/inner/") || k.contains("outside"))
        .collect();
    w.check(behind_links.is_empty(), || {
        format!("files behind links were sent: {behind_links:?}")
    });

    // The rule each watch ran under, in the log and from `putonly check`.
    let log = std::fs::read_to_string(&w.log).unwrap();
    let check = crate::support::run(
        shape::in_shape(w.agent_cmd(), shape)
            .args(["check", "--offline", "--config"])
            .arg(&w.config),
    )
    .await;
    let report = String::from_utf8_lossy(&check.stdout);
    if shape.has_lease() {
        w.check(log.contains("asked of the kernel"), || {
            "the agent did not log the lease rule".into()
        });
        w.check(
            report.contains("[ ok ] watch[0] finished-file rule: finished = no writer anywhere"),
            || format!("check did not name the lease rule: {report}"),
        );
    } else {
        w.check(log.contains("weaker rule"), || {
            "the agent did not log the weaker rule".into()
        });
        w.check(
            report.contains("[warn] watch[0] finished-file rule:")
                && report.contains("CAP_LEASE is not effective")
                && report.contains("files found by a scan after 1m quiet and a /proc check"),
            || format!("check did not name the weaker rule: {report}"),
        );
    }
    eprintln!(
        "[{}] {} files checked; writer's open during an upload took {opened:?} s",
        shape.name(),
        finals.len()
    );
    w.verdict();
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_means_finished_as_root() {
    each_case_in(Shape::Root).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_means_finished_as_a_user_with_cap_lease() {
    each_case_in(Shape::User { lease: true }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_means_finished_as_a_user_without_cap_lease() {
    each_case_in(Shape::User { lease: false }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_means_finished_in_its_own_pid_namespace() {
    each_case_in(Shape::PidNamespace).await;
}

/// Waits (30 s at most) until the agent's log holds `line`.
async fn log_says(log: &Path, line: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(line)
    {
        assert!(
            Instant::now() < deadline,
            "{what}: the log never said {line:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stop asked in the agent's first milliseconds (systemd stopping a
/// unit that just started, a container runtime, the last agent of the
/// kill -9 loop in agent.rs once every file was already done) ends it with 0,
/// not by SIGTERM's default action, and a SIGHUP then is not a kill: from
/// the start of `main` the agent has handlers for them. Without those,
/// SIGTERM 10 ms after exec killed it every time on an idle machine. The
/// debug build says when they are in place and then pauses
/// (PUTONLY_DEBUG_START_PAUSE_MS); the signal is sent once it said so.
/// In every deployed shape: as root, as the unit's user with and without
/// CAP_LEASE, and as PID 1 of its own PID namespace, where the kernel drops
/// a signal an init has no handler for.
#[tokio::test(flavor = "multi_thread")]
async fn a_signal_during_start_up_is_a_clean_stop_in_every_shape() {
    if let Some(why) = shape::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    for shape in [
        Shape::Root,
        Shape::User { lease: true },
        Shape::User { lease: false },
        Shape::PidNamespace,
    ] {
        let s = World::new(shape).await;
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            let what = format!("signal {signal} during start-up, {}", shape.name());
            let _ = std::fs::remove_file(&s.log);
            let mut cmd = s.agent_cmd();
            cmd.env("PUTONLY_DEBUG_START_PAUSE_MS", "1000");
            let agent = Agent::spawn_in(cmd, shape, &s.config, &s.log).await;
            log_says(&s.log, "PUTONLY_DEBUG: stop signals caught", &what).await;
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(agent.pid(), signal) };
            let code = if signal == libc::SIGHUP {
                // Noted, and the agent goes on; then it is stopped.
                log_says(&s.log, "watching; ready", &what).await;
                let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                assert!(log.contains("SIGHUP during start-up"), "{what}: {log}");
                agent.stop().await
            } else {
                agent.exited(Duration::from_secs(30)).await
            };
            if code != Some(0) {
                let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                panic!("{what}: exit {code:?} (None: killed by it); log:\n{log}");
            }
        }
    }
}
