//! The agent's journal: the journal's own tables and every feature's
//! ([`SCHEMAS`]: batches, receipts, streams), and the transactions that
//! cross them. "Done" is one transaction: the file record, the batch it
//! settles, and its receipt ([`Journal::done`], [`GroupCommit::done`]); a
//! version recorded done as unchanged settles its batch likewise
//! ([`Journal::done_unchanged`]). The journal knows none of the features;
//! this module composes them and never touches a table itself.

use std::path::Path;
use std::sync::Arc;

use super::batches;
use super::receipts::{self, Proof};
use super::stream;
use crate::ground::now;
use crate::journal::{self, GroupCommit, Journal, JournalError, Schema, Step};

/// Every feature's tables, made after the journal's own, in this order.
pub(crate) const SCHEMAS: &[Schema] = &[batches::create, receipts::create, stream::create];

/// The object is complete in the bucket: its record done, its batch
/// settled, its receipt kept, in one transaction.
#[derive(Debug)]
struct DoneMark {
    id: i64,
    proof: Proof,
}

impl Step for DoneMark {
    fn apply(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        let t = now();
        journal::done_in(tx, self.id, &self.proof.etag, self.proof.crc, t)?;
        batches::on_done(tx, self.id)?;
        receipts::insert(tx, self.id, &self.proof, t)
    }
}

impl Journal {
    /// Opens (creating if needed) the agent's journal in `state_dir`: the
    /// journal's tables and every feature's.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        Journal::open_with(state_dir, SCHEMAS)
    }

    /// The object is complete in the bucket; its receipt is kept with it,
    /// in the same transaction, and its batch settled.
    pub fn done(&self, id: i64, proof: &Proof) -> Result<(), JournalError> {
        self.apply(Arc::new(DoneMark {
            id,
            proof: proof.clone(),
        }))
    }

    /// Record `id` holds the same bytes as record `twin`, the one last sent
    /// to its key (see `journal::done_unchanged_in`): done as `twin` was,
    /// without a write, its batch settled. Whether the file is to be kept,
    /// or `None` (nothing changed) when that no longer holds.
    pub fn done_unchanged(&self, id: i64, twin: i64) -> Result<Option<bool>, JournalError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            if !journal::done_unchanged_in(&tx, id, twin, now())? {
                return Ok(None);
            }
            batches::on_done(&tx, id)?;
            let keep = journal::keeps_file(&tx, id)?;
            tx.commit()?;
            Ok(Some(keep))
        })
    }
}

impl GroupCommit {
    /// [`Journal::done`], committed with whatever else is queued.
    pub async fn done(&self, id: i64, proof: &Proof) -> Result<(), JournalError> {
        self.apply(Arc::new(DoneMark {
            id,
            proof: proof.clone(),
        }))
        .await
    }
}
