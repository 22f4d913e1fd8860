//! Watching: which files in the watched folders are finished and ready to
//! send.
//!
//! Sources of news are the kernel's events ([`crate::watch::events`]: one inotify
//! watch per folder, added by descriptor) and walks ([`crate::watch::walk`]: every
//! folder opened beneath its watched folder, watched, then listed; no link
//! followed anywhere): a walk at start-up, one of every folder that
//! appears, a periodic one and one after the event queue overflowed. What a
//! file's events said about its writers
//! ([`Writers`]) decides, with the watch's [`Rule`], when it is ready:
//! under the lease rule once nothing changed for `settle` (the agent then
//! asks the kernel for a lease, and hands the file back if a writer has it
//! open); under the weak rule a file seen being written only once its
//! writer closed it or it was renamed in, and a file found by a scan only
//! after a longer quiet time with no writer in `/proc` (see
//! [`crate::watch::writers`]). Each [`Candidate`] carries the version that was
//! judged finished, and a file handed back keeps what was known of its
//! writers. Temporary and hidden files never become ready. This module never
//! opens a file for reading, never talks to the journal and never uploads:
//! it hands candidates to the agent through a bounded queue, and holds the
//! rest back when that queue is full.
//!
//! Its memory is bounded whatever the folders hold: one scan runs at a time
//! and pauses while [`SCAN_READY_HIGH`] files it found wait to be handed
//! over, and at most [`MAX_WAITING`] files are tracked while they settle
//! (news of more is dropped and a rescan finds those files later, exactly
//! as after a kernel queue overflow). It never holds a list of all files.

pub mod denied;
pub mod events;
pub mod files;
pub mod lease;
pub mod walk;
pub mod writers;

mod intake;
mod judge;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::{Filter, WatchSettings};
use crate::ground::FileVersion;
use denied::{Denied, Kind};
use events::{Change, Events, Intake};
use files::OpenError;
use judge::*;
use walk::{Found, Tree, Unreadable};
pub use writers::{Rule, Writers};
use writers::{Support, open_for_writing, weak_scan_quiet};

/// How often the watched folders themselves are checked for having been
/// removed or recreated.
const ROOT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// At most this many files found by a scan wait to be handed to the agent;
/// the scan then pauses until the agent has taken half of them.
pub const SCAN_READY_HIGH: usize = 4096;
const SCAN_READY_LOW: usize = SCAN_READY_HIGH / 2;

/// At most this many finished files wait to be handed to the agent; files
/// judged beyond that stay tracked while they settle and are judged again.
pub const READY_MAX: usize = SCAN_READY_HIGH * 2;

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
    /// The version judged finished; `None` when a file the agent handed
    /// back is gone (the agent then closes its record).
    pub version: Option<FileVersion>,
    /// What was known of its writers when it was judged.
    pub writers: Writers,
    /// The rule it was judged by: under [`Rule::Lease`] the agent must
    /// hold a lease on it while sending.
    pub rule: Rule,
}

/// A file the agent hands back to be judged again later: it differs from
/// the version judged finished, a writer has it open, it changed during its
/// upload, or a transient failure asks for a pause.
#[derive(Debug, Clone)]
pub struct Requeue {
    pub path: PathBuf,
    pub not_before: Instant,
    /// What the agent learned of its writers (or the candidate's knowledge,
    /// unchanged). News the watcher had since the hand-over wins.
    pub writers: Writers,
    /// The agent's user may not open it yet ([`crate::watch::denied`]): any news
    /// of it (a chmod, say) ends the wait at once.
    pub refused: bool,
}

struct Pending {
    watch: usize,
    last: Option<FileVersion>,
    stable_since: Instant,
    writers: Writers,
    not_before: Instant,
    /// Handed back by the agent: it has a record of this path, so it must
    /// hear about it again even if the file is gone by now.
    requeued: bool,
    /// When it is to be looked at next, if that is in [`State::due`].
    due: Option<Instant>,
    /// News of it came since the last look: a change the last look did not
    /// see has a local time (the news), not only its own timestamps.
    news: bool,
    /// When the agent was last told it is growing (`stream = true`).
    growing_told: Option<Instant>,
    /// Waiting because the agent's user may not read it yet: news of it
    /// ends the wait (see [`crate::watch::denied`]).
    refused: bool,
}

