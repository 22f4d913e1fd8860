//! `putonly check` against moto with the seed's policies, through the
//! recording proxy: what it reports, what it sends (STS only, plus one
//! PutObject per prefix with --probe-write; nothing with --offline).

use crate::support::moto::Moto;
use crate::support::proxy::Proxy;
use crate::support::{putonly, run};

async fn check(moto: &Moto, config: &std::path::Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = run(putonly(Some(moto.dir.path()))
        .arg("check")
        .args(extra)
        .arg("--config")
        .arg(config))
    .await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_identity_role_folders_and_probes_only_when_asked() {
    let moto = Moto::start();
    let proxy = Proxy::start(&moto.url).await;
    let work = tempfile::tempdir().unwrap();
    let outbox = work.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let agent_part = format!(
        "[state]\ndir = \"{}\"\n[[watch]]\npath = \"{}\"\nprefix = \"foo/in\"\n",
        work.path().join("state").display(),
        outbox.display()
    );
    let config = moto.config(
        &proxy.url,
        &format!(
            "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n{agent_part}"
        ),
    );

    // Offline: configuration and folders, nothing sent.
    let (code, out) = check(&moto, &config, &["--offline"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("[ ok ] state.dir"), "{out}");
    assert!(proxy.records().is_empty(), "--offline sends nothing");

    // Online, no probe: STS only.
    let (code, out) = check(&moto, &config, &[]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("base identity: arn:aws:iam::123456789012:user/bobbytables"),
        "{out}"
    );
    assert!(
        out.contains("assumed as arn:aws:sts::123456789012:assumed-role/account-a-s3-role/"),
        "{out}"
    );
    assert!(out.contains("credentials expire at"), "{out}");
    assert_eq!(
        proxy.s3_records().len(),
        0,
        "no S3 request without --probe-write"
    );
    assert_eq!(proxy.count("GetCallerIdentity"), 1);

    // The probe writes one object per allowed prefix, nothing else.
    let (code, out) = check(&moto, &config, &["--probe-write"]).await;
    assert_eq!(code, Some(0), "{out}");
    let puts: Vec<String> = proxy
        .s3_records()
        .into_iter()
        .filter(|r| r.op == "PutObject" && r.status == 200)
        .filter_map(|r| r.key)
        .collect();
    assert_eq!(puts.len(), 2, "{puts:?}");
    assert!(
        puts[0].starts_with("foo/putonly-check/") && puts[1].starts_with("fighters/putonly-check/")
    );
    proxy.assert_only_writes();

    // A prefix the policies do not grant: the failing prefix, and why.
    let wider = moto.config(
        &proxy.url,
        &format!(
            "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\", \"bar/\"]\n{agent_part}"
        ),
    );
    let (code, out) = check(&moto, &wider, &["--probe-write"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("[ ok ] write into foo/"), "{out}");
    assert!(out.contains("[FAIL] write into bar/"), "{out}");
    assert!(
        out.contains("the role policy in account A does not allow s3:PutObject on arn:aws:s3:::account-b-bucket/bar/*"),
        "{out}"
    );

    // A missing folder and a role that cannot be assumed.
    std::fs::remove_dir(&outbox).unwrap();
    let broken = moto.config(
        &proxy.url,
        &format!(
            "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n{agent_part}"
        ),
    );
    let text = std::fs::read_to_string(&broken)
        .unwrap()
        .replace("role/account-a-s3-role", "role/no-such-role");
    std::fs::write(&broken, text).unwrap();
    let (code, out) = check(&moto, &broken, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("[FAIL] watch[0].path"), "{out}");
    assert!(out.contains("[FAIL] role: STS refused"), "{out}");
    proxy.assert_only_writes();
}
