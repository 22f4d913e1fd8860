//! Faults on the wire and crashes on the machine: random server errors,
//! dropped connections and answers that come too late (injected by the
//! recording proxy with a fixed seed), STS going away for a while or past
//! the credentials' expiry, and a journal cut short as by a power loss.
//! Every finished file must arrive intact, only writes may cross the wire,
//! and nothing may be marked failed for a transient cause.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::agent::{
    Agent, Setup, assert_all_arrived, assert_no_partial_writes, produce, setup_custom, status,
    wait_done,
};
use crate::support::proxy::Record;

const WATCH: &str =
    "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"500ms\"\n";
const ALLOWED: &str = "[\"foo/\", \"fighters/\"]";

/// CI size, or the full size with PUTONLY_LONG=1.
fn size(ci: usize, long: usize) -> usize {
    if std::env::var_os("PUTONLY_LONG").is_some() {
        long
    } else {
        ci
    }
}

fn assert_nothing_failed(st: &serde_json::Value) {
    assert_eq!(st["failed"].as_u64(), Some(0), "{st}");
}

#[tokio::test(flavor = "multi_thread")]
async fn random_faults_at_a_10_percent_rate_lose_nothing() {
    let s = setup_custom(
        "",
        WATCH,
        ALLOWED,
        "",
        "part_size = \"5MiB\"\nconcurrency = 8\nrequest_timeout = \"2s\"\n",
    )
    .await;
    // Seeded: the same sequence of faults on every run.
    s.proxy.chaos(20261128, 0.10, Duration::from_secs(3));
    let mut agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let files = produce(&s.outbox, size(1000, 5000), &[12, 16, 21], 11).await;
    wait_done(&s, files.len(), Duration::from_secs(900)).await;
    assert!(agent.alive());
    s.proxy.calm();
    assert_eq!(agent.stop().await, Some(0));

    assert_all_arrived(&s, &files).await;
    s.proxy.assert_only_writes();
    let records = s.proxy.records();
    assert_no_partial_writes(&records, &files);
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &records {
        if let Some(k) = r.chaos {
            *kinds.entry(k).or_default() += 1;
        }
    }
    for k in ["slowdown", "error", "reset", "delay"] {
        assert!(
            kinds.get(k).copied().unwrap_or(0) > 0,
            "no {k} fault: {kinds:?}"
        );
    }
    let s3 = s.proxy.s3_records().len();
    let faults: usize = kinds.values().sum();
    eprintln!(
        "{} files ({} multipart) through {s3} S3 requests, {faults} faults injected: {kinds:?}",
        files.len(),
        3
    );
    assert!(faults * 100 >= s3 * 7, "the fault rate was under 7%");
    assert_nothing_failed(&status(&s).await);
}

/// Produces `n` small files, one every `every`, under `dir` in the outbox.
async fn trickle(s: &Setup, dir: &str, n: usize, every: Duration) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..n {
        let rel = format!("{dir}/t-{i}.dat");
        let data = crate::support::bytes(2000 + i, 900 + i as u64);
        let p = s.outbox.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &data).unwrap();
        files.insert(rel, data);
        tokio::time::sleep(every).await;
    }
    files
}

