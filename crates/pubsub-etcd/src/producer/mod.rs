//! Producing: the [`Producer`] that partitions records, coalesces concurrent
//! sends into shared transactions, and reports where each record landed.
//!
//! Each partition being written has one worker task with a bounded queue.
//! The worker takes every record queued so far (waiting up to `linger` for
//! more), appends them as one batch (one transaction, see `append`), and
//! answers each sender. While a transaction is in flight the queue fills, so
//! batches grow with load. A byte semaphore bounds the memory of all queued
//! records: when it is exhausted, senders wait (back-pressure); nothing is
//! dropped.
//!
//! A worker ends once it has had nothing to do for `worker_idle_timeout`, so
//! the producer's memory follows the partitions written lately, not the
//! partition count. It ends only when no record is queued for it nor being
//! handed to it (checked under the workers lock, which every hand-over takes),
//! so nothing is lost and a partition's records never have two workers at
//! once, which keeps their order. Each worker appends under a random
//! producer id of its own (see `append`: idempotence is per id and
//! sequence), as a successor cannot continue its predecessor's sequence.

mod builder;
mod ttl;
mod worker;

pub use builder::ProducerBuilder;
use ttl::LeaseCache;
use worker::Worker;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::record::{self, pb, Record};
use crate::topic::{TopicConfig, TopicInfo};

/// The largest encoded batch by default: etcd refuses requests over 1.5 MiB,
/// and the head and transaction framing need room beside the batch.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1024 * 1024;

/// How a record without an explicit partition gets one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Partitioner {
    /// Keyed records go to `fnv1a_64(key) % partitions` (stable while the
    /// partition count is unchanged); keyless records rotate over all
    /// partitions.
    #[default]
    KeyHash,
    /// Every record without an explicit partition rotates over all
    /// partitions, keyed or not.
    RoundRobin,
}

/// The partition of a key under [`Partitioner::KeyHash`]: the 64-bit
/// FNV-1a hash of the key bytes, modulo the partition count.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = key
        .iter()
        .fold(OFFSET_BASIS, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME));
    (hash % u64::from(partitions)) as u32
}

/// Publishes records to one topic. Cheap to clone; clones share the
/// partition workers and the buffer.
///
/// Dropping every clone lets queued records finish in the background; call
/// [`Producer::close`] to wait for them.
#[derive(Debug, Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    client: Client,
    config: ProducerBuilder,
    /// Bytes of queued records not yet answered.
    memory: Arc<Semaphore>,
    /// Turns to append: `max_appends_in_flight` permits.
    appends: Arc<Semaphore>,
    /// A std mutex: it is never held across an await.
    workers: Mutex<Workers>,
    /// Workers not yet ended; `close` waits for none.
    live: watch::Sender<usize>,
    metadata: Mutex<Metadata>,
    name: Arc<str>,
    /// Next partition for records that rotate.
    rotation: AtomicU64,
    /// Set by a worker that found the topic deleted.
    deleted: AtomicBool,
    /// The topic's settings as last read, for the workers' retention trims.
    retention: Mutex<TopicConfig>,
    /// Leases of records with a time to live, shared by the workers.
    leases: LeaseCache,
}

#[derive(Debug)]
struct Workers {
    /// The worker of each partition that has one, started on first use and
    /// removed by the worker itself when it ends idle.
    slots: HashMap<u32, Slot>,
    closed: bool,
}

#[derive(Debug)]
struct Slot {
    queue: mpsc::Sender<Item>,
    /// Senders handed this queue that have not finished putting their
    /// record in it: the worker must not end while any has.
    handing: Arc<AtomicUsize>,
}

/// A sender's claim on a worker's queue, taken under the workers lock.
struct Handing {
    queue: mpsc::Sender<Item>,
    count: Arc<AtomicUsize>,
}

