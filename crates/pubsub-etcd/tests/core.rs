//! Integration tests of topics, producing and fetching against a real etcd
//! (`PUBSUB_ETCD_ENDPOINTS`, default `127.0.0.1:2379`).
//!
//! Every test works in a namespace of its own (`common::ns`), which is
//! deleted when the test ends, so all of them run in parallel.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pubsub_etcd::{
    partition_for_key, Bytes, Client, Error, Message, NewTopic, Record, RecordMetadata, SendError,
    TopicConfig, MAX_NAME_LEN, MAX_PARTITIONS,
};

use common::{bounded, now_ms, ns};

/// Every message of a partition, read page by page with `fetch`.
async fn read_all(client: &Client, topic: &str, partition: u32) -> Vec<Message> {
    let next = client
        .describe_topic(topic)
        .await
        .expect("describe")
        .partitions[partition as usize]
        .next;
    let mut messages = Vec::new();
    let mut from = 0;
    while from < next {
        let fetched = client
            .fetch(topic, partition, from, 10_000)
            .await
            .expect("fetch");
        assert!(
            fetched.next_offset > from,
            "fetch from {from} of {topic}/{partition} made no progress (next {next})"
        );
        messages.extend(fetched.messages);
        from = fetched.next_offset;
    }
    messages
}

/// Checks that `acked` (offset, value) pairs of one partition cover exactly
/// the offsets `0..total`, and that the partition holds exactly those values
/// at those offsets.
async fn assert_log_matches(client: &Client, topic: &str, acked: &[(u64, Bytes)], total: u64) {
    assert_eq!(acked.len() as u64, total, "acknowledged messages");
    let mut offsets: Vec<u64> = acked.iter().map(|(o, _)| *o).collect();
    offsets.sort_unstable();
    let duplicates: Vec<u64> = offsets
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    assert!(
        duplicates.is_empty(),
        "offsets acknowledged twice: {duplicates:?}"
    );
    let expected: Vec<u64> = (0..total).collect();
    if offsets != expected {
        let set: HashSet<u64> = offsets.iter().copied().collect();
        let missing: Vec<u64> = (0..total).filter(|o| !set.contains(o)).take(20).collect();
        panic!(
            "acknowledged offsets are not 0..{total}: first missing {missing:?}, max {:?}",
            offsets.last()
        );
    }
    let values: HashSet<&Bytes> = acked.iter().map(|(_, v)| v).collect();
    assert_eq!(values.len(), acked.len(), "test values must be unique");

    let description = client.describe_topic(topic).await.expect("describe");
    assert_eq!(description.partitions[0].next, total, "partition head");
    let stored = read_all(client, topic, 0).await;
    assert_eq!(
        stored.len() as u64,
        total,
        "messages stored in the partition"
    );
    let by_offset: HashMap<u64, &Bytes> = stored.iter().map(|m| (m.offset, &m.value)).collect();
    for (offset, value) in acked {
        match by_offset.get(offset) {
            Some(stored) => assert_eq!(
                *stored, value,
                "offset {offset} holds {stored:?}, but {value:?} was acknowledged there"
            ),
            None => panic!("acknowledged offset {offset} ({value:?}) not found by fetch"),
        }
    }
}

/// True when `text` contains `token` delimited by non-alphanumeric
/// characters (so "0" is not found in "1433600").
fn has_token(text: &str, token: &str) -> bool {
    text.match_indices(token).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + token.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_alphanumeric())
    })
}

