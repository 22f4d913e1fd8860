//! Read leases: the kernel's own answer to "does any process, of any user,
//! in any PID namespace, have this file open for writing?", and its notice
//! when one opens it later.
//!
//! `fcntl(F_SETLEASE, F_RDLCK)` on a file opened read-only is refused with
//! EAGAIN while a writer has the file open; once granted, a process opening
//! the file for writing (or truncating it) makes the kernel signal the
//! holder (SIGIO) and wait for the lease to be released. [`Leases`] owns the
//! leases the agent holds: it installs the SIGIO handler before the first
//! lease is taken (the default action would end the process), and on every
//! signal, and once a second in case one was merged, asks each lease for its
//! state; a lease being broken is released at once, so the writer is held up
//! for milliseconds, and its holder is told ([`Lease::broken`]). This module
//! never reads or changes a file and never decides what is uploaded.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// The outcome of asking for a lease.
pub enum Take {
    /// Granted: no process has the file open for writing, and none can
    /// open it without this lease being broken first.
    Held(Lease),
    /// A process has the file open for writing right now.
    Busy,
    /// No lease can be had for this file: no `CAP_LEASE` and not its owner
    /// (EACCES), or a filesystem without leases (EINVAL and the like).
    Unavailable(std::io::Error),
}

impl std::fmt::Debug for Take {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Take::Held(_) => f.write_str("Held"),
            Take::Busy => f.write_str("Busy"),
            Take::Unavailable(e) => write!(f, "Unavailable({e})"),
        }
    }
}

struct Entry {
    file: Arc<File>,
    broken: watch::Sender<bool>,
}

#[derive(Default)]
struct Registry {
    held: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
}

impl Registry {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Releases every lease the kernel is breaking and tells its holder.
    fn check(&self) {
        let mut held = self.held();
        held.retain(|_, e| {
            if lease_state(&e.file) == Some(libc::F_RDLCK) {
                return true;
            }
            release(&e.file);
            let _ = e.broken.send(true);
            false
        });
    }
}

/// What `F_GETLEASE` says: `F_RDLCK` while the lease holds, the target type
/// (`F_UNLCK`) once a writer asked for it to be broken.
fn lease_state(file: &File) -> Option<i32> {
    // SAFETY: fcntl on a descriptor this process owns; no pointers.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) };
    (r >= 0).then_some(r)
}

fn release(file: &File) {
    // SAFETY: fcntl on a descriptor this process owns; no pointers.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
}

/// The leases the agent holds; see the module doc.
#[derive(Clone)]
pub struct Leases {
    registry: Arc<Registry>,
}

impl Leases {
    /// Installs the SIGIO handler and starts watching for broken leases.
    /// Must run inside the tokio runtime, before any lease is taken.
    pub fn start() -> std::io::Result<Leases> {
        let mut sigio = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::io())?;
        let registry = Arc::new(Registry::default());
        let weak = Arc::downgrade(&registry);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = sigio.recv() => {}
                    _ = tick.tick() => {}
                }
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                registry.check();
            }
        });
        Ok(Leases { registry })
    }

    /// Asks for a read lease on `file` (opened read-only).
    pub fn take(&self, file: &Arc<File>) -> Take {
        // SAFETY: fcntl on a descriptor this process owns; no pointers.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EBUSY) => Take::Busy,
                _ => Take::Unavailable(e),
            };
        }
        let (tx, rx) = watch::channel(false);
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        self.registry.held().insert(
            id,
            Entry {
                file: file.clone(),
                broken: tx,
            },
        );
        Take::Held(Lease {
            id,
            file: file.clone(),
            registry: self.registry.clone(),
            broken: rx,
        })
    }

    /// How many leases are held (for tests and metrics).
    pub fn held(&self) -> usize {
        self.registry.held().len()
    }
}

/// A read lease on an open file, released when dropped.
pub struct Lease {
    id: u64,
    file: Arc<File>,
    registry: Arc<Registry>,
    broken: watch::Receiver<bool>,
}

impl Lease {
    /// Resolves once a writer opened the file (the lease is then already
    /// released); never resolves while the lease holds.
    pub async fn broken(&self) {
        let mut rx = self.broken.clone();
        if rx.wait_for(|b| *b).await.is_err() {
            // The registry dropped the sender without a break: hold forever.
            std::future::pending::<()>().await;
        }
    }

    /// Whether the lease is gone or being broken, asked of the kernel now.
    pub fn is_broken(&self) -> bool {
        *self.broken.borrow() || lease_state(&self.file) != Some(libc::F_RDLCK)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.registry.held().remove(&self.id);
        release(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn a_writer_is_refused_then_breaks_the_lease_and_is_let_through() {
        let leases = Leases::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"finished").unwrap();

        // A writer holds it open: no lease.
        let writer = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let f = Arc::new(File::open(&path).unwrap());
        assert!(matches!(leases.take(&f), Take::Busy));
        drop(writer);

        // Nobody writes: granted. A writer opening it breaks the lease,
        // which is released at once; the writer waits only that long.
        let Take::Held(lease) = leases.take(&f) else {
            panic!("lease refused with no writer")
        };
        assert!(!lease.is_broken());
        assert_eq!(leases.held(), 1);
        let p = path.clone();
        let opener = std::thread::spawn(move || {
            let t = Instant::now();
            let _w = std::fs::OpenOptions::new().append(true).open(p).unwrap();
            t.elapsed()
        });
        tokio::time::timeout(Duration::from_secs(5), lease.broken())
            .await
            .expect("the break is noticed");
        assert!(lease.is_broken());
        let waited = tokio::task::spawn_blocking(move || opener.join().unwrap())
            .await
            .unwrap();
        assert!(waited < Duration::from_secs(5), "writer held up {waited:?}");
        assert_eq!(leases.held(), 0);
        drop(lease);
    }
}
