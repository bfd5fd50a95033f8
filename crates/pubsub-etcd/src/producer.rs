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

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::append::PartitionAppender;
use crate::client::Client;
use crate::compression::Compression;
use crate::error::{Error, Result};
use crate::partition::Partition;
use crate::record::{self, pb, Record, MAX_RECORDS_PER_BATCH};
use crate::retention;
use crate::topic::{TopicConfig, TopicInfo};

/// How often a partition worker trims its partition to the topic's
/// retention limits (after a successful append; never two trims at once).
const TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// How long a closing worker's final trim may take.
const FINAL_TRIM_TIMEOUT: Duration = Duration::from_secs(5);
/// Width of a deadline bucket: records whose deadlines fall in one bucket
/// share one etcd lease (per producer) and may share a batch.
const TTL_BUCKET_MS: i64 = 1000;
/// A cached lease is reused only while it has at least this long to live.
const LEASE_MARGIN_MS: i64 = 2000;

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

/// Configures a [`Producer`]; every setting has a documented default.
#[derive(Debug, Clone)]
pub struct ProducerBuilder {
    client: Client,
    topic: String,
    linger: Duration,
    max_batch_bytes: usize,
    max_batch_records: usize,
    buffer_bytes: usize,
    delivery_timeout: Duration,
    unavailable_timeout: Duration,
    metadata_max_age: Duration,
    partitioner: Partitioner,
    compression: Option<Compression>,
    worker_idle_timeout: Duration,
}

impl ProducerBuilder {
    pub(crate) fn new(client: Client, topic: String) -> Self {
        ProducerBuilder {
            client,
            topic,
            linger: Duration::ZERO,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_batch_records: MAX_RECORDS_PER_BATCH as usize,
            buffer_bytes: 64 * 1024 * 1024,
            delivery_timeout: Duration::from_secs(60),
            unavailable_timeout: Duration::from_secs(10),
            metadata_max_age: Duration::from_secs(30),
            partitioner: Partitioner::KeyHash,
            compression: None,
            worker_idle_timeout: Duration::from_secs(5),
        }
    }

    /// How long a partition worker waits for more records before sending a
    /// batch. Batches already grow while a transaction is in flight, so this
    /// only trades latency for fewer transactions at low rates. Default: 0.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Largest encoded batch, which is also the largest record. Default:
    /// 1 MiB; at most 1.4 MiB, since etcd refuses requests over 1.5 MiB.
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes;
        self
    }

    /// Most records per batch. Default and maximum: 10,000.
    pub fn max_batch_records(mut self, records: usize) -> Self {
        self.max_batch_records = records;
        self
    }

    /// Bytes of records that may wait to be sent; senders wait for room
    /// beyond it. Default: 64 MiB.
    pub fn buffer_bytes(mut self, bytes: usize) -> Self {
        self.buffer_bytes = bytes;
        self
    }

    /// How long a batch may keep retrying while other producers win every
    /// append to its partition before its records fail with
    /// [`Error::Contended`]; also the longest any send waits for its batch.
    /// Default: 60 s.
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// How long a batch may keep retrying while etcd cannot be reached or
    /// does not answer before its records fail with [`Error::Unavailable`]
    /// (their outcome unknown). A send to an unreachable etcd fails within
    /// this plus one request timeout of the client (an attempt in flight
    /// when it passes is not cut short). Default: 10 s; at most the
    /// delivery timeout.
    pub fn unavailable_timeout(mut self, timeout: Duration) -> Self {
        self.unavailable_timeout = timeout;
        self
    }

    /// How often the topic's metadata (partition count, deletion) is
    /// re-read. Default: 30 s.
    pub fn metadata_max_age(mut self, age: Duration) -> Self {
        self.metadata_max_age = age;
        self
    }

    /// How records without a partition get one. Default: [`Partitioner::KeyHash`].
    pub fn partitioner(mut self, partitioner: Partitioner) -> Self {
        self.partitioner = partitioner;
        self
    }

    /// How the records of each batch are compressed. Default: the topic's
    /// [`TopicConfig::compression`](crate::TopicConfig::compression) as the
    /// producer last read it when a partition's worker starts.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = Some(compression);
        self
    }

    /// How long a partition's worker stays with nothing to send before it
    /// ends; the next record for that partition starts a new one (which
    /// first reads the partition's head: one more etcd request). Default: 5 s.
    ///
    /// This bounds the producer's memory: `buffer_bytes` of queued records,
    /// plus one worker (a few KiB, its queue growing with what is queued)
    /// for each partition written within the last `worker_idle_timeout`,
    /// whatever the topic's partition count.
    pub fn worker_idle_timeout(mut self, timeout: Duration) -> Self {
        self.worker_idle_timeout = timeout;
        self
    }

    /// Reads the topic and makes the producer.
    pub async fn build(self) -> Result<Producer> {
        const MAX_REQUEST_BATCH: usize = 1400 * 1024;
        if self.max_batch_bytes == 0 || self.max_batch_bytes > MAX_REQUEST_BATCH {
            return Err(Error::InvalidConfig(format!(
                "max_batch_bytes is {}; it must be between 1 and {MAX_REQUEST_BATCH}",
                self.max_batch_bytes
            )));
        }
        if self.max_batch_records == 0 || self.max_batch_records as u64 > MAX_RECORDS_PER_BATCH {
            return Err(Error::InvalidConfig(format!(
                "max_batch_records is {}; it must be between 1 and {MAX_RECORDS_PER_BATCH}",
                self.max_batch_records
            )));
        }
        if self.buffer_bytes < self.max_batch_bytes || self.buffer_bytes > u32::MAX as usize {
            return Err(Error::InvalidConfig(format!(
                "buffer_bytes is {}; it must be at least max_batch_bytes ({}) and below 4 GiB",
                self.buffer_bytes, self.max_batch_bytes
            )));
        }
        if let Some(compression) = &self.compression {
            compression.validate()?;
        }
        let topic = self.client.topic(&self.topic).await?;
        let max_record_bytes = topic
            .config
            .max_message_bytes
            .map_or(self.max_batch_bytes, |m| {
                (m as usize).min(self.max_batch_bytes)
            });
        Ok(Producer {
            shared: Arc::new(Shared {
                client: self.client.clone(),
                memory: Arc::new(Semaphore::new(self.buffer_bytes)),
                workers: Mutex::new(Workers {
                    slots: HashMap::new(),
                    closed: false,
                }),
                live: watch::channel(0).0,
                metadata: Mutex::new(Metadata {
                    refreshed: Instant::now(),
                    topic: topic.clone(),
                    max_record_bytes,
                }),
                retention: Mutex::new(topic.config.clone()),
                leases: LeaseCache::default(),
                name: topic.name.as_str().into(),
                rotation: AtomicU64::new(rand::random::<u32>().into()),
                deleted: AtomicBool::new(false),
                config: self,
            }),
        })
    }
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

