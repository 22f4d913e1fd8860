//! The shapes putonly is deployed in, reproduced from a root test process:
//! as root; as an unprivileged user with and without `CAP_LEASE` (the
//! systemd unit's `User=putonly`, `NoNewPrivileges=yes`,
//! `CapabilityBoundingSet=CAP_LEASE`, `AmbientCapabilities=CAP_LEASE`); in
//! its own PID namespace (a container). Producers are another unprivileged
//! user in the host namespace, running a small writer script.
//!
//! Test users are made once with `useradd --system`. Everything the agent
//! user must reach (the binary, its configuration and credentials, its state
//! folder) is copied or made where that user can reach it: a binary under
//! root's home would not be.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The user the agent runs as in the unprivileged shapes.
pub const AGENT_USER: &str = "putonly-e2e-agent";
/// The producer writing into the watched folders, in every shape.
pub const WRITER_USER: &str = "putonly-e2e-writer";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Root in the host namespaces.
    Root,
    /// An unprivileged user, with or without `CAP_LEASE` (ambient).
    User { lease: bool },
    /// Root in its own PID namespace (`unshare --pid --mount-proc`).
    PidNamespace,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Root => "root",
            Shape::User { lease: true } => "user with CAP_LEASE",
            Shape::User { lease: false } => "user without CAP_LEASE",
            Shape::PidNamespace => "own PID namespace",
        }
    }

    /// Whether the agent can lease files another user writes.
    pub fn has_lease(self) -> bool {
        !matches!(self, Shape::User { lease: false })
    }
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Why the shapes cannot run here, if they cannot: only when the test
/// process is not root. As root (CI) a missing tool fails the test rather
/// than skip it silently.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("the test process is not root (CI runs as root)".into());
    }
    for tool in ["setpriv", "unshare", "useradd"] {
        assert!(
            which(tool).is_some(),
            "{tool} is not installed (util-linux / passwd); the deployed shapes need it"
        );
    }
    assert!(
        python().is_some(),
        "no system python3 (/usr/bin/python3) the writer user can run"
    );
    None
}

fn which(tool: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

/// A python3 every user can run (not one under root's home).
pub fn python() -> Option<PathBuf> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// (uid, gid) of a system user made for the tests, created once.
pub fn user(name: &'static str) -> (u32, u32) {
    static USERS: std::sync::Mutex<Vec<(&str, u32, u32)>> = std::sync::Mutex::new(Vec::new());
    let mut users = USERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&(_, uid, gid)) = users.iter().find(|u| u.0 == name) {
        return (uid, gid);
    }
    let id = |flag: &str| -> Option<u32> {
        let out = std::process::Command::new("id")
            .args([flag, name])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        // Several test processes may race; useradd then fails on the lock
        // or on the name, and the user exists afterwards either way.
        for _ in 0..20 {
            let _ = std::process::Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    name,
                ])
                .status();
            if id("-u").is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    let (uid, gid) = (
        id("-u").unwrap_or_else(|| panic!("cannot create user {name}")),
        id("-g").unwrap_or_else(|| panic!("no group for {name}")),
    );
    users.push((name, uid, gid));
    (uid, gid)
}

/// The putonly binary, copied where every user can run it.
pub fn shared_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Copies left by earlier test processes that are gone.
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("putonly-e2e-bin-")
                    && !Path::new("/proc").join(pid).exists()
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("putonly-e2e-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("putonly");
        std::fs::copy(env!("CARGO_BIN_EXE_putonly"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    })
    .clone()
}

