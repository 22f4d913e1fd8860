//! The kernel's news of files in the watched trees: one inotify watch per
//! folder, the table of which watch is which folder, and the reader thread
//! that turns the kernel's events into `Intake` items for the watcher.
//!
//! A watch is added on a folder the walk ([`crate::watch::walk`]) has already
//! opened beneath its watched folder, by its descriptor
//! (`/proc/self/fd/N`, `IN_ONLYDIR`): never by a path a producer could have
//! swapped for a link meanwhile, so a watch never lands on a folder outside
//! the tree, nor on another folder of the tree under a wrong name. The
//! kernel gives one watch per folder however it is reached; the table
//! follows folders renamed within the tree (the pair of `IN_MOVED_FROM` and
//! `IN_MOVED_TO`), drops the watches of folders moved out of it, and
//! forgets those the kernel dropped (`IN_IGNORED`). Adding a watch is one
//! system call made by the caller: nobody ever waits for the reader thread,
//! which alone blocks (on the kernel, and on the watcher's bounded queue:
//! the kernel's own queue then fills, and its overflow is answered with a
//! rescan). This module never opens a file, never follows a link and
//! decides nothing about files: it only reports.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;

use crate::ground::CLAIM_PREFIX;

/// What an event says happened to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// A new name: a file being created, or a new hard link.
    Created,
    /// Data written.
    Written,
    /// Closed after writing, or renamed into the folder.
    Closed,
    /// Status only (chmod, touch, ...): not a sign of a writer.
    Touched,
}

/// What the events hand the watcher.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Intake {
    Changed {
        path: PathBuf,
        change: Change,
    },
    Removed(PathBuf),
    /// A new folder (made, or moved in): walk it, its files may predate
    /// its watch.
    Folder(PathBuf),
    /// A folder's mode, owner or ACL changed (or its times): one the agent
    /// could not read may be readable now.
    FolderChanged(PathBuf),
    /// Events were lost: walk everything.
    Rescan,
}

/// What a folder's watch asks of the kernel. No `IN_OPEN`: opening says
/// nothing a close or a write does not.
fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ONLYDIR
        | WatchMask::EXCL_UNLINK
}

/// Why a folder could not be watched.
#[derive(Debug)]
pub(crate) enum WatchError {
    /// It is gone (or no longer a folder): nothing to say.
    Vanished,
    /// The agent's user may not read it (yet): tried again soon
    /// ([`crate::watch::denied`]).
    Refused(String),
    /// Anything else, in words that name the fix.
    Other(String),
}

/// Which watch is which folder.
/// (Paths in order, so that a folder's subfolders are one range.)
#[derive(Default)]
struct Table {
    by_wd: HashMap<WatchDescriptor, PathBuf>,
    by_path: BTreeMap<PathBuf, WatchDescriptor>,
}

impl Table {
    /// Records that `wd` watches the folder at `path`. A folder renamed
    /// within the tree keeps its watch under its new name; a watch that
    /// held this name before (another folder, since moved where its
    /// events say nothing) is dropped.
    fn insert(&mut self, watches: &mut Watches, wd: WatchDescriptor, path: &Path) {
        if let Some(old) = self.by_wd.insert(wd.clone(), path.to_path_buf())
            && old != path
            && self.by_path.get(&old) == Some(&wd)
        {
            self.by_path.remove(&old);
        }
        if let Some(other) = self.by_path.insert(path.to_path_buf(), wd.clone())
            && other != wd
        {
            self.by_wd.remove(&other);
            let _ = watches.remove(other);
        }
    }

    fn path(&self, wd: &WatchDescriptor) -> Option<&PathBuf> {
        self.by_wd.get(wd)
    }

    /// The kernel dropped `wd` (its folder is gone).
    fn forget(&mut self, wd: &WatchDescriptor) {
        if let Some(p) = self.by_wd.remove(wd)
            && self.by_path.get(&p) == Some(wd)
        {
            self.by_path.remove(&p);
        }
    }