/// One etcd lease per deadline bucket, granted on first use and shared by
/// every batch of this producer whose records' deadlines fall in the bucket:
/// one grant per second of distinct deadlines, not one per message.
#[derive(Debug, Default)]
struct LeaseCache {
    /// Bucket -> (lease id, when the lease ends in ms since the epoch).
    leases: tokio::sync::Mutex<HashMap<i64, (i64, i64)>>,
}

impl LeaseCache {
    /// The lease for records whose deadlines fall in `bucket`. It ends a few
    /// seconds after the bucket (readers skip expired records exactly by
    /// their own deadline; the lease only reclaims the space).
    async fn lease_for(&self, client: &Client, bucket: i64) -> Result<i64> {
        let now = record::now_millis();
        {
            let mut leases = self.leases.lock().await;
            leases.retain(|_, (_, ends)| *ends > now);
            if let Some(&(id, ends)) = leases.get(&bucket) {
                if ends > now.saturating_add(LEASE_MARGIN_MS) {
                    return Ok(id);
                }
            }
        }
        // Granted without holding the lock, so partitions are not queued
        // behind one slow grant. Two workers may grant for one bucket at
        // once: the first stored wins; the other lease expires unused.
        let bucket_end = bucket.saturating_mul(TTL_BUCKET_MS);
        let ttl_secs = bucket_end.saturating_sub(now).max(0) / 1000 + 4;
        let granted = client
            .timed(
                "grant lease",
                client.etcd.clone().lease_grant(ttl_secs, None),
            )
            .await?;
        let ends = now.saturating_add(granted.ttl().saturating_mul(1000));
        let mut leases = self.leases.lock().await;
        Ok(leases.entry(bucket).or_insert((granted.id(), ends)).0)
    }
}

