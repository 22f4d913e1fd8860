//! The recording reverse proxy: sits between putonly and the server, records
//! every request (time, operation, key, access key id, status), reads the
//! expiry of every credential STS hands out, and injects faults on demand.
//! Assertions made from its record are the evidence that nothing but writes
//! crossed the wire.
//!
//! One answer of moto 5.2.5 is corrected to what S3 answers: an UploadPart
//! or CompleteMultipartUpload for an upload that was already completed or
//! aborted fails inside moto with a KeyError, a 500, where S3 answers 404
//! NoSuchUpload. The proxy knows which uploads it saw finish and answers
//! those 500s with S3's 404 (marked `corrected` in the record), so a test
//! in which the journal lost a "done" checks putonly's S3 behaviour, not an
//! endless retry of a moto error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One request as it crossed the proxy.
#[derive(Debug, Clone)]
pub struct Record {
    pub at: SystemTime,
    pub method: String,
    pub op: String,
    /// Path-style: the bucket and the decoded key, if any.
    pub bucket: Option<String>,
    pub key: Option<String>,
    pub query: String,
    pub access_key: Option<String>,
    pub session_token: bool,
    pub status: u16,
    pub injected: bool,
    /// The object size a write announces: Content-Length of a PutObject,
    /// x-amz-mp-object-size of a CompleteMultipartUpload.
    pub size: Option<u64>,
    /// The uploadId query parameter, for multipart requests.
    pub upload_id: Option<String>,
    /// The x-amz-acl header, if any.
    pub acl: Option<String>,
    /// A random fault from [`Proxy::chaos`]: "slowdown" (503), "error" (500),
    /// "reset" (connection dropped mid-body; never reached the server) or
    /// "delay" (forwarded, then the answer held back past the client's
    /// timeout: the server did the work, the client did not hear it).
    pub chaos: Option<&'static str>,
    /// moto's 500 for an upload already finished, answered as S3's 404
    /// NoSuchUpload (see the module doc).
    pub corrected: bool,
    /// The ExternalId parameter of an STS AssumeRole, decoded.
    pub external_id: Option<String>,
    /// When the answer was known to the proxy (the record's place in the
    /// log is that order too): a request whose `at` is later was sent
    /// after this one was answered.
    pub answered: Option<SystemTime>,
    /// The If-None-Match header, if any (a conditional write).
    pub if_none_match: Option<String>,
}

/// The successful writes (PutObject or CompleteMultipartUpload answered
/// 200) of `key` in `records`, in order.
pub fn writes_of(records: &[Record], key: &str) -> Vec<Record> {
    records
        .iter()
        .filter(|r| {
            (r.op == "PutObject" || r.op == "CompleteMultipartUpload")
                && r.status == 200
                && r.key.as_deref() == Some(key)
        })
        .cloned()
        .collect()
}

/// The object sizes announced by the successful writes of `key`.
pub fn sizes_written(records: &[Record], key: &str) -> Vec<Option<u64>> {
    writes_of(records, key).iter().map(|r| r.size).collect()
}

impl Record {
    /// One line for a failure message: operation, status, upload id, and
    /// whether the proxy injected or corrected the answer.
    pub fn summary(&self) -> String {
        format!(
            "{} {} {:?} injected={} corrected={}",
            self.op, self.status, self.upload_id, self.injected, self.corrected
        )
    }
}

/// Operations putonly may send.
pub const ALLOWED_OPS: [&str; 7] = [
    "PutObject",
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "AssumeRole",
    "GetCallerIdentity",
];

struct Fault {
    op: String,
    remaining: usize,
    /// While set, the fault holds until then instead of counting down.
    until: Option<Instant>,
    status: u16,
    code: String,
}

struct Chaos {
    rng: fastrand::Rng,
    rate: f64,
    delay: Duration,
}

#[derive(Default)]
struct State {
    upstream: String,
    log: Mutex<Vec<Record>>,
    expiries: Mutex<HashMap<String, SystemTime>>,
    secrets: Mutex<Vec<String>>,
    faults: Mutex<Vec<Fault>>,
    outage_until: Mutex<Option<Instant>>,
    chaos: Mutex<Option<Chaos>>,
    /// Requests of this operation arriving before the instant are held
    /// this long before being forwarded: a server that never answers.
    hang: Mutex<Option<(String, Instant, Duration)>>,
    /// Upload ids the server completed or aborted.
    finished_uploads: Mutex<std::collections::HashSet<String>>,
    /// Request bodies (all together) go through at this many bytes a
    /// second: a slow link.
    link: Mutex<Option<Pacer>>,
    /// The next this many answers of this operation send their headers and
    /// then a byte every half second, never ending.
    stall_body: Mutex<Option<(String, usize)>>,
    /// Every request to the bucket waits this long before it is forwarded:
    /// a distant server's round trip.
    latency: Mutex<Option<Duration>>,
    /// Per operation: requests in the proxy now, and the most at once.
    in_flight: Mutex<HashMap<String, (usize, usize)>>,
}

