//! `putonly policy` round trip against moto with authorization on: the
//! generated documents, applied as they are, let the writer into exactly
//! the allowed prefixes; `putonly policy lint` passes them and reports every
//! mistake of the seed article's own documents.

use std::path::Path;

use crate::support::moto::Moto;
use crate::support::proxy::Proxy;
use crate::support::{get, putonly, repo, run, tool_path, write_file};

const BUCKET: &str = "generated-bucket";
const ROLE: &str = "putonly-generated-role";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/putonly-generated-role";
const USER_ARN: &str = "arn:aws:iam::123456789012:user/bobbytables";

fn apply(moto: &Moto, documents: &Path) {
    let python = tool_path("PUTONLY_MOTO_SERVER").with_file_name("python");
    let out = std::process::Command::new(python)
        .arg(repo().join("scripts/apply_policies.py"))
        .arg(&moto.url)
        .arg(moto.dir.path())
        .arg(documents)
        .args([BUCKET, ROLE])
        .output()
        .expect("run apply_policies.py");
    assert!(
        out.status.success(),
        "apply_policies.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes with the role's own credentials straight through the SDK: the
/// client-side prefix guard is not in the way, so the server decides.
async fn put_as_role(endpoint: &str, creds_dir: &Path, key: &str) -> Result<(), String> {
    let scenario: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(creds_dir.join("scenario.json")).unwrap())
            .unwrap();
    let user = aws_credential_types::Credentials::new(
        scenario["user"]["access_key_id"].as_str().unwrap(),
        scenario["user"]["secret_access_key"].as_str().unwrap(),
        None,
        None,
        "test",
    );
    let sts_conf = aws_sdk_sts::config::Builder::new()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(user)
        .build();
    let assumed = aws_sdk_sts::Client::from_conf(sts_conf)
        .assume_role()
        .role_arn(ROLE_ARN)
        .role_session_name("guard-off")
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let c = assumed.credentials().unwrap();
    let creds = aws_credential_types::Credentials::new(
        c.access_key_id(),
        c.secret_access_key(),
        Some(c.session_token().to_string()),
        None,
        "role",
    );
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(creds)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(aws_sdk_s3::primitives::ByteStream::from_static(
            b"guard off",
        ))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| {
            use aws_sdk_s3::error::ProvideErrorMetadata;
            e.code().unwrap_or("no code").to_string()
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_documents_applied_as_they_are_allow_exactly_the_prefixes() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let config = moto.config(
        &proxy.url,
        &format!("[bucket]\nname = \"{BUCKET}\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n"),
    );
    let config_text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("role/account-a-s3-role", &format!("role/{ROLE}"));
    std::fs::write(&config, config_text).unwrap();
    let work = tempfile::tempdir().unwrap();

    // Generate; nothing is sent.
    let out = run(putonly(Some(moto.dir.path()))
        .args(["policy", "--json", "--principal", USER_ARN, "--config"])
        .arg(&config))
    .await;
    assert_eq!(out.status.code(), Some(0));
    let docs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<&String> = docs.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "bucket_policy",
            "lifecycle_rule",
            "role_policy",
            "trust_policy"
        ]
    );
    assert!(proxy.records().is_empty(), "policy is offline");
    let documents = work.path().join("documents.json");
    std::fs::write(&documents, &out.stdout).unwrap();

    // Lint passes them, with and without the configuration.
    let mut files = Vec::new();
    for name in ["bucket_policy", "trust_policy", "role_policy"] {
        let f = work.path().join(format!("{name}.json"));
        std::fs::write(&f, serde_json::to_string_pretty(&docs[name]).unwrap()).unwrap();
        files.push(f);
    }
    for with_config in [true, false] {
        let mut cmd = putonly(None);
        cmd.args(["policy", "lint"]);
        if with_config {
            cmd.arg("--config").arg(&config);
        }
        let out = run(cmd.args(&files)).await;
        assert_eq!(out.status.code(), Some(0));
        assert!(out.stdout.is_empty(), "no findings");
    }

    // Applied as they are; pushes into the allowed prefixes succeed.
    apply(&moto, &documents);
    let a = write_file(work.path(), "a.txt", 100, 1);
    for prefix in ["foo/", "fighters/deep/"] {
        let out = run(putonly(Some(moto.dir.path()))
            .args(["push", "--prefix", prefix, "--config"])
            .arg(&config)
            .arg("a.txt")
            .current_dir(work.path()))
        .await;
        assert_eq!(out.status.code(), Some(0), "push into {prefix}");
        assert!(get(&moto.admin(), BUCKET, &format!("{prefix}a.txt")).await == a);
    }
    proxy.assert_only_writes();

    // With the guard out of the way, the server itself refuses the rest.
    assert_eq!(
        put_as_role(&moto.url, moto.dir.path(), "foo/control.txt").await,
        Ok(())
    );
    for key in ["bar/x.txt", "foox.txt", "fighters", "x.txt"] {
        assert_eq!(
            put_as_role(&moto.url, moto.dir.path(), key).await,
            Err("AccessDenied".to_string()),
            "{key} must be denied by the server"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lint_reports_each_mistake_of_the_seed_documents() {
    let seed = repo().join("tests/fixtures/seed");
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[role]\narn = \"arn:aws:iam::123456789012:role/account-a-s3-role\"\n\
         [bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n",
    )
    .unwrap();
    let out = run(putonly(None)
        .args(["policy", "lint", "--config"])
        .arg(config.path())
        .arg(seed.join("bucket-policy.json"))
        .arg(seed.join("trust-policy.json"))
        .arg(seed.join("role-policy.json"))
        .arg(seed.join("trust-policy.fixed-json.json")))
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "trust-policy.json:2:29: not valid JSON",
        "bucket-policy.json:Statement[0].Principal.AWS: account id \"8675309\"",
        "bucket-policy.json:Statement[0].Resource[0]: \"arn:aws:s3:::account-b-bucket/foo*\" exceeds",
        "bucket-policy.json:Statement[0].Resource[1]: \"arn:aws:s3:::account-b-bucket/fighters*\" exceeds",
        "grants \"foo*\" but the role policy",
        "bucket-policy.json:Statement[0].Action[1]: s3:PutObjectAcl is not needed",
        "role-policy.json:Statement[0].Action[1]: s3:PutObjectAcl is not needed",
        "trust-policy.fixed-json.json:Statement[0].Principal.Service: service principal \"s3.amazonaws.com\"",
        "trust-policy.fixed-json.json:Statement[0].Principal.AWS: account id \"8675309\"",
    ] {
        assert!(stdout.contains(needle), "{needle}\n{stdout}");
    }
}
