//! Soak benchmark: does the library stay as fast after minutes of steady
//! load as on a fresh etcd? And a per-request probe of how etcd's history
//! slows the requests of the hot path.
//!
//! ```text
//! cargo run --release -p pubsub-etcd --example bench_soak -- \
//!     [--minutes 10] [--rate 400000] [--size 100] [--no-auto-compaction]
//! cargo run --release -p pubsub-etcd --example bench_soak -- \
//!     --requests [--bloat-mb N] [--bloat-keys N] [--count 2000]
//! ```
//!
//! Soak: one producer sends `--rate` messages/s (default 400,000: half of
//! what one producer measured on a fresh etcd, 892k/s) of `--size`
//! bytes into a 4-partition topic whose message-count retention (100,000 per
//! partition) keeps the stored data constant, while a consumer group of two
//! members follows it. Each payload carries its send time, so every delivery
//! gives a send->delivery latency. Each minute prints throughput (sent and
//! delivered), latency p50/p99, etcd's db size and in-use size, and the
//! revision span of its history; at the end, a table comparing the first
//! minute with the last. `--no-auto-compaction` runs the same with the
//! library's automatic history compaction off.
//!
//! Requests (`--requests`): times `--count` sequential requests of each
//! kind the hot path makes, after writing and deleting `--bloat-mb` MiB
//! (default 0) of values in 512 KiB overwrites and `--bloat-keys` distinct
//! 100-byte keys (64 puts in flight), which etcd keeps as history until
//! compacted:
//! raw put; an append-shaped transaction (compare a head's mod revision, put
//! a batch and the head) with and without the extra range read of an empty
//! prefix that appends make for starvation markers; the library's send (one
//! in flight), fetch, commit, and send->delivery through a reader.
//!
//! Everything lives in a random namespace `bench-<hex>`, deleted at the end.
//! Endpoints come from `PUBSUB_ETCD_ENDPOINTS` (default 127.0.0.1:2379).
//! Prefer a throwaway etcd started for the run: `--no-auto-compaction`
//! leaves its history behind, and `--requests` bloats it on purpose.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use hdrhistogram::Histogram;
use pubsub_etcd::{
    AutoCommit, AutoCompaction, Client, Consumer, NewTopic, Producer, Record, StartOffset,
};
use tokio::time::MissedTickBehavior;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = std::result::Result<T, BoxError>;

const TOPIC: &str = "soak";
const PARTITIONS: u32 = 4;
/// Retention per partition: the stored data stays at about this many messages.
const RETENTION: u64 = 100_000;
/// Records kept in flight by the producer before it waits for the oldest.
const WINDOW: usize = 50_000;
const WARM_UP_REQUESTS: usize = 200;

/// Soak benchmark: a producer at a fixed rate into a topic whose
/// message-count retention keeps stored data constant, followed by a group
/// of two; or, with --requests, the latency of each hot-path request.
#[derive(Debug, clap::Parser)]
struct Args {
    /// How long the soak runs, in minutes
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    minutes: u64,
    /// Messages per second the producer offers
    #[arg(long, default_value_t = 400_000, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Bytes per message (at least 16: the timestamp and sequence number)
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(16..))]
    size: u64,
    /// Run with the library's automatic history compaction off
    #[arg(long)]
    no_auto_compaction: bool,
    /// Time each hot-path request instead of soaking
    #[arg(long)]
    requests: bool,
    /// With --requests: first bloat etcd's history with this many MiB of overwrites
    #[arg(long, default_value_t = 0)]
    bloat_mb: u64,
    /// With --requests: first bloat etcd's history with this many deleted keys
    #[arg(long, default_value_t = 0)]
    bloat_keys: u64,
    /// With --requests: requests timed per kind
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
}