pub fn chown(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// `cmd` (a `putonly` command from [`super::putonly`]) turned into one that
/// runs the same binary, arguments and environment in `shape`.
pub fn in_shape(cmd: tokio::process::Command, shape: Shape) -> tokio::process::Command {
    let std_cmd = cmd.as_std();
    let (program, prefix): (PathBuf, Vec<String>) = match shape {
        Shape::Root => return cmd,
        Shape::User { lease } => {
            let (uid, gid) = user(AGENT_USER);
            // As the systemd unit runs it: no new privileges, and nothing
            // in the bounding set but CAP_LEASE (or nothing at all).
            let mut args = vec![
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--no-new-privs".into(),
            ];
            if lease {
                args.push("--bounding-set=-all,+lease".into());
                args.push("--inh-caps=+lease".into());
                args.push("--ambient-caps=+lease".into());
            } else {
                args.push("--bounding-set=-all".into());
            }
            args.push("--".into());
            args.push(shared_binary().display().to_string());
            (which("setpriv").expect("setpriv"), args)
        }
        Shape::PidNamespace => (
            which("unshare").expect("unshare"),
            vec![
                "--pid".into(),
                "--fork".into(),
                "--kill-child".into(),
                "--mount-proc".into(),
                "--".into(),
                shared_binary().display().to_string(),
            ],
        ),
    };
    let mut out = tokio::process::Command::new(program);
    out.args(prefix);
    out.args(std_cmd.get_args());
    out.env_clear();
    for (k, v) in std_cmd.get_envs() {
        if let Some(v) = v {
            out.env(k, v);
        }
    }
    for key in ["PATH", "LANG", "TMPDIR"] {
        if let Some(v) = std::env::var_os(key).filter(|_| std_cmd.get_envs().all(|(k, _)| k != key))
        {
            out.env(key, v);
        }
    }
    out.kill_on_drop(true);
    out
}

/// The pid of the agent itself: for `unshare --fork` its child.
pub async fn agent_pid(launcher: u32, shape: Shape) -> i32 {
    if shape != Shape::PidNamespace {
        return launcher as i32;
    }
    let children = format!("/proc/{launcher}/task/{launcher}/children");
    for _ in 0..100 {
        if let Some(pid) = std::fs::read_to_string(&children)
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        {
            return pid;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("unshare started no agent");
}

/// The producer: a python script run as [`WRITER_USER`] that performs
/// `ops` on `path` in order and prints a line for each `mark:NAME`.
///
/// Ops: `open:trunc` (O_CREAT|O_TRUNC), `open:append`, `write:SRC` (the
/// bytes of file SRC), `sleep:SECONDS`, `close`, `utime:NANOSECONDS`
/// (mtime and atime), `mark:NAME`. The time `open` took is printed as
/// `opened SECONDS`.
pub fn writer(path: &Path, ops: &[String]) -> tokio::process::Command {
    const SCRIPT: &str = r#"
import os, sys, time
path, ops = sys.argv[1], sys.argv[2:]
fd = None
for op in ops:
    name, _, arg = op.partition(":")
    if name == "open":
        flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if arg == "trunc" else os.O_APPEND)
        t = time.monotonic()
        fd = os.open(path, flags, 0o644)
        print("opened %.3f" % (time.monotonic() - t), flush=True)
    elif name == "write":
        data = open(arg, "rb").read()
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    elif name == "sleep":
        time.sleep(float(arg))
    elif name == "close":
        os.close(fd)
        fd = None
    elif name == "utime":
        os.utime(path, ns=(int(arg), int(arg)))
    elif name == "mark":
        print(arg, flush=True)
"#;
    let (uid, gid) = user(WRITER_USER);
    let mut cmd = tokio::process::Command::new(which("setpriv").expect("setpriv"));
    cmd.args([
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
        "--".into(),
    ])
    .arg(python().expect("python3"))
    .args(["-c", SCRIPT])
    .arg(path)
    .args(ops)
    .stdout(std::process::Stdio::piped())
    .kill_on_drop(true);
    cmd
}

/// The agent's own folder under `work`: its configuration (`body`, made
/// into a full one for `moto` through `endpoint`), a copy of the moto
/// credentials, all owned by the agent's user in the unprivileged shapes,
/// mode 0700. Returns the folder and the configuration file.
pub fn agent_folder(
    moto: &super::moto::Moto,
    endpoint: &str,
    work: &Path,
    body: &str,
    shape: Shape,
) -> (PathBuf, PathBuf) {
    let dir = work.join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(moto.config(endpoint, body)).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(&config, text).unwrap();
    for f in ["credentials", "config"] {
        std::fs::copy(moto.dir.path().join(f), dir.join(f)).unwrap();
    }
    if let Shape::User { .. } = shape {
        let agent = user(AGENT_USER);
        for p in ["", "agent.toml", "credentials", "config"] {
            chown(&dir.join(p), agent);
        }
    }
    chmod(&dir, 0o700);
    (dir, config)
}
