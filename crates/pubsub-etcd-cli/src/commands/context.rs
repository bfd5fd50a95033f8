//! `context list | show`: the saved connection contexts and the settings
//! in effect. Passwords are never shown.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::Config;
use crate::cli::{ConnectionArgs, ContextCommand, Format};
use crate::context::Context;
use crate::output::{self, or_dash, Table};

pub fn run(command: &ContextCommand, config: &Config, args: &ConnectionArgs) -> anyhow::Result<()> {
    let file = config
        .path
        .as_ref()
        .map_or_else(|| "-".to_string(), |p| p.display().to_string());
    match command {
        ContextCommand::List { format } => match format.format {
            Format::Json => output::print_json(&Contexts {
                file: &file,
                selected: config.selected.as_deref(),
                contexts: &config.file.contexts,
            }),
            Format::Table => {
                let mut table = Table::new(["", "NAME", "ENDPOINTS", "NAMESPACE", "USER"]);
                for (name, context) in &config.file.contexts {
                    let selected = config.selected.as_deref() == Some(name.as_str());
                    table.row([
                        if selected { "*" } else { "" }.to_string(),
                        name.clone(),
                        or_dash(context.endpoints.as_ref().map(|e| e.join(","))),
                        or_dash(context.namespace.clone()),
                        or_dash(context.user.clone()),
                    ]);
                }
                output::print_text(&format!("contexts in {file}\n{}", table.render()))
            }
        },
        ContextCommand::Show { format } => {
            let endpoints: Vec<String> = args
                .endpoints
                .iter()
                .map(|e| pubsub_etcd::redact_endpoint(e))
                .collect();
            let user = args
                .user
                .as_deref()
                .map(|u| u.split_once(':').map_or(u, |(name, _)| name).to_string());
            let shown = serde_json::to_value(Shown {
                context: config.selected.as_deref(),
                endpoints,
                namespace: &args.namespace,
                user,
                cacert: args.cacert.as_ref(),
                cert: args.cert.as_ref(),
                key: args.key.as_ref(),
                timeout: args
                    .timeout
                    .map(|t| humantime::format_duration(t).to_string()),
            })?;
            match format.format {
                Format::Json => output::print_json(&shown),
                Format::Table => {
                    let mut text = String::new();
                    if let serde_json::Value::Object(fields) = &shown {
                        for (name, value) in fields {
                            let value = match value {
                                serde_json::Value::Null => "-".to_string(),
                                serde_json::Value::String(s) => s.clone(),
                                serde_json::Value::Array(items) => items
                                    .iter()
                                    .filter_map(|i| i.as_str())
                                    .collect::<Vec<_>>()
                                    .join(","),
                                other => other.to_string(),
                            };
                            text.push_str(&format!("{name:<10} {value}\n"));
                        }
                    }
                    output::print_text(&text)
                }
            }
        }
    }
}

/// `context list` in JSON.
#[derive(Serialize)]
struct Contexts<'a> {
    file: &'a str,
    selected: Option<&'a str>,
    contexts: &'a BTreeMap<String, Context>,
}

/// The settings in effect, as `context show` prints them; the table lists
/// the same fields by name.
#[derive(Serialize)]
struct Shown<'a> {
    context: Option<&'a str>,
    endpoints: Vec<String>,
    namespace: &'a str,
    user: Option<String>,
    cacert: Option<&'a PathBuf>,
    cert: Option<&'a PathBuf>,
    key: Option<&'a PathBuf>,
    timeout: Option<String>,
}
