//! Consumer groups against a real etcd: balance, delivery, order, commits,
//! handover, fencing and compaction. Members that must die or freeze run in
//! separate processes (this test binary re-executed as a child).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::group::{member, send_all, within, TTL};
use common::ns::Namespace;
use pubsub_etcd::{telemetry, AutoCommit, Consumer, Event, NewTopic, Record, StartOffset};
use tokio::time::{timeout, Instant};

/// Polls `consumer` (so rebalance events are acknowledged) until `done`
/// holds or the deadline passes; returns the messages seen meanwhile.
async fn pump_until(
    consumers: &mut [&mut Consumer],
    deadline: Duration,
    done: impl Fn(&[&mut Consumer]) -> bool,
) -> Vec<pubsub_etcd::Message> {
    let until = Instant::now() + deadline;
    let mut seen = Vec::new();
    while Instant::now() < until {
        if done(consumers) {
            return seen;
        }
        for c in consumers.iter_mut() {
            if let Ok(Some(Ok(Event::Message(m)))) =
                timeout(Duration::from_millis(20), c.next_event()).await
            {
                seen.push(m);
            }
        }
    }
    assert!(done(consumers), "condition not reached within {deadline:?}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_settle_at_four_each() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 12)).await.unwrap();
    let mut a = member(&client, "t", "g").await;
    let mut b = member(&client, "t", "g").await;
    let mut c = member(&client, "t", "g").await;
    pump_until(
        &mut [&mut a, &mut b, &mut c],
        Duration::from_secs(20),
        |cs| cs.iter().all(|c| c.assignment().len() == 4),
    )
    .await;
    let mut all: Vec<u32> = [&a, &b, &c].iter().flat_map(|c| c.assignment()).collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..12).collect::<Vec<_>>(),
        "every partition owned exactly once"
    );
    // Graceful close hands partitions over in well under a second.
    c.close().await.unwrap();
    let start = Instant::now();
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(5), |cs| {
        cs.iter().all(|c| c.assignment().len() == 6)
    })
    .await;
    let handover = start.elapsed();
    eprintln!("graceful handover of 4 partitions: {handover:?}");
    assert!(
        handover < Duration::from_secs(1),
        "handover took {handover:?}"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_delivers_everything_in_order_and_resumes_after_commit() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 4)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    // Produced before anyone subscribed: Earliest must still see them.
    let early: Vec<_> = (0..200)
        .map(|i| Record::new(format!("{i}")).key(format!("k{}", i % 10)))
        .collect();
    send_all(&producer, early).await;
    let mut consumer = member(&client, "t", "g").await;
    let sender = {
        let producer = producer.clone();
        tokio::spawn(async move {
            for i in 200..1000 {
                producer
                    .send(Record::new(format!("{i}")).key(format!("k{}", i % 10)))
                    .await
                    .unwrap();
            }
        })
    };
    let mut per_partition: HashMap<u32, Vec<u64>> = HashMap::new();
    let mut values = Vec::new();
    let mut last = None;
    while values.len() < 1000 {
        let m = within(Duration::from_secs(20), consumer.recv()).await;
        per_partition.entry(m.partition).or_default().push(m.offset);
        values.push(
            String::from_utf8(m.value.to_vec())
                .unwrap()
                .parse::<u32>()
                .unwrap(),
        );
        last = Some(m);
    }
    sender.await.unwrap();
    for (p, offsets) in &per_partition {
        assert!(
            offsets.windows(2).all(|w| w[1] == w[0] + 1),
            "partition {p} out of order or gapped"
        );
        assert_eq!(offsets[0], 0);
    }
    values.sort_unstable();
    assert_eq!(values, (0..1000).collect::<Vec<_>>());
    // Commit everything delivered, leave, and a new member resumes after it.
    consumer.commit_delivered().await.unwrap();
    let lag = consumer.lag().await.unwrap();
    assert!(lag.iter().all(|l| l.lag == 0), "{lag:?}");
    consumer.close().await.unwrap();
    assert!(last.is_some());
    producer
        .send(Record::new("after").partition(0))
        .await
        .unwrap();
    let mut again = member(&client, "t", "g").await;
    let m = within(Duration::from_secs(10), again.recv()).await;
    assert_eq!(
        m.value.as_ref(),
        b"after",
        "resumed right after the last commit"
    );
    again.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_for_a_partition_not_owned_is_refused() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let mut a = member(&client, "t", "g").await;
    let mut b = member(&client, "t", "g").await;
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(20), |cs| {
        cs.iter().all(|c| c.assignment().len() == 1)
    })
    .await;
    let theirs = b.assignment()[0];
    let err = a
        .commit_offsets(&BTreeMap::from([(theirs, 5)]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, pubsub_etcd::Error::NotOwner { partition, .. } if partition == theirs),
        "{err}"
    );
    assert!(client.committed_offsets("t", "g").await.unwrap().is_empty());
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_offsets_and_manual_assignment() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(
        &producer,
        (0..10).map(|i| Record::new(format!("{i}")).timestamp(1000 + i)),
    )
    .await;
    let mut reader = client
        .assign("t", [(0, StartOffset::Offset(7))])
        .await
        .unwrap();
    let m = within(Duration::from_secs(5), reader.recv()).await;
    assert_eq!(m.offset, 7);
    reader.close().await;
    let mut reader = client
        .assign("t", [(0, StartOffset::Timestamp(1004))])
        .await
        .unwrap();
    let m = within(Duration::from_secs(5), reader.recv()).await;
    assert_eq!(m.offset, 4);
    reader.close().await;
    let mut latest = client
        .consumer("t", "late")
        .start_offset(StartOffset::Latest)
        .session_ttl(TTL)
        .join()
        .await
        .unwrap();
    // Wait until it owns the partition before producing.
    pump_until(&mut [&mut latest], Duration::from_secs(10), |cs| {
        cs[0].assignment() == vec![0]
    })
    .await;
    producer.send(Record::new("new")).await.unwrap();
    let m = within(Duration::from_secs(5), latest.recv()).await;
    assert_eq!((m.offset, m.value.as_ref()), (10, b"new".as_ref()));
    latest.close().await.unwrap();
    // Admin reset moves the group's committed offsets.
    let reset = client
        .reset_offsets("t", "late", StartOffset::Offset(3))
        .await
        .unwrap();
    assert_eq!(reset, BTreeMap::from([(0, 3)]));
    let lag = client.group_lag("t", "late").await.unwrap();
    assert_eq!(
        (lag[0].committed, lag[0].next, lag[0].lag),
        (Some(3), 11, 8)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscription_per_partition() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 3)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(
        &producer,
        (0..30u32).map(|i| Record::new(format!("{i}")).partition(i % 3)),
    )
    .await;
    let mut partitioned = member(&client, "t", "g").await.into_partitioned(4);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let mut sub = timeout(Duration::from_secs(10), partitioned.next_subscription())
            .await
            .unwrap()
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            while offsets.len() < 10 {
                let m = sub.recv().await.unwrap().unwrap();
                assert_eq!(m.partition, sub.partition);
                offsets.push(m.offset);
                sub.commit(&m).await.unwrap();
            }
            (sub.partition, offsets)
        }));
    }
    let mut seen = Vec::new();
    for task in tasks {
        let (partition, offsets) = task.await.unwrap();
        assert_eq!(offsets, (0..10).collect::<Vec<u64>>());
        seen.push(partition);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2]);
    partitioned.close().await.unwrap();
    let committed = client.committed_offsets("t", "g").await.unwrap();
    assert_eq!(committed, BTreeMap::from([(0, 10), (1, 10), (2, 10)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_events_reach_the_application_in_order() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let mut a = member(&client, "t", "g").await;
    let event = within(Duration::from_secs(10), a.next_event()).await;
    assert_eq!(event, Event::Assigned(vec![0, 1]));
    let mut b = member(&client, "t", "g").await;
    // `a` is told before it loses a partition, and only then does `b` get it.
    let revoked = match within(Duration::from_secs(10), a.next_event()).await {
        Event::Revoking(ps) => ps,
        other => panic!("expected Revoking, got {other:?}"),
    };
    assert_eq!(revoked.len(), 1);
    assert_eq!(
        a.assignment().len(),
        2,
        "still owned until the application comes back"
    );
    // Coming back for the next event acknowledges the revocation.
    let _ = timeout(Duration::from_millis(300), a.next_event()).await;
    let event = within(Duration::from_secs(10), b.next_event()).await;
    assert_eq!(event, Event::Assigned(revoked.clone()));
    assert!(!a.assignment().contains(&revoked[0]));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_commit_policies_and_seek() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(&producer, (0..10).map(|i| Record::new(format!("{i}")))).await;
    // EveryMessage: taking message n+1 commits message n.
    let mut every = client
        .consumer("t", "every")
        .session_ttl(TTL)
        .auto_commit(AutoCommit::EveryMessage)
        .join()
        .await
        .unwrap();
    for _ in 0..4 {
        within(Duration::from_secs(5), every.recv()).await;
    }
    assert_eq!(
        client.committed_offsets("t", "every").await.unwrap(),
        BTreeMap::from([(0, 3)])
    );
    // Seek back: the next message is offset 1 again.
    every.seek(0, 1).await.unwrap();
    let m = within(Duration::from_secs(5), every.recv()).await;
    assert_eq!(m.offset, 1);
    every.close().await.unwrap();
    assert_eq!(
        client.committed_offsets("t", "every").await.unwrap(),
        BTreeMap::from([(0, 2)])
    );

    // Interval: commits on its own while the member runs.
    let mut interval = client
        .consumer("t", "interval")
        .session_ttl(TTL)
        .auto_commit(AutoCommit::Interval(Duration::from_millis(200)))
        .join()
        .await
        .unwrap();
    for _ in 0..10 {
        within(Duration::from_secs(5), interval.recv()).await;
    }
    let until = Instant::now() + Duration::from_secs(5);
    while client.committed_offsets("t", "interval").await.unwrap() != BTreeMap::from([(0, 10)]) {
        assert!(
            Instant::now() < until,
            "interval auto-commit never committed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Dropped without close: it still leaves, so a new member gets the
    // partition well before the TTL would expire.
    drop(interval);
    let mut next = member(&client, "t", "interval").await;
    pump_until(&mut [&mut next], TTL, |cs| cs[0].assignment() == vec![0]).await;
    next.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_read_under_a_lost_claim_cannot_be_committed() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(&producer, (0..100).map(|i| Record::new(format!("{i}")))).await;
    let mut consumer = member(&client, "t", "g").await;
    let mut held = None;
    while held.is_none() {
        if let Event::Message(m) = within(Duration::from_secs(10), consumer.next_event()).await {
            held = Some(m);
        }
    }
    let held = held.unwrap();
    // Revoke the member's lease behind its back, as an expiry would.
    let mut etcd = client.etcd().clone();
    let members = etcd
        .get(
            format!("{}/groups/t/g/members/", ns.name()),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    etcd.lease_revoke(members.kvs()[0].lease()).await.unwrap();
    // It reports the loss, then claims the partition again.
    let mut saw_lost = false;
    loop {
        match within(Duration::from_secs(10), consumer.next_event()).await {
            Event::Lost(ps) => {
                assert_eq!(ps, vec![0]);
                saw_lost = true;
            }
            Event::Assigned(ps) if saw_lost => {
                assert_eq!(ps, vec![0]);
                break;
            }
            _ => {}
        }
    }
    let err = consumer.commit(&held).await.unwrap_err();
    assert!(
        matches!(err, pubsub_etcd::Error::NotOwner { partition: 0, .. }),
        "{err}"
    );
    assert!(client.committed_offsets("t", "g").await.unwrap().is_empty());
    consumer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_committed_offset_does_not_stall_the_partition() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(
        &producer,
        (0..20u32).map(|i| Record::new(format!("{i}")).partition(i % 2)),
    )
    .await;
    client
        .etcd()
        .clone()
        .put(
            format!("{}/groups/t/g/offsets/00001", ns.name()),
            "garbage",
            None,
        )
        .await
        .unwrap();
    let mut consumer = member(&client, "t", "g").await;
    let mut seen = 0;
    while seen < 20 {
        timeout(Duration::from_secs(10), consumer.recv())
            .await
            .expect("a partition stalled")
            .unwrap()
            .unwrap();
        seen += 1;
    }
    assert_eq!(consumer.assignment(), vec![0, 1]);
    consumer.close().await.unwrap();
}

#[tokio::test]
async fn out_of_range_consumer_settings_are_refused() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let builders = [
        client.consumer("t", "g").buffer(usize::MAX),
        client.consumer("t", "g").fetch_messages(0),
        client.consumer("t", "g").max_fetches_in_flight(0),
        client.consumer("t", "g").max_fetches_in_flight(1025),
        client.consumer("t", "g").session_ttl(Duration::MAX),
        client
            .consumer("t", "g")
            .session_ttl(Duration::from_secs(1)),
        client
            .consumer("t", "g")
            .auto_commit(AutoCommit::Interval(Duration::MAX)),
    ];
    for builder in builders {
        match builder.join().await {
            Err(pubsub_etcd::Error::InvalidConfig(text)) => assert!(!text.is_empty()),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_batch_is_reported_and_skipped() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    let topic = client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    for i in 0..3 {
        // Three separate batches: offsets 0, 1, 2.
        producer.send(Record::new(format!("{i}"))).await.unwrap();
    }
    // Damage the middle batch (offset 1) as a buggy writer might.
    client
        .etcd()
        .clone()
        .put(
            format!(
                "{}/data/t/{}/00000/b/{:020}",
                ns.name(),
                topic.incarnation,
                1
            ),
            vec![0x01, 0xff, 0xff],
            None,
        )
        .await
        .unwrap();
    let mut consumer = member(&client, "t", "g").await;
    let mut offsets = Vec::new();
    let mut corrupt = 0;
    while offsets.len() < 2 {
        match timeout(Duration::from_secs(10), consumer.recv())
            .await
            .expect("the partition stalled on the corrupt batch")
            .unwrap()
        {
            Ok(m) => offsets.push(m.offset),
            Err(pubsub_etcd::Error::Corrupt { key, .. }) => {
                assert!(key.ends_with(&format!("{:020}", 1)), "{key}");
                corrupt += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(offsets, vec![0, 2]);
    assert_eq!(corrupt, 1);
    consumer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_a_revoked_partition_is_delivered_after_the_revocation() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(
        &producer,
        (0..400u32).map(|i| Record::new(format!("{i}")).partition(i % 2)),
    )
    .await;
    let mut a = member(&client, "t", "g").await;
    let event = within(Duration::from_secs(10), a.next_event()).await;
    assert_eq!(event, Event::Assigned(vec![0, 1]));
    // Let both partitions' messages queue up, then make `a` give one away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b = member(&client, "t", "g").await;
    let mut revoked: Vec<u32> = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until && b.assignment().is_empty() {
        match timeout(Duration::from_millis(50), a.next_event()).await {
            Ok(Some(Ok(Event::Message(m)))) => {
                assert!(
                    !revoked.contains(&m.partition),
                    "offset {} of revoked partition {} delivered",
                    m.offset,
                    m.partition
                );
                // Every message handed out can be committed by its member.
                a.commit(&m).await.unwrap();
            }
            Ok(Some(Ok(Event::Revoking(ps)))) => revoked = ps,
            Ok(Some(Ok(_))) | Err(_) => {}
            other => panic!("unexpected {other:?}"),
        }
        let _ = timeout(Duration::from_millis(1), b.next_event()).await;
    }
    assert_eq!(revoked.len(), 1, "no revocation seen");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Issue 8, item 2: an application that holds delivered messages and does
/// not come back for the next event (blocked, e.g. on its output) keeps
/// its partitions however long that takes, so two live members never
/// deliver one partition at once; once it acknowledges, the partition
/// moves, and the messages it held can no longer be committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_partition_moves_only_after_the_application_acknowledges() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(
        &producer,
        (0..2u32).map(|i| Record::new(format!("{i}")).partition(i)),
    )
    .await;
    let mut a = member(&client, "t", "g").await;
    let mut held = BTreeMap::new();
    while held.len() < 2 {
        if let Event::Message(m) = within(Duration::from_secs(10), a.next_event()).await {
            held.insert(m.partition, m);
        }
    }
    // `a` now stalls with both messages in hand, for well over the TTL.
    let mut b = member(&client, "t", "g").await;
    let until = Instant::now() + 3 * TTL;
    while Instant::now() < until {
        if let Ok(Some(event)) = timeout(Duration::from_millis(100), b.next_event()).await {
            panic!("b got {event:?} while a still held its partitions");
        }
    }
    assert!(b.assignment().is_empty());
    assert_eq!(a.assignment(), vec![0, 1]);
    let revoked = match within(Duration::from_secs(5), a.next_event()).await {
        Event::Revoking(ps) => ps,
        other => panic!("expected Revoking, got {other:?}"),
    };
    assert_eq!(revoked.len(), 1);
    // Acknowledged by coming back; then `b` gets the partition.
    let _ = timeout(Duration::from_millis(300), a.next_event()).await;
    let event = within(Duration::from_secs(10), b.next_event()).await;
    assert_eq!(event, Event::Assigned(revoked.clone()));
    let err = a.commit(&held[&revoked[0]]).await.unwrap_err();
    assert!(matches!(err, pubsub_etcd::Error::NotOwner { .. }), "{err}");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Issue 8, item 9: member and owner keys without a lease (left by hand or
/// by a tool) belong to no live member: they must neither take a share of
/// the partitions nor keep one from being claimed, and `delete_group`
/// removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_without_a_lease_do_not_stall_the_group() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 5)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(
        &producer,
        (0..25u32).map(|i| Record::new(format!("{i}")).partition(i % 5)),
    )
    .await;
    let mut etcd = client.etcd().clone();
    let group = format!("{}/groups/t/g", ns.name());
    etcd.put(format!("{group}/members/aaa-ghost"), "{}", None)
        .await
        .unwrap();
    etcd.put(format!("{group}/owners/00000"), "ghost", None)
        .await
        .unwrap();
    let mut consumer = member(&client, "t", "g").await;
    let mut seen = 0;
    while seen < 25 {
        timeout(Duration::from_secs(10), consumer.recv())
            .await
            .expect("partitions stalled behind keys without a lease")
            .unwrap()
            .unwrap();
        seen += 1;
    }
    assert_eq!(consumer.assignment(), vec![0, 1, 2, 3, 4]);
    consumer.commit_delivered().await.unwrap();
    consumer.close().await.unwrap();
    client.delete_group("g").await.unwrap();
    let left = etcd
        .get(
            format!("{group}/"),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    assert!(left.kvs().is_empty(), "{:?}", left.kvs());
}

/// Issue 8, item 10: a committed offset past the end of the partition (no
/// member could have made it) is ignored with a warning, as an unreadable
/// one is: the group reads from its start policy instead of skipping
/// everything produced until the end reaches it, and its lag says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_offset_past_the_end_is_ignored() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(&producer, (0..5).map(|i| Record::new(format!("{i}")))).await;
    client
        .etcd()
        .clone()
        .put(
            format!("{}/groups/t/g/offsets/00000", ns.name()),
            u64::MAX.to_string(),
            None,
        )
        .await
        .unwrap();
    let lag = client.group_lag("t", "g").await.unwrap();
    assert_eq!((lag[0].committed, lag[0].lag), (None, 5), "{lag:?}");
    let mut consumer = member(&client, "t", "g").await;
    let first = within(Duration::from_secs(10), consumer.recv()).await;
    assert_eq!(first.offset, 0);
    producer.send(Record::new("later")).await.unwrap();
    let mut last = first;
    while last.offset < 5 {
        last = within(Duration::from_secs(10), consumer.recv()).await;
    }
    assert_eq!(last.value.as_ref(), b"later");
    consumer.commit(&last).await.unwrap();
    assert_eq!(
        client.committed_offsets("t", "g").await.unwrap(),
        BTreeMap::from([(0, 6)])
    );
    consumer.close().await.unwrap();
}

/// A `Revoking` the application reads only after its member lost the
/// partitions and claimed them again revokes nothing: the new claims go
/// on delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_revocation_does_not_revoke_a_new_claim() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let mut a = member(&client, "t", "g").await;
    let event = within(Duration::from_secs(10), a.next_event()).await;
    assert_eq!(event, Event::Assigned(vec![0, 1]));
    // `b` makes `a` revoke a partition; `a` does not read the notice yet.
    let b = member(&client, "t", "g").await;
    let mut etcd = client.etcd().clone();
    let members = format!("{}/groups/t/g/members/", ns.name());
    let lease_of = |id: String| {
        let mut etcd = etcd.clone();
        let key = format!("{members}{id}");
        async move { etcd.get(key, None).await.unwrap().kvs()[0].lease() }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.close().await.unwrap();
    // Then `a` loses its lease behind its back and claims both again.
    etcd.lease_revoke(lease_of(a.member_id().to_string()).await)
        .await
        .unwrap();
    let mut events = Vec::new();
    while !matches!(events.last(), Some(Event::Assigned(_))) {
        events.push(within(Duration::from_secs(10), a.next_event()).await);
    }
    assert!(
        matches!(events[0], Event::Revoking(_)),
        "expected the stale revocation first: {events:?}"
    );
    let until = Instant::now() + Duration::from_secs(10);
    while a.assignment() != vec![0, 1] {
        assert!(Instant::now() < until, "not claimed again: {events:?}");
        let _ = timeout(Duration::from_millis(50), a.next_event()).await;
    }
    send_all(
        &producer,
        (0..2u32).map(|i| Record::new(format!("{i}")).partition(i)),
    )
    .await;
    let mut partitions = Vec::new();
    while partitions.len() < 2 {
        match timeout(Duration::from_secs(10), a.next_event()).await {
            Ok(Some(Ok(Event::Message(m)))) => partitions.push(m.partition),
            Ok(Some(Ok(_))) => {}
            other => panic!("a partition stalled after the stale revocation: {other:?}"),
        }
    }
    partitions.sort_unstable();
    assert_eq!(partitions, vec![0, 1]);
    a.close().await.unwrap();
}

/// Issue 8, item 4: claiming many partitions takes a while; `assignment()`
/// never shows a part of a claim pass, which once looked "caught up" to a
/// caller waiting for the end of what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_never_shows_a_partly_claimed_share() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1024)).await.unwrap();
    let consumer = member(&client, "t", "g").await;
    let until = Instant::now() + Duration::from_secs(60);
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let now = consumer.assignment().len();
        seen.insert(now);
        if now == 1024 {
            break;
        }
        assert!(Instant::now() < until, "never assigned all: {seen:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        seen,
        std::collections::BTreeSet::from([0, 1024]),
        "partial assignments seen"
    );
    consumer.close().await.unwrap();
}

/// Issue 8, item 1 (the monotonicity rule): a member that seeks back past
/// the offset the partition's previous owner committed may read again,
/// but its commits there are refused, so the group's offset never moves
/// backwards past another owner's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_never_goes_below_the_previous_owners_commit() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(&producer, (0..10).map(|i| Record::new(format!("{i}")))).await;
    let mut first = member(&client, "t", "g").await;
    let mut last = within(Duration::from_secs(10), first.recv()).await;
    while last.offset < 9 {
        last = within(Duration::from_secs(10), first.recv()).await;
    }
    first.commit(&last).await.unwrap();
    first.close().await.unwrap();
    let mut second = member(&client, "t", "g").await;
    pump_until(&mut [&mut second], Duration::from_secs(10), |cs| {
        cs[0].assignment() == vec![0]
    })
    .await;
    second.seek(0, 2).await.unwrap();
    let again = within(Duration::from_secs(10), second.recv()).await;
    assert_eq!(again.offset, 2);
    let err = second.commit(&again).await.unwrap_err();
    assert!(
        matches!(
            err,
            pubsub_etcd::Error::CommitBehind {
                partition: 0,
                offset: 3,
                committed: 10,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        client.committed_offsets("t", "g").await.unwrap(),
        BTreeMap::from([(0, 10)])
    );
    second.close().await.unwrap();
}

/// Issue 8, item 2, for subscriptions: a revoked partition moves only once
/// its subscriber has taken every message routed to it, however long that
/// takes (it used to move after 5 s with the messages still in hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_subscription_is_released_only_once_drained() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    let mut a = member(&client, "t", "g").await.into_partitioned(16);
    let mut subscriptions = HashMap::new();
    while subscriptions.len() < 2 {
        let sub = timeout(Duration::from_secs(10), a.next_subscription())
            .await
            .unwrap()
            .unwrap();
        subscriptions.insert(sub.partition, sub);
    }
    send_all(
        &producer,
        (0..10u32).map(|i| Record::new(format!("{i}")).partition(i % 2)),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut b = member(&client, "t", "g").await;
    let until = Instant::now() + 3 * TTL;
    while Instant::now() < until {
        if let Ok(Some(event)) = timeout(Duration::from_millis(100), b.next_event()).await {
            panic!("b got {event:?} while a's subscriber still held messages");
        }
    }
    for sub in subscriptions.values_mut() {
        for _ in 0..5 {
            within(Duration::from_secs(5), sub.recv()).await;
        }
    }
    let event = within(Duration::from_secs(10), b.next_event()).await;
    assert!(
        matches!(event, Event::Assigned(ref ps) if ps.len() == 1),
        "{event:?}"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Counts [`telemetry::MEMBERSHIP_EVENTS`] per label set, for this binary:
/// the only way to see what woke a member's balancing loop from outside.
#[derive(Default)]
struct MembershipEvents(std::sync::Mutex<HashMap<metrics::Key, Arc<AtomicU64>>>);

impl MembershipEvents {
    fn installed() -> &'static MembershipEvents {
        static COUNTS: OnceLock<&'static MembershipEvents> = OnceLock::new();
        COUNTS.get_or_init(|| {
            let counts: &'static MembershipEvents = Box::leak(Box::default());
            metrics::set_global_recorder(counts).expect("no other recorder in this binary");
            counts
        })
    }

    /// Events received so far by the members of `group`.
    fn of(&self, group: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(key, _)| {
                key.labels()
                    .any(|l| l.key() == "group" && l.value() == group)
            })
            .map(|(_, count)| count.load(Ordering::Relaxed))
            .sum()
    }
}

impl metrics::Recorder for MembershipEvents {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() != telemetry::MEMBERSHIP_EVENTS {
            return metrics::Counter::noop();
        }
        let count = self
            .0
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        metrics::Counter::from_arc(count)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// Commits must not wake the group: a member's balancing loop watches
/// membership and ownership only, so 8 members committing every message
/// add no watch events at all (before the fix: one per member per commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_do_not_wake_the_members() {
    const MEMBERS: usize = 8;
    const PER_PARTITION: u64 = 10;
    let counts = MembershipEvents::installed();
    let ns = Namespace::new();
    // The counter's labels are topic and group, not the namespace.
    let group = format!("quiet-{}", ns.name());
    let client = ns.connect().await;
    client
        .create_topic(NewTopic::new("t", MEMBERS as u32))
        .await
        .unwrap();
    let mut members = Vec::new();
    for _ in 0..MEMBERS {
        members.push(member(&client, "t", &group).await);
    }
    pump_until(
        &mut members.iter_mut().collect::<Vec<_>>(),
        Duration::from_secs(30),
        |cs| cs.iter().all(|c| c.assignment().len() == 1),
    )
    .await;
    // The last claims' events may still be on their way to the others.
    let quiet = Instant::now() + Duration::from_secs(2);
    while Instant::now() < quiet {
        for c in members.iter_mut() {
            let _ = timeout(Duration::from_millis(20), c.next_event()).await;
        }
    }
    let settled = counts.of(&group);
    assert!(settled > 0, "the joins themselves were seen");

    let producer = client.producer("t").build().await.unwrap();
    send_all(
        &producer,
        (0..MEMBERS as u32).flat_map(|p| {
            (0..PER_PARTITION).map(move |i| Record::new(format!("{p}-{i}")).partition(p))
        }),
    )
    .await;
    let total = MEMBERS as u64 * PER_PARTITION;
    let mut committed = 0;
    let until = Instant::now() + Duration::from_secs(30);
    while committed < total {
        assert!(
            Instant::now() < until,
            "only {committed} of {total} committed"
        );
        for c in members.iter_mut() {
            if let Ok(Some(Ok(Event::Message(m)))) =
                timeout(Duration::from_millis(20), c.next_event()).await
            {
                c.commit(&m).await.unwrap();
                committed += 1;
            }
        }
    }
    // Give any event the commits caused time to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let woken = counts.of(&group) - settled;
    eprintln!(
        "{MEMBERS} members committing every message: {woken} membership watch events for \
         {total} messages ({:.2} per message)",
        woken as f64 / total as f64
    );
    assert_eq!(woken, 0, "commits woke the members' balancing loops");
    for c in members {
        c.close().await.unwrap();
    }
}

/// Issue 17: claims and releases of many partitions go in batches, and
/// ownership stays exclusive through joins and leaves: at no point do two
/// members hold one partition, and each step settles to a balanced,
/// complete assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_claims_stay_exclusive_under_churn() {
    const PARTITIONS: u32 = 256;
    let ns = Namespace::new();
    let client = ns.connect().await;
    client
        .create_topic(NewTopic::new("t", PARTITIONS))
        .await
        .unwrap();
    let mut members = vec![member(&client, "t", "g").await];
    // (join, leave index): grow to three, lose one, grow, lose the first.
    let steps: [(bool, usize); 5] = [(true, 0), (true, 0), (false, 1), (true, 0), (false, 0)];
    for (join, leave) in steps {
        if join {
            members.push(member(&client, "t", "g").await);
        } else {
            members.remove(leave).close().await.unwrap();
        }
        let n = members.len();
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            for c in members.iter_mut() {
                let _ = timeout(Duration::from_millis(10), c.next_event()).await;
            }
            let assignments: Vec<Vec<u32>> = members.iter().map(|c| c.assignment()).collect();
            let mut all: Vec<u32> = assignments.iter().flatten().copied().collect();
            all.sort_unstable();
            let owned = all.len();
            all.dedup();
            assert_eq!(all.len(), owned, "a partition owned twice: {assignments:?}");
            let low = PARTITIONS as usize / n;
            if owned == PARTITIONS as usize
                && assignments
                    .iter()
                    .all(|a| a.len() == low || a.len() == low + 1)
            {
                break;
            }
            assert!(
                Instant::now() < until,
                "{n} members never settled: {:?}",
                assignments.iter().map(Vec::len).collect::<Vec<_>>()
            );
        }
    }
    for c in members {
        c.close().await.unwrap();
    }
}

/// Issue 11, item 4: the consumer is an `Unpin` stream, and a commit handle
/// commits from another task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_handle_commits_from_a_spawned_task() {
    use futures::StreamExt;
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(&producer, (0..5).map(|i| Record::new(format!("{i}")))).await;
    let mut consumer = member(&client, "t", "g").await;
    let commits = consumer.commit_handle();
    let mut last = within(Duration::from_secs(10), consumer.next()).await;
    while last.offset < 4 {
        last = within(Duration::from_secs(10), consumer.next()).await;
    }
    let handle = commits.clone();
    tokio::spawn(async move { handle.commit(&last).await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        client.committed_offsets("t", "g").await.unwrap(),
        BTreeMap::from([(0, 5)])
    );
    consumer.close().await.unwrap();
    // A closed consumer's handle commits nothing more.
    let err = commits
        .commit_offsets(&BTreeMap::from([(0, 5)]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, pubsub_etcd::Error::NotOwner { partition: 0, .. }),
        "{err}"
    );
}

/// Issue 11, item 4: a handle keeps the consumer's fencing. Once a partition
/// moved to another member, committing a message the first member read of
/// it is refused, and the new owner's commit stays where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_handle_is_refused_once_the_partition_moved() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 2)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    for p in 0..2 {
        send_all(
            &producer,
            (0..10).map(|i| Record::new(format!("{i}")).partition(p)),
        )
        .await;
    }
    let mut a = member(&client, "t", "g").await;
    let commits = a.commit_handle();
    // `a` alone reads both partitions; it keeps message 5 of each.
    let mut held = BTreeMap::new();
    let mut seen = 0;
    while seen < 20 {
        let m = within(Duration::from_secs(10), a.recv()).await;
        seen += 1;
        if m.offset == 5 {
            held.insert(m.partition, m);
        }
    }
    let mut b = member(&client, "t", "g").await;
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(20), |cs| {
        cs.iter().all(|c| c.assignment().len() == 1)
    })
    .await;
    let (mine, theirs) = (a.assignment()[0], b.assignment()[0]);
    let mut last = within(Duration::from_secs(10), b.recv()).await;
    while last.offset < 9 {
        last = within(Duration::from_secs(10), b.recv()).await;
    }
    assert_eq!(last.partition, theirs);
    b.commit(&last).await.unwrap();
    let stale = held.remove(&theirs).unwrap();
    let err = tokio::spawn({
        let commits = commits.clone();
        async move { commits.commit(&stale).await }
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        matches!(err, pubsub_etcd::Error::NotOwner { partition, .. } if partition == theirs),
        "{err}"
    );
    // The partition `a` kept still takes its commits.
    commits.commit(&held[&mine]).await.unwrap();
    assert_eq!(
        client.committed_offsets("t", "g").await.unwrap(),
        BTreeMap::from([(mine, 6), (theirs, 10)]),
        "the moved partition's commit did not go back"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Issue 11, item 4: `next_event` is cancel-safe inside `select!`. Calls cut
/// short again and again (most of them while the auto-commit of the message
/// before is under way) lose no message, and every auto-commit lands before
/// the next message is returned (it used to be dropped with the call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_event_cut_short_in_select_loses_no_message_and_no_commit() {
    let ns = Namespace::new();
    let client = ns.connect().await;
    client.create_topic(NewTopic::new("t", 1)).await.unwrap();
    let producer = client.producer("t").build().await.unwrap();
    send_all(&producer, (0..40).map(|i| Record::new(format!("{i}")))).await;
    let mut consumer = client
        .consumer("t", "g")
        .session_ttl(TTL)
        .auto_commit(AutoCommit::EveryMessage)
        .join()
        .await
        .unwrap();
    let mut offsets = Vec::new();
    let mut cut_short = 0;
    let until = Instant::now() + Duration::from_secs(60);
    while offsets.len() < 40 {
        assert!(Instant::now() < until, "only {offsets:?} within 60 s");
        let event = tokio::select! {
            event = consumer.next_event() => event,
            _ = tokio::time::sleep(Duration::from_millis(1)) => {
                cut_short += 1;
                continue;
            }
        };
        let Event::Message(m) = event.expect("the consumer ended").unwrap() else {
            continue;
        };
        if m.offset > 0 {
            assert_eq!(
                client.committed_offsets("t", "g").await.unwrap(),
                BTreeMap::from([(0, m.offset)]),
                "the message before {} was committed before it came",
                m.offset
            );
        }
        offsets.push(m.offset);
    }
    assert_eq!(
        offsets,
        (0..40).collect::<Vec<u64>>(),
        "each message once, in order"
    );
    assert!(cut_short > 0, "no call was cut short");
    eprintln!("{cut_short} calls of next_event cut short");
    consumer.close().await.unwrap();
    assert_eq!(
        client.committed_offsets("t", "g").await.unwrap(),
        BTreeMap::from([(0, 40)])
    );
}
