//! `putonly push` against moto with the seed's user, role and policies.

use std::time::{Duration, SystemTime};

use crate::support::moto::Moto;
use crate::support::proxy::Proxy;
use crate::support::{get, putonly, run, write_file};

const BUCKET: &str = "account-b-bucket";
const MIB: usize = 1024 * 1024;

/// `putonly push --config CONFIG ARGS...` in `dir`, as the seed's user.
async fn push(
    moto: &Moto,
    config: &std::path::Path,
    args: &[&str],
    dir: &std::path::Path,
) -> std::process::Output {
    run(putonly(Some(moto.dir.path()))
        .arg("push")
        .arg("--config")
        .arg(config)
        .args(args)
        .current_dir(dir))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_sizes_arrive_byte_identical_with_only_writes_on_the_wire() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(&proxy.url, "");
    let work = tempfile::tempdir().unwrap();
    let zero = write_file(work.path(), "zero.bin", 0, 1);
    let one_k = write_file(work.path(), "one-k.bin", 1024, 2);
    let big = write_file(work.path(), "big.bin", 64 * MIB, 3);

    for prefix in ["foo/", "fighters/"] {
        let out = push(
            &moto,
            &config,
            &["--prefix", prefix, "zero.bin", "one-k.bin", "big.bin"],
            work.path(),
        )
        .await;
        assert_eq!(out.status.code(), Some(0), "push into {prefix}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("3 uploaded"), "{stdout}");
    }

    let admin = moto.admin();
    for prefix in ["foo/", "fighters/"] {
        assert_eq!(
            get(&admin, BUCKET, &format!("{prefix}zero.bin")).await,
            zero
        );
        assert_eq!(
            get(&admin, BUCKET, &format!("{prefix}one-k.bin")).await,
            one_k
        );
        assert!(
            get(&admin, BUCKET, &format!("{prefix}big.bin")).await == big,
            "{prefix}big.bin differs"
        );
    }

    proxy.assert_only_writes();
    // The 64 MiB file went as a multipart upload (8 MiB parts), the small ones whole.
    assert_eq!(proxy.count("CreateMultipartUpload"), 2);
    assert_eq!(proxy.count("UploadPart"), 2 * 8);
    assert_eq!(proxy.count("CompleteMultipartUpload"), 2);
    assert_eq!(proxy.count("PutObject"), 4);
    for r in proxy.s3_records() {
        let key = r.key.clone().unwrap_or_default();
        assert!(
            key.starts_with("foo/") || key.starts_with("fighters/"),
            "{key}"
        );
        assert!(r.session_token, "{} without the role's session token", r.op);
        assert_eq!(r.status, 200, "{} {key}", r.op);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_outside_the_prefixes_is_refused_before_any_request() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(&proxy.url, "");
    let work = tempfile::tempdir().unwrap();
    write_file(work.path(), "test.txt", 100, 4);

    let out = push(
        &moto,
        &config,
        &["--prefix", "bar/", "test.txt"],
        work.path(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bar/test.txt"), "{stderr}");
    assert!(
        stderr.contains("allowed prefixes (foo/, fighters/)"),
        "{stderr}"
    );
    assert!(
        proxy.records().is_empty(),
        "requests were sent: {:?}",
        proxy.records()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn access_denied_by_the_server_fails_the_file_without_retries() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    // The client-side guard allows bar/, the role's policy does not.
    let config = moto.config(
        &proxy.url,
        "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\", \"bar/\"]\n",
    );
    let work = tempfile::tempdir().unwrap();
    write_file(work.path(), "denied.txt", 100, 5);
    write_file(work.path(), "allowed.txt", 100, 6);

    let out = push(
        &moto,
        &config,
        &["--prefix", "bar/", "denied.txt"],
        work.path(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AccessDenied"), "{stderr}");
    assert_eq!(
        proxy.count("PutObject"),
        1,
        "AccessDenied must not be retried"
    );

    let out = push(
        &moto,
        &config,
        &["--prefix", "foo/", "allowed.txt"],
        work.path(),
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn expiring_credentials_are_renewed_during_a_long_push() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(
        &proxy.url,
        "duration = \"6s\"\nrefresh_before = \"3s\"\n\
         [bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n\
         [upload]\npart_size = \"5MiB\"\nconcurrency = 2\nbandwidth_limit = \"1MiB/s\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let data = write_file(work.path(), "slow.bin", 22 * MIB, 7);
    let small = write_file(work.path(), "small.bin", 1000, 8);

    let started = SystemTime::now();
    let out = push(
        &moto,
        &config,
        &["--prefix", "fighters/", "slow.bin", "small.bin"],
        work.path(),
    )
    .await;
    let took = started.elapsed().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        took > Duration::from_secs(20),
        "the push took only {took:?}"
    );

    let assumed = proxy.count("AssumeRole");
    assert!(
        assumed >= 5,
        "expected several AssumeRole calls over {took:?}, saw {assumed}"
    );
    let checked = proxy.assert_no_expired_credentials();
    assert!(
        checked >= 6,
        "only {checked} S3 requests could be matched to an expiry"
    );
    let keys: std::collections::HashSet<String> = proxy
        .s3_records()
        .iter()
        .filter_map(|r| r.access_key.clone())
        .collect();
    assert!(
        keys.len() >= 2,
        "every S3 request used the same credentials: {keys:?}"
    );
    eprintln!(
        "push took {took:?}; AssumeRole {assumed}; S3 requests checked against their credentials' expiry {checked}; distinct access keys used for S3 {}",
        keys.len()
    );

    let admin = moto.admin();
    assert!(get(&admin, BUCKET, "fighters/slow.bin").await == data);
    assert_eq!(get(&admin, BUCKET, "fighters/small.bin").await, small);
    proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_and_server_errors_are_retried() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(&proxy.url, "");
    let work = tempfile::tempdir().unwrap();
    let data = write_file(work.path(), "retry.bin", 20 * MIB, 9);
    let small = write_file(work.path(), "retry-small.bin", 10, 10);
    proxy.fail_next("UploadPart", 2, 503, "SlowDown");
    proxy.fail_next("CreateMultipartUpload", 1, 500, "InternalError");
    proxy.fail_next("CompleteMultipartUpload", 1, 503, "ServiceUnavailable");
    proxy.fail_next("PutObject", 2, 503, "SlowDown");

    let out = push(
        &moto,
        &config,
        &["--prefix", "foo/", "retry.bin", "retry-small.bin"],
        work.path(),
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let admin = moto.admin();
    assert!(get(&admin, BUCKET, "foo/retry.bin").await == data);
    assert_eq!(get(&admin, BUCKET, "foo/retry-small.bin").await, small);
    let injected = proxy.records().iter().filter(|r| r.injected).count();
    assert_eq!(injected, 6);
    proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_session_token_forces_one_renewal() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(&proxy.url, "");
    let work = tempfile::tempdir().unwrap();
    let data = write_file(work.path(), "token.bin", 10, 11);
    proxy.fail_next("PutObject", 1, 400, "ExpiredToken");

    let out = push(
        &moto,
        &config,
        &["--prefix", "foo/", "token.bin"],
        work.path(),
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        proxy.count("AssumeRole"),
        2,
        "one start-up, one forced renewal"
    );
    let puts: Vec<_> = proxy
        .records()
        .into_iter()
        .filter(|r| r.op == "PutObject")
        .collect();
    assert_eq!(puts.len(), 2);
    assert_ne!(
        puts[0].access_key, puts[1].access_key,
        "the retry must use the new credentials"
    );
    assert_eq!(get(&moto.admin(), BUCKET, "foo/token.bin").await, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn folders_map_to_relative_keys_and_json_reports_each_file() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let work = tempfile::tempdir().unwrap();
    let a = write_file(work.path(), "data/a.csv", 10, 12);
    let b = write_file(work.path(), "data/sub/deeper/b.csv", 20, 13);
    let creds = moto.dir.path().join("credentials");
    let _ = creds;

    // No configuration file: everything from flags.
    let out = run(putonly(Some(moto.dir.path()))
        .arg("push")
        .args(["--bucket", BUCKET])
        .args([
            "--role-arn",
            "arn:aws:iam::123456789012:role/account-a-s3-role",
        ])
        .args(["--profile", "s3-test", "--region", "us-east-1"])
        .args(["--endpoint-url", &proxy.url])
        .args(["--prefix", "foo/batch", "--json", "data"])
        .current_dir(work.path()))
    .await;
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2);
    let mut keys: Vec<&str> = lines.iter().map(|v| v["key"].as_str().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, ["foo/batch/a.csv", "foo/batch/sub/deeper/b.csv"]);
    for v in &lines {
        assert_eq!(v["status"], "uploaded");
        assert!(v["checksum"].as_str().unwrap().starts_with("crc64nvme:"));
    }
    let admin = moto.admin();
    assert_eq!(get(&admin, BUCKET, "foo/batch/a.csv").await, a);
    assert_eq!(get(&admin, BUCKET, "foo/batch/sub/deeper/b.csv").await, b);
    proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn configuration_errors_exit_2_and_send_nothing() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let work = tempfile::tempdir().unwrap();
    write_file(work.path(), "x.txt", 10, 14);
    let cases = [
        (
            "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\nprefix = \"x\"\n",
            "unknown field",
        ),
        (
            "[bucket]\nname = \"account-b-bucket\"\n",
            "bucket.allowed_prefixes",
        ),
        (
            "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n[upload]\npart_size = \"1KiB\"\n",
            "upload.part_size",
        ),
        (
            "[role]\nsession_name = \"x\"\n[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n",
            "role.arn",
        ),
        ("this is not toml", "line 3, column 6: key with no value"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = work.path().join(format!("bad-{i}.toml"));
        std::fs::write(
            &path,
            format!("[aws]\nendpoint_url = \"{}\"\n{text}", proxy.url),
        )
        .unwrap();
        let out = run(putonly(Some(moto.dir.path()))
            .args(["push", "--config"])
            .arg(&path)
            .args(["--prefix", "foo/", "x.txt"])
            .current_dir(work.path()))
        .await;
        assert_eq!(out.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{text}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = run(putonly(Some(moto.dir.path()))
        .args(["push", "--config", "/nonexistent/agent.toml", "x.txt"])
        .current_dir(work.path()))
    .await;
    assert_eq!(out.status.code(), Some(2));
    let out = run(putonly(Some(moto.dir.path())).args(["push"])).await;
    assert_eq!(out.status.code(), Some(2), "no PATH is a usage error");
    assert!(proxy.records().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_role_is_explained_at_start_up() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let work = tempfile::tempdir().unwrap();
    write_file(work.path(), "x.txt", 10, 15);
    // The admin profile is not the principal in the role's trust policy, but
    // moto grants it anyway through its own "*" policy; a made-up role is
    // refused for everyone.
    let out = run(putonly(Some(moto.dir.path()))
        .arg("push")
        .args([
            "--bucket",
            BUCKET,
            "--profile",
            "s3-test",
            "--region",
            "us-east-1",
        ])
        .args(["--role-arn", "arn:aws:iam::123456789012:role/no-such-role"])
        .args(["--endpoint-url", &proxy.url, "--prefix", "foo/", "x.txt"])
        .current_dir(work.path()))
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("trust policy"), "{stderr}");
    assert_eq!(proxy.s3_records().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_failing_while_credentials_are_valid_does_not_stop_uploads() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(
        &proxy.url,
        "duration = \"8s\"\nrefresh_before = \"5s\"\n\
         [bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n\
         [upload]\npart_size = \"5MiB\"\nconcurrency = 2\nbandwidth_limit = \"1MiB/s\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let data = write_file(work.path(), "sts-down.bin", 14 * MIB, 16);

    let mut cmd = putonly(Some(moto.dir.path()));
    cmd.arg("push")
        .arg("--config")
        .arg(&config)
        .args(["--prefix", "foo/", "sts-down.bin"])
        .current_dir(work.path());
    let child = cmd.spawn().expect("start putonly");
    // Once the first credentials are out, STS fails the next two renewals.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while proxy.count("AssumeRole") == 0 {
        assert!(std::time::Instant::now() < deadline, "no AssumeRole");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.fail_next("AssumeRole", 2, 503, "ServiceUnavailable");
    let out = child.wait_with_output().await.unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0));

    let injected = proxy
        .records()
        .iter()
        .filter(|r| r.op == "AssumeRole" && r.injected)
        .count();
    assert_eq!(injected, 2, "both failed renewals happened during the push");
    assert!(proxy.count("AssumeRole") >= 4);
    proxy.assert_no_expired_credentials();
    assert!(get(&moto.admin(), BUCKET, "foo/sts-down.bin").await == data);
    proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn acl_storage_class_encryption_and_metadata_are_sent_with_each_object() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(
        &proxy.url,
        "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n\
         acl = \"bucket-owner-full-control\"\nstorage_class = \"STANDARD_IA\"\nsse = \"AES256\"\n\
         metadata = { source = \"producer-1\" }\n[upload]\npart_size = \"5MiB\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    write_file(work.path(), "small.txt", 100, 17);
    write_file(work.path(), "large.bin", 11 * MIB, 18);
    let out = run(putonly(Some(moto.dir.path()))
        .args(["push", "--config"])
        .arg(&config)
        .args(["--prefix", "foo/", "small.txt", "large.bin"])
        .current_dir(work.path()))
    .await;
    assert_eq!(out.status.code(), Some(0));
    let admin = moto.admin();
    for key in ["foo/small.txt", "foo/large.bin"] {
        let head = admin
            .head_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.metadata()
                .and_then(|m| m.get("source"))
                .map(String::as_str),
            Some("producer-1"),
            "{key}"
        );
        assert_eq!(
            head.storage_class(),
            Some(&aws_sdk_s3::types::StorageClass::StandardIa),
            "{key}"
        );
        assert_eq!(
            head.server_side_encryption(),
            Some(&aws_sdk_s3::types::ServerSideEncryption::Aes256),
            "{key}"
        );
        let acl = admin
            .get_object_acl()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap();
        assert!(!acl.grants().is_empty(), "{key}: no grants");
    }
    // The ACL travels as a header: no separate PutObjectAcl request.
    proxy.assert_only_writes();
    assert_eq!(proxy.count("PutObjectAcl"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_appears_in_output_logs_or_status_even_at_trace_level() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let work = tempfile::tempdir().unwrap();
    let outbox = work.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    write_file(work.path(), "a.bin", 6 * MIB, 19);
    write_file(&outbox, "b.txt", 10, 20);
    let config = moto.config(
        &proxy.url,
        &format!(
            "duration = \"4s\"\nrefresh_before = \"2s\"\n\
             [bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n\
             [state]\ndir = \"{}\"\n[[watch]]\npath = \"{}\"\nprefix = \"foo/w\"\nsettle = \"200ms\"\n\
             [upload]\npart_size = \"5MiB\"\nbandwidth_limit = \"2MiB/s\"\n",
            work.path().join("state").display(),
            outbox.display()
        ),
    );
    let mut everything = String::new();
    for extra in [&["--json"][..], &[][..]] {
        let mut args = vec!["--prefix", "foo/", "a.bin"];
        args.extend_from_slice(extra);
        let out = run(putonly(Some(moto.dir.path()))
            .env("PUTONLY_LOG", "trace")
            .arg("push")
            .arg("--config")
            .arg(&config)
            .args(&args)
            .current_dir(work.path()))
        .await;
        assert_eq!(out.status.code(), Some(0));
        everything += &String::from_utf8_lossy(&out.stdout);
        everything += &String::from_utf8_lossy(&out.stderr);
    }
    // Error messages: a refused key, and a write the server denies.
    proxy.fail_next("PutObject", 1, 403, "AccessDenied");
    for prefix in ["bar/", "foo/"] {
        let out = run(putonly(Some(moto.dir.path()))
            .env("PUTONLY_LOG", "trace")
            .args(["push", "--json", "--config"])
            .arg(&config)
            .args(["--prefix", prefix, "outbox/b.txt"])
            .current_dir(work.path()))
        .await;
        assert_eq!(out.status.code(), Some(1), "{prefix} must fail");
        everything += &String::from_utf8_lossy(&out.stdout);
        everything += &String::from_utf8_lossy(&out.stderr);
    }
    // The agent at trace level, with renewals, then its status.
    let agent = putonly(Some(moto.dir.path()))
        .env("PUTONLY_LOG", "trace")
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id().unwrap() as i32, libc::SIGTERM) };
    let out = agent.wait_with_output().await.unwrap();
    everything += &String::from_utf8_lossy(&out.stderr);
    for json in [true, false] {
        let mut cmd = putonly(Some(moto.dir.path()));
        cmd.arg("status").arg("--config").arg(&config);
        if json {
            cmd.arg("--json");
        }
        let out = run(&mut cmd).await;
        everything += &String::from_utf8_lossy(&out.stdout);
    }

    let creds = std::fs::read_to_string(moto.dir.path().join("credentials")).unwrap();
    let mut secrets: Vec<String> = creds
        .lines()
        .filter_map(|l| l.strip_prefix("aws_secret_access_key = "))
        .map(str::to_string)
        .collect();
    secrets.extend(proxy.secrets());
    assert!(proxy.count("AssumeRole") >= 3, "renewals happened");
    assert!(secrets.len() >= 6, "{} secrets collected", secrets.len());
    assert!(everything.len() > 10_000, "trace output was produced");
    for secret in &secrets {
        assert!(
            !everything.contains(secret.as_str()),
            "a secret leaked into the output"
        );
    }
    // The state folder and the journal are the agent user's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&work.path().join("state")), 0o700);
    assert_eq!(mode(&work.path().join("state/journal.sqlite")), 0o600);
    // And the journal files hold none either.
    let mut journal = Vec::new();
    for name in ["journal.sqlite", "journal.sqlite-wal"] {
        journal.extend(std::fs::read(work.path().join("state").join(name)).unwrap_or_default());
    }
    let journal = String::from_utf8_lossy(&journal);
    for secret in &secrets {
        assert!(
            !journal.contains(secret.as_str()),
            "a secret is in the journal"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_a_push_without_completing_anything() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(
        &proxy.url,
        "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n\
         [upload]\npart_size = \"5MiB\"\nbandwidth_limit = \"2MiB/s\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    write_file(work.path(), "long.bin", 20 * MIB, 21);
    let child = putonly(Some(moto.dir.path()))
        .args(["push", "--config"])
        .arg(&config)
        .args(["--prefix", "foo/", "long.bin"])
        .current_dir(work.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("push stops at once")
        .unwrap();
    assert_eq!(out.status.code(), Some(130));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(proxy.count("CompleteMultipartUpload"), 0);
    assert_eq!(
        proxy.count("CreateMultipartUpload"),
        1,
        "the upload had started"
    );
    proxy.assert_only_writes();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_credentials_file_others_can_read_draws_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(
        &proxy.url,
        "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n",
    );
    let work = tempfile::tempdir().unwrap();
    write_file(work.path(), "w.txt", 10, 21);
    let creds = moto.dir.path().join("credentials");
    let mut warned = Vec::new();
    for mode in [0o644, 0o600] {
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = run(putonly(Some(moto.dir.path()))
            .args(["push", "--config"])
            .arg(&config)
            .args(["--prefix", "foo/", "w.txt"])
            .current_dir(work.path()))
        .await;
        assert_eq!(out.status.code(), Some(0));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        warned.push(stderr.contains(&format!("chmod 600 {}", creds.display())));
    }
    assert_eq!(
        warned,
        vec![true, false],
        "a warning for mode 644 (naming the file and the fix), none for 600"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn small_files_go_many_at_once_within_the_memory_of_a_few_parts() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(&proxy.url, "");
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("batch");
    std::fs::create_dir(&dir).unwrap();
    let big = write_file(&dir, "big.bin", 40 * MIB, 7);
    let small: Vec<Vec<u8>> = (0..120)
        .map(|i| write_file(&dir, &format!("s{i:03}.txt"), 4096, 100 + i))
        .collect();
    // A distant server: every request takes 150 ms, so requests overlap
    // as much as the client lets them.
    proxy.latency(Some(Duration::from_millis(150)));
    let out = push(
        &moto,
        &config,
        &[
            "--prefix",
            "foo/many/",
            "--concurrency",
            "2",
            "--requests-in-flight",
            "16",
            "--no-progress",
            "batch",
        ],
        work.path(),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    proxy.latency(None);
    // Two parts of 8 MiB bound the memory: never more parts at once...
    let parts = proxy.peak_in_flight("UploadPart");
    assert!((1..=2).contains(&parts), "{parts} parts at once");
    // ...but a 4 KiB file takes 4 KiB of it, not a part's slot: many go
    // at once, up to the request cap.
    let puts = proxy.peak_in_flight("PutObject");
    assert!(
        (8..=16).contains(&puts),
        "{puts} PutObject at once (2 before bodies were counted in bytes)"
    );
    // And never more requests of any kind than the cap.
    let all = proxy.peak_in_flight("*");
    assert!(all <= 16, "{all} requests at once with a cap of 16");
    let admin = moto.admin();
    assert!(get(&admin, BUCKET, "foo/many/big.bin").await == big);
    for (i, data) in small.iter().enumerate() {
        assert_eq!(
            &get(&admin, BUCKET, &format!("foo/many/s{i:03}.txt")).await,
            data
        );
    }
    proxy.assert_only_writes();
}
