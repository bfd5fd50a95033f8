//! `bench latency`: send-to-delivery latency through a consumer group at a
//! fixed rate; raw etcd put-to-watch-event latency as the baseline.
//!
//! Sender and receiver live in this process and share one monotonic clock:
//! each payload carries its sequence number and send time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use etcd_client::{EventType, WatchOptions};
use hdrhistogram::Histogram;
use pubsub_etcd::{Client, Event, NewTopic, Record};
use serde::Serialize;
use tokio::task::JoinSet;

use super::{cell, histogram, progress, ratio, record, Pacer, Percentiles, Summary};
use crate::cli::BenchLatencyArgs;
use crate::output::Table;

const TOPIC: &str = "latency";
const GROUP: &str = "bench";
/// The first second of sends warms up connections and caches; its
/// messages are delivered and counted but not measured.
const WARM_UP: Duration = Duration::from_secs(1);
/// How long the receiver waits for stragglers after the last send.
const GRACE: Duration = Duration::from_secs(30);
/// How long the consumer may take to be assigned its partition.
const ASSIGNMENT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize)]
pub struct LatencySummary {
    settings: Settings,
    pubsub: Latency,
    raw: Option<Latency>,
    ratio: Option<Ratio>,
}

#[derive(Debug, Serialize)]
struct Settings {
    rate: u64,
    seconds: u64,
    warm_up_seconds: u64,
    size: u32,
}

#[derive(Debug, Serialize)]
struct Latency {
    sent: u64,
    received: u64,
    /// Sent but never received.
    lost: u64,
    /// Received twice or out of order (not counted for raw etcd, whose
    /// concurrent puts may commit in any order).
    anomalies: u64,
    write_errors: u64,
    /// The send rate the pacer achieved.
    achieved_rate: f64,
    /// Send (raw: put call) to delivery (raw: watch event), after warm-up.
    delivery_ms: Percentiles,
    /// Send (raw: put call) to stored (raw: put response), after warm-up.
    ack_ms: Percentiles,
}

/// pubsub-etcd divided by raw etcd.
#[derive(Debug, Serialize)]
struct Ratio {
    delivery_p50: Option<f64>,
    delivery_p99: Option<f64>,
}

pub async fn run(client: &Client, args: &BenchLatencyArgs) -> anyhow::Result<LatencySummary> {
    let pubsub = pubsub_latency(client, args).await?;
    let raw = if args.options.compare_raw {
        Some(raw_latency(client, args).await?)
    } else {
        None
    };
    let ratio = raw.as_ref().map(|raw| {
        let of = |a: Option<f64>, b: Option<f64>| a.zip(b).and_then(|(a, b)| ratio(a, b));
        Ratio {
            delivery_p50: of(pubsub.delivery_ms.p50, raw.delivery_ms.p50),
            delivery_p99: of(pubsub.delivery_ms.p99, raw.delivery_ms.p99),
        }
    });
    Ok(LatencySummary {
        settings: Settings {
            rate: args.rate,
            seconds: args.seconds,
            warm_up_seconds: WARM_UP.as_secs(),
            size: args.size,
        },
        pubsub,
        raw,
        ratio,
    })
}

/// A payload of `size` bytes carrying its sequence number and send time
/// (nanoseconds since `base`).
fn stamped(size: u32, seq: u64, sent_ns: u64) -> Vec<u8> {
    let mut value = vec![b'.'; size as usize];
    value[..8].copy_from_slice(&seq.to_le_bytes());
    value[8..16].copy_from_slice(&sent_ns.to_le_bytes());
    value
}

fn read_stamp(value: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(value.get(8..16)?.try_into().ok()?);
    Some((seq, sent))
}

/// Drops the tasks that have finished: a `JoinSet` keeps them until joined,
/// which over a long run would hold one per message sent.
fn reap(tasks: &mut JoinSet<()>) {
    while tasks.try_join_next().is_some() {}
}

fn nanos_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What arrives: latency after warm-up, duplicates, reordering.
struct Arrivals {
    base: Instant,
    /// Sequence numbers below this were sent during the warm-up.
    warm_up: u64,
    histogram: Histogram<u64>,
    received: u64,
    next_seq: u64,
    anomalies: u64,
}

impl Arrivals {
    fn new(base: Instant, warm_up: u64) -> Self {
        Arrivals {
            base,
            warm_up,
            histogram: histogram(),
            received: 0,
            next_seq: 0,
            anomalies: 0,
        }
    }

