//! `putonly push` against Garage with a write-only key (no role), checksums
//! on. Runs whenever the Garage binary is installed (scripts/install-garage.sh;
//! .ci/run installs it); otherwise it says so and passes.

use crate::support::garage::{BUCKET, Garage, binary};
use crate::support::proxy::Proxy;
use crate::support::{get, putonly, run, stored_checksum, write_file};
use putonly::checksum::Crc;
use putonly::config::ChecksumKind;

const MIB: usize = 1024 * 1024;

/// Without Garage these tests pass with a note, unless the runner said they
/// must run (scripts/test.sh sets PUTONLY_REQUIRE_GARAGE=1).
pub(crate) fn skip_or_fail() {
    assert!(
        std::env::var_os("PUTONLY_REQUIRE_GARAGE").is_none(),
        "PUTONLY_REQUIRE_GARAGE is set but there is no garage binary: run scripts/install-garage.sh"
    );
    eprintln!("SKIPPED: no garage binary; run scripts/install-garage.sh");
}

#[tokio::test(flavor = "multi_thread")]
async fn push_to_garage_with_a_write_only_key() {
    let Some(bin) = binary() else {
        skip_or_fail();
        return;
    };
    let garage = Garage::start(&bin);
    let proxy = Proxy::start(&garage.url).await;
    let creds = garage.creds_dir();
    let work = tempfile::tempdir().unwrap();
    let files = [
        ("zero.bin", write_file(work.path(), "zero.bin", 0, 21)),
        ("one-k.bin", write_file(work.path(), "one-k.bin", 1024, 22)),
        ("big.bin", write_file(work.path(), "big.bin", 64 * MIB, 23)),
    ];
    for checksum in ["crc64nvme", "crc32c", "crc32"] {
        let config = work.path().join(format!("{checksum}.toml"));
        std::fs::write(
            &config,
            format!(
                "[aws]\nregion = \"us-east-1\"\nprofile = \"garage\"\nendpoint_url = \"{}\"\n\
                 [bucket]\nname = \"{BUCKET}\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n\
                 [upload]\nchecksum = \"{checksum}\"\n",
                proxy.url
            ),
        )
        .unwrap();
        for prefix in ["foo/", "fighters/"] {
            let out = run(putonly(Some(&creds))
                .args(["push", "--config"])
                .arg(&config)
                .args(["--prefix", &format!("{prefix}{checksum}/")])
                .args(["zero.bin", "one-k.bin", "big.bin"])
                .current_dir(work.path()))
            .await;
            assert_eq!(out.status.code(), Some(0), "{checksum} into {prefix}");
        }
    }
    let reader = garage.reader();
    for (checksum, kind) in [
        ("crc64nvme", ChecksumKind::Crc64Nvme),
        ("crc32c", ChecksumKind::Crc32C),
        ("crc32", ChecksumKind::Crc32),
    ] {
        for prefix in ["foo/", "fighters/"] {
            for (name, data) in &files {
                let key = format!("{prefix}{checksum}/{name}");
                assert!(get(&reader, BUCKET, &key).await == *data, "{key} differs");
                // The server stored the whole file's CRC, single part or multipart.
                assert_eq!(
                    stored_checksum(&reader, BUCKET, &key, checksum).await,
                    Some(Crc::of(kind, data).to_base64()),
                    "{key}: stored checksum"
                );
            }
        }
    }
    proxy.assert_only_writes();
    assert_eq!(proxy.count("CompleteMultipartUpload"), 6);
    assert!(proxy.s3_records().iter().all(|r| r.status == 200));

    // The key putonly used really is write-only: Garage refuses it a read.
    let writer = crate::support::reader(
        &garage.url,
        "us-east-1",
        &garage.writer_key.0,
        &garage.writer_key.1,
    );
    let err = writer
        .get_object()
        .bucket(BUCKET)
        .key("foo/crc32/one-k.bin")
        .send()
        .await
        .expect_err("the write-only key must not read");
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(403));
}

#[tokio::test(flavor = "multi_thread")]
async fn garage_detects_a_part_whose_checksum_does_not_match() {
    let Some(bin) = binary() else {
        skip_or_fail();
        return;
    };
    // Evidence that the server really verifies what putonly sends: a part
    // whose bytes do not match its declared CRC is refused.
    let garage = Garage::start(&bin);
    let client = crate::support::reader(
        &garage.url,
        "us-east-1",
        &garage.writer_key.0,
        &garage.writer_key.1,
    );
    let wrong = Crc::of(ChecksumKind::Crc64Nvme, b"other bytes");
    let err = client
        .put_object()
        .bucket(BUCKET)
        .key("foo/corrupt.bin")
        .body(aws_sdk_s3::primitives::ByteStream::from_static(
            b"the bytes",
        ))
        .checksum_crc64_nvme(wrong.to_base64())
        .customize()
        .disable_payload_signing()
        .send()
        .await
        .expect_err("a wrong checksum must be refused");
    let status = err.raw_response().map(|r| r.status().as_u16());
    assert_eq!(status, Some(400), "{err:?}");
}
