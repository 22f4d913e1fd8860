//! Streaming a file while it is written (`[[watch]] stream = true`)
//! against moto with the seed's policy, through the recording proxy: a
//! 200 MiB file written at 5 MiB/s arrives within seconds of its close,
//! its parts sent during the write; a file truncated or rewritten in place
//! while it is streamed never makes an object of mixed bytes (the parts
//! sent are abandoned, the finished file sent afresh); an upload a kill -9
//! leaves behind is aborted at the next start, and the file still arrives.
//! Only writes cross the wire.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::agent::{Agent, BUCKET, Setup, setup_with, wait_done};
use crate::support::proxy::{Log, Record};
use crate::support::{bytes, get};

const MIB: usize = 1024 * 1024;

async fn stream_setup() -> Setup {
    setup_with(
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"1s\"\nstream = true\n",
        "[\"foo/\", \"fighters/\"]",
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\n",
    )
    .await
}

fn key(rel: &str) -> String {
    format!("fighters/in/{rel}")
}

/// Writes `data` to `path` at `rate` bytes a second in 256 KiB pieces,
/// the file held open throughout (an append-only producer); returns when
/// it closed the file.
fn write_slowly(path: &Path, data: &[u8], rate: usize) -> SystemTime {
    let mut f = std::fs::File::create(path).unwrap();
    append_slowly(&mut f, data, rate);
    drop(f);
    SystemTime::now()
}

