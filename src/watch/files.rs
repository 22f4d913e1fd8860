//! Opening files under a watched folder without ever following a symbolic
//! link, and without opening anything that is not a regular file.
//!
//! Watched folders are shared with producers putonly does not control: a
//! link (or a folder swapped for one) could point anywhere, `/etc` included,
//! and a device node must never be opened. [`open_beneath`] resolves a path
//! relative to the watch root with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` (a component-by-component `O_NOFOLLOW` walk where
//! `openat2` is missing), first as an `O_PATH` handle that cannot have side
//! effects, checks by that handle that it names a regular file, and only
//! then opens that very inode for reading. Callers stat, read and lease what
//! was opened, never the path again. This module never reads file contents
//! and never changes a file.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path};

use rustix::fs::{Mode, OFlags, ResolveFlags};

pub use crate::ground::is_resource_shortage;

/// Why a file under a watch could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Nothing at that path any more (or a component is no longer a folder).
    #[error("it is gone")]
    Gone,
    /// A component of the path, or the file itself, is a symbolic link (or
    /// the path leads out of the watched folder).
    #[error("a symbolic link is in its path; links are never followed")]
    Link,
    /// A folder, FIFO, socket or device: never opened for reading.
    #[error("not a regular file")]
    NotAFile,
    /// Anything else: permission denied, I/O error.
    #[error("cannot open: {0}")]
    Io(std::io::Error),
}

/// A regular file opened for reading, and its status as opened.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub meta: std::fs::Metadata,
}

fn io(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

/// Sorts an errno met while resolving a path.
fn resolve_error(e: rustix::io::Errno) -> OpenError {
    match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => OpenError::Link,
        rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR => OpenError::Gone,
        other => OpenError::Io(io(other)),
    }
}

impl From<OpenError> for std::io::Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Io(e) => e,
            OpenError::Gone => std::io::Error::from_raw_os_error(libc::ENOENT),
            other => std::io::Error::other(other.to_string()),
        }
    }
}

/// Whether the kernel stops users from hard-linking files they cannot
/// read or write (`fs.protected_hardlinks = 1`, the default of most
/// distributions). Without it, a producer can link a file it cannot read
/// into a watched folder, and the agent, which may read it, would send it:
/// a hard link is the file itself, no link in its path to refuse. `Err`
/// says why it cannot be told (no `/proc/sys` in some containers).
pub fn hardlinks_protected() -> Result<bool, String> {
    const SYSCTL: &str = "/proc/sys/fs/protected_hardlinks";
    match std::fs::read_to_string(SYSCTL) {
        Ok(v) => Ok(v.trim() != "0"),
        Err(e) => Err(format!("cannot read {SYSCTL}: {e}")),
    }
}

/// What `putonly check` and the agent's start-up say of
/// [`hardlinks_protected`]: `Ok` with a line when protected, `Err` with a
/// warning and the fix when not, or when it cannot be told.
pub fn hardlinks_verdict() -> Result<&'static str, String> {
    match hardlinks_protected() {
        Ok(true) => Ok("fs.protected_hardlinks = 1: producers cannot hard-link files they cannot read into a watched folder"),
        Ok(false) => Err("fs.protected_hardlinks = 0: a producer can hard-link a file it cannot read (the agent's credentials, say) into a watched folder, and the agent would send it; set it to 1 (sysctl -w fs.protected_hardlinks=1, and in /etc/sysctl.d)".to_string()),
        Err(e) => Err(format!("fs.protected_hardlinks cannot be told ({e}): if it is 0 on this host, a producer can hard-link a file it cannot read into a watched folder and the agent would send it; check it on the host (it is per host, not per container)")),
    }
}

/// Who besides root and this process's user could swap `path` for a link:
/// a folder above it (not `path` itself) that others may write to without
/// the sticky bit, or that another user owns. A watched folder or
/// `move_to` is taken as the configuration names it, links included, so
/// such a folder would let its writers point the agent anywhere. `None`
/// when every folder above is safe, or cannot be read.
pub fn swappable_by_others(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    for folder in path.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(folder) else {
            continue;
        };
        let (mode, uid) = (m.mode(), m.uid());
        let sticky = mode & 0o1000 != 0;
        if uid != 0 && uid != me {
            return Some(format!(
                "{} (above {}) belongs to uid {uid}, who could replace what is below it by a link; give it to root",
                folder.display(),
                path.display()
            ));
        }
        if mode & 0o022 != 0 && !sticky {
            return Some(format!(
                "{} (above {}) can be written by others (mode {:o}), who could replace what is below it by a link; chmod go-w, or the sticky bit",
                folder.display(),
                path.display(),
                mode & 0o7777
            ));
        }
    }
    None
}

