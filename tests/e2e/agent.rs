//! `putonly run` against moto with the seed's policies, through the
//! recording proxy: producers write files in every way they do, the agent is
//! killed and restarted, the endpoint goes away; every finished file must
//! arrive intact, and only writes may cross the wire.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use crate::support::moto::Moto;
use crate::support::proxy::{Proxy, Record};
use crate::support::{bytes, get, putonly, run};

pub(crate) const BUCKET: &str = "account-b-bucket";
const MIB: usize = 1024 * 1024;

/// CI runs a trimmed workload; PUTONLY_LONG=1 runs the full one of the
/// issue (2,000 small files and 20 files of 20-200 MiB).
fn workload(small: usize, big: &[usize]) -> (usize, Vec<usize>) {
    if std::env::var_os("PUTONLY_LONG").is_some() {
        (2000, (0..20).map(|i| 20 + i * 180 / 19).collect())
    } else {
        (small, big.to_vec())
    }
}

/// A running `putonly run`, its log appended to a file.
pub(crate) struct Agent {
    child: tokio::process::Child,
    /// The agent's own pid when `child` only launches it (`unshare --fork`).
    target: Option<i32>,
}

impl Agent {
    pub(crate) fn start(creds: &Path, config: &Path, log: &Path) -> Agent {
        Agent::spawn(putonly(Some(creds)), config, log)
    }

    /// Starts `cmd` (a `putonly` command, set up by the caller) as the agent.
    pub(crate) fn spawn(mut cmd: tokio::process::Command, config: &Path, log: &Path) -> Agent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        if std::env::var_os("PUTONLY_LOG").is_none() {
            cmd.env("PUTONLY_LOG", "info");
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start putonly run");
        Agent {
            child,
            target: None,
        }
    }

    /// Starts the agent in a deployed shape (see `support::shape`).
    pub(crate) async fn spawn_in(
        cmd: tokio::process::Command,
        shape: crate::support::shape::Shape,
        config: &Path,
        log: &Path,
    ) -> Agent {
        let mut agent = Agent::spawn(crate::support::shape::in_shape(cmd, shape), config, log);
        let launcher = agent.child.id().expect("a running launcher");
        agent.target = Some(crate::support::shape::agent_pid(launcher, shape).await);
        agent
    }

    /// The agent process itself (not its launcher).
    pub(crate) fn pid(&self) -> i32 {
        self.target
            .unwrap_or_else(|| self.child.id().expect("a running agent") as i32)
    }

    pub(crate) fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) every thread of the agent.
    pub(crate) fn freeze(&self, frozen: bool) {
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub(crate) async fn kill9(mut self) {
        self.child.kill().await.unwrap();
    }

    /// The exit code of an agent that stops by itself within `limit`.
    pub(crate) async fn exited(mut self, limit: Duration) -> Option<i32> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("the agent stops by itself")
            .unwrap()
            .code()
    }

    /// SIGTERM, then the exit code.
    pub(crate) async fn stop(mut self) -> Option<i32> {
        let pid = self.pid();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the agent stops within its shutdown timeout")
            .unwrap();
        status.code()
    }
}

pub(crate) struct Setup {
    pub(crate) moto: Moto,
    pub(crate) proxy: Proxy,
    pub(crate) work: tempfile::TempDir,
    pub(crate) outbox: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) log: PathBuf,
}

pub(crate) async fn setup(upload: &str) -> Setup {
    setup_with(
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"500ms\"\n",
        "[\"foo/\", \"fighters/\"]",
        upload,
    )
    .await
}

/// `watches` may name `{outbox}` and `{work}`; `allowed` is the TOML array
/// of allowed prefixes.
pub(crate) async fn setup_with(watches: &str, allowed: &str, upload: &str) -> Setup {
    setup_custom("", watches, allowed, "", upload).await
}

/// As [`setup_with`], plus lines that continue the [role] table (`role`) and
/// the [agent] table (`agent`).
pub(crate) async fn setup_custom(
    role: &str,
    watches: &str,
    allowed: &str,
    agent: &str,
    upload: &str,
) -> Setup {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let work = tempfile::tempdir().unwrap();
    let outbox = work.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let watches = watches
        .replace("{outbox}", &outbox.display().to_string())
        .replace("{work}", &work.path().display().to_string());
    let config = moto.config(
        &proxy.url,
        &format!(
            "{role}\n[bucket]\nname = \"{BUCKET}\"\nallowed_prefixes = {allowed}\n\
             [state]\ndir = \"{state}\"\n\
             {watches}\
             [agent]\nrescan_interval = \"10s\"\nshutdown_timeout = \"10s\"\n{agent}\n\
             [upload]\n{upload}\n",
            state = work.path().join("state").display(),
        ),
    );
    let log = work.path().join("agent.log");
    Setup {
        moto,
        proxy,
        work,
        outbox,
        config,
        log,
    }
}

