//! A single-node Garage: the second, real object store, started by the
//! project's own script (scripts/garage-up.sh). The key putonly uses may only
//! write (reads answer 403), so Garage checks "never reads" on its own; a
//! second key with read access reads objects back for the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{start_server, tool_path};

pub struct Garage {
    pub url: String,
    pub writer_key: (String, String),
    pub reader_key: (String, String),
    /// Holds `credentials` and `config` with the profiles garage (write-only) and reader.
    pub dir: tempfile::TempDir,
    pid: String,
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

pub const BUCKET: &str = "account-b-bucket";

/// The cached Garage binary, if the project's script installed it.
pub fn binary() -> Option<PathBuf> {
    Some(tool_path("PUTONLY_GARAGE")).filter(|p| p.exists())
}

impl Garage {
    pub fn start(bin: &Path) -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let (env, pid) = start_server(
            "garage-up.sh",
            dir.path(),
            &[("PUTONLY_GARAGE_BIN", bin.as_os_str())],
            "garage",
        );
        Garage {
            url: env["GARAGE_URL"].clone(),
            writer_key: (env["WRITER_KEY_ID"].clone(), env["WRITER_SECRET"].clone()),
            reader_key: (env["READER_KEY_ID"].clone(), env["READER_SECRET"].clone()),
            dir,
            pid,
        }
    }

    /// A client with the read key that also validates returned checksums.
    pub fn reader(&self) -> aws_sdk_s3::Client {
        super::reader_validating(
            &self.url,
            "us-east-1",
            &self.reader_key.0,
            &self.reader_key.1,
        )
    }

    /// The folder with the AWS shared files (profile `garage` is write-only).
    pub fn creds_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}
