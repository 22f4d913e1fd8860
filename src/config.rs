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
//! only a name here).

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

/// The file as written, before defaults and checks.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub aws: RawAws,
    pub role: Option<RawRole>,
    #[serde(default)]
    pub bucket: RawBucket,
    #[serde(default)]
    pub upload: RawUpload,
    pub state: Option<RawState>,
    #[serde(default, rename = "watch")]
    pub watches: Vec<RawWatch>,
    #[serde(default)]
    pub agent: RawAgent,
    pub metrics: Option<RawMetrics>,
    /// The file this came from, if any (named in messages; not a key).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
    pub unhealthy_after: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: Option<PathBuf>,
    pub retention: Option<String>,
    pub keep_receipts: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatch {
    pub path: Option<PathBuf>,
    pub prefix: Option<String>,
    pub include: Option<Vec<String>>,
    pub exclude: Option<Vec<String>>,
    pub settle: Option<String>,
    pub after_upload: Option<String>,
    pub move_to: Option<PathBuf>,
    pub marker: Option<OneOrMany>,
    pub manifest: Option<bool>,
    pub stream: Option<bool>,
}

/// A setting given as one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub rescan_interval: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub failed_retry_after: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
    pub allow_insecure_http: Option<bool>,
    /// Set when `--endpoint-url` replaced the file's value (not a key).
    #[serde(skip)]
    pub endpoint_url_from_flag: bool,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRole {
    pub arn: Option<String>,
    pub session_name: Option<String>,
    pub external_id: Option<Secret>,
    pub external_id_file: Option<PathBuf>,
    pub duration: Option<String>,
    pub refresh_before: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBucket {
    pub name: Option<String>,
    pub allowed_prefixes: Option<Vec<String>>,
    pub acl: Option<String>,
    pub storage_class: Option<String>,
    pub sse: Option<String>,
    pub sse_kms_key_id: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub overwrite: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpload {
    pub part_size: Option<String>,
    pub multipart_threshold: Option<String>,
    pub concurrency: Option<usize>,
    pub requests_in_flight: Option<usize>,
    pub bandwidth_limit: Option<String>,
    pub checksum: Option<String>,
    pub max_attempts: Option<u32>,
    pub request_timeout: Option<String>,
}

impl RawConfig {
    /// Reads and strictly parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut raw = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        raw.file = Some(path.to_path_buf());
        Ok(raw)
    }

    /// Parses configuration text; the error is one line that names the
    /// line and column, and the key where there is one.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("line {line}, column {column}: {message}")
                }
                None => message,
            }
        })
    }
}

/// Where base credentials and endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    pub region: Option<String>,
    pub profile: Option<String>,
    /// Checked by [`check_endpoint`]: https, loopback, or allowed insecure.
    pub endpoint_url: Option<String>,
    /// The setting `endpoint_url` came from, for messages:
    /// `aws.endpoint_url` or `--endpoint-url`.
    pub endpoint_setting: &'static str,
    /// Plain http to a host other than loopback is allowed.
    pub allow_insecure_http: bool,
    /// The configuration file, if any (named in messages).
    pub file: Option<PathBuf>,
}

/// The role to assume with STS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSettings {
    pub arn: String,
    pub session_name: String,
    /// From `external_id`, `external_id_file`, `--external-id`,
    /// `PUTONLY_EXTERNAL_ID` or `--external-id-file`; never shown.
    pub external_id: Option<Secret>,
    /// The file the external id was read from, if it was (its permissions
    /// are checked like the configuration file's).
    pub external_id_file: Option<PathBuf>,
    /// Asked of STS as is; STS may refuse values outside its own limits.
    pub duration: Duration,
    /// Renew this long before the credentials expire.
    pub refresh_before: Duration,
}

/// Server-side encryption of uploaded objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    Aes256,
    Kms { key_id: Option<String> },
}

/// The bucket and what each object is written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSettings {
    pub name: String,
    pub guard: PrefixGuard,
    pub acl: Option<String>,
    pub storage_class: Option<String>,
    pub sse: Option<Sse>,
    pub metadata: BTreeMap<String, String>,
    /// `false`: every object is written with `If-None-Match: *`, so a key
    /// that already holds an object is never replaced (the server answers
    /// 412 and the file is recorded as "exists").
    pub overwrite: bool,
}

/// How files are cut and sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSettings {
    pub part_size: u64,
    pub multipart_threshold: u64,
    /// Parts of `part_size` in memory at once: the memory bound is
    /// `part_size × concurrency` bytes of request bodies.
    pub concurrency: usize,
    /// Requests in flight at once, whatever their size (small files go
    /// many at a time within the memory bound).
    pub requests_in_flight: usize,
    /// Bytes per second; `None` is unlimited.
    pub bandwidth_limit: Option<u64>,
    pub checksum: ChecksumKind,
    /// Attempts per request before a transient failure fails the file;
    /// `None` retries forever (the agent).
    pub max_attempts: Option<u32>,
    /// How long one request may take, from sending it (its body included)
    /// to the server's answer, before the attempt is abandoned and retried.
    pub request_timeout: Duration,
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            part_size: default_part_size(),
            multipart_threshold: default_part_size(),
            concurrency: default_concurrency(),
            requests_in_flight: default_requests_in_flight(),
            bandwidth_limit: None,
            checksum: ChecksumKind::Crc64Nvme,
            max_attempts: Some(default_max_attempts()),
            request_timeout: default_request_timeout(),
        }
    }
}

pub fn default_request_timeout() -> Duration {
    Duration::from_secs(120)
}

pub fn default_part_size() -> u64 {
    8 * 1024 * 1024
}
pub fn default_concurrency() -> usize {
    8
}
/// Chosen from measurements (docs/performance.md): small files stop
/// getting faster beyond it on a local object store.
pub fn default_requests_in_flight() -> usize {
    64
}
pub fn default_max_attempts() -> u32 {
    10
}
pub fn default_session_name() -> String {
    "putonly".to_string()
}
pub fn default_role_duration() -> Duration {
    Duration::from_secs(3600)
}
pub fn default_refresh_before() -> Duration {
    Duration::from_secs(300)
}

/// Where the agent keeps its journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSettings {
    pub dir: PathBuf,
    /// Done and failed records older than this are pruned once their file
    /// is gone from disk.
    pub retention: Duration,
    /// Receipts (`putonly receipts`) older than this are removed; pruning
    /// file records never removes one. Default: `retention`.
    pub keep_receipts: Duration,
}

/// What happens to a file once it is in the bucket and recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterUpload {
    Keep,
    Delete,
    Move { to: PathBuf },
}

/// Files that are never taken, whatever `exclude` says: hidden files and
/// folders, and the names editors and downloaders give files in progress.
pub const DEFAULT_EXCLUDES: [&str; 8] = [
    ".*",
    "*.tmp",
    "*.part",
    "*.partial",
    "*~",
    "*.swp",
    "*.swx",
    "*.crdownload",
];

