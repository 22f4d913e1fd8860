//! The journal's records and transactions, on a journal opened as the
//! agent opens it (every feature's tables too).

#[cfg(test)]
use super::*;
use crate::agent::receipts::{self, Proof};

#[test]
fn the_write_ahead_log_is_kept_small_on_a_small_disk() {
    const MIB: u64 = 1024 * 1024;
    assert_eq!(wal_pages(Some(MIB)), 16, "a 1 MiB disk: 64 KiB of log");
    assert_eq!(wal_pages(Some(8 * MIB)), 128);
    assert_eq!(wal_pages(Some(64 * MIB)), 1000);
    assert_eq!(wal_pages(Some(0)), 16);
    assert_eq!(wal_pages(None), 1000);
    // This machine's state folder has room (or says nothing).
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    j.retune().unwrap();
    let pages = j.wal_pages.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(pages, wal_pages(room(&j.path)));
    let limit: i64 = j
        .with(|c| c.query_row("PRAGMA journal_size_limit", [], |r| r.get(0)))
        .unwrap();
    assert_eq!(limit, pages as i64 * 4096);
}

fn proof(key: &str, etag: &str) -> Proof {
    Proof {
        bucket: "b-1".into(),
        key: key.into(),
        size: 1,
        crc: Crc::of(ChecksumKind::Crc64Nvme, b"x"),
        etag: etag.into(),
        version_id: None,
        request_id: Some("req-1".into()),
    }
}

fn v(size: u64, mtime: i64) -> FileVersion {
    FileVersion {
        dev: 1,
        ino: 2,
        size,
        mtime_ns: mtime,
        ctime_ns: mtime,
    }
}

/// Observes version `v` of `path` (key `key`), which must be new or
/// unfinished work: its record's id.
fn record(j: &Journal, path: &str, v: FileVersion, key: &str) -> i64 {
    match j.observe("w", Path::new(path), v, key).unwrap().0 {
        Seen::Upload { id, .. } => id,
        other => panic!("{path}: {other:?}"),
    }
}

/// A version whose ctime alone moved since it was sent (a chmod, a new
/// hard link) is told with the sent record and its CRC; recorded done
/// unchanged, it supersedes that record (status counts the file once)
/// and is not sent again. Anything else about it changed, it is new
/// work; a record sent before CRCs were kept has none to offer.
#[test]
fn a_version_whose_ctime_alone_moved_is_told_with_the_one_sent() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let sent = v(10, 100);
    let first = record(&j, "/w/a", sent, "k/a");
    j.done(first, &proof("k/a", "e1")).unwrap();
    let chmod = FileVersion {
        ctime_ns: 200,
        ..sent
    };
    let (id, twin, crc) = match j.observe("w", Path::new("/w/a"), chmod, "k/a").unwrap().0 {
        Seen::Touched { id, twin, sent } => (id, twin, sent),
        other => panic!("{other:?}"),
    };
    assert_eq!(twin, first);
    assert_eq!(
        (crc.kind, crc.value, crc.len),
        (ChecksumKind::Crc64Nvme, proof("k/a", "e1").crc.value, 10)
    );
    assert_eq!(j.done_unchanged(id, twin).unwrap(), Some(false), "not kept");
    let st = j.status().unwrap();
    assert_eq!((st.done, st.pending), (1, 0), "{st:?}");
    assert!(matches!(
        j.observe("w", Path::new("/w/a"), chmod, "k/a").unwrap().0,
        Seen::Done { .. }
    ));
    // Another key, or other content: new work.
    record(&j, "/w/a", chmod, "k/other");
    let other = record(&j, "/w/a", v(11, 100), "k/a");
    // Once another version was sent to the key, the one before it
    // linked back (same inode, size and mtime, another ctime) is new
    // work: the object holds the other.
    j.done(other, &proof("k/a", "e3")).unwrap();
    let back = FileVersion {
        ctime_ns: 300,
        ..sent
    };
    record(&j, "/w/a", back, "k/a");
    // And a twin that stopped being the last sent while the agent
    // compared: nothing is changed.
    let c = v(20, 500);
    let c_id = record(&j, "/w/c", c, "k/c");
    j.done(c_id, &proof("k/c", "e4")).unwrap();
    let c2 = FileVersion { ctime_ns: 600, ..c };
    let Seen::Touched {
        id: c2_id, twin, ..
    } = j.observe("w", Path::new("/w/c"), c2, "k/c").unwrap().0
    else {
        panic!("not a twin");
    };
    let newer = record(&j, "/w/c", v(21, 700), "k/c");
    j.done(newer, &proof("k/c", "e5")).unwrap();
    assert_eq!(j.done_unchanged(c2_id, twin).unwrap(), None);
    // Told again while still pending, with nothing sent: a twin again
    // (here none, since another version was sent since).
    record(&j, "/w/c", c2, "k/c");
    // A record done before sent_crc was kept offers nothing.
    let old = record(&j, "/w/b", sent, "k/b");
    j.done(old, &proof("k/b", "e2")).unwrap();
    j.with(|c| c.execute("UPDATE files SET sent_crc = NULL WHERE id = ?1", [old]))
        .unwrap();
    record(&j, "/w/b", chmod, "k/b");
}