impl Drop for Handing {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct Metadata {
    refreshed: Instant,
    topic: TopicInfo,
    max_record_bytes: usize,
}

/// What a partition worker's queue carries.
#[derive(Debug)]
enum Item {
    /// Boxed: a queue allocates its slots in blocks of 32, so with
    /// thousands of partitions the item's size is paid thousands of times.
    Record(Box<Pending>),
    /// Answered once everything queued before it is answered.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Pending {
    record: pb::Record,
    size: usize,
    /// Returned to the buffer when the record is answered.
    permit: OwnedSemaphorePermit,
    reply: oneshot::Sender<Result<(u32, u64)>>,
}

/// Where a record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RecordMetadata {
    pub partition: u32,
    pub offset: u64,
    /// The record's timestamp in milliseconds since the Unix epoch: its own,
    /// or the producer's clock when the producer accepted it.
    pub timestamp: i64,
}

/// A record that was not acknowledged, handed back with the reason, so the
/// application can retry or divert it. Converts into [`Error`] for `?`.
#[derive(Debug)]
#[non_exhaustive]
pub struct SendError {
    pub error: Error,
    pub record: Record,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Error {
        e.error
    }
}

/// Resolves to the record's [`RecordMetadata`] once it is stored in etcd,
/// or to the record and why it was not.
#[derive(Debug)]
#[must_use = "a delivery does nothing unless awaited; drop it to ignore the outcome"]
pub struct Delivery {
    reply: oneshot::Receiver<Result<(u32, u64)>>,
    timestamp: i64,
    /// Handed back on failure (its bytes are shared with the queued copy).
    record: Record,
}

impl Future for Delivery {
    type Output = std::result::Result<RecordMetadata, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let outcome = std::task::ready!(Pin::new(&mut self.reply).poll(cx))
            .unwrap_or(Err(Error::ProducerClosed));
        Poll::Ready(match outcome {
            Ok((partition, offset)) => Ok(RecordMetadata {
                partition,
                offset,
                timestamp: self.timestamp,
            }),
            Err(error) => Err(SendError {
                error,
                record: std::mem::take(&mut self.record),
            }),
        })
    }
}

impl Client {
    /// Starts configuring a producer for `topic`.
    pub fn producer(&self, topic: impl Into<String>) -> ProducerBuilder {
        ProducerBuilder::new(self.clone(), topic.into())
    }
}

impl Producer {
    /// The topic this producer writes to.
    pub fn topic(&self) -> &str {
        &self.shared.name
    }

    /// Sends one record and waits until it is durable in etcd.
    ///
    /// # Errors
    /// The record comes back with the error: [`Error::Unavailable`] once
    /// etcd could not be reached for the unavailable timeout (see
    /// [`ProducerBuilder::unavailable_timeout`]), [`Error::Contended`],
    /// [`Error::MessageTooLarge`], [`Error::PartitionOutOfRange`],
    /// [`Error::TopicDeleted`] or [`Error::ProducerClosed`].
    ///
    /// # Cancel safety
    /// As for [`Producer::enqueue`]: a record already queued is still
    /// stored, and its outcome is not reported to anyone.
    pub async fn send(&self, record: Record) -> std::result::Result<RecordMetadata, SendError> {
        self.enqueue(record).await?.await
    }

