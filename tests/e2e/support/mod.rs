//! Test support: real servers (moto with IAM on, Garage), the recording
//! proxy, and helpers to run the real `putonly` binary in a temp folder.

#![allow(dead_code)]

pub mod garage;
pub mod moto;
pub mod proxy;
pub mod shape;

use std::path::{Path, PathBuf};
use std::process::Output;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path from scripts/tools-env.sh (the one place tool versions are set).
pub fn tool_path(var: &str) -> PathBuf {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(". scripts/tools-env.sh && printf %s \"${var}\""))
        .current_dir(repo())
        .output()
        .expect("run bash");
    assert!(out.status.success(), "tools-env.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path"))
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Runs one of the project's `scripts/*-up.sh DIR` and returns what it wrote
/// into DIR/env and the server's pid (DIR/NAME.pid).
pub fn start_server(
    script: &str,
    dir: &Path,
    envs: &[(&str, &std::ffi::OsStr)],
    name: &str,
) -> (std::collections::HashMap<String, String>, String) {
    let status = std::process::Command::new(repo().join("scripts").join(script))
        .arg(dir)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    assert!(status.success(), "scripts/{script} failed");
    let pid = std::fs::read_to_string(dir.join(format!("{name}.pid")))
        .unwrap()
        .trim()
        .to_string();
    (read_env(&dir.join("env")), pid)
}

/// Reads a KEY=VALUE file written by the project's scripts.
pub fn read_env(path: &Path) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a file of `len` pseudo-random bytes and returns its content.
pub fn write_file(dir: &Path, name: &str, len: usize, seed: u64) -> Vec<u8> {
    let data = bytes(len, seed);
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(p, &data).unwrap();
    data
}

/// The real binary, with an environment holding nothing of the caller's AWS
/// set-up: only the shared files given.
pub fn putonly(creds_dir: Option<&Path>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_putonly"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("PUTONLY_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    match creds_dir {
        Some(d) => {
            cmd.env("AWS_SHARED_CREDENTIALS_FILE", d.join("credentials"));
            cmd.env("AWS_CONFIG_FILE", d.join("config"));
        }
        None => {
            cmd.env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent");
            cmd.env("AWS_CONFIG_FILE", "/nonexistent");
        }
    }
    cmd.kill_on_drop(true);
    cmd
}

/// Runs a command and returns its output, printing it for failed tests.
pub async fn run(cmd: &mut tokio::process::Command) -> Output {
    let out = cmd.output().await.expect("run putonly");
    eprintln!(
        "--- exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An S3 client for reading back what arrived (tests only: putonly never reads).
/// Response checksums are not validated by the SDK: moto 5.2.5 answers a
/// multipart object with a wrong `x-amz-checksum-crc64nvme` (4 bytes); the
/// tests compare the bytes themselves. Garage's answers are validated by
/// `reader_validating`.
pub fn reader(endpoint: &str, region: &str, akid: &str, secret: &str) -> aws_sdk_s3::Client {
    client(endpoint, region, akid, secret, false)
}

/// As [`reader`], but the SDK also checks the object checksum the server returns.
pub fn reader_validating(
    endpoint: &str,
    region: &str,
    akid: &str,
    secret: &str,
) -> aws_sdk_s3::Client {
    client(endpoint, region, akid, secret, true)
}

fn client(
    endpoint: &str,
    region: &str,
    akid: &str,
    secret: &str,
    validate: bool,
) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::ResponseChecksumValidation;
    let creds = aws_credential_types::Credentials::new(akid, secret, None, None, "test-reader");
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(creds)
        .response_checksum_validation(if validate {
            ResponseChecksumValidation::WhenSupported
        } else {
            ResponseChecksumValidation::WhenRequired
        })
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Reads an object back whole.
pub async fn get(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    let out = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GetObject {key}: {e:?}"));
    out.body
        .collect()
        .await
        .unwrap_or_else(|e| panic!("read {key}: {e:?}"))
        .into_bytes()
        .to_vec()
}

/// The full-object checksum the server stored for `key`, as it reports it
/// (base64), for the given algorithm name.
pub async fn stored_checksum(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    kind: &str,
) -> Option<String> {
    let out = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GetObject {key}: {e:?}"));
    match kind {
        "crc64nvme" => out.checksum_crc64_nvme().map(str::to_string),
        "crc32c" => out.checksum_crc32_c().map(str::to_string),
        "crc32" => out.checksum_crc32().map(str::to_string),
        _ => None,
    }
}

/// Makes `cmd` run without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that
/// file permissions apply to it even when the tests run as root (as they do
/// in CI containers). A no-op for other users, who have neither.
pub fn drop_dac_override(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            for cap in [1, 2] {
                // CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2. Failing to
                // drop (no CAP_SETPCAP) is reported by dac_is_enforced.
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            Ok(())
        });
    }
}

/// Whether a process started through [`drop_dac_override`] is refused a
/// file with mode 000 (false when the capabilities could not be dropped).
pub fn dac_is_enforced() -> bool {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("locked");
    std::fs::write(&f, b"x").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut cmd = tokio::process::Command::new("cat");
    cmd.arg(&f)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    drop_dac_override(&mut cmd);
    let std_cmd = cmd.as_std_mut();
    !std_cmd.status().is_ok_and(|s| s.success())
}
