//! [`ProducerBuilder`]: a producer's settings, their defaults and checks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::ttl::LeaseCache;
use super::{Metadata, Partitioner, Producer, Shared, Workers, DEFAULT_MAX_BATCH_BYTES};
use crate::client::Client;
use crate::compression::Compression;
use crate::error::{Error, Result};
use crate::record::MAX_RECORDS_PER_BATCH;

/// Configures a [`Producer`]; every setting has a documented default.
#[derive(Debug, Clone)]
pub struct ProducerBuilder {
    pub(super) client: Client,
    pub(super) topic: String,
    pub(super) linger: Duration,
    pub(super) max_batch_bytes: usize,
    pub(super) max_batch_records: usize,
    pub(super) buffer_bytes: usize,
    pub(super) delivery_timeout: Duration,
    pub(super) unavailable_timeout: Duration,
    pub(super) metadata_max_age: Duration,
    pub(super) partitioner: Partitioner,
    pub(super) compression: Option<Compression>,
    pub(super) worker_idle_timeout: Duration,
    pub(super) max_appends_in_flight: usize,
}

impl ProducerBuilder {
    pub(crate) fn new(client: Client, topic: String) -> Self {
        ProducerBuilder {
            client,
            topic,
            linger: Duration::ZERO,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_batch_records: MAX_RECORDS_PER_BATCH as usize,
            buffer_bytes: 32 * 1024 * 1024,
            delivery_timeout: Duration::from_secs(60),
            unavailable_timeout: Duration::from_secs(10),
            metadata_max_age: Duration::from_secs(30),
            partitioner: Partitioner::KeyHash,
            compression: None,
            worker_idle_timeout: Duration::from_secs(5),
            max_appends_in_flight: 64,
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
    /// beyond it. Default: 32 MiB (Kafka's `buffer.memory`).
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

    /// Most append transactions of this producer in flight at once, over
    /// all its partitions; a partition's worker waits for a turn and then
    /// sends all that queued meanwhile. Bounds the load one producer puts
    /// on etcd when it writes thousands of partitions at once, where one
    /// transaction per partition at a time overloaded it. Default: 64.
    pub fn max_appends_in_flight(mut self, appends: usize) -> Self {
        self.max_appends_in_flight = appends;
        self
    }

    /// Reads the topic and makes the producer.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the setting out of range,
    /// [`Error::TopicNotFound`], and etcd errors reading the topic.
    ///
    /// # Cancel safety
    /// Cancel-safe: nothing starts until it returns.
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
        if self.max_appends_in_flight == 0 || self.max_appends_in_flight > Semaphore::MAX_PERMITS {
            return Err(Error::InvalidConfig(format!(
                "max_appends_in_flight is {}; it must be between 1 and {}",
                self.max_appends_in_flight,
                Semaphore::MAX_PERMITS
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
                appends: Arc::new(Semaphore::new(self.max_appends_in_flight)),
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
