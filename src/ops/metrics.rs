//! Observability of the agent: the metrics it records (through the
//! `metrics` facade, rendered in Prometheus text format by
//! `metrics-exporter-prometheus`) and the optional listener that serves
//! `/metrics` and `/healthz`.
//!
//! This module owns the metric names, the health rule, and what the
//! listener may cost. It never blocks the upload path (recording is a few
//! atomic operations; without a `[metrics]` section nothing is installed and
//! the macros do nothing), never exposes credentials, serves nothing but
//! those two paths, and never lets its clients take what uploads need: it
//! holds at most [`MAX_CONNECTIONS`] connections (fewer under a low
//! descriptor limit), closing the oldest to make room for a new one; a
//! request's head must arrive within [`HEADER_TIMEOUT`] (also the longest
//! a keep-alive connection may sit idle) and fit in [`MAX_HEAD`]; no
//! connection lives longer than [`CONNECTION_LIFETIME`]; and when accepting
//! fails (out of descriptors) it pauses, up to a second, instead of
//! spinning, and says so at most once a minute.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;

use crate::ground::now;

pub const FILES_UPLOADED: &str = "putonly_files_uploaded_total";
pub const FILES_EXISTS: &str = "putonly_files_exists_total";
pub const BYTES_UPLOADED: &str = "putonly_bytes_uploaded_total";
pub const FAILURES: &str = "putonly_upload_failures_total";
pub const UPLOAD_SECONDS: &str = "putonly_upload_duration_seconds";
pub const QUEUE_DEPTH: &str = "putonly_queue_depth";
pub const IN_FLIGHT: &str = "putonly_uploads_in_flight";
pub const OLDEST_PENDING: &str = "putonly_oldest_pending_age_seconds";
pub const CREDENTIALS_EXPIRY: &str = "putonly_credentials_expiry_seconds";
pub const LAST_SUCCESS: &str = "putonly_last_success_timestamp_seconds";
pub const FAILED_FILES: &str = "putonly_failed_files";
pub const STREAM_PARTS: &str = "putonly_stream_parts_total";
pub const STREAMS_ABANDONED: &str = "putonly_streams_abandoned_total";
pub const STREAMS: &str = "putonly_streams";

/// Upload durations worth telling apart: small files to big multipart ones.
const DURATION_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0,
];

/// What /healthz decides from, updated by the agent.
#[derive(Debug)]
pub struct Health {
    started: i64,
    last_success: AtomicI64,
    pending: AtomicU64,
    /// Unix seconds; 0 when no role credentials expire.
    credentials_expire: AtomicI64,
    unhealthy_after: Duration,
    /// The last journal write that failed, until one succeeds again.
    journal_error: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn new(unhealthy_after: Duration) -> Self {
        Health {
            started: now(),
            last_success: AtomicI64::new(0),
            pending: AtomicU64::new(0),
            credentials_expire: AtomicI64::new(0),
            unhealthy_after,
            journal_error: std::sync::Mutex::new(None),
        }
    }

    /// The outcome of a journal write: a failure makes the agent unhealthy
    /// until a write succeeds again.
    pub fn journal_write(&self, result: Result<(), String>) {
        let mut e = self.journal_error.lock().unwrap_or_else(|p| p.into_inner());
        *e = result.err();
    }

    /// A file was uploaded.
    pub fn success(&self) {
        let t = now();
        self.last_success.store(t, Ordering::Relaxed);
        metrics::gauge!(LAST_SUCCESS).set(t as f64);
    }

    /// Files waiting in the journal, and when credentials expire.
    pub fn observe(&self, pending: u64, credentials_expire: Option<i64>) {
        self.pending.store(pending, Ordering::Relaxed);
        self.credentials_expire
            .store(credentials_expire.unwrap_or(0), Ordering::Relaxed);
    }