#[tokio::main]
async fn main() -> Res<()> {
    let args = <Args as clap::Parser>::parse();
    let namespace = format!("bench-{:016x}", rand::random::<u64>());
    let policy = if args.no_auto_compaction {
        AutoCompaction::Disabled
    } else {
        AutoCompaction::default()
    };
    let client = Client::builder(pubsub_etcd::endpoints_from_env())
        .namespace(&namespace)
        .auto_compaction(policy)
        .connect()
        .await?;
    eprintln!("namespace {namespace}: {args:?}");
    let result = if args.requests {
        requests(&client, &namespace, &args).await
    } else {
        soak(&client, &args).await
    };
    let mut etcd = client.etcd().clone();
    etcd.delete(
        format!("{namespace}/"),
        Some(DeleteOptions::new().with_prefix()),
    )
    .await?;
    client.close().await;
    result
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn ms(hist: &Histogram<u64>, quantile: f64) -> f64 {
    hist.value_at_quantile(quantile) as f64 / 1000.0
}

fn mib(bytes: Option<i64>) -> f64 {
    bytes.unwrap_or(0) as f64 / (1024.0 * 1024.0)
}

/// The figures of one minute of the soak.
#[derive(Debug, Clone)]
struct Minute {
    sent: f64,
    delivered: f64,
    p50: f64,
    p99: f64,
    db_mib: f64,
    in_use_mib: f64,
    span: i64,
}

async fn soak(client: &Client, args: &Args) -> Res<()> {
    client
        .create_topic(NewTopic::new(TOPIC, PARTITIONS).retention_messages(RETENTION))
        .await?;
    let base = Instant::now();
    let latency = Arc::new(Mutex::new(histogram()));
    let delivered = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let deadline = base + Duration::from_secs(args.minutes * 60);
    let mut members = Vec::new();
    for _ in 0..2 {
        let consumer = client
            .consumer(TOPIC, "soak-group")
            .auto_commit(AutoCommit::Interval(Duration::from_secs(1)))
            .start_offset(StartOffset::Latest)
            .join()
            .await?;
        members.push(tokio::spawn(follow(
            consumer,
            base,
            deadline,
            latency.clone(),
            delivered.clone(),
        )));
    }
    let producer = client.producer(TOPIC).build().await?;
    let sender = tokio::spawn(produce(
        producer.clone(),
        args.rate,
        args.size as usize,
        base,
        deadline,
        sent.clone(),
    ));

    println!("\n## bench_soak: {args:?}\n");
    println!("| minute | sent msgs/s | delivered msgs/s | send->delivery p50 / p99 (ms) | db size (MiB) | in use (MiB) | history span (revisions) |");
    println!("|---|---|---|---|---|---|---|");
    let mut minutes: Vec<Minute> = Vec::new();
    let (mut last_sent, mut last_delivered) = (0, 0);
    for minute in 1..=args.minutes {
        tokio::time::sleep_until((base + Duration::from_secs(minute * 60)).into()).await;
        let hist = std::mem::replace(&mut *latency.lock().unwrap(), histogram());
        let (s, d) = (
            sent.load(Ordering::Relaxed),
            delivered.load(Ordering::Relaxed),
        );
        let status = client.history_status().await?;
        let member = status.members.first();
        let m = Minute {
            sent: (s - last_sent) as f64 / 60.0,
            delivered: (d - last_delivered) as f64 / 60.0,
            p50: ms(&hist, 0.5),
            p99: ms(&hist, 0.99),
            db_mib: mib(member.and_then(|m| m.db_size)),
            in_use_mib: mib(member.and_then(|m| m.db_size_in_use)),
            span: status.revision - status.oldest_revision,
        };
        (last_sent, last_delivered) = (s, d);
        println!(
            "| {minute} | {:.0} | {:.0} | {:.2} / {:.2} | {:.0} | {:.0} | {} |",
            m.sent, m.delivered, m.p50, m.p99, m.db_mib, m.in_use_mib, m.span
        );
        minutes.push(m);
    }
    sender.await??;
    for member in members {
        member.await??;
    }
    producer.close().await?;
    let (first, last) = (&minutes[0], &minutes[minutes.len() - 1]);
    let change = |a: f64, b: f64| {
        if a == 0.0 {
            "-".to_string()
        } else {
            format!("{:+.0} %", (b - a) / a * 100.0)
        }
    };
    println!("\n| | first minute | last minute | change |");
    println!("|---|---|---|---|");
    let rows = [
        ("delivered msgs/s", first.delivered, last.delivered),
        ("send->delivery p50 (ms)", first.p50, last.p50),
        ("send->delivery p99 (ms)", first.p99, last.p99),
        ("db size (MiB)", first.db_mib, last.db_mib),
        ("in use (MiB)", first.in_use_mib, last.in_use_mib),
        (
            "history span (revisions)",
            first.span as f64,
            last.span as f64,
        ),
    ];
    for (name, a, b) in rows {
        println!("| {name} | {a:.2} | {b:.2} | {} |", change(a, b));
    }
    Ok(())
}

/// A payload of `size` bytes starting with its send time (µs since `base`).
fn stamped(size: usize, base: Instant) -> Vec<u8> {
    let mut value = vec![b'.'; size];
    value[..8].copy_from_slice(&(base.elapsed().as_micros() as u64).to_le_bytes());
    value
}

/// Sends at `rate` messages/s until `deadline`, in ticks of 1 ms; late
/// ticks are caught up, so the average rate holds while the producer keeps up.
async fn produce(
    producer: Producer,
    rate: u64,
    size: usize,
    base: Instant,
    deadline: Instant,
    sent: Arc<AtomicU64>,
) -> Res<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut in_flight = std::collections::VecDeque::with_capacity(WINDOW);
    let mut due = 0f64;
    while Instant::now() < deadline {
        tick.tick().await;
        due += rate as f64 / 1000.0;
        while due >= 1.0 {
            due -= 1.0;
            if in_flight.len() >= WINDOW {
                if let Some(delivery) = in_flight.pop_front() {
                    delivery.await?;
                }
            }
            in_flight.push_back(producer.enqueue(Record::new(stamped(size, base))).await?);
            sent.fetch_add(1, Ordering::Relaxed);
        }
    }
    for delivery in in_flight {
        delivery.await?;
    }
    Ok(())
}

