//! Producer throughput against raw etcd puts.
//!
//! ```text
//! cargo run --release -p pubsub-etcd --example bench_produce -- [--seconds N] [--size BYTES]
//! ```
//!
//! Runs against `PUBSUB_ETCD_ENDPOINTS` (default `127.0.0.1:2379`), each case
//! for N seconds (default 5) with messages of BYTES bytes (default 100):
//!
//! - (a) baseline: raw etcd puts, one key per message, 64 puts in flight;
//! - (b) one producer task keeping up to 50,000 records in flight with
//!   `Producer::enqueue`, topic of 8 partitions (keyless records rotate);
//! - (c) 8 tasks sharing one producer, each doing the same, 8 partitions;
//! - (d) the same 8 tasks on a topic of 1 partition.
//!
//! Prints a markdown table. Everything lives under a random namespace
//! `bench-<hex>`, deleted at the end. Deleting does not shrink etcd's
//! database: one run can leave over a gigabyte of history (until compaction
//! and defragmentation) against the default 2 GiB quota, so prefer a
//! throwaway etcd (e.g. `--quota-backend-bytes` raised) to a shared one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pubsub_etcd::{Bytes, Client, Delivery, NewTopic, Producer, Record};

/// Raw puts in flight for the baseline.
const BASELINE_IN_FLIGHT: usize = 64;
/// Records one producer task keeps in flight.
const WINDOW: usize = 50_000;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    seconds: u64,
    size: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 5,
        size: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name}: not a number: {v:?}"))
        };
        match arg.as_str() {
            "--seconds" => args.seconds = value("--seconds")?.max(1),
            "--size" => args.size = value("--size")? as usize,
            "-h" | "--help" => {
                println!("usage: bench_produce [--seconds N] [--size BYTES]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

/// One measured case.
struct Outcome {
    case: &'static str,
    messages: u64,
    elapsed: Duration,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args().map_err(|e| -> BoxError { e.into() })?;
    let namespace = format!("bench-{:016x}", rand::random::<u64>());
    let endpoints = pubsub_etcd::endpoints_from_env();
    let client = Client::builder(endpoints.clone())
        .namespace(&namespace)
        .connect()
        .await?;
    eprintln!(
        "bench_produce: {} s per case, {} byte messages, etcd {:?}, namespace {namespace}",
        args.seconds, args.size, endpoints
    );
    let result = run(&client, &namespace, &args).await;
    // Clean up whatever happened: the topics, then anything left under the
    // namespace (the baseline's raw keys).
    for topic in client.list_topics().await.unwrap_or_default() {
        let _ = client.delete_topic(&topic.name).await;
    }
    client
        .etcd()
        .kv_client()
        .delete(
            format!("{namespace}/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
    let outcomes = result?;

    let baseline = outcomes[0].rate();
    println!();
    println!(
        "{} s per case, {}-byte messages, etcd {}",
        args.seconds,
        args.size,
        endpoints.join(",")
    );
    println!();
    println!("| case | msgs/s | MB/s | ratio vs baseline |");
    println!("| --- | ---: | ---: | ---: |");
    for o in &outcomes {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} |",
            o.case,
            o.rate(),
            o.rate() * args.size as f64 / 1e6,
            o.rate() / baseline
        );
    }
    Ok(())
}

async fn run(client: &Client, namespace: &str, args: &Args) -> Result<Vec<Outcome>, BoxError> {
    let duration = Duration::from_secs(args.seconds);
    let value = Bytes::from(vec![b'x'; args.size]);
    let mut outcomes = Vec::new();

    eprintln!("(a) baseline: raw etcd puts, {BASELINE_IN_FLIGHT} in flight");
    outcomes.push(baseline(client, namespace, &value, duration).await?);

    let cases: [(&'static str, &str, u32, usize); 3] = [
        (
            "(b) producer, 1 task, enqueue window 50k, 8 partitions",
            "bench-b",
            8,
            1,
        ),
        (
            "(c) producer, 8 tasks, enqueue window 50k each, 8 partitions",
            "bench-c",
            8,
            8,
        ),
        (
            "(d) producer, 8 tasks, enqueue window 50k each, 1 partition",
            "bench-d",
            1,
            8,
        ),
    ];
    for (case, topic, partitions, tasks) in cases {
        eprintln!("{case}");
        client
            .create_topic(NewTopic::new(topic, partitions))
            .await?;
        let producer = client.producer(topic).build().await?;
        let outcome = produce(case, &producer, tasks, &value, duration).await?;
        producer.close().await?;
        // Sanity: the partitions hold exactly the acknowledged messages.
        let stored: u64 = client
            .describe_topic(topic)
            .await?
            .partitions
            .iter()
            .map(|p| p.next - p.earliest)
            .sum();
        if stored != outcome.messages {
            return Err(format!(
                "{case}: {} messages acknowledged but {stored} stored",
                outcome.messages
            )
            .into());
        }
        client.delete_topic(topic).await?;
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Raw puts, one key per message, `BASELINE_IN_FLIGHT` at a time.
async fn baseline(
    client: &Client,
    namespace: &str,
    value: &Bytes,
    duration: Duration,
) -> Result<Outcome, BoxError> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for task in 0..BASELINE_IN_FLIGHT {
        let mut kv = client.etcd().kv_client();
        let value = value.to_vec();
        let prefix = format!("{namespace}/raw/{task:02}/");
        tasks.push(tokio::spawn(async move {
            let mut puts = 0u64;
            while Instant::now() < deadline {
                kv.put(format!("{prefix}{puts:012}"), value.clone(), None)
                    .await?;
                puts += 1;
            }
            Ok::<_, etcd_client::Error>(puts)
        }));
    }
    let mut messages = 0;
    for task in tasks {
        messages += task.await??;
    }
    Ok(Outcome {
        case: "(a) baseline: raw etcd put, 64 in flight",
        messages,
        elapsed: started.elapsed(),
    })
}

/// `tasks` tasks sharing `producer`, each keeping up to `WINDOW` records in
/// flight until the time is up, then waiting for all of them.
async fn produce(
    case: &'static str,
    producer: &Producer,
    tasks: usize,
    value: &Bytes,
    duration: Duration,
) -> Result<Outcome, BoxError> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let producer = producer.clone();
        let value = value.clone();
        handles.push(tokio::spawn(async move {
            let mut in_flight: VecDeque<Delivery> = VecDeque::with_capacity(WINDOW);
            let mut acked = 0u64;
            while Instant::now() < deadline {
                if in_flight.len() >= WINDOW {
                    if let Some(delivery) = in_flight.pop_front() {
                        delivery.await?;
                        acked += 1;
                    }
                }
                in_flight.push_back(producer.enqueue(Record::new(value.clone())).await?);
            }
            for delivery in in_flight {
                delivery.await?;
                acked += 1;
            }
            Ok::<_, pubsub_etcd::Error>(acked)
        }));
    }
    let mut messages = 0;
    for handle in handles {
        messages += handle.await??;
    }
    Ok(Outcome {
        case,
        messages,
        elapsed: started.elapsed(),
    })
}
