//! What can go wrong with the journal, each with the fix.

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state folder {path} is in use by another putonly agent ({holder}); one agent per state folder: stop that one, or give this one its own [state] dir"
    )]
    Locked { path: PathBuf, holder: String },
    #[error(
        "journal {path} is damaged ({source}); move it aside with its -wal and -shm files and start again: every file still in the watched folders is then sent once more"
    )]
    Damaged {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

impl JournalError {
    /// Whether the journal file does not exist yet (the agent never ran).
    pub fn is_missing(&self) -> bool {
        matches!(self, JournalError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. }
            if e.code == rusqlite::ErrorCode::CannotOpen)
    }
}

/// Sorts SQLite errors: a damaged file gets its own message and fix.
pub(super) fn sqlite_error(path: &Path, source: rusqlite::Error) -> JournalError {
    let damaged = matches!(&source, rusqlite::Error::SqliteFailure(e, _)
        if matches!(e.code, rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt));
    if damaged {
        JournalError::Damaged {
            path: path.to_path_buf(),
            source,
        }
    } else {
        JournalError::Sqlite {
            path: path.to_path_buf(),
            source,
        }
    }
}