/// The statements every file goes through (observe, done with its
/// receipt and batch updates) are compiled once, then reused: none is
/// compiled again when new values are bound.
#[test]
fn a_files_statements_are_compiled_once() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    for i in 0..5 {
        let path = PathBuf::from(format!("/d/f{i}"));
        let Seen::Upload { id, .. } = j.observe("w", &path, v(1, i), "foo/f").unwrap().0 else {
            panic!("not to be uploaded");
        };
        j.done(id, &proof("k", "e")).unwrap();
    }
    let conn = j.conn.lock().unwrap();
    let (mut cached, mut again) = (0, Vec::new());
    // SAFETY: the connection is locked and its statements outlive the
    // loop (they stay in its cache); sqlite3_next_stmt, sqlite3_sql and
    // sqlite3_stmt_status only read them.
    unsafe {
        use rusqlite::ffi;
        let db = conn.handle();
        let mut st = ffi::sqlite3_next_stmt(db, std::ptr::null_mut());
        while !st.is_null() {
            let runs = ffi::sqlite3_stmt_status(st, ffi::SQLITE_STMTSTATUS_RUN, 0);
            let n = ffi::sqlite3_stmt_status(st, ffi::SQLITE_STMTSTATUS_REPREPARE, 0);
            if runs >= 5 {
                cached += 1;
            }
            if n > 0 {
                let sql = std::ffi::CStr::from_ptr(ffi::sqlite3_sql(st));
                again.push(format!("{n}x {}", sql.to_string_lossy()));
            }
            st = ffi::sqlite3_next_stmt(db, st);
        }
    }
    assert!(cached >= 9, "only {cached} statements were reused");
    assert!(again.is_empty(), "compiled again: {again:#?}");
}

#[test]
fn a_damaged_journal_is_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join(FILE_NAME), [7u8; 4096]).unwrap();
    let err = Journal::open(&state).unwrap_err();
    assert!(matches!(err, JournalError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("move it aside"), "{err}");
    let missing = Journal::open_read_only(&dir.path().join("never")).unwrap_err();
    assert!(missing.is_missing(), "{missing}");
}

/// Start-up maintenance closes the records a look found without a
/// file, not a version of the same path recorded after that look.
#[test]
fn a_gone_file_s_records_are_closed_up_to_the_one_looked_at() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("state")).unwrap();
    let looked_at = record(&j, "/c", v(1, 1), "foo/c");
    // Meanwhile a new file at the path is recorded (and sent).
    let newer = record(&j, "/c", v(2, 2), "foo/c");
    j.multipart_started(newer, "up-new", 5, ChecksumKind::Crc64Nvme)
        .unwrap();
    assert_eq!(j.gone_through(Path::new("/c"), looked_at).unwrap(), vec![]);
    let s = j.status().unwrap();
    assert_eq!(s.pending, 1, "the newer version is still pending");
    // `gone` (the file itself disappeared) closes every version.
    assert_eq!(
        j.gone(Path::new("/c")).unwrap(),
        vec![("foo/c".to_string(), "up-new".to_string())]
    );
    assert_eq!(j.status().unwrap().pending, 0);
    // The record looked at itself is closed, its upload returned.
    let id = record(&j, "/d", v(3, 3), "foo/d");
    j.multipart_started(id, "up-d", 5, ChecksumKind::Crc64Nvme)
        .unwrap();
    assert_eq!(
        j.gone_through(Path::new("/d"), id).unwrap(),
        vec![("foo/d".to_string(), "up-d".to_string())]
    );
    assert_eq!(j.status().unwrap().pending, 0);
}

