//! Folders and files the agent's user may not read yet.
//!
//! Producers' tools often give a folder or a file its real mode last: GNU
//! tar (`-p`, or as root), `cp -a` and rsync make each folder owner-only
//! while they fill it and open it up at the end; `rsync --inplace` writes
//! a file owner-only and sets its mode after the close. An agent that is
//! not the owner is refused (`EACCES`) in between. This module owns the
//! list of what was refused: when each is tried again (after [`FIRST_TRY`],
//! doubling up to [`LAST_TRY`]: seconds, never the rescan interval), the
//! one warning when a path starts being refused and the one line when it
//! is readable again, the `putonly_unreadable` gauge, and the summary that
//! `putonly status` shows (written into the journal by the agent's
//! housekeeping, read back by `status`). The watcher tries a folder again
//! sooner when its parent tells of a change to its mode, owner or ACL
//! (`IN_ATTRIB`); a file is tried again on any news of it.
//!
//! It never opens, lists or watches anything itself, and never decides
//! what is sent: the walk, the watcher and the agent report to it, and ask
//! it when to try again. Its memory is bounded: at most [`MAX_TRACKED`]
//! paths of each kind are remembered; beyond that, files are still tried
//! again (at [`LAST_TRY`]) and folders at every rescan, but neither is
//! listed, and the log says so once. Its costs are bounded too: nothing
//! but a lock and a length check while nothing is refused (every removed
//! file asks it), ordered maps so that what lies below a folder is one
//! range, and at most [`DUE_AT_ONCE`] folders handed out per look.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first wait before a refused path is tried again.
pub const FIRST_TRY: Duration = Duration::from_secs(1);
/// The longest wait between two tries.
pub const LAST_TRY: Duration = Duration::from_secs(30);
/// At most this many paths of each kind are remembered.
pub const MAX_TRACKED: usize = 10_000;
/// A path nobody reported for this long is forgotten (it went away, or
/// became readable where no one looked): the list shows only what lasts.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// At most this many paths are listed in the summary for `status`.
const SHOWN: usize = 20;
/// At most this many folders are handed out to be walked again at once
/// (the rest the next time).
pub const DUE_AT_ONCE: usize = 256;

/// The gauge of paths refused now, by `kind` (`folder` or `file`).
pub const GAUGE: &str = "putonly_unreadable";

/// What was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A folder that cannot be opened, listed or watched.
    Folder,
    /// A file that cannot be opened for reading.
    File,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Folder => "folder",
            Kind::File => "file",
        }
    }
}

/// Whether an error is a refusal this module follows (the permission
/// bits, an ACL or a security module said no), rather than a fault.
pub fn is_refusal(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM))
}

struct Entry {
    /// Unix seconds of the first refusal.
    since: i64,
    tries: u32,
    /// When it may be tried again.
    next: Instant,
    /// When it was last reported refused.
    reported: Instant,
    error: String,
}

#[derive(Default)]
struct Kinds {
    paths: BTreeMap<PathBuf, Entry>,
    /// [`MAX_TRACKED`] reached (said once).
    full: bool,
    /// No entry is due before this (so that looking costs nothing).
    next_due: Option<Instant>,
}

impl Kinds {
    /// The paths at or below `folder` (one range: paths order component
    /// by component).
    fn below<'a>(&'a self, folder: &'a Path) -> impl Iterator<Item = &'a PathBuf> + 'a {
        self.paths
            .range(folder.to_path_buf()..)
            .map(|(p, _)| p)
            .take_while(move |p| p.starts_with(folder))
    }

    fn soonest(&mut self, at: Instant) {
        self.next_due = Some(self.next_due.map_or(at, |d| d.min(at)));
    }
}

#[derive(Default)]
struct Inner {
    folders: Kinds,
    files: Kinds,
    /// Bumped at every change of what is listed.
    generation: u64,
}

impl Inner {
    fn of(&mut self, kind: Kind) -> &mut Kinds {
        match kind {
            Kind::Folder => &mut self.folders,
            Kind::File => &mut self.files,
        }
    }

    fn changed(&mut self) {
        self.generation += 1;
        metrics::gauge!(GAUGE, "kind" => "folder").set(self.folders.paths.len() as f64);
        metrics::gauge!(GAUGE, "kind" => "file").set(self.files.paths.len() as f64);
    }
}

/// The paths refused now; shared by the walk's reader (the watcher) and
/// the agent.
#[derive(Default)]
pub struct Denied {
    inner: Mutex<Inner>,
}

/// One path of the summary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Item {
    pub kind: Kind,
    pub path: PathBuf,
    /// Unix seconds of the first refusal.
    pub since: i64,
    pub error: String,
}

/// What `putonly status` shows: how many paths of each kind are refused
/// now, and the oldest of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub folders: u64,
    pub files: u64,
    /// The `SHOWN` oldest, folders first.
    pub oldest: Vec<Item>,
}

impl Summary {
    /// The journal's `meta` entry the agent keeps it in.
    pub const META: &'static str = "unreadable";