    /// Sends records and waits for all of them; one result per record, in
    /// input order. Records for one partition keep their input order.
    ///
    /// # Errors
    /// Each failed record comes back in its place with its error, as for
    /// [`Producer::send`].
    ///
    /// # Cancel safety
    /// A dropped call leaves the records it queued to be stored; the rest
    /// are not sent.
    pub async fn send_batch(
        &self,
        records: impl IntoIterator<Item = Record>,
    ) -> Vec<std::result::Result<RecordMetadata, SendError>> {
        let mut deliveries = Vec::new();
        for record in records {
            deliveries.push(self.enqueue(record).await);
        }
        let mut results = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            results.push(match delivery {
                Ok(delivery) => delivery.await,
                Err(e) => Err(e),
            });
        }
        results
    }

    /// Queues a record, waiting only for buffer room, and returns a
    /// [`Delivery`] to await its outcome. Lets one task keep many records in
    /// flight; records enqueued by one task to one partition keep their order.
    ///
    /// # Errors
    /// The record comes back with the error when it cannot be queued: too
    /// large, partition out of range, topic deleted, producer closed, or
    /// etcd failing the metadata refresh.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropped while waiting for buffer room, the record is not
    /// queued; once it is queued the call returns at once.
    pub async fn enqueue(&self, record: Record) -> std::result::Result<Delivery, SendError> {
        let kept = record.clone();
        match self.queue(record).await {
            Ok((reply, timestamp)) => Ok(Delivery {
                reply,
                timestamp,
                record: kept,
            }),
            Err(error) => Err(SendError {
                error,
                record: kept,
            }),
        }
    }

    /// Queues a record; returns where its outcome comes and its timestamp.
    async fn queue(&self, record: Record) -> Result<(oneshot::Receiver<Result<(u32, u64)>>, i64)> {
        let shared = &self.shared;
        if shared.deleted.load(Ordering::Relaxed) {
            return Err(Error::TopicDeleted(shared.name.to_string()));
        }
        self.refresh_if_stale().await?;
        let explicit = record.partition;
        let key_partition = match shared.config.partitioner {
            Partitioner::KeyHash => record.key.clone(),
            Partitioner::RoundRobin => None,
        };
        let record = record.into_pb();
        let timestamp = record.timestamp_ms;
        let size = record::encoded_record_len(&record);
        let (partitions, max_record_bytes) = {
            let metadata = shared.metadata.lock().expect("metadata lock");
            (metadata.topic.partitions, metadata.max_record_bytes)
        };
        if size > max_record_bytes {
            return Err(Error::MessageTooLarge {
                size,
                limit: max_record_bytes,
            });
        }
        let partition = match (explicit, key_partition) {
            (Some(p), _) => {
                if p >= partitions {
                    self.refresh().await?;
                    let partitions = shared
                        .metadata
                        .lock()
                        .expect("metadata lock")
                        .topic
                        .partitions;
                    if p >= partitions {
                        return Err(Error::PartitionOutOfRange {
                            topic: shared.name.to_string(),
                            partition: p,
                            partitions,
                        });
                    }
                }
                p
            }
            (None, Some(key)) => partition_for_key(&key, partitions),
            (None, None) => {
                (shared.rotation.fetch_add(1, Ordering::Relaxed) % u64::from(partitions)) as u32
            }
        };
        let permit = shared
            .memory
            .clone()
            .acquire_many_owned(size as u32)
            .await
            .map_err(|_| Error::ProducerClosed)?;
        let handing = self.worker(partition)?;
        let (reply, receiver) = oneshot::channel();
        handing
            .queue
            .send(Item::Record(Box::new(Pending {
                record,
                size,
                permit,
                reply,
            })))
            .await
            .map_err(|_| Error::ProducerClosed)?;
        Ok((receiver, timestamp))
    }

    /// Waits until every record enqueued before this call is answered.
    ///
    /// # Errors
    /// None today: the records' own outcomes go to their senders. The
    /// `Result` leaves room for a producer-wide failure.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only waits.
    pub async fn flush(&self) -> Result<()> {
        let senders: Vec<_> = {
            let workers = self.shared.workers.lock().expect("workers lock");
            workers.slots.values().map(|s| s.queue.clone()).collect()
        };
        let mut waits = Vec::with_capacity(senders.len());
        for sender in senders {
            let (done, wait) = oneshot::channel();
            if sender.send(Item::Flush(done)).await.is_ok() {
                waits.push(wait);
            }
        }
        for wait in waits {
            // An error means the worker ended, having answered everything
            // (it ends idle only with nothing queued).
            let _ = wait.await;
        }
        Ok(())
    }

    /// Stops accepting records, waits for every queued record to be answered,
    /// and stops the partition workers. Other clones then fail with
    /// [`Error::ProducerClosed`].
    ///
    /// # Errors
    /// None today, as for [`Producer::flush`].
    ///
    /// # Cancel safety
    /// A dropped call has already closed the producer: queued records are
    /// still stored by the workers, which then end.
    pub async fn close(&self) -> Result<()> {
        let mut live = {
            let mut workers = self.shared.workers.lock().expect("workers lock");
            workers.closed = true;
            workers.slots.clear();
            self.shared.live.subscribe()
        };
        // Each worker answers what it has queued, then ends.
        let _ = live.wait_for(|n| *n == 0).await;
        Ok(())
    }

    /// A claim on `partition`'s worker's queue, starting the worker if
    /// needed.
    fn worker(&self, partition: u32) -> Result<Handing> {
        let shared = &self.shared;
        let mut workers = shared.workers.lock().expect("workers lock");
        if workers.closed {
            return Err(Error::ProducerClosed);
        }
        if let Some(slot) = workers.slots.get(&partition) {
            // A worker that ended without removing its slot (it only does
            // on a panic) is replaced rather than failing every send.
            if !slot.queue.is_closed() {
                slot.handing.fetch_add(1, Ordering::SeqCst);
                return Ok(Handing {
                    queue: slot.queue.clone(),
                    count: slot.handing.clone(),
                });
            }
        }
        let (incarnation, topic_compression) = {
            let metadata = shared.metadata.lock().expect("metadata lock");
            (
                metadata.topic.incarnation,
                metadata.topic.config.compression,
            )
        };
        let (queue, receiver) = mpsc::channel(2 * shared.config.max_batch_records);
        let handing = Arc::new(AtomicUsize::new(1));
        shared.live.send_modify(|n| *n += 1);
        let compression = shared.config.compression.unwrap_or(topic_compression);
        let worker = Worker::new(
            shared.clone(),
            partition,
            incarnation,
            compression,
            receiver,
            handing.clone(),
        );
        tokio::spawn(worker.run());
        workers.slots.insert(
            partition,
            Slot {
                queue: queue.clone(),
                handing: handing.clone(),
            },
        );
        Ok(Handing {
            queue,
            count: handing,
        })
    }

    async fn refresh_if_stale(&self) -> Result<()> {
        let stale = {
            let mut metadata = self.shared.metadata.lock().expect("metadata lock");
            let stale = metadata.refreshed.elapsed() >= self.shared.config.metadata_max_age;
            if stale {
                // Claim the refresh so concurrent senders do not all repeat it.
                metadata.refreshed = Instant::now();
            }
            stale
        };
        if stale {
            self.refresh().await?;
        }
        Ok(())
    }

    /// Re-reads the topic: picks up new partitions, notices deletion.
    async fn refresh(&self) -> Result<()> {
        let shared = &self.shared;
        let incarnation = shared
            .metadata
            .lock()
            .expect("metadata lock")
            .topic
            .incarnation;
        let topic = match shared.client.topic(&shared.name).await {
            Ok(topic) if topic.incarnation == incarnation => topic,
            Ok(_) | Err(Error::TopicNotFound(_)) => {
                shared.deleted.store(true, Ordering::Relaxed);
                return Err(Error::TopicDeleted(shared.name.to_string()));
            }
            Err(e) => return Err(e),
        };
        let mut metadata = shared.metadata.lock().expect("metadata lock");
        metadata.max_record_bytes = topic
            .config
            .max_message_bytes
            .map_or(shared.config.max_batch_bytes, |m| {
                (m as usize).min(shared.config.max_batch_bytes)
            });
        *shared.retention.lock().expect("retention lock") = topic.config.clone();
        metadata.topic = topic;
        metadata.refreshed = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_fnv1a_and_stable() {
        // FNV-1a 64 of "" is the offset basis; of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(
            partition_for_key(b"", 1 << 31),
            (0xcbf29ce484222325u64 % (1 << 31)) as u32
        );
        assert_eq!(
            partition_for_key(b"a", 1000),
            (0xaf63dc4c8601ec8cu64 % 1000) as u32
        );
        for p in [1, 3, 12, 4096] {
            assert!(partition_for_key(b"user-42", p) < p);
        }
    }
}
