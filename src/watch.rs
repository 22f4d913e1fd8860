//! Watching: which files in the watched folders are finished and ready to
//! send.
//!
//! Sources of news are inotify (through `notify`, recursive), an initial scan
//! (`walkdir`), a scan of every folder that appears, a periodic rescan and a
//! rescan after the event queue overflowed. A file is ready when its writer
//! closed it (close-after-write) or it was renamed into the folder, and then
//! nothing changed for `settle`; a file found by a scan, whose history is
//! unknown, is ready once it has not changed for `settle` and no process
//! has it open for writing. Temporary and hidden files never become ready.
//! This module never opens a file for reading, never talks to the journal
//! and never uploads: it hands [`Candidate`]s to the agent through a bounded
//! queue, and holds the rest back when that queue is full.
//!
//! Its memory is bounded whatever the folders hold: one scan runs at a time
//! and pauses while [`SCAN_READY_HIGH`] files it found wait to be handed
//! over, and at most [`MAX_WAITING`] files are tracked while they settle
//! (news of more is dropped and a rescan finds those files later, exactly
//! as after a kernel queue overflow). It never holds a list of all files.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::config::WatchSettings;
use crate::journal::FileVersion;

/// How often the watched folders themselves are checked for having been
/// removed or recreated.
const ROOT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// At most this many files found by a scan wait to be handed to the agent;
/// the scan then pauses until the agent has taken half of them.
pub const SCAN_READY_HIGH: usize = 4096;
const SCAN_READY_LOW: usize = SCAN_READY_HIGH / 2;

/// At most this many files are tracked while they settle. News of further
/// new files is dropped, and once half of them are handed over a rescan
/// finds the dropped ones (as after a kernel queue overflow).
pub const MAX_WAITING: usize = 100_000;

/// A finished file, ready to be considered for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Index into the configured watches.
    pub watch: usize,
    pub path: PathBuf,
    /// The path relative to the watched folder.
    pub rel: PathBuf,
}

/// A file the agent wants looked at again later (it changed during its
/// upload, or a transient failure asks for a pause).
#[derive(Debug, Clone)]
pub struct Requeue {
    pub path: PathBuf,
    pub not_before: Instant,
}

/// Which paths of one watch are taken.
#[derive(Debug)]
pub struct Filter {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

fn glob_set(patterns: &[String]) -> GlobSet {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        // Patterns were checked when the configuration was resolved.
        if let Ok(g) = GlobBuilder::new(p).literal_separator(true).build() {
            b.add(g);
        }
    }
    b.build().unwrap_or_else(|_| GlobSet::empty())
}

impl Filter {
    pub fn new(w: &WatchSettings) -> Self {
        Filter {
            include: (!w.include.is_empty()).then(|| glob_set(&w.include)),
            exclude: glob_set(&w.exclude),
        }
    }

    /// Whether a file at `rel` (relative to the watched folder) is taken:
    /// no component is excluded, and it matches an include pattern if any.
    pub fn accepts(&self, rel: &Path) -> bool {
        if self.exclude.is_match(rel) || rel.iter().any(|c| self.exclude.is_match(Path::new(c))) {
            return false;
        }
        self.include.as_ref().is_none_or(|inc| inc.is_match(rel))
    }

    /// Whether a folder at `rel` is skipped with everything below it.
    pub fn skips_dir(&self, rel: &Path) -> bool {
        rel.iter().any(|c| self.exclude.is_match(Path::new(c)))
    }
}

/// What the intake hands the settler.
#[derive(Debug)]
enum Intake {
    /// Written to (closed = false) or closed after writing / renamed in (true).
    Changed {
        path: PathBuf,
        closed: bool,
    },
    Removed(PathBuf),
    /// A new folder: scan it, its files may predate its watch.
    Folder(PathBuf),
    /// Events were lost: scan everything.
    Rescan,
}

struct Pending {
    watch: usize,
    last: Option<FileVersion>,
    stable_since: Instant,
    closed: bool,
    check_writers: bool,
    not_before: Instant,
    /// Handed back by the agent: it has a record of this path, so it must
    /// hear about it again even if the file is gone by now.
    requeued: bool,
}

