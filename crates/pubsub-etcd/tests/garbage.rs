//! Garbage in etcd: topic metadata, batch keys and batch values that no
//! version of the library writes (a bad restore, a hand edit, a bug
//! elsewhere), written raw under a test namespace. Every operation must end
//! with a clear error naming the key, or skip the garbage and report it
//! once; never panic, spin, allocate without bound, or drop good data.

mod common;

use std::future::Future;
use std::time::Duration;

use pubsub_etcd::{Bytes, Client, Error, NewTopic, Record, StartOffset};

use common::ns::{self, Namespace};

/// Upper bound for any single library call here: longer means it hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `f`, failing the test if it takes longer than [`CALL_TIMEOUT`].
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {CALL_TIMEOUT:?}"))
}

/// Puts `value` at `<ns>/<suffix>` with a raw etcd connection.
async fn put_raw(client: &Client, ns: &Namespace, suffix: &str, value: impl Into<Vec<u8>>) {
    client
        .etcd()
        .kv_client()
        .put(format!("{}{suffix}", ns.prefix()), value.into(), None)
        .await
        .expect("raw put");
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
            bounded("send", producer.send(Record::new("x").partition(0))).await,
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