    fn arrived(&mut self, value: &[u8]) {
        let now = nanos_since(self.base);
        let Some((seq, sent)) = read_stamp(value) else {
            self.anomalies += 1;
            return;
        };
        if seq != self.next_seq {
            self.anomalies += 1;
        }
        self.next_seq = self.next_seq.max(seq + 1);
        self.received += 1;
        if seq >= self.warm_up {
            self.histogram
                .saturating_record(now.saturating_sub(sent) / 1000);
        }
    }
}

/// What the send side of a phase shares with its acknowledgement tasks.
struct Acks {
    base: Instant,
    warm_up: u64,
    histogram: Mutex<Histogram<u64>>,
    errors: AtomicU64,
}

impl Acks {
    fn new(base: Instant, warm_up: u64) -> Arc<Self> {
        Arc::new(Acks {
            base,
            warm_up,
            histogram: Mutex::new(histogram()),
            errors: AtomicU64::new(0),
        })
    }

    fn stored(&self, seq: u64, sent_ns: u64) {
        if seq >= self.warm_up {
            record(
                &self.histogram,
                nanos_since(self.base).saturating_sub(sent_ns) / 1000,
            );
        }
    }

    fn failed(&self, seq: u64, error: impl std::fmt::Display) {
        if self.errors.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!("warning: send {seq} failed: {error}");
        }
    }

    fn latency(&self, sent: u64, arrivals: &Arrivals, achieved_rate: f64) -> Latency {
        Latency {
            sent,
            received: arrivals.received,
            lost: sent.saturating_sub(arrivals.received),
            anomalies: arrivals.anomalies,
            write_errors: self.errors.load(Ordering::Relaxed),
            achieved_rate,
            delivery_ms: Percentiles::of(&arrivals.histogram),
            ack_ms: Percentiles::of(&self.histogram.lock().expect("histogram lock")),
        }
    }
}

/// Messages sent in the warm-up and in total.
fn counts(args: &BenchLatencyArgs) -> (u64, u64) {
    let warm_up = args.rate * WARM_UP.as_secs();
    (warm_up, warm_up + args.rate * args.seconds)
}

