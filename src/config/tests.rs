//! The accepted and the refused forms of every setting.

#[cfg(test)]
use super::resolve::*;
use super::*;

const SEED: &str = r#"
    [aws]
    region = "us-east-1"
    profile = "s3-test"
    endpoint_url = "http://127.0.0.1:9000"
    [role]
    arn = "arn:aws:iam::123456789012:role/account-a-s3-role"
    session_name = "putonly"
    external_id = "x"
    duration = "6s"
    refresh_before = "3s"
    [bucket]
    name = "account-b-bucket"
    allowed_prefixes = ["foo/", "fighters/"]
    acl = "bucket-owner-full-control"
    [upload]
    part_size = "16MiB"
    concurrency = 8
    bandwidth_limit = "50MiB/s"
    checksum = "crc64nvme"
"#;

fn resolve(text: &str) -> Result<Settings, String> {
    let raw = RawConfig::parse(text)?;
    Settings::resolve(&raw).map_err(|e| e.to_string())
}

#[test]
fn accepts_the_documented_form() {
    let s = resolve(SEED).unwrap();
    let role = s.role.unwrap();
    assert_eq!(role.duration, Duration::from_secs(6));
    assert_eq!(role.refresh_before, Duration::from_secs(3));
    assert_eq!(s.bucket.name, "account-b-bucket");
    assert_eq!(s.upload.part_size, 16 * 1024 * 1024);
    assert_eq!(s.upload.multipart_threshold, 16 * 1024 * 1024);
    assert_eq!(s.upload.bandwidth_limit, Some(50 * 1024 * 1024));
    assert_eq!(s.upload.checksum, ChecksumKind::Crc64Nvme);
}

#[test]
fn defaults_fill_everything_optional() {
    let s = resolve("[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n").unwrap();
    assert_eq!(s.role, None);
    assert_eq!(s.upload, UploadSettings::default());
    assert_eq!(s.aws.profile, None);
}

#[test]
fn unknown_key_names_key_and_line() {
    let err = resolve("[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\nprefixes = []\n")
        .unwrap_err();
    assert!(err.contains("line 4"), "{err}");
    assert!(err.contains("prefixes"), "{err}");
}

