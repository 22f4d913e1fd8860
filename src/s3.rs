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
//! engine's retry rule is a `match`. With `bucket.overwrite = false` it
//! writes every object conditionally (`If-None-Match: *` on PutObject and
//! CompleteMultipartUpload, never on a read: there is no "does it exist?"
//! request) and reports the server's 412 as [`S3Error::Exists`].
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
use aws_sdk_s3::operation::RequestId;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart, ObjectCannedAcl,
    ServerSideEncryption, StorageClass,
};
use aws_types::SdkConfig;
use bytes::Bytes;

use crate::config::{BucketSettings, ChecksumKind, Sse, UploadSettings};
use crate::credentials::{CredentialError, CredentialSource, error_chain, or_if_empty};
pub use crate::ground::PartDone;
use crate::ground::checksum::Crc;
use crate::ground::keys::{KeyError, PrefixGuard};

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

/// What the server said of an object it stored: the proof kept in the
/// receipts (see [`crate::agent::receipts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub etag: String,
    /// `x-amz-version-id`, when the bucket has versioning.
    pub version_id: Option<String>,
    /// `x-amz-request-id` of the answer.
    pub request_id: Option<String>,
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
    /// 412 PreconditionFailed to a write sent with `If-None-Match: *`: the
    /// key already holds an object, which was left as it is. Not a failure
    /// and not retried.
    #[error(
        "{op} {key:?}: the key already holds an object, left as it is (overwrite = false): {message}"
    )]
    Exists {
        op: &'static str,
        key: String,
        message: String,
    },
    /// 409 ConditionalRequestConflict to a conditional
    /// CompleteMultipartUpload: a concurrent conditional write to the key
    /// won the race. S3 asks for a new upload (this one will not
    /// complete), so the request is not repeated; the file is tried again
    /// with a new upload.
    #[error(
        "{key:?}: a concurrent conditional write to the key conflicted with completing multipart upload {upload_id}; it is sent again with a new upload"
    )]
    Conflict { key: String, upload_id: String },
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
            | S3Error::Rejected { .. }
            | S3Error::Exists { .. }
            // Not with the same request: with a new upload (the engine's
            // caller tries the file again).
            | S3Error::Conflict { .. } => false,
        }
    }

    /// Whether the server refused to replace an object that is already
    /// there (a write with `If-None-Match: *` answered 412).
    pub fn is_exists(&self) -> bool {
        matches!(self, S3Error::Exists { .. })
    }
}

/// A write's refusal as seen under `bucket.overwrite`: a 412 answers a
/// write sent with `If-None-Match: *` only when `conditional` (overwrite =
/// false); anything else, or a 412 to an unconditional write, is kept as
/// it was classified (a 412 then names some other precondition, and the
/// file is not known to be there).
fn precondition(e: S3Error, conditional: bool) -> S3Error {
    match e {
        S3Error::Rejected {
            op,
            key,
            status: 412,
            message,
            ..
        } if conditional => S3Error::Exists { op, key, message },
        other => other,
    }
}

