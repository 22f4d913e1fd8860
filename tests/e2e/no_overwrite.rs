//! No-overwrite mode (`[bucket] overwrite = false`, `push --no-overwrite`)
//! against moto 5.2.5, which enforces `If-None-Match: *` on PutObject and
//! CompleteMultipartUpload, with IAM on and the seed's policy, through the
//! recording proxy: an existing key is left as it is (read back with the
//! admin identity), the file is reported "exists" once and not retried, a
//! re-send after a crash between Complete and the journal's "done" is
//! answered 412 and recorded, and only writes cross the wire. Garage 2.5.0
//! ignores the header: `check --probe-write` says so.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::agent::{Agent, BUCKET, setup_with};
use crate::support::moto::Moto;
use crate::support::proxy::{Proxy, Record};
use crate::support::{get, putonly, run, write_file};

const MIB: usize = 1024 * 1024;

/// Puts an object with the admin identity (straight to moto).
async fn admin_put(moto: &Moto, key: &str, body: &[u8]) {
    moto.admin()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(aws_sdk_s3::primitives::ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("admin PutObject {key}: {e:?}"));
}

/// The writes of `key` that crossed the proxy: (operation, status, If-None-Match).
fn writes_of(records: &[Record], key: &str) -> Vec<(String, u16, Option<String>)> {
    records
        .iter()
        .filter(|r| r.key.as_deref() == Some(key))
        .filter(|r| r.op == "PutObject" || r.op == "CompleteMultipartUpload")
        .map(|r| (r.op.clone(), r.status, r.if_none_match.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn push_no_overwrite_leaves_existing_objects_single_and_multipart() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(
        &proxy.url,
        "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n\
         [upload]\npart_size = \"5MiB\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let small = write_file(work.path(), "small.txt", 1000, 1);
    let big = write_file(work.path(), "big.bin", 11 * MIB, 2);
    let fresh = write_file(work.path(), "fresh.txt", 300, 3);
    admin_put(&moto, "foo/small.txt", b"already there, small").await;
    admin_put(&moto, "foo/big.bin", b"already there, big").await;

    let push = |extra: &'static [&'static str]| {
        let mut cmd = putonly(Some(moto.dir.path()));
        cmd.args(["push", "--no-overwrite", "--json", "--config"])
            .arg(&config)
            .args(["--prefix", "foo/", "small.txt", "big.bin", "fresh.txt"])
            .args(extra)
            .current_dir(work.path());
        cmd
    };
    let out = run(&mut push(&[])).await;
    assert_eq!(out.status.code(), Some(0), "exists is not a failure");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let status_of = |key: &str| {
        lines
            .iter()
            .find(|l| l["key"] == key)
            .map(|l| l["status"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(status_of("foo/small.txt").as_deref(), Some("exists"));
    assert_eq!(status_of("foo/big.bin").as_deref(), Some("exists"));
    assert_eq!(status_of("foo/fresh.txt").as_deref(), Some("uploaded"));
    for l in lines.iter().filter(|l| l["status"] == "exists") {
        let reason = l["reason"].as_str().unwrap();
        assert!(reason.contains("already holds an object"), "{reason}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 exists (not overwritten)"), "{stderr}");

    // The objects that were there are unchanged; the new one arrived.
    let admin = moto.admin();
    assert_eq!(
        get(&admin, BUCKET, "foo/small.txt").await,
        b"already there, small"
    );
    assert_eq!(
        get(&admin, BUCKET, "foo/big.bin").await,
        b"already there, big"
    );
    assert_eq!(get(&admin, BUCKET, "foo/fresh.txt").await, fresh);
    assert_ne!(small, b"already there, small");
    assert_ne!(big, b"already there, big");

    // Each write was conditional and sent once: a 412 is not retried.
    let records = proxy.records();
    assert_eq!(
        writes_of(&records, "foo/small.txt"),
        vec![("PutObject".into(), 412, Some("*".into()))]
    );
    assert_eq!(
        writes_of(&records, "foo/big.bin"),
        vec![("CompleteMultipartUpload".into(), 412, Some("*".into()))]
    );
    assert_eq!(
        writes_of(&records, "foo/fresh.txt"),
        vec![("PutObject".into(), 200, Some("*".into()))]
    );
    // Parts carry no condition (S3 takes none there); the refused upload is
    // aborted (best effort: the seed's policy refuses the abort).
    assert!(
        records
            .iter()
            .filter(|r| r.op == "UploadPart" || r.op == "CreateMultipartUpload")
            .all(|r| r.if_none_match.is_none())
    );
    assert_eq!(proxy.count("AbortMultipartUpload"), 1);
    proxy.assert_only_writes();

    // Asked to, an existing key fails the push; nothing was overwritten.
    let out = run(&mut push(&["--fail-on-exists"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        get(&admin, BUCKET, "foo/small.txt").await,
        b"already there, small"
    );
    // Without --no-overwrite the same push replaces them, unconditionally.
    let before = proxy.records().len();
    let out = run(putonly(Some(moto.dir.path()))
        .args(["push", "--config"])
        .arg(&config)
        .args(["--prefix", "foo/", "small.txt"])
        .current_dir(work.path()))
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(get(&admin, BUCKET, "foo/small.txt").await, small);
    assert!(
        proxy.records()[before..]
            .iter()
            .all(|r| r.if_none_match.is_none())
    );
    proxy.assert_only_writes();
}

/// The agent's status as JSON.
async fn status(creds: &Path, config: &Path) -> serde_json::Value {
    let out = run(putonly(Some(creds))
        .args(["status", "--json", "--config"])
        .arg(config))
    .await;
    // Null until the agent has made its journal.
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Waits until the journal shows `done` sent files and `exists` files not
/// sent, with nothing pending; panics after `limit`.
async fn until_recorded(
    creds: &Path,
    config: &Path,
    done: u64,
    exists: u64,
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let st = status(creds, config).await;
        if st["done"].as_u64() == Some(done)
            && st["exists"].as_u64() == Some(exists)
            && st["pending"].as_u64() == Some(0)
        {
            return st;
        }
        assert!(Instant::now() < deadline, "not recorded in time: {st}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_keeps_an_existing_key_and_its_file_and_does_not_retry() {
    let s = setup_with(
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"300ms\"\n\
         after_upload = \"delete\"\n",
        "[\"foo/\", \"fighters/\"]\noverwrite = false",
        "part_size = \"5MiB\"\n",
    )
    .await;
    admin_put(&s.moto, "fighters/in/old.txt", b"the consumer's old.txt").await;
    admin_put(
        &s.moto,
        "fighters/in/old-big.bin",
        b"the consumer's old-big.bin",
    )
    .await;
    write_file(&s.outbox, "old.txt", 500, 11);
    write_file(&s.outbox, "old-big.bin", 12 * MIB, 12);
    let new = write_file(&s.outbox, "new.txt", 700, 13);
    let creds = s.moto.dir.path().to_path_buf();
    let agent = Agent::start(&creds, &s.config, &s.log);
    let st = until_recorded(&creds, &s.config, 1, 2, Duration::from_secs(60)).await;
    let shown: Vec<&str> = st["last_exists"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    assert!(
        shown.contains(&"fighters/in/old.txt") && shown.contains(&"fighters/in/old-big.bin"),
        "{st}"
    );
    // Past a rescan (10 s): nothing is sent again.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let text = run(putonly(Some(&creds))
        .args(["status", "--config"])
        .arg(&s.config))
    .await;
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("2 not sent: the key already held an object"),
        "{text}"
    );
    assert!(text.contains("[exists]"), "{text}");
    assert_eq!(agent.stop().await, Some(0));

    let admin = s.moto.admin();
    assert_eq!(
        get(&admin, BUCKET, "fighters/in/old.txt").await,
        b"the consumer's old.txt"
    );
    assert_eq!(
        get(&admin, BUCKET, "fighters/in/old-big.bin").await,
        b"the consumer's old-big.bin"
    );
    assert_eq!(get(&admin, BUCKET, "fighters/in/new.txt").await, new);
    // The files that were not sent are kept; the one sent was deleted.
    assert!(s.outbox.join("old.txt").exists());
    assert!(s.outbox.join("old-big.bin").exists());
    assert!(!s.outbox.join("new.txt").exists());
    let records = s.proxy.records();
    assert_eq!(
        writes_of(&records, "fighters/in/old.txt"),
        vec![("PutObject".into(), 412, Some("*".into()))]
    );
    assert_eq!(
        writes_of(&records, "fighters/in/old-big.bin"),
        vec![("CompleteMultipartUpload".into(), 412, Some("*".into()))]
    );
    s.proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resend_after_a_crash_between_complete_and_done_is_answered_412_and_recorded() {
    let s = setup_with(
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"300ms\"\n",
        "[\"foo/\", \"fighters/\"]\noverwrite = false",
        "part_size = \"5MiB\"\n",
    )
    .await;
    let creds = s.moto.dir.path().to_path_buf();
    let agent = Agent::start(&creds, &s.config, &s.log);
    let stalled = |op: &'static str| {
        let log = s.proxy.log();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !log
                .records()
                .iter()
                .any(|r| r.op == op && r.injected && r.status == 200)
            {
                assert!(Instant::now() < deadline, "no {op} answered");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // The server stores each object, and its answer never arrives whole:
    // the agent cannot record "done" before it is killed.
    s.proxy.stall_answer_body("PutObject", 1);
    let small = write_file(&s.outbox, "small.txt", 900, 21);
    stalled("PutObject").await;
    s.proxy.stall_answer_body("CompleteMultipartUpload", 1);
    let big = write_file(&s.outbox, "big.bin", 11 * MIB, 22);
    stalled("CompleteMultipartUpload").await;
    agent.kill9().await;
    let st = status(&creds, &s.config).await;
    assert_eq!(st["pending"].as_u64(), Some(2), "{st}");
    let uploaded = st["done"].as_u64();
    assert_eq!(uploaded, Some(0), "{st}");

    // The restart sends each again, conditionally. The single PutObject is
    // answered 412 and recorded "exists". The multipart upload is resumed
    // with its upload id, whose Complete the server answers as it answered
    // the first time (200, as S3 does for an upload it completed): done.
    // No error, no loop.
    let agent = Agent::start(&creds, &s.config, &s.log);
    until_recorded(&creds, &s.config, 1, 1, Duration::from_secs(90)).await;
    let settled = s.proxy.records().len();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let later: Vec<String> = s.proxy.records()[settled..]
        .iter()
        .filter(|r| r.bucket.is_some())
        .map(Record::summary)
        .collect();
    assert!(
        later.is_empty(),
        "requests after it was recorded: {later:?}"
    );
    assert_eq!(agent.stop().await, Some(0));
    let admin = s.moto.admin();
    assert_eq!(get(&admin, BUCKET, "fighters/in/small.txt").await, small);
    assert!(get(&admin, BUCKET, "fighters/in/big.bin").await == big);
    let records = s.proxy.records();
    let small_writes = writes_of(&records, "fighters/in/small.txt");
    assert_eq!(
        small_writes.iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![200, 412],
        "{small_writes:?}"
    );
    let completes = writes_of(&records, "fighters/in/big.bin");
    assert_eq!(
        completes.iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![200, 200],
        "{completes:?}"
    );
    let uploads: std::collections::HashSet<_> = records
        .iter()
        .filter(|r| r.op == "CompleteMultipartUpload")
        .map(|r| r.upload_id.clone())
        .collect();
    assert_eq!(uploads.len(), 1, "the same upload, resumed: {uploads:?}");
    assert_eq!(s.proxy.count("CreateMultipartUpload"), 1);
    assert!(
        records
            .iter()
            .all(|r| r.op != "PutObject" && r.op != "CompleteMultipartUpload"
                || r.if_none_match.as_deref() == Some("*"))
    );
    s.proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn check_tells_whether_the_server_enforces_if_none_match() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(
        &proxy.url,
        "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\noverwrite = false\n",
    );
    let out = run(putonly(Some(moto.dir.path()))
        .args(["check", "--probe-write", "--config"])
        .arg(&config))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("[ ok ] overwrite = false (If-None-Match): enforced"),
        "{stdout}"
    );
    let probes: Vec<u16> = proxy
        .s3_records()
        .iter()
        .filter(|r| {
            r.key
                .as_deref()
                .is_some_and(|k| k.ends_with("-if-none-match.txt"))
        })
        .map(|r| r.status)
        .collect();
    assert_eq!(probes, vec![200, 412]);
    proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn garage_ignores_if_none_match_and_check_says_so() {
    use crate::support::garage::{Garage, binary};
    let Some(bin) = binary() else {
        crate::garage::skip_or_fail();
        return;
    };
    let garage = Garage::start(&bin);
    let proxy = Proxy::start(&garage.url).await;
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("garage.toml");
    std::fs::write(
        &config,
        format!(
            "[aws]\nregion = \"us-east-1\"\nprofile = \"garage\"\nendpoint_url = \"{}\"\n\
             [bucket]\nname = \"{}\"\nallowed_prefixes = [\"foo/\"]\noverwrite = false\n",
            proxy.url,
            crate::support::garage::BUCKET
        ),
    )
    .unwrap();
    let out = run(putonly(Some(&garage.creds_dir()))
        .args(["check", "--probe-write", "--config"])
        .arg(&config))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a warning, not a failure: {stdout}"
    );
    assert!(
        stdout.contains(
            "[warn] overwrite = false (If-None-Match): not enforced: the server ignores If-None-Match; overwrite = false cannot protect existing objects here"
        ),
        "{stdout}"
    );
    let probes: Vec<(u16, Option<String>)> = proxy
        .s3_records()
        .iter()
        .filter(|r| {
            r.key
                .as_deref()
                .is_some_and(|k| k.ends_with("-if-none-match.txt"))
        })
        .map(|r| (r.status, r.if_none_match.clone()))
        .collect();
    assert_eq!(
        probes,
        vec![(200, Some("*".into())), (200, Some("*".into()))]
    );
    proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_409_conflict_is_retried_a_complete_with_a_new_upload() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(
        &proxy.url,
        "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\noverwrite = false\n\
         [upload]\npart_size = \"5MiB\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let small = write_file(work.path(), "c-small.txt", 100, 31);
    let big = write_file(work.path(), "c-big.bin", 11 * MIB, 32);
    proxy.fail_next("PutObject", 1, 409, "ConditionalRequestConflict");
    proxy.fail_next(
        "CompleteMultipartUpload",
        1,
        409,
        "ConditionalRequestConflict",
    );
    let out = run(putonly(Some(moto.dir.path()))
        .args(["push", "--config"])
        .arg(&config)
        .args(["--prefix", "foo/", "c-small.txt", "c-big.bin"])
        .current_dir(work.path()))
    .await;
    assert_eq!(out.status.code(), Some(0));
    let admin = moto.admin();
    assert_eq!(get(&admin, BUCKET, "foo/c-small.txt").await, small);
    assert!(get(&admin, BUCKET, "foo/c-big.bin").await == big);
    let records = proxy.records();
    assert_eq!(
        writes_of(&records, "foo/c-small.txt")
            .iter()
            .map(|w| w.1)
            .collect::<Vec<_>>(),
        vec![409, 200],
        "the PutObject is sent again as it is"
    );
    // S3 asks for a new upload after a 409 on Complete: the first is
    // aborted (best effort) and a second one completes.
    let completes: Vec<(u16, Option<String>)> = records
        .iter()
        .filter(|r| r.op == "CompleteMultipartUpload")
        .map(|r| (r.status, r.upload_id.clone()))
        .collect();
    assert_eq!(completes.len(), 2, "{completes:?}");
    assert_eq!((completes[0].0, completes[1].0), (409, 200));
    assert_ne!(completes[0].1, completes[1].1, "a new upload");
    assert_eq!(proxy.count("CreateMultipartUpload"), 2);
    assert_eq!(proxy.count("AbortMultipartUpload"), 1);
    proxy.assert_only_writes();
}
