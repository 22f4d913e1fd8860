//! What the configuration must not let through, with the real binary: a
//! duration beyond ten years is refused by `check --offline` and `run`
//! alike, with no panic; a task that panics makes `putonly run` fail (never
//! exit 0).

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
