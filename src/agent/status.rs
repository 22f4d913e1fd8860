//! What `putonly status` shows, from the journal alone: what the file
//! records say ([`journal::file_status`]) and what the features hold (the
//! markers held back, the files being streamed).

use super::{batches, stream};
use crate::journal::{self, Exists, FileStatus, Journal, JournalError, LastError, OldestPending};

/// Counts and ages for `putonly status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub pending: u64,
    /// Sent and on record (those that already existed not included).
    pub done: u64,
    pub failed: u64,
    /// Not sent: the key already held an object (overwrite = false).
    pub exists: u64,
    pub bytes_sent: u64,
    pub oldest_pending: Option<OldestPending>,
    pub last_errors: Vec<LastError>,
    pub credentials_expire_at: Option<i64>,
    pub agent_heartbeat_at: Option<i64>,
    /// Markers held back by files of their batch ([`batches`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held_markers: Vec<batches::HeldMarker>,
    /// The latest files whose key already held an object (at most 10).
    pub last_exists: Vec<Exists>,
    /// Files being written whose parts are being sent already
    /// ([`stream`]; at most 20).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub streaming: Vec<stream::Streaming>,
}

impl Journal {
    /// What `putonly status` shows; from the journal alone.
    pub fn status(&self) -> Result<Status, JournalError> {
        self.with(|conn| {
            let Some(f) = journal::file_status(conn)? else {
                return Ok(Status::default());
            };
            let FileStatus {
                pending,
                done,
                failed,
                exists,
                bytes_sent,
                oldest_pending,
                last_errors,
                credentials_expire_at,
                agent_heartbeat_at,
                last_exists,
            } = f;
            Ok(Status {
                pending,
                done,
                failed,
                exists,
                bytes_sent,
                oldest_pending,
                last_errors,
                credentials_expire_at,
                agent_heartbeat_at,
                held_markers: batches::held(conn)?,
                last_exists,
                streaming: stream::listed(conn)?,
            })
        })
    }
}