    /// Why the agent is unhealthy, if it is: expired credentials, or work
    /// waiting while nothing succeeded for `unhealthy_after`.
    pub fn problems(&self, at: i64) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = self
            .journal_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            out.push(format!("the journal cannot be written: {e}"));
        }
        let expire = self.credentials_expire.load(Ordering::Relaxed);
        if expire != 0 && expire <= at {
            out.push(format!(
                "the role credentials expired {} s ago and could not be renewed",
                at - expire
            ));
        }
        let pending = self.pending.load(Ordering::Relaxed);
        let since = self.last_success.load(Ordering::Relaxed).max(self.started);
        let quiet = at - since;
        let limit = i64::try_from(self.unhealthy_after.as_secs()).unwrap_or(i64::MAX);
        if pending > 0 && quiet >= limit {
            out.push(format!(
                "{pending} file(s) waiting and no upload succeeded for {quiet} s"
            ));
        }
        out
    }
}

/// Installs the Prometheus recorder (once per process).
pub fn install() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(UPLOAD_SECONDS.into()), &DURATION_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())
        .inspect(|_| describe())
}

fn describe() {
    metrics::describe_counter!(FILES_UPLOADED, "Files uploaded and recorded done.");
    metrics::describe_counter!(
        FILES_EXISTS,
        "Files not sent because their key already held an object (bucket.overwrite = false)."
    );
    metrics::describe_counter!(
        BYTES_UPLOADED,
        metrics::Unit::Bytes,
        "Bytes of files uploaded."
    );
    metrics::describe_counter!(FAILURES, "Failed upload attempts, by reason.");
    metrics::describe_histogram!(
        UPLOAD_SECONDS,
        metrics::Unit::Seconds,
        "Time to upload one file."
    );
    metrics::describe_gauge!(
        QUEUE_DEPTH,
        "Files waiting to be uploaded (journal: pending)."
    );
    metrics::describe_gauge!(IN_FLIGHT, "Files being uploaded right now.");
    metrics::describe_gauge!(
        OLDEST_PENDING,
        metrics::Unit::Seconds,
        "Age of the oldest file waiting."
    );
    metrics::describe_gauge!(
        CREDENTIALS_EXPIRY,
        metrics::Unit::Seconds,
        "Seconds until the role credentials expire (negative: expired)."
    );
    metrics::describe_gauge!(LAST_SUCCESS, "Unix time of the last successful upload.");
    metrics::describe_gauge!(FAILED_FILES, "Files marked failed (see putonly status).");
    metrics::describe_counter!(
        STREAM_PARTS,
        "Parts sent while their file was still being written ([[watch]] stream = true)."
    );
    metrics::describe_gauge!(
        STREAMS,
        "Files being written that are followed, their parts sent as they come."
    );
    metrics::describe_counter!(
        STREAMS_ABANDONED,
        "Uploads of files being written that were abandoned (the file sent afresh once finished), by reason."
    );
}

/// Connections served at once, at most; a quarter of the descriptor limit
/// when that is lower (never under `MIN_CONNECTIONS`).
pub const MAX_CONNECTIONS: usize = 64;
const MIN_CONNECTIONS: usize = 4;
/// A request's head must arrive within this; it is also how long a
/// keep-alive connection may wait for its next request.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection is kept longer (a response in progress gets
/// `LIFETIME_GRACE` more).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
const LIFETIME_GRACE: Duration = Duration::from_secs(1);
/// The largest request head, and the most a connection buffers.
pub const MAX_HEAD: usize = 16 * 1024;
/// A connection is never closed to make room before it is this old, so a
/// request is answered even during a burst; new connections wait for it in
/// the backlog. This also bounds how fast a flood of connections can churn.
const MIN_AGE_TO_CLOSE: Duration = Duration::from_millis(500);
/// The pause after a failed accept: doubled at each failure in a row.
const ACCEPT_PAUSE_FIRST: Duration = Duration::from_millis(100);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// The warning that the listener is full is repeated at most this often.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(600);
/// The warning that accepting fails, likewise (descriptors freed now and
/// then would otherwise end and start a run of failures again and again).
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(60);
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What the listener allows its clients (the constants above, except in
/// tests).
#[derive(Debug, Clone, Copy)]
struct Limits {
    connections: usize,
    header_timeout: Duration,
    lifetime: Duration,
    min_age_to_close: Duration,
}

impl Limits {
    fn under_nofile(nofile: Option<u64>) -> Self {
        Limits {
            connections: connection_limit(nofile),
            header_timeout: HEADER_TIMEOUT,
            lifetime: CONNECTION_LIFETIME,
            min_age_to_close: MIN_AGE_TO_CLOSE,
        }
    }
}

/// How many connections to serve under a descriptor limit (`None`: none).
fn connection_limit(nofile: Option<u64>) -> usize {
    match nofile {
        Some(n) => usize::try_from(n / 4)
            .unwrap_or(MAX_CONNECTIONS)
            .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS),
        None => MAX_CONNECTIONS,
    }
}

