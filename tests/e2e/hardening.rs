//! What the configuration must not let through, with the real binary: plain
//! http to another host (from the file, a flag, the AWS environment or
//! profile) is refused unless `allow_insecure_http` says so; a duration
//! beyond ten years is refused by `check --offline` and `run` alike, with
//! no panic; a task that panics makes `putonly run` fail (never exit 0).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::agent::{Agent, setup_custom};
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
