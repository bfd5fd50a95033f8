//! `group list | describe | reset-offsets | delete`.

use std::collections::{BTreeMap, BTreeSet};

use pubsub_etcd::{Client, Error, PartitionLag, StartOffset};
use serde::Serialize;

use crate::cli::{Format, GroupCommand, TopicPartitions};
use crate::output::{self, Table};

pub async fn run(client: &Client, command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::List { format } => {
            let groups = client.list_groups().await?;
            let mut rows = Vec::with_capacity(groups.len());
            for (group, topics) in &groups {
                let (members, lag) = group_members_and_lag(client, group, topics).await?;
                let state = if members == 0 { "empty" } else { "active" };
                rows.push((group, topics, state, members, lag));
            }
            match format.format {
                Format::Json => {
                    let list: Vec<_> = rows
                        .iter()
                        .map(|&(group, topics, state, members, lag)| GroupJson {
                            group,
                            topics,
                            state,
                            members,
                            lag,
                        })
                        .collect();
                    output::print_json(&list)
                }
                Format::Table => {
                    let mut table = Table::new(["GROUP", "TOPICS", "STATE", "MEMBERS", "LAG"]);
                    for (group, topics, state, members, lag) in rows {
                        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                        table.row([
                            group.clone(),
                            topics.join(","),
                            state.to_string(),
                            members.to_string(),
                            lag.to_string(),
                        ]);
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
            let lags = group_lags(client, &group, topic).await?;
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
            topics,
            all_topics,
            to_earliest: _,
            to_latest,
            to_offset,
            shift_by,
            by_duration,
            to_datetime,
            execute,
            dry_run: _,
            new_group,
            format,
        } => {
            // clap makes exactly one target present; earliest is what is left.
            let target = match (to_latest, to_offset, shift_by, by_duration, to_datetime) {
                (true, ..) => Target::To(StartOffset::Latest),
                (_, Some(offset), ..) => Target::To(StartOffset::Offset(offset)),
                (_, _, Some(shift), ..) => Target::Shift(shift),
                (_, _, _, Some(ago), _) => Target::To(StartOffset::Timestamp(
                    now_ms().saturating_sub(i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)),
                )),
                (_, _, _, _, Some(ms)) => Target::To(StartOffset::Timestamp(ms)),
                _ => Target::To(StartOffset::Earliest),
            };
            let groups = client.list_groups().await?;
            let known = groups.get(&group);
            let topics = if all_topics {
                let known = known.ok_or_else(|| Error::GroupNotFound(group.clone()))?;
                known
                    .iter()
                    .map(|topic| TopicPartitions {
                        topic: topic.clone(),
                        partitions: None,
                    })
                    .collect()
            } else {
                topics
            };
            if execute && known.is_none() && !new_group {
                anyhow::bail!(
                    "consumer group {group:?} has no state in this namespace{}; \
                     pass --new-group to create it",
                    similar_groups(&group, groups.keys())
                );
            }
            let plan = plan_reset(client, &group, &topics, target).await?;
            if execute {
                let bar = output::progress("committing", plan.len() as u64);
                for (topic, moves) in &plan {
                    bar.inc(1);
                    let offsets: BTreeMap<u32, u64> =
                        moves.iter().map(|m| (m.partition, m.new)).collect();
                    client
                        .commit_offsets_unowned(topic, &group, &offsets)
                        .await?;
                }
            }
            match format.format {
                Format::Json => {
                    let offsets: Vec<_> = plan
                        .iter()
                        .flat_map(|(topic, moves)| {
                            moves.iter().map(move |m| MoveJson {
                                topic,
                                partition: m.partition,
                                current: m.current,
                                offset: m.new,
                            })
                        })
                        .collect();
                    output::print_json(&Reset {
                        executed: execute,
                        offsets,
                    })
                }
                Format::Table => {
                    let mut table = Table::new(["TOPIC", "PARTITION", "CURRENT", "NEW"]);
                    for (topic, moves) in &plan {
                        for m in moves {
                            table.row([
                                topic.clone(),
                                m.partition.to_string(),
                                output::or_dash(m.current),
                                m.new.to_string(),
                            ]);
                        }
                    }
                    let mut text = table.render();
                    if !execute {
                        text.push_str("dry run: nothing changed; add --execute to apply\n");
                    }
                    output::print_text(&text)
                }
            }
        }
        GroupCommand::Delete { group, format } => {
            client.delete_group(&group).await?;
            match format.format {
                Format::Json => output::print_json(&Deleted {
                    group: &group,
                    deleted: true,
                }),
                Format::Table => output::print_text(&format!("deleted group {group:?}\n")),
            }
        }
    }
}

/// Where `reset-offsets` moves each partition.
#[derive(Debug, Clone, Copy)]
pub(super) enum Target {
    To(StartOffset),
    /// By this many offsets from the committed one.
    Shift(i64),
}

/// One partition's move in a reset plan.
/// A group as `group list` shows it in JSON.
#[derive(Serialize)]
struct GroupJson<'a> {
    group: &'a str,
    topics: &'a BTreeSet<String>,
    state: &'a str,
    members: usize,
    lag: u64,
}

