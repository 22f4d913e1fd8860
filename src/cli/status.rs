//! `putonly status`: what the agent did and what waits, read from the
//! journal alone (no request leaves the machine). It opens the journal
//! read-only and never changes it.

use std::process::ExitCode;
use std::time::Duration;

use super::{EXIT_OK, StatusArgs, unreadable_journal};
use crate::agent::Status;
use crate::ground::now;
use crate::ground::printable::printable;
use crate::journal::Journal;
use crate::watch::denied::{Kind, Summary};

pub fn run(args: StatusArgs) -> ExitCode {
    let state = match args.agent.state("the journal lives there") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let read = Journal::open_read_only(&state.dir).and_then(|j| {
        let status = j.status()?;
        // Written by the agent as JSON; an unreadable value shows nothing.
        let unreadable: Summary = j
            .meta(Summary::META)?
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default();
        Ok((status, unreadable))
    });
    let (mut status, unreadable) = match read {
        Ok(r) => r,
        Err(e) => {
            return unreadable_journal(&e, &args.agent.config);
        }
    };
    name_refusals(&mut status, &unreadable);
    if args.json {
        let report = Report {
            status: &status,
            unreadable: (!unreadable.is_empty()).then_some(&unreadable),
        };
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        print!("{}", render(&status));
        print!("{}", render_unreadable(&unreadable));
    }
    ExitCode::from(EXIT_OK)
}

/// A file of a held marker's batch that the agent was refused is waiting
/// for that, not for its turn: its state says so.
fn name_refusals(status: &mut Status, unreadable: &Summary) {
    if unreadable.is_empty() {
        return;
    }
    for m in &mut status.held_markers {
        for f in &mut m.files {
            if f.state != crate::agent::batches::NOT_TAKEN {
                continue;
            }
            if let Some(i) = unreadable
                .oldest
                .iter()
                .find(|i| i.kind == Kind::File && i.path.to_string_lossy() == f.path)
            {
                f.state = format!("cannot read yet: {}", i.error);
            }
        }
    }
}

/// `--json`: the journal's status, and what the agent may not read yet.
#[derive(serde::Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    status: &'a Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    unreadable: Option<&'a Summary>,
}

/// Folders and files the agent's user could not read, as the agent last
/// saw them; nothing when there are none.
fn render_unreadable(u: &Summary) -> String {
    if u.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "cannot read yet (tried again as soon as their permissions change, and every few seconds): {} folder{}, {} file{}\n",
        u.folders,
        if u.folders == 1 { "" } else { "s" },
        u.files,
        if u.files == 1 { "" } else { "s" },
    );
    for i in &u.oldest {
        let kind = match i.kind {
            Kind::Folder => "folder",
            Kind::File => "file",
        };
        out.push_str(&format!(
            "  {kind} {} (since {}): {}\n",
            printable(&i.path.to_string_lossy()),
            ago(i.since),
            printable(&i.error)
        ));
    }
    let listed = u.oldest.len() as u64;
    if u.folders + u.files > listed {
        out.push_str(&format!(
            "  ... and {} more\n",
            u.folders + u.files - listed
        ));
    }
    out.push_str("  (the agent's user needs read and search permission on each folder, and read permission on each file)\n");
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::denied::Item;

    #[test]
    fn unreadable_paths_are_listed_with_the_fix_and_nothing_when_none() {
        assert_eq!(render_unreadable(&Summary::default()), "");
        let u = Summary {
            folders: 1,
            files: 2,
            oldest: vec![
                Item {
                    kind: Kind::Folder,
                    path: "/srv/out/a\nb".into(),
                    since: now() - 5,
                    error: "Permission denied (os error 13)".into(),
                },
                Item {
                    kind: Kind::File,
                    path: "/srv/out/f".into(),
                    since: now() - 2,
                    error: "Permission denied (os error 13)".into(),
                },
            ],
        };
        let text = render_unreadable(&u);
        assert!(text.starts_with("cannot read yet"), "{text}");
        assert!(text.contains("1 folder, 2 files"), "{text}");
        assert!(
            text.contains("folder /srv/out/a\\nb (since 5s ago)"),
            "{text}"
        );
        assert!(text.contains("file /srv/out/f"), "{text}");
        assert!(text.contains("... and 1 more"), "{text}");
        assert!(text.contains("read and search permission"), "{text}");
    }
}
