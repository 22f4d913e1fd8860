//! The file as written ([`RawConfig`]), before defaults and checks: strict
//! (`deny_unknown_fields`), every value still a string where it has units.

use super::*;

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
    pub(super) fn into_vec(self) -> Vec<String> {
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