async fn pubsub_latency(client: &Client, args: &BenchLatencyArgs) -> anyhow::Result<Latency> {
    client.create_topic(NewTopic::new(TOPIC, 1)).await?;
    let mut consumer = client.consumer(TOPIC, GROUP).join().await?;
    tokio::time::timeout(ASSIGNMENT, async {
        loop {
            match consumer.next_event().await {
                Some(Ok(Event::Assigned(p))) if !p.is_empty() => return Ok(()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(anyhow::Error::from(e)),
                None => anyhow::bail!("the consumer closed before its assignment"),
            }
        }
    })
    .await
    .with_context(|| format!("no partition assigned within {ASSIGNMENT:?}"))??;
    let producer = client.producer(TOPIC).build().await?;

    let (warm_up, total) = counts(args);
    let base = Instant::now();
    let deadline = base + WARM_UP + Duration::from_secs(args.seconds) + GRACE;
    let mut receiver = JoinSet::new();
    receiver.spawn(async move {
        let mut arrivals = Arrivals::new(base, warm_up);
        while arrivals.received < total {
            match tokio::time::timeout_at(deadline.into(), consumer.recv()).await {
                Ok(Some(Ok(message))) => arrivals.arrived(&message.value),
                Ok(Some(Err(e))) => eprintln!("warning: consumer: {e}"),
                Ok(None) | Err(_) => break,
            }
        }
        let closed = consumer.close().await;
        (arrivals, closed)
    });

    let acks = Acks::new(base, warm_up);
    let mut pending = JoinSet::new();
    let bar = progress(total, "latency");
    let mut pacer = Pacer::new(Some(args.rate as f64));
    for seq in 0..total {
        Pacer::tick(&mut pacer).await;
        let sent = nanos_since(base);
        match producer
            .enqueue(Record::new(stamped(args.size, seq, sent)))
            .await
        {
            Ok(delivery) => {
                let acks = acks.clone();
                pending.spawn(async move {
                    match delivery.await {
                        Ok(_) => acks.stored(seq, sent),
                        Err(e) => acks.failed(seq, e),
                    }
                });
            }
            Err(e) => acks.failed(seq, e),
        }
        bar.inc(1);
        reap(&mut pending);
    }
    let achieved_rate = total as f64 / base.elapsed().as_secs_f64();
    while pending.join_next().await.is_some() {}
    producer.close().await?;
    let (arrivals, closed) = receiver
        .join_next()
        .await
        .expect("the receiver was spawned")?;
    bar.finish_and_clear();
    closed?;
    Ok(acks.latency(total, &arrivals, achieved_rate))
}

async fn raw_latency(client: &Client, args: &BenchLatencyArgs) -> anyhow::Result<Latency> {
    let prefix = format!("{}/raw-watch/", client.namespace());
    let mut stream = client
        .etcd()
        .watch_client()
        .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
        .await?;
    // The first response confirms the watch exists.
    match stream.message().await? {
        Some(response) if response.created() => {}
        _ => anyhow::bail!("the raw etcd watch was not created"),
    }

    let (warm_up, total) = counts(args);
    let base = Instant::now();
    let deadline = base + WARM_UP + Duration::from_secs(args.seconds) + GRACE;
    let mut receiver = JoinSet::new();
    receiver.spawn(async move {
        let mut arrivals = Arrivals::new(base, warm_up);
        while arrivals.received < total {
            match tokio::time::timeout_at(deadline.into(), stream.message()).await {
                Ok(Ok(Some(response))) => {
                    for event in response.events() {
                        if event.event_type() == EventType::Put {
                            if let Some(kv) = event.kv() {
                                arrivals.arrived(kv.value());
                            }
                        }
                    }
                    if response.canceled() {
                        eprintln!("warning: raw watch cancelled: {}", response.cancel_reason());
                        break;
                    }
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    eprintln!("warning: raw watch failed: {e}");
                    break;
                }
                Err(_) => break,
            }
        }
        // Concurrent puts may commit in any order: only losses count.
        arrivals.anomalies = 0;
        arrivals
    });

    let kv = client.etcd().kv_client();
    let acks = Acks::new(base, warm_up);
    let mut pending = JoinSet::new();
    let bar = progress(total, "raw watch");
    let mut pacer = Pacer::new(Some(args.rate as f64));
    for seq in 0..total {
        Pacer::tick(&mut pacer).await;
        let sent = nanos_since(base);
        let mut kv = kv.clone();
        let key = format!("{prefix}{seq:020}");
        let value = stamped(args.size, seq, sent);
        let acks = acks.clone();
        pending.spawn(async move {
            match kv.put(key, value, None).await {
                Ok(_) => acks.stored(seq, sent),
                Err(e) => acks.failed(seq, e),
            }
        });
        bar.inc(1);
        reap(&mut pending);
    }
    let achieved_rate = total as f64 / base.elapsed().as_secs_f64();
    while pending.join_next().await.is_some() {}
    let arrivals = receiver
        .join_next()
        .await
        .expect("the receiver was spawned")?;
    bar.finish_and_clear();
    Ok(acks.latency(total, &arrivals, achieved_rate))
}

impl Summary for LatencySummary {
    const BENCH: &'static str = "latency";

    fn text(&self, namespace: &str) -> String {
        let s = &self.settings;
        let mut text = format!(
            "bench latency: {} msgs/s of {} B for {} s after a {} s warm-up; namespace {namespace}\n\n",
            s.rate, s.size, s.seconds, s.warm_up_seconds
        );
        let mut table = Table::new([
            "", "samples", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms",
        ]);
        let row = |name: &str, p: &Percentiles| {
            let mut cells = vec![name.to_string(), p.samples.to_string()];
            cells.extend(p.cells());
            cells
        };
        table.row(row("pubsub-etcd send→delivery", &self.pubsub.delivery_ms));
        if let Some(raw) = &self.raw {
            table.row(row("raw etcd put→watch", &raw.delivery_ms));
            let mut cells = vec!["pubsub/raw".to_string(), "-".to_string()];
            cells.extend(self.pubsub.delivery_ms.ratio(&raw.delivery_ms));
            table.row(cells);
        }
        table.row(row("pubsub-etcd send→stored", &self.pubsub.ack_ms));
        if let Some(raw) = &self.raw {
            table.row(row("raw etcd put→response", &raw.ack_ms));
        }
        text.push_str(&table.render());
        text.push('\n');
        let mut counts = Table::new([
            "",
            "sent",
            "received",
            "lost",
            "anomalies",
            "write errors",
            "send rate/s",
        ]);
        let row = |name: &str, l: &Latency| {
            vec![
                name.to_string(),
                l.sent.to_string(),
                l.received.to_string(),
                l.lost.to_string(),
                l.anomalies.to_string(),
                l.write_errors.to_string(),
                cell(Some(l.achieved_rate)),
            ]
        };
        counts.row(row("pubsub-etcd", &self.pubsub));
        if let Some(raw) = &self.raw {
            counts.row(row("raw etcd", raw));
        }
        text.push_str(&counts.render());
        let baseline = if self.raw.is_some() {
            " (not counted for raw etcd, whose concurrent puts may commit in any order)"
        } else {
            ""
        };
        text.push_str(&format!(
            "\nAnomalies: messages received twice or out of order{baseline}.\n"
        ));
        text
    }
}