#[test]
fn wrong_type_names_line() {
    let err = resolve("[upload]\nconcurrency = \"eight\"\n").unwrap_err();
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn rejected_forms_name_the_setting() {
    let base = "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n";
    for (extra, setting) in [
        ("[upload]\npart_size = \"1MiB\"\n", "upload.part_size"),
        ("[upload]\npart_size = \"lots\"\n", "upload.part_size"),
        ("[upload]\nconcurrency = 0\n", "upload.concurrency"),
        (
            "[upload]\nrequests_in_flight = 0\n",
            "upload.requests_in_flight",
        ),
        (
            "[upload]\nbandwidth_limit = \"fast\"\n",
            "upload.bandwidth_limit",
        ),
        ("[upload]\nchecksum = \"md5\"\n", "upload.checksum"),
        ("[role]\nsession_name = \"x\"\n", "role.arn"),
        ("[role]\narn = \"nope\"\n", "role.arn"),
        (
            "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\nduration = \"5s\"\nrefresh_before = \"10s\"\n",
            "role.refresh_before",
        ),
        (
            "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\nduration = \"soon\"\n",
            "role.duration",
        ),
        (
            "[aws]\nendpoint_url = \"localhost:9000\"\n",
            "aws.endpoint_url",
        ),
    ] {
        let err = resolve(&format!("{base}{extra}")).unwrap_err();
        assert!(err.starts_with(setting), "{extra:?}: {err}");
    }
    let err = resolve("[bucket]\nname = \"b-1\"\n").unwrap_err();
    assert!(err.starts_with("bucket.allowed_prefixes"), "{err}");
    let err = resolve("[bucket]\nallowed_prefixes = [\"foo/\"]\n").unwrap_err();
    assert!(err.starts_with("bucket.name"), "{err}");
    let err = resolve("[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"/foo/\"]\n").unwrap_err();
    assert!(err.starts_with("bucket.allowed_prefixes"), "{err}");
    // A directory bucket: every request would open with a CreateSession,
    // a GET on the bucket.
    let err =
        resolve("[bucket]\nname = \"mybucket--use1-az4--x-s3\"\nallowed_prefixes = [\"foo/\"]\n")
            .unwrap_err();
    assert!(err.starts_with("bucket.name"), "{err}");
    assert!(err.contains("directory bucket"), "{err}");
    let err = resolve(&format!("{base}acl = \"everyone\"\n")).unwrap_err();
    assert!(err.starts_with("bucket.acl"), "{err}");
    let err = resolve(&format!("{base}sse = \"rot13\"\n")).unwrap_err();
    assert!(err.starts_with("bucket.sse"), "{err}");
}

#[test]
fn refresh_before_defaults_below_short_durations() {
    let s = resolve(
        "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\nduration = \"6s\"\n[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n",
    )
    .unwrap();
    assert_eq!(s.role.unwrap().refresh_before, Duration::from_secs(3));
}

#[test]
fn max_attempts_zero_means_forever() {
    let s = resolve(
        "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n[upload]\nmax_attempts = 0\n",
    )
    .unwrap();
    assert_eq!(s.upload.max_attempts, None);
}

const AGENT: &str = "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n[state]\ndir = \"/var/lib/putonly\"\n";

#[test]
fn watches_resolve_with_defaults() {
    let s = resolve(&format!(
        "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/x\"\n"
    ))
    .unwrap();
    let w = &s.watches[0];
    assert_eq!(w.prefix, "foo/x/");
    assert_eq!(w.settle, Duration::from_secs(2));
    assert_eq!(w.after_upload, AfterUpload::Keep);
    assert!(w.exclude.contains(&"*.tmp".to_string()));
    assert!(w.marker.is_empty() && !w.manifest && !w.stream);
    s.require_agent().unwrap();
    let s = resolve(&format!(
        "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/x\"\nstream = true\n"
    ))
    .unwrap();
    assert!(s.watches[0].stream);
    let e = resolve(&format!(
        "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/x\"\nstream = \"yes\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("line 9") && e.contains("boolean"), "{e}");
    // A marker is one glob or a list of them.
    for (form, expected) in [
        ("marker = \"_SUCCESS\"\n", vec!["_SUCCESS"]),
        (
            "marker = [\"_SUCCESS\", \"*.done\"]\nmanifest = true\n",
            vec!["_SUCCESS", "*.done"],
        ),
    ] {
        let s = resolve(&format!(
            "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/x\"\n{form}"
        ))
        .unwrap();
        assert_eq!(s.watches[0].marker, expected);
        assert_eq!(s.watches[0].manifest, form.contains("manifest"));
    }
    // Include patterns do not keep markers out.
    let s = resolve(&format!(
        "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/x\"\ninclude = [\"**/*.csv\"]\nmarker = \"_SUCCESS\"\n"
    ))
    .unwrap();
    let f = Filter::new(&s.watches[0]);
    assert!(f.accepts(Path::new("_SUCCESS")) && f.accepts(Path::new("d/e/_SUCCESS")));
    assert!(!f.accepts(Path::new("d/x.json")));
}

#[test]
fn rejected_watch_forms_name_the_setting() {
    for (watch, setting) in [
        (
            "path = \"/srv/out\"\nprefix = \"bar/\"\n",
            "watch[0].prefix",
        ),
        ("path = \"srv/out\"\nprefix = \"foo/\"\n", "watch[0].path"),
        (
            "path = \"/srv/out\"\nprefix = \"foo//bar\"\n",
            "watch[0].prefix: \"foo//bar/\" cannot begin a key",
        ),
        ("path = \"/\"\nprefix = \"foo/\"\n", "watch[0].path"),
        (
            "path = \"/srv/out\"\nprefix = \"foo/\"\nafter_upload = \"shred\"\n",
            "watch[0].after_upload",
        ),
        (
            "path = \"/srv/out\"\nprefix = \"foo/\"\nafter_upload = \"move\"\n",
            "watch[0].move_to",
        ),
        (
            "path = \"/srv/out\"\nprefix = \"foo/\"\nafter_upload = \"move\"\nmove_to = \"/srv/out/sent\"\n",
            "watch[0].move_to",
        ),
        (
            "path = \"/srv/out\"\nprefix = \"foo/\"\ninclude = [\"a[\"]\n",
            "watch[0].include",
        ),
        (
            "path = \"/srv/out\"\nprefix = \"foo/\"\nmarker = \"d/_SUCCESS\"\n",
            "watch[0].marker: \"d/_SUCCESS\" is not a file name pattern",
        ),
        (
            "path = \"/srv/out\"\nprefix = \"foo/\"\nmarker = [\"ok\", \"a[\"]\n",
            "watch[0].marker",
        ),
        (
            "path = \"/srv/out\"\nprefix = \"foo/\"\nmanifest = true\n",
            "watch[0].manifest: is true but no marker is set",
        ),
        (
            "path = \"/srv/out\"\nprefix = \"foo/\"\nmarker = \".done\"\n",
            "watch[0].marker: \".done\" is a name that is never taken",
        ),
        (
            "path = \"/srv/out\"\nprefix = \"foo/\"\nmarker = \"ok.lock\"\nexclude = [\"*.lock\"]\n",
            "watch[0].marker",
        ),
        ("path = \"/var/lib\"\nprefix = \"foo/\"\n", "state.dir"),
        (
            "path = \"/srv/out\"\nprefix = \"foo/\"\n[[watch]]\npath = \"/srv/out/a\"\nprefix = \"foo/\"\n",
            "watch[1].path",
        ),
        // Key spaces that collide: the same prefix, nested prefixes,
        // the same template.
        (
            "path = \"/srv/a\"\nprefix = \"foo/\"\n[[watch]]\npath = \"/srv/b\"\nprefix = \"foo\"\n",
            "watch[1].prefix: watch[1] (/srv/b) and watch[0] (/srv/a) can write the same keys: both have the prefix \"foo/\"",
        ),
        (
            "path = \"/srv/a\"\nprefix = \"foo/x/\"\n[[watch]]\npath = \"/srv/b\"\nprefix = \"foo/\"\n",
            "watch[1].prefix: watch[1] (/srv/b) and watch[0] (/srv/a) can write the same keys: its prefix \"foo/\" and watch[0]'s prefix \"foo/x/\" are nested",
        ),
        (
            "path = \"/srv/a\"\nprefix = \"foo/{hostname}\"\n[[watch]]\npath = \"/srv/b\"\nprefix = \"foo/{hostname}/\"\n",
            "watch[1].prefix",
        ),
        // move_to inside another watch, or holding one.
        (
            "path = \"/srv/a\"\nprefix = \"foo/a\"\nafter_upload = \"move\"\nmove_to = \"/srv/b/sent\"\n[[watch]]\npath = \"/srv/b\"\nprefix = \"foo/b\"\n",
            "watch[0].move_to: /srv/b/sent and watch[1] (/srv/b) contain one another",
        ),
        (
            "path = \"/srv/a\"\nprefix = \"foo/a\"\nafter_upload = \"move\"\nmove_to = \"/srv\"\n[[watch]]\npath = \"/srv/b\"\nprefix = \"foo/b\"\n",
            "watch[0].move_to",
        ),
    ] {
        let err = resolve(&format!("{AGENT}[[watch]]\n{watch}")).unwrap_err();
        assert!(err.starts_with(setting), "{watch:?}: {err}");
    }
    // Each pattern a glob, the set of them too large to compile.
    let huge = "?".repeat(1_000_000);
    for key in ["include", "exclude"] {
        let err = resolve(&format!(
            "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/\"\n{key} = [\"{huge}\"]\n"
        ))
        .unwrap_err();
        assert!(
            err.starts_with(&format!("watch[0].{key}: the patterns cannot be compiled")),
            "{err}"
        );
    }
    let err = resolve(&format!(
        "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/\"\nmarker = \"{huge}\"\n"
    ))
    .unwrap_err();
    assert!(
        err.starts_with("watch[0].marker: the patterns cannot be compiled"),
        "{err}"
    );
    let no_watch = resolve(AGENT).unwrap();
    assert!(
        no_watch
            .require_agent()
            .unwrap_err()
            .to_string()
            .starts_with("watch")
    );
}

#[test]
fn prefix_templates_expand_per_host() {
    let host = hostname();
    assert_eq!(
        expand_template("p", "fleet/{hostname}/logs").unwrap(),
        format!("fleet/{host}/logs")
    );
    // SAFETY: a test-only variable no other test reads.
    unsafe { std::env::set_var("PUTONLY_TEST_NODE", "node-7") };
    assert_eq!(
        expand_template("p", "fleet/{env:PUTONLY_TEST_NODE}/").unwrap(),
        "fleet/node-7/"
    );
    unsafe { std::env::set_var("PUTONLY_TEST_SLASH", "a/../b") };
    for bad in [
        "{env:PUTONLY_TEST_SLASH}/",
        "{nope}",
        "{hostname",
        "{env:PUTONLY_UNSET_X}",
    ] {
        let e = expand_template("watch[0].prefix", bad)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("watch[0].prefix"), "{bad}: {e}");
    }
}

fn with_aws(aws: &str) -> Result<Settings, String> {
    resolve(&format!(
        "[aws]\n{aws}\n[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n"
    ))
}

#[test]
fn plain_http_is_refused_unless_loopback_or_allowed() {
    for url in [
        "http://127.0.0.1:9000",
        "http://127.8.9.10",
        "http://[::1]:3900/",
        "http://[::ffff:127.0.0.1]:9000",
        "http://localhost:5000",
        "http://LocalHost",
        "https://s3.example.com",
        "https://10.0.0.5:9000",
    ] {
        let s = with_aws(&format!("endpoint_url = \"{url}\"")).unwrap();
        assert_eq!(s.aws.endpoint_url.as_deref(), Some(url));
    }
    for url in [
        "http://10.0.0.5:9000",
        "http://s3.example.com",
        "http://127.0.0.1.evil.example",
        "http://127.0.0.1@evil.example/",
        "http://localhost.evil.example:80",
        "http://evil.example#@127.0.0.1",
        "http://[::2]:9000",
        "http://0.0.0.0:9000",
        "http://2130706433/",
    ] {
        let err = with_aws(&format!("endpoint_url = \"{url}\"")).unwrap_err();
        assert!(err.starts_with("aws.endpoint_url: "), "{url}: {err}");
        assert!(err.contains("plain http"), "{url}: {err}");
        assert!(err.contains("unencrypted"), "{url}: {err}");
        assert!(
            err.contains("set allow_insecure_http = true in the [aws] table"),
            "{url}: {err}"
        );
        // Allowed on purpose.
        let s = with_aws(&format!(
            "endpoint_url = \"{url}\"\nallow_insecure_http = true"
        ))
        .unwrap();
        assert!(s.aws.allow_insecure_http);
    }
    assert_eq!(
        check_endpoint("x", "http://10.1.1.1", true, None).unwrap(),
        Transport::Insecure
    );
    assert_eq!(
        check_endpoint("x", "http://127.0.0.1:1", false, None).unwrap(),
        Transport::Loopback
    );
    assert_eq!(
        check_endpoint("x", "https://10.1.1.1", false, None).unwrap(),
        Transport::Tls
    );
}

#[test]
fn a_refused_endpoint_names_the_file_or_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "[aws]\nendpoint_url = \"http://192.0.2.7:9000\"\n[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n",
    )
    .unwrap();
    let mut raw = RawConfig::load(&path).unwrap();
    let err = Settings::resolve(&raw).unwrap_err().to_string();
    assert!(
        err.starts_with("aws.endpoint_url: http://192.0.2.7:9000 is plain http"),
        "{err}"
    );
    assert!(
        err.contains(&format!("[aws] table of {}", path.display())),
        "{err}"
    );
    // The same URL from --endpoint-url names the flag.
    raw.aws.endpoint_url_from_flag = true;
    let err = Settings::resolve(&raw).unwrap_err().to_string();
    assert!(err.starts_with("--endpoint-url: "), "{err}");
    // Without a file, the fix says where it can go.
    raw.file = None;
    let err = Settings::resolve(&raw).unwrap_err().to_string();
    assert!(err.contains("--allow-insecure-http"), "{err}");
}

