//! `bench produce`: producer throughput and send latency, in application
//! bytes and in bytes as stored (after compression); raw etcd puts as the
//! baseline.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use futures::FutureExt;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use pubsub_etcd::{
    Client, Compression, Delivery, NewTopic, Producer, Record, RecordMetadata, SendError,
};
use serde::Serialize;
use tokio::task::JoinSet;

use super::payload::Values;
use super::{
    cell, histogram, megabytes_per_second, micros_since, progress, ratio, record, share, stored,
    Pacer, Percentiles, Stored, Summary,
};
use crate::cli::{BenchProduceArgs, Payload};
use crate::output::Table;

const TOPIC: &str = "produce";
/// Records one producer keeps in flight (enqueued, not yet stored).
const WINDOW: u32 = 50_000;
/// Raw puts in flight in the baseline.
const RAW_IN_FLIGHT: u64 = 64;

#[derive(Debug, Serialize)]
pub struct ProduceSummary {
    settings: Settings,
    pubsub: Throughput,
    raw: Option<Throughput>,
    ratio: Option<Ratio>,
}

#[derive(Debug, Serialize)]
struct Settings {
    messages: u64,
    /// Ignored for json-logs.
    size: u32,
    payload: Payload,
    compression: Compression,
    partitions: u32,
    producers: u32,
    rate: Option<u64>,
    in_flight_per_producer: u32,
    raw_in_flight: u64,
}

#[derive(Debug, Serialize)]
struct Throughput {
    /// Messages stored.
    messages: u64,
    /// Messages that failed.
    errors: u64,
    seconds: f64,
    msgs_per_sec: f64,
    /// Application bytes: message values.
    mb_per_sec: f64,
    /// Bytes as stored in etcd (pubsub-etcd only).
    stored: Option<Stored>,
    /// Enqueue (or put call) to stored, for each stored message.
    latency_ms: Percentiles,
}

/// pubsub-etcd divided by raw etcd.
#[derive(Debug, Serialize)]
struct Ratio {
    msgs_per_sec: Option<f64>,
    latency_p50: Option<f64>,
    latency_p99: Option<f64>,
}

pub async fn run(client: &Client, args: &BenchProduceArgs) -> anyhow::Result<ProduceSummary> {
    let values = Values::new(args.data.payload, args.size);
    client
        .create_topic(NewTopic::new(TOPIC, args.partitions))
        .await?;
    let pubsub = produce(client, args, &values).await?;
    let raw = if args.options.compare_raw {
        Some(raw_puts(client, args, &values).await?)
    } else {
        None
    };
    let ratio = raw.as_ref().map(|raw| Ratio {
        msgs_per_sec: ratio(pubsub.msgs_per_sec, raw.msgs_per_sec),
        latency_p50: pubsub
            .latency_ms
            .p50
            .zip(raw.latency_ms.p50)
            .and_then(|(a, b)| ratio(a, b)),
        latency_p99: pubsub
            .latency_ms
            .p99
            .zip(raw.latency_ms.p99)
            .and_then(|(a, b)| ratio(a, b)),
    });
    Ok(ProduceSummary {
        settings: Settings {
            messages: args.messages,
            size: args.size,
            payload: args.data.payload,
            compression: args.data.compression,
            partitions: args.partitions,
            producers: args.producers,
            rate: args.rate,
            in_flight_per_producer: WINDOW,
            raw_in_flight: RAW_IN_FLIGHT,
        },
        pubsub,
        raw,
        ratio,
    })
}

/// What the tasks of one case share.
struct Tally {
    latency: Mutex<Histogram<u64>>,
    errors: Mutex<(u64, Option<String>)>,
    progress: ProgressBar,
}

impl Tally {
    fn new(len: u64, what: &'static str) -> Arc<Self> {
        Arc::new(Tally {
            latency: Mutex::new(histogram()),
            errors: Mutex::new((0, None)),
            progress: progress(len, what),
        })
    }

