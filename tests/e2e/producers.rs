//! Real producers: the tools people make files with, each run as another
//! user than the agent (`support::shape::WRITER_USER`), into folders the
//! agent watches, in the deployed shapes (the systemd unit's user with
//! `CAP_LEASE`, the same without it, and root in its own PID namespace as
//! in a container): rsync with and without `--inplace`, GNU tar and
//! bsdtar keeping permissions, `cp -a` of a tree, unzip, curl downloading
//! at a limited rate, `split` followed by a `_SUCCESS` marker, logrotate
//! rotating by rename while the logger still writes and by
//! copy-and-truncate, the sqlite3 shell in rollback and WAL mode, an
//! atomic replace (`mv` of a temporary name) and `sed -i`, `dd
//! conv=notrunc` rewriting the middle of a sent file, `fallocate` then a
//! fill, `cp --reflink=auto`, a hard link added to a sent file, and a file
//! made with `O_TMPFILE` and linked in.
//!
//! For each: every finished file arrives byte for byte, written exactly as
//! many times as it had finished versions (the writes of each key are
//! counted on the wire), no other key is ever written (no temporary,
//! journal or half-written file), a batch's marker only after every other
//! file of its batch, a file deleted only once its object is complete; and
//! the time from the tool's exit to the object (the answer to its last
//! write) is measured and printed as a table (`PRODUCERS` lines), which
//! `docs/producers.md` records. The bounds asserted are loose (a producer's
//! file within 15 s of its tool's exit under the lease rule; under the
//! weaker rule within 60 s plus `settle` and a margin, the documented
//! quiet time of files found by a scan): they catch a file left for the
//! next rescan (set to an hour here), not a slow machine.
//!
//! The tools come from Debian's packages (`scripts/install-producers.sh`,
//! run by `scripts/test.sh`). Where the test process is not root these
//! tests are skipped with a message; CI runs as root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::agent::{Agent, BUCKET};
use crate::support::moto::Moto;
use crate::support::proxy::{Proxy, Record};
use crate::support::shape::{self, Shape, WRITER_USER};
use crate::support::{bytes, putonly};

const MIB: usize = 1024 * 1024;
/// Every watch's `settle`.
const SETTLE: Duration = Duration::from_secs(1);

/// What one case expects of one key: its final bytes, how many times it
/// is written (once per finished version), and when the tool that
/// finished its last version exited.
struct Expect {
    key: String,
    data: Vec<u8>,
    writes: usize,
    exited: SystemTime,
}

/// One measured file: the tool, the time from its exit to the object.
struct Measured {
    tool: &'static str,
    latency: Duration,
    writes: usize,
}

struct World {
    shape: Shape,
    moto: Moto,
    proxy: Proxy,
    _work: tempfile::TempDir,
    /// Sources the writer reads (root's, world-readable).
    src: PathBuf,
    /// Watched, kept: `foo/plain/`. The writer's, 0755.
    plain: PathBuf,
    /// Watched, deleted after upload: `foo/del/`. 0777: the agent deletes.
    del: PathBuf,
    /// Watched, `marker = "_SUCCESS"`, deleted after upload: `foo/batch/`.
    batch: PathBuf,
    config: PathBuf,
    creds: PathBuf,
    log: PathBuf,
    /// The agent's `/metrics` listener.
    metrics: String,
    failures: std::sync::Mutex<Vec<String>>,
    measured: std::sync::Mutex<Vec<Measured>>,
    /// Every key a case expects, and how many times it is written.
    expected: std::sync::Mutex<BTreeMap<String, usize>>,
    /// Files the agent may take only after its restart (see `o_tmpfile`).
    late: std::sync::Mutex<Vec<Expect>>,
}

