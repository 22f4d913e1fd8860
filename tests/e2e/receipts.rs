//! Receipts against moto with IAM on and the seed's policy, on a bucket
//! with versioning (switched on with the admin identity): what `push --json`
//! and `putonly receipts` say of each object (size, checksum, ETag, version
//! id, request id) matches the object read back with the admin identity;
//! `--since` selects by time; receipts outlive the pruning of file records
//! (`state.retention`) and go only after `state.keep_receipts`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::agent::{Agent, BUCKET, setup_with};
use crate::support::moto::Moto;
use crate::support::proxy::Proxy;
use crate::support::{get, putonly, run, write_file};
use putonly::checksum::Crc;
use putonly::config::ChecksumKind;

const MIB: usize = 1024 * 1024;

async fn versioning_on(admin: &aws_sdk_s3::Client) {
    use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
    admin
        .put_bucket_versioning()
        .bucket(BUCKET)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .expect("switch versioning on");
}

/// Checks one receipt (a JSON object) against the object as the admin
/// identity reads it back, and the local bytes it came from.
async fn matches_the_object(admin: &aws_sdk_s3::Client, r: &serde_json::Value, data: &[u8]) {
    let key = r["key"].as_str().expect("key");
    let version = r["version_id"]
        .as_str()
        .expect("a version id on a versioned bucket");
    let head = admin
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .version_id(version)
        .send()
        .await
        .unwrap_or_else(|e| panic!("HeadObject {key} {version}: {e:?}"));
    assert_eq!(head.version_id(), Some(version), "{r}");
    assert_eq!(
        head.e_tag().map(|e| e.trim_matches('"')),
        r["etag"].as_str(),
        "{r}"
    );
    assert_eq!(head.content_length(), r["size"].as_i64(), "{r}");
    assert_eq!(r["size"].as_u64(), Some(data.len() as u64), "{r}");
    assert_eq!(r["bucket"], BUCKET, "{r}");
    let crc = Crc::of(ChecksumKind::Crc64Nvme, data).to_base64();
    assert_eq!(r["checksum_algorithm"], "crc64nvme", "{r}");
    assert_eq!(r["checksum_value"].as_str(), Some(crc.as_str()), "{r}");
    assert_eq!(r["checksum"], format!("crc64nvme:{crc}"), "{r}");
    assert!(
        r["request_id"].as_str().is_some_and(|id| !id.is_empty()),
        "no request id: {r}"
    );
    assert!(
        humantime::parse_rfc3339(r["time"].as_str().unwrap_or("")).is_ok(),
        "{r}"
    );
    let stored = admin
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .version_id(version)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert!(stored.as_ref() == data, "{key} {version}: other bytes");
}

fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn push_json_carries_each_file_s_receipt() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let admin = moto.admin();
    versioning_on(&admin).await;
    let config = moto.config(
        &proxy.url,
        "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n\
         [upload]\npart_size = \"5MiB\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let mut files = BTreeMap::new();
    files.insert(
        "foo/small.txt",
        write_file(work.path(), "small.txt", 4321, 1),
    );
    files.insert(
        "foo/big.bin",
        write_file(work.path(), "big.bin", 11 * MIB, 2),
    );
    // Twice: each push is a new version, each receipt names its own.
    let mut versions = Vec::new();
    for _ in 0..2 {
        let out = run(putonly(Some(moto.dir.path()))
            .args(["push", "--json", "--config"])
            .arg(&config)
            .args(["--prefix", "foo/", "small.txt", "big.bin"])
            .current_dir(work.path()))
        .await;
        assert_eq!(out.status.code(), Some(0));
        let lines = json_lines(&out.stdout);
        assert_eq!(lines.len(), 2);
        for l in &lines {
            assert_eq!(l["status"], "uploaded");
            let key = l["key"].as_str().unwrap();
            matches_the_object(&admin, l, &files[key]).await;
            versions.push(l["version_id"].as_str().unwrap().to_string());
        }
    }
    let distinct: std::collections::HashSet<_> = versions.iter().collect();
    assert_eq!(distinct.len(), 4, "{versions:?}");
    proxy.assert_only_writes();
}