/// Counts one request in flight until dropped.
struct InFlight {
    state: Arc<State>,
    op: String,
}

impl InFlight {
    /// Counts under the operation's name and under `*` (every request).
    fn enter(state: &Arc<State>, op: &str) -> InFlight {
        let mut all = state.in_flight.lock().unwrap();
        for name in [op, "*"] {
            let e = all.entry(name.to_string()).or_default();
            e.0 += 1;
            e.1 = e.1.max(e.0);
        }
        InFlight {
            state: state.clone(),
            op: op.to_string(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut all = self.state.in_flight.lock().unwrap();
        for name in [self.op.as_str(), "*"] {
            if let Some(e) = all.get_mut(name) {
                e.0 -= 1;
            }
        }
    }
}

/// Paces bytes at a rate shared by every request.
#[derive(Clone)]
struct Pacer {
    bytes_per_sec: u64,
    next: Arc<Mutex<Instant>>,
}

impl Pacer {
    /// Waits until `n` more bytes may pass.
    async fn take(&self, n: usize) {
        let until = {
            let mut next = self.next.lock().unwrap();
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
            *next
        };
        tokio::time::sleep_until(until.into()).await;
    }
}

/// The proxy's record, readable from anywhere (see [`Proxy::log`]).
#[derive(Clone)]
pub struct Log {
    state: Arc<State>,
}

impl Log {
    pub fn records(&self) -> Vec<Record> {
        self.state.log.lock().unwrap().clone()
    }
}

pub struct Proxy {
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Starts a proxy to `upstream` (e.g. `http://127.0.0.1:5000`).
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_string(),
            ..State::default()
        });
        let client: Client<HttpConnector, Body> =
            Client::builder(TokioExecutor::new()).build_http();
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let down = s
                    .outage_until
                    .lock()
                    .unwrap()
                    .is_some_and(|until| Instant::now() < until);
                if down {
                    drop(stream); // the endpoint is "down": connection closed at once
                    continue;
                }
                let (s, client) = (s.clone(), client.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(s.clone(), client.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Proxy {
            url: format!("http://{addr}"),
            state,
            task,
        }
    }

    /// Every request so far.
    pub fn records(&self) -> Vec<Record> {
        self.state.log.lock().unwrap().clone()
    }

    /// A handle on the record that tasks of their own can keep.
    pub fn log(&self) -> Log {
        Log {
            state: self.state.clone(),
        }
    }

    /// Requests for the S3 bucket (not STS).
    pub fn s3_records(&self) -> Vec<Record> {
        self.records()
            .into_iter()
            .filter(|r| r.bucket.is_some())
            .collect()
    }

    pub fn count(&self, op: &str) -> usize {
        self.records().iter().filter(|r| r.op == op).count()
    }

    /// The expiry STS gave each access key id it handed out.
    pub fn expiries(&self) -> HashMap<String, SystemTime> {
        self.state.expiries.lock().unwrap().clone()
    }

    /// The secret access keys and session tokens STS handed out.
    pub fn secrets(&self) -> Vec<String> {
        self.state.secrets.lock().unwrap().clone()
    }

    /// Answers the next `count` requests of `op` with `status` and `code`
    /// instead of forwarding them.
    pub fn fail_next(&self, op: &str, count: usize, status: u16, code: &str) {
        self.state.faults.lock().unwrap().push(Fault {
            op: op.to_string(),
            remaining: count,
            until: None,
            status,
            code: code.to_string(),
        });
    }

    /// Answers every request of `op` with `status` and `code` for `d`.
    pub fn fail_for(&self, op: &str, d: Duration, status: u16, code: &str) {
        self.state.faults.lock().unwrap().push(Fault {
            op: op.to_string(),
            remaining: 0,
            until: Some(Instant::now() + d),
            status,
            code: code.to_string(),
        });
    }

    /// From now on, each S3 request meets a fault with probability `rate`,
    /// drawn from a generator seeded with `seed`: 503 SlowDown, 500, the
    /// connection reset mid-body, or the answer delayed by `delay`.
    pub fn chaos(&self, seed: u64, rate: f64, delay: Duration) {
        *self.state.chaos.lock().unwrap() = Some(Chaos {
            rng: fastrand::Rng::with_seed(seed),
            rate,
            delay,
        });
    }

    /// Every request to the bucket waits `d` before being forwarded (a
    /// distant server), so requests overlap as they would on a real link.
    pub fn latency(&self, d: Option<Duration>) {
        *self.state.latency.lock().unwrap() = d;
    }

    /// The most requests of `op` (`*`: of any kind) that were in the proxy
    /// at once.
    pub fn peak_in_flight(&self, op: &str) -> usize {
        self.state
            .in_flight
            .lock()
            .unwrap()
            .get(op)
            .map_or(0, |e| e.1)
    }

    /// Holds every request of `op` arriving within `window` for `hold`
    /// before forwarding it (the client's deadline is what gets it out).
    pub fn hang_for(&self, op: &str, window: Duration, hold: Duration) {
        *self.state.hang.lock().unwrap() = Some((op.to_string(), Instant::now() + window, hold));
    }

    /// Request bodies, all together, pass at `bytes_per_sec` from now on
    /// (`None`: at full speed again).
    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        *self.state.link.lock().unwrap() = bytes_per_sec.map(|b| Pacer {
            bytes_per_sec: b,
            next: Arc::new(Mutex::new(Instant::now())),
        });
    }

