//! `bench consume`: how fast one group member catches up over a backlog,
//! and the memory it takes; raw etcd range gets over the same stored keys
//! as the baseline.
//!
//! The backlog is produced by this process first, so its peak RSS (VmHWM)
//! is reset before each read: the peak reported belongs to the read.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use etcd_client::GetOptions;
use futures::FutureExt as _;
use pubsub_etcd::{Client, Compression, Delivery, NewTopic, Record, RecordMetadata, SendError};
use serde::Serialize;

use super::payload::Values;
use super::{cell, megabytes_per_second, progress, ratio, stored, stored_cells, Stored, Summary};
use crate::cli::{BenchConsumeArgs, BenchDataArgs, Payload};
use crate::output::{or_dash, Table};

const TOPIC: &str = "backlog";
const GROUP: &str = "catch-up";
/// Records in flight while producing the backlog.
const IN_FLIGHT: u32 = 100_000;
/// Keys per raw range get: the library's fetch reads at most 32 batches.
const RAW_PAGE: i64 = 32;
/// A catch-up with no message for this long has stalled.
const STALL: Duration = Duration::from_secs(60);
/// Batches are up to about 1.4 MiB: raise etcd-client's 4 MiB response
/// limit for the raw reads, as the library does for its own.
const RAW_RESPONSE_LIMIT: usize = 256 * 1024 * 1024;

#[derive(Debug, Serialize)]
pub struct ConsumeSummary {
    settings: Settings,
    backlog: Backlog,
    pubsub: CatchUp,
    raw: Option<RawRead>,
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
    /// None: the library's default.
    fetch_messages: Option<u64>,
}

/// Producing the backlog, as fast as one producer goes.
#[derive(Debug, Serialize)]
pub(super) struct Backlog {
    seconds: f64,
    pub(super) msgs_per_sec: f64,
    /// Application bytes: message values.
    mb_per_sec: f64,
    stored: Stored,
}

/// Memory of this process around one read; absent off Linux.
#[derive(Debug, Serialize)]
struct Memory {
    /// Resident set size when the read began.
    rss_start_bytes: Option<u64>,
    /// Peak resident set size during the read; without a reset of the peak
    /// (before Linux 4.0) it may be the producing's.
    peak_rss_bytes: Option<u64>,
    peak_reset: bool,
}

#[derive(Debug, Serialize)]
struct CatchUp {
    messages: u64,
    /// Value bytes received.
    bytes: u64,
    /// From joining the group to the last message.
    seconds: f64,
    msgs_per_sec: f64,
    mb_per_sec: f64,
    /// The backlog's bytes as stored, over the catch-up time.
    stored: Stored,
    first_message_ms: f64,
    /// Messages whose offset was not the next of their partition.
    out_of_order: u64,
    memory: Memory,
}

#[derive(Debug, Serialize)]
struct RawRead {
    /// Every key of the benchmark's namespace: the backlog's batches and a
    /// few metadata keys.
    keys: u64,
    /// Stored bytes read (encoded batches).
    bytes: u64,
    requests: u64,
    page: i64,
    seconds: f64,
    /// Backlog messages per second, as if each read held its share.
    msgs_per_sec: f64,
    mb_per_sec: f64,
    memory: Memory,
}

/// pubsub-etcd divided by raw etcd.
#[derive(Debug, Serialize)]
struct Ratio {
    msgs_per_sec: Option<f64>,
}

pub async fn run(client: &Client, args: &BenchConsumeArgs) -> anyhow::Result<ConsumeSummary> {
    client
        .create_topic(NewTopic::new(TOPIC, args.partitions))
        .await?;
    let backlog = produce_backlog(client, TOPIC, args.messages, args.size, &args.data).await?;
    let pubsub = catch_up(client, args).await?;
    let raw = if args.options.compare_raw {
        Some(raw_read(client, args.messages).await?)
    } else {
        None
    };
    let ratio = raw.as_ref().map(|raw| Ratio {
        msgs_per_sec: ratio(pubsub.msgs_per_sec, raw.msgs_per_sec),
    });
    Ok(ConsumeSummary {
        settings: Settings {
            messages: args.messages,
            size: args.size,
            payload: args.data.payload,
            compression: args.data.compression,
            partitions: args.partitions,
            fetch_messages: args.fetch_messages,
        },
        backlog,
        pubsub,
        raw,
        ratio,
    })
}