async fn receipts(creds: &Path, config: &Path, args: &[&str]) -> std::process::Output {
    run(putonly(Some(creds))
        .args(["receipts", "--config"])
        .arg(config)
        .args(args))
    .await
}

async fn until(creds: &Path, config: &Path, what: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run(putonly(Some(creds))
            .args(["status", "--json", "--config"])
            .arg(config))
        .await;
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if st[what].as_u64() == Some(want) && st["pending"].as_u64() == Some(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never reached {want}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_s_receipts_match_the_objects_and_outlive_retention() {
    let s = setup_with(
        "retention = \"1s\"\nkeep_receipts = \"1h\"\n\
         [[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"300ms\"\n\
         after_upload = \"delete\"\n",
        "[\"foo/\", \"fighters/\"]",
        "part_size = \"5MiB\"\n",
    )
    .await;
    let admin = s.moto.admin();
    versioning_on(&admin).await;
    let creds = s.moto.dir.path().to_path_buf();
    let mut files = BTreeMap::new();
    files.insert("fighters/in/a.txt", write_file(&s.outbox, "a.txt", 777, 11));
    files.insert(
        "fighters/in/sub/big.bin",
        write_file(&s.outbox, "sub/big.bin", 11 * MIB, 12),
    );
    let agent = Agent::start(&creds, &s.config, &s.log);
    until(&creds, &s.config, "done", 2).await;
    // A second batch, recorded at least a second after the first.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let between = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    files.insert("fighters/in/c.txt", write_file(&s.outbox, "c.txt", 99, 13));
    until(&creds, &s.config, "done", 3).await;

    let out = receipts(&creds, &s.config, &["--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let all = json_lines(&out.stdout);
    assert_eq!(all.len(), 3, "{all:?}");
    for r in &all {
        let key = r["key"].as_str().unwrap();
        matches_the_object(&admin, r, &files[key]).await;
        let path = r["path"].as_str().unwrap();
        assert!(path.starts_with(&s.outbox.display().to_string()), "{r}");
    }
    let since = receipts(&creds, &s.config, &["--json", "--since", &between]).await;
    let later = json_lines(&since.stdout);
    assert_eq!(later.len(), 1, "{later:?}");
    assert_eq!(later[0]["key"], "fighters/in/c.txt");
    let hour = json_lines(
        &receipts(&creds, &s.config, &["--json", "--since", "1h"])
            .await
            .stdout,
    );
    assert_eq!(hour.len(), 3);
    let table = receipts(&creds, &s.config, &[]).await;
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.starts_with("time "), "{table}");
    assert!(
        table.contains("s3://account-b-bucket/fighters/in/sub/big.bin  11534336 bytes  crc64nvme:"),
        "{table}"
    );
    let bad = receipts(&creds, &s.config, &["--since", "last tuesday"]).await;
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(agent.stop().await, Some(0));

    // The files were deleted after their upload: at the next start their
    // records are pruned (retention 1s), their receipts stay (1h).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let agent = Agent::start(&creds, &s.config, &s.log);
    let left: Vec<_> = walkdir::WalkDir::new(&s.outbox)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(left.is_empty(), "deleted after their upload: {left:?}");
    until(&creds, &s.config, "done", 0).await;
    let kept = json_lines(&receipts(&creds, &s.config, &["--json"]).await.stdout);
    assert_eq!(kept, all, "receipts survive the pruning of their records");
    assert_eq!(agent.stop().await, Some(0));

    // keep_receipts = 1s: gone at the next start.
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("keep_receipts = \"1h\"", "keep_receipts = \"1s\"");
    std::fs::write(&s.config, text).unwrap();
    let agent = Agent::start(&creds, &s.config, &s.log);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = json_lines(&receipts(&creds, &s.config, &["--json"]).await.stdout);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "receipts not pruned: {left:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(agent.stop().await, Some(0));
    for (key, data) in &files {
        assert!(get(&admin, BUCKET, key).await == *data, "{key}");
    }
    s.proxy.assert_only_writes();
}
