//! What each command does, one module per command group.

mod admin;
mod completions;
mod consume;
mod group;
mod message;
mod produce;
mod topic;

use anyhow::Context as _;
use clap::CommandFactory;
use pubsub_etcd::Client;

use crate::cli::{Cli, Command, ConnectionArgs};

/// Environment variable with the password of `--user NAME`.
const PASSWORD_ENV: &str = "PUBSUB_ETCD_PASSWORD";

/// Runs the parsed command; `credentials` come from [`credentials`].
pub async fn run(cli: Cli, credentials: Option<(String, String)>) -> anyhow::Result<()> {
    if let Command::Completions(args) = &cli.command {
        return completions::run(args);
    }
    let client = connect(&cli.connection, credentials).await?;
    match cli.command {
        Command::Topic(command) => topic::run(&client, command).await,
        Command::Produce(args) => produce::run(&client, args).await,
        Command::Consume(args) => consume::run(&client, args).await,
        Command::Group(command) => group::run(&client, command).await,
        Command::Message(command) => message::run(&client, command).await,
        Command::Admin(command) => admin::run(&client, command).await,
        Command::Completions(_) => unreachable!("handled before connecting"),
    }
}

async fn connect(
    args: &ConnectionArgs,
    credentials: Option<(String, String)>,
) -> anyhow::Result<Client> {
    // An empty list (e.g. PUBSUB_ETCD_ENDPOINTS set but empty) means the
    // default, as the library's `endpoints_from_env` has it.
    let mut endpoints: Vec<String> = args
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        endpoints.push(pubsub_etcd::DEFAULT_ENDPOINT.to_string());
    }
    let shown = endpoints.join(",");
    let mut builder = Client::builder(endpoints).namespace(&args.namespace);
    if let Some(timeout) = args.timeout {
        builder = builder.request_timeout(timeout);
    }
    if args.no_auto_compaction {
        builder = builder.auto_compaction(pubsub_etcd::AutoCompaction::Disabled);
    }
    if let Some(ca) = &args.cacert {
        builder = builder.ca_cert(ca);
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        builder = builder.client_cert(cert, key);
    }
    if let Some((name, password)) = credentials {
        builder = builder.user(name, password);
    }
    builder
        .connect()
        .await
        .with_context(|| format!("cannot connect to etcd at {shown}"))
}

/// The etcd user and password of `--user NAME[:PASSWORD]`. Without a
/// password in the option it must be in the environment, which keeps it out
/// of shell history and `ps`; its absence is a usage error.
pub fn credentials(args: &ConnectionArgs) -> Result<Option<(String, String)>, clap::Error> {
    let Some(user) = &args.user else {
        return Ok(None);
    };
    if let Some((name, password)) = user.split_once(':') {
        return Ok(Some((name.to_string(), password.to_string())));
    }
    match std::env::var(PASSWORD_ENV) {
        Ok(password) => Ok(Some((user.clone(), password))),
        Err(_) => Err(Cli::command().error(
            clap::error::ErrorKind::MissingRequiredArgument,
            format!(
                "--user {user} has no password: give --user {user}:PASSWORD or set {PASSWORD_ENV}"
            ),
        )),
    }
}
