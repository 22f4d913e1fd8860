//! The metrics listener under siege: hundreds of idle connections and of
//! slow-header connections (a request dribbled one byte at a time, never
//! finished) to `[metrics] listen`, with the usual descriptor limit and with
//! `RLIMIT_NOFILE` 128. Through it the agent must keep uploading, `/healthz`
//! must answer a fresh connection within seconds, memory and CPU must stay
//! bounded, idle connections must be closed by the server, and a file met
//! while the agent is out of descriptors must wait, never be marked failed.
//!
//! Each test measures everything first, prints one summary line (the
//! numbers CHANGELOG.md quotes), then asserts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::agent::{Agent, Setup, setup_custom, status};
use crate::support::putonly;

const WATCH: &str =
    "[[watch]]\npath = \"{outbox}\"\nprefix = \"fighters/in\"\nsettle = \"300ms\"\n";

/// Resident memory of a process, in KiB (VmRSS).
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the
    // 3rd field, utime the 14th, stime the 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// CPU seconds the agent uses over `window` (while the caller's siege runs).
async fn cpu_over(pid: i32, window: Duration) -> f64 {
    let before = cpu_seconds(pid);
    tokio::time::sleep(window).await;
    cpu_seconds(pid) - before
}

/// The agent's open descriptors.
fn fds(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sets the soft and hard RLIMIT_NOFILE of a running process.
fn set_nofile(pid: i32, soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit on our own child with a valid struct.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// GET /healthz on a fresh connection: the status and how long the answer
/// took, or why there was none within `limit`.
async fn healthz(addr: &str, limit: Duration) -> Result<(u16, Duration), String> {
    let started = Instant::now();
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(format!("GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw);
        text.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {text:?}"))
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(Ok(code)) => Ok((code, started.elapsed())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// Idle and slow-header connections held open against the listener; each
/// notes when the server closed it.
struct Siege {
    tasks: JoinSet<()>,
    idle_closed: Arc<AtomicUsize>,
    slow_closed: Arc<AtomicUsize>,
    heavy_closed: Arc<AtomicUsize>,
    opened: usize,
    refused: usize,
    refused_in_a_row: usize,
}

impl Siege {
    fn new() -> Siege {
        Siege {
            tasks: JoinSet::new(),
            idle_closed: Arc::new(AtomicUsize::new(0)),
            slow_closed: Arc::new(AtomicUsize::new(0)),
            heavy_closed: Arc::new(AtomicUsize::new(0)),
            opened: 0,
            refused: 0,
            refused_in_a_row: 0,
        }
    }

    /// A new connection; after three in a row that the server's backlog
    /// did not take within a second, no more are tried.
    async fn connect(&mut self, addr: &str) -> Option<TcpStream> {
        if self.refused_in_a_row >= 3 {
            self.refused += 1;
            return None;
        }
        match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                self.opened += 1;
                self.refused_in_a_row = 0;
                Some(s)
            }
            _ => {
                self.refused += 1;
                self.refused_in_a_row += 1;
                None
            }
        }
    }

    /// `n` connections that send nothing; how many the server's backlog
    /// took.
    async fn idle(&mut self, addr: &str, n: usize) -> usize {
        let before = self.opened;
        for _ in 0..n {
            let Some(mut stream) = self.connect(addr).await else {
                continue;
            };
            let closed = self.idle_closed.clone();
            self.tasks.spawn(async move {
                let mut buf = [0u8; 64];
                // EOF or a reset: the server closed it.
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                closed.fetch_add(1, Ordering::Relaxed);
            });
        }
        self.opened - before
    }

    /// `n` connections that send a request line and then an endless header,
    /// one byte every 500 ms.
    async fn slow(&mut self, addr: &str, n: usize) -> usize {
        let closed = self.slow_closed.clone();
        self.dribble(addr, n, Vec::new(), closed).await
    }

    /// `n` connections that send an unfinished header of `kib` KiB at once,
    /// then one byte every 500 ms: what the server buffers for them.
    async fn heavy(&mut self, addr: &str, n: usize, kib: usize) -> usize {
        let closed = self.heavy_closed.clone();
        let mut bulk = b"GET /metrics HTTP/1.1\r\nHost: siege\r\nX-Heavy: ".to_vec();
        bulk.resize(bulk.len() + kib * 1024, b'h');
        self.dribble(addr, n, bulk, closed).await
    }

    async fn dribble(
        &mut self,
        addr: &str,
        n: usize,
        bulk: Vec<u8>,
        closed: Arc<AtomicUsize>,
    ) -> usize {
        let before = self.opened;
        let bulk = Arc::new(bulk);
        for _ in 0..n {
            let Some(stream) = self.connect(addr).await else {
                continue;
            };
            let (closed, bulk) = (closed.clone(), bulk.clone());
            self.tasks.spawn(async move {
                let (mut rd, mut wr) = stream.into_split();
                let head = b"GET /metrics HTTP/1.1\r\nHost: siege\r\nX-Slow: ";
                let mut buf = [0u8; 64];
                let mut gone = false;
                if !bulk.is_empty() {
                    let send = wr.write_all(&bulk);
                    gone = !matches!(
                        tokio::time::timeout(Duration::from_secs(10), send).await,
                        Ok(Ok(()))
                    );
                }
                for i in 0usize.. {
                    if gone {
                        break;
                    }
                    let byte = match bulk.is_empty() {
                        true => head.get(i).copied().unwrap_or(b'a'),
                        false => b'h',
                    };
                    tokio::select! {
                        r = rd.read(&mut buf) => gone = matches!(r, Ok(0) | Err(_)),
                        () = tokio::time::sleep(Duration::from_millis(500)) => {
                            gone = wr.write_all(&[byte]).await.is_err();
                        }
                    }
                }
                closed.fetch_add(1, Ordering::Relaxed);
            });
        }
        self.opened - before
    }

    fn idle_closed(&self) -> usize {
        self.idle_closed.load(Ordering::Relaxed)
    }

    fn slow_closed(&self) -> usize {
        self.slow_closed.load(Ordering::Relaxed)
    }

    fn heavy_closed(&self) -> usize {
        self.heavy_closed.load(Ordering::Relaxed)
    }
}

/// Waits until the listener accepts connections.
async fn listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "no metrics listener");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The journal's word on a file: "done", "failed", or what it is still.
async fn outcome(s: &Setup, done_before: u64, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let st = status(s).await;
        if st["failed"].as_u64().unwrap_or(0) > 0 {
            return format!("failed: {st}");
        }
        if st["done"].as_u64().unwrap_or(0) > done_before && st["pending"].as_u64() == Some(0) {
            return "done".into();
        }
        if Instant::now() > deadline {
            return format!("not done after {limit:?}: {st}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Healthz several times over `window`; the worst answer.
async fn worst_healthz(addr: &str, window: Duration) -> Result<(u16, Duration), String> {
    let deadline = Instant::now() + window;
    let mut worst = Ok((200, Duration::ZERO));
    while Instant::now() < deadline {
        match healthz(addr, Duration::from_secs(5)).await {
            Ok((code, took)) => {
                if let Ok((_, w)) = &worst
                    && (code != 200 || took > *w)
                {
                    worst = Ok((code, took));
                }
            }
            Err(e) => worst = Err(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    worst
}

async fn agent_with_metrics(nofile: Option<u64>) -> (Setup, Agent, String) {
    let addr = format!("127.0.0.1:{}", crate::support::free_port());
    let s = setup_custom(
        "",
        WATCH,
        "[\"foo/\", \"fighters/\"]",
        "",
        &format!("concurrency = 2\n[metrics]\nlisten = \"{addr}\"\n"),
    )
    .await;
    let mut cmd = putonly(Some(s.moto.dir.path()));
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let agent = Agent::spawn(cmd, &s.config, &s.log);
    listening(&addr).await;
    (s, agent, addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_listener_under_siege_keeps_healthz_answering_in_bounded_memory() {
    let (s, agent, addr) = agent_with_metrics(None).await;
    let pid = agent.pid();
    let first = healthz(&addr, Duration::from_secs(5)).await;
    assert!(matches!(first, Ok((200, _))), "{first:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kib(pid);

    let mut siege = Siege::new();
    let siege_started = Instant::now();
    let idle = siege.idle(&addr, 300).await;
    let slow = siege.slow(&addr, 300).await;
    let heavy = siege.heavy(&addr, 300, 320).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rss_during = rss_kib(pid);

    // Under siege: CPU over 5 s, /healthz on fresh connections, a file.
    let (cpu, worst) = tokio::join!(
        cpu_over(pid, Duration::from_secs(5)),
        worst_healthz(&addr, Duration::from_secs(5)),
    );
    rss_during = rss_during.max(rss_kib(pid));
    std::fs::write(s.outbox.join("during-siege.txt"), b"sent under siege").unwrap();
    let file = outcome(&s, 0, Duration::from_secs(60)).await;
    rss_during = rss_during.max(rss_kib(pid));

    // Idle connections are closed by the server (idle timeout 30 s at most).
    while (siege.idle_closed() < idle || siege.slow_closed() < slow || siege.heavy_closed() < heavy)
        && siege_started.elapsed() < Duration::from_secs(45)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let idle_closed = siege.idle_closed();
    let slow_closed = siege.slow_closed();
    let heavy_closed = siege.heavy_closed();
    let closed_after = siege_started.elapsed();

    // A lone keep-alive connection, no pressure: closed after its timeout.
    let lone = async {
        let mut c = TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: lone\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let opened = Instant::now();
        let mut buf = [0u8; 4096];
        let mut got = 0;
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        Ok::<_, String>((got, opened.elapsed()))
    };
    let lone = tokio::time::timeout(Duration::from_secs(45), lone).await;
    let after = healthz(&addr, Duration::from_secs(5)).await;
    siege.tasks.abort_all();

    eprintln!(
        "siege: {} connections opened ({} refused); agent CPU {cpu:.2} s over 5 s; \
         worst /healthz {worst:?}; file: {file}; RSS {} -> {} KiB (+{} KiB); \
         after {closed_after:?}: {idle_closed}/{idle} idle, {slow_closed}/{slow} slow and {heavy_closed}/{heavy} heavy closed; \
         lone keep-alive connection: {lone:?}; /healthz after: {after:?}",
        siege.opened,
        siege.refused,
        rss_before,
        rss_during,
        rss_during.saturating_sub(rss_before),
    );
    assert_eq!(file, "done");
    assert!(
        matches!(worst, Ok((200, t)) if t < Duration::from_secs(3)),
        "{worst:?}"
    );
    assert!(cpu < 2.0, "the agent used {cpu:.2} s of CPU in 5 s");
    assert!(
        rss_during.saturating_sub(rss_before) < 40 * 1024,
        "RSS grew from {rss_before} to {rss_during} KiB"
    );
    assert!(
        idle + slow + heavy > 800,
        "the siege could not open its connections"
    );
    assert_eq!(
        idle_closed, idle,
        "idle connections left open by the server"
    );
    assert_eq!(slow_closed, slow, "slow-header connections left open");
    assert_eq!(
        heavy_closed, heavy,
        "connections with a big unfinished header left open"
    );
    match lone {
        Ok(Ok((got, t))) => {
            assert!(got > 0, "no answer on the keep-alive connection");
            assert!(t < Duration::from_secs(35), "closed after {t:?}");
        }
        other => panic!("a lone idle keep-alive connection stays open: {other:?}"),
    }
    assert!(matches!(after, Ok((200, _))), "{after:?}");
    assert_eq!(agent.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_descriptors_the_agent_stays_quiet_and_files_wait_instead_of_failing() {
    let (s, agent, addr) = agent_with_metrics(Some(128)).await;
    let pid = agent.pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds_before = fds(pid).len();

    // 200 idle and 100 slow-header connections against 128 descriptors.
    let mut siege = Siege::new();
    siege.idle(&addr, 200).await;
    siege.slow(&addr, 100).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fds_siege = fds(pid).len();
    let (cpu_siege, worst) = tokio::join!(
        cpu_over(pid, Duration::from_secs(5)),
        worst_healthz(&addr, Duration::from_secs(5)),
    );
    std::fs::write(s.outbox.join("during-siege.txt"), b"sent under siege").unwrap();
    let first = outcome(&s, 0, Duration::from_secs(60)).await;

    // Out of descriptors for good: the soft limit lowered to the lowest
    // free descriptor, more connections waiting to be accepted, a new file.
    let used = fds(pid);
    let lowest_free = (0..).find(|n| !used.contains(n)).unwrap_or(0) as u64;
    set_nofile(pid, lowest_free, 128);
    siege.idle(&addr, 50).await;
    std::fs::write(s.outbox.join("while-exhausted.txt"), b"waits").unwrap();
    let cpu_exhausted = cpu_over(pid, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let st = status(&s).await;
    let failed_while_exhausted = st["failed"].as_u64().unwrap_or(0);
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    let emfile: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .collect();
    let emfile_lines = emfile.len();
    set_nofile(pid, 128, 128);
    let second = outcome(&s, 1, Duration::from_secs(60)).await;
    siege.tasks.abort_all();

    eprintln!(
        "out of descriptors: fds {fds_before} -> {fds_siege} under siege ({} connections, {} refused); \
         agent CPU {cpu_siege:.2} s over 5 s under siege, {cpu_exhausted:.2} s over 5 s exhausted \
         (limit {lowest_free}); worst /healthz {worst:?}; file under siege: {first}; \
         file while exhausted: {failed_while_exhausted} failed, then {second}; \
         {emfile_lines} log lines say \"Too many open files\": {emfile:#?}",
        siege.opened, siege.refused,
    );
    assert_eq!(first, "done");
    assert!(
        fds_siege < fds_before + 40,
        "the listener took {fds_siege} of 128 descriptors"
    );
    assert!(
        matches!(worst, Ok((200, t)) if t < Duration::from_secs(3)),
        "{worst:?}"
    );
    assert!(
        cpu_siege < 2.0,
        "{cpu_siege:.2} s of CPU in 5 s under siege"
    );
    assert!(
        cpu_exhausted < 2.0,
        "{cpu_exhausted:.2} s of CPU in 5 s exhausted"
    );
    assert!(emfile_lines > 0, "descriptors were never exhausted:\n{log}");
    assert!(
        emfile_lines < 20,
        "a log line per failed accept or open:\n{log}"
    );
    assert_eq!(failed_while_exhausted, 0, "{st}");
    assert_eq!(second, "done");
    assert_eq!(agent.stop().await, Some(0));
}