/// One watched folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSettings {
    pub path: PathBuf,
    /// Ends with '/'; inside an allowed prefix.
    pub prefix: String,
    pub include: Vec<String>,
    /// The user's patterns plus [`DEFAULT_EXCLUDES`].
    pub exclude: Vec<String>,
    pub settle: Duration,
    pub after_upload: AfterUpload,
    /// Globs on a file's name: such a file is a batch's completion marker,
    /// sent only after the rest of its folder ([`crate::batches`]).
    pub marker: Vec<String>,
    /// With markers: a manifest of the batch is written before each one.
    pub manifest: bool,
    /// Full parts of a file are sent while it is still being written
    /// ([`crate::stream`]), for append-only producers.
    pub stream: bool,
}

/// How the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    pub rescan_interval: Duration,
    pub shutdown_timeout: Duration,
    pub failed_retry_after: Duration,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            rescan_interval: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(30),
            failed_retry_after: Duration::from_secs(3600),
        }
    }
}

/// The checked settings every other module trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub aws: AwsSettings,
    pub role: Option<RoleSettings>,
    pub bucket: BucketSettings,
    pub upload: UploadSettings,
    pub state: Option<StateSettings>,
    pub watches: Vec<WatchSettings>,
    pub agent: AgentSettings,
    pub metrics: Option<MetricsSettings>,
}

/// The optional /metrics and /healthz listener of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    pub listen: std::net::SocketAddr,
    /// /healthz turns unhealthy when files wait and nothing succeeded for this long.
    pub unhealthy_after: Duration,
}

impl MetricsSettings {
    /// Why `listen` deserves a warning: an address other machines (or other
    /// pods) can reach. `None` on loopback.
    pub fn exposure(&self) -> Option<String> {
        let ip = self.listen.ip();
        if ip.is_loopback() {
            return None;
        }
        let reach = if ip.is_unspecified() {
            "every interface of this machine"
        } else {
            "a network interface"
        };
        Some(format!(
            "metrics.listen = \"{}\" listens on {reach}: anyone who can reach it reads /metrics \
             (file counts, no credentials) and can hold its connections; use \"127.0.0.1:{}\", \
             or let only the monitoring system in (a firewall; in Kubernetes the NetworkPolicy \
             in packaging/kubernetes/daemonset.yaml)",
            self.listen,
            self.listen.port()
        ))
    }
}

impl Settings {
    /// Resolves raw values (the file merged with any flags) into settings.
    pub fn resolve(raw: &RawConfig) -> Result<Self, ConfigError> {
        let endpoint_setting = if raw.aws.endpoint_url_from_flag {
            "--endpoint-url"
        } else {
            "aws.endpoint_url"
        };
        let allow_insecure_http = raw.aws.allow_insecure_http.unwrap_or(false);
        let endpoint_url = non_empty(endpoint_setting, &raw.aws.endpoint_url)?;
        if let Some(url) = &endpoint_url {
            check_endpoint(
                endpoint_setting,
                url,
                allow_insecure_http,
                raw.file.as_deref(),
            )?;
        }
        let aws = AwsSettings {
            region: non_empty("aws.region", &raw.aws.region)?,
            profile: non_empty("aws.profile", &raw.aws.profile)?,
            endpoint_url,
            endpoint_setting,
            allow_insecure_http,
            file: raw.file.clone(),
        };
        let role = match &raw.role {
            None => None,
            Some(r) => Some(resolve_role(r)?),
        };
        let bucket = resolve_bucket(&raw.bucket)?;
        let upload = resolve_upload(&raw.upload)?;
        let state = match &raw.state {
            None => None,
            Some(st) => Some(resolve_state(st)?),
        };
        let watches = raw
            .watches
            .iter()
            .enumerate()
            .map(|(i, w)| resolve_watch(i, w, &bucket.guard))
            .collect::<Result<Vec<_>, _>>()?;
        check_watches(&watches, state.as_ref())?;
        let agent = resolve_agent(&raw.agent)?;
        let metrics = raw.metrics.as_ref().map(resolve_metrics).transpose()?;
        Ok(Settings {
            aws,
            role,
            bucket,
            upload,
            state,
            watches,
            agent,
            metrics,
        })
    }

    /// The agent needs a state folder and at least one watch.
    pub fn require_agent(&self) -> Result<&StateSettings, ConfigError> {
        if self.watches.is_empty() {
            return Err(ConfigError::invalid(
                "watch",
                "no [[watch]] is configured",
                "add a [[watch]] table with path = \"/srv/outbox\" and prefix = \"foo/\"",
            ));
        }
        self.state.as_ref().ok_or_else(|| {
            ConfigError::invalid(
                "state.dir",
                "is missing",
                "add [state] dir = \"/var/lib/putonly\" (the journal lives there)",
            )
        })
    }
}

fn resolve_state(st: &RawState) -> Result<StateSettings, ConfigError> {
    let dir = st.dir.clone().ok_or_else(|| {
        ConfigError::invalid(
            "state.dir",
            "is missing",
            "add dir = \"/var/lib/putonly\" to [state]",
        )
    })?;
    if !dir.is_absolute() {
        return Err(ConfigError::invalid(
            "state.dir",
            format!("{} is not an absolute path", dir.display()),
            "give the full path, e.g. /var/lib/putonly",
        ));
    }
    let retention = match &st.retention {
        Some(s) => parse_duration("state.retention", s)?,
        None => Duration::from_secs(30 * 24 * 3600),
    };
    let keep_receipts = match &st.keep_receipts {
        Some(s) => parse_duration("state.keep_receipts", s)?,
        None => retention,
    };
    Ok(StateSettings {
        dir,
        retention,
        keep_receipts,
    })
}