#[test]
fn a_gone_file_and_a_replaced_failed_version_stop_counting() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("state")).unwrap();
    // A failed version, then a new version of the same path: the failed
    // one no longer counts.
    let id = record(&j, "/a", v(1, 1), "foo/a");
    j.failed(id, "AccessDenied", now() + 3600).unwrap();
    let id = record(&j, "/a", v(2, 2), "foo/a");
    j.done(id, &proof("foo/a", "etag")).unwrap();
    // A pending multipart upload whose file is deleted.
    let id = record(&j, "/b", v(9, 1), "foo/b");
    j.multipart_started(id, "up-1", 5, ChecksumKind::Crc64Nvme)
        .unwrap();
    assert_eq!(
        j.gone(Path::new("/b")).unwrap(),
        vec![("foo/b".to_string(), "up-1".to_string())]
    );
    let s = j.status().unwrap();
    assert_eq!((s.done, s.pending, s.failed), (1, 0, 0));
    let b = j.backlog().unwrap();
    assert_eq!(
        (b.pending, b.failed, b.oldest_pending.is_none()),
        (0, 0, true)
    );
    let id = record(&j, "/c", v(3, 3), "foo/c");
    j.failed(id, "denied", now() + 60).unwrap();
    record(&j, "/d", v(4, 4), "foo/d");
    let b = j.backlog().unwrap();
    assert_eq!((b.pending, b.failed), (1, 1));
    assert_eq!(b.oldest_pending.unwrap().path, "/d");
}

#[test]
fn a_done_version_is_not_sent_again_but_a_new_one_is() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("state")).unwrap();
    let (seen, _) = j.observe("w", Path::new("/a"), v(10, 1), "foo/a").unwrap();
    let Seen::Upload {
        id, resume: None, ..
    } = seen
    else {
        panic!("{seen:?}")
    };
    j.done(id, &proof("foo/a", "etag")).unwrap();
    drop(j);
    let j = Journal::open(&dir.path().join("state")).unwrap();
    assert_eq!(
        j.observe("w", Path::new("/a"), v(10, 1), "foo/a")
            .unwrap()
            .0,
        Seen::Done { id, keep: false }
    );
    assert!(matches!(
        j.observe("w", Path::new("/a"), v(11, 2), "foo/a")
            .unwrap()
            .0,
        Seen::Upload { .. }
    ));
    let s = j.status().unwrap();
    assert_eq!((s.done, s.pending, s.bytes_sent), (1, 1, 10));
}

#[test]
fn a_key_that_existed_is_done_kept_and_counted_apart() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let (Seen::Upload { id, .. }, _) = j.observe("w", Path::new("/x"), v(7, 1), "foo/x").unwrap()
    else {
        panic!()
    };
    j.multipart_started(id, "up-9", 5 << 20, ChecksumKind::Crc32C)
        .unwrap();
    j.exists(id, "PutObject \"foo/x\": 412").unwrap();
    // Not sent again, and never deleted or moved.
    assert_eq!(
        j.observe("w", Path::new("/x"), v(7, 1), "foo/x").unwrap().0,
        Seen::Done { id, keep: true }
    );
    let s = j.status().unwrap();
    assert_eq!((s.done, s.exists, s.pending, s.bytes_sent), (0, 1, 0, 0));
    assert_eq!(s.last_exists.len(), 1);
    assert_eq!(s.last_exists[0].key, "foo/x");
    assert!(s.last_exists[0].reason.contains("412"));
    drop(j);
    let ro = Journal::open_read_only(dir.path()).unwrap();
    assert_eq!(ro.status().unwrap().exists, 1);
}