async fn follow(
    mut consumer: Consumer,
    base: Instant,
    deadline: Instant,
    latency: Arc<Mutex<Histogram<u64>>>,
    delivered: Arc<AtomicU64>,
) -> Res<()> {
    let mut local = histogram();
    let mut flushed = Instant::now();
    loop {
        let next = tokio::time::timeout_at(deadline.into(), consumer.recv()).await;
        let Ok(next) = next else { break };
        let Some(message) = next else { break };
        let message = message?;
        let now = base.elapsed().as_micros() as u64;
        if let Some(stamp) = message.value.get(..8) {
            let sent = u64::from_le_bytes(stamp.try_into().expect("8 bytes"));
            local.saturating_record(now.saturating_sub(sent).max(1));
        }
        delivered.fetch_add(1, Ordering::Relaxed);
        // Merged in batches: the lock is shared with the other member.
        if flushed.elapsed() >= Duration::from_millis(100) {
            latency.lock().unwrap().add(&local)?;
            local.reset();
            flushed = Instant::now();
        }
    }
    latency.lock().unwrap().add(&local)?;
    consumer.close().await?;
    Ok(())
}

/// Times `count` runs of `request` (after a warm-up), in µs.
async fn time<F, Fut>(count: usize, mut request: F) -> Res<Histogram<u64>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Res<()>>,
{
    let mut hist = histogram();
    for i in 0..WARM_UP_REQUESTS + count {
        let started = Instant::now();
        request(i).await?;
        if i >= WARM_UP_REQUESTS {
            hist.saturating_record(started.elapsed().as_micros().max(1) as u64);
        }
    }
    Ok(hist)
}