fn resolve_watch(
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
        crate::watch::glob_set(globs).map(|_| ()).map_err(|e| {
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
        crate::batches::marker_set(&marker).map_err(|e| {
            ConfigError::invalid(
                &name("marker"),
                format!("the patterns cannot be compiled: {e}"),
                crate::batches::MARKER_FIX,
            )
        })?;
    }
    // A marker excluded would never be taken: its batch would never end.
    let excluded = crate::watch::glob_set(&exclude).unwrap_or_else(|_| globset::GlobSet::empty());
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

fn check_watches(
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

fn resolve_agent(a: &RawAgent) -> Result<AgentSettings, ConfigError> {
    let d = AgentSettings::default();
    let get = |key: &str, v: &Option<String>, default: Duration| match v {
        Some(s) => parse_duration(key, s),
        None => Ok(default),
    };
    Ok(AgentSettings {
        rescan_interval: get(
            "agent.rescan_interval",
            &a.rescan_interval,
            d.rescan_interval,
        )?,
        shutdown_timeout: get(
            "agent.shutdown_timeout",
            &a.shutdown_timeout,
            d.shutdown_timeout,
        )?,
        failed_retry_after: get(
            "agent.failed_retry_after",
            &a.failed_retry_after,
            d.failed_retry_after,
        )?,
    })
}

fn non_empty(setting: &str, v: &Option<String>) -> Result<Option<String>, ConfigError> {
    match v {
        Some(s) if s.trim().is_empty() => Err(ConfigError::invalid(
            setting,
            "is empty",
            "remove the key or give it a value",
        )),
        Some(s) => Ok(Some(s.trim().to_string())),
        None => Ok(None),
    }
}

fn resolve_role(r: &RawRole) -> Result<RoleSettings, ConfigError> {
    let arn = non_empty("role.arn", &r.arn)?.ok_or_else(|| {
        ConfigError::invalid(
            "role.arn",
            "is missing",
            "give the ARN of the role to assume, e.g. arn:aws:iam::123456789012:role/account-a-s3-role, or remove [role] to use the base credentials as they are",
        )
    })?;
    if !arn.starts_with("arn:") || !arn.contains(":role/") {
        return Err(ConfigError::invalid(
            "role.arn",
            format!("{arn:?} is not a role ARN"),
            "write it as arn:aws:iam::ACCOUNT_ID:role/ROLE_NAME",
        ));
    }
    let session_name =
        non_empty("role.session_name", &r.session_name)?.unwrap_or_else(default_session_name);
    if session_name.len() < 2
        || session_name.len() > 64
        || !session_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "=,.@-_".contains(c))
    {
        return Err(ConfigError::invalid(
            "role.session_name",
            format!("{session_name:?} is not a valid STS session name"),
            "use 2 to 64 characters from letters, digits and =,.@-_",
        ));
    }
    let duration = match &r.duration {
        Some(s) => parse_duration("role.duration", s)?,
        None => default_role_duration(),
    };
    let refresh_before = match &r.refresh_before {
        Some(s) => parse_duration("role.refresh_before", s)?,
        None => default_refresh_before().min(duration / 2),
    };
    if refresh_before >= duration {
        return Err(ConfigError::invalid(
            "role.refresh_before",
            format!(
                "{} is not shorter than role.duration ({})",
                humantime::format_duration(refresh_before),
                humantime::format_duration(duration)
            ),
            "make refresh_before smaller than duration (a fifth of it is a good choice)",
        ));
    }
    let (external_id, external_id_file) = resolve_external_id(r)?;
    Ok(RoleSettings {
        arn,
        session_name,
        external_id,
        external_id_file,
        duration,
        refresh_before,
    })
}

/// The external id, from `role.external_id` or the file `role.external_id_file`
/// names (one line; surrounding white space is dropped). The value is never
/// part of an error message.
fn resolve_external_id(r: &RawRole) -> Result<(Option<Secret>, Option<PathBuf>), ConfigError> {
    let (value, setting, file) = match (&r.external_id, &r.external_id_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                "role.external_id_file",
                "is set together with role.external_id",
                "keep one: external_id_file (preferred: the file can be readable by the agent alone) or external_id",
            ));
        }
        (None, None) => return Ok((None, None)),
        (Some(id), None) => (id.expose().to_string(), "role.external_id", None),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::invalid(
                    "role.external_id_file",
                    format!("cannot read {}: {e}", path.display()),
                    "create the file with the external id on one line, readable by the agent's user only (chmod 600, or 640 with the agent's group)",
                )
            })?;
            (text, "role.external_id_file", Some(path.clone()))
        }
    };
    let id = value.trim();
    let where_ = file
        .as_ref()
        .map_or(String::new(), |p| format!(" ({})", p.display()));
    if id.is_empty() {
        return Err(ConfigError::invalid(
            setting,
            format!("is empty{where_}"),
            "give the external id the role's trust policy requires, or remove the setting",
        ));
    }
    // STS: at most 1224 characters from [\w+=,.@:/-] (and at least 2, left
    // to STS itself). Checked here so that a stray line or character in the
    // file is found before STS refuses it.
    if id.len() > 1224
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c))
    {
        return Err(ConfigError::invalid(
            setting,
            format!("is not a valid external id{where_} (the value is not shown: it is a secret)"),
            "STS accepts up to 1224 characters from letters, digits and _+=,.@:/- on one line",
        ));
    }
    Ok((Some(Secret::new(id)), file))
}

fn resolve_bucket(b: &RawBucket) -> Result<BucketSettings, ConfigError> {
    let name = non_empty("bucket.name", &b.name)?.ok_or_else(|| {
        ConfigError::invalid(
            "bucket.name",
            "is missing",
            "set [bucket] name = \"BUCKET\" in the configuration or pass --bucket BUCKET",
        )
    })?;
    if name.len() < 3
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(ConfigError::invalid(
            "bucket.name",
            format!("{name:?} is not a valid S3 bucket name"),
            "use 3 to 63 lowercase letters, digits, dots and hyphens",
        ));
    }
    let prefixes = b.allowed_prefixes.clone().unwrap_or_default();
    let guard = PrefixGuard::new(prefixes).map_err(|e| match e {
        PrefixError::None => ConfigError::invalid(
            "bucket.allowed_prefixes",
            "is missing or empty",
            "list the prefixes putonly may write into, e.g. allowed_prefixes = [\"foo/\", \"fighters/\"] (or pass --allowed-prefix)",
        ),
        PrefixError::Invalid { prefix, reason } => ConfigError::invalid(
            "bucket.allowed_prefixes",
            format!("{prefix:?} {reason}"),
            "write prefixes like \"foo/\": no leading '/', no '.', '..' or empty segments",
        ),
    })?;
    let sse = match non_empty("bucket.sse", &b.sse)?.as_deref() {
        None => {
            if b.sse_kms_key_id.is_some() {
                return Err(ConfigError::invalid(
                    "bucket.sse_kms_key_id",
                    "is set but bucket.sse is not \"aws:kms\"",
                    "add sse = \"aws:kms\" or remove sse_kms_key_id",
                ));
            }
            None
        }
        Some("AES256") => Some(Sse::Aes256),
        Some("aws:kms") => Some(Sse::Kms {
            key_id: non_empty("bucket.sse_kms_key_id", &b.sse_kms_key_id)?,
        }),
        Some(other) => {
            return Err(ConfigError::invalid(
                "bucket.sse",
                format!("{other:?} is not a server-side encryption mode"),
                "use \"AES256\" or \"aws:kms\"",
            ));
        }
    };
    let acl = non_empty("bucket.acl", &b.acl)?;
    if let Some(acl) = &acl {
        const CANNED: [&str; 7] = [
            "private",
            "public-read",
            "public-read-write",
            "authenticated-read",
            "aws-exec-read",
            "bucket-owner-read",
            "bucket-owner-full-control",
        ];
        if !CANNED.contains(&acl.as_str()) {
            return Err(ConfigError::invalid(
                "bucket.acl",
                format!("{acl:?} is not a canned ACL"),
                "use \"bucket-owner-full-control\" for cross-account uploads, or another canned ACL",
            ));
        }
    }
    let metadata = b.metadata.clone().unwrap_or_default();
    for (k, v) in &metadata {
        if k.is_empty()
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::invalid(
                "bucket.metadata",
                format!("{k:?} is not a valid metadata name"),
                "use ASCII letters, digits, '-' and '_'",
            ));
        }
        if !v.chars().all(|c| c.is_ascii() && !c.is_ascii_control()) {
            return Err(ConfigError::invalid(
                &format!("bucket.metadata.{k}"),
                "holds characters S3 cannot carry in a header",
                "use printable ASCII",
            ));
        }
    }
    Ok(BucketSettings {
        name,
        guard,
        acl,
        storage_class: non_empty("bucket.storage_class", &b.storage_class)?,
        sse,
        metadata,
        overwrite: b.overwrite.unwrap_or(true),
    })
}