impl Pending {
    fn new(watch: usize, closed: bool, now: Instant) -> Self {
        Pending {
            watch,
            last: None,
            stable_since: now,
            closed,
            check_writers: !closed,
            not_before: now,
            requeued: false,
        }
    }
}

/// Scans, one at a time: the walk in progress (paused by back-pressure
/// while the agent is busy) and the folders waiting for the next walk.
#[derive(Default)]
struct Scans {
    current: Option<mpsc::Receiver<PathBuf>>,
    next: Vec<PathBuf>,
}

impl Scans {
    /// Asks for `roots` to be walked: now if no walk runs, else next.
    fn request(&mut self, roots: impl IntoIterator<Item = PathBuf>) {
        for root in roots {
            if !self.next.iter().any(|n| root.starts_with(n)) {
                self.next.retain(|n| !n.starts_with(&root));
                self.next.push(root);
            }
        }
        if self.current.is_none() && !self.next.is_empty() {
            self.current = Some(spawn_scan(std::mem::take(&mut self.next)));
        }
    }

    /// The next file of the walk in progress; `None` once it ended.
    async fn recv(&mut self) -> Option<PathBuf> {
        match self.current.as_mut() {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// The walk in progress ended: start the next one, if asked for.
    fn finished(&mut self) {
        self.current = None;
        self.request([]);
    }
}

/// What the watcher holds between events; bounded (see the module doc).
#[derive(Default)]
struct State {
    /// Files that are changing or settling.
    waiting: HashMap<PathBuf, Pending>,
    /// Finished files, waiting for room in the agent's queue.
    ready: VecDeque<Candidate>,
    /// The paths in `ready`.
    queued: HashSet<PathBuf>,
    scans: Scans,
    /// News of new files was dropped (too many waiting): a rescan is due
    /// once the backlog has halved.
    dropped: bool,
}

impl State {
    /// Whether to take more files from the scan in progress.
    fn wants_scan_output(&self) -> bool {
        self.scans.current.is_some() && self.ready.len() < SCAN_READY_LOW
    }

    fn make_ready(&mut self, c: Candidate) {
        if self.queued.insert(c.path.clone()) {
            self.ready.push_back(c);
        }
    }

    /// Whether a new file can be tracked; if not, remembers to rescan.
    fn room_for(&mut self, path: &Path) -> bool {
        if self.waiting.len() < MAX_WAITING || self.waiting.contains_key(path) {
            return true;
        }
        if !self.dropped {
            tracing::warn!(
                tracked = MAX_WAITING,
                "too many files settling at once; news of more is dropped and a rescan will find them"
            );
        }
        self.dropped = true;
        false
    }
}

/// The watcher; [`Watch::run`] runs until the task is dropped.
pub struct Watch {
    watches: Vec<WatchSettings>,
    filters: Vec<Filter>,
    rescan_interval: Duration,
    ready_tx: mpsc::Sender<Candidate>,
    requeue_rx: mpsc::UnboundedReceiver<Requeue>,
}

impl Watch {
    pub fn new(
        watches: Vec<WatchSettings>,
        rescan_interval: Duration,
        ready_tx: mpsc::Sender<Candidate>,
        requeue_rx: mpsc::UnboundedReceiver<Requeue>,
    ) -> Self {
        let filters = watches.iter().map(Filter::new).collect();
        Watch {
            watches,
            filters,
            rescan_interval,
            ready_tx,
            requeue_rx,
        }
    }

    /// Which watch a path belongs to, and the path relative to it.
    fn locate(&self, path: &Path) -> Option<(usize, PathBuf)> {
        self.watches.iter().enumerate().find_map(|(i, w)| {
            path.strip_prefix(&w.path)
                .ok()
                .filter(|rel| !rel.as_os_str().is_empty())
                .map(|rel| (i, rel.to_path_buf()))
        })
    }

    fn roots(&self) -> Vec<PathBuf> {
        self.watches.iter().map(|w| w.path.clone()).collect()
    }

    pub async fn run(mut self) {
        let (tx, mut rx) = mpsc::channel::<Intake>(8192);
        let mut watcher = match make_watcher(tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot start file notifications; relying on periodic rescans");
                None
            }
        };
        let mut watched = HashMap::new();
        let roots = self.roots();
        add_watches(&mut watcher, &roots, &mut watched);
        let mut roots_checked = Instant::now();
        let mut st = State::default();
        st.scans.request(roots.clone());

        let min_settle = self
            .watches
            .iter()
            .map(|w| w.settle)
            .min()
            .unwrap_or(Duration::from_secs(2));
        let mut tick = tokio::time::interval(
            (min_settle / 4).clamp(Duration::from_millis(50), Duration::from_millis(500)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval_at(
            tokio::time::Instant::now() + self.rescan_interval,
            self.rescan_interval,
        );
        loop {
            tokio::select! {
                Some(item) = rx.recv() => {
                    self.intake(item, &mut st);
                    // Drain what is already there before looking at files.
                    while let Ok(item) = rx.try_recv() {
                        self.intake(item, &mut st);
                    }
                }
                found = st.scans.recv(), if st.wants_scan_output() => match found {
                    Some(path) => self.take_scanned(path, &mut st),
                    None => st.scans.finished(),
                },
                Some(rq) = self.requeue_rx.recv() => {
                    if let Some((watch, _)) = self.locate(&rq.path) {
                        let mut p = Pending::new(watch, true, Instant::now());
                        p.not_before = rq.not_before;
                        p.requeued = true;
                        st.waiting.insert(rq.path, p);
                    }
                }
                _ = tick.tick() => {
                    self.settle(&mut st);
                    if st.dropped && st.waiting.len() < MAX_WAITING / 2 {
                        st.dropped = false;
                        st.scans.request(self.roots());
                    }
                    // A watched folder removed and made again is watched anew.
                    if roots_checked.elapsed() >= ROOT_CHECK_INTERVAL {
                        roots_checked = Instant::now();
                        let again = add_watches(&mut watcher, &roots, &mut watched);
                        st.scans.request(again);
                    }
                }
                // Room in the queue again: hand one over now, the rest below.
                permit = self.ready_tx.reserve(), if !st.ready.is_empty() => {
                    let Ok(permit) = permit else { return };
                    if let Some(c) = st.ready.pop_front() {
                        st.queued.remove(&c.path);
                        permit.send(c);
                    }
                }
                _ = rescan.tick() => {
                    tracing::debug!("periodic rescan");
                    roots_checked = Instant::now();
                    add_watches(&mut watcher, &roots, &mut watched);
                    st.scans.request(roots.clone());
                }
            }
            // Hand over what is ready while the queue has room.
            while !st.ready.is_empty() {
                match self.ready_tx.try_reserve() {
                    Ok(permit) => {
                        if let Some(c) = st.ready.pop_front() {
                            st.queued.remove(&c.path);
                            permit.send(c);
                        }
                    }
                    Err(mpsc::error::TrySendError::Full(())) => break,
                    Err(mpsc::error::TrySendError::Closed(())) => return,
                }
            }
        }
    }

    /// Takes `first` and what else the scan has found so far, up to
    /// [`SCAN_READY_HIGH`] files waiting in `ready`. Scanned files untouched
    /// for `settle` skip the wait: they are ready at once unless some
    /// process has them open for writing.
    fn take_scanned(&self, first: PathBuf, st: &mut State) {
        let mut settled = Vec::new();
        self.found(first, st, &mut settled);
        while st.ready.len() + settled.len() < SCAN_READY_HIGH {
            let Some(rx) = st.scans.current.as_mut() else {
                break;
            };
            match rx.try_recv() {
                Ok(path) => self.found(path, st, &mut settled),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    st.scans.finished();
                    break;
                }
            }
        }
        if settled.is_empty() {
            return;
        }
        let writers = open_for_writing();
        let now = Instant::now();
        for (path, watch, rel, v) in settled {
            if writers.contains(&(v.dev, v.ino)) {
                let mut p = Pending::new(watch, false, now);
                p.last = Some(v);
                st.waiting.insert(path, p);
            } else {
                st.make_ready(Candidate { watch, path, rel });
            }
        }
    }

    /// A file a scan found: history unknown.
    fn found(
        &self,
        path: PathBuf,
        st: &mut State,
        settled: &mut Vec<(PathBuf, usize, PathBuf, FileVersion)>,
    ) {
        if st.waiting.contains_key(&path) || st.queued.contains(&path) {
            return;
        }
        let Some((watch, rel)) = self.locate(&path) else {
            return;
        };
        if !self.filters[watch].accepts(&rel) {
            return;
        }
        if let Ok(meta) = std::fs::symlink_metadata(&path)
            && meta.is_file()
            && untouched(&meta) >= self.watches[watch].settle
        {
            settled.push((path, watch, rel, FileVersion::of(&meta)));
            return;
        }
        if st.room_for(&path) {
            st.waiting
                .insert(path, Pending::new(watch, false, Instant::now()));
        }
    }

    fn intake(&self, item: Intake, st: &mut State) {
        match item {
            Intake::Rescan => {
                tracing::warn!(
                    "file events were lost (queue overflow); rescanning every watched folder"
                );
                st.scans.request(self.roots());
            }
            Intake::Folder(path) => {
                if let Some((i, rel)) = self.locate(&path)
                    && !self.filters[i].skips_dir(&rel)
                {
                    st.scans.request([path]);
                }
            }
            Intake::Removed(path) => {
                st.waiting.remove(&path);
            }
            Intake::Changed { path, closed } => {
                let Some((watch, rel)) = self.locate(&path) else {
                    return;
                };
                if !self.filters[watch].accepts(&rel) || !st.room_for(&path) {
                    return;
                }
                let now = Instant::now();
                let p = st
                    .waiting
                    .entry(path)
                    .or_insert_with(|| Pending::new(watch, closed, now));
                // Not (yet) closed after writing: ready anyway once quiet
                // and no process has it open for writing. A chmod or touch
                // after the close sends no second close.
                p.closed = closed;
                p.check_writers = !closed;
                p.stable_since = now;
            }
        }
    }

    /// Moves files that are finished from `waiting` to `ready`.
    fn settle(&self, st: &mut State) {
        let now = Instant::now();
        let mut writers: Option<HashSet<(u64, u64)>> = None;
        let mut done: Vec<PathBuf> = Vec::new();
        let mut ready: Vec<Candidate> = Vec::new();
        for (path, p) in st.waiting.iter_mut() {
            if p.not_before > now {
                continue;
            }
            // lstat: symbolic links are never followed.
            let meta = match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_file() => m,
                Ok(m) => {
                    if m.file_type().is_symlink() {
                        tracing::info!(path = ?path, "symbolic link; not followed, skipped");
                    }
                    done.push(path.clone()); // a folder, FIFO, socket or device
                    continue;
                }
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = ?path, error = %e, "cannot look at file; skipped");
                    } else if p.requeued
                        && let Some((watch, rel)) = self.locate(path)
                    {
                        // The agent closes its record of a file that is gone.
                        ready.push(Candidate {
                            watch,
                            path: path.clone(),
                            rel,
                        });
                    }
                    done.push(path.clone());
                    continue;
                }
            };
            let v = FileVersion::of(&meta);
            let settle = self.watches[p.watch].settle;
            if p.last != Some(v) {
                // First look, or it changed: stable from now on. A scanned
                // file untouched for `settle` is stable since its mtime.
                p.stable_since =
                    if p.last.is_none() && p.check_writers && untouched(&meta) >= settle {
                        now.checked_sub(settle).unwrap_or(now)
                    } else {
                        now
                    };
                p.last = Some(v);
                if p.stable_since == now {
                    continue;
                }
            }
            if !(p.closed || p.check_writers) || now.duration_since(p.stable_since) < settle {
                continue;
            }
            if p.check_writers {
                let w = writers.get_or_insert_with(open_for_writing);
                if w.contains(&(meta.dev(), meta.ino())) {
                    p.stable_since = now;
                    continue;
                }
            }
            done.push(path.clone());
            if let Some((watch, rel)) = self.locate(path) {
                ready.push(Candidate {
                    watch,
                    path: path.clone(),
                    rel,
                });
            }
        }
        for path in done {
            st.waiting.remove(&path);
        }
        for c in ready {
            st.make_ready(c);
        }
    }
}