    /// The next `count` answers of `op` (forwarded, so the server did the
    /// work) send their headers and then a byte every half second, never
    /// ending: too slow to finish, fast enough not to look stalled.
    pub fn stall_answer_body(&self, op: &str, count: usize) {
        *self.state.stall_body.lock().unwrap() = Some((op.to_string(), count));
    }

    /// Stops injecting random faults.
    pub fn calm(&self) {
        *self.state.chaos.lock().unwrap() = None;
    }

    /// Closes every new connection for `d`.
    pub fn outage(&self, d: Duration) {
        *self.state.outage_until.lock().unwrap() = Some(Instant::now() + d);
    }

    /// Panics unless every request was an allowed operation.
    pub fn assert_only_writes(&self) {
        let bad: Vec<String> = self
            .records()
            .iter()
            .filter(|r| !ALLOWED_OPS.contains(&r.op.as_str()))
            .map(|r| format!("{} {} {:?} {:?}", r.method, r.op, r.key, r.query))
            .collect();
        assert!(
            bad.is_empty(),
            "requests other than writes crossed the wire: {bad:#?}"
        );
    }

    /// Panics if any S3 request was signed with credentials at or past the
    /// expiry STS gave them. Returns how many requests were checked.
    pub fn assert_no_expired_credentials(&self) -> usize {
        let expiries = self.expiries();
        let mut checked = 0;
        for r in self.s3_records() {
            let Some(akid) = &r.access_key else { continue };
            if let Some(exp) = expiries.get(akid) {
                checked += 1;
                assert!(
                    r.at < *exp,
                    "{} {:?} sent at {:?} with {akid} which expired at {:?}",
                    r.op,
                    r.key,
                    r.at,
                    exp
                );
            }
        }
        checked
    }
}