/// The pause before the next accept after `failures` failures in a row.
fn accept_pause(failures: u32) -> Duration {
    ACCEPT_PAUSE_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(ACCEPT_PAUSE_MAX)
}

/// Errors of one incoming connection (gone before it was accepted), not of
/// the listener: the next accept may succeed at once.
fn only_that_connection(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
    )
}

/// Binds the listener; serving runs until the task is dropped (which
/// closes every connection).
pub async fn serve(
    listen: SocketAddr,
    handle: PrometheusHandle,
    health: Arc<Health>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(listen).await?;
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let limits = Limits::under_nofile(nofile);
    tracing::info!(%listen, max_connections = limits.connections, "serving /metrics and /healthz");
    let server = Server::new(limits, handle, health);
    Ok(tokio::spawn(server.run(listener)))
}

/// A connection being served, as the listener knows it.
struct Open {
    since: Instant,
    /// Dropping it tells the connection's task to close it at once.
    _close: oneshot::Sender<()>,
}

/// The open connections, oldest first (ids only grow).
type Registry = Arc<Mutex<BTreeMap<u64, Open>>>;

fn lock(open: &Registry) -> std::sync::MutexGuard<'_, BTreeMap<u64, Open>> {
    open.lock().unwrap_or_else(|p| p.into_inner())
}

/// Held by a connection's task: frees its slot and its entry when the task
/// ends, however it ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    id: u64,
    open: Registry,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.open).remove(&self.id);
    }
}

struct Server {
    limits: Limits,
    slots: Arc<Semaphore>,
    open: Registry,
    next_id: u64,
    http: hyper::server::conn::http1::Builder,
    handle: PrometheusHandle,
    health: Arc<Health>,
    warned_full: Option<Instant>,
    warned_accept: Option<Instant>,
}

