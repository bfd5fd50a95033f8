//! Compressed record batches against a real etcd (`PUBSUB_ETCD_ENDPOINTS`),
//! each test in its own namespace: round trips for every codec, mixed codecs
//! on one partition, data written in the old format, garbage and
//! decompression bombs, incompressible batches, size limits, and retention,
//! deletion, truncation, compaction and TTL on compressed batches.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use common::group::{member, send_one_batch, within};
use common::ns::Namespace;
use prost::Message as _;
use pubsub_etcd::{Client, Compression, Error, Message, NewTopic, Producer, Record, StartOffset};

const GUARD: Duration = Duration::from_secs(20);

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

/// Raw batch values of a namespace's topic, in key order: (key, value).
async fn raw_batches(client: &Client, ns: &Namespace, topic: &str) -> Vec<(String, Vec<u8>)> {
    let prefix = format!("{}data/{topic}/", ns.prefix());
    let response = client
        .etcd()
        .kv_client()
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    response
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        })
        .filter(|(k, _)| k.contains("/b/"))
        .collect()
}

/// The format-version bytes of a topic's stored batches.
async fn versions(client: &Client, ns: &Namespace, topic: &str) -> Vec<u8> {
    raw_batches(client, ns, topic)
        .await
        .iter()
        .map(|(_, v)| v[0])
        .collect()
}

async fn put_raw(client: &Client, key: &str, value: Vec<u8>) {
    client
        .etcd()
        .kv_client()
        .put(key, value, None)
        .await
        .expect("raw put");
}

async fn producer(client: &Client, topic: &str, compression: Option<Compression>) -> Producer {
    let mut builder = client.producer(topic).linger(Duration::from_secs(5));
    if let Some(c) = compression {
        builder = builder.compression(c);
    }
    builder.build().await.unwrap()
}

/// A structured log line of about 200-300 bytes: compresses well.
fn log_line(i: usize) -> String {
    format!(
        r#"{{"ts":"2026-12-02T13:{:02}:{:02}.{:03}Z","level":"info","service":"checkout","trace_id":"{:032x}","msg":"order {i} placed","user":{},"items":{},"latency_ms":{}}}"#,
        (i / 60) % 60,
        i % 60,
        i % 1000,
        (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834),
        i % 977,
        i % 7,
        i % 250
    )
}

fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

fn log_records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            Record::new(log_line(i))
                .key(format!("user-{}", i % 13))
                .header("trace", format!("{i:x}"))
                .timestamp(1_700_000_000_000 + i as i64)
        })
        .collect()
}

fn assert_same(got: &[Message], sent: &[Record]) {
    assert_eq!(got.len(), sent.len());
    for (m, r) in got.iter().zip(sent) {
        assert_eq!(m.value, r.value, "offset {}", m.offset);
        assert_eq!(m.key, r.key, "offset {}", m.offset);
        assert_eq!(m.headers, r.headers, "offset {}", m.offset);
        assert_eq!(Some(m.timestamp), r.timestamp, "offset {}", m.offset);
    }
}

/// Every codec: what a producer compresses, a consumer group member reads
/// back unchanged; compressed batches carry version byte 2, plain ones 1,
/// and describe reports the stored bytes beside the application bytes.
#[tokio::test]
async fn every_codec_round_trips_through_producer_and_consumer() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    let codecs = [
        Compression::None,
        Compression::Lz4,
        Compression::Zstd { level: 1 },
        Compression::zstd(),
        Compression::Zstd { level: 19 },
    ];
    for (i, codec) in codecs.into_iter().enumerate() {
        let topic = format!("t{i}");
        client.create_topic(NewTopic::new(&topic, 1)).await.unwrap();
        let sent = log_records(500);
        let p = producer(&client, &topic, Some(codec)).await;
        send_one_batch(&p, sent.clone()).await;
        p.close().await.unwrap();

        let mut consumer = member(&client, &topic, "g").await;
        let mut got = Vec::new();
        while got.len() < sent.len() {
            got.push(within(GUARD, consumer.recv()).await);
        }
        consumer.close().await.unwrap();
        assert_same(&got, &sent);

        let expected = if codec == Compression::None { 1 } else { 2 };
        let stored = versions(&client, &ns, &topic).await;
        assert!(stored.iter().all(|&v| v == expected), "{codec}: {stored:?}");
        let part = client.describe_topic(&topic).await.unwrap().partitions[0];
        assert_eq!(part.next, 500);
        if codec == Compression::None {
            assert!(part.stored_bytes >= part.bytes, "{codec}: {part:?}");
        } else {
            // lz4 trades ratio for speed.
            let ratio = if codec == Compression::Lz4 { 2 } else { 3 };
            assert!(part.stored_bytes * ratio < part.bytes, "{codec}: {part:?}");
        }
    }
}

