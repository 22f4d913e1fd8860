//! Raw values resolved into [`Settings`], section by section; each error
//! names the setting and the fix.

use super::*;

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

pub(super) fn resolve_state(st: &RawState) -> Result<StateSettings, ConfigError> {
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

pub(super) fn resolve_agent(a: &RawAgent) -> Result<AgentSettings, ConfigError> {
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

pub(super) fn non_empty(setting: &str, v: &Option<String>) -> Result<Option<String>, ConfigError> {
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

pub(super) fn resolve_role(r: &RawRole) -> Result<RoleSettings, ConfigError> {
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
pub(super) fn resolve_external_id(
    r: &RawRole,
) -> Result<(Option<Secret>, Option<PathBuf>), ConfigError> {
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

pub(super) fn resolve_bucket(b: &RawBucket) -> Result<BucketSettings, ConfigError> {
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
    if name.ends_with("--x-s3") {
        // The SDK opens every request to a directory bucket with a
        // CreateSession, a GET on the bucket: promise 1 forbids it.
        return Err(ConfigError::invalid(
            "bucket.name",
            format!("{name:?} is a directory bucket (S3 Express One Zone)"),
            "putonly writes only to general purpose buckets: every request to a directory bucket needs a CreateSession (GET ?session on the bucket, s3express:CreateSession), which putonly never sends",
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

pub(super) fn resolve_upload(u: &RawUpload) -> Result<UploadSettings, ConfigError> {
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

pub(super) fn resolve_metrics(m: &RawMetrics) -> Result<MetricsSettings, ConfigError> {
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
