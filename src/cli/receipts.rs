//! `putonly receipts`: the receipts the agent kept ([`crate::agent::receipts`]),
//! as a table or JSON Lines, read from the journal alone. It opens the
//! journal read-only, never changes it, sends nothing, and prints each
//! receipt as it is read (memory stays flat however many there are).

use std::io::Write;
use std::process::ExitCode;
use std::time::SystemTime;

use super::{EXIT_OK, EXIT_USAGE, ReceiptsArgs, report_error, unreadable_journal};
use crate::agent::receipts::{HEADER, parse_since};
use crate::journal::Journal;

pub fn run(args: ReceiptsArgs) -> ExitCode {
    let state = match args.agent.state("the journal and its receipts live there") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let since = match args
        .since
        .as_deref()
        .map(|t| parse_since(t, SystemTime::now()))
    {
        None => 0,
        Some(Ok(t)) => t,
        Some(Err(msg)) => {
            eprintln!("putonly: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let journal = match Journal::open_read_only(&state.dir) {
        Ok(j) => j,
        Err(e) => {
            return unreadable_journal(&e, &args.agent.config);
        }
    };
    let mut out = std::io::stdout().lock();
    let mut header = !args.json;
    let listed = journal.receipts_since(since, |r| {
        if std::mem::take(&mut header) {
            writeln!(out, "{HEADER}")?;
        }
        if args.json {
            let line = serde_json::to_string(&r).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")
        } else {
            writeln!(out, "{}", r.line())
        }
    });
    match listed {
        Ok(Some(Ok(()))) => {}
        Ok(None) => eprintln!(
            "putonly: this journal has no receipts yet: the agent that keeps them has not run on it"
        ),
        // A closed pipe (`| head`): nothing more to say.
        Ok(Some(Err(e))) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Ok(Some(Err(e))) => {
            eprintln!("putonly: cannot write the receipts: {e}");
            return ExitCode::from(super::EXIT_FAILED);
        }
        Err(e) => {
            report_error(&e);
            return ExitCode::from(EXIT_USAGE);
        }
    }
    if let Err(e) = out.flush()
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("putonly: cannot write the receipts: {e}");
        return ExitCode::from(super::EXIT_FAILED);
    }
    ExitCode::from(EXIT_OK)
}