    /// The folder and its subfolders that are watched (a range: paths
    /// order component by component).
    fn under(&self, folder: &Path) -> Vec<PathBuf> {
        self.by_path
            .range(folder.to_path_buf()..)
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(folder))
            .cloned()
            .collect()
    }

    /// A folder renamed within the tree: its watches, and its subfolders',
    /// follow it. A watch that held a name they take (a folder since moved
    /// where its events say nothing) is dropped.
    fn rename(&mut self, watches: &mut Watches, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, WatchDescriptor)> = self
            .under(from)
            .into_iter()
            .filter_map(|old| self.by_path.remove(&old).map(|wd| (old, wd)))
            .collect();
        for (old, wd) in moved {
            let new = match old.strip_prefix(from) {
                Ok(rest) if !rest.as_os_str().is_empty() => to.join(rest),
                _ => to.to_path_buf(),
            };
            self.by_wd.insert(wd.clone(), new.clone());
            if let Some(other) = self.by_path.insert(new, wd.clone())
                && other != wd
            {
                self.by_wd.remove(&other);
                let _ = watches.remove(other);
            }
        }
    }

    fn has(&self, path: &Path) -> bool {
        self.by_path.contains_key(path)
    }

    /// A folder moved out of the tree: its watches, and its subfolders',
    /// are dropped.
    fn remove(&mut self, watches: &mut Watches, folder: &Path) {
        for p in self.under(folder) {
            if let Some(wd) = self.by_path.remove(&p) {
                self.by_wd.remove(&wd);
                let _ = watches.remove(wd);
            }
        }
    }

    fn len(&self) -> usize {
        self.by_wd.len()
    }
}

/// The inotify instance, its table, and the thread reading it.
pub(crate) struct Events {
    watches: Mutex<Watches>,
    table: Arc<Mutex<Table>>,
}

/// A rename's first half, waiting for its second: the cookie, the old
/// path, and whether it is a folder.
type MovedFrom = (u32, PathBuf, bool);

impl Events {
    /// Starts the reader thread, which sends what it reads to `tx` and ends
    /// when `tx` is closed.
    pub(crate) fn start(tx: mpsc::Sender<Intake>) -> std::io::Result<Arc<Events>> {
        let mut inotify = Inotify::init()?;
        let table = Arc::new(Mutex::new(Table::default()));
        let events = Arc::new(Events {
            watches: Mutex::new(inotify.watches()),
            table: table.clone(),
        });
        let mut watches = inotify.watches();
        std::thread::Builder::new()
            .name("putonly-events".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut moved: Option<MovedFrom> = None;
                loop {
                    let read = match inotify.read_events_blocking(&mut buf) {
                        Ok(read) => read,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read file events; rescanning");
                            if tx.blocking_send(Intake::Rescan).is_err() {
                                return;
                            }
                            std::thread::sleep(std::time::Duration::from_secs(1));
                            continue;
                        }
                    };
                    let mut out = Vec::new();
                    {
                        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
                        for ev in read {
                            let dir = t.path(&ev.wd).cloned();
                            if ev.mask.contains(EventMask::IGNORED) {
                                t.forget(&ev.wd);
                                continue;
                            }
                            classify(
                                ev.mask,
                                ev.cookie,
                                dir.as_deref(),
                                ev.name,
                                &mut moved,
                                &mut |change| match change {
                                    TableChange::Rename(from, to) => {
                                        t.rename(&mut watches, &from, &to)
                                    }
                                    TableChange::Remove(folder) => t.remove(&mut watches, &folder),
                                },
                                &mut out,
                            );
                        }
                        // A folder's first half with no second in this read:
                        // moved out of the tree (or its second half comes in
                        // the next read, and the folder is walked anew then).
                        if let Some((_, old, true)) = moved.take() {
                            t.remove(&mut watches, &old);
                        }
                    }
                    for item in out {
                        if tx.blocking_send(item).is_err() {
                            return;
                        }
                    }
                }
            })?;
        Ok(events)
    }

    /// Watches the folder `dir` (opened beneath its watched folder by the
    /// caller), known as `path`.
    pub(crate) fn watch(&self, dir: BorrowedFd<'_>, path: &Path) -> Result<(), WatchError> {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        // Held from adding the watch to recording it, so that the reader
        // never meets its events before it knows the folder.
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let by_fd = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let wd = match watches.add(&by_fd, mask()) {
            Ok(wd) => wd,
            // No /proc (some containers): by path, following no link at
            // its end, and checked against the folder that was opened.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && !Path::new("/proc/self/fd").exists() =>
            {
                let wd = watches
                    .add(path, mask() | WatchMask::DONT_FOLLOW)
                    .map_err(watch_error)?;
                let same = rustix::fs::fstat(dir)
                    .ok()
                    .zip(rustix::fs::lstat(path).ok())
                    .is_some_and(|(a, b)| (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino));
                if !same {
                    if table.path(&wd).is_none() {
                        let _ = watches.remove(wd);
                    }
                    return Err(WatchError::Vanished);
                }
                wd
            }
            Err(e) => return Err(watch_error(e)),
        };
        table.insert(&mut watches, wd, path);
        Ok(())
    }

    /// Drops the watches of `folder` and of every folder below it: a
    /// watched folder moved away or replaced, whose old tree's watches
    /// would go on reporting the moved tree's files under the old names.
    pub(crate) fn unwatch_tree(&self, folder: &Path) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.remove(&mut watches, folder);
    }

    /// Whether the folder at `path` has a watch.
    pub(crate) fn is_watched(&self, path: &Path) -> bool {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .has(path)
    }

    /// How many folders are watched.
    pub(crate) fn watched(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn watch_error(e: std::io::Error) -> WatchError {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR) => WatchError::Vanished,
        Some(libc::ENOSPC) => WatchError::Other(
            "the inotify watch limit is reached; raise the sysctl fs.inotify.max_user_watches"
                .into(),
        ),
        Some(libc::EACCES | libc::EPERM) => {
            WatchError::Refused("permission denied: the agent's user cannot read it".into())
        }
        _ => WatchError::Other(e.to_string()),
    }
}