/// How long ago the file was last modified (zero if in the future).
fn untouched(meta: &std::fs::Metadata) -> Duration {
    std::time::SystemTime::now()
        .duration_since(meta.modified().unwrap_or(std::time::UNIX_EPOCH))
        .unwrap_or_default()
}

fn make_watcher(tx: mpsc::Sender<Intake>) -> notify::Result<notify::RecommendedWatcher> {
    notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let items = match res {
            Ok(event) => classify(event),
            Err(e) => {
                tracing::warn!(error = %e, "file notification error; rescanning");
                vec![Intake::Rescan]
            }
        };
        for item in items {
            // Blocking here makes the kernel queue fill up rather than
            // memory; an overflow is answered with a rescan.
            if tx.blocking_send(item).is_err() {
                return;
            }
        }
    })
}

fn classify(event: notify::Event) -> Vec<Intake> {
    if event.need_rescan() {
        return vec![Intake::Rescan];
    }
    let paths = event.paths;
    let changed = |closed| {
        paths
            .iter()
            .map(|p| Intake::Changed {
                path: p.clone(),
                closed,
            })
            .collect::<Vec<_>>()
    };
    match event.kind {
        EventKind::Create(CreateKind::Folder) => paths.into_iter().map(Intake::Folder).collect(),
        EventKind::Create(_)
        | EventKind::Modify(ModifyKind::Data(_))
        | EventKind::Modify(ModifyKind::Any) => changed(false),
        EventKind::Modify(ModifyKind::Metadata(_)) => changed(false),
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => changed(true),
        EventKind::Access(_) => vec![],
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
            paths.into_iter().map(Intake::Removed).collect()
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            let mut out = Vec::new();
            let mut it = paths.into_iter();
            if let Some(from) = it.next() {
                out.push(Intake::Removed(from));
            }
            out.extend(it.map(renamed_in));
            out
        }
        EventKind::Modify(ModifyKind::Name(_)) => paths.into_iter().map(renamed_in).collect(),
        EventKind::Remove(_) => paths.into_iter().map(Intake::Removed).collect(),
        _ => changed(false),
    }
}

