//! A line-rate S3 sink for `bench/peers.sh --target sink`: it answers the
//! five write calls (PutObject, CreateMultipartUpload, UploadPart,
//! CompleteMultipartUpload, AbortMultipartUpload) well enough for
//! aws-sdk-rust (putonly), aws-sdk-go (s5cmd, rclone) and botocore (aws cli
//! v1), stores nothing, and so shows a client's own speed.
//!
//! - **Signatures are not checked**: any credentials are accepted.
//! - **Checksums are verified**: `x-amz-checksum-crc32`, `-crc32c`,
//!   `-crc64nvme`, `-sha1`, `-sha256`, `Content-MD5` and a hex
//!   `x-amz-content-sha256`, sent as headers or as the trailer of an
//!   `aws-chunked` body (STREAMING-UNSIGNED-PAYLOAD-TRAILER and the
//!   STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER] chunk framing are decoded;
//!   chunk signatures are ignored). A mismatch answers 400 BadDigest (or
//!   XAmzContentSHA256Mismatch). CompleteMultipartUpload's per-part
//!   checksums are compared with what each part carried, and a full-object
//!   CRC header on it with the parts' CRCs combined.
//! - **Reads are refused and counted**: GET, HEAD, List, CopyObject (a read
//!   of the source), and anything else that is not one of the five calls get
//!   403 AccessDenied, and each is printed on stderr.
//! - Path-style (`/bucket/key`) and virtual-host style (`bucket.host/key`,
//!   any Host that is not an IP address or `localhost`) requests.
//!
//! With `--verify crc` only the CRCs are checked: the MD5 / SHA-1 / SHA-256
//! values (which aws cli, s5cmd and rclone send, and which cost the sink as
//! much CPU as the client) are skipped and counted as `digests_skipped`.
//!
//! Usage: `sink [--port N] [--verify all|crc]` (default 0: any free port,
//! `all`). Binds 127.0.0.1 and
//! prints `http://127.0.0.1:PORT` on its first line of stdout. Counters:
//! `GET /__sink/stats` (JSON; `?reset=1` also sets them back to zero, so a
//! caller can attribute each run's requests to one client); the totals are
//! printed on stderr at SIGINT/SIGTERM.
//!
//! Build: `cargo build --release --example sink`; its unit tests:
//! `cargo test --example sink` (scripts/test.sh runs them).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::Digest as _;

/// The counters, all since start or the last `?reset=1`.
#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    put_object: AtomicU64,
    create_multipart: AtomicU64,
    upload_part: AtomicU64,
    complete_multipart: AtomicU64,
    abort_multipart: AtomicU64,
    /// Payload bytes received (decoded from aws-chunked).
    bytes: AtomicU64,
    /// Checksums that matched (a PutObject with CRC and MD5 counts two).
    checksums_verified: AtomicU64,
    /// Checksums that did not match, or could not be checked (malformed).
    checksum_failures: AtomicU64,
    /// PutObject and UploadPart requests that carried no checksum at all.
    unchecked_bodies: AtomicU64,
    /// MD5 / SHA-1 / SHA-256 values not checked (`--verify crc`).
    digests_skipped: AtomicU64,
    /// GET / HEAD / List / copy: refused with 403.
    reads: AtomicU64,
    /// Anything else that is not one of the five write calls: refused.
    other_refused: AtomicU64,
    /// Requests answered with 4xx for another reason (unknown upload id, bad framing).
    errors: AtomicU64,
}

const FIELDS: [&str; 15] = [
    "requests",
    "put_object",
    "create_multipart",
    "upload_part",
    "complete_multipart",
    "abort_multipart",
    "bytes",
    "checksums_verified",
    "checksum_failures",
    "unchecked_bodies",
    "digests_skipped",
    "reads",
    "other_refused",
    "errors",
    "objects",
];

impl Stats {
    fn counters(&self) -> [&AtomicU64; 14] {
        [
            &self.requests,
            &self.put_object,
            &self.create_multipart,
            &self.upload_part,
            &self.complete_multipart,
            &self.abort_multipart,
            &self.bytes,
            &self.checksums_verified,
            &self.checksum_failures,
            &self.unchecked_bodies,
            &self.digests_skipped,
            &self.reads,
            &self.other_refused,
            &self.errors,
        ]
    }

