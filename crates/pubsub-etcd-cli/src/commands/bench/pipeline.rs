//! `bench pipeline`: one group member copying a backlog from one topic to
//! another, exactly once (each batch's outputs and offsets in one
//! `Transaction`) against plain consume-then-produce (a producer's
//! `send_batch`, then a commit) of the same backlog with the same batches,
//! in the same run against the same etcd.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use pubsub_etcd::{AutoCommit, Client, Consumer, Message, NewTopic, Record};
use serde::Serialize;

use super::payload::Values;
use super::{megabytes_per_second, progress, ratio, Summary};
use crate::cli::BenchPipelineArgs;
use crate::output::Table;

const INPUT: &str = "pipeline-in";
const EXACTLY_ONCE: &str = "pipeline-out-exactly-once";
const PLAIN: &str = "pipeline-out-plain";
/// Distinct keys of the backlog: outputs keep their input's key, so both
/// stages write every output partition.
const KEYS: u64 = 1000;
/// A stage with no message for this long has stalled.
const STALL: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
pub struct PipelineSummary {
    settings: Settings,
    backlog_seconds: f64,
    exactly_once: Stage,
    plain: Stage,
    /// Exactly-once msgs/s over plain msgs/s.
    ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Settings {
    messages: u64,
    size: u32,
    partitions: u32,
    batch: usize,
}

#[derive(Debug, Serialize)]
struct Stage {
    messages: u64,
    /// Commits: transactions, or send-then-commit rounds.
    batches: u64,
    /// From joining the group to the last commit.
    seconds: f64,
    msgs_per_sec: f64,
    /// Value bytes moved.
    mb_per_sec: f64,
}

pub async fn run(client: &Client, args: &BenchPipelineArgs) -> anyhow::Result<PipelineSummary> {
    for topic in [INPUT, EXACTLY_ONCE, PLAIN] {
        client
            .create_topic(NewTopic::new(topic, args.partitions))
            .await?;
    }
    let backlog_seconds = produce_backlog(client, args).await?;
    let plain = plain(client, args).await.context("plain stage")?;
    let exactly_once = exactly_once(client, args)
        .await
        .context("exactly-once stage")?;
    for topic in [PLAIN, EXACTLY_ONCE] {
        let stored: u64 = client
            .describe_topic(topic)
            .await?
            .partitions
            .iter()
            .map(|p| p.next)
            .sum();
        anyhow::ensure!(
            stored == args.messages,
            "{topic} holds {stored} messages, not the {} copied",
            args.messages
        );
    }
    Ok(PipelineSummary {
        settings: Settings {
            messages: args.messages,
            size: args.size,
            partitions: args.partitions,
            batch: args.batch,
        },
        backlog_seconds,
        ratio: ratio(exactly_once.msgs_per_sec, plain.msgs_per_sec),
        exactly_once,
        plain,
    })
}

async fn produce_backlog(client: &Client, args: &BenchPipelineArgs) -> anyhow::Result<f64> {
    let producer = client.producer(INPUT).build().await?;
    let mut values = Values::new(crate::cli::Payload::Random, args.size);
    let bar = progress(args.messages, "backlog");
    let started = Instant::now();
    let mut sent = 0;
    while sent < args.messages {
        let n = (args.messages - sent).min(10_000);
        let records = (sent..sent + n).map(|i| Record::new(values.next_value()).key(key(i)));
        for result in producer.send_batch(records).await {
            result.context("producing the backlog")?;
        }
        sent += n;
        bar.inc(n);
    }
    producer.close().await?;
    bar.finish_and_clear();
    Ok(started.elapsed().as_secs_f64())
}

fn key(i: u64) -> String {
    format!("key-{}", i % KEYS)
}

/// A member of `group` on the backlog, committing only when told.
async fn join(client: &Client, group: &str) -> anyhow::Result<Consumer> {
    Ok(client
        .consumer(INPUT, group)
        .auto_commit(AutoCommit::Disabled)
        .join()
        .await?)
}

/// Up to `room` messages: waits for the first, then takes what is there.
async fn next_batch(consumer: &mut Consumer, room: usize) -> anyhow::Result<Vec<Message>> {
    let mut batch = Vec::with_capacity(room);
    while batch.len() < room {
        let wait = if batch.is_empty() {
            STALL
        } else {
            Duration::ZERO
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Some(message)) => batch.push(message?),
            Ok(None) => anyhow::bail!("the consumer closed"),
            Err(_) if batch.is_empty() => anyhow::bail!("stalled: no message for {STALL:?}"),
            Err(_) => break,
        }
    }
    Ok(batch)
}