async fn requests(client: &Client, namespace: &str, args: &Args) -> Res<()> {
    let mut etcd = client.etcd().clone();
    let scratch = format!("{namespace}/scratch/");
    if args.bloat_mb > 0 {
        // Overwritten values, then deleted: history only, nothing live.
        let value = vec![b'b'; 512 * 1024];
        for i in 0..args.bloat_mb * 2 {
            etcd.put(format!("{scratch}{:04}", i % 64), value.clone(), None)
                .await?;
        }
        etcd.delete(scratch.clone(), Some(DeleteOptions::new().with_prefix()))
            .await?;
    }
    if args.bloat_keys > 0 {
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (mut kv, next, scratch) = (etcd.kv_client(), next.clone(), scratch.clone());
            let total = args.bloat_keys;
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok::<_, etcd_client::Error>(());
                    }
                    kv.put(format!("{scratch}k/{i:012}"), vec![b'k'; 100], None)
                        .await?;
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        etcd.delete(scratch.clone(), Some(DeleteOptions::new().with_prefix()))
            .await?;
    }
    let status = client.history_status().await?;
    let member = &status.members[0];
    let count = args.count as usize;
    let mut rows: Vec<(&str, Histogram<u64>)> = Vec::new();

    let raw = format!("{namespace}/raw/");
    let value = vec![b'v'; 100];
    rows.push((
        "raw put (100 B)",
        time(count, |i| {
            let mut kv = etcd.kv_client();
            let (key, value) = (format!("{raw}{}", i % 100), value.clone());
            async move {
                kv.put(key, value, None).await?;
                Ok(())
            }
        })
        .await?,
    ));

    for with_range in [true, false] {
        let head = format!("{raw}cas/head");
        let waiting = format!("{raw}cas/w/");
        let waiting_end = format!("{raw}cas/w0");
        let mut revision = etcd
            .put(head.clone(), "0", None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
        let mut hist = histogram();
        let batch = vec![b'x'; 1200];
        for i in 0..WARM_UP_REQUESTS + count {
            let mut ops = vec![
                TxnOp::put(format!("{raw}cas/b/{:020}", i), batch.clone(), None),
                TxnOp::put(head.clone(), i.to_string(), None),
            ];
            if with_range {
                ops.push(TxnOp::get(
                    waiting.clone(),
                    Some(
                        GetOptions::new()
                            .with_range(waiting_end.clone())
                            .with_limit(8),
                    ),
                ));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    head.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then(ops)
                .or_else([TxnOp::get(head.clone(), None)]);
            let started = Instant::now();
            let response = etcd.txn(txn).await?;
            if i >= WARM_UP_REQUESTS {
                hist.saturating_record(started.elapsed().as_micros().max(1) as u64);
            }
            if !response.succeeded() {
                return Err("the append-shaped transaction lost a race it cannot lose".into());
            }
            revision = response.header().map_or(0, |h| h.revision());
        }
        rows.push((
            if with_range {
                "append-shaped txn, with marker range read"
            } else {
                "append-shaped txn, without marker range read"
            },
            hist,
        ));
    }

    client.create_topic(NewTopic::new("requests", 1)).await?;
    let producer = client.producer("requests").build().await?;
    let record = Record::new(vec![b'm'; 100]);
    rows.push((
        "library send, 1 in flight (append)",
        time(count, |_| {
            let (producer, record) = (producer.clone(), record.clone());
            async move {
                producer.send(record).await?;
                Ok(())
            }
        })
        .await?,
    ));
    let stored = (WARM_UP_REQUESTS + count) as u64;
    rows.push((
        "library fetch (10 messages)",
        time(count, |i| {
            let client = client.clone();
            let from = (i as u64 * 7919) % (stored - 10);
            async move {
                client.fetch("requests", 0, from, 10).await?;
                Ok(())
            }
        })
        .await?,
    ));
    let mut consumer = client
        .consumer("requests", "g")
        .auto_commit(AutoCommit::Disabled)
        .start_offset(StartOffset::Earliest)
        .join()
        .await?;
    let mut commit = histogram();
    for i in 0..WARM_UP_REQUESTS + count {
        let message = consumer.recv().await.ok_or("consumer ended")??;
        let started = Instant::now();
        consumer.commit(&message).await?;
        if i >= WARM_UP_REQUESTS {
            commit.saturating_record(started.elapsed().as_micros().max(1) as u64);
        }
    }
    consumer.close().await?;
    rows.push(("library commit (1 partition)", commit));
    let mut reader = client
        .assign("requests", [(0, StartOffset::Latest)])
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut delivery = histogram();
    for i in 0..WARM_UP_REQUESTS + count {
        let started = Instant::now();
        producer.send(record.clone()).await?;
        reader.recv().await.ok_or("reader ended")??;
        if i >= WARM_UP_REQUESTS {
            delivery.saturating_record(started.elapsed().as_micros().max(1) as u64);
        }
    }
    reader.close().await;
    producer.close().await?;
    rows.push(("library send->delivery, 1 in flight", delivery));

    println!(
        "\n## bench_soak --requests: --bloat-mb {} --count {count}; etcd db {:.0} MiB, in use {:.0} MiB, history span {} revisions\n",
        args.bloat_mb,
        mib(member.db_size),
        mib(member.db_size_in_use),
        status.revision - status.oldest_revision
    );
    println!("| request | p50 (ms) | p99 (ms) | requests/s (1 in flight) |");
    println!("|---|---|---|---|");
    for (name, hist) in rows {
        println!(
            "| {name} | {:.3} | {:.3} | {:.0} |",
            ms(&hist, 0.5),
            ms(&hist, 0.99),
            1e6 / hist.mean().max(1.0)
        );
    }
    Ok(())
}