/// Producers with different codecs on one partition (and one taking the
/// topic's default, changed with `update_topic`): one ordered partition of
/// plain and compressed batches that reads back as sent.
#[tokio::test]
async fn mixed_codecs_on_one_partition_and_the_topic_default() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    let topic = client
        .create_topic(NewTopic::new("t", 1).compression(Compression::Lz4))
        .await
        .unwrap();
    assert_eq!(topic.config.compression, Compression::Lz4);
    let by_default = producer(&client, "t", None).await;
    let zstd = producer(&client, "t", Some(Compression::Zstd { level: 5 })).await;
    let plain = producer(&client, "t", Some(Compression::None)).await;
    let mut sent = Vec::new();
    for round in 0..3 {
        for p in [&by_default, &zstd, &plain] {
            let records: Vec<Record> = log_records(50)
                .into_iter()
                .map(|r| r.header("round", format!("{round}")))
                .collect();
            send_one_batch(p, records.clone()).await;
            sent.extend(records);
        }
    }
    for p in [by_default, zstd, plain] {
        p.close().await.unwrap();
    }
    assert_same(&all_messages(&client, "t", 0).await, &sent);
    assert_eq!(
        versions(&client, &ns, "t").await,
        [2, 2, 1].repeat(3),
        "lz4 (topic default), zstd, none"
    );

    // A changed default applies to producers built afterwards.
    client
        .alter_topic("t", None, |c| c.compression = Compression::None)
        .await
        .unwrap();
    let p = producer(&client, "t", None).await;
    send_one_batch(&p, log_records(50)).await;
    p.close().await.unwrap();
    assert_eq!(*versions(&client, &ns, "t").await.last().unwrap(), 1);
}

/// A partition as the library wrote it before compression existed (format
/// version 1 without the stored-bytes fields), captured from etcd: two
/// batches of one record each, keys k1/k2, values hello/world, header h=v,
/// timestamp 1700000000000, then the head.
const OLD_BATCH_0: &str =
    "0110b6e2abf2acc5a4af27221a1080d095ffbc311a026b31220568656c6c6f2a060a01681201762801";
const OLD_BATCH_1: &str = "01080110b6e2abf2acc5a4af271801221a1080d095ffbc311a026b322205776f726c642a060a016812017628013020";
const OLD_HEAD: &str = "010802121008b6e2abf2acc5a4af271001180120011840";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Old data stays readable, describes, and takes compressed appends after it.
#[tokio::test]
async fn old_format_data_stays_readable() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    let topic = client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let part = format!("{}data/t/{}/00000/", ns.prefix(), topic.incarnation);
    put_raw(&client, &format!("{part}b/{:020}", 0), unhex(OLD_BATCH_0)).await;
    put_raw(&client, &format!("{part}b/{:020}", 1), unhex(OLD_BATCH_1)).await;
    put_raw(&client, &format!("{part}head"), unhex(OLD_HEAD)).await;

    let old = all_messages(&client, "t", 0).await;
    let seen: Vec<_> = old
        .iter()
        .map(|m| {
            (
                m.offset,
                m.key.clone().unwrap(),
                m.value.clone(),
                m.timestamp,
                m.headers.clone(),
            )
        })
        .collect();
    let h = BTreeMap::from([("h".to_string(), pubsub_etcd::Bytes::from("v"))]);
    assert_eq!(
        seen,
        [
            (0, "k1".into(), "hello".into(), 1_700_000_000_000, h.clone()),
            (1, "k2".into(), "world".into(), 1_700_000_000_000, h),
        ]
    );
    let info = client.describe_topic("t").await.unwrap().partitions[0];
    assert_eq!((info.earliest, info.next, info.bytes), (0, 2, 64));
    assert_eq!(info.stored_bytes, 0, "old batches did not record it");

    let p = producer(&client, "t", Some(Compression::zstd())).await;
    let offsets = send_one_batch(&p, log_records(20)).await;
    p.close().await.unwrap();
    assert_eq!(offsets, (2..22).collect::<Vec<_>>());
    let mut reader = client
        .assign("t", [(0, StartOffset::Earliest)])
        .await
        .unwrap();
    for offset in 0..22 {
        assert_eq!(within(GUARD, reader.recv()).await.offset, offset);
    }
    reader.close().await;
    let info = client.describe_topic("t").await.unwrap().partitions[0];
    assert!(
        info.stored_bytes > 0 && info.stored_bytes < info.bytes,
        "{info:?}"
    );
}

