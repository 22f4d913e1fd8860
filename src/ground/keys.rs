//! Object keys: how a local path becomes a key, and the prefix guard that
//! decides whether a key may be written at all.
//!
//! This module owns promise 2 ("never write outside the allowed prefixes") as
//! pure logic: [`PrefixGuard::check`] is called by the S3 layer before every
//! request. It never builds a key that escapes its prefix (no `.`, `..` or
//! empty segments, which a server or proxy might normalise away), and it
//! never touches the filesystem or the network.

use std::fmt;
use std::path::{Component, Path};

/// S3's limit on the length of a key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// Why a prefix cannot be allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixError {
    None,
    Invalid {
        prefix: String,
        reason: &'static str,
    },
}

/// Why a key was refused before any request was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key {key:?} is outside the allowed prefixes ({allowed})")]
    OutsidePrefixes { key: String, allowed: String },
    #[error(
        "key {key:?} has a {segment:?} segment, which a server could resolve outside its prefix"
    )]
    BadSegment { key: String, segment: String },
    #[error("key {key:?} is {len} bytes long; S3 keys are at most {MAX_KEY_BYTES} bytes")]
    TooLong { key: String, len: usize },
    #[error("path {path:?} cannot become a key: {reason}")]
    BadPath { path: String, reason: &'static str },
}

/// The prefixes putonly may write into, checked once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixGuard {
    prefixes: Vec<String>,
}

impl PrefixGuard {
    pub fn new(prefixes: Vec<String>) -> Result<Self, PrefixError> {
        if prefixes.is_empty() {
            return Err(PrefixError::None);
        }
        for p in &prefixes {
            let reason = if p.is_empty() {
                Some("is empty (it would allow the whole bucket)")
            } else if p.starts_with('/') {
                Some("starts with '/'")
            } else if p.contains('\0') {
                Some("contains a NUL byte")
            } else if has_bad_segment(p.trim_end_matches('/')) {
                Some("has a '.', '..' or empty segment")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(PrefixError::Invalid {
                    prefix: p.clone(),
                    reason,
                });
            }
        }
        Ok(Self { prefixes })
    }

    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }

    /// Whether `prefix` (a folder-like prefix a user asked for) lies inside
    /// one of the allowed prefixes, so every key under it would be allowed.
    pub fn covers(&self, prefix: &str) -> bool {
        self.prefixes.iter().any(|p| prefix.starts_with(p.as_str()))
    }

    /// The check made before every request: the key must start with an
    /// allowed prefix, have no segment a server could resolve, and fit S3.
    pub fn check(&self, key: &str) -> Result<(), KeyError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong {
                key: key.to_string(),
                len: key.len(),
            });
        }
        if let Some(seg) = key.split('/').find(|s| *s == "." || *s == "..") {
            return Err(KeyError::BadSegment {
                key: key.to_string(),
                segment: seg.to_string(),
            });
        }
        let prefix = self
            .prefixes
            .iter()
            .find(|p| key.starts_with(p.as_str()) && key.len() > p.len());
        let Some(prefix) = prefix else {
            return Err(KeyError::OutsidePrefixes {
                key: key.to_string(),
                allowed: self.to_string(),
            });
        };
        // Below the allowed prefix no segment may be empty either ("foo//x").
        if key[prefix.len()..]
            .split('/')
            .enumerate()
            .any(|(i, s)| s.is_empty() && (i != 0 || prefix.ends_with('/')))
        {
            return Err(KeyError::BadSegment {
                key: key.to_string(),
                segment: String::new(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for PrefixGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefixes.join(", "))
    }
}

fn has_bad_segment(s: &str) -> bool {
    s.split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
}

/// Normalises a user-given prefix: it names a folder, so it ends with '/'.
pub fn folder_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    }
}

