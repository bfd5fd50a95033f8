//! Retention, TTL, deletion, truncation and key compaction against a real
//! etcd (`PUBSUB_ETCD_ENDPOINTS`), each test in its own namespace.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::group::{send_all, send_one_batch};
use common::now_ms;
use common::ns::Namespace;
use pubsub_etcd::{
    AutoCommit, CleanupPolicy, Client, Event, Message, NewTopic, Producer, Record, RecordMetadata,
    StartOffset,
};
use tokio::time::{sleep, timeout, Instant};

/// Every stored message of a partition, in offset order.
async fn all_messages(client: &Client, topic: &str, partition: u32) -> Vec<Message> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let fetched = client.fetch(topic, partition, from, 1000).await.unwrap();
        if fetched.messages.is_empty() && fetched.next_offset <= from {
            return out;
        }
        from = fetched.next_offset;
        out.extend(fetched.messages);
    }
}

fn offsets(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.offset).collect()
}

async fn batch_producer(client: &Client, topic: &str) -> Producer {
    client
        .producer(topic)
        .linger(Duration::from_secs(5))
        .build()
        .await
        .unwrap()
}

/// Batch keys (and their leases) stored for a topic, read raw from etcd.
async fn batch_keys(client: &Client, ns: &Namespace) -> Vec<(String, i64)> {
    let mut kv = client.etcd().kv_client();
    let prefix = format!("{}data/", ns.prefix());
    let response = kv
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    response
        .kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
        .filter(|(k, _)| k.contains("/b/"))
        .collect()
}

/// Deleting a message inside a batch rewrites the batch without it;
/// deleting the rest deletes the batch; offsets are never reused.
#[tokio::test]
async fn delete_inside_a_batch_and_whole_batch() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = batch_producer(&client, "t").await;
    let sent = send_one_batch(
        &producer,
        (0..10)
            .map(|i| Record::new(format!("m{i}")).partition(0))
            .collect(),
    )
    .await;
    assert_eq!(sent, (0..10).collect::<Vec<_>>());
    assert_eq!(
        batch_keys(&client, &ns).await.len(),
        1,
        "one batch expected"
    );

    assert!(client.delete_message("t", 0, 3).await.unwrap());
    assert!(
        !client.delete_message("t", 0, 3).await.unwrap(),
        "already deleted"
    );
    assert!(
        !client.delete_message("t", 0, 99).await.unwrap(),
        "never written"
    );
    let left = all_messages(&client, "t", 0).await;
    assert_eq!(offsets(&left), vec![0, 1, 2, 4, 5, 6, 7, 8, 9]);
    assert_eq!(left[3].value, "m4");
    assert_eq!(
        batch_keys(&client, &ns).await.len(),
        1,
        "batch rewritten, not split"
    );

    // A batch delete across the rest of the batch (and offsets not stored).
    let n = client
        .delete_messages("t", 0, &[9, 0, 1, 2, 4, 5, 6, 7, 8, 8, 3, 12])
        .await
        .unwrap();
    assert_eq!(n, 9);
    assert!(all_messages(&client, "t", 0).await.is_empty());
    assert!(
        batch_keys(&client, &ns).await.is_empty(),
        "empty batch deleted"
    );
    let d = client.describe_topic("t").await.unwrap();
    assert_eq!((d.partitions[0].earliest, d.partitions[0].next), (10, 10));

    // Offsets are never reused.
    let RecordMetadata { offset, .. } = producer
        .send(Record::new("after").partition(0))
        .await
        .unwrap();
    assert_eq!(offset, 10);
    assert_eq!(offsets(&all_messages(&client, "t", 0).await), vec![10]);
    producer.close().await.unwrap();
}

/// Deletes spanning several batches, with a fetch from inside a gap.
#[tokio::test]
async fn delete_across_batches_and_fetch_over_gaps() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let producer = batch_producer(&client, "t").await;
    for _ in 0..3 {
        send_one_batch(
            &producer,
            (0..5)
                .map(|i| Record::new(format!("v{i}")).partition(1))
                .collect(),
        )
        .await;
    }
    // Offsets 0-4, 5-9, 10-14 in three batches.
    let n = client
        .delete_messages("t", 1, &[4, 5, 6, 7, 8, 9, 10])
        .await
        .unwrap();
    assert_eq!(n, 7);
    assert_eq!(batch_keys(&client, &ns).await.len(), 2);
    let fetched = client.fetch("t", 1, 5, 3).await.unwrap();
    assert_eq!(offsets(&fetched.messages), vec![11, 12, 13]);
    assert_eq!(
        offsets(&all_messages(&client, "t", 1).await),
        vec![0, 1, 2, 3, 11, 12, 13, 14]
    );
    // Partition errors are reported.
    assert!(client.delete_message("t", 2, 0).await.is_err());
    assert!(client.delete_message("nope", 0, 0).await.is_err());
    producer.close().await.unwrap();
}

