//! Consumer benchmark: delivery latency at a fixed rate and catch-up speed
//! over a large backlog, each next to a raw-etcd baseline, in one run.
//!
//! ```text
//! cargo run --release -p pubsub-etcd --example bench_consume -- \
//!     [--rate 1000] [--seconds 10] [--backlog 1000000] [--fetch-messages N]
//! ```
//!
//! 1. Send-to-delivery latency: one producer sends to a 1-partition topic at
//!    `--rate` messages/s (paced by a tokio interval; sends are enqueued and
//!    acknowledged in spawned tasks, so acks never hold back the pacing), one
//!    group consumer receives. Each payload carries its send time (a
//!    monotonic clock shared by sender and receiver, which live in this
//!    process). The first second is a warm-up and is not measured.
//! 2. Baseline: raw etcd put-to-watch latency at the same rate, one key per
//!    put under a random prefix, timed from the start of the put call to the
//!    arrival of the watch event.
//! 3. Catch-up: `--backlog` 100-byte messages are produced as fast as
//!    possible (about 100,000 in flight), then a fresh child process (this
//!    executable, re-run with `--catch-up-only`) joins a group and times
//!    reading all of them; its peak RSS (VmHWM) is clean of the producer's.
//!    Baseline: another child (`--raw-read-only`) reads the same topic's
//!    stored batch keys with plain range gets of 32 keys.
//!
//! Everything lives in a random namespace `bench-<hex>`, deleted at the end.
//! Endpoints come from `PUBSUB_ETCD_ENDPOINTS` (default 127.0.0.1:2379).

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{DeleteOptions, EventType, GetOptions, WatchOptions};
use hdrhistogram::Histogram;
use pubsub_etcd::{Bytes, Client, Event, NewTopic, Record};
use tokio::time::MissedTickBehavior;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = std::result::Result<T, BoxError>;

/// Payload size of every message and raw put.
const PAYLOAD: usize = 100;
/// Records kept in flight while producing the backlog.
const IN_FLIGHT: usize = 100_000;
/// Raw baseline page size (the library's fetch reads at most 32 batches).
const RAW_PAGE: i64 = 32;
/// Warm-up excluded from the latency histograms: the first second of sends,
/// i.e. the first `rate` sequence numbers.
const WARM_UP: Duration = Duration::from_secs(1);
/// A catch-up with no message for this long counts as stalled.
const STALL: Duration = Duration::from_secs(60);
const LATENCY_TOPIC: &str = "latency";
const BACKLOG_TOPIC: &str = "backlog";

#[derive(Debug)]
struct Args {
    rate: u64,
    seconds: u64,
    backlog: u64,
    fetch_messages: Option<usize>,
}

#[derive(Debug)]
enum Mode {
    Bench(Args),
    CatchUpOnly {
        namespace: String,
        topic: String,
        count: u64,
        fetch_messages: Option<usize>,
    },
    RawReadOnly {
        namespace: String,
        topic: String,
    },
}

fn usage() -> BoxError {
    "usage: bench_consume [--rate N] [--seconds N] [--backlog N] [--fetch-messages N]\n       \
     bench_consume --catch-up-only <namespace> <topic> <count> [--fetch-messages N]\n       \
     bench_consume --raw-read-only <namespace> <topic>"
        .into()
}

fn parse_args() -> Res<Mode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut bench = Args {
        rate: 1000,
        seconds: 10,
        backlog: 1_000_000,
        fetch_messages: None,
    };
    let mut child: Option<(&str, Vec<String>)> = None;
    let mut i = 0;
    while i < args.len() {
        let value = |n: usize| args.get(i + n).cloned().ok_or_else(usage);
        match args[i].as_str() {
            "--rate" => bench.rate = value(1)?.parse()?,
            "--seconds" => bench.seconds = value(1)?.parse()?,
            "--backlog" => bench.backlog = value(1)?.parse()?,
            "--fetch-messages" => bench.fetch_messages = Some(value(1)?.parse()?),
            "--catch-up-only" => {
                child = Some(("catch-up", vec![value(1)?, value(2)?, value(3)?]));
                i += 2;
            }
            "--raw-read-only" => {
                child = Some(("raw-read", vec![value(1)?, value(2)?]));
                i += 1;
            }
            "-h" | "--help" => return Err(usage()),
            _ => return Err(usage()),
        }
        i += 2;
    }
    if bench.rate == 0 || bench.seconds == 0 || bench.backlog == 0 {
        return Err("--rate, --seconds and --backlog must be positive".into());
    }
    Ok(match child {
        Some(("catch-up", v)) => Mode::CatchUpOnly {
            namespace: v[0].clone(),
            topic: v[1].clone(),
            count: v[2].parse()?,
            fetch_messages: bench.fetch_messages,
        },
        Some((_, v)) => Mode::RawReadOnly {
            namespace: v[0].clone(),
            topic: v[1].clone(),
        },
        None => Mode::Bench(bench),
    })
}

