//! The group commit: many callers' marks (observations, claims, the
//! agent's done steps) committed in one transaction, each caller answered
//! once its own mark is committed.

use super::*;

/// Work a caller runs inside a journal transaction, committed alone
/// ([`Journal::apply`]) or with other callers' marks by the group commit
/// ([`GroupCommit::apply`]): how a feature's writes go in the same
/// transaction as the file record's (the agent's done: the record, its
/// batch, its receipt). It runs again, in a transaction of its own, if the
/// group's transaction fails.
pub(crate) trait Step: Send + Sync + std::fmt::Debug {
    fn apply(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()>;
}

/// A transition that may be committed with others (see
/// [`Journal::group_commit`]).
#[derive(Debug, Clone)]
pub(super) enum Mark {
    /// A caller's own work (the agent's done: the record, its batch, its
    /// receipt), run in the transaction.
    Step(Arc<dyn Step>),
    /// An after-upload action is about to rename the file to `name`.
    Claim { id: i64, name: String },
    /// A file version is looked up, and recorded if new: its answer is
    /// the mark's outcome.
    Observe(Box<Observation>),
}

impl Mark {
    fn apply(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Option<Observed>> {
        match self {
            Mark::Step(step) => step.apply(tx)?,
            Mark::Claim { id, name } => {
                cached(
                    tx,
                    "UPDATE files SET claimed_at = ?2, claim_name = ?3 WHERE id = ?1",
                    params![id, now(), name],
                )?;
            }
            Mark::Observe(o) => return observe_in(tx, o).map(Some),
        }
        Ok(None)
    }
}

/// At most this many marks in one transaction of the group commit.
pub(super) const GROUP_MAX: usize = 512;
/// Under load, a transaction with fewer marks than this waits
/// [`GROUP_LINGER`] for more before it commits.
pub(super) const GROUP_LINGER_BELOW: usize = 32;
pub(super) const GROUP_LINGER: Duration = Duration::from_millis(1);
/// After a wait that brought fewer than two marks, the next this many
/// transactions that would wait do not.
pub(super) const GROUP_LINGER_SKIP: u32 = 16;

/// When the group commit waits for more marks before committing: only
/// under load, which is when at least two marks came while the last
/// transaction was being committed (the marks its own callers send once
/// answered do not count: they come after; so one or two callers that each
/// wait for their answer never wait), never for a lone mark, and not again
/// for a while after a wait that brought fewer than two marks (it cost
/// more than it saved).
#[derive(Debug, Default)]
pub(super) struct Linger {
    queued_at_end: usize,
    skip: u32,
}

impl Linger {
    /// Whether a transaction of `len` marks so far waits for more.
    pub(super) fn waits(&mut self, len: usize) -> bool {
        if self.queued_at_end < 2 || len >= GROUP_LINGER_BELOW {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// A wait is over: it brought `gained` marks.
    pub(super) fn waited(&mut self, gained: usize) {
        if gained < 2 {
            self.skip = GROUP_LINGER_SKIP;
        }
    }

    /// A transaction was committed, and `queued` marks came meanwhile
    /// (counted before any of its callers is answered).
    pub(super) fn committed(&mut self, queued: usize) {
        self.queued_at_end = queued;
    }
}

/// Waits [`GROUP_LINGER`], then takes what came meanwhile.
pub(super) fn linger(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Queued>,
    batch: &mut Vec<Queued>,
) {
    std::thread::sleep(GROUP_LINGER);
    drain_into(rx, batch);
}

/// Moves what is queued into `batch`, up to [`GROUP_MAX`] marks.
pub(super) fn drain_into(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Queued>,
    batch: &mut Vec<Queued>,
) {
    while batch.len() < GROUP_MAX {
        match rx.try_recv() {
            Ok(q) => batch.push(q),
            Err(_) => break,
        }
    }
}

pub(super) struct Queued {
    mark: Mark,
    reply: tokio::sync::oneshot::Sender<Result<Option<Observed>, JournalError>>,
}

/// How many transactions the group commit ran, for how many marks.
#[derive(Debug, Default)]
pub struct GroupStats {
    pub transactions: AtomicU64,
    pub marks: AtomicU64,
    /// Transactions that waited for more marks first.
    pub lingers: AtomicU64,
}

/// Group commit (see [`Journal::group_commit`]): many files' done marks,
/// claims and observations committed in one transaction, and one sync for
/// the claims among them, instead of one each. Each caller's future ends
/// only once its own mark is committed (or failed), so nothing is deleted
/// or moved before its done is on record, and nothing is sent before its
/// pending record is; a mark is never acknowledged from a transaction that
/// did not commit.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    journal: Arc<Journal>,
    /// `None` when the thread could not be started: each mark is then
    /// committed on its own, off the runtime.
    queue: Option<tokio::sync::mpsc::UnboundedSender<Queued>>,
    stats: Arc<GroupStats>,
}

impl GroupCommit {
    /// [`Journal::apply`], committed with whatever else is queued.
    pub(crate) async fn apply(&self, step: Arc<dyn Step>) -> Result<(), JournalError> {
        self.commit(Mark::Step(step)).await.map(|_| ())
    }

