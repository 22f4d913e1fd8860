//! Credentials: the base identity (a profile or the default AWS chain) and,
//! when a role is configured, the temporary credentials STS AssumeRole gives
//! it, renewed in the background before they expire.
//!
//! This module owns every STS call and the only copy of the session
//! credentials. A request never waits on STS while the current credentials
//! are valid: [`RoleSession`] renews `refresh_before` ahead of expiry, with
//! jittered retries, and keeps handing out the current credentials while STS
//! is unreachable, until they are about to expire. It must never log or
//! print a secret key or session token (the SDK's `Credentials` redacts them
//! in `Debug`; nothing here formats them), nor the external id (a
//! [`crate::config::Secret`]). It refuses to build clients that would send
//! them in clear: every endpoint S3 and STS would use, wherever it was set
//! (putonly's configuration or the AWS environment and profile), passes
//! [`check_endpoint`] first.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_credential_types::Credentials;
use aws_credential_types::provider::{
    ProvideCredentials, SharedCredentialsProvider, error::CredentialsError, future,
};
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use aws_types::SdkConfig;
use tokio::sync::{Notify, watch};

use crate::config::{AwsSettings, ConfigError, RoleSettings, Transport, check_endpoint};
use crate::ground::retry::Backoff;

/// Why credentials could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "STS refused to let {caller} assume {arn}: {code}: {message}. Check that the role's trust policy names this identity as principal, that the identity's own policy allows sts:AssumeRole on the role, and that role.external_id matches the trust policy's condition"
    )]
    AssumeRoleDenied {
        caller: String,
        arn: String,
        code: String,
        message: String,
    },
    #[error(
        "no base credentials: {0}. Set aws.profile (or AWS_PROFILE) to a profile in ~/.aws/credentials, or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )]
    NoBaseCredentials(String),
    #[error("STS AssumeRole for {arn} failed: {detail}")]
    Unavailable { arn: String, detail: String },
    #[error("STS answered AssumeRole for {arn} without credentials")]
    Empty { arn: String },
    #[error("no valid credentials within {0:?}: STS has not answered since the last ones expired")]
    Expired(Duration),
}

impl CredentialError {
    /// Whether waiting and trying again may help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CredentialError::Unavailable { .. } | CredentialError::Expired(_)
        )
    }
}

/// Loads the AWS SDK configuration: region, endpoint and base credentials,
/// from the settings first and the standard AWS environment second. An
/// endpoint from the AWS environment that would carry credentials in clear
/// is refused as the configuration's own is ([`endpoints`]); one allowed by
/// `aws.allow_insecure_http` is logged as a warning.
pub async fn load_sdk_config(aws: &AwsSettings) -> Result<SdkConfig, ConfigError> {
    warn_about_exposed_credentials();
    let region =
        RegionProviderChain::first_try(aws.region.clone().map(aws_types::region::Region::new))
            .or_default_provider()
            .or_else("us-east-1");
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region);
    if let Some(client) = http_client() {
        loader = loader.http_client(client);
    }
    if let Some(profile) = &aws.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(url) = &aws.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let sdk = loader.load().await;
    for e in endpoints(&sdk, aws)? {
        if e.transport == Transport::Insecure {
            tracing::warn!(
                service = e.service,
                endpoint = %e.url,
                source = %e.source,
                "plain http to another host, allowed by aws.allow_insecure_http: the temporary credentials and the files cross the network unencrypted"
            );
        }
    }
    Ok(sdk)
}

/// An endpoint a client talks to, where it was set, and how it is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `S3` or `STS`.
    pub service: &'static str,
    pub url: String,
    /// The setting or environment variable it came from.
    pub source: String,
    pub transport: Transport,
}

