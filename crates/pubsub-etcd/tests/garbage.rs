//! Garbage in etcd: topic metadata, batch keys and batch values that no
//! version of the library writes (a bad restore, a hand edit, a bug
//! elsewhere), written raw under a test namespace. Every operation must end
//! with a clear error naming the key, or skip the garbage and report it
//! once; never panic, spin, allocate without bound, or drop good data.
//! Also the other thing a reader finds gone from under it: its topic,
//! deleted (and maybe created again).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use prost::Message as _;
use pubsub_etcd::{AssignedReader, Bytes, Client, Error, Message, NewTopic, Record, StartOffset};

use common::etcd_proc::EtcdCluster;
use common::ns::{self, Namespace};
use common::{bounded, CALL_TIMEOUT};

/// Puts `value` at `<ns>/<suffix>` with a raw etcd connection.
async fn put_raw(client: &Client, ns: &Namespace, suffix: &str, value: impl Into<Vec<u8>>) {
    client
        .etcd()
        .kv_client()
        .put(format!("{}{suffix}", ns.prefix()), value.into(), None)
        .await
        .expect("raw put");
}

/// The stored batch format (`proto/record.proto`), enough of it to write
/// batches that no producer would.
#[derive(Clone, PartialEq, prost::Message)]
struct RawBatch {
    #[prost(uint64, tag = "1")]
    base_offset: u64,
    #[prost(message, repeated, tag = "4")]
    records: Vec<RawRecord>,
    #[prost(uint32, tag = "5")]
    offset_count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawRecord {
    #[prost(uint32, tag = "1")]
    offset_delta: u32,
    #[prost(int64, tag = "2")]
    timestamp_ms: i64,
    #[prost(bytes = "vec", tag = "4")]
    value: Vec<u8>,
}

/// A batch value with the format-version byte, holding one record per
/// delta, each with the value `bogus`.
fn raw_batch(base_offset: u64, offset_count: u32, deltas: &[u32]) -> Vec<u8> {
    let batch = RawBatch {
        base_offset,
        offset_count,
        records: deltas
            .iter()
            .map(|&offset_delta| RawRecord {
                offset_delta,
                timestamp_ms: 1,
                value: b"bogus".to_vec(),
            })
            .collect(),
    };
    let mut value = vec![1];
    value.extend(batch.encode_to_vec());
    value
}

/// The key suffix (below the namespace) of a batch key of partition 0 of
/// topic `t` named `name`.
async fn batch_suffix(client: &Client, name: &str) -> String {
    let incarnation = client.topic("t").await.unwrap().incarnation;
    format!("data/t/{incarnation}/00000/b/{name}")
}

/// What a reader delivered: messages, and errors counted by key.
#[derive(Debug, Default)]
struct Delivered {
    messages: Vec<Message>,
    corrupt: BTreeMap<String, usize>,
}

impl Delivered {
    fn values(&self) -> Vec<String> {
        self.messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.value).into_owned())
            .collect()
    }
}

/// Receives from `reader` until it has delivered `messages` messages, then
/// for `quiet` more (to catch repeated reports); fails on anything but a
/// message or a `Corrupt` error, and after [`CALL_TIMEOUT`].
async fn collect(reader: &mut AssignedReader, messages: usize, quiet: Duration) -> Delivered {
    let mut delivered = Delivered::default();
    let started = Instant::now();
    let mut quiet_from = None;
    loop {
        let deadline = match quiet_from {
            Some(from) => from + quiet,
            None => started + CALL_TIMEOUT,
        };
        let item = match tokio::time::timeout_at(deadline.into(), reader.recv()).await {
            Ok(item) => item.expect("the reader ended"),
            Err(_) if quiet_from.is_some() => return delivered,
            Err(_) => panic!("only {delivered:?} arrived within {CALL_TIMEOUT:?}"),
        };
        match item {
            Ok(message) => delivered.messages.push(message),
            Err(Error::Corrupt { key, .. }) => *delivered.corrupt.entry(key).or_default() += 1,
            Err(other) => panic!("unexpected error {other:?}"),
        }
        if quiet_from.is_none() && delivered.messages.len() >= messages {
            quiet_from = Some(Instant::now());
        }
        assert!(
            delivered.corrupt.values().all(|&n| n < 100),
            "a corrupt key is reported again and again: {:?}",
            delivered.corrupt
        );
    }
}

