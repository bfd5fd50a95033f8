//! `pubsub-etcd`: the command-line tool for pubsub-etcd topics, messages
//! and consumer groups.

mod cli;
mod commands;
mod context;
mod output;
mod template;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Usage errors exit with clap's status 2 here, before any work.
    let matches = cli::Cli::command().get_matches();
    let mut cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(&cli.log);
    let config = match load_context(&matches, &mut cli) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
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
    let result = runtime.block_on(commands::run(cli, credentials, config));
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

/// Logs go to stderr, warnings included by default: they are how the
/// library reports what it skipped or retried (an unreadable offset, an
/// unreachable etcd), and a person must see them.
fn init_logging(args: &cli::LogArgs) {
    let level = match (args.quiet, args.verbose) {
        (2.., _) => "off",
        (1, _) => "error",
        (0, 0) => "warn",
        (0, 1) => "info",
        (0, 2) => "debug",
        (0, 3..) => "trace",
    };
    // RUST_LOG replaces the levels; a malformed RUST_LOG falls back to them
    // rather than silencing everything.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(args.verbose > 0)
        // The library's spans (append, fetch, commit, rebalance,
        // compaction) are debug level: at -vv each one's end is a line
        // with its fields and how long it took.
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .without_time()
        .init();
}

/// Reads the config file and fills the connection settings not given
/// otherwise from the selected context.
fn load_context(
    matches: &clap::ArgMatches,
    cli: &mut cli::Cli,
) -> Result<commands::Config, String> {
    let path = context::path();
    let file = match &path {
        Some(path) => context::load(path)?,
        None => context::ConfigFile::default(),
    };
    let selected = file
        .selected(cli.connection.context.as_deref())?
        .map(|(name, context)| (name.to_string(), context.clone()));
    if let Some((_, context)) = &selected {
        context::apply(context, matches, &mut cli.connection)?;
    }
    Ok(commands::Config {
        path,
        file,
        selected: selected.map(|(name, _)| name),
    })
}
