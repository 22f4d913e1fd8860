//! File-name patterns, compiled once from the settings: each watch's
//! include and exclude globs ([`Filter`]) and its batch markers
//! ([`Markers`]). The configuration is checked with the very functions
//! that build them ([`glob_set`], [`marker_set`]), so every set it accepted
//! builds; the watcher and the batches only match.

use std::path::Path;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use super::{ConfigError, WatchSettings};

/// Which paths of one watch are taken.
#[derive(Debug)]
pub struct Filter {
    include: Option<GlobSet>,
    exclude: GlobSet,
    /// A set could not be built (the configuration check prevents it):
    /// nothing is taken, rather than what `exclude` keeps out.
    broken: bool,
}

/// The set of `patterns` as the watcher matches them (`*` stops at `/`);
/// the configuration is checked with it, so every set it accepted builds.
pub fn glob_set(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(GlobBuilder::new(p).literal_separator(true).build()?);
    }
    b.build()
}

impl Filter {
    pub fn new(w: &WatchSettings) -> Self {
        let include = (!w.include.is_empty()).then(|| glob_set(&w.include));
        let exclude = glob_set(&w.exclude);
        let broken = exclude.is_err() || include.as_ref().is_some_and(|i| i.is_err());
        if broken {
            tracing::error!(folder = ?w.path, "the include or exclude patterns cannot be compiled; nothing in this folder is taken");
        }
        Filter {
            include: include.and_then(Result::ok),
            exclude: exclude.unwrap_or_else(|_| GlobSet::empty()),
            broken,
        }
    }

    /// Whether a file at `rel` (relative to the watched folder) is taken:
    /// no component is excluded, and it matches an include pattern if any.
    pub fn accepts(&self, rel: &Path) -> bool {
        if self.broken
            || self.exclude.is_match(rel)
            || rel.iter().any(|c| self.exclude.is_match(Path::new(c)))
        {
            return false;
        }
        self.include.as_ref().is_none_or(|inc| inc.is_match(rel))
    }

    /// Whether a folder at `rel` is skipped with everything below it.
    pub fn skips_dir(&self, rel: &Path) -> bool {
        rel.iter().any(|c| self.exclude.is_match(Path::new(c)))
    }
}

/// What to do about marker patterns that cannot be compiled.
pub const MARKER_FIX: &str =
    "give the marker's file name or a short glob on it, e.g. \"_SUCCESS\" or \"*.done\"";

/// The set of a watch's marker patterns (globs on a file's name); the
/// configuration is refused when it cannot be built.
pub fn marker_set(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut b = GlobSetBuilder::new();
    for m in patterns {
        b.add(Glob::new(m)?);
    }
    b.build()
}

/// Which files are markers, per watch.
#[derive(Debug, Default)]
pub struct Markers {
    sets: Vec<Option<GlobSet>>,
}

impl Markers {
    /// The marker patterns of each watch. A pattern or a set of them that
    /// cannot be built is an error naming the setting (`watch[N].marker`),
    /// never a watch without markers: its markers would go first.
    pub fn new(watches: &[WatchSettings]) -> Result<Self, ConfigError> {
        let sets = watches
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if w.marker.is_empty() {
                    return Ok(None);
                }
                marker_set(&w.marker)
                    .map(Some)
                    .map_err(|e| ConfigError::Invalid {
                        setting: format!("watch[{i}].marker"),
                        problem: format!("the patterns cannot be compiled: {e}"),
                        fix: MARKER_FIX.into(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Markers { sets })
    }

    /// Whether the file at `rel` (relative to watch `watch`) is a marker:
    /// its name matches one of the watch's marker patterns.
    pub fn is_marker(&self, watch: usize, rel: &Path) -> bool {
        let Some(Some(set)) = self.sets.get(watch) else {
            return false;
        };
        rel.file_name().is_some_and(|n| set.is_match(Path::new(n)))
    }
}