fn append_slowly(f: &mut std::fs::File, data: &[u8], rate: usize) {
    let piece = 256 * 1024;
    let gap = Duration::from_secs_f64(piece as f64 / rate as f64);
    let start = Instant::now();
    for (i, chunk) in data.chunks(piece).enumerate() {
        f.write_all(chunk).unwrap();
        let next = start + gap * (i as u32 + 1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

fn parts_sent(records: &[Record], key: &str) -> Vec<Record> {
    records
        .iter()
        .filter(|r| r.op == "UploadPart" && r.status == 200 && r.key.as_deref() == Some(key))
        .cloned()
        .collect()
}

/// Waits until at least `n` parts of `key` were accepted.
async fn wait_parts(proxy: &Log, key: &str, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while parts_sent(&proxy.records(), key).len() < n {
        assert!(
            Instant::now() < deadline,
            "{n} parts of {key} were not sent while it was written within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_of(s: &Setup) -> String {
    std::fs::read_to_string(&s.log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_written_for_40_seconds_arrives_seconds_after_its_close_its_parts_sent_during_the_write()
 {
    let s = stream_setup().await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let data = bytes(200 * MIB, 5150);
    let path = s.outbox.join("export/big.bin");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let began = SystemTime::now();
    let closed = {
        let (path, data) = (path.clone(), data.clone());
        tokio::task::spawn_blocking(move || write_slowly(&path, &data, 5 * MIB))
            .await
            .unwrap()
    };
    let wrote_for = closed.duration_since(began).unwrap();
    wait_done(&s, 1, Duration::from_secs(120)).await;
    let records = s.proxy.records();
    let k = key("export/big.bin");
    let parts = parts_sent(&records, &k);
    let during = parts.iter().filter(|r| r.at < closed).count();
    let done = crate::support::proxy::writes_of(&records, &k);
    assert_eq!(done.len(), 1, "one object write: {done:#?}");
    assert_eq!(done[0].op, "CompleteMultipartUpload");
    let arrived = done[0].answered.expect("an answered Complete");
    let after_close = arrived.duration_since(closed).unwrap_or_default();
    eprintln!(
        "written over {wrote_for:?}; {} parts, {during} of them sent during the write; \
         the object arrived {after_close:?} after the close (settle 1 s)",
        parts.len()
    );
    assert_eq!(parts.len(), 40, "each 5 MiB part sent once");
    assert!(
        during >= 35,
        "only {during} of 40 parts were sent while the file was written"
    );
    assert!(
        after_close < Duration::from_secs(10),
        "the object arrived {after_close:?} after the file was closed"
    );
    // The upload completed is the one the parts went to during the write.
    assert_eq!(done[0].upload_id, parts[0].upload_id);
    assert!(
        get(&s.moto.admin(), BUCKET, &k).await == data,
        "the object differs from the file"
    );
    assert!(
        log_of(&s).contains("streaming: the file is being written"),
        "the log says the file is streamed"
    );
    s.proxy.assert_only_writes();
    assert_eq!(agent.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_truncated_or_rewritten_while_streamed_never_makes_a_mixed_object() {
    let s = stream_setup().await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let proxy = s.proxy.log();

    // Truncated to nothing after parts went out, then written anew.
    let trunc_path = s.outbox.join("trunc.bin");
    let first = bytes(16 * MIB, 1);
    let second = bytes(12 * MIB + 333, 2);
    let trunc = {
        let (path, first, second, proxy) = (
            trunc_path.clone(),
            first.clone(),
            second.clone(),
            proxy.clone(),
        );
        tokio::spawn(async move {
            let mut f = std::fs::File::create(&path).unwrap();
            let mut f2 = f.try_clone().unwrap();
            let first2 = first.clone();
            tokio::task::spawn_blocking(move || append_slowly(&mut f2, &first2, 8 * MIB))
                .await
                .unwrap();
            wait_parts(&proxy, &key("trunc.bin"), 2, Duration::from_secs(30)).await;
            tokio::task::spawn_blocking(move || {
                f.set_len(0).unwrap();
                f.seek(SeekFrom::Start(0)).unwrap();
                append_slowly(&mut f, &second, 8 * MIB);
            })
            .await
            .unwrap();
        })
    };
    // Rewritten in place (inside part 1) after parts went out, then grown.
    let rewrite_path = s.outbox.join("rewrite.bin");
    let mut rewritten = bytes(22 * MIB + 5, 3);
    let patch = bytes(MIB, 4);
    let rewrite = {
        let (path, data, patch, proxy) = (
            rewrite_path.clone(),
            rewritten.clone(),
            patch.clone(),
            proxy.clone(),
        );
        tokio::spawn(async move {
            let mut f = std::fs::File::create(&path).unwrap();
            let mut f2 = f.try_clone().unwrap();
            let head = data[..16 * MIB].to_vec();
            tokio::task::spawn_blocking(move || append_slowly(&mut f2, &head, 8 * MIB))
                .await
                .unwrap();
            wait_parts(&proxy, &key("rewrite.bin"), 2, Duration::from_secs(30)).await;
            let tail = data[16 * MIB..].to_vec();
            tokio::task::spawn_blocking(move || {
                f.write_all_at(&patch, MIB as u64).unwrap();
                append_slowly(&mut f, &tail, 8 * MIB);
            })
            .await
            .unwrap();
        })
    };
    trunc.await.unwrap();
    rewrite.await.unwrap();
    rewritten[MIB..2 * MIB].copy_from_slice(&patch);

    wait_done(&s, 2, Duration::from_secs(90)).await;
    let records = s.proxy.records();
    let admin = s.moto.admin();
    for (rel, data) in [("trunc.bin", &second), ("rewrite.bin", &rewritten)] {
        let k = key(rel);
        assert!(
            get(&admin, BUCKET, &k).await == *data,
            "{k}: the object is not the finished file's bytes"
        );
        let done = crate::support::proxy::writes_of(&records, &k);
        assert_eq!(done.len(), 1, "{k}: one object write: {done:#?}");
        assert_eq!(done[0].size, Some(data.len() as u64), "{k}");
        // The parts sent before the change went to an upload that was
        // never completed.
        let early = parts_sent(&records, &k)[0].upload_id.clone();
        assert_ne!(
            done[0].upload_id, early,
            "{k} was completed with the parts sent before it changed"
        );
    }
    let log = log_of(&s);
    assert!(
        log.contains("became shorter"),
        "the truncated file's upload is abandoned as it shrinks"
    );
    assert!(
        log.contains("not its bytes now"),
        "the rewritten file's parts are found not to be its bytes when it is finished"
    );
    s.proxy.assert_only_writes();
    assert_eq!(agent.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_left_by_kill_9_while_streaming_is_aborted_at_the_next_start_and_the_file_arrives()
 {
    let s = stream_setup().await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let path: PathBuf = s.outbox.join("log.bin");
    let data = bytes(24 * MIB + 1, 9);
    let mut f = std::fs::File::create(&path).unwrap();
    let mut f2 = f.try_clone().unwrap();
    let head = data[..12 * MIB].to_vec();
    tokio::task::spawn_blocking(move || append_slowly(&mut f2, &head, 8 * MIB))
        .await
        .unwrap();
    let k = key("log.bin");
    wait_parts(&s.proxy.log(), &k, 2, Duration::from_secs(30)).await;
    let left = parts_sent(&s.proxy.records(), &k)[0].upload_id.clone();
    agent.kill9().await;
    let agent = Agent::start(s.moto.dir.path(), &s.config, &s.log);
    let tail = data[12 * MIB..].to_vec();
    tokio::task::spawn_blocking(move || append_slowly(&mut f, &tail, 8 * MIB))
        .await
        .unwrap();
    wait_done(&s, 1, Duration::from_secs(60)).await;
    let records = s.proxy.records();
    assert!(
        records
            .iter()
            .any(|r| r.op == "AbortMultipartUpload" && r.upload_id == left),
        "the upload left by the killed agent was aborted"
    );
    let done = crate::support::proxy::writes_of(&records, &k);
    assert_eq!(done.len(), 1, "{done:#?}");
    assert_ne!(done[0].upload_id, left);
    assert!(get(&s.moto.admin(), BUCKET, &k).await == data);
    s.proxy.assert_only_writes();
    assert_eq!(agent.stop().await, Some(0));
}