    /// One JSON object; `objects` is PutObject + CompleteMultipartUpload.
    fn json(&self, reset: bool) -> String {
        let mut v: Vec<u64> = self
            .counters()
            .iter()
            .map(|c| {
                if reset {
                    c.swap(0, Ordering::Relaxed)
                } else {
                    c.load(Ordering::Relaxed)
                }
            })
            .collect();
        v.push(v[1] + v[4]);
        let parts: Vec<String> = FIELDS
            .iter()
            .zip(v)
            .map(|(k, n)| format!("\"{k}\":{n}"))
            .collect();
        format!("{{{}}}", parts.join(","))
    }
}

/// What the sink keeps of an open multipart upload: each part's length and
/// CRCs (to check CompleteMultipartUpload), nothing of the data.
#[derive(Default)]
struct Upload {
    parts: BTreeMap<u32, PartRecord>,
}

struct PartRecord {
    len: u64,
    /// (algorithm, value) of each CRC the part carried and that matched.
    crcs: Vec<(Kind, Vec<u8>)>,
}

struct Sink {
    stats: Stats,
    /// The totals since start (never reset).
    totals: Stats,
    uploads: Mutex<HashMap<String, Upload>>,
    next_id: AtomicU64,
    /// `--verify crc`: check the CRCs only, skip the (costly) digests.
    crc_only: bool,
}

impl Sink {
    fn add(&self, f: impl Fn(&Stats) -> &AtomicU64, n: u64) {
        f(&self.stats).fetch_add(n, Ordering::Relaxed);
        f(&self.totals).fetch_add(n, Ordering::Relaxed);
    }
    fn inc(&self, f: impl Fn(&Stats) -> &AtomicU64) {
        self.add(f, 1)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Crc32,
    Crc32c,
    Crc64Nvme,
    Sha1,
    Sha256,
    Md5,
    /// x-amz-content-sha256 (hex).
    ContentSha256,
}

impl Kind {
    fn from_header(name: &str) -> Option<Kind> {
        Some(match name.to_ascii_lowercase().as_str() {
            "x-amz-checksum-crc32" => Kind::Crc32,
            "x-amz-checksum-crc32c" => Kind::Crc32c,
            "x-amz-checksum-crc64nvme" => Kind::Crc64Nvme,
            "x-amz-checksum-sha1" => Kind::Sha1,
            "x-amz-checksum-sha256" => Kind::Sha256,
            _ => return None,
        })
    }
    fn header(self) -> &'static str {
        match self {
            Kind::Crc32 => "x-amz-checksum-crc32",
            Kind::Crc32c => "x-amz-checksum-crc32c",
            Kind::Crc64Nvme => "x-amz-checksum-crc64nvme",
            Kind::Sha1 => "x-amz-checksum-sha1",
            Kind::Sha256 => "x-amz-checksum-sha256",
            Kind::Md5 => "content-md5",
            Kind::ContentSha256 => "x-amz-content-sha256",
        }
    }
    /// The element naming this checksum in CompleteMultipartUpload's XML.
    fn xml(self) -> Option<&'static str> {
        match self {
            Kind::Crc32 => Some("ChecksumCRC32"),
            Kind::Crc32c => Some("ChecksumCRC32C"),
            Kind::Crc64Nvme => Some("ChecksumCRC64NVME"),
            Kind::Sha1 => Some("ChecksumSHA1"),
            Kind::Sha256 => Some("ChecksumSHA256"),
            _ => None,
        }
    }
    fn crc(self) -> Option<crc_fast::CrcAlgorithm> {
        match self {
            Kind::Crc32 => Some(crc_fast::CrcAlgorithm::Crc32IsoHdlc),
            Kind::Crc32c => Some(crc_fast::CrcAlgorithm::Crc32Iscsi),
            Kind::Crc64Nvme => Some(crc_fast::CrcAlgorithm::Crc64Nvme),
            _ => None,
        }
    }
    fn is_digest(self) -> bool {
        self.crc().is_none()
    }
    fn width(self) -> usize {
        match self {
            Kind::Crc32 | Kind::Crc32c => 4,
            Kind::Crc64Nvme => 8,
            Kind::Sha1 => 20,
            Kind::Sha256 | Kind::ContentSha256 => 32,
            Kind::Md5 => 16,
        }
    }
    const ALL_AMZ: [Kind; 5] = [
        Kind::Crc32,
        Kind::Crc32c,
        Kind::Crc64Nvme,
        Kind::Sha1,
        Kind::Sha256,
    ];
}

