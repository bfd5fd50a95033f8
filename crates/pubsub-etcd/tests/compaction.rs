//! Automatic history compaction on throwaway etcd processes (compaction
//! affects a whole etcd, so these tests never run against the shared
//! development etcd): clients racing for one compaction per interval, never
//! past the recorded revision; readers far behind still deliver everything;
//! the opt-out; shutdown; and a client that RBAC refuses.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::etcd_proc::{etcdctl_ok, EtcdCluster};
use common::group::{send_all, within};
use etcd_client::{EventType, GetOptions};
use pubsub_etcd::{
    AutoCommit, AutoCompaction, Client, CompactionRecord, NewTopic, Record, StartOffset,
};
use tokio::time::Instant;

/// The cluster-wide coordinating key, as DESIGN.md documents it.
const KEY: &str = "_pubsub-etcd!/compaction";
/// Budgets no test reaches: only the interval triggers.
const HUGE: i64 = i64::MAX / 4;

fn every(interval: Duration) -> AutoCompaction {
    AutoCompaction::Enabled {
        interval,
        max_revisions: HUGE,
        max_history_bytes: HUGE,
    }
}

async fn connect(endpoints: Vec<String>, namespace: &str, policy: AutoCompaction) -> Client {
    Client::builder(endpoints)
        .namespace(namespace)
        .auto_compaction(policy)
        .connect()
        .await
        .unwrap()
}

/// Whether etcd can still read revision `revision` (not compacted away).
async fn readable(etcd: &mut etcd_client::Client, revision: i64) -> bool {
    match etcd
        .get("x", Some(GetOptions::new().with_revision(revision)))
        .await
    {
        Ok(_) => true,
        Err(e) if e.to_string().contains("has been compacted") => false,
        Err(e) => panic!("read at revision {revision}: {e}"),
    }
}