    fn failed(&self, error: impl ToString) {
        let mut errors = self.errors.lock().expect("errors lock");
        errors.0 += 1;
        errors.1.get_or_insert_with(|| error.to_string());
        self.progress.inc(1);
    }

    fn stored(&self, micros: u64) {
        record(&self.latency, micros);
        self.progress.inc(1);
    }

    fn throughput(&self, started: Instant, bytes: u64) -> Throughput {
        self.progress.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        let latency = self.latency.lock().expect("histogram lock");
        let messages = latency.len();
        let (errors, first) = self.errors.lock().expect("errors lock").clone();
        if let Some(first) = first {
            eprintln!("warning: {errors} sends failed; the first: {first}");
        }
        Throughput {
            messages,
            errors,
            seconds,
            msgs_per_sec: messages as f64 / seconds,
            mb_per_sec: megabytes_per_second(bytes, seconds),
            stored: None,
            latency_ms: Percentiles::of(&latency),
        }
    }
}

async fn produce(
    client: &Client,
    args: &BenchProduceArgs,
    values: &Values,
) -> anyhow::Result<Throughput> {
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        let builder = client.producer(TOPIC).compression(args.data.compression);
        producers.push(builder.build().await?);
    }
    let tally = Tally::new(args.messages, "produce");
    let per_producer = args.rate.map(|r| r as f64 / f64::from(args.producers));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, producer) in producers.iter().enumerate() {
        let count = share(args.messages, u64::from(args.producers), i as u64);
        tasks.spawn(send(
            producer.clone(),
            count,
            values.part(i as u64, u64::from(args.producers)),
            Pacer::new(per_producer),
            tally.clone(),
        ));
    }
    let mut bytes = 0;
    while let Some(done) = tasks.join_next().await {
        bytes += done??;
    }
    let mut throughput = tally.throughput(started, bytes);
    for producer in producers {
        producer.close().await?;
    }
    let description = client.describe_topic(TOPIC).await?;
    if throughput.errors == 0 {
        // The partitions must hold exactly what was acknowledged.
        let stored: u64 = description
            .partitions
            .iter()
            .map(|p| p.next - p.earliest)
            .sum();
        anyhow::ensure!(
            stored == throughput.messages,
            "{} messages were acknowledged but {stored} are stored",
            throughput.messages
        );
    }
    throughput.stored = Some(stored(
        &description.partitions,
        throughput.messages,
        throughput.seconds,
    ));
    Ok(throughput)
}

/// Sends `count` records, up to `WINDOW` in flight, and returns the bytes
/// of their values. Acknowledgements are
/// collected in send order, the ready ones after every enqueue, so a
/// latency is from enqueue to the acknowledgement seen in that order. No
/// task or future set per message: either cost half the throughput or more
/// on two cores.
async fn send(
    producer: Producer,
    count: u64,
    mut values: Values,
    mut pacer: Option<Pacer>,
    tally: Arc<Tally>,
) -> anyhow::Result<u64> {
    let mut pending: VecDeque<(Instant, Delivery)> = VecDeque::with_capacity(WINDOW as usize);
    let mut bytes = 0;
    let settle = |sent: Instant, outcome: Result<RecordMetadata, SendError>| match outcome {
        Ok(_) => tally.stored(micros_since(sent)),
        Err(e) => tally.failed(e.error),
    };
    for _ in 0..count {
        Pacer::tick(&mut pacer).await;
        while let Some((sent, delivery)) = pending.front_mut() {
            match delivery.now_or_never() {
                Some(outcome) => {
                    settle(*sent, outcome);
                    pending.pop_front();
                }
                None => break,
            }
        }
        if pending.len() >= WINDOW as usize {
            if let Some((sent, delivery)) = pending.pop_front() {
                settle(sent, delivery.await);
            }
        }
        let value = values.next_value();
        bytes += value.len() as u64;
        let sent = Instant::now();
        pending.push_back((sent, producer.enqueue(Record::new(value)).await?));
    }
    for (sent, delivery) in pending {
        settle(sent, delivery.await);
    }
    Ok(bytes)
}