/// The output of an input: the same value and key.
fn output(message: &Message) -> Record {
    let record = Record::new(message.value.clone());
    match &message.key {
        Some(key) => record.key(key.clone()),
        None => record,
    }
}

async fn exactly_once(client: &Client, args: &BenchPipelineArgs) -> anyhow::Result<Stage> {
    let bar = progress(args.messages, "exactly-once");
    let started = Instant::now();
    let mut consumer = join(client, "exactly-once").await?;
    let mut tx = consumer.transaction();
    let (mut moved, mut bytes, mut batches) = (0u64, 0u64, 0u64);
    while moved < args.messages {
        let room = args.batch.min((args.messages - moved) as usize);
        let batch = next_batch(&mut consumer, room).await?;
        for message in &batch {
            tx.send(EXACTLY_ONCE, output(message));
            tx.commit_input(message);
            bytes += message.value.len() as u64;
        }
        tx.commit().await?;
        moved += batch.len() as u64;
        batches += 1;
        bar.inc(batch.len() as u64);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    consumer.close().await?;
    Ok(stage(moved, batches, bytes, seconds))
}

async fn plain(client: &Client, args: &BenchPipelineArgs) -> anyhow::Result<Stage> {
    let bar = progress(args.messages, "plain");
    let producer = client.producer(PLAIN).build().await?;
    let started = Instant::now();
    let mut consumer = join(client, "plain").await?;
    let (mut moved, mut bytes, mut batches) = (0u64, 0u64, 0u64);
    while moved < args.messages {
        let room = args.batch.min((args.messages - moved) as usize);
        let batch = next_batch(&mut consumer, room).await?;
        bytes += batch.iter().map(|m| m.value.len() as u64).sum::<u64>();
        for result in producer.send_batch(batch.iter().map(output)).await {
            result?;
        }
        consumer.commit_delivered().await?;
        moved += batch.len() as u64;
        batches += 1;
        bar.inc(batch.len() as u64);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    consumer.close().await?;
    producer.close().await?;
    Ok(stage(moved, batches, bytes, seconds))
}

fn stage(messages: u64, batches: u64, bytes: u64, seconds: f64) -> Stage {
    Stage {
        messages,
        batches,
        seconds,
        msgs_per_sec: messages as f64 / seconds,
        mb_per_sec: megabytes_per_second(bytes, seconds),
    }
}

impl Summary for PipelineSummary {
    const BENCH: &'static str = "pipeline";

    fn text(&self, namespace: &str) -> String {
        let s = &self.settings;
        let mut text = format!(
            "bench pipeline: {} messages of {} B random values, {} keys, {} partition(s) in and \
             out, 1 member, batches of up to {}; namespace {namespace}\n\
             backlog produced in {:.2} s\n\n",
            s.messages, s.size, KEYS, s.partitions, s.batch, self.backlog_seconds
        );
        let mut table = Table::new(["", "msgs/s", "MB/s", "batches", "seconds"]);
        for (name, stage) in [
            ("exactly-once (transactions)", &self.exactly_once),
            ("plain consume-then-produce", &self.plain),
        ] {
            table.row([
                name.to_string(),
                format!("{:.0}", stage.msgs_per_sec),
                format!("{:.2}", stage.mb_per_sec),
                stage.batches.to_string(),
                format!("{:.2}", stage.seconds),
            ]);
        }
        text.push_str(&table.render());
        text.push_str(&format!(
            "\nexactly-once / plain: {}\n",
            super::cell(self.ratio)
        ));
        text
    }
}
