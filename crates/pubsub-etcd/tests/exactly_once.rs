//! Exactly-once transactions (`Consumer::transaction`) against a real etcd:
//! outputs and input offsets land together, a member that lost its input
//! partition writes nothing, a lost race on an output head is retried,
//! etcd's limits are refused before sending, and a deleted output topic is
//! reported; a commit whose answer was lost is found landed, not written
//! again.

mod common;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::bounded;
use common::group::{member, send_all, within};
use common::proxy::Proxy;
use pubsub_etcd::{
    partition_for_key, AutoCommit, Client, Consumer, Error, Message, NewTopic, Record, Transaction,
};

const GUARD: Duration = Duration::from_secs(10);

/// Every stored message of every partition of `topic`.
async fn read_all(client: &Client, topic: &str) -> Vec<Message> {
    let info = client.topic(topic).await.unwrap();
    let mut out = Vec::new();
    for p in 0..info.partitions {
        let page = client.fetch(topic, p, 0, 100_000).await.unwrap();
        out.extend(page.messages);
    }
    out
}

/// Topics `in` and `out` of one partition each, `in` holding `inputs`.
async fn in_and_out<const N: usize>(client: &Client, inputs: [Record; N]) {
    client.create_topic(NewTopic::new("in", 1)).await.unwrap();
    client.create_topic(NewTopic::new("out", 1)).await.unwrap();
    let producer = client.producer("in").build().await.unwrap();
    send_all(&producer, inputs).await;
}

/// Receives the next input and adds `output` for it to `tx`, with the
/// input to commit.
async fn pass_on(consumer: &mut Consumer, tx: &mut Transaction, output: &str) -> Message {
    let input = within(GUARD, consumer.recv()).await;
    tx.send("out", Record::new(output.to_string()));
    tx.commit_input(&input);
    input
}

/// Keys under the namespace's data prefix: batches and heads.
async fn data_keys(client: &Client, ns: &str) -> i64 {
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    let mut etcd = client.etcd().clone();
    etcd.get(format!("{ns}/data/"), Some(options))
        .await
        .unwrap()
        .count()
}

/// Next offsets the group committed, per partition.
async fn committed(client: &Client, topic: &str, group: &str) -> Vec<Option<u64>> {
    let lag = client.group_lag(topic, group).await.unwrap();
    lag.into_iter().map(|l| l.committed).collect()
}

/// Revokes the etcd lease under which the group's owner key of partition 0
/// lives: the member loses the partition in etcd.
async fn revoke_owner_lease(client: &Client, ns: &str, topic: &str, group: &str) {
    let key = format!("{ns}/groups/{topic}/{group}/owners/00000");
    let mut etcd = client.etcd().clone();
    let got = etcd.get(key.clone(), None).await.unwrap();
    let lease = got.kvs().first().expect("partition 0 is owned").lease();
    etcd.lease_revoke(lease).await.unwrap();
}

/// Runs `f` with a client of `ns` on a runtime of its own on another
/// thread, blocking the calling test's (current-thread) runtime meanwhile:
/// its member tasks stand still as a SIGSTOPped process's would, and learn
/// of nothing `f` does until the test goes on.
fn while_frozen<F, Fut, T>(ns: &str, f: F) -> T
where
    F: FnOnce(Client) -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async { f(common::ns::connect(ns).await).await })
            })
            .join()
            .unwrap()
    })
}

#[tokio::test]
async fn outputs_and_offsets_land_together_partitioned_as_the_producer() {
    let (client, _ns) = common::ns::client().await;
    client.create_topic(NewTopic::new("in", 2)).await.unwrap();
    client.create_topic(NewTopic::new("out", 3)).await.unwrap();
    let producer = client.producer("in").build().await.unwrap();
    send_all(
        &producer,
        (0..20).map(|i| Record::new(format!("v{i}")).key(format!("k{}", i % 7))),
    )
    .await;
    let mut consumer = member(&client, "in", "g").await;
    let mut tx = consumer.transaction();
    for n in 1..=20 {
        let m = within(GUARD, consumer.recv()).await;
        let value = format!("{}!", String::from_utf8_lossy(&m.value));
        tx.send("out", Record::new(value).key(m.key.clone().unwrap()));
        tx.commit_input(&m);
        if n % 5 == 0 {
            let placed = bounded("commit", tx.commit()).await.unwrap();
            assert_eq!(placed.len(), 5);
            assert!(tx.is_empty());
            for meta in placed {
                let page = client
                    .fetch("out", meta.partition, meta.offset, 1)
                    .await
                    .unwrap();
                assert_eq!(page.messages[0].offset, meta.offset);
            }
        }
    }
    let out = read_all(&client, "out").await;
    assert_eq!(out.len(), 20);
    for m in &out {
        let key = m.key.as_ref().unwrap();
        assert_eq!(m.partition, partition_for_key(key, 3), "{m:?}");
        assert!(m.value.ends_with(b"!"));
    }
    let mut values: Vec<_> = out.iter().map(|m| m.value.clone()).collect();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 20, "every input once");
    let described = client.describe_topic("in").await.unwrap();
    let ends: Vec<Option<u64>> = described.partitions.iter().map(|p| Some(p.next)).collect();
    assert_eq!(committed(&client, "in", "g").await, ends);
    consumer.close().await.unwrap();
}