impl World {
    async fn new(shape: Shape) -> World {
        let moto = Moto::start();
        let proxy = Proxy::start(&moto.url).await;
        let work = tempfile::tempdir().unwrap();
        shape::chmod(work.path(), 0o755);
        let writer = shape::user(WRITER_USER);
        let out = work.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        shape::chmod(&out, 0o755);
        let (plain, del, batch) = (out.join("plain"), out.join("del"), out.join("batch"));
        for (d, mode) in [(&plain, 0o755), (&del, 0o777), (&batch, 0o777)] {
            std::fs::create_dir_all(d).unwrap();
            shape::chown(d, writer);
            shape::chmod(d, mode);
        }
        let src = work.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        shape::chmod(&src, 0o755);
        let state = work.path().join("agent").join("state");
        let metrics = format!("127.0.0.1:{}", crate::support::free_port());
        let (creds, config) = shape::agent_folder(
            &moto,
            &proxy.url,
            work.path(),
            &format!(
                "[bucket]\nname = \"{BUCKET}\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n\
                 [state]\ndir = \"{state}\"\n\
                 [[watch]]\npath = \"{plain}\"\nprefix = \"foo/plain/\"\nsettle = \"1s\"\n\
                 [[watch]]\npath = \"{del}\"\nprefix = \"foo/del/\"\nsettle = \"1s\"\nafter_upload = \"delete\"\n\
                 [[watch]]\npath = \"{batch}\"\nprefix = \"foo/batch/\"\nsettle = \"1s\"\nafter_upload = \"delete\"\nmarker = \"_SUCCESS\"\n\
                 [agent]\nrescan_interval = \"1h\"\nshutdown_timeout = \"10s\"\n\
                 [upload]\npart_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\n\
                 [metrics]\nlisten = \"{metrics}\"\n",
                state = state.display(),
                plain = plain.display(),
                del = del.display(),
                batch = batch.display(),
            ),
            shape,
        );
        let log = work.path().join("agent.log");
        World {
            shape,
            moto,
            proxy,
            src,
            plain,
            del,
            batch,
            config,
            creds,
            log,
            metrics,
            _work: work,
            failures: std::sync::Mutex::new(Vec::new()),
            measured: std::sync::Mutex::new(Vec::new()),
            expected: std::sync::Mutex::new(BTreeMap::new()),
            late: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Records a broken case and goes on.
    fn check(&self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            let msg = format!("[{}] {}", self.shape.name(), what());
            eprintln!("FAILED CASE: {msg}");
            self.failures.lock().unwrap().push(msg);
        }
        ok
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The longest a file may take from its tool's exit to its object: the
    /// lease rule takes it `settle` after it is quiet; the weaker rule
    /// takes a file found by a scan (in a folder it could not read while
    /// the tool filled it, or a new hard link) after 60 s of quiet.
    fn limit(&self) -> Duration {
        if self.shape.has_lease() {
            Duration::from_secs(15)
        } else {
            Duration::from_secs(60) + SETTLE + Duration::from_secs(40)
        }
    }

    /// A source file of `len` pseudo-random bytes, readable by the writer.
    fn source(&self, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
        let data = bytes(len, seed);
        let p = self.src.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, &data).unwrap();
        shape::chmod(&p, 0o644);
        (p, data)
    }

    /// A source tree `name` of a few folders and files (one multipart),
    /// with a tar and a zip of it; returns each file's relative path and
    /// bytes.
    fn tree(&self, name: &str, seed: u64) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        let sizes = [
            ("a.csv", 1000),
            ("b.bin", 64 * 1024),
            ("empty", 0),
            ("d1/c.json", 300_000),
            ("d1/d2/deep.bin", 7 * MIB),
            ("d1/d2/e.txt", 5000),
            ("d3/f.log", MIB + 17),
        ];
        for (i, (rel, len)) in sizes.iter().enumerate() {
            let (_, data) = self.source(&format!("{name}/{rel}"), *len, seed * 100 + i as u64);
            files.insert(rel.to_string(), data);
        }
        let root = self.src.join(name);
        for d in ["", "d1", "d1/d2", "d3"] {
            shape::chmod(&root.join(d), 0o755);
        }
        let ok = |c: &mut std::process::Command| {
            assert!(c.status().unwrap().success(), "{c:?}");
        };
        ok(std::process::Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(self.src.join(format!("{name}.tar")))
            .arg("."));
        ok(std::process::Command::new("zip")
            .arg("-qr")
            .arg(self.src.join(format!("{name}.zip")))
            .arg(".")
            .current_dir(&root));
        for f in [format!("{name}.tar"), format!("{name}.zip")] {
            shape::chmod(&self.src.join(f), 0o644);
        }
        files
    }

