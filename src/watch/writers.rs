//! Is anyone still writing this file? Which rule answers that for each
//! watch, and why.
//!
//! The strong rule asks the kernel: a read lease ([`crate::watch::lease`]) is
//! refused while any process, of any user and in any PID namespace, has the
//! file open for writing. It needs `CAP_LEASE` (or the agent's own files),
//! a local filesystem and `fs.leases-enable`. Where no lease can be had the
//! weak rule applies: a file the watcher saw being written is taken only
//! after its writer closed it or it was renamed in, never on quiet time
//! alone; a file found by a scan (history unknown) only after a longer quiet
//! time and a look in `/proc`, which sees only the processes this one may
//! inspect. [`Support`] holds, per watch, which rule runs and why, so the
//! agent logs it at start-up and `putonly check` prints it; a lease refused
//! at run time for a reason other than a writer downgrades the watch. This
//! module never opens a watched file.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// `CAP_LEASE`, bit 28 of the capability sets.
const CAP_LEASE: u32 = 28;

/// The rule a file is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The agent takes a read lease before sending and holds it until done.
    Lease,
    /// No lease: closes, renames and (for scanned files) `/proc`.
    Weak,
}

/// What the watcher knows about a file's writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// Found by a scan, or news was lost: history unknown.
    Unknown,
    /// Seen being written, and no close-after-write since.
    Writing,
    /// Closed after writing, or renamed into the folder, since the last write.
    Closed,
    /// Seen being written, and no close came for a long time: judged as a
    /// file of unknown history, but never deleted or moved after its upload
    /// (its writer may still hold it).
    Unclosed,
}

/// For which files of a watch a lease can be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Every file (`CAP_LEASE` held).
    AnyFile,
    /// Only files owned by this user id (no `CAP_LEASE`).
    OwnFiles { uid: u32 },
    /// None (filesystem, sysctl, or refused at run time).
    NoLease,
}

#[derive(Debug, Clone)]
struct DeviceSupport {
    mode: Mode,
    why: String,
}

/// The rule of every filesystem the watches hold; shared by the watcher and
/// the agent. Each watch's root is probed at start-up; a filesystem mounted
/// below a root (an NFS share in a local folder) is probed the first time
/// one of its files is judged, and judged on its own.
pub struct Support {
    /// The device of each watch root (None: the root could not be read).
    roots: Vec<Option<u64>>,
    devices: Mutex<HashMap<u64, DeviceSupport>>,
    caps: Capabilities,
    /// Every filesystem gets this mode (tests and tools).
    fixed: Option<Mode>,
    /// What the `/proc` check can see, for messages.
    pub proc_view: String,
    /// Whether the `/proc` check sees every process of the host. When it
    /// does not, a file of unknown history judged by the weak rule may
    /// still have a writer it cannot see: it is sent, but never deleted or
    /// moved after its upload.
    pub proc_sees_all: bool,
}

/// How long a scanned file must be quiet under the weak rule: well past
/// `settle`, since `/proc` may not show its writer.
pub fn weak_scan_quiet(settle: Duration) -> Duration {
    settle.saturating_mul(10).max(Duration::from_secs(60))
}

impl Support {
    /// Probes each watched folder (capabilities, filesystem, sysctl).
    pub fn probe(folders: &[&Path]) -> Support {
        let caps = Capabilities::of_self();
        let mut devices = HashMap::new();
        let roots = folders
            .iter()
            .map(|f| {
                let dev = std::fs::metadata(f).ok().map(|m| m.dev());
                if let Some(dev) = dev {
                    let (mode, why) = probe_folder(f, &caps);
                    devices.entry(dev).or_insert(DeviceSupport { mode, why });
                }
                dev
            })
            .collect();
        Support {
            roots,
            devices: Mutex::new(devices),
            proc_view: proc_view(&caps),
            proc_sees_all: proc_sees_all(&caps),
            caps,
            fixed: None,
        }
    }

