//! `bench queue`: how fast queue workers settle a backlog with one ack per
//! message and a no-op job, next to a consumer group draining the same
//! backlog in the same run, and the etcd requests and key writes each
//! settled message costs.
//!
//! Both drains read one backlog: the group first (it commits offsets only,
//! so the queue still finds every message unsettled), then the queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::stream::{FuturesUnordered, StreamExt as _};
use pubsub_etcd::{Client, NewTopic, QueueStats};
use serde::Serialize;
use tokio::sync::watch;

use super::consume::{produce_backlog, Backlog};
use super::etcd_metrics::{Counters, EtcdMetrics};
use super::{cell, ratio, Summary};
use crate::cli::{BenchQueueArgs, ConnectionArgs};
use crate::output::Table;

const TOPIC: &str = "jobs";
const GROUP: &str = "drain";
const QUEUE: &str = "work";
/// The queue of the drain with unconfirmed acks: a second queue reads the
/// same backlog from the start.
const QUEUE_NOWAIT: &str = "work-nowait";
/// A drain with no message for this long has stalled.
const STALL: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
pub struct QueueSummary {
    settings: Settings,
    /// Where the etcd counts come from; absent when not reachable.
    etcd_metrics: Option<String>,
    backlog: Backlog,
    group: Drain,
    /// Acks awaited until stored.
    queue: QueueDrain,
    /// Acks handed over without waiting, stored by each worker's flushes.
    queue_nowait: QueueDrain,
}

