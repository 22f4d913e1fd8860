//! The `[[watch]]` tables resolved, and checked against each other (no two
//! watches may write the same keys).

use super::*;

pub(super) fn resolve_watch(
    i: usize,
    w: &RawWatch,
    guard: &PrefixGuard,
) -> Result<WatchSettings, ConfigError> {
    let name = |k: &str| format!("watch[{i}].{k}");
    let path = w.path.clone().ok_or_else(|| {
        ConfigError::invalid(&name("path"), "is missing", "give the folder to watch")
    })?;
    if !path.is_absolute() {
        return Err(ConfigError::invalid(
            &name("path"),
            format!("{} is not an absolute path", path.display()),
            "give the full path of the folder",
        ));
    }
    if path.parent().is_none() {
        return Err(ConfigError::invalid(
            &name("path"),
            "is the root folder /",
            "watch the folder producers write into, not the whole filesystem",
        ));
    }
    let prefix = w.prefix.clone().ok_or_else(|| {
        ConfigError::invalid(
            &name("prefix"),
            "is missing",
            format!("give the key prefix, one of or below: {guard}"),
        )
    })?;
    let prefix = crate::ground::keys::folder_prefix(&expand_template(&name("prefix"), &prefix)?);
    if !guard.covers(&prefix) || prefix.split('/').any(|s| s == "." || s == "..") {
        return Err(ConfigError::invalid(
            &name("prefix"),
            format!("{prefix:?} is not inside bucket.allowed_prefixes ({guard})"),
            "use one of the allowed prefixes or a folder below one",
        ));
    }
    // Every key below it must pass the guard ("foo//bar/" would not).
    if let Err(e) = guard.check(&format!("{prefix}x")) {
        let fix = match e {
            crate::ground::keys::KeyError::TooLong { .. } => "shorten the prefix",
            _ => "remove the empty segment (\"//\") from the prefix",
        };
        return Err(ConfigError::invalid(
            &name("prefix"),
            format!("{prefix:?} cannot begin a key: {e}"),
            fix,
        ));
    }
    let check_globs = |key: &str, globs: &[String]| -> Result<(), ConfigError> {
        for g in globs {
            globset::Glob::new(g).map_err(|e| {
                ConfigError::invalid(
                    &name(key),
                    format!("{g:?} is not a glob: {e}"),
                    "fix the pattern, e.g. \"**/*.csv\"",
                )
            })?;
        }
        Ok(())
    };
    // Each pattern, then the set of them as the watcher builds it (a set
    // too large to compile would otherwise take nothing, or exclude nothing).
    let check_set = |key: &str, globs: &[String]| -> Result<(), ConfigError> {
        glob_set(globs).map(|_| ()).map_err(|e| {
            ConfigError::invalid(
                &name(key),
                format!("the patterns cannot be compiled: {e}"),
                "use fewer or simpler patterns",
            )
        })
    };
    let include = w.include.clone().unwrap_or_default();
    check_globs("include", &include)?;
    check_set("include", &include)?;
    let mut exclude = w.exclude.clone().unwrap_or_default();
    check_globs("exclude", &exclude)?;
    exclude.extend(DEFAULT_EXCLUDES.iter().map(|s| s.to_string()));
    check_set("exclude", &exclude)?;
    let settle = match &w.settle {
        Some(s) => parse_duration(&name("settle"), s)?,
        None => Duration::from_secs(2),
    };
    let after_upload = match (w.after_upload.as_deref().unwrap_or("keep"), &w.move_to) {
        ("keep", None) => AfterUpload::Keep,
        ("delete", None) => AfterUpload::Delete,
        ("move", Some(to)) if to.is_absolute() => {
            if to.starts_with(&path) {
                return Err(ConfigError::invalid(
                    &name("move_to"),
                    "is inside the watched folder",
                    "move uploaded files to a folder outside the watched one",
                ));
            }
            AfterUpload::Move { to: to.clone() }
        }
        ("move", _) => {
            return Err(ConfigError::invalid(
                &name("move_to"),
                "is missing or not absolute",
                "with after_upload = \"move\", set move_to = \"/srv/sent\"",
            ));
        }
        ("keep" | "delete", Some(_)) => {
            return Err(ConfigError::invalid(
                &name("move_to"),
                "is set but after_upload is not \"move\"",
                "set after_upload = \"move\" or remove move_to",
            ));
        }
        (other, _) => {
            return Err(ConfigError::invalid(
                &name("after_upload"),
                format!("{other:?} is not an action"),
                "use \"keep\", \"delete\" or \"move\"",
            ));
        }
    };
    let marker = w
        .marker
        .clone()
        .map(OneOrMany::into_vec)
        .unwrap_or_default();
    check_globs("marker", &marker)?;
    for m in &marker {
        if m.contains('/') || m.is_empty() {
            return Err(ConfigError::invalid(
                &name("marker"),
                format!("{m:?} is not a file name pattern"),
                "give the marker's file name or a glob on it, without '/', e.g. \"_SUCCESS\" or \"*.done\"",
            ));
        }
    }
    // A set that cannot be built (too large a pattern) would be a watch
    // without markers: its markers sent first.
    if !marker.is_empty() {
        marker_set(&marker).map_err(|e| {
            ConfigError::invalid(
                &name("marker"),
                format!("the patterns cannot be compiled: {e}"),
                MARKER_FIX,
            )
        })?;
    }
    // A marker excluded would never be taken: its batch would never end.
    let excluded = glob_set(&exclude).unwrap_or_else(|_| globset::GlobSet::empty());
    if let Some(m) = marker.iter().find(|m| excluded.is_match(m.as_str())) {
        return Err(ConfigError::invalid(
            &name("marker"),
            format!("{m:?} is a name that is never taken (hidden, temporary, or in exclude)"),
            "name the marker so that no exclude pattern matches it, e.g. \"_SUCCESS\"",
        ));
    }
    // With include patterns, markers are taken whatever they say.
    let mut include = include;
    if !include.is_empty() {
        include.extend(marker.iter().map(|m| format!("**/{m}")));
    }
    let manifest = w.manifest.unwrap_or(false);
    if manifest && marker.is_empty() {
        return Err(ConfigError::invalid(
            &name("manifest"),
            "is true but no marker is set",
            "set marker = \"_SUCCESS\" (the manifest is written before each marker), or remove manifest",
        ));
    }
    Ok(WatchSettings {
        path,
        prefix,
        include,
        exclude,
        settle,
        after_upload,
        marker,
        manifest,
        stream: w.stream.unwrap_or(false),
    })
}

