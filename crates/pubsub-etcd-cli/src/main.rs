//! `pubsub-etcd`: the command-line tool for pubsub-etcd topics, messages
//! and consumer groups.

mod cli;
mod commands;
mod output;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

fn main() -> ExitCode {
    // Usage errors exit with clap's status 2 here, before any work.
    let cli = cli::Cli::parse();
    let credentials = commands::credentials(&cli.connection).unwrap_or_else(|e| e.exit());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(commands::run(cli, credentials));
    // Every command awaits its own cleanup; whatever is left (e.g. a thread
    // blocked reading stdin) must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if output::is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", output::render_error(&error));
            ExitCode::FAILURE
        }
    }
}
