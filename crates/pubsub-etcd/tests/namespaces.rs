//! Namespaces never see or touch each other's keys, whatever their names,
//! against a real etcd (`PUBSUB_ETCD_ENDPOINTS`).

mod common;

use std::collections::BTreeMap;

use common::ns::{endpoints, Namespace};
use pubsub_etcd::{Client, Error, NewTopic, Record};

/// Names that nest inside a namespace's layout were accepted once: with
/// `x` and `x/data/foo`, deleting topic `foo` of `x` deleted every key of
/// the other namespace.
#[tokio::test]
async fn nesting_namespaces_are_refused() {
    let base = Namespace::new();
    for nested in [
        format!("{}/data/foo", base.name()),
        format!("{}/groups/t", base.name()),
        format!("{}/topics", base.name()),
    ] {
        let err = Client::builder(endpoints())
            .namespace(&nested)
            .connect()
            .await
            .expect_err("a namespace with '/' inside is refused");
        assert!(
            matches!(&err, Error::InvalidNamespace { namespace, .. } if *namespace == nested),
            "{nested}: {err}"
        );
    }
}

/// Neighbouring namespaces (sharing a prefix, or named like the layout's
/// own segments) each create, write, commit, list and delete the same
/// topic and group names; every other namespace keeps all its data.
#[tokio::test]
async fn neighbouring_namespaces_are_isolated() {
    let base = Namespace::new();
    let spaces: Vec<Namespace> = ["", "-", ".data", "_topics", "-groups", "x"]
        .iter()
        .map(|suffix| Namespace::named(format!("{}{suffix}", base.name())))
        .chain([Namespace::named(format!("/{}", base.name()))])
        .collect();
    let mut clients = Vec::new();
    for ns in &spaces {
        let client = ns.connect().await;
        for topic in ["data", "foo", "groups"] {
            client.create_topic(NewTopic::new(topic, 2)).await.unwrap();
            let producer = client.producer(topic).build().await.unwrap();
            producer
                .send(Record::new(ns.name().to_string()).partition(0))
                .await
                .unwrap();
            producer.close().await.unwrap();
            client
                .commit_offsets_unowned(topic, "g", &BTreeMap::from([(0, 1)]))
                .await
                .unwrap();
        }
        clients.push(client);
    }

    for (i, client) in clients.iter().enumerate() {
        client.delete_group("g").await.unwrap();
        client.delete_topic("data").await.unwrap();
        for (j, other) in clients.iter().enumerate().filter(|(j, _)| *j > i) {
            let names: Vec<String> = other
                .list_topics()
                .await
                .unwrap()
                .into_iter()
                .map(|t| t.name)
                .collect();
            assert_eq!(
                names,
                ["data", "foo", "groups"],
                "namespace {j} after {i} deleted"
            );
            for topic in ["data", "foo", "groups"] {
                let fetched = other.fetch(topic, 0, 0, 10).await.unwrap();
                assert_eq!(fetched.messages.len(), 1, "{topic} of namespace {j}");
                assert_eq!(fetched.messages[0].value, spaces[j].name().as_bytes());
                let offsets = other.committed_offsets(topic, "g").await.unwrap();
                assert_eq!(
                    offsets,
                    BTreeMap::from([(0, 1)]),
                    "{topic} of namespace {j}"
                );
            }
        }
        let names: Vec<String> = client
            .list_topics()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["foo", "groups"]);
    }
}
