//! The README's walk-through: connect, create a topic, produce, read back.
//!
//! Run it against a local etcd (`scripts/quickstart.sh` starts one):
//! `cargo run -p pubsub-etcd --example quickstart`

use pubsub_etcd::{Client, NewTopic, Record};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Endpoints come from PUBSUB_ETCD_ENDPOINTS (default 127.0.0.1:2379).
    let client = Client::builder(pubsub_etcd::endpoints_from_env())
        .namespace(format!("quickstart-{}", std::process::id()))
        .connect()
        .await?;

    let topic = client
        .create_topic(NewTopic::new("my-awesome-topic", 3))
        .await?;
    println!(
        "created topic {} with {} partitions",
        topic.name, topic.partitions
    );

    // A second create of the same name fails; get the existing topic instead.
    if let Err(e) = client
        .create_topic(NewTopic::new("my-awesome-topic", 3))
        .await
    {
        println!("as expected: {e}");
    }
    let topic = client.topic("my-awesome-topic").await?;

    let producer = client.producer(&topic.name).build().await?;
    let words = ["hello", "darkness", "my", "old", "friend"];
    let results = producer
        .send_batch(words.iter().map(|w| Record::new(*w)))
        .await;
    for (word, result) in words.iter().zip(&results) {
        let sent = result.as_ref().map_err(|e| e.error.clone())?;
        let (partition, offset) = (sent.partition, sent.offset);
        println!("sent {word:?} to partition {partition} at offset {offset}");
    }
    let sent = producer
        .send(
            Record::new("keyed")
                .key("user-42")
                .header("source", "quickstart"),
        )
        .await?;
    println!(
        "sent a keyed message to partition {} at offset {}",
        sent.partition, sent.offset
    );
    producer.close().await?;

    for p in 0..topic.partitions {
        let fetched = client.fetch(&topic.name, p, 0, 100).await?;
        for m in fetched.messages {
            println!(
                "read partition {} offset {}: {}",
                m.partition,
                m.offset,
                String::from_utf8_lossy(&m.value)
            );
        }
    }
    for p in client.describe_topic(&topic.name).await?.partitions {
        println!(
            "partition {}: earliest {} next {}",
            p.partition, p.earliest, p.next
        );
    }

    client.delete_topic(&topic.name).await?;
    println!("deleted topic {}", topic.name);
    Ok(())
}