/// The endpoint each client built from `sdk` talks to, chosen as the SDK
/// chooses it (`aws_sdk_s3::config::Builder::from(&SdkConfig)`): putonly's
/// own endpoint_url first; otherwise AWS_ENDPOINT_URL_S3 (_STS),
/// AWS_ENDPOINT_URL, the profile's `services` section, the profile's
/// endpoint_url (none of them under AWS_IGNORE_CONFIGURED_ENDPOINT_URLS).
/// None of those: AWS's own https endpoints, and nothing is listed. Each
/// one found must pass [`check_endpoint`].
pub fn endpoints(sdk: &SdkConfig, aws: &AwsSettings) -> Result<Vec<Endpoint>, ConfigError> {
    let mut out = Vec::new();
    for service in ["S3", "STS"] {
        let (url, source) = match &aws.endpoint_url {
            Some(url) => (url.clone(), aws.endpoint_setting.to_string()),
            None => {
                let configured = aws_types::service_config::ServiceConfigKey::builder()
                    .service_id(service)
                    .env("AWS_ENDPOINT_URL")
                    .profile("endpoint_url")
                    .build()
                    .ok()
                    .and_then(|key| sdk.service_config()?.load_config(key));
                match configured.or_else(|| sdk.endpoint_url().map(str::to_string)) {
                    Some(url) => {
                        let source = endpoint_source(service, &url, aws);
                        (url, source)
                    }
                    None => continue,
                }
            }
        };
        let transport = check_endpoint(&source, &url, aws.allow_insecure_http, aws.file.as_deref())
            .map_err(|e| match e {
                // From the AWS environment: it can also just go.
                ConfigError::Invalid {
                    setting,
                    problem,
                    fix,
                } if aws.endpoint_url.is_none() => ConfigError::Invalid {
                    fix: format!("{fix}; or remove it (aws.endpoint_url, if set, wins over it)"),
                    setting,
                    problem,
                },
                other => other,
            })?;
        out.push(Endpoint {
            service,
            url,
            source,
            transport,
        });
    }
    Ok(out)
}

/// The endpoints the clients would use, found without the network (the
/// region is fixed, so none is looked up): for `putonly check --offline`.
pub async fn offline_endpoints(aws: &AwsSettings) -> Result<Vec<Endpoint>, ConfigError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_types::region::Region::from_static("us-east-1"));
    if let Some(profile) = &aws.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(url) = &aws.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    endpoints(&loader.load().await, aws)
}

/// Where an endpoint from the AWS environment was set, for messages.
fn endpoint_source(service: &str, url: &str, aws: &AwsSettings) -> String {
    let is = |var: &str| std::env::var(var).is_ok_and(|v| v.trim() == url.trim());
    let service_var = format!("AWS_ENDPOINT_URL_{service}");
    if is(&service_var) {
        return format!("the environment variable {service_var}");
    }
    if is("AWS_ENDPOINT_URL") {
        return "the environment variable AWS_ENDPOINT_URL".into();
    }
    let profile = aws
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok())
        .unwrap_or_else(|| "default".into());
    let file = std::env::var("AWS_CONFIG_FILE").unwrap_or_else(|_| "~/.aws/config".into());
    format!("endpoint_url (or its services section) of the AWS profile {profile} in {file}")
}

/// The HTTP client every AWS call (S3 and STS) goes through: the SDK's own
/// connection pool (rustls with aws-lc), its connections driven by the
/// runtime that builds it, with TCP keepalive on (probes after 30 s idle),
/// so that a connection whose peer vanished without a word (a NAT that
/// forgot it, a host that died) is found out without waiting for a
/// request's deadline. `None` (the SDK's default client, without
/// keepalive) outside a runtime or if it cannot be built.
pub fn http_client() -> Option<aws_smithy_http_client::pool::Client> {
    use aws_smithy_http_client::{pool, tls};
    let id = pool::PartitionId::from_index(0);
    let partition = pool::Partition::new(
        id,
        pool::DriverSpawner::tokio(tokio::runtime::Handle::try_current().ok()?),
    );
    let built = pool::Builder::default()
        .tcp_keepalive(Duration::from_secs(30))
        .partitions([partition])
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .build_https()
        .map_err(|e| e.to_string())
        .and_then(|p| pool::Client::from_partition(&p, id).map_err(|e| e.to_string()));
    match built {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the HTTP client with TCP keepalive; using the SDK's default one");
            None
        }
    }
}

