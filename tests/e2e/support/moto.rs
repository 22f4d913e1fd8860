//! moto server with IAM authorization on and the seed's scenario in place,
//! started by the project's own script (scripts/moto-up.sh), which installs
//! the pinned moto when it is missing.

use std::path::PathBuf;
use std::process::Command;

use super::{free_port, start_server};

pub struct Moto {
    pub url: String,
    /// Holds `credentials`, `config` (profiles s3-test and admin), `scenario.json`.
    pub dir: tempfile::TempDir,
    pub admin_key: (String, String),
    pid: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

impl Moto {
    /// Starts a fresh moto on a free port, seeds the scenario, turns auth on.
    pub fn start() -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let (env, pid) = start_server("moto-up.sh", dir.path(), &[], "moto");
        let scenario: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("scenario.json")).unwrap(),
        )
        .unwrap();
        let admin_key = (
            scenario["admin"]["access_key_id"]
                .as_str()
                .unwrap()
                .to_string(),
            scenario["admin"]["secret_access_key"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        Moto {
            url: env["MOTO_URL"].clone(),
            dir,
            admin_key,
            pid,
        }
    }

    /// A client with the admin identity, straight to moto (not through a proxy).
    pub fn admin(&self) -> aws_sdk_s3::Client {
        super::reader(&self.url, "us-east-1", &self.admin_key.0, &self.admin_key.1)
    }

    /// The object at `key`, read with the admin identity; `None` when
    /// there is none.
    pub async fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let out = self
            .admin()
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .ok()?;
        Some(out.body.collect().await.ok()?.into_bytes().to_vec())
    }

    /// A putonly configuration for the seed's role, through `endpoint`.
    /// `extra` continues the [role] table and may add [bucket] and [upload];
    /// without a [bucket] table the seed's bucket and prefixes are used.
    pub fn config(&self, endpoint: &str, extra: &str) -> PathBuf {
        let mut text = format!(
            "[aws]\nregion = \"us-east-1\"\nprofile = \"s3-test\"\nendpoint_url = \"{endpoint}\"\n\n\
             [role]\narn = \"arn:aws:iam::123456789012:role/account-a-s3-role\"\n{extra}\n"
        );
        if !text.contains("[bucket]") {
            text.push_str(
                "\n[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n",
            );
        }
        let path = self.dir.path().join(format!("agent-{}.toml", free_port()));
        std::fs::write(&path, text).unwrap();
        path
    }
}