/// Produces `messages` values of `data` to `topic` as fast as one producer
/// goes.
pub(super) async fn produce_backlog(
    client: &Client,
    topic: &str,
    messages: u64,
    size: u32,
    data: &BenchDataArgs,
) -> anyhow::Result<Backlog> {
    let producer = client
        .producer(topic)
        .compression(data.compression)
        .build()
        .await?;
    // Dropped with this function: the pool is not the catch-up's memory.
    let mut values = Values::new(data.payload, size);
    let mut bytes = 0u64;
    // Deliveries in a window, not a task each: 100,000 spawned tasks left
    // tens of MiB behind in the allocator, counted in the catch-up's RSS.
    let mut window: VecDeque<Delivery> = VecDeque::with_capacity(IN_FLIGHT as usize);
    let bar = progress(messages, "backlog");
    let started = Instant::now();
    for _ in 0..messages {
        while let Some(delivery) = window.front_mut() {
            match delivery.now_or_never() {
                Some(outcome) => {
                    appended(outcome)?;
                    window.pop_front();
                    bar.inc(1);
                }
                None => break,
            }
        }
        if window.len() >= IN_FLIGHT as usize {
            if let Some(delivery) = window.pop_front() {
                appended(delivery.await)?;
                bar.inc(1);
            }
        }
        let value = values.next_value();
        bytes += value.len() as u64;
        window.push_back(producer.enqueue(Record::new(value)).await?);
    }
    for delivery in window {
        appended(delivery.await)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    producer.close().await?;
    let partitions = client.describe_topic(topic).await?.partitions;
    Ok(Backlog {
        seconds,
        msgs_per_sec: messages as f64 / seconds,
        mb_per_sec: megabytes_per_second(bytes, seconds),
        stored: stored(&partitions, messages, seconds),
    })
}

fn appended(outcome: Result<RecordMetadata, SendError>) -> anyhow::Result<()> {
    outcome
        .map(drop)
        .map_err(|e| e.error)
        .context("producing the backlog")
}

/// Peak resident set size of this process (VmHWM), in bytes; Linux only.
fn peak_rss() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|kib| kib * 1024)
}

/// Current resident set size (VmRSS), in bytes; Linux only.
fn current_rss() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|kib| kib * 1024)
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Starts measuring memory: resets VmHWM to the current RSS (Linux 4.0+),
/// so that the peak read afterwards belongs to what runs from now on.
fn memory_start() -> Memory {
    let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    Memory {
        rss_start_bytes: current_rss(),
        peak_rss_bytes: None,
        peak_reset,
    }
}

fn memory_end(start: Memory) -> Memory {
    Memory {
        peak_rss_bytes: peak_rss(),
        ..start
    }
}

async fn catch_up(client: &Client, args: &BenchConsumeArgs) -> anyhow::Result<CatchUp> {
    let memory = memory_start();
    let bar = progress(args.messages, "catch-up");
    let started = Instant::now();
    let mut builder = client.consumer(TOPIC, GROUP);
    if let Some(messages) = args.fetch_messages {
        builder = builder.fetch_messages(messages as usize);
    }
    let mut consumer = builder.join().await?;
    let mut next = vec![0u64; args.partitions as usize];
    let (mut received, mut bytes, mut out_of_order) = (0u64, 0u64, 0u64);
    let mut first_message_ms = 0.0;
    while received < args.messages {
        let message = match tokio::time::timeout(STALL, consumer.recv()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(e).context(format!("after {received} messages")),
            Ok(None) => anyhow::bail!("the consumer closed after {received} messages"),
            Err(_) => anyhow::bail!(
                "stalled: no message for {STALL:?} after {received} of {}",
                args.messages
            ),
        };
        if received == 0 {
            first_message_ms = started.elapsed().as_secs_f64() * 1e3;
        }
        match next.get_mut(message.partition as usize) {
            Some(expected) if *expected == message.offset => *expected += 1,
            Some(expected) => {
                out_of_order += 1;
                *expected = message.offset + 1;
            }
            None => out_of_order += 1,
        }
        received += 1;
        bytes += message.value.len() as u64;
        bar.inc(1);
    }
    let seconds = started.elapsed().as_secs_f64();
    let memory = memory_end(memory);
    bar.finish_and_clear();
    consumer.close().await?;
    Ok(CatchUp {
        messages: received,
        bytes,
        seconds,
        msgs_per_sec: received as f64 / seconds,
        mb_per_sec: megabytes_per_second(bytes, seconds),
        stored: stored(
            &client.describe_topic(TOPIC).await?.partitions,
            received,
            seconds,
        ),
        first_message_ms,
        out_of_order,
        memory,
    })
}

