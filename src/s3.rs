//! The write-only S3 layer: the only code in putonly that holds an S3 client,
//! and it can only write.
//!
//! Its whole vocabulary is PutObject, CreateMultipartUpload, UploadPart,
//! CompleteMultipartUpload and a best-effort AbortMultipartUpload. It must
//! never send a read or an admin call (no Head/Get/List, no ListParts, no
//! HeadBucket, GetBucketLocation or CreateBucket), and it checks every key
//! against the allowed prefixes before building a request, so a refused key
//! never reaches the wire. It also turns SDK errors into [`S3Error`] kinds,
//! keeping the service's refusals apart from transient failures so that the
//! engine's retry rule is a `match`.
//!
//! The [`ObjectWriter`] trait is the seam the upload engine is written
//! against; [`WriteOnlyBucket`] is its one real implementation.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    IdentityCache, RequestChecksumCalculation, ResponseChecksumValidation, retry::RetryConfig,
    timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart, ObjectCannedAcl,
    ServerSideEncryption, StorageClass,
};
use aws_types::SdkConfig;
use bytes::Bytes;

use crate::checksum::Crc;
use crate::config::{BucketSettings, ChecksumKind, Sse, UploadSettings};
use crate::credentials::{CredentialError, CredentialSource, error_chain, or_if_empty};
use crate::keys::{KeyError, PrefixGuard};

/// How long a request waits for valid credentials before it gives up (and
/// the engine's retry rule decides whether to try again).
const CREDENTIAL_PATIENCE: Duration = Duration::from_secs(30);

/// The slowest link the deadlines allow for, in bytes a second for all
/// requests together (unless `upload.bandwidth_limit` is lower): 1 Mbit/s.
const SLOWEST_LINK: u64 = 128 * 1024;

/// How long one request may take, from sending its first byte to having
/// read the whole answer (body included): `upload.request_timeout`, plus
/// the time its body needs on the slowest link allowed for (1 Mbit/s),
/// shared by `concurrency` requests; a CompleteMultipartUpload, which S3
/// may take minutes over for many parts, 0.1 s more per part. A big part
/// on a slow link is not cut off, and an answer that stops or trickles
/// after its headers is.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    base: Duration,
    bytes_per_sec: u64,
}

impl Deadlines {
    pub fn new(upload: &UploadSettings) -> Self {
        let link = upload.bandwidth_limit.unwrap_or(u64::MAX).min(SLOWEST_LINK);
        Deadlines {
            base: upload.request_timeout,
            bytes_per_sec: (link / upload.concurrency.max(1) as u64).max(1024),
        }
    }

    /// The deadline of a request carrying `body` bytes.
    pub fn for_body(&self, body: u64) -> Duration {
        self.base
            .saturating_add(Duration::from_secs(body / self.bytes_per_sec + 1))
    }

    /// The deadline of a CompleteMultipartUpload of `parts` parts.
    pub fn for_complete(&self, parts: usize) -> Duration {
        self.base.saturating_add(
            Duration::from_millis(100).saturating_mul(u32::try_from(parts).unwrap_or(u32::MAX)),
        )
    }
}

/// A part that the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartDone {
    pub number: i32,
    pub etag: String,
    pub crc: Crc,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("refused before sending: {0}")]
    Refused(#[from] KeyError),
    #[error("{op} {key:?}: access denied ({code}): {message}")]
    Denied {
        op: &'static str,
        key: String,
        code: String,
        message: String,
    },
    #[error("{op} {key:?}: the server rejected the session credentials ({code})")]
    CredentialsRejected {
        op: &'static str,
        key: String,
        code: String,
    },
    #[error("{key:?}: the server no longer knows multipart upload {upload_id}")]
    NoSuchUpload { key: String, upload_id: String },
    #[error("{op} {key:?}: {detail}")]
    Transient {
        op: &'static str,
        key: String,
        detail: String,
    },
    #[error("{op} {key:?}: the server refused the request ({status} {code}): {message}")]
    Rejected {
        op: &'static str,
        key: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{0}")]
    Credentials(#[from] CredentialError),
}

impl S3Error {
    /// Whether trying the same request again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            S3Error::Transient { .. } | S3Error::CredentialsRejected { .. } => true,
            S3Error::Credentials(e) => e.is_transient(),
            S3Error::Refused(_)
            | S3Error::Denied { .. }
            | S3Error::NoSuchUpload { .. }
            | S3Error::Rejected { .. } => false,
        }
    }
}

