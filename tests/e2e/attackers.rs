//! Local attackers (docs/SEMANTICS.md, "Local attackers"): a producer who
//! may write into a watched folder, running as another unprivileged user,
//! tries to make the agent read files outside the tree, or write outside
//! `move_to`, with symbolic links and hard links. The agent runs as root,
//! as an unprivileged user (the systemd unit's shape) and in its own PID
//! namespace (a container's).
//!
//! The attacker swaps a folder for a link to a folder of secrets (the
//! names inside match the files it wrote), swaps files for links to
//! secrets, plants links in `move_to` where the agent will move files, all
//! in a loop of at least 1,000 swaps with varied pauses (so swaps land
//! between a scan and an upload, and during a backlog: the agent is frozen
//! for a while in the middle), and before the agent starts. Secrets have a
//! size no file the attacker writes has: no write on the wire may announce
//! it, and every secret, and the folders the planted links point to, must
//! be unchanged at the end. Every file the attacker wrote must still reach
//! the bucket.
//!
//! Where the test process is not root these tests are skipped with a
//! message; CI runs as root.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::{Agent, BUCKET};
use crate::support::moto::Moto;
use crate::support::proxy::Proxy;
use crate::support::putonly;
use crate::support::shape::{self, AGENT_USER, Shape, WRITER_USER};

/// No file the attacker writes is this long.
const SECRET_LEN: usize = 4099;

/// What the agent does after an upload in a run.
#[derive(Clone, Copy, Debug)]
enum After {
    Delete,
    /// `move` into a folder on the same filesystem as the watch.
    MoveSameFs,
    /// `move` into a tmpfs: every move is a copy.
    MoveAcross,
}

struct Lab {
    shape: Shape,
    _moto: Moto,
    proxy: Proxy,
    _work: tempfile::TempDir,
    out: PathBuf,
    sent: PathBuf,
    secret: PathBuf,
    config: PathBuf,
    creds: PathBuf,
    log: PathBuf,
    _unmount: Option<Unmount>,
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A snapshot of a folder of secrets: name → (content, mtime).
type Snapshot = BTreeMap<String, (Vec<u8>, i64)>;

fn snapshot(dir: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(dir).follow_links(false) {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
        let content = if m.is_file() {
            std::fs::read(e.path()).unwrap()
        } else {
            Vec::new()
        };
        out.insert(rel, (content, m.mtime_nsec() + m.mtime() * 1_000_000_000));
    }
    out
}

impl Lab {
    async fn new(shape: Shape, after: After, secrets: usize) -> Lab {
        let moto = Moto::start();
        let proxy = Proxy::start(&moto.url).await;
        let work = tempfile::tempdir().unwrap();
        shape::chmod(work.path(), 0o755);
        let writer = shape::user(WRITER_USER);
        let agent_id = match shape {
            Shape::User { .. } => shape::user(AGENT_USER),
            _ => (0, 0),
        };
        let out = work.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        shape::chown(&out, writer);
        shape::chmod(&out, 0o777);
        // The secrets: readable by the agent's user only.
        let secret = work.path().join("secret");
        std::fs::create_dir_all(secret.join("dir")).unwrap();
        for i in 0..secrets {
            std::fs::write(secret.join(format!("f{i}.txt")), vec![b'S'; SECRET_LEN]).unwrap();
        }
        std::fs::write(secret.join("target.txt"), vec![b'T'; SECRET_LEN]).unwrap();
        for e in walkdir::WalkDir::new(&secret) {
            let e = e.unwrap();
            shape::chown(e.path(), agent_id);
            shape::chmod(e.path(), if e.file_type().is_dir() { 0o700 } else { 0o600 });
        }
        // move_to: the agent's, and (wrongly, as the attack needs) open
        // to the attacker too; sticky, as /tmp is.
        let sent = work.path().join("sent");
        std::fs::create_dir_all(&sent).unwrap();
        let unmount = match after {
            After::MoveAcross => {
                let ok = std::process::Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=64m", "putonly-test"])
                    .arg(&sent)
                    .status()
                    .unwrap();
                assert!(ok.success(), "mount tmpfs on {}", sent.display());
                Some(Unmount(sent.clone()))
            }
            _ => None,
        };
        shape::chown(&sent, agent_id);
        shape::chmod(&sent, 0o1777);
        let action = match after {
            After::Delete => "after_upload = \"delete\"\n".to_string(),
            _ => format!(
                "after_upload = \"move\"\nmove_to = \"{}\"\n",
                sent.display()
            ),
        };
        let state = work.path().join("agent").join("state");
        let (agent_dir, config) = shape::agent_folder(
            &moto,
            &proxy.url,
            work.path(),
            &format!(
                "[bucket]\nname = \"{BUCKET}\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n\
                 [state]\ndir = \"{state}\"\n\
                 [[watch]]\npath = \"{out}\"\nprefix = \"fighters/in/\"\nsettle = \"200ms\"\n{action}\
                 [agent]\nrescan_interval = \"3s\"\nshutdown_timeout = \"10s\"\n\
                 [upload]\nconcurrency = 4\n",
                state = state.display(),
                out = out.display(),
            ),
            shape,
        );
        let log = work.path().join("agent.log");
        Lab {
            shape,
            _moto: moto,
            proxy,
            out,
            sent,
            secret,
            config,
            creds: agent_dir,
            log,
            _work: work,
            _unmount: unmount,
        }
    }