/// The stored batch format (`proto/record.proto`), enough of it to write
/// version 2 batches that no producer would.
#[derive(Clone, PartialEq, prost::Message)]
struct RawBatch {
    #[prost(uint64, tag = "1")]
    base_offset: u64,
    #[prost(uint32, tag = "5")]
    offset_count: u32,
    #[prost(int32, tag = "7")]
    codec: i32,
    #[prost(bytes = "vec", tag = "8")]
    compressed_records: Vec<u8>,
    #[prost(uint32, tag = "9")]
    records_len: u32,
}

const LZ4: i32 = 1;
const ZSTD: i32 = 2;

fn raw_v2(base_offset: u64, codec: i32, data: Vec<u8>, records_len: u32) -> Vec<u8> {
    let mut value = vec![2];
    value.extend(
        RawBatch {
            base_offset,
            offset_count: 1,
            codec,
            compressed_records: data,
            records_len,
        }
        .encode_to_vec(),
    );
    value
}

/// Peak resident memory of this process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// A zstd frame of `n` zeros, compressed as a stream so that writing it
/// never holds `n` bytes.
fn zstd_zeros(n: usize) -> Vec<u8> {
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..n / chunk.len() {
        encoder.write_all(&chunk).unwrap();
    }
    encoder.finish().unwrap()
}

/// An lz4 block that expands to about 255 times its size: one literal zero
/// then one match of offset 1 whose length takes `n` extension bytes.
fn lz4_bomb(n: usize) -> Vec<u8> {
    let mut block = vec![0x1f, 0x00, 0x01, 0x00];
    block.extend(std::iter::repeat_n(0xff, n));
    block.extend([0x00, 0x00]);
    block
}

