//! `topic create | list | describe | alter | delete | truncate | compact |
//! enforce-retention`.

use futures::{stream, StreamExt};
use pubsub_etcd::{
    CleanupPolicy, Client, Error, NewTopic, PartitionInfo, RetentionReport, TopicConfig,
    TopicDescription, TopicInfo,
};
use serde::Serialize;

use crate::cli::{self, Format, TopicCommand, TopicConfigArgs};
use crate::output::{self, Table};

pub async fn run(client: &Client, command: TopicCommand) -> anyhow::Result<()> {
    match command {
        TopicCommand::Create {
            name,
            partitions,
            if_not_exists,
            config,
            format,
        } => {
            let mut topic = NewTopic::new(&name, partitions);
            apply(&config, &mut topic.config);
            let (info, created) = match client.create_topic(topic).await {
                Ok(info) => (info, true),
                Err(Error::TopicExists(_)) if if_not_exists => (client.topic(&name).await?, false),
                Err(error) => return Err(error.into()),
            };
            match format.format {
                Format::Json => output::print_json(&Created {
                    created,
                    topic: TopicJson::from(&info),
                }),
                Format::Table if created => output::print_text(&format!(
                    "created topic {:?} with {} partitions\n",
                    info.name, info.partitions
                )),
                Format::Table => output::print_text(&format!(
                    "topic {:?} exists already: {} partitions, {}\n",
                    info.name,
                    info.partitions,
                    config_summary(&info)
                )),
            }
        }
        TopicCommand::List { format } => {
            let topics = client.list_topics().await?;
            match format.format {
                Format::Json => {
                    let list: Vec<_> = topics.iter().map(TopicJson::from).collect();
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
            let stored = Stored::of(client, &description).await?;
            match format.format {
                Format::Json => output::print_json(&describe_json(&description, &stored)),
                Format::Table => output::print_text(&describe_table(&description, &stored)),
            }
        }
        TopicCommand::Alter {
            name,
            partitions,
            config: changes,
            format,
        } => {
            // Only the settings given change, applied to the stored ones
            // inside the library's guarded update, so concurrent alters of
            // different settings do not undo each other.
            let info = client
                .alter_topic(&name, partitions, |config| apply(&changes, config))
                .await?;
            match format.format {
                Format::Json => output::print_json(&TopicJson::from(&info)),
                Format::Table => output::print_text(&format!("altered topic {}\n", summary(&info))),
            }
        }
        TopicCommand::Delete {
            name,
            if_exists,
            format,
        } => {
            let deleted = match client.delete_topic(&name).await {
                Ok(()) => true,
                Err(Error::TopicNotFound(_)) if if_exists => false,
                Err(error) => return Err(error.into()),
            };
            match format.format {
                Format::Json => output::print_json(&Deleted {
                    topic: &name,
                    deleted,
                }),
                Format::Table if deleted => {
                    output::print_text(&format!("deleted topic {name:?}\n"))
                }
                Format::Table => {
                    output::print_text(&format!("topic {name:?} does not exist; nothing deleted\n"))
                }
            }
        }
        TopicCommand::Truncate {
            name,
            partition,
            before,
            format,
        } => {
            let info = match client.truncate_partition(&name, partition, before).await {
                Ok(info) => info,
                // The whole batches below were deleted (deletes work under
                // NOSPACE); rewriting the one holding `before` is a write.
                Err(error @ Error::QuotaExceeded { .. }) => {
                    let done = client.describe_topic(&name).await?;
                    let earliest = done
                        .partitions
                        .iter()
                        .find(|p| p.partition == partition)
                        .map_or(0, |p| p.earliest);
                    anyhow::bail!(
                        "truncation of partition {partition} of topic {name:?} stopped half-way: \
                         every batch below offset {earliest} is deleted, but the batch holding \
                         offsets {earliest}..{before} could not be rewritten ({error}); \
                         free space (pubsub-etcd admin compact --defrag, then admin disarm) \
                         and run it again to finish"
                    );
                }
                Err(error) => return Err(error.into()),
            };
            match format.format {
                Format::Json => output::print_json(&Truncated {
                    topic: &name,
                    partition: info.partition,
                    earliest: info.earliest,
                    next: info.next,
                }),
                Format::Table => output::print_text(&format!(
                    "truncated partition {} of topic {name:?}: earliest {}, next {}\n",
                    info.partition, info.earliest, info.next
                )),
            }
        }
        TopicCommand::Compact { name, format } => {
            let report =
                output::with_spinner("compacting keys", client.compact_topic(&name)).await?;
            print_report("compacted", &name, &report, format.format)
        }
        TopicCommand::EnforceRetention { name, format } => {
            let report =
                output::with_spinner("enforcing retention", client.enforce_retention(&name))
                    .await?;
            print_report("enforced retention on", &name, &report, format.format)
        }
    }
}

/// Sets the settings given on the command line; the others keep their
/// value. The library validates the result (e.g. a limit of 0).
fn apply(args: &TopicConfigArgs, config: &mut TopicConfig) {
    if let Some(bytes) = args.max_message_bytes {
        config.max_message_bytes = Some(bytes);
    }
    if let Some(cli::Limit(age)) = args.retention {
        config.retention_ms = age.map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    }
    if let Some(cli::Limit(messages)) = args.retention_messages {
        config.retention_messages = messages;
    }
    if let Some(cli::Limit(bytes)) = args.retention_bytes {
        config.retention_bytes = bytes;
    }
    if let Some(compression) = args.compression {
        config.compression = compression;
    }
    if let Some(policy) = args.cleanup_policy {
        config.cleanup_policy = match policy {
            cli::CleanupPolicy::Delete => CleanupPolicy::Delete,
            cli::CleanupPolicy::Compact => CleanupPolicy::Compact,
        };
    }
}

/// What a compaction or retention sweep did, and the offsets afterwards.
fn print_report(
    done: &str,
    topic: &str,
    report: &RetentionReport,
    format: Format,
) -> anyhow::Result<()> {
    match format {
        Format::Json => output::print_json(&Report {
            topic,
            batches_deleted: report.batches_deleted,
            batches_rewritten: report.batches_rewritten,
            records_removed: report.records_removed,
            partitions: partitions_json(&report.partitions),
        }),
        Format::Table => {
            let mut text = format!(
                "{done} topic {topic:?}: {} batches deleted, {} rewritten, {} records removed\n\n",
                report.batches_deleted, report.batches_rewritten, report.records_removed
            );
            text.push_str(&partitions_table(&report.partitions));
            output::print_text(&text)
        }
    }
}

fn partitions_table(partitions: &[PartitionInfo]) -> String {
    let mut table = Table::new(["PARTITION", "EARLIEST", "NEXT", "BYTES", "STORED", "RATIO"]);
    for p in partitions {
        table.row([
            p.partition.to_string(),
            p.earliest.to_string(),
            p.next.to_string(),
            p.bytes.to_string(),
            p.stored_bytes.to_string(),
            ratio(p).map_or_else(|| "-".to_string(), |r| format!("{r:.2}")),
        ]);
    }
    table.render()
}

/// Application bytes per stored byte (how well the partition compresses);
/// unknown while nothing counted is stored (also for data written before
/// stored bytes were recorded).
fn ratio(p: &PartitionInfo) -> Option<f64> {
    (p.stored_bytes > 0).then(|| p.bytes as f64 / p.stored_bytes as f64)
}

/// `topic create` in JSON.
#[derive(Serialize)]
struct Created<'a> {
    created: bool,
    topic: TopicJson<'a>,
}

/// `topic delete` in JSON.
#[derive(Serialize)]
struct Deleted<'a> {
    topic: &'a str,
    deleted: bool,
}

