//! Shorthands for the consumer-group tests: a member with a short lease and
//! no auto-commit, producing a set of records, and awaiting the next item of
//! a consumer or reader under a hang guard.

use std::future::Future;
use std::time::Duration;

use pubsub_etcd::{AutoCommit, Client, Consumer, Producer, Record};

/// Session TTL of test members: short, so takeovers happen in seconds.
pub const TTL: Duration = Duration::from_secs(3);

/// Joins `group` on `topic` with [`TTL`] and no auto-commit.
pub async fn member(client: &Client, topic: &str, group: &str) -> Consumer {
    client
        .consumer(topic, group)
        .session_ttl(TTL)
        .auto_commit(AutoCommit::Disabled)
        .join()
        .await
        .unwrap()
}

/// Sends `records` and requires every one to be acknowledged.
pub async fn send_all(producer: &Producer, records: impl IntoIterator<Item = Record>) {
    for result in producer.send_batch(records).await {
        result.unwrap();
    }
}

/// Sends `records` as one batch (one append, given a producer with a long
/// linger): enqueues them all, flushes, and returns their offsets.
pub async fn send_one_batch(producer: &Producer, records: Vec<Record>) -> Vec<u64> {
    let mut deliveries = Vec::new();
    for r in records {
        deliveries.push(producer.enqueue(r).await.unwrap());
    }
    producer.flush().await.unwrap();
    let mut out = Vec::new();
    for d in deliveries {
        out.push(d.await.unwrap().offset);
    }
    out
}

/// The next item of a consumer or reader (`recv`, `next_event`): panics if
/// none comes within `guard`, the stream ended, or it is an error.
pub async fn within<T>(
    guard: Duration,
    next: impl Future<Output = Option<pubsub_etcd::Result<T>>>,
) -> T {
    tokio::time::timeout(guard, next)
        .await
        .expect("nothing arrived in time")
        .expect("the stream ended")
        .unwrap()
}