    async fn start_agent(&self) -> Agent {
        let mut cmd = putonly(Some(&self.creds));
        cmd.env("HOME", &self.creds);
        Agent::spawn_in(cmd, self.shape, &self.config, &self.log).await
    }

    async fn status(&self) -> serde_json::Value {
        let out = putonly(Some(&self.creds))
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()
            .await
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs a shell script as the attacker, in the watched folder.
    fn attacker(&self, script: &str, args: &[String]) -> tokio::process::Command {
        let (uid, gid) = shape::user(WRITER_USER);
        let mut cmd = tokio::process::Command::new("setpriv");
        cmd.args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
            "--".into(),
            "bash".into(),
            "-c".into(),
            script.into(),
            "attacker".into(),
        ])
        .args(args)
        .current_dir(&self.out)
        .kill_on_drop(true);
        cmd
    }
}

/// The swap loop: `$1` swaps, secrets in `$2`, move_to `$3`. Each round
/// writes a folder `d` with a file and a plain file `g`, then swaps `d`
/// for a link to the secrets (whose names match) and `g` for a link to a
/// secret, pausing now and then for about the settle time, and plants
/// links in move_to where files will go.
const SWAPS: &str = r#"
set -u
n=$1 secret=$2 sent=$3
ln -s "$secret/target.txt" "$sent/x.txt" 2>/dev/null
ln -s "$secret/dir" "$sent/d" 2>/dev/null
for i in $(seq 0 $((n - 1))); do
  mkdir d
  printf 'inside-%06d' "$i" > "d/f$i.txt"
  printf 'plain-%06d' "$i" > "g$i.txt"
  if [ $((i % 10)) -eq 0 ]; then printf 'x-%06d' "$i" > x.txt; fi
  case $((i % 8)) in
    1) sleep 0.2 ;;
    3) sleep 0.0$((RANDOM % 10)) ;;
    5) sleep 0.1 ;;
  esac
  mv d "old$i"
  ln -s "$secret" d
  # (the agent may have sent and removed g already: then mv fails)
  mv "g$i.txt" "h$i.txt" 2>/dev/null
  ln -s "$secret/f$i.txt" "g$i.txt"
  # links planted where the moved files will go
  ln -s "$secret/target.txt" "$sent/h$i.txt" 2>/dev/null
  [ $((i % 4)) -eq 2 ] && sleep 0.0$((RANDOM % 5))
  rm d
done
echo swapped "$n"
"#;

