//! One tiny round of the peer benchmark (bench/peers.sh --target sink), so
//! the script and the sink (bench/sink.rs) keep working: a 20 MiB file and
//! 50 files of 4 KiB, one run each, with the debug putonly and the debug
//! sink. The peers (s5cmd, aws cli, rclone) run too when
//! scripts/install-peers.sh installed them (scripts/test.sh does, and sets
//! PUTONLY_REQUIRE_PEERS=1 so that they must); otherwise only putonly runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{repo, tool_path};

/// The sink example beside the putonly binary (target/<profile>/examples),
/// built now if `cargo test` was run without it (e.g. `--test e2e`).
fn sink_binary() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_putonly"));
    let sink = bin.parent().unwrap().join("examples").join("sink");
    if !sink.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--locked", "--example", "sink"])
            .current_dir(repo())
            .status()
            .expect("run cargo build --example sink");
        assert!(status.success(), "cargo build --example sink failed");
    }
    assert!(sink.exists(), "no sink at {}", sink.display());
    sink
}

/// The table's rows: workload, tool, then the other cells.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| workload"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn peers_script_sink_round() {
    let peers = tool_path("PUTONLY_PEERS");
    let have_peers = ["s5cmd", "aws", "rclone"]
        .iter()
        .all(|t| peers.join("bin").join(t).exists());
    if !have_peers {
        assert!(
            std::env::var_os("PUTONLY_REQUIRE_PEERS").is_none(),
            "PUTONLY_REQUIRE_PEERS is set but the peers are not installed: run scripts/install-peers.sh"
        );
        eprintln!("NOTE: the peers are not installed (scripts/install-peers.sh): putonly only");
    }
    let tools = if have_peers {
        "putonly,s5cmd,aws,rclone"
    } else {
        "putonly"
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("bench").join("peers.sh"))
        .args([
            "--target",
            "sink",
            "--runs",
            "1",
            "--workloads",
            "20m,50-4k",
        ])
        .args(["--tools", tools])
        // Every checksum, the peers' MD5 and SHA-256 too.
        .args(["--sink-verify", "all"])
        .env("PUTONLY_BIN", env!("CARGO_BIN_EXE_putonly"))
        .env("PUTONLY_SINK_BIN", sink_binary())
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run bench/peers.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "--- exit {:?}\n--- stdout\n{stdout}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "bench/peers.sh failed");
    assert!(stdout.contains("| workload | tool | runs ok |"), "no table");
    assert!(stdout.contains("- machine: Linux "), "no machine line");
    let rows = rows(&stdout);
    // Columns: workload, tool, runs ok, wall, CPU, server CPU, RSS, rate,
    // 3 ratios, checksums verified/failed, reads sent.
    for workload in ["20m", "50-4k"] {
        for tool in tools.split(',') {
            let row = rows
                .iter()
                .find(|r| r[0] == workload && r[1] == tool)
                .unwrap_or_else(|| panic!("no row for {workload} {tool}"));
            assert_eq!(row.len(), 13, "{row:?}");
            assert_eq!(row[2], "1/1", "{workload} {tool}: {row:?}");
            let server: f64 = row[5]
                .parse()
                .unwrap_or_else(|_| panic!("server CPU: {row:?}"));
            assert!(server >= 0.0, "{row:?}");
            if tool == "putonly" {
                let (verified, failed) = row[11].split_once('/').unwrap();
                assert!(verified.parse::<u64>().unwrap() > 0, "{row:?}");
                assert_eq!(failed, "0", "checksum failures: {row:?}");
                assert_eq!(row[12], "0", "putonly read: {row:?}");
            }
        }
    }
    // Nothing left behind in TMPDIR (the script removes its work folder).
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