/// Truncation deletes whole batches below `before` and rewrites the one
/// straddling it; `before` beyond the end clamps to the next offset.
#[tokio::test]
async fn truncate_partition() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = batch_producer(&client, "t").await;
    for _ in 0..3 {
        send_one_batch(&producer, (0..10).map(|_| Record::new("x")).collect()).await;
    }
    let info = client.truncate_partition("t", 0, 15).await.unwrap();
    assert_eq!((info.earliest, info.next), (15, 30));
    assert_eq!(
        offsets(&all_messages(&client, "t", 0).await),
        (15..30).collect::<Vec<_>>()
    );
    assert_eq!(batch_keys(&client, &ns).await.len(), 2);
    // Truncating below the earliest changes nothing.
    let info = client.truncate_partition("t", 0, 3).await.unwrap();
    assert_eq!((info.earliest, info.next), (15, 30));
    // Beyond the end: everything goes, next stays.
    let info = client.truncate_partition("t", 0, 1_000).await.unwrap();
    assert_eq!((info.earliest, info.next), (30, 30));
    assert!(batch_keys(&client, &ns).await.is_empty());
    let offset = producer.send(Record::new("y")).await.unwrap().offset;
    assert_eq!(offset, 30, "offsets are never reused");
    // Later messages are not affected by the earlier truncation.
    assert_eq!(offsets(&all_messages(&client, "t", 0).await), vec![30]);
    producer.close().await.unwrap();
}

/// Old metadata (without retention fields) still parses; zero limits are refused.
#[tokio::test]
async fn topic_config_retention_fields() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    let topic = client
        .create_topic(
            NewTopic::new("t", 1)
                .retention(Duration::from_secs(3600))
                .retention_messages(1000)
                .retention_bytes(1 << 20)
                .cleanup_policy(CleanupPolicy::Compact),
        )
        .await
        .unwrap();
    assert_eq!(topic.config.retention_ms, Some(3_600_000));
    let read = client.topic("t").await.unwrap();
    assert_eq!(read.config, topic.config);
    assert!(client
        .create_topic(NewTopic::new("z", 1).retention_messages(0))
        .await
        .is_err());

    // Metadata written by an older version: no retention fields at all.
    let mut kv = client.etcd().kv_client();
    kv.put(
        format!("{}topics/old", ns.prefix()),
        r#"{"partitions":2,"created_ms":1}"#,
        None,
    )
    .await
    .unwrap();
    let old = client.topic("old").await.unwrap();
    assert_eq!(old.config.retention_messages, None);
    assert_eq!(old.config.cleanup_policy, CleanupPolicy::Delete);
    // Changeable later.
    let mut config = old.config.clone();
    config.retention_messages = Some(5);
    client
        .alter_topic("old", None, |c| *c = config.clone())
        .await
        .unwrap();
    assert_eq!(
        client.topic("old").await.unwrap().config.retention_messages,
        Some(5)
    );
}

