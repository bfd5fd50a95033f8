//! A brokerless publish/subscribe log on etcd.
//!
//! Topics are split into partitions. Producers append messages, and each
//! message gets a contiguous `u64` offset in its partition. Consumers in
//! named groups share a topic's partitions, commit offsets, and take over a
//! partition when its owner leaves or dies. etcd is the only server: every
//! client is a peer that reports its own state under etcd leases and cleans
//! up after itself.
//!
//! # Guarantees
//! - No acknowledged message is lost, and the order within a partition is
//!   the order of acknowledged appends.
//! - Delivery to a consumer group is at-least-once from the committed
//!   offsets; a member that lost a partition can neither commit for it nor
//!   receive more of it, and a committed offset never moves backwards.
//! - A [`Transaction`] of a group member writes its output records and its
//!   input offsets in one etcd transaction: consume, transform and produce
//!   exactly once (effects outside the output topics are not).
//! - etcd history compaction never loses a live message.
//! - A namespace's keys are never read or touched by another namespace.
//!
//! # Connect, create a topic, produce
//! Every setting of [`ClientBuilder`], [`ProducerBuilder`] and
//! [`ConsumerBuilder`] documents its default. Every call fails with
//! [`Error::Timeout`] rather than hang when etcd is away.
//!
//! ```no_run
//! use std::time::Duration;
//! use pubsub_etcd::{Client, Error, NewTopic, Record};
//!
//! # async fn demo() -> pubsub_etcd::Result<()> {
//! let client = Client::builder(["127.0.0.1:2379"])
//!     .namespace("my-app") // every key lives under my-app/
//!     .request_timeout(Duration::from_secs(10))
//!     .connect()
//!     .await?;
//!
//! match client.create_topic(NewTopic::new("orders", 3)).await {
//!     Ok(_) | Err(Error::TopicExists(_)) => {}
//!     Err(e) => return Err(e),
//! }
//!
//! let producer = client.producer("orders").build().await?;
//! // Resolves once the message is durable in etcd.
//! let sent = producer.send(Record::new("hello").key("user-42")).await?;
//! println!("stored at partition {}, offset {}", sent.partition, sent.offset);
//! let results = producer.send_batch(["a", "b", "c"].map(Record::new)).await;
//! assert_eq!(results.len(), 3);
//! producer.close().await?; // waits for everything in flight
//! # Ok(()) }
//! ```
//!
//! # Consume as a group member
//! Members of one group share the topic's partitions. A new group starts
//! from [`StartOffset::Earliest`] by default, so nothing produced before the
//! first member joined is missed.
//!
//! ```no_run
//! use pubsub_etcd::{AutoCommit, Client, Event};
//!
//! # async fn demo(client: Client) -> pubsub_etcd::Result<()> {
//! let mut consumer = client
//!     .consumer("orders", "billing")
//!     .auto_commit(AutoCommit::Disabled)
//!     .join()
//!     .await?;
//! while let Some(event) = consumer.next_event().await {
//!     match event? {
//!         Event::Message(message) => {
//!             println!("{}@{}: {:?}", message.partition, message.offset, message.value);
//!             consumer.commit(&message).await?; // the group resumes after it
//!         }
//!         other => println!("rebalance: {other:?}"),
//!     }
//! }
//! consumer.close().await // commits, hands partitions over at once, leaves
//! # }
//! ```
//!
//! [`Consumer::recv`] and the consumer as a `Stream` give messages only;
//! [`Consumer::into_partitioned`] gives one
//! [`Subscription`] per owned partition.
//!
//! # Read without a group
//! [`Client::fetch`] reads one page from an offset; [`Client::assign`]
//! follows chosen partitions from chosen positions.
//!
//! ```no_run
//! use pubsub_etcd::{Client, StartOffset};
//!
//! # async fn demo(client: Client) -> pubsub_etcd::Result<()> {
//! let page = client.fetch("orders", 0, 0, 100).await?;
//! println!("{} messages, next offset {}", page.messages.len(), page.next_offset);
//!
//! let mut reader = client.assign("orders", [(0, StartOffset::Offset(0))]).await?;
//! if let Some(message) = reader.recv().await {
//!     println!("{:?}", message?.value);
//! }
//! reader.close().await;
//! # Ok(()) }
//! ```
//!
//! # Retention, TTL and deletion
//! Topics keep messages until a limit of age, count or bytes says otherwise
//! ([`NewTopic::retention`], [`NewTopic::retention_messages`],
//! [`NewTopic::retention_bytes`]); producers enforce them, so no server
//! process is needed. [`Record::ttl`] makes a message expire on its own;
//! [`Client::delete_message`], [`Client::truncate_partition`] and key
//! compaction ([`CleanupPolicy::Compact`]) delete on demand.
//!
//! ```no_run
//! use std::time::Duration;
//! use pubsub_etcd::{Client, NewTopic, Record};
//!
//! # async fn demo(client: Client) -> pubsub_etcd::Result<()> {
//! let week = Duration::from_secs(7 * 24 * 3600);
//! client
//!     .create_topic(NewTopic::new("events", 6).retention(week).retention_messages(1_000_000))
//!     .await?;
//! let producer = client.producer("events").build().await?;
//! producer.send(Record::new("short-lived").ttl(Duration::from_secs(60))).await?;
//! client.delete_message("events", 0, 0).await?; // offsets are never reused
//! client.truncate_partition("events", 0, 1_000).await?; // drop everything before 1000
//! # Ok(()) }
//! ```
//!
//! etcd frees space only after its history is compacted and its members
//! are defragmented. The library compacts etcd's history by itself, at most
//! once per interval across all clients ([`AutoCompaction`], on by
//! default); [`Client::compact_history`] compacts and defragments on
//! demand. etcd refuses all writes
//! once its quota is exceeded: producers then get [`Error::QuotaExceeded`]
//! while readers keep reading.
//!
//! # Metrics
//! The library records rates, latencies, lag and connection state through
//! the `metrics` facade; [`telemetry`] lists every metric and shows how an
//! application exports them.
//!
//! # Errors
//! Every fallible call returns [`Error`], one `thiserror` enum whose
//! variants name what was wrong: the bad name, count, size, partition or
//! setting and its value, or the etcd key holding malformed data.
#![deny(rust_2018_idioms, unsafe_code)]
#![warn(missing_debug_implementations)]

