//! What the configuration must not let through, with the real binary: plain
//! http to another host (from the file, a flag, the AWS environment or
//! profile) is refused unless `allow_insecure_http` says so; a duration
//! beyond ten years is refused by `check --offline` and `run` alike, with no
//! panic; a task that panics makes `putonly run` fail (never exit 0); the
//! external id from a file or PUTONLY_EXTERNAL_ID reaches AssumeRole (read
//! by the recording proxy) and neither the agent's argv nor its log.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::agent::{Agent, setup_custom, wait_done};
use crate::support::moto::Moto;
use crate::support::{putonly, run};

fn text(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An agent configuration (bucket, state, one watch) under `work`, with
/// `aws` as the [aws] table's lines and `extra` appended.
fn agent_config(work: &Path, aws: &str, extra: &str) -> PathBuf {
    let outbox = work.join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let path = work.join(format!("agent-{}.toml", crate::support::free_port()));
    std::fs::write(
        &path,
        format!(
            "[aws]\nregion = \"us-east-1\"\n{aws}\n\
             [bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n\
             [state]\ndir = \"{}\"\n[[watch]]\npath = \"{}\"\nprefix = \"foo/\"\n{extra}\n",
            work.join("state").display(),
            outbox.display()
        ),
    )
    .unwrap();
    path
}

async fn check_offline(config: &Path, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    text(
        &run(putonly(None)
            .envs(env.iter().copied())
            .args(["check", "--offline", "--config"])
            .arg(config))
        .await,
    )
}

/// `putonly run` that must stop by itself within 30 s.
async fn run_agent(config: &Path, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = putonly(None);
    cmd.envs(env.iter().copied())
        .args(["run", "--config"])
        .arg(config);
    let out = tokio::time::timeout(Duration::from_secs(30), run(&mut cmd))
        .await
        .expect("putonly run stops by itself");
    text(&out)
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_to_another_host_is_refused_wherever_it_is_set() {
    let work = tempfile::tempdir().unwrap();
    let insecure = agent_config(work.path(), "endpoint_url = \"http://192.0.2.10:9000\"", "");
    let refusal = "aws.endpoint_url: http://192.0.2.10:9000 is plain http to \"192.0.2.10\", which is not this machine: the temporary secret key and session token from STS, and every file, would cross the network unencrypted";
    let fix = format!(
        "set allow_insecure_http = true in the [aws] table of {}",
        insecure.display()
    );

    // check, run and push: a configuration error (2), naming the setting,
    // the file and the fix; nothing sent.
    let (code, _, err) = check_offline(&insecure, &[]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(refusal), "{err}");
    assert!(err.contains(&fix), "{err}");
    let (code, _, err) = run_agent(&insecure, &[]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(refusal), "{err}");
    let file = work.path().join("report.csv");
    std::fs::write(&file, b"a,b\n").unwrap();
    let (code, _, err) = text(
        &run(putonly(None)
            .args(["push", "--config"])
            .arg(&insecure)
            .arg(&file))
        .await,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(refusal), "{err}");
    let (code, _, err) = text(
        &run(putonly(None)
            .args([
                "push",
                "--bucket",
                "account-b-bucket",
                "--prefix",
                "foo/",
                "--endpoint-url",
                "http://192.0.2.10:9000",
            ])
            .arg(&file))
        .await,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--endpoint-url: http://192.0.2.10:9000 is plain http"),
        "{err}"
    );
    assert!(err.contains("--allow-insecure-http"), "{err}");

    // Allowed on purpose: check says so, as a warning.
    let allowed = agent_config(
        work.path(),
        "endpoint_url = \"http://192.0.2.10:9000\"\nallow_insecure_http = true",
        "",
    );
    let (code, out, err) = check_offline(&allowed, &[]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("[warn] endpoint: S3 and STS at http://192.0.2.10:9000 (from aws.endpoint_url): plain http to another host, allowed by aws.allow_insecure_http"),
        "{out}"
    );

    // Loopback is fine, and says why; it wins over the AWS environment.
    let loopback = agent_config(work.path(), "endpoint_url = \"http://127.0.0.1:9\"", "");
    let (code, out, _) =
        check_offline(&loopback, &[("AWS_ENDPOINT_URL", "http://192.0.2.12")]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("[ ok ] endpoint: S3 and STS at http://127.0.0.1:9 (from aws.endpoint_url): plain http, allowed because the host is loopback"),
        "{out}"
    );

    // From the AWS environment, with nothing in the file: refused too.
    let silent = agent_config(work.path(), "", "");
    let sts_env = [("AWS_ENDPOINT_URL_STS", "http://192.0.2.11")];
    let (code, out, _) = check_offline(&silent, &sts_env).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("[FAIL] endpoint: the environment variable AWS_ENDPOINT_URL_STS: http://192.0.2.11 is plain http"),
        "{out}"
    );
    let (code, _, err) = run_agent(&silent, &sts_env).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "the environment variable AWS_ENDPOINT_URL_STS: http://192.0.2.11 is plain http"
        ),
        "{err}"
    );
    assert!(err.contains("or remove it"), "{err}");

    // ... and from the AWS profile.
    let aws_config = work.path().join("aws-config");
    std::fs::write(
        &aws_config,
        "[profile p]\nregion = us-east-1\nendpoint_url = http://192.0.2.13:80\n",
    )
    .unwrap();
    let with_profile = agent_config(work.path(), "profile = \"p\"", "");
    let (code, out, _) = check_offline(
        &with_profile,
        &[("AWS_CONFIG_FILE", aws_config.to_str().unwrap())],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "[FAIL] endpoint: endpoint_url (or its services section) of the AWS profile p in {}: http://192.0.2.13:80 is plain http",
            aws_config.display()
        )),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duration_beyond_ten_years_is_refused_and_run_fails_without_a_panic() {
    // moto, so that an agent that accepted the value would get as far as
    // starting its watcher.
    let moto = Moto::start();
    let work = tempfile::tempdir().unwrap();
    let config = agent_config(
        work.path(),
        &format!("profile = \"s3-test\"\nendpoint_url = \"{}\"", moto.url),
        "[agent]\nrescan_interval = \"500000000000y\"\n",
    );
    let creds = [
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            moto.dir.path().join("credentials"),
        ),
        ("AWS_CONFIG_FILE", moto.dir.path().join("config")),
    ];
    let env: Vec<(&str, &str)> = creds
        .iter()
        .map(|(k, v)| (*k, v.to_str().unwrap()))
        .collect();
    let message = "agent.rescan_interval: \"500000000000y\" is longer than the 10 years a duration may be; give at most \"10y\"";
    let (code, out, err) = check_offline(&config, &env).await;
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains(message), "{err}");
    let (code, _, err) = run_agent(&config, &env).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(message), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicked_task_makes_run_exit_non_zero() {
    let s = setup_custom(
        "",
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"200ms\"\n",
        "[\"foo/\", \"fighters/\"]",
        "",
        "",
    )
    .await;
    // No rescan to bring the next file, which the agent waited for before
    // it looked at its tasks again.
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace("rescan_interval = \"10s\"", "rescan_interval = \"1h\""),
    )
    .unwrap();
    for (task, stopped) in [
        ("watcher", "the watcher stopped"),
        ("upload", "an upload task stopped"),
    ] {
        let mut cmd = putonly(Some(s.moto.dir.path()));
        cmd.env("PUTONLY_DEBUG_PANIC", task);
        let agent = Agent::spawn(cmd, &s.config, &s.log);
        std::fs::write(s.outbox.join(format!("{task}.csv")), b"x,y\n").unwrap();
        // Start-up and the file's settle time: the panic is seen at once,
        // not when the next file comes.
        let code = agent.exited(Duration::from_secs(20)).await;
        let log = std::fs::read_to_string(&s.log).unwrap();
        assert_eq!(code, Some(1), "{log}");
        assert!(
            log.contains(&format!("PUTONLY_DEBUG_PANIC={task}")),
            "{log}"
        );
        assert!(log.contains(stopped), "{log}");
        assert!(log.contains("This is a bug in putonly"), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_external_id_reaches_assume_role_and_not_argv_or_the_log() {
    use std::os::unix::fs::PermissionsExt;
    const ID: &str = "e2e-ext:7Hq2/id=ok";
    let secrets = tempfile::tempdir().unwrap();
    let id_file = secrets.path().join("external-id");
    std::fs::write(&id_file, format!("{ID}\n")).unwrap();
    std::fs::set_permissions(&id_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = setup_custom(
        &format!("external_id_file = \"{}\"\n", id_file.display()),
        "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"200ms\"\n",
        "[\"foo/\", \"fighters/\"]",
        "",
        "",
    )
    .await;

    // check warns about files every user can read, and stops once they
    // are not.
    std::fs::set_permissions(&s.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let creds = s.moto.dir.path();
    let (code, out, _) = text(
        &run(putonly(Some(creds))
            .args(["check", "--offline", "--config"])
            .arg(&s.config))
        .await,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "[warn] configuration file: {} (mode 0644) can be read by every user of this machine; fix: chmod o-r",
            s.config.display()
        )),
        "{out}"
    );
    std::fs::set_permissions(&s.config, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(&id_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, out, _) = text(
        &run(putonly(Some(creds))
            .args(["check", "--offline", "--config"])
            .arg(&s.config))
        .await,
    );
    assert!(
        !out.contains(
            &s.config
                .display()
                .to_string()
                .replace(".toml", ".toml (mode")
        )
    );
    assert!(
        out.contains(&format!(
            "[warn] configuration file: {} (mode 0644)",
            id_file.display()
        )),
        "{out}"
    );
    std::fs::set_permissions(&id_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The agent, with the id from the file, at debug level.
    let mut cmd = putonly(Some(creds));
    cmd.env("PUTONLY_LOG", "debug");
    let agent = Agent::spawn(cmd, &s.config, &s.log);
    std::fs::write(s.outbox.join("a.csv"), b"1,2\n").unwrap();
    wait_done(&s, 1, Duration::from_secs(60)).await;
    let argv = std::fs::read(format!("/proc/{}/cmdline", agent.pid())).unwrap();
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(argv.contains(" run --config "), "{argv}");
    assert!(!argv.contains(ID), "{argv}");
    assert_eq!(agent.stop().await, Some(0));
    let assumed: Vec<Option<String>> = s
        .proxy
        .records()
        .into_iter()
        .filter(|r| r.op == "AssumeRole")
        .map(|r| r.external_id)
        .collect();
    assert!(!assumed.is_empty());
    assert!(
        assumed.iter().all(|id| id.as_deref() == Some(ID)),
        "{assumed:?}"
    );
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.contains("assumed role"), "{log}");
    assert!(!log.contains(ID), "the log shows the external id:\n{log}");
    assert!(!log.contains("e2e-ext"), "{log}");

    // push: from PUTONLY_EXTERNAL_ID (the role from the file, its
    // external_id_file replaced), and from --external-id-file.
    let file = s.work.path().join("report.csv");
    std::fs::write(&file, b"a,b\n").unwrap();
    let other_file = secrets.path().join("other-id");
    std::fs::write(&other_file, "from-flag-file-9\n").unwrap();
    for (env, args, expected) in [
        (Some("from-env-8"), vec![], "from-env-8"),
        (
            Some("from-env-8"),
            vec!["--external-id-file", other_file.to_str().unwrap()],
            "from-flag-file-9",
        ),
    ] {
        let before = s.proxy.count("AssumeRole");
        let mut cmd = putonly(Some(creds));
        if let Some(v) = env {
            cmd.env("PUTONLY_EXTERNAL_ID", v);
        }
        let (code, out, err) = text(
            &run(cmd
                .args(["push", "-vv", "--prefix", "foo/", "--config"])
                .arg(&s.config)
                .args(&args)
                .arg(&file))
            .await,
        );
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(!err.contains(expected) && !out.contains(expected), "{err}");
        let records = s.proxy.records();
        let sent: Vec<Option<&str>> = records
            .iter()
            .filter(|r| r.op == "AssumeRole")
            .skip(before)
            .map(|r| r.external_id.as_deref())
            .collect();
        assert_eq!(sent, vec![Some(expected)]);
    }
    s.proxy.assert_only_writes();
}
