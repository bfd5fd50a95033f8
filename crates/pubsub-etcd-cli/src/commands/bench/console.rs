//! `bench console`: how long the console's overview (`/api/overview`, the
//! report `status --format json` prints) takes to build for many topics,
//! partitions and groups. The console serves it from a cache refreshed at
//! most once a second, so this is what a page waits for at worst.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context as _;
use futures::{stream, StreamExt as _, TryStreamExt as _};
use pubsub_etcd::{Client, NewTopic, Record};
use serde::Serialize;

use super::{progress, Summary};
use crate::cli::{BenchConsoleArgs, HealthLimits};
use crate::output::Table;

/// Topics seeded at once.
const CONCURRENT_SEEDS: usize = 8;

#[derive(Debug, Serialize)]
pub struct ConsoleSummary {
    settings: Settings,
    seed_seconds: f64,
    /// Milliseconds per build of the overview, in the order measured.
    builds_ms: Vec<f64>,
    first_ms: f64,
    median_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Settings {
    topics: u32,
    partitions: u32,
    groups: u32,
    messages: u32,
    rounds: u32,
}

fn topic_name(i: u32) -> String {
    format!("console-{i:04}")
}

pub async fn run(client: &Client, args: &BenchConsoleArgs) -> anyhow::Result<ConsoleSummary> {
    let started = Instant::now();
    let bar = progress(u64::from(args.topics), "topics");
    stream::iter(0..args.topics)
        .map(|i| seed_topic(client, args, i))
        .buffer_unordered(CONCURRENT_SEEDS)
        .inspect_ok(|()| bar.inc(1))
        .try_collect::<()>()
        .await?;
    bar.finish_and_clear();
    // Each group has committed half of every partition of one topic.
    for g in 0..args.groups {
        let topic = topic_name(g % args.topics);
        let offsets: BTreeMap<u32, u64> = (0..args.partitions)
            .map(|p| (p, u64::from(args.messages / 2)))
            .collect();
        client
            .commit_offsets_unowned(&topic, &format!("group-{g:03}"), &offsets)
            .await
            .with_context(|| format!("committing for group {g} on {topic}"))?;
    }
    let seed_seconds = started.elapsed().as_secs_f64();
    let limits = HealthLimits {
        quota: 2 << 30,
        min_headroom: 10.0,
    };
    let mut builds_ms = Vec::with_capacity(args.rounds as usize);
    for _ in 0..args.rounds {
        let at = Instant::now();
        let (report, _) = super::super::status::report(client, limits).await?;
        builds_ms.push(at.elapsed().as_secs_f64() * 1e3);
        let topics = report["topics"].as_array().map_or(0, Vec::len);
        let groups = report["groups"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(
            topics == args.topics as usize && groups == args.groups as usize,
            "the overview shows {topics} topics and {groups} groups, not {} and {}",
            args.topics,
            args.groups
        );
    }
    let mut sorted = builds_ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(ConsoleSummary {
        settings: Settings {
            topics: args.topics,
            partitions: args.partitions,
            groups: args.groups,
            messages: args.messages,
            rounds: args.rounds,
        },
        seed_seconds,
        first_ms: builds_ms[0],
        median_ms: sorted[sorted.len() / 2],
        max_ms: sorted[sorted.len() - 1],
        builds_ms,
    })
}

async fn seed_topic(client: &Client, args: &BenchConsoleArgs, i: u32) -> anyhow::Result<()> {
    let name = topic_name(i);
    client
        .create_topic(NewTopic::new(&name, args.partitions))
        .await?;
    if args.messages == 0 {
        return Ok(());
    }
    let producer = client.producer(&name).build().await?;
    let records = (0..args.partitions).flat_map(|p| {
        (0..args.messages).map(move |m| Record::new(format!("message {m}")).partition(p))
    });
    for result in producer.send_batch(records).await {
        result.with_context(|| format!("seeding {name}"))?;
    }
    producer.close().await?;
    Ok(())
}

impl Summary for ConsoleSummary {
    const BENCH: &'static str = "console";

    fn text(&self, namespace: &str) -> String {
        let s = &self.settings;
        let mut text = format!(
            "bench console: the overview of {} topics of {} partitions ({} messages each) and \
             {} groups, built {} times; namespace {namespace}\nseeded in {:.2} s\n\n",
            s.topics, s.partitions, s.messages, s.groups, s.rounds, self.seed_seconds
        );
        let mut table = Table::new(["overview build", "ms"]);
        for (name, ms) in [
            ("first", self.first_ms),
            ("median", self.median_ms),
            ("max", self.max_ms),
        ] {
            table.row([name.to_string(), format!("{ms:.0}")]);
        }
        text.push_str(&table.render());
        text
    }
}