impl Server {
    fn new(limits: Limits, handle: PrometheusHandle, health: Arc<Health>) -> Self {
        let mut http = hyper::server::conn::http1::Builder::new();
        // Without a timer hyper ignores header_read_timeout.
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_HEAD);
        Server {
            limits,
            slots: Arc::new(Semaphore::new(limits.connections)),
            open: Arc::default(),
            next_id: 0,
            http,
            handle,
            health,
            warned_full: None,
            warned_accept: None,
        }
    }

    async fn run(mut self, listener: TcpListener) {
        // Every task of the listener: dropped (closed) with it.
        let mut tasks = JoinSet::new();
        let handle = self.handle.clone();
        tasks.spawn(async move {
            let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
            loop {
                upkeep.tick().await;
                handle.run_upkeep();
            }
        });
        let mut failures: u32 = 0;
        let mut warned = false;
        loop {
            while tasks.try_join_next().is_some() {}
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) if only_that_connection(&e) => continue,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        warned = self
                            .warned_accept
                            .is_none_or(|t| t.elapsed() >= ACCEPT_WARNING_EVERY);
                        if warned {
                            self.warned_accept = Some(Instant::now());
                            tracing::warn!(
                                error = %e,
                                "the metrics listener cannot accept connections; pausing up to 1 s between attempts (out of descriptors: raise the limit, systemd LimitNOFILE=)"
                            );
                        } else {
                            tracing::debug!(error = %e, "the metrics listener cannot accept connections");
                        }
                    }
                    tokio::time::sleep(accept_pause(failures)).await;
                    continue;
                }
            };
            if failures > 0 {
                if warned {
                    tracing::info!(
                        failed_accepts = failures,
                        "the metrics listener accepts connections again"
                    );
                }
                failures = 0;
            }
            let Some(permit) = self.admit().await else {
                return;
            };
            self.start(stream, permit, &mut tasks);
        }
    }

    /// A slot for a new connection: a free one, or the oldest connection's
    /// once it is [`MIN_AGE_TO_CLOSE`] old. `None` only if the semaphore
    /// was closed (never).
    async fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(permit);
        }
        let oldest = lock(&self.open)
            .first_key_value()
            .map(|(id, o)| (*id, o.since));
        if let Some((id, since)) = oldest {
            if let Some(wait) = self.limits.min_age_to_close.checked_sub(since.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            // Gone meanwhile or not, its slot is about to be free.
            lock(&self.open).remove(&id);
            if self
                .warned_full
                .is_none_or(|t| t.elapsed() >= FULL_WARNING_EVERY)
            {
                self.warned_full = Some(Instant::now());
                tracing::warn!(
                    max_connections = self.limits.connections,
                    "the metrics listener is full; closing its oldest connections to make room (a client opens many, or holds them open)"
                );
            }
        }
        self.slots.clone().acquire_owned().await.ok()
    }

    /// Serves one connection in its own task, within its timeouts.
    fn start(&mut self, stream: TcpStream, permit: OwnedSemaphorePermit, tasks: &mut JoinSet<()>) {
        let id = self.next_id;
        self.next_id += 1;
        let (close, closed) = oneshot::channel();
        lock(&self.open).insert(
            id,
            Open {
                since: Instant::now(),
                _close: close,
            },
        );
        let slot = Slot {
            _permit: permit,
            id,
            open: self.open.clone(),
        };
        let (handle, health) = (self.handle.clone(), self.health.clone());
        let svc = hyper::service::service_fn(move |req| {
            let out = answer(&req, &handle, &health);
            async move { Ok::<_, std::convert::Infallible>(out) }
        });
        let conn = self.http.serve_connection(TokioIo::new(stream), svc);
        let lifetime = self.limits.lifetime;
        tasks.spawn(async move {
            let _slot = slot;
            let mut conn = std::pin::pin!(conn);
            let expired = tokio::select! {
                _ = conn.as_mut() => false,
                // Made room for a newer connection: closed at once.
                _ = closed => false,
                () = tokio::time::sleep(lifetime) => true,
            };
            if expired {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(LIFETIME_GRACE, conn).await;
            }
        });
    }
}