/// Shared AWS files that hold secrets and can be read by other users of the
/// machine (group or world readable). Checked at start-up; each one draws a
/// warning that names the file and the fix.
pub fn exposed_credential_files() -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let file = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(std::path::PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    [
        file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
        file("AWS_CONFIG_FILE", "config"),
    ]
    .into_iter()
    .flatten()
    .filter(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
            && std::fs::read_to_string(p).is_ok_and(|t| {
                let t = t.to_ascii_lowercase();
                t.contains("aws_secret_access_key") || t.contains("aws_session_token")
            })
    })
    .collect()
}

/// Logs a warning for each file [`exposed_credential_files`] finds.
pub fn warn_about_exposed_credentials() {
    for p in exposed_credential_files() {
        tracing::warn!(
            file = ?p,
            "holds AWS secret keys and other users can read it; fix: chmod 600 {}",
            p.display()
        );
    }
}

/// The identity the base credentials belong to (STS GetCallerIdentity):
/// (ARN, account).
pub async fn caller_identity(sdk: &SdkConfig) -> Result<(String, String), CredentialError> {
    let out =
        sts_client(sdk)
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| match classify_sts("(GetCallerIdentity)", e) {
                CredentialError::AssumeRoleDenied { code, message, .. } => {
                    CredentialError::NoBaseCredentials(format!(
                        "STS refused them: {code}: {message}"
                    ))
                }
                other => other,
            })?;
    Ok((
        out.arn().unwrap_or_default().to_string(),
        out.account().unwrap_or_default().to_string(),
    ))
}

/// What signs requests: the base credentials as they are, or a role session.
#[derive(Clone, Debug)]
pub struct CredentialSource {
    provider: SharedCredentialsProvider,
    role: Option<Arc<RoleSession>>,
}

impl CredentialSource {
    /// Resolves the base credentials and, if a role is configured, assumes it
    /// once before returning (so a broken trust policy fails at start-up) and
    /// starts the background renewal.
    pub async fn start(
        sdk: &SdkConfig,
        role: Option<&RoleSettings>,
    ) -> Result<Self, CredentialError> {
        let base = sdk
            .credentials_provider()
            .ok_or_else(|| CredentialError::NoBaseCredentials("no provider configured".into()))?;
        if let Err(e) = base.provide_credentials().await {
            return Err(CredentialError::NoBaseCredentials(error_chain(&e)));
        }
        match role {
            None => Ok(Self {
                provider: base,
                role: None,
            }),
            Some(role) => {
                let session = RoleSession::start(sdk, role.clone()).await?;
                Ok(Self {
                    provider: SharedCredentialsProvider::new(RoleProvider(session.clone())),
                    role: Some(session),
                })
            }
        }
    }

    /// The provider to give an SDK client.
    pub fn provider(&self) -> SharedCredentialsProvider {
        self.provider.clone()
    }

    /// The role session, if a role is assumed.
    pub fn role(&self) -> Option<&Arc<RoleSession>> {
        self.role.as_ref()
    }

    /// A token naming the credentials about to be used, to pass back to
    /// [`CredentialSource::rejected`] if the server refuses them.
    pub fn generation(&self) -> u64 {
        self.role.as_ref().map_or(0, |r| r.generation())
    }

    /// Waits (up to `patience`) until valid credentials are available.
    pub async fn ready(&self, patience: Duration) -> Result<(), CredentialError> {
        match &self.role {
            None => Ok(()),
            Some(r) => r.ready(patience).await,
        }
    }

    /// The server refused the credentials of `generation` (ExpiredToken,
    /// InvalidToken): renew once, unless that already happened.
    pub async fn rejected(&self, generation: u64) {
        if let Some(r) = &self.role {
            r.renew_if_current(generation).await;
        }
    }

