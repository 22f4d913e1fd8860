//! `putonly check`: the set-up checked end to end before the agent runs —
//! configuration, folders, the finished-file rule each watch runs under
//! (a warning where no read lease can be had), the metrics address (a
//! warning off loopback), state folder, base identity,
//! the role, and (only when asked with --probe-write) one small write per
//! allowed prefix, plus, with `bucket.overwrite = false`, one object
//! written twice with `If-None-Match: *` to tell whether the server
//! enforces it. It says which endpoints S3 and STS would use and why
//! plain http is allowed there (loopback, or `aws.allow_insecure_http`),
//! and warns when users other than the agent's can read the configuration
//! or the external id file.
//! It never reads the bucket; `--offline` sends nothing at all.

use std::process::ExitCode;
use std::time::SystemTime;

use bytes::Bytes;

use super::{CheckArgs, EXIT_FAILED, EXIT_OK};
use crate::config::{Settings, Sse, Transport};
use crate::credentials::{
    CredentialSource, caller_identity, error_chain, load_sdk_config, offline_endpoints,
};
use crate::ground::checksum::Crc;
use crate::s3::{ObjectWriter, S3Error, WriteOnlyBucket};
use crate::watch::writers::{Mode, Support};

/// Lines of the report and whether any check failed.
#[derive(Default)]
struct Report {
    failed: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl std::fmt::Display) {
        println!("[ ok ] {what}: {detail}");
    }
    fn fail(&mut self, what: &str, detail: impl std::fmt::Display) {
        self.failed += 1;
        println!("[FAIL] {what}: {detail}");
    }
    /// Works, with a weaker guarantee than it could have: not a failure.
    fn warn(&mut self, what: &str, detail: impl std::fmt::Display) {
        println!("[warn] {what}: {detail}");
    }
}

pub async fn run(args: CheckArgs) -> ExitCode {
    let settings = match args.agent.settings_with(Some(&args.external_id)) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut r = Report::default();
    r.ok(
        "configuration",
        format!("{} is valid", args.agent.config.display()),
    );
    for warning in settings.exposed_files() {
        r.warn("configuration file", warning);
    }
    local_checks(&settings, &mut r);
    let endpoints_ok = endpoint_checks(&settings, &mut r).await;
    if !args.offline && endpoints_ok {
        remote_checks(&settings, args.probe_write, &mut r).await;
    }
    if r.failed == 0 {
        println!("all checks passed");
        ExitCode::from(EXIT_OK)
    } else {
        println!("{} check(s) failed", r.failed);
        ExitCode::from(EXIT_FAILED)
    }
}

/// Folders and prefixes: no network.
fn local_checks(settings: &Settings, r: &mut Report) {
    if settings.watches.is_empty() {
        r.ok(
            "watch",
            "none configured (enough for push; `putonly run` needs a [[watch]])",
        );
    }
    for (i, w) in settings.watches.iter().enumerate() {
        let what = format!("watch[{i}]");
        match std::fs::read_dir(&w.path) {
            Ok(_) => r.ok(
                &what,
                format!(
                    "{} is readable; its files go to {} (inside bucket.allowed_prefixes)",
                    w.path.display(),
                    w.prefix
                ),
            ),
            Err(e) => r.fail(
                &format!("{what}.path"),
                format!(
                    "{}: {e}; create it, or give the agent's user read and execute permission on it",
                    w.path.display()
                ),
            ),
        }
    }
    // Which rule tells a finished file, as the agent will log it at start.
    let folders: Vec<&std::path::Path> =
        settings.watches.iter().map(|w| w.path.as_path()).collect();
    let support = Support::probe(&folders);
    for (i, w) in settings.watches.iter().enumerate() {
        let what = format!("watch[{i}] finished-file rule");
        let rule = support.describe(i, w.settle);
        if support.mode(i).0 == Mode::AnyFile {
            r.ok(&what, rule);
        } else {
            r.warn(&what, rule);
        }
    }
    // Folders taken as the configuration names them: whoever can write
    // above them can point them elsewhere.
    let mut configured: Vec<(String, &std::path::Path)> = Vec::new();
    for (i, w) in settings.watches.iter().enumerate() {
        configured.push((format!("watch[{i}].path"), &w.path));
        if let crate::config::AfterUpload::Move { to } = &w.after_upload {
            configured.push((format!("watch[{i}].move_to"), to));
        }
    }
    for (what, path) in configured {
        if let Some(warning) = crate::watch::files::swappable_by_others(path) {
            r.warn(&what, warning);
        }
    }
    if !settings.watches.is_empty() {
        match crate::watch::files::hardlinks_verdict() {
            Ok(line) => r.ok("hard links", line),
            Err(warning) => r.warn("hard links", warning),
        }
    }
    if let Some(m) = &settings.metrics {
        match m.exposure() {
            None => r.ok(
                "metrics.listen",
                format!("{} (loopback: this machine only)", m.listen),
            ),
            Some(warning) => r.warn("metrics.listen", warning),
        }
    }
    if let Some(state) = &settings.state {
        match state_writable(&state.dir) {
            Ok(()) => r.ok(
                "state.dir",
                format!("{} is writable (owner-only)", state.dir.display()),
            ),
            Err(e) => r.fail(
                "state.dir",
                format!(
                    "{}: {e}; create it and give it to the agent's user (systemd: StateDirectory=putonly)",
                    state.dir.display()
                ),
            ),
        }
    }
}

