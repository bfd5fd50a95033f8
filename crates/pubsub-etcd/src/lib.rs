//! pubsub-etcd: a brokerless publish/subscribe log on etcd.
//!
//! Topics are split into partitions; producers append messages, each getting
//! a contiguous `u64` offset in its partition; readers fetch by offset. etcd
//! is the only server: every client is a peer.
//!
//! # Layout
//! - `client`: connecting ([`ClientBuilder`], [`Client`]).
//! - `health`: keeps etcd members that stop answering out of rotation.
//! - `keys`: the etcd key layout, defined in this one place.
//! - `record`: [`Record`] in, [`Message`] out, and the versioned batch format.
//! - `topic`: topic naming, metadata and admin operations.
//! - `append`: the append transaction and its exactly-once retry.
//! - `producer`: batching, partitioning and back-pressure ([`Producer`]).
//! - `fetch`: reading a partition by offset ([`Client::fetch`]).
//! - `reader`: following one partition (catch up, then watch).
//! - `group`: committed offsets, lag and group admin ([`StartOffset`]).
//! - `member`: a member's lease, membership and partition balancing.
//! - `consumer`: the application side of a member ([`Consumer`]), fenced
//!   commits, and group-less [`AssignedReader`].
//! - `subscription`: one [`Subscription`] per owned partition, the Go
//!   original's shape.
//! - `maintenance`: etcd history compaction on demand, defragmentation,
//!   alarms, and the state of etcd's history and space.
//! - `compactor`: automatic history compaction in the background
//!   ([`AutoCompaction`]).
//! - `error`: the [`Error`] enum.
//!
//! DESIGN.md at the repository root documents the key layout and protocols.
#![deny(rust_2018_idioms, unsafe_code)]
#![warn(missing_debug_implementations)]
// The README's examples compile as doc tests, so they cannot rot.
#![doc = include_str!("../../../README.md")]

mod append;
mod client;
mod compactor;
mod consumer;
mod error;
mod fetch;
mod group;
mod health;
mod keys;
mod maintenance;
mod member;
mod producer;
mod reader;
mod record;
mod retention;
mod subscription;
mod topic;

pub use bytes::Bytes;
pub use client::{
    endpoints_from_env, Client, ClientBuilder, DEFAULT_ENDPOINT, DEFAULT_NAMESPACE, ENDPOINTS_ENV,
};
pub use compactor::{AutoCompaction, CompactionRecord};
pub use consumer::{AssignedReader, AutoCommit, Consumer, ConsumerBuilder, Event};
pub use error::{Error, Result};
pub use fetch::Fetched;
pub use group::{PartitionLag, StartOffset};
pub use maintenance::{Alarm, AlarmKind, CompactReport, HistoryStatus, MemberSpace, MemberStatus};
pub use producer::{
    partition_for_key, Delivery, Partitioner, Producer, ProducerBuilder, DEFAULT_MAX_BATCH_BYTES,
};
pub use record::{Message, Record, MAX_RECORDS_PER_BATCH, MAX_TTL};
pub use retention::RetentionReport;
pub use subscription::{PartitionedConsumer, Subscription};
pub use topic::{
    CleanupPolicy, NewTopic, PartitionInfo, TopicConfig, TopicDescription, TopicInfo, TopicUpdate,
    MAX_NAME_LEN, MAX_PARTITIONS,
};