#[test]
fn durations_above_ten_years_are_refused_naming_the_setting() {
    let role = "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\n";
    for (table, key, setting) in [
        ("[agent]", "rescan_interval", "agent.rescan_interval"),
        ("[agent]", "shutdown_timeout", "agent.shutdown_timeout"),
        ("[agent]", "failed_retry_after", "agent.failed_retry_after"),
        ("[upload]", "request_timeout", "upload.request_timeout"),
        (
            "[metrics]\nlisten = \"127.0.0.1:1\"",
            "unhealthy_after",
            "metrics.unhealthy_after",
        ),
        (
            "[state]\ndir = \"/var/lib/putonly\"",
            "retention",
            "state.retention",
        ),
        (
            "[state]\ndir = \"/var/lib/putonly\"",
            "keep_receipts",
            "state.keep_receipts",
        ),
        (role, "duration", "role.duration"),
        (
            "[state]\ndir = \"/var/lib/putonly\"\n[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/\"",
            "settle",
            "watch[0].settle",
        ),
    ] {
        let base = format!("[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n{table}\n");
        // The review's example, one just past the cap, and one that
        // overflows humantime itself.
        for long in ["500000000000y", "10y 1s", "99999999999999999999999s"] {
            let err = resolve(&format!("{base}{key} = \"{long}\"\n")).unwrap_err();
            assert!(
                err.starts_with(&format!("{setting}: {long:?} is longer than the 10 years")),
                "{setting} = {long}: {err}"
            );
            assert!(err.contains("give at most \"10y\""), "{err}");
        }
        // The cap itself is accepted.
        if setting != "role.duration" {
            resolve(&format!("{base}{key} = \"10y\"\n")).unwrap();
        }
    }
    let err = resolve(&format!(
        "{role}duration = \"1h\"\nrefresh_before = \"11y\"\n[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n"
    ))
    .unwrap_err();
    assert!(err.starts_with("role.refresh_before: "), "{err}");
    assert_eq!(
        parse_duration("x", "10y").unwrap(),
        MAX_DURATION,
        "10y is the cap exactly"
    );
}