/// An agent whose role credentials live `duration`, renewed `refresh_before`
/// ahead, once it holds its first credentials.
async fn agent_with_role(duration: &str, refresh_before: &str) -> (Setup, Agent) {
    let s = setup_custom(
        &format!("duration = \"{duration}\"\nrefresh_before = \"{refresh_before}\"\n"),
        WATCH,
        ALLOWED,
        "",
        "concurrency = 4\n",
    )
    .await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.proxy.count("AssumeRole") == 0 {
        assert!(Instant::now() < deadline, "no AssumeRole");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (s, agent)
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_down_past_refresh_before_but_within_the_lifetime_fails_nothing() {
    // Credentials live 20 s and are renewed 10 s before expiry; STS is down
    // from 5 s to 15 s: every renewal in that window fails, the first
    // credentials stay valid throughout, and uploads go on.
    let (s, mut agent) = agent_with_role("20s", "10s").await;
    let t0 = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let down_from = SystemTime::now();
    s.proxy.fail_for(
        "AssumeRole",
        Duration::from_secs(10),
        503,
        "ServiceUnavailable",
    );
    let files = trickle(&s, "sts", 40, Duration::from_millis(250)).await;
    let down_until = down_from + Duration::from_secs(10);
    wait_done(&s, files.len(), Duration::from_secs(120)).await;
    assert!(agent.alive());
    assert_eq!(agent.stop().await, Some(0));

    assert_all_arrived(&s, &files).await;
    s.proxy.assert_only_writes();
    let records = s.proxy.records();
    let refused = records
        .iter()
        .filter(|r| r.op == "AssumeRole" && r.injected)
        .count();
    assert!(refused >= 1, "STS was never asked while down");
    let during = records
        .iter()
        .filter(|r| r.bucket.is_some() && r.status == 200)
        .filter(|r| r.at > down_from && r.at < down_until)
        .count();
    assert!(during > 0, "no upload went on while STS was down");
    let checked = s.proxy.assert_no_expired_credentials();
    assert_nothing_failed(&status(&s).await);
    eprintln!(
        "STS down {:?} after the first credentials, {refused} renewals refused, {during} writes made meanwhile, {checked} requests checked against expiry",
        down_from.duration_since(t0).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_down_past_expiry_pauses_uploads_and_resumes_them() {
    // Credentials live 8 s; STS is down for 20 s from the start: they
    // expire with STS still down. Uploads wait (nothing is sent with expired
    // credentials, nothing is marked failed) and resume when STS is back.
    let (s, mut agent) = agent_with_role("8s", "4s").await;
    s.proxy.fail_for(
        "AssumeRole",
        Duration::from_secs(20),
        503,
        "ServiceUnavailable",
    );
    let down_until = SystemTime::now() + Duration::from_secs(20);
    let files = trickle(&s, "expired", 40, Duration::from_millis(400)).await;
    assert!(agent.alive(), "the agent must outlive its credentials");
    let st = status(&s).await;
    assert_nothing_failed(&st);
    wait_done(&s, files.len(), Duration::from_secs(180)).await;
    assert_eq!(agent.stop().await, Some(0));

    assert_all_arrived(&s, &files).await;
    s.proxy.assert_only_writes();
    let checked = s.proxy.assert_no_expired_credentials();
    let after = s
        .proxy
        .s3_records()
        .iter()
        .filter(|r| r.status == 200 && r.at > down_until)
        .count();
    assert!(after > 0, "uploads resumed after STS came back");
    assert_nothing_failed(&status(&s).await);
    eprintln!(
        "{checked} S3 requests checked: none signed with expired credentials; {after} writes after STS came back"
    );
}

/// Copies the agent's state folder (as it is on disk this instant, the way
/// a power loss could leave it) to `name` in the work folder.
fn copy_state(s: &Setup, name: &str) -> PathBuf {
    let state = s.work.path().join("state");
    let copy = s.work.path().join(name);
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"] {
        let _ = std::fs::copy(state.join(file), copy.join(file));
    }
    copy
}

/// Points the configuration at another state folder, for the next start.
fn use_state(s: &mut Setup, dir: &Path) {
    let state = s.work.path().join("state");
    let config = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace(&state.display().to_string(), &dir.display().to_string());
    s.config = dir.with_extension("toml");
    std::fs::write(&s.config, config).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_journal_cut_short_by_power_loss_opens_and_nothing_is_lost() {
    let mut s = setup_custom(
        "",
        WATCH,
        ALLOWED,
        "",
        "concurrency = 4\npart_size = \"5MiB\"\n",
    )
    .await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let outbox = s.outbox.clone();
    let producer = tokio::spawn(async move { produce(&outbox, 300, &[14], 12).await });
    // Mid-run: the state folder as a power loss could leave it, the WAL cut
    // at an arbitrary byte (fixed seed).
    let deadline = Instant::now() + Duration::from_secs(120);
    while status(&s).await["done"].as_u64().unwrap_or(0) < 80 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let copy = copy_state(&s, "state-after-power-loss");
    agent.kill9().await;
    let wal = copy.join("journal.sqlite-wal");
    let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let cut = fastrand::Rng::with_seed(7).u64(0..len.max(1));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .and_then(|f| f.set_len(cut))
        .unwrap();
    use_state(&mut s, &copy);
    let before = s.proxy.s3_records().len();

    let mut agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let files = producer.await.unwrap();
    wait_done(&s, files.len(), Duration::from_secs(300)).await;
    assert!(agent.alive());
    assert_eq!(agent.stop().await, Some(0));
    assert_all_arrived(&s, &files).await;
    s.proxy.assert_only_writes();
    assert_no_partial_writes(&s.proxy.records(), &files);
    eprintln!(
        "WAL cut at {cut} of {len} bytes; {} S3 requests after the restart",
        s.proxy.s3_records().len() - before
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_journal_that_lost_a_completed_multipart_upload_sends_the_file_afresh() {
    // The journal as a power loss can leave it: a multipart upload recorded
    // as started, but not its parts nor its completion, which the server
    // accepted. On restart putonly resumes that upload id; the server no
    // longer knows it (404 NoSuchUpload), so the file is sent again from
    // the start (at least once) and arrives whole. Parts are refused for a
    // few seconds first: the window in which the state folder is copied.
    let mut s = setup_custom("", WATCH, ALLOWED, "", "part_size = \"5MiB\"\n").await;
    s.proxy
        .fail_for("UploadPart", Duration::from_secs(6), 503, "SlowDown");
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let files = produce(&s.outbox, 0, &[14], 31).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s
        .proxy
        .records()
        .iter()
        .any(|r| r.op == "UploadPart" && r.injected)
    {
        assert!(Instant::now() < deadline, "no part was tried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let copy = copy_state(&s, "state-before-the-parts");
    wait_done(&s, files.len(), Duration::from_secs(120)).await;
    assert_eq!(agent.stop().await, Some(0));
    let completed = s
        .proxy
        .s3_records()
        .iter()
        .find(|r| r.op == "CompleteMultipartUpload" && r.status == 200)
        .and_then(|r| r.upload_id.clone())
        .expect("the upload was completed");

    use_state(&mut s, &copy);
    let before = s.proxy.s3_records().len();
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    wait_done(&s, files.len(), Duration::from_secs(120)).await;
    assert_eq!(agent.stop().await, Some(0));
    assert_all_arrived(&s, &files).await;
    let after = s.proxy.s3_records()[before..].to_vec();
    let summary: Vec<String> = after.iter().map(Record::summary).collect();
    assert!(
        after
            .iter()
            .any(|r| r.upload_id.as_deref() == Some(completed.as_str()) && r.status == 404),
        "the completed upload was resumed and refused: {summary:#?}"
    );
    assert_eq!(
        after
            .iter()
            .filter(|r| r.op == "CreateMultipartUpload")
            .count(),
        1,
        "started over once: {summary:#?}"
    );
    s.proxy.assert_only_writes();
    assert_no_partial_writes(&s.proxy.records(), &files);
    eprintln!("after the restart: {summary:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sts_that_never_answers_does_not_stall_the_renewal() {
    // Credentials live 30 s and are renewed from 5 s on. STS accepts the
    // renewal requests of the next 10 s and never answers them. Only the
    // per-attempt deadline (20 s) gets the renewal out in time, before the
    // first credentials expire in the middle of a 40 s upload.
    let moto = crate::support::moto::Moto::start();
    let proxy = crate::support::proxy::Proxy::start(&moto.url).await;
    let config = moto.config(
        &proxy.url,
        "duration = \"30s\"\nrefresh_before = \"25s\"\n\
         [bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n\
         [upload]\npart_size = \"5MiB\"\nconcurrency = 2\nbandwidth_limit = \"1MiB/s\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let data = crate::support::write_file(work.path(), "slow.bin", 40 * 1024 * 1024, 41);
    let mut cmd = crate::support::putonly(Some(moto.dir.path()));
    cmd.args(["push", "--prefix", "foo/", "--config"])
        .arg(&config)
        .arg("slow.bin")
        .current_dir(work.path());
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.count("AssumeRole") == 0 {
        assert!(Instant::now() < deadline, "no AssumeRole");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.hang_for(
        "AssumeRole",
        Duration::from_secs(12),
        Duration::from_secs(300),
    );
    let out = child.wait_with_output().await.unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "the push outlived the hung STS");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("no valid credentials"),
        "the upload had to wait for credentials: the renewal was stalled"
    );
    let records = proxy.records();
    let held = records
        .iter()
        .filter(|r| r.op == "AssumeRole" && r.injected)
        .count();
    let answered = records
        .iter()
        .filter(|r| r.op == "AssumeRole" && r.status == 200)
        .count();
    assert!(held >= 1, "a renewal was held");
    assert!(answered >= 2, "a renewal got through after the hang");
    let checked = proxy.assert_no_expired_credentials();
    assert!(crate::support::get(&moto.admin(), "account-b-bucket", "foo/slow.bin").await == data);
    proxy.assert_only_writes();
    eprintln!(
        "{held} AssumeRole held unanswered, {answered} answered; {checked} S3 requests checked against expiry"
    );
}