#[tokio::test]
async fn a_transaction_needs_auto_commit_disabled() {
    let (client, _ns) = common::ns::client().await;
    client.create_topic(NewTopic::new("in", 1)).await.unwrap();
    let consumer = client
        .consumer("in", "g")
        .auto_commit(AutoCommit::EveryMessage)
        .join()
        .await
        .unwrap();
    let mut tx = consumer.transaction();
    tx.send("in", Record::new("x"));
    let err = tx.commit().await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig(ref m) if m.contains("AutoCommit::Disabled")),
        "{err}"
    );
    consumer.close().await.unwrap();
}

#[tokio::test]
async fn a_lost_input_partition_refuses_the_whole_transaction() {
    let (client, ns) = common::ns::client().await;
    in_and_out(&client, [Record::new("a")]).await;
    let mut consumer = member(&client, "in", "g").await;
    let m = within(GUARD, consumer.recv()).await;
    let mut tx = consumer.transaction();
    tx.send("out", Record::new("A"));
    tx.commit_input(&m);
    // Lost in etcd while the member stands still: only etcd's compare on
    // the owner key can refuse the commit.
    let name = ns.name().to_string();
    while_frozen(ns.name(), |other| async move {
        revoke_owner_lease(&other, &name, "in", "g").await;
    });
    let err = bounded("commit", tx.commit()).await.unwrap_err();
    assert!(
        matches!(err, Error::NotOwner { ref topic, partition: 0 } if topic == "in"),
        "{err}"
    );
    assert_eq!(
        data_keys(&client, ns.name()).await,
        2,
        "the input's batch and head only"
    );
    assert!(
        read_all(&client, "out").await.is_empty(),
        "no output written"
    );
    assert_eq!(committed(&client, "in", "g").await, vec![None]);
    drop(consumer);
}

#[tokio::test]
async fn a_zombie_member_cannot_write_output_after_a_takeover() {
    let (client, ns) = common::ns::client().await;
    in_and_out(&client, [Record::new("a")]).await;
    let mut zombie = member(&client, "in", "g").await;
    let m = within(GUARD, zombie.recv()).await;
    // Frozen, the zombie loses its lease as if paused past its TTL; an
    // heir takes the partition and transforms the message itself.
    let name = ns.name().to_string();
    while_frozen(ns.name(), |other| async move {
        revoke_owner_lease(&other, &name, "in", "g").await;
        let mut heir = member(&other, "in", "g").await;
        let again = within(GUARD, heir.recv()).await;
        assert_eq!(again.offset, m.offset);
        let mut tx = heir.transaction();
        tx.send("out", Record::new("by heir"));
        tx.commit_input(&again);
        bounded("heir commit", tx.commit()).await.unwrap();
        heir.close().await.unwrap();
    });
    // The zombie resumes, still holding the message it read.
    let mut tx = zombie.transaction();
    tx.send("out", Record::new("by zombie"));
    tx.commit_input(&m);
    let err = bounded("zombie commit", tx.commit()).await.unwrap_err();
    assert!(matches!(err, Error::NotOwner { partition: 0, .. }), "{err}");
    let out = read_all(&client, "out").await;
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0].value[..], b"by heir");
    assert_eq!(committed(&client, "in", "g").await, vec![Some(1)]);
    drop(zombie);
}

#[tokio::test]
async fn a_moved_output_head_is_retried_on_the_fresh_head() {
    let (client, _ns) = common::ns::client().await;
    in_and_out(&client, [Record::new("a"), Record::new("b")]).await;
    let mut consumer = member(&client, "in", "g").await;
    let mut tx = consumer.transaction();
    pass_on(&mut consumer, &mut tx, "A").await;
    tx.commit().await.unwrap();
    // Another producer appends: the head the transaction knows is stale.
    let other = client.producer("out").build().await.unwrap();
    send_all(&other, [Record::new("other")]).await;
    pass_on(&mut consumer, &mut tx, "B").await;
    let placed = bounded("commit", tx.commit()).await.unwrap();
    assert_eq!(placed[0].offset, 2);
    let values: Vec<_> = read_all(&client, "out")
        .await
        .into_iter()
        .map(|m| (m.offset, m.value))
        .collect();
    assert_eq!(
        values,
        vec![(0, "A".into()), (1, "other".into()), (2, "B".into())]
    );
    assert_eq!(committed(&client, "in", "g").await, vec![Some(2)]);
    consumer.close().await.unwrap();
}

