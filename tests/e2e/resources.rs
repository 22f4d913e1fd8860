//! Resources: a 50-level deep tree, a burst of 20,000 files in about a
//! second while the agent is frozen (more events than the kernel queue
//! holds: the overflow must end in a rescan, not a loss), a watched folder removed and made again, and with
//! PUTONLY_LONG=1 also 200,000 files waiting in one folder at start-up.
//! Every file must arrive and the agent's peak memory stays bounded.
//! Runs against Garage (fast enough for tens of thousands of objects).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::agent::Agent;
use crate::support::garage::{BUCKET, Garage, binary};
use crate::support::proxy::Proxy;
use crate::support::{bytes, get, putonly};

/// Peak resident memory of a process, in KiB (VmHWM).
fn peak_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn done_count(creds: &Path, config: &Path) -> u64 {
    let out = putonly(Some(creds))
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .await
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["done"].as_u64())
        .unwrap_or(0)
}

async fn wait_done(creds: &Path, config: &Path, log: &Path, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let done = done_count(creds, config).await;
        if done >= n as u64 {
            return;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!("{done} of {n} done after {limit:?}:\n{}", tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes `n` small files into `dir` as fast as possible; returns them.
fn burst(root: &Path, dir: &str, n: usize, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    std::fs::create_dir_all(root.join(dir)).unwrap();
    for i in 0..n {
        let rel = format!("{dir}/f{i:06}.dat");
        let data = bytes(64 + i % 200, seed + i as u64);
        std::fs::write(root.join(&rel), &data).unwrap();
        files.insert(rel, data);
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_trees_bursts_and_a_recreated_folder_lose_nothing_in_bounded_memory() {
    let Some(bin) = binary() else {
        crate::garage::skip_or_fail();
        return;
    };
    let long = std::env::var_os("PUTONLY_LONG").is_some();
    let garage = Garage::start(&bin);
    let proxy = Proxy::start(&garage.url).await;
    let creds = garage.creds_dir();
    let work = tempfile::tempdir().unwrap();
    let outbox = work.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[aws]\nregion = \"us-east-1\"\nprofile = \"garage\"\nendpoint_url = \"{}\"\n\
             [bucket]\nname = \"{BUCKET}\"\nallowed_prefixes = [\"foo/\"]\n\
             [state]\ndir = \"{}\"\n\
             [[watch]]\npath = \"{}\"\nprefix = \"foo/r\"\nsettle = \"500ms\"\n\
             [agent]\nrescan_interval = \"15s\"\n\
             [upload]\nconcurrency = 16\n",
            proxy.url,
            work.path().join("state").display(),
            outbox.display()
        ),
    )
    .unwrap();
    let log = work.path().join("agent.log");
    let mut all: BTreeMap<String, Vec<u8>> = BTreeMap::new();

    // Long variant: 200,000 files waiting in one folder at start-up.
    if long {
        let o = outbox.clone();
        all.extend(
            tokio::task::spawn_blocking(move || burst(&o, "waiting", 200_000, 1))
                .await
                .unwrap(),
        );
    }
    let mut agent = Agent::start(&creds, &config, &log);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A tree 50 folders deep, made at once, a file on every level.
    let mut rel = String::from("deep");
    for level in 0..50 {
        rel.push_str(&format!("/l{level:02}"));
        let data = bytes(100 + level, 5000 + level as u64);
        let file = format!("{rel}/at-{level:02}.txt");
        std::fs::create_dir_all(outbox.join(&rel)).unwrap();
        std::fs::write(outbox.join(&file), &data).unwrap();
        all.insert(file, data);
    }

    // A burst of 20,000 files in one folder, written while the agent is
    // frozen: their 60,000 events (create, modify, close) overflow the
    // kernel queue (fs.inotify.max_queued_events, 16,384 by default) on any
    // machine, however fast the agent would have read them. The folder is
    // made first: a folder made while the agent is frozen has no watch yet.
    std::fs::create_dir_all(outbox.join("burst")).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent.freeze(true);
    let o = outbox.clone();
    let started = Instant::now();
    let written = tokio::task::spawn_blocking(move || burst(&o, "burst", 20_000, 2)).await;
    let burst_took = started.elapsed();
    agent.freeze(false);
    all.extend(written.unwrap());
    let must_overflow = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|max| 3 * 20_000 > max);
    // At least 50 files a second, even for a debug build on a busy machine.
    let limit = Duration::from_secs(900.max(all.len() as u64 / 50));
    wait_done(&creds, &config, &log, all.len(), limit).await;

    // The watched folder is removed and made again; new files arrive.
    std::fs::remove_dir_all(&outbox).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::create_dir_all(&outbox).unwrap();
    let mut again = BTreeMap::new();
    for i in 0..100 {
        let rel = format!("again/a{i:03}.txt");
        let p = outbox.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let data = bytes(300 + i, 7000 + i as u64);
        std::fs::write(&p, &data).unwrap();
        again.insert(rel, data);
    }
    let total = all.len() + again.len();
    wait_done(&creds, &config, &log, total, Duration::from_secs(120)).await;
    assert!(agent.alive());
    let peak_kib = peak_rss_kib(agent.pid());
    assert_eq!(agent.stop().await, Some(0));
    all.extend(again);

    // Every file, read back whole.
    let reader = garage.reader();
    let wrong: Vec<String> = futures::stream::iter(all.iter())
        .map(|(rel, data)| {
            let reader = reader.clone();
            async move {
                let key = format!("foo/r/{rel}");
                (get(&reader, BUCKET, &key).await != *data).then_some(key)
            }
        })
        .buffer_unordered(32)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    assert!(
        wrong.is_empty(),
        "{} objects differ: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    proxy.assert_only_writes();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let overflows = log_text.matches("queue overflow").count();
    assert!(
        overflows > 0 || !must_overflow,
        "the burst overflowed the kernel queue, but no rescan was logged"
    );
    assert!(
        log_text.contains("watched folder is back"),
        "the recreated folder was not noticed"
    );
    eprintln!(
        "{total} files ({} in the burst, written in {burst_took:?}); queue overflows answered by a rescan: {overflows}; peak RSS {} MiB",
        20_000,
        peak_kib / 1024
    );
    assert!(
        peak_kib < 256 * 1024,
        "peak RSS {} MiB: memory is not bounded",
        peak_kib / 1024
    );
}
