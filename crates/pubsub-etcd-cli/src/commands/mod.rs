//! What each command does, one module per command group.

mod admin;
mod bench;
mod completions;
mod console;
mod consume;
mod context;
mod group;
mod message;
mod pipe;
mod process;
mod produce;
mod queue;
mod status;
mod topic;

use anyhow::Context as _;
use clap::CommandFactory;
use pubsub_etcd::Client;

use crate::cli::{Cli, Command, ConnectionArgs};

/// Environment variable with the password of `--user NAME`.
const PASSWORD_ENV: &str = "PUBSUB_ETCD_PASSWORD";

/// The config file as read, and the context in effect.
#[derive(Debug)]
pub struct Config {
    pub path: Option<std::path::PathBuf>,
    pub file: crate::context::ConfigFile,
    pub selected: Option<String>,
}

/// Runs the parsed command; `credentials` come from [`credentials`].
pub async fn run(
    cli: Cli,
    credentials: Option<(String, String)>,
    config: Config,
) -> anyhow::Result<()> {
    match &cli.command {
        Command::Completions(args) => return completions::run(args),
        Command::Context(command) => return context::run(command, &config, &cli.connection),
        _ => {}
    }
    let metrics = match &cli.command {
        Command::Produce(args) => args.metrics.metrics_addr,
        Command::Consume(args) => args.metrics.metrics_addr,
        Command::Bench(command) => command.options().metrics.metrics_addr,
        _ => None,
    };
    if let Some(addr) = metrics {
        serve_metrics(addr)?;
    }
    if let Command::Bench(command) = cli.command {
        return bench::run(cli.connection, credentials, command).await;
    }
    let client = connect(&cli.connection, credentials).await?;
    let result = match cli.command {
        Command::Topic(command) => topic::run(&client, command).await,
        Command::Produce(args) => produce::run(&client, args, cli.connection.timeout).await,
        Command::Consume(args) => consume::run(&client, args, cli.log.quiet > 0).await,
        Command::Group(command) => group::run(&client, command).await,
        Command::Queue(command) => queue::run(&client, command).await,
        Command::Pipe(args) => pipe::run(&client, args).await,
        Command::Message(command) => message::run(&client, command).await,
        Command::Admin(command) => admin::run(&client, command).await,
        Command::Status(args) => status::run(&client, args).await,
        Command::Console(args) => console::run(&client, args).await,
        Command::Completions(_) | Command::Context(_) | Command::Bench(_) => {
            unreachable!("handled before connecting")
        }
    };
    match result {
        Err(error) => Err(with_topic_hint(&client, error).await),
        ok => ok,
    }
}

/// Installs the Prometheus exporter as the process's metrics recorder, with
/// its HTTP listener on `addr` (every path answers with the metrics).
fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    pubsub_etcd::telemetry::describe_metrics();
    Ok(())
}

/// An unknown topic is most often a typo or the wrong namespace: say which
/// namespace was searched and name the topics there that look alike.
async fn with_topic_hint(client: &Client, error: anyhow::Error) -> anyhow::Error {
    let Some(pubsub_etcd::Error::TopicNotFound(name)) = error.downcast_ref::<pubsub_etcd::Error>()
    else {
        return error;
    };
    let name = name.clone();
    let namespace = client.namespace().to_string();
    let Ok(topics) = client.list_topics().await else {
        return error.context(format!("in namespace {namespace:?}"));
    };
    let mut similar: Vec<(f64, String)> = topics
        .into_iter()
        .map(|t| (strsim::jaro_winkler(&name, &t.name), t.name))
        .filter(|(score, _)| *score >= 0.8)
        .collect();
    similar.sort_by(|a, b| b.0.total_cmp(&a.0));
    let hint = if similar.is_empty() {
        format!(
            "topic {name:?} does not exist in namespace {namespace:?} \
             (--namespace or PUBSUB_ETCD_NAMESPACE selects another)"
        )
    } else {
        let names: Vec<String> = similar
            .iter()
            .take(3)
            .map(|(_, n)| format!("{n:?}"))
            .collect();
        format!(
            "topic {name:?} does not exist in namespace {namespace:?}; did you mean {}?",
            names.join(" or ")
        )
    };
    anyhow::anyhow!(hint)
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
    let shown: Vec<String> = endpoints
        .iter()
        .map(|e| pubsub_etcd::redact_endpoint(e))
        .collect();
    let shown = shown.join(",");
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