#[test]
fn a_multipart_upload_resumes_with_its_parts() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let (Seen::Upload { id, .. }, _) = j.observe("w", Path::new("/b"), v(100, 1), "foo/b").unwrap()
    else {
        panic!()
    };
    j.multipart_started(id, "up-1", 5 << 20, ChecksumKind::Crc64Nvme)
        .unwrap();
    let part = PartDone {
        number: 1,
        etag: "\"e1\"".into(),
        crc: Crc {
            kind: ChecksumKind::Crc64Nvme,
            value: u64::MAX - 3,
            len: 5 << 20,
        },
    };
    j.part_done(id, &part).unwrap();
    drop(j);
    let j = Journal::open(dir.path()).unwrap();
    let (seen, _) = j.observe("w", Path::new("/b"), v(100, 1), "foo/b").unwrap();
    let Seen::Upload {
        resume: Some(r), ..
    } = seen
    else {
        panic!("{seen:?}")
    };
    assert_eq!(r.upload_id, "up-1");
    assert_eq!(r.parts, vec![part]);
    j.multipart_forgotten(id).unwrap();
    let (seen, _) = j.observe("w", Path::new("/b"), v(100, 1), "foo/b").unwrap();
    assert!(matches!(seen, Seen::Upload { resume: None, .. }));
}

#[test]
fn a_new_version_supersedes_an_unfinished_upload() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let (Seen::Upload { id, .. }, _) = j.observe("w", Path::new("/c"), v(100, 1), "foo/c").unwrap()
    else {
        panic!()
    };
    j.multipart_started(id, "up-old", 5 << 20, ChecksumKind::Crc32C)
        .unwrap();
    let (_, stale) = j.observe("w", Path::new("/c"), v(200, 2), "foo/c").unwrap();
    assert_eq!(stale, vec![("foo/c".to_string(), "up-old".to_string())]);
    assert_eq!(j.status().unwrap().pending, 1);
}

#[test]
fn failures_wait_for_their_retry_time() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let (Seen::Upload { id, .. }, _) = j.observe("w", Path::new("/d"), v(1, 1), "foo/d").unwrap()
    else {
        panic!()
    };
    j.failed(id, "AccessDenied", now() + 3600).unwrap();
    assert!(matches!(
        j.observe("w", Path::new("/d"), v(1, 1), "foo/d").unwrap().0,
        Seen::Failed { .. }
    ));
    j.failed(id, "AccessDenied", now() - 1).unwrap();
    assert!(matches!(
        j.observe("w", Path::new("/d"), v(1, 1), "foo/d").unwrap().0,
        Seen::Upload { attempts: 2, .. }
    ));
    let s = j.status().unwrap();
    assert_eq!(s.last_errors.len(), 1);
}

/// A failed file seen again and again before its retry time (each rescan
/// hands every quiet file over) stays failed, in status, until that time.
#[test]
fn a_failed_file_seen_again_stays_failed_until_its_retry_time() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let (Seen::Upload { id, .. }, _) = j.observe("w", Path::new("/d"), v(1, 1), "foo/d").unwrap()
    else {
        panic!()
    };
    j.failed(id, "AccessDenied", now() + 3600).unwrap();
    for look in 0..3 {
        let seen = j.observe("w", Path::new("/d"), v(1, 1), "foo/d").unwrap().0;
        assert!(matches!(seen, Seen::Failed { .. }), "look {look}: {seen:?}");
        let s = j.status().unwrap();
        assert_eq!((s.failed, s.last_errors.len()), (1, 1), "look {look}");
    }
}

