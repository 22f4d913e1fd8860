//! Ordered batches (`[[watch]] marker`) against moto with the seed's
//! policy, through the recording proxy: a marker's first request crosses
//! the wire only after every file of its batch was answered, however the
//! batch is made (multipart files, a slow link, a file still being written
//! when the marker appears, the marker found first by a scan), across kill
//! -9 in a loop; a file that fails holds its marker, visibly; the manifest
//! lists what was sent.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use putonly::checksum::Crc;
use putonly::config::ChecksumKind;

use crate::agent::{Agent, BUCKET, Setup, setup_custom, status, wait_done};
use crate::support::proxy::Record;
use crate::support::{bytes, get, putonly, run};

const MIB: usize = 1024 * 1024;

fn is_write(r: &Record) -> bool {
    matches!(
        r.op.as_str(),
        "PutObject" | "CreateMultipartUpload" | "UploadPart" | "CompleteMultipartUpload"
    )
}

fn is_final_success(r: &Record) -> bool {
    (r.op == "PutObject" || r.op == "CompleteMultipartUpload") && r.status == 200
}

/// Every request for `marker` (any write, whatever its answer) was sent
/// after every successful final write of every key in `batch` was
/// answered: the marker could not have arrived before any of them, nor
/// raced one. Returns how many batch writes were checked.
fn assert_marker_after(records: &[Record], marker: &str, batch: &[String]) -> usize {
    let marker_first = records
        .iter()
        .filter(|r| is_write(r) && r.key.as_deref() == Some(marker))
        .map(|r| r.at)
        .min()
        .unwrap_or_else(|| panic!("{marker} was never sent"));
    let mut checked = 0;
    for key in batch {
        let writes: Vec<&Record> = records
            .iter()
            .filter(|r| is_final_success(r) && r.key.as_deref() == Some(key.as_str()))
            .collect();
        assert!(
            !writes.is_empty(),
            "{key} of {marker}'s batch never arrived"
        );
        for w in writes {
            let answered = w.answered.expect("an answered write");
            assert!(
                answered < marker_first,
                "{marker} was sent at {marker_first:?}, before {key}'s {} was answered at {answered:?}",
                w.op
            );
            checked += 1;
        }
    }
    checked
}

fn key(rel: &str) -> String {
    format!("fighters/in/{rel}")
}

async fn batch_setup(agent: &str, upload: &str) -> Setup {
    setup_custom(
        "",
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"500ms\"\n\
         marker = [\"_SUCCESS\", \"*.done\"]\nmanifest = true\n",
        "[\"foo/\", \"fighters/\"]",
        agent,
        upload,
    )
    .await
}

