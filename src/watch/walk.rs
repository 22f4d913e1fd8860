//! Walking the watched trees: every regular file below a folder, found
//! without ever going through a symbolic link, each folder watched
//! ([`crate::watch::events`]) before it is listed.
//!
//! A walk starts at a watched folder (the configuration's path, taken as it
//! is) or at a folder below one. Every folder below is opened beneath the
//! watched folder with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! ([`crate::watch::files`]), watched by that descriptor, then listed from it: a
//! folder swapped for a link at any moment is never listed, never watched,
//! and nothing outside the tree is ever named in what the walk reports. A
//! file made after its folder was listed was made after its folder was
//! watched, so an event tells of it. Folders the agent cannot open or watch
//! are reported once per walk (`Found::Unreadable`, saying whether their
//! permissions refused the agent), and every folder listed whole is
//! reported too (`Found::Listed`), so that one refused before is known
//! readable again; their siblings are walked. The walk runs off the runtime and waits while its small channel
//! is full, so it goes only as fast as the watcher takes what it finds; it
//! holds the names of the folders still to list, depth first, never a list
//! of files. This module never opens a file and never decides anything
//! about one.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType};
use tokio::sync::mpsc;

use crate::config::Filter;
use crate::watch::events::{Events, WatchError};
use crate::watch::files::{self, OpenError};

/// What a walk reports.
#[derive(Debug)]
pub(crate) enum Found {
    File(PathBuf),
    /// A folder the walk could not open, list or watch, and why.
    Unreadable(Unreadable),
    /// A folder opened, watched (when the walk watches) and listed.
    Listed(PathBuf),
    /// The folder a walk started at is gone, or is not a folder (a link,
    /// say) any more.
    Gone(PathBuf),
}

/// A folder the walk could not open, list or watch.
#[derive(Debug)]
pub(crate) struct Unreadable {
    pub path: PathBuf,
    pub why: String,
    /// Refused by its permissions (`EACCES`, `EPERM`), which producers
    /// often set last: tried again soon ([`crate::watch::denied`]). Otherwise a
    /// fault (the inotify limit, an I/O error) left to the next rescan.
    pub refused: bool,
}

impl Found {
    fn unreadable(path: PathBuf, e: &dyn std::fmt::Display, refused: bool) -> Found {
        Found::Unreadable(Unreadable {
            path,
            why: e.to_string(),
            refused,
        })
    }
}

/// Whether an open or listing error is a refusal by permissions.
fn refused(e: &OpenError) -> bool {
    matches!(e, OpenError::Io(io) if crate::watch::denied::is_refusal(io))
}

/// One watched folder: its configured path and its filter.
pub(crate) struct Tree {
    pub root: PathBuf,
    pub filter: Filter,
}

/// Walks `starts` (watched folders or folders below them) off the runtime.
pub(crate) fn spawn(
    starts: Vec<PathBuf>,
    trees: Arc<Vec<Tree>>,
    events: Option<Arc<Events>>,
) -> mpsc::Receiver<Found> {
    let (tx, rx) = mpsc::channel(256);
    tokio::task::spawn_blocking(move || {
        for start in starts {
            let Some((tree, rel)) = trees.iter().find_map(|t| {
                start
                    .strip_prefix(&t.root)
                    .ok()
                    .map(|rel| (t, rel.to_path_buf()))
            }) else {
                continue;
            };
            if walk(tree, rel, events.as_deref(), &tx).is_err() {
                return; // the watcher is gone
            }
        }
    });
    rx
}

/// The receiver is gone: stop.
struct Closed;

fn send(tx: &mpsc::Sender<Found>, f: Found) -> Result<(), Closed> {
    tx.blocking_send(f).map_err(|_| Closed)
}

fn walk(
    tree: &Tree,
    start: PathBuf,
    events: Option<&Events>,
    tx: &mpsc::Sender<Found>,
) -> Result<(), Closed> {
    let root = match files::open_root(&tree.root) {
        Ok(fd) => fd,
        // A watched folder that is gone is reported by the watcher's own
        // check of the watched folders.
        Err(OpenError::Gone) => return Ok(()),
        Err(e) => {
            let refused = refused(&e);
            return send(tx, Found::unreadable(tree.root.clone(), &e, refused));
        }
    };
    let first = start.clone();
    let mut stack = vec![start];
    while let Some(rel) = stack.pop() {
        let path = if rel.as_os_str().is_empty() {
            tree.root.clone()
        } else {
            tree.root.join(&rel)
        };
        let dir = match open_folder(root.as_fd(), &rel) {
            Ok(fd) => fd,
            Err(e @ (OpenError::Gone | OpenError::NotAFile | OpenError::Link)) => {
                if matches!(e, OpenError::Link) {
                    tracing::debug!(folder = ?path, "a symbolic link; not walked");
                }
                if rel == first {
                    send(tx, Found::Gone(path))?;
                }
                continue;
            }
            Err(e @ OpenError::Io(_)) => {
                let refused = refused(&e);
                send(tx, Found::unreadable(path, &e, refused))?;
                continue;
            }
        };
        // A folder listed but not watched is not reported readable: its
        // watch is what is tried again.
        let mut whole = true;
        if let Some(events) = events {
            match events.watch(dir.as_fd(), &path) {
                Ok(()) => {}
                Err(WatchError::Vanished) => continue,
                Err(WatchError::Refused(why)) => {
                    whole = false;
                    send(tx, Found::unreadable(path.clone(), &why, true))?;
                }
                Err(WatchError::Other(why)) => {
                    whole = false;
                    send(tx, Found::unreadable(path.clone(), &why, false))?;
                }
            }
        }
        if list(tree, &rel, &path, dir, &mut stack, tx)? && whole {
            send(tx, Found::Listed(path))?;
        }
    }
    Ok(())
}