enum Hasher {
    Crc(crc_fast::Digest),
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl Hasher {
    fn new(kind: Kind) -> Hasher {
        match kind {
            Kind::Crc32 | Kind::Crc32c | Kind::Crc64Nvme => {
                Hasher::Crc(crc_fast::Digest::new(kind.crc().unwrap()))
            }
            Kind::Md5 => Hasher::Md5(md5::Md5::new()),
            Kind::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Kind::Sha256 | Kind::ContentSha256 => Hasher::Sha256(sha2::Sha256::new()),
        }
    }
    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Crc(d) => d.update(data),
            Hasher::Md5(d) => d.update(data),
            Hasher::Sha1(d) => d.update(data),
            Hasher::Sha256(d) => d.update(data),
        }
    }
    fn finish(self, width: usize) -> Vec<u8> {
        match self {
            Hasher::Crc(d) => d.finalize().to_be_bytes()[8 - width..].to_vec(),
            Hasher::Md5(d) => d.finalize().to_vec(),
            Hasher::Sha1(d) => d.finalize().to_vec(),
            Hasher::Sha256(d) => d.finalize().to_vec(),
        }
    }
}

/// One checksum to verify on a body: the expected value comes from a header
/// now or from the aws-chunked trailer at the end.
struct Check {
    kind: Kind,
    expected: Option<String>,
    hasher: Hasher,
}