/// A handle (`O_PATH`) on a configured folder: a watch root or `move_to`.
/// The path is the configuration's choice and is taken as it is, links
/// included.
pub fn open_root(root: &Path) -> Result<OwnedFd, OpenError> {
    rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(resolve_error)
}

/// A handle on the folder `folders` beneath `dir` (itself when empty),
/// following no link.
pub fn folder_beneath(dir: OwnedFd, folders: &Path) -> Result<OwnedFd, OpenError> {
    if folders.as_os_str().is_empty() {
        return Ok(dir);
    }
    beneath(dir.as_fd(), folders, OFlags::PATH | OFlags::DIRECTORY)
}

/// Opens the folder `rel` beneath the folder handle `root` (`root` itself
/// when empty) for listing, following no link.
pub fn open_folder_beneath(root: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, OpenError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    if rel.as_os_str().is_empty() {
        return rustix::fs::openat(root, ".", flags, Mode::empty()).map_err(resolve_error);
    }
    beneath(root, rel, flags)
}

/// Opens `rel` (relative to the folder `root`) for reading, following no
/// symbolic link below `root` and opening nothing but a regular file. The
/// root itself is the configuration's choice and is taken as it is.
pub fn open_beneath(root: &Path, rel: &Path) -> Result<Opened, OpenError> {
    open_beneath_at(open_root(root)?.as_fd(), rel)
}

/// [`open_beneath`] with the folder already open (a handle from
/// [`open_root`]).
pub fn open_beneath_at(root_fd: BorrowedFd<'_>, rel: &Path) -> Result<Opened, OpenError> {
    let handle = beneath(root_fd, rel, OFlags::PATH)?;
    let st = rustix::fs::fstat(&handle).map_err(|e| OpenError::Io(io(e)))?;
    match rustix::fs::FileType::from_raw_mode(st.st_mode) {
        rustix::fs::FileType::RegularFile => {}
        rustix::fs::FileType::Symlink => return Err(OpenError::Link),
        _ => return Err(OpenError::NotAFile),
    }
    let file = reopen_for_reading(&handle, root_fd, rel)?;
    let meta = file.metadata().map_err(OpenError::Io)?;
    // The handle and the file must be the same inode, a regular file.
    use std::os::unix::fs::MetadataExt;
    if !meta.is_file() || (meta.dev(), meta.ino()) != (st.st_dev, st.st_ino) {
        return Err(OpenError::Gone);
    }
    Ok(Opened { file, meta })
}

/// The status of `rel` beneath the folder `root`, as `lstat` would give it
/// (a final link is described, not followed) but reached without following
/// any link below `root`: a folder swapped for a link answers
/// [`OpenError::Link`], never the status of what it points to.
pub fn lstat_beneath(root: &Path, rel: &Path) -> Result<std::fs::Metadata, OpenError> {
    lstat_at(open_root(root)?.as_fd(), rel)
}

/// [`lstat_beneath`] with the folder already open (a handle from
/// [`open_root`]), for many looks in a row.
pub fn lstat_at(root: BorrowedFd<'_>, rel: &Path) -> Result<std::fs::Metadata, OpenError> {
    let handle = beneath(root, rel, OFlags::PATH)?;
    File::from(handle).metadata().map_err(OpenError::Io)
}

/// Opens `rel` beneath `dir` with `flags` (plus `O_NOFOLLOW | O_CLOEXEC`):
/// no link followed, no `..` out of it. With `O_PATH`, a final component
/// that is a link yields a handle on the link itself.
fn beneath(dir: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> Result<OwnedFd, OpenError> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(dir, rel, flags, Mode::empty(), resolve) {
        Ok(fd) => Ok(fd),
        // No openat2 (before Linux 5.6), or a seccomp filter that does not
        // know it (answers ENOSYS or EPERM): walk one component at a time.
        Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => walk_nofollow(dir, rel, flags),
        Err(e) => Err(resolve_error(e)),
    }
}