/// A topic under steady production, with a consumer group following it,
/// stays within its messages limit with only its producer and consumer
/// running; the consumer never stalls and sees offsets in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_messages_under_continuous_production_with_consumer() {
    const LIMIT: u64 = 300;
    let ns = Namespace::new();
    let client = ns.connect().await;
    client
        .create_topic(NewTopic::new("t", 2).retention_messages(LIMIT))
        .await
        .unwrap();
    let mut consumer = client
        .consumer("t", "g")
        .session_ttl(Duration::from_secs(3))
        .auto_commit(AutoCommit::Disabled)
        .join()
        .await
        .unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let prod = producer.clone();
    let production = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(4);
        let mut sent = 0u64;
        while Instant::now() < until {
            let results = prod
                .send_batch((0..50).map(|i| Record::new(format!("m{i}")).partition(i % 2)))
                .await;
            for r in results {
                r.unwrap();
                sent += 1;
            }
            sleep(Duration::from_millis(5)).await;
        }
        sent
    });
    // Watch the partitions' spans while production runs.
    let mut max_span = 0;
    let mut last_seen: HashMap<u32, u64> = HashMap::new();
    let mut received = 0u64;
    while !production.is_finished() {
        let d = client.describe_topic("t").await.unwrap();
        for p in &d.partitions {
            max_span = max_span.max(p.next - p.earliest);
        }
        // Drain what the consumer has.
        let until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < until {
            match timeout(Duration::from_millis(10), consumer.next_event()).await {
                Ok(Some(Ok(Event::Message(m)))) => {
                    if let Some(prev) = last_seen.insert(m.partition, m.offset) {
                        assert!(m.offset > prev, "order: {prev} then {}", m.offset);
                    }
                    received += 1;
                }
                Ok(Some(Ok(_))) | Err(_) => {}
                Ok(Some(Err(e))) => panic!("consumer error: {e}"),
                Ok(None) => panic!("consumer ended"),
            }
        }
    }
    let sent = production.await.unwrap();
    producer.close().await.unwrap();
    assert!(sent > 4 * LIMIT, "too little production to test: {sent}");
    // Trimmed all along (once a second per partition), never unbounded.
    assert!(
        max_span < sent / 2,
        "span {max_span} of {sent} sent: not trimmed while producing"
    );
    // A closed producer leaves its partitions within the limit.
    let d = client.describe_topic("t").await.unwrap();
    for p in &d.partitions {
        assert!(p.next - p.earliest <= LIMIT, "{p:?}");
        assert!(p.earliest > 0, "{p:?}");
        let stored = all_messages(&client, "t", p.partition).await;
        assert_eq!(stored.len() as u64, p.next - p.earliest, "{p:?}");
    }
    // The consumer reaches the end of every partition: no stall on the gaps.
    let deadline = Instant::now() + Duration::from_secs(20);
    while d
        .partitions
        .iter()
        .any(|p| last_seen.get(&p.partition).copied() != Some(p.next - 1))
    {
        assert!(
            Instant::now() < deadline,
            "consumer stalled at {last_seen:?}, ends {:?}",
            d.partitions
        );
        if let Ok(Some(Ok(Event::Message(m)))) =
            timeout(Duration::from_millis(100), consumer.next_event()).await
        {
            if let Some(prev) = last_seen.insert(m.partition, m.offset) {
                assert!(m.offset > prev);
            }
            received += 1;
        }
    }
    assert!(received > 0);
    consumer.close().await.unwrap();
}

/// The bytes limit keeps the newest batches within the limit.
#[tokio::test]
async fn retention_bytes_trims_oldest_batches() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client
        .create_topic(NewTopic::new("t", 1).retention_bytes(20_000))
        .await
        .unwrap();
    let producer = batch_producer(&client, "t").await;
    for b in 0..20 {
        send_one_batch(
            &producer,
            (0..10)
                .map(|i| Record::new(vec![b as u8; 1000]).key(format!("{b}-{i}")))
                .collect(),
        )
        .await;
    }
    producer.close().await.unwrap();
    let left = all_messages(&client, "t", 0).await;
    let bytes: usize = left.iter().map(|m| m.value.len()).sum();
    assert!(bytes <= 20_000, "{bytes} bytes left");
    assert!(bytes >= 10_000, "trimmed too much: {bytes} bytes left");
    assert_eq!(left.last().unwrap().offset, 199, "newest kept");
    // A sweep has nothing more to do.
    let report = client.enforce_retention("t").await.unwrap();
    assert_eq!(report.batches_deleted + report.batches_rewritten, 0);
}