/// One queue's drain of the backlog.
#[derive(Debug, Serialize)]
struct QueueDrain {
    acks: Acks,
    /// The queue's name: each drain has a queue of its own.
    name: &'static str,
    drain: Drain,
    detail: QueueDetail,
    /// Queue msgs/s over group msgs/s.
    ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Settings {
    messages: u64,
    size: u32,
    partitions: u32,
    workers: u32,
    group_members: u32,
    /// None: the library's default.
    max_batch: Option<u64>,
    /// Milliseconds; none: the library's default.
    flush_interval_ms: Option<u128>,
    acks_in_flight: u32,
}

/// One way of consuming the whole backlog.
#[derive(Debug, Serialize)]
struct Drain {
    /// Distinct messages consumed (group) or settled (queue).
    messages: u64,
    /// From the first join to the last message (group), or until every
    /// ack is stored (queue).
    seconds: f64,
    msgs_per_sec: f64,
    etcd: Option<EtcdWork>,
}

/// What etcd did during one drain.
#[derive(Debug, Serialize)]
struct EtcdWork {
    requests: u64,
    keys_written: u64,
    requests_per_message: f64,
    keys_written_per_message: f64,
}

#[derive(Debug, Serialize)]
struct QueueDetail {
    /// Jobs received, counting redeliveries.
    deliveries: u64,
    /// Deliveries beyond the first of a message.
    duplicates: u64,
    /// The queue's counters once every worker closed.
    stats: QueueStats,
}

pub async fn run(
    client: &Client,
    connection: &ConnectionArgs,
    args: &BenchQueueArgs,
) -> anyhow::Result<QueueSummary> {
    let metrics = EtcdMetrics::locate(args.etcd_metrics.as_deref(), connection).await;
    client
        .create_topic(NewTopic::new(TOPIC, args.partitions))
        .await?;
    let backlog = produce_backlog(client, TOPIC, args.messages, args.size, &args.data).await?;
    let before = read(metrics.as_ref()).await;
    let (messages, seconds) = group_drain(client, args).await?;
    let group = drain(messages, seconds, before, read(metrics.as_ref()).await);
    let queue = queue_phase(client, args, metrics.as_ref(), Acks::Confirmed, &group).await?;
    let queue_nowait = queue_phase(client, args, metrics.as_ref(), Acks::Nowait, &group).await?;
    Ok(QueueSummary {
        settings: Settings {
            messages: args.messages,
            size: args.size,
            partitions: args.partitions,
            workers: args.workers,
            group_members: args.group_members,
            max_batch: args.max_batch,
            flush_interval_ms: args.flush_interval.map(|d| d.as_millis()),
            acks_in_flight: args.acks_in_flight,
        },
        etcd_metrics: metrics.map(|m| m.url().to_string()),
        backlog,
        group,
        queue,
        queue_nowait,
    })
}

/// One queue drain of the backlog, next to the group's.
async fn queue_phase(
    client: &Client,
    args: &BenchQueueArgs,
    metrics: Option<&EtcdMetrics>,
    acks: Acks,
    group: &Drain,
) -> anyhow::Result<QueueDrain> {
    let before = read(metrics).await;
    let (settled, deliveries, seconds) = queue_drain(client, args, acks).await?;
    let drain = drain(settled, seconds, before, read(metrics).await);
    let stats = client.queue_stats(TOPIC, acks.queue()).await?;
    Ok(QueueDrain {
        acks,
        name: acks.queue(),
        ratio: ratio(drain.msgs_per_sec, group.msgs_per_sec),
        drain,
        detail: QueueDetail {
            deliveries,
            duplicates: deliveries.saturating_sub(settled),
            stats,
        },
    })
}

async fn read(metrics: Option<&EtcdMetrics>) -> Option<Counters> {
    metrics?.read().await.ok()
}

fn drain(messages: u64, seconds: f64, before: Option<Counters>, after: Option<Counters>) -> Drain {
    let etcd = before.zip(after).map(|(before, after)| {
        let work = after.since(before);
        let per = messages.max(1) as f64;
        EtcdWork {
            requests: work.requests,
            keys_written: work.keys_written,
            requests_per_message: work.requests as f64 / per,
            keys_written_per_message: work.keys_written as f64 / per,
        }
    });
    Drain {
        messages,
        seconds,
        msgs_per_sec: messages as f64 / seconds,
        etcd,
    }
}

/// A group of `group_members` tasks reads the backlog from the start; the
/// time until the last message arrived.
async fn group_drain(client: &Client, args: &BenchQueueArgs) -> anyhow::Result<(u64, f64)> {
    let received = Arc::new(AtomicU64::new(0));
    let (done_tx, done) = watch::channel(false);
    let done_tx = Arc::new(done_tx);
    let started = Instant::now();
    let mut members = Vec::new();
    for _ in 0..args.group_members {
        let consumer = client.consumer(TOPIC, GROUP).join().await?;
        let (received, done_tx, mut done) = (received.clone(), done_tx.clone(), done.clone());
        let total = args.messages;
        members.push(tokio::spawn(async move {
            let mut consumer = consumer;
            let outcome = loop {
                tokio::select! {
                    message = tokio::time::timeout(STALL, consumer.recv()) => match message {
                        Ok(Some(Ok(_))) => {
                            if received.fetch_add(1, Ordering::Relaxed) + 1 == total {
                                let _ = done_tx.send(true);
                            }
                        }
                        Ok(Some(Err(e))) => break Err(anyhow::Error::from(e)),
                        Ok(None) => break Err(anyhow::anyhow!("a group member closed")),
                        Err(_) => break Err(anyhow::anyhow!("no message for {STALL:?}")),
                    },
                    _ = done.wait_for(|&d| d) => break Ok(()),
                }
            };
            consumer.close().await?;
            outcome
        }));
    }
    let mut finished = done.clone();
    let seconds = tokio::select! {
        _ = finished.wait_for(|&d| d) => started.elapsed().as_secs_f64(),
        failed = first_failure(&mut members) => return Err(failed),
    };
    let _ = done_tx.send(true);
    for member in members {
        member.await??;
    }
    Ok((received.load(Ordering::Relaxed), seconds))
}

/// How the queue workers of one drain ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Acks {
    /// `Job::ack`, each awaited until etcd stores it, up to
    /// `acks_in_flight` at a time per worker.
    Confirmed,
    /// `Job::ack_nowait`, then one `QueueConsumer::flush` per worker at
    /// the end.
    Nowait,
}

