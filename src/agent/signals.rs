//! Signals of `putonly run`: SIGTERM and SIGINT stop the agent; SIGHUP is
//! logged (the configuration is not reloaded in place: restart to apply
//! it). From the first lines of `main` (before any thread starts) until
//! the agent's own tokio handlers are in place, early handlers make a stop
//! a clean exit with status 0 and note a SIGHUP, so none of these three
//! ends the process by its default action during start-up. Never
//! changes a signal mask (threads and child processes would inherit it)
//! and never does in a handler anything that is not async-signal-safe.

use std::sync::atomic::{AtomicBool, Ordering};

/// The agent's own handler for `kind` (tokio's); `None` if it cannot be
/// installed, and then [`recv`] waits forever.
pub(crate) fn signal(kind: tokio::signal::unix::SignalKind) -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).ok()
}

/// Set once [`crate::agent::run`]'s own handlers have the stop signals.
static SIGNALS_TAKEN: AtomicBool = AtomicBool::new(false);
/// A SIGHUP came during start-up, before there was anything to reload.
static EARLY_HUP: AtomicBool = AtomicBool::new(false);

/// For `putonly run`, first thing in `main`, before any thread starts:
/// until [`crate::agent::run`] has its own handlers, SIGTERM and SIGINT end the process
/// at once with status 0 (nothing is open yet: a stop asked during
/// start-up, by systemd, a container runtime or in the first milliseconds
/// after exec, is a clean stop, not a kill by the signal's default
/// action), and SIGHUP is noted, not a kill. Handlers, not a blocked mask:
/// a blocked mask would be inherited by the threads started meanwhile and
/// by any process they start (the SDK runs `credential_process` helpers),
/// and a blocking read of the configuration (a FIFO) could not be stopped.
/// As PID 1 of a namespace the agent then also gets these signals, which
/// the kernel drops for an init without a handler. Once [`crate::agent::run`] has taken
/// them, these handlers do nothing more.
pub fn catch_stop_signals_early() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the action is async-signal-safe (see `early_stop`).
        let _ = unsafe { signal_hook_registry::register(sig, early_stop) };
    }
    // SAFETY: the action only reads and stores atomics.
    let _ = unsafe { signal_hook_registry::register(libc::SIGHUP, early_hup) };
}

/// SIGTERM or SIGINT before [`crate::agent::run`] took them: status 0 at once. Reads an
/// atomic and calls `_exit`, both async-signal-safe.
fn early_stop() {
    if !SIGNALS_TAKEN.load(Ordering::SeqCst) {
        // SAFETY: _exit ends the process and runs nothing else.
        unsafe { libc::_exit(0) };
    }
}

/// SIGHUP before [`crate::agent::run`] took it: noted.
fn early_hup() {
    if !SIGNALS_TAKEN.load(Ordering::SeqCst) {
        EARLY_HUP.store(true, Ordering::SeqCst);
    }
}

/// Debug builds only, for the test of a stop asked during start-up: right
/// after [`catch_stop_signals_early`], says so on standard error and waits
/// PUTONLY_DEBUG_START_PAUSE_MS, so that the test's signal surely lands in
/// that window. Release builds have no such variable.
#[cfg(debug_assertions)]
pub fn debug_start_pause() {
    if let Some(ms) = std::env::var("PUTONLY_DEBUG_START_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        eprintln!("PUTONLY_DEBUG: stop signals caught; pausing {ms} ms");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[cfg(not(debug_assertions))]
pub fn debug_start_pause() {}

/// [`crate::agent::run`]'s own handlers are in place: the early ones step aside.
pub(crate) fn take_stop_signals() {
    SIGNALS_TAKEN.store(true, Ordering::SeqCst);
    if EARLY_HUP.swap(false, Ordering::SeqCst) {
        tracing::info!(
            "SIGHUP during start-up: the configuration was read after it; nothing to reload"
        );
    }
}

/// The next signal of that kind.
pub(crate) async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