impl Pending {
    fn new(watch: usize, writers: Writers, now: Instant) -> Self {
        Pending {
            watch,
            last: None,
            stable_since: now,
            writers,
            not_before: now,
            requeued: false,
            due: None,
            news: false,
            growing_told: None,
            refused: false,
        }
    }

    /// The earliest it can be judged finished: quiet for `settle` (the
    /// shortest quiet time of any rule) and not before the agent asked.
    fn earliest(&self, settle: Duration) -> Instant {
        self.not_before.max(self.stable_since + settle)
    }
}

/// When files are to be looked at: each file once, at the moment it may be
/// finished, so that it is taken then and not at the next periodic pass.
#[derive(Default)]
struct Due(BinaryHeap<Reverse<(Instant, PathBuf)>>);

impl Due {
    /// Asks for `path` to be looked at `at`, unless it is already to be
    /// looked at no later (that look asks again if it is too early).
    fn at(&mut self, path: &Path, p: &mut Pending, at: Instant) {
        if p.due.is_some_and(|d| d <= at) {
            return;
        }
        p.due = Some(at);
        self.0.push(Reverse((at, path.to_path_buf())));
    }

    fn next(&self) -> Option<Instant> {
        self.0.peek().map(|Reverse((t, _))| *t)
    }

    /// The paths due by `now` whose look is still wanted (a file judged
    /// meanwhile, or asked for earlier, leaves its entry behind).
    fn take(&mut self, now: Instant, waiting: &mut HashMap<PathBuf, Pending>) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        while let Some(Reverse((t, _))) = self.0.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((t, path))) = self.0.pop() else {
                break;
            };
            if let Some(p) = waiting.get_mut(&path)
                && p.due == Some(t)
            {
                p.due = None;
                paths.push(path);
            }
        }
        paths
    }

    /// Entries left behind by files no longer waiting are dropped once
    /// they outnumber those waiting, so the heap stays bounded by them.
    fn trim(&mut self, waiting: &HashMap<PathBuf, Pending>) {
        if self.0.len() > 2 * waiting.len() + 1024 {
            self.0
                .retain(|Reverse((t, path))| waiting.get(path).is_some_and(|p| p.due == Some(*t)));
        }
    }
}