impl Acks {
    fn queue(self) -> &'static str {
        match self {
            Acks::Confirmed => QUEUE,
            Acks::Nowait => QUEUE_NOWAIT,
        }
    }
}

/// `workers` queue workers take jobs and ack each at once; the time until
/// every worker's acks are stored (the last confirmed ack, or each worker's
/// final flush), and the deliveries counted.
async fn queue_drain(
    client: &Client,
    args: &BenchQueueArgs,
    acks_mode: Acks,
) -> anyhow::Result<(u64, u64, f64)> {
    let seen = Arc::new(Marks::new(args.partitions, args.messages));
    let settled = Arc::new(Marks::new(args.partitions, args.messages));
    let deliveries = Arc::new(AtomicU64::new(0));
    let (done_tx, done) = watch::channel(false);
    let done_tx = Arc::new(done_tx);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.workers {
        let mut builder = client.queue(TOPIC, acks_mode.queue());
        if let Some(n) = args.max_batch {
            builder = builder.max_batch(n);
        }
        if let Some(interval) = args.flush_interval {
            builder = builder.flush_interval(interval);
        }
        let mut queue = builder.join().await?;
        let (seen, settled, deliveries) = (seen.clone(), settled.clone(), deliveries.clone());
        let (done_tx, mut done) = (done_tx.clone(), done.clone());
        let (total, in_flight) = (args.messages, args.acks_in_flight as usize);
        workers.push(tokio::spawn(async move {
            let mut acks = FuturesUnordered::new();
            let settle = |id| match settled.mark(id) {
                Ok(marked) => {
                    if marked == total {
                        let _ = done_tx.send(true);
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            };
            let outcome = loop {
                tokio::select! {
                    Some((id, acked)) = acks.next(), if !acks.is_empty() => {
                        if let Err(e) = acked {
                            break Err(anyhow::Error::from(e).context("an ack failed"));
                        }
                        if let Err(e) = settle(id) {
                            break Err(e);
                        }
                    }
                    job = tokio::time::timeout(STALL, queue.recv()), if acks.len() < in_flight => match job {
                        Ok(Some(Ok(job))) => {
                            deliveries.fetch_add(1, Ordering::Relaxed);
                            let id = (job.message.partition, job.message.offset);
                            if let Err(e) = seen.mark(id) {
                                break Err(e);
                            }
                            match acks_mode {
                                Acks::Confirmed => {
                                    // Handed over now; the future waits for etcd.
                                    let acked = job.ack();
                                    acks.push(async move { (id, acked.await) });
                                }
                                Acks::Nowait => {
                                    if let Err(e) = job.ack_nowait().await {
                                        break Err(anyhow::Error::from(e).context("an ack failed"));
                                    }
                                    if let Err(e) = settle(id) {
                                        break Err(e);
                                    }
                                }
                            }
                        }
                        Ok(Some(Err(e))) => break Err(anyhow::Error::from(e)),
                        Ok(None) => break Err(anyhow::anyhow!("a queue worker closed")),
                        Err(_) => break Err(anyhow::anyhow!("no job for {STALL:?}")),
                    },
                    // The watch's guard must not live across the ack awaited above.
                    _ = async { done.wait_for(|&d| d).await.map(drop) } => break Ok(()),
                }
            };
            let flushed = queue.flush().await;
            let stored_at = started.elapsed().as_secs_f64();
            queue.close().await;
            outcome?;
            flushed.context("flushing the acks")?;
            Ok(stored_at)
        }));
    }
    let mut finished = done.clone();
    tokio::select! {
        _ = finished.wait_for(|&d| d) => {}
        failed = first_failure(&mut workers) => return Err(failed),
    };
    let _ = done_tx.send(true);
    let mut seconds = 0.0f64;
    for worker in workers {
        seconds = seconds.max(worker.await??);
    }
    let settled = settled.count();
    let distinct = seen.count();
    anyhow::ensure!(
        distinct == settled,
        "{distinct} messages delivered, {settled} settled"
    );
    Ok((settled, deliveries.load(Ordering::Relaxed), seconds))
}

/// Which messages of the backlog happened, one bit each: the workers mark
/// them without a lock, so the bookkeeping costs the queue side no more
/// than the group side's counter. Offsets of the fresh benchmark topic are
/// below the message count in every partition.
struct Marks {
    bits: Vec<AtomicU64>,
    per_partition: u64,
    count: AtomicU64,
}

impl Marks {
    fn new(partitions: u32, messages: u64) -> Marks {
        let words = (u64::from(partitions) * messages).div_ceil(64) as usize;
        Marks {
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            per_partition: messages,
            count: AtomicU64::new(0),
        }
    }

    /// Marks one message; the distinct messages marked so far.
    fn mark(&self, (partition, offset): (u32, u64)) -> anyhow::Result<u64> {
        anyhow::ensure!(
            offset < self.per_partition,
            "offset {offset} of partition {partition} is past the backlog"
        );
        let bit = u64::from(partition) * self.per_partition + offset;
        let word = self
            .bits
            .get((bit / 64) as usize)
            .ok_or_else(|| anyhow::anyhow!("partition {partition} is not the benchmark's"))?;
        let mask = 1u64 << (bit % 64);
        if word.fetch_or(mask, Ordering::Relaxed) & mask == 0 {
            Ok(self.count.fetch_add(1, Ordering::Relaxed) + 1)
        } else {
            Ok(self.count.load(Ordering::Relaxed))
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The first error of a task that ended; pending while none failed.
async fn first_failure<T>(
    tasks: &mut [tokio::task::JoinHandle<anyhow::Result<T>>],
) -> anyhow::Error {
    let mut running: FuturesUnordered<_> = tasks.iter_mut().collect();
    while let Some(ended) = running.next().await {
        match ended {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return e,
            Err(e) => return anyhow::Error::from(e).context("a task panicked"),
        }
    }
    std::future::pending().await
}

impl Summary for QueueSummary {
    const BENCH: &'static str = "queue";

    fn text(&self, namespace: &str) -> String {
        let s = &self.settings;
        let batch = s
            .max_batch
            .map_or_else(|| "default".to_string(), |n| n.to_string());
        let flush = s
            .flush_interval_ms
            .map_or_else(|| "default".to_string(), |ms| format!("{ms} ms"));
        let mut text = format!(
            "bench queue: backlog of {} messages of {} B in {} partition(s); group of {} member(s) \
             against {} queue workers (max_batch {batch}, flush interval {flush}, up to {} acks in \
             flight each, one ack per message, no-op jobs); namespace {namespace}\n\
             backlog produced at {:.0} msgs/s; etcd counts from {}\n\n",
            s.messages,
            s.size,
            s.partitions,
            s.group_members,
            s.workers,
            s.acks_in_flight,
            self.backlog.msgs_per_sec,
            self.etcd_metrics.as_deref().unwrap_or("(no metrics)"),
        );
        let mut table = Table::new([
            "",
            "messages",
            "seconds",
            "msgs/s",
            "etcd requests/msg",
            "keys written/msg",
        ]);
        for (name, d) in [
            ("group drain", &self.group),
            ("queue, ack each", &self.queue.drain),
            ("queue, ack_nowait each", &self.queue_nowait.drain),
        ] {
            table.row([
                name.to_string(),
                d.messages.to_string(),
                format!("{:.2}", d.seconds),
                format!("{:.0}", d.msgs_per_sec),
                cell(d.etcd.as_ref().map(|e| e.requests_per_message)),
                d.etcd.as_ref().map_or_else(
                    || "-".to_string(),
                    |e| format!("{:.4}", e.keys_written_per_message),
                ),
            ]);
        }
        text.push_str(&table.render());
        text.push('\n');
        for q in [&self.queue, &self.queue_nowait] {
            let d = &q.detail;
            text.push_str(&format!(
                "queue {}/group: {}; {} deliveries, {} duplicates; redelivered {}, expired {}\n",
                q.name,
                cell(q.ratio),
                d.deliveries,
                d.duplicates,
                d.stats.redelivered,
                d.stats.expired,
            ));
        }
        text
    }
}
