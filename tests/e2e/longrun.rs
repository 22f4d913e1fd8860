//! What months of running meet, against moto through the recording proxy:
//! producers renaming new versions over files the agent is deleting or
//! moving, a second agent on the same state folder, a Complete the server
//! refuses for good, files deleted while they wait for a retry or while the
//! agent is down, a journal that cannot be written, a slow link with big
//! parts, and an answer that stops after its headers. Nothing may be lost,
//! nothing may stay pending forever, and nothing may hang.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::agent::{Agent, BUCKET, http_get, setup_custom, setup_with, status, wait_done};
use crate::support::{bytes, get, putonly, run};

const MIB: usize = 1024 * 1024;

fn rounds(ci: usize, long: usize) -> usize {
    if std::env::var_os("PUTONLY_LONG").is_some() {
        long
    } else {
        ci
    }
}

/// Sizes of the successful writes of `key` the proxy saw.
fn written_sizes(records: &[crate::support::proxy::Record], key: &str) -> BTreeSet<u64> {
    crate::support::proxy::sizes_written(records, key)
        .into_iter()
        .flatten()
        .collect()
}

/// A producer renames new versions over files in a tight loop while the
/// agent deletes (or moves) the versions it uploaded. Each new version goes
/// over the name right after the version before it was uploaded, racing the
/// agent's after-upload action: every version must be uploaded (each has its
/// own size, so the proxy's record tells), and none may be removed unsent.
#[tokio::test(flavor = "multi_thread")]
async fn versions_renamed_over_files_being_deleted_or_moved_are_never_lost() {
    let s = setup_with(
        "[[watch]]\npath = \"{outbox}/del\"\nprefix = \"foo/del\"\nsettle = \"100ms\"\nafter_upload = \"delete\"\n\
         [[watch]]\npath = \"{outbox}/mv\"\nprefix = \"foo/mv\"\nsettle = \"100ms\"\nafter_upload = \"move\"\nmove_to = \"{work}/sent\"\n",
        "[\"foo/\"]",
        "concurrency = 8\n",
    )
    .await;
    for d in ["del", "mv"] {
        std::fs::create_dir_all(s.outbox.join(d)).unwrap();
    }
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let total = rounds(240, 10_000);
    // Eight chains (4 names in each watch) run side by side; each version of
    // a name has its own size.
    let chains: Vec<(String, String)> = (0..8)
        .map(|c| {
            let folder = if c % 2 == 0 { "del" } else { "mv" };
            (folder.to_string(), format!("f{c}.dat"))
        })
        .collect();
    let per_chain = total / chains.len();
    let mut producers = Vec::new();
    for (c, (folder, name)) in chains.clone().into_iter().enumerate() {
        let outbox = s.outbox.join(&folder);
        let key = format!("foo/{folder}/{name}");
        let log = s.proxy.log();
        producers.push(tokio::spawn(async move {
            let mut sizes = Vec::new();
            for round in 0..per_chain {
                let size = 1000 + c * 100_000 + round * 7;
                let tmp = outbox.join(format!(".{name}.tmp"));
                std::fs::write(&tmp, bytes(size, (c * 100_000 + round) as u64)).unwrap();
                std::fs::rename(&tmp, outbox.join(&name)).unwrap();
                sizes.push(size as u64);
                // The next version goes over the name as soon as this one
                // is in the bucket: while the agent deletes or moves it.
                let deadline = Instant::now() + Duration::from_secs(120);
                while !written_sizes(&log.records(), &key).contains(&(size as u64)) {
                    assert!(
                        Instant::now() < deadline,
                        "{key} size {size} never uploaded"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            (key, sizes)
        }));
    }
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for p in producers {
        let (key, sizes) = p.await.unwrap();
        expected.insert(key, sizes);
    }
    // The last versions are deleted or moved too.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<_> = chains
            .iter()
            .filter(|(f, n)| s.outbox.join(f).join(n).exists())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "never acted on: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(agent.stop().await, Some(0));
    let records = s.proxy.records();
    for (key, sizes) in &expected {
        let written = written_sizes(&records, key);
        let missing: Vec<_> = sizes.iter().filter(|s| !written.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "{key}: versions never uploaded: {missing:?}"
        );
    }
    // What was moved is whole versions, none replacing another (a version
    // the producer renamed over before the agent moved it is in the bucket,
    // not in move_to).
    let sent = s.work.path().join("sent");
    let all_sizes: BTreeSet<u64> = expected.values().flatten().copied().collect();
    let moved: Vec<u64> = std::fs::read_dir(&sent)
        .map(|d| d.map(|e| e.unwrap().metadata().unwrap().len()).collect())
        .unwrap_or_default();
    assert!(!moved.is_empty(), "nothing was moved");
    assert!(
        moved.iter().all(|n| all_sizes.contains(n)),
        "move_to holds something that is not a version: {moved:?}"
    );
    assert_eq!(
        moved.iter().collect::<BTreeSet<_>>().len(),
        moved.len(),
        "a version was moved twice"
    );
    // Nothing left behind under a private name.
    for folder in ["del", "mv"] {
        let names: Vec<String> = std::fs::read_dir(s.outbox.join(folder))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".putonly-")),
            "left in {folder}: {names:?}"
        );
    }
    s.proxy.assert_only_writes();
    eprintln!("{total} versions renamed over files being deleted or moved; none lost");
}