#[test]
fn a_journal_from_before_ctime_is_migrated_and_sends_nothing_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    {
        // The schema of the previous release, with one done record and
        // one multipart upload in progress.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            &files_table("files")
                .replace("    ctime_ns    INTEGER,\n", "")
                .replace("    claimed_at  INTEGER,\n", "")
                .replace("ctime_ns, key)", "key)"),
        )
        .unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(
            "INSERT INTO files (id, watch, path, dev, ino, size, mtime_ns, key, state, created_at, updated_at)
             VALUES (1, 'w', X'2F61', 1, 2, 10, 1, 'foo/a', 'done', 0, 0),
                    (2, 'w', X'2F62', 1, 3, 99, 1, 'foo/b', 'pending', 0, 0);
             UPDATE files SET upload_id = 'up-1', part_size = 5, checksum = 'crc32c' WHERE id = 2;
             INSERT INTO parts VALUES (2, 1, 'e1', 7, 5);",
        )
        .unwrap();
    }
    let j = Journal::open(dir.path()).unwrap();
    assert!(j.with(|c| receipts::present(c)).unwrap(), "receipts added");
    // The done record matches its file whatever its ctime, once; the
    // ctime is then kept.
    let a = FileVersion {
        dev: 1,
        ino: 2,
        size: 10,
        mtime_ns: 1,
        ctime_ns: 555,
    };
    assert_eq!(
        j.observe("w", Path::new("/a"), a, "foo/a").unwrap().0,
        Seen::Done { id: 1, keep: false }
    );
    let rewritten = FileVersion { ctime_ns: 556, ..a };
    assert!(matches!(
        j.observe("w", Path::new("/a"), rewritten, "foo/a")
            .unwrap()
            .0,
        Seen::Upload { .. }
    ));
    // The upload in progress kept its parts.
    let b = FileVersion {
        dev: 1,
        ino: 3,
        size: 99,
        mtime_ns: 1,
        ctime_ns: 9,
    };
    let (
        Seen::Upload {
            resume: Some(r), ..
        },
        _,
    ) = j.observe("w", Path::new("/b"), b, "foo/b").unwrap()
    else {
        panic!("the upload in progress was lost")
    };
    assert_eq!((r.upload_id.as_str(), r.parts.len()), ("up-1", 1));
    j.keep_file(1).unwrap();
    assert_eq!(
        j.observe("w", Path::new("/a"), a, "foo/a").unwrap().0,
        Seen::Done { id: 1, keep: true },
        "a file taken without its close stays for good"
    );
    j.claim(1, ".putonly-claim-1-x").unwrap();
    let claim = Claim {
        id: 1,
        path: PathBuf::from("/a"),
        name: ".putonly-claim-1-x".into(),
    };
    assert_eq!(j.claims(now() + 1).unwrap(), vec![claim]);
    assert!(j.claims(now() - 60).unwrap().is_empty(), "too recent");
    j.unclaim(1).unwrap();
    assert!(j.claims(now() + 1).unwrap().is_empty());
    let fk: i64 = j
        .with(|c| {
            c.query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
                r.get(0)
            })
        })
        .unwrap();
    assert_eq!(fk, 0, "foreign keys hold after the migration");
}

/// Observations through the group commit: committed when answered
/// (another connection sees them), answered as by `Journal::observe`,
/// and committed together with other files' done marks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn observations_go_through_the_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Journal::open(dir.path()).unwrap());
    let group = j.group_commit();
    let observe = |i: usize| {
        let group = group.clone();
        async move {
            let path = PathBuf::from(format!("/o{i}"));
            group.observe("w", &path, v(1, 1), "foo/o").await.unwrap()
        }
    };
    let mut ids = Vec::new();
    for i in 0..10 {
        match observe(i).await {
            (
                Seen::Upload {
                    id,
                    attempts: 0,
                    resume: None,
                },
                stale,
            ) if stale.is_empty() => ids.push(id),
            other => panic!("{other:?}"),
        }
    }
    let reader = Journal::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.backlog().unwrap().pending, 10);
    // Done marks and new observations queued together.
    let mut callers = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().copied().enumerate() {
        let group = group.clone();
        callers.spawn(async move { group.done(id, &proof("k", "e")).await.unwrap() });
        let next = observe(10 + i);
        callers.spawn(async move {
            assert!(matches!(next.await.0, Seen::Upload { .. }));
        });
    }
    while let Some(r) = callers.join_next().await {
        r.unwrap();
    }
    assert_eq!(reader.backlog().unwrap().pending, 10);
    assert_eq!(reader.status().unwrap().done, 10);
    // A version done is not sent again; the same answer as observe's.
    let (seen, _) = observe(0).await;
    assert_eq!(
        seen,
        j.observe("w", Path::new("/o0"), v(1, 1), "foo/o")
            .unwrap()
            .0
    );
    assert!(matches!(seen, Seen::Done { keep: false, .. }), "{seen:?}");
}