const ROLE: &str = "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\n";
const BUCKET: &str = "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n";

#[test]
fn the_external_id_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("external-id");
    std::fs::write(&file, "ext-1234:abc/def\n").unwrap();
    let text = format!(
        "{ROLE}external_id_file = {:?}\n{BUCKET}",
        file.display().to_string()
    );
    let role = resolve(&text).unwrap().role.unwrap();
    assert_eq!(
        role.external_id.as_ref().map(Secret::expose),
        Some("ext-1234:abc/def")
    );
    assert_eq!(role.external_id_file.as_deref(), Some(file.as_path()));

    // Both ways at once, a missing file, an empty one, a bad value.
    let both = format!("{ROLE}external_id = \"x1\"\nexternal_id_file = \"/x\"\n{BUCKET}");
    let err = resolve(&both).unwrap_err();
    assert!(
        err.starts_with("role.external_id_file: is set together with role.external_id"),
        "{err}"
    );
    let missing = dir.path().join("nope");
    let err = resolve(&format!(
        "{ROLE}external_id_file = {:?}\n{BUCKET}",
        missing.display().to_string()
    ))
    .unwrap_err();
    assert!(
        err.starts_with("role.external_id_file: cannot read"),
        "{err}"
    );
    assert!(err.contains(&missing.display().to_string()), "{err}");
    std::fs::write(&file, "\n").unwrap();
    let err = resolve(&text).unwrap_err();
    assert!(err.starts_with("role.external_id_file: is empty"), "{err}");
    std::fs::write(&file, "secret-value\nsecond line\n").unwrap();
    let err = resolve(&text).unwrap_err();
    assert!(
        err.starts_with("role.external_id_file: is not a valid external id"),
        "{err}"
    );
    assert!(
        !err.contains("secret-value"),
        "the value is never shown: {err}"
    );
    let err = resolve(&format!("{ROLE}external_id = \"has space\"\n{BUCKET}")).unwrap_err();
    assert!(err.starts_with("role.external_id: is not a valid"), "{err}");
    assert!(!err.contains("has space"), "{err}");
}