/// Two files of the same name moved one after the other: both are kept.
#[tokio::test(flavor = "multi_thread")]
async fn move_keeps_both_of_two_same_named_files() {
    let s = setup_with(
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"foo/mv\"\nsettle = \"200ms\"\nafter_upload = \"move\"\nmove_to = \"{work}/sent\"\n",
        "[\"foo/\"]",
        "",
    )
    .await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let sent = s.work.path().join("sent");
    for (i, body) in [b"first".as_slice(), b"second, longer"].iter().enumerate() {
        std::fs::write(s.outbox.join("a.csv"), body).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_dir(&sent).map_or(0, |d| d.count()) <= i {
            assert!(Instant::now() < deadline, "not moved");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(agent.stop().await, Some(0));
    assert_eq!(std::fs::read(sent.join("a.csv")).unwrap(), b"first");
    assert_eq!(
        std::fs::read(sent.join("a.csv.1")).unwrap(),
        b"second, longer"
    );
}

/// One agent per state folder: a second `run` says who holds it and exits
/// 2; `status` and `check` go on working.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_on_the_same_state_folder_is_refused() {
    let s = setup_with(
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"foo/x\"\nsettle = \"200ms\"\n",
        "[\"foo/\"]",
        "",
    )
    .await;
    let first = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    status(&s).await; // its journal exists: it runs
    let mut second = putonly(Some(s.moto.dir.path()));
    second.args(["run", "--config"]).arg(&s.config);
    let out = tokio::time::timeout(Duration::from_secs(30), run(&mut second))
        .await
        .expect("a second agent on the same state folder must not run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.pid()))
            && stderr.contains("one agent per state folder"),
        "{stderr}"
    );
    let out = run(putonly(Some(s.moto.dir.path()))
        .args(["check", "--offline", "--config"])
        .arg(&s.config))
    .await;
    assert_eq!(out.status.code(), Some(0));
    std::fs::write(s.outbox.join("still.txt"), b"the first agent works on").unwrap();
    wait_done(&s, 1, Duration::from_secs(30)).await;
    assert_eq!(first.stop().await, Some(0));
}

/// A CompleteMultipartUpload refused for good (InvalidPart) is not sent
/// again with the same upload: the next try starts afresh.
#[tokio::test(flavor = "multi_thread")]
async fn a_complete_refused_for_good_starts_afresh() {
    let s = setup_custom(
        "",
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"foo/ip\"\nsettle = \"200ms\"\n",
        "[\"foo/\"]",
        "failed_retry_after = \"2s\"\n",
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\n",
    )
    .await;
    s.proxy
        .fail_next("CompleteMultipartUpload", 1, 400, "InvalidPart");
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let data = bytes(11 * MIB, 77);
    std::fs::write(s.outbox.join("big.bin"), &data).unwrap();
    wait_done(&s, 1, Duration::from_secs(60)).await;
    assert_eq!(agent.stop().await, Some(0));
    assert!(get(&s.moto.admin(), BUCKET, "foo/ip/big.bin").await == data);
    let records = s.proxy.records();
    let creates: Vec<_> = records
        .iter()
        .filter(|r| r.op == "CreateMultipartUpload" && r.status == 200)
        .collect();
    assert_eq!(creates.len(), 2, "a new upload after the refusal");
    let completes: Vec<_> = records
        .iter()
        .filter(|r| r.op == "CompleteMultipartUpload")
        .map(|r| (r.upload_id.clone(), r.status))
        .collect();
    assert_eq!(
        completes.len(),
        2,
        "{completes:?}: the refused one is not sent again"
    );
    assert_ne!(completes[0].0, completes[1].0);
}

/// A file deleted while it waits out a retry backoff, and one deleted while
/// the agent is down: their records close, `oldest pending` and /healthz
/// return to normal, and the multipart upload is aborted (best effort).
#[tokio::test(flavor = "multi_thread")]
async fn files_deleted_during_a_backoff_or_while_down_close_their_records() {
    let port = crate::support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let s = setup_custom(
        "",
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"foo/g\"\nsettle = \"200ms\"\n",
        "[\"foo/\"]",
        "",
        &format!(
            "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nmax_attempts = 1\n\
             [metrics]\nlisten = \"{addr}\"\nunhealthy_after = \"2s\"\n"
        ),
    )
    .await;
    // Parts are refused for a while: the file waits for its retry.
    s.proxy
        .fail_for("UploadPart", Duration::from_secs(600), 503, "SlowDown");
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    std::fs::write(s.outbox.join("backoff.bin"), bytes(6 * MIB, 1)).unwrap();
    let pending = |st: &serde_json::Value| st["pending"].as_u64().unwrap_or(0);
    // Five refused attempts: the backoff before the next is 16 s or more.
    let deadline = Instant::now() + Duration::from_secs(60);
    while pending(&status(&s).await) == 0 || s.proxy.count("UploadPart") < 5 {
        assert!(Instant::now() < deadline, "never five attempts");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&addr, "/healthz").await.0 != 503 {
        assert!(Instant::now() < deadline, "/healthz never said stalled");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    std::fs::remove_file(s.outbox.join("backoff.bin")).unwrap();
    // Closed as soon as the watcher hears of it, not at the next attempt.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = status(&s).await;
        if pending(&st) == 0 && st["oldest_pending"].is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {st}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&addr, "/healthz").await.0 != 200 {
        assert!(Instant::now() < deadline, "/healthz stays unhealthy");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        s.proxy.count("AbortMultipartUpload") >= 1,
        "the upload is aborted"
    );

    // Now one that is pending when the agent stops, and deleted meanwhile.
    std::fs::write(s.outbox.join("down.bin"), bytes(6 * MIB, 2)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pending(&status(&s).await) == 0 {
        assert!(Instant::now() < deadline, "never pending");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(agent.stop().await, Some(0));
    std::fs::remove_file(s.outbox.join("down.bin")).unwrap();
    let aborts = s.proxy.count("AbortMultipartUpload");
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(&s).await;
        if pending(&st) == 0 && st["oldest_pending"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still pending after a restart: {st}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.proxy.count("AbortMultipartUpload") == aborts {
        assert!(
            Instant::now() < deadline,
            "the upload of down.bin is not aborted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agent.stop().await, Some(0));
    s.proxy.assert_only_writes();
}

/// The journal on a full filesystem: /healthz says so, nothing is deleted
/// before it is on record, and once there is room again every file arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_journal_disk_turns_healthz_unhealthy_and_loses_nothing() {
    if !crate::support::shape::is_root() {
        eprintln!("skipped: mounting a small filesystem for the journal needs root");
        return;
    }
    let port = crate::support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let s = setup_custom(
        "",
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"foo/full\"\nsettle = \"200ms\"\nafter_upload = \"delete\"\n",
        "[\"foo/\"]",
        "",
        &format!("[metrics]\nlisten = \"{addr}\"\n"),
    )
    .await;
    // The state folder on a 1 MiB tmpfs of its own.
    let state = s.work.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "putonly-test"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(state.clone());
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    std::fs::write(s.outbox.join("before.txt"), b"room").unwrap();
    wait_done(&s, 1, Duration::from_secs(30)).await;
    // Fill it, and keep it full (as another process filling the disk
    // would): room the journal frees is taken again.
    let filler = state.join("filler");
    let hogging = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hog = {
        let (filler, hogging) = (filler.clone(), hogging.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            let chunk = vec![0u8; 4096];
            while hogging.load(std::sync::atomic::Ordering::Relaxed) {
                if f.write_all(&chunk).is_err() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&filler).map_or(0, |m| m.len()) < 512 * 1024 {
        assert!(Instant::now() < deadline, "the filler does not grow");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut files = BTreeMap::new();
    for i in 0..20 {
        let data = bytes(5000 + i, 500 + i as u64);
        std::fs::write(s.outbox.join(format!("full-{i}.txt")), &data).unwrap();
        files.insert(format!("full-{i}.txt"), data);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = http_get(&addr, "/healthz").await;
        if code == 503 && body.contains("journal cannot be written") {
            break;
        }
        assert!(Instant::now() < deadline, "/healthz stayed {code}: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Nothing is deleted that is not on record: a file gone while the
    // journal is full was recorded done before (in a moment of room a
    // checkpoint made), so its object is in the bucket as written.
    let admin = s.moto.admin();
    for (name, data) in &files {
        if !s.outbox.join(name).exists() {
            assert!(
                get(&admin, BUCKET, &format!("foo/full/{name}")).await == *data,
                "{name} deleted, not in the bucket as written"
            );
        }
    }
    hogging.store(false, std::sync::atomic::Ordering::Relaxed);
    hog.join().unwrap();
    std::fs::remove_file(&filler).unwrap();
    wait_done(&s, files.len() + 1, Duration::from_secs(120)).await;
    let healthy = |want: u16| {
        let (addr, log, state) = (addr.clone(), s.log.clone(), state.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(40);
            loop {
                let (code, body) = http_get(&addr, "/healthz").await;
                if code == want {
                    return body;
                }
                if Instant::now() >= deadline {
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    let state = std::process::Command::new("ls")
                        .args(["-la"])
                        .arg(&state)
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    panic!(
                        "/healthz stays {code}: {body}\nstate folder:\n{state}\nagent log tail:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    healthy(200).await;

    assert_eq!(agent.stop().await, Some(0));

    // A read-only state folder at start-up: the agent says so and stops
    // (the kernel refuses to make a filesystem read-only under open files,
    // so this is where a read-only journal meets the agent).
    let ok = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&state)
        .status()
        .unwrap()
        .success();
    assert!(ok, "remount read-only");
    let out = run(putonly(Some(s.moto.dir.path()))
        .args(["run", "--config"])
        .arg(&s.config))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    for (name, data) in &files {
        assert!(
            get(&admin, BUCKET, &format!("foo/full/{name}")).await == *data,
            "{name}"
        );
    }
}

/// A 1 MiB/s link shared by two 8 MiB parts: each part needs 16 s, longer
/// than `request_timeout` (10 s here); the deadline grows with the part.
#[tokio::test(flavor = "multi_thread")]
async fn big_parts_on_a_slow_link_are_not_cut_off() {
    let s = setup_custom(
        "",
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"foo/slow\"\nsettle = \"200ms\"\n",
        "[\"foo/\"]",
        "",
        "part_size = \"8MiB\"\nmultipart_threshold = \"8MiB\"\nconcurrency = 2\nrequest_timeout = \"10s\"\nmax_attempts = 1\n",
    )
    .await;
    s.proxy.throttle(Some(MIB as u64));
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let data = bytes(16 * MIB + 10, 88);
    std::fs::write(s.outbox.join("slow.bin"), &data).unwrap();
    wait_done(&s, 1, Duration::from_secs(120)).await;
    assert_eq!(agent.stop().await, Some(0));
    let parts: Vec<u16> = s
        .proxy
        .records()
        .iter()
        .filter(|r| r.op == "UploadPart")
        .map(|r| r.status)
        .collect();
    assert_eq!(parts, vec![200, 200, 200], "each part once, none cut off");
    assert_eq!(s.proxy.count("CreateMultipartUpload"), 1);
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        !log.contains("no whole answer"),
        "a part was cut off: {log}"
    );
    s.proxy.throttle(None);
    assert!(get(&s.moto.admin(), BUCKET, "foo/slow/slow.bin").await == data);
}

/// The answer to a CompleteMultipartUpload trickles after its headers, a
/// byte now and then, never ending (too slow to count as stalled for the
/// SDK): the request has a deadline, body included, and the file arrives.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_that_stops_after_its_headers_does_not_hang_the_upload() {
    let s = setup_custom(
        "",
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"foo/stall\"\nsettle = \"200ms\"\n",
        "[\"foo/\"]",
        "",
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nrequest_timeout = \"5s\"\n",
    )
    .await;
    s.proxy.stall_answer_body("CompleteMultipartUpload", 1);
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let data = bytes(6 * MIB, 99);
    std::fs::write(s.outbox.join("stall.bin"), &data).unwrap();
    wait_done(&s, 1, Duration::from_secs(90)).await;
    assert_eq!(agent.stop().await, Some(0));
    assert!(get(&s.moto.admin(), BUCKET, "foo/stall/stall.bin").await == data);
    assert!(
        s.proxy.count("CompleteMultipartUpload") >= 2,
        "tried again after the deadline"
    );
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.contains("no whole answer within"), "{log}");
}

/// A journal with 200,000 old records whose files are gone: pruning
/// them must not hold up the systemd watchdog's ping (WATCHDOG_USEC 2 s:
/// a ping a second), nor run again and again.
#[tokio::test(flavor = "multi_thread")]
async fn pruning_a_big_journal_does_not_stop_the_watchdog() {
    let s = setup_with(
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"foo/p\"\nsettle = \"200ms\"\n",
        "[\"foo/\"]",
        "",
    )
    .await;
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text = text.replacen("[state]\n", "[state]\nretention = \"1s\"\n", 1);
    std::fs::write(&s.config, text).unwrap();
    // The journal made by a first run, then filled the way years of
    // running fill it.
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    status(&s).await;
    assert_eq!(agent.stop().await, Some(0));
    let journal = s.work.path().join("state/journal.sqlite");
    let rows = rounds(200_000, 1_000_000);
    let fill = std::process::Command::new(
        crate::support::shape::python().expect("python3 with sqlite3"),
    )
    .args([
        "-c",
        "import sqlite3, sys\n\
         c = sqlite3.connect(sys.argv[1])\n\
         n = int(sys.argv[2])\n\
         c.executemany(\"INSERT INTO files (watch, path, dev, ino, size, mtime_ns, key, state, created_at, updated_at, done_at) VALUES ('w', ?, ?, ?, 1, 1, ?, 'done', 0, 0, 0)\",\n\
             (((sys.argv[3] + '/gone/f%d' % i).encode(), int(sys.argv[4]), i, 'foo/p/f%d' % i) for i in range(n)))\n\
         c.commit()\n",
    ])
    .arg(&journal)
    .arg(rows.to_string())
    .arg(&s.outbox)
    .arg({
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&s.outbox).unwrap().dev().to_string()
    })
    .status()
    .unwrap();
    assert!(fill.success(), "filling the journal");

    let socket_path = s.work.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut cmd = putonly(Some(s.moto.dir.path()));
    cmd.env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000");
    let agent = Agent::spawn(cmd, &s.config, &s.log);
    // Pings are timed as they come, apart from the status polling below.
    let pings = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let listener = {
        let pings = pings.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "WATCHDOG=1")
                {
                    pings.lock().unwrap().push(Instant::now());
                }
            }
        })
    };
    let started = Instant::now();
    let mut pruned_at = None;
    while started.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if pruned_at.is_none() && status(&s).await["done"].as_u64() == Some(0) {
            pruned_at = Some(Instant::now());
        }
        if pruned_at.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            break;
        }
    }
    listener.abort();
    let pings = pings.lock().unwrap().clone();
    assert_eq!(agent.stop().await, Some(0));
    let Some(pruned) = pruned_at else {
        let log = std::fs::read_to_string(&s.log).unwrap_or_default();
        panic!(
            "the old records were not pruned within 5 minutes: {}\n{log}",
            status(&s).await
        );
    };
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    let worst = gaps.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{rows} records pruned in {:?}; {} watchdog pings, the longest gap {worst:?}",
        pruned - started,
        pings.len()
    );
    assert!(pings.len() >= 3, "too few pings: {pings:?}");
    assert!(
        worst < Duration::from_secs(2),
        "the watchdog would have killed the agent: a {worst:?} gap between pings"
    );
}

/// The agent's connections carry TCP keepalive (probes after 30 s idle), so
/// a peer that vanished without a word (a NAT that forgot the connection, a
/// host that died) is found out without waiting for a request's deadline.
/// Checked on the agent's own sockets, taken with pidfd_getfd while a slow
/// upload holds them open.
#[tokio::test(flavor = "multi_thread")]
async fn the_agents_connections_carry_tcp_keepalive() {
    if !crate::support::shape::is_root() {
        eprintln!("skipped: looking at another process's sockets needs root");
        return;
    }
    let s = setup_custom(
        "",
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"foo/ka\"\nsettle = \"200ms\"\n",
        "[\"foo/\"]",
        "",
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nconcurrency = 2\n",
    )
    .await;
    s.proxy.throttle(Some(256 * 1024));
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    std::fs::write(s.outbox.join("slow.bin"), bytes(10 * MIB, 5)).unwrap();
    let port: u16 = s.proxy.url.rsplit(':').next().unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let options = loop {
        let found = socket_options(agent.pid(), port);
        if !found.is_empty() {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no connection of the agent's to the endpoint"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    s.proxy.throttle(None);
    assert_eq!(agent.stop().await, Some(0));
    assert!(
        options
            .iter()
            .all(|&(keepalive, idle)| keepalive && idle == 30),
        "(SO_KEEPALIVE, TCP_KEEPIDLE) of the agent's connections: {options:?}"
    );
}

/// (SO_KEEPALIVE, TCP_KEEPIDLE) of each TCP socket of process `pid`
/// connected to 127.0.0.1:`port`.
fn socket_options(pid: i32, port: u16) -> Vec<(bool, i32)> {
    // Socket inodes connected to the port, from /proc/net/tcp.
    let remote = format!("0100007F:{port:04X}");
    let inodes: BTreeSet<String> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[2] == remote && f[3] == "01")
        .map(|f| f[9].to_string())
        .collect();
    let mut out = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    // SAFETY: plain syscalls on numbers; every returned descriptor is ours
    // and closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd < 0 {
        return out;
    }
    for fd in fds.flatten() {
        let Ok(link) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|l| l.strip_suffix(']'))
        else {
            continue;
        };
        if !inodes.contains(inode) {
            continue;
        }
        let Ok(target) = fd.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: as above.
        let mine = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) } as i32;
        if mine < 0 {
            continue;
        }
        let get = |level: i32, name: i32| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt into a local int of the size given.
            let r = unsafe {
                libc::getsockopt(
                    mine,
                    level,
                    name,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if r == 0 { v } else { -1 }
        };
        out.push((
            get(libc::SOL_SOCKET, libc::SO_KEEPALIVE) == 1,
            get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        ));
        // SAFETY: closing the descriptor pidfd_getfd gave us.
        unsafe { libc::close(mine) };
    }
    // SAFETY: closing our pidfd.
    unsafe { libc::close(pidfd) };
    out
}