async fn swap_attack(shape: Shape, after: After, swaps: usize) {
    if let Some(why) = shape::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(shape, after, swaps).await;
    let before = snapshot(&lab.secret);

    // Before the agent starts: a folder link, and a folder swapped for one.
    let pre = r#"
mkdir pre; printf 'pre-file' > pre/f0.txt; mv pre pre.old; ln -s "$1" pre
ln -s "$1" atstart
ln -s "$1/f1.txt" filelink
# A hard link to a file the attacker cannot read: refused by the kernel
# where fs.protected_hardlinks = 1.
if ln "$1/f2.txt" hard 2>/dev/null; then echo HARDLINK; fi
true
"#;
    let out = lab
        .attacker(pre, &[lab.secret.display().to_string()])
        .output()
        .await
        .unwrap();
    let made_hardlink = String::from_utf8_lossy(&out.stdout).contains("HARDLINK");
    if crate::support::shape::is_root()
        && std::fs::read_to_string("/proc/sys/fs/protected_hardlinks")
            .is_ok_and(|v| v.trim() == "1")
    {
        assert!(
            !made_hardlink,
            "fs.protected_hardlinks = 1 let the attacker link a secret"
        );
    }

    let mut agent = lab.start_agent().await;
    let started = Instant::now();
    let mut attack = lab
        .attacker(
            SWAPS,
            &[
                swaps.to_string(),
                lab.secret.display().to_string(),
                lab.sent.display().to_string(),
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A backlog in the middle: the agent frozen while the swaps go on.
    tokio::time::sleep(Duration::from_secs(8)).await;
    agent.freeze(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    agent.freeze(false);
    let status = tokio::time::timeout(Duration::from_secs(600), attack.wait())
        .await
        .expect("the swaps end")
        .unwrap();
    assert!(status.success(), "the attacker's script failed");
    let attack_secs = started.elapsed().as_secs_f64();

    // Every file the attacker wrote reaches the bucket: wait for the
    // journal to have nothing pending, stable across two rescans.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut quiet_since: Option<Instant> = None;
    loop {
        let st = lab.status().await;
        let idle = st["pending"].as_u64() == Some(0);
        match (idle, quiet_since) {
            (true, Some(t)) if t.elapsed() > Duration::from_secs(8) => break,
            (true, None) => quiet_since = Some(Instant::now()),
            (false, _) => quiet_since = None,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "still pending: {st}\n{}",
            lab.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(agent.alive(), "the agent died:\n{}", lab.log_tail());
    assert_eq!(agent.stop().await, Some(0));

    // No byte of a secret on the wire: no write announced its size, and
    // every write is of a file the attacker wrote (all under 64 bytes).
    let records = lab.proxy.records();
    let writes: Vec<_> = records
        .iter()
        .filter(|r| r.op == "PutObject" || r.op == "CreateMultipartUpload")
        .collect();
    let big: Vec<String> = writes
        .iter()
        .filter(|r| r.op != "PutObject" || r.size.is_none_or(|s| s >= 64))
        .map(|r| format!("{} {:?} {:?}", r.op, r.key, r.size))
        .collect();
    assert!(
        big.is_empty(),
        "writes of something the attacker did not write: {big:?}"
    );
    lab.proxy.assert_only_writes();

    // Every file the attacker wrote was sent (under the name it had when
    // the agent took it).
    let sent_names: std::collections::HashSet<String> = writes
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.key.as_deref())
        .filter_map(|k| k.rsplit('/').next().map(str::to_string))
        .collect();
    // A plain file may be sent (and deleted or moved) before the attacker
    // renames it from g to h: then it was sent as g.
    let missing: Vec<String> = (0..swaps)
        .flat_map(|i| {
            [
                (format!("f{i}.txt"), None),
                (format!("h{i}.txt"), Some(format!("g{i}.txt"))),
            ]
        })
        .filter(|(n, or)| {
            !sent_names.contains(n) && !or.as_ref().is_some_and(|o| sent_names.contains(o))
        })
        .map(|(n, _)| n)
        .collect();
    assert!(
        missing.is_empty(),
        "{} file(s) the attacker wrote never reached the bucket, e.g. {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        lab.log_tail()
    );
    assert!(sent_names.contains("f0.txt"));

    // Nothing outside the tree or move_to created or changed: the secrets
    // (the targets of every planted link) are as they were.
    assert_eq!(snapshot(&lab.secret), before, "the secrets changed");
    // The planted links in move_to are still links: nothing was written
    // through them or put in their place.
    for planted in ["x.txt", "d", "h0.txt"] {
        let m = std::fs::symlink_metadata(lab.sent.join(planted));
        if let Ok(m) = m {
            assert!(
                m.file_type().is_symlink(),
                "sent/{planted} is no longer a link"
            );
        }
    }
    let links_skipped = std::fs::read_to_string(&lab.log)
        .unwrap_or_default()
        .matches("symbolic link")
        .count();
    eprintln!(
        "[{}, {after:?}] {swaps} swaps in {attack_secs:.1} s; {} writes on the wire, none of a secret; {links_skipped} log lines about links; hard link of an unreadable file made: {made_hardlink}",
        lab.shape.name(),
        writes.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn swapped_folders_and_planted_links_gain_nothing_as_root_with_delete() {
    swap_attack(Shape::Root, After::Delete, 1000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn swapped_folders_and_planted_links_gain_nothing_in_a_pid_namespace_moving_on_one_filesystem()
 {
    swap_attack(Shape::PidNamespace, After::MoveSameFs, 300).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn swapped_folders_and_planted_links_gain_nothing_as_a_user_moving_across_filesystems() {
    swap_attack(Shape::User { lease: true }, After::MoveAcross, 1000).await;
}

/// Swaps of new folders for links to the watched folder itself and to one
/// of its subfolders (a watch added through such a link, then dropped,
/// would have dropped the watched folder's own), folders made in the middle
/// of a burst that fills the event queue while the agent is frozen: with
/// rescans an hour apart, files made afterwards at the top and in the
/// subfolder, and every file of the burst, must still arrive.
#[tokio::test(flavor = "multi_thread")]
async fn a_producer_cannot_blind_the_watch() {
    if let Some(why) = shape::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(Shape::Root, After::Delete, 0).await;
    let text = std::fs::read_to_string(&lab.config).unwrap();
    std::fs::write(
        &lab.config,
        text.replace("rescan_interval = \"3s\"", "rescan_interval = \"1h\""),
    )
    .unwrap();
    let sub = lab.out.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    shape::chown(&sub, shape::user(WRITER_USER));
    let mut agent = lab.start_agent().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // While the agent is frozen (busy, for all it matters), new folders
    // become links: when it hears of each folder, the link is there.
    let swaps = r#"
mkdir d; rmdir d; ln -s "$PWD" d
mkdir e; rmdir e; ln -s "$PWD/sub" e
for i in $(seq 1 100); do mkdir "f$i"; rmdir "f$i"; ln -s . "f$i"; done
"#;
    agent.freeze(true);
    let out = lab.attacker(swaps, &[]).output().await.unwrap();
    agent.freeze(false);
    assert!(out.status.success());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = lab
        .attacker("rm d e f*; echo gone", &[])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    // A burst, folders made in its middle, the agent frozen meanwhile.
    let burst = r#"
mkdir burst
for i in $(seq 0 2999); do
  printf 'b%05d' "$i" > "burst/b$i.txt"
  if [ $((i % 100)) -eq 0 ]; then mkdir "burst/d$i"; printf 'in' > "burst/d$i/x.txt"; fi
done
"#;
    agent.freeze(true);
    let out = lab.attacker(burst, &[]).output().await.unwrap();
    agent.freeze(false);
    assert!(out.status.success());
    std::fs::write(lab.out.join("top.txt"), b"top").unwrap();
    std::fs::write(sub.join("s.txt"), b"sub").unwrap();
    let want = 3000 + 30 + 2;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let st = lab.status().await;
        if st["done"].as_u64() == Some(want) && st["pending"].as_u64() == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all arrived through events (rescans are an hour apart): {st}\n{}",
            lab.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(agent.alive());
    assert_eq!(agent.stop().await, Some(0));
    let log = std::fs::read_to_string(&lab.log).unwrap_or_default();
    let overflowed = log.contains("queue overflow");
    eprintln!("{want} files arrived; event queue overflowed: {overflowed}");
}