fn decode_expected(kind: Kind, text: &str) -> Option<Vec<u8>> {
    let v = if kind == Kind::ContentSha256 {
        hex_decode(text.trim())?
    } else {
        B64.decode(text.trim()).ok()?
    };
    (v.len() == kind.width()).then_some(v)
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The aws-chunked body decoder: `SIZE-HEX[;chunk-signature=..]\r\n DATA
/// \r\n` ... `0[;..]\r\n` then trailer lines `name:value\r\n` and a blank
/// line.
enum Chunked {
    Header(Vec<u8>),
    Data(u64),
    Crlf(u8),
    Trailer(Vec<u8>),
    Done,
}

struct Decoder {
    state: Chunked,
    trailers: Vec<(String, String)>,
}

impl Decoder {
    fn new() -> Decoder {
        Decoder {
            state: Chunked::Header(Vec::new()),
            trailers: Vec::new(),
        }
    }

    /// Feeds encoded bytes; calls `out` with each piece of payload.
    fn feed(&mut self, mut data: &[u8], out: &mut impl FnMut(&[u8])) -> Result<(), String> {
        while !data.is_empty() {
            match &mut self.state {
                Chunked::Header(line) | Chunked::Trailer(line) => {
                    let (taken, end) = match data.iter().position(|&b| b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (data.len(), false),
                    };
                    line.extend_from_slice(&data[..taken]);
                    data = &data[taken..];
                    if line.len() > 8192 {
                        return Err("aws-chunked line too long".into());
                    }
                    if !end {
                        continue;
                    }
                    let text = String::from_utf8_lossy(line).trim_end().to_string();
                    if matches!(self.state, Chunked::Header(_)) {
                        let size = text.split(';').next().unwrap_or("").trim();
                        let n = u64::from_str_radix(size, 16)
                            .map_err(|_| format!("bad aws-chunked size line {text:?}"))?;
                        self.state = if n == 0 {
                            Chunked::Trailer(Vec::new())
                        } else {
                            Chunked::Data(n)
                        };
                    } else if text.is_empty() {
                        self.state = Chunked::Done;
                    } else {
                        let (k, v) = text
                            .split_once(':')
                            .ok_or_else(|| format!("bad aws-chunked trailer {text:?}"))?;
                        self.trailers
                            .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                        self.state = Chunked::Trailer(Vec::new());
                    }
                }
                Chunked::Data(n) => {
                    let take = (*n).min(data.len() as u64) as usize;
                    out(&data[..take]);
                    data = &data[take..];
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = Chunked::Crlf(0);
                    }
                }
                Chunked::Crlf(seen) => {
                    let want = if *seen == 0 { b'\r' } else { b'\n' };
                    if data[0] != want {
                        return Err("aws-chunked chunk not followed by CRLF".into());
                    }
                    data = &data[1..];
                    if *seen == 0 {
                        *seen = 1;
                    } else {
                        self.state = Chunked::Header(Vec::new());
                    }
                }
                Chunked::Done => {
                    if data.iter().all(|b| b.is_ascii_whitespace()) {
                        return Ok(());
                    }
                    return Err("bytes after the aws-chunked trailer".into());
                }
            }
        }
        Ok(())
    }

    /// The body ended: complete framing, or a trailer whose final blank line
    /// is missing.
    fn finish(&mut self) -> Result<(), String> {
        match &self.state {
            Chunked::Done => Ok(()),
            Chunked::Trailer(line) if line.is_empty() => Ok(()),
            _ => Err("aws-chunked body ended early".into()),
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn error(status: StatusCode, code: &str, message: &str) -> Resp {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{}</Message><RequestId>sink</RequestId></Error>",
        xml_escape(message)
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn xml(body: String) -> Resp {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/xml")
        .body(Full::new(Bytes::from(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{body}"
        ))))
        .unwrap()
}

/// The request's bucket and key, path-style or virtual-host style.
fn bucket_key(headers: &HeaderMap, path: &str) -> (String, String) {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    let path = path.trim_start_matches('/');
    if name.is_empty() || name == "localhost" || name.parse::<IpAddr>().is_ok() {
        let (b, k) = path.split_once('/').unwrap_or((path, ""));
        (percent_decode(b), percent_decode(k))
    } else {
        let bucket = name.split('.').next().unwrap_or("");
        (bucket.to_string(), percent_decode(path))
    }
}

fn query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// What a body carried, once read and verified.
struct BodyOutcome {
    len: u64,
    /// Each verified checksum: (kind, value).
    verified: Vec<(Kind, Vec<u8>)>,
    /// The Content-MD5 the client sent (checked, unless `--verify crc`).
    md5_sent: Option<Vec<u8>>,
}

/// Reads a PutObject / UploadPart body to its end, decoding aws-chunked and
/// checking every checksum it was sent; Err is the answer to send.
async fn read_verified(
    sink: &Sink,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<BodyOutcome, Resp> {
    let content_sha = header(headers, "x-amz-content-sha256").unwrap_or("");
    let chunked = content_sha.starts_with("STREAMING-")
        || header(headers, "content-encoding").is_some_and(|e| e.contains("aws-chunked"));
    let mut checks: Vec<Check> = Vec::new();
    for kind in Kind::ALL_AMZ {
        if let Some(v) = header(headers, kind.header()) {
            checks.push(Check {
                kind,
                expected: Some(v.to_string()),
                hasher: Hasher::new(kind),
            });
        }
    }
    if let Some(v) = header(headers, "content-md5") {
        checks.push(Check {
            kind: Kind::Md5,
            expected: Some(v.to_string()),
            hasher: Hasher::new(Kind::Md5),
        });
    }
    if content_sha.len() == 64 && content_sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        checks.push(Check {
            kind: Kind::ContentSha256,
            expected: Some(content_sha.to_ascii_lowercase()),
            hasher: Hasher::new(Kind::ContentSha256),
        });
    }
    // Checksums announced for the trailer.
    if chunked {
        let mut names: Vec<String> = header(headers, "x-amz-trailer")
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(alg) = header(headers, "x-amz-sdk-checksum-algorithm") {
            names.push(format!("x-amz-checksum-{}", alg.to_ascii_lowercase()));
        }
        for n in names {
            if let Some(kind) = Kind::from_header(&n)
                && !checks.iter().any(|c| c.kind == kind)
                && !(sink.crc_only && kind.is_digest())
            {
                checks.push(Check {
                    kind,
                    expected: None,
                    hasher: Hasher::new(kind),
                });
            }
        }
    }
    // The client's Content-MD5, for the ETag even when it is not checked.
    let md5_sent = header(headers, "content-md5").and_then(|v| decode_expected(Kind::Md5, v));
    if sink.crc_only {
        let before = checks.len();
        checks.retain(|c| !c.kind.is_digest() || c.expected.is_none());
        sink.add(|s| &s.digests_skipped, (before - checks.len()) as u64);
    }
    let mut decoder = chunked.then(Decoder::new);
    let mut len = 0u64;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "IncompleteBody",
                    &e.to_string(),
                ));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let mut out = |piece: &[u8]| {
            len += piece.len() as u64;
            for c in checks.iter_mut() {
                c.hasher.update(piece);
            }
        };
        match decoder.as_mut() {
            Some(d) => d
                .feed(&data, &mut out)
                .map_err(|e| error(StatusCode::BAD_REQUEST, "IncompleteBody", &e))?,
            None => out(&data),
        }
    }
    sink.add(|s| &s.bytes, len);
    if let Some(d) = decoder.as_mut() {
        d.finish()
            .map_err(|e| error(StatusCode::BAD_REQUEST, "IncompleteBody", &e))?;
        if let Some(want) = header(headers, "x-amz-decoded-content-length")
            && want.parse::<u64>().ok() != Some(len)
        {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "IncompleteBody",
                &format!("x-amz-decoded-content-length {want}, body {len}"),
            ));
        }
        for (name, value) in &d.trailers {
            let Some(kind) = Kind::from_header(name) else {
                continue;
            };
            match checks.iter_mut().find(|c| c.kind == kind) {
                Some(c) => c.expected = Some(value.clone()),
                None if sink.crc_only && kind.is_digest() => sink.inc(|s| &s.digests_skipped),
                // A trailer checksum that was not announced: its hash was
                // not computed, so it cannot be checked.
                None => {
                    sink.inc(|s| &s.checksum_failures);
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "InvalidRequest",
                        &format!("trailer {name} was not announced in x-amz-trailer"),
                    ));
                }
            }
        }
    }
    if checks.is_empty() {
        sink.inc(|s| &s.unchecked_bodies);
    }
    let mut verified = Vec::new();
    for c in checks {
        let Some(text) = c.expected else {
            sink.inc(|s| &s.checksum_failures);
            return Err(error(
                StatusCode::BAD_REQUEST,
                "InvalidRequest",
                &format!("{} announced but not sent", c.kind.header()),
            ));
        };
        let Some(want) = decode_expected(c.kind, &text) else {
            sink.inc(|s| &s.checksum_failures);
            return Err(error(
                StatusCode::BAD_REQUEST,
                "InvalidDigest",
                &format!("malformed {}: {text}", c.kind.header()),
            ));
        };
        let got = c.hasher.finish(c.kind.width());
        if got != want {
            sink.inc(|s| &s.checksum_failures);
            let code = if c.kind == Kind::ContentSha256 {
                "XAmzContentSHA256Mismatch"
            } else {
                "BadDigest"
            };
            return Err(error(
                StatusCode::BAD_REQUEST,
                code,
                &format!(
                    "The {} you specified did not match the calculated checksum.",
                    c.kind.header()
                ),
            ));
        }
        sink.inc(|s| &s.checksums_verified);
        verified.push((c.kind, got));
    }
    Ok(BodyOutcome {
        len,
        verified,
        md5_sent,
    })
}

