//! The watcher's rules, with real folders and inotify.

#[cfg(test)]
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
    assert!(p.earliest(Duration::from_millis(100)) <= Instant::now() + Duration::from_millis(100));
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

/// A watched folder moved away (rotated: `mv out out.old; mkdir out`)
/// loses its old tree's watches at the next check of the roots: the old
/// tree's files are not reported under the watched folder's names, and
/// its watches do not stay forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_watched_folder_moved_away_takes_its_watches_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out");
    std::fs::create_dir_all(root.join("2024-01-01/deep")).unwrap();
    let (tx, mut rx) = mpsc::channel(1024);
    let events = Events::start(tx).unwrap();
    let w = crate::config::WatchSettings {
        path: root.clone(),
        prefix: "foo/".into(),
        include: vec![],
        exclude: vec![".*".into()],
        settle: Duration::from_millis(100),
        after_upload: crate::config::AfterUpload::Keep,
        marker: vec![],
        manifest: false,
        stream: false,
    };
    let trees = Arc::new(vec![walk::Tree {
        root: root.clone(),
        filter: crate::config::Filter::new(&w),
    }]);
    let walk_all = || async {
        let mut f = walk::spawn(vec![root.clone()], trees.clone(), Some(events.clone()));
        while f.recv().await.is_some() {}
    };
    walk_all().await;
    assert_eq!(events.watched(), 3);
    let mut present = HashMap::new();
    assert!(check_roots(std::slice::from_ref(&root), &mut present, Some(&events)).is_empty());

    std::fs::rename(&root, dir.path().join("out.old")).unwrap();
    std::fs::create_dir_all(root.join("2024-01-02")).unwrap();
    let again = check_roots(std::slice::from_ref(&root), &mut present, Some(&events));
    assert_eq!(again, vec![root.clone()], "the new folder is walked");
    walk_all().await;
    assert_eq!(events.watched(), 2, "out and out/2024-01-02 only");

    while rx.try_recv().is_ok() {}
    std::fs::write(dir.path().join("out.old/2024-01-01/deep/x.csv"), b"x").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(item) = rx.try_recv() {
        assert!(
            !format!("{item:?}").contains("x.csv"),
            "a file of the moved-away tree was reported: {item:?}"
        );
    }
}