/// The write operations the upload engine needs, and nothing else.
pub trait ObjectWriter: Send + Sync + 'static {
    /// Writes a whole object in one request; returns its ETag.
    fn put_object(
        &self,
        key: &str,
        body: Bytes,
        crc: Crc,
    ) -> impl Future<Output = Result<String, S3Error>> + Send;

    /// Starts a multipart upload declaring the checksum; returns its id.
    fn create_multipart(
        &self,
        key: &str,
        kind: ChecksumKind,
    ) -> impl Future<Output = Result<String, S3Error>> + Send;

    /// Sends one part with its checksum.
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
        crc: Crc,
    ) -> impl Future<Output = Result<PartDone, S3Error>> + Send;

    /// Completes the upload; the server checks `whole` against the parts.
    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[PartDone],
        whole: Crc,
    ) -> impl Future<Output = Result<String, S3Error>> + Send;

    /// Best effort: failures are logged, never returned.
    fn abort_multipart(&self, key: &str, upload_id: &str) -> impl Future<Output = ()> + Send;
}

/// The bucket, as seen by a writer that may not read it.
#[derive(Debug)]
pub struct WriteOnlyBucket {
    client: Client,
    bucket: String,
    guard: PrefixGuard,
    credentials: CredentialSource,
    options: BucketSettings,
    abort_denied_logged: AtomicBool,
    deadlines: Deadlines,
}

impl WriteOnlyBucket {
    /// Builds the one S3 client. Custom endpoints use path-style addressing;
    /// the SDK's own retries are off (the engine retries, by error kind);
    /// checksums are computed by putonly and sent as headers, so the SDK
    /// neither adds its own nor switches to aws-chunked bodies.
    pub fn new(
        sdk: &SdkConfig,
        credentials: CredentialSource,
        bucket: &BucketSettings,
        upload: &UploadSettings,
    ) -> Self {
        let mut conf = aws_sdk_s3::config::Builder::from(sdk)
            .credentials_provider(credentials.provider())
            .force_path_style(sdk.endpoint_url().is_some())
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::disabled())
            // Each request gets its own deadline (see Deadlines), answer
            // body included; the SDK only bounds connecting.
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .build(),
            );
        if credentials.role().is_some() {
            // The role session is its own cache; asking it is free.
            conf = conf.identity_cache(IdentityCache::no_cache());
        }
        WriteOnlyBucket {
            client: Client::from_conf(conf.build()),
            bucket: bucket.name.clone(),
            guard: bucket.guard.clone(),
            credentials,
            options: bucket.clone(),
            abort_denied_logged: AtomicBool::new(false),
            deadlines: Deadlines::new(upload),
        }
    }

    pub fn credentials(&self) -> &CredentialSource {
        &self.credentials
    }

    /// Checks the key, waits for credentials, sends; if the server rejects
    /// the session credentials, renews them once and sends again.
    async fn send<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        deadline: Duration,
        attempt: F,
    ) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        self.guard.check(key)?;
        self.credentials.ready(CREDENTIAL_PATIENCE).await?;
        let generation = self.credentials.generation();
        let attempt = || async {
            tokio::time::timeout(deadline, attempt())
                .await
                .unwrap_or_else(|_| {
                    Err(S3Error::Transient {
                        op,
                        key: key.to_string(),
                        detail: format!(
                            "no whole answer within {}",
                            humantime::format_duration(deadline)
                        ),
                    })
                })
        };
        match attempt().await {
            Err(S3Error::CredentialsRejected { .. }) if self.credentials.role().is_some() => {
                self.credentials.rejected(generation).await;
                self.credentials.ready(CREDENTIAL_PATIENCE).await?;
                attempt().await
            }
            Err(e)
                if !e.is_transient() && self.credentials.ready(Duration::ZERO).await.is_err() =>
            {
                // The SDK could not sign: the credentials expired meanwhile.
                Err(S3Error::Credentials(CredentialError::Expired(
                    CREDENTIAL_PATIENCE,
                )))
            }
            other => other,
        }
    }
}

