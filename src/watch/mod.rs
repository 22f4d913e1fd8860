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

    /// After a look that found `path` not finished: if its watch streams
    /// and it holds a full part, the agent is told (again after
    /// [`GROWING_AGAIN`]).
    fn tell_growing(&self, path: &Path, p: &mut Pending, verdict: &Verdict, now: Instant) {
        let Some((tx, from_size)) = &self.growing else {
            return;
        };
        if !matches!(verdict, Verdict::Wait(_))
            || !self.watches[p.watch].stream
            || p.last.is_none_or(|v| v.size < *from_size)
            || p.growing_told.is_some_and(|t| now < t + GROWING_AGAIN)
        {
            return;
        }
        let Some((watch, rel)) = self.locate(path) else {
            return;
        };
        // Full: told at a later look.
        if tx
            .try_send(Growing {
                watch,
                path: path.to_path_buf(),
                rel,
            })
            .is_ok()
        {
            p.growing_told = Some(now);
        }
    }

    /// How long a file must have been quiet to be judged by `rule`, given
    /// what is known of its writers; `None`: not on quiet time at all.
    fn quiet_needed(&self, watch: usize, rule: Rule, writers: Writers) -> Option<Duration> {
        let settle = self.watches[watch].settle;
        match (rule, writers) {
            (Rule::Lease, _) | (Rule::Weak, Writers::Closed) => Some(settle),
            (Rule::Weak, Writers::Writing) => None,
            (Rule::Weak, Writers::Unknown | Writers::Unclosed) => Some(weak_scan_quiet(settle)),
        }
    }

    /// Files seen being written whose close never came, and that had no
    /// news for a long time (at least 10 minutes), are judged as files of
    /// unknown history from now on: under the weak rule a close can go
    /// unseen (a file linked in from elsewhere, an O_TMPFILE made visible,
    /// writes through another hard link), and waiting for it would keep
    /// the file forever.
    fn unstick(&self, st: &mut State, now: Instant) {
        for (path, p) in st.waiting.iter_mut() {
            let settle = self.watches[p.watch].settle;
            let stall = self
                .rescan_interval
                .max(weak_scan_quiet(settle).saturating_mul(10));
            if p.writers == Writers::Writing && now.duration_since(p.stable_since) >= stall {
                tracing::warn!(path = ?path, quiet_for = ?stall, "seen being written, but no close came; judged as a file of unknown history from now on (it will be sent but not deleted or moved)");
                p.writers = Writers::Unclosed;
                // Judged on quiet time from now on.
                let at = p.earliest(settle);
                st.due.at(path, p, at);
            }
        }
    }

    /// For a path that is no longer a regular file: if the agent handed it
    /// back, it holds a record of it, and this candidate (with no version)
    /// has it closed.
    fn gone(&self, path: &Path, p: &Pending) -> Option<Candidate> {
        let (watch, rel) = self.locate(path).filter(|_| p.requeued)?;
        Some(Candidate {
            watch,
            path: path.to_path_buf(),
            rel,
            version: None,
            writers: p.writers,
            rule: Rule::Weak,
        })
    }

    /// A file handed back by the agent. News the watcher had of it since
    /// the hand-over is newer than what the agent knew, and wins: a file
    /// the agent was refused that changed meanwhile (a chmod on its way)
    /// does not wait out the refusal's backoff.
    fn requeued(&self, rq: Requeue, st: &mut State) {
        let Some((watch, _)) = self.locate(&rq.path) else {
            return;
        };
        let p = st
            .waiting
            .entry(rq.path.clone())
            .or_insert_with(|| Pending::new(watch, rq.writers, Instant::now()));
        if !(rq.refused && p.news) {
            p.not_before = p.not_before.max(rq.not_before);
            p.refused = rq.refused;
        }
        p.requeued = true;
        let at = p.earliest(self.watches[watch].settle);
        st.due.at(&rq.path, p, at);
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
        check_roots(&roots, &mut present);
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
                        let mut again = check_roots(&roots, &mut present);
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
                    check_roots(&roots, &mut present);
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

    /// Takes `first` and what else the scan has found so far, up to
    /// [`SCAN_READY_HIGH`] files waiting in `ready`. Scanned files untouched
    /// long enough for their rule skip the wait: they are ready at once
    /// (under the weak rule unless `/proc` shows a writer).
    fn take_scanned(&self, first: Found, st: &mut State) {
        let mut settled = Vec::new();
        let mut roots = RootHandles::new(&self.watches);
        self.found(first, st, &mut settled, &mut roots);
        while st.ready.len() + settled.len() < SCAN_READY_HIGH {
            let Some(rx) = st.scans.current.as_mut() else {
                break;
            };
            match rx.try_recv() {
                Ok(found) => self.found(found, st, &mut settled, &mut roots),
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
        let writers = settled
            .iter()
            .any(|s| s.4 == Rule::Weak)
            .then(open_for_writing)
            .unwrap_or_default();
        let now = Instant::now();
        for (path, watch, rel, v, rule) in settled {
            if rule == Rule::Weak && writers.contains(&(v.dev, v.ino)) {
                let mut p = Pending::new(watch, Writers::Unknown, now);
                p.last = Some(v);
                let at = p.earliest(self.watches[watch].settle);
                st.due.at(&path, &mut p, at);
                st.waiting.insert(path, p);
            } else {
                st.make_ready(Candidate {
                    watch,
                    path,
                    rel,
                    version: Some(v),
                    writers: Writers::Unknown,
                    rule,
                });
            }
        }
    }

    /// What a scan found: a folder to watch, one it cannot read, or a file
    /// (of unknown history).
    fn found(
        &self,
        found: Found,
        st: &mut State,
        settled: &mut Vec<Scanned>,
        roots: &mut RootHandles,
    ) {
        let path = match found {
            Found::File(path) => path,
            Found::Unreadable(u) => return self.unreadable(st, u),
            Found::Listed(folder) => {
                st.unwatchable.remove(&folder);
                return self.denied.readable(Kind::Folder, &folder);
            }
            // A folder tried again is gone, or a link now.
            Found::Gone(folder) => return self.denied.gone(&folder),
        };
        if st.waiting.contains_key(&path) || st.queued.contains(&path) {
            return;
        }
        let Some((watch, rel)) = self.locate(&path) else {
            return;
        };
        if !self.filters[watch].accepts(&rel) {
            return;
        }
        if let Ok(meta) = roots.lstat(watch, &rel)
            && meta.is_file()
        {
            let v = FileVersion::of(&meta);
            let rule = self.support.rule(&path, &meta);
            if self
                .quiet_needed(watch, rule, Writers::Unknown)
                .is_some_and(|q| untouched(&v) >= q)
            {
                settled.push((path, watch, rel, v, rule));
                return;
            }
        }
        if st.room_for(&path) {
            let mut p = Pending::new(watch, Writers::Unknown, Instant::now());
            let at = p.earliest(self.watches[watch].settle);
            st.due.at(&path, &mut p, at);
            st.waiting.insert(path, p);
        }
    }

    fn intake(&self, item: Intake, st: &mut State) {
        match item {
            Intake::Rescan => {
                tracing::warn!(
                    "file events were lost (queue overflow); rescanning every watched folder"
                );
                // A close may have been among the lost events.
                for (path, p) in st.waiting.iter_mut() {
                    if p.writers == Writers::Writing {
                        p.writers = Writers::Unknown;
                        let at = p.earliest(self.watches[p.watch].settle);
                        st.due.at(path, p, at);
                    }
                }
                st.scans.request(self.roots());
            }
            Intake::Folder(path) => {
                if let Some((i, rel)) = self.locate(&path)
                    && !self.filters[i].skips_dir(&rel)
                {
                    // Watched now (walks wait their turn), then walked:
                    // a file made before the watch is listed, one made
                    // after has an event. Its subfolders likewise, each
                    // watched by the walk before it is listed.
                    if let Some(events) = &st.scans.events {
                        watch_now(events, &self.watches[i].path, &rel, &path);
                    }
                    st.scans.request([path]);
                }
            }
            Intake::FolderChanged(path) => {
                // Its mode, owner or ACL may let the agent in now: a
                // folder refused is walked again, files refused below it
                // are looked at again, at once.
                if self.denied.is_empty() {
                    return;
                }
                let (folders, files) = self.denied.below(&path);
                st.scans.request(folders);
                let now = Instant::now();
                for file in files {
                    if let Some(p) = st.waiting.get_mut(&file) {
                        p.refused = false;
                        p.not_before = now;
                        let at = p.earliest(self.watches[p.watch].settle);
                        st.due.at(&file, p, at);
                    }
                }
            }
            Intake::Removed(path) => {
                self.denied.gone(&path);
                // A file the agent handed back (a retry waiting out its
                // backoff) has a pending record: the agent must hear that
                // it is gone, to close it and abort its upload.
                if let Some(c) = st.waiting.remove(&path).and_then(|p| self.gone(&path, &p)) {
                    st.make_ready(c);
                }
            }
            Intake::Changed { path, change } => {
                let Some((watch, rel)) = self.locate(&path) else {
                    return;
                };
                if !self.filters[watch].accepts(&rel) || !st.room_for(&path) {
                    return;
                }
                let now = Instant::now();
                let writers = match change {
                    // A new hard link announces no writer; a new file does.
                    Change::Created => Some(
                        if files::lstat_beneath(&self.watches[watch].path, &rel)
                            .is_ok_and(|m| m.nlink() > 1)
                        {
                            Writers::Unknown
                        } else {
                            Writers::Writing
                        },
                    ),
                    Change::Written => Some(Writers::Writing),
                    Change::Closed => Some(Writers::Closed),
                    // A chmod or touch after the close is not a writer.
                    Change::Touched => None,
                };
                let p = st
                    .waiting
                    .entry(path.clone())
                    .or_insert_with(|| Pending::new(watch, Writers::Unknown, now));
                if let Some(w) = writers {
                    p.writers = w;
                }
                p.stable_since = now;
                p.news = true;
                // Waiting for permission: news of it may be that.
                if p.refused {
                    p.refused = false;
                    p.not_before = now;
                }
                let at = p.earliest(self.watches[watch].settle);
                st.due.at(&path, p, at);
            }
        }
    }

    /// One periodic pass: looks at every file waiting, moves those that
    /// are finished to `ready`, and asks for a look at the others when they
    /// may be finished. It catches what no look was asked for (a file
    /// waiting for room in `ready`, or for a close).
    fn settle(&self, st: &mut State) {
        let now = Instant::now();
        let mut pass = Pass::new(
            &self.watches,
            READY_MAX.saturating_sub(st.ready.len()),
            st.proc_scanned_at,
        );
        for (path, p) in st.waiting.iter_mut() {
            if pass.full() {
                break; // the rest stay tracked and are judged at a later pass
            }
            self.look(path, p, now, &mut pass, &mut st.links, &mut st.due);
        }
        pass.end(st);
    }

    /// Looks at the files whose look is due: each file is taken at the
    /// moment it may be finished, not up to a periodic pass later.
    fn settle_due(&self, st: &mut State) {
        let now = Instant::now();
        let mut pass = Pass::new(
            &self.watches,
            READY_MAX.saturating_sub(st.ready.len()),
            st.proc_scanned_at,
        );
        for path in st.due.take(now, &mut st.waiting) {
            if pass.full() {
                break; // the periodic pass judges the rest once there is room
            }
            let Some(p) = st.waiting.get_mut(&path) else {
                continue;
            };
            self.look(&path, p, now, &mut pass, &mut st.links, &mut st.due);
        }
        pass.end(st);
    }

    /// One look at a waiting file in a pass: judged, the agent told if it
    /// is growing (`stream = true`), and the verdict applied.
    fn look(
        &self,
        path: &Path,
        p: &mut Pending,
        now: Instant,
        pass: &mut Pass<'_>,
        links: &mut LinkLog,
        due: &mut Due,
    ) {
        let verdict = self.judge(path, p, now, pass, links);
        self.tell_growing(path, p, &verdict, now);
        pass.apply(path, p, verdict, due);
    }

    /// Looks at one waiting file (beneath its watched folder, no link
    /// followed) and judges whether it is finished.
    fn judge(
        &self,
        path: &Path,
        p: &mut Pending,
        now: Instant,
        pass: &mut Pass<'_>,
        links: &mut LinkLog,
    ) -> Verdict {
        let settle = self.watches[p.watch].settle;
        if p.not_before > now {
            return Verdict::Wait(Some(p.earliest(settle)));
        }
        // lstat beneath the watched folder: no symbolic link followed,
        // in the file's name or in its folders'.
        let meta = match self.lstat(path, &mut pass.roots) {
            Ok(m) if m.is_file() => m,
            Ok(m) => {
                if m.file_type().is_symlink() {
                    links.skipped(path, "symbolic link; not followed, skipped");
                }
                // A folder, FIFO, socket or device now.
                self.denied.gone(path);
                return Verdict::Drop(self.gone(path, p));
            }
            Err(OpenError::Link) => {
                links.skipped(
                    path,
                    "a symbolic link is in its path; not followed, skipped",
                );
                self.denied.gone(path);
                return Verdict::Drop(self.gone(path, p));
            }
            Err(OpenError::Gone) => {
                self.denied.gone(path);
                return Verdict::Drop(self.gone(path, p));
            }
            // Out of descriptors or memory: the file is fine, look again
            // at a later pass.
            Err(OpenError::Io(e)) if files::is_resource_shortage(&e) => {
                return Verdict::Wait(None);
            }
            // A folder of its path may not be searched yet (its mode set
            // last): looked at again soon, or when news of it comes.
            Err(OpenError::Io(e)) if denied::is_refusal(&e) => {
                let wait = self
                    .denied
                    .refused(Kind::File, path, &e.to_string())
                    .unwrap_or(denied::LAST_TRY);
                p.refused = true;
                p.not_before = now + wait;
                return Verdict::Wait(Some(now + wait));
            }
            Err(e) => {
                tracing::warn!(path = ?path, error = %e, "cannot look at file; skipped");
                return Verdict::Drop(None);
            }
        };
        // Its folders let the agent look at it now; whether it may be read
        // is the agent's open to tell (it alone says it readable).
        p.refused = false;
        let v = FileVersion::of(&meta);
        let rule = self.support.rule(path, &meta);
        let quiet = self.quiet_needed(p.watch, rule, p.writers);
        if p.last != Some(v) {
            // First look, or it changed. A file of unknown history is
            // stable since it last changed (at most `quiet` ago); any
            // other since the latest news of it, or since it last changed
            // (its ctime, which no one can set) if that is later: a change
            // whose news has not come yet. Not from the look itself, or a
            // file first looked at while being written would wait up to a
            // periodic pass more than `settle` after its close.
            let changed = now.checked_sub(untouched(&v));
            p.stable_since = match quiet {
                Some(q)
                    if p.last.is_none()
                        && matches!(p.writers, Writers::Unknown | Writers::Unclosed) =>
                {
                    now.checked_sub(untouched(&v).min(q)).unwrap_or(now)
                }
                // Changed since the last look with no news of it (a writer
                // on another host of a network filesystem, or news still
                // on its way): quiet starts now. Its timestamps may come
                // from another clock, one that runs behind.
                _ if p.last.is_some() && !p.news => now,
                // Its timestamps can only make the wait longer than the
                // news says, never shorter.
                _ => changed.map_or(p.stable_since, |c| c.max(p.stable_since)),
            };
            p.last = Some(v);
        }
        p.news = false;
        // Under the weak rule a file seen being written waits for its
        // close (or a rename), never for quiet time alone.
        let Some(quiet) = quiet else {
            return Verdict::Wait(None);
        };
        let finished_at = p.stable_since + quiet;
        if now < finished_at {
            return Verdict::Wait(Some(finished_at));
        }
        // /proc is cheap and catches the writers it can see, even of a
        // file closed or renamed in while someone else still writes.
        if rule == Rule::Weak {
            // One look through /proc serves every file due within
            // PROC_SCAN_GAP: a close every few milliseconds must not cost a
            // scan of every process each.
            if pass.writers.is_none()
                && let Some(at) = pass.proc_scanned_at
                && now < at + PROC_SCAN_GAP
            {
                return Verdict::Wait(Some(at + PROC_SCAN_GAP));
            }
            let scanned_at = &mut pass.proc_scanned_at;
            let w = pass.writers.get_or_insert_with(|| {
                *scanned_at = Some(now);
                open_for_writing()
            });
            if w.contains(&(meta.dev(), meta.ino())) {
                p.stable_since = now;
                return Verdict::Wait(Some(now + quiet));
            }
        }
        match self.locate(path) {
            Some((watch, rel)) => Verdict::Ready(Candidate {
                watch,
                path: path.to_path_buf(),
                rel,
                version: Some(v),
                writers: p.writers,
                rule,
            }),
            None => Verdict::Drop(None),
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

/// At most this many unwatchable folders are remembered (and each warned
/// about once); beyond that they are tried at rescans without a warning.
const UNWATCHABLE_MAX: usize = 10_000;

impl Watch {
    /// A folder a walk could not read: one its permissions refused is
    /// tried again soon ([`Denied`]); any other is warned about once and
    /// tried again at every rescan.
    fn unreadable(&self, st: &mut State, u: Unreadable) {
        // Refused, and remembered: tried again soon. (Beyond what is
        // remembered, left to the rescans like any other.)
        if u.refused && self.denied.refused(Kind::Folder, &u.path, &u.why).is_some() {
            return;
        }
        if st.unwatchable.contains(&u.path) || st.unwatchable_full {
            return;
        }
        if st.unwatchable.len() >= UNWATCHABLE_MAX {
            st.unwatchable_full = true;
            tracing::warn!(
                folders = UNWATCHABLE_MAX,
                "so many folders cannot be watched or read that no more are reported; their files are found by rescans"
            );
            return;
        }
        tracing::warn!(folder = ?u.path, error = u.why, "cannot watch or read this folder; its siblings are watched, it is tried again at every rescan");
        st.unwatchable.insert(u.path);
    }

    /// Walks again the refused folders whose next try has come, and
    /// forgets, once a minute, those nobody reported for long.
    fn retry_denied(&self, st: &mut State) {
        let now = Instant::now();
        if st
            .denied_pruned
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            st.denied_pruned = Some(now);
            self.denied.prune(now);
        }
        let due = self.denied.folders_due(now);
        if !due.is_empty() {
            st.scans.request(due);
        }
    }
}

/// At most one look through /proc for writers this often (see `judge`).
const PROC_SCAN_GAP: Duration = Duration::from_millis(50);

/// A file a scan found quiet enough to be ready: path, watch, relative
/// path, version and rule.
type Scanned = (PathBuf, usize, PathBuf, FileVersion, Rule);

/// How long ago the file last changed, content (mtime) or status (ctime);
/// zero if in the future.
fn untouched(v: &FileVersion) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    Duration::from_nanos(u64::try_from(now.saturating_sub(v.changed_ns())).unwrap_or(0))
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
fn check_roots(
    roots: &[PathBuf],
    present: &mut HashMap<PathBuf, Option<(u64, u64)>>,
) -> Vec<PathBuf> {
    let mut again = Vec::new();
    for root in roots {
        let id = std::fs::metadata(root)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| (m.dev(), m.ino()));
        let known = present.insert(root.clone(), id);
        match (known, id) {
            (Some(Some(_)), None) => {
                tracing::warn!(folder = ?root, "watched folder is gone; watching for it to come back");
            }
            (Some(before), Some(now)) if before != Some(now) => {
                tracing::info!(folder = ?root, "watched folder is back; watching and scanning it");
                again.push(root.clone());
            }
            _ => {}
        }
    }
    again
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
            marker: vec![],
            manifest: false,
            stream: false,
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

    use writers::Mode;

    fn watcher_with(dir: &Path, mode: Mode) -> (Watch, mpsc::Receiver<Candidate>) {
        let mut w = watch(&[], &[]);
        w.path = dir.to_path_buf();
        let (ready_tx, ready_rx) = mpsc::channel(16);
        let (_rq_tx, rq_rx) = mpsc::unbounded_channel();
        let support = Arc::new(Support::with_mode(mode));
        (
            Watch::new(
                vec![w],
                Duration::from_secs(3600),
                support,
                ready_tx,
                rq_rx,
                Arc::new(Denied::new()),
            ),
            ready_rx,
        )
    }

    fn watcher_of(dir: &Path) -> Watch {
        watcher_with(dir, Mode::AnyFile).0
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
        // (The kernel's overflow event becomes Intake::Rescan: events.rs.)
        // Files no event announced are found by the rescan it triggers.
        let dir = tempfile::tempdir().unwrap();
        for i in 0..50 {
            std::fs::write(dir.path().join(format!("lost-{i}.dat")), b"x").unwrap();
        }
        let w = watcher_of(dir.path());
        let mut st = w.state();
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
        let mut st = w.state();
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
        let mut st = w.state();
        for i in 0..MAX_WAITING + 10 {
            let path = PathBuf::from(format!("/w/f{i}"));
            let change = Change::Closed;
            w.intake(Intake::Changed { path, change }, &mut st);
        }
        assert_eq!(st.waiting.len(), MAX_WAITING);
        assert!(st.dropped, "a rescan is due");
        // News of a file already tracked still counts.
        w.intake(
            Intake::Changed {
                path: PathBuf::from("/w/f0"),
                change: Change::Written,
            },
            &mut st,
        );
        assert_eq!(st.waiting[Path::new("/w/f0")].writers, Writers::Writing);
    }

    #[tokio::test]
    async fn finished_files_waiting_for_the_agent_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let w = watcher_of(dir.path());
        let mut st = w.state();
        let n = READY_MAX + 500;
        for i in 0..n {
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, b"x").unwrap();
            let change = Change::Closed;
            w.intake(Intake::Changed { path, change }, &mut st);
        }
        // First look, then quiet for settle (100 ms).
        w.settle(&mut st);
        tokio::time::sleep(Duration::from_millis(150)).await;
        w.settle(&mut st);
        assert_eq!(st.ready.len(), READY_MAX, "no more than READY_MAX wait");
        assert_eq!(st.waiting.len(), 500, "the rest stay tracked");
        // As the agent takes them, the rest follow.
        st.ready.clear();
        st.queued.clear();
        w.settle(&mut st);
        assert_eq!((st.ready.len(), st.waiting.len()), (500, 0));
    }

    #[tokio::test]
    async fn a_closed_file_is_taken_when_its_settle_ends_not_at_a_later_pass() {
        let dir = tempfile::tempdir().unwrap();
        let w = watcher_of(dir.path());
        let mut st = w.state();
        let path = dir.path().join("closed");
        std::fs::write(&path, b"x").unwrap();
        let news = Instant::now();
        let change = Change::Closed;
        w.intake(
            Intake::Changed {
                path: path.clone(),
                change,
            },
            &mut st,
        );
        let due = st.due.next().expect("a look is asked for");
        let settle = Duration::from_millis(100);
        assert!(due >= news + settle && due <= Instant::now() + settle);
        // A periodic pass right after the close looks at it: too early,
        // and that first look does not start its quiet time again.
        w.settle(&mut st);
        w.settle_due(&mut st);
        assert!(st.ready.is_empty());
        assert_eq!(st.due.next(), Some(due), "one look asked for");
        tokio::time::sleep_until(due.into()).await;
        w.settle_due(&mut st);
        assert_eq!(st.ready.len(), 1, "taken at its deadline");
        assert!(st.waiting.is_empty() && st.due.next().is_none());

        // A change with no news of it (a writer on another host of a
        // network filesystem, whose clock may run behind) counts from the
        // look that saw it, whatever its timestamps say.
        let path = dir.path().join("rewritten");
        std::fs::write(&path, b"x").unwrap();
        w.intake(
            Intake::Changed {
                path: path.clone(),
                change: Change::Closed,
            },
            &mut st,
        );
        w.settle(&mut st);
        tokio::time::sleep(Duration::from_millis(60)).await;
        std::fs::write(&path, b"xy").unwrap();
        let due = st.due.next().unwrap();
        tokio::time::sleep_until((due + Duration::from_millis(20)).into()).await;
        let look = Instant::now();
        w.settle_due(&mut st);
        assert_eq!(st.ready.len(), 1, "not yet: it changed 60 ms later");
        let again = st.due.next().expect("looked at again when quiet");
        assert!(again >= look + settle, "{again:?} {look:?}");
        tokio::time::sleep_until(again.into()).await;
        w.settle_due(&mut st);
        assert_eq!(st.ready.len(), 2);

        // With news of the change, it counts from the news (or its ctime,
        // if later), not from a look that came after: a file first looked
        // at while being written is taken `settle` after its close.
        let path = dir.path().join("written-on");
        std::fs::write(&path, b"x").unwrap();
        w.intake(
            Intake::Changed {
                path: path.clone(),
                change: Change::Written,
            },
            &mut st,
        );
        w.settle(&mut st);
        std::fs::write(&path, b"xy").unwrap();
        let closed = Instant::now();
        w.intake(
            Intake::Changed {
                path: path.clone(),
                change: Change::Closed,
            },
            &mut st,
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        w.settle(&mut st);
        let again = st.due.next().expect("looked at again when quiet");
        assert!(
            again <= closed + settle + Duration::from_millis(10),
            "{again:?} {closed:?}"
        );
    }

    #[tokio::test]
    async fn a_refused_folder_is_walked_again_on_news_of_its_mode_and_after_a_backoff() {
        // (As root the kernel refuses nothing: the refusal is told as the
        // walk tells it; tests/e2e/producers.rs has the real ones.)
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("f"), b"x").unwrap();
        let w = watcher_of(dir.path());
        let mut st = w.state();
        let refused = || {
            Found::Unreadable(Unreadable {
                path: sub.clone(),
                why: "Permission denied (os error 13)".into(),
                refused: true,
            })
        };
        let found = |st: &mut State, f: Found| {
            let mut roots = RootHandles::new(&w.watches);
            w.found(f, st, &mut Vec::new(), &mut roots);
        };
        found(&mut st, refused());
        assert!(w.denied.contains(Kind::Folder, &sub));
        assert!(st.unwatchable.is_empty(), "not left to the rescans");
        // News of another folder's mode asks for nothing.
        w.intake(Intake::FolderChanged(dir.path().join("other")), &mut st);
        assert!(st.scans.current.is_none());
        // News of its own: walked at once, its file found, and it is
        // readable again once listed.
        w.intake(Intake::FolderChanged(sub.clone()), &mut st);
        assert_eq!(st.scans.running, vec![sub.clone()]);
        let (handed, _) = drain_scans(&w, &mut st).await;
        assert!(handed.contains(&sub.join("f")), "{handed:?}");
        assert!(w.denied.is_empty(), "listed: no longer refused");

        // Refused again and no news: tried after a second, not before.
        found(&mut st, refused());
        w.retry_denied(&mut st);
        assert!(st.scans.current.is_none());
        tokio::time::sleep(denied::FIRST_TRY + Duration::from_millis(50)).await;
        w.retry_denied(&mut st);
        assert_eq!(st.scans.running, vec![sub.clone()]);

        // Another fault (the inotify limit, say) is left to the rescans.
        let other = dir.path().join("limit");
        found(
            &mut st,
            Found::Unreadable(Unreadable {
                path: other.clone(),
                why: "the inotify watch limit is reached".into(),
                refused: false,
            }),
        );
        assert!(st.unwatchable.contains(&other));
        assert!(!w.denied.contains(Kind::Folder, &other));
    }

    #[tokio::test]
    async fn a_file_the_agent_may_not_open_yet_is_looked_at_again_on_news_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let w = watcher_of(dir.path());
        let mut st = w.state();
        let path = dir.path().join("private");
        std::fs::write(&path, b"x").unwrap();
        w.requeued(
            Requeue {
                path: path.clone(),
                not_before: Instant::now() + Duration::from_secs(30),
                writers: Writers::Closed,
                refused: true,
            },
            &mut st,
        );
        let due = st.due.next().unwrap();
        assert!(due >= Instant::now() + Duration::from_secs(29));
        // Its chmod: looked at `settle` after it, not 30 s later.
        w.intake(
            Intake::Changed {
                path: path.clone(),
                change: Change::Touched,
            },
            &mut st,
        );
        let p = &st.waiting[&path];
        assert!(!p.refused);
        assert!(
            p.earliest(Duration::from_millis(100)) <= Instant::now() + Duration::from_millis(100)
        );
        // The watcher's look (lstat needs no read permission) hands it
        // over, but does not call it readable: only the agent's open can.
        w.denied.refused(Kind::File, &path, "Permission denied");
        tokio::time::sleep(Duration::from_millis(150)).await;
        w.settle(&mut st);
        assert_eq!(st.ready.len(), 1);
        assert!(w.denied.contains(Kind::File, &path), "still refused");
        // A handed-back file with no refusal keeps its backoff.
        let other = dir.path().join("retrying");
        w.requeued(
            Requeue {
                path: other.clone(),
                not_before: Instant::now() + Duration::from_secs(30),
                writers: Writers::Closed,
                refused: false,
            },
            &mut st,
        );
        w.intake(
            Intake::Changed {
                path: other.clone(),
                change: Change::Touched,
            },
            &mut st,
        );
        assert!(st.waiting[&other].not_before >= Instant::now() + Duration::from_secs(29));
    }

    #[tokio::test]
    async fn a_handed_back_file_removed_during_its_backoff_is_reported_gone() {
        let dir = tempfile::tempdir().unwrap();
        let w = watcher_of(dir.path());
        let mut st = w.state();
        let path = dir.path().join("retrying");
        w.requeued(
            Requeue {
                path: path.clone(),
                not_before: Instant::now() + Duration::from_secs(300),
                writers: Writers::Closed,
                refused: false,
            },
            &mut st,
        );
        w.intake(Intake::Removed(path.clone()), &mut st);
        let c = st.ready.pop_front().expect("handed over as gone");
        assert_eq!((c.path, c.version), (path, None));
        // A file it never handed back is just forgotten.
        w.intake(Intake::Removed(dir.path().join("other")), &mut st);
        assert!(st.ready.is_empty());
    }

    #[tokio::test]
    async fn what_events_said_of_writers_survives_touches_requeues_and_overflows() {
        let dir = tempfile::tempdir().unwrap();
        let w = watcher_of(dir.path());
        let mut st = w.state();
        let at = |name: &str| dir.path().join(name);
        let writers = |st: &State, name: &str| st.waiting[&at(name)].writers;
        let change = |st: &mut State, name: &str, change| {
            w.intake(
                Intake::Changed {
                    path: at(name),
                    change,
                },
                st,
            )
        };

        // A chmod or touch after the close is not a writer.
        change(&mut st, "a", Change::Written);
        change(&mut st, "a", Change::Closed);
        change(&mut st, "a", Change::Touched);
        assert_eq!(writers(&st, "a"), Writers::Closed);

        // The agent hands back a file it judged closed, but events since
        // the hand-over said it is being written again: the events win.
        change(&mut st, "b", Change::Written);
        let rq = |name: &str, writers| Requeue {
            path: at(name),
            not_before: Instant::now() + Duration::from_secs(1),
            writers,
            refused: false,
        };
        w.requeued(rq("b", Writers::Closed), &mut st);
        assert_eq!(writers(&st, "b"), Writers::Writing);
        assert!(st.waiting[&at("b")].requeued);
        // With no news since, the agent's knowledge is kept.
        w.requeued(rq("c", Writers::Writing), &mut st);
        assert_eq!(writers(&st, "c"), Writers::Writing);

        // A new name with another link is a hard link, not a writer.
        std::fs::write(at("orig"), b"x").unwrap();
        std::fs::hard_link(at("orig"), at("hard")).unwrap();
        change(&mut st, "hard", Change::Created);
        assert_eq!(writers(&st, "hard"), Writers::Unknown);
        std::fs::write(at("new"), b"").unwrap();
        change(&mut st, "new", Change::Created);
        assert_eq!(writers(&st, "new"), Writers::Writing);

        // A close that never comes (a file linked in from elsewhere, an
        // O_TMPFILE made visible) is not waited for forever: after a long
        // quiet time the file is one of unknown history.
        w.unstick(&mut st, Instant::now());
        assert_eq!(writers(&st, "new"), Writers::Writing, "not after a moment");
        let later = Instant::now() + Duration::from_secs(7200);
        for name in ["b", "c"] {
            st.waiting.get_mut(&at(name)).unwrap().stable_since = later;
        }
        w.unstick(&mut st, later);
        assert_eq!(writers(&st, "new"), Writers::Unclosed);
        assert_eq!(writers(&st, "c"), Writers::Writing, "c had news lately");

        // Lost events may have held a close: what was "being written" is
        // unknown after an overflow.
        w.intake(Intake::Rescan, &mut st);
        assert_eq!(writers(&st, "b"), Writers::Unknown);
        assert_eq!(writers(&st, "a"), Writers::Closed);
    }

    async fn next(rx: &mut mpsc::Receiver<Candidate>) -> Candidate {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a file is handed over in time")
            .expect("the watcher runs")
    }

    /// Writes in pieces, pausing longer than `settle` (100 ms) with the
    /// file open, and returns the file still open.
    async fn slow_writer(path: &Path) -> std::fs::File {
        use std::io::Write;
        let mut slow = std::fs::File::create(path).unwrap();
        for _ in 0..5 {
            slow.write_all(&[1; 1000]).unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        slow
    }

    #[tokio::test]
    async fn under_the_weak_rule_a_file_seen_written_waits_for_its_close() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let (w, mut ready_rx) = watcher_with(&root, Mode::NoLease);
        let task = tokio::spawn(w.run());
        tokio::time::sleep(Duration::from_millis(300)).await;

        std::fs::write(root.join("direct.txt"), b"direct").unwrap();
        std::fs::write(root.join("skip.tmp"), b"tmp").unwrap();
        let slow = slow_writer(&root.join("slow.bin")).await;
        let got = next(&mut ready_rx).await;
        assert_eq!(got.rel, PathBuf::from("direct.txt"));
        assert_eq!((got.rule, got.writers), (Rule::Weak, Writers::Closed));
        // Quiet for several times settle, still open: never taken.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(ready_rx.try_recv().is_err(), "slow.bin is still open");
        drop(slow);
        let got = next(&mut ready_rx).await;
        assert_eq!(got.rel, PathBuf::from("slow.bin"));
        let v = got.version.expect("a version");
        assert_eq!(v.size, 5000);
        assert_eq!(v, FileVersion::of(&std::fs::metadata(&got.path).unwrap()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(ready_rx.try_recv().is_err(), "skip.tmp must never be ready");
        task.abort();
    }

    #[tokio::test]
    async fn under_the_lease_rule_quiet_files_go_to_the_agent_which_asks_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("before.txt"), b"old").unwrap();
        let (w, mut ready_rx) = watcher_with(&root, Mode::AnyFile);
        let task = tokio::spawn(w.run());
        let got = next(&mut ready_rx).await;
        assert_eq!(got.rel, PathBuf::from("before.txt"));
        assert_eq!((got.rule, got.writers), (Rule::Lease, Writers::Unknown));
        // A new folder's files are found by its scan.
        std::fs::create_dir_all(root.join("new/nested")).unwrap();
        std::fs::write(root.join("new/nested/n.txt"), b"nested").unwrap();
        let got = next(&mut ready_rx).await;
        assert_eq!(got.rel, PathBuf::from("new/nested/n.txt"));

        // Quiet for settle while open: handed over; the agent's lease is
        // refused while it is open, and it hands it back as being written.
        let slow = slow_writer(&root.join("slow.bin")).await;
        let got = next(&mut ready_rx).await;
        assert_eq!(got.rel, PathBuf::from("slow.bin"));
        assert_eq!((got.rule, got.writers), (Rule::Lease, Writers::Writing));
        drop(slow);
        task.abort();
    }
}