fn write(outbox: &Path, rel: &str, data: &[u8]) {
    let p = outbox.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_marker_arrives_after_every_file_of_its_batch_and_after_its_manifest() {
    let s = batch_setup(
        "",
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nconcurrency = 4\n",
    )
    .await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A slow link: the multipart file takes seconds.
    s.proxy.throttle(Some(4 * MIB as u64));
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..20 {
        files.insert(
            format!("b1/f-{i}.csv"),
            bytes(100 + i * 300, 100 + i as u64),
        );
    }
    for i in 0..5 {
        files.insert(format!("b1/sub/s-{i}.csv"), bytes(2000 + i, 200 + i as u64));
    }
    files.insert("b1/big.bin".into(), bytes(12 * MIB + 17, 300));
    for (rel, data) in &files {
        write(&s.outbox, rel, data);
    }
    // A file still being written when the markers appear: it exists, so
    // they wait for it (written over about 3 s, held open).
    let slow_data = bytes(300_000, 400);
    let slow_path = s.outbox.join("b1/sub/slow.dat");
    let slow = {
        let data = slow_data.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(slow_path).unwrap();
            for chunk in data.chunks(data.len().div_ceil(6)) {
                f.write_all(chunk).unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    write(&s.outbox, "b1/sub/_SUCCESS", b"");
    write(&s.outbox, "b1/_SUCCESS", b"ok");
    slow.await.unwrap();
    files.insert("b1/sub/slow.dat".into(), slow_data);
    files.insert("b1/sub/_SUCCESS".into(), b"".to_vec());
    files.insert("b1/_SUCCESS".into(), b"ok".to_vec());
    wait_done(&s, files.len(), Duration::from_secs(240)).await;
    assert_eq!(agent.stop().await, Some(0));

    let records = s.proxy.records();
    s.proxy.assert_only_writes();
    let admin = s.moto.admin();
    for (rel, data) in &files {
        assert!(get(&admin, BUCKET, &key(rel)).await == *data, "{rel}");
    }
    let batch = |dir: &str, marker: &str| -> Vec<String> {
        files
            .keys()
            .filter(|r| r.starts_with(dir) && r.as_str() != marker)
            .map(|r| key(r))
            .collect()
    };
    let sub = batch("b1/sub/", "b1/sub/_SUCCESS");
    let top = batch("b1/", "b1/_SUCCESS");
    assert_eq!((sub.len(), top.len()), (6, 28));
    let n = assert_marker_after(&records, &key("b1/sub/_SUCCESS"), &sub)
        + assert_marker_after(&records, &key("b1/_SUCCESS"), &top);
    assert!(
        records
            .iter()
            .any(|r| r.op == "CompleteMultipartUpload" && r.key == Some(key("b1/big.bin"))),
        "big.bin went multipart"
    );

    // Each manifest lists its batch, with the checksums putonly sent, and
    // was answered before its marker was sent.
    for (marker, batch) in [("b1/_SUCCESS", &top), ("b1/sub/_SUCCESS", &sub)] {
        let manifest_key = format!("{}.manifest.json", key(marker));
        assert_marker_after(&records, &key(marker), std::slice::from_ref(&manifest_key));
        let manifest: serde_json::Value =
            serde_json::from_slice(&get(&admin, BUCKET, &manifest_key).await).unwrap();
        assert_eq!(manifest["marker"], key(marker));
        let listed: BTreeMap<String, &serde_json::Value> = manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["key"].as_str().unwrap().to_string(), e))
            .collect();
        assert_eq!(
            listed.keys().collect::<Vec<_>>(),
            batch.iter().collect::<Vec<_>>(),
            "{manifest_key}"
        );
        assert_eq!(manifest["count"], batch.len());
        for (k, e) in listed {
            let data = &files[k.strip_prefix("fighters/in/").unwrap()];
            assert_eq!(e["size"], data.len(), "{k}");
            assert_eq!(e["checksum_algorithm"], "CRC64NVME");
            assert_eq!(
                e["checksum"],
                Crc::of(ChecksumKind::Crc64Nvme, data).to_base64(),
                "{k}"
            );
        }
    }
    eprintln!("{n} batch writes checked against their markers");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_in_a_loop_never_lets_a_marker_ahead_of_its_batch() {
    let s = batch_setup(
        "",
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nconcurrency = 4\nbandwidth_limit = \"4MiB/s\"\n",
    )
    .await;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let batch = |files: &mut BTreeMap<String, Vec<u8>>, dir: &str, seed: u64| {
        let mut made = Vec::new();
        for i in 0..48 {
            let rel = format!("{dir}/{}/f-{i}.dat", i % 3);
            made.push((rel, bytes(1000 + i * 97, seed + i as u64)));
        }
        for i in 0..2 {
            made.push((
                format!("{dir}/big-{i}.bin"),
                bytes(11 * MIB + i, seed + 90 + i as u64),
            ));
        }
        // Every file, then at once the marker: the same inotify batch.
        for (rel, data) in &made {
            write(&s.outbox, rel, data);
        }
        write(&s.outbox, &format!("{dir}/_SUCCESS"), dir.as_bytes());
        made.push((format!("{dir}/_SUCCESS"), dir.as_bytes().to_vec()));
        files.extend(made);
    };
    // Written while no agent runs: the start-up scan may meet the marker
    // before its files, none of which the journal knows.
    batch(&mut files, "down", 1000);
    let mut agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    tokio::time::sleep(Duration::from_millis(700)).await;
    batch(&mut files, "up", 2000);
    let mut rng = fastrand::Rng::with_seed(14);
    let kills = 15;
    let mut killed_at = Vec::new();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1800))).await;
        assert!(agent.alive(), "the agent died on its own");
        killed_at.push(SystemTime::now());
        agent.kill9().await;
        agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    }
    wait_done(&s, files.len(), Duration::from_secs(300)).await;
    assert_eq!(agent.stop().await, Some(0));

    let records = s.proxy.records();
    s.proxy.assert_only_writes();
    let admin = s.moto.admin();
    for (rel, data) in &files {
        assert!(get(&admin, BUCKET, &key(rel)).await == *data, "{rel}");
    }
    let mut checked = 0;
    for dir in ["down", "up"] {
        let marker = format!("{dir}/_SUCCESS");
        let members: Vec<String> = files
            .keys()
            .filter(|r| r.starts_with(&format!("{dir}/")) && **r != marker)
            .map(|r| key(r))
            .collect();
        assert_eq!(members.len(), 50);
        checked += assert_marker_after(&records, &key(&marker), &members);
    }
    let resent = records.iter().filter(|r| is_final_success(r)).count() - files.len() - 2;
    // The kills landed while the markers were held.
    let first_marker = records
        .iter()
        .filter(|r| r.key.as_deref().is_some_and(|k| k.ends_with("/_SUCCESS")))
        .map(|r| r.at)
        .min()
        .unwrap();
    let while_held = killed_at.iter().filter(|t| **t < first_marker).count();
    let parts_resumed = records
        .iter()
        .filter(|r| r.op == "CreateMultipartUpload")
        .count();
    eprintln!(
        "{kills} kills, {while_held} while a marker was held; {checked} batch writes checked against their markers; \
         {resent} objects written again after a kill; {parts_resumed} multipart uploads started for 4 multipart files"
    );
    assert!(
        while_held >= kills / 2,
        "{while_held} kills while a marker was held"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_file_holds_its_marker_and_status_says_so() {
    if !crate::support::dac_is_enforced() {
        eprintln!("skipped: file permissions are not enforced here");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let s = batch_setup("failed_retry_after = \"2s\"\n", "").await;
    let mut cmd = putonly(Some(s.moto.dir.path()));
    crate::support::drop_dac_override(&mut cmd);
    let mut agent = Agent::spawn(cmd, &s.config, &s.log);
    write(&s.outbox, "c/fine.csv", b"fine");
    write(&s.outbox, "c/locked.csv", b"locked");
    write(&s.outbox, "c/dropped.csv", b"dropped");
    for name in ["locked.csv", "dropped.csv"] {
        let p = s.outbox.join("c").join(name);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    write(&s.outbox, "c/_SUCCESS", b"");
    let marker = key("c/_SUCCESS");
    let held = |st: &serde_json::Value| st["held_markers"][0].clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = status(&s).await;
        if st["unreadable"]["files"].as_u64() == Some(2) && held(&st)["waiting"].as_u64() == Some(2)
        {
            break st;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let h = held(&st);
    assert_eq!(h["key"], marker.as_str());
    for f in h["files"].as_array().unwrap() {
        let state = f["state"].as_str().unwrap();
        assert!(
            state.starts_with("cannot read yet: ") && state.contains("Permission denied"),
            "{h}"
        );
    }
    let text = run(putonly(Some(s.moto.dir.path()))
        .args(["status", "--config"])
        .arg(&s.config))
    .await;
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("c/_SUCCESS -> fighters/in/c/_SUCCESS waits for 2 files:"),
        "{text}"
    );
    assert!(text.contains("c/locked.csv [cannot read yet: "), "{text}");
    // Held for several recheck rounds: nothing of the marker on the wire.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let sent = |s: &Setup, k: &str| {
        s.proxy
            .records()
            .iter()
            .any(|r| r.key.as_deref() == Some(k))
    };
    assert!(
        !sent(&s, &marker),
        "the marker went ahead of an unreadable file"
    );

    // A file of the batch deleted before it was sent no longer holds it.
    std::fs::remove_file(s.outbox.join("c/dropped.csv")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(&s).await;
        if held(&st)["waiting"].as_u64() == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(!sent(&s, &marker));
    // The other one fixed: it is sent (as soon as its mode changed), then
    // the marker.
    let fixed_at = SystemTime::now();
    std::fs::set_permissions(
        s.outbox.join("c/locked.csv"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    wait_done(&s, 3, Duration::from_secs(60)).await;
    assert!(agent.alive());
    assert_eq!(agent.stop().await, Some(0));
    let records = s.proxy.records();
    s.proxy.assert_only_writes();
    assert_marker_after(&records, &marker, &[key("c/fine.csv"), key("c/locked.csv")]);
    let first_marker = records
        .iter()
        .filter(|r| r.key.as_deref() == Some(marker.as_str()))
        .map(|r| r.at)
        .min()
        .unwrap();
    assert!(first_marker > fixed_at);
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.contains("a file of the batch is gone before it was sent"),
        "{log}"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &get(&s.moto.admin(), BUCKET, &format!("{marker}.manifest.json")).await,
    )
    .unwrap();
    assert_eq!(manifest["count"], 2, "{manifest}");
}

/// With after_upload = "delete" the files of a batch are sent and gone
/// before the marker appears: they are done, the marker goes, and its
/// manifest still lists them; the folder's next batch lists only its own.
#[tokio::test(flavor = "multi_thread")]
async fn with_delete_the_files_sent_before_the_marker_are_in_its_manifest() {
    let s = setup_custom(
        "",
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"300ms\"\n\
         marker = \"_SUCCESS\"\nmanifest = true\nafter_upload = \"delete\"\n",
        "[\"foo/\", \"fighters/\"]",
        "",
        "",
    )
    .await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let admin = s.moto.admin();
    let mut done = 0;
    for (round, names) in [(1, vec!["a", "b", "sub/c"]), (2, vec!["d"])] {
        let from = s.proxy.records().len();
        let mut batch = Vec::new();
        for n in &names {
            let rel = format!("e/{n}.csv");
            write(&s.outbox, &rel, format!("{round}{n}").as_bytes());
            batch.push(key(&rel));
        }
        done += names.len();
        wait_done(&s, done, Duration::from_secs(60)).await;
        // Sent and deleted: nothing of the batch is left on disk.
        let deadline = Instant::now() + Duration::from_secs(20);
        while names
            .iter()
            .any(|n| s.outbox.join(format!("e/{n}.csv")).exists())
        {
            assert!(Instant::now() < deadline, "not deleted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        write(&s.outbox, "e/_SUCCESS", format!("round {round}").as_bytes());
        done += 1;
        wait_done(&s, done, Duration::from_secs(60)).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.outbox.join("e/_SUCCESS").exists() {
            assert!(Instant::now() < deadline, "marker not deleted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let records = s.proxy.records();
        assert_marker_after(&records[from..], &key("e/_SUCCESS"), &batch);
        let manifest: serde_json::Value = serde_json::from_slice(
            &get(
                &admin,
                BUCKET,
                &format!("{}.manifest.json", key("e/_SUCCESS")),
            )
            .await,
        )
        .unwrap();
        let listed: Vec<&str> = manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["key"].as_str().unwrap())
            .collect();
        batch.sort();
        assert_eq!(listed, batch, "round {round}: {manifest}");
    }
    assert_eq!(agent.stop().await, Some(0));
    s.proxy.assert_only_writes();
}
