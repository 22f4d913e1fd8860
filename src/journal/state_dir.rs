//! The state folder: owner-only, and held by one agent at a time.

use super::*;

/// The lock file in the state folder that one running agent holds.
pub const LOCK_NAME: &str = "agent.lock";

/// Held while an agent runs on a state folder: an exclusive `flock` on the
/// folder itself (so deleting a file cannot undo it), released by the
/// kernel when the process ends however it ends (kill -9 included), so it
/// is never stale. [`LOCK_NAME`] in it says who holds it. `status` and
/// `check` do not take it.
#[derive(Debug)]
pub struct AgentLock {
    _folder: std::fs::File,
    _file: std::fs::File,
}

impl AgentLock {
    /// Takes the lock, or says who holds it (its pid, host and start time,
    /// as that agent wrote them).
    pub fn take(state_dir: &Path) -> Result<AgentLock, JournalError> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = state_dir.join(LOCK_NAME);
        let folder_err = |source| JournalError::Folder {
            path: path.clone(),
            source,
        };
        prepare_state_dir(state_dir).map_err(|source| JournalError::Folder {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let folder = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(state_dir)
            .map_err(folder_err)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(folder_err)?;
        match rustix::fs::flock(
            &folder,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.split_whitespace().collect::<Vec<_>>().join(" ");
                return Err(JournalError::Locked {
                    path: state_dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "it is starting".into()
                    } else {
                        holder
                    },
                });
            }
            Err(e) => {
                return Err(folder_err(std::io::Error::from_raw_os_error(
                    e.raw_os_error(),
                )));
            }
        }
        let me = format!(
            "pid {} on {} since {}\n",
            std::process::id(),
            crate::ground::hostname(),
            humantime::format_rfc3339_seconds(SystemTime::now())
        );
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()))
            .map_err(folder_err)?;
        Ok(AgentLock {
            _folder: folder,
            _file: file,
        })
    }
}

/// Creates the state folder owner-only (0700); an existing one (made by
/// systemd or by hand) is narrowed to 0700 too.
pub fn prepare_state_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}