/// The age limit deletes batches whose newest record is older than it, and
/// a sweep by any client enforces limits changed after the fact.
#[tokio::test]
async fn retention_age_and_sweep_after_config_change() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = batch_producer(&client, "t").await;
    let old = now_ms() - 3_600_000;
    for _ in 0..3 {
        send_one_batch(
            &producer,
            (0..5).map(|_| Record::new("old").timestamp(old)).collect(),
        )
        .await;
    }
    for _ in 0..2 {
        send_one_batch(&producer, (0..5).map(|_| Record::new("new")).collect()).await;
    }
    producer.close().await.unwrap();
    // No limits yet: the sweep deletes nothing.
    let report = client.enforce_retention("t").await.unwrap();
    assert_eq!(report.batches_deleted, 0);
    assert_eq!(all_messages(&client, "t", 0).await.len(), 25);

    let mut config = client.topic("t").await.unwrap().config;
    config.retention_ms = Some(60_000);
    client
        .alter_topic("t", None, |c| *c = config.clone())
        .await
        .unwrap();
    let report = client.enforce_retention("t").await.unwrap();
    assert_eq!(report.batches_deleted, 3);
    assert_eq!(report.partitions[0].earliest, 15);
    let left = all_messages(&client, "t", 0).await;
    assert!(left.iter().all(|m| m.value == "new"));
    assert_eq!(left.len(), 10);

    // Then a messages limit, enforced by the sweep alone (no producer).
    config.retention_messages = Some(7);
    client
        .alter_topic("t", None, |c| *c = config.clone())
        .await
        .unwrap();
    let report = client.enforce_retention("t").await.unwrap();
    assert_eq!(report.batches_rewritten, 1);
    assert_eq!(
        (report.partitions[0].earliest, report.partitions[0].next),
        (18, 25)
    );
}

/// Records with a time to live disappear at their deadline while a reader
/// follows the partition; records without one stay. Records sharing a
/// deadline bucket share one lease, and etcd deletes their batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expires_while_a_consumer_follows() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let mut reader = client
        .assign(
            "t",
            [(0, StartOffset::Earliest), (1, StartOffset::Earliest)],
        )
        .await
        .unwrap();
    let producer = client.producer("t").build().await.unwrap();
    // 40 short-lived records over both partitions, sent one by one (many
    // batches), and 4 lasting ones.
    let ttl = Duration::from_secs(3);
    let started = Instant::now();
    for i in 0..40u32 {
        producer
            .send(Record::new(format!("short{i}")).partition(i % 2).ttl(ttl))
            .await
            .unwrap();
    }
    for p in 0..2 {
        producer
            .send(Record::new("lasting").partition(p))
            .await
            .unwrap();
    }
    let sent_in = started.elapsed();
    // Shared leases: far fewer leases than batches.
    let keys = batch_keys(&client, &ns).await;
    let leases: BTreeSet<i64> = keys.iter().map(|(_, l)| *l).filter(|l| *l != 0).collect();
    let leased_batches = keys.iter().filter(|(_, l)| *l != 0).count();
    assert!(leased_batches >= 20, "{leased_batches} leased batches");
    assert!(
        leases.len() as u64 <= sent_in.as_secs() + 2,
        "{} leases for {leased_batches} batches in {sent_in:?}",
        leases.len()
    );
    // The follower saw every record while it was live.
    let mut seen = Vec::new();
    while seen.len() < 42 {
        let m = timeout(Duration::from_secs(10), reader.recv())
            .await
            .expect("follower got everything")
            .unwrap()
            .unwrap();
        seen.push(m.value);
    }
    // After the deadline, fetches skip them...
    sleep((ttl + sent_in).saturating_sub(started.elapsed()) + Duration::from_millis(200)).await;
    for p in 0..2 {
        let left = all_messages(&client, "t", p).await;
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].value, "lasting");
    }
    // ...a new reader from the start sees only the lasting ones...
    let mut late = client
        .assign(
            "t",
            [(0, StartOffset::Offset(0)), (1, StartOffset::Offset(0))],
        )
        .await
        .unwrap();
    for _ in 0..2 {
        let m = timeout(Duration::from_secs(10), late.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.value, "lasting");
    }
    assert!(timeout(Duration::from_millis(300), late.recv())
        .await
        .is_err());
    // ...and etcd deletes the expired batches through their leases.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let keys = batch_keys(&client, &ns).await;
        if keys.len() == 2 && keys.iter().all(|(_, l)| *l == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired batches remain: {keys:?}"
        );
        sleep(Duration::from_millis(250)).await;
    }
    producer.close().await.unwrap();
    late.close().await;
    reader.close().await;
}

