//! moto server with IAM authorization on and the seed's scenario in place.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::{free_port, repo, tool_path, wait_for_port};

pub struct Moto {
    pub url: String,
    /// Holds `credentials`, `config` (profiles s3-test and admin), `scenario.json`.
    pub dir: tempfile::TempDir,
    pub admin_key: (String, String),
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pinned moto_server, installed by the project's script if missing.
fn moto_server() -> PathBuf {
    let path = tool_path("PUTONLY_MOTO_SERVER");
    if !path.exists() {
        let status = Command::new(repo().join("scripts/install-moto.sh"))
            .status()
            .expect("run scripts/install-moto.sh");
        assert!(status.success(), "scripts/install-moto.sh failed");
    }
    path
}

impl Moto {
    /// Starts a fresh moto on a free port, seeds the scenario, turns auth on.
    pub fn start() -> Moto {
        let server = moto_server();
        let port = free_port();
        let child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        wait_for_port(port, "moto_server");
        let url = format!("http://127.0.0.1:{port}");
        let dir = tempfile::tempdir().unwrap();
        let python = server.parent().unwrap().join("python");
        let status = Command::new(python)
            .arg(repo().join("scripts/seed_scenario.py"))
            .arg(&url)
            .arg(dir.path())
            .status()
            .expect("run seed_scenario.py");
        assert!(status.success(), "seed_scenario.py failed");
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
            url,
            dir,
            admin_key,
            child,
        }
    }

    /// A client with the admin identity, straight to moto (not through a proxy).
    pub fn admin(&self) -> aws_sdk_s3::Client {
        super::reader(&self.url, "us-east-1", &self.admin_key.0, &self.admin_key.1)
    }

    /// A putonly configuration for the seed's role, through `endpoint`.
    pub fn config(&self, endpoint: &str, extra: &str) -> PathBuf {
        let text = format!(
            "[aws]\nregion = \"us-east-1\"\nprofile = \"s3-test\"\nendpoint_url = \"{endpoint}\"\n\n\
             [role]\narn = \"arn:aws:iam::123456789012:role/account-a-s3-role\"\n{extra}\n"
        );
        // [bucket] and [upload] come from `extra` when it has them.
        let text = if text.contains("[bucket]") {
            text
        } else {
            format!(
                "{text}\n[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n"
            )
        };
        let path = self.dir.path().join(format!("agent-{}.toml", free_port()));
        std::fs::write(&path, text).unwrap();
        path
    }
}