fn resolve_upload(u: &RawUpload) -> Result<UploadSettings, ConfigError> {
    let part_size = match &u.part_size {
        Some(s) => parse_size("upload.part_size", s)?,
        None => default_part_size(),
    };
    if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
        return Err(ConfigError::invalid(
            "upload.part_size",
            format!(
                "{} is outside what S3 accepts",
                bytesize::ByteSize(part_size)
            ),
            "choose a size from 5MiB to 5GiB",
        ));
    }
    let multipart_threshold = match &u.multipart_threshold {
        Some(s) => parse_size("upload.multipart_threshold", s)?,
        None => part_size,
    };
    if multipart_threshold > MAX_PART_SIZE {
        return Err(ConfigError::invalid(
            "upload.multipart_threshold",
            "is larger than a single PutObject may be (5GiB)",
            "choose a size of 5GiB or less",
        ));
    }
    let concurrency = u.concurrency.unwrap_or_else(default_concurrency);
    if !(1..=256).contains(&concurrency) {
        return Err(ConfigError::invalid(
            "upload.concurrency",
            format!("{concurrency} is out of range"),
            "choose from 1 to 256 parts in flight",
        ));
    }
    let requests_in_flight = u
        .requests_in_flight
        .unwrap_or_else(|| default_requests_in_flight().max(concurrency));
    if !(1..=1024).contains(&requests_in_flight) {
        return Err(ConfigError::invalid(
            "upload.requests_in_flight",
            format!("{requests_in_flight} is out of range"),
            "choose from 1 to 1024 requests in flight",
        ));
    }
    let bandwidth_limit = match &u.bandwidth_limit {
        Some(s) => Some(parse_rate("upload.bandwidth_limit", s)?),
        None => None,
    };
    let checksum = match &u.checksum {
        Some(s) => ChecksumKind::parse(s).ok_or_else(|| {
            ConfigError::invalid(
                "upload.checksum",
                format!("{s:?} is not a supported checksum"),
                format!("use one of {}", ChecksumKind::NAMES),
            )
        })?,
        None => ChecksumKind::Crc64Nvme,
    };
    let max_attempts = match u.max_attempts {
        Some(0) => None,
        Some(n) => Some(n),
        None => Some(default_max_attempts()),
    };
    let request_timeout = match &u.request_timeout {
        Some(s) => parse_duration("upload.request_timeout", s)?,
        None => default_request_timeout(),
    };
    if request_timeout < Duration::from_secs(1) {
        return Err(ConfigError::invalid(
            "upload.request_timeout",
            "is shorter than a second",
            "allow at least the time one part takes to send, e.g. \"120s\"",
        ));
    }
    Ok(UploadSettings {
        part_size,
        multipart_threshold,
        concurrency,
        requests_in_flight,
        bandwidth_limit,
        checksum,
        max_attempts,
        request_timeout,
    })
}

fn resolve_metrics(m: &RawMetrics) -> Result<MetricsSettings, ConfigError> {
    let listen = m.listen.as_deref().ok_or_else(|| {
        ConfigError::invalid(
            "metrics.listen",
            "is missing",
            "give an address such as \"127.0.0.1:9464\", or remove [metrics]",
        )
    })?;
    let listen = listen.parse().map_err(|_| {
        ConfigError::invalid(
            "metrics.listen",
            format!("{listen:?} is not an address with a port"),
            "use the form \"127.0.0.1:9464\" (or \"[::1]:9464\")",
        )
    })?;
    let unhealthy_after = match &m.unhealthy_after {
        Some(s) => parse_duration("metrics.unhealthy_after", s)?,
        None => Duration::from_secs(600),
    };
    Ok(MetricsSettings {
        listen,
        unhealthy_after,
    })
}

/// Expands `{hostname}` and `{env:NAME}` in a watch prefix, so one
/// configuration serves a fleet, each host writing under its own prefix. An
/// expanded value must be one plain key segment.
pub fn expand_template(setting: &str, template: &str) -> Result<String, ConfigError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            return Err(ConfigError::invalid(
                setting,
                format!("{template:?} has an unclosed '{{'"),
                "write {hostname} or {env:NAME}",
            ));
        };
        let name = &rest[start + 1..start + len];
        let value = match name {
            "hostname" => hostname(),
            _ => match name.strip_prefix("env:") {
                Some(var) => std::env::var(var).map_err(|_| {
                    ConfigError::invalid(
                        setting,
                        format!("uses {{{name}}} but the environment variable {var} is not set"),
                        format!("set {var} for the agent (a DaemonSet can pass spec.nodeName)"),
                    )
                })?,
                None => {
                    return Err(ConfigError::invalid(
                        setting,
                        format!("{{{name}}} is not a known placeholder"),
                        "use {hostname} or {env:NAME}",
                    ));
                }
            },
        };
        if value.is_empty() || value.contains('/') || value == "." || value == ".." {
            return Err(ConfigError::invalid(
                setting,
                format!("{{{name}}} expands to {value:?}, which is not one plain key segment"),
                "use a placeholder whose value has no '/' and is not empty, '.' or '..'",
            ));
        }
        out.push_str(&value);
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// How requests reach an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// https: encrypted and the server authenticated.
    Tls,
    /// Plain http to this machine (127.0.0.0/8, ::1, `localhost`): the
    /// traffic never leaves it.
    Loopback,
    /// Plain http across a network, allowed by `aws.allow_insecure_http`.
    Insecure,
}

/// The host of an http(s) URL, as a client connects to it (after any
/// `user@`, without port or IPv6 brackets); `None` for another scheme.
fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    Some(match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    })
}