/// The `openat2` fallback: each folder opened with `O_PATH | O_DIRECTORY |
/// O_NOFOLLOW` relative to the one before, the last component with `flags`
/// (which include `O_NOFOLLOW`).
fn walk_nofollow(dir: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> Result<OwnedFd, OpenError> {
    let names: Vec<&std::ffi::OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            Component::CurDir => Err(OpenError::Gone),
            _ => Err(OpenError::Link), // `..` or an absolute path: out of the folder
        })
        .collect::<Result<_, _>>()?;
    let Some((last, folders)) = names.split_last() else {
        return Err(OpenError::NotAFile);
    };
    let mut current: Option<OwnedFd> = None;
    for name in folders {
        let at = current.as_ref().map_or(dir, |fd| fd.as_fd());
        let next = rustix::fs::openat(
            at,
            *name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        );
        let next = match next {
            // O_DIRECTORY | O_NOFOLLOW on a link answers ENOTDIR: tell a
            // link from a file.
            Err(rustix::io::Errno::NOTDIR) => {
                let st = rustix::fs::statat(at, *name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
                return Err(
                    match st.map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode)) {
                        Ok(rustix::fs::FileType::Symlink) => OpenError::Link,
                        _ => OpenError::Gone,
                    },
                );
            }
            other => other.map_err(resolve_error)?,
        };
        current = Some(next);
    }
    let at = current.as_ref().map_or(dir, |fd| fd.as_fd());
    rustix::fs::openat(at, *last, flags | OFlags::NOFOLLOW, Mode::empty()).map_err(resolve_error)
}