    pub fn is_empty(&self) -> bool {
        self.folders == 0 && self.files == 0
    }
}

impl Denied {
    pub fn new() -> Self {
        Denied::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `path` was refused (`error`): returns how long to wait before the
    /// next try, or `None` when so many are refused that it is not
    /// remembered (a folder is then left to the rescans; a file is tried
    /// again after [`LAST_TRY`]). The first refusal of a path is logged;
    /// later ones are not.
    pub fn refused(&self, kind: Kind, path: &Path, error: &str) -> Option<Duration> {
        let now = Instant::now();
        let mut inner = self.lock();
        let k = inner.of(kind);
        if let Some(e) = k.paths.get_mut(path) {
            e.tries = e.tries.saturating_add(1);
            let wait = backoff(e.tries);
            e.next = now + wait;
            e.reported = now;
            e.error = error.to_string();
            k.soonest(now + wait);
            return Some(wait);
        }
        if k.paths.len() >= MAX_TRACKED {
            if !k.full {
                k.full = true;
                tracing::warn!(
                    kind = kind.label(),
                    tracked = MAX_TRACKED,
                    "so many paths cannot be read that no more are listed or warned about; files are still tried again every {}s, folders at every rescan",
                    LAST_TRY.as_secs()
                );
            }
            return None;
        }
        let wait = backoff(0);
        k.soonest(now + wait);
        k.paths.insert(
            path.to_path_buf(),
            Entry {
                since: crate::ground::now(),
                tries: 0,
                next: now + wait,
                reported: now,
                error: error.to_string(),
            },
        );
        match kind {
            Kind::Folder => tracing::warn!(
                folder = ?path,
                error,
                "cannot read this folder yet (its siblings are watched); tried again as soon as its mode, owner or ACL changes, and every few seconds; putonly status lists it while it lasts"
            ),
            Kind::File => tracing::warn!(
                path = ?path,
                error,
                "cannot read this file yet; tried again as soon as it changes, and every few seconds; putonly status lists it while it lasts"
            ),
        }
        inner.changed();
        Some(wait)
    }

    /// `path` was read (a folder listed, a file opened): no longer refused.
    pub fn readable(&self, kind: Kind, path: &Path) {
        let mut inner = self.lock();
        let Some(e) = inner.of(kind).paths.remove(path) else {
            return;
        };
        let waited = crate::ground::now().saturating_sub(e.since);
        match kind {
            Kind::Folder => {
                tracing::info!(folder = ?path, waited_s = waited, "folder readable now; watched and scanned")
            }
            Kind::File => {
                tracing::info!(path = ?path, waited_s = waited, "file readable now")
            }
        }
        inner.changed();
    }

    /// `path`, and everything below it, went away.
    pub fn gone(&self, path: &Path) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut changed = false;
        for k in [&mut inner.folders, &mut inner.files] {
            if k.paths.is_empty() {
                continue;
            }
            let below: Vec<PathBuf> = k.below(path).cloned().collect();
            for p in below {
                changed |= k.paths.remove(&p).is_some();
            }
        }
        if changed {
            inner.changed();
        }
    }

    /// Whether `path` is refused now.
    pub fn contains(&self, kind: Kind, path: &Path) -> bool {
        self.lock().of(kind).paths.contains_key(path)
    }

    /// Whether nothing is refused now (cheap: checked before any work).
    pub fn is_empty(&self) -> bool {
        let inner = self.lock();
        inner.folders.paths.is_empty() && inner.files.paths.is_empty()
    }

    /// The folders whose next try has come, at most [`DUE_AT_ONCE`]. Each
    /// is not handed out again until it is reported (refused or readable)
    /// or [`LAST_TRY`] passed.
    pub fn folders_due(&self, now: Instant) -> Vec<PathBuf> {
        let mut inner = self.lock();
        let k = &mut inner.folders;
        if k.next_due.is_none_or(|d| d > now) {
            return Vec::new();
        }
        let mut due = Vec::new();
        let mut soonest: Option<Instant> = None;
        for (path, e) in k.paths.iter_mut() {
            if e.next <= now && due.len() < DUE_AT_ONCE {
                e.next = now + LAST_TRY;
                due.push(path.clone());
            }
            soonest = Some(soonest.map_or(e.next, |s| s.min(e.next)));
        }
        k.next_due = soonest;
        due
    }

    /// The refused folders and files at or below `folder` (whose mode,
    /// owner or ACL changed), to be tried again now.
    pub fn below(&self, folder: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let inner = self.lock();
        (
            inner.folders.below(folder).cloned().collect(),
            inner.files.below(folder).cloned().collect(),
        )
    }