#[tokio::main]
async fn main() -> Res<()> {
    match parse_args()? {
        Mode::Bench(args) => bench(args).await,
        Mode::CatchUpOnly {
            namespace,
            topic,
            count,
            fetch_messages,
        } => catch_up_only(&namespace, &topic, count, fetch_messages).await,
        Mode::RawReadOnly { namespace, topic } => raw_read_only(&namespace, &topic).await,
    }
}

async fn connect(namespace: &str) -> Res<Client> {
    Ok(Client::builder(pubsub_etcd::endpoints_from_env())
        .namespace(namespace)
        .connect()
        .await?)
}

/// Peak resident set size of this process, in KiB.
fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A payload of `PAYLOAD` bytes: sequence number, send time (ns since `base`).
fn stamped(seq: u64, sent_ns: u64) -> Vec<u8> {
    let mut value = vec![b'.'; PAYLOAD];
    value[..8].copy_from_slice(&seq.to_le_bytes());
    value[8..16].copy_from_slice(&sent_ns.to_le_bytes());
    value
}

fn read_stamp(value: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(value.get(8..16)?.try_into().ok()?);
    Some((seq, sent))
}

fn nanos_since(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// What a latency phase measured.
#[derive(Debug)]
struct Latency {
    /// Send (or put) start to delivery (or watch event), µs, after warm-up.
    delivery: Histogram<u64>,
    /// Send (or put) start to the write being acknowledged, µs, after warm-up.
    ack: Histogram<u64>,
    sent: u64,
    received: u64,
    /// Messages delivered again or out of order.
    anomalies: u64,
    write_errors: u64,
    /// Actual send rate achieved by the pacer.
    achieved_rate: f64,
}

/// Tracks what arrives: latency after warm-up, duplicates, reordering.
struct Arrivals {
    base: Instant,
    /// Sequence numbers below this are the warm-up.
    warm_up: u64,
    hist: Histogram<u64>,
    received: u64,
    next_seq: u64,
    anomalies: u64,
}

impl Arrivals {
    fn new(base: Instant, warm_up: u64) -> Self {
        Arrivals {
            base,
            warm_up,
            hist: histogram(),
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
            self.hist.saturating_record(now.saturating_sub(sent) / 1000);
        }
    }
}

/// Ticks at a fixed rate. Late ticks are caught up (burst), so the
/// average rate stays exact even when the timer wakes late.
struct Pacer {
    interval: tokio::time::Interval,
    start: Instant,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        let mut interval = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
        interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
        Pacer {
            interval,
            start: Instant::now(),
        }
    }

    async fn tick(&mut self) {
        self.interval.tick().await;
    }

    /// The rate achieved over `total` ticks.
    fn achieved(&self, total: u64) -> f64 {
        total as f64 / self.start.elapsed().as_secs_f64()
    }
}

fn record_ack(ack: &Mutex<Histogram<u64>>, base: Instant, sent: u64, measured: bool) {
    if measured {
        let micros = nanos_since(base).saturating_sub(sent) / 1000;
        ack.lock().expect("ack histogram").saturating_record(micros);
    }
}