/// `topic truncate` in JSON: the partition's offsets afterwards.
#[derive(Serialize)]
struct Truncated<'a> {
    topic: &'a str,
    partition: u32,
    earliest: u64,
    next: u64,
}

/// A sweep's [`RetentionReport`] in JSON, with the topic it ran on.
#[derive(Serialize)]
struct Report<'a> {
    topic: &'a str,
    batches_deleted: u64,
    batches_rewritten: u64,
    records_removed: u64,
    partitions: Vec<PartitionJson<'a>>,
}

/// A partition in JSON: the library's offsets and bytes, and the ratio.
#[derive(Serialize)]
struct PartitionJson<'a> {
    #[serde(flatten)]
    info: &'a PartitionInfo,
    ratio: Option<f64>,
}

fn partitions_json(partitions: &[PartitionInfo]) -> Vec<PartitionJson<'_>> {
    partitions
        .iter()
        .map(|info| PartitionJson {
            info,
            ratio: ratio(info),
        })
        .collect()
}

/// A topic as `topic list` shows it in JSON; other commands embed it. The
/// incarnation stays out: it is an etcd revision, not the topic's to show.
#[derive(Serialize)]
struct TopicJson<'a> {
    name: &'a str,
    partitions: u32,
    config: &'a TopicConfig,
    created_ms: i64,
}

impl<'a> From<&'a TopicInfo> for TopicJson<'a> {
    fn from(topic: &'a TopicInfo) -> Self {
        TopicJson {
            name: &topic.name,
            partitions: topic.partitions,
            config: &topic.config,
            created_ms: topic.created_ms,
        }
    }
}

