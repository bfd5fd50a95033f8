//! `status`: one health check over etcd and this namespace, in the spirit
//! of `nats server check` and `etcdctl endpoint status`, usable as a
//! monitoring probe: it exits 1 when something needs a person.

use std::collections::BTreeSet;

use futures::{stream, StreamExt, TryStreamExt};
use pubsub_etcd::Client;
use serde::Serialize;

use super::admin::{alarm_name, member_id, AlarmJson};
use super::group::group_members_and_lag;
use super::topic::Stored;
use crate::cli::{Format, HealthLimits, StatusArgs};
use crate::output::{self, or_dash, Table};

/// How many topics, and how many groups, the report reads at once: each
/// read is a few small etcd requests, so one after another a namespace of
/// hundreds of topics takes seconds of round trips; a few at once hide
/// them without crowding a busy etcd.
const CONCURRENT_READS: usize = 8;

pub async fn run(client: &Client, args: StatusArgs) -> anyhow::Result<()> {
    let (report, problems) = report(client, args.limits).await?;
    match args.format.format {
        Format::Json => output::print_json(&report)?,
        Format::Table => output::print_text(&table(&report))?,
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// The report as JSON (what `status --format json` prints and the console's
/// overview serves), and the problems in it that need a person.
pub(crate) async fn report(
    client: &Client,
    limits: HealthLimits,
) -> anyhow::Result<(serde_json::Value, Vec<String>)> {
    let history = client.history_status().await?;
    let alarms = client.alarms().await?;
    let quota = limits.quota;
    let mut problems = Vec::new();
    for alarm in &alarms {
        problems.push(format!(
            "alarm {} raised by member {}",
            alarm_name(alarm.kind),
            member_id(alarm.member_id)
        ));
    }
    let mut members = Vec::with_capacity(history.members.len());
    for m in &history.members {
        let headroom = m
            .db_size
            .map(|size| 100.0 * (1.0 - size as f64 / quota as f64));
        if let Some(error) = &m.error {
            problems.push(format!(
                "member {} ({}) did not answer: {error}",
                m.name, m.endpoint
            ));
        }
        if let Some(headroom) = headroom.filter(|h| *h < limits.min_headroom) {
            problems.push(format!(
                "member {} has {headroom:.1}% of its {} quota left (under {}%)",
                m.name,
                bytes(quota),
                limits.min_headroom
            ));
        }
        let fragmentation = match (m.db_size, m.db_size_in_use) {
            (Some(size), Some(used)) if size > 0 => {
                Some(100.0 * (size - used) as f64 / size as f64)
            }
            _ => None,
        };
        members.push(MemberHealth {
            member_id: member_id(m.member_id),
            name: &m.name,
            endpoint: &m.endpoint,
            leader: m.leader,
            version: m.version.as_deref(),
            db_size: m.db_size,
            db_size_in_use: m.db_size_in_use,
            fragmentation_pct: fragmentation.map(round1),
            headroom_pct: headroom.map(round1),
            raft_index: m.raft_index,
            raft_term: m.raft_term,
            error: m.error.as_deref(),
        });
    }

    let now = jiff::Timestamp::now().as_millisecond();
    let reads: Vec<_> = client
        .list_topics()
        .await?
        .into_iter()
        .map(|topic| async move {
            let description = client.describe_topic(&topic.name).await?;
            let stored = Stored::of(client, &description).await?;
            anyhow::Ok(TopicHealth {
                name: topic.name,
                partitions: topic.partitions,
                stored_messages: stored.messages,
                newest_age_ms: stored.last_timestamp_ms.map(|t| (now - t).max(0)),
            })
        })
        .collect();
    let topics: Vec<TopicHealth> = stream::iter(reads)
        .buffered(CONCURRENT_READS)
        .try_collect()
        .await?;

    let reads: Vec<_> = client
        .list_groups()
        .await?
        .into_iter()
        .map(|(group, group_topics)| async move {
            let (members, lag) = group_members_and_lag(client, &group, &group_topics).await?;
            anyhow::Ok(GroupHealth {
                group,
                topics: group_topics,
                members,
                lag,
            })
        })
        .collect();
    let groups: Vec<GroupHealth> = stream::iter(reads)
        .buffered(CONCURRENT_READS)
        .try_collect()
        .await?;

    let report = Report {
        ok: problems.is_empty(),
        problems: &problems,
        etcd: EtcdHealth {
            revision: history.revision,
            oldest_revision: history.oldest_revision,
            history_span: history.revision - history.oldest_revision,
            quota_bytes: quota,
            members,
            alarms: alarms.iter().map(AlarmJson::from).collect(),
        },
        namespace: client.namespace(),
        topics,
        groups,
    };
    let report = serde_json::to_value(report)?;
    Ok((report, problems))
}

/// What `status --format json` prints.
#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    problems: &'a [String],
    etcd: EtcdHealth<'a>,
    namespace: &'a str,
    topics: Vec<TopicHealth>,
    groups: Vec<GroupHealth>,
}

#[derive(Serialize)]
struct EtcdHealth<'a> {
    revision: i64,
    oldest_revision: i64,
    history_span: i64,
    quota_bytes: u64,
    members: Vec<MemberHealth<'a>>,
    alarms: Vec<AlarmJson>,
}