/// Builds `prefix` + the relative path with '/' separators. The path must be
/// relative, made of normal UTF-8 components only.
pub fn key_for(prefix: &str, relative: &Path) -> Result<String, KeyError> {
    let bad = |reason| KeyError::BadPath {
        path: relative.to_string_lossy().into_owned(),
        reason,
    };
    let mut key = String::from(prefix);
    let mut first = true;
    for component in relative.components() {
        match component {
            Component::Normal(part) => {
                let part = part
                    .to_str()
                    .ok_or_else(|| bad("its name is not valid UTF-8, and S3 keys must be"))?;
                if !first {
                    key.push('/');
                }
                key.push_str(part);
                first = false;
            }
            Component::CurDir => {}
            _ => return Err(bad("it is not a plain relative path")),
        }
    }
    if first {
        return Err(bad("it names no file"));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seed() -> PrefixGuard {
        PrefixGuard::new(vec!["foo/".into(), "fighters/".into()]).unwrap()
    }

    #[test]
    fn allows_keys_inside_prefixes() {
        let g = seed();
        g.check("foo/test.txt").unwrap();
        g.check("fighters/a/b/c.bin").unwrap();
    }

    #[test]
    fn refuses_keys_outside_and_names_prefixes() {
        let g = seed();
        let err = g.check("bar/test.txt").unwrap_err();
        assert_eq!(
            err.to_string(),
            "key \"bar/test.txt\" is outside the allowed prefixes (foo/, fighters/)"
        );
        assert!(g.check("foo").is_err());
        assert!(
            g.check("foo/").is_err(),
            "the prefix alone is not an object"
        );
        assert!(g.check("foobar/x").is_err());
        assert!(g.check("/foo/x").is_err());
    }

    #[test]
    fn refuses_segments_a_server_could_resolve() {
        let g = seed();
        for key in ["foo/../bar/x", "foo/./x", "foo//x", "foo/a/..", "foo/x/"] {
            assert!(g.check(key).is_err(), "{key}");
        }
    }

    #[test]
    fn refuses_long_keys() {
        let g = seed();
        let key = format!("foo/{}", "a".repeat(MAX_KEY_BYTES));
        assert!(matches!(g.check(&key), Err(KeyError::TooLong { .. })));
        let key = format!("foo/{}", "a".repeat(MAX_KEY_BYTES - 4));
        g.check(&key).unwrap();
    }

    #[test]
    fn rejects_bad_prefixes() {
        assert_eq!(PrefixGuard::new(vec![]), Err(PrefixError::None));
        for p in ["", "/foo/", "foo/../", "a//b/", "./"] {
            assert!(PrefixGuard::new(vec![p.into()]).is_err(), "{p:?}");
        }
        PrefixGuard::new(vec!["logs/2024-".into()]).unwrap();
    }

    #[test]
    fn key_for_joins_with_slashes() {
        assert_eq!(
            key_for("foo/", Path::new("a/b.txt")).unwrap(),
            "foo/a/b.txt"
        );
        assert_eq!(key_for("foo/", Path::new("./b.txt")).unwrap(), "foo/b.txt");
        assert!(key_for("foo/", Path::new("../b.txt")).is_err());
        assert!(key_for("foo/", Path::new("/etc/passwd")).is_err());
        assert!(key_for("foo/", Path::new("")).is_err());
    }

    #[test]
    fn folder_prefix_adds_slash() {
        assert_eq!(folder_prefix("foo"), "foo/");
        assert_eq!(folder_prefix("foo/"), "foo/");
    }

    /// A path segment: mostly ordinary names (any Unicode, spaces, '%',
    /// '+', '\\'...), sometimes the ones that must never reach a key.
    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => "[^/\\x00]{1,12}",
            1 => Just(".".to_string()),
            1 => Just("..".to_string()),
            1 => Just("...".to_string()),
        ]
    }

    fn allowed_prefix() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("foo/".to_string()),
            Just("fighters/".to_string()),
            "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}/",
            "[a-z]{1,6}-", // a non-folder prefix such as "logs-"
        ]
    }

    proptest! {
        #[test]
        fn built_keys_stay_inside_their_prefix_with_clean_segments(
            prefix in allowed_prefix(),
            segments in proptest::collection::vec(segment(), 1..8),
        ) {
            let rel: std::path::PathBuf = segments.iter().collect();
            match key_for(&prefix, &rel) {
                Ok(key) => {
                    prop_assert!(!segments.iter().any(|s| s == ".."), "{rel:?} escaped");
                    prop_assert!(key.starts_with(&prefix));
                    let tail = &key[prefix.len()..];
                    prop_assert!(
                        tail.split('/').all(|s| !s.is_empty() && s != "." && s != ".."),
                        "{key:?}"
                    );
                    // Stable: the same path always gives the same key.
                    prop_assert_eq!(key_for(&prefix, &rel).unwrap(), key.clone());
                    // And the guard for that prefix lets it through (when it fits S3).
                    let g = PrefixGuard::new(vec![prefix.clone()]).unwrap();
                    prop_assert_eq!(g.check(&key).is_ok(), key.len() <= MAX_KEY_BYTES);
                }
                Err(_) => prop_assert!(
                    segments.iter().any(|s| s == "..") || segments.iter().all(|s| s == "."),
                    "{rel:?} refused"
                ),
            }
        }

        #[test]
        fn guard_accepts_exactly_the_keys_inside_the_allowed_prefixes(
            head in prop_oneof![
                Just("foo/"), Just("fighters/"), Just("foo"), Just("fo/"),
                Just("Foo/"), Just("/foo/"), Just("foo//"), Just("foo/../"),
                Just("foo/./"), Just("fighters"), Just("bar/"), Just(""),
            ],
            tail in "[^\\x00]{0,30}",
        ) {
            let g = seed();
            let key = format!("{head}{tail}");
            let inside = ["foo/", "fighters/"].iter().any(|p| {
                key.strip_prefix(p).is_some_and(|rest| {
                    !rest.is_empty() && rest.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
                })
            });
            prop_assert_eq!(g.check(&key).is_ok(), inside, "{:?}", key);
        }

        #[test]
        fn guard_refuses_everything_outside(key in "\\PC{0,60}") {
            let g = seed();
            if g.check(&key).is_ok() {
                prop_assert!(key.starts_with("foo/") || key.starts_with("fighters/"));
            }
        }
    }
}