/// `topic describe` in JSON.
#[derive(Serialize)]
struct DescriptionJson<'a> {
    name: &'a str,
    partitions: Vec<PartitionJson<'a>>,
    config: &'a TopicConfig,
    created_ms: i64,
    stored_messages: u64,
    last_timestamp_ms: Option<i64>,
}

/// What a topic holds now: the offsets still stored (deleted and expired
/// records inside them are counted too) and the newest message's time.
pub(super) struct Stored {
    pub(super) messages: u64,
    pub(super) last_timestamp_ms: Option<i64>,
}

/// How many partitions' newest messages [`Stored::of`] reads at once.
const CONCURRENT_FETCHES: usize = 8;

impl Stored {
    pub(super) async fn of(
        client: &Client,
        description: &TopicDescription,
    ) -> anyhow::Result<Stored> {
        let messages = description
            .partitions
            .iter()
            .map(|p| p.next - p.earliest)
            .sum();
        // The newest message of each non-empty partition, a few partitions
        // at a time: one small read each, which one after another cost a
        // round trip per partition.
        let reads: Vec<_> = description
            .partitions
            .iter()
            .filter(|p| p.next > p.earliest)
            .map(|p| client.fetch(&description.topic.name, p.partition, p.next - 1, 1))
            .collect();
        let mut newest = stream::iter(reads).buffer_unordered(CONCURRENT_FETCHES);
        let mut last_timestamp_ms = None;
        while let Some(last) = newest.next().await {
            last_timestamp_ms = last_timestamp_ms.max(last?.messages.first().map(|m| m.timestamp));
        }
        Ok(Stored {
            messages,
            last_timestamp_ms,
        })
    }
}

/// `topic describe` in JSON, as a value the console adds rates to.
pub(super) fn describe_json(description: &TopicDescription, stored: &Stored) -> serde_json::Value {
    let json = DescriptionJson {
        name: &description.topic.name,
        partitions: partitions_json(&description.partitions),
        config: &description.topic.config,
        created_ms: description.topic.created_ms,
        stored_messages: stored.messages,
        last_timestamp_ms: stored.last_timestamp_ms,
    };
    serde_json::to_value(json).expect("a topic description serialises")
}

fn describe_table(description: &TopicDescription, stored: &Stored) -> String {
    let topic = &description.topic;
    let mut text = format!(
        "topic       {}\npartitions  {}\ncreated     {}\nconfig      {}\nstored      {} messages\nnewest      {}\n\n",
        topic.name,
        topic.partitions,
        format_ms(topic.created_ms),
        config_summary(topic),
        stored.messages,
        stored.last_timestamp_ms.map_or_else(|| "-".to_string(), format_ms),
    );
    text.push_str(&partitions_table(&description.partitions));
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

/// The settings that differ from the defaults, as `name=value` pairs with
/// durations and sizes in units people read; taken from the config's JSON
/// form so new settings show up unasked.
fn config_summary(topic: &TopicInfo) -> String {
    let pairs: Vec<String> = match serde_json::to_value(&topic.config) {
        Ok(serde_json::Value::Object(fields)) => fields
            .iter()
            .map(|(name, value)| match (name.as_str(), value) {
                (_, serde_json::Value::String(text)) => format!("{name}={text}"),
                ("retention_ms", serde_json::Value::Number(ms)) => match ms.as_u64() {
                    Some(ms) => format!(
                        "retention={}",
                        humantime::format_duration(std::time::Duration::from_millis(ms))
                    ),
                    None => format!("{name}={ms}"),
                },
                (_, serde_json::Value::Number(n)) if name.ends_with("_bytes") => match n.as_u64() {
                    Some(bytes) => format!("{name}={}", exact_size(bytes)),
                    None => format!("{name}={n}"),
                },
                (_, other) => format!("{name}={other}"),
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

/// A size in the largest unit that shows it exactly (`64KiB`, `10MB`), so
/// what is shown can be given back to `--retention-bytes` unchanged.
fn exact_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (1 << 30, "GiB"),
        (1_000_000_000, "GB"),
        (1 << 20, "MiB"),
        (1_000_000, "MB"),
        (1 << 10, "KiB"),
    ];
    UNITS
        .iter()
        .find(|(unit, _)| bytes >= *unit && bytes % unit == 0)
        .map_or_else(
            || bytes.to_string(),
            |(unit, name)| format!("{}{name}", bytes / unit),
        )
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

#[cfg(test)]
mod tests {
    use super::exact_size;

    #[test]
    fn sizes_are_shown_exactly() {
        assert_eq!(exact_size(65_536), "64KiB");
        assert_eq!(exact_size(10_000_000), "10MB");
        assert_eq!(exact_size(3 << 30), "3GiB");
        assert_eq!(exact_size(1_500), "1500");
        assert_eq!(exact_size(0), "0");
    }
}
