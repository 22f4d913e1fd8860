//! Names and errors that say nothing about a file's content.

/// Names the agent gives files while it acts on them.
pub const CLAIM_PREFIX: &str = ".putonly-claim-";

/// Errors that say nothing about the file: the process or the system ran
/// short (descriptors, memory) or a network filesystem hiccuped. The same
/// file is tried again later; it is never marked failed for these.
pub fn is_resource_shortage(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOMEM
                | libc::ENOBUFS
                | libc::EINTR
                | libc::EAGAIN
                | libc::ESTALE
        )
    )
}
