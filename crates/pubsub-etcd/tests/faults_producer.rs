//! The producer's exactly-once retry under real faults.
//!
//! - `lost_responses_are_retried_exactly_once`: a TCP proxy in front of etcd
//!   lets requests through but drops etcd's answers, so an append is applied
//!   while its producer only sees a timeout. The test sees the applied but
//!   unacknowledged batch in etcd, then restores the connection and checks
//!   the retry found it instead of appending it again.
//! - `leader_pause_keeps_offsets_exactly_once`: a 3-member cluster whose
//!   leader is frozen with SIGSTOP while two producers append to one
//!   partition, then thawed.
//!
//! - `send_to_killed_etcd_fails_unavailable_within_bound`: etcd is killed
//!   under a producer with the default 60 s delivery timeout; a send fails
//!   with `Error::Unavailable`, the record handed back, within the
//!   producer's unavailable timeout plus one request timeout.
//!
//! The first two check, once every send has resolved, that the partition's offsets
//! are contiguous and that every acknowledged value is stored exactly once,
//! at its acknowledged offset. A counting `tracing` subscriber confirms that
//! appends really ended with an unknown outcome (the retry path ran).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pubsub_etcd::{Bytes, Client, Error, Message, NewTopic, Producer, Record};
use tokio::task::JoinHandle;

use common::etcd_proc::EtcdCluster;
use common::leader;
use common::ns;
use common::proxy::Proxy;

// ---------------------------------------------------------------------------
// Counting the library's "append outcome unknown" events
// ---------------------------------------------------------------------------

/// Counts, per topic, the library's debug events for appends whose outcome
/// was unknown (a timeout or broken connection mid-transaction).
#[derive(Default)]
struct UnknownOutcomes {
    by_topic: Mutex<HashMap<String, u64>>,
}

#[derive(Default)]
struct EventFields {
    message: String,
    topic: String,
}

impl tracing::field::Visit for EventFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "topic" => self.topic = format!("{value:?}"),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "topic" => self.topic = value.to_string(),
            _ => {}
        }
    }
}

impl tracing::Subscriber for &'static UnknownOutcomes {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        // Only the library's own events; h2, hyper and tonic trace a lot.
        metadata.target().starts_with("pubsub_etcd")
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = EventFields::default();
        event.record(&mut fields);
        if fields.message.contains("outcome unknown") {
            *self
                .by_topic
                .lock()
                .unwrap()
                .entry(fields.topic)
                .or_default() += 1;
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The process-wide counter, installed as the global subscriber once.
fn unknown_outcomes() -> &'static UnknownOutcomes {
    static COUNTER: OnceLock<&'static UnknownOutcomes> = OnceLock::new();
    COUNTER.get_or_init(|| {
        let counter: &'static UnknownOutcomes = Box::leak(Box::default());
        tracing::subscriber::set_global_default(counter)
            .expect("no other global tracing subscriber in this test binary");
        counter
    })
}

