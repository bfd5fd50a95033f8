//! `topic create | list | describe | alter | delete | truncate`.

use pubsub_etcd::{Client, NewTopic, TopicDescription, TopicInfo, TopicUpdate};
use serde_json::json;

use crate::cli::{Format, TopicCommand};
use crate::output::{self, Table};

pub async fn run(client: &Client, command: TopicCommand) -> anyhow::Result<()> {
    match command {
        TopicCommand::Create {
            name,
            partitions,
            max_message_bytes,
        } => {
            let mut topic = NewTopic::new(name, partitions);
            if let Some(bytes) = max_message_bytes {
                topic = topic.max_message_bytes(bytes);
            }
            let info = client.create_topic(topic).await?;
            output::print_text(&format!(
                "created topic {:?} with {} partitions\n",
                info.name, info.partitions
            ))
        }
        TopicCommand::List { format } => {
            let topics = client.list_topics().await?;
            match format.format {
                Format::Json => {
                    let list: Vec<_> = topics
                        .iter()
                        .map(|t| {
                            json!({
                                "name": t.name,
                                "partitions": t.partitions,
                                "config": t.config,
                                "created_ms": t.created_ms,
                            })
                        })
                        .collect();
                    output::print_json(&list)
                }
                Format::Table => {
                    let mut table = Table::new(["NAME", "PARTITIONS", "CREATED", "CONFIG"]);
                    for t in &topics {
                        table.row([
                            t.name.clone(),
                            t.partitions.to_string(),
                            format_ms(t.created_ms),
                            config_summary(t),
                        ]);
                    }
                    table.print()
                }
            }
        }
        TopicCommand::Describe { name, format } => {
            let description = client.describe_topic(&name).await?;
            match format.format {
                Format::Json => output::print_json(&describe_json(&description)),
                Format::Table => output::print_text(&describe_table(&description)),
            }
        }
        TopicCommand::Alter {
            name,
            partitions,
            max_message_bytes,
        } => {
            let config = match max_message_bytes {
                Some(bytes) => {
                    // An update replaces the whole config, so start from the
                    // current one to keep settings this command does not set.
                    let mut config = client.topic(&name).await?.config;
                    config.max_message_bytes = Some(bytes);
                    Some(config)
                }
                None => None,
            };
            let info = client
                .update_topic(&name, TopicUpdate { partitions, config })
                .await?;
            output::print_text(&format!("altered topic {}\n", summary(&info)))
        }
        TopicCommand::Delete { name } => {
            client.delete_topic(&name).await?;
            output::print_text(&format!("deleted topic {name:?}\n"))
        }
        TopicCommand::Truncate {
            name,
            partition,
            before,
        } => {
            let info = client.truncate_partition(&name, partition, before).await?;
            output::print_text(&format!(
                "truncated partition {} of topic {name:?}: earliest {}, next {}\n",
                info.partition, info.earliest, info.next
            ))
        }
    }
}

fn describe_json(description: &TopicDescription) -> serde_json::Value {
    json!({
        "name": description.topic.name,
        "partitions": description.partitions,
        "config": description.topic.config,
    })
}

fn describe_table(description: &TopicDescription) -> String {
    let topic = &description.topic;
    let mut text = format!(
        "topic       {}\npartitions  {}\ncreated     {}\nconfig      {}\n\n",
        topic.name,
        topic.partitions,
        format_ms(topic.created_ms),
        config_summary(topic)
    );
    let mut table = Table::new(["PARTITION", "EARLIEST", "NEXT"]);
    for p in &description.partitions {
        table.row([
            p.partition.to_string(),
            p.earliest.to_string(),
            p.next.to_string(),
        ]);
    }
    text.push_str(&table.render());
    text
}

fn summary(topic: &TopicInfo) -> String {
    format!(
        "{:?}: {} partitions, {}",
        topic.name,
        topic.partitions,
        config_summary(topic)
    )
}

/// The settings that differ from the defaults, as `name=value` pairs;
/// taken from the config's JSON form so new settings show up unasked.
fn config_summary(topic: &TopicInfo) -> String {
    let pairs: Vec<String> = match serde_json::to_value(&topic.config) {
        Ok(serde_json::Value::Object(fields)) => fields
            .iter()
            .map(|(name, value)| match value {
                serde_json::Value::String(text) => format!("{name}={text}"),
                other => format!("{name}={other}"),
            })
            .collect(),
        _ => Vec::new(),
    };
    if pairs.is_empty() {
        "defaults".to_string()
    } else {
        pairs.join(" ")
    }
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
pub fn format_ms(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string(),
        Err(_) => ms.to_string(),
    }
}
