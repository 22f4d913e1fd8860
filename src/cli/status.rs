//! `putonly status`: what the agent did and what waits, read from the
//! journal alone (no request leaves the machine). It opens the journal
//! read-only and never changes it.

use std::process::ExitCode;
use std::time::Duration;

use super::{EXIT_OK, StatusArgs, unreadable_journal};
use crate::journal::{Journal, Status, now};
use crate::printable::printable;

pub fn run(args: StatusArgs) -> ExitCode {
    let state = match args.agent.state("the journal lives there") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let status = match Journal::open_read_only(&state.dir).and_then(|j| j.status()) {
        Ok(s) => s,
        Err(e) => {
            return unreadable_journal(&e, &args.agent.config);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&status).unwrap_or_default());
    } else {
        print!("{}", render(&status));
    }
    ExitCode::from(EXIT_OK)
}

fn ago(t: i64) -> String {
    let d = now().saturating_sub(t);
    let shown = humantime::format_duration(Duration::from_secs(d.unsigned_abs()));
    if d >= 0 {
        format!("{shown} ago")
    } else {
        format!("in {shown}")
    }
}

fn render(s: &Status) -> String {
    let mut out = format!(
        "files: {} done ({} sent), {} pending, {} failed",
        s.done,
        bytesize::ByteSize(s.bytes_sent).display().iec(),
        s.pending,
        s.failed
    );
    if s.exists > 0 {
        out.push_str(&format!(
            ", {} not sent: the key already held an object (overwrite = false)",
            s.exists
        ));
    }
    out.push('\n');
    match &s.oldest_pending {
        Some(p) => out.push_str(&format!(
            "oldest pending: {} (seen {})\n",
            printable(&p.path),
            ago(p.since)
        )),
        None => out.push_str("oldest pending: none\n"),
    }
    match s.credentials_expire_at {
        Some(t) => out.push_str(&format!(
            "credentials expire: {} (as last seen by the agent)\n",
            ago(t)
        )),
        None => {
            out.push_str("credentials expire: not recorded (no role, or the agent has not run)\n")
        }
    }
    if let Some(t) = s.agent_heartbeat_at {
        out.push_str(&format!("agent heartbeat: {}\n", ago(t)));
    }
    for m in &s.held_markers {
        if m.listing && m.waiting == 0 {
            out.push_str(&format!(
                "marker {} -> {}: its batch is being listed (or cannot be: see its last error)\n",
                printable(&m.path),
                printable(&m.key)
            ));
            continue;
        }
        out.push_str(&format!(
            "marker {} -> {} waits for {} file{}:\n",
            printable(&m.path),
            printable(&m.key),
            m.waiting,
            if m.waiting == 1 { "" } else { "s" }
        ));
        for f in &m.files {
            out.push_str(&format!(
                "  {} [{}]\n",
                printable(&f.path),
                printable(&f.state)
            ));
        }
        if m.waiting > m.files.len() as u64 {
            out.push_str(&format!(
                "  ... and {} more\n",
                m.waiting - m.files.len() as u64
            ));
        }
    }
    if !s.streaming.is_empty() {
        out.push_str("being written, parts sent as they come (stream = true):\n");
        for f in &s.streaming {
            out.push_str(&format!(
                "  {} -> {} (since {})\n",
                printable(&f.path),
                printable(&f.key),
                ago(f.since)
            ));
        }
    }
    if !s.last_exists.is_empty() {
        out.push_str("already in the bucket, left as it was (the files are kept):\n");
        for e in &s.last_exists {
            out.push_str(&format!(
                "  {} [exists] {} -> {}: {}\n",
                ago(e.at),
                printable(&e.path),
                printable(&e.key),
                printable(&e.reason)
            ));
        }
    }
    if !s.last_errors.is_empty() {
        out.push_str("last errors:\n");
        for e in &s.last_errors {
            out.push_str(&format!(
                "  {} [{}] {} -> {}: {}\n",
                ago(e.at),
                e.state,
                printable(&e.path),
                printable(&e.key),
                printable(&e.error)
            ));
        }
    }
    out
}