/// Sets the `x-amz-checksum-*` member matching the checksum kind.
macro_rules! with_checksum {
    ($builder:expr, $crc:expr) => {{
        let crc: Crc = $crc;
        match crc.kind {
            ChecksumKind::Crc64Nvme => $builder.checksum_crc64_nvme(crc.to_base64()),
            ChecksumKind::Crc32C => $builder.checksum_crc32_c(crc.to_base64()),
            ChecksumKind::Crc32 => $builder.checksum_crc32(crc.to_base64()),
        }
    }};
}

/// Applies ACL, storage class, encryption and metadata to a request that
/// creates an object.
macro_rules! with_object_options {
    ($builder:expr, $opts:expr) => {{
        let opts: &BucketSettings = $opts;
        let mut b = $builder;
        if let Some(acl) = &opts.acl {
            b = b.acl(ObjectCannedAcl::from(acl.as_str()));
        }
        if let Some(class) = &opts.storage_class {
            b = b.storage_class(StorageClass::from(class.as_str()));
        }
        match &opts.sse {
            None => {}
            Some(Sse::Aes256) => b = b.server_side_encryption(ServerSideEncryption::Aes256),
            Some(Sse::Kms { key_id }) => {
                b = b.server_side_encryption(ServerSideEncryption::AwsKms);
                if let Some(id) = key_id {
                    b = b.ssekms_key_id(id);
                }
            }
        }
        if !opts.metadata.is_empty() {
            b = b.set_metadata(Some(
                opts.metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<HashMap<_, _>>(),
            ));
        }
        b
    }};
}

fn algorithm(kind: ChecksumKind) -> ChecksumAlgorithm {
    match kind {
        ChecksumKind::Crc64Nvme => ChecksumAlgorithm::Crc64Nvme,
        ChecksumKind::Crc32C => ChecksumAlgorithm::Crc32C,
        ChecksumKind::Crc32 => ChecksumAlgorithm::Crc32,
    }
}

impl ObjectWriter for WriteOnlyBucket {
    async fn put_object(&self, key: &str, body: Bytes, crc: Crc) -> Result<String, S3Error> {
        let deadline = self.deadlines.for_body(body.len() as u64);
        self.send("PutObject", key, deadline, || async {
            let req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_length(body.len() as i64)
                .body(ByteStream::from(body.clone()));
            let req = with_object_options!(req, &self.options);
            with_checksum!(req, crc)
                .customize()
                .disable_payload_signing()
                .send()
                .await
                .map(|out| out.e_tag().unwrap_or_default().to_string())
                .map_err(|e| classify("PutObject", key, e))
        })
        .await
    }