/// Garbage in compressed batches (an unknown codec, bytes that are not
/// zstd or lz4, a claim beyond the bound, decompression bombs that claim
/// little but expand to gigabytes) fails with `Corrupt` naming the key and
/// what is wrong, never allocates for what the data claims, and does not
/// hide the good batch behind it.
#[tokio::test]
async fn garbage_and_bombs_in_compressed_batches_are_refused_with_bounded_memory() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    let topic = client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let p = producer(&client, "t", Some(Compression::zstd())).await;
    for i in 0..8 {
        send_one_batch(&p, vec![Record::new(format!("m{i}"))]).await;
    }
    p.close().await.unwrap();
    let key = |offset: u64| {
        format!(
            "{}data/t/{}/00000/b/{offset:020}",
            ns.prefix(),
            topic.incarnation
        )
    };
    let gib = 1usize << 30;
    let garbage: Vec<(Vec<u8>, &str)> = vec![
        (
            raw_v2(1, 7, b"abc".to_vec(), 3),
            "unknown compression codec 7",
        ),
        (raw_v2(2, ZSTD, vec![0xff; 40], 100), "bad zstd data"),
        (raw_v2(3, LZ4, vec![0xff; 40], 100), "bad lz4 data"),
        (
            raw_v2(4, ZSTD, zstd_zeros(64 << 20), u32::MAX),
            "at most 2097152",
        ),
        (raw_v2(5, ZSTD, zstd_zeros(gib), 1 << 20), "bad zstd data"),
        (raw_v2(6, LZ4, lz4_bomb(1 << 20), 1 << 20), "bad lz4 data"),
    ];
    let mut expected = BTreeMap::new();
    for (i, (value, reason)) in garbage.into_iter().enumerate() {
        assert!(value.len() < 1 << 21, "{reason}: {} bytes", value.len());
        let offset = i as u64 + 1;
        put_raw(&client, &key(offset), value).await;
        expected.insert(key(offset), reason);
    }
    let before = peak_rss();

    let mut reader = client
        .assign("t", [(0, StartOffset::Earliest)])
        .await
        .unwrap();
    let mut errors = BTreeMap::new();
    let mut good = Vec::new();
    // Errors come beside the messages of the same read, in no set order.
    while good.len() < 2 || errors.len() < expected.len() {
        let item = tokio::time::timeout(GUARD, reader.recv()).await;
        let item = item.unwrap_or_else(|_| panic!("only {good:?} and {errors:?} arrived"));
        match item.expect("the reader ended") {
            Ok(message) => good.push((message.offset, message.value)),
            Err(Error::Corrupt { key, reason }) => {
                assert!(errors.insert(key, reason).is_none(), "reported twice");
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    reader.close().await;
    let m = |s: &'static str| pubsub_etcd::Bytes::from(s);
    assert_eq!(good, [(0, m("m0")), (7, m("m7"))]);
    assert_eq!(
        errors.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (k, reason) in &expected {
        assert!(
            errors[k].contains(reason),
            "{k}: {:?} lacks {reason:?}",
            errors[k]
        );
    }
    let fetched = all_messages(&client, "t", 0).await;
    assert_eq!(fetched.iter().map(|m| m.offset).collect::<Vec<_>>(), [0, 7]);
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 128 << 20, "peak RSS grew by {grown} bytes");
}

/// Random payloads do not compress: the batches are stored plain, so they
/// cost no more than with `none`.
#[tokio::test]
async fn incompressible_batches_are_stored_plain() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    for (i, codec) in [Compression::zstd(), Compression::Lz4]
        .into_iter()
        .enumerate()
    {
        let topic = format!("t{i}");
        client.create_topic(NewTopic::new(&topic, 1)).await.unwrap();
        let records: Vec<Record> = (0..500).map(|_| Record::new(random_bytes(300))).collect();
        let p = producer(&client, &topic, Some(codec)).await;
        send_one_batch(&p, records.clone()).await;
        send_one_batch(&p, log_records(500)).await;
        p.close().await.unwrap();
        assert_eq!(versions(&client, &ns, &topic).await, [1, 2], "{codec}");
        let got = all_messages(&client, &topic, 0).await;
        assert_eq!(got.len(), 1000);
        assert!(got[..500]
            .iter()
            .zip(&records)
            .all(|(m, r)| m.value == r.value));
    }
}

/// `max_message_bytes` limits a record before compression, however well it
/// compresses; the request limit applies to the stored batch, which is never
/// larger than the plain one, so a batch of the largest size goes through
/// compressible or not.
#[tokio::test]
async fn size_limits_count_the_uncompressed_record_and_the_stored_batch() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client
        .create_topic(NewTopic::new("small", 1).max_message_bytes(10_000))
        .await
        .unwrap();
    let p = producer(&client, "small", Some(Compression::zstd())).await;
    match p
        .send(Record::new(vec![0u8; 20_000]))
        .await
        .map_err(|e| e.error)
    {
        Err(Error::MessageTooLarge { size, limit }) => {
            assert!(size >= 20_000, "{size}");
            assert_eq!(limit, 10_000);
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    p.send(Record::new(vec![0u8; 9_000])).await.unwrap();
    p.close().await.unwrap();
    assert!(raw_batches(&client, &ns, "small").await[0].1.len() < 1000);

    client.create_topic(NewTopic::new("big", 1)).await.unwrap();
    let max = 1400 * 1024;
    let p = client
        .producer("big")
        .compression(Compression::zstd())
        .max_batch_bytes(max)
        .linger(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    p.send(Record::new(random_bytes(max - 100))).await.unwrap();
    // 1.4 MiB of log lines as one batch: ~5,500 records.
    let logs = log_records(5_500);
    send_one_batch(&p, logs.clone()).await;
    p.close().await.unwrap();
    let raw = raw_batches(&client, &ns, "big").await;
    assert_eq!(raw[0].1[0], 1, "random: plain");
    assert!(raw[0].1.len() < 1536 * 1024);
    assert!(raw[1..].iter().all(|(_, v)| v[0] == 2 && v.len() < max / 3));
    assert_same(&all_messages(&client, "big", 0).await[1..], &logs);
}

/// Byte retention counts bytes as stored: compressed batches that together
/// hold ten times the limit in application bytes are all kept while their
/// stored bytes fit, and incompressible ones are trimmed to the limit.
#[tokio::test]
async fn byte_retention_counts_stored_bytes() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client
        .create_topic(NewTopic::new("t", 1).retention_bytes(20_000))
        .await
        .unwrap();
    let p = producer(&client, "t", Some(Compression::zstd())).await;
    for b in 0..20 {
        send_one_batch(
            &p,
            (0..10)
                .map(|i| Record::new(vec![b as u8; 1000]).key(format!("{b}-{i}")))
                .collect(),
        )
        .await;
    }
    let report = client.enforce_retention("t").await.unwrap();
    assert_eq!(report.batches_deleted, 0);
    let info = client.describe_topic("t").await.unwrap().partitions[0];
    assert_eq!((info.earliest, info.next), (0, 200));
    assert!(
        info.bytes > 200_000 && info.stored_bytes < 20_000,
        "{info:?}"
    );

    for _ in 0..20 {
        send_one_batch(
            &p,
            (0..10).map(|_| Record::new(random_bytes(1000))).collect(),
        )
        .await;
    }
    p.close().await.unwrap();
    client.enforce_retention("t").await.unwrap();
    let info = client.describe_topic("t").await.unwrap().partitions[0];
    assert!(info.stored_bytes <= 20_000, "{info:?}");
    assert!(info.stored_bytes >= 10_000, "trimmed too much: {info:?}");
    let stored: usize = raw_batches(&client, &ns, "t")
        .await
        .iter()
        .map(|(_, v)| v.len())
        .sum();
    assert_eq!(stored as u64, info.stored_bytes);
    assert_eq!(
        all_messages(&client, "t", 0).await.last().unwrap().offset,
        399
    );
}

/// Deleting single messages, truncating, key compaction and TTL work on
/// compressed batches, which stay compressed when rewritten.
#[tokio::test]
async fn delete_truncate_compact_and_ttl_on_compressed_batches() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let p = producer(&client, "t", Some(Compression::zstd())).await;
    // Batch 0: offsets 0..100, keys user-0..user-12 repeating.
    let first = log_records(100);
    send_one_batch(&p, first.clone()).await;
    // Batch 1: offsets 100..200.
    send_one_batch(&p, log_records(100)).await;

    assert!(client.delete_message("t", 0, 5).await.unwrap());
    let raw = raw_batches(&client, &ns, "t").await;
    assert_eq!(raw.len(), 2);
    assert_eq!(raw[0].1[0], 2, "rewritten batch stays compressed");
    let got = all_messages(&client, "t", 0).await;
    assert_eq!(got.len(), 199);
    assert!(got.iter().all(|m| m.offset != 5));
    assert_eq!(got[5].value, first[6].value);

    client.truncate_partition("t", 0, 150).await.unwrap();
    let got = all_messages(&client, "t", 0).await;
    assert_eq!(got.first().unwrap().offset, 150);
    assert_eq!(versions(&client, &ns, "t").await, [2]);

    client.compact_topic("t").await.unwrap();
    let got = all_messages(&client, "t", 0).await;
    // 13 keys, the newest of each.
    assert_eq!(got.len(), 13);
    assert_eq!(got.last().unwrap().offset, 199);
    assert_eq!(versions(&client, &ns, "t").await, [2]);

    let expiring: Vec<Record> = log_records(50)
        .into_iter()
        .map(|r| r.ttl(Duration::from_secs(3)))
        .collect();
    send_one_batch(&p, expiring).await;
    p.close().await.unwrap();
    assert_eq!(all_messages(&client, "t", 0).await.len(), 63);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(all_messages(&client, "t", 0).await.len(), 13, "expired");
    // etcd deletes the batch a few seconds after the deadline.
    let deadline = tokio::time::Instant::now() + GUARD;
    while raw_batches(&client, &ns, "t").await.len() > 1 {
        assert!(tokio::time::Instant::now() < deadline, "batch not deleted");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