/// The write operations the upload engine needs, and nothing else.
pub trait ObjectWriter: Send + Sync + 'static {
    /// Writes a whole object in one request.
    fn put_object(
        &self,
        key: &str,
        body: Bytes,
        crc: Crc,
    ) -> impl Future<Output = Result<Written, S3Error>> + Send;

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
    ) -> impl Future<Output = Result<Written, S3Error>> + Send;

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
            // Never a CreateSession (a GET on the bucket) before a write;
            // the settings refuse directory bucket names too.
            .disable_s3_express_session_auth(true)
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

    /// `Some("*")` when objects must not replace existing ones.
    fn if_none_match(&self) -> Option<String> {
        (!self.options.overwrite).then(|| "*".to_string())
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
    async fn put_object(&self, key: &str, body: Bytes, crc: Crc) -> Result<Written, S3Error> {
        let deadline = self.deadlines.for_body(body.len() as u64);
        self.send("PutObject", key, deadline, || async {
            let req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_length(body.len() as i64)
                .body(ByteStream::from(body.clone()));
            let req =
                with_object_options!(req, &self.options).set_if_none_match(self.if_none_match());
            with_checksum!(req, crc)
                .customize()
                .disable_payload_signing()
                .send()
                .await
                .map(|out| Written {
                    etag: out.e_tag().unwrap_or_default().to_string(),
                    version_id: out.version_id().map(str::to_string),
                    request_id: out.request_id().map(str::to_string),
                })
                .map_err(|e| precondition(classify("PutObject", key, e), !self.options.overwrite))
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
    ) -> Result<Written, S3Error> {
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
                .mpu_object_size(whole.len as i64)
                .set_if_none_match(self.if_none_match());
            let out = with_checksum!(req, whole).send().await.map_err(|e| {
                let conflict = matches!(&e, SdkError::ServiceError(se)
                    if se.err().code() == Some(CONDITIONAL_CONFLICT));
                let e = classify("CompleteMultipartUpload", key, e);
                complete_error(
                    precondition(e, !self.options.overwrite),
                    upload_id,
                    conflict,
                )
            })?;
            Ok(Written {
                etag: out.e_tag().unwrap_or_default().to_string(),
                version_id: out.version_id().map(str::to_string),
                request_id: out.request_id().map(str::to_string),
            })
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

/// What a refused CompleteMultipartUpload means for its upload: gone
/// (NoSuchUpload), or lost to a concurrent conditional write (409
/// ConditionalRequestConflict: S3 asks for a new upload).
fn complete_error(e: S3Error, upload_id: &str, conflict: bool) -> S3Error {
    match e {
        S3Error::Rejected { key, code, .. } if code == "NoSuchUpload" => S3Error::NoSuchUpload {
            key,
            upload_id: upload_id.to_string(),
        },
        S3Error::Transient { key, .. } if conflict => S3Error::Conflict {
            key,
            upload_id: upload_id.to_string(),
        },
        other => other,
    }
}

/// 409: a concurrent conditional write to the same key (retried: a
/// PutObject as it is, a CompleteMultipartUpload with a new upload).
const CONDITIONAL_CONFLICT: &str = "ConditionalRequestConflict";

const CREDENTIAL_CODES: [&str; 4] = [
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "ExpiredTokenException",
];
const TRANSIENT_CODES: [&str; 12] = [
    CONDITIONAL_CONFLICT,
    // 409 "a conflicting conditional operation is in progress; try again".
    "OperationAborted",
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

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::error::ErrorMetadata;
    use aws_sdk_s3::operation::complete_multipart_upload::CompleteMultipartUploadError;
    use aws_sdk_s3::operation::put_object::PutObjectError;
    use aws_sdk_s3::primitives::SdkBody;

    fn answer(status: u16) -> HttpResponse {
        HttpResponse::new(status.try_into().unwrap(), SdkBody::empty())
    }

    fn put_error(status: u16, code: &str) -> SdkError<PutObjectError, HttpResponse> {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message("from the server")
            .build();
        SdkError::service_error(PutObjectError::generic(meta), answer(status))
    }

    fn complete_error_of(
        status: u16,
        code: &str,
    ) -> SdkError<CompleteMultipartUploadError, HttpResponse> {
        let meta = ErrorMetadata::builder().code(code).build();
        SdkError::service_error(CompleteMultipartUploadError::generic(meta), answer(status))
    }

    #[test]
    fn a_412_to_a_conditional_write_means_the_key_exists_and_is_not_retried() {
        let e = precondition(
            classify("PutObject", "foo/a", put_error(412, "PreconditionFailed")),
            true,
        );
        assert!(e.is_exists(), "{e}");
        assert!(!e.is_transient(), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("\"foo/a\"") && msg.contains("overwrite = false"),
            "{msg}"
        );
        // Without If-None-Match a 412 is some other refusal, never "exists".
        let e = precondition(
            classify("PutObject", "foo/a", put_error(412, "PreconditionFailed")),
            false,
        );
        assert!(!e.is_exists() && !e.is_transient(), "{e}");
        assert!(matches!(e, S3Error::Rejected { status: 412, .. }), "{e}");
    }

    #[test]
    fn a_409_conflict_is_retried_a_put_as_it_is_a_complete_with_a_new_upload() {
        let e = precondition(
            classify(
                "PutObject",
                "foo/a",
                put_error(409, "ConditionalRequestConflict"),
            ),
            true,
        );
        assert!(e.is_transient(), "{e}");
        let raw = complete_error_of(409, "ConditionalRequestConflict");
        let e = complete_error(
            precondition(classify("CompleteMultipartUpload", "foo/b", raw), true),
            "up-1",
            true,
        );
        assert!(
            matches!(&e, S3Error::Conflict { upload_id, .. } if upload_id == "up-1"),
            "{e}"
        );
        // The same request is not repeated; the engine starts a new upload.
        assert!(!e.is_transient(), "{e}");
        // A 412 to a conditional Complete is "exists", a 404 a lost upload.
        let raw = complete_error_of(412, "PreconditionFailed");
        let e = complete_error(
            precondition(classify("CompleteMultipartUpload", "foo/b", raw), true),
            "up-1",
            false,
        );
        assert!(e.is_exists(), "{e}");
        let raw = complete_error_of(404, "NoSuchUpload");
        let e = complete_error(
            precondition(classify("CompleteMultipartUpload", "foo/b", raw), true),
            "up-1",
            false,
        );
        assert!(matches!(e, S3Error::NoSuchUpload { .. }), "{e}");
        // Other 409s S3 documents as "try again" are transient too.
        let e = classify("PutObject", "foo/a", put_error(409, "OperationAborted"));
        assert!(e.is_transient(), "{e}");
    }

    /// A directory bucket's name (which the settings refuse) still gets
    /// no CreateSession: the first request on the wire is the PutObject.
    #[tokio::test]
    async fn a_directory_bucket_name_gets_no_create_session() {
        use aws_sdk_s3::config::{Credentials, Region, SharedCredentialsProvider};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            let _ = tx.send(String::from_utf8_lossy(&got[..end]).into_owned());
                            let _ = c
                                .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                .await;
                            return;
                        }
                    }
                });
            }
        });
        let sdk = SdkConfig::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(url)
            .credentials_provider(SharedCredentialsProvider::new(Credentials::for_tests()))
            .build();
        let raw = crate::config::RawConfig::parse(
            "[bucket]\nname = \"account-b-bucket\"\nallowed_prefixes = [\"foo/\"]\n",
        )
        .unwrap();
        let mut settings = crate::config::Settings::resolve(&raw).unwrap();
        settings.bucket.name = "mybucket--use1-az4--x-s3".into();
        let creds = CredentialSource::start(&sdk, None).await.unwrap();
        let b = WriteOnlyBucket::new(&sdk, creds, &settings.bucket, &settings.upload);
        let body = Bytes::from_static(b"hello");
        let crc = Crc::of(ChecksumKind::Crc64Nvme, &body);
        let _ = b.put_object("foo/x", body, crc).await;
        let first = heads.recv().await.unwrap();
        assert!(
            first.starts_with("PUT /mybucket--use1-az4--x-s3/foo/x"),
            "the first request was not the PutObject: {first}"
        );
    }
}