/// The ETag of a body: the MD5 the client sent (verified, unless `--verify
/// crc`), else a stand-in made of its length and the first CRC (the sink
/// computes no MD5 it was not asked to check).
fn etag(out: &BodyOutcome) -> String {
    if let Some(md5) = &out.md5_sent {
        return format!("\"{}\"", hex(md5));
    }
    let crc = out
        .verified
        .iter()
        .find(|(k, _)| k.crc().is_some())
        .map(|(_, v)| hex(v))
        .unwrap_or_default();
    format!("\"{:016x}{:0>16}\"", out.len, crc)
}

fn ok_with_checksums(out: &BodyOutcome) -> hyper::http::response::Builder {
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header("etag", etag(out));
    for (k, v) in &out.verified {
        if k.xml().is_some() {
            b = b.header(k.header(), B64.encode(v));
        }
    }
    b
}

/// The text between `<tag>` and `</tag>` in each occurrence.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

async fn handle(sink: Arc<Sink>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/__sink/stats" {
        let reset = req.uri().query().is_some_and(|q| q.contains("reset=1"));
        return Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(sink.stats.json(reset) + "\n")))
            .unwrap());
    }
    sink.inc(|s| &s.requests);
    let resp = route(&sink, req, &path).await;
    if resp.status().is_client_error() && resp.status() != StatusCode::FORBIDDEN {
        sink.inc(|s| &s.errors);
    }
    Ok(resp)
}