/// The deadline bucket of a record with a time to live.
fn ttl_bucket(record: &pb::Record) -> Option<i64> {
    (record.expires_at_ms != 0)
        .then(|| record.expires_at_ms.saturating_add(TTL_BUCKET_MS - 1) / TTL_BUCKET_MS)
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
    Record(Pending),
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
    pub async fn send(&self, record: Record) -> std::result::Result<RecordMetadata, SendError> {
        self.enqueue(record).await?.await
    }

    /// Sends records and waits for all of them; one result per record, in
    /// input order. Records for one partition keep their input order.
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
            .send(Item::Record(Pending {
                record,
                size,
                permit,
                reply,
            }))
            .await
            .map_err(|_| Error::ProducerClosed)?;
        Ok((receiver, timestamp))
    }

    /// Waits until every record enqueued before this call is answered.
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
        let worker = Worker {
            appender: PartitionAppender::new(
                shared.client.clone(),
                Partition::new(shared.name.clone(), incarnation, partition),
                // Each worker its own id: a successor cannot continue its
                // predecessor's sequence.
                rand::random(),
                shared.config.compression.unwrap_or(topic_compression),
            ),
            shared: shared.clone(),
            partition,
            queue: receiver,
            handing: handing.clone(),
            held: None,
            incarnation,
            last_trim: None,
            appended_since_trim: false,
            trim_task: None,
        };
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

/// One partition's batching loop. What all workers share stays in
/// `Shared`, so a worker costs little beside its appender and queue.
struct Worker {
    shared: Arc<Shared>,
    appender: PartitionAppender,
    partition: u32,
    queue: mpsc::Receiver<Item>,
    /// Its slot's count of senders handing it a record.
    handing: Arc<AtomicUsize>,
    /// A record taken from the queue that did not fit the last batch.
    held: Option<Pending>,
    incarnation: i64,
    /// When the last retention trim started.
    last_trim: Option<Instant>,
    appended_since_trim: bool,
    /// The background trim started last; awaited on close, so no trim
    /// outlives the producer.
    trim_task: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.live.send_modify(|n| *n -= 1);
    }
}

