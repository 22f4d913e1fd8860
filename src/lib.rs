//! putonly ships files into an S3 bucket that belongs to someone else, with
//! write-only permissions.
//!
//! The crate is the pipeline, one folder a stage, each naming only the
//! stages above it in this list (`scripts/layers.py` checks it in CI: no
//! circle, no file over 1,000 lines of code):
//!
//! 1. [`ground`]: the words every stage shares (a file's version, the
//!    checksums, a part the server accepted, key rules, names escaped for
//!    people, backoff, the clock). Names nothing.
//! 2. [`config`]: what to do; the TOML file and the flags checked into one
//!    [`config::Settings`], with the file-name patterns compiled.
//! 3. [`ops`]: what the people who run it see ([`ops::metrics`]) and the
//!    IAM documents they hand over ([`ops::policy`]).
//! 4. [`credentials`]: who is asking, renewed in the background.
//! 5. [`s3`]: the only code that talks to the bucket; it can only write.
//! 6. [`upload`]: how a file becomes an object, within a memory budget,
//!    at a paced rate, retried.
//! 7. [`watch`]: which files are finished: the kernel's events, walks, the
//!    settle rules, leases, opening beneath a watched folder, what may not
//!    be read yet.
//! 8. [`journal`]: the agent's only memory; a store that knows no feature.
//! 9. [`agent`]: the job: the loop, signals, housekeeping, and its features
//!    (batches, streaming, receipts, after-upload actions), which own their
//!    tables and compose the journal's transactions.
//! 10. [`cli`]: what the user sees.
//!
//! `docs/ARCHITECTURE.md` draws the flow from a file appearing to the
//! journal marking it done; `CONTRIBUTING.md` says where a new feature goes.

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
