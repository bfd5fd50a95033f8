//! A three-member etcd cluster with one member frozen (SIGSTOP): clients
//! must keep working through the other two. Without endpoint health checks,
//! a third of all requests went to the frozen member and each waited out
//! the request timeout (4 acknowledged sends in 8 s were measured).

mod common;

use std::time::Duration;

use common::etcd_proc::EtcdCluster;
use pubsub_etcd::{AutoCommit, Client, NewTopic, Record};
use tokio::time::{timeout, Instant};

/// Generous: with the frozen member in rotation these 200 sequential sends
/// take over a minute; out of rotation, well under a second.
const BOUND: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_does_not_stall_producers_or_consumers() {
    let cluster = EtcdCluster::start(3);
    let client = Client::builder(cluster.endpoints())
        .namespace("frozen-member")
        .request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let mut consumer = client
        .consumer("t", "g")
        .session_ttl(Duration::from_secs(5))
        .auto_commit(AutoCommit::Disabled)
        .join()
        .await
        .unwrap();
    for i in 0..20 {
        producer.send(Record::new(format!("{i}"))).await.unwrap();
    }
    for i in 0..20u64 {
        let m = timeout(BOUND, consumer.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.offset, i);
    }

    // Freeze a member that is not the leader first (the harder case for the
    // client: the cluster itself stays healthy, only that member is stuck),
    // then check the same with whichever member the consumer may be
    // watching through.
    for frozen in [2, 1] {
        // Read before freezing: a single request sent in the second before
        // the health check takes the member out may wait out its timeout
        // (producers and consumers retry; a one-off admin call does not).
        let first = client.describe_topic("t").await.unwrap().partitions[0].next;
        cluster.pause(frozen);
        let started = Instant::now();
        let sends = async {
            for i in 0..200 {
                producer
                    .send(Record::new(format!("frozen-{frozen}-{i}")))
                    .await
                    .unwrap();
            }
        };
        timeout(BOUND, sends).await.unwrap_or_else(|_| {
            panic!("200 sends did not finish within {BOUND:?} with member {frozen} frozen")
        });
        for offset in first..first + 200 {
            let m = timeout(BOUND, consumer.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("consumer stalled at offset {offset} with member {frozen} frozen")
                })
                .unwrap()
                .unwrap();
            assert_eq!(m.offset, offset);
        }
        eprintln!(
            "member {frozen} frozen: 200 sends and deliveries in {:?}",
            started.elapsed()
        );
        cluster.resume(frozen);
    }
    consumer.close().await.unwrap();
    producer.close().await.unwrap();
}