#[test]
fn the_group_commit_waits_only_under_load_and_not_in_vain() {
    let mut w = Linger::default();
    // Nothing committed yet, or fewer than two marks came during the
    // last commit (a lone mark, or callers waiting for answers): no wait.
    assert!(!w.waits(1));
    w.committed(1);
    assert!(!w.waits(1));
    // Two marks or more came while the last one was committed: wait.
    w.committed(2);
    assert!(w.waits(1));
    w.committed(5);
    assert!(w.waits(5));
    // Not when this one is full enough already.
    assert!(!w.waits(GROUP_LINGER_BELOW));
    // A wait that brought fewer than two marks: the next chances are
    // skipped.
    assert!(w.waits(2));
    w.waited(1);
    for _ in 0..GROUP_LINGER_SKIP {
        assert!(!w.waits(2));
    }
    assert!(w.waits(2), "tried again after the skipped ones");
    // A wait that brought marks: the next one waits too.
    w.waited(2);
    assert!(w.waits(2));
}

/// Two callers that each wait for their answer before their next mark:
/// when a transaction is committed, at most the other one's mark is
/// queued, so no transaction waits for more (each such wait would cost
/// them 1 ms and bring nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_waiting_for_their_answers_are_not_made_to_wait() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Journal::open(dir.path()).unwrap());
    let ids: Vec<i64> = (0..200)
        .map(|i| record(&j, &format!("/w{i}"), v(1, 1), "foo/w"))
        .collect();
    let group = j.group_commit();
    let mut callers = tokio::task::JoinSet::new();
    for half in ids.chunks(100) {
        let (group, mine) = (group.clone(), half.to_vec());
        callers.spawn(async move {
            for id in mine {
                group.done(id, &proof("k", "etag")).await.unwrap();
            }
        });
    }
    while let Some(r) = callers.join_next().await {
        r.unwrap();
    }
    let stats = group.stats();
    assert_eq!(stats.marks.load(Ordering::Relaxed), 200);
    assert_eq!(stats.lingers.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_puts_marks_queued_together_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Journal::open(dir.path()).unwrap());
    let n = 100;
    let ids: Vec<i64> = (0..n)
        .map(|i| record(&j, &format!("/g{i}"), v(1, 1), "foo/g"))
        .collect();
    let group = j.group_commit();
    // The journal busy (as with a transaction under way): marks queue.
    let (held_tx, held) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let busy = {
        let j = j.clone();
        std::thread::spawn(move || {
            let _conn = j.conn.lock().unwrap();
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
        })
    };
    held.recv().unwrap();
    let mut callers = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().copied().enumerate() {
        let (group, state) = (group.clone(), dir.path().to_path_buf());
        callers.spawn(async move {
            // Done marks, and a few claims (a full sync) among them.
            let claim = i % 10 == 0;
            if claim {
                group.claim(id, "private").await.unwrap();
            } else {
                group.done(id, &proof("k", "etag")).await.unwrap();
            }
            // Back only once committed: another connection sees it.
            let reader = Journal::open_read_only(&state).unwrap();
            let (state, claimed) = reader
                .with(|c| {
                    c.query_row(
                        "SELECT state, claim_name IS NOT NULL FROM files WHERE id = ?1",
                        [id],
                        |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)),
                    )
                })
                .unwrap();
            if claim { claimed } else { state == "done" }
        });
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(group.stats().transactions.load(Ordering::Relaxed), 1);
    release.send(()).unwrap();
    busy.join().unwrap();
    while let Some(committed) = callers.join_next().await {
        assert!(
            committed.unwrap(),
            "a caller was answered before its commit"
        );
    }
    let (transactions, marks) = (
        group.stats().transactions.load(Ordering::Relaxed),
        group.stats().marks.load(Ordering::Relaxed),
    );
    assert_eq!(marks, n as u64);
    // The one under way when the journal was busy, then the rest.
    assert!(transactions <= 3, "{transactions} transactions");
    assert_eq!(j.claims(now() + 1).unwrap().len(), 10);
    assert_eq!(j.status().unwrap().done, n as u64 - 10);
}