/// The baseline: one raw put per message, `RAW_IN_FLIGHT` at a time.
async fn raw_puts(
    client: &Client,
    args: &BenchProduceArgs,
    values: &Values,
) -> anyhow::Result<Throughput> {
    let tally = Tally::new(args.messages, "raw put");
    let per_worker = args.rate.map(|r| r as f64 / RAW_IN_FLIGHT as f64);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for worker in 0..RAW_IN_FLIGHT {
        let count = share(args.messages, RAW_IN_FLIGHT, worker);
        let mut kv = client.etcd().kv_client();
        let mut values = values.part(worker, RAW_IN_FLIGHT);
        let prefix = format!("{}/raw-puts/{worker:02}/", client.namespace());
        let mut pacer = Pacer::new(per_worker);
        let tally = tally.clone();
        tasks.spawn(async move {
            let mut bytes = 0;
            for i in 0..count {
                Pacer::tick(&mut pacer).await;
                let value = values.next_value();
                bytes += value.len() as u64;
                let sent = Instant::now();
                match kv
                    .put(format!("{prefix}{i:012}"), value.to_vec(), None)
                    .await
                {
                    Ok(_) => tally.stored(micros_since(sent)),
                    Err(e) => tally.failed(e),
                }
            }
            bytes
        });
    }
    let mut bytes = 0;
    while let Some(done) = tasks.join_next().await {
        bytes += done.context("a raw put task failed")?;
    }
    Ok(tally.throughput(started, bytes))
}

impl Summary for ProduceSummary {
    const BENCH: &'static str = "produce";

    fn text(&self, namespace: &str) -> String {
        let s = &self.settings;
        let rate = s.rate.map_or_else(
            || "as fast as possible".to_string(),
            |r| format!("{r} msgs/s"),
        );
        let raw = if self.raw.is_some() {
            format!("; raw: {} puts in flight", s.raw_in_flight)
        } else {
            String::new()
        };
        let mut text = format!(
            "bench produce: {} messages of {}, compression {}, {} partitions, {} producer(s) \
             with up to {} in flight each, {rate}{raw}; namespace {namespace}\n\n",
            s.messages,
            super::payload_text(s.payload, s.size),
            s.compression,
            s.partitions,
            s.producers,
            s.in_flight_per_producer
        );
        let mut table = Table::new([
            "",
            "msgs/s",
            "MB/s",
            "stored MB/s",
            "ratio",
            "stored B/msg",
            "errors",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
        ]);
        let row = |name: &str, t: &Throughput| {
            let mut cells = vec![
                name.to_string(),
                format!("{:.0}", t.msgs_per_sec),
                format!("{:.2}", t.mb_per_sec),
            ];
            cells.extend(super::stored_cells(t.stored.as_ref()));
            cells.push(t.errors.to_string());
            cells.extend(t.latency_ms.cells());
            cells
        };
        table.row(row("pubsub-etcd", &self.pubsub));
        if let Some(raw) = &self.raw {
            table.row(row("raw etcd put", raw));
            let mut cells = vec![
                "pubsub/raw".to_string(),
                cell(ratio(self.pubsub.msgs_per_sec, raw.msgs_per_sec)),
                cell(ratio(self.pubsub.mb_per_sec, raw.mb_per_sec)),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
            ];
            cells.extend(self.pubsub.latency_ms.ratio(&raw.latency_ms));
            table.row(cells);
        }
        text.push_str(&table.render());
        let baseline = if self.raw.is_some() {
            " (raw: put call)"
        } else {
            ""
        };
        text.push_str(&format!(
            "\nLatency: enqueue{baseline} to stored. MB = 10^6 bytes of values; stored MB \
             and B/msg count batch values as stored in etcd, ratio = record bytes / stored \
             bytes.\n"
        ));
        text
    }
}