/// Scans, one at a time: the walk in progress (paused by back-pressure
/// while the agent is busy) and the folders waiting for the next walk.
#[derive(Default)]
struct Scans {
    /// The watched folders and their filters, for the walks.
    trees: Arc<Vec<Tree>>,
    /// Where walks add a watch on each folder (none in unit tests, or where
    /// notifications cannot be had).
    events: Option<Arc<Events>>,
    current: Option<mpsc::Receiver<Found>>,
    /// What the walk in progress started from.
    running: Vec<PathBuf>,
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
            self.running = std::mem::take(&mut self.next);
            self.current = Some(walk::spawn(
                self.running.clone(),
                self.trees.clone(),
                self.events.clone(),
            ));
        }
    }

    /// Whether `folder` is being walked, or waits for a walk.
    fn walking(&self, folder: &Path) -> bool {
        self.current.is_some() && self.running.iter().any(|r| folder.starts_with(r))
            || self.next.iter().any(|n| folder.starts_with(n))
    }

    /// The next find of the walk in progress; `None` once it ended.
    async fn recv(&mut self) -> Option<Found> {
        match self.current.as_mut() {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// The walk in progress ended: start the next one, if asked for.
    fn finished(&mut self) {
        self.current = None;
        if let Some(events) = &self.events {
            tracing::debug!(folders = events.watched(), "walk finished");
        }
        self.request([]);
    }
}

/// What the watcher holds between events; bounded (see the module doc).
#[derive(Default)]
struct State {
    /// Files that are changing or settling.
    waiting: HashMap<PathBuf, Pending>,
    /// When each of them is to be looked at.
    due: Due,
    /// Finished files, waiting for room in the agent's queue.
    ready: VecDeque<Candidate>,
    /// The paths in `ready`.
    queued: HashSet<PathBuf>,
    scans: Scans,
    /// News of new files was dropped (too many waiting): a rescan is due
    /// once the backlog has halved.
    dropped: bool,
    /// Folders that could not be watched (or read) for a reason other than
    /// their permissions (those are in [`Denied`]), each warned about
    /// once; tried again at every rescan.
    unwatchable: HashSet<PathBuf>,
    /// [`UNWATCHABLE_MAX`] reached: no more are recorded or warned about.
    unwatchable_full: bool,
    /// The log lines about links, limited.
    links: LinkLog,
    /// When /proc was last looked through for writers.
    proc_scanned_at: Option<Instant>,
    /// When [`Denied`] was last pruned.
    denied_pruned: Option<Instant>,
}

/// Links skipped are logged, but a producer making links by the thousand
/// must not drown the log: at most [`LINK_LINES`] lines a minute, then one
/// line with how many more there were (each one at debug level).
#[derive(Default)]
struct LinkLog {
    since: Option<Instant>,
    shown: u32,
    hidden: u64,
}

const LINK_LINES: u32 = 20;

impl LinkLog {
    fn skipped(&mut self, path: &Path, what: &'static str) {
        let now = Instant::now();
        if self
            .since
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            if self.hidden > 0 {
                tracing::info!(
                    more = self.hidden,
                    "more symbolic links skipped in the last minute (shown at debug level)"
                );
            }
            *self = LinkLog {
                since: Some(now),
                shown: 0,
                hidden: 0,
            };
        }
        if self.shown < LINK_LINES {
            self.shown += 1;
            tracing::info!(path = ?path, "{what}");
        } else {
            self.hidden += 1;
            tracing::debug!(path = ?path, "{what}");
        }
    }
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

/// A file of a watch with `stream = true` that is being written and holds
/// at least one full part: the agent may send its parts now
/// ([`crate::agent::stream`]).
#[derive(Debug, Clone)]
pub struct Growing {
    pub watch: usize,
    pub path: PathBuf,
    pub rel: PathBuf,
}

/// How often the agent is told again that a file still waiting is growing
/// (it follows each file once; a file it stopped following is taken up
/// again).
const GROWING_AGAIN: Duration = Duration::from_secs(10);

/// The watcher; [`Watch::run`] runs until the task is dropped.
pub struct Watch {
    watches: Vec<WatchSettings>,
    filters: Vec<Filter>,
    rescan_interval: Duration,
    support: Arc<Support>,
    ready_tx: mpsc::Sender<Candidate>,
    requeue_rx: mpsc::UnboundedReceiver<Requeue>,
    /// Where growing files are told, and the size from which they are.
    growing: Option<(mpsc::Sender<Growing>, u64)>,
    /// Folders and files the agent's user may not read yet.
    denied: Arc<Denied>,
}

impl Watch {
    pub fn new(
        watches: Vec<WatchSettings>,
        rescan_interval: Duration,
        support: Arc<Support>,
        ready_tx: mpsc::Sender<Candidate>,
        requeue_rx: mpsc::UnboundedReceiver<Requeue>,
        denied: Arc<Denied>,
    ) -> Self {
        let filters = watches.iter().map(Filter::new).collect();
        Watch {
            watches,
            filters,
            rescan_interval,
            support,
            ready_tx,
            requeue_rx,
            growing: None,
            denied,
        }
    }

    /// Tells `tx` of files in watches with `stream = true` that are still
    /// waiting (being written) and hold at least `from_size` bytes.
    pub fn telling_growing(mut self, tx: mpsc::Sender<Growing>, from_size: u64) -> Self {
        self.growing = Some((tx, from_size));
        self
    }

    /// The status of `path` (`lstat`), reached beneath its watched folder
    /// without following any link: a folder swapped for a link gives
    /// [`OpenError::Link`], never the status of what it points to.
    fn lstat(&self, path: &Path, roots: &mut RootHandles) -> Result<std::fs::Metadata, OpenError> {
        let (watch, rel) = self.locate(path).ok_or(OpenError::Link)?;
        roots.lstat(watch, &rel)
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

    /// A fresh state: nothing known yet, walks ready to start.
    fn state(&self) -> State {
        let mut st = State::default();
        st.scans.trees = Arc::new(
            self.watches
                .iter()
                .map(|w| Tree {
                    root: w.path.clone(),
                    filter: Filter::new(w),
                })
                .collect(),
        );
        st
    }

    fn roots(&self) -> Vec<PathBuf> {
        self.watches.iter().map(|w| w.path.clone()).collect()
    }

    pub async fn run(mut self) {
        let (tx, mut rx) = mpsc::channel::<Intake>(8192);
        let mut st = self.state();
        st.scans.events = match Events::start(tx) {
            Ok(events) => Some(events),
            Err(e) => {
                tracing::error!(error = %e, "cannot start file notifications; relying on periodic rescans");
                None
            }
        };
        let mut present = HashMap::new();
        let roots = self.roots();
        check_roots(&roots, &mut present, None);
        let mut roots_checked = Instant::now();
        let mut rewalked: HashMap<PathBuf, Instant> = HashMap::new();
        // The first walk watches every folder, each before it is listed.
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
        // The next look that is due (see [`Due`]).
        let due = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(due);
        let mut due_at: Option<Instant> = None;
        loop {
            // Not while `ready` is full: the periodic pass takes over then.
            let next = st.due.next().filter(|_| st.ready.len() < READY_MAX);
            if next != due_at {
                if let Some(at) = next {
                    due.as_mut().reset(at.into());
                }
                due_at = next;
            }
            tokio::select! {
                () = &mut due, if due_at.is_some() => {
                    due_at = None;
                    self.settle_due(&mut st);
                }
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
                Some(rq) = self.requeue_rx.recv() => self.requeued(rq, &mut st),
                _ = tick.tick() => {
                    self.settle(&mut st);
                    self.retry_denied(&mut st);
                    if st.dropped && st.waiting.len() < MAX_WAITING / 2 {
                        st.dropped = false;
                        st.scans.request(self.roots());
                    }
                    // A watched folder removed and made again is watched anew.
                    if roots_checked.elapsed() >= ROOT_CHECK_INTERVAL {
                        roots_checked = Instant::now();
                        let mut again = check_roots(&roots, &mut present, st.scans.events.as_deref());
                        // A watched folder made again with the same inode
                        // number (ext4 reuses them) lost its watch unseen.
                        if let Some(events) = &st.scans.events {
                            for root in &roots {
                                let due = rewalked.get(root).is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                                if due && present.get(root).is_some_and(Option::is_some) && !events.is_watched(root) && !st.scans.walking(root) {
                                    rewalked.insert(root.clone(), Instant::now());
                                    again.push(root.clone());
                                }
                            }
                        }
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
                    self.unstick(&mut st, Instant::now());
                    roots_checked = Instant::now();
                    check_roots(&roots, &mut present, st.scans.events.as_deref());
                    // Every folder is watched again on the way (a no-op for
                    // those watched), unreadable ones tried again.
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
}

/// What one look at a waiting file decided.
enum Verdict {
    /// Not finished: look again then (`None`: when news of it comes, or at
    /// a periodic pass).
    Wait(Option<Instant>),
    /// Nothing to send any more; the candidate tells the agent a file it
    /// handed back is gone.
    Drop(Option<Candidate>),
    /// Finished.
    Ready(Candidate),
}

/// One pass over waiting files: what it found, and what it shares between
/// its looks (the handles on the watched folders, `/proc`'s writers).
struct Pass<'a> {
    roots: RootHandles<'a>,
    writers: Option<HashSet<(u64, u64)>>,
    /// When /proc was last looked through, in this pass or an earlier one.
    proc_scanned_at: Option<Instant>,
    room: usize,
    done: Vec<PathBuf>,
    ready: Vec<Candidate>,
}

impl<'a> Pass<'a> {
    fn new(watches: &'a [WatchSettings], room: usize, proc_scanned_at: Option<Instant>) -> Self {
        Pass {
            roots: RootHandles::new(watches),
            writers: None,
            proc_scanned_at,
            room,
            done: Vec::new(),
            ready: Vec::new(),
        }
    }

    /// No more room in `ready` for this pass.
    fn full(&self) -> bool {
        self.ready.len() >= self.room
    }

    fn apply(&mut self, path: &Path, p: &mut Pending, verdict: Verdict, due: &mut Due) {
        match verdict {
            Verdict::Wait(Some(at)) => due.at(path, p, at),
            Verdict::Wait(None) => {}
            Verdict::Drop(c) => {
                self.ready.extend(c);
                self.done.push(path.to_path_buf());
            }
            Verdict::Ready(c) => {
                tracing::debug!(path = ?c.path, "finished");
                self.ready.push(c);
                self.done.push(path.to_path_buf());
            }
        }
    }

    fn end(self, st: &mut State) {
        st.proc_scanned_at = self.proc_scanned_at;
        for path in self.done {
            st.waiting.remove(&path);
        }
        for c in self.ready {
            st.make_ready(c);
        }
        st.due.trim(&st.waiting);
    }
}

/// Handles on the watched folders for one pass over many files (a settle
/// tick, a batch of a walk): each opened once, when first needed, and
/// closed with the pass, so a watched folder made again is met anew at the
/// next pass.
struct RootHandles<'a> {
    watches: &'a [WatchSettings],
    fds: Vec<Option<std::os::fd::OwnedFd>>,
}

impl<'a> RootHandles<'a> {
    fn new(watches: &'a [WatchSettings]) -> Self {
        RootHandles {
            watches,
            fds: watches.iter().map(|_| None).collect(),
        }
    }

    /// [`files::lstat_at`] beneath watch `watch`.
    fn lstat(&mut self, watch: usize, rel: &Path) -> Result<std::fs::Metadata, OpenError> {
        let root = &self.watches[watch].path;
        if self.fds[watch].is_none() {
            // Not kept when it fails: the look then says why.
            self.fds[watch] = files::open_root(root).ok();
        }
        match &self.fds[watch] {
            Some(fd) => files::lstat_at(std::os::fd::AsFd::as_fd(fd), rel),
            None => files::lstat_beneath(root, rel),
        }
    }
}

/// Opens the folder `rel` beneath `root` and watches it (a folder that is
/// gone or a link meanwhile is not).
fn watch_now(events: &Events, root: &Path, rel: &Path, path: &Path) {
    let Ok(root_fd) = files::open_root(root) else {
        return;
    };
    if let Ok(dir) = files::open_folder_beneath(std::os::fd::AsFd::as_fd(&root_fd), rel) {
        let _ = events.watch(std::os::fd::AsFd::as_fd(&dir), path);
    }
}

/// Checks that each watched folder is there, and the same folder it was
/// (a folder removed and made again is a new one). Returns those that are
/// new or back: they need a walk, which watches them anew.
/// A folder gone or replaced loses the watches of its old tree first (moved
/// away, that tree lives on elsewhere: its files must not be reported under
/// the watched folder's names, nor hold watches forever).
fn check_roots(
    roots: &[PathBuf],
    present: &mut HashMap<PathBuf, Option<(u64, u64)>>,
    events: Option<&Events>,
) -> Vec<PathBuf> {
    let mut again = Vec::new();
    for root in roots {
        let id = match std::fs::metadata(root) {
            Ok(m) if m.is_dir() => Some((m.dev(), m.ino())),
            Ok(_) => None,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                None
            }
            // Refused for now, or an error of the filesystem (EACCES after
            // a parent's chmod, EIO on NFS): not gone; its watches stay.
            Err(_) => continue,
        };
        let known = present.insert(root.clone(), id);
        match (known, id) {
            (Some(Some(_)), None) => {
                tracing::warn!(folder = ?root, "watched folder is gone; watching for it to come back");
                if let Some(events) = events {
                    events.unwatch_tree(root);
                }
            }
            (Some(before), Some(now)) if before != Some(now) => {
                tracing::info!(folder = ?root, "watched folder is back; watching and scanning it");
                if let Some(events) = events
                    && before.is_some()
                {
                    events.unwatch_tree(root);
                }
                again.push(root.clone());
            }
            _ => {}
        }
    }
    again
}

#[cfg(test)]
mod tests;