async fn route(sink: &Sink, req: Request<Incoming>, path: &str) -> Resp {
    let q = query(req.uri().query());
    let (bucket, key) = bucket_key(req.headers(), path);
    let method = req.method().clone();
    let refuse = |read: bool| {
        // Each refused request on stderr: it is what a benchmark must explain.
        eprintln!(
            "refused {} {} {}{}",
            if read { "read" } else { "other" },
            method,
            path,
            req.uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        );
        if read {
            sink.inc(|s| &s.reads);
        } else {
            sink.inc(|s| &s.other_refused);
        }
        error(StatusCode::FORBIDDEN, "AccessDenied", "Access Denied")
    };
    if method == Method::GET || method == Method::HEAD {
        let mut r = refuse(true);
        if method == Method::HEAD {
            *r.body_mut() = Full::new(Bytes::new());
        }
        return r;
    }
    if bucket.is_empty() || key.is_empty() {
        return refuse(false);
    }
    let copy = req.headers().contains_key("x-amz-copy-source");
    match method {
        Method::PUT if copy => refuse(true),
        Method::PUT if q.contains_key("partNumber") || q.contains_key("uploadId") => {
            let (Some(upload_id), Some(number)) = (
                q.get("uploadId").cloned(),
                q.get("partNumber").and_then(|n| n.parse::<u32>().ok()),
            ) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidArgument",
                    "partNumber and uploadId",
                );
            };
            if !sink.uploads.lock().unwrap().contains_key(&upload_id) {
                // Drain the body so the connection stays usable.
                let _ = req.into_body().collect().await;
                return error(StatusCode::NOT_FOUND, "NoSuchUpload", "unknown upload id");
            }
            let (parts, body) = req.into_parts();
            let out = match read_verified(sink, &parts.headers, body).await {
                Ok(o) => o,
                Err(r) => return r,
            };
            sink.inc(|s| &s.upload_part);
            let resp = ok_with_checksums(&out)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let crcs = out
                .verified
                .into_iter()
                .filter(|(k, _)| k.xml().is_some())
                .collect();
            if let Some(u) = sink.uploads.lock().unwrap().get_mut(&upload_id) {
                u.parts.insert(number, PartRecord { len: out.len, crcs });
            }
            resp
        }
        Method::PUT if q.is_empty() || q.keys().all(|k| k.starts_with("x-id")) => {
            let (parts, body) = req.into_parts();
            match read_verified(sink, &parts.headers, body).await {
                Ok(out) => {
                    sink.inc(|s| &s.put_object);
                    ok_with_checksums(&out)
                        .body(Full::new(Bytes::new()))
                        .unwrap()
                }
                Err(r) => r,
            }
        }
        Method::POST if q.contains_key("uploads") => {
            let id = format!(
                "sink-{:016x}-{:08x}",
                sink.next_id.fetch_add(1, Ordering::Relaxed),
                std::process::id()
            );
            sink.uploads
                .lock()
                .unwrap()
                .insert(id.clone(), Upload::default());
            sink.inc(|s| &s.create_multipart);
            let mut r = xml(format!(
                "<InitiateMultipartUploadResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>{}</Bucket><Key>{}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>",
                xml_escape(&bucket),
                xml_escape(&key)
            ));
            for h in ["x-amz-checksum-algorithm", "x-amz-checksum-type"] {
                if let Some(v) = req.headers().get(h) {
                    r.headers_mut().insert(h, v.clone());
                }
            }
            r
        }
        Method::POST if q.contains_key("uploadId") => {
            complete(sink, req, &q["uploadId"], &bucket, &key).await
        }
        Method::DELETE if q.contains_key("uploadId") => {
            if sink
                .uploads
                .lock()
                .unwrap()
                .remove(&q["uploadId"])
                .is_none()
            {
                return error(StatusCode::NOT_FOUND, "NoSuchUpload", "unknown upload id");
            }
            sink.inc(|s| &s.abort_multipart);
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
        // ListParts, ListMultipartUploads and other POST reads.
        Method::POST if q.contains_key("select") => refuse(true),
        _ => refuse(false),
    }
}