    /// Every file of every watch judged by `mode` (for tests and tools).
    pub fn with_mode(mode: Mode) -> Support {
        let caps = Capabilities::of_self();
        Support {
            roots: Vec::new(),
            devices: Mutex::new(HashMap::new()),
            proc_view: proc_view(&caps),
            proc_sees_all: proc_sees_all(&caps),
            caps,
            fixed: Some(mode),
        }
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, HashMap<u64, DeviceSupport>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mode of the filesystem `meta` lives on (`path` names the file,
    /// to probe a filesystem seen for the first time).
    fn mode_of(&self, path: &Path, meta: &std::fs::Metadata) -> Mode {
        if let Some(mode) = &self.fixed {
            return mode.clone();
        }
        if let Some(s) = self.devices().get(&meta.dev()) {
            return s.mode.clone();
        }
        // Probed without the lock (a hung network mount must not stall
        // every other judgement), on the file itself as opened, not through
        // its path again: if it is not the file `meta` describes, nothing
        // is learnt and this one file gets the weaker rule.
        let Some((mode, why)) = probe_file(path, meta.dev(), &self.caps) else {
            return Mode::NoLease;
        };
        if mode != Mode::AnyFile {
            tracing::warn!(path = ?path, %why, "a filesystem below a watch gets the weaker finished-file rule");
        }
        self.devices()
            .entry(meta.dev())
            .or_insert(DeviceSupport { mode, why })
            .mode
            .clone()
    }

    /// The rule for one file, from its path and status.
    pub fn rule(&self, path: &Path, meta: &std::fs::Metadata) -> Rule {
        match self.mode_of(path, meta) {
            Mode::AnyFile => Rule::Lease,
            Mode::OwnFiles { uid } if meta.uid() == uid => Rule::Lease,
            _ => Rule::Weak,
        }
    }

    /// The mode of watch `watch`'s folder and why, for logs and `check`.
    pub fn mode(&self, watch: usize) -> (Mode, String) {
        if let Some(mode) = &self.fixed {
            return (mode.clone(), "as configured".into());
        }
        let dev = self.roots.get(watch).copied().flatten();
        dev.and_then(|d| self.devices().get(&d).cloned()).map_or(
            (Mode::NoLease, "the watched folder cannot be read".into()),
            |s| (s.mode, s.why),
        )
    }

    /// A lease on a file of device `dev` was refused for a reason other
    /// than a writer: that filesystem's files are judged by the weaker rule
    /// from now on (only other users' files, if CAP_LEASE turned out not to
    /// be effective). Returns whether anything changed.
    pub fn downgrade(&self, dev: u64, error: &std::io::Error) -> bool {
        if self.fixed.is_some() {
            return false;
        }
        let mut devices = self.devices();
        let Some(s) = devices.get_mut(&dev) else {
            return false;
        };
        let (mode, why) = match (error.raw_os_error(), &s.mode) {
            (_, Mode::NoLease) => return false,
            // Not a property of the filesystem (out of memory, ...).
            (Some(e), _)
                if ![
                    libc::EACCES,
                    libc::EINVAL,
                    libc::ENOLCK,
                    libc::EOPNOTSUPP,
                    libc::ENOSYS,
                ]
                .contains(&e) =>
            {
                return false;
            }
            (Some(libc::EACCES), Mode::AnyFile) => (
                Mode::OwnFiles {
                    uid: self.caps.euid,
                },
                format!("the kernel refused a lease ({error}): CAP_LEASE is not effective"),
            ),
            // Refused on a file of our own: a security module (AppArmor,
            // SELinux) or something else forbids leases altogether.
            (Some(libc::EACCES), Mode::OwnFiles { .. }) => (
                Mode::NoLease,
                format!(
                    "the kernel refused a lease on a file of this user ({error}); a security module may forbid leases"
                ),
            ),
            _ => (
                Mode::NoLease,
                format!(
                    "the kernel refused a lease ({error}): the filesystem does not support leases"
                ),
            ),
        };
        s.mode = mode;
        s.why = why;
        true
    }

    /// One line saying which rule a watch runs under and why.
    pub fn describe(&self, watch: usize, settle: Duration) -> String {
        let (mode, why) = self.mode(watch);
        let weak = format!(
            "files seen being written are taken only after their writer closes them or they are renamed in; \
             files found by a scan after {} quiet and a /proc check, which {}{}",
            humantime::format_duration(weak_scan_quiet(settle)),
            self.proc_view,
            if self.proc_sees_all {
                ""
            } else {
                " (so such a file is sent but never deleted or moved after its upload)"
            }
        );
        match mode {
            Mode::AnyFile => format!(
                "finished = no writer anywhere, asked of the kernel (read lease held while sending; {why})"
            ),
            Mode::OwnFiles { uid } => format!(
                "read lease for files owned by uid {uid} only ({why}); other files: weaker rule: {weak}"
            ),
            Mode::NoLease => format!("weaker rule ({why}): {weak}"),
        }
    }
}

/// The capability sets of this process, from `/proc/self/status`.
struct Capabilities {
    effective: u64,
    euid: u32,
}

impl Capabilities {
    fn of_self() -> Self {
        let euid = rustix::process::geteuid().as_raw();
        let effective = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            // No /proc: assume root has every capability, others none.
            .unwrap_or(if euid == 0 { u64::MAX } else { 0 });
        Capabilities { effective, euid }
    }

    fn has(&self, cap: u32) -> bool {
        self.effective & (1 << cap) != 0
    }
}

/// Filesystems on which leases are missing or do not see every writer.
fn leaseless_filesystem(f_type: i64) -> Option<&'static str> {
    Some(match f_type {
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0xFF53_4D42 => "cifs",
        0xFE53_4D42 => "smb2",
        0x517B => "smb",
        0x794c_7630 => "overlay",
        0x0102_1997 => "9p",
        0x00c3_6400 => "ceph",
        0x5346_414F => "afs",
        0x0BD0_0BD0 => "lustre",
        0x4750_4653 => "gpfs",
        _ => return None,
    })
}

/// Probes the filesystem of the file at `path`, opened without following
/// a final link and checked to be on device `dev`; `None` if it is not.
fn probe_file(path: &Path, dev: u64, caps: &Capabilities) -> Option<(Mode, String)> {
    use rustix::fs::{Mode as FsMode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if st.st_dev != dev {
        return None;
    }
    Some(probe_statfs(rustix::fs::fstatfs(&fd), path, caps))
}

fn probe_folder(folder: &Path, caps: &Capabilities) -> (Mode, String) {
    probe_statfs(rustix::fs::statfs(folder), folder, caps)
}

fn probe_statfs(
    statfs: rustix::io::Result<rustix::fs::StatFs>,
    folder: &Path,
    caps: &Capabilities,
) -> (Mode, String) {
    if std::fs::read_to_string("/proc/sys/fs/leases-enable").is_ok_and(|s| s.trim() == "0") {
        return (
            Mode::NoLease,
            "the sysctl fs.leases-enable is 0".to_string(),
        );
    }
    match statfs {
        Ok(st) => {
            // f_type's type differs between architectures.
            #[allow(clippy::unnecessary_cast)]
            if let Some(name) = leaseless_filesystem(st.f_type as i64) {
                return (
                    Mode::NoLease,
                    format!(
                        "{} is on {name}, where leases do not see every writer",
                        folder.display()
                    ),
                );
            }
        }
        Err(e) => {
            return (
                Mode::NoLease,
                format!("cannot tell the filesystem of {}: {e}", folder.display()),
            );
        }
    }
    if caps.has(CAP_LEASE) {
        (Mode::AnyFile, "CAP_LEASE is effective".to_string())
    } else {
        (
            Mode::OwnFiles { uid: caps.euid },
            "CAP_LEASE is not effective; grant it (systemd: AmbientCapabilities=CAP_LEASE)"
                .to_string(),
        )
    }
}

/// What the `/proc` writer check cannot see from here; empty when it sees
/// every process.
fn proc_limits(caps: &Capabilities) -> Vec<String> {
    const CAP_SYS_PTRACE: u32 = 19;
    let mut limits = Vec::new();
    // Another user's /proc/PID/fdinfo needs CAP_SYS_PTRACE, even for uid 0.
    if !caps.has(CAP_SYS_PTRACE) {
        limits.push(format!("only processes of uid {}", caps.euid));
    }
    if !in_initial_pid_namespace() {
        limits.push("only processes of its own PID namespace".to_string());
    }
    limits
}

/// Whether the `/proc` writer check sees every process.
fn proc_sees_all(caps: &Capabilities) -> bool {
    proc_limits(caps).is_empty()
}

/// What the `/proc` writer check can see from here, for messages.
fn proc_view(caps: &Capabilities) -> String {
    let limits = proc_limits(caps);
    if limits.is_empty() {
        "sees every process".to_string()
    } else {
        format!(
            "is blind to writers outside what it can see ({})",
            limits.join(", ")
        )
    }
}

/// Whether this process sees the host's processes: kthreadd (pid 2) lives
/// in the initial PID namespace only.
fn in_initial_pid_namespace() -> bool {
    let nested = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|v| v.split_whitespace().count() > 1)
    });
    !nested && std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd")
}

