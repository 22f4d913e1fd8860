//! A single-node Garage: the second, real object store. The key putonly uses
//! may only write (reads answer 403), so Garage checks "never reads" on its
//! own; a second key with read access reads objects back for the tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{free_port, tool_path, wait_for_port};

pub struct Garage {
    pub url: String,
    pub writer_key: (String, String),
    pub reader_key: (String, String),
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const BUCKET: &str = "account-b-bucket";

/// The cached Garage binary, if the project's script installed it.
pub fn binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PUTONLY_GARAGE") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    Some(tool_path("PUTONLY_GARAGE")).filter(|p| p.exists())
}

fn garage(bin: &Path, config: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .expect("run garage");
    assert!(
        out.status.success(),
        "garage {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn key_of(text: &str) -> (String, String) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name:?} in garage output:\n{text}"))
    };
    (field("Key ID:"), field("Secret key:"))
}

impl Garage {
    pub fn start(bin: &Path) -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let (s3, rpc) = (free_port(), free_port());
        let secret: String = super::bytes(32, 7)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\ncompression_level = \"none\"\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"us-east-1\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start garage");
        wait_for_port(rpc, "garage rpc");
        let node = garage(bin, &config, &["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        garage(
            bin,
            &config,
            &["layout", "assign", "-z", "dc1", "-c", "1G", &node],
        );
        garage(bin, &config, &["layout", "apply", "--version", "1"]);
        garage(bin, &config, &["bucket", "create", BUCKET]);
        let writer_key = key_of(&garage(bin, &config, &["key", "create", "putonly-writer"]));
        garage(
            bin,
            &config,
            &[
                "bucket",
                "allow",
                "--write",
                BUCKET,
                "--key",
                "putonly-writer",
            ],
        );
        let reader_key = key_of(&garage(bin, &config, &["key", "create", "test-reader"]));
        garage(
            bin,
            &config,
            &["bucket", "allow", "--read", BUCKET, "--key", "test-reader"],
        );
        wait_for_port(s3, "garage s3 api");
        Garage {
            url: format!("http://127.0.0.1:{s3}"),
            writer_key,
            reader_key,
            dir,
            child,
        }
    }

    pub fn reader(&self) -> aws_sdk_s3::Client {
        super::reader_validating(
            &self.url,
            "us-east-1",
            &self.reader_key.0,
            &self.reader_key.1,
        )
    }

    /// Shared AWS files with the write-only key as profile `garage`.
    pub fn creds_dir(&self) -> PathBuf {
        let d = self.dir.path().join("aws");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("credentials"),
            format!(
                "[garage]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.writer_key.0, self.writer_key.1
            ),
        )
        .unwrap();
        std::fs::write(d.join("config"), "[profile garage]\nregion = us-east-1\n").unwrap();
        d
    }
}