/// Opens a folder for listing; out of descriptors or memory, tries again
/// for a few seconds before the folder is reported unreadable (and left to
/// the next rescan).
fn open_folder(root: std::os::fd::BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, OpenError> {
    let mut tries = 0;
    loop {
        match files::open_folder_beneath(root, rel) {
            Err(OpenError::Io(e)) if files::is_resource_shortage(&e) && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

/// Lists one folder: its regular files are reported, its folders (those
/// the filter does not skip) stacked. `Ok(false)`: it could not be listed
/// to its end (reported).
fn list(
    tree: &Tree,
    rel: &Path,
    path: &Path,
    dir: OwnedFd,
    stack: &mut Vec<PathBuf>,
    tx: &mpsc::Sender<Found>,
) -> Result<bool, Closed> {
    let unlistable = |e: rustix::io::Errno| {
        let refused = matches!(e, rustix::io::Errno::ACCESS | rustix::io::Errno::PERM);
        send(tx, Found::unreadable(path.to_path_buf(), &e, refused)).map(|()| false)
    };
    let mut entries = match rustix::fs::Dir::new(dir) {
        Ok(d) => d,
        Err(e) => return unlistable(e),
    };
    while let Some(entry) = entries.read() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return unlistable(e),
        };
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        let kind = match entry.file_type() {
            FileType::Unknown => match entries.fd() {
                // Some filesystems do not tell the type in the listing.
                Ok(fd) => rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_or(FileType::Unknown, |st| FileType::from_raw_mode(st.st_mode)),
                Err(_) => FileType::Unknown,
            },
            t => t,
        };
        match kind {
            FileType::RegularFile => send(tx, Found::File(path.join(name)))?,
            FileType::Directory => {
                let child = rel.join(name);
                if !tree.filter.skips_dir(&child) {
                    stack.push(child);
                }
            }
            _ => {}
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn tree(root: &Path) -> Arc<Vec<Tree>> {
        let w = crate::config::WatchSettings {
            path: root.to_path_buf(),
            prefix: "foo/".into(),
            include: vec![],
            exclude: vec![".*".into()],
            settle: std::time::Duration::from_millis(100),
            after_upload: crate::config::AfterUpload::Keep,
            marker: vec![],
            manifest: false,
            stream: false,
        };
        Arc::new(vec![Tree {
            root: root.to_path_buf(),
            filter: Filter::new(&w),
        }])
    }

    async fn found(
        starts: Vec<PathBuf>,
        trees: Arc<Vec<Tree>>,
    ) -> (BTreeSet<PathBuf>, Vec<PathBuf>) {
        let mut rx = spawn(starts, trees, None);
        let (mut files, mut bad) = (BTreeSet::new(), Vec::new());
        while let Some(f) = rx.recv().await {
            match f {
                Found::File(p) => {
                    files.insert(p);
                }
                Found::Unreadable(u) => bad.push(u.path),
                Found::Listed(_) | Found::Gone(_) => {}
            }
        }
        (files, bad)
    }

    #[tokio::test]
    async fn walks_every_folder_below_and_no_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join(".hidden")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("top"), b"x").unwrap();
        std::fs::write(root.join("a/b/deep"), b"x").unwrap();
        std::fs::write(root.join(".hidden/no"), b"x").unwrap();
        std::fs::write(outside.join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/link")).unwrap();
        let (files, bad) = found(vec![root.clone()], tree(&root)).await;
        assert_eq!(
            files,
            [root.join("top"), root.join("a/b/deep")]
                .into_iter()
                .collect()
        );
        assert!(bad.is_empty());
        // A walk asked to start at a folder that is now a link walks nothing.
        let (files, _) = found(vec![root.join("link")], tree(&root)).await;
        assert!(files.is_empty(), "{files:?}");
        // Nor through a folder of its path that is now a link.
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("sub/secret"), b"x").unwrap();
        let (files, _) = found(vec![root.join("link/sub")], tree(&root)).await;
        assert!(files.is_empty(), "{files:?}");
    }
}