/// Key compaction keeps the newest message per key, drops tombstoned keys,
/// keeps keyless messages, and never reuses offsets.
#[tokio::test]
async fn key_compaction() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client
        .create_topic(NewTopic::new("t", 1).cleanup_policy(CleanupPolicy::Compact))
        .await
        .unwrap();
    let producer = batch_producer(&client, "t").await;
    let r = |k: &str, v: &str| Record::new(v.to_string()).key(k.to_string());
    send_one_batch(&producer, vec![r("a", "a1"), r("b", "b1"), r("c", "c1")]).await;
    send_one_batch(
        &producer,
        vec![r("a", "a2"), Record::new("keyless"), r("c", "c2")],
    )
    .await;
    send_one_batch(&producer, vec![r("a", "a3"), r("c", "")]).await; // tombstone for c
    producer.close().await.unwrap();

    let report = client.compact_topic("t").await.unwrap();
    let left: Vec<_> = all_messages(&client, "t", 0)
        .await
        .into_iter()
        .map(|m| (m.offset, m.value))
        .collect();
    assert_eq!(
        left,
        vec![(1, "b1".into()), (4, "keyless".into()), (6, "a3".into())]
    );
    assert_eq!(report.records_removed, 5);
    assert_eq!(report.partitions[0].next, 8);
    // Idempotent.
    let again = client.compact_topic("t").await.unwrap();
    assert_eq!(again.records_removed, 0);
    // The retention sweep compacts topics with the compact policy.
    let producer = batch_producer(&client, "t").await;
    send_one_batch(&producer, vec![r("b", "b2")]).await;
    producer.close().await.unwrap();
    client.enforce_retention("t").await.unwrap();
    let values: Vec<_> = all_messages(&client, "t", 0)
        .await
        .into_iter()
        .map(|m| m.value)
        .collect();
    assert_eq!(values, vec!["keyless", "a3", "b2"]);
}

/// Compaction running while a producer appends new versions never loses
/// the newest version of any key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_compaction_concurrent_with_producer() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let prod = producer.clone();
    let production = tokio::spawn(async move {
        let mut newest: BTreeMap<String, String> = BTreeMap::new();
        for version in 0..40 {
            let records: Vec<_> = (0..10)
                .map(|k| Record::new(format!("k{k}-v{version}")).key(format!("k{k}")))
                .collect();
            send_all(&prod, records).await;
            for k in 0..10 {
                newest.insert(format!("k{k}"), format!("k{k}-v{version}"));
            }
        }
        newest
    });
    let mut sweeps = 0;
    while !production.is_finished() {
        client.compact_topic("t").await.unwrap();
        sweeps += 1;
    }
    let newest = production.await.unwrap();
    producer.close().await.unwrap();
    client.compact_topic("t").await.unwrap();
    let left: BTreeMap<String, String> = all_messages(&client, "t", 0)
        .await
        .into_iter()
        .map(|m| {
            (
                String::from_utf8(m.key.unwrap().to_vec()).unwrap(),
                String::from_utf8(m.value.to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(left, newest, "after {sweeps} concurrent sweeps");
    assert_eq!(all_messages(&client, "t", 0).await.len(), 10);
}

/// A group whose committed offset was truncated away resumes at the
/// earliest retained offset and is told so; it does not stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_below_earliest_resumes_at_earliest_and_reports_it() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(&producer, (0..100).map(|i| Record::new(format!("m{i}")))).await;
    client
        .commit_offsets_unowned("t", "g", &BTreeMap::from([(0, 10)]))
        .await
        .unwrap();
    client.truncate_partition("t", 0, 60).await.unwrap();
    let mut consumer = client
        .consumer("t", "g")
        .session_ttl(Duration::from_secs(3))
        .auto_commit(AutoCommit::Disabled)
        .join()
        .await
        .unwrap();
    let mut reset = None;
    let first = loop {
        match timeout(Duration::from_secs(15), consumer.next_event())
            .await
            .expect("an event")
            .unwrap()
            .unwrap()
        {
            Event::OffsetReset {
                partition,
                committed,
                resumed_at,
            } => reset = Some((partition, committed, resumed_at)),
            Event::Message(m) => break m,
            _ => {}
        }
    };
    assert_eq!(first.offset, 60);
    assert_eq!(reset, Some((0, 10, 60)));
    consumer.close().await.unwrap();
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enormous_ttl_is_capped_and_the_producer_keeps_working() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let RecordMetadata { offset: first, .. } = producer
        .send(Record::new("forever").ttl(Duration::MAX))
        .await
        .unwrap();
    let second = producer.send(Record::new("plain")).await.unwrap().offset;
    assert_eq!((first, second), (0, 1));
    let fetched = client.fetch("t", 0, 0, 10).await.unwrap();
    assert_eq!(fetched.messages.len(), 2, "the capped TTL has not expired");
    producer.close().await.unwrap();
}