    /// When the current role credentials expire, if a role is assumed.
    pub fn expiry(&self) -> Option<SystemTime> {
        self.role.as_ref().and_then(|r| r.expiry())
    }
}

/// One set of temporary credentials and when they stop working.
#[derive(Clone, Debug)]
struct Session {
    credentials: Credentials,
    /// When they expire, on this machine's clock (see [`local_expiry`]).
    expires: SystemTime,
    /// The expiry STS reported disagreed with the lifetime asked for by
    /// this much: this machine's clock is off by about that.
    clock_off: Option<String>,
    generation: u64,
    /// The assumed-role identity STS reported.
    assumed_arn: String,
}

/// An assumed role, renewed in the background.
#[derive(Debug)]
pub struct RoleSession {
    sts: aws_sdk_sts::Client,
    settings: RoleSettings,
    current: watch::Sender<Option<Session>>,
    renew_now: Arc<Notify>,
    generations: AtomicU64,
}

/// The STS client. An STS that accepts the connection and never answers must
/// not hold the renewal up: every attempt has a deadline.
fn sts_client(sdk: &SdkConfig) -> aws_sdk_sts::Client {
    let conf = aws_sdk_sts::config::Builder::from(sdk)
        .timeout_config(
            aws_smithy_types::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(Duration::from_secs(20))
                .operation_timeout(Duration::from_secs(60))
                .build(),
        )
        .build();
    aws_sdk_sts::Client::from_conf(conf)
}