/// The baseline: every key of the namespace, `RAW_PAGE` keys per range get.
async fn raw_read(client: &Client, messages: u64) -> anyhow::Result<RawRead> {
    let mut kv = client
        .etcd()
        .kv_client()
        .max_decoding_message_size(RAW_RESPONSE_LIMIT);
    let prefix = format!("{}/", client.namespace());
    let memory = memory_start();
    let started = Instant::now();
    let mut from = prefix.clone().into_bytes();
    let (mut keys, mut bytes, mut requests) = (0u64, 0u64, 0u64);
    let range_end = prefix_end(prefix.as_bytes());
    loop {
        let options = GetOptions::new()
            .with_range(range_end.clone())
            .with_limit(RAW_PAGE);
        let mut response = kv.get(from.clone(), Some(options)).await?;
        requests += 1;
        let kvs = response.take_kvs();
        let Some(last) = kvs.last() else { break };
        from = last.key().to_vec();
        from.push(0);
        keys += kvs.len() as u64;
        bytes += kvs.iter().map(|kv| kv.value().len() as u64).sum::<u64>();
        if !response.more() {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(RawRead {
        keys,
        bytes,
        requests,
        page: RAW_PAGE,
        seconds,
        msgs_per_sec: messages as f64 / seconds,
        mb_per_sec: megabytes_per_second(bytes, seconds),
        memory: memory_end(memory),
    })
}

/// The end of the range of keys starting with `prefix`, as etcd's prefix
/// reads compute it.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn mebibytes(bytes: Option<u64>) -> String {
    or_dash(bytes.map(|b| format!("{:.1}", b as f64 / (1024.0 * 1024.0))))
}

impl Summary for ConsumeSummary {
    const BENCH: &'static str = "consume";

    fn text(&self, namespace: &str) -> String {
        let s = &self.settings;
        let fetch = s.fetch_messages.map_or_else(
            || "default fetch (1000 messages)".to_string(),
            |m| format!("fetch {m}"),
        );
        let raw = if self.raw.is_some() {
            format!("; raw: range gets of {RAW_PAGE} keys")
        } else {
            String::new()
        };
        let b = &self.backlog;
        let [backlog_stored_mb, backlog_ratio, backlog_per_msg] = stored_cells(Some(&b.stored));
        let mut text = format!(
            "bench consume: backlog of {} messages of {}, compression {}, in {} partition(s), \
             1 group member, {fetch}{raw}; namespace {namespace}\n\
             backlog produced at {:.0} msgs/s, {:.2} MB/s, {backlog_stored_mb} stored MB/s \
             ({:.2} s); ratio {backlog_ratio}, {backlog_per_msg} stored B/msg\n\n",
            s.messages,
            super::payload_text(s.payload, s.size),
            s.compression,
            s.partitions,
            b.msgs_per_sec,
            b.mb_per_sec,
            b.seconds
        );
        let mut table = Table::new([
            "",
            "msgs/s",
            "MB/s",
            "stored MB/s",
            "seconds",
            "RSS start MiB",
            "peak RSS MiB",
        ]);
        let p = &self.pubsub;
        table.row([
            "pubsub-etcd catch-up".to_string(),
            format!("{:.0}", p.msgs_per_sec),
            format!("{:.2}", p.mb_per_sec),
            format!("{:.2}", p.stored.stored_mb_per_sec),
            format!("{:.2}", p.seconds),
            mebibytes(p.memory.rss_start_bytes),
            mebibytes(p.memory.peak_rss_bytes),
        ]);
        if let Some(raw) = &self.raw {
            table.row([
                "raw etcd range gets".to_string(),
                format!("{:.0}", raw.msgs_per_sec),
                "-".to_string(),
                format!("{:.2}", raw.mb_per_sec),
                format!("{:.2}", raw.seconds),
                mebibytes(raw.memory.rss_start_bytes),
                mebibytes(raw.memory.peak_rss_bytes),
            ]);
            table.row([
                "pubsub/raw".to_string(),
                cell(ratio(p.msgs_per_sec, raw.msgs_per_sec)),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
            ]);
        }
        text.push_str(&table.render());
        text.push_str(&format!(
            "\nFirst message after {:.0} ms; {} out of order. MB = 10^6 bytes of values; \
             stored MB counts batch values as stored in etcd.\n",
            p.first_message_ms, p.out_of_order
        ));
        if let Some(raw) = &self.raw {
            text.push_str(&format!(
                "Raw: {} keys, {} stored bytes in {} requests; its msgs/s is the backlog's \
                 messages over the raw read time, its MB/s counts stored bytes.\n",
                raw.keys, raw.bytes, raw.requests
            ));
        }
        text
    }
}
