//! The `putonly` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use putonly::cli::{Cli, init_logging, run};

/// Part buffers are large (8 MiB by default) and short-lived. glibc raises
/// its mmap threshold after the first such buffer is freed and then serves
/// the next ones from heap arenas, which fragment and do not shrink: peak
/// RSS grew to twice the buffers in flight (bench/push-memory.sh). A fixed
/// threshold keeps every part buffer in its own mapping, returned on free.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_malloc_mmap_threshold() {
    // SAFETY: mallopt only changes allocator tuning; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_malloc_mmap_threshold() {}

/// Each file in flight holds a descriptor and its request a connection, so
/// `requests_in_flight` files need about twice as many descriptors; the
/// soft limit (often 1024) is raised to the hard one, as Go programs do.
/// If it cannot be, running out is a transient failure (the agent retries
/// the file) and `push` says so.
fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        let _ = setrlimit(Resource::Nofile, raised);
    }
}

fn main() -> ExitCode {
    fix_malloc_mmap_threshold();
    raise_descriptor_limit();
    let cli = Cli::parse();
    if matches!(cli.command, putonly::cli::Command::Run(_)) {
        // Before any thread starts: a stop during start-up is clean.
        putonly::agent::signals::catch_stop_signals_early();
        putonly::agent::signals::debug_start_pause();
    }
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("putonly: cannot start the async runtime: {e}");
            return ExitCode::from(putonly::cli::EXIT_FAILED);
        }
    };
    runtime.block_on(run(cli))
}