/// Something was renamed to `path`: a finished file, or a whole folder.
fn renamed_in(path: PathBuf) -> Intake {
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => Intake::Folder(path),
        Ok(_) => Intake::Changed { path, closed: true },
        Err(_) => Intake::Removed(path),
    }
}

/// Watches every root that is not watched yet, or that was removed and
/// recreated since (a new inode needs a new watch). Returns the roots that
/// were watched again after being lost: their files need a scan.
fn add_watches(
    watcher: &mut Option<notify::RecommendedWatcher>,
    roots: &[PathBuf],
    watched: &mut HashMap<PathBuf, Option<(u64, u64)>>,
) -> Vec<PathBuf> {
    let mut again = Vec::new();
    for root in roots {
        let id = std::fs::metadata(root)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| (m.dev(), m.ino()));
        let known = watched.get(root).copied();
        if id.is_some() && known == Some(id) {
            continue;
        }
        if id.is_none() {
            if known.flatten().is_some() {
                tracing::warn!(folder = ?root, "watched folder is gone; watching for it to come back");
            }
            watched.insert(root.clone(), None);
            continue;
        }
        let Some(w) = watcher.as_mut() else {
            watched.insert(root.clone(), id);
            continue;
        };
        if known.flatten().is_some() {
            let _ = w.unwatch(root);
        }
        match w.watch(root, RecursiveMode::Recursive) {
            Ok(()) => {
                if known.is_some() {
                    tracing::info!(folder = ?root, "watched folder is back; watching and scanning it");
                    again.push(root.clone());
                }
                watched.insert(root.clone(), id);
            }
            Err(e) => {
                watched.insert(root.clone(), None);
                tracing::warn!(folder = ?root, error = %e, "cannot watch folder; will try again shortly");
            }
        }
    }
    again
}