/// Phase 1: pubsub-etcd producer to group consumer.
async fn pubsub_latency(namespace: &str, rate: u64, seconds: u64) -> Res<Latency> {
    let admin = connect(namespace).await?;
    admin.create_topic(NewTopic::new(LATENCY_TOPIC, 1)).await?;
    // Producer and consumer on their own connections, as separate processes would be.
    let consumer_client = connect(namespace).await?;
    let producer_client = connect(namespace).await?;
    let mut consumer = consumer_client
        .consumer(LATENCY_TOPIC, "bench")
        .join()
        .await?;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match consumer.next_event().await {
                Some(Ok(Event::Assigned(p))) if !p.is_empty() => return Ok(()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(BoxError::from(e)),
                None => return Err("consumer closed before its assignment".into()),
            }
        }
    })
    .await
    .map_err(|_| "no partition assigned within 30 s")??;
    let producer = producer_client.producer(LATENCY_TOPIC).build().await?;

    let warm_up = rate * WARM_UP.as_secs();
    let total = warm_up + rate * seconds;
    let base = Instant::now();
    // Deadline for the receiver: the sending time plus a generous grace.
    let deadline = base + Duration::from_secs(seconds + WARM_UP.as_secs() + 30);
    let receiver = tokio::spawn(async move {
        let mut arrivals = Arrivals::new(base, warm_up);
        while arrivals.received < total {
            match tokio::time::timeout_at(deadline.into(), consumer.recv()).await {
                Ok(Some(Ok(message))) => arrivals.arrived(&message.value),
                Ok(Some(Err(e))) => eprintln!("consumer error: {e}"),
                Ok(None) => break,
                Err(_) => {
                    eprintln!(
                        "consumer: only {} of {total} messages by the deadline",
                        arrivals.received
                    );
                    break;
                }
            }
        }
        let _ = consumer.close().await;
        arrivals
    });

    let ack = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    let mut acks = Vec::with_capacity(total as usize);
    let mut pacer = Pacer::new(rate);
    for seq in 0..total {
        pacer.tick().await;
        let sent = nanos_since(base);
        match producer.enqueue(Record::new(stamped(seq, sent))).await {
            Ok(delivery) => {
                let (ack, errors) = (ack.clone(), errors.clone());
                acks.push(tokio::spawn(async move {
                    match delivery.await {
                        Ok(_) => record_ack(&ack, base, sent, seq >= warm_up),
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("send {seq} failed: {e}");
                            }
                        }
                    }
                }));
            }
            Err(e) => {
                if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("send {seq} failed: {e}");
                }
            }
        }
    }
    let achieved_rate = pacer.achieved(total);
    for task in acks {
        task.await?;
    }
    producer.close().await?;
    let arrivals = receiver.await?;
    let ack = ack.lock().expect("ack histogram").clone();
    Ok(Latency {
        delivery: arrivals.hist,
        ack,
        sent: total,
        received: arrivals.received,
        anomalies: arrivals.anomalies,
        write_errors: errors.load(Ordering::Relaxed),
        achieved_rate,
    })
}

/// Phase 2: raw etcd put to watch event.
async fn raw_latency(namespace: &str, rate: u64, seconds: u64) -> Res<Latency> {
    let prefix = format!("{namespace}/raw-latency/{:08x}/", rand::random::<u32>());
    let watcher = connect(namespace).await?;
    let putter = connect(namespace).await?;
    let mut stream = watcher
        .etcd()
        .clone()
        .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
        .await?;
    // The first response confirms the watch exists.
    match stream.message().await? {
        Some(response) if response.created() => {}
        _ => return Err("the raw watch was not created".into()),
    }

    let warm_up = rate * WARM_UP.as_secs();
    let total = warm_up + rate * seconds;
    let base = Instant::now();
    let deadline = base + Duration::from_secs(seconds + WARM_UP.as_secs() + 30);
    let receiver = tokio::spawn(async move {
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
                        eprintln!("raw watch cancelled: {}", response.cancel_reason());
                        break;
                    }
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    eprintln!("raw watch failed: {e}");
                    break;
                }
                Err(_) => {
                    eprintln!(
                        "raw watch: only {} of {total} events by the deadline",
                        arrivals.received
                    );
                    break;
                }
            }
        }
        arrivals
    });

    let kv = putter.etcd().kv_client();
    let ack = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    let mut puts = Vec::with_capacity(total as usize);
    let mut pacer = Pacer::new(rate);
    for seq in 0..total {
        pacer.tick().await;
        let sent = nanos_since(base);
        let mut kv = kv.clone();
        let key = format!("{prefix}{seq:020}");
        let (ack, errors) = (ack.clone(), errors.clone());
        puts.push(tokio::spawn(async move {
            match kv.put(key, stamped(seq, sent), None).await {
                Ok(_) => record_ack(&ack, base, sent, seq >= warm_up),
                Err(e) => {
                    if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("put {seq} failed: {e}");
                    }
                }
            }
        }));
    }
    let achieved_rate = pacer.achieved(total);
    for put in puts {
        put.await?;
    }
    let arrivals = receiver.await?;
    let ack = ack.lock().expect("ack histogram").clone();
    Ok(Latency {
        delivery: arrivals.hist,
        ack,
        sent: total,
        received: arrivals.received,
        // Several puts in flight may commit in any order: reordering is not
        // an anomaly of the watch, so only count what was never delivered.
        anomalies: 0,
        write_errors: errors.load(Ordering::Relaxed),
        achieved_rate,
    })
}

