//! putonly ships files into an S3 bucket that belongs to someone else, with
//! write-only permissions.
//!
//! The pipeline, one module a step:
//! [`config`] (what to do) → [`credentials`] (who is asking, renewed in the
//! background) → [`keys`] (where each file goes, and whether it may) →
//! [`upload`] (how a file becomes an object, within the [`budget`], through
//! [`throttle`] and [`retry`]) → [`s3`] (the only code that talks to the bucket; it can only
//! write) → [`cli`] (what the user sees). [`checksum`] computes the CRCs the
//! server verifies. The agent adds [`events`] (the kernel's news, one
//! inotify watch a folder) and [`walk`] (every file below a folder, no
//! link followed) feeding [`watch`] (which files are finished),
//! [`writers`] (which rule tells that, per watch) with [`lease`] (the
//! kernel's answer), [`denied`] (what the agent may not read yet, tried
//! again soon), [`files`] (opening beneath a watch, never through a
//! link), [`journal`] (its only memory), [`agent`] (the loop, stopped
//! through [`signals`]),
//! [`batches`] (a folder's marker sent after the rest of its batch),
//! [`after_upload`] (delete or move, only what was sent) and [`metrics`];
//! [`printable`] escapes producers' names wherever people read them;
//! [`policy`] generates and lints the IAM documents. `docs/ARCHITECTURE.md`
//! draws the flow.

pub mod agent;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod ground;
pub mod journal;
pub mod ops;
pub mod s3;
pub mod upload;
pub mod watch;

/// The checksums, where they were before the ground was laid (the tests
/// and benchmarks name them so).
pub use ground::checksum;