fn answer<B>(
    req: &Request<B>,
    handle: &PrometheusHandle,
    health: &Health,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", handle.render()),
        "/healthz" => {
            let problems = health.problems(now());
            let body = serde_json::json!({
                "status": if problems.is_empty() { "ok" } else { "unhealthy" },
                "problems": problems,
            })
            .to_string();
            let status = if problems.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "application/json", body + "\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "putonly serves /metrics and /healthz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_turns_on_expired_credentials_and_stalled_work() {
        let h = Health::new(Duration::from_secs(60));
        let t = h.started;
        assert!(h.problems(t + 3600).is_empty(), "no work waiting: healthy");
        h.observe(5, Some(t + 100));
        assert!(h.problems(t + 30).is_empty());
        assert_eq!(h.problems(t + 61).len(), 1, "waiting, nothing succeeded");
        h.success();
        assert!(
            h.problems(h.last_success.load(Ordering::Relaxed) + 10)
                .is_empty()
        );
        assert_eq!(h.problems(t + 100).len(), 2, "expired and stalled");
        h.journal_write(Err("disk full".into()));
        assert!(
            h.problems(t + 100)
                .iter()
                .any(|p| p.contains("journal cannot be written: disk full"))
        );
        h.journal_write(Ok(()));
        assert_eq!(h.problems(t + 100).len(), 2);
    }

    #[test]
    fn the_connection_limit_follows_the_descriptor_limit() {
        assert_eq!(connection_limit(None), MAX_CONNECTIONS);
        assert_eq!(connection_limit(Some(1_048_576)), MAX_CONNECTIONS);
        assert_eq!(connection_limit(Some(1024)), MAX_CONNECTIONS);
        assert_eq!(connection_limit(Some(128)), 32);
        assert_eq!(connection_limit(Some(8)), MIN_CONNECTIONS);
    }

    #[test]
    fn accept_pauses_grow_to_a_second() {
        let pauses: Vec<u128> = (1..=6).map(|n| accept_pause(n).as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(accept_pause(u32::MAX), ACCEPT_PAUSE_MAX);
    }

    fn limits(connections: usize, header_ms: u64, lifetime_ms: u64) -> Limits {
        Limits {
            connections,
            header_timeout: Duration::from_millis(header_ms),
            lifetime: Duration::from_millis(lifetime_ms),
            min_age_to_close: Duration::from_millis(50),
        }
    }

    async fn running(limits: Limits) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let health = Arc::new(Health::new(Duration::from_secs(600)));
        let server = Server::new(limits, handle, health);
        (addr, tokio::spawn(server.run(listener)))
    }

    /// Sends `request`, then reads until the server closes: what it
    /// answered and when it closed, or `None` if it is still open at `limit`.
    async fn exchange(
        stream: &mut TcpStream,
        request: &[u8],
        limit: Duration,
    ) -> Option<(String, Duration)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let started = Instant::now();
        // A server that closes early may refuse the rest of a long request.
        let _ = stream.write_all(request).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(limit, read).await.ok()?;
        Some((
            String::from_utf8_lossy(&got).into_owned(),
            started.elapsed(),
        ))
    }

    #[tokio::test]
    async fn idle_slow_and_oversized_requests_are_closed_and_others_answered() {
        let (addr, _server) = running(limits(8, 300, 10_000)).await;
        let wait = Duration::from_secs(5);
        // Nothing sent: closed after the header timeout.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let (text, t) = exchange(&mut idle, b"", wait).await.expect("idle closed");
        assert!(t >= Duration::from_millis(250), "{t:?} {text}");
        // Half a request line: the same.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let (_, t) = exchange(&mut slow, b"GET /hea", wait)
            .await
            .expect("slow closed");
        assert!(t >= Duration::from_millis(250), "{t:?}");
        // A keep-alive connection is answered, then closed once idle.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        let (text, t) = exchange(&mut kept, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", wait)
            .await
            .expect("keep-alive closed");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(t >= Duration::from_millis(250), "{t:?}");
        // A head larger than MAX_HEAD: refused, not buffered.
        let mut big = TcpStream::connect(addr).await.unwrap();
        let mut request = b"GET /healthz HTTP/1.1\r\nX-Big: ".to_vec();
        request.resize(request.len() + 2 * MAX_HEAD, b'a');
        let (text, _) = exchange(&mut big, &request, wait)
            .await
            .expect("big closed");
        assert!(!text.contains(" 200 "), "{text}");
    }

    #[tokio::test]
    async fn at_the_limit_the_oldest_connection_makes_room() {
        let (addr, _server) = running(limits(2, 10_000, 60_000)).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        let wait = Duration::from_secs(5);
        let (text, _) = exchange(&mut third, b"GET /healthz HTTP/1.0\r\n\r\n", wait)
            .await
            .expect("answered");
        assert!(text.starts_with("HTTP/1.0 200"), "{text}");
        assert!(
            exchange(&mut first, b"", wait).await.is_some(),
            "oldest closed"
        );
        // The second one keeps its slot (one was free again after the third).
        let short = Duration::from_millis(300);
        assert!(
            exchange(&mut second, b"", short).await.is_none(),
            "second kept"
        );
    }

    #[tokio::test]
    async fn a_connection_lives_no_longer_than_its_lifetime_and_dies_with_the_server() {
        use tokio::io::AsyncWriteExt;
        let (addr, server) = running(limits(8, 1_000, 600)).await;
        // Requests every 100 ms (never idle for the header timeout).
        let mut busy = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let mut closed_after = None;
        for _ in 0..50 {
            let sent = busy
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let probe = exchange(&mut busy, b"", Duration::from_millis(100)).await;
            if sent.is_err() || probe.is_some() {
                closed_after = Some(started.elapsed());
                break;
            }
        }
        let t = closed_after.expect("closed at the end of its lifetime");
        assert!(
            t >= Duration::from_millis(500) && t < Duration::from_secs(3),
            "{t:?}"
        );
        // Stopping the server closes the connections it holds.
        let mut held = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.abort();
        assert!(
            exchange(&mut held, b"", Duration::from_secs(2))
                .await
                .is_some()
        );
    }
}