#[derive(Serialize)]
struct MemberHealth<'a> {
    member_id: String,
    name: &'a str,
    endpoint: &'a str,
    leader: Option<bool>,
    version: Option<&'a str>,
    db_size: Option<i64>,
    db_size_in_use: Option<i64>,
    fragmentation_pct: Option<f64>,
    headroom_pct: Option<f64>,
    raft_index: Option<u64>,
    raft_term: Option<u64>,
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct TopicHealth {
    name: String,
    partitions: u32,
    stored_messages: u64,
    newest_age_ms: Option<i64>,
}

#[derive(Serialize)]
struct GroupHealth {
    group: String,
    topics: BTreeSet<String>,
    members: usize,
    lag: u64,
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

fn bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).to_string()
}

fn table(report: &serde_json::Value) -> String {
    let cell = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let size = |v: &serde_json::Value| or_dash(v.as_u64().map(bytes));
    let etcd = &report["etcd"];
    let mut text = format!(
        "etcd: revision {}, history span {} revisions, quota {}\n\n",
        etcd["revision"],
        etcd["history_span"],
        size(&etcd["quota_bytes"])
    );
    let mut members = Table::new([
        "MEMBER",
        "ENDPOINT",
        "LEADER",
        "DB SIZE",
        "IN USE",
        "FRAG %",
        "HEADROOM %",
        "RAFT INDEX",
    ]);
    for m in etcd["members"].as_array().into_iter().flatten() {
        members.row([
            cell(&m["name"]),
            cell(&m["endpoint"]),
            cell(&m["leader"]),
            size(&m["db_size"]),
            size(&m["db_size_in_use"]),
            cell(&m["fragmentation_pct"]),
            cell(&m["headroom_pct"]),
            cell(&m["raft_index"]),
        ]);
    }
    text.push_str(&members.render());
    let mut topics = Table::new(["TOPIC", "PARTITIONS", "STORED", "NEWEST AGE"]);
    for t in report["topics"].as_array().into_iter().flatten() {
        let age = t["newest_age_ms"].as_i64().map(|ms| {
            humantime::format_duration(std::time::Duration::from_secs((ms / 1000) as u64))
                .to_string()
        });
        topics.row([
            cell(&t["name"]),
            cell(&t["partitions"]),
            cell(&t["stored_messages"]),
            or_dash(age),
        ]);
    }
    text.push('\n');
    text.push_str(&topics.render());
    let mut groups = Table::new(["GROUP", "TOPICS", "MEMBERS", "LAG"]);
    for g in report["groups"].as_array().into_iter().flatten() {
        let topics: Vec<String> = g["topics"]
            .as_array()
            .into_iter()
            .flatten()
            .map(cell)
            .collect();
        groups.row([
            cell(&g["group"]),
            topics.join(","),
            cell(&g["members"]),
            cell(&g["lag"]),
        ]);
    }
    text.push('\n');
    text.push_str(&groups.render());
    match report["problems"].as_array() {
        Some(problems) if !problems.is_empty() => {
            text.push('\n');
            for p in problems {
                text.push_str(&format!("PROBLEM: {}\n", cell(p)));
            }
        }
        _ => text.push_str("\nOK\n"),
    }
    text
}