async fn complete(
    sink: &Sink,
    req: Request<Incoming>,
    upload_id: &str,
    bucket: &str,
    key: &str,
) -> Resp {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, "IncompleteBody", &e.to_string()),
    };
    let text = String::from_utf8_lossy(&body);
    let Some(upload) = sink.uploads.lock().unwrap().remove(upload_id) else {
        return error(StatusCode::NOT_FOUND, "NoSuchUpload", "unknown upload id");
    };
    let listed = elements(&text, "Part");
    if listed.is_empty() {
        return error(StatusCode::BAD_REQUEST, "MalformedXML", "no parts");
    }
    let mut md5_of_etags = md5::Md5::new();
    let mut order = Vec::new();
    for p in &listed {
        let Some(n) = elements(p, "PartNumber")
            .first()
            .and_then(|n| n.trim().parse::<u32>().ok())
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "MalformedXML",
                "part without PartNumber",
            );
        };
        let Some(rec) = upload.parts.get(&n) else {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidPart",
                &format!("part {n} was not uploaded"),
            );
        };
        let etag = elements(p, "ETag").first().copied().unwrap_or("");
        let etag = etag.replace("&quot;", "").replace('"', "");
        md5_of_etags.update(hex_decode(etag.trim()).unwrap_or_default());
        // Each per-part checksum listed must be the one the part carried.
        for kind in Kind::ALL_AMZ {
            let Some(listed) = elements(p, kind.xml().unwrap())
                .first()
                .map(|s| s.trim().to_string())
            else {
                continue;
            };
            let carried = rec
                .crcs
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, v)| B64.encode(v));
            if carried.as_deref() == Some(listed.as_str()) {
                sink.inc(|s| &s.checksums_verified);
            } else {
                sink.inc(|s| &s.checksum_failures);
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidPart",
                    &format!(
                        "part {n}: listed {} {listed}, part carried {carried:?}",
                        kind.xml().unwrap()
                    ),
                );
            }
        }
        order.push(rec);
    }
    // A full-object CRC on the Complete request: the parts' CRCs combined.
    for kind in Kind::ALL_AMZ {
        let Some(value) = header(&parts.headers, kind.header()) else {
            continue;
        };
        let Some(alg) = kind.crc() else { continue };
        if value.contains('-') {
            continue; // A composite checksum of checksums; not combined here.
        }
        let mut acc: Option<u64> = None;
        let mut known = true;
        for rec in &order {
            let Some((_, v)) = rec.crcs.iter().find(|(k, _)| *k == kind) else {
                known = false;
                break;
            };
            let mut b = [0u8; 8];
            b[8 - v.len()..].copy_from_slice(v);
            let part = u64::from_be_bytes(b);
            acc = Some(match acc {
                None => part,
                Some(a) => crc_fast::checksum_combine(alg, a, part, rec.len),
            });
        }
        if !known {
            continue;
        }
        let got = acc.unwrap_or(0).to_be_bytes()[8 - kind.width()..].to_vec();
        if decode_expected(kind, value).as_deref() == Some(got.as_slice()) {
            sink.inc(|s| &s.checksums_verified);
        } else {
            sink.inc(|s| &s.checksum_failures);
            return error(
                StatusCode::BAD_REQUEST,
                "BadDigest",
                &format!(
                    "full-object {} {value} does not match the parts'",
                    kind.header()
                ),
            );
        }
    }
    sink.inc(|s| &s.complete_multipart);
    let etag = format!("\"{}-{}\"", hex(&md5_of_etags.finalize()), listed.len());
    xml(format!(
        "<CompleteMultipartUploadResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Location>/{b}/{k}</Location><Bucket>{b}</Bucket><Key>{k}</Key><ETag>{}</ETag></CompleteMultipartUploadResult>",
        xml_escape(&etag),
        b = xml_escape(bucket),
        k = xml_escape(key)
    ))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut port = 0u16;
    let mut crc_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).expect("--port N"),
            "--verify" => {
                crc_only = match args.next().as_deref() {
                    Some("all") => false,
                    Some("crc") => true,
                    _ => panic!("--verify all|crc"),
                }
            }
            "-h" | "--help" => {
                println!(
                    "usage: sink [--port N] [--verify all|crc]   (see the doc comment in bench/sink.rs)"
                );
                return Ok(());
            }
            _ => panic!("unknown argument {a}"),
        }
    }
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!("http://{}", listener.local_addr()?);
    use std::io::Write;
    std::io::stdout().flush()?;
    let sink = Arc::new(Sink {
        stats: Stats::default(),
        totals: Stats::default(),
        uploads: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        crc_only,
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        let sink = sink.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(sink.clone(), req));
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    eprintln!("sink totals: {}", sink.totals.json(false));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Decoded = (Vec<u8>, Vec<(String, String)>);

    fn decode_all(body: &[u8], step: usize) -> Result<Decoded, String> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for piece in body.chunks(step) {
            d.feed(piece, &mut |p: &[u8]| out.extend_from_slice(p))?;
        }
        d.finish()?;
        Ok((out, d.trailers))
    }

    #[test]
    fn aws_chunked_unsigned_trailer_in_any_split() {
        let crc = B64.encode(crc_fast::crc32_iso_hdlc(b"hello world").to_be_bytes());
        let body = format!("5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:{crc}\r\n\r\n");
        for step in 1..body.len() {
            let (data, trailers) = decode_all(body.as_bytes(), step).unwrap();
            assert_eq!(data, b"hello world");
            assert_eq!(
                trailers,
                vec![("x-amz-checksum-crc32".to_string(), crc.clone())]
            );
        }
    }

    #[test]
    fn aws_chunked_signed_framing() {
        let sig = "a".repeat(64);
        let body = format!(
            "3;chunk-signature={sig}\r\nabc\r\n0;chunk-signature={sig}\r\nx-amz-checksum-crc64nvme:AAAAAAAAAAA=\r\nx-amz-trailer-signature:{sig}\r\n\r\n"
        );
        let (data, trailers) = decode_all(body.as_bytes(), 7).unwrap();
        assert_eq!(data, b"abc");
        assert_eq!(trailers.len(), 2);
        // No trailer at all (STREAMING-AWS4-HMAC-SHA256-PAYLOAD).
        let body = format!("3;chunk-signature={sig}\r\nabc\r\n0;chunk-signature={sig}\r\n\r\n");
        assert_eq!(decode_all(body.as_bytes(), 1).unwrap().0, b"abc");
    }

    #[test]
    fn aws_chunked_malformed() {
        assert!(decode_all(b"5\r\nhelloXX0\r\n\r\n", 3).is_err());
        assert!(decode_all(b"zz\r\nhello\r\n", 3).is_err());
        assert!(decode_all(b"5\r\nhel", 3).is_err());
    }

    #[test]
    fn checksum_values() {
        let mut h = Hasher::new(Kind::Crc64Nvme);
        h.update(b"123456789");
        assert_eq!(
            h.finish(8),
            crc_fast::crc64_nvme(b"123456789").to_be_bytes().to_vec()
        );
        let mut h = Hasher::new(Kind::Md5);
        h.update(b"");
        assert_eq!(hex(&h.finish(16)), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(
            decode_expected(Kind::Crc32, "AAAAAA=="),
            Some(vec![0, 0, 0, 0])
        );
        assert_eq!(decode_expected(Kind::Crc32, "AAAAAAAAAAA="), None);
    }

    #[test]
    fn addressing() {
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            bucket_key(&h, "/b/a%20b/c+d"),
            ("b".to_string(), "a b/c+d".to_string())
        );
        h.insert("host", "b.s3.localhost:9000".parse().unwrap());
        assert_eq!(bucket_key(&h, "/k/x"), ("b".to_string(), "k/x".to_string()));
    }
}