impl Worker {
    async fn run(mut self) {
        let config = &self.shared.config;
        let (linger, idle) = (config.linger, config.worker_idle_timeout);
        let (max_batch_bytes, max_batch_records) =
            (config.max_batch_bytes, config.max_batch_records);
        loop {
            let mut batch = Vec::new();
            let mut flushes = Vec::new();
            let mut bytes = 0usize;
            let first = match self.held.take() {
                Some(pending) => Item::Record(pending),
                None => match tokio::time::timeout(idle, self.queue.recv()).await {
                    Ok(Some(item)) => item,
                    Ok(None) => {
                        self.final_trim().await;
                        return;
                    }
                    Err(_) if self.retire() => {
                        self.final_trim().await;
                        return;
                    }
                    Err(_) => continue,
                },
            };
            let linger_until = Instant::now() + linger;
            let mut item = Some(first);
            loop {
                match item.take() {
                    Some(Item::Record(pending)) => {
                        // Records of different deadline buckets (or with and
                        // without a time to live) go in different batches:
                        // a batch key carries at most one lease.
                        let other_bucket = batch.first().is_some_and(|first: &Pending| {
                            ttl_bucket(&first.record) != ttl_bucket(&pending.record)
                        });
                        if !batch.is_empty()
                            && (bytes + pending.size > max_batch_bytes || other_bucket)
                        {
                            self.held = Some(pending);
                            break;
                        }
                        bytes += pending.size;
                        batch.push(pending);
                        if batch.len() >= max_batch_records {
                            break;
                        }
                    }
                    // A flush ends lingering: its caller wants the batch now.
                    Some(Item::Flush(done)) => {
                        flushes.push(done);
                        if !linger.is_zero() {
                            break;
                        }
                    }
                    None => {}
                }
                item = match self.queue.try_recv() {
                    Ok(next) => Some(next),
                    Err(mpsc::error::TryRecvError::Empty) if Instant::now() < linger_until => {
                        tokio::select! {
                            next = self.queue.recv() => next,
                            _ = tokio::time::sleep_until(linger_until) => None,
                        }
                    }
                    Err(_) => None,
                };
                if item.is_none() {
                    break;
                }
            }
            if !batch.is_empty() {
                self.send(batch).await;
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// Ends this worker if nothing is queued for it nor being handed to it:
    /// its slot goes, so the next record for the partition starts a new
    /// worker. Under the workers lock, which every hand-over takes first.
    fn retire(&mut self) -> bool {
        let mut workers = self.shared.workers.lock().expect("workers lock");
        if self.handing.load(Ordering::SeqCst) > 0 || !self.queue.is_empty() {
            return false;
        }
        if workers
            .slots
            .get(&self.partition)
            .is_some_and(|slot| Arc::ptr_eq(&slot.handing, &self.handing))
        {
            workers.slots.remove(&self.partition);
        }
        // Flushes that still hold the queue see it closed: nothing to wait for.
        self.queue.close();
        true
    }

    async fn send(&mut self, batch: Vec<Pending>) {
        let mut records = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        // The records' buffer room is held until they are answered.
        let mut permits = Vec::with_capacity(batch.len());
        for pending in batch {
            records.push(pending.record);
            replies.push(pending.reply);
            permits.push(pending.permit);
        }
        let config = &self.shared.config;
        let started = Instant::now();
        let delivery_deadline = started + config.delivery_timeout;
        let lease = match records.first().and_then(ttl_bucket) {
            Some(bucket) => match self
                .shared
                .leases
                .lease_for(&self.shared.client, bucket)
                .await
            {
                Ok(lease) => Some(lease),
                Err(e) => {
                    let e = if e.is_outcome_unknown() {
                        Error::Unavailable {
                            op: "grant lease",
                            waited: started.elapsed(),
                            detail: e.to_string(),
                        }
                    } else {
                        e
                    };
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                    return;
                }
            },
            None => None,
        };
        let outcome = loop {
            // The append gives up at the unavailable deadline, also when
            // other producers won every attempt; those records were never
            // written, so they may go again until the delivery deadline.
            let deadline = (Instant::now() + config.unavailable_timeout).min(delivery_deadline);
            let retry = (delivery_deadline > deadline).then(|| records.clone());
            match self.appender.append_leased(records, deadline, lease).await {
                Err(Error::Contended { .. })
                    if Instant::now() < delivery_deadline && retry.is_some() =>
                {
                    records = retry.expect("checked");
                }
                Err(Error::Contended {
                    topic, partition, ..
                }) => {
                    break Err(Error::Contended {
                        topic,
                        partition,
                        waited: started.elapsed(),
                    })
                }
                Err(e) if e.is_outcome_unknown() => {
                    break Err(Error::Unavailable {
                        op: "append",
                        waited: started.elapsed(),
                        detail: e.to_string(),
                    })
                }
                outcome => break outcome,
            }
        };
        match outcome {
            Ok(base) => {
                for (i, reply) in replies.into_iter().enumerate() {
                    let _ = reply.send(Ok((self.partition, base + i as u64)));
                }
                self.appended_since_trim = true;
                self.maybe_trim();
            }
            Err(e) => {
                if matches!(e, Error::TopicDeleted(_)) {
                    self.shared.deleted.store(true, Ordering::Relaxed);
                }
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        drop(permits);
    }

    /// A trim of this partition to the topic's retention limits, when the
    /// topic has limits and this worker knows the partition's head.
    fn trim_job(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        let config = self
            .shared
            .retention
            .lock()
            .expect("retention lock")
            .clone();
        if !retention::wants_trim(&config) {
            return None;
        }
        let (next, total_bytes) = self.appender.known_head()?;
        Some(retention::producer_trim(
            self.shared.client.clone(),
            Partition::new(self.shared.name.clone(), self.incarnation, self.partition),
            config,
            next,
            total_bytes,
        ))
    }

    /// Starts a background trim at most once per [`TRIM_INTERVAL`] and never
    /// two at once, so the append path only pays for a clock read.
    fn maybe_trim(&mut self) {
        if self.trim_task.as_ref().is_some_and(|t| !t.is_finished())
            || self.last_trim.is_some_and(|t| t.elapsed() < TRIM_INTERVAL)
        {
            return;
        }
        let Some(trim) = self.trim_job() else {
            return;
        };
        self.last_trim = Some(Instant::now());
        self.appended_since_trim = false;
        self.trim_task = Some(tokio::spawn(trim));
    }

    /// On close: waits for a running trim, then trims once more if anything
    /// was appended since, so a closed producer leaves its partitions within
    /// the limits and no trim runs on after it.
    async fn final_trim(&mut self) {
        let deadline = Instant::now() + FINAL_TRIM_TIMEOUT;
        if let Some(mut task) = self.trim_task.take() {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
        if !self.appended_since_trim {
            return;
        }
        if let Some(trim) = self.trim_job() {
            let _ = tokio::time::timeout_at(deadline, trim).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_buckets_are_one_second_wide() {
        let at = |ms: i64| pb::Record {
            expires_at_ms: ms,
            ..pb::Record::default()
        };
        assert_eq!(ttl_bucket(&at(0)), None);
        assert_eq!(ttl_bucket(&at(1)), Some(1));
        assert_eq!(ttl_bucket(&at(1000)), Some(1));
        assert_eq!(ttl_bucket(&at(1001)), Some(2));
        assert_eq!(ttl_bucket(&at(1999)), Some(2));
    }

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