    /// A number that changes whenever what is listed does.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Forgets what nobody reported for a long while.
    pub fn prune(&self, now: Instant) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let before = inner.folders.paths.len() + inner.files.paths.len();
        for k in [&mut inner.folders, &mut inner.files] {
            k.paths
                .retain(|_, e| now.saturating_duration_since(e.reported) < FORGET_AFTER);
            k.next_due = k.paths.values().map(|e| e.next).min();
            if k.paths.len() < MAX_TRACKED / 2 {
                k.full = false;
            }
        }
        if inner.folders.paths.len() + inner.files.paths.len() != before {
            inner.changed();
        }
    }

    /// The summary for `status`, with [`Denied::generation`] as it is.
    pub fn summary(&self) -> (u64, Summary) {
        let inner = self.lock();
        let mut oldest = Vec::new();
        for (kind, k) in [(Kind::Folder, &inner.folders), (Kind::File, &inner.files)] {
            let mut items: Vec<Item> = k
                .paths
                .iter()
                .map(|(p, e)| Item {
                    kind,
                    path: p.clone(),
                    since: e.since,
                    error: e.error.clone(),
                })
                .collect();
            items.sort_by(|a, b| (a.since, &a.path).cmp(&(b.since, &b.path)));
            oldest.extend(items.into_iter().take(SHOWN - oldest.len().min(SHOWN)));
        }
        (
            inner.generation,
            Summary {
                folders: inner.folders.paths.len() as u64,
                files: inner.files.paths.len() as u64,
                oldest,
            },
        )
    }
}

/// The wait after `tries` earlier tries: [`FIRST_TRY`], doubling, at most
/// [`LAST_TRY`].
fn backoff(tries: u32) -> Duration {
    FIRST_TRY
        .saturating_mul(1u32 << tries.min(16))
        .min(LAST_TRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_back_off_from_a_second_to_half_a_minute() {
        let d = Denied::new();
        let p = Path::new("/w/a");
        let waits: Vec<u64> = (0..8)
            .filter_map(|_| d.refused(Kind::Folder, p, "Permission denied"))
            .map(|w| w.as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(d.contains(Kind::Folder, p));
        assert!(!d.contains(Kind::File, p));
        d.readable(Kind::Folder, p);
        assert!(d.is_empty());
        // Refused again later: from the first wait again.
        assert_eq!(d.refused(Kind::Folder, p, "x"), Some(FIRST_TRY));
    }

    #[test]
    fn due_folders_are_handed_out_once_until_reported() {
        let d = Denied::new();
        d.refused(Kind::Folder, Path::new("/w/a"), "x");
        let now = Instant::now();
        assert!(d.folders_due(now).is_empty(), "not before a second");
        let later = now + Duration::from_secs(2);
        assert_eq!(d.folders_due(later), vec![PathBuf::from("/w/a")]);
        assert!(d.folders_due(later).is_empty(), "handed out once");
        assert_eq!(
            d.folders_due(later + LAST_TRY),
            vec![PathBuf::from("/w/a")],
            "unless nobody reported for LAST_TRY"
        );
    }

    #[test]
    fn a_folder_gone_takes_what_is_below_it_and_the_summary_follows() {
        let d = Denied::new();
        let (g0, _) = d.summary();
        d.refused(Kind::Folder, Path::new("/w/a"), "x");
        d.refused(Kind::Folder, Path::new("/w/a/b"), "x");
        d.refused(Kind::File, Path::new("/w/a/f"), "x");
        d.refused(Kind::File, Path::new("/w/other"), "x");
        let (g1, s) = d.summary();
        assert!(g1 > g0);
        assert_eq!((s.folders, s.files, s.oldest.len()), (2, 2, 4));
        assert_eq!(s.oldest[0].kind, Kind::Folder);
        assert_eq!(
            d.below(Path::new("/w/a")),
            (
                vec![PathBuf::from("/w/a"), PathBuf::from("/w/a/b")],
                vec![PathBuf::from("/w/a/f")]
            )
        );
        // Not a sibling whose name merely starts the same.
        d.refused(Kind::File, Path::new("/w/ab"), "x");
        assert_eq!(d.below(Path::new("/w/a")).1, vec![PathBuf::from("/w/a/f")]);
        d.gone(Path::new("/w/ab"));
        d.gone(Path::new("/w/a"));
        let (g2, s) = d.summary();
        assert!(g2 > g1);
        assert_eq!((s.folders, s.files), (0, 1));
        // Nothing changed: the same number.
        d.gone(Path::new("/w/nothing"));
        assert_eq!(d.summary().0, g2);
        // What nobody reported for long is forgotten.
        d.prune(Instant::now() + FORGET_AFTER);
        assert!(d.is_empty());
    }

    #[test]
    fn at_most_max_tracked_paths_are_listed() {
        let d = Denied::new();
        for i in 0..MAX_TRACKED + 5 {
            d.refused(Kind::File, Path::new(&format!("/w/f{i}")), "x");
        }
        let (_, s) = d.summary();
        assert_eq!(s.files, MAX_TRACKED as u64);
        assert_eq!(s.oldest.len(), SHOWN);
        // Untracked paths are not remembered (the caller tries again).
        assert_eq!(d.refused(Kind::File, Path::new("/w/more"), "x"), None);
    }
}
