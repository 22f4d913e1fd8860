//! Configuration: the TOML file, the command-line overrides, and the one
//! checked [`Settings`] value the rest of putonly trusts.
//!
//! Parsing is strict: an unknown key, a wrong type or an unparsable size or
//! duration is an error that names the key, its line and the fix. Raw values
//! ([`RawConfig`]) are resolved once into [`Settings`]; no other module reads
//! the file (or the external id file) or re-validates. Every duration is
//! capped ([`MAX_DURATION`]); plain http is refused unless it stays on this
//! machine or `aws.allow_insecure_http` says so ([`check_endpoint`]). The
//! external id is a [`Secret`]: no `Debug` output shows it. This module
//! never touches the network or the credentials themselves (a profile is
//! only a name here), and names only the ground.
//!
//! The file as written is in `raw`, the checked types in `settings`, their
//! resolution in `resolve` and `watches`, values with units and endpoint
//! rules in `values`, and what is compiled from the settings (the watches'
//! globs, the batch markers) in `patterns`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::ground::checksum::ChecksumKind;
use crate::ground::hostname;
use crate::ground::keys::{PrefixError, PrefixGuard};

/// The largest object S3 accepts (5 TiB).
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * 1024 * 1024;
/// The smallest part S3 accepts, except for the last one.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// The largest part S3 accepts.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// The most parts one multipart upload may have.
pub const MAX_PARTS: u64 = 10_000;
/// The longest duration any setting may hold: ten years (of 365.25 days).
/// Longer ones would overflow the clocks they are added to.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// A value that must never be shown: its `Debug` prints `"** redacted **"`
/// and it has no `Display`. [`Secret::expose`] is the one way to the text,
/// for the request that needs it.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one request that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"** redacted **\"")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// A configuration problem: what is wrong, where, and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{setting}: {problem}; {fix}")]
    Invalid {
        setting: String,
        problem: String,
        fix: String,
    },
}

impl ConfigError {
    fn invalid(setting: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        ConfigError::Invalid {
            setting: setting.to_string(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

mod patterns;
mod raw;
mod resolve;
mod settings;
mod values;
mod watches;

pub use patterns::*;
pub use raw::*;
pub use settings::*;
pub use values::*;
use watches::*;

#[cfg(test)]
mod tests;