/// Walks `roots` off the runtime and reports every regular file found. The
/// walk waits while its small channel is full, so it goes only as fast as
/// the watcher takes its files.
fn spawn_scan(roots: Vec<PathBuf>) -> mpsc::Receiver<PathBuf> {
    let (tx, rx) = mpsc::channel(256);
    tokio::task::spawn_blocking(move || {
        for root in roots {
            for entry in walkdir::WalkDir::new(&root).follow_links(false) {
                match entry {
                    Ok(e) if e.file_type().is_file() => {
                        if tx.blocking_send(e.into_path()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "scan: cannot read"),
                }
            }
        }
    });
    rx
}

/// (device, inode) of every regular file some process has open for writing,
/// as far as /proc shows (all of them for root, our own user's otherwise).
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
    use crate::config::{AfterUpload, DEFAULT_EXCLUDES};

    fn watch(include: &[&str], exclude: &[&str]) -> WatchSettings {
        let mut ex: Vec<String> = exclude.iter().map(|s| s.to_string()).collect();
        ex.extend(DEFAULT_EXCLUDES.iter().map(|s| s.to_string()));
        WatchSettings {
            path: PathBuf::from("/w"),
            prefix: "foo/".into(),
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: ex,
            settle: Duration::from_millis(100),
            after_upload: AfterUpload::Keep,
        }
    }

    #[test]
    fn filters_follow_defaults_and_patterns() {
        let f = Filter::new(&watch(&[], &["*.lock"]));
        assert!(f.accepts(Path::new("a.csv")));
        assert!(f.accepts(Path::new("d/e/a.csv")));
        for rejected in [
            "x.tmp",
            ".hidden",
            "d/.git/config",
            "a.part",
            "a~",
            ".a.swp",
            "b.lock",
            "d/b.lock",
        ] {
            assert!(!f.accepts(Path::new(rejected)), "{rejected}");
        }
        let f = Filter::new(&watch(&["**/*.csv"], &[]));
        assert!(f.accepts(Path::new("a.csv")));
        assert!(f.accepts(Path::new("x/y/a.csv")));
        assert!(!f.accepts(Path::new("a.json")));
    }

    #[test]
    fn a_file_open_for_writing_is_seen() {
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

    fn watcher_of(dir: &Path) -> Watch {
        let mut w = watch(&[], &[]);
        w.path = dir.to_path_buf();
        let (ready_tx, _ready_rx) = mpsc::channel(16);
        let (_rq_tx, rq_rx) = mpsc::unbounded_channel();
        Watch::new(vec![w], Duration::from_secs(3600), ready_tx, rq_rx)
    }

    /// Runs the scans asked for to their end the way [`Watch::run`] does,
    /// with an agent that takes 100 files whenever the watcher pauses the
    /// scan. Returns every path handed over or still settling, and the most
    /// files `ready` ever held.
    async fn drain_scans(w: &Watch, st: &mut State) -> (HashSet<PathBuf>, usize) {
        let mut handed = HashSet::new();
        let mut most = 0;
        while st.scans.current.is_some() {
            if st.wants_scan_output() {
                match st.scans.recv().await {
                    Some(path) => w.take_scanned(path, st),
                    None => st.scans.finished(),
                }
                most = most.max(st.ready.len());
            } else {
                for _ in 0..100 {
                    if let Some(c) = st.ready.pop_front() {
                        st.queued.remove(&c.path);
                        handed.insert(c.path);
                    }
                }
            }
        }
        handed.extend(st.ready.drain(..).map(|c| c.path));
        handed.extend(st.waiting.keys().cloned());
        (handed, most)
    }

    #[tokio::test]
    async fn an_overflow_ends_in_a_rescan_that_finds_unannounced_files() {
        use notify::event::Flag;
        // What notify reports when the kernel queue overflowed.
        let overflow = notify::Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert!(matches!(classify(overflow)[..], [Intake::Rescan]));

        // Files no event announced are found by the rescan it triggers.
        let dir = tempfile::tempdir().unwrap();
        for i in 0..50 {
            std::fs::write(dir.path().join(format!("lost-{i}.dat")), b"x").unwrap();
        }
        let w = watcher_of(dir.path());
        let mut st = State::default();
        w.intake(Intake::Rescan, &mut st);
        let (handed, _) = drain_scans(&w, &mut st).await;
        assert_eq!(handed.len(), 50, "every file is on its way");
    }

    #[tokio::test]
    async fn a_scan_of_a_big_folder_holds_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * SCAN_READY_HIGH + 17;
        for i in 0..n {
            std::fs::write(dir.path().join(format!("f{i:05}")), b"x").unwrap();
        }
        // Old enough to be settled at once.
        std::thread::sleep(Duration::from_millis(150));
        let w = watcher_of(dir.path());
        let mut st = State::default();
        st.scans.request([dir.path().to_path_buf()]);
        // Rescans asked for meanwhile wait for this one, and merge.
        st.scans.request([dir.path().to_path_buf()]);
        st.scans.request([dir.path().join("sub")]);
        assert_eq!(st.scans.next, vec![dir.path().to_path_buf()]);

        let (handed, most) = drain_scans(&w, &mut st).await;
        assert_eq!(handed.len(), n, "every file was handed over");
        assert!(most <= SCAN_READY_HIGH, "{most} files held at once");
        assert!(
            most >= SCAN_READY_LOW,
            "the scan went ahead of the agent ({most})"
        );
        assert!(st.waiting.is_empty());
    }

    #[test]
    fn news_of_more_files_than_can_be_tracked_ends_in_a_rescan() {
        let w = watcher_of(Path::new("/w"));
        let mut st = State::default();
        for i in 0..MAX_WAITING + 10 {
            let path = PathBuf::from(format!("/w/f{i}"));
            w.intake(Intake::Changed { path, closed: true }, &mut st);
        }
        assert_eq!(st.waiting.len(), MAX_WAITING);
        assert!(st.dropped, "a rescan is due");
        // News of a file already tracked still counts.
        w.intake(
            Intake::Changed {
                path: PathBuf::from("/w/f0"),
                closed: false,
            },
            &mut st,
        );
        assert!(!st.waiting[Path::new("/w/f0")].closed);
    }

    #[tokio::test]
    async fn finished_files_become_ready_and_open_ones_wait() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("before.txt"), b"old").unwrap();
        let mut w = watch(&[], &[]);
        w.path = root.clone();
        let (ready_tx, mut ready_rx) = mpsc::channel(16);
        let (_rq_tx, rq_rx) = mpsc::unbounded_channel();
        let task =
            tokio::spawn(Watch::new(vec![w], Duration::from_secs(3600), ready_tx, rq_rx).run());

        let got = tokio::time::timeout(Duration::from_secs(5), ready_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.rel, PathBuf::from("before.txt"));

        // Written slowly: not ready while open, ready after close + settle.
        let mut slow = std::fs::File::create(root.join("slow.bin")).unwrap();
        std::fs::create_dir_all(root.join("new/nested")).unwrap();
        std::fs::write(root.join("new/nested/n.txt"), b"nested").unwrap();
        std::fs::write(root.join("skip.tmp"), b"tmp").unwrap();
        for _ in 0..5 {
            slow.write_all(&[1; 1000]).unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let got = tokio::time::timeout(Duration::from_secs(5), ready_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.rel, PathBuf::from("new/nested/n.txt"));
        assert!(ready_rx.try_recv().is_err(), "slow.bin is still open");
        drop(slow);
        let got = tokio::time::timeout(Duration::from_secs(5), ready_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.rel, PathBuf::from("slow.bin"));
        assert_eq!(std::fs::metadata(&got.path).unwrap().len(), 5000);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(ready_rx.try_recv().is_err(), "skip.tmp must never be ready");
        task.abort();
    }
}