#[tokio::test]
async fn etcd_limits_are_refused_before_anything_is_sent() {
    let (client, ns) = common::ns::client().await;
    client.create_topic(NewTopic::new("in", 1)).await.unwrap();
    client
        .create_topic(NewTopic::new("wide", 100))
        .await
        .unwrap();
    let consumer = member(&client, "in", "g").await;
    let mut tx = consumer.transaction();
    for p in 0..70 {
        tx.send("wide", Record::new("x").partition(p));
    }
    let err = tx.commit().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::TransactionTooLarge { limit, needed: 140, max: 128 } if limit.contains("operations")
        ),
        "{err}"
    );
    assert!(tx.is_empty());
    let big = vec![b'x'; 900 * 1024];
    tx.send("wide", Record::new(big.clone()).partition(0));
    tx.send("wide", Record::new(big).partition(1));
    let err = tx.commit().await.unwrap_err();
    assert!(
        matches!(err, Error::TransactionTooLarge { limit, .. } if limit.contains("bytes")),
        "{err}"
    );
    assert_eq!(data_keys(&client, ns.name()).await, 0, "nothing written");
    consumer.close().await.unwrap();
}

#[tokio::test]
async fn a_deleted_output_topic_is_a_clear_error() {
    let (client, _ns) = common::ns::client().await;
    in_and_out(&client, [Record::new("a"), Record::new("b")]).await;
    let mut consumer = member(&client, "in", "g").await;
    let mut tx = consumer.transaction();
    pass_on(&mut consumer, &mut tx, "A").await;
    tx.commit().await.unwrap();
    client.delete_topic("out").await.unwrap();
    let second = pass_on(&mut consumer, &mut tx, "B").await;
    let err = bounded("commit", tx.commit()).await.unwrap_err();
    assert!(
        matches!(err, Error::TopicDeleted(ref t) if t == "out"),
        "{err}"
    );
    assert_eq!(committed(&client, "in", "g").await, vec![Some(1)]);
    tx.send("never", Record::new("C"));
    tx.commit_input(&second);
    let err = tx.commit().await.unwrap_err();
    assert!(
        matches!(err, Error::TopicNotFound(ref t) if t == "never"),
        "{err}"
    );
    consumer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_lands_once() {
    let (client, ns) = common::ns::client().await;
    in_and_out(&client, [Record::new("a"), Record::new("b")]).await;
    let proxy = Proxy::start(common::ns::endpoints()[0].clone()).await;
    let proxied = proxy.client(ns.name()).await;
    // The session outlives the cut, so the member still owns its input.
    let mut consumer = proxied
        .consumer("in", "g")
        .session_ttl(Duration::from_secs(30))
        .auto_commit(AutoCommit::Disabled)
        .join()
        .await
        .unwrap();
    let mut tx = consumer.transaction();
    pass_on(&mut consumer, &mut tx, "A").await;
    tx.commit().await.unwrap();
    pass_on(&mut consumer, &mut tx, "B").await;
    // etcd applies the transaction; its answer, and every later one, is lost.
    proxy.swallow_responses();
    let err = bounded("commit", tx.commit()).await.unwrap_err();
    assert!(err.is_outcome_unknown(), "{err}");
    assert!(!tx.is_empty(), "an unknown outcome keeps the transaction");
    assert!(proxy.dropped_bytes.load(Ordering::SeqCst) > 0);
    let landed: Vec<_> = read_all(&client, "out").await;
    assert_eq!(landed.len(), 2, "the lost commit landed: {landed:?}");
    proxy.heal();
    // Committing again finds the commit landed and writes nothing more.
    let placed = bounded("commit again", tx.commit()).await.unwrap();
    assert_eq!(placed[0].offset, 1);
    assert!(tx.is_empty());
    let values: Vec<_> = read_all(&client, "out")
        .await
        .into_iter()
        .map(|m| m.value)
        .collect();
    assert_eq!(values, vec!["A", "B"]);
    assert_eq!(committed(&client, "in", "g").await, vec![Some(2)]);
    drop(consumer);
}