/// Sends `values` to partition 0, one batch each.
async fn send_values(client: &Client, values: impl IntoIterator<Item = String>) {
    let producer = client.producer("t").build().await.unwrap();
    for value in values {
        producer
            .send(Record::new(value).partition(0))
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
}

fn names(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Requires `result` to be `Error::Corrupt` naming `key` with a reason
/// containing `reason`.
fn assert_corrupt<T: std::fmt::Debug>(
    what: &str,
    result: pubsub_etcd::Result<T>,
    key: &str,
    reason: &str,
) {
    match result {
        Err(Error::Corrupt { key: k, reason: r }) => {
            assert_eq!(k, key, "{what}: wrong key in {r:?}");
            assert!(r.contains(reason), "{what}: reason {r:?} lacks {reason:?}");
        }
        other => panic!("{what}: expected Corrupt at {key}, got {other:?}"),
    }
}

/// Topic metadata that `create_topic` would refuse, and the reason text the
/// error must carry.
const BAD_METADATA: &[(&str, &str)] = &[
    (
        r#"{"partitions":0,"created_ms":1}"#,
        "invalid partition count 0",
    ),
    (
        r#"{"partitions":4294967295,"created_ms":1}"#,
        "invalid partition count 4294967295",
    ),
    (
        r#"{"partitions":2,"created_ms":1,"config":{"retention_messages":0}}"#,
        "retention_messages is 0",
    ),
    (
        r#"{"partitions":2,"created_ms":1,"config":{"max_message_bytes":0}}"#,
        "max_message_bytes is 0",
    ),
    (r#"{"partitions":2,"#, "EOF while parsing"),
    (r#"{"partitions":"two","created_ms":1}"#, "invalid type"),
    (
        r#"{"partitions":2,"created_ms":1,"config":{"retention_ms":-5}}"#,
        "invalid value",
    ),
    ("\u{0}\u{ff}", "expected value"),
];

#[tokio::test]
async fn invalid_topic_metadata_is_refused_by_every_operation() {
    let (client, ns) = ns::client().await;
    let key = format!("{}topics/t", ns.prefix());
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let producer = client
        .producer("t")
        .metadata_max_age(Duration::ZERO)
        .build()
        .await
        .unwrap();
    for i in 0..10 {
        producer
            .send(Record::new(format!("m{i}")).partition(0))
            .await
            .unwrap();
    }
    for (value, reason) in BAD_METADATA {
        put_raw(&client, &ns, "topics/t", *value).await;
        let what = |op: &str| format!("{op} with metadata {value:?}");
        assert_corrupt(&what("topic"), client.topic("t").await, &key, reason);
        assert_corrupt(&what("list"), client.list_topics().await, &key, reason);
        assert_corrupt(
            &what("describe"),
            bounded("describe", client.describe_topic("t")).await,
            &key,
            reason,
        );
        assert_corrupt(
            &what("fetch"),
            client.fetch("t", 0, 0, 10).await,
            &key,
            reason,
        );
        assert_corrupt(
            &what("build producer"),
            bounded("build", client.producer("t").build()).await,
            &key,
            reason,
        );
        // A producer that read good metadata before keeps its settings and
        // refuses to send: it never applies the bad ones.
        assert_corrupt(
            &what("send"),
            bounded("send", producer.send(Record::new("x").partition(0)))
                .await
                .map_err(|e| e.error),
            &key,
            reason,
        );
        assert_corrupt(
            &what("join"),
            bounded("join", client.consumer("t", "g").join()).await,
            &key,
            reason,
        );
        assert_corrupt(
            &what("assign"),
            bounded("assign", client.assign("t", [(0, StartOffset::Earliest)])).await,
            &key,
            reason,
        );
        assert_corrupt(
            &what("lag"),
            bounded("lag", client.group_lag("t", "g")).await,
            &key,
            reason,
        );
        assert_corrupt(
            &what("enforce retention"),
            bounded("retention", client.enforce_retention("t")).await,
            &key,
            reason,
        );
    }
    // Nothing stored was touched: with good metadata back, all ten are there.
    put_raw(
        &client,
        &ns,
        "topics/t",
        r#"{"partitions":2,"created_ms":1}"#,
    )
    .await;
    let fetched = client.fetch("t", 0, 0, 100).await.unwrap();
    let values: Vec<Bytes> = fetched.messages.iter().map(|m| m.value.clone()).collect();
    let expected: Vec<Bytes> = (0..10).map(|i| format!("m{i}").into()).collect();
    assert_eq!(values, expected);
}

#[tokio::test]
async fn a_key_under_topics_that_is_not_a_topic_name_is_corrupt() {
    let (client, ns) = ns::client().await;
    client.create_topic(NewTopic::new("good", 1)).await.unwrap();
    put_raw(
        &client,
        &ns,
        "topics/a/b",
        r#"{"partitions":1,"created_ms":1}"#,
    )
    .await;
    assert_corrupt(
        "list",
        client.list_topics().await,
        &format!("{}topics/a/b", ns.prefix()),
        "is not a topic name",
    );
}

/// Batch keys whose last segment is not a 20-digit offset, or whose value
/// is unreadable: a live reader and one catching up skip each, report it
/// once, and deliver every good message before and after it.
#[tokio::test]
async fn garbage_batch_keys_are_skipped_and_reported_once() {
    let (client, ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    send_values(&client, names(0..3)).await;
    let mut live = client
        .assign("t", [(0, StartOffset::Earliest)])
        .await
        .unwrap();
    assert_eq!(
        collect(&mut live, 3, Duration::ZERO).await.values(),
        names(0..3)
    );
    let garbage: Vec<(String, Vec<u8>)> = vec![
        ("zzz".into(), b"\x01\xff\xff".to_vec()),
        // 21 digits: more than any u64, and sorting among real keys.
        ("100000000000000000000".into(), raw_batch(0, 1, &[0])),
        ("000000000000000000004".into(), raw_batch(4, 1, &[0])),
        // 20 digits above u64::MAX.
        ("99999999999999999999".into(), raw_batch(0, 1, &[0])),
        ("00000000000000000050".into(), vec![2, 0, 0]),
        ("00000000000000000051".into(), Vec::new()),
    ];
    let mut keys = Vec::new();
    for (name, value) in &garbage {
        let suffix = batch_suffix(&client, name).await;
        put_raw(&client, &ns, &suffix, value.clone()).await;
        keys.push(format!("{}{suffix}", ns.prefix()));
    }
    send_values(&client, names(3..6)).await;
    let quiet = Duration::from_secs(2);
    let delivered = collect(&mut live, 3, quiet).await;
    assert_eq!(delivered.values(), names(3..6));
    // The live reader watches from offset 3 on, so every key but the
    // 21-digit one sorting before offset 1 reaches it, once.
    let watched: BTreeMap<String, usize> = keys
        .iter()
        .filter(|k| !k.ends_with("/000000000000000000004"))
        .map(|k| (k.clone(), 1))
        .collect();
    assert_eq!(delivered.corrupt, watched);

    let mut fresh = client
        .assign("t", [(0, StartOffset::Earliest)])
        .await
        .unwrap();
    let delivered = collect(&mut fresh, 6, quiet).await;
    assert_eq!(delivered.values(), names(0..6));
    let all: BTreeMap<String, usize> = keys.iter().map(|k| (k.clone(), 1)).collect();
    assert_eq!(delivered.corrupt, all);
    // And it goes on following the partition past the garbage.
    send_values(&client, names(6..7)).await;
    let delivered = collect(&mut fresh, 1, Duration::from_millis(500)).await;
    assert_eq!(delivered.values(), names(6..7));
    assert!(delivered.corrupt.is_empty(), "{:?}", delivered.corrupt);

    let fetched = client.fetch("t", 0, 0, 100).await.unwrap();
    assert_eq!(fetched.messages.len(), 7);
    assert_eq!(fetched.next_offset, 7);
    let description = client.describe_topic("t").await.unwrap();
    assert_eq!(
        (
            description.partitions[0].earliest,
            description.partitions[0].next
        ),
        (0, 7)
    );
}

/// Batches at well-formed keys whose extent contradicts the key (it names
/// the batch's last offset), spans too many offsets, or holds a record
/// outside its extent: skipped and reported once, and the messages after
/// them are delivered, not dropped.
#[tokio::test]
async fn batches_whose_extent_contradicts_the_key_are_skipped() {
    let (client, ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    send_values(&client, names(0..3)).await;
    let mut live = client
        .assign("t", [(0, StartOffset::Earliest)])
        .await
        .unwrap();
    assert_eq!(
        collect(&mut live, 3, Duration::ZERO).await.values(),
        names(0..3)
    );
    let garbage = [
        // Its base offset says it is far ahead of its key.
        ("00000000000000000010", raw_batch(1000, 1, &[0])),
        // Behind its key.
        ("00000000000000000011", raw_batch(2, 1, &[0])),
        ("00000000000000000012", raw_batch(12, 0, &[])),
        ("00000000000000000013", raw_batch(0, 20_000, &[0])),
        // A record outside the batch's single offset.
        ("00000000000000000014", raw_batch(14, 1, &[7])),
        ("00000000000000000015", raw_batch(14, 2, &[1, 0])),
        ("18446744073709551615", raw_batch(u64::MAX, 1, &[0])),
    ];
    let mut keys = BTreeMap::new();
    for (name, value) in &garbage {
        let suffix = batch_suffix(&client, name).await;
        put_raw(&client, &ns, &suffix, value.clone()).await;
        keys.insert(format!("{}{suffix}", ns.prefix()), 1);
    }
    send_values(&client, names(3..6)).await;
    let quiet = Duration::from_secs(2);
    let delivered = collect(&mut live, 3, quiet).await;
    assert_eq!(delivered.values(), names(3..6));
    assert_eq!(delivered.corrupt, keys);

    let mut fresh = client
        .assign("t", [(0, StartOffset::Earliest)])
        .await
        .unwrap();
    let delivered = collect(&mut fresh, 6, quiet).await;
    assert_eq!(delivered.values(), names(0..6));
    assert_eq!(delivered.corrupt, keys);
    send_values(&client, names(6..7)).await;
    let delivered = collect(&mut fresh, 1, Duration::from_millis(500)).await;
    assert_eq!(delivered.values(), names(6..7));

    let fetched = client.fetch("t", 0, 0, 100).await.unwrap();
    let values: Vec<_> = fetched
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.value).into_owned())
        .collect();
    assert_eq!(values, names(0..7));
    // Deletion trusts a batch's offsets to find records by, so it refuses a
    // corrupt batch by name rather than guess.
    let first_bad = keys.keys().next().unwrap();
    assert_corrupt(
        "delete",
        client.delete_message("t", 0, 10).await,
        first_bad,
        "so its key would be",
    );
    assert_eq!(
        client.fetch("t", 0, 0, 100).await.unwrap().messages.len(),
        7
    );
}

/// A group-less reader of a topic that is deleted, or deleted and created
/// again, ends with `TopicDeleted` after the messages read before, as a
/// group member does, instead of waiting on a prefix that went quiet.
#[tokio::test]
async fn assigned_reader_ends_with_topic_deleted() {
    let (client, _ns) = ns::client().await;
    for recreate in [false, true] {
        client.create_topic(NewTopic::new("t", 2)).await.unwrap();
        send_values(&client, names(0..2)).await;
        let mut reader = client
            .assign(
                "t",
                [(0, StartOffset::Earliest), (1, StartOffset::Earliest)],
            )
            .await
            .unwrap();
        assert_eq!(
            collect(&mut reader, 2, Duration::ZERO).await.values(),
            names(0..2)
        );
        client.delete_topic("t").await.unwrap();
        if recreate {
            client.create_topic(NewTopic::new("t", 2)).await.unwrap();
            send_values(&client, names(10..12)).await;
        }
        match bounded("TopicDeleted", reader.recv()).await {
            Some(Err(Error::TopicDeleted(name))) => assert_eq!(name, "t"),
            other => panic!("recreate {recreate}: expected TopicDeleted, got {other:?}"),
        }
        assert!(
            bounded("end", reader.recv()).await.is_none(),
            "the reader goes on after TopicDeleted"
        );
        if recreate {
            client.delete_topic("t").await.unwrap();
        }
    }
}

/// The other operations on a partition holding garbage batches: a group
/// member delivers every good message and reports each key once, lag,
/// describe, produce and fetch work, and compaction (which rewrites by
/// offset) refuses the first corrupt batch by name.
#[tokio::test]
async fn group_members_and_admin_operations_survive_garbage_batches() {
    let (client, ns) = ns::client().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    send_values(&client, names(0..5)).await;
    let mut keys = BTreeMap::new();
    for (name, value) in [
        ("000000000000000000001", raw_batch(1, 1, &[0])),
        ("00000000000000000010", raw_batch(1000, 1, &[0])),
        ("zzz", b"\x01\xff\xff".to_vec()),
    ] {
        let suffix = batch_suffix(&client, name).await;
        put_raw(&client, &ns, &suffix, value).await;
        keys.insert(format!("{}{suffix}", ns.prefix()), 1);
    }
    let mut member = client
        .consumer("t", "g")
        .auto_commit(pubsub_etcd::AutoCommit::Disabled)
        .join()
        .await
        .unwrap();
    let mut delivered = Delivered::default();
    let quiet = Duration::from_secs(2);
    let started = Instant::now();
    loop {
        let wait = if delivered.messages.len() < 5 {
            CALL_TIMEOUT.saturating_sub(started.elapsed())
        } else {
            quiet
        };
        match tokio::time::timeout(wait, member.recv()).await {
            Ok(Some(Ok(message))) => delivered.messages.push(message),
            Ok(Some(Err(Error::Corrupt { key, .. }))) => {
                *delivered.corrupt.entry(key).or_default() += 1
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) if delivered.messages.len() >= 5 => break,
            Err(_) => panic!("only {delivered:?} arrived"),
        }
        assert!(
            delivered.corrupt.values().all(|&n| n < 100),
            "a corrupt key is reported again and again: {:?}",
            delivered.corrupt
        );
    }
    assert_eq!(delivered.values(), names(0..5));
    assert_eq!(delivered.corrupt, keys);
    member
        .commit(delivered.messages.last().unwrap())
        .await
        .unwrap();
    member.close().await.unwrap();

    let lag = bounded("lag", client.group_lag("t", "g")).await.unwrap();
    assert_eq!(lag.len(), 1);
    let description = bounded("describe", client.describe_topic("t"))
        .await
        .unwrap();
    assert_eq!(
        (
            description.partitions[0].earliest,
            description.partitions[0].next
        ),
        (0, 5)
    );
    send_values(&client, names(5..6)).await;
    let fetched = bounded("fetch", client.fetch("t", 0, 0, 100))
        .await
        .unwrap();
    let values: Vec<_> = fetched
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.value).into_owned())
        .collect();
    assert_eq!(values, names(0..6));
    match bounded("compact", client.compact_topic("t")).await {
        Err(Error::Corrupt { key, .. }) => assert!(keys.contains_key(&key), "{key}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        bounded("fetch", client.fetch("t", 0, 0, 100))
            .await
            .unwrap()
            .messages
            .len(),
        6
    );
}

/// etcd's count of a gRPC method's calls (`grpc_server_started_total`),
/// from its `/metrics` page on the client port.
fn grpc_calls(endpoint: &str, method: &str) -> u64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(endpoint).expect("etcd metrics");
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    let needle = format!("grpc_method=\"{method}\"");
    page.lines()
        .filter(|l| l.starts_with("grpc_server_started_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// An idle group-less reader, with a corrupt batch at the end of its
/// partition, costs etcd nothing beyond the client's own checks: no
/// re-reads of the garbage and no polling of the topic key (its deletion
/// comes through one watch). On an etcd of
/// its own, so that nobody else's requests are counted.
#[tokio::test]
async fn an_idle_reader_with_garbage_makes_no_requests() {
    let etcd = EtcdCluster::start(1);
    let client = Client::builder(etcd.endpoints())
        .namespace("idle")
        .connect()
        .await
        .unwrap();
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    send_values(&client, names(0..2)).await;
    let suffix = batch_suffix(&client, "zzz").await;
    client
        .etcd()
        .kv_client()
        .put(format!("idle/{suffix}"), b"\x01\xff\xff".to_vec(), None)
        .await
        .unwrap();
    let mut reader = client
        .assign("t", [(0, StartOffset::Earliest)])
        .await
        .unwrap();
    let delivered = collect(&mut reader, 2, Duration::from_secs(1)).await;
    assert_eq!(delivered.values(), names(0..2));
    assert_eq!(delivered.corrupt.len(), 1);
    let endpoint = etcd.endpoint(0);
    let before = (
        grpc_calls(&endpoint, "Range"),
        grpc_calls(&endpoint, "Watch"),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = (
        grpc_calls(&endpoint, "Range"),
        grpc_calls(&endpoint, "Watch"),
    );
    // The client itself reads twice a second: its health probe (which
    // reports an unreachable etcd) and its compaction check. The reader
    // must add nothing to that.
    assert_eq!(after.1, before.1, "Watch calls while idle");
    assert!(
        after.0 - before.0 <= 8,
        "{} Range calls in 3 s while idle (the client's own make two a second)",
        after.0 - before.0
    );
    // Deleted through another connection: the idle one was once seen to
    // fail its next request with a broken pipe under load, which is not
    // what this test is about; the reader must notice the deletion anyway.
    let other = Client::builder(etcd.endpoints())
        .namespace("idle")
        .connect()
        .await
        .unwrap();
    other.delete_topic("t").await.unwrap();
    match bounded("TopicDeleted", reader.recv()).await {
        Some(Err(Error::TopicDeleted(_))) => {}
        other => panic!("expected TopicDeleted, got {other:?}"),
    }
}