#[test]
fn debug_output_never_shows_the_external_id() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("id");
    std::fs::write(&file, "from-the-file-42\n").unwrap();
    for (text, id) in [
        (
            format!("{ROLE}external_id = \"in-the-config-41\"\n{BUCKET}"),
            "in-the-config-41",
        ),
        (
            format!(
                "{ROLE}external_id_file = {:?}\n{BUCKET}",
                file.display().to_string()
            ),
            "from-the-file-42",
        ),
    ] {
        let raw = RawConfig::parse(&text).unwrap();
        let settings = Settings::resolve(&raw).unwrap();
        for shown in [
            format!("{raw:?}"),
            format!("{raw:#?}"),
            format!("{settings:?}"),
            format!("{settings:#?}"),
            format!("{:?}", settings.role),
        ] {
            assert!(!shown.contains(id), "{shown}");
            assert!(
                shown.contains("** redacted **") || !shown.contains("external_id: Some"),
                "{shown}"
            );
        }
        assert!(format!("{settings:?}").contains("external_id: Some(\"** redacted **\")"));
    }
}

#[test]
fn files_other_users_can_read_are_reported() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let id = dir.path().join("external-id");
    std::fs::write(&id, "abc-1\n").unwrap();
    std::fs::write(
        &config,
        format!(
            "{ROLE}external_id_file = {:?}\n{BUCKET}",
            id.display().to_string()
        ),
    )
    .unwrap();
    let mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    let settings = || Settings::resolve(&RawConfig::load(&config).unwrap()).unwrap();
    // The packaged modes: owner, and a group this process is in.
    mode(&config, 0o640);
    mode(&id, 0o600);
    assert_eq!(settings().exposed_files(), Vec::<String>::new());
    // Everyone can read both.
    mode(&config, 0o644);
    mode(&id, 0o604);
    let warnings = settings().exposed_files();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].starts_with(&format!(
            "{} (mode 0644) can be read by every user",
            config.display()
        )),
        "{warnings:?}"
    );
    assert!(warnings[0].ends_with(&format!("fix: chmod o-r {}", config.display())));
    assert!(
        warnings[1].starts_with(&id.display().to_string()),
        "{warnings:?}"
    );
    // Group-readable by a group this process is not in (needs root to
    // give the file to such a group).
    mode(&config, 0o640);
    mode(&id, 0o640);
    if std::os::unix::fs::chown(&id, None, Some(54_321)).is_ok() {
        let warnings = settings().exposed_files();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains(
                "can be read by the members of group 54321, and this process is not in that group"
            ),
            "{warnings:?}"
        );
    }
}