    /// Runs `script` with `sh -c` as the writer, in `cwd`; returns when it
    /// exited, as the shell tells it (whatever else this test's task was
    /// doing then).
    async fn tool(&self, cwd: &Path, script: &str) -> SystemTime {
        let timed = format!("{{\n{script}\n}}; rc=$?; date +%s%N; exit $rc");
        let (uid, gid) = shape::user(WRITER_USER);
        let out = tokio::process::Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
                "/bin/sh".into(),
                "-c".into(),
                timed,
            ])
            .current_dir(cwd)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", &self.src)
            .kill_on_drop(true)
            .output()
            .await
            .expect("run the tool");
        let exited = exit_time(&out.stdout);
        self.check(out.status.success(), || {
            format!(
                "the tool failed ({:?}): {script}\n{}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        exited
    }

    /// The successful writes of `key`, in order.
    fn writes(&self, key: &str) -> Vec<Record> {
        crate::support::proxy::writes_of(&self.proxy.records(), key)
    }

    async fn object(&self, key: &str) -> Option<Vec<u8>> {
        self.moto.object(BUCKET, key).await
    }

    /// Waits until every key of `expect` was written as many times as it
    /// has versions, then checks its bytes and measures the time from its
    /// tool's exit to the answer of its last write.
    async fn arrive(&self, tool: &'static str, expect: Vec<Expect>) {
        let deadline = Instant::now() + self.limit();
        for e in expect {
            self.expect(&e);
            let mut writes = self.writes(&e.key);
            while writes.len() < e.writes && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
                writes = self.writes(&e.key);
            }
            if !self.check(writes.len() >= e.writes, || {
                format!(
                    "{tool}: {} written {} time(s) within {:?} of the tool's exit, expected {}",
                    e.key,
                    writes.len(),
                    self.limit(),
                    e.writes
                )
            }) {
                continue;
            }
            let last = writes[e.writes - 1]
                .answered
                .unwrap_or(writes[e.writes - 1].at);
            let latency = last.duration_since(e.exited).unwrap_or(Duration::ZERO);
            let now = self.object(&e.key).await;
            self.check(now.as_deref() == Some(&e.data[..]), || {
                format!(
                    "{tool}: {} holds {:?} bytes, not the {} of the finished file",
                    e.key,
                    now.as_ref().map(Vec::len),
                    e.data.len()
                )
            });
            self.measured.lock().unwrap().push(Measured {
                tool,
                latency,
                writes: e.writes,
            });
        }
    }

    /// Counts `e` among the keys expected.
    fn expect(&self, e: &Expect) {
        let mut expected = self.expected.lock().unwrap();
        let n = expected.entry(e.key.clone()).or_default();
        *n = (*n).max(e.writes);
    }

    /// The expectation of each file of a tree written once by a tool
    /// that exited at `exited`, under `prefix`.
    fn once(prefix: &str, files: &BTreeMap<String, Vec<u8>>, exited: SystemTime) -> Vec<Expect> {
        files
            .iter()
            .map(|(rel, data)| Expect {
                key: format!("{prefix}{rel}"),
                data: data.clone(),
                writes: 1,
                exited,
            })
            .collect()
    }

    /// The file at `path` as it is now (the tool's own output, when the
    /// bytes are its own: a database, a rotated log).
    fn on_disk(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

impl World {
    /// `putonly status --json`, run as the agent's user.
    async fn status(&self) -> serde_json::Value {
        let mut cmd = putonly(Some(&self.creds));
        cmd.env("HOME", &self.creds);
        let out = shape::in_shape(cmd, self.shape)
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()
            .await
            .expect("run putonly status");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "putonly status --json: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// How many folders and files `putonly status` lists as not readable
    /// yet.
    async fn unreadable(&self) -> (u64, u64) {
        let s = self.status().await;
        let n = |k: &str| s["unreadable"][k].as_u64().unwrap_or(0);
        (n("folders"), n("files"))
    }

    /// The `putonly_unreadable` gauge of `kind`.
    async fn gauge(&self, kind: &str) -> f64 {
        let (_, text) = crate::agent::http_get(&self.metrics, "/metrics").await;
        let line = format!("putonly_unreadable{{kind=\"{kind}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// The time a producer printed as its last line (nanoseconds since the
/// epoch), or now.
fn exit_time(stdout: &[u8]) -> SystemTime {
    String::from_utf8_lossy(stdout)
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .map_or_else(SystemTime::now, |ns| {
            std::time::UNIX_EPOCH + Duration::from_nanos(ns)
        })
}

/// The expectation of one file.
fn single(key: impl Into<String>, data: Vec<u8>, writes: usize, exited: SystemTime) -> Vec<Expect> {
    vec![Expect {
        key: key.into(),
        data,
        writes,
        exited,
    }]
}

/// A count of files and the first few, for failure messages.
fn few(keys: &[String]) -> String {
    format!("{} {:?}", keys.len(), &keys[..keys.len().min(8)])
}

// ---- the cases: each runs its tools and waits for what they made ----

/// A tool that makes a tree into `plain/<dest>/` with `script`, in which
/// `{tree}`, `{tar}` and `{zip}` name the source tree `name` and its
/// archives: every file arrives once.
async fn tree_tool(w: &World, tool: &'static str, name: &str, seed: u64, dest: &str, script: &str) {
    let files = w.tree(name, seed);
    let src = |ext: &str| w.src.join(format!("{name}{ext}")).display().to_string();
    let script = script
        .replace("{tree}", &src(""))
        .replace("{tar}", &src(".tar"))
        .replace("{zip}", &src(".zip"));
    let exited = w.tool(&w.plain, &script).await;
    w.arrive(
        tool,
        World::once(&format!("foo/plain/{dest}/"), &files, exited),
    )
    .await;
}

async fn rsync(w: &World) {
    tree_tool(
        w,
        "rsync -a",
        "rsync",
        1,
        "rsync",
        "rsync -a {tree}/ rsync/",
    )
    .await;
}

async fn rsync_inplace(w: &World) {
    let files = w.tree("inplace", 2);
    let src = w.src.join("inplace");
    let exited = w
        .tool(
            &w.plain,
            &format!("rsync -a --inplace {}/ inplace/", src.display()),
        )
        .await;
    w.arrive(
        "rsync -a --inplace",
        World::once("foo/plain/inplace/", &files, exited),
    )
    .await;
    // A second run after one source file changed (same size): rsync
    // rewrites it in place, the others are left alone.
    let (_, changed) = w.source("inplace/d1/c.json", 300_000, 999);
    let exited2 = w
        .tool(
            &w.plain,
            &format!("rsync -a --inplace {}/ inplace/", src.display()),
        )
        .await;
    let mut expect = World::once("foo/plain/inplace/", &files, exited);
    for e in expect.iter_mut().filter(|e| e.key.ends_with("d1/c.json")) {
        e.data = changed.clone();
        e.writes = 2;
        e.exited = exited2;
    }
    expect.retain(|e| e.writes == 2);
    w.arrive("rsync -a --inplace (again)", expect).await;
}

async fn gnu_tar(w: &World) {
    let script = "mkdir tar && tar -C tar -xpf {tar}";
    tree_tool(w, "GNU tar -xp", "tar", 3, "tar", script).await;
}

async fn bsdtar(w: &World) {
    let script = "mkdir bsdtar && bsdtar -C bsdtar -xpf {tar}";
    tree_tool(w, "bsdtar -xp", "bsdtar", 4, "bsdtar", script).await;
}

async fn cp_a(w: &World) {
    tree_tool(w, "cp -a", "cpa", 5, "cp-a", "cp -a {tree} cp-a").await;
}

async fn unzip(w: &World) {
    let script = "unzip -q {zip} -d unzip";
    tree_tool(w, "unzip", "unzip", 6, "unzip", script).await;
}

/// curl at 1 MiB/s: the file is written for about 3 s under its final
/// name, into a folder whose files are deleted once sent.
async fn curl(w: &World) {
    let (path, data) = w.source("www/download.bin", 3 * MIB, 7);
    shape::chmod(path.parent().unwrap(), 0o755);
    let port = crate::support::free_port();
    let mut server = tokio::process::Command::new(shape::python().expect("python3"))
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .arg("--directory")
        .arg(path.parent().unwrap())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/download.bin");
    let exited = w
        .tool(
            &w.del,
            &format!(
                "for i in $(seq 50); do curl -sSf -o /dev/null {url} 2>/dev/null && break; sleep 0.1; done; \
                 curl -sSf --limit-rate 1M -o download.bin {url}"
            ),
        )
        .await;
    let _ = server.kill().await;
    let key = "foo/del/download.bin";
    w.arrive("curl --limit-rate", single(key, data, 1, exited))
        .await;
    deleted_after_its_object(w, &w.del.join("download.bin"), key).await;
}

/// A file of a watch with `after_upload = "delete"` goes once its object is
/// complete, never before.
async fn deleted_after_its_object(w: &World, path: &Path, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while path.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone = SystemTime::now();
    let complete = w.writes(key).first().map(|r| r.answered.unwrap_or(r.at));
    w.check(!path.exists(), || {
        format!("{} was not deleted", path.display())
    });
    w.check(complete.is_some_and(|c| c <= gone), || {
        format!(
            "{} was deleted before its object was complete",
            path.display()
        )
    });
}

/// split into parts, then the marker: the marker's object comes after
/// every part's, and each file is deleted only once sent. (The batch's
/// folder lets others write in it: the agent deletes there.)
async fn split_and_marker(w: &World) {
    let (big, data) = w.source("split.bin", 3 * MIB + 5, 8);
    let exited = w
        .tool(
            &w.batch,
            &format!(
                "mkdir -m 777 run1 && cd run1 && split -b 512K -d {} part- && touch _SUCCESS",
                big.display()
            ),
        )
        .await;
    let mut expect = Vec::new();
    for (i, chunk) in data.chunks(512 * 1024).enumerate() {
        expect.push(Expect {
            key: format!("foo/batch/run1/part-{i:02}"),
            data: chunk.to_vec(),
            writes: 1,
            exited,
        });
    }
    let parts: Vec<String> = expect.iter().map(|e| e.key.clone()).collect();
    expect.push(Expect {
        key: "foo/batch/run1/_SUCCESS".into(),
        data: Vec::new(),
        writes: 1,
        exited,
    });
    w.arrive("split + _SUCCESS", expect).await;
    let marker_sent = w
        .proxy
        .records()
        .into_iter()
        .find(|r| r.key.as_deref() == Some("foo/batch/run1/_SUCCESS"))
        .map(|r| r.at);
    let last_part = parts
        .iter()
        .filter_map(|k| w.writes(k).first().map(|r| r.answered.unwrap_or(r.at)))
        .max();
    w.check(
        matches!((marker_sent, last_part), (Some(m), Some(p)) if m >= p),
        || format!("the marker was sent ({marker_sent:?}) before the last part was complete ({last_part:?})"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let folder = w.batch.join("run1");
    let left = || -> Vec<String> {
        std::fs::read_dir(&folder)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    while !left().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.check(left().is_empty(), || {
        format!("files of the batch not deleted: {:?}", left())
    });
}

/// A logger writing a line every 20 ms into `app.log` (O_APPEND), which
/// reopens (and so makes) its file 1.5 s after a SIGHUP, so it still
/// writes into the rotated file meanwhile, and stops after `seconds`.
const LOGGER: &str = r#"
import os, signal, sys, time
path, seconds, pidfile = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))
hup = []
signal.signal(signal.SIGHUP, lambda *a: hup.append(time.monotonic()))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    os.write(fd, b"line %06d\n" % n)
    n += 1
    if hup and time.monotonic() > hup[0] + 1.5:
        hup.clear()
        os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    time.sleep(0.02)
os.close(fd)
print(n, time.time_ns())
"#;

/// logrotate by rename (`nocreate`: the logger, told by SIGHUP, makes the
/// new file when it reopens) or by `copytruncate`, while the logger
/// writes. (With `create`, logrotate makes an empty `app.log` at once: a
/// logger slower than `settle` to reopen leaves it empty and quiet, a
/// finished file by every rule, sent as such; docs/producers.md.)
async fn logrotate(w: &World, copytruncate: bool) {
    let name = if copytruncate {
        "logs-copytruncate"
    } else {
        "logs-rename"
    };
    let tool = if copytruncate {
        "logrotate copytruncate"
    } else {
        "logrotate nocreate (rename)"
    };
    let dir = w.plain.join(name);
    w.tool(&w.plain, &format!("mkdir {name}")).await;
    let conf = w.src.join(format!("{name}.conf"));
    let pidfile = dir.join(".logger.pid");
    let how = if copytruncate {
        "copytruncate".to_string()
    } else {
        format!(
            "nocreate\n    postrotate\n        kill -HUP $(cat {})\n    endscript",
            pidfile.display()
        )
    };
    std::fs::write(
        &conf,
        format!(
            "{}/app.log {{\n    rotate 3\n    nocompress\n    {how}\n}}\n",
            dir.display()
        ),
    )
    .unwrap();
    shape::chmod(&conf, 0o644);
    let state = dir.join(".logrotate.state");
    let logger = {
        let (uid, gid) = shape::user(WRITER_USER);
        tokio::process::Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(shape::python().expect("python3"))
            .args(["-c", LOGGER])
            .arg(dir.join("app.log"))
            .arg("5")
            .arg(&pidfile)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.tool(
        &dir,
        &format!("logrotate -f -s {} {}", state.display(), conf.display()),
    )
    .await;
    let out = logger.wait_with_output().await.unwrap();
    let exited = exit_time(&out.stdout);
    let lines: usize = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    let rotated = World::on_disk(&dir.join("app.log.1"));
    let live = World::on_disk(&dir.join("app.log"));
    let kept = (rotated.len() + live.len()) / "line 000000\n".len();
    if copytruncate {
        eprintln!(
            "PRODUCERS [{}] logrotate copytruncate: {} of {lines} lines kept ({} lost between the copy and the truncation, by design)",
            w.shape.name(),
            kept,
            lines.saturating_sub(kept)
        );
    } else {
        w.check(kept == lines, || {
            format!("{tool}: {kept} lines in app.log.1 and app.log, {lines} written")
        });
    }
    let key = |f: &str| format!("foo/plain/{name}/{f}");
    w.arrive(
        tool,
        vec![
            Expect {
                key: key("app.log.1"),
                data: rotated,
                writes: 1,
                exited,
            },
            Expect {
                key: key("app.log"),
                data: live,
                writes: 1,
                exited,
            },
        ],
    )
    .await;
}

/// The sqlite3 shell, pausing with the database open between its
/// transactions.
async fn sqlite(w: &World, mode: &str) {
    let db = format!("{}.db", mode.to_lowercase());
    let dir = w.plain.join("sqlite");
    let script = format!(
        "PRAGMA journal_mode={mode};\n\
         CREATE TABLE t(n INTEGER, x BLOB);\n\
         INSERT INTO t VALUES (1, randomblob(200000));\n\
         .shell sleep 1.5\n\
         BEGIN; INSERT INTO t VALUES (2, randomblob(300000)); UPDATE t SET n = n + 10; COMMIT;\n\
         .shell sleep 1.5\n\
         INSERT INTO t VALUES (3, randomblob(100000));\n"
    );
    let script_path = w.src.join(format!("{db}.sql"));
    std::fs::write(&script_path, script).unwrap();
    shape::chmod(&script_path, 0o644);
    let exited = w
        .tool(
            &w.plain,
            &format!(
                "mkdir -p sqlite && sqlite3 sqlite/{db} < {}",
                script_path.display()
            ),
        )
        .await;
    let data = World::on_disk(&dir.join(&db));
    w.arrive(
        if mode == "WAL" {
            "sqlite3 (WAL)"
        } else {
            "sqlite3 (rollback journal)"
        },
        single(format!("foo/plain/sqlite/{db}"), data, 1, exited),
    )
    .await;
}

/// Atomic replace: written under a temporary name, renamed over the
/// final one; twice. Then `sed -i`, which does the same with its own
/// temporary name.
async fn atomic_replace(w: &World) {
    let (v1, d1) = w.source("report-v1.csv", 200_000, 9);
    let (v2, d2) = w.source("report-v2.csv", 250_000, 10);
    let replace = |v: &Path| {
        format!(
            "mkdir -p atomic && cp {} atomic/report.csv.tmp && mv atomic/report.csv.tmp atomic/report.csv",
            v.display()
        )
    };
    let key = "foo/plain/atomic/report.csv";
    let exited = w.tool(&w.plain, &replace(&v1)).await;
    let one = |data: &[u8], writes, exited| Expect {
        key: key.into(),
        data: data.to_vec(),
        writes,
        exited,
    };
    w.arrive("cp + mv (atomic replace)", vec![one(&d1, 1, exited)])
        .await;
    let exited = w.tool(&w.plain, &replace(&v2)).await;
    w.arrive("cp + mv (atomic replace)", vec![one(&d2, 2, exited)])
        .await;

    let text: String = (0..5000).map(|i| format!("row {i}, alpha\n")).collect();
    let (t, _) = w.source("sed.txt", 0, 0);
    std::fs::write(&t, &text).unwrap();
    let exited = w
        .tool(
            &w.plain,
            &format!("mkdir sed && cp {} sed/data.txt", t.display()),
        )
        .await;
    let key = "foo/plain/sed/data.txt";
    w.arrive("cp", single(key, text.clone().into_bytes(), 1, exited))
        .await;
    let exited = w
        .tool(&w.plain, "sed -i 's/alpha/beta/' sed/data.txt")
        .await;
    w.arrive(
        "sed -i",
        single(key, text.replace("alpha", "beta").into_bytes(), 2, exited),
    )
    .await;
}

/// `dd conv=notrunc` rewrites the middle of a file already sent: the new
/// version is sent, never a mix.
async fn dd_notrunc(w: &World) {
    let (blob, mut data) = w.source("blob.bin", 2 * MIB, 11);
    let (patch, patch_data) = w.source("patch.bin", 64 * 1024, 12);
    let key = "foo/plain/dd/blob.bin";
    let exited = w
        .tool(
            &w.plain,
            &format!("mkdir dd && cp {} dd/blob.bin", blob.display()),
        )
        .await;
    w.arrive("cp", single(key, data.clone(), 1, exited)).await;
    let exited = w
        .tool(
            &w.plain,
            &format!(
                "dd if={} of=dd/blob.bin bs=64K seek=8 conv=notrunc status=none",
                patch.display()
            ),
        )
        .await;
    data[8 * 64 * 1024..9 * 64 * 1024].copy_from_slice(&patch_data);
    w.arrive("dd conv=notrunc", single(key, data, 2, exited))
        .await;
}

/// `fallocate` makes the file its final size, then `dd` fills it: the
/// zeros are never sent.
async fn fallocate_then_fill(w: &World) {
    let (fill, data) = w.source("fill.bin", 3 * MIB, 13);
    let exited = w
        .tool(
            &w.plain,
            &format!(
                "mkdir falloc && fallocate -l {} falloc/f.bin && dd if={} of=falloc/f.bin bs=1M conv=notrunc status=none",
                3 * MIB,
                fill.display()
            ),
        )
        .await;
    w.arrive(
        "fallocate + dd",
        single("foo/plain/falloc/f.bin", data, 1, exited),
    )
    .await;
}

async fn reflink(w: &World) {
    let (src, data) = w.source("reflink.bin", 6 * MIB, 14);
    let exited = w
        .tool(
            &w.plain,
            &format!(
                "mkdir reflink && cp --reflink=auto {} reflink/r.bin",
                src.display()
            ),
        )
        .await;
    w.arrive(
        "cp --reflink=auto",
        single("foo/plain/reflink/r.bin", data, 1, exited),
    )
    .await;
}

/// A hard link added to a file already sent, then a chmod of it: the new
/// name is sent once, the first is not sent again (only its link count
/// and mode changed, and with them its ctime).
async fn hard_link(w: &World) {
    let (src, data) = w.source("link.bin", 500_000, 15);
    let exited = w
        .tool(
            &w.plain,
            &format!("mkdir links && cp {} links/orig.bin", src.display()),
        )
        .await;
    let orig = |exited| Expect {
        key: "foo/plain/links/orig.bin".into(),
        data: data.clone(),
        writes: 1,
        exited,
    };
    w.arrive("cp", vec![orig(exited)]).await;
    let exited = w.tool(&w.plain, "ln links/orig.bin links/alias.bin").await;
    w.arrive(
        "ln (hard link)",
        single("foo/plain/links/alias.bin", data.clone(), 1, exited),
    )
    .await;
    // And a chmod (which the agent hears of): its status changed, not its
    // bytes. Each gets its chance to show a second write; the restart at
    // the end of the suite looks again.
    w.tool(&w.plain, "chmod g+w links/orig.bin").await;
    tokio::time::sleep(SETTLE * 3).await;
    let again = w.writes("foo/plain/links/orig.bin").len();
    w.check(again == 1, || {
        format!(
            "links/orig.bin was written {again} times: a new hard link to it or a chmod is not a new version"
        )
    });
}

/// Versions kept elsewhere and linked into place in turn (`ln -f`, as
/// release tools do): the first, then the second, then the first again.
/// Each is sent when it is linked: the last has the inode, size and mtime
/// of a version sent before, but the object holds the second.
async fn relinked(w: &World) {
    let (a, da) = w.source("relink-a", 300_000, 19);
    let (b, db) = w.source("relink-b", 300_000, 20);
    w.tool(
        &w.plain,
        &format!(
            "mkdir -p .store relink && cp {} .store/a && cp {} .store/b",
            a.display(),
            b.display()
        ),
    )
    .await;
    let key = "foo/plain/relink/current.bin";
    for (n, (from, data)) in [("a", &da), ("b", &db), ("a", &da)].into_iter().enumerate() {
        let exited = w
            .tool(&w.plain, &format!("ln -f .store/{from} relink/current.bin"))
            .await;
        w.arrive(
            "ln -f (versions linked in turn)",
            single(key, data.clone(), n + 1, exited),
        )
        .await;
    }
}

/// O_TMPFILE, linked in with `linkat(AT_SYMLINK_FOLLOW)` while still
/// open (the way glibc's and systemd's writers do it), then written on.
const TMPFILE: &str = r#"
import ctypes, os, sys
folder, name, a, b = sys.argv[1:5]
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, AT_SYMLINK_FOLLOW = -100, 0x400
fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o644)
os.write(fd, open(a, "rb").read())
src = b"/proc/self/fd/%d" % fd
dst = os.path.join(folder, name).encode()
if libc.linkat(AT_FDCWD, src, AT_FDCWD, dst, AT_SYMLINK_FOLLOW) != 0:
    raise OSError(ctypes.get_errno(), "linkat")
os.write(fd, open(b, "rb").read())
os.close(fd)
"#;

/// Under the lease rule the agent waits for the lease, which the close
/// gives. Under the weaker rule it waits for a close it can see, and the
/// kernel tells nothing of a file that had no name when it was opened (the
/// agent's inotify watches leave out unlinked files, `IN_EXCL_UNLINK`,
/// which such a file stays for its writer): the file waits, never sent
/// half-written, until it is judged like a scanned file (after
/// `rescan_interval`, at least 10 minutes; an hour here) or a restart's
/// scan finds it, which this test checks.
async fn o_tmpfile(w: &World) {
    let (a, da) = w.source("tmpfile-a", MIB, 16);
    let (b, db) = w.source("tmpfile-b", MIB / 2, 17);
    let script = w.src.join("tmpfile.py");
    std::fs::write(&script, TMPFILE).unwrap();
    shape::chmod(&script, 0o644);
    let exited = w
        .tool(
            &w.plain,
            &format!(
                "mkdir tmpfile && {} {} tmpfile linked.bin {} {}",
                shape::python().unwrap().display(),
                script.display(),
                a.display(),
                b.display()
            ),
        )
        .await;
    let e = Expect {
        key: "foo/plain/tmpfile/linked.bin".into(),
        data: [da, db].concat(),
        writes: 1,
        exited,
    };
    if w.shape.has_lease() {
        w.arrive("O_TMPFILE + linkat", vec![e]).await;
    } else {
        tokio::time::sleep(SETTLE * 5).await;
        let early = w.writes(&e.key).len();
        w.check(early == 0, || {
            format!("{} sent {early} time(s) with no close seen", e.key)
        });
        w.expect(&e);
        w.late.lock().unwrap().push(e);
    }
}

/// Starts the agent in the world's shape and waits until it watches.
async fn start(w: &World) -> Agent {
    let before = std::fs::read_to_string(&w.log)
        .unwrap_or_default()
        .matches("watching; ready")
        .count();
    let mut cmd = putonly(Some(&w.creds));
    cmd.env("HOME", &w.creds);
    let agent = Agent::spawn_in(cmd, w.shape, &w.config, &w.log).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&w.log)
        .unwrap_or_default()
        .matches("watching; ready")
        .count()
        == before
    {
        assert!(
            Instant::now() < deadline,
            "the agent did not start:\n{}",
            w.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent
}

/// A folder and a file their producer keeps private for a while, then
/// opens up (`chmod`): the agent, which may not read them meanwhile (as
/// the unit's user; root reads them at once), says so once in its log,
/// lists them in `putonly status` and the `putonly_unreadable` gauge, and
/// sends them within `settle` of the chmod, not at the next rescan.
async fn private_for_a_while(w: &World) {
    let (src, data) = w.source("private.bin", 100_000, 18);
    w.tool(
        &w.plain,
        &format!(
            "umask 077 && mkdir private && cp {src} private/inside.bin && mkdir -m 755 secret && cp {src} secret/own.bin",
            src = src.display()
        ),
    )
    .await;
    let refused = matches!(w.shape, Shape::User { .. });
    if refused {
        // Under the weaker rule, files the new folder's scan found wait a
        // minute of quiet before the agent tries them.
        let deadline = Instant::now() + w.limit();
        let mut seen = w.unreadable().await;
        while seen != (1, 1) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            seen = w.unreadable().await;
        }
        w.check(seen == (1, 1), || {
            format!("putonly status listed {seen:?} unreadable folders and files, not (1, 1)")
        });
        let gauges = (w.gauge("folder").await, w.gauge("file").await);
        w.check(gauges == (1.0, 1.0), || {
            format!("putonly_unreadable was {gauges:?} (folder, file), not (1, 1)")
        });
        let log = std::fs::read_to_string(&w.log).unwrap_or_default();
        w.check(
            log.contains("cannot read this folder yet")
                && log.contains("cannot read this file yet"),
            || "the agent did not say it cannot read the folder and the file yet".into(),
        );
    }
    let exited = w
        .tool(
            &w.plain,
            "chmod -R go+rX private && chmod 644 secret/own.bin",
        )
        .await;
    let one = |key: &str| Expect {
        key: key.into(),
        data: data.clone(),
        writes: 1,
        exited,
    };
    w.arrive(
        "chmod of a private folder and file",
        vec![
            one("foo/plain/private/inside.bin"),
            one("foo/plain/secret/own.bin"),
        ],
    )
    .await;
    if refused {
        // Listed while it lasts, not after.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = w.unreadable().await;
        while seen != (0, 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            seen = w.unreadable().await;
        }
        w.check(seen == (0, 0), || {
            format!("putonly status still lists {seen:?} unreadable folders and files")
        });
        let log = std::fs::read_to_string(&w.log).unwrap_or_default();
        let warned = log
            .lines()
            .filter(|l| l.contains("cannot read this folder yet") && l.contains("/private"))
            .count();
        w.check(warned == 1, || {
            format!("the private folder was warned about {warned} times, not once")
        });
    }
}

/// p-th percentile (nearest rank) of sorted `v`.
fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

async fn every_producer_in(shape: Shape) {
    if let Some(why) = shape::unavailable() {
        eprintln!("skipped ({}): {why}", shape.name());
        return;
    }
    for tool in [
        "rsync",
        "tar",
        "bsdtar",
        "unzip",
        "zip",
        "curl",
        "split",
        "logrotate",
        "sqlite3",
        "fallocate",
        "dd",
        "sed",
    ] {
        let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        assert!(
            found,
            "{tool} is not installed: scripts/install-producers.sh installs the producers' tools"
        );
    }
    let w = World::new(shape).await;
    let agent = start(&w).await;
    let started = Instant::now();
    macro_rules! cases {
        ($($case:expr),* $(,)?) => {
            if shape.has_lease() {
                // One at a time: each latency is the tool's own.
                $($case.await;)*
            } else {
                // The weaker rule waits a minute for scanned files: all at
                // once.
                futures::join!($($case),*);
            }
        };
    }
    cases!(
        gnu_tar(&w),
        rsync(&w),
        rsync_inplace(&w),
        bsdtar(&w),
        cp_a(&w),
        unzip(&w),
        curl(&w),
        split_and_marker(&w),
        logrotate(&w, false),
        logrotate(&w, true),
        sqlite(&w, "DELETE"),
        sqlite(&w, "WAL"),
        atomic_replace(&w),
        dd_notrunc(&w),
        fallocate_then_fill(&w),
        reflink(&w),
        hard_link(&w),
        relinked(&w),
        o_tmpfile(&w),
        private_for_a_while(&w),
    );
    let took = started.elapsed();
    // Anything still on its way shows now.
    tokio::time::sleep(SETTLE * 3).await;
    let code = agent.stop().await;
    w.check(code == Some(0), || {
        format!("the agent stopped with {code:?}")
    });
    // Started again, its scan meets every file: none is sent again, not
    // even one whose status alone changed (a new hard link to it). Under
    // the weaker rule scanned files wait a minute of quiet.
    let agent = start(&w).await;
    tokio::time::sleep(if shape.has_lease() {
        SETTLE * 5
    } else {
        Duration::from_secs(75)
    })
    .await;
    let code = agent.stop().await;
    w.check(code == Some(0), || {
        format!("the agent stopped with {code:?} after its restart")
    });
    let late = std::mem::take(&mut *w.late.lock().unwrap());
    for e in &late {
        let now = w.object(&e.key).await;
        w.check(now.as_deref() == Some(&e.data[..]), || {
            format!(
                "{}: holds {:?} bytes after the restart, not the {} of the finished file",
                e.key,
                now.as_ref().map(Vec::len),
                e.data.len()
            )
        });
    }
    w.proxy.assert_only_writes();

    // No key but those expected was ever written: no temporary name, no
    // journal of a database, nothing half-written under another name.
    let expected = w.expected.lock().unwrap().clone();
    let stray: Vec<String> = w
        .proxy
        .records()
        .into_iter()
        .filter(|r| r.op == "PutObject" || r.op == "CreateMultipartUpload")
        .filter_map(|r| r.key)
        .filter(|k| !expected.contains_key(k))
        .collect();
    w.check(stray.is_empty(), || {
        format!("keys written that no finished file has: {}", few(&stray))
    });
    // Each key written exactly once per finished version, now that the
    // agent had time to do more.
    for (k, wanted) in &expected {
        let n = w.writes(k).len();
        w.check(n == *wanted, || {
            format!("{k} written {n} times, expected {wanted}")
        });
    }

    // The table: per tool, p50 and p99 of the time from its exit to the
    // object, and the objects written per file.
    let measured = w.measured.lock().unwrap();
    let mut by_tool: BTreeMap<&str, Vec<&Measured>> = BTreeMap::new();
    for m in measured.iter() {
        by_tool.entry(m.tool).or_default().push(m);
    }
    eprintln!(
        "PRODUCERS [{}] {} files in {:.1} s; tool | files | p50 | p99 | writes of the key so far",
        shape.name(),
        measured.len(),
        took.as_secs_f64()
    );
    for (tool, ms) in &by_tool {
        let mut l: Vec<Duration> = ms.iter().map(|m| m.latency).collect();
        l.sort();
        eprintln!(
            "PRODUCERS [{}] {tool} | {} | {:.2} s | {:.2} s | {}",
            shape.name(),
            ms.len(),
            percentile(&l, 50.0).as_secs_f64(),
            percentile(&l, 99.0).as_secs_f64(),
            ms.iter().map(|m| m.writes).max().unwrap_or(1),
        );
    }
    drop(measured);
    let failures = w.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} case(s) broken:\n{}\n--- agent log tail\n{}",
        failures.len(),
        failures.join("\n"),
        w.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn real_producers_as_the_units_user_with_cap_lease() {
    every_producer_in(Shape::User { lease: true }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn real_producers_as_the_units_user_without_cap_lease() {
    every_producer_in(Shape::User { lease: false }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn real_producers_in_its_own_pid_namespace() {
    every_producer_in(Shape::PidNamespace).await;
}
