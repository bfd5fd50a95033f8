//! `group list | describe | reset-offsets | delete`.

use pubsub_etcd::{Client, Error, PartitionLag, StartOffset};
use serde_json::json;

use crate::cli::{Format, GroupCommand};
use crate::output::{self, Table};

pub async fn run(client: &Client, command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::List { format } => {
            let groups = client.list_groups().await?;
            match format.format {
                Format::Json => {
                    let list: Vec<_> = groups
                        .iter()
                        .map(|(group, topics)| json!({ "group": group, "topics": topics }))
                        .collect();
                    output::print_json(&list)
                }
                Format::Table => {
                    let mut table = Table::new(["GROUP", "TOPICS"]);
                    for (group, topics) in &groups {
                        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                        table.row([group.clone(), topics.join(",")]);
                    }
                    table.print()
                }
            }
        }
        GroupCommand::Describe {
            group,
            topic,
            format,
        } => {
            let topics = match topic {
                Some(topic) => vec![topic],
                None => client
                    .list_groups()
                    .await?
                    .remove(&group)
                    .ok_or_else(|| Error::GroupNotFound(group.clone()))?
                    .into_iter()
                    .collect(),
            };
            let mut lags: Vec<PartitionLag> = Vec::new();
            for topic in &topics {
                lags.extend(client.group_lag(topic, &group).await?);
            }
            match format.format {
                Format::Json => output::print_json(&lags),
                Format::Table => {
                    let mut table =
                        Table::new(["TOPIC", "PARTITION", "OWNER", "COMMITTED", "NEXT", "LAG"]);
                    for lag in lags {
                        table.row([
                            lag.topic,
                            lag.partition.to_string(),
                            output::or_dash(lag.owner),
                            output::or_dash(lag.committed),
                            lag.next.to_string(),
                            lag.lag.to_string(),
                        ]);
                    }
                    table.print()
                }
            }
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to_earliest: _,
            to_latest,
            to_offset,
            to_time,
            format,
        } => {
            // clap makes exactly one target present; earliest is what is left.
            let to = match (to_latest, to_offset, to_time) {
                (true, _, _) => StartOffset::Latest,
                (_, Some(offset), _) => StartOffset::Offset(offset),
                (_, _, Some(ms)) => StartOffset::Timestamp(ms),
                _ => StartOffset::Earliest,
            };
            let offsets = client.reset_offsets(&topic, &group, to).await?;
            match format.format {
                Format::Json => {
                    let list: Vec<_> = offsets
                        .iter()
                        .map(|(partition, offset)| {
                            json!({ "topic": topic, "partition": partition, "offset": offset })
                        })
                        .collect();
                    output::print_json(&list)
                }
                Format::Table => {
                    let mut table = Table::new(["TOPIC", "PARTITION", "OFFSET"]);
                    for (partition, offset) in &offsets {
                        table.row([topic.clone(), partition.to_string(), offset.to_string()]);
                    }
                    table.print()
                }
            }
        }
        GroupCommand::Delete { group } => {
            client.delete_group(&group).await?;
            output::print_text(&format!("deleted group {group:?}\n"))
        }
    }
}
