//! Values with units and rules of their own: sizes, rates, durations,
//! prefix templates, endpoints (plain http only to this machine unless
//! allowed), and files others may read.

use super::*;

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
pub(super) fn url_host(url: &str) -> Option<&str> {
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
pub(super) fn is_loopback(host: &str) -> bool {
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
pub(super) fn in_group(gid: u32) -> bool {
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
pub(super) fn group_name(gid: u32) -> Option<String> {
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
