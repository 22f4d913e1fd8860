//! A file's version: what must not change while its bytes are read.

use std::os::unix::fs::MetadataExt;

/// What identifies one version of a file: if any of it changes, the bytes
/// being read may no longer be the bytes of one version. The journal keys
/// its records by it too.
///
/// ctime is part of it: a rewrite that keeps the size and restores the
/// mtime (`cp -p`, `rsync -t`, builds with a fixed epoch) still changes the
/// ctime, which no one can set. A chmod, chown or new hard link changes it
/// too, and such a file counts as a new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileVersion {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// The ctime of a version recorded before ctime was kept.
pub const UNKNOWN_CTIME: i64 = i64::MIN;

fn nanos(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

impl FileVersion {
    pub fn of(m: &std::fs::Metadata) -> Self {
        FileVersion {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: nanos(m.mtime(), m.mtime_nsec()),
            ctime_ns: nanos(m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether this file (as it is now) is the version `recorded` names; a
    /// record whose ctime is unknown ([`UNKNOWN_CTIME`]) matches any ctime.
    pub fn is(&self, recorded: &FileVersion) -> bool {
        let ctime = if recorded.ctime_ns == UNKNOWN_CTIME {
            self.ctime_ns
        } else {
            recorded.ctime_ns
        };
        *self
            == FileVersion {
                ctime_ns: ctime,
                ..*recorded
            }
    }

    /// The later of mtime and ctime: when the file last changed.
    pub fn changed_ns(&self) -> i64 {
        self.mtime_ns.max(self.ctime_ns)
    }

    /// What changed between `self` and `now`, in words; `None`: nothing.
    pub fn difference(&self, now: &FileVersion) -> Option<String> {
        if (self.dev, self.ino) != (now.dev, now.ino) {
            Some("it was replaced by another file".into())
        } else if self.size != now.size {
            Some(format!(
                "size went from {} to {} bytes",
                self.size, now.size
            ))
        } else if self.mtime_ns != now.mtime_ns {
            Some("it was modified".into())
        } else if self.ctime_ns != now.ctime_ns {
            Some("its status changed (rewritten with its mtime restored, chmod, chown or a new link)".into())
        } else {
            None
        }
    }
}