/// Writes the workload the way producers do; returns relative path → bytes.
/// Small files: written at once, renamed into place from a .tmp name, or
/// created in new nested folders; some written slowly in pieces. Big files:
/// written in 4 MiB pieces.
pub(crate) async fn produce(
    outbox: &Path,
    small: usize,
    big_mib: &[usize],
    seed: u64,
) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut slow = Vec::new();
    for i in 0..small {
        let data = bytes(100 + (i * 37) % 5000, seed * 100_000 + i as u64);
        let rel = match i % 4 {
            0 => format!("direct-{i}.dat"),
            1 => format!("renamed-{i}.dat"),
            2 => format!("new/d{}/sub{}/n-{i}.dat", i % 7, i % 3),
            _ => format!("slow-{i}.dat"),
        };
        let path = outbox.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        match i % 4 {
            1 => {
                let tmp = outbox.join(format!("renamed-{i}.dat.tmp"));
                std::fs::write(&tmp, &data).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            }
            3 if i % 40 == 3 => slow.push((path.clone(), data.clone())),
            _ => std::fs::write(&path, &data).unwrap(),
        }
        files.insert(rel, data);
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Slow writers: four pieces over about 1.5 s each, the file held open.
    let slow_writers = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut handles: Vec<(std::fs::File, Vec<u8>)> = slow
            .into_iter()
            .map(|(p, d)| (std::fs::File::create(p).unwrap(), d))
            .collect();
        for piece in 0..4 {
            for (f, d) in handles.iter_mut() {
                let n = d.len().div_ceil(4);
                let chunk = &d[(piece * n).min(d.len())..((piece + 1) * n).min(d.len())];
                f.write_all(chunk).unwrap();
                f.flush().unwrap();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    for (n, mib) in big_mib.iter().enumerate() {
        let rel = format!("big/b-{n}.bin");
        let data = bytes(mib * MIB + n * 1000, seed * 1000 + 7 + n as u64);
        let path = outbox.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let d = data.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(path).unwrap();
            for chunk in d.chunks(4 * MIB) {
                f.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .unwrap();
        files.insert(rel, data);
    }
    slow_writers.await.unwrap();
    files
}

/// `putonly status --json`; waits (up to 30 s) for an agent just started
/// to create its journal.
pub(crate) async fn status(s: &Setup) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = putonly(Some(s.moto.dir.path()))
            .args(["status", "--json", "--config"])
            .arg(&s.config)
            .output()
            .await
            .unwrap();
        if out.status.code() == Some(0) {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "putonly status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the journal records `n` files done and none pending.
pub(crate) async fn wait_done(s: &Setup, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let st = status(s).await;
        if st["done"].as_u64() == Some(n as u64) && st["pending"].as_u64() == Some(0) {
            return;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&s.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "not done after {limit:?}: {st}\nlog tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(crate) async fn assert_all_arrived(s: &Setup, files: &BTreeMap<String, Vec<u8>>) {
    let admin = s.moto.admin();
    for (rel, data) in files {
        let key = format!("fighters/in/{rel}");
        assert!(
            get(&admin, BUCKET, &key).await == *data,
            "{key} differs from the file"
        );
    }
}

/// Every successful write of a key announced the size of the finished file:
/// no object ever held partial content.
pub(crate) fn assert_no_partial_writes(
    records: &[Record],
    files: &BTreeMap<String, Vec<u8>>,
) -> HashMap<String, usize> {
    let mut writes: HashMap<String, usize> = HashMap::new();
    for r in records {
        if !(r.op == "PutObject" || r.op == "CompleteMultipartUpload") || r.status != 200 {
            continue;
        }
        let key = r.key.clone().unwrap();
        let rel = key
            .strip_prefix("fighters/in/")
            .expect("key under the watch prefix");
        let data = files
            .get(rel)
            .unwrap_or_else(|| panic!("{key} is not a produced file"));
        assert_eq!(
            r.size,
            Some(data.len() as u64),
            "{key} was written with another size"
        );
        *writes.entry(key).or_default() += 1;
    }
    writes
}

#[tokio::test(flavor = "multi_thread")]
async fn every_finished_file_arrives_once_whatever_the_producer_does() {
    let s = setup("concurrency = 8\n").await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (small, big) = workload(400, &[20, 24, 33]);
    let files = produce(&s.outbox, small, &big, 1).await;
    wait_done(&s, files.len(), Duration::from_secs(900)).await;
    assert_eq!(agent.stop().await, Some(0), "SIGTERM ends the agent with 0");

    assert_all_arrived(&s, &files).await;
    s.proxy.assert_only_writes();
    let writes = assert_no_partial_writes(&s.proxy.records(), &files);
    assert_eq!(writes.len(), files.len());
    assert!(
        writes.values().all(|&n| n == 1),
        "a file was written twice: {:?}",
        writes.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    assert_eq!(s.proxy.count("CreateMultipartUpload"), big.len());

    // The journal remembers: a restart sends nothing again.
    let before = s.proxy.s3_records().len();
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(agent.stop().await, Some(0));
    assert_eq!(
        s.proxy.s3_records().len(),
        before,
        "a restart re-sent files"
    );

    let out = run(putonly(Some(s.moto.dir.path()))
        .args(["status", "--config"])
        .arg(&s.config))
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{} done", files.len())), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_loses_nothing_and_resumes_uploads() {
    let s = setup("concurrency = 4\npart_size = \"5MiB\"\nbandwidth_limit = \"12MiB/s\"\n").await;
    let mut agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let outbox = s.outbox.clone();
    let (small, big) = workload(300, &[25, 30, 40]);
    let big_count = big.len();
    let producer = tokio::spawn(async move { produce(&outbox, small, &big, 2).await });
    let mut rng = fastrand::Rng::with_seed(42);
    let mut kills: Vec<SystemTime> = Vec::new();
    let parts_sent = |p: &Proxy| {
        p.records()
            .iter()
            .filter(|r| r.op == "UploadPart" && r.status == 200)
            .count()
    };
    for i in 0..30 {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
        if i % 2 == 1 {
            // Every other kill lands while multipart uploads are under
            // way: after this agent sent at least one part (if any are left).
            let seen = parts_sent(&s.proxy);
            let deadline = Instant::now() + Duration::from_secs(120);
            let completed = |p: &Proxy| {
                p.records()
                    .iter()
                    .filter(|r| r.op == "CompleteMultipartUpload" && r.status == 200)
                    .count()
            };
            while parts_sent(&s.proxy) == seen
                && completed(&s.proxy) < big_count
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.u64(100..1200))).await;
        }
        assert!(agent.alive(), "the agent died on its own");
        agent.kill9().await;
        kills.push(SystemTime::now());
        agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    }
    let files = producer.await.unwrap();
    wait_done(&s, files.len(), Duration::from_secs(1800)).await;
    let code = agent.stop().await;
    if code != Some(0) {
        let log = std::fs::read_to_string(&s.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(25).collect();
        panic!(
            "the agent stopped with {code:?}; log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    assert_all_arrived(&s, &files).await;
    s.proxy.assert_only_writes();
    let records = s.proxy.records();
    let writes = assert_no_partial_writes(&records, &files);
    let small = files.keys().filter(|k| !k.starts_with("big/")).count();
    let puts = records
        .iter()
        .filter(|r| r.op == "PutObject" && r.status == 200)
        .count();
    // Each kill may catch up to `concurrency` small files sent but not yet recorded.
    assert!(
        puts >= small && puts <= small + kills.len() * 4,
        "PutObject {puts} for {small} small files and {} kills",
        kills.len()
    );
    assert_eq!(writes.len(), files.len());

    // At least one multipart upload went on with its upload id across a kill.
    let mut parts_by_upload: HashMap<String, Vec<SystemTime>> = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r.op == "UploadPart" && r.status == 200)
    {
        parts_by_upload
            .entry(r.upload_id.clone().unwrap())
            .or_default()
            .push(r.at);
    }
    let resumed = parts_by_upload
        .values()
        .filter(|times| {
            let (lo, hi) = (times.iter().min().unwrap(), times.iter().max().unwrap());
            kills.iter().any(|k| lo < k && k < hi)
        })
        .count();
    assert!(
        resumed >= 1,
        "no multipart upload continued across a kill: {parts_by_upload:?} kills {kills:?}"
    );
    let creates = s.proxy.count("CreateMultipartUpload");
    eprintln!(
        "kills {}, PutObject {puts} for {small} small files, CreateMultipartUpload {creates} for {big_count} big files, uploads resumed across a kill: {resumed}",
        kills.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_30_second_outage_is_ridden_out() {
    let s = setup("concurrency = 4\n").await;
    let mut agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let mut files = produce(&s.outbox.join("before"), 40, &[], 3).await;
    s.proxy.outage(Duration::from_secs(30));
    let during = produce(&s.outbox.join("during"), 60, &[20], 4).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(agent.alive(), "the agent must stay up through the outage");
    files = files
        .into_iter()
        .map(|(k, v)| (format!("before/{k}"), v))
        .chain(during.into_iter().map(|(k, v)| (format!("during/{k}"), v)))
        .collect();
    wait_done(&s, files.len(), Duration::from_secs(180)).await;
    assert!(agent.alive());
    assert_eq!(agent.stop().await, Some(0));
    assert_all_arrived(&s, &files).await;
    s.proxy.assert_only_writes();
    assert_no_partial_writes(&s.proxy.records(), &files);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_waiting_at_start_up_is_sent_once() {
    let s = setup("concurrency = 8\n").await;
    let mut files = BTreeMap::new();
    for i in 0..1500 {
        let rel = format!("d{}/f-{i}.dat", i % 20);
        let data = bytes(64 + i % 300, 9_000_000 + i as u64);
        std::fs::create_dir_all(s.outbox.join(&rel).parent().unwrap()).unwrap();
        std::fs::write(s.outbox.join(&rel), &data).unwrap();
        files.insert(rel, data);
    }
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    wait_done(&s, files.len(), Duration::from_secs(240)).await;
    assert_eq!(agent.stop().await, Some(0));
    assert_all_arrived(&s, &files).await;
    assert_eq!(s.proxy.count("PutObject"), files.len());
    s.proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn after_upload_deletes_or_moves_only_what_is_recorded_done() {
    let s = setup_with(
        "[[watch]]\npath = \"{outbox}/del\"\nprefix = \"foo/del\"\nsettle = \"300ms\"\nafter_upload = \"delete\"\n\
         [[watch]]\npath = \"{outbox}/mv\"\nprefix = \"foo/mv\"\nsettle = \"300ms\"\nafter_upload = \"move\"\nmove_to = \"{work}/sent\"\n",
        "[\"foo/\"]",
        "",
    )
    .await;
    let sent = s.outbox.parent().unwrap().join("sent");
    std::fs::create_dir_all(s.outbox.join("del")).unwrap();
    std::fs::create_dir_all(s.outbox.join("mv")).unwrap();
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let del = produce(&s.outbox.join("del"), 20, &[], 5).await;
    let mv = produce(&s.outbox.join("mv"), 20, &[], 6).await;
    wait_done(&s, del.len() + mv.len(), Duration::from_secs(120)).await;
    // The action follows the journal's done mark; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agent.stop().await, Some(0));
    let admin = s.moto.admin();
    for (rel, data) in &del {
        assert!(
            !s.outbox.join("del").join(rel).exists(),
            "{rel} was not deleted"
        );
        assert!(get(&admin, BUCKET, &format!("foo/del/{rel}")).await == *data);
    }
    for (rel, data) in &mv {
        assert!(
            !s.outbox.join("mv").join(rel).exists(),
            "{rel} was not moved"
        );
        assert_eq!(
            std::fs::read(sent.join(rel)).unwrap(),
            *data,
            "{rel} moved intact"
        );
        assert!(get(&admin, BUCKET, &format!("foo/mv/{rel}")).await == *data);
    }
    s.proxy.assert_only_writes();
}

/// A move_to that cannot take the files (here a plain file where the folder
/// should be): they stay where they are, are sent once, and the action is
/// not retried in a loop (a failed action must not make a new version).
#[tokio::test(flavor = "multi_thread")]
async fn an_after_upload_action_that_fails_leaves_the_files_and_sends_them_once() {
    let s = setup_with(
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"foo/mv\"\nsettle = \"300ms\"\nafter_upload = \"move\"\nmove_to = \"{work}/blocked\"\n",
        "[\"foo/\"]",
        "",
    )
    .await;
    std::fs::write(s.work.path().join("blocked"), b"not a folder").unwrap();
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let files = produce(&s.outbox, 6, &[], 11).await;
    wait_done(&s, files.len(), Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(agent.stop().await, Some(0));
    for (rel, data) in &files {
        assert_eq!(
            &std::fs::read(s.outbox.join(rel)).unwrap(),
            data,
            "{rel} stays"
        );
    }
    assert_eq!(s.proxy.count("PutObject"), files.len(), "each sent once");
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.contains("the after_upload action failed"), "{log}");
    let entries: Vec<String> = walk(&s.outbox);
    assert!(
        entries.iter().all(|e| !e.contains(".putonly-claim")),
        "a claim was left: {entries:?}"
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_file_is_marked_failed_and_the_agent_carries_on() {
    // The client-side guard allows bar/, the role's policy does not.
    let s = setup_with(
        "[[watch]]\npath = \"{outbox}/bar\"\nprefix = \"bar/\"\nsettle = \"300ms\"\n\
         [[watch]]\npath = \"{outbox}/foo\"\nprefix = \"foo/\"\nsettle = \"300ms\"\n",
        "[\"foo/\", \"bar/\"]",
        "",
    )
    .await;
    std::fs::create_dir_all(s.outbox.join("bar")).unwrap();
    std::fs::create_dir_all(s.outbox.join("foo")).unwrap();
    let mut agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    std::fs::write(s.outbox.join("bar/denied.txt"), b"no").unwrap();
    std::fs::write(s.outbox.join("foo/fine.txt"), b"yes").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = status(&s).await;
        if st["failed"].as_u64() == Some(1) && st["done"].as_u64() == Some(1) {
            break st;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let err = st["last_errors"][0]["error"].as_str().unwrap();
    assert!(err.contains("AccessDenied"), "{st}");
    assert!(agent.alive());
    // Not retried while it is unchanged: one PutObject for bar/.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bar_puts = s
        .proxy
        .records()
        .iter()
        .filter(|r| r.op == "PutObject" && r.key.as_deref() == Some("bar/denied.txt"))
        .count();
    assert_eq!(bar_puts, 1);
    assert_eq!(agent.stop().await, Some(0));
    assert_eq!(get(&s.moto.admin(), BUCKET, "foo/fine.txt").await, b"yes");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multipart_upload_the_server_lost_starts_over() {
    let s = setup("part_size = \"5MiB\"\n").await;
    s.proxy.fail_next("UploadPart", 1, 404, "NoSuchUpload");
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let files = produce(&s.outbox, 0, &[12], 7).await;
    wait_done(&s, files.len(), Duration::from_secs(120)).await;
    assert_eq!(agent.stop().await, Some(0));
    assert_all_arrived(&s, &files).await;
    // On failure, show the traffic and the agent's log. (It failed when the
    // proxy answered the injected 404 before taking the part's body: the
    // agent saw a broken pipe, retried the part, and never saw the 404.)
    let ops: Vec<String> = s.proxy.s3_records().iter().map(Record::summary).collect();
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    assert_eq!(
        s.proxy.count("CreateMultipartUpload"),
        2,
        "started over once\n{ops:#?}\n{log}"
    );
    s.proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn run_and_status_refuse_a_bad_configuration_with_exit_2() {
    let work = tempfile::tempdir().unwrap();
    let no_watch = work.path().join("no-watch.toml");
    std::fs::write(
        &no_watch,
        "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n[state]\ndir = \"/tmp/x\"\n",
    )
    .unwrap();
    let outside = work.path().join("outside.toml");
    std::fs::write(
        &outside,
        "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n[state]\ndir = \"/tmp/x\"\n\
         [[watch]]\npath = \"/srv/out\"\nprefix = \"bar/\"\n",
    )
    .unwrap();
    for (cmd, config, expected) in [
        (
            "run",
            work.path().join("missing.toml"),
            "cannot read configuration file",
        ),
        (
            "status",
            work.path().join("missing.toml"),
            "cannot read configuration file",
        ),
        ("run", no_watch, "no [[watch]] is configured"),
        ("run", outside, "watch[0].prefix"),
    ] {
        let out = run(putonly(None).arg(cmd).arg("--config").arg(&config)).await;
        assert_eq!(out.status.code(), Some(2), "{cmd} {}", config.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{cmd}: {stderr}");
    }
}

/// A plain HTTP/1.0 GET: (status, body).
pub(crate) async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of an unlabelled metric (or 0 when absent).
pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_healthz_answer_and_move_during_a_run() {
    let port = crate::support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let s = setup_custom(
        "",
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"300ms\"\n",
        "[\"foo/\", \"fighters/\"]",
        "",
        &format!("concurrency = 4\n[metrics]\nlisten = \"{addr}\"\nunhealthy_after = \"3s\"\n"),
    )
    .await;
    let mut agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(Instant::now() < deadline, "no metrics listener");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, before) = http_get(&addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(metric(&before, "putonly_files_uploaded_total"), 0.0);
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);

    let files = produce(&s.outbox, 20, &[6], 31).await;
    wait_done(&s, files.len(), Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(6)).await; // a housekeeping tick
    let (_, after) = http_get(&addr, "/metrics").await;
    let bytes: usize = files.values().map(Vec::len).sum();
    assert_eq!(
        metric(&after, "putonly_files_uploaded_total"),
        files.len() as f64,
        "{after}"
    );
    assert_eq!(metric(&after, "putonly_bytes_uploaded_total"), bytes as f64);
    assert_eq!(
        metric(&after, "putonly_upload_duration_seconds_count"),
        files.len() as f64
    );
    assert!(metric(&after, "putonly_last_success_timestamp_seconds") > 0.0);
    let expiry = metric(&after, "putonly_credentials_expiry_seconds");
    assert!(expiry > 3000.0 && expiry <= 3600.0, "{expiry}");
    assert_eq!(metric(&after, "putonly_queue_depth"), 0.0);
    assert!(after.contains("# TYPE putonly_upload_duration_seconds histogram"));
    for secret in s.proxy.secrets() {
        assert!(!after.contains(&secret), "a secret in /metrics");
    }

    // The endpoint goes away with files waiting: unhealthy after 3 s, and
    // the failures are counted by reason; healthy again once they arrive.
    s.proxy.outage(Duration::from_secs(12));
    std::fs::write(s.outbox.join("late.txt"), b"late").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, body) = loop {
        let (code, body) = http_get(&addr, "/healthz").await;
        if code == 503 || Instant::now() > deadline {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no upload succeeded"), "{body}");
    let (_, during) = http_get(&addr, "/metrics").await;
    assert!(metric(&during, "putonly_queue_depth") >= 1.0, "{during}");
    wait_done(&s, files.len() + 1, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);

    // A refused file is counted under its reason.
    s.proxy.fail_next("PutObject", 1, 403, "AccessDenied");
    std::fs::write(s.outbox.join("denied.txt"), b"denied").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let (_, text) = http_get(&addr, "/metrics").await;
        if metric(&text, "putonly_failed_files") >= 1.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        failed.contains("putonly_upload_failures_total{reason=\"denied\"} 1"),
        "{failed}"
    );
    assert!(agent.alive());
    assert_eq!(agent.stop().await, Some(0));
}

/// A metrics address off loopback is served, and named at start-up.
#[tokio::test(flavor = "multi_thread")]
async fn a_metrics_address_off_loopback_is_warned_about_at_start_up() {
    let port = crate::support::free_port();
    let s = setup(&format!("[metrics]\nlisten = \"0.0.0.0:{port}\"\n")).await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(Instant::now() < deadline, "no metrics listener");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
    assert_eq!(agent.stop().await, Some(0));
    let log = std::fs::read_to_string(&s.log).unwrap();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("metrics.listen"))
        .unwrap_or_else(|| panic!("no warning about 0.0.0.0:\n{log}"));
    assert!(warning.contains("every interface"), "{warning}");
    assert!(warning.contains(&format!("127.0.0.1:{port}")), "{warning}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_speaks_the_systemd_notify_protocol() {
    let s = setup("concurrency = 2\n").await;
    let socket_path = s.work.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut cmd = putonly(Some(s.moto.dir.path()));
    cmd.env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000");
    let agent = Agent::spawn(cmd, &s.config, &s.log);
    let mut seen: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 4096];
    for want in ["READY=1", "WATCHDOG=1"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen.iter().any(|m| m.lines().any(|l| l == want)) {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {want} within 30 s; got {seen:?}"))
                .unwrap();
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert_eq!(agent.stop().await, Some(0));
    let mut rest = Vec::new();
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await
    {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        rest.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "no STOPPING=1 at shutdown: {rest:?}"
    );
}
