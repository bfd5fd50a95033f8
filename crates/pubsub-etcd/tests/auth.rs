//! etcd authentication and RBAC: a user confined by etcd to one namespace's
//! prefix can do everything in that namespace (topics, producing, a
//! consumer group with its leases, commits, deletion) and nothing outside.

mod common;

use std::time::Duration;

use common::etcd_proc::{self, EtcdCluster};
use common::group::send_all;
use pubsub_etcd::{AutoCommit, Client, Error, NewTopic, Record};
use tokio::time::timeout;

/// Runs etcdctl against `endpoint` (as root once auth is on), failing the
/// test if it fails.
fn etcdctl(endpoint: &str, root: bool, args: &[&str]) {
    let user = root.then_some("--user=root:root-secret");
    let args: Vec<&str> = user.iter().chain(args).copied().collect();
    etcd_proc::etcdctl_ok(endpoint, &args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_confined_to_a_namespace_works_inside_and_is_refused_outside() {
    let cluster = EtcdCluster::start(1);
    let ep = cluster.endpoint(0);
    etcdctl(&ep, false, &["user", "add", "root:root-secret"]);
    etcdctl(&ep, false, &["role", "add", "app1"]);
    etcdctl(
        &ep,
        false,
        &[
            "role",
            "grant-permission",
            "app1",
            "--prefix=true",
            "readwrite",
            "app1/",
        ],
    );
    etcdctl(&ep, false, &["user", "add", "alice:alice-secret"]);
    etcdctl(&ep, false, &["user", "grant-role", "alice", "app1"]);
    etcdctl(&ep, false, &["auth", "enable"]);

    let alice = Client::builder([ep.clone()])
        .namespace("app1")
        .user("alice", "alice-secret")
        .connect()
        .await
        .unwrap();
    alice
        .create_topic(NewTopic::new("orders", 2))
        .await
        .unwrap();
    let producer = alice.producer("orders").build().await.unwrap();
    send_all(&producer, (0..10).map(|i| Record::new(format!("{i}")))).await;
    let mut consumer = alice
        .consumer("orders", "billing")
        .auto_commit(AutoCommit::Disabled)
        .join()
        .await
        .unwrap();
    for _ in 0..10 {
        let m = timeout(Duration::from_secs(10), consumer.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        consumer.commit(&m).await.unwrap();
    }
    consumer.close().await.unwrap();
    let lag = alice.group_lag("orders", "billing").await.unwrap();
    assert!(lag.iter().all(|l| l.lag == 0), "{lag:?}");
    producer.close().await.unwrap();
    alice.delete_topic("orders").await.unwrap();

    // The same user in another namespace: refused at connect, clearly.
    let outside = Client::builder([ep.clone()])
        .namespace("app2")
        .user("alice", "alice-secret")
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&outside, Error::Etcd { detail, .. } if detail.contains("permission denied")),
        "{outside}"
    );
    // A wrong password is refused at connect too.
    let wrong = Client::builder([ep])
        .namespace("app1")
        .user("alice", "not-her-password")
        .connect()
        .await
        .unwrap_err();
    assert!(
        wrong.to_string().contains("authentication failed"),
        "{wrong}"
    );
}