/// Whether `host` is this machine: `localhost`, 127.0.0.0/8, ::1 (also as
/// ::ffff:127.x.y.z). Anything else, a name included, is not.
fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(std::net::IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// Checks an endpoint URL from `setting` (a key, a flag or an environment
/// variable): https is fine; plain http only to loopback, or anywhere when
/// `allow_insecure` (`aws.allow_insecure_http`). Over plain http the
/// temporary secret key and session token STS hands out cross the network
/// in clear, and with unsigned payloads a man in the middle can swap a
/// file's content for other bytes of the same length and recompute the CRC.
/// `file` is the configuration file the fix names.
pub fn check_endpoint(
    setting: &str,
    url: &str,
    allow_insecure: bool,
    file: Option<&Path>,
) -> Result<Transport, ConfigError> {
    let Some(host) = url_host(url) else {
        return Err(ConfigError::invalid(
            setting,
            format!("{url:?} is not an http:// or https:// URL"),
            "write it as https://HOST, or http://127.0.0.1:PORT for a server on this machine",
        ));
    };
    if url.starts_with("https://") {
        return Ok(Transport::Tls);
    }
    if is_loopback(host) {
        return Ok(Transport::Loopback);
    }
    if allow_insecure {
        return Ok(Transport::Insecure);
    }
    let file = file.map_or_else(
        || "the configuration file (--config FILE; putonly push and policy also take --allow-insecure-http)".to_string(),
        |p| p.display().to_string(),
    );
    Err(ConfigError::invalid(
        setting,
        format!(
            "{url} is plain http to {host:?}, which is not this machine: the temporary secret key and session token from STS, and every file, would cross the network unencrypted, where they can be read, and a file swapped for other bytes of the same length with its CRC recomputed"
        ),
        format!(
            "use https://; or, only on a network you trust, set allow_insecure_http = true in the [aws] table of {file}"
        ),
    ))
}

/// Who besides the agent's user can read `path`, as a warning with the fix:
/// other users (o+r), or a group this process is not in (g+r). `None` when
/// only the owner and the process's own groups can (the packaged
/// /etc/putonly/agent.toml is 0640 root:putonly), or it cannot be told.
pub fn readable_by_others(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.mode();
    let shown = path.display();
    if mode & 0o004 != 0 {
        return Some(format!(
            "{shown} (mode {:04o}) can be read by every user of this machine; fix: chmod o-r {shown}",
            mode & 0o7777
        ));
    }
    if mode & 0o040 != 0 && !in_group(meta.gid()) {
        let group = group_name(meta.gid()).unwrap_or_else(|| meta.gid().to_string());
        return Some(format!(
            "{shown} (mode {:04o}) can be read by the members of group {group}, and this process is not in that group; fix: chgrp to the agent's group (the package's is putonly), or chmod g-r {shown}",
            mode & 0o7777
        ));
    }
    None
}

/// Whether this process runs in group `gid` (effective or supplementary).
/// The packaged group `putonly` counts as the agent's too, so that a check
/// run by root does not warn about the packaged file.
fn in_group(gid: u32) -> bool {
    // SAFETY: getegid cannot fail; getgroups writes at most buf.len() ids.
    if unsafe { libc::getegid() } == gid {
        return true;
    }
    let mut buf = vec![0 as libc::gid_t; 1024];
    let len = libc::c_int::try_from(buf.len()).unwrap_or(0);
    let n = unsafe { libc::getgroups(len, buf.as_mut_ptr()) };
    if let Ok(n) = usize::try_from(n)
        && buf[..n.min(buf.len())].contains(&gid)
    {
        return true;
    }
    group_name(gid).as_deref() == Some("putonly")
}

/// The name of group `gid`, if the system knows one.
fn group_name(gid: u32) -> Option<String> {
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the sizes given; the result
    // points into `group` and `buf`, both alive while it is read.
    let rc = unsafe { libc::getgrgid_r(gid, &mut group, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() || group.gr_name.is_null() {
        return None;
    }
    // SAFETY: gr_name is a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(group.gr_name) };
    Some(name.to_string_lossy().into_owned())
}

impl Settings {
    /// Files holding this configuration (the file itself, the external id
    /// file) that users other than the agent's can read: one warning with
    /// the fix for each.
    pub fn exposed_files(&self) -> Vec<String> {
        let id_file = self
            .role
            .as_ref()
            .and_then(|r| r.external_id_file.as_deref());
        self.aws
            .file
            .as_deref()
            .into_iter()
            .chain(id_file)
            .filter_map(readable_by_others)
            .collect()
    }
}

/// Parses a size such as `16MiB`, `8 MB` or `1048576`.
pub fn parse_size(setting: &str, s: &str) -> Result<u64, ConfigError> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| {
            ConfigError::invalid(
                setting,
                format!("{s:?} is not a size"),
                "write a number with a unit, e.g. \"16MiB\" or \"500KB\"",
            )
        })
}

/// Parses a rate such as `50MiB/s`; zero is refused.
pub fn parse_rate(setting: &str, s: &str) -> Result<u64, ConfigError> {
    let amount = s.trim().strip_suffix("/s").unwrap_or(s.trim());
    let rate = parse_size(setting, amount).map_err(|_| {
        ConfigError::invalid(
            setting,
            format!("{s:?} is not a rate"),
            "write bytes per second with a unit, e.g. \"50MiB/s\"",
        )
    })?;
    if rate < 1024 {
        return Err(ConfigError::invalid(
            setting,
            format!("{s:?} is below 1KiB/s"),
            "remove the limit or choose at least \"1KiB/s\"",
        ));
    }
    Ok(rate)
}

/// Parses a duration such as `1h`, `5m` or `6s`; zero and anything longer
/// than [`MAX_DURATION`] are refused.
pub fn parse_duration(setting: &str, s: &str) -> Result<Duration, ConfigError> {
    let too_long = || {
        ConfigError::invalid(
            setting,
            format!("{s:?} is longer than the 10 years a duration may be"),
            "give at most \"10y\" (e.g. \"5m\", \"1h\", \"30d\")",
        )
    };
    let d = humantime::parse_duration(s.trim()).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => too_long(),
        _ => ConfigError::invalid(
            setting,
            format!("{s:?} is not a duration"),
            "write a number with a unit, e.g. \"1h\", \"5m\" or \"30s\"",
        ),
    })?;
    if d > MAX_DURATION {
        return Err(too_long());
    }
    if d.is_zero() {
        return Err(ConfigError::invalid(
            setting,
            "is zero",
            "give a positive duration",
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
        [aws]
        region = "us-east-1"
        profile = "s3-test"
        endpoint_url = "http://127.0.0.1:9000"
        [role]
        arn = "arn:aws:iam::123456789012:role/account-a-s3-role"
        session_name = "putonly"
        external_id = "x"
        duration = "6s"
        refresh_before = "3s"
        [bucket]
        name = "account-b-bucket"
        allowed_prefixes = ["foo/", "fighters/"]
        acl = "bucket-owner-full-control"
        [upload]
        part_size = "16MiB"
        concurrency = 8
        bandwidth_limit = "50MiB/s"
        checksum = "crc64nvme"
    "#;

    fn resolve(text: &str) -> Result<Settings, String> {
        let raw = RawConfig::parse(text)?;
        Settings::resolve(&raw).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_the_documented_form() {
        let s = resolve(SEED).unwrap();
        let role = s.role.unwrap();
        assert_eq!(role.duration, Duration::from_secs(6));
        assert_eq!(role.refresh_before, Duration::from_secs(3));
        assert_eq!(s.bucket.name, "account-b-bucket");
        assert_eq!(s.upload.part_size, 16 * 1024 * 1024);
        assert_eq!(s.upload.multipart_threshold, 16 * 1024 * 1024);
        assert_eq!(s.upload.bandwidth_limit, Some(50 * 1024 * 1024));
        assert_eq!(s.upload.checksum, ChecksumKind::Crc64Nvme);
    }

    #[test]
    fn defaults_fill_everything_optional() {
        let s = resolve("[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n").unwrap();
        assert_eq!(s.role, None);
        assert_eq!(s.upload, UploadSettings::default());
        assert_eq!(s.aws.profile, None);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err =
            resolve("[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\nprefixes = []\n")
                .unwrap_err();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("prefixes"), "{err}");
    }

    #[test]
    fn wrong_type_names_line() {
        let err = resolve("[upload]\nconcurrency = \"eight\"\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn rejected_forms_name_the_setting() {
        let base = "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n";
        for (extra, setting) in [
            ("[upload]\npart_size = \"1MiB\"\n", "upload.part_size"),
            ("[upload]\npart_size = \"lots\"\n", "upload.part_size"),
            ("[upload]\nconcurrency = 0\n", "upload.concurrency"),
            (
                "[upload]\nrequests_in_flight = 0\n",
                "upload.requests_in_flight",
            ),
            (
                "[upload]\nbandwidth_limit = \"fast\"\n",
                "upload.bandwidth_limit",
            ),
            ("[upload]\nchecksum = \"md5\"\n", "upload.checksum"),
            ("[role]\nsession_name = \"x\"\n", "role.arn"),
            ("[role]\narn = \"nope\"\n", "role.arn"),
            (
                "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\nduration = \"5s\"\nrefresh_before = \"10s\"\n",
                "role.refresh_before",
            ),
            (
                "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\nduration = \"soon\"\n",
                "role.duration",
            ),
            (
                "[aws]\nendpoint_url = \"localhost:9000\"\n",
                "aws.endpoint_url",
            ),
        ] {
            let err = resolve(&format!("{base}{extra}")).unwrap_err();
            assert!(err.starts_with(setting), "{extra:?}: {err}");
        }
        let err = resolve("[bucket]\nname = \"b-1\"\n").unwrap_err();
        assert!(err.starts_with("bucket.allowed_prefixes"), "{err}");
        let err = resolve("[bucket]\nallowed_prefixes = [\"foo/\"]\n").unwrap_err();
        assert!(err.starts_with("bucket.name"), "{err}");
        let err =
            resolve("[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"/foo/\"]\n").unwrap_err();
        assert!(err.starts_with("bucket.allowed_prefixes"), "{err}");
        let err = resolve(&format!("{base}acl = \"everyone\"\n")).unwrap_err();
        assert!(err.starts_with("bucket.acl"), "{err}");
        let err = resolve(&format!("{base}sse = \"rot13\"\n")).unwrap_err();
        assert!(err.starts_with("bucket.sse"), "{err}");
    }

    #[test]
    fn refresh_before_defaults_below_short_durations() {
        let s = resolve(
            "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\nduration = \"6s\"\n[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n",
        )
        .unwrap();
        assert_eq!(s.role.unwrap().refresh_before, Duration::from_secs(3));
    }

    #[test]
    fn max_attempts_zero_means_forever() {
        let s = resolve(
            "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n[upload]\nmax_attempts = 0\n",
        )
        .unwrap();
        assert_eq!(s.upload.max_attempts, None);
    }

    const AGENT: &str = "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\", \"fighters/\"]\n[state]\ndir = \"/var/lib/putonly\"\n";

    #[test]
    fn watches_resolve_with_defaults() {
        let s = resolve(&format!(
            "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/x\"\n"
        ))
        .unwrap();
        let w = &s.watches[0];
        assert_eq!(w.prefix, "foo/x/");
        assert_eq!(w.settle, Duration::from_secs(2));
        assert_eq!(w.after_upload, AfterUpload::Keep);
        assert!(w.exclude.contains(&"*.tmp".to_string()));
        assert!(w.marker.is_empty() && !w.manifest && !w.stream);
        s.require_agent().unwrap();
        let s = resolve(&format!(
            "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/x\"\nstream = true\n"
        ))
        .unwrap();
        assert!(s.watches[0].stream);
        let e = resolve(&format!(
            "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/x\"\nstream = \"yes\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 9") && e.contains("boolean"), "{e}");
        // A marker is one glob or a list of them.
        for (form, expected) in [
            ("marker = \"_SUCCESS\"\n", vec!["_SUCCESS"]),
            (
                "marker = [\"_SUCCESS\", \"*.done\"]\nmanifest = true\n",
                vec!["_SUCCESS", "*.done"],
            ),
        ] {
            let s = resolve(&format!(
                "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/x\"\n{form}"
            ))
            .unwrap();
            assert_eq!(s.watches[0].marker, expected);
            assert_eq!(s.watches[0].manifest, form.contains("manifest"));
        }
        // Include patterns do not keep markers out.
        let s = resolve(&format!(
            "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/x\"\ninclude = [\"**/*.csv\"]\nmarker = \"_SUCCESS\"\n"
        ))
        .unwrap();
        let f = crate::watch::Filter::new(&s.watches[0]);
        assert!(f.accepts(Path::new("_SUCCESS")) && f.accepts(Path::new("d/e/_SUCCESS")));
        assert!(!f.accepts(Path::new("d/x.json")));
    }

    #[test]
    fn rejected_watch_forms_name_the_setting() {
        for (watch, setting) in [
            (
                "path = \"/srv/out\"\nprefix = \"bar/\"\n",
                "watch[0].prefix",
            ),
            ("path = \"srv/out\"\nprefix = \"foo/\"\n", "watch[0].path"),
            ("path = \"/\"\nprefix = \"foo/\"\n", "watch[0].path"),
            (
                "path = \"/srv/out\"\nprefix = \"foo/\"\nafter_upload = \"shred\"\n",
                "watch[0].after_upload",
            ),
            (
                "path = \"/srv/out\"\nprefix = \"foo/\"\nafter_upload = \"move\"\n",
                "watch[0].move_to",
            ),
            (
                "path = \"/srv/out\"\nprefix = \"foo/\"\nafter_upload = \"move\"\nmove_to = \"/srv/out/sent\"\n",
                "watch[0].move_to",
            ),
            (
                "path = \"/srv/out\"\nprefix = \"foo/\"\ninclude = [\"a[\"]\n",
                "watch[0].include",
            ),
            (
                "path = \"/srv/out\"\nprefix = \"foo/\"\nmarker = \"d/_SUCCESS\"\n",
                "watch[0].marker: \"d/_SUCCESS\" is not a file name pattern",
            ),
            (
                "path = \"/srv/out\"\nprefix = \"foo/\"\nmarker = [\"ok\", \"a[\"]\n",
                "watch[0].marker",
            ),
            (
                "path = \"/srv/out\"\nprefix = \"foo/\"\nmanifest = true\n",
                "watch[0].manifest: is true but no marker is set",
            ),
            (
                "path = \"/srv/out\"\nprefix = \"foo/\"\nmarker = \".done\"\n",
                "watch[0].marker: \".done\" is a name that is never taken",
            ),
            (
                "path = \"/srv/out\"\nprefix = \"foo/\"\nmarker = \"ok.lock\"\nexclude = [\"*.lock\"]\n",
                "watch[0].marker",
            ),
            ("path = \"/var/lib\"\nprefix = \"foo/\"\n", "state.dir"),
            (
                "path = \"/srv/out\"\nprefix = \"foo/\"\n[[watch]]\npath = \"/srv/out/a\"\nprefix = \"foo/\"\n",
                "watch[1].path",
            ),
            // Key spaces that collide: the same prefix, nested prefixes,
            // the same template.
            (
                "path = \"/srv/a\"\nprefix = \"foo/\"\n[[watch]]\npath = \"/srv/b\"\nprefix = \"foo\"\n",
                "watch[1].prefix: watch[1] (/srv/b) and watch[0] (/srv/a) can write the same keys: both have the prefix \"foo/\"",
            ),
            (
                "path = \"/srv/a\"\nprefix = \"foo/x/\"\n[[watch]]\npath = \"/srv/b\"\nprefix = \"foo/\"\n",
                "watch[1].prefix: watch[1] (/srv/b) and watch[0] (/srv/a) can write the same keys: its prefix \"foo/\" and watch[0]'s prefix \"foo/x/\" are nested",
            ),
            (
                "path = \"/srv/a\"\nprefix = \"foo/{hostname}\"\n[[watch]]\npath = \"/srv/b\"\nprefix = \"foo/{hostname}/\"\n",
                "watch[1].prefix",
            ),
            // move_to inside another watch, or holding one.
            (
                "path = \"/srv/a\"\nprefix = \"foo/a\"\nafter_upload = \"move\"\nmove_to = \"/srv/b/sent\"\n[[watch]]\npath = \"/srv/b\"\nprefix = \"foo/b\"\n",
                "watch[0].move_to: /srv/b/sent and watch[1] (/srv/b) contain one another",
            ),
            (
                "path = \"/srv/a\"\nprefix = \"foo/a\"\nafter_upload = \"move\"\nmove_to = \"/srv\"\n[[watch]]\npath = \"/srv/b\"\nprefix = \"foo/b\"\n",
                "watch[0].move_to",
            ),
        ] {
            let err = resolve(&format!("{AGENT}[[watch]]\n{watch}")).unwrap_err();
            assert!(err.starts_with(setting), "{watch:?}: {err}");
        }
        // Each pattern a glob, the set of them too large to compile.
        let huge = "?".repeat(1_000_000);
        for key in ["include", "exclude"] {
            let err = resolve(&format!(
                "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/\"\n{key} = [\"{huge}\"]\n"
            ))
            .unwrap_err();
            assert!(
                err.starts_with(&format!("watch[0].{key}: the patterns cannot be compiled")),
                "{err}"
            );
        }
        let err = resolve(&format!(
            "{AGENT}[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/\"\nmarker = \"{huge}\"\n"
        ))
        .unwrap_err();
        assert!(
            err.starts_with("watch[0].marker: the patterns cannot be compiled"),
            "{err}"
        );
        let no_watch = resolve(AGENT).unwrap();
        assert!(
            no_watch
                .require_agent()
                .unwrap_err()
                .to_string()
                .starts_with("watch")
        );
    }

    #[test]
    fn prefix_templates_expand_per_host() {
        let host = hostname();
        assert_eq!(
            expand_template("p", "fleet/{hostname}/logs").unwrap(),
            format!("fleet/{host}/logs")
        );
        // SAFETY: a test-only variable no other test reads.
        unsafe { std::env::set_var("PUTONLY_TEST_NODE", "node-7") };
        assert_eq!(
            expand_template("p", "fleet/{env:PUTONLY_TEST_NODE}/").unwrap(),
            "fleet/node-7/"
        );
        unsafe { std::env::set_var("PUTONLY_TEST_SLASH", "a/../b") };
        for bad in [
            "{env:PUTONLY_TEST_SLASH}/",
            "{nope}",
            "{hostname",
            "{env:PUTONLY_UNSET_X}",
        ] {
            let e = expand_template("watch[0].prefix", bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("watch[0].prefix"), "{bad}: {e}");
        }
    }

    fn with_aws(aws: &str) -> Result<Settings, String> {
        resolve(&format!(
            "[aws]\n{aws}\n[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n"
        ))
    }

    #[test]
    fn plain_http_is_refused_unless_loopback_or_allowed() {
        for url in [
            "http://127.0.0.1:9000",
            "http://127.8.9.10",
            "http://[::1]:3900/",
            "http://[::ffff:127.0.0.1]:9000",
            "http://localhost:5000",
            "http://LocalHost",
            "https://s3.example.com",
            "https://10.0.0.5:9000",
        ] {
            let s = with_aws(&format!("endpoint_url = \"{url}\"")).unwrap();
            assert_eq!(s.aws.endpoint_url.as_deref(), Some(url));
        }
        for url in [
            "http://10.0.0.5:9000",
            "http://s3.example.com",
            "http://127.0.0.1.evil.example",
            "http://127.0.0.1@evil.example/",
            "http://localhost.evil.example:80",
            "http://evil.example#@127.0.0.1",
            "http://[::2]:9000",
            "http://0.0.0.0:9000",
            "http://2130706433/",
        ] {
            let err = with_aws(&format!("endpoint_url = \"{url}\"")).unwrap_err();
            assert!(err.starts_with("aws.endpoint_url: "), "{url}: {err}");
            assert!(err.contains("plain http"), "{url}: {err}");
            assert!(err.contains("unencrypted"), "{url}: {err}");
            assert!(
                err.contains("set allow_insecure_http = true in the [aws] table"),
                "{url}: {err}"
            );
            // Allowed on purpose.
            let s = with_aws(&format!(
                "endpoint_url = \"{url}\"\nallow_insecure_http = true"
            ))
            .unwrap();
            assert!(s.aws.allow_insecure_http);
        }
        assert_eq!(
            check_endpoint("x", "http://10.1.1.1", true, None).unwrap(),
            Transport::Insecure
        );
        assert_eq!(
            check_endpoint("x", "http://127.0.0.1:1", false, None).unwrap(),
            Transport::Loopback
        );
        assert_eq!(
            check_endpoint("x", "https://10.1.1.1", false, None).unwrap(),
            Transport::Tls
        );
    }

    #[test]
    fn a_refused_endpoint_names_the_file_or_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "[aws]\nendpoint_url = \"http://192.0.2.7:9000\"\n[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n",
        )
        .unwrap();
        let mut raw = RawConfig::load(&path).unwrap();
        let err = Settings::resolve(&raw).unwrap_err().to_string();
        assert!(
            err.starts_with("aws.endpoint_url: http://192.0.2.7:9000 is plain http"),
            "{err}"
        );
        assert!(
            err.contains(&format!("[aws] table of {}", path.display())),
            "{err}"
        );
        // The same URL from --endpoint-url names the flag.
        raw.aws.endpoint_url_from_flag = true;
        let err = Settings::resolve(&raw).unwrap_err().to_string();
        assert!(err.starts_with("--endpoint-url: "), "{err}");
        // Without a file, the fix says where it can go.
        raw.file = None;
        let err = Settings::resolve(&raw).unwrap_err().to_string();
        assert!(err.contains("--allow-insecure-http"), "{err}");
    }

    #[test]
    fn durations_above_ten_years_are_refused_naming_the_setting() {
        let role = "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\n";
        for (table, key, setting) in [
            ("[agent]", "rescan_interval", "agent.rescan_interval"),
            ("[agent]", "shutdown_timeout", "agent.shutdown_timeout"),
            ("[agent]", "failed_retry_after", "agent.failed_retry_after"),
            ("[upload]", "request_timeout", "upload.request_timeout"),
            (
                "[metrics]\nlisten = \"127.0.0.1:1\"",
                "unhealthy_after",
                "metrics.unhealthy_after",
            ),
            (
                "[state]\ndir = \"/var/lib/putonly\"",
                "retention",
                "state.retention",
            ),
            (
                "[state]\ndir = \"/var/lib/putonly\"",
                "keep_receipts",
                "state.keep_receipts",
            ),
            (role, "duration", "role.duration"),
            (
                "[state]\ndir = \"/var/lib/putonly\"\n[[watch]]\npath = \"/srv/out\"\nprefix = \"foo/\"",
                "settle",
                "watch[0].settle",
            ),
        ] {
            let base =
                format!("[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n{table}\n");
            // The review's example, one just past the cap, and one that
            // overflows humantime itself.
            for long in ["500000000000y", "10y 1s", "99999999999999999999999s"] {
                let err = resolve(&format!("{base}{key} = \"{long}\"\n")).unwrap_err();
                assert!(
                    err.starts_with(&format!("{setting}: {long:?} is longer than the 10 years")),
                    "{setting} = {long}: {err}"
                );
                assert!(err.contains("give at most \"10y\""), "{err}");
            }
            // The cap itself is accepted.
            if setting != "role.duration" {
                resolve(&format!("{base}{key} = \"10y\"\n")).unwrap();
            }
        }
        let err = resolve(&format!(
            "{role}duration = \"1h\"\nrefresh_before = \"11y\"\n[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n"
        ))
        .unwrap_err();
        assert!(err.starts_with("role.refresh_before: "), "{err}");
        assert_eq!(
            parse_duration("x", "10y").unwrap(),
            MAX_DURATION,
            "10y is the cap exactly"
        );
    }

    const ROLE: &str = "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\n";
    const BUCKET: &str = "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n";

    #[test]
    fn the_external_id_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("external-id");
        std::fs::write(&file, "ext-1234:abc/def\n").unwrap();
        let text = format!(
            "{ROLE}external_id_file = {:?}\n{BUCKET}",
            file.display().to_string()
        );
        let role = resolve(&text).unwrap().role.unwrap();
        assert_eq!(
            role.external_id.as_ref().map(Secret::expose),
            Some("ext-1234:abc/def")
        );
        assert_eq!(role.external_id_file.as_deref(), Some(file.as_path()));

        // Both ways at once, a missing file, an empty one, a bad value.
        let both = format!("{ROLE}external_id = \"x1\"\nexternal_id_file = \"/x\"\n{BUCKET}");
        let err = resolve(&both).unwrap_err();
        assert!(
            err.starts_with("role.external_id_file: is set together with role.external_id"),
            "{err}"
        );
        let missing = dir.path().join("nope");
        let err = resolve(&format!(
            "{ROLE}external_id_file = {:?}\n{BUCKET}",
            missing.display().to_string()
        ))
        .unwrap_err();
        assert!(
            err.starts_with("role.external_id_file: cannot read"),
            "{err}"
        );
        assert!(err.contains(&missing.display().to_string()), "{err}");
        std::fs::write(&file, "\n").unwrap();
        let err = resolve(&text).unwrap_err();
        assert!(err.starts_with("role.external_id_file: is empty"), "{err}");
        std::fs::write(&file, "secret-value\nsecond line\n").unwrap();
        let err = resolve(&text).unwrap_err();
        assert!(
            err.starts_with("role.external_id_file: is not a valid external id"),
            "{err}"
        );
        assert!(
            !err.contains("secret-value"),
            "the value is never shown: {err}"
        );
        let err = resolve(&format!("{ROLE}external_id = \"has space\"\n{BUCKET}")).unwrap_err();
        assert!(err.starts_with("role.external_id: is not a valid"), "{err}");
        assert!(!err.contains("has space"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_the_external_id() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("id");
        std::fs::write(&file, "from-the-file-42\n").unwrap();
        for (text, id) in [
            (
                format!("{ROLE}external_id = \"in-the-config-41\"\n{BUCKET}"),
                "in-the-config-41",
            ),
            (
                format!(
                    "{ROLE}external_id_file = {:?}\n{BUCKET}",
                    file.display().to_string()
                ),
                "from-the-file-42",
            ),
        ] {
            let raw = RawConfig::parse(&text).unwrap();
            let settings = Settings::resolve(&raw).unwrap();
            for shown in [
                format!("{raw:?}"),
                format!("{raw:#?}"),
                format!("{settings:?}"),
                format!("{settings:#?}"),
                format!("{:?}", settings.role),
            ] {
                assert!(!shown.contains(id), "{shown}");
                assert!(
                    shown.contains("** redacted **") || !shown.contains("external_id: Some"),
                    "{shown}"
                );
            }
            assert!(format!("{settings:?}").contains("external_id: Some(\"** redacted **\")"));
        }
    }

    #[test]
    fn files_other_users_can_read_are_reported() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        let id = dir.path().join("external-id");
        std::fs::write(&id, "abc-1\n").unwrap();
        std::fs::write(
            &config,
            format!(
                "{ROLE}external_id_file = {:?}\n{BUCKET}",
                id.display().to_string()
            ),
        )
        .unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let settings = || Settings::resolve(&RawConfig::load(&config).unwrap()).unwrap();
        // The packaged modes: owner, and a group this process is in.
        mode(&config, 0o640);
        mode(&id, 0o600);
        assert_eq!(settings().exposed_files(), Vec::<String>::new());
        // Everyone can read both.
        mode(&config, 0o644);
        mode(&id, 0o604);
        let warnings = settings().exposed_files();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with(&format!(
                "{} (mode 0644) can be read by every user",
                config.display()
            )),
            "{warnings:?}"
        );
        assert!(warnings[0].ends_with(&format!("fix: chmod o-r {}", config.display())));
        assert!(
            warnings[1].starts_with(&id.display().to_string()),
            "{warnings:?}"
        );
        // Group-readable by a group this process is not in (needs root to
        // give the file to such a group).
        mode(&config, 0o640);
        mode(&id, 0o640);
        if std::os::unix::fs::chown(&id, None, Some(54_321)).is_ok() {
            let warnings = settings().exposed_files();
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert!(
                warnings[0].contains("can be read by the members of group 54321, and this process is not in that group"),
                "{warnings:?}"
            );
        }
    }

    #[test]
    fn overwrite_is_on_unless_turned_off() {
        let base = "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n";
        assert!(resolve(base).unwrap().bucket.overwrite);
        let off = resolve(&format!("{base}overwrite = false\n")).unwrap();
        assert!(!off.bucket.overwrite);
        let err = resolve(&format!("{base}overwrite = \"no\"\n")).unwrap_err();
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn receipts_are_kept_as_long_as_records_unless_told() {
        let base = "[bucket]\nname = \"b-1\"\nallowed_prefixes = [\"foo/\"]\n\
                    [state]\ndir = \"/var/lib/putonly\"\nretention = \"7d\"\n";
        let st = resolve(base).unwrap().state.unwrap();
        assert_eq!(st.keep_receipts, st.retention);
        let st = resolve(&format!("{base}keep_receipts = \"90d\"\n"))
            .unwrap()
            .state
            .unwrap();
        assert_eq!(st.keep_receipts, Duration::from_secs(90 * 86_400));
        assert_eq!(st.retention, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../agent.toml.example");
        let s = resolve(text).unwrap();
        assert!(s.bucket.guard.prefixes().contains(&"foo/".to_string()));
        assert!(s.role.is_some());
        s.require_agent().unwrap();
    }

    #[test]
    fn a_metrics_address_off_loopback_is_named_as_exposed() {
        let exposure = |listen: &str| {
            let m = resolve_metrics(&RawMetrics {
                listen: Some(listen.into()),
                unhealthy_after: None,
            })
            .unwrap();
            m.exposure()
        };
        assert_eq!(exposure("127.0.0.1:9464"), None);
        assert_eq!(exposure("[::1]:9464"), None);
        let all = exposure("0.0.0.0:9464").unwrap();
        assert!(all.contains("every interface"), "{all}");
        assert!(all.contains("\"127.0.0.1:9464\""), "{all}");
        assert!(exposure("[::]:9464").unwrap().contains("every interface"));
        let lan = exposure("192.168.1.20:9100").unwrap();
        assert!(lan.contains("a network interface"), "{lan}");
        assert!(lan.contains("\"127.0.0.1:9100\""), "{lan}");
    }
}