/// Which endpoints S3 and STS would use, from where, and why plain http is
/// allowed there; found without the network. False when one is refused.
async fn endpoint_checks(settings: &Settings, r: &mut Report) -> bool {
    let endpoints = match offline_endpoints(&settings.aws).await {
        Ok(e) => e,
        Err(e) => {
            r.fail("endpoint", e);
            return false;
        }
    };
    if endpoints.is_empty() {
        r.ok("endpoint", "AWS's own, over https");
    }
    for (i, e) in endpoints.iter().enumerate() {
        // S3 and STS at the same place from the same setting: one line.
        let same = |o: &crate::credentials::Endpoint| o.url == e.url && o.source == e.source;
        if endpoints[..i].iter().any(same) {
            continue;
        }
        let services = if endpoints[i + 1..].iter().any(same) {
            "S3 and STS".to_string()
        } else {
            e.service.to_string()
        };
        let at = format!("{services} at {} (from {})", e.url, e.source);
        match e.transport {
            Transport::Tls => r.ok("endpoint", format!("{at}, over https")),
            Transport::Loopback => r.ok(
                "endpoint",
                format!("{at}: plain http, allowed because the host is loopback (the traffic never leaves this machine)"),
            ),
            Transport::Insecure => r.warn(
                "endpoint",
                format!("{at}: plain http to another host, allowed by aws.allow_insecure_http: the temporary credentials and the files cross the network unencrypted; use https:// unless this network is trusted"),
            ),
        }
    }
    true
}

/// Prepares the state folder as the agent does and writes a file in it.
fn state_writable(dir: &std::path::Path) -> std::io::Result<()> {
    crate::journal::prepare_state_dir(dir)?;
    let probe = dir.join(format!(".putonly-check-{}", std::process::id()));
    std::fs::write(&probe, b"probe")?;
    std::fs::remove_file(&probe)
}

async fn remote_checks(settings: &Settings, probe: bool, r: &mut Report) {
    let sdk = match load_sdk_config(&settings.aws).await {
        Ok(sdk) => sdk,
        Err(e) => {
            r.fail("endpoint", e);
            return;
        }
    };
    match caller_identity(&sdk).await {
        Ok((arn, account)) => r.ok("base identity", format!("{arn} (account {account})")),
        // An S3-compatible store (Garage, MinIO) often has no STS, and
        // without a role nothing needs it: the writes below tell the rest.
        Err(e) if settings.role.is_none() && settings.aws.endpoint_url.is_some() => r.warn(
            "base identity",
            format!("STS GetCallerIdentity at the endpoint: {e}; no [role] is configured, so STS is not needed (S3-compatible stores often have none) and the checks go on: --probe-write tells whether these credentials may write"),
        ),
        Err(e) => {
            r.fail("base identity", e);
            return;
        }
    }
    let credentials = match CredentialSource::start(&sdk, settings.role.as_ref()).await {
        Ok(c) => c,
        Err(e) => {
            r.fail("role", e);
            return;
        }
    };
    match (credentials.role(), credentials.expiry()) {
        (Some(session), Some(expiry)) => {
            let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
            r.ok(
                "role",
                format!(
                    "assumed as {}; credentials expire at {} (in {}), renewed {} before",
                    session.assumed_arn().unwrap_or_default(),
                    humantime::format_rfc3339_seconds(expiry),
                    humantime::format_duration(std::time::Duration::from_secs(left.as_secs())),
                    humantime::format_duration(
                        settings
                            .role
                            .as_ref()
                            .map(|x| x.refresh_before)
                            .unwrap_or_default()
                    )
                ),
            );
            if let Some(off) = session.clock_off() {
                r.warn(
                    "clock",
                    format!(
                        "this machine's clock is {off} of STS's (the expiry STS reported does not fit role.duration); \
                         putonly counts the lifetime on this clock, but signatures and logs suffer: set the clock right (NTP: systemd-timesyncd, chrony)"
                    ),
                );
            }
        }
        _ => r.ok(
            "role",
            "none configured: the base credentials write directly",
        ),
    }
    if !probe {
        println!(
            "       (write permissions not tested: add --probe-write to write one small object per allowed prefix)"
        );
        return;
    }
    let bucket = WriteOnlyBucket::new(&sdk, credentials, &settings.bucket, &settings.upload);
    let host = crate::ground::hostname();
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut writable = None;
    for prefix in settings.bucket.guard.prefixes() {
        let key = format!("{prefix}putonly-check/{host}-{stamp}.txt");
        let body = Bytes::from(format!(
            "written by `putonly check --probe-write` from {host} at {stamp}\n"
        ));
        let crc = Crc::of(settings.upload.checksum, &body);
        match bucket.put_object(&key, body, crc).await {
            Ok(_) => {
                writable.get_or_insert(prefix);
                r.ok(
                    &format!("write into {prefix}"),
                    format!("PutObject s3://{}/{key} succeeded", settings.bucket.name),
                )
            }
            // Allowed to write; a probe of the same second was there first.
            Err(e) if e.is_exists() => {
                writable.get_or_insert(prefix);
                r.ok(
                    &format!("write into {prefix}"),
                    format!("PutObject s3://{}/{key} was allowed (the key already held an object, left as it is)", settings.bucket.name),
                )
            }
            Err(e) => r.fail(
                &format!("write into {prefix}"),
                format!("{}{}", error_chain(&e), explain(settings, prefix, &e)),
            ),
        }
    }
    if !settings.bucket.overwrite
        && let Some(prefix) = writable
    {
        let key = format!(
            "{prefix}putonly-check/{host}-{stamp}-{}-if-none-match.txt",
            std::process::id()
        );
        probe_if_none_match(&bucket, settings, prefix, &key, r).await;
    }
}