    /// [`Journal::claim`] (a full sync), committed with whatever else is
    /// queued.
    pub async fn claim(&self, id: i64, name: &str) -> Result<(), JournalError> {
        self.commit(Mark::Claim {
            id,
            name: name.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// [`Journal::observe`], committed with whatever else is queued: the
    /// answer comes once the version's record is committed.
    pub async fn observe(
        &self,
        watch: &str,
        path: &Path,
        v: FileVersion,
        key: &str,
    ) -> Result<Observed, JournalError> {
        observed(
            self.commit(Mark::Observe(Box::new(Observation {
                watch: watch.to_string(),
                path: path.to_path_buf(),
                version: v,
                key: key.to_string(),
            })))
            .await,
        )
    }

    pub fn stats(&self) -> &GroupStats {
        &self.stats
    }

    async fn commit(&self, mark: Mark) -> Result<Option<Observed>, JournalError> {
        if let Some(queue) = &self.queue {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if queue
                .send(Queued {
                    mark: mark.clone(),
                    reply,
                })
                .is_ok()
                && let Ok(r) = answer.await
            {
                return r;
            }
            // The thread is gone (it cannot be, short of a panic): the
            // mark is committed on its own below. Committing it twice is
            // harmless.
        }
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || {
            journal
                .commit(std::slice::from_ref(&mark))
                .map(|mut r| r.pop().flatten())
        })
        .await
        .unwrap_or_else(|e| {
            Err(JournalError::Folder {
                path: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            })
        })
    }
}

impl Journal {
    /// Looks a file version up, recording it as pending if it is new. Older
    /// unfinished versions of the same path are marked superseded; their
    /// upload ids are returned so the caller may abort them.
    pub fn observe(
        &self,
        watch: &str,
        path: &Path,
        v: FileVersion,
        key: &str,
    ) -> Result<Observed, JournalError> {
        let mark = Mark::Observe(Box::new(Observation {
            watch: watch.to_string(),
            path: path.to_path_buf(),
            version: v,
            key: key.to_string(),
        }));
        observed(
            self.commit(std::slice::from_ref(&mark))
                .map(|mut r| r.pop().flatten()),
        )
    }

    /// Before an after-upload action renames the file to its private claim
    /// name `name`: committed with a full sync (the rename may reach the
    /// disk before a merely written WAL frame), so that a crash in the
    /// middle, power loss included, is repaired at the next start.
    pub fn claim(&self, id: i64, name: &str) -> Result<(), JournalError> {
        self.commit(&[Mark::Claim {
            id,
            name: name.to_string(),
        }])
        .map(|_| ())
    }

    /// Runs `step` in a transaction of its own.
    pub(crate) fn apply(&self, step: Arc<dyn Step>) -> Result<(), JournalError> {
        self.commit(&[Mark::Step(step)]).map(|_| ())
    }

    /// Commits `marks` in one transaction, with a full sync if one of
    /// them is a claim; the observations' answers, in order (`None` for
    /// the other marks).
    fn commit(&self, marks: &[Mark]) -> Result<Vec<Option<Observed>>, JournalError> {
        let full = marks.iter().any(|m| matches!(m, Mark::Claim { .. }));
        self.with(|conn| {
            if full {
                conn.pragma_update(None, "synchronous", "FULL")?;
            }
            let committed = (|| {
                let tx = conn.transaction()?;
                let answers = marks
                    .iter()
                    .map(|mark| mark.apply(&tx))
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                tx.commit()?;
                Ok(answers)
            })();
            if full {
                // Should this fail, commits stay fully synced: slower, as safe.
                let _ = conn.pragma_update(None, "synchronous", "NORMAL");
            }
            committed
        })
    }

    /// Starts the journal's group commit: one thread that commits, in one
    /// transaction, every mark queued while the previous transaction ran.
    pub fn group_commit(self: &Arc<Self>) -> GroupCommit {
        let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<Queued>();
        let stats = Arc::new(GroupStats::default());
        let (journal, counts) = (self.clone(), stats.clone());
        let started = std::thread::Builder::new()
            .name("putonly-journal".into())
            .spawn(move || {
                let mut waits = Linger::default();
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    drain_into(&mut rx, &mut batch);
                    // Under load, a moment's wait fills this transaction:
                    // fewer, larger ones, each writing its pages to the log
                    // once.
                    if waits.waits(batch.len()) {
                        counts.lingers.fetch_add(1, Ordering::Relaxed);
                        let before = batch.len();
                        linger(&mut rx, &mut batch);
                        waits.waited(batch.len() - before);
                    }
                    let marks: Vec<Mark> = batch.iter().map(|q| q.mark.clone()).collect();
                    counts.transactions.fetch_add(1, Ordering::Relaxed);
                    counts
                        .marks
                        .fetch_add(marks.len() as u64, Ordering::Relaxed);
                    let committed = journal.commit(&marks);
                    waits.committed(rx.len());
                    match committed {
                        Ok(answers) => {
                            for (q, answer) in batch.into_iter().zip(answers) {
                                let _ = q.reply.send(Ok(answer));
                            }
                        }
                        // Each on its own then, so each caller has its
                        // own answer.
                        Err(e) if batch.len() == 1 => {
                            if let Some(q) = batch.pop() {
                                let _ = q.reply.send(Err(e));
                            }
                        }
                        Err(_) => {
                            for q in batch {
                                counts.transactions.fetch_add(1, Ordering::Relaxed);
                                let r = journal
                                    .commit(std::slice::from_ref(&q.mark))
                                    .map(|mut r| r.pop().flatten());
                                let _ = q.reply.send(r);
                            }
                        }
                    }
                }
            });
        if let Err(e) = &started {
            tracing::warn!(error = %e, "journal: no group commit thread; each mark commits on its own");
        }
        GroupCommit {
            journal: self.clone(),
            queue: started.ok().map(|_| queue),
            stats,
        }
    }
}