/// (device, inode) of every regular file some process has open for writing,
/// as far as /proc shows (see [`Support::proc_view`]).
pub fn open_for_writing() -> HashSet<(u64, u64)> {
    let mut out = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for proc_entry in procs.flatten() {
        let name = proc_entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let base = proc_entry.path();
        let Ok(fds) = std::fs::read_dir(base.join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
            let Some(flags) = flags else { continue };
            if flags & (libc::O_ACCMODE as u32) == libc::O_RDONLY as u32 {
                continue;
            }
            if let Ok(m) = std::fs::metadata(base.join("fd").join(fd.file_name()))
                && m.is_file()
            {
                out.insert((m.dev(), m.ino()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_open_for_writing_is_seen_in_proc() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"x").unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert!(open_for_writing().contains(&(m.dev(), m.ino())));
        drop(f);
        assert!(!open_for_writing().contains(&(m.dev(), m.ino())));
    }

    #[test]
    fn network_and_stacked_filesystems_get_the_weak_rule() {
        assert_eq!(leaseless_filesystem(0x6969), Some("nfs"));
        assert_eq!(leaseless_filesystem(0x794c_7630), Some("overlay"));
        assert_eq!(leaseless_filesystem(0xEF53), None, "ext4");
        assert_eq!(leaseless_filesystem(0x0102_1994), None, "tmpfs");
    }

    #[test]
    fn the_rule_follows_capability_ownership_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let mine = std::fs::metadata(dir.path()).unwrap();
        let no_cap = Capabilities {
            effective: 0,
            euid: mine.uid(),
        };
        let (mode, why) = probe_folder(dir.path(), &no_cap);
        assert_eq!(mode, Mode::OwnFiles { uid: mine.uid() }, "{why}");
        let cap = Capabilities {
            effective: 1 << CAP_LEASE,
            euid: 12345,
        };
        assert_eq!(probe_folder(dir.path(), &cap).0, Mode::AnyFile);

        let s = Support {
            roots: vec![Some(mine.dev())],
            devices: Mutex::new(HashMap::from([(
                mine.dev(),
                DeviceSupport {
                    mode: Mode::AnyFile,
                    why: String::new(),
                },
            )])),
            caps: Capabilities {
                effective: 1 << CAP_LEASE,
                euid: 12345,
            },
            fixed: None,
            proc_view: String::new(),
            proc_sees_all: true,
        };
        assert_eq!(s.rule(dir.path(), &mine), Rule::Lease);
        // Refused at run time: EACCES narrows to own files (another user's
        // file gets the weak rule), EACCES again or EINVAL to none.
        let eacces = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(s.downgrade(mine.dev(), &eacces));
        assert_eq!(s.mode(0).0, Mode::OwnFiles { uid: 12345 });
        assert_eq!(s.rule(dir.path(), &mine), Rule::Weak, "not our file");
        assert!(s.downgrade(mine.dev(), &eacces), "EACCES on our own files");
        assert_eq!(s.mode(0).0, Mode::NoLease);
        assert!(!s.downgrade(mine.dev(), &std::io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(
            s.describe(0, Duration::from_secs(2))
                .contains("closes them")
        );
        // Absurd settle values do not overflow.
        assert!(weak_scan_quiet(Duration::MAX) >= Duration::from_secs(60));
    }
}