#[test]
fn one_agent_per_state_folder() {
    let dir = tempfile::tempdir().unwrap();
    let first = AgentLock::take(dir.path()).unwrap();
    // flock locks belong to the open file: a second open is refused
    // even in the same process, as another agent would be.
    let err = AgentLock::take(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("pid {}", std::process::id()))
            && msg.contains("one agent per state folder"),
        "{msg}"
    );
    // Deleting the lock file does not let a second agent in.
    std::fs::remove_file(dir.path().join(LOCK_NAME)).unwrap();
    assert!(AgentLock::take(dir.path()).is_err());
    drop(first);
    AgentLock::take(dir.path()).unwrap();
}

#[test]
fn state_folder_and_file_are_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _j = Journal::open(&state).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join(FILE_NAME)), 0o600);
}

#[test]
fn prune_removes_old_done_and_failed_records_of_files_gone() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let upload = |path: &str| {
        let (Seen::Upload { id, .. }, _) =
            j.observe("w", Path::new(path), v(1, 1), "foo/e").unwrap()
        else {
            panic!("{path} is new")
        };
        id
    };
    let done = upload("/e");
    j.done(done, &proof("foo/e", "e")).unwrap();
    let failed = upload("/f");
    j.failed(failed, "AccessDenied", i64::MAX).unwrap();
    let pending = upload("/p");
    // A whole pass, batch by batch as the agent runs it.
    let prune = |before: i64, limit: usize, there: bool| {
        let (mut after, mut removed, mut batches) = (0, 0, 0);
        loop {
            let (next, n) = j.prune_batch(before, after, limit, |_, _| there).unwrap();
            removed += n;
            batches += 1;
            match next {
                Some(id) => after = id,
                None => return (removed, batches),
            }
        }
    };
    assert_eq!(prune(now() - 10, 1, false).0, 0, "too recent");
    assert_eq!(prune(now() + 10, 1, true).0, 0, "the files are still there");
    assert_eq!(prune(now() + 10, 1, false), (2, 3), "one record a batch");
    // The done record went; its receipt stays until keep_receipts.
    let mut receipts = Vec::new();
    j.receipts_since(0, |r| {
        receipts.push(r);
        Ok::<(), ()>(())
    })
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(receipts.len(), 1);
    assert_eq!(
        (receipts[0].path.as_str(), receipts[0].key.as_str()),
        ("/e", "foo/e")
    );
    assert_eq!(j.prune_receipts(now() - 10, 10).unwrap(), 0, "too recent");
    assert_eq!(j.prune_receipts(now() + 10, 10).unwrap(), 1);
    let mut left = 0;
    j.receipts_since(0, |_| {
        left += 1;
        Ok::<(), ()>(())
    })
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(left, 0);
    let st = j.status().unwrap();
    assert_eq!((st.done, st.failed, st.pending), (0, 0, 1), "{pending}");
    assert_eq!(
        j.pending_after(0, 10).unwrap(),
        vec![(pending, PathBuf::from("/p"), 1)]
    );
    assert!(j.pending_after(pending, 10).unwrap().is_empty());
}

/// Receipts come page by page, each once and in order, and a reader that
/// pauses over one holds no read snapshot: the agent's write-ahead log can
/// still be reset meanwhile.
#[test]
fn a_paused_receipts_reader_holds_no_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let n = 1100;
    for i in 0..n {
        let path = format!("/r{i}");
        let key = format!("foo/r{i}");
        let id = record(&j, &path, v(1, i), &key);
        j.done(id, &proof(&key, "e")).unwrap();
    }
    let other = Connection::open(dir.path().join(FILE_NAME)).unwrap();
    let mut keys = Vec::new();
    j.receipts_since(0, |r| {
        if keys.len() % 500 == 0 {
            // (busy, log frames, checkpointed): busy 0, the log reset.
            let busy: i64 = other
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
                .unwrap();
            assert_eq!(
                busy,
                0,
                "a read snapshot was held at receipt {}",
                keys.len()
            );
        }
        keys.push(r.key);
        Ok::<(), ()>(())
    })
    .unwrap()
    .unwrap()
    .unwrap();
    let want: Vec<String> = (0..n).map(|i| format!("foo/r{i}")).collect();
    assert_eq!(keys, want);
}
