//! Port of the Go original's `continuous-message-stream` example: a producer
//! publishes a message every interval while a consumer-group member,
//! subscribed with one subscription per partition (the original's shape),
//! prints what arrives. Ctrl-C (or `--seconds N`) unsubscribes cleanly:
//! offsets are committed, partitions released at once, the lease revoked.
//!
//! ```text
//! cargo run -p pubsub-etcd --example continuous_message_stream -- [--seconds N] [--every-ms 200]
//! ```

use std::time::Duration;

use pubsub_etcd::{AutoCommit, Client, NewTopic, Record};

/// The original's continuous message stream: a producer and a group
/// member with one subscription per partition.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Stop after this many seconds [default: at Ctrl-C]
    #[arg(long)]
    seconds: Option<u64>,
    /// Milliseconds between two produced messages
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    every_ms: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Args { seconds, every_ms } = clap::Parser::parse();

    let client = Client::builder(pubsub_etcd::endpoints_from_env())
        .namespace("continuous-message-stream")
        .connect()
        .await?;
    let topic = match client
        .create_topic(NewTopic::new("my-awesome-topic", 3))
        .await
    {
        Ok(topic) => topic,
        Err(pubsub_etcd::Error::TopicExists(_)) => client.topic("my-awesome-topic").await?,
        Err(e) => return Err(e.into()),
    };

    // The producer: one message per interval, keyed so each key keeps its
    // partition, until told to stop.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let producer = client.producer(&topic.name).build().await?;
    let producing = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
            let mut n: u64 = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                let record = Record::new(format!("message {n}")).key(format!("key-{}", n % 5));
                match producer.send(record).await {
                    Ok(sent) => {
                        let (partition, offset) = (sent.partition, sent.offset);
                        println!("sent message {n} to partition {partition} at offset {offset}")
                    }
                    Err(e) => eprintln!("send failed: {e}"),
                }
                n += 1;
            }
        })
    };

    // The consumer: a member of group "foobar", one subscription (and one
    // task) per partition it is assigned.
    let member = client
        .consumer(&topic.name, "foobar")
        .auto_commit(AutoCommit::Interval(Duration::from_secs(1)))
        .join()
        .await?;
    let mut subscriptions = member.into_partitioned(64);
    let stop = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(stop);
    let mut readers = Vec::new();
    loop {
        let subscription = tokio::select! {
            _ = &mut stop => break,
            subscription = subscriptions.next_subscription() => subscription,
        };
        let Some(mut subscription) = subscription else {
            break;
        };
        println!("subscribed to partition {}", subscription.partition);
        readers.push(tokio::spawn(async move {
            while let Some(message) = subscription.recv().await {
                match message {
                    Ok(m) => println!(
                        "received partition {} offset {}: {}",
                        m.partition,
                        m.offset,
                        String::from_utf8_lossy(&m.value)
                    ),
                    Err(e) => eprintln!("receive failed: {e}"),
                }
            }
            println!("partition {} unsubscribed", subscription.partition);
        }));
    }

    println!("stopping");
    stop_tx.send(true)?;
    producing.await?;
    producer.close().await?;
    // Unsubscribe: end every subscription, commit, release, leave.
    subscriptions.close().await?;
    for reader in readers {
        reader.await?;
    }
    Ok(())
}