    async fn create_multipart(&self, key: &str, kind: ChecksumKind) -> Result<String, S3Error> {
        self.send(
            "CreateMultipartUpload",
            key,
            self.deadlines.for_body(0),
            || async {
                let req = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .checksum_algorithm(algorithm(kind))
                    .checksum_type(ChecksumType::FullObject);
                let out = with_object_options!(req, &self.options)
                    .send()
                    .await
                    .map_err(|e| classify("CreateMultipartUpload", key, e))?;
                out.upload_id()
                    .map(str::to_string)
                    .ok_or_else(|| S3Error::Transient {
                        op: "CreateMultipartUpload",
                        key: key.to_string(),
                        detail: "the answer held no upload id".into(),
                    })
            },
        )
        .await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
        crc: Crc,
    ) -> Result<PartDone, S3Error> {
        let deadline = self.deadlines.for_body(body.len() as u64);
        self.send("UploadPart", key, deadline, || async {
            let req = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(body.len() as i64)
                .body(ByteStream::from(body.clone()));
            let out = with_checksum!(req, crc)
                .customize()
                .disable_payload_signing()
                .send()
                .await
                .map_err(|e| match classify("UploadPart", key, e) {
                    S3Error::Rejected { code, .. } if code == "NoSuchUpload" => {
                        S3Error::NoSuchUpload {
                            key: key.to_string(),
                            upload_id: upload_id.to_string(),
                        }
                    }
                    other => other,
                })?;
            Ok(PartDone {
                number,
                etag: out.e_tag().unwrap_or_default().to_string(),
                crc,
            })
        })
        .await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[PartDone],
        whole: Crc,
    ) -> Result<String, S3Error> {
        let deadline = self.deadlines.for_complete(parts.len());
        self.send("CompleteMultipartUpload", key, deadline, || async {
            let completed: Vec<CompletedPart> = parts
                .iter()
                .map(|p| {
                    let b = CompletedPart::builder()
                        .part_number(p.number)
                        .e_tag(&p.etag);
                    with_checksum!(b, p.crc).build()
                })
                .collect();
            let req = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(completed))
                        .build(),
                )
                .checksum_type(ChecksumType::FullObject)
                .mpu_object_size(whole.len as i64);
            let out = with_checksum!(req, whole).send().await.map_err(|e| {
                match classify("CompleteMultipartUpload", key, e) {
                    S3Error::Rejected { code, .. } if code == "NoSuchUpload" => {
                        S3Error::NoSuchUpload {
                            key: key.to_string(),
                            upload_id: upload_id.to_string(),
                        }
                    }
                    other => other,
                }
            })?;
            Ok(out.e_tag().unwrap_or_default().to_string())
        })
        .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) {
        let result = self
            .send(
                "AbortMultipartUpload",
                key,
                self.deadlines.for_body(0),
                || async {
                    self.client
                        .abort_multipart_upload()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| classify("AbortMultipartUpload", key, e))
                },
            )
            .await;
        match result {
            Ok(()) => tracing::debug!(key, upload_id, "aborted multipart upload"),
            Err(S3Error::Denied { .. }) => {
                if !self.abort_denied_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        bucket = %self.bucket,
                        "AbortMultipartUpload is not granted (the seed's policy allows only PutObject); \
                         abandoned parts stay until a lifecycle rule with AbortIncompleteMultipartUpload \
                         removes them: ask the bucket owner to add one (see `docs/SEMANTICS.md`)"
                    );
                }
            }
            Err(e) => {
                tracing::debug!(key, upload_id, error = %e, "could not abort multipart upload")
            }
        }
    }
}

const CREDENTIAL_CODES: [&str; 4] = [
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "ExpiredTokenException",
];
const TRANSIENT_CODES: [&str; 10] = [
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "BadDigest",
    "InvalidDigest",
    "XAmzContentSHA256Mismatch",
];

/// Sorts an SDK error into the kinds the engine's retry rule matches on.
pub fn classify<E>(op: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let key = key.to_string();
    match &err {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("").to_string();
            let message = se.err().message().unwrap_or("").to_string();
            if CREDENTIAL_CODES.contains(&code.as_str()) {
                S3Error::CredentialsRejected { op, key, code }
            } else if status >= 500
                || status == 429
                || status == 408
                || TRANSIENT_CODES.contains(&code.as_str())
            {
                S3Error::Transient {
                    op,
                    key,
                    detail: format!("{status} {code} {message}").trim().to_string(),
                }
            } else if status == 403 {
                S3Error::Denied {
                    op,
                    key,
                    code: or_if_empty(code, "403"),
                    message,
                }
            } else {
                S3Error::Rejected {
                    op,
                    key,
                    status,
                    code: or_if_empty(code, "no error code"),
                    message: or_if_empty(message, "no message"),
                }
            }
        }
        SdkError::ConstructionFailure(_) => S3Error::Rejected {
            op,
            key,
            status: 0,
            code: "ConstructionFailure".into(),
            message: error_chain(&err),
        },
        // Dispatch failures, timeouts and unreadable answers: the network.
        _ => S3Error::Transient {
            op,
            key,
            detail: error_chain(&err),
        },
    }
}