/// With `bucket.overwrite = false`: writes one probe object twice with
/// `If-None-Match: *` under `prefix` (one the plain probe could write) and
/// tells from the second answer whether the server enforces it: 412 means
/// an existing object is safe; 200 means the header is ignored (Garage
/// 2.5.0 does) and overwrite = false cannot protect anything there.
async fn probe_if_none_match(
    bucket: &WriteOnlyBucket,
    settings: &Settings,
    prefix: &str,
    key: &str,
    r: &mut Report,
) {
    const WHAT: &str = "overwrite = false (If-None-Match)";
    let body = Bytes::from_static(
        b"written twice by `putonly check --probe-write` with If-None-Match: *\n",
    );
    let crc = Crc::of(settings.upload.checksum, &body);
    let url = format!("s3://{}/{key}", settings.bucket.name);
    for attempt in 1..=2 {
        match bucket.put_object(key, body.clone(), crc).await {
            Ok(_) if attempt == 1 => {}
            Ok(_) => {
                r.warn(
                    WHAT,
                    format!(
                        "not enforced: the server ignores If-None-Match; overwrite = false cannot protect existing objects here (a second conditional PutObject of {url} replaced the first)"
                    ),
                );
                return;
            }
            Err(e) if e.is_exists() => {
                r.ok(
                    WHAT,
                    format!(
                        "enforced: the server refused to replace {url} (412 PreconditionFailed), so existing objects are left as they are"
                    ),
                );
                return;
            }
            Err(e) => {
                r.fail(
                    WHAT,
                    format!(
                        "conditional PutObject {attempt} of 2 into {prefix}: {}{}",
                        error_chain(&e),
                        explain(settings, prefix, &e)
                    ),
                );
                return;
            }
        }
    }
}

/// For an access denied answer: which statement is most likely missing.
fn explain(settings: &Settings, prefix: &str, e: &S3Error) -> String {
    let S3Error::Denied { message, .. } = e else {
        return String::new();
    };
    let m = message.to_ascii_lowercase();
    let bucket = &settings.bucket.name;
    let resource = format!("arn:aws:s3:::{bucket}/{prefix}*");
    let writer = settings
        .role
        .as_ref()
        .map_or("the writing identity".to_string(), |r| r.arn.clone());
    let role_policy =
        format!("the role policy in account A does not allow s3:PutObject on {resource}");
    let bucket_policy = format!(
        "the bucket policy of {bucket} (account B) does not allow {writer} s3:PutObject on {resource}"
    );
    let mut likely = Vec::new();
    if m.contains("explicit deny") {
        likely.push(
            "an explicit Deny applies (bucket policy, SCP or permissions boundary)".to_string(),
        );
    } else if m.contains("identity-based") {
        likely.push(role_policy);
    } else if m.contains("resource-based") {
        likely.push(bucket_policy);
    } else if m.contains("kms") {
        likely.push(
            "the KMS key does not allow kms:GenerateDataKey and kms:Decrypt to the writer".into(),
        );
    } else {
        likely.push(role_policy);
        likely.push(bucket_policy);
    }
    if settings.bucket.acl.is_some() {
        likely.push(
            "bucket.acl is set, so s3:PutObjectAcl must be granted in both policies too".into(),
        );
    }
    if let Some(Sse::Kms { .. }) = settings.bucket.sse {
        likely.push(
            "SSE-KMS is set: the writer needs kms:GenerateDataKey and kms:Decrypt on the key"
                .into(),
        );
    }
    format!(
        ". Likely: {}. `putonly policy` prints documents that grant exactly this",
        likely.join("; or ")
    )
}