impl UnknownOutcomes {
    fn count(&self, topic: &str) -> u64 {
        self.by_topic
            .lock()
            .unwrap()
            .get(topic)
            .copied()
            .unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------

/// Every message of partition 0, read with `fetch`.
async fn read_partition(client: &Client, topic: &str) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut from = 0;
    loop {
        let fetched = client.fetch(topic, 0, from, 10_000).await.expect("fetch");
        if fetched.messages.is_empty() && fetched.next_offset == from {
            return messages;
        }
        messages.extend(fetched.messages);
        from = fetched.next_offset;
    }
}

/// After every send has resolved: the partition holds offsets `0..n` with
/// no gap, no value twice, every acknowledged value exactly once at its
/// acknowledged offset, and nothing that was neither acknowledged nor
/// failed with an unknown outcome.
async fn assert_exactly_once(
    client: &Client,
    topic: &str,
    acked: &[(u64, Bytes)],
    failed: &[(Bytes, Error)],
) {
    let stored = read_partition(client, topic).await;
    let next = client
        .describe_topic(topic)
        .await
        .expect("describe")
        .partitions[0]
        .next;
    let offsets: Vec<u64> = stored.iter().map(|m| m.offset).collect();
    let expected: Vec<u64> = (0..next).collect();
    assert!(
        offsets == expected,
        "stored offsets are not 0..{next}: {} messages, first gap near {:?}",
        offsets.len(),
        offsets
            .iter()
            .zip(0u64..)
            .find(|(o, i)| **o != *i)
            .map(|(o, _)| o)
    );
    let mut seen = HashSet::new();
    let twice: Vec<&Bytes> = stored
        .iter()
        .filter(|m| !seen.insert(m.value.clone()))
        .map(|m| &m.value)
        .take(10)
        .collect();
    assert!(twice.is_empty(), "values stored twice: {twice:?}");
    let by_offset: HashMap<u64, &Bytes> = stored.iter().map(|m| (m.offset, &m.value)).collect();
    for (offset, value) in acked {
        assert_eq!(
            by_offset.get(offset).copied(),
            Some(value),
            "acknowledged {value:?} at offset {offset}"
        );
    }
    for (value, error) in failed {
        assert!(
            error.is_outcome_unknown(),
            "send of {value:?} failed with {error:?}; only unknown outcomes are expected here"
        );
    }
    let failed_values: HashSet<&Bytes> = failed.iter().map(|(v, _)| v).collect();
    let acked_values: HashSet<&Bytes> = acked.iter().map(|(_, v)| v).collect();
    for m in &stored {
        assert!(
            acked_values.contains(&m.value) || failed_values.contains(&m.value),
            "stored {:?} at {} was never sent",
            m.value,
            m.offset
        );
    }
    assert_eq!(
        stored.len(),
        acked.len() + failed_values.iter().filter(|v| seen.contains(**v)).count(),
    );
}

/// Tasks sending one record at a time with values `<prefix>-<task>-<i>`
/// until stopped, recording every outcome.
struct Senders {
    acked: Arc<Mutex<Vec<(u64, Bytes)>>>,
    failed: Arc<Mutex<Vec<(Bytes, Error)>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Senders {
    fn start(producer: &Producer, prefix: &str, tasks: usize) -> Senders {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..tasks)
            .map(|task| {
                let producer = producer.clone();
                let acked = acked.clone();
                let failed = failed.clone();
                let stop = stop.clone();
                let prefix = prefix.to_string();
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let value = Bytes::from(format!("{prefix}-{task}-{i}"));
                        i += 1;
                        match producer
                            .send(Record::new(value.clone()))
                            .await
                            .map(|m| (m.partition, m.offset))
                            .map_err(|e| e.error)
                        {
                            Ok((0, offset)) => acked.lock().unwrap().push((offset, value)),
                            Ok(other) => panic!("{value:?} landed at {other:?}"),
                            Err(e) => failed.lock().unwrap().push((value, e)),
                        }
                    }
                })
            })
            .collect();
        Senders {
            acked,
            failed,
            stop,
            tasks,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.lock().unwrap().len() as u64
    }

    fn acked_values(&self) -> HashSet<Bytes> {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Waits (bounded) until at least `n` sends were acknowledged.
    async fn wait_acked(&self, n: u64, what: &str) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.acked() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: only {} of {n} sends acknowledged", self.acked()));
    }

    /// Stops and waits until every send has resolved.
    async fn finish(self) -> (Vec<(u64, Bytes)>, Vec<(Bytes, Error)>) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(25), task)
                .await
                .expect("a send did not resolve within 25 s")
                .expect("sender task panicked");
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        (acked, failed)
    }
}

/// Polls `done` until it holds, failing the test after 20 s.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within 20 s"));
}

