//! The checked settings ([`Settings`]) the rest of putonly trusts, and
//! their defaults.

use super::*;

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
    /// sent only after the rest of its folder ([`crate::agent::batches`]).
    pub marker: Vec<String>,
    /// With markers: a manifest of the batch is written before each one.
    pub manifest: bool,
    /// Full parts of a file are sent while it is still being written
    /// ([`crate::agent::stream`]), for append-only producers.
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