/// Writes one small key every 20 ms until dropped, so revisions advance.
fn keep_writing(mut etcd: etcd_client::Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0u64.. {
            let _ = etcd.put("writer/x", i.to_string(), None).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_race_one_compaction_per_interval_never_past_the_recorded_revision() {
    let cluster = EtcdCluster::start(1);
    let mut etcd = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap();
    let mut events = etcd.watch(KEY, None).await.unwrap();
    let writer = keep_writing(etcd.clone());
    let interval = Duration::from_secs(2);
    let a = connect(cluster.endpoints(), "a", every(interval)).await;
    let b = connect(cluster.endpoints(), "b", every(interval)).await;
    assert!(a.auto_compacting() && b.auto_compacting());

    let mut cycles: Vec<(Instant, CompactionRecord)> = Vec::new();
    let until = Instant::now() + Duration::from_secs(11);
    while let Ok(next) = tokio::time::timeout_at(until, events.message()).await {
        let response = next.unwrap().expect("the watch ended");
        for event in response.events() {
            assert_eq!(event.event_type(), EventType::Put);
            let value = event.kv().unwrap().value();
            let record: CompactionRecord = serde_json::from_slice(value).unwrap();
            // Never compacted past what this cycle names (the winner may
            // not have compacted yet, but never further).
            if record.compacted > 0 {
                assert!(
                    readable(&mut etcd, record.compacted).await,
                    "history compacted past {record:?}"
                );
            }
            cycles.push((Instant::now(), record));
        }
    }
    a.close().await;
    b.close().await;
    writer.abort();

    // The first cycle only records; each later one compacts to the
    // revision the previous one recorded, so they form one chain: one
    // winner per cycle.
    assert!(cycles.len() >= 4, "{cycles:?}");
    assert_eq!(cycles[0].1.compacted, 0, "{cycles:?}");
    for pair in cycles.windows(2) {
        let ((t0, before), (t1, after)) = (&pair[0], &pair[1]);
        assert_eq!(after.compacted, before.revision, "{cycles:?}");
        assert!(after.revision > before.revision, "{cycles:?}");
        // One compaction per interval: no cycle comes sooner (50 ms for
        // the watch's own delivery jitter).
        if before.compacted > 0 {
            assert!(
                *t1 - *t0 >= interval - Duration::from_millis(50),
                "cycles {:?} apart: {cycles:?}",
                *t1 - *t0
            );
        }
    }
    // 11 s of 2 s intervals (plus up to a 200 ms check tick each).
    assert!(cycles.len() <= 7, "{cycles:?}");
    let last = &cycles.last().unwrap().1;
    let status = connect(cluster.endpoints(), "s", AutoCompaction::Disabled)
        .await
        .history_status()
        .await
        .unwrap();
    assert_eq!(status.oldest_revision, last.compacted, "{status:?}");
    assert_eq!(status.last_cycle.as_ref(), Some(last));
    assert!(!status.auto_compacting);
    assert_eq!(status.members.len(), 1);
    let member = &status.members[0];
    assert!(
        member.db_size.unwrap() >= member.db_size_in_use.unwrap(),
        "{status:?}"
    );
}

/// A consumer that stops reading for several intervals, while its
/// partition is written to and etcd's history is compacted past its
/// position, still delivers every message, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_intervals_behind_still_delivers_every_message_in_order() {
    let cluster = EtcdCluster::start(1);
    let client = connect(cluster.endpoints(), "ns", every(Duration::from_millis(500))).await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(&producer, [Record::new("0")]).await;
    let mut consumer = client
        .consumer("t", "g")
        .auto_commit(AutoCommit::Disabled)
        .start_offset(StartOffset::Earliest)
        .buffer(1)
        .fetch_messages(1)
        .join()
        .await
        .unwrap();
    let first = within(Duration::from_secs(20), consumer.recv()).await;
    assert_eq!(first.offset, 0);
    let behind_from = client.history_status().await.unwrap().revision;
    // One batch (one revision) per message, for several intervals.
    let count = 300u64;
    for i in 1..=count {
        producer.send(Record::new(i.to_string())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let until = Instant::now() + Duration::from_secs(20);
    while client.history_status().await.unwrap().oldest_revision <= behind_from {
        assert!(
            Instant::now() < until,
            "history never compacted past the reader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 1..=count {
        let m = within(Duration::from_secs(20), consumer.recv()).await;
        assert_eq!(m.offset, i);
        assert_eq!(m.value.as_ref(), i.to_string().as_bytes());
    }
    consumer.close().await.unwrap();
    producer.close().await.unwrap();
    client.close().await;
}

/// `AutoCompaction::Disabled` takes no part: no coordinating key, no
/// compaction, however long it runs; the default takes part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_never_compacts_and_the_default_takes_part() {
    let cluster = EtcdCluster::start(1);
    let mut etcd = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap();
    let writer = keep_writing(etcd.clone());
    let off = connect(cluster.endpoints(), "off", AutoCompaction::Disabled).await;
    assert!(!off.auto_compacting());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(etcd.get(KEY, None).await.unwrap().count(), 0);
    let status = off.history_status().await.unwrap();
    assert_eq!(status.oldest_revision, 1, "{status:?}");
    assert!(status.last_cycle.is_none());

    let on = Client::builder(cluster.endpoints())
        .namespace("on")
        .connect()
        .await
        .unwrap();
    assert!(on.auto_compacting());
    let until = Instant::now() + Duration::from_secs(10);
    while etcd.get(KEY, None).await.unwrap().count() == 0 {
        assert!(Instant::now() < until, "the default never took part");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.abort();
    on.close().await;
}

/// The task stops at `close`, and when the last clone is dropped: the key
/// stops changing although cycles would be due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_ends_with_close_and_with_the_last_clone() {
    let cluster = EtcdCluster::start(1);
    let mut etcd = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap();
    let writer = keep_writing(etcd.clone());
    let interval = Duration::from_millis(300);
    let mod_revision = |r: etcd_client::GetResponse| r.kvs().first().map(|kv| kv.mod_revision());

    for close in [true, false] {
        let client = connect(cluster.endpoints(), "ns", every(interval)).await;
        let clone = client.clone();
        let first = mod_revision(etcd.get(KEY, None).await.unwrap());
        let until = Instant::now() + Duration::from_secs(10);
        while mod_revision(etcd.get(KEY, None).await.unwrap()) == first {
            assert!(Instant::now() < until, "no cycle ran");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if close {
            clone.close().await;
            assert!(!client.auto_compacting());
            drop(client);
        } else {
            drop(client);
            assert!(clone.auto_compacting(), "a clone keeps it running");
            drop(clone);
        }
        // A cycle in flight may still land right after.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stopped_at = mod_revision(etcd.get(KEY, None).await.unwrap());
        tokio::time::sleep(interval * 6).await;
        assert_eq!(
            mod_revision(etcd.get(KEY, None).await.unwrap()),
            stopped_at,
            "cycles went on after {}",
            if close { "close" } else { "the last drop" }
        );
    }
    writer.abort();
}

/// Log lines written through the global subscriber of this test binary.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A user confined to its namespace by RBAC is refused the coordinating
/// key: its client logs that once and carries on producing and consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refused_by_rbac_logs_once_and_carries_on() {
    let logs = captured_logs();
    let cluster = EtcdCluster::start(1);
    let ep = cluster.endpoint(0);
    etcdctl_ok(&ep, &["user", "add", "root:root-secret"]);
    etcdctl_ok(&ep, &["role", "add", "app1"]);
    etcdctl_ok(
        &ep,
        &[
            "role",
            "grant-permission",
            "app1",
            "--prefix=true",
            "readwrite",
            "app1/",
        ],
    );
    etcdctl_ok(&ep, &["user", "add", "alice:alice-secret"]);
    etcdctl_ok(&ep, &["user", "grant-role", "alice", "app1"]);
    etcdctl_ok(&ep, &["auth", "enable"]);

    let interval = Duration::from_millis(300);
    let alice = Client::builder([ep.clone()])
        .namespace("app1")
        .user("alice", "alice-secret")
        .auto_compaction(every(interval))
        .connect()
        .await
        .unwrap();
    alice.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = alice.producer("t").build().await.unwrap();
    let mut reader = alice
        .assign("t", [(0, StartOffset::Earliest)])
        .await
        .unwrap();
    // Many intervals, producing and reading all along.
    for i in 0..40u64 {
        let offset = producer
            .send(Record::new(i.to_string()))
            .await
            .unwrap()
            .offset;
        assert_eq!(offset, i);
        let m = within(Duration::from_secs(10), reader.recv()).await;
        assert_eq!(m.offset, i);
        tokio::time::sleep(interval / 4).await;
    }
    let status = alice.history_status().await.unwrap();
    assert!(status.last_cycle.is_none());
    assert!(
        status
            .last_cycle_error
            .as_deref()
            .is_some_and(|e| e.contains("permission denied")),
        "{status:?}"
    );
    assert!(alice.auto_compacting(), "refused, but still running");
    producer.close().await.unwrap();
    reader.close().await;
    alice.close().await;

    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let refusals = text
        .lines()
        .filter(|l| l.contains("refused automatic history compaction") && l.contains("app1"))
        .count();
    assert_eq!(refusals, 1, "{text}");
    // Nothing was written outside the namespace.
    let mut root = etcd_client::Client::connect(
        [ep],
        Some(etcd_client::ConnectOptions::new().with_user("root", "root-secret")),
    )
    .await
    .unwrap();
    assert_eq!(root.get(KEY, None).await.unwrap().count(), 0);
}