async fn handle(
    state: Arc<State>,
    client: Client<HttpConnector, Body>,
    req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    let at = SystemTime::now();
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let access_key = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("Credential=").nth(1))
        .and_then(|v| v.split('/').next())
        .map(str::to_string);
    let session_token = parts.headers.contains_key("x-amz-security-token");
    let is_sts = path == "/" && parts.method == Method::POST;
    let mut external_id = None;
    let (body, action): (Body, Option<String>) = if is_sts {
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let action = text
            .split('&')
            .find_map(|kv| kv.strip_prefix("Action="))
            .map(str::to_string);
        external_id = text
            .split('&')
            .find_map(|kv| kv.strip_prefix("ExternalId="))
            .map(|v| percent_decode(&v.replace('+', " ")));
        (full(bytes), action)
    } else {
        let pacer = state.link.lock().unwrap().clone();
        match pacer {
            None => (body.boxed(), None),
            Some(pacer) => {
                let paced =
                    futures::stream::unfold((body, pacer), |(mut body, pacer)| async move {
                        let frame = body.frame().await?;
                        if let Ok(f) = &frame
                            && let Some(data) = f.data_ref()
                        {
                            pacer.take(data.len()).await;
                        }
                        Some((frame, (body, pacer)))
                    });
                (http_body_util::StreamBody::new(paced).boxed(), None)
            }
        }
    };
    let (bucket, key) = split_path(&path);
    let op = match &action {
        Some(a) => a.clone(),
        None => classify(&parts.method, key.is_some(), &query, &parts.headers),
    };
    let header_u64 = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let size = match op.as_str() {
        "PutObject" => header_u64("content-length"),
        "CompleteMultipartUpload" => header_u64("x-amz-mp-object-size"),
        _ => None,
    };
    let upload_id = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("uploadId="))
        .map(percent_decode);
    let acl = parts
        .headers
        .get("x-amz-acl")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let if_none_match = parts
        .headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut record = Record {
        answered: None,
        if_none_match,
        external_id,
        acl,
        size,
        upload_id,
        chaos: None,
        corrected: false,
        at,
        method: parts.method.to_string(),
        op: op.clone(),
        bucket,
        key,
        query: query.clone(),
        access_key,
        session_token,
        status: 0,
        injected: false,
    };

    let injected = {
        let now = Instant::now();
        let mut faults = state.faults.lock().unwrap();
        faults
            .iter_mut()
            .find(|f| f.op == op && (f.remaining > 0 || f.until.is_some_and(|u| now < u)))
            .map(|f| {
                f.remaining = f.remaining.saturating_sub(1);
                (f.status, f.code.clone())
            })
    };
    let _in_flight = InFlight::enter(&state, &op);
    let latency = *state.latency.lock().unwrap();
    if let Some(d) = latency.filter(|_| record.bucket.is_some()) {
        tokio::time::sleep(d).await;
    }
    let hold = state
        .hang
        .lock()
        .unwrap()
        .as_ref()
        .filter(|(o, until, _)| *o == op && Instant::now() < *until)
        .map(|(_, _, hold)| *hold);
    if let Some(hold) = hold {
        record.injected = true;
        record.status = 0;
        push(&state, record.clone());
        tokio::time::sleep(hold).await;
        return Err("held past the client's deadline by the test proxy".into());
    }
    let chaos = if record.bucket.is_some() {
        state.chaos.lock().unwrap().as_mut().and_then(|c| {
            (c.rng.f64() < c.rate).then(|| {
                let kind = ["slowdown", "error", "reset", "delay"][c.rng.usize(0..4)];
                (kind, c.delay)
            })
        })
    } else {
        None
    };
    let (injected, delay) = match chaos {
        None => (injected, None),
        Some(("slowdown", _)) => (Some((503, "SlowDown".to_string())), None),
        Some(("error", _)) => (Some((500, "InternalError".to_string())), None),
        Some(("reset", _)) => {
            // Take a little of the body, then drop the connection.
            let mut body = body;
            let _ = body.frame().await;
            record.chaos = Some("reset");
            record.injected = true;
            push(&state, record);
            return Err("connection reset by the test proxy".into());
        }
        Some((_, d)) => (injected, Some(d)),
    };
    if let Some((kind, _)) = chaos {
        record.chaos = Some(kind);
    }
    if let Some((status, code)) = injected {
        // Take the whole body first, as S3 does: an answer sent while the
        // client is still writing races with its write, and the client may
        // see a broken pipe instead of the injected error.
        let _ = body.collect().await;
        record.status = status;
        record.injected = true;
        push(&state, record);
        return Ok(error_response(status, &code, "injected by the test proxy"));
    }

    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = format!("{}{pq}", state.upstream).parse().unwrap();
    let resp = match client.request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            record.status = 502;
            push(&state, record);
            return Ok(Response::builder()
                .status(502)
                .body(full(Bytes::from(format!("proxy: {e}"))))
                .unwrap());
        }
    };
    record.status = resp.status().as_u16();
    if let Some(id) = &record.upload_id {
        let mut finished = state.finished_uploads.lock().unwrap();
        let ends = matches!(
            op.as_str(),
            "CompleteMultipartUpload" | "AbortMultipartUpload"
        );
        if ends && resp.status().is_success() {
            finished.insert(id.clone());
        } else if record.status == 500
            && matches!(op.as_str(), "UploadPart" | "CompleteMultipartUpload")
            && finished.contains(id)
        {
            record.status = 404;
            record.corrected = true;
            push(&state, record);
            return Ok(error_response(
                404,
                "NoSuchUpload",
                "The specified upload does not exist (moto's 500 for a finished upload, corrected by the test proxy)",
            ));
        }
    }
    let (rparts, rbody) = resp.into_parts();
    let rbody: Body = if action.as_deref() == Some("AssumeRole") {
        let bytes = rbody
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        if let (Some(akid), Some(exp)) = (tag(&text, "AccessKeyId"), tag(&text, "Expiration")) {
            let parsed = humantime::parse_rfc3339_weak(exp)
                .or_else(|_| humantime::parse_rfc3339_weak(exp.trim_end_matches('Z')));
            if let Ok(t) = parsed {
                state.expiries.lock().unwrap().insert(akid.to_string(), t);
            }
            let mut secrets = state.secrets.lock().unwrap();
            secrets.extend(
                ["SecretAccessKey", "SessionToken"]
                    .iter()
                    .filter_map(|name| tag(&text, name))
                    .map(str::to_string),
            );
        }
        full(bytes)
    } else {
        rbody.boxed()
    };
    let stall = {
        let mut stall = state.stall_body.lock().unwrap();
        match stall.as_mut() {
            Some((o, n)) if *o == op && *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    };
    if stall {
        record.injected = true;
        push(&state, record);
        // The headers go out; the body trickles and never ends.
        let mut rparts = rparts;
        rparts.headers.remove(hyper::header::CONTENT_LENGTH);
        let trickle = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Some((
                Ok::<_, hyper::Error>(hyper::body::Frame::data(Bytes::from_static(b" "))),
                (),
            ))
        });
        return Ok(Response::from_parts(
            rparts,
            http_body_util::StreamBody::new(trickle).boxed(),
        ));
    }
    push(&state, record);
    if let Some(d) = delay {
        // The server has answered; the client hears it too late, if at all.
        let bytes = rbody
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        tokio::time::sleep(d).await;
        return Ok(Response::from_parts(rparts, full(bytes)));
    }
    Ok(Response::from_parts(rparts, rbody))
}