impl RoleSession {
    async fn start(sdk: &SdkConfig, settings: RoleSettings) -> Result<Arc<Self>, CredentialError> {
        let session = Arc::new(RoleSession {
            sts: sts_client(sdk),
            settings,
            current: watch::Sender::new(None),
            renew_now: Arc::new(Notify::new()),
            generations: AtomicU64::new(0),
        });
        // The first AssumeRole happens before anything else: a denied role
        // stops start-up with an explanation; a transient failure is retried.
        let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
        let mut attempt = 0;
        loop {
            match session.assume().await {
                Ok(s) => {
                    session.publish(s);
                    break;
                }
                Err(e) if e.is_transient() && attempt < 4 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "AssumeRole failed; retrying");
                    tokio::time::sleep(backoff.delay(attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
        tokio::spawn(renew_loop(Arc::downgrade(&session)));
        Ok(session)
    }

    /// How long before expiry a credential stops being handed out, so that a
    /// request signed with it still arrives while it is valid.
    fn safety_margin(&self) -> Duration {
        (self.settings.refresh_before / 2).min(Duration::from_secs(60))
    }

    fn valid(&self) -> Option<Session> {
        let s = self.current.borrow().clone()?;
        let usable_until = s.expires.checked_sub(self.safety_margin())?;
        (SystemTime::now() < usable_until).then_some(s)
    }

    fn generation(&self) -> u64 {
        self.current.borrow().as_ref().map_or(0, |s| s.generation)
    }

    /// When the current credentials expire.
    pub fn expiry(&self) -> Option<SystemTime> {
        self.current.borrow().as_ref().map(|s| s.expires)
    }

    /// The assumed-role identity of the current credentials.
    pub fn assumed_arn(&self) -> Option<String> {
        self.current
            .borrow()
            .as_ref()
            .map(|s| s.assumed_arn.clone())
    }

    async fn ready(&self, patience: Duration) -> Result<(), CredentialError> {
        let mut rx = self.current.subscribe();
        let wait = async {
            loop {
                if self.valid().is_some() {
                    return;
                }
                // Expired and not yet renewed: ask for a renewal and wait.
                self.renew_now.notify_one();
                tokio::select! {
                    _ = rx.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        };
        tokio::time::timeout(patience, wait)
            .await
            .map_err(|_| CredentialError::Expired(patience))
    }

    async fn renew_if_current(&self, generation: u64) {
        if self.generation() != generation {
            return; // someone already renewed
        }
        tracing::info!("the server rejected the session credentials; renewing them now");
        let mut rx = self.current.subscribe();
        self.renew_now.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while self.generation() == generation {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    fn publish(&self, mut s: Session) {
        s.generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let left = s
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tracing::info!(
            role = %self.settings.arn,
            expires_in = %humantime::format_duration(Duration::from_secs(left.as_secs())),
            "assumed role"
        );
        self.current.send_replace(Some(s));
    }

    /// When to renew `s`: `refresh_before` ahead of expiry, or halfway
    /// through a lifetime shorter than that.
    fn renew_at(&self, s: &Session) -> SystemTime {
        let now = SystemTime::now();
        let left = s.expires.duration_since(now).unwrap_or_default();
        if left > self.settings.refresh_before {
            s.expires - self.settings.refresh_before
        } else {
            now + left / 2
        }
    }

    /// What STS said of this machine's clock at the last AssumeRole: about
    /// how far off it is, when the expiry it reported disagrees with the
    /// lifetime asked for.
    pub fn clock_off(&self) -> Option<String> {
        self.current
            .borrow()
            .as_ref()
            .and_then(|s| s.clock_off.clone())
    }

    async fn assume(&self) -> Result<Session, CredentialError> {
        let arn = &self.settings.arn;
        let asked = SystemTime::now();
        let mut req = self
            .sts
            .assume_role()
            .role_arn(arn)
            .role_session_name(&self.settings.session_name)
            .duration_seconds(i32::try_from(self.settings.duration.as_secs()).unwrap_or(i32::MAX));
        if let Some(id) = &self.settings.external_id {
            req = req.external_id(id.expose());
        }
        let out = req.send().await.map_err(|e| classify_sts(arn, e))?;
        let c = out
            .credentials()
            .ok_or_else(|| CredentialError::Empty { arn: arn.clone() })?;
        let reported = SystemTime::try_from(*c.expiration())
            .map_err(|_| CredentialError::Empty { arn: arn.clone() })?;
        let (expires, clock_off) = local_expiry(asked, reported, self.settings.duration);
        if let Some(off) = &clock_off {
            tracing::warn!(
                clock = %off,
                reported_expiry = %humantime::format_rfc3339_seconds(reported),
                "the expiry STS reported does not fit the lifetime asked for (role.duration): this machine's clock is off; the credentials are renewed by the lifetime asked for, counted on this machine's clock. Set the clock right (NTP: systemd-timesyncd, chrony)"
            );
        }
        Ok(Session {
            credentials: Credentials::new(
                c.access_key_id(),
                c.secret_access_key(),
                Some(c.session_token().to_string()),
                Some(expires),
                "putonly-assume-role",
            ),
            expires,
            clock_off,
            generation: 0,
            assumed_arn: out
                .assumed_role_user()
                .map(|u| u.arn().to_string())
                .unwrap_or_default(),
        })
    }
}

/// How far the expiry STS reports may stray from the lifetime asked for
/// before this machine's clock is called off.
const CLOCK_TOLERANCE: Duration = Duration::from_secs(300);

/// When credentials asked for at `asked` (this machine's clock) for
/// `requested` expire on this machine's clock, given the expiry STS
/// reported on its own. STS grants exactly the lifetime asked for (or
/// refuses), so a reported expiry that does not fit it tells of a clock
/// off here: ahead by an hour, every credential would look expired on
/// arrival and be asked for again and again; behind, used past its end.
/// Then the lifetime asked for is counted from `asked`, and how far off
/// the clock seems is returned for the log and `putonly check`.
fn local_expiry(
    asked: SystemTime,
    reported: SystemTime,
    requested: Duration,
) -> (SystemTime, Option<String>) {
    let fits = |lifetime: Duration| lifetime.abs_diff(requested) <= CLOCK_TOLERANCE;
    match reported.duration_since(asked) {
        Ok(lifetime) if fits(lifetime) => (reported, None),
        Ok(lifetime) if lifetime > requested => (
            asked + requested,
            Some(format!(
                "about {} behind",
                humantime::format_duration(Duration::from_secs((lifetime - requested).as_secs()))
            )),
        ),
        Ok(lifetime) => (
            asked + requested,
            Some(format!(
                "about {} ahead",
                humantime::format_duration(Duration::from_secs((requested - lifetime).as_secs()))
            )),
        ),
        Err(past) => (
            asked + requested,
            Some(format!(
                "about {} ahead",
                humantime::format_duration(Duration::from_secs(
                    (past.duration() + requested).as_secs()
                ))
            )),
        ),
    }
}

/// The fewest seconds between two AssumeRole calls, however often a
/// renewal is asked for (a server that keeps rejecting tokens must not turn
/// into a flood of STS calls).
const MIN_RENEWAL_GAP: Duration = Duration::from_secs(1);

/// Renews the session until it is dropped. Holds only a weak reference while
/// it sleeps. A request for an early renewal (expired or rejected
/// credentials) is honoured at once, unless STS is failing: then the backoff
/// decides.
async fn renew_loop(weak: std::sync::Weak<RoleSession>) {
    let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut failures = 0u32;
    let mut retry_at: Option<SystemTime> = None;
    let mut last_call = std::time::Instant::now();
    loop {
        let (at, renew_now) = {
            let Some(session) = weak.upgrade() else {
                return;
            };
            let at = retry_at.unwrap_or_else(|| {
                session
                    .current
                    .borrow()
                    .as_ref()
                    .map_or_else(SystemTime::now, |s| session.renew_at(s))
            });
            (at, session.renew_now.clone())
        };
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        if failures == 0 {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = renew_now.notified() => {}
            }
        } else {
            tokio::time::sleep(wait).await;
        }
        let since = last_call.elapsed();
        if since < MIN_RENEWAL_GAP {
            tokio::time::sleep(MIN_RENEWAL_GAP - since).await;
        }
        let Some(session) = weak.upgrade() else {
            return;
        };
        last_call = std::time::Instant::now();
        match session.assume().await {
            Ok(s) => {
                failures = 0;
                retry_at = None;
                session.publish(s);
            }
            Err(e) => {
                failures += 1;
                let delay = backoff.delay(failures);
                let still_valid = session.valid().is_some();
                tracing::warn!(
                    error = %e,
                    failures,
                    still_valid,
                    retry_in = ?delay,
                    "renewing the role credentials failed; the current ones stay in use until they expire"
                );
                retry_at = Some(SystemTime::now() + delay);
            }
        }
    }
}

/// Hands the SDK the current session credentials without ever calling STS.
#[derive(Debug)]
struct RoleProvider(Arc<RoleSession>);

impl ProvideCredentials for RoleProvider {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(match self.0.valid() {
            Some(s) => Ok(s.credentials),
            None => Err(CredentialsError::not_loaded(
                "the role credentials expired and STS has not renewed them yet",
            )),
        })
    }
}

fn classify_sts<E>(
    arn: &str,
    err: SdkError<E, aws_sdk_sts::config::http::HttpResponse>,
) -> CredentialError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let SdkError::ServiceError(se) = &err {
        let status = se.raw().status().as_u16();
        let code = se.err().code().unwrap_or("").to_string();
        let message = se.err().message().unwrap_or("").to_string();
        let throttled = matches!(
            code.as_str(),
            "Throttling" | "ThrottlingException" | "RequestLimitExceeded"
        );
        if (400..500).contains(&status) && !throttled && status != 408 {
            return CredentialError::AssumeRoleDenied {
                caller: "the base identity".into(),
                arn: arn.to_string(),
                code: or_if_empty(code, &status.to_string()),
                message: or_if_empty(message, "no message"),
            };
        }
    }
    CredentialError::Unavailable {
        arn: arn.to_string(),
        detail: error_chain(&err),
    }
}

/// `s`, or `fallback` when the server sent nothing (an empty error code or
/// message would print as a gap in the error line).
pub(crate) fn or_if_empty(s: String, fallback: &str) -> String {
    if s.is_empty() {
        fallback.to_string()
    } else {
        s
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_expiry_is_counted_on_this_machines_clock() {
        let asked = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // Clocks agree (within the tolerance): STS's expiry stands.
        let r = asked + HOUR - Duration::from_secs(2);
        assert_eq!(local_expiry(asked, r, HOUR), (r, None));
        // This clock 2 h ahead: the expiry reported is an hour in the past.
        let (e, off) = local_expiry(asked, asked - HOUR, HOUR);
        assert_eq!(e, asked + HOUR);
        assert_eq!(off.as_deref(), Some("about 2h ahead"));
        // 30 min ahead: half the lifetime is left by this clock.
        let (e, off) = local_expiry(asked, asked + HOUR / 2, HOUR);
        assert_eq!((e, off.as_deref()), (asked + HOUR, Some("about 30m ahead")));
        // 3 h behind: used past its real end unless counted here.
        let (e, off) = local_expiry(asked, asked + 4 * HOUR, HOUR);
        assert_eq!((e, off.as_deref()), (asked + HOUR, Some("about 3h behind")));
    }

    /// A fake STS whose clock is `offset` behind this machine's: it grants
    /// one hour, dated by its own clock. Returns its URL and a count of
    /// the AssumeRole calls it answered.
    async fn sts_behind(offset: Duration) -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if got.len() < end + 4 + len {
                            continue;
                        }
                        got.drain(..end + 4 + len);
                        counted.fetch_add(1, Ordering::SeqCst);
                        let theirs = SystemTime::now() - offset;
                        let exp = humantime::format_rfc3339_seconds(theirs + HOUR);
                        let body = format!(
                            "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
                             <Credentials><AccessKeyId>ASIAX</AccessKeyId><SecretAccessKey>s</SecretAccessKey>\
                             <SessionToken>t</SessionToken><Expiration>{exp}</Expiration></Credentials>\
                             <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/r/putonly</Arn>\
                             <AssumedRoleId>AROAX:putonly</AssumedRoleId></AssumedRoleUser></AssumeRoleResult>\
                             <ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></AssumeRoleResponse>"
                        );
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if c.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, calls)
    }

    async fn session_with(url: &str) -> CredentialSource {
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(aws_types::region::Region::new("us-east-1"))
            .endpoint_url(url)
            .credentials_provider(SharedCredentialsProvider::new(Credentials::for_tests()))
            .build();
        let text = "[role]\narn = \"arn:aws:iam::123456789012:role/r\"\nduration = \"1h\"\n\
                    [bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n";
        let raw = crate::config::RawConfig::parse(text).unwrap();
        let settings = crate::config::Settings::resolve(&raw).unwrap();
        CredentialSource::start(&sdk, settings.role.as_ref())
            .await
            .unwrap()
    }

    /// This machine's clock two hours ahead of STS: the credentials are
    /// used for the hour asked for, not asked for again every second, and
    /// the clock is named.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_clock_hours_ahead_does_not_loop_on_assume_role() {
        let (url, calls) = sts_behind(2 * HOUR).await;
        let source = session_with(&url).await;
        let role = source.role().unwrap().clone();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "AssumeRole was asked again"
        );
        role.ready(Duration::from_secs(2)).await.unwrap();
        assert_eq!(role.clock_off().as_deref(), Some("about 2h ahead"));
        let left = role
            .expiry()
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(left > HOUR - Duration::from_secs(60), "{left:?}");
        // Clocks that agree: nothing said.
        let (url, _) = sts_behind(Duration::ZERO).await;
        assert_eq!(session_with(&url).await.role().unwrap().clock_off(), None);
    }
}