pub(super) fn check_watches(
    watches: &[WatchSettings],
    state: Option<&StateSettings>,
) -> Result<(), ConfigError> {
    for (i, a) in watches.iter().enumerate() {
        for (j, b) in watches.iter().enumerate() {
            if i != j && a.path.starts_with(&b.path) {
                return Err(ConfigError::invalid(
                    &format!("watch[{i}].path"),
                    format!(
                        "{} overlaps watch[{j}] ({})",
                        a.path.display(),
                        b.path.display()
                    ),
                    "watch folders that do not contain each other",
                ));
            }
            // Moved files would be taken again by the other watch.
            if let AfterUpload::Move { to } = &a.after_upload
                && i != j
                && (to.starts_with(&b.path) || b.path.starts_with(to))
            {
                return Err(ConfigError::invalid(
                    &format!("watch[{i}].move_to"),
                    format!(
                        "{} and watch[{j}] ({}) contain one another",
                        to.display(),
                        b.path.display()
                    ),
                    "move uploaded files to a folder outside every watched folder",
                ));
            }
        }
        // Two watches whose prefixes are equal or nested can produce the
        // same key (a/x.csv under foo/ and x.csv under foo/a/); with
        // after_upload = "delete" one file would be lost.
        for (j, b) in watches.iter().enumerate().take(i) {
            if a.prefix.starts_with(&b.prefix) || b.prefix.starts_with(&a.prefix) {
                let how = if a.prefix == b.prefix {
                    format!("both have the prefix {:?}", a.prefix)
                } else {
                    format!(
                        "its prefix {:?} and watch[{j}]'s prefix {:?} are nested",
                        a.prefix, b.prefix
                    )
                };
                return Err(ConfigError::invalid(
                    &format!("watch[{i}].prefix"),
                    format!(
                        "watch[{i}] ({}) and watch[{j}] ({}) can write the same keys: {how}",
                        a.path.display(),
                        b.path.display()
                    ),
                    "give each watch its own prefix, neither inside the other (e.g. foo/a/ and foo/b/)",
                ));
            }
        }
        if let Some(st) = state.filter(|st| st.dir.starts_with(&a.path)) {
            return Err(ConfigError::invalid(
                "state.dir",
                format!(
                    "{} is inside watch[{i}] ({})",
                    st.dir.display(),
                    a.path.display()
                ),
                "keep the journal outside every watched folder",
            ));
        }
    }
    Ok(())
}
