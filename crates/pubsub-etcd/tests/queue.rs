//! Queue mode against a real etcd: settlement, redelivery after ack_wait,
//! nack delays and delivery counts.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::ns::client;
use pubsub_etcd::{NewTopic, Record};
use tokio::time::{timeout, Instant};

#[tokio::test]
async fn every_message_is_settled_and_an_unacked_one_comes_back_after_ack_wait() {
    let (client, _ns) = client().await;
    client.create_topic(NewTopic::new("jobs", 2)).await.unwrap();
    let producer = client.producer("jobs").build().await.unwrap();
    for i in 0..20 {
        producer.send(Record::new(format!("m{i}"))).await.unwrap();
    }
    let wait = Duration::from_millis(800);
    let mut queue = client
        .queue("jobs", "q")
        .ack_wait(wait)
        .join()
        .await
        .unwrap();
    let mut acked = BTreeSet::new();
    let mut dropped = None;
    let mut redelivered_after = None;
    while acked.len() < 20 {
        let job = timeout(Duration::from_secs(10), queue.recv())
            .await
            .unwrap()
            .unwrap();
        let id = (job.message.partition, job.message.offset);
        if dropped.is_none() {
            dropped = Some((id, Instant::now()));
            continue;
        }
        if Some(id) == dropped.map(|d| d.0) {
            assert_eq!(job.delivery_count, 2);
            redelivered_after = dropped.map(|d| d.1.elapsed());
        }
        assert!(acked.insert(id), "{id:?} delivered again after its ack");
        job.ack().await.unwrap();
    }
    let after = redelivered_after.expect("the unacked job came back");
    assert!(
        after >= wait && after < wait + Duration::from_secs(1),
        "{after:?}"
    );
    queue.close().await;
    let stats = client.queue_stats("jobs", "q").await.unwrap();
    assert_eq!(
        (stats.pending, stats.in_flight, stats.redelivered),
        (0, 0, 1),
        "{stats:?}"
    );
    producer.close().await.unwrap();
}