mod append;
mod assigned;
mod builder;
mod client;
mod compactor;
mod compression;
mod consumer;
mod error;
mod fetch;
mod group;
mod health;
mod join;
mod keys;
mod maintenance;
mod offsets;
mod partition;
mod producer;
mod queue;
mod reader;
mod record;
mod retention;
mod rewrite;
mod subscription;
pub mod telemetry;
mod topic;
mod transaction;
mod watches;

pub use assigned::AssignedReader;
pub use builder::{
    endpoints_from_env, redact_endpoint, ClientBuilder, CACERT_ENV, CERT_ENV, DEFAULT_ENDPOINT,
    DEFAULT_NAMESPACE, ENDPOINTS_ENV, KEY_ENV, NAMESPACE_ENV, PASSWORD_ENV, USER_ENV,
};
pub use bytes::Bytes;
pub use client::Client;
pub use compactor::{AutoCompaction, CompactionRecord};
pub use compression::{Compression, DEFAULT_ZSTD_LEVEL, MAX_DECODED_RECORDS_BYTES};
pub use consumer::{CommitHandle, Consumer};
pub use error::{Error, EtcdError, Result};
pub use fetch::Fetched;
pub use group::{AutoCommit, Event, PartitionLag, StartOffset};
pub use join::ConsumerBuilder;
pub use maintenance::{Alarm, AlarmKind, CompactReport, HistoryStatus, MemberSpace, MemberStatus};
pub use offsets::{PartitionInfo, TopicDescription};
pub use producer::{
    partition_for_key, Delivery, Partitioner, Producer, ProducerBuilder, RecordMetadata, SendError,
    DEFAULT_MAX_BATCH_BYTES,
};
pub use queue::{Job, QueueConsumer, QueueConsumerBuilder, QueueReset, QueueStats};
pub use record::{Message, Record, MAX_RECORDS_PER_BATCH, MAX_TTL};
pub use retention::RetentionReport;
pub use subscription::{PartitionedConsumer, Subscription};
pub use topic::{CleanupPolicy, NewTopic, TopicConfig, TopicInfo, MAX_NAME_LEN, MAX_PARTITIONS};
pub use transaction::Transaction;