/// Logs a request, stamped with the time its answer is known.
fn push(state: &State, mut record: Record) {
    record.answered = Some(SystemTime::now());
    state.log.lock().unwrap().push(record);
}

/// An S3 error answer.
fn error_response(status: u16, code: &str, message: &str) -> Response<Body> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(full(Bytes::from(xml)))
        .unwrap()
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(&xml[start..end])
}

fn split_path(path: &str) -> (Option<String>, Option<String>) {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() {
        return (None, None);
    }
    match trimmed.split_once('/') {
        Some((b, k)) if !k.is_empty() => (Some(b.to_string()), Some(percent_decode(k))),
        Some((b, _)) => (Some(b.to_string()), None),
        None => (Some(trimmed.to_string()), None),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        if let (b'%', Some(Ok(v))) = (bytes[i], hex.map(|h| u8::from_str_radix(h, 16))) {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn classify(method: &Method, has_key: bool, query: &str, headers: &hyper::HeaderMap) -> String {
    let q: Vec<&str> = query
        .split('&')
        .map(|kv| kv.split('=').next().unwrap_or(""))
        .collect();
    let has = |k: &str| q.contains(&k);
    let copy = headers.contains_key("x-amz-copy-source");
    let op = match (method.as_str(), has_key) {
        ("PUT", false) => "PutBucket*",
        ("PUT", true) if has("partNumber") && copy => "UploadPartCopy",
        ("PUT", true) if has("partNumber") => "UploadPart",
        ("PUT", true) if has("acl") => "PutObjectAcl",
        ("PUT", true) if copy => "CopyObject",
        ("PUT", true) => "PutObject",
        ("POST", true) if has("uploads") => "CreateMultipartUpload",
        ("POST", true) if has("uploadId") => "CompleteMultipartUpload",
        ("POST", _) => "PostOther",
        ("DELETE", true) if has("uploadId") => "AbortMultipartUpload",
        ("DELETE", true) => "DeleteObject",
        ("DELETE", false) => "DeleteBucket*",
        ("GET", true) if has("uploadId") => "ListParts",
        ("GET", true) => "GetObject",
        ("GET", false) => "ListOrGetBucket*",
        ("HEAD", true) => "HeadObject",
        ("HEAD", false) => "HeadBucket",
        _ => "Other",
    };
    op.to_string()
}
