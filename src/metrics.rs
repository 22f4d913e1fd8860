//! Observability of the agent: the metrics it records (through the
//! `metrics` facade, rendered in Prometheus text format by
//! `metrics-exporter-prometheus`) and the optional listener that serves
//! `/metrics` and `/healthz`.
//!
//! This module owns the metric names and the health rule. It never blocks
//! the upload path (recording is a few atomic operations; without a
//! `[metrics]` section nothing is installed and the macros do nothing),
//! never exposes credentials, and serves nothing but those two paths.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::journal::now;

pub const FILES_UPLOADED: &str = "putonly_files_uploaded_total";
pub const BYTES_UPLOADED: &str = "putonly_bytes_uploaded_total";
pub const FAILURES: &str = "putonly_upload_failures_total";
pub const UPLOAD_SECONDS: &str = "putonly_upload_duration_seconds";
pub const QUEUE_DEPTH: &str = "putonly_queue_depth";
pub const IN_FLIGHT: &str = "putonly_uploads_in_flight";
pub const OLDEST_PENDING: &str = "putonly_oldest_pending_age_seconds";
pub const CREDENTIALS_EXPIRY: &str = "putonly_credentials_expiry_seconds";
pub const LAST_SUCCESS: &str = "putonly_last_success_timestamp_seconds";
pub const FAILED_FILES: &str = "putonly_failed_files";

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
}

/// Binds the listener; serving runs until the task is dropped.
pub async fn serve(
    listen: SocketAddr,
    handle: PrometheusHandle,
    health: Arc<Health>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "serving /metrics and /healthz");
    Ok(tokio::spawn(async move {
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep.tick() => handle.run_upkeep(),
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (handle, health) = (handle.clone(), health.clone());
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let out = answer(&req, &handle, &health);
                            async move { Ok::<_, std::convert::Infallible>(out) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }
        }
    }))
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
}
