//! What joining a consumer group costs on a topic of many partitions: the
//! time until one member owns every partition, then until a second member's
//! join has settled (each owns half), and the etcd transactions and range
//! reads each phase made, from etcd's own `/metrics` on the client port.
//!
//! ```text
//! PUBSUB_ETCD_ENDPOINTS=127.0.0.1:2379 \
//!     cargo run --release -p pubsub-etcd --example group_join -- [--partitions 4096]
//! ```
//!
//! The topic is empty: what is measured is ownership (claims, releases, the
//! start-position reads), not reading. Run it against an etcd of its own, so
//! that nobody else's requests are counted. Everything lives in a random
//! namespace `join-<hex>`; the topic is deleted at the end.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use clap::Parser;
use pubsub_etcd::{endpoints_from_env, AutoCommit, Client, Consumer, NewTopic};

#[derive(Debug, Parser)]
struct Args {
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=4096))]
    partitions: u32,
}

#[tokio::main]
async fn main() -> pubsub_etcd::Result<()> {
    let args = Args::parse();
    let endpoints = endpoints_from_env();
    let client = Client::builder(endpoints.clone())
        .namespace(format!("join-{:08x}", rand::random::<u32>()))
        .connect()
        .await?;
    client
        .create_topic(NewTopic::new("t", args.partitions))
        .await?;
    let etcd = &endpoints[0];
    let join = || {
        client
            .consumer("t", "g")
            .auto_commit(AutoCommit::Disabled)
            .join()
    };

    let before = requests(etcd);
    let started = Instant::now();
    let mut first = join().await?;
    settle(&mut [&mut first], args.partitions as usize).await;
    report(
        "1 member owns all",
        started.elapsed(),
        before,
        requests(etcd),
    );

    let before = requests(etcd);
    let started = Instant::now();
    let mut second = join().await?;
    settle(&mut [&mut first, &mut second], args.partitions as usize / 2).await;
    report(
        "2nd member joined, settled",
        started.elapsed(),
        before,
        requests(etcd),
    );

    first.close().await?;
    second.close().await?;
    client.delete_topic("t").await?;
    Ok(())
}

/// Polls every member (so revocations are acknowledged) until each owns at
/// least `share` partitions.
async fn settle(members: &mut [&mut Consumer], share: usize) {
    while !members.iter().all(|m| m.assignment().len() >= share) {
        for m in members.iter_mut() {
            let _ = tokio::time::timeout(Duration::from_millis(5), m.next_event()).await;
        }
    }
}

fn report(phase: &str, took: Duration, before: (u64, u64), after: (u64, u64)) {
    println!(
        "{phase}: {:.2} s, {} txns, {} range reads",
        took.as_secs_f64(),
        after.0 - before.0,
        after.1 - before.1
    );
}

/// etcd's counts of Txn and Range calls so far (`grpc_server_started_total`).
fn requests(endpoint: &str) -> (u64, u64) {
    let mut stream = std::net::TcpStream::connect(endpoint).expect("etcd metrics");
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n"
    )
    .expect("metrics request");
    let mut page = String::new();
    stream.read_to_string(&mut page).expect("metrics page");
    let count = |method: &str| {
        let needle = format!("grpc_method=\"{method}\"");
        page.lines()
            .filter(|l| l.starts_with("grpc_server_started_total{") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    (count("Txn"), count("Range"))
}
