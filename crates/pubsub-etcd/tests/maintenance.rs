//! etcd space maintenance (history compaction, defragmentation, NOSPACE
//! alarms) on throwaway etcd processes: compaction affects a whole etcd, so
//! these tests never run it against the shared development etcd.

mod common;

use std::time::Duration;

use common::etcd_proc::{ClusterOptions, EtcdCluster};
use pubsub_etcd::{AlarmKind, AutoCompaction, Client, Error, NewTopic, Record, StartOffset};
use tokio::time::timeout;

async fn connect(endpoints: Vec<String>) -> Client {
    Client::builder(endpoints)
        .namespace("maint")
        .request_timeout(Duration::from_secs(10))
        // These tests count revisions around on-demand compactions: no
        // background writes of the coordinating key in between.
        .auto_compaction(AutoCompaction::Disabled)
        .connect()
        .await
        .unwrap()
}

/// Compaction to the current revision plus defragmentation reclaims the
/// space of deleted messages, and a reader following the partition across
/// the compaction misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_history_and_defrag_reclaim_space() {
    let cluster = EtcdCluster::start(1);
    let client = connect(cluster.endpoints()).await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let mut reader = client
        .assign("t", [(0, StartOffset::Earliest)])
        .await
        .unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let big = vec![7u8; 200 * 1024];
    for _ in 0..20 {
        producer.send(Record::new(big.clone())).await.unwrap();
    }
    for _ in 0..20 {
        let m = timeout(Duration::from_secs(10), reader.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.value.len(), big.len());
    }
    let info = client.truncate_partition("t", 0, u64::MAX).await.unwrap();
    assert_eq!((info.earliest, info.next), (20, 20));
    // etcd's backend commits writes to its file in the background (every
    // 100 ms): wait until the reported size includes the 4 MB written, or
    // the "before" of the report below could predate them.
    let mut etcd = client.etcd().clone();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while etcd.status().await.unwrap().db_size() < 4 * 1024 * 1024 {
        assert!(
            tokio::time::Instant::now() < until,
            "etcd never grew past 4 MB"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let report = client.compact_history(true).await.unwrap();
    assert!(report.revision > 0);
    assert!(!report.already_compacted);
    assert_eq!(report.members.len(), 1, "{report:?}");
    let member = &report.members[0];
    assert!(member.defragmented, "{report:?}");
    assert_eq!(member.error, None);
    let (before, after) = (
        member.db_size_before.unwrap(),
        member.db_size_after.unwrap(),
    );
    assert!(
        after < before && after < 512 * 1024,
        "db size {before} -> {after}"
    );

    // Nothing written since: the same revision is already compacted.
    let again = client.compact_history(false).await.unwrap();
    assert!(again.already_compacted, "{again:?}");
    assert_eq!(again.revision, report.revision);

    // The reader's watch started before the compaction: it still gets new
    // messages, and offsets continue.
    let offset = producer.send(Record::new("after")).await.unwrap().offset;
    assert_eq!(offset, 20);
    let m = timeout(Duration::from_secs(10), reader.recv())
        .await
        .expect("reader follows across compaction")
        .unwrap()
        .unwrap();
    assert_eq!((m.offset, m.value.as_ref()), (20, b"after".as_ref()));
    producer.close().await.unwrap();
    reader.close().await;
}

/// On a three-member cluster every member is defragmented through its own
/// client URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_history_defragments_every_member() {
    let cluster = EtcdCluster::start(3);
    let client = connect(cluster.endpoints()).await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    for _ in 0..5 {
        producer
            .send(Record::new(vec![1u8; 100_000]))
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
    client.delete_topic("t").await.unwrap();
    let report = client.compact_history(true).await.unwrap();
    assert_eq!(report.members.len(), 3, "{report:?}");
    let mut ids: Vec<u64> = report.members.iter().map(|m| m.member_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    for m in &report.members {
        assert!(m.defragmented && m.error.is_none(), "{m:?}");
        assert!(m.db_size_after.is_some(), "{m:?}");
    }
}

/// etcd started with a small quota: producers get `QuotaExceeded`, readers
/// keep reading, a disarm without a member id does nothing (the trap), and
/// the documented recovery (delete, compact + defragment, disarm with the
/// member id) makes producing work again without reusing offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_quota_exceeded_and_recovery() {
    let cluster = EtcdCluster::start_with(ClusterOptions {
        members: 1,
        quota_backend_bytes: Some(1024 * 1024),
        ..ClusterOptions::default()
    });
    let client = connect(cluster.endpoints()).await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let mut reader = client
        .assign("t", [(0, StartOffset::Earliest)])
        .await
        .unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let value = vec![3u8; 64 * 1024];
    let mut stored = 0u64;
    let error = loop {
        match producer
            .send(Record::new(value.clone()))
            .await
            .map_err(|e| e.error)
        {
            Ok(sent) => {
                let offset = sent.offset;
                assert_eq!(offset, stored);
                stored += 1;
                assert!(stored < 200, "quota never exceeded");
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(error, Error::QuotaExceeded { .. }),
        "expected QuotaExceeded, got {error:?}"
    );
    assert!(stored > 0);

    // Readers keep reading everything stored.
    for i in 0..stored {
        let m = timeout(Duration::from_secs(10), reader.recv())
            .await
            .expect("reader keeps reading under NOSPACE")
            .unwrap()
            .unwrap();
        assert_eq!(m.offset, i);
    }
    // Fetches too (paged: a fetch returns at most 32 batches).
    let mut fetched = 0u64;
    let mut from = 0;
    while from < stored {
        let page = client.fetch("t", 0, from, 1000).await.unwrap();
        assert!(page.next_offset > from);
        fetched += page.messages.len() as u64;
        from = page.next_offset;
    }
    assert_eq!(fetched, stored);

    let alarms = client.alarms().await.unwrap();
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(alarms[0].kind, AlarmKind::NoSpace);
    let member_id = alarms[0].member_id;
    assert_ne!(member_id, 0);

    // The trap: a disarm without the member id answers OK and does nothing.
    let mut raw = client.etcd().clone();
    raw.alarm(
        etcd_client::AlarmAction::Deactivate,
        etcd_client::AlarmType::Nospace,
        None,
    )
    .await
    .unwrap();
    assert_eq!(client.alarms().await.unwrap(), alarms);

    // Recovery step 1: delete data (deletes work under the alarm).
    let info = client.truncate_partition("t", 0, u64::MAX).await.unwrap();
    assert_eq!((info.earliest, info.next), (stored, stored));
    // Still armed: writes keep failing although the keys are gone.
    let err = producer.send(Record::new("x")).await.unwrap_err().error;
    assert!(matches!(err, Error::QuotaExceeded { .. }), "{err:?}");

    // Step 2: compact and defragment.
    let report = client.compact_history(true).await.unwrap();
    let m = &report.members[0];
    assert!(m.defragmented, "{report:?}");
    assert!(
        m.db_size_after.unwrap() < m.db_size_before.unwrap(),
        "{report:?}"
    );
    // Step 3: disarm with the member id.
    assert_eq!(client.disarm_nospace().await.unwrap(), vec![member_id]);
    assert!(client.alarms().await.unwrap().is_empty());

    // Producing works again; offsets are not reused; the reader follows.
    let offset = producer.send(Record::new("back")).await.unwrap().offset;
    assert_eq!(offset, stored);
    let m = timeout(Duration::from_secs(10), reader.recv())
        .await
        .expect("reader follows after recovery")
        .unwrap()
        .unwrap();
    assert_eq!((m.offset, m.value.as_ref()), (stored, b"back".as_ref()));
    // Nothing to disarm any more.
    assert!(client.disarm_nospace().await.unwrap().is_empty());
    producer.close().await.unwrap();
    reader.close().await;
}