/// Phase 3a: the backlog, as fast as the producer goes. Returns its duration.
async fn produce_backlog(namespace: &str, count: u64) -> Res<Duration> {
    let client = connect(namespace).await?;
    client.create_topic(NewTopic::new(BACKLOG_TOPIC, 1)).await?;
    let producer = client.producer(BACKLOG_TOPIC).build().await?;
    let value = Bytes::from(vec![b'x'; PAYLOAD]);
    let mut in_flight = VecDeque::with_capacity(IN_FLIGHT);
    let start = Instant::now();
    let mut last_report = start;
    for i in 0..count {
        if in_flight.len() >= IN_FLIGHT {
            let delivery: pubsub_etcd::Delivery =
                in_flight.pop_front().expect("in flight is not empty");
            delivery.await?;
        }
        in_flight.push_back(producer.enqueue(Record::new(value.clone())).await?);
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "  produced {i} of {count} ({:.0} msgs/s)",
                i as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    while let Some(delivery) = in_flight.pop_front() {
        delivery.await?;
    }
    let elapsed = start.elapsed();
    producer.close().await?;
    Ok(elapsed)
}

/// A child's report: `key=value` words on one stdout line starting with `RESULT`.
#[derive(Debug, Default)]
struct ChildReport {
    fields: Vec<(String, String)>,
}

impl ChildReport {
    fn get(&self, key: &str) -> Res<f64> {
        let value = self
            .fields
            .iter()
            .find(|(k, _)| k == key)
            .ok_or_else(|| format!("child report lacks {key}"))?;
        Ok(value.1.parse()?)
    }
}

/// Runs this executable again with `args`; returns its `RESULT` line.
async fn run_child(args: &[String]) -> Res<ChildReport> {
    let exe = std::env::current_exe()?;
    let output = tokio::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("child {args:?} failed ({}): {stdout}", output.status).into());
    }
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .ok_or_else(|| format!("child {args:?} printed no RESULT line: {stdout}"))?;
    Ok(ChildReport {
        fields: line
            .split_whitespace()
            .skip(1)
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
}

/// Child mode: one group member reads `count` messages from the start.
async fn catch_up_only(
    namespace: &str,
    topic: &str,
    count: u64,
    fetch_messages: Option<usize>,
) -> Res<()> {
    let client = connect(namespace).await?;
    let hwm_before = vm_hwm_kib();
    let start = Instant::now();
    let mut builder = client.consumer(topic, "catch-up");
    if let Some(messages) = fetch_messages {
        builder = builder.fetch_messages(messages);
    }
    let mut consumer = builder.join().await?;
    let mut received = 0u64;
    let mut bytes = 0u64;
    let mut out_of_order = 0u64;
    let mut first_ms = 0.0;
    let mut last_report = Instant::now();
    while received < count {
        let message = match tokio::time::timeout(STALL, consumer.recv()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(format!("after {received} messages: {e}").into()),
            Ok(None) => return Err(format!("consumer closed after {received} messages").into()),
            Err(_) => {
                return Err(format!(
                    "stalled: no message for {STALL:?} after {received} of {count}"
                )
                .into())
            }
        };
        if received == 0 {
            first_ms = start.elapsed().as_secs_f64() * 1e3;
        }
        if message.offset != received {
            out_of_order += 1;
        }
        received += 1;
        bytes += message.value.len() as u64;
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "  consumed {received} of {count} ({:.0} msgs/s, VmHWM {} MiB)",
                received as f64 / start.elapsed().as_secs_f64(),
                vm_hwm_kib() / 1024
            );
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let hwm_after = vm_hwm_kib();
    consumer.close().await?;
    println!(
        "RESULT messages={received} bytes={bytes} seconds={seconds:.6} first_ms={first_ms:.3} \
         out_of_order={out_of_order} hwm_before_kib={hwm_before} hwm_after_kib={hwm_after}"
    );
    Ok(())
}

/// Child mode: read every stored key of the topic's data with raw range gets.
async fn raw_read_only(namespace: &str, topic: &str) -> Res<()> {
    let client = connect(namespace).await?;
    // Batches are up to ~1.4 MiB: lift etcd-client's 4 MiB response limit,
    // as the library does for its own reads.
    let mut kv = client
        .etcd()
        .kv_client()
        .max_decoding_message_size(256 * 1024 * 1024);
    let prefix = format!("{namespace}/data/{topic}/");
    let mut end = prefix.clone().into_bytes();
    *end.last_mut().expect("prefix is not empty") += 1;
    let hwm_before = vm_hwm_kib();
    let start = Instant::now();
    let mut from = prefix.into_bytes();
    let (mut keys, mut bytes, mut requests) = (0u64, 0u64, 0u64);
    loop {
        let options = GetOptions::new()
            .with_range(end.clone())
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
    let seconds = start.elapsed().as_secs_f64();
    let hwm_after = vm_hwm_kib();
    println!(
        "RESULT keys={keys} bytes={bytes} requests={requests} seconds={seconds:.6} \
         hwm_before_kib={hwm_before} hwm_after_kib={hwm_after}"
    );
    Ok(())
}

fn ms(micros: u64) -> String {
    format!("{:.2}", micros as f64 / 1e3)
}

fn quantiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "{} / {} / {}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

fn mib(kib: f64) -> String {
    format!("{:.1}", kib / 1024.0)
}

async fn bench(args: Args) -> Res<()> {
    let namespace = format!("bench-{:08x}", rand::random::<u32>());
    let admin = connect(&namespace).await?;
    eprintln!("namespace {namespace}: {args:?}");
    let started = Instant::now();
    let result = run_phases(&namespace, &args).await;
    // Clean up whatever happened.
    let deleted = admin
        .etcd()
        .clone()
        .delete(
            format!("{namespace}/"),
            Some(DeleteOptions::new().with_prefix()),
        )
        .await;
    match deleted {
        Ok(d) => eprintln!("deleted {} keys of {namespace}/", d.deleted()),
        Err(e) => eprintln!("could not delete {namespace}/: {e}"),
    }
    let table = result?;
    println!("{table}");
    println!(
        "namespace `{namespace}`, total run time {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn run_phases(namespace: &str, args: &Args) -> Res<String> {
    let (rate, seconds, n) = (args.rate, args.seconds, args.backlog);
    eprintln!("1/4 pubsub-etcd latency: {rate} msgs/s for 1 + {seconds} s");
    let pubsub = pubsub_latency(namespace, rate, seconds).await?;
    eprintln!("2/4 raw etcd put-to-watch latency: {rate} puts/s for 1 + {seconds} s");
    let raw = raw_latency(namespace, rate, seconds).await?;

    eprintln!("3/4 producing a backlog of {n} x {PAYLOAD} B");
    let produce = produce_backlog(namespace, n).await?;
    eprintln!("    produced in {:.1} s", produce.as_secs_f64());

    eprintln!("4/4 catch-up in a fresh process, then the raw read baseline");
    let mut child_args = vec![
        "--catch-up-only".to_string(),
        namespace.to_string(),
        BACKLOG_TOPIC.to_string(),
        n.to_string(),
    ];
    if let Some(messages) = args.fetch_messages {
        child_args.extend(["--fetch-messages".to_string(), messages.to_string()]);
    }
    let catch_up = run_child(&child_args).await?;
    let raw_read = run_child(&[
        "--raw-read-only".to_string(),
        namespace.to_string(),
        BACKLOG_TOPIC.to_string(),
    ])
    .await?;

    let payload_mb = (n * PAYLOAD as u64) as f64 / 1e6;
    let cu_secs = catch_up.get("seconds")?;
    let rr_secs = raw_read.get("seconds")?;
    let rr_bytes = raw_read.get("bytes")?;
    let delivered = |l: &Latency| {
        format!(
            "{}/{} ({} lost{}{}), send rate {:.0}/s",
            l.received,
            l.sent,
            l.sent.saturating_sub(l.received),
            if l.anomalies > 0 {
                format!(", {} dup/reordered", l.anomalies)
            } else {
                String::new()
            },
            if l.write_errors > 0 {
                format!(", {} write errors", l.write_errors)
            } else {
                String::new()
            },
            l.achieved_rate
        )
    };
    let fetch = args
        .fetch_messages
        .map_or("default fetch_messages".to_string(), |m| {
            format!("fetch_messages {m}")
        });

    let mut t = String::new();
    t.push_str(&format!(
        "\n## bench_consume: --rate {rate} --seconds {seconds} --backlog {n}\n\n"
    ));
    t.push_str("| measurement | pubsub-etcd | raw etcd baseline |\n");
    t.push_str("|---|---|---|\n");
    t.push_str(&format!(
        "| send→delivery latency p50 / p99 / max (ms), {rate}/s, 1 s warm-up excluded | {} | {} |\n",
        quantiles(&pubsub.delivery),
        quantiles(&raw.delivery)
    ));
    t.push_str(&format!(
        "| samples measured | {} | {} |\n",
        pubsub.delivery.len(),
        raw.delivery.len()
    ));
    t.push_str(&format!(
        "| delivered / sent | {} | {} |\n",
        delivered(&pubsub),
        delivered(&raw)
    ));
    t.push_str(&format!(
        "| write ack latency p50 / p99 / max (ms) (send→durable; put→response) | {} | {} |\n",
        quantiles(&pubsub.ack),
        quantiles(&raw.ack)
    ));
    t.push_str(&format!(
        "| backlog produce, {n} × {PAYLOAD} B, {IN_FLIGHT} in flight | {:.0} msgs/s, {:.1} MB/s ({:.1} s) | — |\n",
        n as f64 / produce.as_secs_f64(),
        payload_mb / produce.as_secs_f64(),
        produce.as_secs_f64()
    ));
    t.push_str(&format!(
        "| catch-up read of the backlog (1 group member, {fetch}; raw: range gets of {RAW_PAGE} keys) | {:.0} msgs/s, {:.1} MB/s payload ({:.2} s; first message after {:.0} ms; {} out of order) | {:.0} msgs/s equiv., {:.1} MB/s stored ({:.2} s; {} keys, {:.1} MB in {} requests) |\n",
        n as f64 / cu_secs,
        payload_mb / cu_secs,
        cu_secs,
        catch_up.get("first_ms")?,
        catch_up.get("out_of_order")?,
        n as f64 / rr_secs,
        rr_bytes / 1e6 / rr_secs,
        rr_secs,
        raw_read.get("keys")?,
        rr_bytes / 1e6,
        raw_read.get("requests")?
    ));
    t.push_str(&format!(
        "| catch-up process peak RSS, VmHWM before → after (MiB) | {} → {} | {} → {} |\n",
        mib(catch_up.get("hwm_before_kib")?),
        mib(catch_up.get("hwm_after_kib")?),
        mib(raw_read.get("hwm_before_kib")?),
        mib(raw_read.get("hwm_after_kib")?)
    ));
    t.push_str("\nMB = 10^6 bytes. Latency is measured in one process with a monotonic clock.\n");
    Ok(t)
}