/// Opens the inode an `O_PATH` handle names for reading, through
/// `/proc/self/fd` (the same inode, whatever happened to its path since).
/// Where `/proc` is not mounted (or refused), opens the path again beneath
/// the root by the same rules; [`open_beneath`] then checks it is the same
/// inode.
fn reopen_for_reading(
    handle: &OwnedFd,
    root: BorrowedFd<'_>,
    rel: &Path,
) -> Result<File, OpenError> {
    // O_NONBLOCK: harmless on a regular file; O_NOCTTY: never a terminal.
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let proc_path = format!("/proc/self/fd/{}", handle.as_raw_fd());
    match rustix::fs::open(proc_path.as_str(), flags, Mode::empty()) {
        Ok(fd) => Ok(File::from(fd)),
        // No /proc; or a sandbox that refuses /proc/self/fd, told from a
        // file the agent may not read by the same open beneath the root.
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::ACCESS) => {
            beneath(root, rel, flags).map(File::from)
        }
        Err(e) => Err(OpenError::Io(io(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    #[test]
    fn out_of_descriptors_is_a_shortage_not_a_fault_of_the_file() {
        let err = std::io::Error::from_raw_os_error;
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ESTALE] {
            assert!(is_resource_shortage(&err(errno)), "{}", err(errno));
        }
        for errno in [libc::EACCES, libc::EIO, libc::EISDIR] {
            assert!(!is_resource_shortage(&err(errno)), "{}", err(errno));
        }
        assert!(!is_resource_shortage(&std::io::Error::other("x")));
    }

    /// Under a descriptor limit already reached, opening a file answers
    /// EMFILE, which the agent takes as a shortage. Run in a child process:
    /// the limit must not reach the other tests.
    #[test]
    fn opening_without_a_free_descriptor_is_a_shortage() {
        let (_dir, root) = tree();
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "watch::files::tests::open_beneath_at_the_descriptor_limit",
            "--nocapture",
            "--ignored",
        ])
        .env("PUTONLY_TEST_ROOT", &root);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// Run by `opening_without_a_free_descriptor_is_a_shortage` alone in
    /// its own process.
    #[test]
    #[ignore = "lowers the descriptor limit of its process; run by another test"]
    fn open_beneath_at_the_descriptor_limit() {
        let Some(root) = std::env::var_os("PUTONLY_TEST_ROOT") else {
            return;
        };
        // A low limit, every descriptor under it taken: nothing more opens.
        let used = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        let limit = rustix::process::Rlimit {
            current: Some(used + 8),
            maximum: rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum,
        };
        rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).unwrap();
        let mut held = Vec::new();
        let full = loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => held.push(f),
                Err(e) => break e,
            }
        };
        assert_eq!(full.raw_os_error(), Some(libc::EMFILE), "{full}");
        match open_beneath(Path::new(&root), Path::new("real/f")) {
            Err(OpenError::Io(e)) => assert!(is_resource_shortage(&e), "{e}"),
            other => panic!("expected EMFILE, got {other:?}"),
        }
    }

    fn tree() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::fs::write(root.join("real/f"), b"inside").unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/secret"), b"secret").unwrap();
        symlink(dir.path().join("outside"), root.join("d")).unwrap();
        symlink(root.join("real"), root.join("inlink")).unwrap();
        symlink(root.join("real/f"), root.join("filelink")).unwrap();
        (dir, root)
    }

    fn read(o: Opened) -> String {
        let mut s = String::new();
        let mut f = o.file;
        f.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn opens_plain_paths_and_refuses_every_link() {
        let (_dir, root) = tree();
        assert_eq!(
            read(open_beneath(&root, Path::new("real/f")).unwrap()),
            "inside"
        );
        for linked in ["d/secret", "inlink/f", "filelink", "../outside/secret"] {
            let e = open_beneath(&root, Path::new(linked)).unwrap_err();
            assert!(matches!(e, OpenError::Link), "{linked}: {e:?}");
        }
        assert!(matches!(
            open_beneath(&root, Path::new("real/none")).unwrap_err(),
            OpenError::Gone
        ));
        assert!(matches!(
            open_beneath(&root, Path::new("real")).unwrap_err(),
            OpenError::NotAFile
        ));
    }

    #[test]
    fn status_is_taken_beneath_the_root_only() {
        let (_dir, root) = tree();
        assert!(lstat_beneath(&root, Path::new("real/f")).unwrap().is_file());
        // A final link is described, not followed.
        let m = lstat_beneath(&root, Path::new("filelink")).unwrap();
        assert!(m.file_type().is_symlink());
        // A folder that is a link is never gone through.
        for linked in ["d/secret", "inlink/f", "../outside/secret"] {
            let e = lstat_beneath(&root, Path::new(linked)).unwrap_err();
            assert!(matches!(e, OpenError::Link), "{linked}: {e:?}");
        }
        assert!(matches!(
            lstat_beneath(&root, Path::new("nothing")).unwrap_err(),
            OpenError::Gone
        ));
    }

    #[test]
    fn folders_others_can_write_above_a_path_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir_all(open.join("outbox")).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let why = swappable_by_others(&open.join("outbox")).unwrap();
        assert!(why.contains("can be written by others"), "{why}");
        // The sticky bit (as /tmp has) stops others from renaming it away.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let safe = dir.path().join("safe");
        std::fs::create_dir_all(safe.join("outbox")).unwrap();
        std::fs::set_permissions(&safe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(swappable_by_others(&open.join("outbox")), None);
        assert_eq!(swappable_by_others(&safe.join("outbox")), None);
    }

    #[test]
    fn the_fallback_walk_refuses_links_too() {
        let (_dir, root) = tree();
        let root_fd = rustix::fs::open(
            &root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        assert!(walk_nofollow(root_fd.as_fd(), Path::new("real/f"), OFlags::PATH).is_ok());
        for linked in ["d/secret", "inlink/f", "../outside/secret"] {
            let e = walk_nofollow(root_fd.as_fd(), Path::new(linked), OFlags::PATH).unwrap_err();
            assert!(matches!(e, OpenError::Link), "{linked}: {e:?}");
        }
        // A final link is opened as the link itself (O_PATH | O_NOFOLLOW),
        // which open_beneath then refuses by its type.
        let h = walk_nofollow(root_fd.as_fd(), Path::new("filelink"), OFlags::PATH).unwrap();
        let st = rustix::fs::fstat(&h).unwrap();
        assert_eq!(
            rustix::fs::FileType::from_raw_mode(st.st_mode),
            rustix::fs::FileType::Symlink
        );
    }

    #[test]
    fn a_fifo_is_never_opened_for_reading() {
        let dir = tempfile::tempdir().unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(
            open_beneath(dir.path(), Path::new("fifo")).unwrap_err(),
            OpenError::NotAFile
        ));
    }
}
