//! What a topic's partitions hold now: the earliest and next offset and the
//! bytes of each ([`PartitionInfo`], [`Client::describe_topic`]), read from
//! the partition heads and first batches, many partitions per request.

use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
use serde::Serialize;

use crate::client::Client;
use crate::error::Result;
use crate::fetch::{fetch_partition, Cut};
use crate::keys::prefix_end;
use crate::partition::{Head, Partition};
use crate::topic::TopicInfo;

/// One partition's range of offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PartitionInfo {
    pub partition: u32,
    /// The lowest offset still stored (equal to `next` when empty).
    pub earliest: u64,
    /// The offset the next appended message will get.
    pub next: u64,
    /// Application bytes (records encoded, before compression) appended from
    /// the oldest stored batch on. Records deleted from inside that range
    /// are still counted.
    pub bytes: u64,
    /// The same range's bytes as stored in etcd (batch values, after
    /// compression): what byte retention counts. Counted from the format
    /// version that records them (older batches count 0).
    pub stored_bytes: u64,
}

/// A topic with the offsets of each of its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TopicDescription {
    pub topic: TopicInfo,
    pub partitions: Vec<PartitionInfo>,
}

/// Most partitions per describe transaction: two reads each, and etcd
/// allows 128 operations per transaction.
const DESCRIBE_CHUNK: u32 = 64;

impl Client {
    /// A topic with the earliest and next offset of every partition.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopicName`](crate::Error::InvalidTopicName),
    /// [`Error::TopicNotFound`](crate::Error::TopicNotFound);
    /// [`Error::Corrupt`](crate::Error::Corrupt) for unreadable topic
    /// metadata or partition head; [`Error::Timeout`](crate::Error::Timeout)
    /// or [`Error::Etcd`](crate::Error::Etcd) when etcd does not answer in
    /// time or refuses.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let topic = self.topic(name).await?;
        let partitions = self.partition_infos(&topic, 0..topic.partitions).await?;
        Ok(TopicDescription { topic, partitions })
    }

    /// The earliest and next offset of one partition.
    pub(crate) async fn partition_info(
        &self,
        topic: &TopicInfo,
        partition: u32,
    ) -> Result<PartitionInfo> {
        let mut infos = self
            .partition_infos(topic, partition..partition + 1)
            .await?;
        Ok(infos.remove(0))
    }

    /// The next offset of each of `partitions`, from their heads only
    /// (etcd's 128 operations per transaction, so one request per 128).
    pub(crate) async fn next_offsets(
        &self,
        topic: &TopicInfo,
        partitions: &[u32],
    ) -> Result<Vec<(u32, u64)>> {
        let mut nexts = Vec::with_capacity(partitions.len());
        for chunk in partitions.chunks(128) {
            let ops = Partition::each(topic, chunk.iter().copied())
                .map(|p| TxnOp::get(self.keys.head(&p), None))
                .collect::<Vec<_>>();
            let response = self
                .read_txn("read partition heads", Txn::new().and_then(ops))
                .await?;
            for (&p, op) in chunk.iter().zip(response.op_responses()) {
                let next = match op {
                    TxnOpResponse::Get(get) => Head::decode(get.kvs().first())?.next_offset,
                    _ => 0,
                };
                nexts.push((p, next));
            }
        }
        Ok(nexts)
    }

    pub(crate) async fn partition_infos(
        &self,
        topic: &TopicInfo,
        range: std::ops::Range<u32>,
    ) -> Result<Vec<PartitionInfo>> {
        let mut partitions = Vec::with_capacity(range.len());
        let mut first = range.start;
        while first < range.end {
            let last = (first + DESCRIBE_CHUNK).min(range.end);
            let chunk: Vec<Partition> = Partition::each(topic, first..last).collect();
            let mut ops = Vec::new();
            for p in &chunk {
                ops.push(TxnOp::get(self.keys.head(p), None));
                let prefix = self.keys.batches_prefix(p);
                let options = GetOptions::new()
                    .with_range(prefix_end(&prefix))
                    .with_limit(1);
                ops.push(TxnOp::get(prefix, Some(options)));
            }
            let response = match self
                .read_txn("describe partitions", Txn::new().and_then(ops))
                .await
            {
                Ok(response) => response,
                // Each partition's first batch comes whole: together they
                // may exceed `max_response_bytes` where one alone does not.
                Err(error) if !error.is_outcome_unknown() && chunk.len() > 1 => {
                    tracing::debug!(%error, partitions = chunk.len(), "describing partitions one by one");
                    for p in first..last {
                        partitions.extend(Box::pin(self.partition_infos(topic, p..p + 1)).await?);
                    }
                    first = last;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let mut responses = response.op_responses().into_iter().map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                _ => None,
            });
            for p in &chunk {
                let head = Head::decode(responses.next().flatten().as_ref())?;
                let next = head.next_offset;
                let (earliest, base_bytes, base_stored) = match responses.next().flatten() {
                    Some(kv) => match p.decode_batch(
                        &self.keys,
                        kv.key(),
                        bytes::Bytes::copy_from_slice(kv.value()),
                    ) {
                        Ok(batch) => (
                            batch
                                .records
                                .first()
                                .map_or(next, |r| batch.base_offset + u64::from(r.offset_delta)),
                            batch.base_bytes,
                            batch.base_stored_bytes,
                        ),
                        Err(_) => (self.earliest_past_garbage(p, next).await?, 0, 0),
                    },
                    None => (next, head.total_bytes, head.total_stored_bytes),
                };
                partitions.push(PartitionInfo {
                    partition: p.number(),
                    earliest,
                    next,
                    bytes: head.total_bytes.saturating_sub(base_bytes),
                    stored_bytes: head.total_stored_bytes.saturating_sub(base_stored),
                });
            }
            first = last;
        }
        Ok(partitions)
    }

    /// The earliest offset of a partition whose first batch key is
    /// corrupt: the first message a fetch from 0 finds, skipping (and
    /// logging) the corrupt keys.
    async fn earliest_past_garbage(&self, partition: &Partition, next: u64) -> Result<u64> {
        let fetched = fetch_partition(self, partition, 0, 1, Cut::Exact).await?;
        Ok(fetched.messages.first().map_or(next, |m| m.offset))
    }
}
