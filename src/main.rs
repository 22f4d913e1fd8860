//! The `putonly` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use putonly::cli::{Cli, init_logging, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.log_format);
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
