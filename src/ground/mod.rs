//! The ground: the words every stage of the pipeline shares, and nothing
//! else. A file's version ([`FileVersion`]), the checksums the server
//! verifies ([`checksum`]), a part the server accepted and an upload to
//! resume ([`PartDone`], [`Resume`]), the rules of keys and prefixes
//! ([`keys`]), the escaping of producers' names where people read them
//! ([`printable`]), backoff delays ([`retry`]), the clock and the host name,
//! the errors that say nothing about a file ([`is_resource_shortage`]) and
//! the private names the agent gives files it is about to delete or move
//! ([`CLAIM_PREFIX`]).
//!
//! This module names no other module of the crate, holds no state, and
//! does no I/O beyond asking the system a fact (the time, the host name).
//! A feature never grows here: only what two stages must both say.

pub mod checksum;
mod io;
pub mod keys;
mod part;
pub mod printable;
pub mod retry;
mod system;
mod version;

pub use io::{CLAIM_PREFIX, is_resource_shortage};
pub use part::{PartDone, Resume};
pub use system::{hostname, now};
pub use version::{FileVersion, UNKNOWN_CTIME};