/// `group reset-offsets` in JSON: what was (or would be) committed.
#[derive(Serialize)]
struct Reset<'a> {
    executed: bool,
    offsets: Vec<MoveJson<'a>>,
}

#[derive(Serialize)]
struct MoveJson<'a> {
    topic: &'a str,
    partition: u32,
    current: Option<u64>,
    offset: u64,
}

/// `group delete` in JSON.
#[derive(Serialize)]
struct Deleted<'a> {
    group: &'a str,
    deleted: bool,
}

pub(super) struct Move {
    pub(super) partition: u32,
    pub(super) current: Option<u64>,
    pub(super) new: u64,
}

/// The new offset of every chosen partition, by topic, clamped to what is
/// stored; nothing is written.
pub(super) async fn plan_reset(
    client: &Client,
    group: &str,
    topics: &[TopicPartitions],
    target: Target,
) -> anyhow::Result<Vec<(String, Vec<Move>)>> {
    let mut plan = Vec::with_capacity(topics.len());
    let bar = output::progress("reading offsets", topics.len() as u64);
    for chosen in topics {
        bar.inc(1);
        let info = client.topic(&chosen.topic).await?;
        let committed = client.committed_offsets(&chosen.topic, group).await?;
        let partitions = match &chosen.partitions {
            Some(list) => list.clone(),
            None => (0..info.partitions).collect(),
        };
        let mut moves = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let current = committed.get(&partition).copied();
            let start = match target {
                Target::To(start) => start,
                Target::Shift(by) => {
                    let from = match current {
                        Some(offset) => offset,
                        None => {
                            client
                                .resolve_offset(&chosen.topic, partition, StartOffset::Earliest)
                                .await?
                        }
                    };
                    StartOffset::Offset(from.saturating_add_signed(by))
                }
            };
            let new = client
                .resolve_offset(&chosen.topic, partition, start)
                .await?;
            moves.push(Move {
                partition,
                current,
                new,
            });
        }
        plan.push((chosen.topic.clone(), moves));
    }
    bar.finish_and_clear();
    Ok(plan)
}

/// ` (did you mean "a" or "b"?)` for group names like `name`, or nothing.
fn similar_groups<'a>(name: &str, groups: impl Iterator<Item = &'a String>) -> String {
    let similar: Vec<String> = groups
        .filter(|g| strsim::jaro_winkler(name, g) >= 0.8)
        .map(|g| format!("{g:?}"))
        .take(3)
        .collect();
    if similar.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", similar.join(" or "))
    }
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// How many members own partitions of `group` on `topics`, and the group's
/// total lag over them.
/// Lag per partition of `group` on `topic`, or on every topic it consumes.
pub(super) async fn group_lags(
    client: &Client,
    group: &str,
    topic: Option<String>,
) -> Result<Vec<PartitionLag>, Error> {
    let topics = match topic {
        Some(topic) => vec![topic],
        None => client
            .list_groups()
            .await?
            .remove(group)
            .ok_or_else(|| Error::GroupNotFound(group.to_string()))?
            .into_iter()
            .collect(),
    };
    let mut lags = Vec::new();
    for topic in &topics {
        lags.extend(client.group_lag(topic, group).await?);
    }
    Ok(lags)
}

pub(super) async fn group_members_and_lag(
    client: &Client,
    group: &str,
    topics: &BTreeSet<String>,
) -> pubsub_etcd::Result<(usize, u64)> {
    let mut lag = 0u64;
    let mut owners = BTreeSet::new();
    for topic in topics {
        for partition in client.group_lag(topic, group).await? {
            lag += partition.lag;
            owners.extend(partition.owner);
        }
    }
    Ok((owners.len(), lag))
}
