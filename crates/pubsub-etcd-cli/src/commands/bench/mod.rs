//! `bench`: throughput and latency of producers and consumers, each
//! optionally next to the raw etcd operation it is built on, measured
//! against the same etcd in the same run.
//!
//! Every benchmark works in a namespace of its own, `<NS>-bench-<random>`,
//! and deletes everything under it at the end, whatever happened: a
//! benchmark writes far more than the commands a person runs, and must not
//! leave it behind in someone's namespace.

mod console;
mod consume;
mod etcd_metrics;
mod latency;
mod partitions;
mod payload;
mod pipeline;
mod produce;
mod queue;

use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use etcd_client::{DeleteOptions, GetOptions};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pubsub_etcd::{Client, PartitionInfo};
use serde::Serialize;
use tokio::time::MissedTickBehavior;

use crate::cli::{BenchCommand, ConnectionArgs, Format, Payload};
use crate::output;

/// Keys still written by tasks that were winding down when the benchmark
/// ended (e.g. a consumer's last commit after Ctrl-C) are swept once more
/// after this long.
const SETTLE: Duration = Duration::from_secs(1);
/// The longest cleaning up may take: with etcd gone it would wait forever,
/// and Ctrl-C no longer ends the process once its handler is installed.
const CLEAN_UP: Duration = Duration::from_secs(30);

/// What a benchmark reports: one JSON object, or text for people.
trait Summary: Serialize {
    /// Name of the benchmark in the JSON object.
    const BENCH: &'static str;

    /// The settings line and the table(s), ending in a newline.
    fn text(&self, namespace: &str) -> String;
}

/// Runs one benchmark in a fresh namespace next to `connection`'s and
/// deletes that namespace afterwards, also after an error or Ctrl-C.
pub async fn run(
    mut connection: ConnectionArgs,
    credentials: Option<(String, String)>,
    command: BenchCommand,
) -> anyhow::Result<()> {
    if let BenchCommand::PartitionsWorker(args) = &command {
        // A child of `bench partitions`: its parent owns the namespace.
        connection.namespace.clone_from(&args.bench_namespace);
        let client = super::connect(&connection, credentials).await?;
        return partitions::worker(&client, args).await;
    }
    let base = connection.namespace.trim_end_matches('/');
    let namespace = format!("{base}-bench-{:08x}", rand::random::<u32>());
    connection.namespace = namespace.clone();
    let client = super::connect(&connection, credentials.clone()).await?;
    let outcome = tokio::select! {
        outcome = dispatch(&client, &namespace, &connection, credentials.as_ref(), command) => outcome,
        () = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    let cleaned = tokio::time::timeout(CLEAN_UP, clean_up(&client, &namespace))
        .await
        .map_err(|_| anyhow::anyhow!("etcd did not answer within {CLEAN_UP:?}"))
        .and_then(|deleted| deleted.map_err(anyhow::Error::from))
        .with_context(|| {
            format!("cannot delete the bench namespace; `etcdctl del --prefix {namespace}/` does")
        });
    match (outcome, cleaned) {
        (Ok(summary), cleaned) => {
            // The measurements stand even when the cleanup failed.
            output::print_text(&summary)?;
            cleaned
        }
        (Err(e), Ok(())) => Err(e.context(format!(
            "bench in namespace {namespace:?} stopped, its keys deleted"
        ))),
        (Err(e), Err(cleanup)) => Err(anyhow::anyhow!(
            "{}; {}",
            output::render_error(&e),
            output::render_error(&cleanup)
        )),
    }
}

async fn dispatch(
    client: &Client,
    namespace: &str,
    connection: &ConnectionArgs,
    credentials: Option<&(String, String)>,
    command: BenchCommand,
) -> anyhow::Result<String> {
    match command {
        BenchCommand::Produce(args) => {
            let format = args.options.format;
            render(produce::run(client, &args).await?, namespace, format)
        }
        BenchCommand::Consume(args) => {
            let format = args.options.format;
            render(consume::run(client, &args).await?, namespace, format)
        }
        BenchCommand::Latency(args) => {
            let format = args.options.format;
            render(latency::run(client, &args).await?, namespace, format)
        }
        BenchCommand::Partitions(args) => {
            let format = args.options.format;
            let summary = partitions::run(client, connection, credentials, &args).await?;
            render(summary, namespace, format)
        }
        BenchCommand::Queue(args) => {
            let format = args.options.format;
            render(
                queue::run(client, connection, &args).await?,
                namespace,
                format,
            )
        }
        BenchCommand::Pipeline(args) => {
            let format = args.options.format;
            render(pipeline::run(client, &args).await?, namespace, format)
        }
        BenchCommand::Console(args) => {
            let format = args.options.format;
            render(console::run(client, &args).await?, namespace, format)
        }
        BenchCommand::PartitionsWorker(_) => unreachable!("run without a bench namespace"),
    }
}

/// The summary as printed: one JSON line, or the tables.
fn render<S: Summary>(summary: S, namespace: &str, format: Format) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Document<'a, S> {
        bench: &'static str,
        namespace: &'a str,
        #[serde(flatten)]
        summary: &'a S,
    }
    Ok(match format {
        Format::Json => {
            let document = Document {
                bench: S::BENCH,
                namespace,
                summary: &summary,
            };
            format!("{}\n", serde_json::to_string(&document)?)
        }
        Format::Table => summary.text(namespace),
    })
}