#[test]
fn overwrite_is_on_unless_turned_off() {
    let base = "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n";
    assert!(resolve(base).unwrap().bucket.overwrite);
    let off = resolve(&format!("{base}overwrite = false\n")).unwrap();
    assert!(!off.bucket.overwrite);
    let err = resolve(&format!("{base}overwrite = \"no\"\n")).unwrap_err();
    assert!(err.contains("line 4"), "{err}");
}

#[test]
fn receipts_are_kept_as_long_as_records_unless_told() {
    let base = "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n\
                [state]\ndir = \"/var/lib/putonly\"\nretention = \"7d\"\n";
    let st = resolve(base).unwrap().state.unwrap();
    assert_eq!(st.keep_receipts, st.retention);
    let st = resolve(&format!("{base}keep_receipts = \"90d\"\n"))
        .unwrap()
        .state
        .unwrap();
    assert_eq!(st.keep_receipts, Duration::from_secs(90 * 86_400));
    assert_eq!(st.retention, Duration::from_secs(7 * 86_400));
}

#[test]
fn the_example_file_parses() {
    let text = include_str!("../../agent.toml.example");
    let s = resolve(text).unwrap();
    assert!(s.bucket.guard.prefixes().contains(&"foo/".to_string()));
    assert!(s.role.is_some());
    s.require_agent().unwrap();
}

#[test]
fn a_metrics_address_off_loopback_is_named_as_exposed() {
    let exposure = |listen: &str| {
        let m = resolve_metrics(&RawMetrics {
            listen: Some(listen.into()),
            unhealthy_after: None,
        })
        .unwrap();
        m.exposure()
    };
    assert_eq!(exposure("127.0.0.1:9464"), None);
    assert_eq!(exposure("[::1]:9464"), None);
    let all = exposure("0.0.0.0:9464").unwrap();
    assert!(all.contains("every interface"), "{all}");
    assert!(all.contains("\"127.0.0.1:9464\""), "{all}");
    assert!(exposure("[::]:9464").unwrap().contains("every interface"));
    let lan = exposure("192.168.1.20:9100").unwrap();
    assert!(lan.contains("a network interface"), "{lan}");
    assert!(lan.contains("\"127.0.0.1:9100\""), "{lan}");
}