/// What an event asks of the table.
enum TableChange {
    Rename(PathBuf, PathBuf),
    Remove(PathBuf),
}

fn claimed(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(CLAIM_PREFIX))
}

/// Turns one kernel event (on the folder `dir`, about its entry `name`)
/// into intake items, pairing the halves of a rename through `moved`.
fn classify(
    mask: EventMask,
    cookie: u32,
    dir: Option<&Path>,
    name: Option<&OsStr>,
    moved: &mut Option<MovedFrom>,
    table: &mut dyn FnMut(TableChange),
    out: &mut Vec<Intake>,
) {
    if mask.contains(EventMask::Q_OVERFLOW) {
        out.push(Intake::Rescan);
        return;
    }
    // Events about a watched folder itself (its own removal or move) are
    // told by its parent's events, or by the check of the watched folders.
    let (Some(dir), Some(name)) = (dir, name) else {
        return;
    };
    let path = dir.join(name);
    let is_dir = mask.contains(EventMask::ISDIR);
    let second_half =
        mask.contains(EventMask::MOVED_TO) && moved.as_ref().is_some_and(|(c, _, _)| *c == cookie);
    if !second_half && let Some((_, old, true)) = moved.take() {
        table(TableChange::Remove(old));
    }
    let changed = |change| Intake::Changed {
        path: path.clone(),
        change,
    };
    if mask.contains(EventMask::MOVED_FROM) {
        out.push(Intake::Removed(path.clone()));
        *moved = Some((cookie, path, is_dir));
        return;
    }
    if mask.contains(EventMask::MOVED_TO) {
        let from = if second_half { moved.take() } else { None };
        if is_dir {
            if let Some((_, old, _)) = from {
                table(TableChange::Rename(old, path.clone()));
            }
            out.push(Intake::Folder(path));
            return;
        }
        match from {
            // The agent claims a file for its after-upload action: what is
            // known of the name stays until the action is over.
            _ if claimed(&path) => {}
            // The agent puts a claimed file back: that says nothing of its
            // writers (a close it was not).
            Some((_, from, _)) if claimed(&from) => out.push(changed(Change::Touched)),
            _ => out.push(changed(Change::Closed)),
        }
        return;
    }
    if is_dir {
        if mask.contains(EventMask::CREATE) {
            out.push(Intake::Folder(path));
        } else if mask.contains(EventMask::DELETE) {
            out.push(Intake::Removed(path));
        } else if mask.contains(EventMask::ATTRIB) {
            out.push(Intake::FolderChanged(path));
        }
        return;
    }
    if mask.contains(EventMask::CREATE) {
        out.push(changed(Change::Created));
    } else if mask.contains(EventMask::MODIFY) {
        out.push(changed(Change::Written));
    } else if mask.contains(EventMask::CLOSE_WRITE) {
        out.push(changed(Change::Closed));
    } else if mask.contains(EventMask::ATTRIB) {
        out.push(changed(Change::Touched));
    } else if mask.contains(EventMask::DELETE) {
        out.push(Intake::Removed(path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(events: &[(EventMask, u32, &str)]) -> (Vec<Intake>, Vec<String>) {
        let mut moved = None;
        let mut out = Vec::new();
        let mut table = Vec::new();
        for (mask, cookie, name) in events {
            classify(
                *mask,
                *cookie,
                Some(Path::new("/w")),
                Some(OsStr::new(name)),
                &mut moved,
                &mut |c| {
                    table.push(match c {
                        TableChange::Rename(a, b) => {
                            format!("rename {} {}", a.display(), b.display())
                        }
                        TableChange::Remove(a) => format!("remove {}", a.display()),
                    })
                },
                &mut out,
            );
        }
        (out, table)
    }

    #[test]
    fn events_become_intake() {
        let p = |n: &str| PathBuf::from("/w").join(n);
        let (out, _) = run(&[
            (EventMask::CREATE, 0, "a"),
            (EventMask::MODIFY, 0, "a"),
            (EventMask::CLOSE_WRITE, 0, "a"),
            (EventMask::ATTRIB, 0, "a"),
            (EventMask::DELETE, 0, "a"),
            (EventMask::CREATE | EventMask::ISDIR, 0, "d"),
            (EventMask::ATTRIB | EventMask::ISDIR, 0, "d"),
        ]);
        assert_eq!(
            out,
            vec![
                Intake::Changed {
                    path: p("a"),
                    change: Change::Created
                },
                Intake::Changed {
                    path: p("a"),
                    change: Change::Written
                },
                Intake::Changed {
                    path: p("a"),
                    change: Change::Closed
                },
                Intake::Changed {
                    path: p("a"),
                    change: Change::Touched
                },
                Intake::Removed(p("a")),
                Intake::Folder(p("d")),
                Intake::FolderChanged(p("d")),
            ]
        );
        let (out, _) = run(&[(EventMask::Q_OVERFLOW, 0, "")]);
        assert_eq!(out, vec![Intake::Rescan]);
    }

    #[test]
    fn renames_pair_up_and_folders_carry_their_watches() {
        let p = |n: &str| PathBuf::from("/w").join(n);
        // A file renamed in, a claim and a put-back.
        let claim = format!("{CLAIM_PREFIX}1-x");
        let (out, _) = run(&[
            (EventMask::MOVED_FROM, 7, "tmp"),
            (EventMask::MOVED_TO, 7, "f"),
            (EventMask::MOVED_FROM, 8, "f"),
            (EventMask::MOVED_TO, 8, &claim),
            (EventMask::MOVED_FROM, 9, &claim),
            (EventMask::MOVED_TO, 9, "f"),
        ]);
        assert_eq!(
            out,
            vec![
                Intake::Removed(p("tmp")),
                Intake::Changed {
                    path: p("f"),
                    change: Change::Closed
                },
                Intake::Removed(p("f")),
                Intake::Removed(p(&claim)),
                Intake::Changed {
                    path: p("f"),
                    change: Change::Touched
                },
            ]
        );
        // A folder renamed within the tree keeps its watches; one moved
        // out loses them.
        let (out, table) = run(&[
            (EventMask::MOVED_FROM | EventMask::ISDIR, 3, "d"),
            (EventMask::MOVED_TO | EventMask::ISDIR, 3, "e"),
            (EventMask::MOVED_FROM | EventMask::ISDIR, 4, "gone"),
            (EventMask::CREATE, 0, "x"),
        ]);
        assert_eq!(out[1], Intake::Folder(p("e")));
        assert_eq!(table, vec!["rename /w/d /w/e", "remove /w/gone"]);
    }

    #[test]
    fn a_watch_is_added_by_descriptor_and_follows_renames() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let events = Events::start(tx).unwrap();
        let fd = std::fs::File::open(&a).unwrap();
        events.watch(fd.as_fd(), &a).unwrap();
        // The same folder by another name (a bind mount, a swap) is one
        // watch, now under the name it was last opened by.
        events.watch(fd.as_fd(), &dir.path().join("alias")).unwrap();
        assert_eq!(events.watched(), 1);
        events.watch(fd.as_fd(), &a).unwrap();
        std::fs::write(a.join("f"), b"x").unwrap();
        let first = rx.blocking_recv().unwrap();
        assert_eq!(
            first,
            Intake::Changed {
                path: a.join("f"),
                change: Change::Created
            }
        );
        // A folder renamed onto a name another watch held takes the name,
        // and the other watch (a folder now elsewhere) is dropped.
        let b = dir.path().join("b");
        std::fs::create_dir(&b).unwrap();
        let fb = std::fs::File::open(&b).unwrap();
        events.watch(fb.as_fd(), &b).unwrap();
        assert_eq!(events.watched(), 2);
        assert!(events.is_watched(&a) && events.is_watched(&b));
        {
            let mut watches = events.watches.lock().unwrap();
            events.table.lock().unwrap().rename(&mut watches, &a, &b);
        }
        assert_eq!(events.watched(), 1);
        assert!(!events.is_watched(&a) && events.is_watched(&b));
        // A file is refused: watches are for folders.
        let file = std::fs::File::open(a.join("f")).unwrap();
        assert!(events.watch(file.as_fd(), &a.join("f")).is_err());
    }
}