// ---------------------------------------------------------------------------
// Topic administration
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_create_get_list_describe_update_delete() {
    let (client, ns) = ns::client().await;
    assert_eq!(client.namespace(), ns.name());
    assert!(client.list_topics().await.unwrap().is_empty());

    let created = client
        .create_topic(NewTopic::new("orders", 3))
        .await
        .unwrap();
    assert_eq!(created.name, "orders");
    assert_eq!(created.partitions, 3);
    assert_eq!(created.config, TopicConfig::default());
    assert!(created.incarnation > 0);
    assert!(created.created_ms > 0);
    let other = client
        .create_topic(NewTopic::new("a.b_c-9", 1).max_message_bytes(4096))
        .await
        .unwrap();
    assert_eq!(other.config.max_message_bytes, Some(4096));

    // get
    assert_eq!(client.topic("orders").await.unwrap(), created);
    assert_eq!(client.topic("a.b_c-9").await.unwrap(), other);

    // list: sorted by name, "orders" must not match a longer name.
    let names: Vec<String> = client
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["a.b_c-9", "orders"]);

    // describe: empty, then with messages.
    let description = client.describe_topic("orders").await.unwrap();
    assert_eq!(description.topic, created);
    assert_eq!(description.partitions.len(), 3);
    for (i, p) in description.partitions.iter().enumerate() {
        assert_eq!((p.partition, p.earliest, p.next), (i as u32, 0, 0));
    }
    let producer = client
        .producer("orders")
        .metadata_max_age(Duration::ZERO)
        .build()
        .await
        .unwrap();
    for (p, n) in [(0u32, 2u64), (2, 5)] {
        for i in 0..n {
            producer
                .send(Record::new(format!("m{i}")).partition(p))
                .await
                .unwrap();
        }
    }
    let description = client.describe_topic("orders").await.unwrap();
    let nexts: Vec<(u64, u64)> = description
        .partitions
        .iter()
        .map(|p| (p.earliest, p.next))
        .collect();
    assert_eq!(nexts, [(0, 2), (0, 0), (0, 5)]);

    // update: more partitions, usable by a live producer.
    let updated = client.alter_topic("orders", Some(5), |_| {}).await.unwrap();
    assert_eq!(updated.partitions, 5);
    assert_eq!(updated.incarnation, created.incarnation);
    assert_eq!(updated.created_ms, created.created_ms);
    assert_eq!(client.topic("orders").await.unwrap().partitions, 5);
    let description = client.describe_topic("orders").await.unwrap();
    assert_eq!(description.partitions.len(), 5);
    assert_eq!(description.partitions[2].next, 5, "existing data kept");
    assert_eq!(
        producer
            .send(Record::new("new partition").partition(4))
            .await
            .map(|m| (m.partition, m.offset))
            .unwrap(),
        (4, 0)
    );

    // update: per-topic config, enforced by a producer that re-reads metadata.
    let mut config = TopicConfig::default();
    config.max_message_bytes = Some(200);
    let updated = client
        .alter_topic("orders", None, |c| *c = config.clone())
        .await
        .unwrap();
    assert_eq!(updated.partitions, 5, "partitions unchanged");
    assert_eq!(updated.config, config);
    assert_eq!(client.topic("orders").await.unwrap().config, config);
    match producer
        .send(Record::new(vec![b'x'; 500]))
        .await
        .map_err(|e| e.error)
    {
        Err(Error::MessageTooLarge { size, limit }) => {
            assert_eq!(limit, 200);
            assert!(size > 500, "size {size}");
        }
        other => panic!("expected MessageTooLarge after the config change, got {other:?}"),
    }
    producer.send(Record::new("small")).await.unwrap();

    // update: fewer partitions is refused and changes nothing.
    match client.alter_topic("orders", Some(2), |_| {}).await {
        Err(Error::PartitionDecrease {
            topic,
            current,
            requested,
        }) => assert_eq!((topic.as_str(), current, requested), ("orders", 5, 2)),
        other => panic!("expected PartitionDecrease, got {other:?}"),
    }
    assert_eq!(client.topic("orders").await.unwrap().partitions, 5);
    producer.close().await.unwrap();

    // delete: the topic, its data, and only it.
    client.delete_topic("orders").await.unwrap();
    assert!(matches!(
        client.topic("orders").await,
        Err(Error::TopicNotFound(name)) if name == "orders"
    ));
    assert!(matches!(
        client.describe_topic("orders").await,
        Err(Error::TopicNotFound(_))
    ));
    assert!(matches!(
        client.delete_topic("orders").await,
        Err(Error::TopicNotFound(name)) if name == "orders"
    ));
    let names: Vec<String> = client
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["a.b_c-9"]);
    client.delete_topic("a.b_c-9").await.unwrap();
    assert_eq!(
        ns::key_count(&client, &ns).await,
        0,
        "delete_topic left keys behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_of_one_name_have_one_winner() {
    let (client, _ns) = ns::client().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let mut tasks = Vec::new();
    for partitions in 1..=10u32 {
        // A client (connection) of its own per creator, so the requests
        // really race rather than queue on one connection.
        let client = Client::builder(ns::endpoints())
            .namespace(client.namespace())
            .connect()
            .await
            .unwrap();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let result = client
                .create_topic(NewTopic::new("contested", partitions))
                .await;
            (partitions, result)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (partitions, result) = bounded("create_topic", task).await.unwrap();
        match result {
            Ok(info) => {
                assert_eq!(info.partitions, partitions);
                winners.push(info);
            }
            Err(Error::TopicExists(name)) => assert_eq!(name, "contested"),
            Err(e) => panic!("create with {partitions} partitions: unexpected error {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let stored = client.topic("contested").await.unwrap();
    assert_eq!(stored.partitions, winners[0].partitions);
    assert_eq!(stored.incarnation, winners[0].incarnation);
    assert_eq!(
        client
            .describe_topic("contested")
            .await
            .unwrap()
            .partitions
            .len() as u32,
        winners[0].partitions
    );
}

// ---------------------------------------------------------------------------
// Many writers on one partition
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_one_shared_producer_one_partition() {
    const TASKS: usize = 16;
    const PER_TASK: usize = 500;
    let (client, _ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let producer = producer.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                let value = Bytes::from(format!("shared-{task:02}-{i:04}"));
                let RecordMetadata {
                    partition, offset, ..
                } = producer
                    .send(Record::new(value.clone()))
                    .await
                    .unwrap_or_else(|e| panic!("task {task} send {i}: {e}"));
                assert_eq!(partition, 0);
                acked.push((offset, value));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(bounded("sending task", task).await.unwrap());
    }
    producer.close().await.unwrap();
    assert_log_matches(&client, "t", &acked, (TASKS * PER_TASK) as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_producers_one_partition() {
    const PRODUCERS: usize = 4;
    const TASKS_PER_PRODUCER: usize = 4;
    const PER_TASK: usize = 300;
    let (client, _ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let mut tasks = Vec::new();
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        // Each producer has its own connection, id and partition worker:
        // they really contend for the partition head.
        let client = ns::connect(client.namespace()).await;
        let producer = client.producer("t").build().await.unwrap();
        producers.push(producer.clone());
        for task in 0..TASKS_PER_PRODUCER {
            let producer = producer.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::with_capacity(PER_TASK);
                for i in 0..PER_TASK {
                    let value = Bytes::from(format!("p{p}-t{task}-{i:04}"));
                    // Each send is bounded, not the whole task: 300 sends
                    // contending with 15 other tasks on a loaded 2-core
                    // machine can take longer than one call's bound.
                    let RecordMetadata {
                        partition, offset, ..
                    } = bounded("send", producer.send(Record::new(value.clone())))
                        .await
                        .unwrap_or_else(|e| panic!("producer {p} task {task} send {i}: {e}"));
                    assert_eq!(partition, 0);
                    acked.push((offset, value));
                }
                acked
            }));
        }
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    for producer in producers {
        producer.close().await.unwrap();
    }
    let total = (PRODUCERS * TASKS_PER_PRODUCER * PER_TASK) as u64;
    assert_log_matches(&client, "t", &acked, total).await;
}

/// Two producers appending to one partition at the same time, each as fast
/// as it can: both must make progress (neither may starve the other until
/// it stops), and the log stays contiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contending_producers_both_make_progress() {
    const TASKS: usize = 4;
    const GOAL: u64 = 100;
    let (client, _ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut counters = Vec::new();
    let mut producers = Vec::new();
    let mut tasks = Vec::new();
    for p in 0..2 {
        let client = ns::connect(client.namespace()).await;
        let producer = client.producer("t").build().await.unwrap();
        let acked = Arc::new(AtomicU64::new(0));
        for task in 0..TASKS {
            let (producer, acked, stop) = (producer.clone(), acked.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut ok = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let value = Bytes::from(format!("p{p}-{task}-{i}"));
                    i += 1;
                    let RecordMetadata { offset, .. } = producer
                        .send(Record::new(value.clone()))
                        .await
                        .unwrap_or_else(|e| panic!("producer {p}: {e}"));
                    ok.push((offset, value));
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                ok
            }));
        }
        counters.push(acked);
        producers.push(producer);
    }
    let counts = || -> Vec<u64> { counters.iter().map(|c| c.load(Ordering::SeqCst)).collect() };
    let progressed = tokio::time::timeout(Duration::from_secs(15), async {
        while counts().iter().any(|&n| n < GOAL) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let at_deadline = counts();
    // Stop both: once the busy one stops, the starved one gets through.
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(bounded("sending task", task).await.unwrap());
    }
    for producer in producers {
        producer.close().await.unwrap();
    }
    assert!(
        progressed.is_ok(),
        "after 15 s of contention the producers had {at_deadline:?} acknowledgements: \
         one starved (goal: {GOAL} each)"
    );
    let total = acked.len() as u64;
    assert_log_matches(&client, "t", &acked, total).await;
}

/// Environment of a `child_producer` process.
const CHILD_NS_ENV: &str = "PUBSUB_ETCD_TEST_CHILD_NS";
const CHILD_TOPIC_ENV: &str = "PUBSUB_ETCD_TEST_CHILD_TOPIC";
const CHILD_COUNT_ENV: &str = "PUBSUB_ETCD_TEST_CHILD_COUNT";
const CHILD_ID_ENV: &str = "PUBSUB_ETCD_TEST_CHILD_ID";

/// Not a test by itself: the body of a producer process started by
/// `several_producer_processes_one_partition`. Does nothing unless
/// `PUBSUB_ETCD_TEST_CHILD_NS` is set. Prints one `ACK <partition> <offset>
/// <value>` line per acknowledged message.
#[test]
fn child_producer() {
    let Ok(namespace) = std::env::var(CHILD_NS_ENV) else {
        return;
    };
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let topic = env(CHILD_TOPIC_ENV);
    let count: usize = env(CHILD_COUNT_ENV).parse().expect("count");
    let id = env(CHILD_ID_ENV);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let acked = runtime.block_on(async move {
        let client = ns::connect(&namespace).await;
        let producer = client.producer(topic).build().await.unwrap();
        // Several tasks sending one message at a time: many small appends
        // that race with the other processes' appends.
        const TASKS: usize = 8;
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let producer = producer.clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in (task..count).step_by(TASKS) {
                    let value = format!("child{id}-{i:05}");
                    let RecordMetadata {
                        partition, offset, ..
                    } = producer
                        .send(Record::new(value.clone()))
                        .await
                        .unwrap_or_else(|e| panic!("child {id}: send {i} failed: {e}"));
                    acked.push((partition, offset, value));
                }
                acked
            }));
        }
        let mut acked = Vec::new();
        for task in tasks {
            acked.extend(task.await.unwrap());
        }
        producer.close().await.unwrap();
        acked
    });
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // Start on a fresh line whatever libtest printed before.
    writeln!(out).unwrap();
    for (partition, offset, value) in acked {
        writeln!(out, "ACK {partition} {offset} {value}").unwrap();
    }
    out.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_producer_processes_one_partition() {
    const CHILDREN: usize = 3;
    const PER_CHILD: usize = 2_000;
    let (client, ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let exe = std::env::current_exe().expect("current_exe");
    let mut children = Vec::new();
    for id in 0..CHILDREN {
        let child = tokio::process::Command::new(&exe)
            .args(["--exact", "child_producer", "--nocapture"])
            .env(CHILD_NS_ENV, ns.name())
            .env(CHILD_TOPIC_ENV, "t")
            .env(CHILD_COUNT_ENV, PER_CHILD.to_string())
            .env(CHILD_ID_ENV, id.to_string())
            .env(pubsub_etcd::ENDPOINTS_ENV, ns::endpoints().join(","))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn child producer");
        children.push((id, child.wait_with_output()));
    }
    let mut acked = Vec::new();
    for (id, output) in children {
        // A hang guard, not a speed check: alone the children finish in
        // about 10 s, beside the suite's other tests in up to twice that.
        let output = tokio::time::timeout(Duration::from_secs(60), output)
            .await
            .unwrap_or_else(|_| panic!("child {id} did not finish within 60 s"))
            .expect("wait for child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "child {id} failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let mut mine = 0;
        for line in stdout.lines().filter(|l| l.starts_with("ACK ")) {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields.len(), 4, "bad line {line:?}");
            assert_eq!(fields[1], "0", "partition in {line:?}");
            let offset: u64 = fields[2].parse().expect("offset");
            assert!(
                fields[3].starts_with(&format!("child{id}-")),
                "child {id} acknowledged {line:?}"
            );
            acked.push((offset, Bytes::from(fields[3].to_string())));
            mine += 1;
        }
        assert_eq!(mine, PER_CHILD, "child {id} acknowledgements");
    }
    assert_log_matches(&client, "t", &acked, (CHILDREN * PER_CHILD) as u64).await;
}

// ---------------------------------------------------------------------------
// Partitioning and send_batch
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_batch_results_in_input_order_and_partitioning() {
    let (client, _ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 4)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();

    // Keyed, explicit and keyless records, interleaved.
    let mut records = Vec::new();
    for i in 0..60 {
        let value = format!("v{i:03}");
        records.push(match i % 3 {
            0 => Record::new(value).key(format!("user-{}", i % 7)),
            1 => Record::new(value).partition(2),
            _ => Record::new(value),
        });
    }
    let results = producer.send_batch(records.clone()).await;
    assert_eq!(results.len(), records.len());
    let mut last_offset: BTreeMap<u32, u64> = BTreeMap::new();
    let mut keyless_partitions = HashSet::new();
    for (i, (record, result)) in records.iter().zip(&results).enumerate() {
        let RecordMetadata {
            partition, offset, ..
        } = result
            .as_ref()
            .unwrap_or_else(|e| panic!("record {i}: {e}"));
        let (partition, offset) = (*partition, *offset);
        match (&record.key, record.partition) {
            (Some(key), _) => assert_eq!(partition, partition_for_key(key, 4), "record {i}"),
            (None, Some(p)) => assert_eq!(partition, p, "record {i}"),
            (None, None) => {
                assert!(partition < 4);
                keyless_partitions.insert(partition);
            }
        }
        // Records for one partition keep their input order.
        if let Some(previous) = last_offset.insert(partition, offset) {
            assert!(
                offset > previous,
                "record {i} at {partition}/{offset} after {previous}"
            );
        }
        // The result names where *this* record landed.
        let fetched = client.fetch("t", partition, offset, 1).await.unwrap();
        assert_eq!(fetched.messages.len(), 1, "record {i}");
        let message = &fetched.messages[0];
        assert_eq!(message.offset, offset);
        assert_eq!(message.value, record.value, "record {i}");
        assert_eq!(message.key, record.key, "record {i}");
    }
    assert!(
        keyless_partitions.len() > 1,
        "keyless records should rotate over partitions: {keyless_partitions:?}"
    );

    // A key always maps to the same partition.
    let a = producer
        .send(Record::new("x").key("stable"))
        .await
        .unwrap()
        .partition;
    let b = producer
        .send(Record::new("y").key("stable"))
        .await
        .unwrap()
        .partition;
    assert_eq!(a, b);
    assert_eq!(a, partition_for_key(b"stable", 4));
    // An explicit partition wins over the key.
    let RecordMetadata { partition: p, .. } = producer
        .send(Record::new("z").key("stable").partition((a + 1) % 4))
        .await
        .unwrap();
    assert_eq!(p, (a + 1) % 4);

    // A partition the topic does not have.
    match producer
        .send(Record::new("nope").partition(4))
        .await
        .map_err(|e| e.error)
    {
        Err(Error::PartitionOutOfRange {
            topic,
            partition,
            partitions,
        }) => assert_eq!((topic.as_str(), partition, partitions), ("t", 4, 4)),
        other => panic!("expected PartitionOutOfRange, got {other:?}"),
    }
    let results = producer
        .send_batch([
            Record::new("ok-before"),
            Record::new("bad").partition(17),
            Record::new("ok-after").partition(1),
        ])
        .await;
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(
            &results[1],
            Err(SendError {
                error: Error::PartitionOutOfRange {
                    partition: 17,
                    partitions: 4,
                    ..
                },
                ..
            })
        ),
        "{:?}",
        results[1]
    );
    assert_eq!(results[2].as_ref().unwrap().partition, 1);
    match client.fetch("t", 4, 0, 10).await {
        Err(Error::PartitionOutOfRange {
            partition,
            partitions,
            ..
        }) => assert_eq!((partition, partitions), (4, 4)),
        other => panic!("expected PartitionOutOfRange from fetch, got {other:?}"),
    }
    producer.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Deletion while producing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_while_producing_then_recreate() {
    const TOPIC: &str = "doomed";
    let (client, _ns) = ns::client().await;
    client.create_topic(NewTopic::new(TOPIC, 2)).await.unwrap();
    let producer = client.producer(TOPIC).build().await.unwrap();
    // A producer that has written to both partitions (its workers cache the
    // heads), and one that has written nothing yet: neither may ever write
    // to a later topic of the same name.
    let warm = client.producer(TOPIC).build().await.unwrap();
    for p in 0..2 {
        warm.send(Record::new("warm").partition(p)).await.unwrap();
    }
    let cold = client.producer(TOPIC).build().await.unwrap();

    let acked = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for task in 0..4 {
        let producer = producer.clone();
        let acked = acked.clone();
        senders.push(tokio::spawn(async move {
            for i in 0u64.. {
                match producer.send(Record::new(format!("{task}-{i}"))).await {
                    Ok(_) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return (i, e.error),
                }
            }
            unreachable!()
        }));
    }
    // Delete once the producer is demonstrably busy.
    bounded("first acknowledgements", async {
        while acked.load(Ordering::Relaxed) < 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    client.delete_topic(TOPIC).await.unwrap();
    for sender in senders {
        let (sent, error) = bounded("sender to notice the deletion", sender)
            .await
            .unwrap();
        assert!(sent > 0);
        match error {
            Error::TopicDeleted(name) => assert_eq!(name, TOPIC),
            e => panic!("expected TopicDeleted, got {e:?}"),
        }
    }
    assert!(matches!(
        producer
            .send(Record::new("after delete"))
            .await
            .map_err(|e| e.error),
        Err(Error::TopicDeleted(_))
    ));

    // A new topic of the same name.
    let reborn = client.create_topic(NewTopic::new(TOPIC, 2)).await.unwrap();
    for (what, p) in [("producer", &producer), ("warm", &warm), ("cold", &cold)] {
        for record in [
            Record::new("stale"),
            Record::new("stale").partition(0),
            Record::new("stale").partition(1),
            Record::new("stale").key("k"),
        ] {
            match bounded("stale send", p.send(record))
                .await
                .map_err(|e| e.error)
            {
                Err(Error::TopicDeleted(name)) => assert_eq!(name, TOPIC),
                other => panic!("{what} producer wrote to the re-created topic: {other:?}"),
            }
        }
    }
    let description = client.describe_topic(TOPIC).await.unwrap();
    assert_eq!(description.topic.incarnation, reborn.incarnation);
    for p in &description.partitions {
        assert_eq!(
            (p.earliest, p.next),
            (0, 0),
            "partition {} of the new topic",
            p.partition
        );
        let fetched = client.fetch(TOPIC, p.partition, 0, 100).await.unwrap();
        assert!(fetched.messages.is_empty(), "{:?}", fetched.messages);
    }
    // The new topic works for a new producer, from offset 0.
    let fresh = client.producer(TOPIC).build().await.unwrap();
    assert_eq!(
        fresh
            .send(Record::new("first").partition(1))
            .await
            .map(|m| (m.partition, m.offset))
            .unwrap(),
        (1, 0)
    );
    fresh.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Size limits
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_messages_are_refused_and_nothing_is_written() {
    let (client, ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let limit_default = pubsub_etcd::DEFAULT_MAX_BATCH_BYTES;

    let huge = Record::new(vec![7u8; limit_default]).key("k");
    match producer.send(huge.clone()).await.map_err(|e| e.error) {
        Err(e @ Error::MessageTooLarge { .. }) => {
            let Error::MessageTooLarge { size, limit } = e else {
                unreachable!()
            };
            assert_eq!(limit, limit_default);
            assert!(size > limit_default, "size {size}");
            let text = e.to_string();
            assert!(
                has_token(&text, &size.to_string()) && has_token(&text, &limit.to_string()),
                "message does not name size {size} and limit {limit}: {text}"
            );
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    // In a batch, only the oversize record fails.
    let results = producer
        .send_batch([
            Record::new("a").partition(0),
            huge.clone().partition(1),
            Record::new("b").partition(0),
        ])
        .await;
    assert_eq!(
        results[0]
            .as_ref()
            .map(|m| (m.partition, m.offset))
            .unwrap(),
        (0, 0)
    );
    assert!(
        matches!(
            results[1],
            Err(SendError {
                error: Error::MessageTooLarge { .. },
                ..
            })
        ),
        "{:?}",
        results[1]
    );
    assert_eq!(
        results[2]
            .as_ref()
            .map(|m| (m.partition, m.offset))
            .unwrap(),
        (0, 1)
    );
    let description = client.describe_topic("t").await.unwrap();
    assert_eq!(description.partitions[0].next, 2);
    assert_eq!(description.partitions[1].next, 0, "nothing written");
    // A large record within the limit goes through whole.
    let big = vec![9u8; 900 * 1024];
    let RecordMetadata {
        partition: p,
        offset: o,
        ..
    } = producer
        .send(Record::new(big.clone()).partition(1))
        .await
        .unwrap();
    assert_eq!((p, o), (1, 0));
    let fetched = client.fetch("t", 1, 0, 10).await.unwrap();
    assert_eq!(fetched.messages.len(), 1);
    assert_eq!(fetched.messages[0].value, big);
    producer.close().await.unwrap();

    // The topic's own limit.
    client
        .create_topic(NewTopic::new("small", 1).max_message_bytes(1000))
        .await
        .unwrap();
    let keys_before = ns::key_count(&client, &ns).await;
    let producer = client.producer("small").build().await.unwrap();
    match producer
        .send(Record::new(vec![1u8; 1000]))
        .await
        .map_err(|e| e.error)
    {
        Err(e @ Error::MessageTooLarge { .. }) => {
            let Error::MessageTooLarge { size, limit } = e else {
                unreachable!()
            };
            assert_eq!(limit, 1000);
            assert!(size > 1000);
            let text = e.to_string();
            assert!(
                has_token(&text, &size.to_string()) && has_token(&text, "1000"),
                "{text}"
            );
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    assert_eq!(
        ns::key_count(&client, &ns).await,
        keys_before,
        "a refused message wrote keys"
    );
    assert_eq!(
        client.describe_topic("small").await.unwrap().partitions[0].next,
        0
    );
    assert_eq!(
        producer
            .send(Record::new(vec![1u8; 900]))
            .await
            .map(|m| (m.partition, m.offset))
            .unwrap(),
        (0, 0)
    );
    producer.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// etcd unreachable
// ---------------------------------------------------------------------------

/// True for the errors an unreachable etcd may produce.
fn is_unreachable_error(e: &Error) -> bool {
    match e {
        Error::Timeout { .. } => true,
        Error::Etcd { .. } => e.is_outcome_unknown(),
        _ => false,
    }
}

/// Runs one call against the unreachable etcd: it must fail, with a clear
/// error, well before the 15 s hang guard (its request timeout is 1 s).
async fn fails_fast<T: std::fmt::Debug>(op: &str, call: impl Future<Output = Result<T, Error>>) {
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .unwrap_or_else(|_| panic!("{op} hung for 15 s against an unreachable etcd"));
    let elapsed = started.elapsed();
    let e = result.expect_err(op);
    assert!(is_unreachable_error(&e), "{op}: unclear error {e:?}");
    assert!(e.to_string().contains("etcd"), "{op}: {e}");
    assert!(
        elapsed < Duration::from_secs(6),
        "{op} took {elapsed:?} to fail with a 1 s timeout: {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_fails_fast_with_a_clear_error() {
    // Nothing listens on port 1.
    let builder = Client::builder(["127.0.0.1:1"])
        .namespace("unreachable")
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let connected = tokio::time::timeout(Duration::from_secs(15), builder.connect())
        .await
        .expect("connect hung for 15 s against an unreachable etcd");
    let client = match connected {
        Err(e) => {
            assert!(is_unreachable_error(&e), "connect: unclear error {e:?}");
            assert!(started.elapsed() < Duration::from_secs(6), "connect: {e}");
            return;
        }
        // The connection is lazy: the first request must fail instead.
        Ok(client) => client,
    };
    fails_fast("list_topics", client.list_topics()).await;
    fails_fast("create_topic", client.create_topic(NewTopic::new("t", 1))).await;
    fails_fast("topic", client.topic("t")).await;
    fails_fast("describe_topic", client.describe_topic("t")).await;
    fails_fast("delete_topic", client.delete_topic("t")).await;
    fails_fast("producer", client.producer("t").build()).await;
    fails_fast("fetch", client.fetch("t", 0, 0, 1)).await;
}

// ---------------------------------------------------------------------------
// Invalid inputs
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_inputs_are_refused_with_their_exact_error() {
    let (client, ns) = ns::client().await;
    client.create_topic(NewTopic::new("real", 3)).await.unwrap();

    // Topic names, through every operation that takes one.
    let long = "x".repeat(MAX_NAME_LEN + 1);
    let bad_names = ["", ".", "..", "a/b", "a b", "é", long.as_str()];
    for bad in bad_names {
        let results: Vec<(&str, Result<(), Error>)> = vec![
            (
                "create_topic",
                client.create_topic(NewTopic::new(bad, 1)).await.map(drop),
            ),
            ("topic", client.topic(bad).await.map(drop)),
            ("describe_topic", client.describe_topic(bad).await.map(drop)),
            (
                "alter_topic",
                client.alter_topic(bad, Some(4), |_| {}).await.map(drop),
            ),
            ("delete_topic", client.delete_topic(bad).await),
            ("fetch", client.fetch(bad, 0, 0, 1).await.map(drop)),
            ("producer", client.producer(bad).build().await.map(drop)),
        ];
        for (op, result) in results {
            match result {
                Err(e @ Error::InvalidTopicName { .. }) => {
                    let text = e.to_string();
                    let Error::InvalidTopicName { name, reason } = e else {
                        unreachable!()
                    };
                    assert_eq!(name, bad, "{op}");
                    assert!(!reason.is_empty());
                    assert!(
                        text.contains(&format!("{bad:?}")),
                        "{op}: message does not name {bad:?}: {text}"
                    );
                }
                other => panic!("{op}({bad:?}): expected InvalidTopicName, got {other:?}"),
            }
        }
    }
    // The longest legal name is fine.
    let longest = "y".repeat(MAX_NAME_LEN);
    client
        .create_topic(NewTopic::new(&longest, 1))
        .await
        .unwrap();
    client.delete_topic(&longest).await.unwrap();

    // Partition counts, on create and on update.
    for count in [0, MAX_PARTITIONS + 1] {
        for (op, result) in [
            (
                "create_topic",
                client
                    .create_topic(NewTopic::new("fresh", count))
                    .await
                    .map(drop),
            ),
            (
                "alter_topic",
                client
                    .alter_topic("real", Some(count), |_| {})
                    .await
                    .map(drop),
            ),
        ] {
            match result {
                Err(e @ Error::InvalidPartitionCount { .. }) => {
                    let text = e.to_string();
                    assert!(
                        matches!(e, Error::InvalidPartitionCount { count: c, max } if c == count && max == MAX_PARTITIONS)
                    );
                    assert!(has_token(&text, &count.to_string()), "{op}: {text}");
                }
                other => panic!("{op}({count}): expected InvalidPartitionCount, got {other:?}"),
            }
        }
    }
    assert!(matches!(
        client.topic("fresh").await,
        Err(Error::TopicNotFound(_))
    ));
    assert_eq!(client.topic("real").await.unwrap().partitions, 3);

    // Fewer partitions.
    match client.alter_topic("real", Some(1), |_| {}).await {
        Err(e @ Error::PartitionDecrease { .. }) => {
            let text = e.to_string();
            assert!(matches!(
                &e,
                Error::PartitionDecrease { topic, current: 3, requested: 1 } if topic == "real"
            ));
            assert!(
                has_token(&text, "1") && has_token(&text, "3") && text.contains("\"real\""),
                "{text}"
            );
        }
        other => panic!("expected PartitionDecrease, got {other:?}"),
    }

    // Client settings.
    for (what, builder) in [
        (
            "timeout",
            Client::builder(ns::endpoints()).request_timeout(Duration::ZERO),
        ),
        (
            "endpoints",
            Client::builder(Vec::<String>::new()).namespace("x"),
        ),
    ] {
        match builder.connect().await {
            Err(Error::InvalidConfig(text)) => assert!(text.contains(what), "{what}: {text}"),
            other => panic!("{what}: expected InvalidConfig, got {other:?}"),
        }
    }
    match Client::builder(ns::endpoints())
        .namespace("")
        .connect()
        .await
    {
        Err(Error::InvalidNamespace { namespace, .. }) => assert_eq!(namespace, ""),
        other => panic!("expected InvalidNamespace, got {other:?}"),
    }

    // Missing topics.
    match client.producer("missing").build().await {
        Err(e @ Error::TopicNotFound(_)) => {
            assert!(matches!(&e, Error::TopicNotFound(name) if name == "missing"));
            assert!(e.to_string().contains("\"missing\""), "{e}");
        }
        other => panic!("expected TopicNotFound, got {other:?}"),
    }
    assert!(matches!(
        client.fetch("missing", 0, 0, 1).await,
        Err(Error::TopicNotFound(name)) if name == "missing"
    ));
    assert!(matches!(
        client.alter_topic("missing", None, |_| {}).await,
        Err(Error::TopicNotFound(name)) if name == "missing"
    ));

    // None of the refused calls wrote anything.
    assert_eq!(ns::key_count(&client, &ns).await, 1, "only topic \"real\"");
}

/// Producer and topic settings out of range: `InvalidConfig`, naming the
/// setting and the rejected value. Every case is checked before failing, so
/// one run lists every message that lacks its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_settings_are_refused_naming_setting_and_value() {
    let (client, ns) = ns::client().await;
    client.create_topic(NewTopic::new("real", 1)).await.unwrap();
    let mut unnamed = Vec::new();

    // (setting, rejected value, builder)
    type Tweak = fn(pubsub_etcd::ProducerBuilder) -> pubsub_etcd::ProducerBuilder;
    let settings: [(&str, &str, Tweak); 6] = [
        ("max_batch_bytes", "0", |b| b.max_batch_bytes(0)),
        ("max_batch_bytes", "2097152", |b| b.max_batch_bytes(2 << 20)),
        ("max_batch_records", "0", |b| b.max_batch_records(0)),
        ("max_batch_records", "10001", |b| {
            b.max_batch_records(10_001)
        }),
        ("buffer_bytes", "1000", |b| b.buffer_bytes(1000)),
        ("max_appends_in_flight", "0", |b| b.max_appends_in_flight(0)),
    ];
    for (setting, value, tweak) in settings {
        match tweak(client.producer("real")).build().await {
            Err(Error::InvalidConfig(text)) => {
                assert!(text.contains(setting), "{setting}={value}: {text}");
                if !has_token(&text, value) && !has_token(&text, &group_thousands(value)) {
                    unnamed.push(format!("{setting}={value}: {text:?}"));
                }
            }
            other => panic!("{setting}={value}: expected InvalidConfig, got {other:?}"),
        }
    }
    match client
        .create_topic(NewTopic::new("fresh", 1).max_message_bytes(0))
        .await
    {
        Err(Error::InvalidConfig(text)) => {
            assert!(text.contains("max_message_bytes"), "{text}");
            if !has_token(&text, "0") {
                unnamed.push(format!("topic max_message_bytes=0: {text:?}"));
            }
        }
        other => panic!("topic max_message_bytes=0: expected InvalidConfig, got {other:?}"),
    }
    assert_eq!(ns::key_count(&client, &ns).await, 1, "only topic \"real\"");
    assert!(
        unnamed.is_empty(),
        "InvalidConfig messages that do not name the rejected value:\n{}",
        unnamed.join("\n")
    );
}

/// "10001" -> "10,001".
fn group_thousands(digits: &str) -> String {
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------
// Round trips and fetch positions
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_round_trip_and_fetch_positions() {
    let (client, _ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();

    let before = now_ms();
    let records = vec![
        Record::new(Bytes::new()),
        Record::new(Bytes::new()).key(Bytes::new()),
        Record::new("v").key("k"),
        Record::new(vec![0u8, 255, 0])
            .header("trace", "abc")
            .header("empty", Bytes::new())
            .header("binary", vec![0u8, 1, 2, 255])
            .timestamp(1_234_567_890_123),
        Record::new("negative time").timestamp(-5),
    ];
    let results = producer.send_batch(records.clone()).await;
    let after = now_ms();
    let stored = read_all(&client, "t", 0).await;
    assert_eq!(stored.len(), records.len());
    for (i, ((record, result), message)) in records.iter().zip(&results).zip(&stored).enumerate() {
        let RecordMetadata {
            partition, offset, ..
        } = result.as_ref().unwrap();
        assert_eq!((*partition, *offset), (0, i as u64));
        assert_eq!(message.offset, i as u64);
        assert_eq!(message.partition, 0);
        assert_eq!(&*message.topic, "t");
        assert_eq!(message.value, record.value, "record {i}");
        assert_eq!(message.key, record.key, "record {i}");
        assert_eq!(message.headers, record.headers, "record {i}");
        match record.timestamp {
            Some(ts) => assert_eq!(message.timestamp, ts, "record {i}"),
            None => assert!(
                (before..=after).contains(&message.timestamp),
                "record {i}: timestamp {} not within {before}..={after}",
                message.timestamp
            ),
        }
    }
    assert_eq!(stored[0].key, None, "no key stays no key");
    assert_eq!(
        stored[1].key,
        Some(Bytes::new()),
        "an empty key stays a key"
    );

    // Several batches: 5 above, then 10 appended one by one, then 10 at once.
    for i in 5..15 {
        producer.send(Record::new(format!("m{i}"))).await.unwrap();
    }
    let results = producer
        .send_batch((15..25).map(|i| Record::new(format!("m{i}"))))
        .await;
    assert!(results.iter().all(Result::is_ok));
    let value_at = |o: u64| -> Bytes {
        if o < 5 {
            records[o as usize].value.clone()
        } else {
            Bytes::from(format!("m{o}"))
        }
    };

    // From every offset, with several page sizes.
    for from in 0..=25u64 {
        for max in [1usize, 3, 10, 100] {
            let fetched = client.fetch("t", 0, from, max).await.unwrap();
            let expected: Vec<u64> = (from..25).take(max).collect();
            let offsets: Vec<u64> = fetched.messages.iter().map(|m| m.offset).collect();
            assert_eq!(offsets, expected, "fetch from {from} max {max}");
            for m in &fetched.messages {
                assert_eq!(m.value, value_at(m.offset));
            }
            let next = expected.last().map_or(from, |o| o + 1);
            assert_eq!(
                fetched.next_offset, next,
                "next_offset from {from} max {max}"
            );
        }
    }
    // max = 1 in the middle of a batch.
    let fetched = client.fetch("t", 0, 17, 1).await.unwrap();
    assert_eq!(fetched.messages.len(), 1);
    assert_eq!(fetched.messages[0].offset, 17);
    assert_eq!(fetched.next_offset, 18);
    // Past the end.
    let fetched = client.fetch("t", 0, 1000, 10).await.unwrap();
    assert!(fetched.messages.is_empty());
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_alters_of_different_settings_all_land() {
    let (client, _ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    type Edit = fn(&mut pubsub_etcd::TopicConfig);
    let edits: [Edit; 5] = [
        |c| c.max_message_bytes = Some(1000),
        |c| c.retention_ms = Some(60_000),
        |c| c.retention_messages = Some(500),
        |c| c.retention_bytes = Some(1 << 20),
        |c| c.cleanup_policy = pubsub_etcd::CleanupPolicy::Compact,
    ];
    let mut tasks = Vec::new();
    for edit in edits {
        let client = ns::connect(client.namespace()).await;
        tasks.push(tokio::spawn(async move {
            client.alter_topic("t", None, edit).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let config = client.topic("t").await.unwrap().config;
    assert_eq!(config.max_message_bytes, Some(1000));
    assert_eq!(config.retention_ms, Some(60_000));
    assert_eq!(config.retention_messages, Some(500));
    assert_eq!(config.retention_bytes, Some(1 << 20));
    assert_eq!(config.cleanup_policy, pubsub_etcd::CleanupPolicy::Compact);
}

/// One append in flight at a time over 64 partitions: every partition's
/// worker gets its turn, nothing is lost, and each partition keeps the
/// order of its sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_append_in_flight_serves_every_partition_in_order() {
    let (client, _ns) = ns::client().await;
    client
        .create_topic(NewTopic::new("wide", 64))
        .await
        .unwrap();
    let producer = client
        .producer("wide")
        .max_appends_in_flight(1)
        .build()
        .await
        .unwrap();
    let mut deliveries = Vec::new();
    for i in 0..6400u32 {
        let record = Record::new(format!("{i}")).partition(i % 64);
        deliveries.push(producer.enqueue(record).await.unwrap());
    }
    for d in deliveries {
        d.await.unwrap();
    }
    producer.close().await.unwrap();
    for p in 0..64u32 {
        let page = client.fetch("wide", p, 0, 200).await.unwrap();
        let values: Vec<u32> = page
            .messages
            .iter()
            .map(|m| std::str::from_utf8(&m.value).unwrap().parse().unwrap())
            .collect();
        let expected: Vec<u32> = (0..100).map(|k| k * 64 + p).collect();
        assert_eq!(values, expected, "partition {p}");
    }
}