// ---------------------------------------------------------------------------
// Lost responses
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_responses_are_retried_exactly_once() {
    const TOPIC: &str = "lost-responses";
    let outcomes = unknown_outcomes();
    let (direct, ns) = ns::client().await;
    direct.create_topic(NewTopic::new(TOPIC, 1)).await.unwrap();
    let endpoint = ns::endpoints()[0].clone();
    let proxy = Proxy::start(endpoint).await;
    let proxied = proxy.client(ns.name()).await;
    let producer_p = proxied
        .producer(TOPIC)
        .delivery_timeout(Duration::from_secs(20))
        .build()
        .await
        .unwrap();
    // A second producer, on a direct connection, writes to the same
    // partition before and while the first one is in doubt. The two take
    // turns: two producers appending to one partition at full speed starve
    // one another (core.rs `contending_producers_both_make_progress`).
    let producer_d = direct.producer(TOPIC).build().await.unwrap();
    let d = Senders::start(&producer_d, "direct", 4);
    d.wait_acked(100, "direct producer").await;
    let (mut acked, mut failed) = d.finish().await;
    // Once the proxied producer has appended, its cached head is current,
    // and with no other writer its next append cannot lose a race: it will
    // be applied.
    let p = Senders::start(&producer_p, "proxied", 4);
    p.wait_acked(200, "proxied producer").await;

    proxy.swallow_responses();
    // The proxied producer's append in flight is applied by etcd, but its
    // answer never comes: the append times out with an unknown outcome.
    tokio::time::timeout(Duration::from_secs(10), async {
        while outcomes.count(TOPIC) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the proxied producer never reported an unknown append outcome");
    // Every earlier append was answered before it (one append in flight per
    // partition), so the acknowledgements so far are all there will be
    // until the proxy heals.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let acked_before = p.acked();
    let acked_values = p.acked_values();
    let in_doubt: Vec<Message> = read_partition(&direct, TOPIC)
        .await
        .into_iter()
        .filter(|m| m.value.starts_with(b"proxied-") && !acked_values.contains(&m.value))
        .collect();
    assert!(
        !in_doubt.is_empty(),
        "no applied but unacknowledged append: the fault did not create an ambiguous outcome"
    );

    // While the proxied producer is in doubt, the direct one moves the head on.
    let d = Senders::start(&producer_d, "direct2", 2);
    d.wait_acked(50, "direct producer during the outage").await;
    assert_eq!(
        p.acked(),
        acked_before,
        "acknowledgements arrived while responses were dropped"
    );
    assert!(proxy.dropped_bytes.load(Ordering::SeqCst) > 0);
    let (ok, f) = d.finish().await;
    acked.extend(ok);
    failed.extend(f);

    proxy.heal();
    // The proxied producer recovers and makes progress again.
    p.wait_acked(acked_before + 100, "proxied producer after healing")
        .await;
    let (ok, f) = p.finish().await;
    acked.extend(ok);
    failed.extend(f);
    producer_p.close().await.unwrap();
    producer_d.close().await.unwrap();

    assert!(
        failed.is_empty(),
        "sends failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert_exactly_once(&direct, TOPIC, &acked, &failed).await;
    // The batch in doubt is stored once, where its senders were told.
    let acked_at: HashMap<&Bytes, u64> = acked.iter().map(|(o, v)| (v, *o)).collect();
    for m in &in_doubt {
        assert_eq!(acked_at.get(&m.value), Some(&m.offset), "{:?}", m.value);
    }
    eprintln!(
        "lost responses: {} messages, {} in doubt, {} unknown append outcomes, {} response bytes dropped",
        acked.len(),
        in_doubt.len(),
        outcomes.count(TOPIC),
        proxy.dropped_bytes.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------------------
// Paused leader
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_pause_keeps_offsets_exactly_once() {
    const TOPIC: &str = "leader-pause";
    let outcomes = unknown_outcomes();
    let t0 = std::time::Instant::now();
    let cluster = EtcdCluster::start(3);
    eprintln!("leader pause: cluster up after {:?}", t0.elapsed());
    let connect = || {
        Client::builder(cluster.endpoints())
            .namespace("faults")
            .connect_timeout(Duration::from_secs(2))
            .request_timeout(Duration::from_millis(500))
            .connect()
    };
    let admin = connect().await.unwrap();
    admin.create_topic(NewTopic::new(TOPIC, 1)).await.unwrap();
    let producers = [connect().await.unwrap(), connect().await.unwrap()];
    let mut senders = Vec::new();
    let mut handles = Vec::new();
    for (i, client) in producers.iter().enumerate() {
        let producer = client
            .producer(TOPIC)
            .delivery_timeout(Duration::from_secs(20))
            .build()
            .await
            .unwrap();
        senders.push(Senders::start(&producer, &format!("p{i}"), 4));
        handles.push(producer);
    }
    wait_until("200 acknowledgements before the pause", || {
        senders.iter().map(Senders::acked).sum::<u64>() >= 200
    })
    .await;

    let leader = leader(&cluster).await;
    cluster.pause(leader);
    eprintln!(
        "leader pause: paused member {leader} at {:?}, {} acknowledged, {} unknown outcomes",
        t0.elapsed(),
        senders.iter().map(Senders::acked).sum::<u64>(),
        outcomes.count(TOPIC)
    );
    // The other two members elect a new leader and appends continue, while
    // appends sent to the frozen member time out with an unknown outcome
    // until the client's health check takes it out of rotation (about a
    // second), so a few unknown outcomes are expected, not many.
    let total = |senders: &[Senders]| senders.iter().map(Senders::acked).sum::<u64>();
    let before = total(&senders);
    wait_until(
        "20 acknowledgements and an unknown outcome while the old leader is paused",
        || total(&senders) >= before + 20 && outcomes.count(TOPIC) >= 1,
    )
    .await;
    eprintln!(
        "leader pause: resuming at {:?}, {} acknowledged, {} unknown outcomes",
        t0.elapsed(),
        total(&senders),
        outcomes.count(TOPIC)
    );
    cluster.resume(leader);
    cluster.wait_healthy(leader);
    eprintln!("leader pause: healthy at {:?}", t0.elapsed());
    let before = total(&senders);
    wait_until("200 acknowledgements after the old leader resumed", || {
        total(&senders) >= before + 200
    })
    .await;

    eprintln!("leader pause: finishing at {:?}", t0.elapsed());
    let (mut acked, mut failed) = (Vec::new(), Vec::new());
    for s in senders {
        let (ok, f) = s.finish().await;
        acked.extend(ok);
        failed.extend(f);
    }
    for producer in handles {
        producer.close().await.unwrap();
    }
    assert_exactly_once(&admin, TOPIC, &acked, &failed).await;
    let unknown = outcomes.count(TOPIC);
    eprintln!(
        "leader pause: {} acknowledged, {} failed, {unknown} unknown append outcomes",
        acked.len(),
        failed.len()
    );
    assert!(
        unknown > 0,
        "no append ended with an unknown outcome: the pause did not exercise the retry"
    );
}

// ---------------------------------------------------------------------------
// etcd gone after connecting
// ---------------------------------------------------------------------------

/// A client that connected fine and then loses etcd: every call fails
/// within about its timeout with a clear error, and a producer's send fails
/// once its delivery timeout passes instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_gone_after_connect_fails_fast() {
    const TOPIC: &str = "gone";
    let (direct, ns) = ns::client().await;
    direct.create_topic(NewTopic::new(TOPIC, 2)).await.unwrap();
    let proxy = Proxy::start(ns::endpoints()[0].clone()).await;
    let client = Client::builder([proxy.endpoint()])
        .namespace(ns.name())
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let producer = client
        .producer(TOPIC)
        .delivery_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    assert_eq!(
        producer
            .send(Record::new("before").partition(0))
            .await
            .map(|m| (m.partition, m.offset))
            .unwrap(),
        (0, 0)
    );

    proxy.shut_down();
    let unreachable = |e: &Error| match e {
        Error::Timeout { .. } | Error::Unavailable { .. } => true,
        Error::Etcd { .. } => e.is_outcome_unknown(),
        _ => false,
    };
    // (operation, how soon it must fail, call): the request timeout is 1 s;
    // a send may also use its 2 s delivery timeout.
    let bound = Duration::from_secs(6);
    type Call<'a> =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send + 'a>>;
    let calls: Vec<(&str, Duration, Call<'_>)> = vec![
        (
            "list_topics",
            bound,
            Box::pin(async { client.list_topics().await.map(drop) }),
        ),
        (
            "topic",
            bound,
            Box::pin(async { client.topic(TOPIC).await.map(drop) }),
        ),
        (
            "describe_topic",
            bound,
            Box::pin(async { client.describe_topic(TOPIC).await.map(drop) }),
        ),
        (
            "fetch",
            bound,
            Box::pin(async { client.fetch(TOPIC, 0, 0, 10).await.map(drop) }),
        ),
        // Partition 0 has a cached head (an append attempt), partition 1
        // not yet (a head read first).
        (
            "send to a used partition",
            bound + Duration::from_secs(2),
            Box::pin(async {
                producer
                    .send(Record::new("lost").partition(0))
                    .await
                    .map(drop)
                    .map_err(|e| e.error)
            }),
        ),
        (
            "send to a new partition",
            bound + Duration::from_secs(2),
            Box::pin(async {
                producer
                    .send(Record::new("lost").partition(1))
                    .await
                    .map(drop)
                    .map_err(|e| e.error)
            }),
        ),
    ];
    for (op, bound, call) in calls {
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .unwrap_or_else(|_| panic!("{op} hung for 20 s after etcd went away"));
        let elapsed = started.elapsed();
        let e = result.expect_err(op);
        assert!(unreachable(&e), "{op}: unclear error {e:?}");
        assert!(elapsed < bound, "{op} took {elapsed:?} to fail: {e}");
    }
    // Nothing but the first message was written.
    let description = direct.describe_topic(TOPIC).await.unwrap();
    let nexts: Vec<u64> = description.partitions.iter().map(|p| p.next).collect();
    assert_eq!(nexts, [1, 0]);
}

// ---------------------------------------------------------------------------
// etcd killed under a producer
// ---------------------------------------------------------------------------

/// A killed etcd makes a send fail with `Error::Unavailable` within the
/// unavailable timeout plus one request timeout, not after the 60 s
/// delivery timeout, and the record comes back with the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_killed_etcd_fails_unavailable_within_bound() {
    const TOPIC: &str = "killed";
    let mut cluster = EtcdCluster::start(1);
    let request_timeout = Duration::from_secs(1);
    let unavailable = Duration::from_secs(2);
    let client = Client::builder(cluster.endpoints())
        .namespace("killed-etcd")
        .connect_timeout(request_timeout)
        .request_timeout(request_timeout)
        .connect()
        .await
        .unwrap();
    client.create_topic(NewTopic::new(TOPIC, 2)).await.unwrap();
    let producer = client
        .producer(TOPIC)
        .unavailable_timeout(unavailable)
        .build()
        .await
        .unwrap();
    let sent = producer
        .send(Record::new("before").partition(0))
        .await
        .unwrap();
    assert_eq!((sent.partition, sent.offset), (0, 0));

    cluster.kill(0);
    // Partition 0 has a cached head (an append attempt first), partition 1
    // not yet (a head read first).
    for partition in [0, 1] {
        let record = Record::new(format!("lost-{partition}")).partition(partition);
        let started = std::time::Instant::now();
        let Ok(sent) =
            tokio::time::timeout(Duration::from_secs(30), producer.send(record.clone())).await
        else {
            panic!("send to partition {partition} hung for 30 s");
        };
        let failed = sent.expect_err("etcd is dead");
        let elapsed = started.elapsed();
        assert!(
            matches!(failed.error, Error::Unavailable { .. }),
            "partition {partition}: unclear error {:?}",
            failed.error
        );
        assert_eq!(failed.record, record, "the record comes back");
        let bound = unavailable + request_timeout + Duration::from_secs(2);
        assert!(
            elapsed < bound,
            "partition {partition}: failed after {elapsed:?}, over {bound:?}: {}",
            failed.error
        );
    }
}

// ---------------------------------------------------------------------------
// Workers that end idle
// ---------------------------------------------------------------------------

/// With a 10 ms idle timeout a partition's worker ends and restarts over
/// and over while one task keeps enqueueing with pauses around that
/// timeout: every acknowledged record is stored once, at its acknowledged
/// offset, in enqueue order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_restart_without_loss_or_reorder() {
    const TOPIC: &str = "idle";
    const COUNT: u64 = 300;
    let (client, _ns) = ns::client().await;
    client.create_topic(NewTopic::new(TOPIC, 2)).await.unwrap();
    let producer = client
        .producer(TOPIC)
        .worker_idle_timeout(Duration::from_millis(10))
        .build()
        .await
        .unwrap();
    let mut deliveries = Vec::new();
    for i in 0..COUNT {
        let record = Record::new(format!("{i:04}")).partition((i % 2) as u32);
        deliveries.push(producer.enqueue(record).await.unwrap());
        // Pauses from 0 to 19 ms straddle the idle timeout.
        tokio::time::sleep(Duration::from_millis(i * 7 % 20)).await;
    }
    let mut offsets = [Vec::new(), Vec::new()];
    for (i, delivery) in deliveries.into_iter().enumerate() {
        let sent = tokio::time::timeout(Duration::from_secs(30), delivery)
            .await
            .expect("a delivery hung")
            .unwrap_or_else(|e| panic!("record {i}: {e}"));
        assert_eq!(sent.partition as usize, i % 2);
        offsets[i % 2].push(sent.offset);
    }
    producer.close().await.unwrap();
    for (partition, acked) in offsets.iter().enumerate() {
        let expected: Vec<u64> = (0..COUNT / 2).collect();
        assert_eq!(
            acked, &expected,
            "partition {partition}: offsets in enqueue order"
        );
        // A fetch returns a page; read on until past the last offset.
        let (mut values, mut from) = (Vec::new(), 0);
        while from < COUNT / 2 {
            let fetched = client
                .fetch(TOPIC, partition as u32, from, COUNT as usize)
                .await
                .unwrap();
            assert!(fetched.next_offset > from, "fetch made no progress");
            from = fetched.next_offset;
            values.extend(
                fetched
                    .messages
                    .iter()
                    .map(|m| String::from_utf8_lossy(&m.value).into_owned()),
            );
        }
        let sent: Vec<String> = (0..COUNT)
            .filter(|i| (i % 2) as usize == partition)
            .map(|i| format!("{i:04}"))
            .collect();
        assert_eq!(
            values, sent,
            "partition {partition}: stored once each, in order"
        );
    }
}