/// Resolves on Ctrl-C; never, when the handler cannot be installed.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Deletes every key of the benchmark's namespace, twice if the first
/// sweep left some: tasks of a benchmark cut short may still write briefly.
async fn clean_up(client: &Client, namespace: &str) -> Result<(), etcd_client::Error> {
    let prefix = format!("{namespace}/");
    let mut kv = client.etcd().kv_client();
    let delete = || DeleteOptions::new().with_prefix();
    kv.delete(prefix.clone(), Some(delete())).await?;
    let left = kv
        .get(
            prefix.clone(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count();
    if left > 0 {
        tokio::time::sleep(SETTLE).await;
        kv.delete(prefix, Some(delete())).await?;
    }
    Ok(())
}

/// Latencies in microseconds, 1 µs to 10 minutes, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("the histogram bounds are valid")
}

fn micros_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Records into a histogram shared by tasks.
fn record(histogram: &Mutex<Histogram<u64>>, micros: u64) {
    histogram
        .lock()
        .expect("histogram lock")
        .saturating_record(micros);
}

/// Latency percentiles in milliseconds; absent without samples.
#[derive(Debug, Clone, Copy, Serialize)]
struct Percentiles {
    samples: u64,
    p50: Option<f64>,
    p95: Option<f64>,
    p99: Option<f64>,
    p99_9: Option<f64>,
    max: Option<f64>,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Self {
        let at =
            |q: f64| (!histogram.is_empty()).then(|| histogram.value_at_quantile(q) as f64 / 1e3);
        Percentiles {
            samples: histogram.len(),
            p50: at(0.5),
            p95: at(0.95),
            p99: at(0.99),
            p99_9: at(0.999),
            max: (!histogram.is_empty()).then(|| histogram.max() as f64 / 1e3),
        }
    }

    /// Table cells: p50, p95, p99, p99.9, max.
    fn cells(&self) -> Vec<String> {
        [self.p50, self.p95, self.p99, self.p99_9, self.max]
            .into_iter()
            .map(|v| v.map_or_else(|| "-".to_string(), |ms| format!("{ms:.2}")))
            .collect()
    }

    /// Each percentile divided by `other`'s.
    fn ratio(&self, other: &Percentiles) -> Vec<String> {
        let pairs = [
            (self.p50, other.p50),
            (self.p95, other.p95),
            (self.p99, other.p99),
            (self.p99_9, other.p99_9),
            (self.max, other.max),
        ];
        pairs
            .into_iter()
            .map(|pair| match pair {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".to_string(),
            })
            .collect()
    }
}

/// `a / b`, absent when `b` is zero.
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn cell(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

/// What a topic holds in etcd after a run: application bytes against
/// bytes as stored (after compression).
#[derive(Debug, Serialize)]
struct Stored {
    /// Records as encoded, before compression (values plus framing).
    record_bytes: u64,
    /// Batch values as stored in etcd.
    stored_bytes: u64,
    stored_mb_per_sec: f64,
    stored_bytes_per_msg: f64,
    /// record_bytes / stored_bytes.
    ratio: Option<f64>,
}

/// The stored bytes of `partitions` holding `messages`, written (or read)
/// in `seconds`.
fn stored(partitions: &[PartitionInfo], messages: u64, seconds: f64) -> Stored {
    let record_bytes = partitions.iter().map(|p| p.bytes).sum();
    let stored_bytes = partitions.iter().map(|p| p.stored_bytes).sum();
    Stored {
        record_bytes,
        stored_bytes,
        stored_mb_per_sec: megabytes_per_second(stored_bytes, seconds),
        stored_bytes_per_msg: stored_bytes as f64 / messages.max(1) as f64,
        ratio: ratio(record_bytes as f64, stored_bytes as f64),
    }
}

/// Table cells: stored MB/s, ratio, stored bytes per message.
fn stored_cells(stored: Option<&Stored>) -> [String; 3] {
    match stored {
        Some(s) => [
            format!("{:.2}", s.stored_mb_per_sec),
            cell(s.ratio),
            format!("{:.1}", s.stored_bytes_per_msg),
        ],
        None => ["-".to_string(), "-".to_string(), "-".to_string()],
    }
}

/// The messages' values, for the settings line.
fn payload_text(payload: Payload, size: u32) -> String {
    match payload {
        Payload::Random => format!("{size} B of random bytes"),
        Payload::Text => format!("{size} B of text"),
        Payload::JsonLogs => "JSON log lines of 200-600 B".to_string(),
    }
}

fn megabytes_per_second(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds
}

/// A progress bar on stderr counting to `len`, shown only when stderr is a
/// terminal.
fn progress(len: u64, what: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} {wide_bar} {human_pos}/{human_len} [{elapsed}]")
            .expect("the progress template is valid"),
    );
    bar.set_message(what);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Ticks at a fixed rate. Late ticks are caught up in a burst, so the
/// average rate holds even when the timer wakes late.
struct Pacer {
    interval: tokio::time::Interval,
}

impl Pacer {
    /// None paces nothing.
    fn new(per_second: Option<f64>) -> Option<Self> {
        let per_second = per_second.filter(|r| *r > 0.0)?;
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
        interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
        Some(Pacer { interval })
    }

    async fn tick(pacer: &mut Option<Self>) {
        if let Some(pacer) = pacer {
            pacer.interval.tick().await;
        }
    }
}

/// `total` split into `parts` shares that differ by at most one.
fn share(total: u64, parts: u64, index: u64) -> u64 {
    total / parts + u64::from(index < total % parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        for (total, parts) in [(10, 3), (2, 64), (64, 64), (1_000_001, 7)] {
            let shares: Vec<u64> = (0..parts).map(|i| share(total, parts, i)).collect();
            assert_eq!(shares.iter().sum::<u64>(), total);
            let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(max - min <= 1, "{shares:?}");
        }
    }

    #[test]
    fn percentiles_of_nothing_are_absent() {
        let empty = Percentiles::of(&histogram());
        assert_eq!(empty.samples, 0);
        assert!(empty.p50.is_none() && empty.max.is_none());
        assert_eq!(empty.cells(), vec!["-"; 5]);
        let mut h = histogram();
        for micros in 1..=1000 {
            h.record(micros).unwrap();
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.samples, 1000);
        assert!((p.p50.unwrap() - 0.5).abs() < 0.01, "{p:?}");
        assert!((p.max.unwrap() - 1.0).abs() < 0.01, "{p:?}");
        assert_eq!(p.ratio(&p), vec!["1.00"; 5]);
        assert_eq!(p.ratio(&empty), vec!["-"; 5]);
    }
}
